"""Issue 8 on the real control plane: the per-namespace policy (capacity waits and starts when capacity
frees; hard rules fail naming rule and limit; defaults reach the pods), ResourceQuota and Kueue side by
side, Pod Security "restricted", a missing Secret or key named in a condition, and no planted secret value
anywhere the operator writes."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.operator.kube import Kube, OperatorProcess, wait_for
from tests.operator.specs import resource, spec

pytestmark = pytest.mark.cluster

NS = "vft-policy"
NS_QUOTA = "vft-quota"
NS_PSS = "vft-pss"
POLICY = {
    "defaults": {
        "maxGpusPerJob": 4,
        "allowedImages": ["ghcr.io/visionft/"],
        "allowedStorageEndpoints": ["http://s3.storage.svc"],
        "allowTrustRemoteCode": False,
        "tolerations": [{"key": "visionft.io/training", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "namespaces": {NS: {"maxGpusPerNamespace": 1, "maxConcurrentJobs": 2}},
}
SECRET = {"AWS_ACCESS_KEY_ID": "planted-key-id-4242", "AWS_SECRET_ACCESS_KEY": "planted-secret-value-4242"}


@pytest.fixture(scope="module")
def namespaces(kube: Kube) -> Iterator[list[str]]:
    made = [
        kube.namespace(NS),
        kube.namespace(NS_QUOTA),
        kube.namespace(
            NS_PSS,
            {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            },
        ),
    ]
    for ns in made:
        kube.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "s3-creds", "namespace": ns},
                "stringData": SECRET,
            }
        )
    yield made
    for ns in made:
        kube.run("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture(scope="module")
def policy_operator(
    kube: Kube, namespaces: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    proc = OperatorProcess(
        kube.kubeconfig, namespaces, log, env={"VISIONFT_POLICY": json.dumps(POLICY)}
    ).start()
    yield proc
    proc.stop()


def _condition(kube: Kube, name: str, ns: str, type_: str) -> dict:
    obj = kube.vft(name, ns) or {}
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_), {})


def test_gpu_limit_per_namespace_waits_then_starts(kube: Kube, policy_operator: OperatorProcess) -> None:
    kube.apply(resource("first", NS))
    first = kube.wait_pod("first", NS)
    kube.apply(resource("second", NS))
    obj = kube.wait_phase("second", NS, "Pending")
    wait_for(
        lambda: _condition(kube, "second", NS, "Admitted").get("reason") == "PolicyLimitReached",
        timeout=30,
        what="Admitted=False",
    )
    admitted = _condition(kube, "second", NS, "Admitted")
    assert admitted["status"] == "False"
    assert "maxGpusPerNamespace" in admitted["message"] and "limit is 1" in admitted["message"], admitted
    assert kube.get("job", "second-trainer", NS) is None
    assert obj["status"]["phase"] == "Pending"
    # Capacity frees: the waiting run starts.
    kube.terminate_pod(first, exit_code=0)
    kube.wait_phase("first", NS, "Succeeded")
    kube.wait_pod("second", NS)
    kube.wait_phase("second", NS, "Initializing")
    assert _condition(kube, "second", NS, "Admitted")["status"] == "True"


def test_policy_defaults_reach_the_pod(kube: Kube, policy_operator: OperatorProcess) -> None:
    job = wait_for(lambda: kube.get("job", "second-trainer", NS), timeout=30, what="Job")
    tolerations = job["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "visionft.io/training", "operator": "Exists", "effect": "NoSchedule"} in tolerations


@pytest.mark.parametrize(
    ("name", "overrides", "rule", "limit"),
    [
        ("image", {"image": "docker.io/someone/trainer:1"}, "allowedImages", "ghcr.io/visionft/"),
        ("remote-code", {"model.trustRemoteCode": True}, "allowTrustRemoteCode", "trustRemoteCode"),
        ("gpus-per-job", {"resources.gpusPerNode": 8}, "maxGpusPerJob", "4"),
        (
            "endpoint",
            {"storage.endpoint": "http://169.254.169.254"},
            "allowedStorageEndpoints",
            "s3.storage.svc",
        ),
    ],
)
def test_hard_rules_fail_naming_rule_and_limit(
    kube: Kube, policy_operator: OperatorProcess, name: str, overrides: dict, rule: str, limit: str
) -> None:
    kube.apply(resource(f"deny-{name}", NS, spec(**overrides)))
    obj = kube.wait_phase(f"deny-{name}", NS, "Failed", timeout=30)
    stalled = _condition(kube, f"deny-{name}", NS, "Stalled")
    assert stalled["reason"] == "PolicyViolation"
    assert rule in stalled["message"] and limit in stalled["message"], stalled
    assert rule in obj["status"]["message"]
    assert kube.get("job", f"deny-{name}-trainer", NS) is None


def test_resource_quota_blocking_pods_is_surfaced(kube: Kube, policy_operator: OperatorProcess) -> None:
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": "gpu-quota", "namespace": NS_QUOTA},
            "spec": {"hard": {"requests.nvidia.com/gpu": "0"}},
        }
    )
    wait_for(
        lambda: (kube.get("resourcequota", "gpu-quota", NS_QUOTA) or {}).get("status", {}).get("hard"),
        timeout=30,
        what="quota status",
    )
    kube.apply(resource("over-quota", NS_QUOTA))
    wait_for(
        lambda: _condition(kube, "over-quota", NS_QUOTA, "Admitted").get("reason") == "ResourceQuotaExceeded",
        timeout=60,
        what="ResourceQuotaExceeded",
    )
    admitted = _condition(kube, "over-quota", NS_QUOTA, "Admitted")
    assert "gpu-quota" in admitted["message"] and "exceeded quota" in admitted["message"]
    assert kube.phase("over-quota", NS_QUOTA) == "Pending"
    # Raising the quota lets the Job's next attempt create the pod.
    kube.patch("resourcequota", "gpu-quota", NS_QUOTA, {"spec": {"hard": {"requests.nvidia.com/gpu": "4"}}})
    kube.wait_pod("over-quota", NS_QUOTA, timeout=90)


def test_pod_security_restricted_admits_training_pods(kube: Kube, policy_operator: OperatorProcess) -> None:
    kube.apply(resource("restricted", NS_PSS))
    kube.wait_pod("restricted", NS_PSS)
    # The namespace really enforces "restricted": a pod without the hardening is refused.
    bad = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "bad", "namespace": NS_PSS},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }
    result = kube.apply(bad, check=False)
    assert result.returncode != 0 and "restricted" in result.stderr, result.stderr


def test_missing_secret_and_key_are_named(kube: Kube, policy_operator: OperatorProcess) -> None:
    kube.apply(resource("no-secret", NS_PSS, spec(**{"storage.credentialsSecret": "does-not-exist"})))
    pod = kube.wait_pod("no-secret", NS_PSS)
    # What the kubelet reports when it can't build the container's environment.
    kube.container_waiting(pod, "CreateContainerConfigError", 'secret "does-not-exist" not found')
    wait_for(
        lambda: _condition(kube, "no-secret", NS_PSS, "Stalled").get("reason") == "MissingSecret",
        timeout=30,
        what="MissingSecret",
    )
    stalled = _condition(kube, "no-secret", NS_PSS, "Stalled")
    assert (
        stalled["status"] == "True"
        and "does-not-exist" in stalled["message"]
        and "credentialsSecret" in stalled["message"]
    )
    kube.apply(resource("no-key", NS_PSS, spec(**{"storage.accessKeyIdKey": "WRONG_KEY"})))
    pod = kube.wait_pod("no-key", NS_PSS)
    kube.container_waiting(
        pod, "CreateContainerConfigError", f"couldn't find key WRONG_KEY in Secret {NS_PSS}/s3-creds"
    )
    wait_for(
        lambda: _condition(kube, "no-key", NS_PSS, "Stalled").get("reason") == "MissingSecretKey",
        timeout=30,
        what="MissingSecretKey",
    )
    assert "WRONG_KEY" in _condition(kube, "no-key", NS_PSS, "Stalled")["message"]


def test_planted_secret_values_leak_nowhere(
    kube: Kube, namespaces: list[str], policy_operator: OperatorProcess
) -> None:
    places = [policy_operator.logs()]
    for ns in namespaces:
        for kind in ("visionfinetunes.visionft.io", "configmaps", "events", "jobs", "pods"):
            places.append(kube.run("get", kind, "-n", ns, "-o", "json").stdout)
    for value in SECRET.values():
        for text in places:
            assert value not in text
