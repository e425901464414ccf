"""Spec builders shared by the operator tests (and the trainer's manifest tests)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

BASE_SPEC: dict[str, Any] = {
    "model": {"uri": "s3://models/qwen2.5-vl-7b/"},
    "dataset": {"uri": "s3://datasets/latex-ocr/"},
    "training": {"maxSteps": 30},
    "output": {"uri": "s3://outputs/team-a/latex-ocr/"},
    "storage": {"endpoint": "http://s3.storage.svc:8333", "credentialsSecret": "s3-creds"},
    "resources": {"gpusPerNode": 1, "cpu": "1", "memory": "1Gi", "scratchSize": "1Gi"},
}


def edited(doc: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``doc`` with dotted-path overrides, e.g. {"training.maxSteps": 5}; None deletes."""
    out = copy.deepcopy(doc)
    for path, value in overrides.items():
        node = out
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return out


def spec(**overrides: Any) -> dict[str, Any]:
    """BASE_SPEC with dotted-path overrides, e.g. spec(**{"training.maxSteps": 5}); None deletes."""
    return edited(BASE_SPEC, overrides)


def resource(name: str, namespace: str, body_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "visionft.io/v1alpha1",
        "kind": "VisionFineTune",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body_spec if body_spec is not None else spec(),
    }
