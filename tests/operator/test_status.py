"""Phase and condition derivation (no cluster): each phase from the Job, pods, progress and policy."""

from __future__ import annotations

from typing import Any

import pytest
from visionft_api import conditions as cond
from visionft_operator import status as st
from visionft_operator.policy import PolicyDecision

from tests.operator import objects as o
from tests.operator.objects import T0, T1, UNSCHEDULABLE, waiting_pod
from tests.operator.specs import spec


def _cond(derived: st.Derived, type_: str) -> dict[str, Any]:
    found = st.get_condition(derived.status["conditions"], type_)
    assert found is not None, type_
    return found


def test_pending_before_the_job_exists() -> None:
    d = o.derive()
    assert d.status["phase"] == "Pending"
    assert _cond(d, cond.RECONCILING)["status"] == "True"
    assert _cond(d, cond.READY)["status"] == "False"
    assert d.event == ("Normal", "Pending", "creating the trainer's Job")


def test_policy_wait_and_deny() -> None:
    wait = o.derive(
        policy=PolicyDecision("wait", "maxConcurrentJobs", "policy maxConcurrentJobs: limit is 1")
    )
    assert wait.status["phase"] == "Pending"
    assert (_cond(wait, cond.ADMITTED)["status"], _cond(wait, cond.ADMITTED)["reason"]) == (
        "False",
        cond.REASON_POLICY_LIMIT,
    )
    assert "maxConcurrentJobs" in _cond(wait, cond.ADMITTED)["message"]
    deny = o.derive(policy=PolicyDecision("deny", "allowedImages", "policy allowedImages: no"))
    assert deny.status["phase"] == "Failed"
    assert _cond(deny, cond.STALLED)["reason"] == cond.REASON_POLICY_VIOLATION
    assert deny.event is not None and deny.event[0] == "Warning"


def test_invalid_spec_fails_with_the_message() -> None:
    d = o.derive(spec_error="spec.training: set exactly one of maxSteps and epochs")
    assert d.status["phase"] == "Failed"
    assert "spec.training" in d.status["message"]
    assert _cond(d, cond.STALLED)["reason"] == cond.REASON_INVALID_SPEC


def test_queued_while_kueue_holds_the_job() -> None:
    d = o.derive(spec=spec(queueName="q"), job=o.job(suspend=True))
    assert d.status["phase"] == "Queued"
    assert _cond(d, cond.ADMITTED)["reason"] == cond.REASON_QUEUED_BY_KUEUE
    assert "startTime" not in d.status


def test_initializing_training_uploading_follow_pods_and_progress() -> None:
    job = o.job(active=1, startTime=T0)
    assert o.derive(job=job, pods=[o.pod("Pending")]).status["phase"] == "Initializing"
    assert o.derive(job=job, pods=[o.pod("Running")]).status["phase"] == "Initializing"
    training = o.derive({"progress": {"stage": "Training", "step": 3}}, job=job, pods=[o.pod("Running")])
    assert training.status["phase"] == "Training"
    assert training.status["startTime"] == T0
    assert training.status["attempts"] == 1
    assert "progress" not in training.status  # the trainer's field is never written by the operator
    uploading = o.derive({"progress": {"stage": "Uploading"}}, job=job, pods=[o.pod("Running")])
    assert uploading.status["phase"] == "Uploading"
    # The container exited 0 and the Job is not complete yet: still finishing, not starting over.
    finishing = o.derive({"progress": {"stage": "Done"}}, job=job, pods=[o.pod("Succeeded")])
    assert finishing.status["phase"] == "Uploading"


def test_succeeded_sets_outputs_ready_and_completion() -> None:
    job = o.job(conditions=[{"type": "Complete", "status": "True"}], succeeded=1, completionTime=T1)
    d = o.derive({"phase": "Training"}, spec=spec(**{"output.saveMethod": "merged_16bit"}), job=job)
    assert d.status["phase"] == "Succeeded"
    assert d.status["completionTime"] == T1
    assert d.status["outputs"] == {
        "adapterUri": "s3://outputs/team-a/latex-ocr/adapter/",
        "checkpointUri": "s3://outputs/team-a/latex-ocr/checkpoints/",
        "mergedUri": "s3://outputs/team-a/latex-ocr/merged/",
    }
    assert _cond(d, cond.READY)["status"] == "True"
    assert _cond(d, cond.COMPLETE)["status"] == "True"
    assert _cond(d, cond.RECONCILING)["status"] == "False"
    assert d.event == ("Normal", "Succeeded", "training finished and the outputs are published")


def test_failed_carries_the_pods_reason_and_message() -> None:
    job = o.job(
        conditions=[
            {
                "type": "Failed",
                "status": "True",
                "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit",
            }
        ],
        failed=2,
    )
    pod = o.pod(
        "Failed",
        containerStatuses=[
            {
                "name": "trainer",
                "state": {"terminated": {"reason": "OOMKilled", "exitCode": 137, "message": "out of memory"}},
            }
        ],
    )
    d = o.derive({"phase": "Training"}, job=job, pods=[pod])
    assert d.status["phase"] == "Failed"
    assert "OOMKilled" in d.status["message"]
    assert "exit code 137" in d.status["message"]
    assert "out of memory" in d.status["message"]
    assert _cond(d, cond.FAILED)["reason"] == cond.REASON_BACKOFF_LIMIT
    assert d.status["attempts"] == 2
    assert d.event is not None and d.event[0] == "Warning" and "OOMKilled" in d.event[2]


def test_deadline_exceeded() -> None:
    job = o.job(
        conditions=[
            {
                "type": "Failed",
                "status": "True",
                "reason": "DeadlineExceeded",
                "message": "Job was active longer than specified deadline",
            }
        ]
    )
    d = o.derive(job=job)
    assert d.status["phase"] == "Failed"
    assert _cond(d, cond.STALLED)["reason"] == cond.REASON_DEADLINE_EXCEEDED


def test_suspended() -> None:
    d = o.derive({"phase": "Training"}, spec=spec(suspend=True), job=o.job(suspend=True))
    assert d.status["phase"] == "Suspended"
    assert _cond(d, cond.RECONCILING)["status"] == "False"
    assert _cond(d, cond.ADMITTED)["reason"] == cond.REASON_SUSPENDED


def test_missing_secret_and_key_are_named() -> None:
    job = o.job(active=1)
    waiting = {"reason": "CreateContainerConfigError", "message": 'secret "s3-creds" not found'}
    pod = o.pod("Pending", containerStatuses=[{"name": "trainer", "state": {"waiting": waiting}}])
    d = o.derive(job=job, pods=[pod])
    assert (_cond(d, cond.STALLED)["status"], _cond(d, cond.STALLED)["reason"]) == (
        "True",
        cond.REASON_MISSING_SECRET,
    )
    assert "s3-creds" in _cond(d, cond.STALLED)["message"]
    waiting = {
        "reason": "CreateContainerConfigError",
        "message": "couldn't find key AWS_ACCESS_KEY_ID in Secret team-a/s3-creds",
    }
    pod = o.pod("Pending", containerStatuses=[{"name": "trainer", "state": {"waiting": waiting}}])
    d = o.derive(job=job, pods=[pod])
    assert _cond(d, cond.STALLED)["reason"] == cond.REASON_MISSING_SECRET_KEY
    assert "AWS_ACCESS_KEY_ID" in _cond(d, cond.STALLED)["message"]


def test_quota_blocking_pod_creation() -> None:
    d = o.derive(
        job=o.job(),
        failed_create='pods "x" is forbidden: exceeded quota: gpu-quota, requested: requests.nvidia.com/gpu=1',
    )
    assert d.status["phase"] == "Pending"
    assert _cond(d, cond.ADMITTED)["reason"] == cond.REASON_QUOTA_EXCEEDED
    assert "gpu-quota" in _cond(d, cond.ADMITTED)["message"]


def test_last_transition_time_moves_only_on_status_change() -> None:
    first = o.derive()
    again = st.derive(
        st.Observation(generation=4, spec=spec(), status=first.status), now="2026-11-26T11:00:00Z"
    )
    ready_before = _cond(first, cond.READY)
    ready_after = _cond(again, cond.READY)
    assert ready_after["lastTransitionTime"] == ready_before["lastTransitionTime"] == T1
    assert ready_after["observedGeneration"] == 4
    assert again.event is None  # no transition, no Event
    assert not st.changed(
        {**first.status, "observedGeneration": 4, "conditions": again.status["conditions"]}, again.status
    )


def test_final_phase_survives_a_deleted_job() -> None:
    done = o.derive({"phase": "Training"}, job=o.job(conditions=[{"type": "Complete", "status": "True"}]))
    later = st.derive(st.Observation(generation=3, spec=spec(), status=done.status, job=None), now=T1)
    assert later.status["phase"] == "Succeeded"


def test_succeeded_without_output_publishes_nothing() -> None:
    # A generated model's run may have no output: its results stayed in the pod's scratch volume.
    body = spec(output=None, **{"model.uri": "builtin://tiny-qwen2-vl"})
    job = o.job(conditions=[{"type": "Complete", "status": "True"}], succeeded=1, completionTime=T1)
    d = o.derive({"phase": "Training"}, spec=body, job=job)
    assert d.status["phase"] == "Succeeded"
    assert "outputs" not in d.status
    assert "scratch" in d.status["message"]
    assert _cond(d, cond.READY)["status"] == "True"


# --- runs that can't start: the reason, the field to change, an Event ------------------------------------


@pytest.mark.parametrize(
    ("pods", "failed_create", "reason", "field", "stalled"),
    [
        (
            [o.pod("Pending", conditions=[UNSCHEDULABLE])],
            None,
            "Unschedulable",
            "spec.resources.gpusPerNode",
            False,
        ),
        (
            [],
            'Error creating: pods "r-trainer-x" is forbidden: no PriorityClass with name does-not-exist was found',
            "FailedCreate",
            "spec.resources.priorityClassName",
            True,
        ),
        (
            [waiting_pod("ImagePullBackOff", "Back-off pulling image")],
            None,
            "ImagePullBackOff",
            "spec.image",
            True,
        ),
        ([waiting_pod("ErrImagePull", "not found")], None, "ErrImagePull", "spec.image", True),
        (
            [waiting_pod("CreateContainerConfigError", 'configmap "ca" not found')],
            None,
            "CreateContainerConfigError",
            "spec.storage.caBundleConfigMap",
            True,
        ),
    ],
    ids=["unschedulable", "failed-create", "image-pull-backoff", "err-image-pull", "container-config"],
)
def test_a_pod_that_cannot_start_says_why_and_what_to_change(
    pods: list, failed_create: str | None, reason: str, field: str, stalled: bool
) -> None:
    d = o.derive({"phase": "Initializing"}, job=o.job(active=1), pods=pods, failed_create=failed_create)
    assert d.status["phase"] == "Pending"
    assert field in d.status["message"], d.status["message"]
    ready = _cond(d, cond.READY)
    assert (ready["status"], ready["reason"]) == ("False", reason)  # the Reason column
    assert _cond(d, cond.STALLED)["status"] == ("True" if stalled else "False")
    assert _cond(d, cond.RECONCILING)["status"] == ("False" if stalled else "True")
    assert d.event is not None and d.event[:2] == ("Warning", reason)
    # Once reported, the same state posts no second Event.
    again = o.derive(
        {"phase": "Pending", **d.status}, job=o.job(active=1), pods=pods, failed_create=failed_create
    )
    assert again.event is None


def test_a_refused_child_is_stalled_with_the_apiservers_words() -> None:
    message = 'jobs.batch "r-trainer" is forbidden: ValidatingAdmissionPolicy denied request: cpu above 4'
    d = o.derive(rejected=("Job team-a/r-trainer", message))
    assert d.status["phase"] == "Pending"
    assert "Job team-a/r-trainer" in d.status["message"] and "cpu above 4" in d.status["message"]
    assert "spec.resources.cpu" in d.status["message"]
    stalled = _cond(d, cond.STALLED)
    assert (stalled["status"], stalled["reason"]) == ("True", cond.REASON_CHILD_REJECTED)
    assert d.event is not None and d.event[:2] == ("Warning", cond.REASON_CHILD_REJECTED)


def test_an_earlier_attempts_progress_is_dropped_until_the_new_pod_reports() -> None:
    old = {"step": 12, "totalSteps": 30, "eta": "54s", "etaSeconds": 54, "updateTime": "2026-11-26T09:59:00Z"}
    # A resumed (or re-created) Job without a pod yet: the report is the last attempt's.
    d = o.derive({"phase": "Training", "progress": old}, job=o.job(active=0))
    assert d.remove_progress == "all" and d.status["phase"] == "Initializing"
    # A new pod, created after the last report: Initializing, not Training, until it reports.
    d = o.derive({"phase": "Training", "progress": old}, job=o.job(active=1), pods=[o.pod("Running")])
    assert d.remove_progress == "all" and d.status["phase"] == "Initializing"
    # Its own report (after its creation) counts.
    fresh = {**old, "updateTime": "2026-11-26T10:00:05Z"}
    d = o.derive({"phase": "Initializing", "progress": fresh}, job=o.job(active=1), pods=[o.pod("Running")])
    assert d.remove_progress == () and d.status["phase"] == "Training"


def test_a_run_that_is_over_keeps_its_progress_but_no_eta() -> None:
    report = {
        "step": 12,
        "totalSteps": 30,
        "eta": "54s",
        "etaSeconds": 54,
        "updateTime": "2026-11-26T10:00:05Z",
    }
    failed = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]
    d = o.derive(
        {"phase": "Training", "progress": report}, job=o.job(conditions=failed), pods=[o.pod("Failed")]
    )
    assert d.status["phase"] == "Failed" and d.remove_progress == ("eta", "etaSeconds")
    d = o.derive({"phase": "Training", "progress": report}, spec=spec(suspend=True), job=o.job(suspend=True))
    assert d.status["phase"] == "Suspended" and d.remove_progress == ("eta", "etaSeconds")
    d = o.derive(
        {"phase": "Failed", "progress": {"step": 12}}, job=o.job(conditions=failed), pods=[o.pod("Failed")]
    )
    assert d.remove_progress == ()  # nothing left to drop
