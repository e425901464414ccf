"""Qwen2-VL and Qwen2.5-VL: the patch set, one swap per kind (``visionft.patching`` lists them).

The rotary embedding (``patching.rope``) is swapped in the modeling module the family's entry names
(``visionft.model.architectures``); the other swaps go to the model's instances. The static-input hooks
and the packed attention are inert until a graph step or a packed batch uses them.
"""

from __future__ import annotations

import torch
from torch import nn

from visionft.patching.core import PatchReport
from visionft.patching.modules import (
    offload_input_embeddings,
    patch_gated_mlps,
    patch_lm_loss,
    patch_lora_layers,
    patch_rms_norms,
)
from visionft.patching.packed_attention import install as install_packed_attention
from visionft.patching.rope import patch_rope
from visionft.patching.static_inputs import install as install_static_inputs
from visionft.patching.vision_attention import patch_vision_attention


def apply(
    model: nn.Module,
    hf_model: nn.Module,
    report: PatchReport,
    *,
    modeling: str,
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
    """Applies the Qwen2-VL / Qwen2.5-VL set to ``hf_model`` (and its PEFT wrapper ``model``).

    Args:
        model (nn.Module): the PEFT wrapper, or ``hf_model`` itself.
        hf_model (nn.Module): the Hugging Face model.
        report (PatchReport): records every swap.
        modeling (str): the model type's transformers modeling module (its rotary function is swapped).
        rope, vision_attention, rms_norm, glu, lora, fused_loss, offload_embeddings, static_inputs,
            packed_attention (bool): one switch per kind of swap (``visionft.patching.apply_optimizations``).
            Default: True.
    """
    device = next(hf_model.parameters()).device
    dtype = getattr(hf_model, "dtype", torch.float32)
    if rope:
        patch_rope(modeling, device, dtype, report)
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
