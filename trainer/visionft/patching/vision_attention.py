"""Qwen2-VL / Qwen2.5-VL vision attention without one SDPA call per window.

With any attention implementation but flash-attention, transformers' vision attention splits q, k
and v at ``cu_seqlens`` (``lengths.tolist()``: a host-device sync in every block) and calls SDPA
once per window and concatenates: for a 672x672 image that is 36 windows, so 36 attention calls
(forward, recompute and backward) in each of the 28 windowed blocks, which makes this the largest
source of kernel launches in the step.

This forward instead:

- reads the window lengths once per ``cu_seqlens`` tensor (one sync per distinct tensor per
  forward, i.e. two per step for Qwen2.5-VL: windowed and full; gradient checkpointing's recompute
  reuses the cached value);
- when all windows have one length (the usual case: the window grid divides the image), views q,
  k and v as ``(n_windows, heads, L, head_dim)`` and makes one SDPA call;
- otherwise pads the windows to the longest one and makes one SDPA call with a
  ``(n_windows, 1, 1, L)`` key-padding mask (linear in the sequence, never ``S x S``; the layout is
  ``patching.segments``, shared with the packed text attention);
- applies the vision rotary embedding with the fused rope kernel.

Flash-attention configurations keep the original forward (it is already varlen).
"""

from __future__ import annotations

import types
import weakref

import torch
from torch import nn

from visionft.kernels.rope import apply_rope
from visionft.patching.core import PatchReport, kernels_can_run
from visionft.patching.segments import PaddedSegments, pad_segments, segment_attention

_LAYOUTS: dict[int, tuple[weakref.ref, PaddedSegments]] = {}


def _layout(cu_seqlens: torch.Tensor) -> PaddedSegments:
    """The padded layout of the windows in ``cu_seqlens``, cached per tensor object."""
    hit = _LAYOUTS.get(id(cu_seqlens))
    if hit is not None and hit[0]() is cu_seqlens:
        return hit[1]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()  # the one sync
    layout = pad_segments(cu_seqlens, len(lengths), max(lengths, default=0), int(sum(lengths)))
    if len(_LAYOUTS) > 64:
        for key in [k for k, (ref, _) in _LAYOUTS.items() if ref() is None]:
            del _LAYOUTS[key]
    _LAYOUTS[id(cu_seqlens)] = (weakref.ref(cu_seqlens), layout)
    return layout


def windowed_attention(q, k, v, cu_seqlens, scale):
    """Block-diagonal attention of ``(S, H, D)`` q/k/v over the windows in ``cu_seqlens``; ``(S, H, D)`` out."""
    return segment_attention(q, k, v, _layout(cu_seqlens), scale)


def _flash(config) -> bool:
    impl = getattr(config, "_attn_implementation", "") or ""
    return "flash" in impl


def _make_forward(orig):
    def forward(self, hidden_states, cu_seqlens, *args, **kwargs):
        position_embeddings = kwargs.get("position_embeddings")
        if (
            args
            or position_embeddings is None
            or _flash(getattr(self, "config", None))
            or not kernels_can_run(hidden_states.device)
        ):
            return orig(hidden_states, cu_seqlens, *args, **kwargs)
        seq = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        # apply_rotary_pos_emb_vision: (S, H, D) with cos/sin (S, D), computed in fp32.
        qr, kr = apply_rope(
            q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2), cos.unsqueeze(0), sin.unsqueeze(0)
        )
        q, k = qr.transpose(1, 2)[0], kr.transpose(1, 2)[0]
        scale = getattr(self, "scaling", q.shape[-1] ** -0.5)
        out = windowed_attention(q, k, v, cu_seqlens, scale)
        return self.proj(out.reshape(seq, -1))

    return forward


def patch_vision_attention(hf_model: nn.Module, report: PatchReport) -> None:
    """Swaps the forward of every Qwen2-VL / Qwen2.5-VL vision attention instance."""
    for _, module in hf_model.named_modules():
        name = type(module).__name__
        if name not in ("Qwen2_5_VLVisionAttention", "VisionAttention", "Qwen2VLVisionAttention"):
            continue
        if not (hasattr(module, "qkv") and hasattr(module, "proj") and hasattr(module, "num_heads")):
            report.skipped.append(f"{name}: unexpected attributes")
            continue
        orig = module.forward
        report.swap(module, "forward", types.MethodType(_make_forward(orig), module), "vision_attn")
