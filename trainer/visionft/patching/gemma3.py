"""Gemma 3: RMSNorm with ``(1 + w)``, GeGLU (tanh) MLPs, rotary embeddings and LoRA layers.

Not swapped here: the loss (older transformers releases compute Gemma 3's loss inside the model's
forward rather than through ``loss_function``, which the fused-loss patch relies on), the SigLIP
vision tower's attention (not windowed) and the input embeddings (scaled, and tied to ``lm_head``).
"""

from __future__ import annotations

import torch
from torch import nn

from visionft.patching.core import PatchReport
from visionft.patching.modules import patch_gated_mlps, patch_lora_layers, patch_rms_norms
from visionft.patching.rope import patch_rope


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
    **_: bool,
) -> None:
    """Applies the Gemma 3 set to ``hf_model`` (and its PEFT wrapper ``model``)."""
    device = next(hf_model.parameters()).device
    dtype = getattr(hf_model, "dtype", torch.float32)
    if rope:
        patch_rope(modeling, device, dtype, report)
    if rms_norm:
        patch_rms_norms(hf_model, report)
    if glu:
        patch_gated_mlps(hf_model, report)
    if lora:
        patch_lora_layers(model, report)
    report.skipped.append("gemma3: loss, vision attention and embeddings left plain (not covered)")
