"""Issue 5's lifecycle on the real control plane (kwok nodes with fake GPUs), with the real
``visionft-operator`` process: success with outputs, a failing pod, a retry, suspend and resume, spec
changes while running, deletion with garbage collection, TTL, Kueue's queueName, metrics and liveness.

The trainer's status reports are made as the trainer would make them: server-side apply of
status.progress through the apiserver, as the run's own ServiceAccount. A container's exit is written to
the pod's status as the kubelet would report it (kwok simulates no containers)."""

from __future__ import annotations

import json
import urllib.request

import pytest
from visionft_api import conditions as cond

from tests.operator.kube import Kube, OperatorProcess, wait_for
from tests.operator.specs import resource, spec

pytestmark = pytest.mark.cluster

CHILDREN = [
    ("serviceaccount", "trainer"),
    ("role", "trainer"),
    ("rolebinding", "trainer"),
    ("configmap", "config"),
    ("job", "trainer"),
]


def _progress(step: int, total: int, loss: float, stage: str = "Training") -> dict:
    return {
        "step": step,
        "totalSteps": total,
        "percent": step * 100 // total,
        "summary": f"{step}/{total} ({step * 100 // total}%)",
        "loss": loss,
        "learningRate": 2e-4,
        "etaSeconds": (total - step) * 3,
        "eta": f"{(total - step) * 3}s",
        "stage": stage,
    }


def test_full_lifecycle_reaches_succeeded_with_outputs(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    name = "life"
    kube.apply(resource(name, namespace, spec(**{"output.saveMethod": "merged_16bit"})))
    for kind, suffix in CHILDREN:
        wait_for(
            lambda kind=kind, suffix=suffix: kube.get(kind, f"{name}-{suffix}", namespace),
            timeout=30,
            what=kind,
        )
    pod = kube.wait_pod(name, namespace)
    kube.wait_phase(name, namespace, "Initializing")
    sa = f"{name}-trainer"
    kube.report_progress(name, namespace, _progress(0, 10, 0.0, stage="Loading"), sa)
    kube.report_progress(name, namespace, _progress(4, 10, 1.83), sa)
    obj = kube.wait_phase(name, namespace, "Training")
    assert obj["status"]["startTime"]
    table = kube.run("get", "vft", name, "-n", namespace).stdout
    assert "Training" in table and "4/10 (40%)" in table and "1.83" in table and "18s" in table, table
    kube.report_progress(name, namespace, _progress(10, 10, 0.91, stage="Uploading"), sa)
    kube.wait_phase(name, namespace, "Uploading")
    kube.terminate_pod(pod, exit_code=0)
    obj = kube.wait_phase(name, namespace, "Succeeded")
    st = obj["status"]
    assert st["outputs"]["adapterUri"] == "s3://outputs/team-a/latex-ocr/adapter/"
    assert st["outputs"]["mergedUri"] == "s3://outputs/team-a/latex-ocr/merged/"
    assert st["completionTime"] and st["attempts"] == 1 and st["jobName"] == f"{name}-trainer"
    assert st["observedGeneration"] == obj["metadata"]["generation"]
    # The trainer's progress survived every operator status write.
    assert st["progress"]["loss"] == 0.91 and st["progress"]["summary"] == "10/10 (100%)"
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Ready"]["status"] == "True" and conds["Complete"]["status"] == "True"
    assert conds["Stalled"]["status"] == "False" and conds["Reconciling"]["status"] == "False"
    # The operator wrote no spec, labels, annotations or finalizers (GitOps).
    assert obj["metadata"]["generation"] == 1  # the spec was never written after creation
    assert set(obj["metadata"].get("annotations") or {}) <= {
        "kubectl.kubernetes.io/last-applied-configuration"
    }
    assert not obj["metadata"].get("finalizers") and not obj["metadata"].get("labels")
    managed = json.loads(
        kube.run("get", "vft", name, "-n", namespace, "-o", "json", "--show-managed-fields").stdout
    )["metadata"]["managedFields"]
    operator_writes = [m for m in managed if m["manager"] == "visionft-operator"]
    assert operator_writes and all(m.get("subresource") == "status" for m in operator_writes)
    # progress is the trainer's, everything else the operator's: two field managers, no overlap.
    managers = {m["manager"]: m for m in managed if m.get("subresource") == "status"}
    assert "visionft-trainer" in managers and "visionft-operator" in managers
    assert "f:progress" in managers["visionft-trainer"]["fieldsV1"]["f:status"]
    assert "f:progress" not in managers["visionft-operator"]["fieldsV1"]["f:status"]
    # An Event on every transition. Kopf posts Events from a background queue, so they may trail the
    # status by a moment.
    wanted = {"Initializing", "Training", "Uploading", "Succeeded"}
    try:
        wait_for(
            lambda: wanted <= {e["reason"] for e in kube.events(namespace, name)},
            timeout=15,
            what="an Event for every transition",
        )
    except TimeoutError:
        raise AssertionError([e["reason"] for e in kube.events(namespace, name)]) from None
    # kubectl wait understands the kstatus condition.
    kube.run("wait", "--for=condition=Ready", f"vft/{name}", "-n", namespace, "--timeout=10s")


def test_failing_pod_ends_failed_with_the_pods_reason(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    name = "fails"
    kube.apply(resource(name, namespace, spec(**{"runPolicy.backoffLimit": 0})))
    pod = kube.wait_pod(name, namespace)
    kube.terminate_pod(
        pod, exit_code=137, reason="OOMKilled", message="CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    obj = kube.wait_phase(name, namespace, "Failed")
    message = obj["status"]["message"]
    assert "OOMKilled" in message and "exit code 137" in message and "CUDA out of memory" in message, message
    conds = {c["type"]: c for c in obj["status"]["conditions"]}
    assert conds["Stalled"]["status"] == "True" and conds["Failed"]["status"] == "True"
    assert conds["Failed"]["reason"] == "BackoffLimitExceeded"
    warnings = [e for e in kube.events(namespace, name) if e["type"] == "Warning"]
    assert any("OOMKilled" in e["message"] for e in warnings), warnings


def test_config_error_exit_code_fails_without_retry(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    name = "bad-config"
    kube.apply(resource(name, namespace, spec(**{"runPolicy.backoffLimit": 3})))
    pod = kube.wait_pod(name, namespace)
    kube.terminate_pod(pod, exit_code=2, reason="Error", message="visionft-train: invalid config")
    obj = kube.wait_phase(name, namespace, "Failed")
    assert "PodFailurePolicy" in obj["status"]["message"] and "invalid config" in obj["status"]["message"]
    assert len(kube.pods(name, namespace)) == 1  # no retry


def test_retry_after_a_failed_pod_then_success(kube: Kube, namespace: str, operator: OperatorProcess) -> None:
    name = "retry"
    kube.apply(resource(name, namespace, spec(**{"runPolicy.backoffLimit": 2})))
    first = kube.wait_pod(name, namespace)
    kube.terminate_pod(first, exit_code=1, reason="Error", message="NCCL timeout")
    second = kube.wait_pod(name, namespace, exclude={first["metadata"]["name"]}, timeout=90)
    kube.wait_phase(name, namespace, "Initializing", "Training")
    kube.terminate_pod(second, exit_code=0)
    obj = kube.wait_phase(name, namespace, "Succeeded")
    assert obj["status"]["attempts"] == 2


def test_disruptions_do_not_count_against_backoff_limit(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    name = "preempted"
    kube.apply(resource(name, namespace, spec(**{"runPolicy.backoffLimit": 0})))
    first = kube.wait_pod(name, namespace)
    kube.terminate_pod(first, exit_code=137, reason="Error", message="killed", disrupted=True)
    # With backoffLimit 0 a counted failure would end the run; a disruption gets a new pod instead.
    second = kube.wait_pod(name, namespace, exclude={first["metadata"]["name"]}, timeout=60)
    assert kube.phase(name, namespace) != "Failed"
    kube.terminate_pod(second, exit_code=0)
    kube.wait_phase(name, namespace, "Succeeded")


def test_suspend_and_resume(kube: Kube, namespace: str, operator: OperatorProcess) -> None:
    name = "pausable"
    kube.apply(resource(name, namespace))
    first = kube.wait_pod(name, namespace)
    kube.report_progress(name, namespace, _progress(3, 10, 1.5), f"{name}-trainer")
    kube.wait_phase(name, namespace, "Training")
    kube.patch("vft", name, namespace, {"spec": {"suspend": True}})
    kube.wait_phase(name, namespace, "Suspended")
    job = kube.get("job", f"{name}-trainer", namespace)
    assert job is not None and job["spec"]["suspend"] is True
    wait_for(
        lambda: not [p for p in kube.pods(name, namespace) if not p["metadata"].get("deletionTimestamp")],
        timeout=60,
        what="pods deleted",
    )
    # Resume: the Job runs again (the trainer resumes from its checkpoint).
    kube.patch("vft", name, namespace, {"spec": {"suspend": False}})
    kube.wait_pod(name, namespace, exclude={first["metadata"]["name"]})
    kube.wait_phase(name, namespace, "Initializing", "Training")
    # Suspend, delete the Job behind the operator's back, resume: the Job is made again.
    kube.patch("vft", name, namespace, {"spec": {"suspend": True}})
    kube.wait_phase(name, namespace, "Suspended")
    kube.run("delete", "job", f"{name}-trainer", "-n", namespace, "--cascade=foreground", "--timeout=60s")
    kube.patch("vft", name, namespace, {"spec": {"suspend": False}})
    wait_for(lambda: kube.get("job", f"{name}-trainer", namespace), timeout=30, what="the Job re-created")
    kube.wait_pod(name, namespace)
    kube.wait_phase(name, namespace, "Initializing", "Training")


def test_a_job_deleted_after_the_runs_deadline_ran_out_is_not_made_again(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    # spec.runPolicy.activeDeadlineSeconds bounds the whole run, counted from status.startTime: a new Job
    # would have no time left.
    name = "overdue"
    kube.apply(resource(name, namespace, spec(**{"runPolicy.activeDeadlineSeconds": 3600})))
    kube.wait_pod(name, namespace)
    kube.started_ago(name, namespace, 3600)
    kube.run("delete", "job", f"{name}-trainer", "-n", namespace, "--cascade=foreground", "--timeout=60s")
    obj = kube.wait_phase(name, namespace, "Failed", timeout=30)
    conds = {c["type"]: c for c in obj["status"]["conditions"]}
    assert conds["Failed"]["reason"] == cond.REASON_DEADLINE_EXCEEDED
    assert "activeDeadlineSeconds (3600 s) has run out" in obj["status"]["message"], obj["status"]["message"]
    assert kube.get("job", f"{name}-trainer", namespace) is None


def test_spec_changes_while_running(kube: Kube, namespace: str, operator: OperatorProcess) -> None:
    name = "mutable"
    kube.apply(resource(name, namespace))
    kube.wait_pod(name, namespace)
    kube.wait_phase(name, namespace, "Initializing")
    wait_for(
        lambda: (kube.vft(name, namespace) or {}).get("status", {}).get("startTime"),
        timeout=30,
        what="startTime",
    )
    # Immutable: rejected by the apiserver's CEL rule, naming the field.
    result = kube.patch("vft", name, namespace, {"spec": {"training": {"maxSteps": 99}}}, check=False)
    assert result.returncode != 0 and "spec.training is immutable" in result.stderr, result.stderr
    result = kube.patch("vft", name, namespace, {"spec": {"resources": {"gpusPerNode": 2}}}, check=False)
    assert result.returncode != 0 and "spec.resources" in result.stderr, result.stderr
    # Mutable: applied to the live Job.
    kube.patch("vft", name, namespace, {"spec": {"runPolicy": {"activeDeadlineSeconds": 7200}}})
    wait_for(
        lambda: (
            (kube.get("job", f"{name}-trainer", namespace) or {}).get("spec", {}).get("activeDeadlineSeconds")
            == 7200
        ),
        timeout=30,
        what="activeDeadlineSeconds on the Job",
    )
    obj = kube.vft(name, namespace)
    assert obj is not None
    wait_for(
        lambda: (
            kube.vft(name, namespace)["status"]["observedGeneration"]
            == kube.vft(name, namespace)["metadata"]["generation"]
        ),
        timeout=30,
        what="observedGeneration",
    )


def test_deletion_garbage_collects_children(kube: Kube, namespace: str, operator: OperatorProcess) -> None:
    name = "deleted"
    kube.apply(resource(name, namespace))
    kube.wait_pod(name, namespace)
    kube.run("delete", "vft", name, "-n", namespace, "--timeout=60s")
    for kind, suffix in CHILDREN:
        wait_for(
            lambda kind=kind, suffix=suffix: kube.get(kind, f"{name}-{suffix}", namespace) is None,
            timeout=60,
            what=f"{kind} collected",
        )
    wait_for(lambda: not kube.pods(name, namespace), timeout=60, what="pods collected")


def test_ttl_after_finished_deletes_the_resource(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    name = "ephemeral"
    kube.apply(resource(name, namespace, spec(**{"runPolicy.ttlSecondsAfterFinished": 2})))
    pod = kube.wait_pod(name, namespace)
    kube.terminate_pod(pod, exit_code=0)
    kube.wait_phase(name, namespace, "Succeeded")
    wait_for(lambda: kube.vft(name, namespace) is None, timeout=30, what="the resource deleted by its TTL")


def test_queue_name_creates_a_suspended_job_for_kueue(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    name = "queued"
    kube.apply(resource(name, namespace, spec(queueName="team-a-gpus")))
    job = wait_for(lambda: kube.get("job", f"{name}-trainer", namespace), timeout=30, what="the Job")
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-gpus"
    obj = kube.wait_phase(name, namespace, "Queued")
    assert {c["type"]: c for c in obj["status"]["conditions"]}["Admitted"]["reason"] == "QueuedByKueue"
    assert not kube.pods(name, namespace)
    # Kueue admits the workload by unsuspending the Job; the operator does not suspend it again.
    kube.patch("job", f"{name}-trainer", namespace, {"spec": {"suspend": False}})
    kube.wait_pod(name, namespace)
    kube.wait_phase(name, namespace, "Initializing")


def test_metrics_and_liveness_endpoints(operator: OperatorProcess) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert "visionft_resources{phase=" in text
    assert 'visionft_handler_duration_seconds_count{handler="resource_event"}' in text
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.liveness_port}/healthz", timeout=5) as response:
        assert response.status == 200
