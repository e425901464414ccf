"""One table of malformed VisionFineTune specs, each with the field its rejection must name, and one table
of the pod's scheduling fields with the core API's own verdict.

`tests/api/test_rules.py` runs both through the pydantic models (what the operator and trainer check);
`tests/operator/test_cluster_validation.py` runs them through the real apiserver (CRD schema and CEL
rules), and checks each SCHEDULING verdict against the core API itself on a Pod.
"""

from __future__ import annotations

from typing import Any

from tests.operator.specs import dpo_spec, spec

# (id, spec, field that the message must name)
MALFORMED: list[tuple[str, dict[str, Any], str]] = [
    ("model-missing", spec(model=None), "spec.model"),
    ("model-uri-scheme", spec(**{"model.uri": "ftp://host/model"}), "spec.model.uri"),
    ("dataset-uri-relative", spec(**{"dataset.uri": "data/train"}), "spec.dataset.uri"),
    ("output-uri-http", spec(**{"output.uri": "http://host/out"}), "spec.output.uri"),
    # Only a generated model may leave out the output (its results stay in the work folder).
    ("output-missing", spec(output=None), "spec.output"),
    ("model-uri-builtin-unknown", spec(**{"model.uri": "builtin://tiny-llama"}), "spec.model.uri"),
    ("dataset-uri-builtin-unknown", spec(**{"dataset.uri": "builtin://mnist"}), "spec.dataset.uri"),
    ("dataset-eval-samples-negative", spec(**{"dataset.evalSamples": -1}), "spec.dataset.evalSamples"),
    ("lora-rank-zero", spec(**{"lora.r": 0}), "spec.lora.r"),
    ("lora-rank-huge", spec(**{"lora.r": 1000}), "spec.lora.r"),
    ("lora-dropout", spec(**{"lora.dropout": 0.95}), "spec.lora.dropout"),
    ("lora-bias-enum", spec(**{"lora.bias": "some"}), "spec.lora.bias"),
    (
        "lora-no-layers",
        spec(**{"lora.finetuneVisionLayers": False, "lora.finetuneLanguageLayers": False}),
        "spec.lora",
    ),
    (
        "lora-no-modules",
        spec(**{"lora.finetuneAttentionModules": False, "lora.finetuneMlpModules": False}),
        "spec.lora",
    ),
    (
        "lora-regex-and-list",
        spec(**{"lora.targetModulesRegex": ".*q_proj", "lora.targetModules": ["q_proj"]}),
        "spec.lora",
    ),
    ("lora-unknown-field", spec(**{"lora.rank": 8}), "spec.lora.rank"),
    ("model-two-quantizations", spec(**{"model.loadIn4bit": True, "model.loadIn8bit": True}), "spec.model"),
    ("model-seq-too-short", spec(**{"model.maxSeqLength": 32}), "spec.model.maxSeqLength"),
    ("training-steps-and-epochs", spec(**{"training.epochs": 2}), "spec.training"),
    ("training-neither", spec(**{"training.maxSteps": None}), "spec.training"),
    ("training-lr-zero", spec(**{"training.learningRate": 0}), "spec.training.learningRate"),
    ("training-lr-huge", spec(**{"training.learningRate": 2}), "spec.training.learningRate"),
    ("training-optimizer-enum", spec(**{"training.optimizer": "adam"}), "spec.training.optimizer"),
    (
        "dataset-validation-fraction",
        spec(**{"dataset.validationFraction": 0.9}),
        "spec.dataset.validationFraction",
    ),
    ("dataset-pixels-tiny", spec(**{"dataset.maxImagePixels": 10}), "spec.dataset.maxImagePixels"),
    ("dataset-format-enum", spec(**{"dataset.format": "csv"}), "spec.dataset.format"),
    ("storage-endpoint-no-scheme", spec(**{"storage.endpoint": "s3.local:9000"}), "spec.storage.endpoint"),
    (
        "storage-secret-other-namespace",
        spec(**{"storage.credentialsSecret": "team-b/s3-creds"}),
        "spec.storage.credentialsSecret",
    ),
    (
        "storage-ca-without-tls",
        spec(**{"storage.verifyTls": False, "storage.caBundleConfigMap": "ca"}),
        "spec.storage",
    ),
    ("resources-gpus-per-node", spec(**{"resources.gpusPerNode": 17}), "spec.resources.gpusPerNode"),
    ("resources-multinode-cpu", spec(**{"resources.nodes": 2, "resources.gpusPerNode": 0}), "spec.resources"),
    (
        "resources-too-many-gpus",
        spec(**{"resources.nodes": 64, "resources.gpusPerNode": 16}),
        "spec.resources",
    ),
    ("resources-memory-format", spec(**{"resources.memory": "lots"}), "spec.resources.memory"),
    (
        "resources-toleration-operator",
        spec(**{"resources.tolerations": [{"key": "k", "operator": "Maybe"}]}),
        "spec.resources.tolerations[0].operator",
    ),
    # What the core API refuses in the pod template the operator renders: refused at apply, not in the Job.
    (
        "resources-toleration-exists-with-value",
        spec(
            **{
                "resources.tolerations": [
                    {
                        "key": "nvidia.com/gpu",
                        "operator": "Exists",
                        "value": "present",
                        "effect": "NoSchedule",
                    }
                ]
            }
        ),
        "spec.resources.tolerations[0]",
    ),
    (
        "resources-toleration-seconds-without-no-execute",
        spec(
            **{
                "resources.tolerations": [
                    {"key": "k", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 60}
                ]
            }
        ),
        "spec.resources.tolerations[0]",
    ),
    (
        "resources-toleration-key",
        spec(**{"resources.tolerations": [{"key": "bad key!", "operator": "Exists"}]}),
        "spec.resources.tolerations[0].key",
    ),
    (
        "resources-toleration-empty-key-equal",
        spec(**{"resources.tolerations": [{"operator": "Equal", "value": "x"}]}),
        "spec.resources.tolerations[0]",
    ),
    (
        "resources-toleration-value",
        spec(**{"resources.tolerations": [{"key": "k", "value": "bad value!"}]}),
        "spec.resources.tolerations[0].value",
    ),
    (
        "resources-node-selector-value",
        spec(**{"resources.nodeSelector": {"disktype": "bad value!"}}),
        "spec.resources.nodeSelector",
    ),
    (
        "resources-node-selector-key",
        spec(**{"resources.nodeSelector": {"bad key!": "x"}}),
        "spec.resources.nodeSelector",
    ),
    ("resources-cpu-zero", spec(**{"resources.cpu": "0"}), "spec.resources.cpu"),
    ("resources-memory-zero", spec(**{"resources.memory": "0"}), "spec.resources.memory"),
    ("resources-scratch-zero", spec(**{"resources.scratchSize": "0.0Gi"}), "spec.resources.scratchSize"),
    ("lora-target-modules-empty", spec(**{"lora.targetModules": []}), "spec.lora.targetModules"),
    (
        "storage-secret-key-format",
        spec(**{"storage.accessKeyIdKey": "AWS KEY"}),
        "spec.storage.accessKeyIdKey",
    ),
    ("run-policy-backoff-negative", spec(**{"runPolicy.backoffLimit": -1}), "spec.runPolicy.backoffLimit"),
    (
        "run-policy-deadline-short",
        spec(**{"runPolicy.activeDeadlineSeconds": 10}),
        "spec.runPolicy.activeDeadlineSeconds",
    ),
    ("queue-name-format", spec(queueName="Bad_Queue"), "spec.queueName"),
    ("image-with-space", spec(image="bad image"), "spec.image"),
    ("method-enum", spec(method="ppo"), "spec.method"),
    ("dpo-beta-zero", dpo_spec(**{"dpo.beta": 0}), "spec.dpo.beta"),
    ("dpo-beta-negative", dpo_spec(**{"dpo.beta": -0.5}), "spec.dpo.beta"),
    ("dpo-loss-type-enum", dpo_spec(**{"dpo.lossType": "kto"}), "spec.dpo.lossType"),
    ("dpo-prompt-length-zero", dpo_spec(**{"dpo.maxPromptLength": 0}), "spec.dpo.maxPromptLength"),
    (
        "dpo-missing-rejected-column",
        dpo_spec(**{"dataset.columns.rejected": None}),
        "spec.dataset.columns.rejected",
    ),
    (
        "dpo-missing-chosen-column",
        dpo_spec(**{"dataset.columns.chosen": None}),
        "spec.dataset.columns.chosen",
    ),
    ("dpo-same-answer-columns", dpo_spec(**{"dataset.columns.rejected": "chosen"}), "spec.dataset.columns"),
    ("dpo-with-packing", dpo_spec(**{"training.packing": True}), "spec.training.packing"),
    ("dpo-with-evaluation", dpo_spec(evaluation={"metrics": ["cer"]}), "spec.evaluation"),
    ("dpo-settings-with-sft", spec(**{"dpo.beta": 0.5}), "spec.dpo"),
    ("sft-with-rejected-column", spec(**{"dataset.columns.rejected": "rejected"}), "spec.dataset.columns"),
    # Evaluation: an unknown metric, a count larger than a generated dataset's held-out split, metrics that
    # need references its answers lack, and settings that contradict each other.
    ("evaluation-unknown-metric", spec(evaluation={"metrics": ["accuracy"]}), "spec.evaluation.metrics"),
    ("evaluation-no-metric", spec(evaluation={"metrics": []}), "spec.evaluation.metrics"),
    ("evaluation-metric-twice", spec(evaluation={"metrics": ["cer", "cer"]}), "spec.evaluation.metrics"),
    (
        "evaluation-samples-more-than-builtin",
        spec(**{"dataset.uri": "builtin://shapes", "evaluation": {"samples": 101}}),
        "spec.evaluation",
    ),
    (
        "dataset-eval-samples-more-than-builtin",
        spec(**{"dataset.uri": "builtin://shape-captions", "dataset.evalSamples": 500}),
        "spec.dataset.evalSamples",
    ),
    (
        "evaluation-json-references-on-builtin",
        spec(**{"dataset.uri": "builtin://shapes", "evaluation": {"metrics": ["jsonFieldMatch"]}}),
        "spec.evaluation",
    ),
    (
        "evaluation-split-missing-from-builtin",
        spec(**{"dataset.uri": "builtin://shapes", "evaluation": {"split": "validation"}}),
        "spec.evaluation",
    ),
    ("evaluation-samples-zero", spec(evaluation={"samples": 0}), "spec.evaluation.samples"),
    (
        "evaluation-and-eval-samples",
        spec(**{"dataset.evalSamples": 10, "evaluation": {"metrics": ["cer"]}}),
        "spec",
    ),
    (
        "evaluation-keep-best-without-interval",
        spec(evaluation={"metrics": ["cer"], "keepBest": {}}),
        "spec.evaluation",
    ),
    (
        "evaluation-keep-best-metric-not-computed",
        spec(evaluation={"metrics": ["cer"], "everySteps": 10, "keepBest": {"metric": "bleu"}}),
        "spec.evaluation",
    ),
    (
        "evaluation-keep-best-metric-unknown",
        spec(evaluation={"metrics": ["cer"], "everySteps": 10, "keepBest": {"metric": "accuracy"}}),
        "spec.evaluation.keepBest.metric",
    ),
    (
        "evaluation-max-new-tokens-zero",
        spec(evaluation={"generation": {"maxNewTokens": 0}}),
        "spec.evaluation.generation.maxNewTokens",
    ),
    (
        "tracking-mlflow-uri-scheme",
        spec(tracking={"mlflow": {"uri": "mlflow.svc:5000"}}),
        "spec.tracking.mlflow.uri",
    ),
    (
        "tracking-token-secret-name",
        spec(tracking={"mlflow": {"uri": "http://mlflow:5000", "tokenSecret": "team-b/token"}}),
        "spec.tracking.mlflow.tokenSecret",
    ),
]

# (id, spec.resources fields, whether the core API accepts them in a pod). Each must be accepted by the
# CRD and by pydantic exactly when the core API accepts it.
SCHEDULING: list[tuple[str, dict[str, Any], bool]] = [
    ("toleration-exists", {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}, True),
    (
        "toleration-equal-no-execute-seconds",
        {
            "tolerations": [
                {
                    "key": "pool",
                    "operator": "Equal",
                    "value": "a100",
                    "effect": "NoExecute",
                    "tolerationSeconds": 60,
                }
            ]
        },
        True,
    ),
    ("toleration-of-everything", {"tolerations": [{"operator": "Exists"}]}, True),
    ("toleration-empty-key", {"tolerations": [{"key": "", "operator": "Exists"}]}, True),
    ("toleration-default-operator", {"tolerations": [{"key": "example.com/pool", "value": "x_1.y"}]}, True),
    (
        "toleration-exists-empty-value",
        {"tolerations": [{"key": "k", "operator": "Exists", "value": ""}]},
        True,
    ),
    (
        "toleration-exists-with-value",
        {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "value": "present"}]},
        False,
    ),
    (
        "toleration-seconds-no-schedule",
        {"tolerations": [{"key": "k", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 1}]},
        False,
    ),
    ("toleration-seconds-no-effect", {"tolerations": [{"key": "k", "tolerationSeconds": 1}]}, False),
    ("toleration-key-space", {"tolerations": [{"key": "bad key!", "operator": "Exists"}]}, False),
    ("toleration-key-name-64", {"tolerations": [{"key": "k" * 64, "operator": "Exists"}]}, False),
    ("toleration-key-name-63", {"tolerations": [{"key": "k" * 63, "operator": "Exists"}]}, True),
    ("toleration-key-prefix-254", {"tolerations": [{"key": "p" * 254 + "/k", "operator": "Exists"}]}, False),
    ("toleration-key-prefix-253", {"tolerations": [{"key": "p" * 253 + "/k", "operator": "Exists"}]}, True),
    (
        "toleration-key-uppercase-prefix",
        {"tolerations": [{"key": "Example.com/k", "operator": "Exists"}]},
        False,
    ),
    ("toleration-key-two-slashes", {"tolerations": [{"key": "a/b/c", "operator": "Exists"}]}, False),
    ("toleration-empty-key-equal", {"tolerations": [{"operator": "Equal", "value": "x"}]}, False),
    ("toleration-value-space", {"tolerations": [{"key": "k", "value": "bad value!"}]}, False),
    ("toleration-value-64", {"tolerations": [{"key": "k", "value": "v" * 64}]}, False),
    ("toleration-value-dash-end", {"tolerations": [{"key": "k", "value": "v-"}]}, False),
    ("node-selector-prefixed", {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}, True),
    ("node-selector-empty-value", {"nodeSelector": {"pool": ""}}, True),
    ("node-selector-value-space", {"nodeSelector": {"disktype": "bad value!"}}, False),
    ("node-selector-value-64", {"nodeSelector": {"pool": "v" * 64}}, False),
    ("node-selector-key-space", {"nodeSelector": {"bad key!": "x"}}, False),
    ("node-selector-key-dash-end", {"nodeSelector": {"pool-": "x"}}, False),
    ("node-selector-key-prefix-254", {"nodeSelector": {"p" * 254 + "/k": "x"}}, False),
]
