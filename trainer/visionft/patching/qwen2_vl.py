"""Qwen2-VL and Qwen2.5-VL: the patch set, one swap per kind (``visionft.patching`` lists them).

The rotary embedding (``patching.rope``) is swapped in the modeling module the family's entry names
(``visionft.model.architectures``); the other swaps go to the model's instances. The static-input hooks
and the packed attention are inert until a graph step or a packed batch uses them.
"""

from __future__ import annotations

#: The kinds this family takes, in order (``visionft.patching.kinds``).
KINDS = (
    "rope",
    "vision_attention",
    "rms_norm",
    "glu",
    "lora",
    "fused_loss",
    "offload_embeddings",
    "static_inputs",
    "packed_attention",
)
