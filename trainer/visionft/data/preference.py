"""Preference pairs: a prompt with its images and two answers to it, chosen and rejected, to the batch that
DPO trains on.

Record to pair (``to_preference``): the recipe's columns name the parts. The prompt is the ``instruction``
column (a string, or a list of chat turns as TRL's preference datasets hold it; ``dataset.instruction`` when
the column is absent or empty) with the ``image`` column's image (or the ``images`` column's list), or the
``messages`` column's conversation with the ``images`` column. ``chosen`` and ``rejected`` each hold a
string or a list of assistant turns.

Pair to sequences (``PreferenceCollator.encode_pair``): the images are loaded once, under the same input
rules as supervised batches (``visionft.data.images``: size limits, path containment, the pixel budget),
and each answer is rendered after the prompt by the chat template and run through the processor with the
images, so the lengths measured are the real ones. An answer's tokens are where its sequence leaves the
prompt rendered with the template's generation prompt (longest common prefix, as
``visionft.data.collator`` finds assistant turns). A pair longer than ``max_seq_length``, a prompt over
``max_prompt_length`` or an answer over ``max_completion_length`` is a bad sample, never truncated.

Batch (``PreferenceCollator.__call__``): every chosen sequence, then every rejected one, in the same order,
padded as ``VisionDataCollator.pad`` pads (the images concatenated in that order too), with a
``completion_mask`` (1 on the answer's tokens) in place of labels: the layout TRL's ``DPOTrainer`` reads.
Bad pairs are refused or skipped and counted, exactly as ``VisionDataCollator`` does with samples.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch

from visionft.data.collator import VisionDataCollator, _common_prefix
from visionft.data.errors import BadSampleError
from visionft.data.formats import _columns
from visionft.data.images import ImageLimits, ImageLoader
from visionft.data.samples import Conversation, to_conversation

#: The batch key that marks each sequence's answer tokens.
COMPLETION_MASK = "completion_mask"
ANSWERS = ("chosen", "rejected")


def to_preference(sample: dict, columns: Any = None, instruction: str | None = None) -> dict:
    """Maps one record to ``{"prompt": turns, "chosen": turns, "rejected": turns, "images": refs}``.

    Args:
        sample (dict): one dataset record.
        columns: a ``visionft_api.recipe.DatasetColumns`` or a dict with its keys; ``chosen`` and
            ``rejected`` default to the columns of those names.
        instruction (str | None): the prompt used when the sample has none.

    Raises:
        BadSampleError: a named column is missing or empty, or an answer is not text or assistant turns.
    """
    cols = _columns(columns)
    if cols["messages"]:
        prompt = sample.get(cols["messages"])
        if prompt in (None, []):
            raise BadSampleError(f"column {cols['messages']!r} is missing or empty", field=cols["messages"])
        images = sample.get(cols["images"]) if cols["images"] else None
    else:
        prompt = sample.get(cols["instruction"]) if cols["instruction"] else None
        prompt = prompt if prompt not in (None, "", []) else instruction
        if prompt is None:
            raise BadSampleError(
                f"no prompt: column {cols['instruction']!r} is missing or empty and dataset.instruction is "
                "not set; set one of them",
                field=str(cols["instruction"]),
            )
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        column = cols["images"] or cols["image"]
        images = sample.get(column) if column else None
    if not isinstance(prompt, list):
        raise BadSampleError("the prompt must be a string or a list of chat turns", field="prompt")
    pair = {"prompt": prompt, **{role: _answer(sample, cols[role] or role, role) for role in ANSWERS}}
    if images is not None:
        pair["images"] = list(images) if isinstance(images, (list, tuple)) else [images]
    return pair


def _answer(sample: dict, column: str, role: str) -> list[dict]:
    value = sample.get(column)
    if value in (None, "", []):
        raise BadSampleError(f"column {column!r} ({role} answer) is missing or empty", field=column)
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    turns = [value] if isinstance(value, dict) else value
    if not isinstance(turns, list) or not all(
        isinstance(turn, dict) and turn.get("role") == "assistant" for turn in turns
    ):
        raise BadSampleError(f"the {role} answer must be a string or a list of assistant turns", field=column)
    return list(turns)


class PreferenceFormatter:
    """``to_preference`` bound to a recipe's columns and instruction: a picklable collator ``formatter``."""

    def __init__(self, columns: Any = None, instruction: str | None = None):
        self.columns = columns
        self.instruction = instruction

    def __call__(self, sample: dict) -> dict:
        return to_preference(sample, self.columns, self.instruction)


class PreferenceCollator(VisionDataCollator):
    """Builds DPO batches of preference pairs with images (see the module docstring).

    Args:
        model: the model being trained (a PEFT wrapper is fine); read for its architecture only.
        processor: the model's processor (tokenizer, image processor, chat template).
        max_seq_length (int): the longest prompt plus answer in tokens, image tokens included.
            Default: 2048.
        max_prompt_length (int | None): the longest prompt in tokens, image tokens included; None leaves
            it to ``max_seq_length``. Default: None.
        max_completion_length (int | None): the longest answer in tokens; None leaves it to
            ``max_seq_length``. Default: None.
        max_image_pixels (int | None): pixel budget per image (``VisionDataCollator``). Default: None.
        resize (bool): fit images to the budget and the patch multiple. Default: True.
        on_bad_sample ("error" | "skip"): what a bad pair does. Default: "error".
        dataset_root (str | os.PathLike | None): local image paths must stay inside this folder.
            Default: None.
        image_limits (ImageLimits | None): limits for loading images. Default: ``ImageLimits()``.
        formatter (Callable[[dict], dict] | None): maps a record to a pair (``PreferenceFormatter``).
            Default: ``to_preference`` with the default columns.
        image_loader (ImageLoader | None): a preconfigured loader.

    Attributes: ``VisionDataCollator``'s bad-sample counts (``skipped``, ``substituted``,
    ``last_skip_reasons``), counted in pairs.
    """

    def __init__(
        self,
        model,
        processor,
        max_seq_length: int = 2048,
        max_prompt_length: int | None = None,
        max_completion_length: int | None = None,
        max_image_pixels: int | None = None,
        resize: bool = True,
        on_bad_sample: Literal["error", "skip"] = "error",
        dataset_root: str | os.PathLike | None = None,
        image_limits: ImageLimits | None = None,
        formatter=None,
        image_loader: ImageLoader | None = None,
    ):
        super().__init__(
            model,
            processor,
            max_seq_length=max_seq_length,
            max_image_pixels=max_image_pixels,
            resize=resize,
            on_bad_sample=on_bad_sample,
            dataset_root=dataset_root,
            image_limits=image_limits,
            formatter=formatter or PreferenceFormatter(),
            image_loader=image_loader,
        )
        for name, value in (
            ("max_prompt_length", max_prompt_length),
            ("max_completion_length", max_completion_length),
        ):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name}={value!r} must be a positive integer or None")
        self.max_prompt_length = max_prompt_length
        self.max_completion_length = max_completion_length

    def encode_pair(
        self, record: dict, index: int | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Encodes one record into its chosen and rejected sequences (unpadded, batch dimension 1), each
        with ``completion_mask``.

        Raises:
            BadSampleError: the record is malformed, an image is refused or broken, the prompt or an
                answer is too long, or the two answers are the same.
        """
        try:
            pair = self.formatter(record)
        except BadSampleError as err:
            raise err.at(index) from err
        refs = pair.get("images")
        prompt = to_conversation({"messages": pair["prompt"], "images": refs}, index)
        if prompt.messages[-1]["role"] == "assistant":
            raise BadSampleError(
                "the prompt ends with an assistant turn; it must end with the turn the answers reply to",
                index,
                "prompt",
            )
        images = [self._image(ref, index, i) for i, ref in enumerate(prompt.images)]
        text = self._render(prompt.messages, add_generation_prompt=True, index=index)
        prompt_ids = self._process(text, images, index)["input_ids"][0]
        if self.max_prompt_length is not None and prompt_ids.shape[0] > self.max_prompt_length:
            raise BadSampleError(
                f"the prompt is {prompt_ids.shape[0]} tokens long with its images expanded, over "
                f"dpo.maxPromptLength={self.max_prompt_length}; raise it, lower maxImagePixels or shorten the "
                "prompt (prompts are never truncated)",
                index,
                "prompt",
            )
        chosen, rejected = (
            self._answer_sequence(pair, prompt, images, prompt_ids, role, index) for role in ANSWERS
        )
        if _answer_ids(chosen).equal(_answer_ids(rejected)):
            raise BadSampleError(
                "the chosen and the rejected answer are the same: there is nothing to prefer",
                index,
                "rejected",
            )
        return chosen, rejected

    def _answer_sequence(
        self,
        pair: dict,
        prompt: Conversation,
        images: list,
        prompt_ids: torch.Tensor,
        role: str,
        index: int | None,
    ) -> dict[str, torch.Tensor]:
        full = to_conversation(
            {"messages": [*pair["prompt"], *pair[role]], "images": pair.get("images")}, index
        )
        if len(full.images) != len(prompt.images):
            raise BadSampleError(f"the {role} answer holds images; answers are text", index, role)
        text = self._render(full.messages, add_generation_prompt=False, index=index)
        batch = self._process(text, images, index)
        input_ids = batch["input_ids"][0]
        length = int(input_ids.shape[0])
        if length > self.max_seq_length:
            raise BadSampleError(
                f"the prompt with the {role} answer is {length} tokens long with its images expanded, over "
                f"max_seq_length={self.max_seq_length}; raise maxSeqLength, lower maxImagePixels or shorten "
                "the sample (samples are never truncated)",
                index,
                role,
            )
        start = _common_prefix(prompt_ids, input_ids)
        answer = length - start
        if answer <= 0:
            raise BadSampleError(f"the {role} answer has no tokens after the prompt", index, role)
        if self.max_completion_length is not None and answer > self.max_completion_length:
            raise BadSampleError(
                f"the {role} answer is {answer} tokens long, over dpo.maxCompletionLength="
                f"{self.max_completion_length}; raise it or shorten the answer (answers are never truncated)",
                index,
                role,
            )
        mask = torch.zeros_like(input_ids)
        mask[start:] = 1
        batch[COMPLETION_MASK] = mask.unsqueeze(0)
        return batch

    def __call__(self, features) -> dict[str, Any]:
        pairs: list = self.encode_batch(features)
        return self.pad([chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs])

    def _encode_item(self, record: dict, index: int | None) -> Any:
        return self.encode_pair(record, index)


def _answer_ids(sequence: dict[str, torch.Tensor]) -> torch.Tensor:
    return sequence["input_ids"][0][sequence[COMPLETION_MASK][0].bool()]
