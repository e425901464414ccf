"""The parts of a run that ``method: dpo`` does its own way; ``visionft.job.run`` calls them in place of the
supervised ones, and everything else (inputs, loading, checkpoints, resume, progress, saving, upload) is
shared.

- the data: the chosen and rejected columns (and the prompt's) must be in the dataset, checked once at the
  start (``check_columns``), and batches are preference pairs (``visionft.data.preference``);
- the model: the fused kernels of ``visionft.patching`` apply, except those that only a supervised step
  uses (the fused cross-entropy, the CUDA-graph step's static inputs, the packed attention:
  ``PATCHES_OFF``);
- held-out scoring is preference accuracy (``preference_accuracy``): the share of held-out pairs whose
  chosen answer has the higher summed log-probability under the model, with the per-pair numbers written
  to ``preference.json`` (``write_report``);
- training is TRL's ``DPOTrainer`` through ``visionft.engine.dpo`` (the reference is the base model with
  the adapters disabled).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from visionft.data.errors import BadSampleError

logger = logging.getLogger(__name__)

#: ``visionft.patching.apply_optimizations`` kinds that a DPO step has no use for.
PATCHES_OFF = {"fused_loss": False, "static_inputs": False, "packed_attention": False}
REPORT_FILE = "preference.json"


@dataclass(frozen=True)
class PairScore:
    """One held-out pair: its dataset index and the summed log-probability of each answer."""

    index: int
    chosen: float
    rejected: float


@dataclass
class PreferenceAccuracy:
    """Held-out preference accuracy.

    Attributes:
        pairs (list[PairScore]): every scored pair.
        correct (int): pairs whose chosen answer has the higher log-probability.
        total (int): pairs scored.
        value (float): correct / total (0 when total is 0).
    """

    pairs: list[PairScore] = field(default_factory=list)

    @property
    def correct(self) -> int:
        return sum(pair.chosen > pair.rejected for pair in self.pairs)

    @property
    def total(self) -> int:
        return len(self.pairs)

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def mean_margin(self) -> float | None:
        """The mean of chosen minus rejected log-probability, or None without pairs."""
        if not self.pairs:
            return None
        return sum(pair.chosen - pair.rejected for pair in self.pairs) / len(self.pairs)

    def __str__(self) -> str:
        return f"{100 * self.value:.1f}% ({self.correct}/{self.total})"


def check_columns(config, *splits) -> None:
    """Refuses a dataset that lacks a column the recipe names for a pair's parts.

    Raises:
        ValueError: a named column is in none of the given splits' columns; the message names the field.
    """
    d = config.dataset
    cols = d.columns
    needed = {"dataset.columns.chosen": cols.chosen, "dataset.columns.rejected": cols.rejected}
    if cols.messages:
        needed["dataset.columns.messages"] = cols.messages
    elif d.instruction is None and cols.instruction:
        needed["dataset.columns.instruction"] = cols.instruction
    for split in splits:
        if split is None:
            continue
        present = set(split.column_names)
        for field_name, column in needed.items():
            if column not in present:
                raise ValueError(
                    f"{field_name}: the dataset has no column {column!r} (its columns: "
                    f"{', '.join(sorted(present - {'__index__'}))}); set {field_name} to the column that "
                    "holds it"
                )


def collator(config, model, processor, root: Path):
    """The ``PreferenceCollator`` of the recipe's dataset and DPO settings."""
    from visionft.data.preference import PreferenceCollator, PreferenceFormatter

    d, dpo = config.dataset, config.dpo_settings()
    return PreferenceCollator(
        model,
        processor,
        max_seq_length=config.model.max_seq_length,
        max_prompt_length=dpo.max_prompt_length,
        max_completion_length=dpo.max_completion_length,
        max_image_pixels=d.max_image_pixels,
        on_bad_sample=d.on_bad_sample,
        dataset_root=root,
        formatter=PreferenceFormatter(d.columns, d.instruction),
    )


@torch.no_grad()
def preference_accuracy(model, collator, samples, limit: int | None = None) -> PreferenceAccuracy:
    """Scores held-out pairs: each answer's summed log-probability after the prompt, one pair per forward.

    Args:
        model: the model (PEFT-wrapped or not); put in eval mode and restored afterwards.
        collator (PreferenceCollator): encodes the pairs exactly as for training.
        samples: an indexable dataset or list of records.
        limit (int | None): score at most this many (the first ones). Default: all.

    Returns:
        PreferenceAccuracy: the scores; pairs that cannot be encoded are skipped with a warning.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    count = len(samples) if limit is None else min(limit, len(samples))
    result = PreferenceAccuracy()
    try:
        for i in range(count):
            try:
                chosen, rejected = collator.encode_pair(samples[i], index=i)
            except BadSampleError as err:
                logger.warning("not scoring %s", err)
                continue
            logps = answer_log_probs(model, collator.pad([chosen, rejected]), device)
            result.pairs.append(PairScore(i, float(logps[0]), float(logps[1])))
    finally:
        model.train(was_training)
    return result


def answer_log_probs(model, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """The summed log-probability of each row's answer tokens (``completion_mask``) under ``model``.

    Only the positions that predict an answer token get logits (``logits_to_keep``), so a large vocabulary
    costs rows x answer length x vocabulary, not the whole sequence.
    """
    mask = batch["completion_mask"]
    inputs = {k: v.to(device) for k, v in batch.items() if k != "completion_mask"}
    ids = batch["input_ids"]
    first = int(mask[:, 1:].any(dim=0).nonzero()[0, 0])
    keep = torch.arange(first, ids.shape[1] - 1)
    logits = model(**inputs, logits_to_keep=keep.to(device), use_cache=False).logits.float()
    targets = ids[:, keep + 1].to(device)
    logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logps * mask[:, keep + 1].to(device)).sum(dim=1).cpu()


def write_report(
    output_dir: Path, before: PreferenceAccuracy | None, after: PreferenceAccuracy | None
) -> Path:
    """Writes ``preference.json``: held-out preference accuracy, mean margin and per-pair log-probabilities,
    before and after training."""

    def part(score: PreferenceAccuracy | None) -> dict[str, Any] | None:
        if score is None:
            return None
        return {
            "accuracy": score.value,
            "correct": score.correct,
            "total": score.total,
            "meanMargin": score.mean_margin(),
            "pairs": [asdict(pair) for pair in score.pairs],
        }

    path = output_dir / REPORT_FILE
    path.write_text(json.dumps({"before": part(before), "after": part(after)}, indent=2) + "\n")
    return path


def trainer_setup(config, args: dict[str, Any]):
    """The Trainer class of a DPO run (``visionft.engine.dpo``) and its ``DPOConfig``: the run's shared
    Trainer ``args`` with the recipe's DPO settings."""
    from trl import DPOConfig

    from visionft.engine.dpo import vision_dpo_trainer_class

    dpo = config.dpo_settings()
    dpo_args = DPOConfig(
        **args,
        beta=dpo.beta,
        loss_type=[dpo.loss_type],
        # The collator measures and refuses over-long pairs; TRL would truncate through image tokens.
        max_length=None,
    )
    return vision_dpo_trainer_class(), dpo_args
