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

#: The kinds this family takes, in order (``visionft.patching.kinds``).
KINDS = ("rope", "rms_norm", "layer_norm", "glu", "lora", "fused_loss")

#: Reported as not covered.
LEFT_PLAIN = "vision attention and embeddings left plain (not covered)"
