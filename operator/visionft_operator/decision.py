"""The decision function: from what one reconcile observed to what it does. Pure: no API calls, no clock.

``decide(view)`` reads a resource, its Job and its pods (as the cache shows them), the namespace's policy
and the time, and returns a ``Plan``: the children to create, the patch of the live Job, a group restart,
the status to write, the Event to post, a TTL's deletion, when to look again. ``reconciler.py`` gathers the
view and carries the plan out.

Some facts cost an API call and matter only in some states: the namespace's running Jobs (a capacity
rule and a run about to take capacity) and the Job's Events (a Job without pods: a ResourceQuota that
blocks them). ``decide`` then returns a plan that only names what it ``needs``; the reconciler fetches it
and asks again.

The status always describes the state the plan leads to: a Job about to be created, a Job after its
patch, no Job after a group restart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from visionft_api import VisionFineTuneSpec
from visionft_api import conditions as cond
from visionft_api.resource import FINAL_PHASES, KUEUE_QUEUE_LABEL

from visionft_operator import children, deadline, diagnosis, gang, jobs, policy
from visionft_operator import status as st

#: The facts ``decide`` may ask for.
NEEDS_USAGE = "usage"
NEEDS_JOB_EVENTS = "job_events"


@dataclass(frozen=True)
class View:
    """What one reconcile observed."""

    #: The resource (wire form).
    body: dict[str, Any]
    #: Its Job, or None.
    job: dict[str, Any] | None
    #: The pods of its runs.
    pods: list[dict[str, Any]]
    #: The namespace's policy.
    rules: policy.Rules
    #: The pod settings from the operator's config and the policy.
    pod_defaults: children.PodDefaults
    #: The wall time.
    now: datetime
    #: The namespace's running Jobs (all but this run's), counted fresh; only when asked for.
    usage: policy.Usage | None = None
    #: The Job's Events; only when asked for.
    job_events: list[dict[str, Any]] | None = None
    #: The apiserver refused the planned write of a child: (which child, the apiserver's message).
    rejected: tuple[str, str] | None = None


@dataclass(frozen=True)
class Restart:
    """A multi-node group restart: record what the failed Job used, then delete it."""

    job: dict[str, Any]
    #: status.restarts and status.attempts where they grew (``gang.record``).
    record: dict[str, int]


@dataclass
class Plan:
    """What one reconcile does."""

    #: Facts to gather before deciding (NEEDS_*); a plan that needs something does nothing else.
    needs: frozenset[str] = frozenset()
    #: Delete the resource: its ttlSecondsAfterFinished ran out.
    delete: bool = False
    #: Children to create (or adopt), in order: the Job last.
    create: list[dict[str, Any]] = field(default_factory=list)
    #: A merge patch of the live Job's spec.
    job_patch: dict[str, Any] | None = None
    #: A merge patch of the live Job's labels (Kueue's queue, while Kueue has not admitted the Job).
    job_labels: dict[str, str | None] | None = None
    #: A group restart.
    restart: Restart | None = None
    #: The derived status and its Event; None where nothing is to be written (the resource finished and
    #: was reported, or the status waits for the cache to show a pod).
    derived: st.Derived | None = None
    #: Whether the run waits for capacity under a policy rule (a Job of the namespace that ends wakes it).
    waiting: bool = False
    #: Whether the derived status differs from the resource's (then it is written).
    write_status: bool = False
    #: Whether to retry with a growing backoff although the reconcile did what it could: a child was
    #: refused, and the cause may be outside the spec (an admission policy, a quota, a PriorityClass).
    backoff: bool = False
    #: Seconds until the resource needs another look, or None.
    again: float | None = None


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, each naming the field as ``spec.a.b``."""
    lines = []
    for problem in err.errors():
        path = ".".join(str(p) for p in ("spec", *problem["loc"]))
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {message}")
    return "; ".join(lines)


def validate(spec: dict[str, Any]) -> tuple[VisionFineTuneSpec | None, str | None]:
    try:
        return VisionFineTuneSpec.model_validate(spec), None
    except ValidationError as err:
        return None, format_validation_error(err)


def ttl_left(status: dict[str, Any], spec: dict[str, Any], now: datetime) -> float | None:
    """Seconds until ttlSecondsAfterFinished deletes a finished resource (<= 0: now); None without one."""
    ttl = (spec.get("runPolicy") or {}).get("ttlSecondsAfterFinished")
    done = status.get("completionTime")
    if ttl is None or not done or status.get("phase") not in FINAL_PHASES:
        return None
    return float(ttl) - (now - jobs.parse_time(done)).total_seconds()


def settled(body: dict[str, Any]) -> bool:
    """Whether a reconcile would find nothing to do: finished, reported for the current generation, and
    no TTL to enforce (a TTL's expiry is queued by the reconcile that saw the run finish)."""
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    return (
        status.get("phase") in FINAL_PHASES
        and status.get("observedGeneration") == meta.get("generation")
        and ((body.get("spec") or {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished") is None
    )


def has_capacity_rule(rules: policy.Rules) -> bool:
    return rules.max_concurrent_jobs is not None or rules.max_gpus_per_namespace is not None


def _queue_labels(spec: VisionFineTuneSpec, job: dict[str, Any] | None) -> dict[str, str | None] | None:
    """Kueue's queue label for a Job Kueue holds (suspended, not finished) whose label no longer names
    spec.queueName: an edit before the start moves the Job to the new queue (or out of Kueue). Once the
    run has started, the CRD refuses the edit."""
    if job is None or jobs.finished(job) or not jobs.suspended(job):
        return None
    live = ((job.get("metadata") or {}).get("labels") or {}).get(KUEUE_QUEUE_LABEL)
    if live == spec.queue_name:
        return None
    return {KUEUE_QUEUE_LABEL: spec.queue_name}


def _patched(job: dict[str, Any], patch: dict[str, Any] | None) -> dict[str, Any]:
    """The Job as it is after a merge patch of its spec."""
    if not patch:
        return job
    return {**job, "spec": {**(job.get("spec") or {}), **patch}}


def _job_plan(
    view: View, owner: children.Owner, spec: VisionFineTuneSpec, phase: str | None
) -> tuple[Plan | None, list[dict[str, Any]], dict[str, Any] | None, st.PolicyDecision]:
    """The run's children: what to create, how to patch the live Job, and the policy's decision.

    Returns (a plan that needs a fact, or None; children to create; the Job patch; the decision)."""
    rules, job = view.rules, view.job
    decision = policy.check_rules(spec, spec.image or view.pod_defaults.image, rules)
    if job is None:
        if phase in FINAL_PHASES or decision.verdict == "deny" or spec.suspend:
            return None, [], None, decision
        if has_capacity_rule(rules):
            if view.usage is None:
                return Plan(needs=frozenset({NEEDS_USAGE})), [], None, decision
            decision = policy.check_capacity(spec, rules, view.usage)
            if decision.verdict != "allow":
                return None, [], None, decision
        return None, children.all_children(owner, spec, view.pod_defaults), None, decision
    if jobs.finished(job):
        return None, [], None, policy.PolicyDecision()
    patch: dict[str, Any] = {}
    live = job.get("spec") or {}
    # What is left of the run's deadline for this Job (deadline.py): an edited deadline applies at once.
    job_deadline = deadline.job_deadline(spec, deadline.job_elapsed(job))
    if live.get("activeDeadlineSeconds") != job_deadline:
        patch["activeDeadlineSeconds"] = job_deadline
    if spec.suspend and not live.get("suspend"):
        patch["suspend"] = True
    # Resuming takes capacity again: the policy decides, as for a new run.
    if not spec.suspend and live.get("suspend") and not spec.queue_name:
        if has_capacity_rule(rules):
            if view.usage is None:
                return Plan(needs=frozenset({NEEDS_USAGE})), [], None, decision
            decision = policy.check_capacity(spec, rules, view.usage)
        if decision.verdict == "allow":
            patch["suspend"] = False
    return None, [], patch or None, policy.PolicyDecision() if decision.verdict == "deny" else decision


def _name_taken(view: View, what: str, owner: str) -> Plan:
    """The plan for a run whose Job's name is held by another owner's Job."""
    meta, status = view.body["metadata"], view.body.get("status") or {}
    obs = st.Observation(
        generation=int(meta.get("generation") or 1),
        spec=view.body.get("spec") or {},
        status=status,
        name_taken=(what, owner),
    )
    derived = st.derive(obs, now=st.iso(view.now))
    return Plan(derived=derived, write_status=st.changed(status, derived.status), backoff=True)


def decide(view: View) -> Plan:
    """What to do about one resource; see the module's docstring."""
    body = view.body
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    raw_spec, status = body.get("spec") or {}, body.get("status") or {}
    now = view.now
    left = ttl_left(status, raw_spec, now)
    if left is not None and left <= 0:
        return Plan(delete=True)
    if status.get("phase") in FINAL_PHASES and status.get("observedGeneration") == meta.get("generation"):
        # Finished and already reported: nothing to look at until the TTL runs out.
        return Plan(again=left)
    elapsed = deadline.elapsed(status, now)
    owner = children.Owner(
        namespace=ns,
        name=name,
        uid=meta["uid"],
        restarts=int(status.get("restarts") or 0),
        attempts=int(status.get("attempts") or 0),
        elapsed=elapsed,
    )
    spec, error = validate(raw_spec)
    job, pods = view.job, view.pods
    if job is not None and not jobs.owned_by(job, owner.uid):
        # The name is another object's: an earlier resource of the same name whose Job the garbage
        # collector has yet to delete, or someone else's. Touch nothing, say so, look again later.
        taken = f"Job {ns}/{job['metadata']['name']}"
        return _name_taken(view, taken, jobs.controller(job))
    decision = policy.PolicyDecision()
    create: list[dict[str, Any]] = []
    job_patch = None
    # A run that started and has no Job (its group restarts, or its Job was deleted by hand) gets another
    # only while its deadline has time left (deadline.py); a suspended one finds out when it resumes.
    out_of_time = (
        spec is not None
        and job is None
        and not spec.suspend
        and bool(status.get("startTime"))
        and status.get("phase") not in FINAL_PHASES
        and deadline.run_out(spec, elapsed)
    )
    job_labels = None
    if spec is not None and not out_of_time:
        needs, create, job_patch, decision = _job_plan(view, owner, spec, status.get("phase"))
        if needs is not None:
            return needs
        job_labels = _queue_labels(spec, job) if not create else None
    if view.rejected is not None:
        # The write was refused: the status says so, a retry tries again.
        create, job_patch, job_labels = [], None, None
    if create:
        job = next(obj for obj in create if obj["kind"] == "Job")
        pods = []  # a Job made now has no pods yet (an earlier Job's may still be going)
    elif job is not None:
        job = _patched(job, job_patch)
    failed_create = None
    if job is not None and not create and not pods and not jobs.finished(job) and not jobs.suspended(job):
        # A Job made a moment ago has no FailedCreate Events yet; one without pods may be blocked (a
        # ResourceQuota, a missing PriorityClass, Pod Security).
        if view.job_events is None:
            return Plan(needs=frozenset({NEEDS_JOB_EVENTS}))
        failed_create = diagnosis.newest_failed_create(view.job_events)
    wait = jobs.pods_lag(job, pods, now)
    if wait is not None:
        # The Job failed, and its failed pod (whose exit code and message the status reports, and which a
        # gang restart counts) is not in the cache yet: the two come on separate watches. Write nothing;
        # the pod's event queues this resource again, and so does the retry.
        return Plan(job_patch=job_patch, job_labels=job_labels, again=wait)
    # A multi-node run whose pod failed restarts as a group (gang.py): its Job goes, a later reconcile
    # makes the next attempt's.
    group = gang.decide(spec, job, pods, owner.restarts, elapsed) if spec is not None else None
    restart = None
    if group is not None and group.restart and job is not None:
        restart = Restart(job=job, record=gang.record(job, pods, group, status))
        job = None
    state = group.state if group is not None else None
    if out_of_time and spec is not None:
        state = (
            "Failed",
            cond.REASON_DEADLINE_EXCEEDED,
            f"DeadlineExceeded: {deadline.message(spec, elapsed)}",
        )
    obs = st.Observation(
        generation=int(meta.get("generation") or 1),
        spec=raw_spec,
        status=status,
        spec_error=error,
        policy=decision,
        job=job,
        pods=pods,
        failed_create=failed_create,
        rejected=view.rejected,
        group=state,
        restarts=group.restarts if group is not None else None,
    )
    derived = st.derive(obs, now=st.iso(now))
    return Plan(
        create=create,
        job_patch=job_patch,
        job_labels=job_labels,
        restart=restart,
        derived=derived,
        write_status=bool(derived.remove_progress) or st.changed(status, derived.status),
        backoff=view.rejected is not None,
        waiting=decision.verdict == "wait",
        again=ttl_left(derived.status, raw_spec, now),
    )


def with_usage(view: View, usage: policy.Usage) -> View:
    return dataclasses.replace(view, usage=usage)


def with_job_events(view: View, events: list[dict[str, Any]]) -> View:
    return dataclasses.replace(view, job_events=events)


def with_rejection(view: View, what: str, message: str) -> View:
    return dataclasses.replace(view, rejected=(what, message))
