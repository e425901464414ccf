"""``VisionDataCollator``: chat samples with images to a padded training batch for any supported VLM.

Per sample, in order:

1. normalize the record to messages + image references (``visionft.data.samples``);
2. load every image as RGB under the input-hardening rules (``visionft.data.images``) and fit it to the
   pixel budget, with sides aligned to the architecture's patch multiple;
3. render the conversation with the processor's chat template and run the processor on it with its images.
   The processor expands the image placeholders, so the length measured here is the real one; a sample
   longer than ``max_seq_length`` is refused (error or skip), never truncated, because truncation through
   an image's tokens leaves a token count that no longer matches the image features;
4. labels: a copy of ``input_ids`` with -100 on image tokens, and (responses only) on everything outside
   the assistant turns. Assistant spans are found by rendering the conversation prefix by prefix: the
   tokens of "the turns before assistant turn i, plus the generation prompt" end where the answer starts,
   and the tokens of "the turns up to and including i" end where it stops. Each prefix goes through the
   same processor (with its images), and its start is matched against the full sequence by longest common
   prefix, so a template whose prompt tokenizes slightly differently at the seam (LLaVA's ``ASSISTANT:``)
   still lands on the right token. No template string is searched for, so the same code works for ChatML,
   Llama 3 headers, Gemma turns, ``[INST]`` and ``USER:/ASSISTANT:`` templates alike.

Then the batch: every tensor the processor returned is kept (Qwen's ``image_grid_thw``, Gemma 3's
``token_type_ids``, Mllama's ``cross_attention_mask`` and ``aspect_ratio_ids``, LLaVA-NeXT / Pixtral
``image_sizes``...). Sequence tensors are right-padded; per-image tensors are concatenated (trailing dims
zero-padded, as LLaVA-NeXT patches and Pixtral sizes vary); Mllama's per-sample image tensors are stacked
with zero padding, as its processor does for a batch. Text-only samples mix freely with image samples.

Packing (``packing=True``, Qwen2-VL / Qwen2.5-VL): instead of padded rows, the batch's samples are
concatenated into one row with no padding at all, and the segment layout travels with it
(``visionft.data.packing`` describes the format). The model's text attention must be block-diagonal
for such rows (``visionft.patching.enable_packing(model)``, which ``visionft-train`` calls after loading),
so each sample sees only itself, as in a padded batch, without computing a single padded token; the
collator refuses a model without it.

Bad samples: with ``on_bad_sample="error"`` the first one raises ``BadSampleError``. With ``"skip"`` it is
dropped, counted in ``skipped`` and logged with its reason. If every sample of a batch is bad, the batch
is replaced by the last good sample this collator built (counted in ``substituted``), because the Trainer
cannot take an empty batch and failing a whole run over one bad sample at batch size 1 would defeat
"skip"; before any good sample exists, a ``BadSampleError`` is raised. Counts are per process: use
``dataloader_num_workers=0`` (the CLI does) to read them from the main process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from visionft.data.errors import BadSampleError
from visionft.data.images import ImageLimits, ImageLoader, fit_to_budget
from visionft.data.packing import (
    PACKED_CU_SEQLENS,
    mask_sample_starts,
    segment_layout,
    separates_packed_samples,
)
from visionft.data.samples import Conversation, to_conversation
from visionft.model.architectures import get_arch_spec

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Processor / tokenizer attributes naming tokens that stand for image content or frame it.
_IMAGE_TOKEN_ATTRS = (
    "image_token",
    "boi_token",
    "eoi_token",
    "image_break_token",
    "image_end_token",
    "image_start_token",
    "vision_start_token",
    "vision_end_token",
    "video_token",
    "start_image_token",
    "end_image_token",
)
# Sequence-aligned tensors, padded along the sequence with these values.
_SEQ_PAD = {"attention_mask": 0, "token_type_ids": 0, "mm_token_type_ids": 0, "labels": IGNORE_INDEX}
# Image tensors that Mllama keeps per sample (batch, images, tiles, ...) rather than per image.
_PER_SAMPLE_IMAGE_KEYS = {"pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"}


def patch_multiple(model) -> int:
    """The side-length multiple that keeps an image's patches whole: patch size x spatial merge size
    (28 for Qwen2-VL / Qwen2.5-VL, 32 for Qwen3-VL), or the patch size alone; 1 when unknown."""
    config = getattr(model, "config", None)
    vision = getattr(config, "vision_config", None)
    patch = getattr(vision, "patch_size", None)
    if not isinstance(patch, int):
        return 1
    merge = getattr(vision, "spatial_merge_size", None) or getattr(config, "spatial_merge_size", None) or 1
    return patch * (merge if isinstance(merge, int) else 1)


class VisionDataCollator:
    """Builds padded, labelled batches of chat samples with images (see the module docstring).

    Args:
        model: the model being trained (a PEFT wrapper is fine); read for its architecture only.
        processor: the model's processor (tokenizer, image processor, chat template).
        max_seq_length (int): the longest sample in tokens, image tokens included. Default: 2048.
        train_on_responses_only (bool): supervise only assistant turns. Default: True.
        max_image_pixels (int | None): pixel budget per image; larger images are downscaled keeping aspect
            ratio. None means no budget (the processor's own resizing applies). Default: None.
        resize (bool): fit images to the budget and align their sides to the patch multiple before the
            processor sees them. Default: True.
        pad_to_multiple_of (int | None): pad the sequence length up to a multiple of this. Default: None.
        on_bad_sample ("error" | "skip"): what a broken image, malformed record or over-long sample does.
            Default: "error".
        dataset_root (str | os.PathLike | None): local image paths must stay inside this folder; None
            trusts every path (see ``ImageLoader``). Default: None.
        image_limits (ImageLimits | None): byte, decode-pixel, time-out and network limits for loading.
            Default: ``ImageLimits()``.
        formatter (Callable[[dict], dict] | None): applied to each raw record first, e.g. to map
            instruction/response/image columns to messages (``visionft.data.formats.to_messages``).
        image_loader (ImageLoader | None): a preconfigured loader (overrides dataset_root/image_limits).
        packing (bool): join the batch's samples into one row without padding; ``model`` must keep the
            samples apart (``visionft.patching.enable_packing(model)``, for Qwen2-VL / Qwen2.5-VL).
            Default: False.

    Raises:
        ValueError: an argument is out of range, or ``packing`` is on for a model whose attention would
            mix the samples of a row, or together with ``pad_to_multiple_of``.

    Attributes:
        skipped (int): samples skipped so far under ``on_bad_sample="skip"``.
        substituted (int): batches replaced by the last good sample because every sample was bad.
        last_skip_reasons (list[str]): the messages of the most recent skips (at most 20).
    """

    def __init__(
        self,
        model,
        processor,
        max_seq_length: int = 2048,
        train_on_responses_only: bool = True,
        max_image_pixels: int | None = None,
        resize: bool = True,
        pad_to_multiple_of: int | None = None,
        on_bad_sample: Literal["error", "skip"] = "error",
        dataset_root: str | os.PathLike | None = None,
        image_limits: ImageLimits | None = None,
        formatter: Callable[[dict], dict] | None = None,
        image_loader: ImageLoader | None = None,
        packing: bool = False,
    ):
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample={on_bad_sample!r} must be 'error' or 'skip'")
        if not isinstance(max_seq_length, int) or max_seq_length <= 0:
            raise ValueError(f"max_seq_length={max_seq_length!r} must be a positive integer")
        if getattr(processor, "chat_template", None) is None:
            raise ValueError("the processor has no chat_template; load a processor that defines one")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.model_type = _model_type(model)
        self.max_seq_length = max_seq_length
        self.train_on_responses_only = train_on_responses_only
        self.max_image_pixels = max_image_pixels
        self.resize = resize
        self.multiple = patch_multiple(_base_model(model))
        self.pad_to_multiple_of = pad_to_multiple_of
        self.on_bad_sample = on_bad_sample
        self.formatter = formatter
        self.loader = image_loader or ImageLoader(dataset_root, image_limits)
        pad_id = self.tokenizer.pad_token_id
        self.pad_token_id = pad_id if pad_id is not None else self.tokenizer.eos_token_id
        self.image_token_ids = _image_token_ids(processor, self.tokenizer)
        self.packing = packing
        if packing:
            self._check_packing(model)
        self.skipped = 0
        self.substituted = 0
        self.last_skip_reasons: list[str] = []
        self._last_good: Any = None

    def _check_packing(self, model) -> None:
        if self.pad_to_multiple_of:
            raise ValueError(
                "pad_to_multiple_of pads rows, and packing=True makes rows without padding: set one"
            )
        if not separates_packed_samples(model):
            raise ValueError(
                f"packing=True (training.packing): the attention of this {self.model_type} model would "
                "let each sample of a row see the samples before it; call "
                "visionft.patching.enable_packing(model) first (Qwen2-VL and Qwen2.5-VL), or set packing "
                "to false"
            )

    # ---------------------------------------------------------------------------------------------
    # Batch
    # ---------------------------------------------------------------------------------------------

    def __call__(self, features: Sequence[dict]) -> dict[str, Any]:
        encoded = self.encode_batch(features)
        return self.pack(encoded) if self.packing else self.pad(encoded)

    def encode_batch(self, features: Sequence[dict]) -> list[dict[str, torch.Tensor]]:
        """Encodes a batch's records under the bad-sample rules (module docstring); at least one sample.

        Raises:
            BadSampleError: a bad sample under ``on_bad_sample="error"``, or every sample was bad before
                any good one was seen.
        """
        encoded = []
        for position, record in enumerate(features):
            try:
                encoded.append(self._encode_item(record, _index(record, position)))
            except BadSampleError as err:
                if self.on_bad_sample == "error":
                    raise
                self._note_skip(err)
        if not encoded:
            if self._last_good is None:
                raise BadSampleError(
                    f"all {len(features)} samples of the batch were bad and no good sample has been seen yet "
                    f"to stand in; last: {self.last_skip_reasons[-1] if self.last_skip_reasons else '?'}"
                )
            self.substituted += 1
            logger.warning(
                "every sample of a batch was skipped; reusing the last good sample "
                "(%d substituted batches so far)",
                self.substituted,
            )
            encoded = [self._last_good]
        self._last_good = encoded[-1]
        return encoded

    def held_out_batch(self, features: Sequence[dict]) -> tuple[dict[str, Any] | None, list[str]]:
        """The records that encode, batched as training batches them, and the reasons of the others; None
        for the batch when none encodes. For scoring held-out samples: the training run's bad-sample
        counts stay as they are, and no stand-in is used either way (a held-out sample is never trained
        on, and a training sample never scored)."""
        encoded, reasons = [], []
        for position, record in enumerate(features):
            try:
                encoded.append(self._encode_item(record, _index(record, position)))
            except BadSampleError as err:
                reasons.append(str(err))
        if not encoded:
            return None, reasons
        return (self.pack(encoded) if self.packing else self.pad(encoded)), reasons

    def _encode_item(self, record: dict, index: int | None) -> Any:
        """One batch item (a subclass may encode a record as several sequences)."""
        return self.encode(record, index=index)

    def uncount(self, skipped: int, substituted: int = 0) -> None:
        """Takes back counts of batches that were built but never trained (``visionft.data.prefetch``)."""
        self.skipped -= skipped
        self.substituted -= substituted
        if skipped > 0:
            del self.last_skip_reasons[max(0, len(self.last_skip_reasons) - skipped) :]

    def _note_skip(self, err: BadSampleError) -> None:
        self.skipped += 1
        self.last_skip_reasons = [*self.last_skip_reasons[-19:], str(err)]
        logger.warning("skipped %s (%d skipped so far)", err, self.skipped)

    # ---------------------------------------------------------------------------------------------
    # One sample
    # ---------------------------------------------------------------------------------------------

    def encode(self, record: dict, index: int | None = None) -> dict[str, torch.Tensor]:
        """Encodes one record into unpadded tensors (batch dimension 1), labels included.

        Raises:
            BadSampleError: the record is malformed, an image is refused or broken, or the sample is
                longer than ``max_seq_length`` after image expansion.
        """
        if self.formatter is not None:
            try:
                record = self.formatter(record)
            except BadSampleError as err:
                raise err.at(index) from err
        conversation = to_conversation(record, index)
        images = [self._image(ref, index, i) for i, ref in enumerate(conversation.images)]
        text = self._render(conversation.messages, add_generation_prompt=False, index=index)
        batch = self._process(text, images, index)
        input_ids = batch["input_ids"][0]
        length = int(input_ids.shape[0])
        if length > self.max_seq_length:
            raise BadSampleError(
                f"the sample is {length} tokens long with its images expanded, over max_seq_length="
                f"{self.max_seq_length}; raise maxSeqLength, lower maxImagePixels or shorten the sample "
                "(samples are never truncated through image tokens)",
                index,
                "length",
            )
        labels = self._labels(conversation, images, input_ids, index)
        batch["labels"] = labels.unsqueeze(0)
        return batch

    def prompt_inputs(self, record: dict, index: int | None = None) -> tuple[dict[str, torch.Tensor], str]:
        """The processor inputs for generating the record's last assistant turn, and that turn's text.

        Used to score held-out samples: the same normalization, image rules and resizing as training, with
        the conversation cut before its final answer and the template's generation prompt appended.

        Raises:
            BadSampleError: as ``encode``, or the record does not end with an assistant turn.
        """
        if self.formatter is not None:
            record = self.formatter(record)
        conversation = to_conversation(record, index)
        messages = conversation.messages
        if messages[-1]["role"] != "assistant":
            raise BadSampleError(
                "the sample does not end with an assistant turn to compare with", index, "messages"
            )
        answer = "".join(part.get("text", "") for part in messages[-1]["content"] if part["type"] == "text")
        images = [self._image(ref, index, i) for i, ref in enumerate(conversation.images)]
        images = images[: conversation.images_before(len(messages) - 1)]
        text = self._render(messages[:-1], add_generation_prompt=True, index=index)
        return self._process(text, images, index), answer

    def _image(self, ref: Any, index: int | None, position: int):
        image = self.loader.load(ref, index=index, field=f"image {position}")
        if self.resize:
            image = fit_to_budget(image, self.max_image_pixels, self.multiple)
        return image

    def _render(self, messages: list[dict], add_generation_prompt: bool, index: int | None) -> str:
        try:
            return self.processor.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as err:  # jinja raises its own types (TemplateError, and raise_exception's)
            raise BadSampleError(
                f"the chat template cannot render this conversation ({type(err).__name__}: {err}); check "
                "the order of roles the model expects",
                index,
                "messages",
            ) from err

    def _process(self, text: str, images: list, index: int | None) -> dict[str, torch.Tensor]:
        # Templates that write the BOS themselves must not get a second one from the tokenizer.
        bos = self.tokenizer.bos_token
        kwargs: dict[str, Any] = {"add_special_tokens": not (bos and text.startswith(bos))}
        try:
            out = self.processor(text=[text], images=images or None, return_tensors="pt", **kwargs)
        except Exception as err:  # image processors raise ValueError/TypeError/RuntimeError alike
            raise BadSampleError(
                f"the processor rejected the sample ({type(err).__name__}: {err})", index, "images"
            ) from err
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}

    def _labels(
        self, conversation: Conversation, images: list, input_ids: torch.Tensor, index: int | None
    ) -> torch.Tensor:
        labels = input_ids.clone()
        if self.train_on_responses_only:
            supervised = torch.zeros_like(input_ids, dtype=torch.bool)
            turns = [i for i, m in enumerate(conversation.messages) if m["role"] == "assistant"]
            if not turns:
                raise BadSampleError(
                    "the sample has no assistant turn, so nothing would be supervised; add the answer or "
                    "turn trainOnResponsesOnly off",
                    index,
                    "messages",
                )
            for turn in turns:
                start, end = self._span(conversation, images, input_ids, turn, index)
                supervised[start:end] = True
            labels[~supervised] = IGNORE_INDEX
        if self.image_token_ids:
            is_image = torch.isin(input_ids, torch.tensor(sorted(self.image_token_ids)))
            labels[is_image] = IGNORE_INDEX
        return labels

    def _span(
        self, conversation: Conversation, images: list, input_ids: torch.Tensor, turn: int, index: int | None
    ) -> tuple[int, int]:
        """Token positions [start, end) of assistant turn ``turn`` in ``input_ids``."""
        messages = conversation.messages
        start = 0
        if turn > 0:
            before = self._prefix_ids(
                messages[:turn], images[: conversation.images_before(turn)], True, index
            )
            start = _common_prefix(before, input_ids)
        if turn == len(messages) - 1:
            end = int(input_ids.shape[0])
        else:
            upto = self._prefix_ids(
                messages[: turn + 1], images[: conversation.images_before(turn + 1)], False, index
            )
            end = _common_prefix(upto, input_ids)
        return start, end

    def _prefix_ids(self, messages: list[dict], images: list, generation_prompt: bool, index) -> torch.Tensor:
        text = self._render(messages, add_generation_prompt=generation_prompt, index=index)
        return self._process(text, images, index)["input_ids"][0]

    # ---------------------------------------------------------------------------------------------
    # Padding and stacking
    # ---------------------------------------------------------------------------------------------

    def pad(self, encoded: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pads and joins encoded samples into one batch (see the module docstring for the rules)."""
        length = max(int(e["input_ids"].shape[1]) for e in encoded)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        spec = get_arch_spec(self.model_type)
        per_sample = spec is not None and spec.per_sample_images
        batch: dict[str, torch.Tensor] = {}
        for key in sorted({k for e in encoded for k in e}):
            present = [e.get(key) for e in encoded]
            if _is_sequence_key(key, encoded):
                value = self.pad_token_id if key == "input_ids" else _SEQ_PAD.get(key, 0)
                batch[key] = _stack_padded(present, seq_len=length, value=value)
            elif per_sample and key in _PER_SAMPLE_IMAGE_KEYS:
                batch[key] = _stack_padded(present, seq_len=None, value=0)
            else:
                batch[key] = _cat_padded([t for t in present if t is not None])
        return batch

    def pack(self, encoded: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """Joins encoded samples into one row without padding (``visionft.data.packing``)."""
        lengths = [int(e["input_ids"].shape[1]) for e in encoded]
        layout = segment_layout(lengths)
        batch: dict[str, Any] = {}
        for key in sorted({k for e in encoded for k in e}):
            present = [e.get(key) for e in encoded]
            if _is_sequence_key(key, encoded):
                fill = self.pad_token_id if key == "input_ids" else _SEQ_PAD.get(key, 0)
                parts = [
                    t if t is not None else torch.full((1, n), fill, dtype=_dtype_of(key, encoded))
                    for t, n in zip(present, lengths, strict=True)
                ]
                batch[key] = torch.cat(parts, dim=1)
            else:
                batch[key] = _cat_padded([t for t in present if t is not None])
        # One row, no padding: every token is attended to (the packed attention keeps samples apart).
        batch["attention_mask"] = torch.ones(1, sum(lengths), dtype=torch.long)
        mask_sample_starts(batch["labels"], layout[PACKED_CU_SEQLENS])  # type: ignore[arg-type]
        batch.update(layout)
        return batch


def _index(record: Any, position: int) -> int:
    """A record's sample index for messages: its ``__index__``, else its place in the batch."""
    return record.get("__index__", position) if isinstance(record, dict) else position


def _is_sequence_key(key: str, encoded: list[dict[str, torch.Tensor]]) -> bool:
    """Whether ``key`` is sequence-aligned (``(1, length)``) in the samples that have it."""
    return any(
        v.dim() >= 2 and v.shape[0] == 1 and v.shape[1] == e["input_ids"].shape[1]
        for e in encoded
        if (v := e.get(key)) is not None
    )


def _dtype_of(key: str, encoded: list[dict[str, torch.Tensor]]) -> torch.dtype:
    return next(e[key].dtype for e in encoded if key in e)


def _stack_padded(tensors: list[torch.Tensor | None], seq_len: int | None, value: float) -> torch.Tensor:
    """Concatenates (1, ...) tensors along dim 0, padding every later dim to the largest size (dim 1 to
    ``seq_len`` when given) with ``value``; a missing tensor becomes all ``value``."""
    real = [t for t in tensors if t is not None]
    shape = [max(int(t.shape[d]) for t in real) for d in range(1, real[0].dim())]
    if seq_len is not None:
        shape[0] = seq_len
    out = torch.full((len(tensors), *shape), value, dtype=real[0].dtype)
    for i, t in enumerate(tensors):
        if t is not None:
            out[(i, *(slice(0, s) for s in t.shape[1:]))] = t[0]
    return out


def _cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenates per-image tensors along dim 0, zero-padding trailing dims to the largest size."""
    shape = [max(int(t.shape[d]) for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        pad = []
        for d in reversed(range(1, t.dim())):
            pad += [0, shape[d - 1] - int(t.shape[d])]
        padded.append(F.pad(t, pad) if any(pad) else t)
    return torch.cat(padded, dim=0)


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(int(a.shape[0]), int(b.shape[0]))
    differs = (a[:n] != b[:n]).nonzero()
    return int(differs[0]) if differs.numel() else n


def _image_token_ids(processor, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (processor, tokenizer):
        for attr in _IMAGE_TOKEN_ATTRS:
            token = getattr(source, attr, None)
            if isinstance(token, str) and token:
                token_id = tokenizer.convert_tokens_to_ids(token)
                if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
                    ids.add(token_id)
        token_id = getattr(source, "image_token_id", None)
        if isinstance(token_id, int):
            ids.add(token_id)
    return ids


def _base_model(model):
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _model_type(model) -> str | None:
    config = getattr(_base_model(model), "config", None)
    return getattr(config, "model_type", None)
