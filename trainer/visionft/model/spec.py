"""What the trainer needs to know about one VLM architecture: where its parts live, by module path."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatMarkers:
    """The strings that open turns in the architecture's chat template.

    A response-only label mask supervises the tokens after ``response`` up to and including the
    next ``end``, and masks everything else.

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
    """Where the vision tower, language model and projector of one architecture live.

    Paths are module names from the root of the ``*ForConditionalGeneration`` model as
    transformers 5.x builds it (``model.named_modules()``), e.g. ``"model.visual"``.

    Attributes:
        model_types (tuple[str, ...]): the ``config.model_type`` values this spec covers.
        vision (str): path of the vision tower.
        language (str): path of the language model (the decoder stack).
        projector (tuple[str, ...]): paths that map vision features into the language model
            (merger, multi-modal projector). They belong to neither side for LoRA selection.
        attention (tuple[str, ...]): module-name segments of attention blocks on both sides
            (``"self_attn"``, ``"attn"``, ...): a Linear below such a segment is an attention module.
        mlp (tuple[str, ...]): module-name segments of MLP blocks (``"mlp"``, ``"feed_forward"``).
        keep_16bit (tuple[str, ...]): module-path prefixes kept out of 4-bit/8-bit quantization
            (patch embedding, projector, ``lm_head``); passed as ``llm_int8_skip_modules``, which
            transformers 5.x matches from the start of the full name.
        chat (ChatMarkers | None): the turn markers of the architecture's usual chat template.
    """

    model_types: tuple[str, ...]
    vision: str
    language: str
    projector: tuple[str, ...]
    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    keep_16bit: tuple[str, ...]
    chat: ChatMarkers | None = None
