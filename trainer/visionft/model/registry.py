"""The per-architecture map: ``config.model_type`` -> ``ArchSpec``.

Paths were read off the module trees transformers 5.17-5.23 build (``tests/trainer/test_registry.py``
checks every path against the tiny models, so a rename upstream fails a test instead of silently
adapting nothing). Architectures not listed here still load; ``visionft.model.classify`` then
falls back to keyword rules and says so in the log.
"""

from __future__ import annotations

from visionft.model.spec import ArchSpec, ChatMarkers

_CHATML = ChatMarkers("<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>")
_LLAMA3 = ChatMarkers(
    "<|start_header_id|>user<|end_header_id|>\n\n",
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "<|eot_id|>",
)
_GEMMA = ChatMarkers("<start_of_turn>user\n", "<start_of_turn>model\n", "<end_of_turn>")

_QWEN_VL = dict(
    vision="model.visual",
    language="model.language_model",
    attention=("attn", "self_attn"),
    mlp=("mlp",),
    chat=_CHATML,
)

_SPECS: tuple[ArchSpec, ...] = (
    ArchSpec(
        model_types=("qwen2_vl", "qwen2_5_vl"),
        projector=("model.visual.merger",),
        keep_16bit=("model.visual.patch_embed", "model.visual.merger", "lm_head"),
        **_QWEN_VL,
    ),
    ArchSpec(
        model_types=("qwen3_vl",),
        projector=("model.visual.merger", "model.visual.deepstack_merger_list"),
        keep_16bit=(
            "model.visual.patch_embed",
            "model.visual.merger",
            "model.visual.deepstack_merger_list",
            "lm_head",
        ),
        **_QWEN_VL,
    ),
    ArchSpec(
        model_types=("mllama",),
        vision="model.vision_model",
        language="model.language_model",
        projector=("model.multi_modal_projector",),
        # cross_attn: the gated cross-attention layers that read the image features.
        attention=("self_attn", "cross_attn"),
        mlp=("mlp",),
        keep_16bit=("model.vision_model.patch_embedding", "model.multi_modal_projector", "lm_head"),
        chat=_LLAMA3,
    ),
    ArchSpec(
        model_types=("gemma3",),
        vision="model.vision_tower",
        language="model.language_model",
        projector=("model.multi_modal_projector",),
        attention=("self_attn",),
        mlp=("mlp",),
        keep_16bit=("model.vision_tower.embeddings", "model.multi_modal_projector", "lm_head"),
        chat=_GEMMA,
    ),
    # LLaVA 1.5 and LLaVA-NeXT (CLIP tower) and Pixtral-12B (model_type "llava" with a Pixtral tower,
    # whose blocks call their parts "attention" and "feed_forward").
    ArchSpec(
        model_types=("llava", "llava_next"),
        vision="model.vision_tower",
        language="model.language_model",
        projector=("model.multi_modal_projector",),
        attention=("self_attn", "attention"),
        mlp=("mlp", "feed_forward"),
        keep_16bit=(
            "model.vision_tower.embeddings",
            "model.vision_tower.patch_conv",
            "model.multi_modal_projector",
            "lm_head",
        ),
        chat=None,  # varies by checkpoint: vicuna "USER:/ASSISTANT:" (1.5) or Mistral "[INST]" (NeXT, Pixtral)
    ),
)

_BY_TYPE: dict[str, ArchSpec] = {t: s for s in _SPECS for t in s.model_types}


def get_arch_spec(model_type: str) -> ArchSpec | None:
    """The spec for ``model_type``, or None when the architecture is not mapped."""
    return _BY_TYPE.get(model_type)


def supported_model_types() -> list[str]:
    """The mapped ``model_type`` values, sorted."""
    return sorted(_BY_TYPE)


def register_arch(spec: ArchSpec, *, replace: bool = False) -> None:
    """Adds ``spec`` to the map, for architectures defined outside transformers.

    Args:
        spec (ArchSpec): the spec; each of its ``model_types`` is registered.
        replace (bool): allow replacing an existing entry. Default: False.

    Raises:
        ValueError: a model type is already mapped and ``replace`` is False.
    """
    taken = [t for t in spec.model_types if t in _BY_TYPE]
    if taken and not replace:
        raise ValueError(f"model types {taken} are already registered; pass replace=True to override")
    for t in spec.model_types:
        _BY_TYPE[t] = spec


def unregister_arch(model_type: str) -> ArchSpec | None:
    """Removes ``model_type`` from the map and returns its spec (None if it was not mapped)."""
    return _BY_TYPE.pop(model_type, None)
