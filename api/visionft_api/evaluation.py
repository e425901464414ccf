"""Evaluation and tracking in the recipe: which held-out samples are scored, by which metrics, how often,
which checkpoint is kept, and where the run's numbers and reports are logged.

The metric table (``METRICS``) is the one list of metric names: the schema's enum, the trainer's scorers
(``visionft.evaluation.metrics``) and the operator's comparison of a run with its base model
(``worse_than``) all read it. Torch-free, like the rest of the schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from visionft_api.base import K8S_NAME_PATTERN, SpecModel, cel


@dataclass(frozen=True)
class Metric:
    """One metric of the table.

    Attributes:
        name (str): its name in ``evaluation.metrics``.
        higher_is_better (bool): the direction the best checkpoint and the base comparison use.
        reference (str): what each held-out sample's reference answer must be: "text" (any non-empty
            answer), "json" (a JSON object) or "none" (the metric reads the prediction only).
        summary (str): one line for the CRD description and the docs.
    """

    name: str
    higher_is_better: bool
    reference: Literal["text", "json", "none"]
    summary: str


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("exactMatch", True, "text", "share of predictions equal to the reference"),
        Metric(
            "normalizedExactMatch",
            True,
            "text",
            "exact match after lower-casing and dropping punctuation, articles and extra spaces",
        ),
        Metric("cer", False, "text", "character error rate (edits per reference character; OCR)"),
        Metric("wer", False, "text", "word error rate (edits per reference word)"),
        Metric("bleu", True, "text", "corpus BLEU, 0-100 (sacrebleu; captioning, translation)"),
        Metric("rougeL", True, "text", "mean ROUGE-L F-measure, 0-1 (captioning, summaries)"),
        Metric("jsonValidity", True, "none", "share of predictions that parse as one JSON value"),
        Metric(
            "jsonFieldMatch",
            True,
            "json",
            "share of the reference object's fields (dotted paths to leaves) the prediction matches",
        ),
    )
}
#: The teacher-forced loss on the evaluated samples: computed at every evaluation, selectable by keepBest.
EVAL_LOSS = "evalLoss"
MetricName = Literal[
    "exactMatch", "normalizedExactMatch", "cer", "wer", "bleu", "rougeL", "jsonValidity", "jsonFieldMatch"
]
BestMetricName = Literal[
    "exactMatch",
    "normalizedExactMatch",
    "cer",
    "wer",
    "bleu",
    "rougeL",
    "jsonValidity",
    "jsonFieldMatch",
    "evalLoss",
]


def higher_is_better(metric: str) -> bool:
    """The direction of ``metric`` (a name of ``METRICS``, or ``evalLoss``)."""
    return False if metric == EVAL_LOSS else METRICS[metric].higher_is_better


def better(a: float, b: float, metric: str) -> bool:
    """Whether value ``a`` is strictly better than ``b`` for ``metric``."""
    return a > b if higher_is_better(metric) else a < b


def worse_than(final: float, base: float, metric: str) -> bool:
    """Whether the fine-tuned model's ``final`` value is strictly worse than the base model's ``base``."""
    return better(base, final, metric)


_METRIC_LIST = ", ".join(METRICS)
_KEEP_BEST_IN_METRICS = (
    "evaluation.keepBest.metric must be evalLoss or one of evaluation.metrics: add it to metrics"
)
_KEEP_BEST_NEEDS_INTERVAL = (
    "evaluation.keepBest chooses among the evaluations during training: set evaluation.everySteps"
)


def _default_metrics() -> list[MetricName]:
    return ["exactMatch"]


class GenerationSettings(SpecModel):
    """How answers are generated for scoring."""

    max_new_tokens: int = Field(
        64, ge=1, le=8192, description="maxNewTokens bounds each generated answer, in tokens."
    )
    temperature: float = Field(
        0.0,
        ge=0.0,
        le=5.0,
        description="temperature is 0 for greedy decoding (the default, reproducible); above 0 samples, "
        "seeded by training.seed.",
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="topP is the nucleus share when sampling.")


class KeepBest(SpecModel):
    """Keep the checkpoint with the best metric value, and optionally publish it instead of the last step."""

    metric: BestMetricName | None = Field(
        None,
        description="metric decides which evaluation is best: evalLoss or one of evaluation.metrics; "
        "default: the headline metric (the first of evaluation.metrics).",
    )
    use_for_output: bool = Field(
        False,
        description="useForOutput publishes the best checkpoint's adapter (and its evaluation) as the run's "
        "output instead of the last step's.",
    )


class EvaluationSettings(SpecModel):
    """Scoring held-out samples before, during and after training."""

    split: str = Field(
        "auto",
        max_length=64,
        pattern=r"^[A-Za-z0-9_.\-]+$",
        description="split is the held-out dataset split to score: auto takes validation, else test, "
        "else the dataset.validationFraction share of train.",
    )
    samples: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="samples is how many held-out samples are scored (the first ones of the split); "
        "default: all of them. More than the split holds is an error.",
    )
    metrics: list[MetricName] = Field(
        default_factory=_default_metrics,
        min_length=1,
        max_length=8,
        description=f"metrics to compute, the first being the headline (status, printer column, best "
        f"checkpoint); one of {_METRIC_LIST}. evalLoss is always computed.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    every_steps: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="everySteps evaluates during training every this many optimizer steps; the base model "
        "(before training) and the output (at the end) are always evaluated.",
    )
    generation: GenerationSettings = Field(
        default_factory=GenerationSettings, description="generation configures answer generation."
    )
    keep_best: KeepBest | None = Field(
        None,
        description="keepBest keeps the best evaluation's adapter in the output's best/ folder, which "
        "keepCheckpoints never rotates away.",
    )
    fail_if_worse_than_base: bool = Field(
        False,
        description="failIfWorseThanBase fails the run (condition Degraded, reason WorseThanBase) when the "
        "output's headline metric is worse than the base model's; the outputs are still published.",
    )
    gallery_samples: int = Field(
        50,
        ge=0,
        le=10_000,
        description="gallerySamples is how many samples gallery.html shows, worst first; metrics.json holds "
        "every evaluated sample.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.keepBest) || !has(self.keepBest.metric) || self.keepBest.metric == 'evalLoss' "
                    "|| self.keepBest.metric in self.metrics",
                    _KEEP_BEST_IN_METRICS,
                    ".keepBest.metric",
                ),
                cel("!has(self.keepBest) || has(self.everySteps)", _KEEP_BEST_NEEDS_INTERVAL, ".keepBest"),
            ]
        }
    )

    @field_validator("metrics")
    @classmethod
    def _each_once(cls, metrics: list[MetricName]) -> list[MetricName]:
        if len(set(metrics)) != len(metrics):
            raise ValueError("evaluation.metrics lists a metric twice: name each once")
        return metrics

    @model_validator(mode="after")
    def _consistent(self) -> EvaluationSettings:
        if self.keep_best is not None:
            metric = self.keep_best.metric
            if metric is not None and metric != EVAL_LOSS and metric not in self.metrics:
                raise ValueError(_KEEP_BEST_IN_METRICS)
            if self.every_steps is None:
                raise ValueError(_KEEP_BEST_NEEDS_INTERVAL)
        return self

    @property
    def headline(self) -> str:
        """The headline metric: the first of ``metrics``."""
        return self.metrics[0]

    @property
    def best_metric(self) -> str | None:
        """The metric keepBest selects by, or None without keepBest."""
        if self.keep_best is None:
            return None
        return self.keep_best.metric or self.headline


class MlflowTracking(SpecModel):
    """An MLflow tracking server that receives the run's parameters, metrics and reports."""

    uri: str = Field(
        max_length=1024,
        pattern=r"^https?://[^\s/]+(:[0-9]+)?(/.*)?$",
        description="uri is the tracking server's URL, e.g. http://mlflow.mlflow.svc:5000.",
    )
    experiment: str = Field(
        "visionft",
        min_length=1,
        max_length=256,
        description="experiment is the MLflow experiment's name; it is created when missing.",
    )
    run_name: str | None = Field(
        None, max_length=256, description="runName names the MLflow run; default: the resource's name."
    )
    token_secret: str | None = Field(
        None,
        max_length=253,
        pattern=K8S_NAME_PATTERN,
        description="tokenSecret names a Secret in the same namespace whose tokenKey holds a bearer token "
        "for the server; it reaches the pod as MLFLOW_TRACKING_TOKEN, never through the config.",
    )
    token_key: str = Field(
        "MLFLOW_TRACKING_TOKEN", max_length=253, description="tokenKey is the Secret key of the token."
    )
    log_adapter: bool = Field(
        True, description="logAdapter uploads the saved LoRA adapter as an artifact (saveMethod lora)."
    )


class TrackingSettings(SpecModel):
    """Experiment tracking."""

    mlflow: MlflowTracking | None = Field(None, description="mlflow logs the run to an MLflow server.")
    tensorboard: bool | None = Field(
        None,
        description="tensorboard writes TensorBoard event files to the output's tensorboard/ folder; "
        "default: on when no MLflow server is set.",
    )

    def tensorboard_on(self) -> bool:
        """Whether TensorBoard event files are written."""
        return self.tensorboard if self.tensorboard is not None else self.mlflow is None
