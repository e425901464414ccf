"""The Helm chart, offline: `helm lint`, `helm template` for every value set, and what the rendered objects
must say (strategy, env names the operator reads, probes, restricted securityContext, scoping, peering,
monitoring, NetworkPolicy). Applying them to the real apiserver is in test_cluster.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from visionft_api.crd import CRD_FILENAME, render_crd
from visionft_operator.config import Config

from tests.deploy.helm import CHART, RELEASE_NAMESPACE, SCENARIOS, find, helm, rendered

REPO = Path(__file__).resolve().parents[2]


def test_chart_crd_is_the_generated_crd() -> None:
    chart_crd = (CHART / "crds" / CRD_FILENAME).read_bytes()
    assert chart_crd == (REPO / "crds" / CRD_FILENAME).read_bytes()
    assert chart_crd.decode() == render_crd()


def test_values_are_all_documented_in_the_readme() -> None:
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, re.M))

    def leaves(node: object, prefix: str = "") -> list[str]:
        if isinstance(node, dict) and node:
            return [leaf for key, value in node.items() for leaf in leaves(value, f"{prefix}{key}.")]
        return [prefix.rstrip(".")]

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [key for key in leaves(values) if key not in documented]
    assert not missing, f"charts/visionft/README.md lacks rows for {missing}"


def test_values_schema_covers_every_top_level_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) <= set(schema["properties"])
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_helm_lint(scenario: str) -> None:
    helm("lint", "--strict", str(CHART), "--namespace", RELEASE_NAMESPACE, *SCENARIOS[scenario])


def _deployment(scenario: str) -> dict:
    (deployment,) = find(rendered(scenario), "Deployment")
    return deployment


def _env(deployment: dict) -> dict[str, str]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {item["name"]: item.get("value", "") for item in container["env"]}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_env_names_are_settings_the_operator_reads(scenario: str) -> None:
    settings = {f"VISIONFT_{name.upper()}" for name in vars(Config())}
    env = _env(_deployment(scenario))
    unknown = {name for name in env if name.startswith("VISIONFT_")} - settings
    assert not unknown, f"the operator's Config has no attribute for {unknown}"
    # Every value parses the way Config.from_env reads it.
    Config.from_env(env)


def test_default_render() -> None:
    docs = rendered("default")
    deployment = _deployment("default")
    spec = deployment["spec"]
    assert spec["strategy"] == {"type": "Recreate"}
    assert spec["replicas"] == 1
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/visionft/operator:0.1.0"
    env = _env(deployment)
    config = Config.from_env(env)
    assert config.namespaces == []
    assert config.peering is False
    assert config.trainer_image == "ghcr.io/visionft/trainer:0.1.0"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"liveness": config.liveness_port, "metrics": config.metrics_port}
    # Kopf's health endpoint opens once the operator has started: Ready waits for it, and the liveness
    # probe only starts counting once the startup probe has seen it.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "liveness"}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, startup
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    # Pod Security Standard "restricted".
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # Cluster-wide RBAC, the metrics Service, the policy ConfigMap; nothing optional.
    assert find(docs, "ClusterRole", "visionft") and find(docs, "ClusterRoleBinding", "visionft")
    assert not find(docs, "Role")
    (service,) = find(docs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    (config_map,) = find(docs, "ConfigMap")
    assert yaml.safe_load(config_map["data"]["policy.yaml"]) == {}
    assert env["VISIONFT_POLICY_FILE"].endswith("/policy.yaml")
    for kind in ("ServiceMonitor", "NetworkPolicy", "ClusterKopfPeering", "KopfPeering"):
        assert not find(docs, kind), kind


def test_namespaced_mode_grants_only_the_listed_namespaces() -> None:
    docs = rendered("namespaced")
    assert Config.from_env(_env(_deployment("namespaced"))).namespaces == ["team-a", "team-b"]
    for namespace in ("team-a", "team-b"):
        (role,) = find(docs, "Role", namespace=namespace)
        assert any("visionfinetunes" in rule["resources"] for rule in role["rules"])
        (binding,) = find(docs, "RoleBinding", namespace=namespace)
        assert binding["subjects"][0]["namespace"] == RELEASE_NAMESPACE
    # The only ClusterRole is the read-only discovery one (CRDs and namespaces).
    (cluster_role,) = find(docs, "ClusterRole")
    for rule in cluster_role["rules"]:
        assert set(rule["verbs"]) <= {"list", "watch"}
        assert set(rule["resources"]) <= {"customresourcedefinitions", "namespaces"}


def test_peering_mode() -> None:
    docs = rendered("peering")
    deployment = _deployment("peering")
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert deployment["spec"]["replicas"] == 2
    env = Config.from_env(_env(deployment))
    assert env.peering is True
    (peering,) = find(docs, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == env.peering_name
    (discovery,) = find(docs, "ClusterRole", "visionft-discovery")
    assert any(rule["resources"] == ["clusterkopfpeerings"] for rule in discovery["rules"])


def test_namespaced_peering_mode() -> None:
    docs = rendered("namespaced-peering")
    assert {doc["metadata"]["namespace"] for doc in find(docs, "KopfPeering")} == {"team-a", "team-b"}
    for role in find(docs, "Role"):
        assert any(rule["resources"] == ["kopfpeerings"] for rule in role["rules"])


def test_more_replicas_need_peering() -> None:
    result = helm("template", "x", str(CHART), "--set", "replicaCount=2", check=False)
    assert result.returncode != 0
    assert "needs peering.enabled=true" in result.stderr


def test_schema_rejects_unknown_and_mistyped_values() -> None:
    for args in (
        ["--set", "nosuchvalue=1"],
        ["--set", "operator.logFormat=xml"],
        ["--set", "replicaCount=two"],
    ):
        result = helm("template", "x", str(CHART), *args, check=False)
        assert result.returncode != 0, args


def test_monitoring_and_network_policy() -> None:
    docs = rendered("monitoring")
    (monitor,) = find(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    (policy,) = find(docs, "NetworkPolicy")
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    api_rule = policy["spec"]["egress"][0]
    assert api_rule["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}]
    assert {port["port"] for port in api_rule["ports"]} == {443, 6443}
    assert policy["spec"]["ingress"][0]["ports"] == [{"port": "metrics", "protocol": "TCP"}]


def test_policy_is_the_operators_default_config() -> None:
    from visionft_operator.policy import Policy

    docs = rendered("policy")
    (config_map,) = find(docs, "ConfigMap")
    policy = Policy.load(config_map["data"]["policy.yaml"])
    assert policy.for_namespace("team-a").max_concurrent_jobs == 2
    assert policy.for_namespace("team-b").max_gpus_per_job == 8
    env = _env(_deployment("policy"))
    assert env["VISIONFT_TRAINER_IMAGE"] == "ghcr.io/visionft/trainer@sha256:" + "a" * 64
