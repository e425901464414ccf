"""The architecture families: one entry per family says everything the trainer knows about it.

An ``ArchSpec`` names a family's module paths (where the vision tower, language model and projector live,
which LoRA selection and quantization read), its patch set in ``visionft.patching``, the transformers
modeling module of each of its model types, whether it trains on packed rows, whether it has rows of one
fixed shape (its module in ``visionft.patching.rows``) and whether it runs graphed steps. ``FAMILIES`` is
the one table; every other per-architecture lookup (``get_arch_spec``, ``packing_unsupported_reason``,
the patch sets, row layouts and graph steps of ``visionft.patching`` and ``visionft.engine.cuda_graphs``)
reads it.

The paths were read off the module trees transformers 5.17-5.23 build;
``tests/trainer/model/test_selection.py`` checks every path against the tiny models, so a rename upstream
fails a test instead of silently adapting nothing. Architectures not listed here still load:
``visionft.model.classify`` then falls back to keyword rules and says so in the log.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChatMarkers:
    """The strings that open turns in the architecture's chat template.

    A response-only label mask supervises the tokens after ``response`` up to and including the next
    ``end``, and masks everything else.

    Attributes:
        instruction (str): what opens a user turn, e.g. ``"<|im_start|>user\\n"``.
        response (str): what opens an assistant turn, e.g. ``"<|im_start|>assistant\\n"``.
        end (str): what closes an assistant turn, e.g. ``"<|im_end|>"``.
    """

    instruction: str
    response: str
    end: str


@dataclass(frozen=True)
class ArchSpec:
    """One architecture family: where its parts live, and what the engine does with it.

    Paths are module names from the root of the ``*ForConditionalGeneration`` model as transformers 5.x
    builds it (``model.named_modules()``), e.g. ``"model.visual"``.

    Attributes:
        model_types (tuple[str, ...]): the ``config.model_type`` values of the family.
        vision (str): path of the vision tower.
        language (str): path of the language model (the decoder stack).
        projector (tuple[str, ...]): paths that map vision features into the language model (merger,
            multi-modal projector). They belong to neither side for LoRA selection.
        attention (tuple[str, ...]): module-name segments of attention blocks on both sides (``"self_attn"``,
            ``"attn"``, ...): a Linear below such a segment is an attention module.
        mlp (tuple[str, ...]): module-name segments of MLP blocks (``"mlp"``, ``"feed_forward"``).
        keep_16bit (tuple[str, ...]): module-path prefixes kept out of 4-bit/8-bit quantization (patch
            embedding, projector, ``lm_head``); passed as ``llm_int8_skip_modules``, which transformers 5.x
            matches from the start of the full name.
        chat (ChatMarkers | None): the turn markers of the family's usual chat template. Default: None.
        patches (str | None): the module of ``visionft.patching`` whose ``KINDS`` (``patching.kinds``) are
            the fused kernels swapped in; None leaves the family's models plain. Default: None.
        modeling (Mapping[str, str]): model type -> its transformers modeling module, whose module-level
            functions (the rotary embedding) the patch set swaps. Default: none.
        packing (bool): trains on packed rows of each batch's own shape (``visionft.patching.packed_attention``
            covers its text attention). Default: False.
        rows (str | None): the module of ``visionft.patching.rows`` that lays the family's samples out in
            rows of one fixed shape per tier (its ``FAMILY`` class and ``install``), so that one captured
            graph serves every step; with ``training.packing`` such a family trains on these rows. None:
            no fixed-shape rows. Default: None.
        graph_steps (bool): runs CUDA-graph steps (``visionft.patching.static_inputs`` prepares its
            forward). Default: False.
        text_attention (tuple[str, ...]): class names of the family's text attention, whose forward
            ``visionft.patching.packed_attention`` swaps so that packed samples stay apart. Default: none.
        per_sample_images (bool): the processor returns image tensors per sample (batch, images, tiles,
            ...) rather than one row per image, so the collator pads them per sample (Mllama).
            Default: False.

    Raises:
        ValueError: ``modeling`` names a model type outside ``model_types``, or a patch set lacks the
            modeling module of one of them.
    """

    model_types: tuple[str, ...]
    vision: str
    language: str
    projector: tuple[str, ...]
    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    keep_16bit: tuple[str, ...]
    chat: ChatMarkers | None = None
    patches: str | None = None
    modeling: Mapping[str, str] = field(default_factory=dict)
    packing: bool = False
    rows: str | None = None
    graph_steps: bool = False
    text_attention: tuple[str, ...] = ()
    per_sample_images: bool = False

    def __post_init__(self) -> None:
        extra = sorted(set(self.modeling) - set(self.model_types))
        if extra:
            raise ValueError(f"modeling names {extra}, which are not among model_types {self.model_types}")
        missing = [t for t in self.model_types if t not in self.modeling]
        if self.patches is not None and missing:
            raise ValueError(f"the patch set {self.patches} needs the modeling module of {missing}")


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

_LLAVA = dict(
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
    # Varies by checkpoint: vicuna "USER:/ASSISTANT:" (1.5) or Mistral "[INST]" (NeXT, Pixtral).
    chat=None,
)

#: The families, one entry each.
FAMILIES: tuple[ArchSpec, ...] = (
    ArchSpec(
        model_types=("qwen2_vl", "qwen2_5_vl"),
        projector=("model.visual.merger",),
        keep_16bit=("model.visual.patch_embed", "model.visual.merger", "lm_head"),
        patches="visionft.patching.qwen2_vl",
        modeling={
            "qwen2_vl": "transformers.models.qwen2_vl.modeling_qwen2_vl",
            "qwen2_5_vl": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
        },
        packing=True,
        rows="visionft.patching.rows.qwen2_vl",
        graph_steps=True,
        text_attention=("Qwen2VLAttention", "Qwen2_5_VLAttention"),
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
        patches="visionft.patching.qwen3_vl",
        modeling={"qwen3_vl": "transformers.models.qwen3_vl.modeling_qwen3_vl"},
        # The Qwen2-VL row layout covers it: resampled position table, DeepStack features, q/k norms.
        rows="visionft.patching.rows.qwen2_vl",
        # Norms its queries and keys per head (q_norm/k_norm) before the rotary embedding.
        text_attention=("Qwen3VLTextAttention",),
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
        patches="visionft.patching.mllama",
        modeling={"mllama": "transformers.models.mllama.modeling_mllama"},
        rows="visionft.patching.rows.mllama",
        # Llama-style self-attention; the cross-attention layers keep their own (rows pass their mask).
        text_attention=("MllamaTextSelfAttention",),
        per_sample_images=True,
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
        patches="visionft.patching.gemma3",
        modeling={"gemma3": "transformers.models.gemma3.modeling_gemma3"},
        rows="visionft.patching.rows.gemma3",
    ),
    # LLaVA 1.5 (CLIP tower) and Pixtral-12B (model_type "llava" with a Pixtral tower, whose blocks call
    # their parts "attention" and "feed_forward"); the row layout dispatches on the tower.
    ArchSpec(
        model_types=("llava",),
        patches="visionft.patching.llava",
        modeling={"llava": "transformers.models.llava.modeling_llava"},
        rows="visionft.patching.rows.llava",
        # Llama (LLaVA 1.5) or Mistral (Pixtral) text attention.
        text_attention=("LlamaAttention", "MistralAttention"),
        **_LLAVA,
    ),
    # LLaVA-NeXT: the same parts; rows of a tile budget with the unpad/newline layout as a gather.
    ArchSpec(
        model_types=("llava_next",),
        patches="visionft.patching.llava",
        modeling={"llava_next": "transformers.models.llava_next.modeling_llava_next"},
        rows="visionft.patching.rows.llava_next",
        text_attention=("LlamaAttention", "MistralAttention"),
        **_LLAVA,
    ),
)

_BY_TYPE: dict[str, ArchSpec] = {t: s for s in FAMILIES for t in s.model_types}


def get_arch_spec(model_type: str | None) -> ArchSpec | None:
    """The family of ``model_type``, or None when the architecture is not mapped."""
    return _BY_TYPE.get(model_type) if model_type else None


def supported_model_types() -> list[str]:
    """The mapped ``model_type`` values, sorted."""
    return sorted(_BY_TYPE)


def packing_model_types() -> list[str]:
    """The model types that train on packed rows (of their own shapes or fixed-shape ones), in table order."""
    return [t for t, s in _BY_TYPE.items() if s.packing or s.rows is not None]


def packing_attention_model_types() -> list[str]:
    """The model types whose text attention the packed attention covers (``ArchSpec.packing``)."""
    return [t for t, s in _BY_TYPE.items() if s.packing]


def row_model_types() -> list[str]:
    """The model types that have rows of one fixed shape (``ArchSpec.rows``), in table order."""
    return [t for t, s in _BY_TYPE.items() if s.rows is not None]


def packing_unsupported_reason(model_type: str | None) -> str | None:
    """Why a model of ``model_type`` can't train on packed rows (None when it can)."""
    spec = get_arch_spec(model_type)
    if spec is not None and (spec.packing or spec.rows is not None):
        return None
    return (
        f"packing is supported for {', '.join(packing_model_types())} only, and this model is "
        f"model_type={model_type!r}"
    )


def register_arch(spec: ArchSpec, *, replace: bool = False) -> None:
    """Adds ``spec`` to the map, for architectures defined outside transformers.

    Args:
        spec (ArchSpec): the family; each of its ``model_types`` is registered.
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
    """Removes ``model_type`` from the map and returns its family (None if it was not mapped)."""
    return _BY_TYPE.pop(model_type, None)
