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

from torch import nn

from visionft.patching.core import PatchReport
from visionft.patching.kinds import apply_kinds

#: The kinds this family takes, in order (``visionft.patching.kinds``).
KINDS = ("rope", "rms_norm", "layer_norm", "glu", "lora", "fused_loss", "offload_embeddings")


def apply(
    model: nn.Module, hf_model: nn.Module, report: PatchReport, *, modeling: str, **switches: bool
) -> None:
    """Applies the Qwen3-VL set to ``hf_model`` (and its PEFT wrapper ``model``); one switch per kind
    (``visionft.patching.apply_optimizations``)."""
    apply_kinds(KINDS, model, hf_model, report, modeling=modeling, switches=switches)
