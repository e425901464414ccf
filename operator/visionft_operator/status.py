"""Status derivation: from what the operator observes (the Job, its pods, quota events, the trainer's
progress, the spec's validity and the policy decision) to the status fields the operator owns.

Pure functions, unit-tested without a cluster. The result never contains ``progress``: that field belongs to
the trainer (server-side apply, field manager visionft-trainer), and the operator's merge patch leaves it
alone.

Conditions follow metav1.Condition: ``lastTransitionTime`` changes only when a condition's status changes,
and ``observedGeneration`` is the spec generation they were computed for. Ready, Reconciling and Stalled
follow kstatus, so ``kubectl wait --for=condition=Ready``, Flux and Argo CD understand the resource.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from visionft_api import conditions as cond
from visionft_api.resource import FINAL_PHASES

from visionft_operator import diagnosis, evaluation, jobs
from visionft_operator.constants import ANNOTATION_ATTEMPTS
from visionft_operator.policy import PolicyDecision


def iso(moment: datetime) -> str:
    """A metav1.Time: RFC 3339 in UTC, whole seconds."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Observation:
    """Everything the derivation looks at, gathered by ``decision.py``."""

    generation: int
    spec: dict[str, Any]
    status: dict[str, Any]
    spec_error: str | None = None
    policy: PolicyDecision = field(default_factory=PolicyDecision)
    job: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = field(default_factory=list)
    #: The message of the Job's newest FailedCreate Event (its pod could not be created).
    failed_create: str | None = None
    #: The apiserver refused a child the operator wrote: (which child, the apiserver's message).
    rejected: tuple[str, str] | None = None
    #: A child's name is held by another owner's object: (which child, its owner).
    name_taken: tuple[str, str] | None = None
    # (phase, reason, message) to report instead of what the Job says: a multi-node run's group restart or
    # its end (gang.py), or a run whose deadline ran out before its next Job (deadline.py); and
    # status.restarts.
    group: tuple[str, str, str] | None = None
    restarts: int | None = None


@dataclass
class Derived:
    """The operator's part of the status, the Event to post, and what of the trainer's progress no longer
    holds (``remove_progress``: "all" for an earlier attempt's report, else the names of fields to drop)."""

    status: dict[str, Any]
    event: tuple[str, str, str] | None = None  # (type Normal|Warning, reason, message)
    remove_progress: Literal["all"] | tuple[str, ...] = ()
    # A new best evaluation (status.evaluation.best at a step not announced yet), posted besides ``event``.
    evaluation_event: tuple[str, str, str] | None = None


@dataclass
class _State:
    phase: str
    message: str
    reason: str
    #: Progress stopped and needs a person (kstatus Failed).
    stalled: bool = False
    #: Not stalled, but something users must see (an Event on each new reason).
    warning: bool = False
    admitted: tuple[str, str] | None = None  # (status, reason)


# --- conditions -----------------------------------------------------------------------------------------


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: str,
    reason: str,
    message: str,
    generation: int,
    now: str,
) -> list[dict[str, Any]]:
    """Return the list with one condition set; lastTransitionTime moves only when the status changes."""
    out = [dict(c) for c in conditions if c.get("type") != type_]
    old = next((c for c in conditions if c.get("type") == type_), None)
    transition = old["lastTransitionTime"] if old and old.get("status") == status else now
    out.append(
        {
            "type": type_,
            "status": status,
            "observedGeneration": generation,
            "lastTransitionTime": transition,
            "reason": reason,
            "message": message[:32768],
        }
    )
    order = {t: i for i, t in enumerate(cond.CONDITION_TYPES)}
    return sorted(out, key=lambda c: order.get(c["type"], len(order)))


def get_condition(conditions: list[dict[str, Any]], type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


# --- reading the Job and pods -----------------------------------------------------------------------------


def _pod_time(pod: dict[str, Any]) -> str:
    return (pod.get("metadata") or {}).get("creationTimestamp") or ""


def pod_failure(pods: list[dict[str, Any]]) -> str | None:
    """The newest failed pod's reason and message, as the kubelet reported them."""
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    if not failed:
        return None
    pod = max(failed, key=_pod_time)
    status = pod.get("status") or {}
    parts = []
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
        if term:
            text = f"container {cs.get('name')} terminated: {term.get('reason') or 'Error'}"
            text += f", exit code {term.get('exitCode')}"
            if term.get("message"):
                text += f": {term['message'].strip()[-1024:]}"
            parts.append(text)
    if status.get("reason") or status.get("message"):
        parts.append(f"{status.get('reason') or 'Failed'}: {status.get('message') or ''}".strip(": "))
    detail = "; ".join(parts) or "no reason reported"
    return f"pod {pod['metadata']['name']} failed: {detail}"


def pod_failure_reason(pods: list[dict[str, Any]]) -> str | None:
    """A CamelCase reason from the newest failed pod (the pod's own reason, else its container's)."""
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    if not failed:
        return None
    status = max(failed, key=_pod_time).get("status") or {}
    if status.get("reason"):
        return str(status["reason"])
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term and term.get("reason"):
            return str(term["reason"])
    return None


def _running(pods: list[dict[str, Any]]) -> bool:
    return any((p.get("status") or {}).get("phase") == "Running" for p in pods)


def attempts(job: dict[str, Any] | None, previous: int | None, job_pods: int = 0) -> int:
    """status.attempts: how many trainer pods the run has started over all of its Jobs.

    The earlier Jobs' pods (a multi-node group restart or a Job deleted by hand made this one) come from
    this Job's annotation. This Job's are those the Job controller counts as failed, succeeded or active,
    or ``job_pods``, the number of its pods seen otherwise, where that is more (the Job's count lags while
    it stops the pods of a failed group; its ``terminating`` count is left out, since it can overlap the
    others for a moment). Never fewer than ``previous`` (status.attempts): the Job controller stops counting
    a pod that it lets go of without a failure (one that suspension deleted, or that a disruption stopped
    on a single node: its podFailurePolicy ignores it), so such a pod and its replacement count once.
    """
    meta, st = (job or {}).get("metadata") or {}, (job or {}).get("status") or {}
    try:
        earlier = int((meta.get("annotations") or {}).get(ANNOTATION_ATTEMPTS) or 0)
    except ValueError:
        earlier = 0
    seen = sum(int(st.get(key) or 0) for key in ("failed", "succeeded", "active"))
    return max(earlier + max(seen, job_pods), int(previous or 0))


def outputs(spec: dict[str, Any]) -> dict[str, str]:
    """Where the trainer publishes (the layout under output.uri that the trainer writes); nothing without
    an output (a generated model's run keeps its results in the pod's scratch volume)."""
    base = (spec.get("output") or {}).get("uri", "").rstrip("/")
    if not base:
        return {}
    method = (spec.get("output") or {}).get("saveMethod", "lora")
    out = {"adapterUri": f"{base}/adapter/", "checkpointUri": f"{base}/checkpoints/"}
    if method != "lora":
        out["mergedUri"] = f"{base}/merged/"
    return out


# --- the trainer's progress -------------------------------------------------------------------------------

#: What a report says about the time left; meaningless once the run is over or stopped.
ETA_FIELDS = ("eta", "etaSeconds")


def _attempt_start(job: dict[str, Any], pods: list[dict[str, Any]]) -> str | None:
    """When the Job's current attempt began: its oldest unfinished pod's creation (all pods of a group
    start together), else its newest finished one's; None before it has a pod."""
    own = [p for p in jobs.own_pods(job, pods) if not (p.get("metadata") or {}).get("deletionTimestamp")]
    unfinished = [p for p in own if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
    if unfinished:
        return min(_pod_time(p) for p in unfinished)
    return max((_pod_time(p) for p in own), default=None)


def progress_is_stale(
    progress: dict[str, Any], job: dict[str, Any] | None, pods: list[dict[str, Any]]
) -> bool:
    """Whether a report belongs to an earlier attempt than the live Job's: its pod is gone and the Job has
    none yet (a resumed or re-created Job), or its time is before the current attempt's pod (a retry)."""
    if not progress or job is None or jobs.finished(job) or jobs.suspended(job):
        return False
    start = _attempt_start(job, pods)
    if start is None:
        return True
    reported = progress.get("updateTime")
    return bool(reported) and str(reported) < start


# --- the phase --------------------------------------------------------------------------------------------


def _stuck(problem: diagnosis.Problem, admitted: tuple[str, str] | None = None) -> _State:
    return _State(
        "Pending",
        problem.message,
        problem.reason,
        stalled=problem.stalled,
        warning=not problem.stalled,
        admitted=admitted,
    )


def _state(obs: Observation, progress: dict[str, Any]) -> _State:
    """Which phase the run is in, and why; ``progress`` is the current attempt's report."""
    previous = (obs.status or {}).get("phase")
    if obs.spec_error:
        return _State("Failed", f"invalid spec: {obs.spec_error}", cond.REASON_INVALID_SPEC, stalled=True)
    if obs.group:
        phase, reason, message = obs.group
        admitted = None if phase == "Failed" else ("True", cond.REASON_ADMITTED)
        return _State(phase, message, reason, stalled=phase == "Failed", admitted=admitted)
    job = obs.job
    if job is not None:
        worse = evaluation.fails_run(obs.spec, obs.status)
        if worse is not None and (jobs.condition(job, "Complete") or jobs.failure(job)):
            message = (
                f"{worse.message} and spec.evaluation.failIfWorseThanBase is set; the outputs are published"
            )
            return _State("Failed", message, cond.REASON_WORSE_THAN_BASE, stalled=True)
        if jobs.condition(job, "Complete") or jobs.condition(job, "SuccessCriteriaMet"):
            done = "training finished and the outputs are published"
            if not obs.spec.get("output"):
                done = (
                    "training finished; with no spec.output, the results stayed in the pod's scratch volume"
                )
            return _State("Succeeded", done, cond.REASON_SUCCEEDED)
        failed = jobs.failure(job)
        if failed:
            job_reason = failed.get("reason") or cond.REASON_JOB_FAILED
            reason = {
                "BackoffLimitExceeded": cond.REASON_BACKOFF_LIMIT,
                "DeadlineExceeded": cond.REASON_DEADLINE_EXCEEDED,
                "PodFailurePolicy": cond.REASON_POD_FAILED,
            }.get(job_reason, cond.REASON_JOB_FAILED)
            message = f"{job_reason}: {failed.get('message') or 'the Job failed'}"
            detail = pod_failure(obs.pods)
            if detail:
                message += f"; {detail}"
                pod_reason = pod_failure_reason(obs.pods)
                if reason in {cond.REASON_BACKOFF_LIMIT, cond.REASON_JOB_FAILED} and pod_reason:
                    message = f"{pod_reason}: {message}"
            return _State("Failed", message, reason, stalled=True)
    elif previous in FINAL_PHASES:
        # The run ended; its Job is gone (deleted by hand): the result stands.
        return _State(str(previous), str((obs.status or {}).get("message") or ""), str(previous))
    if obs.policy.verdict == "deny":
        return _State("Failed", obs.policy.message, cond.REASON_POLICY_VIOLATION, stalled=True)
    if obs.rejected:
        return _stuck(diagnosis.child_rejected(*obs.rejected))
    if obs.name_taken:
        return _stuck(diagnosis.name_taken(*obs.name_taken))
    if obs.spec.get("suspend"):
        return _State(
            "Suspended",
            "suspended by spec.suspend: pods are stopped, checkpoints are kept",
            cond.REASON_SUSPENDED,
            admitted=("False", cond.REASON_SUSPENDED),
        )
    if job is None:
        if obs.policy.verdict == "wait":
            return _State(
                "Pending",
                obs.policy.message,
                cond.REASON_POLICY_LIMIT,
                admitted=("False", cond.REASON_POLICY_LIMIT),
            )
        return _State("Pending", "creating the trainer's Job", cond.REASON_CREATING)
    if jobs.suspended(job):
        queue = (obs.spec.get("queueName")) or ""
        return _State(
            "Queued",
            f"waiting for Kueue to admit the Job in queue {queue}",
            cond.REASON_QUEUED_BY_KUEUE,
            admitted=("False", cond.REASON_QUEUED_BY_KUEUE),
        )
    admitted = ("True", cond.REASON_ADMITTED)
    if obs.failed_create and not obs.pods:
        creation = diagnosis.failed_create(obs.failed_create)
        if creation.reason == cond.REASON_QUOTA_EXCEEDED:
            return _stuck(creation, admitted=("False", cond.REASON_QUOTA_EXCEEDED))
        return _stuck(creation, admitted=admitted)
    problem = diagnosis.pod_problem(obs.pods)
    if problem:
        return _stuck(problem, admitted=admitted)
    if _running(obs.pods):
        stage = (progress.get("stage") or "").lower()
        if stage in {"uploading", "saving", "done"}:
            return _State("Uploading", "uploading the outputs", cond.REASON_UPLOADING, admitted=admitted)
        if stage == "training" or (progress.get("step") or 0) > 0:
            return _State("Training", "training", cond.REASON_TRAINING, admitted=admitted)
        what = f" ({progress['stage']})" if progress.get("stage") else ""
        return _State(
            "Initializing",
            f"the trainer is starting{what}{_retry_note(job, obs.pods)}",
            cond.REASON_WAITING_FOR_POD,
            admitted=admitted,
        )
    if any((p.get("status") or {}).get("phase") == "Succeeded" for p in obs.pods):
        # The trainer exited 0; the Job controller has yet to mark the Job complete.
        return _State(
            "Uploading", "the trainer finished; completing the Job", cond.REASON_UPLOADING, admitted=admitted
        )
    return _State(
        "Initializing",
        f"waiting for the training pod to start{_retry_note(job, obs.pods)}",
        cond.REASON_WAITING_FOR_POD,
        admitted=admitted,
    )


def _retry_note(job: dict[str, Any], pods: list[dict[str, Any]]) -> str:
    """For a Job's retried pod: which retry, and why the pod before it failed."""
    failed = [p for p in jobs.own_pods(job, pods) if (p.get("status") or {}).get("phase") == "Failed"]
    if not failed:
        return ""
    limit = (job.get("spec") or {}).get("backoffLimit")
    of = f" of {limit}" if limit is not None else ""
    return f" (retry {len(failed)}{of}: {pod_failure(failed)})"


def derive(obs: Observation, now: str) -> Derived:
    """The operator-owned status fields for one observation, ``now`` (a metav1.Time) for the new condition
    transitions and completionTime."""
    old = obs.status or {}
    progress = old.get("progress") or {}
    stale = progress_is_stale(progress, obs.job, obs.pods)
    st = _state(obs, {} if stale else progress)
    gen = obs.generation
    conds: list[dict[str, Any]] = list(old.get("conditions") or [])

    def put(type_: str, status: str, reason: str, message: str) -> None:
        nonlocal conds
        conds = set_condition(conds, type_, status, reason, message, gen, now)

    final = st.phase in FINAL_PHASES
    if st.phase == "Succeeded":
        put(cond.READY, "True", cond.REASON_SUCCEEDED, st.message)
        put(cond.RECONCILING, "False", cond.REASON_SUCCEEDED, "")
        put(cond.STALLED, "False", cond.REASON_SUCCEEDED, "")
        put(cond.COMPLETE, "True", cond.REASON_SUCCEEDED, st.message)
        put(cond.FAILED, "False", cond.REASON_SUCCEEDED, "")
    elif st.phase == "Failed":
        put(cond.READY, "False", st.reason, st.message)
        put(cond.RECONCILING, "False", st.reason, "")
        put(cond.STALLED, "True", st.reason, st.message)
        put(cond.COMPLETE, "False", st.reason, "")
        put(cond.FAILED, "True", st.reason, st.message)
    else:
        # Ready's reason is the state's, so that ``kubectl get vft`` (its Reason column) says why.
        put(cond.READY, "False", st.reason, st.message)
        put(
            cond.RECONCILING,
            "False" if st.phase == "Suspended" or st.stalled else "True",
            st.reason,
            st.message,
        )
        put(cond.STALLED, "True" if st.stalled else "False", st.reason, st.message if st.stalled else "")
        put(cond.COMPLETE, "False", cond.REASON_IN_PROGRESS, "")
        put(cond.FAILED, "False", cond.REASON_IN_PROGRESS, "")
    degraded = evaluation.degraded_condition(old)
    if degraded is not None:
        put(cond.DEGRADED, *degraded)
    if st.admitted:
        admitted_msg = (
            st.message if st.admitted[0] == "False" else "policy, quota and queue let the run start"
        )
        put(cond.ADMITTED, st.admitted[0], st.admitted[1], admitted_msg)

    status: dict[str, Any] = {
        "observedGeneration": gen,
        "phase": st.phase,
        "message": st.message[:4096],
        "conditions": conds,
    }
    job = obs.job
    if job is not None:
        status["jobName"] = job["metadata"]["name"]
        count = attempts(job, old.get("attempts"))
        if count:
            status["attempts"] = count
        job_start = (job.get("status") or {}).get("startTime")
        if not old.get("startTime") and job_start and not (job.get("spec") or {}).get("suspend"):
            status["startTime"] = job_start
    if final and not old.get("completionTime"):
        status["completionTime"] = ((job or {}).get("status") or {}).get("completionTime") or now
    published = st.phase == "Succeeded" or st.reason == cond.REASON_WORSE_THAN_BASE
    if published and outputs(obs.spec):
        status["outputs"] = outputs(obs.spec)
    if obs.restarts:
        status["restarts"] = obs.restarts

    remove: Literal["all"] | tuple[str, ...] = ()
    if stale:
        remove = "all"  # a new attempt starts with no progress until its pod reports
    elif final or st.phase in {"Suspended", "Queued"}:
        remove = tuple(f for f in ETA_FIELDS if f in progress)  # nothing is left to wait for

    old_reason = (get_condition(old.get("conditions") or [], cond.READY) or {}).get("reason")
    event = None
    if st.phase != old.get("phase") or ((st.stalled or st.warning) and old_reason != st.reason):
        kind = "Warning" if st.phase == "Failed" or st.stalled or st.warning else "Normal"
        event = (kind, st.reason if kind == "Warning" else st.phase, st.message)
    if obs.group and status["message"] != old.get("message"):
        event = ("Warning", st.reason, st.message)  # each group restart, also one within the same phase
    best = evaluation.new_best(old)
    best_event = None
    if best is not None:
        status["announcedBestStep"] = best[0]
        best_event = ("Normal", cond.REASON_NEW_BEST_METRIC, best[1])
    return Derived(status=status, event=event, remove_progress=remove, evaluation_event=best_event)


def changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether a status patch would change anything (ignoring what the derivation doesn't own)."""
    return any(old.get(k) != v for k, v in new.items())
