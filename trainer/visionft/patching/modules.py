"""Architecture-independent swaps on loaded module instances.

Each ``patch_*`` function walks the model, recognises the modules it knows by class name and
attributes, checks them, and sets an instance-level ``forward`` through ``PatchReport.swap`` (the
class is left alone, so other models in the process are untouched and ``revert`` is exact).
Anything it does not recognise, or that fails a check, stays plain and is listed in
``PatchReport.skipped``.
"""

from __future__ import annotations

import inspect
import os
import types
from typing import Any

import torch
from torch import nn

from visionft.kernels.fused_linear_ce import fused_linear_cross_entropy
from visionft.kernels.glu import geglu, swiglu
from visionft.kernels.lora_nf4 import base_linear, lora_nf4_linear
from visionft.kernels.rms_norm import rms_norm, rms_norm_reference
from visionft.patching.core import PatchReport, self_check

# --------------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------------


def _norm_mode(module: Any) -> tuple[str, float] | None:
    name = type(module).__name__
    if not name.endswith("RMSNorm") or not isinstance(getattr(module, "weight", None), torch.Tensor):
        return None
    if module.weight.dim() != 1:
        return None
    if name.startswith("Gemma"):
        return "gemma", 1.0
    return "llama", 0.0


def _norm_eps(module: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps"):
        if isinstance(getattr(module, attr, None), float):
            return getattr(module, attr)
    raise AttributeError("no eps")


def patch_rms_norms(model: nn.Module, report: PatchReport) -> None:
    """Swaps every recognised ``*RMSNorm`` instance's forward for the fused kernel.

    Each class is checked once against its own forward on a small random input before any of
    its instances is swapped.
    """
    verified: dict[type, bool] = {}
    for name, module in model.named_modules():
        mode = _norm_mode(module)
        if mode is None:
            continue
        try:
            eps = _norm_eps(module)
        except AttributeError:
            report.skipped.append(f"{name}: {type(module).__name__} without eps")
            continue
        cls = type(module)
        if cls not in verified:
            w = module.weight
            x = torch.randn(3, w.shape[0], device=w.device, dtype=w.dtype)
            verified[cls] = self_check(
                lambda m=module, x=x, eps=eps, md=mode: rms_norm(x, m.weight, eps, md[1], md[0]),
                lambda m=module, x=x, c=cls: c.forward(m, x),
                rel_tol=2e-2,
            )
            if not verified[cls]:
                report.skipped.append(f"{cls.__name__}: forward differs from the kernel (left plain)")
        if not verified[cls]:
            continue
        report.swap(module, "forward", types.MethodType(_make_norm_forward(eps, *mode), module), "rms_norm")


def _make_norm_forward(eps: float, mode: str, offset: float):
    def forward(self, hidden_states):
        return rms_norm(hidden_states, self.weight, eps, offset, mode)

    return forward


# --------------------------------------------------------------------------------------------------
# LayerNorm (vision towers) under autocast
# --------------------------------------------------------------------------------------------------


def patch_layer_norms(model: nn.Module, report: PatchReport) -> None:
    """Makes every ``nn.LayerNorm`` in ``model`` return its input's half dtype under autocast.

    Autocast runs ``layer_norm`` in fp32 and returns fp32, so each linear that reads the output casts it
    back to bf16 on its own (three times for q, k and v), and the backward casts the gradients again:
    in a SigLIP tower at 16k patches these copies take more device time than the norms. The native
    kernel on a bf16 input already accumulates in fp32 and rounds once at the end, where the next
    linear would have rounded it anyway. Outside autocast, or on an fp32 input, the forward is the
    module's own.
    """
    for _, module in model.named_modules():
        if type(module) is nn.LayerNorm and len(module.normalized_shape) == 1:
            report.swap(module, "forward", types.MethodType(_half_layer_norm_forward, module), "layer_norm")


def _half_layer_norm_forward(self, x):
    device = x.device.type
    if not torch.is_autocast_enabled(device) or torch.get_autocast_dtype(device) != x.dtype:
        return nn.LayerNorm.forward(self, x)
    weight = self.weight.to(x.dtype) if self.weight is not None else None
    bias = self.bias.to(x.dtype) if self.bias is not None else None
    with torch.autocast(device, enabled=False):
        return nn.functional.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


# --------------------------------------------------------------------------------------------------
# Gated MLPs (SwiGLU / GeGLU)
# --------------------------------------------------------------------------------------------------

_SILU = {"SiLU", "SiLUActivation"}
_GELU_TANH = {"GELUTanh", "PytorchGELUTanh", "GELUPytorchTanh"}


def _glu_kind(module: nn.Module) -> str | None:
    if not all(
        isinstance(getattr(module, a, None), nn.Module) for a in ("gate_proj", "up_proj", "down_proj")
    ):
        return None
    act = getattr(module, "act_fn", None)
    if act is None:
        return None
    act_name = type(act).__name__
    if act_name in _SILU:
        return "silu"
    if act_name in _GELU_TANH or (act_name == "GELU" and getattr(act, "approximate", None) == "tanh"):
        return "gelu_tanh"
    return None


def patch_gated_mlps(model: nn.Module, report: PatchReport) -> None:
    """Swaps ``down(act(gate(x)) * up(x))`` for ``down(glu(gate(x), up(x)))`` (one fused kernel)."""
    for name, module in model.named_modules():
        if not all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")):
            continue
        kind = _glu_kind(module)
        if kind is None:
            report.skipped.append(f"{name}: activation {type(getattr(module, 'act_fn', None)).__name__}")
            continue
        fn = swiglu if kind == "silu" else geglu
        report.swap(module, "forward", types.MethodType(_make_mlp_forward(fn), module), "glu")


def _make_mlp_forward(fn):
    def forward(self, x):
        return self.down_proj(fn(self.gate_proj(x), self.up_proj(x)))

    return forward


# --------------------------------------------------------------------------------------------------
# PEFT LoRA layers (NF4 base via bitsandbytes, or a plain 16/32-bit base)
# --------------------------------------------------------------------------------------------------


def _lora_plan(module: Any) -> tuple[str, str] | None:
    """('nf4' | 'plain', adapter) when the layer fits LoRANF4Function, else None."""
    if not (hasattr(module, "lora_A") and hasattr(module, "base_layer") and hasattr(module, "scaling")):
        return None
    adapters = list(getattr(module, "active_adapters", []))
    if len(adapters) != 1 or adapters[0] not in module.lora_A:
        return None
    name = adapters[0]
    if getattr(module, "use_dora", {}).get(name, False):
        return None
    dropout = module.lora_dropout[name] if name in getattr(module, "lora_dropout", {}) else None
    if dropout is not None and not isinstance(dropout, nn.Identity) and getattr(dropout, "p", 0.0) > 0:
        return None
    if module.lora_A[name].bias is not None or module.lora_B[name].bias is not None:
        return None
    if not isinstance(module.lora_A[name], nn.Linear):
        return None
    base = module.base_layer
    weight = getattr(base, "weight", None)
    qs = getattr(weight, "quant_state", None)
    if qs is not None:
        is_nf4 = getattr(qs, "quant_type", "nf4") == "nf4" and getattr(weight, "dtype", None) == torch.uint8
        return ("nf4", name) if is_nf4 else None
    if type(base) is nn.Linear:
        return "plain", name
    return None


def patch_lora_layers(model: nn.Module, report: PatchReport) -> None:
    """Swaps PEFT LoRA layers over NF4 (bitsandbytes ``Linear4bit``) or plain ``nn.Linear`` bases for
    ``LoRANF4Function`` (no dequantized weight kept for the backward; fewer launches)."""
    skipped = 0
    for _, module in model.named_modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "base_layer")):
            continue
        plan = _lora_plan(module)
        if plan is None:
            skipped += 1
            continue
        kind, adapter = plan
        report.swap(module, "forward", types.MethodType(_make_lora_forward(kind, adapter), module), "lora")
    if skipped:
        report.skipped.append(f"{skipped} LoRA layers (dropout > 0, DoRA, several adapters or another base)")


def _make_lora_forward(kind: str, adapter: str):
    cls_forward = None

    def forward(self, x, *args, **kwargs):
        nonlocal cls_forward
        # Adapters off without grad (a DPO reference pass): the base through the kernel's own matmul, so
        # that it equals the policy with a zero LoRA B bit for bit.
        base_only = self.disable_adapters and not self.merged and not torch.is_grad_enabled()
        if (
            args
            or kwargs
            or self.merged
            or list(self.active_adapters) != [adapter]
            or (self.disable_adapters and not base_only)
        ):
            cls_forward = cls_forward or type(self).forward
            return cls_forward(self, x, *args, **kwargs)
        base = self.base_layer
        if kind == "nf4":
            weight, state = base.weight, base.weight.quant_state
            compute = getattr(base, "compute_dtype", None) or state.dtype
        else:
            weight, state = base.weight, None
            compute = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        in_dtype = x.dtype
        if base_only:
            out = base_linear(x.to(compute), weight, state, base.bias)
        else:
            out = lora_nf4_linear(
                x.to(compute),
                weight,
                state,
                base.bias,
                self.lora_A[adapter].weight,
                self.lora_B[adapter].weight,
                self.scaling[adapter],
            )
        return out if out.dtype == in_dtype else out.to(in_dtype)

    return forward


# --------------------------------------------------------------------------------------------------
# Input embeddings held in host memory
# --------------------------------------------------------------------------------------------------


def offload_input_embeddings(hf_model: Any, report: PatchReport) -> None:
    """Moves a frozen input-embedding table to pinned host memory and looks tokens up there.

    The table of a 150k-token vocabulary is 1 GiB in bf16 and only gathers a few rows per step, so
    it need not sit on the GPU. The lookup copies the token ids to the host (a sync at the very start
    of the forward, when the GPU has nothing queued) and the gathered rows back (non-blocking from
    pinned memory). Skipped when the table is trainable, tied to ``lm_head``, or already on the CPU.
    """
    emb = hf_model.get_input_embeddings() if hasattr(hf_model, "get_input_embeddings") else None
    head = getattr(hf_model, "lm_head", None)
    # Exactly nn.Embedding: subclasses (Gemma's scaled embedding) do more than a lookup.
    if type(emb) is not nn.Embedding or emb.weight.requires_grad or emb.weight.device.type != "cuda":
        report.skipped.append("embeddings: not a frozen CUDA nn.Embedding (kept in place)")
        return
    if head is not None and getattr(head, "weight", None) is emb.weight:
        report.skipped.append("embeddings: tied to lm_head (kept on the GPU)")
        return
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # DistributedDataParallel refuses a module whose parameters sit on two kinds of device.
        report.skipped.append("embeddings: distributed run, DDP needs every parameter on the GPU (kept)")
        return
    device = emb.weight.device
    gpu_weight = emb.weight
    emb.weight = nn.Parameter(gpu_weight.detach().to("cpu").pin_memory(), requires_grad=False)
    del gpu_weight
    torch.cuda.empty_cache()

    def forward(self, input_ids):
        if self.weight.device.type != "cpu":
            # A later ``.to(device)`` of the whole model (the HF Trainer and accelerate place models that
            # way) brought the table back to the GPU: return it to pinned host memory, once.
            self.weight = nn.Parameter(self.weight.detach().to("cpu").pin_memory(), requires_grad=False)
            torch.cuda.empty_cache()
        rows = nn.functional.embedding(input_ids.to("cpu"), self.weight, self.padding_idx)
        return rows.pin_memory().to(device, non_blocking=True)

    def undo():
        emb.weight = nn.Parameter(emb.weight.detach().to(device), requires_grad=False)

    report.swap(emb, "forward", types.MethodType(forward, emb), "embed_offload")
    report.on_revert(undo, "embed_offload_undo")
    report.counts.pop("embed_offload_undo", None)


# --------------------------------------------------------------------------------------------------
# LM loss: lm_head + cross-entropy fused, no full logits
# --------------------------------------------------------------------------------------------------


class _HiddenPassthrough:
    """Marks hidden states that stand in for logits while the fused loss is active."""


def patch_lm_loss(hf_model: nn.Module, report: PatchReport) -> None:
    """Makes ``lm_head`` + loss one fused, chunked kernel when the model is called with labels under grad.

    The model's own forward still runs unchanged: for that call, ``lm_head`` returns the hidden
    states and ``loss_function`` computes ``fused_linear_cross_entropy`` from them with the head's
    weight (same shift and ``ignore_index`` as ``ForCausalLMLoss``). The returned ``logits`` are
    None in that case (they were never built). Without labels, or without grad, nothing changes.
    """
    head = getattr(hf_model, "lm_head", None)
    if not isinstance(head, nn.Linear) or getattr(head, "weight", None) is None or hasattr(head, "lora_A"):
        report.skipped.append("loss: lm_head is not a plain Linear")
        return
    orig_forward = hf_model.forward  # bound (class) method
    orig_loss = hf_model.loss_function
    state = {"active": False}

    def head_forward(self, hidden_states):
        if state["active"]:
            return hidden_states
        return nn.Linear.forward(self, hidden_states)

    def loss_function(
        logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kw
    ):
        if not state["active"]:  # a forward with real logits (no grad: evaluation) keeps the model's loss
            return orig_loss(
                logits,
                labels,
                vocab_size=vocab_size,
                num_items_in_batch=num_items_in_batch,
                ignore_index=ignore_index,
                shift_labels=shift_labels,
                **kw,
            )
        hidden = logits
        if shift_labels is None:
            labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:]
        return fused_linear_cross_entropy(
            hidden,
            head.weight,
            shift_labels.to(hidden.device),
            bias=head.bias,
            ignore_index=ignore_index,
            num_items_in_batch=num_items_in_batch,
        )

    def forward(self, *args, **kwargs):
        labels = kwargs.get("labels")
        if labels is None or not torch.is_grad_enabled() or kwargs.get("logits_to_keep", 0) not in (0, None):
            return orig_forward(*args, **kwargs)
        state["active"] = True
        try:
            out = orig_forward(*args, **kwargs)
        finally:
            state["active"] = False
        if hasattr(out, "logits"):
            out["logits"] = None
        return out

    # generate() validates its keyword arguments against the forward's signature: keep the model's.
    forward.__signature__ = inspect.signature(type(hf_model).forward)  # type: ignore[attr-defined]
    report.swap(head, "forward", types.MethodType(head_forward, head), "loss")
    # ``loss_function`` is a property reading ``_loss_function`` when set (transformers 5.x).
    report.swap(hf_model, "_loss_function", loss_function, "loss_fn")
    report.swap(hf_model, "forward", types.MethodType(forward, hf_model), "loss_forward")
    report.counts.pop("loss_fn", None)
    report.counts.pop("loss_forward", None)


__all__ = [
    "patch_gated_mlps",
    "patch_layer_norms",
    "patch_lm_loss",
    "patch_lora_layers",
    "patch_rms_norms",
    "rms_norm_reference",
]
