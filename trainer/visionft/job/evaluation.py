"""The evaluation stage of a run: the base model before training, every ``evaluation.everySteps`` during
training, and the output at the end; the best checkpoint; the reports.

``EvaluationStage`` is built in two steps so that a bad setting fails before any model is loaded:
``EvaluationStage.prepare`` picks and checks the held-out samples (``visionft.evaluation.heldout``), and
``attach`` gives it the model's collator. Then, in ``visionft.job.run.train``'s order:

1. ``evaluate_base``: the base model (step 0; LoRA starts as a no-op), on every rank;
2. ``callback``: a ``TrainerCallback`` that evaluates at each multiple of ``everySteps``. A new best (by
   ``keepBest.metric``) is kept: its adapter weights in memory on every rank, and on rank 0 as the
   checkpoint ``<output>/best/`` (``adapter/`` as PEFT saves it, and ``best.json``: the step and its
   values), outside ``checkpoints/`` and so never rotated away by ``keepCheckpoints``; with an ``s3://``
   output it is published at once, for a restarted pod to find. ``status.evaluation.best`` is reported
   (the operator posts an Event);
3. ``finish``: with ``keepBest.useForOutput``, the best weights go back into the model; the output is
   evaluated (reusing the last evaluation when the weights are the same); ``metrics.json`` and
   ``gallery.html`` are written.

Each evaluation is logged to the trackers (``eval/<metric>``, ``eval/loss``), to the Trainer's
``log_history`` (``eval_<metric>``, ``eval_loss``: the loss plot draws it, and a resumed run reads its
earlier evaluations back from the checkpoint), to ``status.evaluation``, and as one line on the console.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from visionft_api.evaluation import EVAL_LOSS, EvaluationSettings

from visionft.evaluation import gallery
from visionft.evaluation.evaluator import Evaluation, EvaluationRecord, Evaluator
from visionft.evaluation.heldout import HeldOutSample, held_out_split, select

logger = logging.getLogger(__name__)

#: Where the best evaluation's adapter and its record live in the output folder.
BEST_FOLDER = "best"
BEST_RECORD = "best.json"


def history_entry(evaluation: Evaluation) -> dict[str, Any]:
    """An evaluation as a ``log_history`` entry: ``{"step": 60, "eval_cer": 0.1, "eval_loss": 0.3}``."""
    entry: dict[str, Any] = {"step": evaluation.step}
    for name, value in evaluation.values.items():
        entry["eval_loss" if name == EVAL_LOSS else f"eval_{name}"] = value
    return entry


def tracked(evaluation: Evaluation) -> dict[str, float]:
    """An evaluation's values under the trackers' names (``eval/loss``, ``eval/<metric>``)."""
    return {("eval/loss" if k == EVAL_LOSS else f"eval/{k}"): v for k, v in evaluation.values.items()}


class EvaluationStage:
    """See the module docstring.

    Args:
        settings (EvaluationSettings): what to evaluate.
        samples (list[HeldOutSample]): the checked held-out samples.
        split (str): the held-out split's name.
        output_dir (Path): the run's local output folder.
        seed (int): the run's seed (sampling, when asked for).
        batch_size (int): samples per forward pass of the evaluation loss.
    """

    def __init__(
        self,
        settings: EvaluationSettings,
        samples: list[HeldOutSample],
        split: str,
        output_dir: Path,
        seed: int,
        batch_size: int,
    ):
        self.settings = settings
        self.samples = samples
        self.record = EvaluationRecord(settings, split)
        self.output_dir = Path(output_dir)
        self.seed = seed
        self.batch_size = batch_size
        self.evaluator: Evaluator | None = None
        self.collator: Any = None
        self.best_weights: dict[str, Any] | None = None
        self.last: Evaluation | None = None  # with answers, for reuse as the output's evaluation
        self.report: Callable[[dict[str, Any], str, Any], None] = lambda status, stage, state: None
        self.log_metrics: Callable[[dict[str, float], int], None] = lambda values, step: None
        self.echo: Callable[[str], None] = print
        self.publish_best: Callable[[Path], None] = lambda folder: None
        self.is_main = True

    # -- before the model ----------------------------------------------------------------------------------

    @classmethod
    def prepare(
        cls, config, splits, output_dir: Path, formatter: Any
    ) -> tuple[EvaluationStage | None, Any, Any]:
        """``(stage or None, train split, held-out split or None)`` for a config and a loaded
        ``DatasetDict``.

        Raises:
            EvaluationInputError: the evaluation can't run on this dataset (the message names the field).
        """
        from visionft.data.formats import split_validation

        settings = config.evaluation_settings()
        fraction, seed = config.dataset.validation_fraction, config.training.seed
        if settings is None:
            train, held_out = split_validation(splits, fraction, seed)
            return None, train, held_out
        train, held_out, name = held_out_split(splits, settings, fraction, seed)
        samples = select(held_out, name, settings, formatter)
        batch = config.training.per_device_batch_size
        return cls(settings, samples, name, output_dir, seed, batch), train, held_out

    def attach(
        self, collator, report=None, log_metrics=None, echo=None, publish_best=None, is_main: bool = True
    ) -> None:
        """Gives the stage the collator and where results go (status, trackers, console, and the output's
        storage for ``<output>/best``)."""
        self.collator = collator
        self.evaluator = Evaluator(self.settings, self.samples, collator, self.seed, self.batch_size)
        if report is not None:
            self.report = report
        if log_metrics is not None:
            self.log_metrics = log_metrics
        if echo is not None:
            self.echo = echo
        if publish_best is not None:
            self.publish_best = publish_best
        self.is_main = is_main

    # -- the three evaluations ----------------------------------------------------------------------------

    def _evaluate(self, model, step: int, track: bool = True) -> Evaluation:
        assert self.evaluator is not None, "attach() first"
        evaluation = self.evaluator.evaluate(model, step)
        if track:
            self.log_metrics(tracked(evaluation), step)
        return evaluation

    def evaluate_base(self, model) -> Evaluation:
        """Scores the model before training (step 0)."""
        self.record.base = self._evaluate(model, 0)
        self.echo(
            f"evaluation of the base model on {len(self.samples)} held-out samples: {self._line(self.record.base)}"
        )
        self.report(self.record.status(), "Evaluating", None)
        return self.record.base

    def evaluate_step(self, model, state) -> bool:
        """Scores the model at ``state.global_step`` during training; True when it is a new best."""
        evaluation = self._evaluate(model, state.global_step)
        self.last = evaluation
        new_best = self.record.add(evaluation)
        state.log_history.append(history_entry(evaluation))
        keep = self.settings.keep_best is not None
        if keep and new_best:
            self._keep_best(model, evaluation)
        mark = " (new best)" if keep and new_best else ""
        self.echo(f"step {state.global_step}: {self._line(evaluation)}{mark}")
        self.report(self.record.status(), "Training", state)
        return new_best

    def finish(self, model, step: int) -> Evaluation:
        """The output's evaluation (after ``useForOutput`` put the best weights back), recorded as final."""
        keep = self.settings.keep_best
        swapped = False
        if keep is not None and keep.use_for_output and self.record.best is not None:
            if self.record.best.step != step:
                self._load_best(model)
                swapped = True
            self.record.output_from = "best"
        last = self.last
        reusable = last is not None and (
            (not swapped and last.step == step) or (swapped and last.step == self.record.best.step)
        )
        if reusable:
            assert last is not None
            final = last
        else:
            # The best weights were tracked at their own step; the last step's are new to the trackers.
            final = self._evaluate(model, step, track=not swapped)
        self.record.final = final
        if self.record.output_from == "best" and self.record.best is not None:
            where = f"the best checkpoint (step {self.record.best.step})"
        else:
            where = f"the last step ({step})"
        self.echo(f"evaluation of the output, {where}: {self._line(final)}")
        self.report(self.record.status(), "Evaluating", None)
        return final

    # -- the best checkpoint ------------------------------------------------------------------------------

    def _keep_best(self, model, evaluation: Evaluation) -> None:
        from peft import get_peft_model_state_dict

        weights = get_peft_model_state_dict(model)
        self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}
        folder = self.output_dir / BEST_FOLDER
        self.record.best_checkpoint = str(folder / "adapter")
        if self.is_main:
            model.save_pretrained(str(folder / "adapter"))
            record = {"metric": self.record.best_by, "step": evaluation.step, "values": evaluation.values}
            (folder / BEST_RECORD).write_text(json.dumps(record) + "\n")
            self.publish_best(folder)

    def _load_best(self, model) -> None:
        from peft import set_peft_model_state_dict

        weights = self.best_weights
        if weights is None:
            from safetensors.torch import load_file

            weights = load_file(str(self.output_dir / BEST_FOLDER / "adapter" / "adapter_model.safetensors"))
        set_peft_model_state_dict(model, weights)

    def restore(self, log_history: list[dict[str, Any]]) -> None:
        """Reads a resumed run's earlier evaluations back (``log_history`` and ``<output>/best``)."""
        for entry in log_history:
            values = {
                (EVAL_LOSS if key == "eval_loss" else key.removeprefix("eval_")): value
                for key, value in entry.items()
                if key.startswith("eval_") and isinstance(value, int | float)
            }
            if values and "step" in entry and any(m in values for m in self.settings.metrics):
                self.record.add(Evaluation(int(entry["step"]), values))
        self.record.best = None
        best = self.output_dir / BEST_FOLDER / BEST_RECORD
        if self.settings.keep_best is not None and best.is_file():
            data = json.loads(best.read_text())
            self.record.best = Evaluation(int(data["step"]), dict(data["values"]))
            self.record.best_checkpoint = str(best.parent / "adapter")

    def callback(self) -> TrainerCallback:
        """The TrainerCallback that evaluates at each multiple of ``everySteps``."""
        return _EvaluationCallback(self)

    # -- reports -------------------------------------------------------------------------------------------

    def write_reports(self, title: str) -> dict[str, str]:
        """Writes ``metrics.json`` and ``gallery.html`` into the output folder; returns what was written."""
        document = self.record.document(self.samples)
        metrics_path = self.output_dir / "metrics.json"
        metrics_path.write_text(json.dumps(document, indent=2) + "\n")
        gallery_path = gallery.write(
            self.output_dir / "gallery.html",
            document,
            self._image_of,
            title=title,
            limit=self.settings.gallery_samples,
        )
        return {"metrics": str(metrics_path), "gallery": str(gallery_path)}

    def _image_of(self, position: int):
        from visionft.data.errors import BadSampleError
        from visionft.data.samples import to_conversation

        sample = self.samples[position]
        formatter = getattr(self.collator, "formatter", None)
        record = formatter(sample.record) if formatter is not None else sample.record
        try:
            conversation = to_conversation(record, sample.index)
            if not conversation.images:
                return None
            return self.collator.loader.load(conversation.images[0], index=sample.index, field="image 0")
        except BadSampleError:
            return None

    def summary_table(self) -> str:
        """The console table: metric, before, after, best @ step."""
        rows = [("metric", "before", "after", "best @ step"), *self.record.table()]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [
            "  ".join(
                cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
            )
            for row in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        head = f"evaluation on {len(self.samples)} held-out samples ({self.record.split})"
        if self.record.output_from == "best" and self.record.best is not None:
            head += f"; the output is the best checkpoint, step {self.record.best.step}"
        return "\n".join([head, *lines])

    def _line(self, evaluation: Evaluation) -> str:
        from visionft.evaluation.evaluator import _format_value

        return ", ".join(f"{name} {_format_value(name, value)}" for name, value in evaluation.values.items())


class _EvaluationCallback(TrainerCallback):
    def __init__(self, stage: EvaluationStage):
        self.stage = stage

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:  # resumed: the checkpoint's history holds the earlier evaluations
            self.stage.restore(state.log_history)

    def on_step_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        every = self.stage.settings.every_steps
        if not every or state.global_step % every:
            return
        # With fixed-shape rows a thread builds the next steps' rows (visionft.data.prefetch) through the
        # sample collator that the evaluation encodes with (its tokenizer, its bad-sample counts): it waits.
        paused = getattr(train_dataloader, "paused", None)
        with paused() if paused is not None else contextlib.nullcontext():
            self.stage.evaluate_step(model, state)
