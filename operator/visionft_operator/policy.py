"""Per-namespace policy: limits and defaults that a cluster admin sets for tenants.

The policy is operator configuration (``VISIONFT_POLICY`` as YAML/JSON, or ``VISIONFT_POLICY_FILE``, e.g. a
mounted ConfigMap), not a resource that tenants can edit:

```yaml
defaults:                      # every namespace
  maxGpusPerJob: 8
  allowedImages: [ghcr.io/visionft/]
  allowTrustRemoteCode: false
namespaces:
  team-a:                      # fields set here override the defaults for team-a
    maxConcurrentJobs: 2
    maxGpusPerNamespace: 4
    nodeSelector: {pool: a100}
```

A hard rule (image, storage endpoint, trustRemoteCode, GPUs per job) fails the run with a condition that
names the rule and its limit. A capacity rule (concurrent jobs, GPUs per namespace) leaves it Pending, and
the run starts when capacity frees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import Field
from visionft_api import VisionFineTuneSpec
from visionft_api.recipe import SpecModel
from visionft_api.scheduling import NodeSelector, Toleration


@dataclass
class PolicyDecision:
    """What the policy says about starting the run: allowed, wait (capacity) or deny (a hard rule)."""

    verdict: str = "allow"  # allow | wait | deny
    rule: str = ""
    message: str = ""


class Rules(SpecModel):
    """The limits and defaults for one namespace; unset fields impose nothing."""

    max_concurrent_jobs: int | None = Field(None, ge=0, description="maxConcurrentJobs running at once.")
    max_gpus_per_job: int | None = Field(None, ge=0, description="maxGpusPerJob is nodes * gpusPerNode.")
    max_gpus_per_namespace: int | None = Field(
        None, ge=0, description="maxGpusPerNamespace across the namespace's running jobs."
    )
    allowed_images: list[str] | None = Field(
        None, description="allowedImages are image or registry prefixes (ghcr.io/visionft/)."
    )
    allowed_storage_endpoints: list[str] | None = Field(
        None,
        description="allowedStorageEndpoints are URL prefixes; an empty string allows AWS (no endpoint).",
    )
    node_selector: NodeSelector | None = Field(None, description="nodeSelector added to training pods.")
    tolerations: list[Toleration] | None = Field(None, description="tolerations added to training pods.")
    priority_class_name: str | None = Field(None, description="priorityClassName when the spec sets none.")
    allow_trust_remote_code: bool | None = Field(None, description="allowTrustRemoteCode; unset allows it.")


class Policy(SpecModel):
    """Cluster defaults plus per-namespace overrides."""

    defaults: Rules = Field(default_factory=Rules, description="defaults for every namespace.")
    namespaces: dict[str, Rules] = Field(default_factory=dict, description="overrides per namespace.")

    def for_namespace(self, namespace: str) -> Rules:
        merged = self.defaults.model_dump()
        override = self.namespaces.get(namespace)
        if override is not None:
            merged.update({k: v for k, v in override.model_dump().items() if v is not None})
        return Rules.model_validate(merged)

    @classmethod
    def load(cls, text: str = "", path: str = "") -> Policy:
        if not text and path:
            text = Path(path).read_text()
        if not text.strip():
            return cls()
        raw = yaml.safe_load(text)
        return cls.model_validate(raw or {})


@dataclass(frozen=True)
class Usage:
    """What a namespace runs now (Jobs that are neither finished nor suspended)."""

    jobs: int = 0
    gpus: int = 0


def gpus_of(spec: VisionFineTuneSpec) -> int:
    return spec.resources.nodes * spec.resources.gpus_per_node


def check_rules(spec: VisionFineTuneSpec, image: str, rules: Rules) -> PolicyDecision:
    """Hard rules: a violation fails the run (no amount of waiting fixes it)."""
    gpus = gpus_of(spec)
    if rules.max_gpus_per_job is not None and gpus > rules.max_gpus_per_job:
        return PolicyDecision(
            "deny",
            "maxGpusPerJob",
            f"policy maxGpusPerJob: spec.resources asks for {gpus} GPUs (nodes * gpusPerNode), the limit "
            f"is {rules.max_gpus_per_job}",
        )
    if rules.max_gpus_per_namespace is not None and gpus > rules.max_gpus_per_namespace:
        return PolicyDecision(
            "deny",
            "maxGpusPerNamespace",
            f"policy maxGpusPerNamespace: spec.resources asks for {gpus} GPUs, more than the namespace's "
            f"limit of {rules.max_gpus_per_namespace}",
        )
    if rules.allowed_images is not None and not any(image.startswith(p) for p in rules.allowed_images):
        return PolicyDecision(
            "deny",
            "allowedImages",
            f"policy allowedImages: spec.image {image} is not under an allowed prefix "
            f"({', '.join(rules.allowed_images) or 'none'})",
        )
    endpoint = spec.storage.endpoint or ""
    if rules.allowed_storage_endpoints is not None and not any(
        endpoint == p if p == "" else endpoint.startswith(p) for p in rules.allowed_storage_endpoints
    ):
        shown = endpoint or "(AWS, no endpoint)"
        return PolicyDecision(
            "deny",
            "allowedStorageEndpoints",
            f"policy allowedStorageEndpoints: spec.storage.endpoint {shown} is not allowed "
            f"({', '.join(repr(p) for p in rules.allowed_storage_endpoints) or 'none'})",
        )
    if rules.allow_trust_remote_code is False and spec.model.trust_remote_code:
        return PolicyDecision(
            "deny",
            "allowTrustRemoteCode",
            "policy allowTrustRemoteCode: spec.model.trustRemoteCode is true, and this namespace does not "
            "allow running code shipped with a model",
        )
    return PolicyDecision()


def check_capacity(spec: VisionFineTuneSpec, rules: Rules, usage: Usage) -> PolicyDecision:
    """Capacity rules: when over, the run waits (Pending) until other runs of the namespace end."""
    if rules.max_concurrent_jobs is not None and usage.jobs + 1 > rules.max_concurrent_jobs:
        return PolicyDecision(
            "wait",
            "maxConcurrentJobs",
            f"policy maxConcurrentJobs: {usage.jobs} jobs run in this namespace, the limit is "
            f"{rules.max_concurrent_jobs}; waiting for one to finish",
        )
    gpus = gpus_of(spec)
    if rules.max_gpus_per_namespace is not None and usage.gpus + gpus > rules.max_gpus_per_namespace:
        return PolicyDecision(
            "wait",
            "maxGpusPerNamespace",
            f"policy maxGpusPerNamespace: {usage.gpus} GPUs are in use in this namespace and this run needs "
            f"{gpus}, the limit is {rules.max_gpus_per_namespace}; waiting for GPUs to free",
        )
    return PolicyDecision()


def describe(policy: Policy) -> str:
    return json.dumps(policy.to_dict(), sort_keys=True)
