"""The operator's RBAC, offline: the chart's rules cover every permission derived from the operator code
(tests/deploy/permissions.py), cover what the operator grants the trainer (RBAC escalation prevention), and
grant nothing on Secrets and no wildcards. test_cluster.py asks the real apiserver the same questions with
`kubectl auth can-i`."""

from __future__ import annotations

import pytest
from visionft_operator import children

from tests.deploy.helm import find, rendered
from tests.deploy.permissions import Permission, required_permissions, rules_allow

SCENARIOS = ("default", "namespaced", "peering", "namespaced-peering")


def trainer_grants() -> list[Permission]:
    """What the per-run Role gives the trainer: the operator must hold it to create that Role."""
    role = children.role(children.Owner(namespace="team-a", name="x", uid="u"))
    return [
        Permission(group, resource, verb, "granted to the trainer by children.role()")
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    ]


def operator_rules(scenario: str) -> list[list[dict]]:
    """The rule sets that apply in one served namespace: the ClusterRole, or the namespace's Role, each
    together with the cluster-scoped discovery ClusterRole that is bound to the same ServiceAccount."""
    docs = rendered(scenario)
    discovery = [rule for role in find(docs, "ClusterRole", "visionft-discovery") for rule in role["rules"]]
    if scenario.startswith("namespaced"):
        return [[*role["rules"], *discovery] for role in find(docs, "Role")]
    return [[*role["rules"], *discovery] for role in find(docs, "ClusterRole", "visionft")]


def test_the_derivation_finds_the_operators_calls() -> None:
    # Guards the derivation itself: if it silently found nothing, the coverage test would prove nothing.
    keys = {p.key() for p in required_permissions()}
    assert ("batch", "jobs", "create") in keys
    assert ("visionft.io", "visionfinetunes", "watch") in keys
    assert ("visionft.io", "visionfinetunes/status", "patch") in keys


def peering_plural(scenario: str) -> str | None:
    """The Kopf peering resource the operator reads in a scenario, or None without peering."""
    if not scenario.endswith("peering"):
        return None
    return "kopfpeerings" if scenario.startswith("namespaced") else "clusterkopfpeerings"


def test_the_derivation_finds_the_peering_calls() -> None:
    keys = {p.key() for p in required_permissions("clusterkopfpeerings")}
    assert ("kopf.dev", "clusterkopfpeerings", "get") in keys
    assert not any(group == "kopf.dev" for group, _, _ in (p.key() for p in required_permissions()))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rules_cover_the_code(scenario: str) -> None:
    rule_sets = operator_rules(scenario)
    assert rule_sets
    needed = (*required_permissions(peering_plural(scenario)), *trainer_grants())
    for rules in rule_sets:
        missing = [p for p in needed if not rules_allow(rules, *p.key())]
        assert not missing, "\n".join(f"{p.key()} needed by {p.why}" for p in missing)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_secrets_and_no_wildcards(scenario: str) -> None:
    docs = rendered(scenario)
    for role in (*find(docs, "ClusterRole"), *find(docs, "Role")):
        for rule in role["rules"]:
            flat = [*rule["apiGroups"], *rule["resources"], *rule["verbs"]]
            assert "*" not in flat, role["metadata"]["name"]
            assert "secrets" not in rule["resources"], role["metadata"]["name"]
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
    for binding in find(docs, "ClusterRoleBinding"):
        assert binding["roleRef"]["name"] != "cluster-admin"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_operator_cannot_write_what_git_owns(scenario: str) -> None:
    # Only the status subresource is writable: spec, labels and annotations stay Git's (no drift).
    for rules in operator_rules(scenario):
        for verb in ("patch", "update", "create"):
            assert not rules_allow(rules, "visionft.io", "visionfinetunes", verb)
        assert rules_allow(rules, "visionft.io", "visionfinetunes/status", "patch")
