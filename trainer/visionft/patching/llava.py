"""LLaVA 1.5, LLaVA-NeXT and Pixtral (a LLaVA model with a Pixtral tower): the patch set.

- text (Llama or Mistral, whichever the checkpoint names): RMSNorm, SwiGLU MLPs, the rotary embedding of
  the text model's own modeling module (``kinds``: the LLaVA modeling module has none), the fused
  ``lm_head`` + loss, and the input embeddings in pinned host memory (Pixtral-12B's 131k x 5,120 table is
  1.25 GiB in bf16; the fixed-shape rows look its rows up on the host, ``rows.base.embed_on_host``);
- every PEFT LoRA layer (``kernels.lora_nf4``);
- vision: the CLIP tower's LayerNorms return bf16 under autocast; the Pixtral tower's RMSNorms and
  SwiGLU MLPs take the same kernels as the text.

Left plain: the CLIP MLP (not gated, quick-GELU), the vision attention (the fixed-shape rows give it
varlen segments, ``visionft.patching.rows.llava``) and the projector.
"""

from __future__ import annotations

#: The kinds this family takes, in order (``visionft.patching.kinds``).
KINDS = ("rope", "rms_norm", "layer_norm", "glu", "lora", "fused_loss", "offload_embeddings")
