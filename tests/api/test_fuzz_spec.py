"""Fuzzing: hypothesis mutates a valid spec (any field, any JSON value) and the operator's
validation must never crash: a spec is either accepted or rejected with a message that names a spec field.
tests/operator/test_cluster_fuzz.py sends a sample of the same specs to the real apiserver."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from visionft_operator.decision import validate

from tests.operator.specs import spec

# Every path of the spec the mutations may hit (existing fields and a few that don't exist).
PATHS = [
    "model",
    "model.uri",
    "model.loadIn4bit",
    "model.loadIn8bit",
    "model.maxSeqLength",
    "model.dtype",
    "model.trustRemoteCode",
    "lora",
    "lora.r",
    "lora.alpha",
    "lora.dropout",
    "lora.bias",
    "lora.targetModules",
    "lora.targetModulesRegex",
    "lora.finetuneVisionLayers",
    "lora.finetuneLanguageLayers",
    "dataset",
    "dataset.uri",
    "dataset.format",
    "dataset.columns",
    "dataset.columns.image",
    "dataset.maxImagePixels",
    "dataset.validationFraction",
    "dataset.onBadSample",
    "dataset.evalSamples",
    "training",
    "training.maxSteps",
    "training.epochs",
    "training.learningRate",
    "training.optimizer",
    "training.seed",
    "output",
    "output.uri",
    "output.saveMethod",
    "storage",
    "storage.endpoint",
    "storage.credentialsSecret",
    "storage.verifyTls",
    "storage.caBundleConfigMap",
    "resources",
    "resources.gpusPerNode",
    "resources.nodes",
    "resources.memory",
    "resources.tolerations",
    "resources.nodeSelector",
    "runPolicy",
    "runPolicy.backoffLimit",
    "runPolicy.activeDeadlineSeconds",
    "queueName",
    "suspend",
    "image",
    "unknownField",
    "lora.unknown",
]

json_values = hs.recursive(
    hs.none()
    | hs.booleans()
    | hs.integers(-(2**40), 2**40)
    | hs.floats(allow_nan=False, allow_infinity=False)
    | hs.text(max_size=40),
    lambda children: (
        hs.lists(children, max_size=3) | hs.dictionaries(hs.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)
mutations = hs.lists(hs.tuples(hs.sampled_from(PATHS), json_values), min_size=1, max_size=4)


def mutate(base: dict[str, Any], changes: list[tuple[str, Any]]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for path, value in changes:
        node: Any = out
        *parents, leaf = path.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations)
def test_validation_never_crashes_and_always_explains(changes: list[tuple[str, Any]]) -> None:
    body = mutate(spec(), changes)
    parsed, error = validate(body)
    if parsed is None:
        assert error, body
        for line in error.split("; "):
            assert line.startswith("spec"), error
            assert ": " in line and line.split(": ", 1)[1].strip(), error
    else:
        assert error is None
        # An accepted spec renders into children without error.
        from visionft_operator import children

        children.all_children(children.Owner("ns", "name", "uid"), parsed, children.PodDefaults())
