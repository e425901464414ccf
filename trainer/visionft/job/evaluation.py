"""Held-out accuracy: generate each sample's answer greedily and compare it with the reference.

The comparison is exact match after normalization (case, surrounding whitespace and punctuation), which
suits short-answer tasks such as the quickstart's colour names. It is the number the CLI prints before and
after training when ``dataset.evalSamples`` is set.
"""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass

import torch

from visionft.data.errors import BadSampleError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Accuracy:
    """Attributes: correct (int), total (int), and ``value`` = correct / total (0 when total is 0)."""

    correct: int
    total: int

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"{100 * self.value:.1f}% ({self.correct}/{self.total})"


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no surrounding punctuation: ``" Red.\\n"`` -> ``"red"``."""
    return " ".join(text.lower().split()).strip(string.punctuation + " ")


@torch.no_grad()
def answer_accuracy(model, collator, samples, limit: int | None = None, max_new_tokens: int = 16) -> Accuracy:
    """Scores ``samples`` (records the collator understands, each ending with an assistant answer).

    Args:
        model: the model (PEFT-wrapped or not); it is put in eval mode and restored afterwards.
        collator (VisionDataCollator): prepares prompts exactly as for training.
        samples: an indexable dataset or list of records.
        limit (int | None): score at most this many (the first ones). Default: all.
        max_new_tokens (int): generation length. Default: 16.

    Returns:
        Accuracy: correct and total; samples that cannot be prepared are skipped with a warning.
    """
    tokenizer = collator.tokenizer
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    count = len(samples) if limit is None else min(limit, len(samples))
    try:
        for i in range(count):
            try:
                inputs, answer = collator.prompt_inputs(samples[i], index=i)
            except BadSampleError as err:
                logger.warning("not scoring %s", err)
                continue
            inputs = {k: v.to(device) for k, v in inputs.items()}
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=collator.pad_token_id,
            )
            generated = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += normalize_answer(generated) == normalize_answer(answer)
            total += 1
    finally:
        model.train(was_training)
    return Accuracy(correct, total)
