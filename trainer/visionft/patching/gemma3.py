"""Gemma 3: RMSNorm with ``(1 + w)``, GeGLU (tanh) MLPs, rotary embeddings, LoRA layers and the loss.

The loss: transformers 5.17-5.23 compute Gemma 3's loss through ``loss_function`` on the logits of
``lm_head`` (no final soft-capping in Gemma 3), so the fused ``lm_head`` + cross-entropy applies. With a
262k vocabulary the logits it never builds are the largest activation of the step (1 GiB in bf16 per
2,000 tokens, and their fp32 copy in the loss). A config with ``final_logit_softcapping`` keeps the
plain loss.

The SigLIP tower's LayerNorms return bf16 under autocast (``modules.patch_layer_norms`` says why).

Not swapped here: the SigLIP vision tower's attention (not windowed) and the input embeddings (scaled,
and tied to ``lm_head``, so they stay on the GPU).
"""

from __future__ import annotations

import torch
from torch import nn

from visionft.patching.core import PatchReport
from visionft.patching.modules import (
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
    glu: bool = True,
    lora: bool = True,
    fused_loss: bool = True,
    layer_norm: bool = True,
    **_: bool,
) -> None:
    """Applies the Gemma 3 set to ``hf_model`` (and its PEFT wrapper ``model``)."""
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
    text = (
        hf_model.config.get_text_config() if hasattr(hf_model.config, "get_text_config") else hf_model.config
    )
    if fused_loss and getattr(text, "final_logit_softcapping", None) is None:
        patch_lm_loss(hf_model, report)
    elif fused_loss:
        report.skipped.append("gemma3: final_logit_softcapping is set; the loss stays plain")
    report.skipped.append("gemma3: vision attention and embeddings left plain (not covered)")
