"""Issue 9's operator side on the real control plane: a run over 2 nodes x 4 GPUs becomes an Indexed Job
with a headless Service and the environment torchrun needs, and its pods land on distinct fake GPU nodes.
Gang semantics: one failed pod restarts the whole group (both pods new, again one per node), counted in
status.restarts until spec.runPolicy.backoffLimit runs out; a disruption restarts it without counting, a
config error ends the run at once, a deleted pod stops as a kubelet would stop it and restarts the group,
and suspending the run stops the group without failing it."""

from __future__ import annotations

import pytest
from visionft_api import conditions as cond

from tests.operator.kube import Kube, OperatorProcess, wait_for
from tests.operator.specs import resource, spec

pytestmark = pytest.mark.cluster

INDEX = "batch.kubernetes.io/job-completion-index"


def _running(kube: Kube, name: str, namespace: str) -> list[dict]:
    return [
        p
        for p in kube.pods(name, namespace)
        if (p.get("status") or {}).get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    ]


def _group(
    kube: Kube, name: str, namespace: str, replacing: dict[str, dict] | None = None
) -> dict[str, dict]:
    """The run's two Running pods by completion index, once neither is one of the pods in `replacing`."""
    old = {p["metadata"]["uid"] for p in (replacing or {}).values()}

    def check() -> dict[str, dict] | None:
        pods = [p for p in _running(kube, name, namespace) if p["metadata"]["uid"] not in old]
        return {p["metadata"]["annotations"][INDEX]: p for p in pods} if len(pods) == 2 else None

    return wait_for(check, timeout=90, what=f"two new running pods of {name}")


def _nodes(group: dict[str, dict]) -> set[str]:
    return {p["spec"]["nodeName"] for p in group.values()}


def _restart_events(kube: Kube, namespace: str, name: str) -> list[dict]:
    return [e for e in kube.events(namespace, name) if e["reason"] == cond.REASON_RESTARTING_GROUP]


def _gang(pool: dict[str, str], backoff_limit: int) -> dict:
    return spec(
        **{
            "resources.nodes": 2,
            "resources.gpusPerNode": 4,
            "resources.nodeSelector": pool,
            "runPolicy.backoffLimit": backoff_limit,
        }
    )


POOL = {"visionft.io/test-pool": "multinode"}


@pytest.fixture(scope="module")
def gpu_pool(control_plane) -> dict[str, str]:
    """Two fake nodes of this module's own, 16 GPUs each: room for both pods of a run on one node, so that
    only the anti-affinity can place them apart, and for the pods of a run that a test has just deleted
    (the garbage collector can take ~20 s to delete them); the shared nodes' GPUs stay free for the other
    tests."""
    for index in range(2):
        control_plane.add_gpu_node(f"multinode-{index}", gpus=16, labels=POOL)
    return POOL


def test_two_nodes_by_four_gpus_get_torchrun_and_schedule_apart(
    kube: Kube, namespace: str, operator: OperatorProcess, gpu_pool: dict[str, str]
) -> None:
    name = "gang"
    body = spec(**{"resources.nodes": 2, "resources.gpusPerNode": 4, "resources.nodeSelector": gpu_pool})
    kube.apply(resource(name, namespace, body))
    first = wait_for(
        lambda: pods if len(pods := _running(kube, name, namespace)) == 2 else None,
        timeout=60,
        what="two running pods",
    )
    job = kube.get("job", f"{name}-trainer", namespace)
    assert job is not None
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    service = kube.get("service", f"{name}-trainer", namespace)
    assert service is not None and service["spec"]["clusterIP"] == "None"

    # The scheduler honours the anti-affinity: one pod per fake GPU node, 4 GPUs each.
    assert {p["spec"]["nodeName"] for p in first} == {"multinode-0", "multinode-1"}
    for pod in first:
        assert pod["spec"]["hostname"].startswith(f"{name}-trainer-")
        assert pod["spec"]["subdomain"] == f"{name}-trainer"
        container = pod["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
        assert container["command"][:3] == ["torchrun", "--nproc-per-node=4", "--nnodes=2"]
        env = {e["name"]: e for e in container["env"]}
        assert env["MASTER_ADDR"]["value"] == f"{name}-trainer-0.{name}-trainer"
    indices = sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in first)
    assert indices == ["0", "1"]
    kube.delete("visionfinetunes.visionft.io", name, namespace)


def test_one_failed_pod_restarts_the_whole_group_until_the_restarts_run_out(
    kube: Kube, namespace: str, operator: OperatorProcess, gpu_pool: dict[str, str]
) -> None:
    name = "gang-restart"
    kube.apply(resource(name, namespace, _gang(gpu_pool, backoff_limit=1)))
    first = _group(kube, name, namespace)
    kube.report_progress(name, namespace, {"step": 4, "stage": "Training"}, f"{name}-trainer")
    kube.wait_phase(name, namespace, "Training")

    config_uid = (kube.get("configmap", f"{name}-config", namespace) or {})["metadata"]["uid"]
    # Rank 1 crashes; rank 0 is still running, so only the gang restart can replace it.
    failed = first["1"]
    kube.terminate_pod(failed, exit_code=1, reason="Error", message="RuntimeError: NCCL watchdog timeout")
    second = _group(kube, name, namespace, replacing=first)
    assert sorted(second) == ["0", "1"]
    assert _nodes(second) == {"multinode-0", "multinode-1"}  # again one pod per node
    obj = kube.vft(name, namespace)
    assert obj is not None and obj["status"]["restarts"] == 1
    assert obj["status"]["phase"] != "Failed"
    job = kube.get("job", f"{name}-trainer", namespace)
    assert job is not None and job["metadata"]["annotations"]["visionft.io/restarts"] == "1"
    assert job["metadata"]["uid"] != failed["metadata"]["ownerReferences"][0]["uid"]  # a new attempt
    events = wait_for(lambda: _restart_events(kube, namespace, name), timeout=15, what="a restart Event")
    message = events[0]["message"]
    assert failed["metadata"]["name"] in message and "restart 1 of 1" in message, message
    assert "NCCL watchdog timeout" in message, message
    # The new attempt runs the same trainer config (the same ConfigMap): it resumes from the newest
    # checkpoint under output.uri.
    assert (kube.get("configmap", f"{name}-config", namespace) or {})["metadata"]["uid"] == config_uid

    # Rank 0 of the second attempt fails too: backoffLimit 1 is used up, the run fails.
    kube.terminate_pod(second["0"], exit_code=137, reason="OOMKilled", message="CUDA out of memory")
    obj = kube.wait_phase(name, namespace, "Failed", timeout=60)
    st = obj["status"]
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Failed"]["reason"] == cond.REASON_BACKOFF_LIMIT
    assert second["0"]["metadata"]["name"] in st["message"] and "OOMKilled" in st["message"]
    assert "restarted 1 times" in st["message"], st["message"]
    assert st["restarts"] == 1
    seen = {p["metadata"]["uid"] for group in (first, second) for p in group.values()}
    assert {p["metadata"]["uid"] for p in kube.pods(name, namespace)} <= seen  # no third attempt
    kube.delete("visionfinetunes.visionft.io", name, namespace)


def test_a_disruption_restarts_the_group_uncounted_and_a_config_error_ends_the_run(
    kube: Kube, namespace: str, operator: OperatorProcess, gpu_pool: dict[str, str]
) -> None:
    name = "gang-preempted"
    kube.apply(resource(name, namespace, _gang(gpu_pool, backoff_limit=0)))
    first = _group(kube, name, namespace)
    # Preemption of rank 0: with backoffLimit 0 a counted failure would end the run.
    kube.terminate_pod(first["0"], exit_code=137, reason="Error", message="preempted", disrupted=True)
    second = _group(kube, name, namespace, replacing=first)
    assert _nodes(second) == {"multinode-0", "multinode-1"}
    obj = kube.vft(name, namespace)
    assert obj is not None and obj["status"]["phase"] != "Failed" and not obj["status"].get("restarts")

    kube.terminate_pod(second["1"], exit_code=2, reason="Error", message="visionft-train: invalid config")
    obj = kube.wait_phase(name, namespace, "Failed", timeout=60)
    conds = {c["type"]: c for c in obj["status"]["conditions"]}
    assert conds["Failed"]["reason"] == cond.REASON_POD_FAILED
    assert (
        "invalid config" in obj["status"]["message"]
        and second["1"]["metadata"]["name"] in (obj["status"]["message"])
    )
    seen = {p["metadata"]["uid"] for group in (first, second) for p in group.values()}
    assert {p["metadata"]["uid"] for p in kube.pods(name, namespace)} <= seen  # no restart
    kube.delete("visionfinetunes.visionft.io", name, namespace)


def test_suspend_stops_the_group_and_resume_starts_it_again(
    kube: Kube, namespace: str, operator: OperatorProcess, gpu_pool: dict[str, str]
) -> None:
    name = "gang-suspended"
    kube.apply(resource(name, namespace, _gang(gpu_pool, backoff_limit=0)))
    first = _group(kube, name, namespace)
    kube.patch("vft", name, namespace, {"spec": {"suspend": True}})
    kube.wait_phase(name, namespace, "Suspended")
    # The pods stop (as a kubelet stops them) and go away: their GPUs are free.
    wait_for(lambda: not kube.pods(name, namespace), timeout=60, what="the pods gone")
    assert kube.phase(name, namespace) == "Suspended"
    kube.patch("vft", name, namespace, {"spec": {"suspend": False}})
    second = _group(kube, name, namespace, replacing=first)
    assert _nodes(second) == {"multinode-0", "multinode-1"}
    obj = kube.vft(name, namespace)
    assert obj is not None and obj["status"]["phase"] != "Failed" and not obj["status"].get("restarts")
    kube.delete("visionfinetunes.visionft.io", name, namespace)


def test_a_deleted_pod_stops_like_a_kubelet_stops_it_and_restarts_the_group(
    kube: Kube, namespace: str, operator: OperatorProcess, gpu_pool: dict[str, str]
) -> None:
    # kwok's pod-terminate stage ends the deleted pod's container (exit code 143) and fails the pod. Only
    # then does the Job controller let go of it (its podFailurePolicy needs the exit code); without that
    # stage the pod stayed Terminating and nothing else happened.
    name = "gang-deleted"
    kube.apply(resource(name, namespace, _gang(gpu_pool, backoff_limit=1)))
    first = _group(kube, name, namespace)
    kube.delete("pod", first["0"]["metadata"]["name"], namespace)
    second = _group(kube, name, namespace, replacing=first)
    assert _nodes(second) == {"multinode-0", "multinode-1"}
    obj = kube.vft(name, namespace)
    assert obj is not None and obj["status"]["restarts"] == 1
    events = wait_for(lambda: _restart_events(kube, namespace, name), timeout=15, what="a restart Event")
    assert "exit code 143" in events[0]["message"], events[0]["message"]
    kube.delete("visionfinetunes.visionft.io", name, namespace)
