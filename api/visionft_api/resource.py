"""The VisionFineTune resource: the recipe plus how to run it on a cluster, and the status it reports.

``VisionFineTuneSpec`` extends the trainer's ``TrainingRecipe`` with cluster concerns (GPUs, scheduling,
retries, suspension). ``VisionFineTuneStatus`` is written by the operator (phase, conditions, attempts,
restarts, times, outputs) and, for ``progress`` and ``evaluation`` only, by the trainer pod through
server-side apply with its own field manager.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.config import JsonDict

from visionft_api.base import K8S_NAME_PATTERN, to_camel
from visionft_api.recipe import SpecModel, TrainingRecipe, cel
from visionft_api.scheduling import NodeSelector, Toleration

GROUP = "visionft.io"
VERSION = "v1alpha1"
KIND = "VisionFineTune"
PLURAL = "visionfinetunes"
SINGULAR = "visionfinetune"
SHORT_NAMES = ["vft"]
API_VERSION = f"{GROUP}/{VERSION}"

# Label and annotation keys that the operator owns; everything else in metadata belongs to the user (Git).
LABEL_PREFIX = "visionft.io/"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# The field manager the trainer pod uses for server-side apply of status.progress and status.evaluation.
TRAINER_FIELD_MANAGER = "visionft-trainer"


# A quantity the pod needs more than none of (cpu, memory, a volume's size).
_POSITIVE_QUANTITY = r"^[0-9]+(\.[0-9]+)?"


def _positive(value: str) -> bool:
    number = re.match(_POSITIVE_QUANTITY, value)
    return number is not None and float(number.group()) > 0


# The quantities a pod can't run with none of (camelCase, as CEL and messages name them).
_QUANTITIES = ("cpu", "memory", "scratchSize")


class ResourceSettings(SpecModel):
    """Hardware and scheduling for the training pods."""

    gpus_per_node: int = Field(1, ge=0, le=16, description="gpusPerNode is nvidia.com/gpu per pod.")
    nodes: int = Field(1, ge=1, le=64, description="nodes is the number of pods (torchrun nodes).")
    cpu: str = Field(
        "4", pattern=r"^[0-9]+(\.[0-9]+)?m?$", max_length=16, description="cpu request, more than 0."
    )
    memory: str = Field(
        "32Gi",
        pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$",
        max_length=16,
        description="memory request and limit, more than 0.",
    )
    scratch_size: str = Field(
        "100Gi",
        pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$",
        max_length=16,
        description="scratchSize bounds the writable scratch volume for data, model and checkpoints; more "
        "than 0.",
    )
    node_selector: NodeSelector = Field(
        default_factory=dict,
        description="nodeSelector for the training pods: label keys to label values (at most 63 characters).",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="tolerations for the training pods."
    )
    priority_class_name: str | None = Field(
        None, max_length=253, pattern=K8S_NAME_PATTERN, description="priorityClassName for the training pods."
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.nodes * self.gpusPerNode <= 128",
                    "resources: nodes * gpusPerNode must be at most 128",
                ),
                cel(
                    "self.nodes == 1 || self.gpusPerNode >= 1",
                    "resources: multi-node training needs gpusPerNode >= 1",
                ),
                *(
                    cel(
                        f"quantity(self.{field}).isGreaterThan(quantity('0'))",
                        f"resources.{field} must be more than 0",
                        f".{field}",
                    )
                    for field in _QUANTITIES
                ),
            ]
        }
    )

    @field_validator("cpu", "memory", "scratch_size")
    @classmethod
    def _more_than_none(cls, value: str, info: ValidationInfo) -> str:
        if not _positive(value):
            raise ValueError(f"resources.{to_camel(str(info.field_name))} must be more than 0")
        return value

    @model_validator(mode="after")
    def _sizes(self) -> ResourceSettings:
        if self.nodes * self.gpus_per_node > 128:
            raise ValueError("resources: nodes * gpusPerNode must be at most 128")
        if self.nodes > 1 and self.gpus_per_node < 1:
            raise ValueError("resources: multi-node training needs gpusPerNode >= 1")
        return self


class RunPolicy(SpecModel):
    """Retries, deadlines and clean-up."""

    backoff_limit: int = Field(
        3,
        ge=0,
        le=100,
        description="backoffLimit is how many pod failures are retried (over several nodes, a failed pod "
        "restarts the whole group from the last checkpoint); disruptions (preemption, node loss) do not "
        "count.",
    )
    active_deadline_seconds: int | None = Field(
        None,
        ge=60,
        le=31_536_000,
        description="activeDeadlineSeconds bounds the whole run's duration, counted from status.startTime "
        "across all of its Jobs (a multi-node group restart gets only what is left, and none starts once "
        "nothing is); when it runs out the run fails with reason DeadlineExceeded.",
    )
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        le=31_536_000,
        description="ttlSecondsAfterFinished deletes the VisionFineTune (and its children) this long after "
        "it succeeded or failed.",
    )


class VisionFineTuneSpec(TrainingRecipe):
    """The desired fine-tune: the recipe and how to run it."""

    resources: ResourceSettings = Field(
        default_factory=ResourceSettings, description="resources are the GPUs and scheduling."
    )
    run_policy: RunPolicy = Field(
        default_factory=RunPolicy,
        description="runPolicy: retries and deadlines.",
        # Defaulted to {} by the apiserver, so that its own defaults (backoffLimit) are always filled in and
        # the immutability rule on runPolicy.backoffLimit always compares two values.
        json_schema_extra={"default": {}},
    )
    queue_name: str | None = Field(
        None,
        max_length=63,
        pattern=K8S_NAME_PATTERN,
        description="queueName is a Kueue LocalQueue; the Job then starts suspended until Kueue admits it.",
    )
    suspend: bool = Field(
        False, description="suspend stops the run (pods are deleted) and keeps its checkpoints to resume."
    )
    image: str | None = Field(
        None,
        max_length=512,
        pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._\-/:@]*$",
        description="image overrides the operator's default trainer image.",
    )


# --- status ---------------------------------------------------------------------------------------------

Phase = Literal[
    "Pending", "Queued", "Initializing", "Training", "Uploading", "Succeeded", "Failed", "Suspended"
]
PHASES: tuple[str, ...] = (
    "Pending",
    "Queued",
    "Initializing",
    "Training",
    "Uploading",
    "Succeeded",
    "Failed",
    "Suspended",
)
FINAL_PHASES = frozenset({"Succeeded", "Failed"})


class Condition(SpecModel):
    """A condition in the shape of metav1.Condition."""

    type: str = Field(max_length=316, description="type of the condition, e.g. Ready.")
    status: Literal["True", "False", "Unknown"] = Field(description="status of the condition.")
    observed_generation: int | None = Field(
        None, ge=0, description="observedGeneration is the spec generation the condition was set for."
    )
    last_transition_time: str = Field(description="lastTransitionTime is when status last changed.")
    reason: str = Field(max_length=1024, description="reason is a CamelCase machine-readable cause.")
    message: str = Field("", max_length=32768, description="message is for humans.")


class Progress(SpecModel):
    """Live training progress, pushed by the trainer pod (field manager visionft-trainer)."""

    step: int | None = Field(None, ge=0, description="step is the current global optimizer step.")
    total_steps: int | None = Field(None, ge=0, description="totalSteps is the planned number of steps.")
    percent: int | None = Field(None, ge=0, le=100, description="percent done.")
    summary: str | None = Field(None, max_length=64, description="summary such as 12/30 (40%).")
    epoch: float | None = Field(None, ge=0, description="epoch is the fractional epoch.")
    loss: float | None = Field(None, description="loss is the latest training loss.")
    reward_margin: float | None = Field(
        None,
        description="rewardMargin (method dpo) is the latest mean of the chosen minus the rejected answer's "
        "reward (beta times the policy's log-probability ratio to the reference).",
    )
    reward_accuracy: float | None = Field(
        None,
        ge=0,
        le=1,
        description="rewardAccuracy (method dpo) is the latest share of pairs whose chosen answer has the "
        "higher reward.",
    )
    learning_rate: float | None = Field(None, description="learningRate is the current LR.")
    tokens_per_second: float | None = Field(None, ge=0, description="tokensPerSecond across all ranks.")
    eta_seconds: int | None = Field(None, ge=0, description="etaSeconds until the last step.")
    eta: str | None = Field(None, max_length=32, description="eta, human-readable, e.g. 1m35s.")
    stage: str | None = Field(
        None, max_length=32, description="stage of the pod: Downloading, Loading, Training, Uploading, Done."
    )
    update_time: str | None = Field(None, description="updateTime is when the trainer last reported.")


class Outputs(SpecModel):
    """Where the results were published."""

    adapter_uri: str | None = Field(None, description="adapterUri is the published LoRA adapter.")
    merged_uri: str | None = Field(None, description="mergedUri is the published merged model.")
    checkpoint_uri: str | None = Field(None, description="checkpointUri is the newest complete checkpoint.")


class MetricPoint(SpecModel):
    """One evaluation's result in the status."""

    step: int = Field(ge=0, description="step is the optimizer step evaluated (0: the base model).")
    value: float | None = Field(None, description="value is the metric's value at that step.")
    metric: str | None = Field(
        None, max_length=64, description="metric names the metric of value when it is not the headline one."
    )
    values: dict[str, float] = Field(
        default_factory=dict,
        max_length=16,
        description="values holds every metric of that evaluation, evalLoss included.",
    )


class EvaluationStatus(SpecModel):
    """Held-out evaluation results, pushed by the trainer pod (field manager visionft-trainer)."""

    metric: str = Field(max_length=64, description="metric is the headline metric (evaluation.metrics[0]).")
    higher_is_better: bool = Field(True, description="higherIsBetter is the headline metric's direction.")
    samples: int | None = Field(None, ge=0, description="samples is how many held-out samples were scored.")
    base: MetricPoint | None = Field(None, description="base is the base model's evaluation (step 0).")
    latest: MetricPoint | None = Field(None, description="latest is the newest evaluation.")
    best: MetricPoint | None = Field(
        None,
        description="best is the best evaluation by keepBest's metric (the headline one without keepBest).",
    )
    final: MetricPoint | None = Field(
        None, description="final is the evaluation of the published output, set when training ends."
    )
    worse_than_base: bool | None = Field(
        None, description="worseThanBase says whether final's headline value is worse than base's."
    )
    summary: str | None = Field(
        None, max_length=128, description="summary such as cer 0.912 -> 0.052 (best 0.047 @ 60)."
    )


class VisionFineTuneStatus(SpecModel):
    """Observed state, owned by the operator except progress and evaluation."""

    observed_generation: int | None = Field(None, description="observedGeneration of the spec.")
    phase: Phase | None = Field(None, description="phase is the coarse state of the run.")
    conditions: list[Condition] = Field(
        default_factory=list, description="conditions: Ready, Reconciling, Stalled and domain conditions."
    )
    progress: Progress | None = Field(None, description="progress is live training progress.")
    evaluation: EvaluationStatus | None = Field(
        None,
        description="evaluation holds the held-out metrics of the base model, the latest, best and final.",
    )
    announced_best_step: int | None = Field(
        None,
        ge=0,
        description="announcedBestStep is the step of the best evaluation the operator last posted a "
        "NewBestMetric Event for.",
    )
    outputs: Outputs | None = Field(None, description="outputs are the published results.")
    attempts: int | None = Field(
        None,
        ge=0,
        description="attempts is how many trainer pods the run has started in total, over all of its Jobs: "
        "each retried pod, and every pod of each multi-node group attempt (a pod that a suspension, or a "
        "disruption on one node, stopped counts once with its replacement).",
    )
    restarts: int | None = Field(
        None,
        ge=0,
        description="restarts is how many times a multi-node run's whole group was restarted after a pod "
        "failed.",
    )
    job_name: str | None = Field(None, description="jobName is the owned batch/v1 Job.")
    start_time: str | None = Field(None, description="startTime is when training first started.")
    completion_time: str | None = Field(None, description="completionTime is when the run finished.")
    message: str | None = Field(None, max_length=4096, description="message explains the phase.")


IMMUTABLE_AFTER_START = (
    "method",
    "model",
    "lora",
    "dataset",
    "training",
    "dpo",
    "output",
    "storage",
    "evaluation",
    "tracking",
    "resources",
    "image",
    "runPolicy.backoffLimit",
    "queueName",
)
"""Spec fields that may not change once training has started (status.startTime is set): the recipe, and
what is baked into the running Job's immutable pod template or spec (image, resources, backoffLimit), or
what Kueue has acted on (queueName: the queue that admitted the Job).
``suspend``, ``runPolicy.activeDeadlineSeconds`` and ``runPolicy.ttlSecondsAfterFinished`` stay mutable; the
operator applies them to the live Job."""


def immutability_rules() -> list[JsonDict]:
    """Root-level CEL transition rules: the recipe can't change under a running or finished fine-tune.

    A dotted field (runPolicy.backoffLimit) is compared only when both old and new objects have its
    parent, since CEL's ``has()`` errors on a missing parent."""
    started = "!has(oldSelf.status) || !has(oldSelf.status.startTime)"
    rules = []
    for field in IMMUTABLE_AFTER_START:
        parent = field.rpartition(".")[0]
        new, old = f"self.spec.{field}", f"oldSelf.spec.{field}"
        same = f"has({new}) == has({old}) && (!has({new}) || {new} == {old})"
        if parent:
            # Both have the parent: compare the leaf; otherwise only a change from absent to absent passes.
            same = (
                f"(has(self.spec.{parent}) && has(oldSelf.spec.{parent})) ? ({same}) : "
                f"(!has(self.spec.{parent}) || !has({new})) && (!has(oldSelf.spec.{parent}) || !has({old}))"
            )
        rules.append(
            cel(
                f"{started} || ({same})",
                f"spec.{field} is immutable once training has started: create a new VisionFineTune "
                f"(or delete and re-create this one) to change it",
                f".spec.{field}",
            )
        )
    return rules
