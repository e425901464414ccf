"""kstatus conformance: for each phase and each stuck state the operator derives, the status that
sigs.k8s.io/cli-utils' kstatus computes (the checker built by hack/build-test-cluster.sh) is the right
one. Only a finished, successful run is Current; a run that cannot start is never Current: Failed when it
needs a person, InProgress while it may still start by itself."""

from __future__ import annotations

from typing import Any

import pytest
from visionft_operator import status as st
from visionft_operator.policy import PolicyDecision

from tests.harness.kstatus import kstatus
from tests.operator import objects as o
from tests.operator.specs import resource, spec

COMPLETE = [{"type": "Complete", "status": "True"}]
FAILED = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "too many"}]
RUNNING = [o.pod("Running")]
FRESH = {"step": 4, "totalSteps": 10, "stage": "Training", "updateTime": "2026-11-26T10:00:05Z"}
PRIORITY = 'pods "r-trainer-x" is forbidden: no PriorityClass with name does-not-exist was found'
QUOTA = 'pods "r-trainer-x" is forbidden: exceeded quota: gpus, requested: requests.nvidia.com/gpu=1'
REFUSED = ("Job team-a/r-trainer", 'jobs.batch "r-trainer" is forbidden: ValidatingAdmissionPolicy denied')

# (id, derivation inputs, the phase it reaches, the right kstatus)
CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("creating", {}, "Pending", "InProgress"),
    (
        "policy-wait",
        {"policy": PolicyDecision("wait", "maxConcurrentJobs", "waiting")},
        "Pending",
        "InProgress",
    ),
    ("queued", {"spec": spec(queueName="q"), "job": o.job(suspend=True)}, "Queued", "InProgress"),
    ("initializing", {"job": o.job(active=1), "pods": [o.pod("Pending")]}, "Initializing", "InProgress"),
    (
        "training",
        {"status": {"progress": FRESH}, "job": o.job(active=1), "pods": RUNNING},
        "Training",
        "InProgress",
    ),
    (
        "uploading",
        {"status": {"progress": {**FRESH, "stage": "Uploading"}}, "job": o.job(active=1), "pods": RUNNING},
        "Uploading",
        "InProgress",
    ),
    ("suspended", {"spec": spec(suspend=True), "job": o.job(suspend=True)}, "Suspended", "InProgress"),
    ("succeeded", {"job": o.job(conditions=COMPLETE, succeeded=1)}, "Succeeded", "Current"),
    ("failed", {"job": o.job(conditions=FAILED, failed=1), "pods": [o.pod("Failed")]}, "Failed", "Failed"),
    ("invalid-spec", {"spec_error": "spec.training: set exactly one"}, "Failed", "Failed"),
    ("policy-violation", {"policy": PolicyDecision("deny", "allowedImages", "no")}, "Failed", "Failed"),
    (
        "deadline",
        {"group": ("Failed", "DeadlineExceeded", "DeadlineExceeded: out of time")},
        "Failed",
        "Failed",
    ),
    ("restarting-group", {"group": ("Pending", "RestartingGroup", "restarting")}, "Pending", "InProgress"),
    # The stuck states.
    ("child-rejected", {"rejected": REFUSED}, "Pending", "Failed"),
    ("failed-create", {"job": o.job(active=0), "failed_create": PRIORITY}, "Pending", "Failed"),
    ("quota", {"job": o.job(active=0), "failed_create": QUOTA}, "Pending", "InProgress"),
    (
        "unschedulable",
        {"job": o.job(active=1), "pods": [o.pod("Pending", conditions=[o.UNSCHEDULABLE])]},
        "Pending",
        "InProgress",
    ),
    (
        "image-pull-backoff",
        {"job": o.job(active=1), "pods": [o.waiting_pod("ImagePullBackOff")]},
        "Pending",
        "Failed",
    ),
    (
        "err-image-pull",
        {"job": o.job(active=1), "pods": [o.waiting_pod("ErrImagePull")]},
        "Pending",
        "Failed",
    ),
    (
        "missing-secret",
        {
            "job": o.job(active=1),
            "pods": [o.waiting_pod("CreateContainerConfigError", 'secret "s3" not found')],
        },
        "Pending",
        "Failed",
    ),
    (
        "container-config",
        {"job": o.job(active=1), "pods": [o.waiting_pod("CreateContainerConfigError", "bad config")]},
        "Pending",
        "Failed",
    ),
]


def _resource(derived: st.Derived, generation: int = 3) -> dict[str, Any]:
    body = resource("r", "team-a")
    body["metadata"]["generation"] = generation
    body["status"] = derived.status
    return body


@pytest.mark.parametrize(
    ("inputs", "phase", "wanted"), [(i, p, w) for _, i, p, w in CASES], ids=[c[0] for c in CASES]
)
def test_kstatus_reads_each_phase_and_stuck_state_right(inputs: dict, phase: str, wanted: str) -> None:
    inputs = dict(inputs)
    derived = o.derive(inputs.pop("status", None), **inputs)
    assert derived.status["phase"] == phase
    (verdict,) = kstatus(_resource(derived))
    assert verdict["status"] == wanted, verdict
    if wanted != "Current":
        # What kstatus-based tools show is the operator's own explanation.
        assert verdict["message"] == derived.status["message"], verdict


def test_a_status_behind_the_spec_is_in_progress_whatever_it_says() -> None:
    done = o.derive(job=o.job(conditions=COMPLETE, succeeded=1))
    (verdict,) = kstatus(_resource(done, generation=4))
    assert verdict["status"] == "InProgress", verdict


def test_the_checker_reads_the_table_of_phases_in_one_call() -> None:
    # Guards the checker: a List in, one verdict per item out, in order.
    bodies = []
    for name, inputs, _, _ in CASES[:3]:
        inputs = dict(inputs)
        body = _resource(o.derive(inputs.pop("status", None), **inputs))
        body["metadata"]["name"] = name
        bodies.append(body)
    assert [v["name"] for v in kstatus(*bodies)] == [c[0] for c in CASES[:3]]
