"""The training recipe: what to fine-tune, on which data, how, and where results go.

These models are the one source of truth for the VisionFineTune schema. The operator embeds them in the
resource's ``spec`` (see ``visionft_api.resource``), the CRD in crds/ is generated from them
(``visionft_api.crd``), and the trainer CLI reads the same recipe from its config file. Each field carries one
plain sentence of documentation, which the generator copies into the CRD.

Cross-field rules are declared twice on purpose, in one place: as CEL (``x-kubernetes-validations``, checked
by the apiserver at admission) and as pydantic validators (checked by the trainer and the operator, which also
see configs that never passed through an apiserver). ``tests/api/test_rules.py`` runs one table of malformed
specs through both.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.config import JsonDict

from visionft_api.base import K8S_NAME_PATTERN, SpecModel, cel, field_errors
from visionft_api.evaluation import METRICS, EvaluationSettings, TrackingSettings

# A bucket name as S3 allows it, then an optional key prefix.
S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$"
# s3://bucket/prefix, an absolute local path (a mounted volume), a hub id such as org/name, or builtin://NAME.
MODEL_URI_PATTERN = (
    r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|/.*|[A-Za-z0-9][A-Za-z0-9._\-]*/[A-Za-z0-9._\-]+"
    r"|builtin://[a-z0-9][a-z0-9\-]*)$"
)
# Outputs: s3:// or an absolute local path. Relative paths are accepted by the trainer CLI only (resolved
# against the config file), never in a cluster resource.
DATA_URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|/.*)$"
# Datasets: as outputs, or builtin://NAME.
DATASET_URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|/.*|builtin://[a-z0-9][a-z0-9\-]*)$"

# A key of a Secret or ConfigMap, as the core API checks it.
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"

# Generated sources: the trainer makes these in its work folder instead of reading them, so that a run
# needs no bucket, download or GPU (the quickstart, and a smoke test of an install). The patterns above
# accept any builtin://NAME; the rules below name the closed set, so that a typo gets a message listing it.
BUILTIN_SCHEME = "builtin://"
#: A tiny random-weight Qwen2-VL-family model with a working processor (visionft.testing.tiny).
BUILTIN_MODELS = ("builtin://tiny-qwen2-vl",)
#: Each generated dataset and the size of its held-out split (``test``), which evaluation counts are
#: checked against at admission (visionft.job.builtin generates them; a test keeps the sizes honest):
#: the shapes task (name the colour of one shape; 400 training and 100 held-out 56x56 images), its
#: preference form (the same images with the right colour as the chosen answer and a wrong one as the
#: rejected answer, for method dpo) and the shape-captions task (colour and shape in two words, e.g.
#: "red triangle"; 600 training and 100 held-out images; scored by the character error rate).
BUILTIN_HELD_OUT = {
    "builtin://shapes": 100,
    "builtin://shapes-preference": 100,
    "builtin://shape-captions": 100,
}
BUILTIN_DATASETS = tuple(BUILTIN_HELD_OUT)


def is_builtin(uri: str) -> bool:
    """True for a generated source (builtin://NAME)."""
    return uri.startswith(BUILTIN_SCHEME)


def _builtin_rule(field: str, allowed: tuple[str, ...]) -> tuple[str, str]:
    """The CEL rule and the message (shared with the pydantic check) that close a builtin:// set; the
    apiserver and pydantic both put the field's path in front of the message."""
    names = ", ".join(f"'{name}'" for name in allowed)
    rule = f"!self.uri.startsWith('{BUILTIN_SCHEME}') || self.uri in [{names}]"
    message = f"a {BUILTIN_SCHEME} {field.split('.')[0]} must be one of {', '.join(allowed)}"
    return rule, message


_MODEL_BUILTIN_RULE, _MODEL_BUILTIN_MESSAGE = _builtin_rule("model.uri", BUILTIN_MODELS)
_DATASET_BUILTIN_RULE, _DATASET_BUILTIN_MESSAGE = _builtin_rule("dataset.uri", BUILTIN_DATASETS)
_SAME_ANSWER_COLUMNS_MESSAGE = (
    "dataset.columns.chosen and dataset.columns.rejected name the same column: the answers to prefer and to "
    "reject come from two columns"
)
_DPO_COLUMN_MESSAGE = (
    "dataset.columns.{role} is required with method: dpo: name the column of the {what} answers"
)
_SFT_ANSWER_COLUMNS_MESSAGE = (
    "dataset.columns.chosen and dataset.columns.rejected are read only with method: dpo: set method to dpo "
    "or leave them out"
)
_SFT_DPO_MESSAGE = "dpo is read only with method: dpo: set method to dpo or leave dpo out"
_DPO_EVALUATION_MESSAGE = (
    "evaluation is read only with method: sft (a dpo run scores preference accuracy on "
    "dataset.evalSamples held-out pairs): leave evaluation out and set dataset.evalSamples"
)
_DPO_PACKING_MESSAGE = (
    "training.packing is not supported with method: dpo (each pair's chosen and rejected answers are "
    "scored as two padded rows): set training.packing to false"
)
_DPO_ROLES = (("chosen", "preferred"), ("rejected", "dispreferred"))


def _method_rules() -> list[JsonDict]:
    """The recipe-level CEL rules of ``method`` (the pydantic check is ``_method_problems``)."""
    dpo = "(has(self.method) && self.method == 'dpo')"
    columns = "has(self.dataset) && has(self.dataset.columns)"
    rules = [
        cel(
            f"!{dpo} || ({columns} && has(self.dataset.columns.{role}))",
            _DPO_COLUMN_MESSAGE.format(role=role, what=what),
            f".dataset.columns.{role}",
        )
        for role, what in _DPO_ROLES
    ]
    rules += [
        cel(
            f"{dpo} || !({columns}) || "
            "(!has(self.dataset.columns.chosen) && !has(self.dataset.columns.rejected))",
            _SFT_ANSWER_COLUMNS_MESSAGE,
            ".dataset.columns",
        ),
        cel(f"{dpo} || !has(self.dpo)", _SFT_DPO_MESSAGE, ".dpo"),
        cel(f"!{dpo} || !has(self.evaluation)", _DPO_EVALUATION_MESSAGE, ".evaluation"),
        cel(
            f"!{dpo} || !has(self.training) || !has(self.training.packing) || !self.training.packing",
            _DPO_PACKING_MESSAGE,
            ".training.packing",
        ),
    ]
    return rules


def _method_problems(recipe: TrainingRecipe) -> list[tuple[tuple[str, ...], str]]:
    """What ``_method_rules`` refuses, as (location, message) pairs."""
    columns = recipe.dataset.columns
    problems: list[tuple[tuple[str, ...], str]]
    if recipe.method == "sft":
        problems = []
        if columns.chosen is not None or columns.rejected is not None:
            problems.append((("dataset", "columns"), _SFT_ANSWER_COLUMNS_MESSAGE))
        if recipe.dpo is not None:
            problems.append((("dpo",), _SFT_DPO_MESSAGE))
        return problems
    problems = [
        (("dataset", "columns", role), _DPO_COLUMN_MESSAGE.format(role=role, what=what))
        for role, what in _DPO_ROLES
        if getattr(columns, role) is None
    ]
    if recipe.training.packing:
        problems.append((("training", "packing"), _DPO_PACKING_MESSAGE))
    if recipe.evaluation is not None:
        problems.append((("evaluation",), _DPO_EVALUATION_MESSAGE))
    return problems


_EVAL_SAMPLES_SHORTHAND_MESSAGE = (
    "dataset.evalSamples is a shorthand for evaluation.samples: set evaluation.samples and leave "
    "dataset.evalSamples at 0"
)
_BUILTIN_SPLITS = ("auto", "test")
_BUILTIN_SPLIT_MESSAGE = (
    f"evaluation.split: a {BUILTIN_SCHEME} dataset has one held-out split, test: set split to auto or test"
)
_BUILTIN_JSON_MESSAGE = (
    f"evaluation.metrics: jsonFieldMatch needs references that are JSON objects, and the answers of the "
    f"{BUILTIN_SCHEME} datasets are plain text: choose another metric"
)


def _builtin_count_message(field: str, uri: str, held_out: int) -> str:
    return f"{field} is more than the {held_out} held-out samples of {uri}: set it to at most {held_out}"


def _evaluation_rules() -> list[JsonDict]:
    """The recipe-level CEL rules that tie evaluation to the dataset (the pydantic check is
    ``TrainingRecipe._evaluation_fits_the_dataset``)."""
    builtin = f"self.dataset.uri.startsWith('{BUILTIN_SCHEME}')"
    splits = ", ".join(f"'{s}'" for s in _BUILTIN_SPLITS)
    json_metrics = [m.name for m in METRICS.values() if m.reference == "json"]
    rules = [
        cel(
            "!has(self.evaluation) || !has(self.dataset.evalSamples) || self.dataset.evalSamples == 0",
            _EVAL_SAMPLES_SHORTHAND_MESSAGE,
            ".dataset.evalSamples",
        ),
        cel(
            f"!has(self.evaluation) || !{builtin} || !has(self.evaluation.split) "
            f"|| self.evaluation.split in [{splits}]",
            _BUILTIN_SPLIT_MESSAGE,
            ".evaluation.split",
        ),
        cel(
            f"!has(self.evaluation) || !{builtin} || !has(self.evaluation.metrics) || "
            + " && ".join(f"!('{m}' in self.evaluation.metrics)" for m in json_metrics),
            _BUILTIN_JSON_MESSAGE,
            ".evaluation.metrics",
        ),
    ]
    for uri, held_out in BUILTIN_HELD_OUT.items():
        rules.append(
            cel(
                f"!has(self.evaluation) || !has(self.evaluation.samples) || self.dataset.uri != '{uri}' "
                f"|| self.evaluation.samples <= {held_out}",
                _builtin_count_message("evaluation.samples", uri, held_out),
                ".evaluation.samples",
            )
        )
    return rules


_OUTPUT_REQUIRED_MESSAGE = (
    f"output is required unless model.uri is a generated model ({BUILTIN_SCHEME}): set output.uri to "
    "where the results go"
)


class ModelSource(SpecModel):
    """Which base model to load and how."""

    uri: str = Field(
        description="uri is the base model: s3://bucket/prefix of a Hugging Face model folder, an absolute "
        "path on a mounted volume, a hub id (org/name) when pods may reach a hub, or "
        f"{' / '.join(BUILTIN_MODELS)}, a tiny random-weight model that the trainer generates (no download; "
        "for the quickstart and smoke tests).",
        pattern=MODEL_URI_PATTERN,
        max_length=1024,
    )
    load_in_4bit: bool = Field(True, description="loadIn4bit quantizes the frozen base to NF4 (QLoRA).")
    load_in_8bit: bool = Field(False, description="loadIn8bit quantizes the frozen base to int8 instead.")
    max_seq_length: int = Field(
        2048,
        ge=64,
        le=131072,
        description="maxSeqLength is the longest sample in tokens, image tokens included; longer samples "
        "are rejected or skipped, never truncated through image tokens.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype is the compute dtype; auto picks bf16 where supported."
    )
    trust_remote_code: bool = Field(
        False, description="trustRemoteCode allows model code shipped with the checkpoint to run."
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!(self.loadIn4bit && self.loadIn8bit)",
                    "model.loadIn4bit and model.loadIn8bit are exclusive: set at most one to true",
                ),
                cel(_MODEL_BUILTIN_RULE, _MODEL_BUILTIN_MESSAGE, ".uri"),
            ]
        }
    )

    @field_validator("uri")
    @classmethod
    def _known_builtin(cls, uri: str) -> str:
        if is_builtin(uri) and uri not in BUILTIN_MODELS:
            raise ValueError(_MODEL_BUILTIN_MESSAGE)
        return uri

    @model_validator(mode="after")
    def _one_quantization(self) -> ModelSource:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("model.loadIn4bit and model.loadIn8bit are exclusive: set at most one to true")
        return self


class LoraSettings(SpecModel):
    """Which layers get LoRA adapters, and their size."""

    r: int = Field(16, ge=1, le=512, description="r is the LoRA rank.")
    alpha: int = Field(16, ge=1, le=4096, description="alpha scales the adapter output by alpha/r.")
    dropout: float = Field(0.0, ge=0.0, le=0.9, description="dropout is applied to the adapter input.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="bias says which biases train.")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        max_length=64,
        description="targetModules lists module-name suffixes to adapt (at least one), or [all-linear] for "
        "every linear layer that the four finetune switches select.",
    )
    target_modules_regex: str | None = Field(
        None,
        max_length=512,
        description="targetModulesRegex selects modules by a full-match regular expression over their "
        "qualified names, instead of targetModules.",
    )
    finetune_vision_layers: bool = Field(True, description="finetuneVisionLayers adapts the vision tower.")
    finetune_language_layers: bool = Field(
        True, description="finetuneLanguageLayers adapts the language model."
    )
    finetune_attention_modules: bool = Field(
        True, description="finetuneAttentionModules adapts attention projections."
    )
    finetune_mlp_modules: bool = Field(True, description="finetuneMlpModules adapts MLP projections.")
    use_rslora: bool = Field(False, description="useRslora scales by alpha/sqrt(r) (rank-stabilized LoRA).")
    modules_to_save: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=list,
        max_length=16,
        description="modulesToSave lists modules trained in full and saved with the adapter.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.finetuneVisionLayers || self.finetuneLanguageLayers",
                    "lora: at least one of finetuneVisionLayers and finetuneLanguageLayers must be true",
                ),
                cel(
                    "self.finetuneAttentionModules || self.finetuneMlpModules",
                    "lora: at least one of finetuneAttentionModules and finetuneMlpModules must be true",
                ),
                cel(
                    "!has(self.targetModulesRegex) || !has(self.targetModules) || self.targetModules == ['all-linear']",
                    "lora.targetModulesRegex and lora.targetModules are exclusive: leave targetModules at "
                    "its default [all-linear] when using a regex",
                ),
            ]
        }
    )

    @model_validator(mode="after")
    def _switches(self) -> LoraSettings:
        if not (self.finetune_vision_layers or self.finetune_language_layers):
            raise ValueError(
                "lora: at least one of finetuneVisionLayers and finetuneLanguageLayers must be true"
            )
        if not (self.finetune_attention_modules or self.finetune_mlp_modules):
            raise ValueError(
                "lora: at least one of finetuneAttentionModules and finetuneMlpModules must be true"
            )
        if self.target_modules_regex is not None:
            if self.target_modules != ["all-linear"]:
                raise ValueError(
                    "lora.targetModulesRegex and lora.targetModules are exclusive: leave targetModules at "
                    "its default [all-linear] when using a regex"
                )
            try:
                re.compile(self.target_modules_regex)
            except re.error as err:
                raise ValueError(f"lora.targetModulesRegex is not a valid regular expression: {err}") from err
        return self


class DatasetColumns(SpecModel):
    """Column names in the dataset. Either ``messages``, or ``image`` + ``response`` (+ optional
    ``instruction``). With method dpo, ``chosen`` and ``rejected`` are the two answers to each prompt
    (``instruction``, or the ``messages`` conversation) and ``response`` is not read."""

    messages: str | None = Field(
        None, max_length=128, description="messages is a column of chat turns in the messages format."
    )
    image: str = Field("image", max_length=128, description="image is the column of images.")
    images: str | None = Field(
        None, max_length=128, description="images is a column of image lists used with messages."
    )
    instruction: str | None = Field(
        "instruction", max_length=128, description="instruction is the column of per-sample prompts."
    )
    response: str = Field("response", max_length=128, description="response is the column of answers.")
    chosen: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="chosen is the column of preferred answers (method dpo only): a string, or a list of "
        "assistant turns.",
    )
    rejected: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="rejected is the column of dispreferred answers (method dpo only), in the form of "
        "chosen.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.chosen) || !has(self.rejected) || self.chosen != self.rejected",
                    _SAME_ANSWER_COLUMNS_MESSAGE,
                )
            ]
        }
    )

    @model_validator(mode="after")
    def _two_answer_columns(self) -> DatasetColumns:
        if self.chosen is not None and self.chosen == self.rejected:
            raise ValueError(_SAME_ANSWER_COLUMNS_MESSAGE)
        return self


class DatasetSource(SpecModel):
    """Where the training data lives and how to read it."""

    uri: str = Field(
        description="uri is the dataset: s3://bucket/prefix or an absolute path, holding JSONL, JSON, "
        "parquet, a datasets save_to_disk folder, or an imagefolder with metadata.jsonl; or "
        f"{' / '.join(BUILTIN_DATASETS)}, a generated imagefolder (name the colour of a shape; caption a "
        "shape with its colour and shape), each with 100 held-out images.",
        pattern=DATASET_URI_PATTERN,
        max_length=1024,
    )
    format: Literal["auto", "jsonl", "json", "parquet", "arrow", "imagefolder"] = Field(
        "auto", description="format is the file format; auto detects it from the files."
    )
    columns: DatasetColumns = Field(
        default_factory=DatasetColumns, description="columns maps dataset columns to roles."
    )
    instruction: str | None = Field(
        None,
        max_length=4096,
        description="instruction is the prompt used for every sample when the dataset has no "
        "instruction column.",
    )
    max_image_pixels: int = Field(
        1003520,
        ge=3136,
        le=67108864,
        description="maxImagePixels caps each image's pixels; larger images are resized keeping aspect.",
    )
    validation_fraction: float = Field(
        0.0, ge=0.0, le=0.5, description="validationFraction holds out this share of samples for eval."
    )
    on_bad_sample: Literal["error", "skip"] = Field(
        "error",
        description="onBadSample says what a broken image or over-long sample does: fail the run, or be "
        "skipped and counted.",
    )
    eval_samples: int = Field(
        0,
        ge=0,
        le=100_000,
        description="evalSamples is a shorthand for evaluation with samples set to this and the "
        "normalizedExactMatch metric (scored before and after training); with method dpo it is how many "
        "held-out pairs are scored by preference accuracy (the share of pairs whose chosen answer the model "
        "finds more likely than the rejected one) before and after training; 0 scores none. Exclusive with "
        "evaluation.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(_DATASET_BUILTIN_RULE, _DATASET_BUILTIN_MESSAGE, ".uri"),
                *(
                    cel(
                        f"self.uri != '{uri}' || self.evalSamples <= {held_out}",
                        _builtin_count_message("dataset.evalSamples", uri, held_out),
                        ".evalSamples",
                    )
                    for uri, held_out in BUILTIN_HELD_OUT.items()
                ),
            ]
        }
    )

    @field_validator("uri")
    @classmethod
    def _known_builtin(cls, uri: str) -> str:
        if is_builtin(uri) and uri not in BUILTIN_DATASETS:
            raise ValueError(_DATASET_BUILTIN_MESSAGE)
        return uri

    @field_validator("eval_samples")
    @classmethod
    def _eval_samples_fit(cls, eval_samples: int, info: ValidationInfo) -> int:
        uri = info.data.get("uri")  # absent when the uri itself failed validation
        held_out = BUILTIN_HELD_OUT.get(uri) if isinstance(uri, str) else None
        if held_out is not None and eval_samples > held_out:
            raise ValueError(_builtin_count_message("dataset.evalSamples", str(uri), held_out))
        return eval_samples


class TrainingSettings(SpecModel):
    """Optimization settings."""

    max_steps: int | None = Field(
        None, ge=1, le=10_000_000, description="maxSteps is the number of optimizer steps."
    )
    epochs: float | None = Field(
        None, gt=0, le=1000, description="epochs is the number of passes; exclusive with maxSteps."
    )
    per_device_batch_size: int = Field(
        1,
        ge=1,
        le=1024,
        description="perDeviceBatchSize is the samples per GPU per step (with packing: on average; an "
        "epoch keeps its number of steps).",
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=1024, description="gradientAccumulationSteps per optimizer step."
    )
    learning_rate: float = Field(2.0e-4, gt=0, le=1.0, description="learningRate is the peak LR.")
    warmup_steps: int = Field(0, ge=0, le=1_000_000, description="warmupSteps ramp the LR up linearly.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="lrScheduler is the LR schedule after warm-up."
    )
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="weightDecay for AdamW.")
    max_grad_norm: float = Field(1.0, ge=0.0, le=1000.0, description="maxGradNorm clips gradients.")
    optimizer: Literal["adamw_8bit", "adamw_torch", "paged_adamw_8bit", "adamw_torch_fused", "sgd"] = Field(
        "adamw_8bit", description="optimizer; 8-bit variants need a GPU and fall back to adamw_torch."
    )
    train_on_responses_only: bool = Field(
        True, description="trainOnResponsesOnly supervises only the assistant turns."
    )
    gradient_checkpointing: Literal["on", "off", "offload"] = Field(
        "on", description="gradientCheckpointing recomputes activations; offload also moves them to CPU."
    )
    checkpoint_every_steps: int = Field(
        50, ge=1, le=1_000_000, description="checkpointEverySteps saves a resumable checkpoint."
    )
    keep_checkpoints: int = Field(2, ge=1, le=100, description="keepCheckpoints keeps the newest K.")
    logging_steps: int = Field(1, ge=1, le=100_000, description="loggingSteps between progress reports.")
    seed: int = Field(3407, ge=0, le=2**31 - 1, description="seed for data order and adapter init.")
    optimizations: bool = Field(
        True,
        description="optimizations turns on the fused kernels and launch-lean step; false runs the "
        "plain Hugging Face modules.",
    )
    packing: bool = Field(
        False,
        description="packing trains on rows of one fixed shape: each step's samples join a buffer, and a "
        "row of fixed token and image budgets is filled from it (oldest sample first, then best fit), "
        "each sample attending only to itself; a row holds perDeviceBatchSize samples on average, so "
        "one captured CUDA graph serves every step. Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Gemma 3.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "has(self.maxSteps) != has(self.epochs)",
                    "training: set exactly one of maxSteps and epochs",
                ),
            ]
        }
    )

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainingSettings:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("training: set exactly one of maxSteps and epochs")
        return self


class DpoSettings(SpecModel):
    """Direct preference optimization (method dpo): how far the policy may move from its reference and how
    each pair's preference is scored. The reference is the frozen base model with the adapters disabled:
    no second copy of the model is loaded."""

    beta: float = Field(
        0.1,
        gt=0,
        le=100,
        description="beta scales the policy's log-probability ratios to the reference: a higher beta keeps "
        "the policy closer to the reference (for ipo, the regularization strength).",
    )
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid",
        description="lossType is sigmoid (the DPO paper's loss), ipo (identity preference optimization, on "
        "per-token averages) or hinge (the SLiC margin loss).",
    )
    reference: Literal["base"] = Field(
        "base",
        description="reference is what the policy is compared with: base, the frozen base model (4-bit "
        "with model.loadIn4bit) with the adapters disabled, so that no second copy of the model is loaded.",
    )
    max_prompt_length: int | None = Field(
        None,
        ge=1,
        le=131072,
        description="maxPromptLength is the longest prompt in tokens, image tokens included; a longer pair is "
        "a bad sample (dataset.onBadSample), never truncated. Unset: only model.maxSeqLength bounds it.",
    )
    max_completion_length: int | None = Field(
        None,
        ge=1,
        le=131072,
        description="maxCompletionLength is the longest chosen or rejected answer in tokens; a longer pair is "
        "a bad sample (dataset.onBadSample), never truncated. Unset: only model.maxSeqLength bounds it.",
    )


class OutputTarget(SpecModel):
    """Where the results go and in which form."""

    uri: str = Field(
        description="uri is the output prefix: s3://bucket/prefix or an absolute path. Adapters go to "
        "adapter/, merged weights to merged/, checkpoints to checkpoints/.",
        pattern=DATA_URI_PATTERN,
        max_length=1024,
    )
    save_method: Literal["lora", "merged_16bit", "merged_4bit"] = Field(
        "lora", description="saveMethod: lora adapters, or weights merged into a 16-bit or 4-bit model."
    )


class StorageSettings(SpecModel):
    """How to reach S3-compatible storage. Credentials are referenced, never copied."""

    endpoint: str | None = Field(
        None,
        pattern=r"^https?://[^\s/]+(:[0-9]+)?(/.*)?$",
        max_length=512,
        description="endpoint is the S3 API URL (MinIO, Ceph RGW, R2, SeaweedFS); empty means AWS.",
    )
    region: str = Field("us-east-1", max_length=64, pattern=r"^[a-z0-9\-]+$", description="region.")
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="addressingStyle; most self-hosted servers need path."
    )
    verify_tls: bool = Field(True, description="verifyTls checks the server certificate.")
    ca_bundle_config_map: str | None = Field(
        None,
        max_length=253,
        pattern=K8S_NAME_PATTERN,
        description="caBundleConfigMap names a ConfigMap in the same namespace with key ca.crt.",
    )
    credentials_secret: str | None = Field(
        None,
        max_length=253,
        pattern=K8S_NAME_PATTERN,
        description="credentialsSecret names a Secret in the same namespace with the access keys; empty "
        "means the pod's own identity (IRSA, workload identity).",
    )
    access_key_id_key: str = Field(
        "AWS_ACCESS_KEY_ID",
        max_length=253,
        pattern=SECRET_KEY_PATTERN,
        description="accessKeyIdKey is the Secret key of the key id (letters, digits, '-', '_', '.').",
    )
    secret_access_key_key: str = Field(
        "AWS_SECRET_ACCESS_KEY",
        max_length=253,
        pattern=SECRET_KEY_PATTERN,
        description="secretAccessKeyKey is the Secret key of the secret key (letters, digits, '-', '_', '.').",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.verifyTls || !has(self.caBundleConfigMap)",
                    "storage.caBundleConfigMap has no effect with verifyTls false: drop one of them",
                )
            ]
        }
    )

    @model_validator(mode="after")
    def _tls(self) -> StorageSettings:
        if not self.verify_tls and self.ca_bundle_config_map is not None:
            raise ValueError("storage.caBundleConfigMap has no effect with verifyTls false: drop one of them")
        return self


class TrainingRecipe(SpecModel):
    """Everything the trainer needs; shared by the resource's spec and the trainer's config file."""

    method: Literal["sft", "dpo"] = Field(
        "sft",
        description="method is how the adapters learn: sft, supervised fine-tuning on the answers, or dpo, "
        "direct preference optimization on pairs of a chosen and a rejected answer to one prompt "
        "(dataset.columns.chosen and dataset.columns.rejected; settings in dpo).",
    )
    model: ModelSource = Field(description="model is the base model to fine-tune.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="lora configures the adapters.")
    dataset: DatasetSource = Field(description="dataset is the training data.")
    training: TrainingSettings = Field(
        default_factory=lambda: TrainingSettings(max_steps=100),
        description="training configures the optimization.",
    )
    dpo: DpoSettings | None = Field(
        None, description="dpo configures method dpo (its defaults apply when it is left out)."
    )
    output: OutputTarget | None = Field(
        None,
        validate_default=True,
        description="output is where adapters, weights and checkpoints go; required unless model.uri is a "
        "builtin:// model. Without it, a local run (visionft-train) writes to <workDir>/output, and a "
        "training pod keeps its results in its scratch volume, which is deleted with the pod.",
    )
    storage: StorageSettings = Field(
        default_factory=StorageSettings, description="storage configures S3-compatible access."
    )
    evaluation: EvaluationSettings | None = Field(
        None,
        description="evaluation scores held-out samples before, during and after training: metrics.json, "
        "gallery.html and the loss plot in the output, status.evaluation on the resource.",
    )
    tracking: TrackingSettings | None = Field(
        None,
        description="tracking logs parameters, losses, metrics and reports to MLflow and/or TensorBoard "
        "event files; default: TensorBoard event files in the output.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    f"has(self.output) || (has(self.model) && self.model.uri.startsWith('{BUILTIN_SCHEME}'))",
                    _OUTPUT_REQUIRED_MESSAGE,
                    ".output",
                ),
                *_method_rules(),
                *_evaluation_rules(),
            ]
        }
    )

    @field_validator("output")
    @classmethod
    def _output_unless_generated(
        cls, output: OutputTarget | None, info: ValidationInfo
    ) -> OutputTarget | None:
        model = info.data.get("model")  # absent when the model itself failed validation
        if output is None and isinstance(model, ModelSource) and not is_builtin(model.uri):
            raise ValueError(_OUTPUT_REQUIRED_MESSAGE)
        return output

    @model_validator(mode="after")
    def _method_fits(self) -> TrainingRecipe:
        problems = _method_problems(self)
        if problems:
            raise field_errors(problems)
        return self

    def dpo_settings(self) -> DpoSettings:
        """The DPO settings of a ``method: dpo`` recipe: ``dpo``, or the defaults when it is left out."""
        return self.dpo or DpoSettings()

    @field_validator("evaluation")
    @classmethod
    def _evaluation_fits_the_dataset(
        cls, evaluation: EvaluationSettings | None, info: ValidationInfo
    ) -> EvaluationSettings | None:
        dataset = info.data.get("dataset")  # absent when the dataset itself failed validation
        if evaluation is None or not isinstance(dataset, DatasetSource):
            return evaluation
        if dataset.eval_samples:
            raise ValueError(_EVAL_SAMPLES_SHORTHAND_MESSAGE)
        if is_builtin(dataset.uri):
            held_out = BUILTIN_HELD_OUT[dataset.uri]
            if evaluation.samples is not None and evaluation.samples > held_out:
                raise ValueError(_builtin_count_message("evaluation.samples", dataset.uri, held_out))
            if evaluation.split not in _BUILTIN_SPLITS:
                raise ValueError(_BUILTIN_SPLIT_MESSAGE)
            json_metrics = [m for m in evaluation.metrics if METRICS[m].reference == "json"]
            if json_metrics:
                raise ValueError(_BUILTIN_JSON_MESSAGE)
        return evaluation

    def evaluation_settings(self) -> EvaluationSettings | None:
        """What the run evaluates: ``evaluation``, or what the ``dataset.evalSamples`` shorthand stands for
        (normalizedExactMatch on that many samples, before and after training), or None. A dpo run has no
        evaluation stage: its ``dataset.evalSamples`` pairs are scored by preference accuracy instead."""
        if self.method == "dpo":
            return None
        if self.evaluation is not None:
            return self.evaluation
        if self.dataset.eval_samples:
            return EvaluationSettings(samples=self.dataset.eval_samples, metrics=["normalizedExactMatch"])
        return None

    def uses_s3(self) -> bool:
        """True when any location of the recipe is in object storage."""
        uris = (self.model.uri, self.dataset.uri, self.output.uri if self.output else "")
        return any(uri.startswith("s3://") for uri in uris)
