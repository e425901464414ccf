"""The decision function against an in-memory cache (no cluster): the cache is filled as the watch events
fill it, the reconciler observes it with a fixed clock, and ``decide`` says what the reconcile does."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from visionft_api import conditions as cond
from visionft_operator import decision, jobs
from visionft_operator.config import Config
from visionft_operator.controller.cache import Cache
from visionft_operator.policy import Usage
from visionft_operator.reconciler import Reconciler
from visionft_operator.status import get_condition, iso

from tests.operator.clock import FixedClock
from tests.operator.specs import resource, spec

NS, NAME, UID, JOB_UID = "team-a", "run", "vft-uid", "job-uid"
CAPACITY = '{"defaults": {"maxConcurrentJobs": 1}}'


def _resource(body_spec: dict[str, Any] | None = None, **status: Any) -> dict[str, Any]:
    body = resource(NAME, NS, body_spec)
    body["metadata"].update(uid=UID, generation=1, resourceVersion="1")
    body["status"] = status
    return body


def _job(suspend: bool = False, conditions: list[dict[str, Any]] | None = None, **status: Any) -> dict:
    return {
        "metadata": {
            "name": f"{NAME}-trainer",
            "namespace": NS,
            "uid": JOB_UID,
            "labels": {"visionft.io/name": NAME},
            "ownerReferences": [{"kind": "VisionFineTune", "name": NAME, "uid": UID}],
        },
        "spec": {"suspend": suspend, "parallelism": 1},
        "status": {"conditions": conditions or [], **status},
    }


def _pod(phase: str, name: str = f"{NAME}-trainer-abcde", **status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {"visionft.io/name": NAME},
            "ownerReferences": [{"kind": "Job", "name": f"{NAME}-trainer", "uid": JOB_UID}],
            "creationTimestamp": "2026-11-26T09:59:00Z",
        },
        "status": {"phase": phase, **status},
    }


def _observe(*objects: dict[str, Any], clock: FixedClock | None = None, policy: str = "") -> decision.View:
    """Fill a cache with the objects as their watch events would, and observe the run."""

    async def scenario() -> decision.View:
        cache = Cache()
        for obj in objects:
            if obj.get("kind") == "VisionFineTune":
                cache.resources.upsert(obj)
            elif obj["metadata"]["name"].endswith("-trainer"):
                cache.jobs.upsert(obj)
            else:
                cache.pods.upsert(obj)
        reconciler = Reconciler(cache, Config(policy=policy), clock=clock or FixedClock())
        body = cache.resource(NS, NAME)
        assert body is not None
        return reconciler.observe(body)

    return asyncio.run(scenario())


def _condition(plan: decision.Plan, type_: str) -> dict[str, Any]:
    assert plan.derived is not None
    found = get_condition(plan.derived.status["conditions"], type_)
    assert found is not None, type_
    return found


def test_a_new_run_creates_its_children_job_last() -> None:
    plan = decision.decide(_observe(_resource()))
    assert [obj["kind"] for obj in plan.create] == [
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Job",
    ]
    assert plan.write_status and plan.derived is not None
    # The status describes the Job about to be made.
    assert plan.derived.status["phase"] == "Initializing"
    assert plan.derived.status["jobName"] == f"{NAME}-trainer"
    assert plan.derived.event is not None and plan.derived.event[1] == "Initializing"


def test_a_running_pod_with_progress_is_training_and_creates_nothing() -> None:
    body = _resource(phase="Initializing", progress={"stage": "Training", "step": 3})
    view = _observe(body, _job(active=1, startTime="2026-11-26T09:59:00Z"), _pod("Running"))
    plan = decision.decide(view)
    assert not plan.create and plan.job_patch is None
    assert plan.derived is not None and plan.derived.status["phase"] == "Training"
    assert plan.derived.status["startTime"] == "2026-11-26T09:59:00Z"


def test_suspend_patches_the_live_job() -> None:
    view = _observe(_resource(spec(suspend=True), phase="Training"), _job(active=1), _pod("Running"))
    plan = decision.decide(view)
    assert plan.job_patch == {"suspend": True}
    assert plan.derived is not None and plan.derived.status["phase"] == "Suspended"


def test_resuming_under_a_capacity_rule_asks_for_the_usage_first() -> None:
    view = _observe(_resource(phase="Suspended"), _job(suspend=True), policy=CAPACITY)
    asked = decision.decide(view)
    assert asked.needs == {decision.NEEDS_USAGE} and asked.derived is None and not asked.create
    full = decision.decide(decision.with_usage(view, Usage(jobs=1)))
    assert full.job_patch is None and full.waiting
    assert full.derived is not None and full.derived.status["phase"] == "Queued"
    free_view = decision.with_usage(view, Usage(jobs=0))
    # Resumed, the Job has no pods yet: its Events may say why.
    assert decision.decide(free_view).needs == {decision.NEEDS_JOB_EVENTS}
    free = decision.decide(decision.with_job_events(free_view, []))
    assert free.job_patch == {"suspend": False} and not free.waiting
    # The status follows the Job as the patch leaves it: resumed, its pod yet to start.
    assert free.derived is not None and free.derived.status["phase"] == "Initializing"


def test_a_new_run_waits_for_capacity() -> None:
    view = decision.with_usage(_observe(_resource(), policy=CAPACITY), Usage(jobs=1))
    plan = decision.decide(view)
    assert not plan.create and plan.waiting
    assert plan.derived is not None and plan.derived.status["phase"] == "Pending"
    assert _condition(plan, cond.ADMITTED)["reason"] == cond.REASON_POLICY_LIMIT


def test_a_job_without_pods_asks_for_its_events_then_reports_a_quota() -> None:
    view = _observe(_resource(phase="Initializing"), _job(active=0))
    asked = decision.decide(view)
    assert asked.needs == {decision.NEEDS_JOB_EVENTS}
    quota = {"reason": "FailedCreate", "message": 'pods "x" is forbidden: exceeded quota: gpus'}
    plan = decision.decide(decision.with_job_events(view, [quota]))
    assert plan.derived is not None and plan.derived.status["phase"] == "Pending"
    assert _condition(plan, cond.ADMITTED)["reason"] == cond.REASON_QUOTA_EXCEEDED


def test_a_failed_job_waits_for_its_failed_pod_in_the_cache() -> None:
    clock = FixedClock()
    failed = {
        "type": "FailureTarget",
        "status": "True",
        "reason": "PodFailurePolicy",
        "lastTransitionTime": iso(clock.now() - timedelta(seconds=1)),
    }
    view = _observe(_resource(phase="Training"), _job(conditions=[failed]), _pod("Running"), clock=clock)
    plan = decision.decide(view)
    assert plan.derived is None and plan.again == 1.0  # the pod's Failed event is still on its way
    clock.advance(60)  # don't wait for ever (pods can go away)
    view = _observe(_resource(phase="Training"), _job(conditions=[failed]), _pod("Running"), clock=clock)
    assert decision.decide(view).derived is not None


def test_a_multi_node_failure_restarts_the_group() -> None:
    body_spec = spec(**{"resources.nodes": 2, "resources.gpusPerNode": 4})
    message = f"Container trainer for pod {NS}/{NAME}-trainer-1-abcde failed with exit code 1"
    failed = [
        {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": message},
    ]
    job = _job(conditions=failed, failed=1)
    job["metadata"]["annotations"] = {"visionft.io/restarts": "0"}
    pod = _pod("Failed", name=f"{NAME}-trainer-1-abcde")
    plan = decision.decide(_observe(_resource(body_spec, phase="Training"), job, pod))
    assert plan.restart is not None and plan.restart.job["metadata"]["uid"] == JOB_UID
    assert plan.restart.record == {"restarts": 1, "attempts": 1}
    assert plan.derived is not None and plan.derived.status["phase"] == "Pending"
    assert _condition(plan, cond.RECONCILING)["reason"] == cond.REASON_RESTARTING_GROUP


def test_a_run_out_of_time_gets_no_further_job() -> None:
    body_spec = spec(**{"runPolicy.activeDeadlineSeconds": 600})
    body = _resource(body_spec, phase="Pending", startTime="2026-11-26T09:00:00Z")
    plan = decision.decide(_observe(body))
    assert not plan.create
    assert plan.derived is not None and plan.derived.status["phase"] == "Failed"
    assert _condition(plan, cond.FAILED)["reason"] == cond.REASON_DEADLINE_EXCEEDED


def test_a_finished_run_waits_for_its_ttl_then_is_deleted() -> None:
    clock = FixedClock()
    done = iso(clock.now() - timedelta(seconds=30))
    body = _resource(
        spec(**{"runPolicy.ttlSecondsAfterFinished": 60}),
        phase="Succeeded",
        observedGeneration=1,
        completionTime=done,
    )
    plan = decision.decide(_observe(body, clock=clock))
    assert plan.derived is None and not plan.delete and plan.again == 30.0
    clock.advance(30)
    assert decision.decide(_observe(body, clock=clock)).delete
    assert not decision.settled(body)  # its TTL still needs a look


def test_a_job_of_another_owner_is_never_taken_and_the_run_says_so() -> None:
    job = _job()
    job["metadata"]["ownerReferences"] = [
        {"kind": "VisionFineTune", "name": NAME, "uid": "other", "controller": True}
    ]
    plan = decision.decide(_observe(_resource(), job))
    assert not plan.create and plan.job_patch is None and plan.restart is None
    assert plan.backoff and plan.write_status and plan.derived is not None
    assert plan.derived.status["phase"] == "Pending"
    ready = _condition(plan, cond.READY)
    assert ready["reason"] == cond.REASON_NAME_TAKEN and "uid other" in ready["message"]
    assert _condition(plan, cond.STALLED)["status"] == "False"  # an earlier resource's Job goes by itself


def test_pods_lag_only_for_a_failed_job_without_its_failed_pod() -> None:
    clock = FixedClock()
    at = iso(clock.now() - timedelta(seconds=1))
    job = _job(conditions=[{"type": "FailureTarget", "status": "True", "lastTransitionTime": at}])
    assert jobs.pods_lag(job, [_pod("Running")], clock.now()) == 1.0
    assert jobs.pods_lag(job, [], clock.now()) == 1.0
    assert jobs.pods_lag(job, [_pod("Failed")], clock.now()) is None
    assert jobs.pods_lag(_job(), [], clock.now()) is None  # not failed
    assert jobs.pods_lag(None, [], clock.now()) is None


def test_a_queue_edit_before_the_start_moves_the_queued_job() -> None:
    job = _job(suspend=True)
    job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] = "team-a"
    queued = _resource(spec(queueName="team-a"), phase="Queued")
    assert decision.decide(_observe(queued, job)).job_labels is None
    moved = decision.decide(_observe(_resource(spec(queueName="team-b"), phase="Queued"), job))
    assert moved.job_labels == {"kueue.x-k8s.io/queue-name": "team-b"}
    # Out of Kueue: the label goes, and the operator resumes the Job itself.
    left = decision.decide(decision.with_job_events(_observe(_resource(phase="Queued"), job), []))
    assert left.job_labels == {"kueue.x-k8s.io/queue-name": None} and left.job_patch == {"suspend": False}
