"""Qwen2-VL / Qwen2.5-VL text attention that is block-diagonal causal over a packed row.

A packed row (``visionft.data.packing``) holds several samples one after the other; each token may
only attend to earlier tokens of its own sample. transformers' attention would let it see the
samples before it. This module swaps the forward of every text attention instance for one that,
when the forward's keyword arguments carry ``packed_cu_seqlens`` (and ``packed_max_seqlen``),
computes q, k, v and the rotary embedding as the original does and then attends within segments:

- CUDA with bf16/fp16 operands (under autocast: cast to its dtype first, ``attention_operands``):
  ``torch.nn.attention.varlen.varlen_attn`` (flash varlen). Its keyword
  arguments differ by release and are read once with ``inspect``: torch 2.10/2.11 take
  ``is_causal=True`` and no ``scale`` or ``enable_gqa``; 2.12 and later take ``window_size=(-1, 0)``
  for causal, ``scale`` and ``enable_gqa``. Without ``enable_gqa`` the key/value heads are repeated
  to the query heads (Qwen2.5-VL-7B: 28 query heads, 4 key/value heads).
- otherwise (CPU, fp32, no ``varlen_attn``): one SDPA call over the segments padded to the longest
  (``patching.segments``), causal, memory linear in the row.

Without the key the original forward runs, unchanged. The layout arrives as a forward keyword
argument, so gradient checkpointing's recompute (which replays the layer with the same arguments)
sees it too. The path reads nothing from the device on the host: the longest segment is a host
int from the batch, so it can be captured in a CUDA graph.

The rotary function is looked up in the modeling module at each call, so the fused rope of
``patching.rope`` applies here as in the original forward.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from collections.abc import Callable
from types import ModuleType

import torch
from torch import nn

from visionft.data.packing import PACKED_CU_SEQLENS, PACKED_MAX_SEQLEN, SEPARATES_PACKED_SAMPLES
from visionft.kernels.amp import autocast_dtype
from visionft.model.architectures import FAMILIES
from visionft.patching.core import PatchReport
from visionft.patching.segments import pad_segments, segment_attention

#: Text attention classes of the covered architectures (transformers 5.17 - 5.23), from the family table.
TEXT_ATTENTION_CLASSES = tuple(name for spec in FAMILIES for name in spec.text_attention)


@functools.cache
def _varlen() -> tuple[Callable, set[str]] | None:
    """``varlen_attn`` and its keyword parameters, or None on a torch without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


def attention_operands(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q``, ``k``, ``v`` in the dtype the attention runs in: the autocast dtype where autocast is on for
    their device (transformers' SDPA call runs there under autocast), otherwise the values' dtype.

    Under autocast the projections need not come out in the autocast dtype: bitsandbytes' 4-bit linear
    returns its input's dtype, and a LayerNorm before it (autocast keeps those in fp32) hands it fp32,
    as does the rotary product. Left so, fp32 operands would miss the flash varlen path on CUDA.
    """
    amp = autocast_dtype(q.device.type)
    target = amp if amp is not None else v.dtype
    q, k, v = (t if t.dtype == target else t.to(target) for t in (q, k, v))
    return q, k, v


def uses_varlen(q: torch.Tensor) -> bool:
    """Whether ``packed_attention`` takes the flash varlen path for ``q``."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _varlen() is not None


def varlen_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, scale: float
) -> torch.Tensor:
    """Causal flash varlen attention of ``(S, Hq, D)`` q and ``(S, Hkv, D)`` k/v; ``(S, Hq, D)`` out."""
    found = _varlen()
    if found is None:
        raise RuntimeError("torch.nn.attention.varlen.varlen_attn is not available in this torch")
    varlen_attn, params = found
    heads, dim = q.shape[1], q.shape[2]
    kwargs: dict = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if k.shape[1] != heads:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            groups = heads // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if "scale" in params:
        kwargs["scale"] = scale
    elif abs(scale * dim**0.5 - 1.0) > 1e-6:
        q = q * (scale * dim**0.5)  # the kernel's fixed scale is 1/sqrt(D)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    return varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_len, max_len, **kwargs)


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, scale: float
) -> torch.Tensor:
    """Block-diagonal causal attention over the segments in ``cu_seqlens``.

    Args:
        q (torch.Tensor): ``(S, Hq, D)`` queries.
        k (torch.Tensor): ``(S, Hkv, D)`` keys; ``Hq`` is a multiple of ``Hkv``.
        v (torch.Tensor): ``(S, Hkv, D)`` values.
        cu_seqlens (torch.Tensor): ``(n + 1,)`` segment starts, the last one ``S``.
        max_len (int): the longest segment (host int).
        scale (float): the softmax scale.

    Returns:
        torch.Tensor: ``(S, Hq, D)``.
    """
    q, k, v = attention_operands(q, k, v)
    if uses_varlen(q):
        return varlen_causal_attention(q, k, v, cu_seqlens, max_len, scale)
    cu = cu_seqlens.to(q.device)
    layout = pad_segments(cu, int(cu.shape[0]) - 1, max_len, q.shape[0])
    return segment_attention(q, k, v, layout, scale, causal=True)


def _packed_forward(self, modeling: ModuleType, hidden_states: torch.Tensor, kwargs: dict):
    cu_seqlens = kwargs[PACKED_CU_SEQLENS]
    max_len = kwargs.get(PACKED_MAX_SEQLEN)
    if not isinstance(max_len, int):
        raise ValueError(
            f"{PACKED_CU_SEQLENS} needs {PACKED_MAX_SEQLEN} as a host int (the longest sample), got "
            f"{type(max_len).__name__}"
        )
    batch, seq, _ = hidden_states.shape
    if batch != 1:
        raise ValueError(f"a packed batch is one row, got {batch} rows")
    cache = kwargs.get("past_key_values")
    if cache is not None and cache.get_seq_length(self.layer_idx) > 0:
        # A forward with use_cache=True (the config's default) brings an empty cache, which is fine;
        # continuing a filled one would attend across the segments' boundaries.
        raise ValueError("packed rows are for training: they can't continue a filled KV cache")
    if getattr(self, "sliding_window", None) is not None:
        raise ValueError("packed rows are not supported with sliding-window attention layers")
    if self.training and getattr(self, "attention_dropout", 0.0) > 0:
        raise ValueError("packed rows are not supported with attention dropout")
    q = self.q_proj(hidden_states).view(1, seq, -1, self.head_dim)
    k = self.k_proj(hidden_states).view(1, seq, -1, self.head_dim)
    if hasattr(self, "q_norm") and hasattr(self, "k_norm"):
        q, k = self.q_norm(q), self.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = self.v_proj(hidden_states).view(1, seq, -1, self.head_dim).transpose(1, 2)
    cos, sin = kwargs["position_embeddings"]
    q, k = modeling.apply_rotary_pos_emb(q, k, cos, sin)
    if cache is not None:
        cache.update(k, v, self.layer_idx)
    out = packed_attention(
        q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu_seqlens, max_len, self.scaling
    )
    return self.o_proj(out.reshape(1, seq, -1)), None


def _make_forward(orig: Callable, modeling: ModuleType) -> Callable:
    def forward(self, hidden_states, *args, **kwargs):
        if kwargs.get(PACKED_CU_SEQLENS) is None:
            return orig(hidden_states, *args, **kwargs)
        if args:
            raise ValueError(
                "the packed text attention takes its arguments by keyword, as transformers passes them"
            )
        return _packed_forward(self, modeling, hidden_states, kwargs)

    setattr(forward, SEPARATES_PACKED_SAMPLES, True)
    return forward


def installed(hf_model: nn.Module) -> bool:
    """Whether ``hf_model``'s text attention layers carry the packed forward."""
    found = False
    for module in hf_model.modules():
        if type(module).__name__ in TEXT_ATTENTION_CLASSES:
            if not getattr(getattr(module.forward, "__func__", None), SEPARATES_PACKED_SAMPLES, False):
                return False
            found = True
    return found


def install(hf_model: nn.Module, report: PatchReport) -> bool:
    """Swaps the forward of every Qwen2-VL / Qwen2.5-VL text attention instance (inert without the key).

    Returns whether every text attention layer of ``hf_model`` got the packed forward.
    """
    swapped = missed = 0
    for name, module in hf_model.named_modules():
        cls = type(module)
        if cls.__name__ not in TEXT_ATTENTION_CLASSES:
            continue
        modeling = sys.modules.get(cls.__module__)
        attrs = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
        if (
            modeling is None
            or not hasattr(modeling, "apply_rotary_pos_emb")
            or not all(hasattr(module, a) for a in attrs)
        ):
            report.skipped.append(f"packed attention: {name} ({cls.__name__}) has an unexpected layout")
            missed += 1
            continue
        forward = _make_forward(module.forward, modeling)
        report.swap(module, "forward", types.MethodType(forward, module), "packed_attn")
        swapped += 1
    return swapped > 0 and missed == 0


__all__ = [
    "TEXT_ATTENTION_CLASSES",
    "attention_operands",
    "install",
    "installed",
    "packed_attention",
    "uses_varlen",
    "varlen_causal_attention",
]
