"""Llama 3.2 Vision (Mllama): the patch set.

- text: RMSNorm, SwiGLU MLPs and the rotary embedding of the self-attention layers (the gated
  cross-attention layers that read the image features have no rotary), the fused ``lm_head`` + loss
  (a 128k vocabulary: the logits it never builds are 1 GiB in bf16 per 4,000 tokens), and the input
  embeddings in pinned host memory (1 GiB at 4,096 wide);
- every PEFT LoRA layer (``kernels.lora_nf4``), the cross-attention's included;
- vision: the tower's LayerNorms return bf16 under autocast.

Left plain: the vision MLP (not gated, GELU), the vision and cross attention, and the tile and
aspect-ratio embeddings. Its fixed-shape rows: ``visionft.patching.rows.mllama``.
"""

from __future__ import annotations

#: The kinds this family takes, in order (``visionft.patching.kinds``).
KINDS = ("rope", "rms_norm", "layer_norm", "glu", "lora", "fused_loss", "offload_embeddings")
