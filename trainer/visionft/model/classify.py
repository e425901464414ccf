"""Sort a VLM's Linear modules into groups: vision/language x attention/MLP, or other.

Mapped architectures are classified from their ``ArchSpec`` paths. Others go through keyword
rules on the module path (``vision``/``visual`` -> vision side; ``attn``/``q_proj``/``qkv`` ->
attention; ``mlp``/``fc``/``gate``/``up``/``down`` -> MLP), and one log line says so, because a
keyword guess can be wrong on an unfamiliar tree and the user should know to check the summary.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from enum import StrEnum

from torch import nn

from visionft.model.architectures import ArchSpec, get_arch_spec

logger = logging.getLogger(__name__)


class Group(StrEnum):
    """Where a Linear module sits. Summaries count modules per group."""

    VISION_ATTN = "vision-attn"
    VISION_MLP = "vision-mlp"
    LANGUAGE_ATTN = "language-attn"
    LANGUAGE_MLP = "language-mlp"
    #: Projector/merger, lm_head, and anything neither attention nor MLP. Never adapted by
    #: ``"all-linear"``; only when ``target_modules`` names it explicitly.
    OTHER = "other"


_SIDE_KIND = {
    ("vision", "attn"): Group.VISION_ATTN,
    ("vision", "mlp"): Group.VISION_MLP,
    ("language", "attn"): Group.LANGUAGE_ATTN,
    ("language", "mlp"): Group.LANGUAGE_MLP,
}

# Keyword rules for unmapped architectures, tested against every mapped one (they must agree).
_VISION_WORDS = re.compile(r"vision|visual|image_encoder|img_encoder|vit$")
_PROJECTOR_WORDS = re.compile(r"projector|merger|connector|mm_proj|adapter")
_ATTN_SEGMENT = re.compile(r"attn|attention")
_ATTN_LEAF = re.compile(r"^(q|k|v|o|qkv|out|query|key|value|wq|wk|wv|wo)(_proj)?$|^qkv|^c_attn$")
_MLP_SEGMENT = re.compile(r"mlp|ffn|feed_forward|feedforward")
_MLP_LEAF = re.compile(
    r"^(fc\d*|linear_fc\d*|gate|up|down|gate_up|w\d|c_fc|c_proj|dense_h_to_4h|dense_4h_to_h)(_proj)?$"
)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _classify_with_spec(name: str, spec: ArchSpec) -> Group:
    if any(_under(name, p) for p in spec.projector):
        return Group.OTHER
    if _under(name, spec.vision):
        side = "vision"
    elif _under(name, spec.language):
        side = "language"
    else:
        return Group.OTHER
    segments = name.split(".")[:-1]  # the containers; the leaf name itself says nothing reliable
    if any(s in spec.attention for s in segments):
        kind = "attn"
    elif any(s in spec.mlp for s in segments):
        kind = "mlp"
    else:
        return Group.OTHER
    return _SIDE_KIND[(side, kind)]


def _classify_by_keywords(name: str) -> Group:
    segments = name.split(".")
    containers, leaf = segments[:-1], segments[-1]
    if any(_PROJECTOR_WORDS.search(s) for s in segments):
        return Group.OTHER
    # Only modules inside a numbered block stack (layers.3, blocks.0) are attention/MLP candidates;
    # that keeps lm_head, embeddings and poolers out.
    if not any(s.isdigit() for s in containers):
        return Group.OTHER
    side = "vision" if any(_VISION_WORDS.search(s) for s in containers) else "language"
    if any(_ATTN_SEGMENT.search(s) for s in containers) or _ATTN_LEAF.search(leaf):
        kind = "attn"
    elif any(_MLP_SEGMENT.search(s) for s in containers) or _MLP_LEAF.search(leaf):
        kind = "mlp"
    else:
        return Group.OTHER
    return _SIDE_KIND[(side, kind)]


def spec_for(model: nn.Module, warn: bool = True) -> ArchSpec | None:
    """The architecture family of ``model.config.model_type``; None (with one warning) when unmapped."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = get_arch_spec(model_type) if model_type else None
    if spec is None and warn:
        logger.warning(
            "model_type %r is not in the architecture map; classifying modules by name "
            "keywords (fallback). Check the LoRA summary below.",
            model_type,
        )
    return spec


def classify_name(name: str, spec: ArchSpec | None) -> Group:
    """The group of the Linear module called ``name`` (a full name from the model root)."""
    return _classify_with_spec(name, spec) if spec is not None else _classify_by_keywords(name)


def classify_linear_modules(model: nn.Module, spec: ArchSpec | bool | None = True) -> dict[str, Group]:
    """Groups every ``nn.Linear`` (including bitsandbytes 4-bit/8-bit Linears) of ``model``.

    Args:
        model (nn.Module): a transformers VLM, not yet wrapped by PEFT (names are from its root).
        spec (ArchSpec | None | bool): the spec to use; True (default) looks it up by
            ``model.config.model_type``; None forces the keyword fallback.

    Returns:
        dict[str, Group]: module name -> group, in module order.
    """
    if spec is True:
        spec = spec_for(model)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    groups: dict[str, Group] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if module is output:
            groups[name] = Group.OTHER
        else:
            groups[name] = classify_name(name, spec)
    return groups


def count_groups(groups: dict[str, Group]) -> dict[str, int]:
    """Counts per group, every group present (zeros included), in a fixed order."""
    counts = Counter(groups.values())
    return {g.value: counts.get(g, 0) for g in Group}
