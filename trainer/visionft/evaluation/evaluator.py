"""One evaluation (answers, the metrics, the loss) and the run's record of them.

``Evaluator.evaluate`` scores the model at one step. ``EvaluationRecord`` keeps what a run needs of every
evaluation: the base model's (step 0, before training), those during training, and the output's (at the
end); which one is best by ``keepBest``'s metric; and, for the gallery and ``metrics.json``, the base and
the output's answers per sample. It turns into ``status.evaluation``, the rows of the summary table and the
``metrics.json`` document.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from visionft_api.evaluation import EVAL_LOSS, EvaluationSettings, better, higher_is_better, worse_than

from visionft.evaluation import metrics as metrics_mod
from visionft.evaluation.heldout import HeldOutSample
from visionft.evaluation.predict import eval_loss, generate_answers


@dataclass
class Evaluation:
    """The model scored at one step.

    Attributes:
        step (int): the optimizer step (0: the base model).
        values (dict[str, float]): each metric's corpus value, and ``evalLoss`` when it could be computed.
        predictions (list[str]): one answer per sample.
        per_sample (dict[str, list[float]]): each metric's per-sample values.
    """

    step: int
    values: dict[str, float]
    predictions: list[str] = field(default_factory=list)
    per_sample: dict[str, list[float]] = field(default_factory=dict)

    def point(self, metric: str) -> dict[str, Any]:
        """The ``status.evaluation`` form: ``{step, value, values}``."""
        return {"step": self.step, "value": self.values.get(metric), "values": dict(self.values)}


class Evaluator:
    """Scores a model on the held-out samples.

    Args:
        settings (EvaluationSettings): metrics and generation settings.
        samples (Sequence[HeldOutSample]): the samples (``heldout.select``).
        collator (VisionDataCollator): the training collator (prompts, and batches for the loss).
        seed (int): seeds sampling when ``generation.temperature`` > 0.
        batch_size (int): samples per forward pass of the loss.
    """

    def __init__(
        self,
        settings: EvaluationSettings,
        samples: Sequence[HeldOutSample],
        collator,
        seed: int,
        batch_size: int,
    ):
        self.settings = settings
        self.samples = list(samples)
        self.collator = collator
        self.seed = seed
        self.batch_size = batch_size

    @property
    def references(self) -> list[str]:
        return [s.reference for s in self.samples]

    def evaluate(self, model, step: int) -> Evaluation:
        """Answers every sample, scores the answers and computes the loss (see ``visionft.evaluation``)."""
        predictions = generate_answers(
            model, self.collator, self.samples, self.settings.generation, self.seed
        )
        values, per_sample = {}, {}
        for metric in self.settings.metrics:
            result = metrics_mod.score(metric, predictions, self.references)
            values[metric], per_sample[metric] = result.value, result.per_sample
        loss = eval_loss(model, self.collator, self.samples, self.batch_size)
        if loss is not None:
            values[EVAL_LOSS] = loss
        return Evaluation(step, values, predictions, per_sample)


@dataclass
class EvaluationRecord:
    """Every evaluation of a run, and which is best.

    Attributes:
        settings (EvaluationSettings): what was evaluated.
        split (str): the held-out split's name.
        base (Evaluation | None): the base model's (step 0).
        history (list[Evaluation]): those during training, in step order (answers dropped).
        final (Evaluation | None): the output's.
        best (Evaluation | None): the best during training by ``settings.best_metric`` (keepBest only).
        best_checkpoint (str | None): the folder holding the best one's weights.
        output_from (str): "last" or "best": whose weights the output holds.
    """

    settings: EvaluationSettings
    split: str
    base: Evaluation | None = None
    history: list[Evaluation] = field(default_factory=list)
    final: Evaluation | None = None
    best: Evaluation | None = None
    best_checkpoint: str | None = None
    output_from: str = "last"

    @property
    def metric(self) -> str:
        return self.settings.headline

    @property
    def best_by(self) -> str:
        """The metric that ranks evaluations: keepBest's, else the headline."""
        return self.settings.best_metric or self.metric

    def latest(self) -> Evaluation | None:
        return self.final or (self.history[-1] if self.history else self.base)

    def add(self, evaluation: Evaluation) -> bool:
        """Records an evaluation during training; True when it is a new best by ``best_by``."""
        self.history = [e for e in self.history if e.step != evaluation.step]
        self.history.append(Evaluation(evaluation.step, dict(evaluation.values)))
        self.history.sort(key=lambda e: e.step)
        value = evaluation.values.get(self.best_by)
        if value is None:
            return False
        current = self.best.values.get(self.best_by) if self.best is not None else None
        if current is None or better(value, current, self.best_by):
            self.best = Evaluation(evaluation.step, dict(evaluation.values))
            return True
        return False

    def worse_than_base(self) -> bool:
        """Whether the output's headline metric is strictly worse than the base model's."""
        if self.base is None or self.final is None:
            return False
        final, base = self.final.values.get(self.metric), self.base.values.get(self.metric)
        return final is not None and base is not None and worse_than(final, base, self.metric)

    def best_point(self) -> Evaluation | None:
        """The best evaluation by ``best_by`` among those during training and the output's (for status and
        the summary; with keepBest the best during training is the kept checkpoint)."""
        candidates = [e for e in (*self.history, self.final) if e is not None and self.best_by in e.values]
        if self.best is not None:
            return self.best
        chosen: Evaluation | None = None
        for e in candidates:
            if chosen is None or better(e.values[self.best_by], chosen.values[self.best_by], self.best_by):
                chosen = e
        return chosen

    def status(self) -> dict[str, Any]:
        """``status.evaluation`` (camelCase, as ``visionft_api.resource.EvaluationStatus``)."""
        out: dict[str, Any] = {
            "metric": self.metric,
            "higherIsBetter": higher_is_better(self.metric),
            "samples": len(self.base.predictions) if self.base is not None else None,
        }
        if self.base is not None:
            out["base"] = self.base.point(self.metric)
        latest = self.latest()
        if latest is not None:
            out["latest"] = latest.point(self.metric)
        best = self.best_point()
        if best is not None:
            out["best"] = {**best.point(self.best_by), "metric": self.best_by}
        if self.final is not None:
            out["final"] = self.final.point(self.metric)
            out["worseThanBase"] = self.worse_than_base()
        out["summary"] = self.summary()
        return {k: v for k, v in out.items() if v is not None}

    def summary(self) -> str:
        """A short line for the printer column: ``cer 0.912 -> 0.052 (best 0.047 @ 60)``."""
        fmt = _format_value
        parts = [self.metric]
        base = self.base.values.get(self.metric) if self.base is not None else None
        latest = self.latest()
        now = latest.values.get(self.metric) if latest is not None and latest is not self.base else None
        if base is not None:
            parts.append(fmt(self.metric, base))
        if now is not None:
            parts += ["->", fmt(self.metric, now)]
        best = self.best_point()
        if best is not None and self.best_by in best.values:
            name = "" if self.best_by == self.metric else f"{self.best_by} "
            parts.append(f"(best {name}{fmt(self.best_by, best.values[self.best_by])} @ {best.step})")
        return " ".join(parts)

    def table(self) -> list[tuple[str, str, str, str]]:
        """Rows ``(metric, before, after, best @ step)`` of the summary table, headline first."""
        names = [*self.settings.metrics, EVAL_LOSS]
        rows = []
        for name in names:
            before = self.base.values.get(name) if self.base is not None else None
            after = self.final.values.get(name) if self.final is not None else None
            if before is None and after is None:
                continue
            best = None
            for e in (*self.history, self.final):
                if e is None or name not in e.values:
                    continue
                if best is None or better(e.values[name], best.values[name], name):
                    best = e
            rows.append(
                (
                    name + (" (lower is better)" if not higher_is_better(name) else ""),
                    _format_value(name, before),
                    _format_value(name, after),
                    f"{_format_value(name, best.values[name])} @ {best.step}" if best is not None else "-",
                )
            )
        return rows

    def document(self, samples: Sequence[HeldOutSample]) -> dict[str, Any]:
        """``metrics.json``: settings, every evaluation's values, best and output, and per sample the prompt,
        reference, both answers and their scores."""
        per_sample = []
        for i, sample in enumerate(samples):
            entry: dict[str, Any] = {
                "index": sample.index,
                "prompt": sample.prompt,
                "reference": sample.reference,
            }
            for label, evaluation in (("before", self.base), ("after", self.final)):
                if evaluation is None or i >= len(evaluation.predictions):
                    continue
                entry[label] = {
                    "prediction": evaluation.predictions[i],
                    "scores": {m: values[i] for m, values in evaluation.per_sample.items()},
                }
            per_sample.append(entry)
        best = self.best_point()
        return {
            "metric": self.metric,
            "metrics": list(self.settings.metrics),
            "higherIsBetter": {m: higher_is_better(m) for m in (*self.settings.metrics, EVAL_LOSS)},
            "split": self.split,
            "samples": len(samples),
            "generation": self.settings.generation.to_dict(),
            "base": _values(self.base),
            "history": [_values(e) for e in self.history],
            "final": _values(self.final),
            "best": None
            if best is None
            else {"metric": self.best_by, "step": best.step, "values": dict(best.values)},
            "bestCheckpoint": self.best_checkpoint,
            "outputFrom": self.output_from,
            "worseThanBase": self.worse_than_base(),
            "perSample": per_sample,
        }


def _values(evaluation: Evaluation | None) -> dict[str, Any] | None:
    return None if evaluation is None else {"step": evaluation.step, "values": dict(evaluation.values)}


def _format_value(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    if metric == "bleu":
        return f"{value:.1f}"
    return f"{value:.3f}"
