"""The held-out samples an evaluation scores, chosen and checked before any training.

``held_out_split`` picks the split (``evaluation.split``: a named split, or validation, else test, else the
``dataset.validationFraction`` share of train); ``select`` takes the first ``evaluation.samples`` of it and
checks, sample by sample, that each has the reference answer its metrics need. Every problem is an
``EvaluationInputError`` whose one-line message names the field to change, raised at the trainer's start so
that a bad evaluation setting costs no training time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from visionft_api.evaluation import METRICS, EvaluationSettings

from visionft.data.errors import BadSampleError
from visionft.data.samples import to_conversation
from visionft.evaluation.metrics import reference_problem


class EvaluationInputError(ValueError):
    """The evaluation can't run on this dataset as configured; the message names the field."""


@dataclass(frozen=True)
class HeldOutSample:
    """One scored sample.

    Attributes:
        index (int): its position in the held-out split.
        record (dict): the dataset record, as the collator takes it.
        prompt (str): the text of its last user turn (for the gallery).
        reference (str): the answer it is scored against (its last assistant turn).
    """

    index: int
    record: dict
    prompt: str
    reference: str


def _text(message: dict) -> str:
    return "".join(part.get("text", "") for part in message["content"] if part.get("type") == "text")


def select(
    split: Any, split_name: str, settings: EvaluationSettings, formatter: Any = None
) -> list[HeldOutSample]:
    """The first ``settings.samples`` records of ``split`` (all when unset), each checked against the
    metrics' reference needs.

    Args:
        split: the held-out split (a ``datasets.Dataset`` or a list of records).
        split_name (str): its name, for messages.
        settings (EvaluationSettings): the evaluation.
        formatter: maps a raw record to the messages form (``visionft.data.formats.MessagesFormatter``),
            or None when records already are in it.

    Returns:
        list[HeldOutSample]: in split order.

    Raises:
        EvaluationInputError: more samples asked for than the split holds, or a sample without the
            reference a metric needs.
    """
    size = len(split)
    count = settings.samples if settings.samples is not None else size
    if count > size:
        raise EvaluationInputError(
            f"evaluation.samples is {count}, but the held-out split {split_name} holds {size} samples: set "
            f"evaluation.samples to at most {size} (or hold out more with dataset.validationFraction)"
        )
    if count == 0:
        raise EvaluationInputError(
            f"the held-out split {split_name} is empty: point evaluation.split at a split with samples"
        )
    needs = [m for m in settings.metrics if METRICS[m].reference != "none"]
    samples = []
    for i in range(count):
        record = split[i]
        try:
            conversation = to_conversation(formatter(record) if formatter is not None else record, i)
        except BadSampleError as err:
            raise EvaluationInputError(
                f"evaluation.metrics: held-out sample {i} of split {split_name} has no reference answer "
                f"({err}); every scored sample needs one (dataset.columns.response, or messages that end "
                "with an assistant turn)"
            ) from None
        messages = conversation.messages
        if messages[-1]["role"] != "assistant":
            raise EvaluationInputError(
                f"evaluation.metrics: held-out sample {i} of split {split_name} does not end with an "
                "assistant turn to compare with: the held-out split must carry reference answers"
            )
        reference = _text(messages[-1])
        for metric in needs:
            problem = reference_problem(metric, reference)
            if problem:
                raise EvaluationInputError(
                    f"evaluation.metrics: {metric} can't score held-out sample {i} of split {split_name}: "
                    f"{problem} (dataset.columns.response); choose metrics that fit the answers"
                )
        users = [m for m in messages[:-1] if m["role"] == "user"]
        samples.append(HeldOutSample(i, record, _text(users[-1]) if users else "", reference))
    return samples


def held_out_split(
    splits: Any, settings: EvaluationSettings, fraction: float, seed: int
) -> tuple[Any, Any, str]:
    """``(train, held_out, name)`` for an evaluation: ``settings.split`` names the held-out split, or
    ``auto`` takes ``validation``, else ``test``, else ``fraction`` of train (shuffled by ``seed``).

    Raises:
        EvaluationInputError: the named split does not exist, or there is nothing to hold out.
    """
    from visionft.data.formats import split_validation

    if settings.split != "auto":
        if settings.split not in splits:
            raise EvaluationInputError(
                f"evaluation.split {settings.split} is not a split of the dataset (it has "
                f"{', '.join(splits)}): name one of them, or auto"
            )
        if settings.split == "train":
            raise EvaluationInputError(
                "evaluation.split is train, the split being trained on: name a held-out split, or auto"
            )
        return splits["train"], splits[settings.split], settings.split
    train, held_out = split_validation(splits, fraction, seed)
    if held_out is None:
        raise EvaluationInputError(
            "evaluation needs held-out samples and the dataset has no validation or test split: set "
            "dataset.validationFraction to hold out a share of train, or evaluation.split"
        )
    name = next((s for s in ("validation", "test") if s in splits), f"validationFraction {fraction} of train")
    return train, held_out, name
