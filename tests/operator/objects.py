"""Wire-form Jobs and pods as the operator's cache holds them, and the status derived from them, for the
tests of the status derivation (no cluster)."""

from __future__ import annotations

from typing import Any

from visionft_operator import status as st
from visionft_operator.policy import PolicyDecision

from tests.operator.specs import resource, spec

T0, T1 = "2026-11-26T10:00:00Z", "2026-11-26T10:05:00Z"
JOB_UID = "job-uid"
#: The scheduler's report on a pod that fits no node.
UNSCHEDULABLE = {
    "type": "PodScheduled",
    "status": "False",
    "reason": "Unschedulable",
    "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
}


def job(
    suspend: bool = False, conditions: list[dict[str, Any]] | None = None, **status: Any
) -> dict[str, Any]:
    return {
        "metadata": {"name": "r-trainer", "uid": JOB_UID},
        "spec": {"suspend": suspend},
        "status": {"conditions": conditions or [], **status},
    }


def pod(phase: str, name: str = "r-trainer-abc", **status: Any) -> dict[str, Any]:
    meta = {"name": name, "creationTimestamp": T0, "ownerReferences": [{"kind": "Job", "uid": JOB_UID}]}
    return {"metadata": meta, "status": {"phase": phase, **status}}


def waiting_pod(reason: str, message: str = "") -> dict[str, Any]:
    """A pending pod whose container waits, as the kubelet reports it."""
    waiting = {"reason": reason, "message": message}
    return pod("Pending", containerStatuses=[{"name": "trainer", "state": {"waiting": waiting}}])


def derive(status: dict[str, Any] | None = None, **kw: Any) -> st.Derived:
    """The derivation at T1 for generation 3 of the base spec (or ``spec=``)."""
    obs = st.Observation(generation=3, spec=kw.pop("spec", spec()), status=status or {}, **kw)
    return st.derive(obs, now=T1)


COMPLETE = [{"type": "Complete", "status": "True"}]
FAILED = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "too many"}]
FRESH = {"step": 4, "totalSteps": 10, "stage": "Training", "updateTime": "2026-11-26T10:00:05Z"}
_PRIORITY = 'pods "r-trainer-x" is forbidden: no PriorityClass with name does-not-exist was found'
_QUOTA = 'pods "r-trainer-x" is forbidden: exceeded quota: gpus, requested: requests.nvidia.com/gpu=1'
_REFUSED = ("Job team-a/r-trainer", 'jobs.batch "r-trainer" is forbidden: ValidatingAdmissionPolicy denied')
_CONFIG = 'secret "s3" not found'


def _inputs(**kw: Any) -> dict[str, Any]:
    return kw


#: Every phase and every stuck state, as derivation inputs, with the phase it reaches, the kstatus that
#: cli-utils must compute for it and the Argo CD health (deploy/argocd/health.lua) it must get.
STATES: list[tuple[str, dict[str, Any], str, str, str]] = [
    ("creating", _inputs(), "Pending", "InProgress", "Progressing"),
    (
        "policy-wait",
        _inputs(policy=PolicyDecision("wait", "maxConcurrentJobs", "waiting for a slot")),
        "Pending",
        "InProgress",
        "Progressing",
    ),
    (
        "queued",
        _inputs(spec=spec(queueName="q"), job=job(suspend=True)),
        "Queued",
        "InProgress",
        "Progressing",
    ),
    (
        "initializing",
        _inputs(job=job(active=1), pods=[pod("Pending")]),
        "Initializing",
        "InProgress",
        "Progressing",
    ),
    (
        "training",
        _inputs(status={"progress": FRESH}, job=job(active=1), pods=[pod("Running")]),
        "Training",
        "InProgress",
        "Progressing",
    ),
    (
        "uploading",
        _inputs(
            status={"progress": {**FRESH, "stage": "Uploading"}}, job=job(active=1), pods=[pod("Running")]
        ),
        "Uploading",
        "InProgress",
        "Progressing",
    ),
    (
        "suspended",
        _inputs(spec=spec(suspend=True), job=job(suspend=True)),
        "Suspended",
        "InProgress",
        "Suspended",
    ),
    ("succeeded", _inputs(job=job(conditions=COMPLETE, succeeded=1)), "Succeeded", "Current", "Healthy"),
    (
        "failed",
        _inputs(job=job(conditions=FAILED, failed=1), pods=[pod("Failed")]),
        "Failed",
        "Failed",
        "Degraded",
    ),
    ("invalid-spec", _inputs(spec_error="spec.training: set exactly one"), "Failed", "Failed", "Degraded"),
    (
        "policy-violation",
        _inputs(policy=PolicyDecision("deny", "allowedImages", "policy allowedImages: no")),
        "Failed",
        "Failed",
        "Degraded",
    ),
    (
        "deadline",
        _inputs(group=("Failed", "DeadlineExceeded", "DeadlineExceeded: out of time")),
        "Failed",
        "Failed",
        "Degraded",
    ),
    (
        "restarting-group",
        _inputs(group=("Pending", "RestartingGroup", "restarting")),
        "Pending",
        "InProgress",
        "Progressing",
    ),
    # The runs that can't start.
    ("child-rejected", _inputs(rejected=_REFUSED), "Pending", "Failed", "Degraded"),
    (
        "name-taken",
        _inputs(name_taken=("Job team-a/r-trainer", "VisionFineTune r (uid old)")),
        "Pending",
        "InProgress",
        "Progressing",
    ),
    ("failed-create", _inputs(job=job(active=0), failed_create=_PRIORITY), "Pending", "Failed", "Degraded"),
    ("quota", _inputs(job=job(active=0), failed_create=_QUOTA), "Pending", "InProgress", "Progressing"),
    (
        "unschedulable",
        _inputs(job=job(active=1), pods=[pod("Pending", conditions=[UNSCHEDULABLE])]),
        "Pending",
        "InProgress",
        "Progressing",
    ),
    (
        "image-pull-backoff",
        _inputs(job=job(active=1), pods=[waiting_pod("ImagePullBackOff")]),
        "Pending",
        "Failed",
        "Degraded",
    ),
    (
        "err-image-pull",
        _inputs(job=job(active=1), pods=[waiting_pod("ErrImagePull")]),
        "Pending",
        "Failed",
        "Degraded",
    ),
    (
        "missing-secret",
        _inputs(job=job(active=1), pods=[waiting_pod("CreateContainerConfigError", _CONFIG)]),
        "Pending",
        "Failed",
        "Degraded",
    ),
    (
        "container-config",
        _inputs(job=job(active=1), pods=[waiting_pod("CreateContainerConfigError", "bad config")]),
        "Pending",
        "Failed",
        "Degraded",
    ),
]


def derived_resource(inputs: dict[str, Any], generation: int = 3) -> tuple[dict[str, Any], st.Derived]:
    """A VisionFineTune whose status the operator derived from ``inputs`` (a STATES entry's), and the
    derivation."""
    inputs = dict(inputs)
    derived = derive(inputs.pop("status", None), **inputs)
    body = resource("r", "team-a")
    body["metadata"]["generation"] = generation
    body["status"] = derived.status
    return body, derived
