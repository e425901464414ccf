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

#: The kinds this family takes, in order (``visionft.patching.kinds``).
KINDS = ("rope", "rms_norm", "layer_norm", "glu", "lora", "fused_loss", "offload_embeddings")
