"""Qwen2-VL and Qwen2.5-VL: which swaps apply, and the rotary-embedding patch.

Rotary embeddings are applied by a module-level function of the modeling module, called by the
text attention's forward:

- transformers 5.17 and earlier: ``apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section)``
  with ``cos``/``sin`` of shape ``(3, B, S, D)``; replaced by ``kernels.rope.apply_mrope``, which
  does the per-section stream selection inside the kernel.
- later 5.x releases: the rotary module recomposes the sections and attention calls
  ``apply_rotary_pos_emb(q, k, cos, sin)`` with ``(B, S, D)``; replaced by ``kernels.rope.apply_rope``.

Either way the replacement is checked against the original on a small random input first, and
falls back to the original for inputs it does not cover (``unsqueeze_dim != 1``, CPU without the
interpreter). The swap is of a module global, so it holds for every model of this architecture in
the process until ``revert``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

from visionft.kernels.rope import apply_mrope, apply_rope
from visionft.patching.core import PatchReport, kernels_can_run, self_check
from visionft.patching.modules import (
    offload_input_embeddings,
    patch_gated_mlps,
    patch_lm_loss,
    patch_lora_layers,
    patch_rms_norms,
)
from visionft.patching.packed_attention import install as install_packed_attention
from visionft.patching.static_inputs import install as install_static_inputs
from visionft.patching.vision_attention import patch_vision_attention

MODELING = {
    "qwen2_vl": "transformers.models.qwen2_vl.modeling_qwen2_vl",
    "qwen2_5_vl": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
}


def _rope_inputs(device, dtype, mrope: bool):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 5, 16, generator=gen).to(device, dtype)
    k = torch.randn(1, 2, 5, 16, generator=gen).to(device, dtype)
    pos = torch.randint(0, 30, (3, 1, 5) if mrope else (1, 5), generator=gen).float()
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    return q, k, emb.cos().to(device, dtype), emb.sin().to(device, dtype)


def patch_rope(modeling: str, device: torch.device, dtype: torch.dtype, report: PatchReport) -> None:
    """Swaps the rotary function of the modeling module ``modeling`` (see the module docstring)."""
    mod = importlib.import_module(modeling)
    if hasattr(mod, "apply_multimodal_rotary_pos_emb"):
        orig = mod.apply_multimodal_rotary_pos_emb
        q, k, c, s = _rope_inputs(device, dtype, mrope=True)
        ok = self_check(lambda: apply_mrope(q, k, c, s, [2, 3, 3]), lambda: orig(q, k, c, s, [2, 3, 3]), 2e-2)

        def fused_mrope(q, k, cos, sin, mrope_section, unsqueeze_dim=1):
            if unsqueeze_dim != 1 or cos.dim() != 4 or not kernels_can_run(q.device):
                return orig(q, k, cos, sin, mrope_section, unsqueeze_dim)
            return apply_mrope(q, k, cos, sin, mrope_section)

        fused: Callable = fused_mrope
        name = "apply_multimodal_rotary_pos_emb"
    elif hasattr(mod, "apply_rotary_pos_emb"):
        orig = mod.apply_rotary_pos_emb
        q, k, c, s = _rope_inputs(device, dtype, mrope=False)
        ok = self_check(lambda: apply_rope(q, k, c, s), lambda: orig(q, k, c, s), 2e-2)

        def fused_rope(q, k, cos, sin, unsqueeze_dim=1, **kwargs):
            if unsqueeze_dim != 1 or kwargs or cos.dim() != 3 or not kernels_can_run(q.device):
                return orig(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, **kwargs)
            return apply_rope(q, k, cos, sin)

        fused = fused_rope
        name = "apply_rotary_pos_emb"
    else:
        report.skipped.append(f"rope: {modeling} has no known rotary function")
        return
    if not ok:
        report.skipped.append(f"rope: {name} differs from the kernel on a test input (left plain)")
        return
    fused.__wrapped__ = orig  # type: ignore[attr-defined]
    report.swap(mod, name, fused, "rope")


def apply(
    model: nn.Module,
    hf_model: nn.Module,
    report: PatchReport,
    *,
    rope: bool = True,
    rms_norm: bool = True,
    glu: bool = True,
    lora: bool = True,
    fused_loss: bool = True,
    vision_attention: bool = True,
    offload_embeddings: bool = True,
    static_inputs: bool = True,
    packed_attention: bool = True,
) -> None:
    """Applies the Qwen2-VL / Qwen2.5-VL set to ``hf_model`` (and its PEFT wrapper ``model``)."""
    device = next(hf_model.parameters()).device
    dtype = getattr(hf_model, "dtype", torch.float32)
    if rope:
        patch_rope(
            MODELING[report.model_type], device, dtype if dtype.is_floating_point else torch.float32, report
        )
    if vision_attention:
        patch_vision_attention(hf_model, report)
    if rms_norm:
        patch_rms_norms(hf_model, report)
    if glu:
        patch_gated_mlps(hf_model, report)
    if lora:
        patch_lora_layers(model, report)
    if fused_loss:
        patch_lm_loss(hf_model, report)
    if offload_embeddings and device.type == "cuda":
        offload_input_embeddings(hf_model, report)
    if static_inputs:  # inert until visionft.engine.cuda_graphs activates a plan
        install_static_inputs(hf_model, report)
    if packed_attention:  # inert until a batch carries packed_cu_seqlens (visionft.data.packing)
        install_packed_attention(hf_model, report)
