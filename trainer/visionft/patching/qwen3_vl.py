"""Qwen3-VL: the patch set.

- text: RMSNorm (also the per-head ``q_norm``/``k_norm``), SwiGLU MLPs, the rotary embedding (the rotary
  module interleaves the M-RoPE sections, so attention calls the plain ``apply_rotary_pos_emb``), the
  fused ``lm_head`` + loss, and the input embeddings in pinned host memory;
- every PEFT LoRA layer (``kernels.lora_nf4``);
- the vision tower's LayerNorms return bf16 under autocast (``modules.patch_layer_norms``).

Left plain: the vision attention (not windowed; the fixed-shape rows give it varlen segments,
``visionft.patching.rows.qwen2_vl``) and the vision MLP (not gated).
"""

from __future__ import annotations

import torch
from torch import nn

from visionft.patching.core import PatchReport
from visionft.patching.modules import (
    offload_input_embeddings,
    patch_gated_mlps,
    patch_layer_norms,
    patch_lm_loss,
    patch_lora_layers,
    patch_rms_norms,
)
from visionft.patching.rope import patch_rope


def apply(
    model: nn.Module,
    hf_model: nn.Module,
    report: PatchReport,
    *,
    modeling: str,
    rope: bool = True,
    rms_norm: bool = True,
    layer_norm: bool = True,
    glu: bool = True,
    lora: bool = True,
    fused_loss: bool = True,
    offload_embeddings: bool = True,
    **_: bool,
) -> None:
    """Applies the Qwen3-VL set to ``hf_model`` (and its PEFT wrapper ``model``); one switch per kind
    (``visionft.patching.apply_optimizations``)."""
    device = next(hf_model.parameters()).device
    dtype = getattr(hf_model, "dtype", torch.float32)
    if rope:
        patch_rope(modeling, device, dtype, report)
    if rms_norm:
        patch_rms_norms(hf_model, report)
    if layer_norm:
        patch_layer_norms(hf_model, report)
    if glu:
        patch_gated_mlps(hf_model, report)
    if lora:
        patch_lora_layers(model, report)
    if fused_loss:
        patch_lm_loss(hf_model, report)
    if offload_embeddings and device.type == "cuda":
        offload_input_embeddings(hf_model, report)
