"""Generate the VisionFineTune CustomResourceDefinition from the pydantic models.

``python -m visionft_api.crd --write`` regenerates crds/visionft.io_visionfinetunes.yaml (and the copy in the
Helm chart); ``tests/api/test_crd_sync.py`` fails when the committed files differ from what this produces.

Pydantic emits JSON Schema 2020-12; a CRD needs a *structural* OpenAPI v3 schema. The conversion inlines
$refs, turns ``X | None`` into an optional ``X``, maps numeric exclusive bounds to the OpenAPI 3.0 form, drops
titles, and keeps descriptions, defaults, enums, bounds, patterns and the CEL rules declared on the models.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from visionft_api.resource import (
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    VisionFineTuneSpec,
    VisionFineTuneStatus,
    immutability_rules,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_FILENAME = f"{GROUP}_{PLURAL}.yaml"
CRD_PATHS = (
    REPO_ROOT / "crds" / CRD_FILENAME,
    REPO_ROOT / "charts" / "visionft" / "crds" / CRD_FILENAME,
)

_KEPT_KEYS = {
    "type",
    "description",
    "default",
    "enum",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "pattern",
    "format",
    "items",
    "properties",
    "required",
    "additionalProperties",
    "x-kubernetes-validations",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inline $ref and merge the referencing node's own keys (description, default) over the target."""
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        # A field's own description wins over the model's docstring.
        target.update(extra)
        return _resolve(target, defs)
    return {k: _resolve(v, defs) for k, v in node.items()}


def _structural(node: Any) -> Any:
    """Rewrite one JSON-Schema node into the structural OpenAPI v3 subset that CRDs accept."""
    if not isinstance(node, dict):
        return node
    node = dict(node)
    any_of = node.pop("anyOf", None)
    if any_of is not None:
        branches = [b for b in any_of if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"a CRD field can't be a union of {len(branches)} types: {any_of}")
        merged = dict(branches[0])
        for key, value in node.items():
            if key == "description":
                merged[key] = value  # the field's own description wins over the model's docstring
            else:
                merged.setdefault(key, value)
        node = merged
        if node.get("default", 0) is None:
            node.pop("default")
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "exclusiveMinimum" in node:
        node["minimum"] = node.pop("exclusiveMinimum")
        node["exclusiveMinimum"] = True
    if "exclusiveMaximum" in node:
        node["maximum"] = node.pop("exclusiveMaximum")
        node["exclusiveMaximum"] = True
    if node.get("type") == "array":
        for length, items in (("maxLength", "maxItems"), ("minLength", "minItems")):
            if items not in node and length in node:
                node[items] = node.pop(length)
    if node.get("type") == "object":
        for length, props in (("maxLength", "maxProperties"), ("minLength", "minProperties")):
            if props not in node and length in node:
                node[props] = node.pop(length)
    pattern_properties = node.pop("patternProperties", None)
    if pattern_properties is not None:
        # A map with constrained keys: structural schemas have no key patterns, so the values' schema
        # becomes the map's, and the keys are checked by the field's CEL rule.
        if len(pattern_properties) != 1 or "additionalProperties" in node:
            raise ValueError(f"a CRD map needs one value schema: {pattern_properties}")
        node["additionalProperties"] = next(iter(pattern_properties.values()))
    if "enum" in node and "type" not in node:
        node["type"] = "string"
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key not in _KEPT_KEYS and key not in {"exclusiveMinimum", "exclusiveMaximum"}:
            continue
        if key == "properties":
            out[key] = {name: _structural(child) for name, child in value.items()}
        elif key == "additionalProperties" and value is False:
            # Structural schemas forbid additionalProperties: false; the apiserver prunes unknown fields
            # instead, and kubectl's strict field validation reports them by name.
            continue
        elif key in {"items", "additionalProperties"} and isinstance(value, dict):
            out[key] = _structural(value)
        elif key == "required":
            if value:
                out[key] = sorted(value)
        else:
            out[key] = value
    if out.get("properties") and "type" not in out:
        out["type"] = "object"
    return out


def model_schema(model: type) -> dict[str, Any]:
    """The structural OpenAPI schema of one pydantic model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")  # type: ignore[attr-defined]
    defs = raw.pop("$defs", {})
    return _structural(_resolve(raw, defs))


def build_crd() -> dict[str, Any]:
    """The CRD as a dict."""
    spec_schema = model_schema(VisionFineTuneSpec)
    status_schema = model_schema(VisionFineTuneStatus)
    # Conditions are keyed by type, like metav1.Condition lists.
    conditions = status_schema["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    conditions["maxItems"] = 16
    root = {
        "type": "object",
        "description": "VisionFineTune fine-tunes a vision-language model with quantized LoRA on the "
        "cluster's GPUs, reading data from and publishing results to S3-compatible storage.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
        "x-kubernetes-validations": immutability_rules(),
    }
    columns = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        # Why the run is in its phase (Ready's reason): Training, Unschedulable, ChildRejected, ...
        {"name": "Reason", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].reason'},
        {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
        {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
        {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta"},
        {"name": "Eval", "type": "string", "jsonPath": ".status.evaluation.summary"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {"name": "Model", "type": "string", "jsonPath": ".spec.model.uri", "priority": 1},
        {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "annotations": {"visionft.io/generated-by": "python -m visionft_api.crd --write"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["visionft", "ml"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def render_crd() -> str:
    """The CRD as committed YAML text."""
    header = (
        "# Generated from visionft_api (pydantic) by `python -m visionft_api.crd --write`. Do not edit.\n"
    )
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the CRD files instead of printing")
    args = parser.parse_args(argv)
    text = render_crd()
    if not args.write:
        sys.stdout.write(text)
        return 0
    for path in CRD_PATHS:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
