"""Gang restarts of a multi-node run (no cluster): the Job's failure rules, and ``gang.decide`` on failed
Jobs as the Job controller reports them, through to the status the operator writes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from visionft_api import VisionFineTuneSpec
from visionft_api import conditions as cond
from visionft_operator import children, deadline, gang
from visionft_operator import status as st

from tests.operator.specs import spec

OWNER = children.Owner(namespace="team-a", name="gang", uid="vft-uid")
JOB_UID = "job-uid"
T0, T1, T2 = "2026-11-26T10:00:00Z", "2026-11-26T10:05:00Z", "2026-11-26T10:05:01Z"


def _spec(nodes: int = 2, backoff_limit: int = 2, deadline: int | None = None) -> VisionFineTuneSpec:
    return VisionFineTuneSpec.model_validate(
        spec(
            **{
                "resources.nodes": nodes,
                "resources.gpusPerNode": 4,
                "runPolicy.backoffLimit": backoff_limit,
                "runPolicy.activeDeadlineSeconds": deadline,
            }
        )
    )


def _job(
    reason: str = "PodFailurePolicy",
    message: str = "",
    restarts: int | None = 0,
    suspend: bool = False,
    type_: str = "Failed",
) -> dict[str, Any]:
    annotations = {} if restarts is None else {"visionft.io/restarts": str(restarts)}
    return {
        "metadata": {"name": "gang-trainer", "uid": JOB_UID, "annotations": annotations},
        "spec": {"suspend": suspend},
        "status": {
            "conditions": [{"type": type_, "status": "True", "reason": reason, "message": message}],
        },
    }


def _pod(
    index: int,
    exit_code: int | None,
    finished: str = T1,
    disrupted: bool = False,
    deleted: bool = False,
    owner: str = JOB_UID,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": f"gang-trainer-{index}-abcde",
        "creationTimestamp": T0,
        "ownerReferences": [{"kind": "Job", "name": "gang-trainer", "uid": owner}],
    }
    if deleted:
        meta["deletionTimestamp"] = T2
    status: dict[str, Any] = {"phase": "Failed" if exit_code is not None else "Running", "conditions": []}
    if exit_code is not None:
        term = {"exitCode": exit_code, "reason": "Error", "message": "NCCL timeout", "finishedAt": finished}
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": term}}]
    if disrupted:
        status["conditions"].append({"type": "DisruptionTarget", "status": "True"})
    return {"metadata": meta, "status": status}


def _exit_message(index: int, code: int, rule: int) -> str:
    return (
        f"Container trainer for pod team-a/gang-trainer-{index}-abcde failed with exit code {code} "
        f"matching FailJob rule at index {rule}"
    )


# --- the Job --------------------------------------------------------------------------------------------


def test_a_multi_node_job_fails_on_any_pod_failure_and_carries_its_restart_count() -> None:
    owner = children.Owner(namespace="team-a", name="gang", uid="vft-uid", restarts=2)
    job = children.job(owner, _spec(backoff_limit=5), children.PodDefaults())
    js = job["spec"]
    assert js["backoffLimit"] == 0  # the operator counts the restarts, not the Job
    assert js["podReplacementPolicy"] == "Failed"
    assert job["metadata"]["annotations"] == {"visionft.io/restarts": "2"}
    rules = js["podFailurePolicy"]["rules"]
    assert [r["action"] for r in rules] == ["FailJob", "FailJob", "FailJob"]
    assert rules[0]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    assert rules[1]["onExitCodes"] == {"containerName": "trainer", "operator": "In", "values": [2, 3]}
    assert rules[2]["onExitCodes"] == {"containerName": "trainer", "operator": "NotIn", "values": [0]}


def test_a_replacement_job_gets_what_is_left_of_the_deadline_and_carries_the_runs_counts() -> None:
    owner = children.Owner(
        namespace="team-a", name="gang", uid="vft-uid", restarts=1, attempts=2, elapsed=1000
    )
    job = children.job(owner, _spec(deadline=3600), children.PodDefaults())
    assert job["spec"]["activeDeadlineSeconds"] == 2600
    assert job["metadata"]["annotations"] == {
        "visionft.io/restarts": "1",
        "visionft.io/attempts": "2",
        "visionft.io/elapsed-seconds": "1000",
    }
    assert deadline.job_elapsed(job) == 1000
    # A run's first Job gets the whole deadline; a deadline cut below the time passed ends a Job at once.
    assert (
        children.job(OWNER, _spec(deadline=3600), children.PodDefaults())["spec"]["activeDeadlineSeconds"]
        == 3600
    )
    assert deadline.job_deadline(_spec(deadline=3600), 4000) == 1
    assert deadline.job_deadline(_spec(), 4000) is None


def test_the_deadline_counts_from_the_runs_first_start() -> None:
    now = datetime(2026, 11, 26, 11, 0, 0, tzinfo=UTC)
    assert deadline.elapsed({"startTime": T0}, now) == 3600
    assert deadline.elapsed({}, now) == 0  # not started yet
    assert not deadline.run_out(_spec(deadline=3600), 3599)
    assert deadline.run_out(_spec(deadline=3600), 3600)
    assert not deadline.run_out(_spec(), 10**6)  # no deadline


def test_a_single_node_job_keeps_its_retries() -> None:
    job = children.job(OWNER, _spec(nodes=1, backoff_limit=5), children.PodDefaults())
    assert job["spec"]["backoffLimit"] == 5
    assert "annotations" not in job["metadata"]
    assert [r["action"] for r in job["spec"]["podFailurePolicy"]["rules"]] == ["Ignore", "FailJob"]


# --- decide ---------------------------------------------------------------------------------------------


def test_nothing_to_decide_for_one_node_or_a_job_that_did_not_fail() -> None:
    failed = _job(message=_exit_message(1, 1, 2))
    assert gang.decide(_spec(nodes=1), failed, [_pod(1, 1)], 0) is None
    assert gang.decide(_spec(), None, [], 0) is None
    running = {"metadata": {"name": "gang-trainer", "uid": JOB_UID}, "status": {"active": 2}}
    assert gang.decide(_spec(), running, [_pod(0, None), _pod(1, None)], 0) is None


@pytest.mark.parametrize("type_", ["FailureTarget", "Failed"])
def test_a_failed_pod_restarts_the_group_and_counts(type_: str) -> None:
    # Pod 1 failed; the Job controller then stopped pod 0 (exit 143, deleted).
    pods = [_pod(0, 143, finished=T2, deleted=True), _pod(1, 1)]
    verdict = gang.decide(_spec(), _job(message=_exit_message(1, 1, 2), type_=type_), pods, 0)
    assert verdict is not None and verdict.restart and verdict.restarts == 1
    assert verdict.state is not None
    phase, reason, message = verdict.state
    assert (phase, reason) == ("Pending", cond.REASON_RESTARTING_GROUP)
    assert "(restart 1 of 2)" in message
    assert "pod gang-trainer-1-abcde failed" in message and "exit code 1" in message


def test_the_count_comes_from_the_job_so_a_second_look_does_not_count_twice() -> None:
    job = _job(message=_exit_message(0, 1, 2), restarts=1)
    pods = [_pod(0, 1)]
    # status.restarts may already say 2 (the first look recorded it): still restart 2, not 3.
    for recorded in (1, 2):
        verdict = gang.decide(_spec(backoff_limit=3), job, pods, recorded)
        assert verdict is not None and verdict.restarts == 2


def test_a_job_without_the_annotation_counts_from_the_status() -> None:
    verdict = gang.decide(_spec(), _job(message=_exit_message(0, 1, 2), restarts=None), [_pod(0, 1)], 1)
    assert verdict is not None and verdict.restarts == 2


def test_the_restarts_run_out_at_the_backoff_limit() -> None:
    job = _job(message=_exit_message(0, 137, 2), restarts=2)
    verdict = gang.decide(_spec(backoff_limit=2), job, [_pod(0, 137)], 2)
    assert verdict is not None and not verdict.restart and verdict.restarts == 2
    assert verdict.state is not None
    phase, reason, message = verdict.state
    assert (phase, reason) == ("Failed", cond.REASON_BACKOFF_LIMIT)
    assert "restarted 2 times" in message and "backoffLimit is 2" in message
    assert "pod gang-trainer-0-abcde failed" in message


def test_backoff_limit_zero_fails_at_the_first_failure() -> None:
    verdict = gang.decide(_spec(backoff_limit=0), _job(message=_exit_message(0, 1, 2)), [_pod(0, 1)], 0)
    assert verdict is not None and not verdict.restart
    assert verdict.state is not None and verdict.state[0] == "Failed"


def test_a_disruption_restarts_the_group_without_counting() -> None:
    message = (
        "Pod team-a/gang-trainer-1-abcde has condition DisruptionTarget matching FailJob rule at index 0"
    )
    pods = [_pod(0, 143, deleted=True), _pod(1, 137, disrupted=True, deleted=True)]
    verdict = gang.decide(_spec(backoff_limit=0), _job(message=message), pods, 0)
    assert verdict is not None and verdict.restart and verdict.restarts == 0
    assert verdict.state is not None and "not counted" in verdict.state[2]
    # Also when the pod is gone already: the Job's message says enough.
    verdict = gang.decide(_spec(backoff_limit=0), _job(message=message), [], 0)
    assert verdict is not None and verdict.restart and verdict.restarts == 0


def test_a_non_retryable_exit_code_ends_the_run_with_the_failed_pods_words() -> None:
    stopped, failed = _pod(0, 143, finished=T2, deleted=True), _pod(1, 2)
    failed["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = "invalid config"
    for pods in ([stopped, failed], [failed, stopped]):
        verdict = gang.decide(_spec(), _job(message=_exit_message(1, 2, 1)), pods, 0)
        assert verdict is not None and not verdict.restart and verdict.state is not None
        phase, reason, message = verdict.state
        assert (phase, reason) == ("Failed", cond.REASON_POD_FAILED)
        assert message.startswith("PodFailurePolicy: Container trainer for pod team-a/gang-trainer-1-abcde")
        assert "invalid config" in message and "exit code 143" not in message
    verdict = gang.decide(_spec(), _job(message=_exit_message(1, 2, 1)), [], 0)  # the pod is gone
    assert verdict is not None and verdict.state is not None and "exit code 2" in verdict.state[2]


@pytest.mark.parametrize("disrupted", [False, True])
def test_no_restart_once_the_runs_deadline_ran_out(disrupted: bool) -> None:
    if disrupted:
        message = (
            "Pod team-a/gang-trainer-1-abcde has condition DisruptionTarget matching FailJob rule at index 0"
        )
        pods = [_pod(1, 137, disrupted=True)]
    else:
        message, pods = _exit_message(1, 1, 2), [_pod(1, 1)]
    job = _job(message=message, restarts=1)
    still = gang.decide(_spec(backoff_limit=3, deadline=3600), job, pods, 1, elapsed=3599)
    assert still is not None and still.restart
    verdict = gang.decide(_spec(backoff_limit=3, deadline=3600), job, pods, 1, elapsed=3600)
    assert verdict is not None and not verdict.restart and verdict.restarts == 1
    assert verdict.state is not None
    phase, reason, text = verdict.state
    assert (phase, reason) == ("Failed", cond.REASON_DEADLINE_EXCEEDED)
    assert text.startswith("DeadlineExceeded: pod gang-trainer-1-abcde failed"), text
    assert "activeDeadlineSeconds (3600 s) has run out: the run started 3600 s ago" in text
    assert "no further attempt" in text


def test_used_up_restarts_win_over_the_deadline() -> None:
    job = _job(message=_exit_message(0, 1, 2), restarts=2)
    verdict = gang.decide(_spec(backoff_limit=2, deadline=3600), job, [_pod(0, 1)], 2, elapsed=4000)
    assert verdict is not None and verdict.state is not None
    assert verdict.state[1] == cond.REASON_BACKOFF_LIMIT


def test_the_deadline_is_not_a_pod_failure() -> None:
    job = _job(reason="DeadlineExceeded", message="Job was active longer than specified deadline")
    assert gang.decide(_spec(), job, [_pod(0, 143, deleted=True), _pod(1, 143, deleted=True)], 0) is None


def test_a_job_that_failed_while_suspended_is_replaced_without_counting() -> None:
    # spec.suspend (or Kueue) suspended the Job; its pods stopped with 143 and matched the FailJob rule.
    job = _job(message=_exit_message(0, 143, 2), suspend=True)
    verdict = gang.decide(_spec(), job, [_pod(0, 143, deleted=True), _pod(1, 143, deleted=True)], 0)
    assert verdict == gang.Verdict(restart=True, restarts=0, state=None)


def test_a_pod_that_failed_without_an_exit_code_counts() -> None:
    # No rule matched (the pod never ran); the Job's backoffLimit 0 failed it.
    pod = _pod(1, None)
    pod["status"] = {"phase": "Failed", "reason": "UnexpectedAdmissionError", "message": "no GPU"}
    pods = [_pod(0, 143, finished=T2, deleted=True), pod]
    job = _job(reason="BackoffLimitExceeded", message="Job has reached the specified backoff limit")
    verdict = gang.decide(_spec(), job, pods, 0)
    assert verdict is not None and verdict.restart and verdict.restarts == 1
    assert verdict.state is not None and "UnexpectedAdmissionError" in verdict.state[2]


def test_the_failed_pod_is_the_named_one_else_the_first_that_failed_by_itself() -> None:
    first, stopped = _pod(1, 1, finished=T1), _pod(0, 143, finished=T1, deleted=True)
    assert gang.failed_pod({"message": _exit_message(1, 1, 2)}, [stopped, first]) is first
    assert gang.failed_pod({"message": ""}, [stopped, first]) is first
    later = _pod(2, 1, finished=T2)
    assert gang.failed_pod({"message": ""}, [later, first]) is first


def test_pods_of_an_earlier_attempt_are_not_looked_at() -> None:
    old = _pod(1, 2, owner="old-job-uid")  # a non-retryable exit code, but of the previous Job
    job = _job(reason="BackoffLimitExceeded", message="Job has reached the specified backoff limit")
    verdict = gang.decide(_spec(), job, [old, _pod(0, 1)], 0)
    assert verdict is not None and verdict.restart and verdict.state is not None
    assert "gang-trainer-0-abcde" in verdict.state[2]


# --- through to the status ------------------------------------------------------------------------------


def _derive(verdict: gang.Verdict, old: dict[str, Any], job: dict[str, Any] | None) -> st.Derived:
    obs = st.Observation(
        generation=1,
        spec=spec(**{"resources.nodes": 2}),
        status=old,
        job=job,
        group=verdict.state,
        restarts=verdict.restarts,
    )
    return st.derive(obs, now=T1)


def test_the_status_of_a_restart_and_its_event() -> None:
    job = _job(message=_exit_message(1, 1, 2))
    verdict = gang.decide(_spec(), job, [_pod(1, 1)], 0)
    assert verdict is not None
    training = {"phase": "Training", "message": "training"}
    d = _derive(verdict, training, None)
    assert d.status["phase"] == "Pending" and d.status["restarts"] == 1
    conds = {c["type"]: c for c in d.status["conditions"]}
    assert conds[cond.RECONCILING]["status"] == "True"
    assert conds[cond.RECONCILING]["reason"] == cond.REASON_RESTARTING_GROUP
    assert conds[cond.STALLED]["status"] == "False" and conds[cond.FAILED]["status"] == "False"
    assert conds[cond.ADMITTED]["status"] == "True"
    assert d.event is not None and d.event[:2] == ("Warning", cond.REASON_RESTARTING_GROUP)
    assert "restart 1 of 2" in d.event[2]
    # The next look at the same restart writes nothing new and posts no second Event.
    again = _derive(verdict, {**training, **d.status}, None)
    assert not st.changed({**training, **d.status}, again.status) and again.event is None


def test_attempts_add_up_over_the_runs_jobs() -> None:
    # The second Job of a run whose first Job started 2 pods: its own 2 come on top.
    annotations = {"visionft.io/restarts": "1", "visionft.io/attempts": "2"}
    job: dict[str, Any] = {"metadata": {"name": "gang-trainer", "annotations": annotations}}
    assert st.attempts({**job, "status": {"active": 2}}, 2) == 4
    assert st.attempts({**job, "status": {"failed": 2}}, 3) == 4
    # While the Job controller stops a failed group, its count lags (and ``terminating`` may overlap the
    # others): the Job's pods seen in the cache count instead, and the total never shrinks.
    stopping = {"failed": 1, "terminating": 1, "uncountedTerminatedPods": {"failed": ["pod-0-uid"]}}
    assert st.attempts({**job, "status": stopping}, 2) == 3
    assert st.attempts({**job, "status": stopping}, 2, job_pods=2) == 4
    assert st.attempts({**job, "status": {"active": 1, "failed": 1, "terminating": 1}}, 2) == 4
    # A Job made before Jobs carried the count: its own pods, never fewer than recorded.
    assert st.attempts({"status": {"active": 2}}, 3) == 3
    d = _derive(
        gang.Verdict(False, 1, None), {"phase": "Training", "attempts": 2}, {**job, "status": {"active": 2}}
    )
    assert d.status["attempts"] == 4


def test_the_status_when_the_restarts_ran_out() -> None:
    job = _job(message=_exit_message(0, 1, 2), restarts=2)
    verdict = gang.decide(_spec(backoff_limit=2), job, [_pod(0, 1)], 2)
    assert verdict is not None
    d = _derive(verdict, {"phase": "Training", "restarts": 2}, job)
    assert d.status["phase"] == "Failed" and d.status["restarts"] == 2
    conds = {c["type"]: c for c in d.status["conditions"]}
    assert conds[cond.FAILED]["reason"] == cond.REASON_BACKOFF_LIMIT
    assert conds[cond.STALLED]["status"] == "True"
    assert d.status["completionTime"] == T1
    assert d.event is not None and d.event[:2] == ("Warning", cond.REASON_BACKOFF_LIMIT)
