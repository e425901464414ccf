"""Issue 9's operator side on the real control plane: a run over 2 nodes x 4 GPUs becomes an Indexed Job
with a headless Service and the environment torchrun needs, and its pods land on distinct fake GPU nodes.
Gang semantics: one failed pod restarts the whole group (both pods new, again one per node), counted in
status.restarts until spec.runPolicy.backoffLimit runs out (status.attempts counts every attempt's pods);
each attempt gets only what is left of spec.runPolicy.activeDeadlineSeconds, and none starts once it has
run out; a disruption restarts the group without counting, a config error ends the run at once, a
deleted pod stops as a kubelet would stop it and restarts the group, and suspending the run stops the
group without failing it."""

from __future__ import annotations

import pytest
from visionft_api import conditions as cond

from tests.operator.kube import Kube, OperatorProcess, wait_for
from tests.operator.specs import resource, spec

pytestmark = pytest.mark.cluster

INDEX = "batch.kubernetes.io/job-completion-index"
POOL = {"visionft.io/test-pool": "multinode"}
NODES = {"multinode-0", "multinode-1"}


@pytest.fixture(scope="module")
def gpu_pool(control_plane) -> dict[str, str]:
    """Two fake nodes of this module's own, 16 GPUs each: room for both pods of a run on one node, so that
    only the anti-affinity can place them apart, and for the pods of a run that a test has just deleted
    (the garbage collector can take ~20 s to delete them); the shared nodes' GPUs stay free for the other
    tests."""
    for node in sorted(NODES):
        control_plane.add_gpu_node(node, gpus=16, labels=POOL)
    return POOL


def _gang(pool: dict[str, str], backoff_limit: int = 0, deadline: int | None = None) -> dict:
    return spec(
        **{
            "resources.nodes": 2,
            "resources.gpusPerNode": 4,
            "resources.nodeSelector": pool,
            "runPolicy.backoffLimit": backoff_limit,
            "runPolicy.activeDeadlineSeconds": deadline,
        }
    )


def _running(kube: Kube, name: str, namespace: str) -> list[dict]:
    return [
        p
        for p in kube.pods(name, namespace)
        if (p.get("status") or {}).get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    ]


def _group(
    kube: Kube, name: str, namespace: str, replacing: dict[str, dict] | None = None
) -> dict[str, dict]:
    """The run's two Running pods by completion index, once neither is one of the pods in ``replacing``;
    each attempt's pods land one per node (the scheduler honours the anti-affinity)."""
    old = {p["metadata"]["uid"] for p in (replacing or {}).values()}

    def check() -> dict[str, dict] | None:
        pods = [p for p in _running(kube, name, namespace) if p["metadata"]["uid"] not in old]
        return {p["metadata"]["annotations"][INDEX]: p for p in pods} if len(pods) == 2 else None

    group = wait_for(check, timeout=90, what=f"two new running pods of {name}")
    assert sorted(group) == ["0", "1"]
    assert {p["spec"]["nodeName"] for p in group.values()} == NODES
    return group


def _job(kube: Kube, name: str, namespace: str) -> dict:
    job = kube.get("job", f"{name}-trainer", namespace)
    assert job is not None
    return job


def _status(kube: Kube, name: str, namespace: str) -> dict:
    return (kube.vft(name, namespace) or {}).get("status") or {}


def _failed(kube: Kube, name: str, namespace: str, reason: str) -> dict:
    """The status once the run failed, for ``reason`` (the Failed and Stalled conditions')."""
    status = kube.wait_phase(name, namespace, "Failed", timeout=60)["status"]
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["Failed"]["reason"] == conds["Stalled"]["reason"] == reason, conds
    return status


def _no_other_attempt(kube: Kube, name: str, namespace: str, *groups: dict[str, dict]) -> None:
    seen = {p["metadata"]["uid"] for group in groups for p in group.values()}
    assert {p["metadata"]["uid"] for p in kube.pods(name, namespace)} <= seen


def _restart_events(kube: Kube, namespace: str, name: str) -> list[dict]:
    return [e for e in kube.events(namespace, name) if e["reason"] == cond.REASON_RESTARTING_GROUP]


def test_two_nodes_by_four_gpus_get_torchrun_and_schedule_apart(
    kube: Kube, namespace: str, operator: OperatorProcess, gpu_pool: dict[str, str]
) -> None:
    name = "gang"
    kube.apply(resource(name, namespace, _gang(gpu_pool, backoff_limit=3)))
    first = _group(kube, name, namespace)  # one pod per fake GPU node
    job = _job(kube, name, namespace)
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    service = kube.get("service", f"{name}-trainer", namespace)
    assert service is not None and service["spec"]["clusterIP"] == "None"
    for pod in first.values():
        assert pod["spec"]["hostname"].startswith(f"{name}-trainer-")
        assert pod["spec"]["subdomain"] == f"{name}-trainer"
        container = pod["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
        assert container["command"][:3] == ["torchrun", "--nproc-per-node=4", "--nnodes=2"]
        env = {e["name"]: e for e in container["env"]}
        assert env["MASTER_ADDR"]["value"] == f"{name}-trainer-0.{name}-trainer"
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
    status = _status(kube, name, namespace)
    assert status["restarts"] == 1 and status["phase"] != "Failed"
    # status.attempts counts the pods of the whole run: both attempts' 2.
    wait_for(lambda: _status(kube, name, namespace).get("attempts") == 4, timeout=15, what="attempts 4")
    job = _job(kube, name, namespace)
    assert job["metadata"]["annotations"]["visionft.io/restarts"] == "1"
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
    status = _failed(kube, name, namespace, cond.REASON_BACKOFF_LIMIT)
    assert second["0"]["metadata"]["name"] in status["message"] and "OOMKilled" in status["message"]
    assert "restarted 1 times" in status["message"], status["message"]
    assert status["restarts"] == 1 and status["attempts"] == 4
    _no_other_attempt(kube, name, namespace, first, second)
    kube.delete("visionfinetunes.visionft.io", name, namespace)


def test_the_deadline_bounds_the_whole_run_across_group_restarts(
    kube: Kube, namespace: str, operator: OperatorProcess, gpu_pool: dict[str, str]
) -> None:
    name = "gang-deadline"
    kube.apply(resource(name, namespace, _gang(gpu_pool, backoff_limit=3, deadline=3600)))
    first = _group(kube, name, namespace)
    assert _job(kube, name, namespace)["spec"]["activeDeadlineSeconds"] == 3600
    # The run has been going for 1000 s when rank 1 fails: the next attempt gets what is left.
    kube.started_ago(name, namespace, 1000)
    kube.terminate_pod(first["1"], exit_code=1, reason="Error", message="NCCL watchdog timeout")
    second = _group(kube, name, namespace, replacing=first)
    job = _job(kube, name, namespace)
    assert job["metadata"]["annotations"]["visionft.io/restarts"] == "1"
    left = job["spec"]["activeDeadlineSeconds"]
    assert 2600 - 60 <= left <= 2600, left
    assert job["metadata"]["annotations"]["visionft.io/elapsed-seconds"] == str(3600 - left)

    # Once the deadline has run out, a failure ends the run instead of starting a third attempt.
    kube.started_ago(name, namespace, 3600)
    kube.terminate_pod(second["0"], exit_code=1, reason="Error", message="NCCL watchdog timeout")
    status = _failed(kube, name, namespace, cond.REASON_DEADLINE_EXCEEDED)
    assert "activeDeadlineSeconds (3600 s) has run out" in status["message"], status["message"]
    assert second["0"]["metadata"]["name"] in status["message"], status["message"]
    assert status["restarts"] == 1 and status["attempts"] == 4
    _no_other_attempt(kube, name, namespace, first, second)
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
    status = _status(kube, name, namespace)
    assert status["phase"] != "Failed" and not status.get("restarts")

    kube.terminate_pod(second["1"], exit_code=2, reason="Error", message="visionft-train: invalid config")
    status = _failed(kube, name, namespace, cond.REASON_POD_FAILED)
    assert "invalid config" in status["message"] and second["1"]["metadata"]["name"] in status["message"]
    _no_other_attempt(kube, name, namespace, first, second)  # no restart
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
    _group(kube, name, namespace, replacing=first)
    status = _status(kube, name, namespace)
    assert status["phase"] != "Failed" and not status.get("restarts")
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
    _group(kube, name, namespace, replacing=first)
    assert _status(kube, name, namespace)["restarts"] == 1
    events = wait_for(lambda: _restart_events(kube, namespace, name), timeout=15, what="a restart Event")
    assert "exit code 143" in events[0]["message"], events[0]["message"]
    kube.delete("visionfinetunes.visionft.io", name, namespace)
