"""Policy rules (no cluster): every limit, its message names the rule and the limit."""

from __future__ import annotations

import pytest
from visionft_api import VisionFineTuneSpec
from visionft_operator import policy

from tests.operator.specs import spec

POLICY = policy.Policy.load(
    """
defaults:
  maxGpusPerJob: 4
  allowedImages: [ghcr.io/visionft/]
  allowedStorageEndpoints: ["http://s3.storage.svc"]
  allowTrustRemoteCode: false
namespaces:
  team-a:
    maxConcurrentJobs: 1
    maxGpusPerNamespace: 2
    nodeSelector: {pool: a}
"""
)


def _spec(**kw: object) -> VisionFineTuneSpec:
    return VisionFineTuneSpec.model_validate(spec(**kw))


def test_namespace_overrides_merge_with_defaults() -> None:
    rules = POLICY.for_namespace("team-a")
    assert (
        rules.max_gpus_per_job == 4
        and rules.max_concurrent_jobs == 1
        and rules.node_selector == {"pool": "a"}
    )
    assert POLICY.for_namespace("team-b").max_concurrent_jobs is None


@pytest.mark.parametrize(
    ("overrides", "image", "rule", "limit"),
    [
        ({"resources.gpusPerNode": 8}, "ghcr.io/visionft/trainer:1", "maxGpusPerJob", "4"),
        ({"resources.gpusPerNode": 3}, "ghcr.io/visionft/trainer:1", "maxGpusPerNamespace", "2"),
        ({}, "docker.io/evil/trainer:1", "allowedImages", "ghcr.io/visionft/"),
        (
            {"storage.endpoint": "http://10.0.0.1:9000"},
            "ghcr.io/visionft/t:1",
            "allowedStorageEndpoints",
            "s3.storage.svc",
        ),
        ({"model.trustRemoteCode": True}, "ghcr.io/visionft/t:1", "allowTrustRemoteCode", "trustRemoteCode"),
    ],
)
def test_hard_rules_deny_naming_rule_and_limit(overrides: dict, image: str, rule: str, limit: str) -> None:
    decision = policy.check_rules(_spec(**overrides), image, POLICY.for_namespace("team-a"))
    assert decision.verdict == "deny"
    assert decision.rule == rule
    assert rule in decision.message and limit in decision.message


def test_capacity_rules_wait() -> None:
    rules = POLICY.for_namespace("team-a")
    assert policy.check_capacity(_spec(), rules, policy.Usage(jobs=0, gpus=0)).verdict == "allow"
    busy = policy.check_capacity(_spec(), rules, policy.Usage(jobs=1, gpus=1))
    assert busy.verdict == "wait" and "maxConcurrentJobs" in busy.message and "limit is 1" in busy.message
    relaxed = rules.model_copy(update={"max_concurrent_jobs": 5})
    gpus = policy.check_capacity(_spec(**{"resources.gpusPerNode": 2}), relaxed, policy.Usage(jobs=1, gpus=1))
    assert gpus.verdict == "wait" and "maxGpusPerNamespace" in gpus.message and "limit is 2" in gpus.message


def test_empty_policy_allows_everything() -> None:
    rules = policy.Policy.load("").for_namespace("x")
    s = _spec(**{"resources.gpusPerNode": 16, "model.trustRemoteCode": True})
    assert policy.check_rules(s, "any/image", rules).verdict == "allow"
    assert policy.check_capacity(s, rules, policy.Usage(jobs=100, gpus=100)).verdict == "allow"
