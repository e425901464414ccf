"""Status derivation: from what the operator observes (the Job, its pods, quota events, the trainer's
progress, the spec's validity and the policy decision) to the status fields the operator owns.

Pure functions, unit-tested without a cluster. The result never contains `progress`: that field belongs to
the trainer (server-side apply, field manager visionft-trainer), and the operator's merge patch leaves it
alone.

Conditions follow metav1.Condition: `lastTransitionTime` changes only when a condition's status changes,
and `observedGeneration` is the spec generation they were computed for. Ready, Reconciling and Stalled
follow kstatus, so `kubectl wait --for=condition=Ready`, Flux and Argo CD understand the resource.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from visionft_api import conditions as cond
from visionft_api.resource import FINAL_PHASES

from visionft_operator import evaluation
from visionft_operator.constants import ANNOTATION_ATTEMPTS


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class PolicyDecision:
    """What the policy says about starting the run: allowed, wait (capacity) or deny (a hard rule)."""

    verdict: str = "allow"  # allow | wait | deny
    rule: str = ""
    message: str = ""


@dataclass
class Observation:
    """Everything the derivation looks at, fetched by `reconcile.py`."""

    generation: int
    spec: dict[str, Any]
    status: dict[str, Any]
    spec_error: str | None = None
    policy: PolicyDecision = field(default_factory=PolicyDecision)
    job: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = field(default_factory=list)
    quota_message: str | None = None
    # (phase, reason, message) to report instead of what the Job says: a multi-node run's group restart or
    # its end (gang.py), or a run whose deadline ran out before its next Job (deadline.py); and
    # status.restarts.
    group: tuple[str, str, str] | None = None
    restarts: int | None = None


@dataclass
class Derived:
    """The operator's part of the status, plus the Event to post when the phase changed."""

    status: dict[str, Any]
    event: tuple[str, str, str] | None = None  # (type Normal|Warning, reason, message)
    # A new best evaluation (status.evaluation.best at a step not announced yet), posted besides `event`.
    evaluation_event: tuple[str, str, str] | None = None


@dataclass
class _State:
    phase: str
    message: str
    reason: str
    stalled: bool = False
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


def _job_condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


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


_SECRET_MISSING = re.compile(r'secret "([^"]+)" not found')
_KEY_MISSING = re.compile(r"couldn't find key (\S+) in Secret (\S+)")


def waiting_problem(pods: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(reason, message) when the newest live pod is stuck before start: a missing Secret or key
    (CreateContainerConfigError, as the kubelet reports it), or an image that can't be pulled."""
    live = [p for p in pods if (p.get("status") or {}).get("phase") in (None, "Pending")]
    if not live:
        return None
    pod = max(live, key=_pod_time)
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason, message = waiting.get("reason") or "", waiting.get("message") or ""
        if reason == "CreateContainerConfigError":
            key = _KEY_MISSING.search(message)
            if key:
                return cond.REASON_MISSING_SECRET_KEY, (
                    f"the Secret {key.group(2)} has no key {key.group(1)} (spec.storage): {message}"
                )
            secret = _SECRET_MISSING.search(message)
            if secret:
                return cond.REASON_MISSING_SECRET, (
                    f"the Secret {secret.group(1)} named in spec.storage.credentialsSecret does not exist "
                    f"in this namespace: {message}"
                )
            return "CreateContainerConfigError", message
        if reason in {"ErrImagePull", "ImagePullBackOff", "InvalidImageName"}:
            return reason, f"the trainer image can't be pulled (spec.image): {message}"
    return None


def _running(pods: list[dict[str, Any]]) -> bool:
    return any((p.get("status") or {}).get("phase") == "Running" for p in pods)


def attempts(job: dict[str, Any] | None, previous: int | None, job_pods: int = 0) -> int:
    """status.attempts: how many trainer pods the run has started over all of its Jobs.

    The earlier Jobs' pods (a multi-node group restart or a Job deleted by hand made this one) come from
    this Job's annotation. This Job's are those the Job controller counts as failed, succeeded or active,
    or `job_pods`, the number of its pods seen otherwise, where that is more (the Job's count lags while
    it stops the pods of a failed group; its `terminating` count is left out, since it can overlap the
    others for a moment). Never fewer than `previous` (status.attempts): the Job controller stops counting
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


# --- the phase --------------------------------------------------------------------------------------------


def _state(obs: Observation) -> _State:
    """Which phase the run is in, and why."""
    previous = (obs.status or {}).get("phase")
    progress = (obs.status or {}).get("progress") or {}
    if obs.spec_error:
        return _State("Failed", f"invalid spec: {obs.spec_error}", cond.REASON_INVALID_SPEC, stalled=True)
    if obs.group:
        phase, reason, message = obs.group
        admitted = None if phase == "Failed" else ("True", cond.REASON_ADMITTED)
        return _State(phase, message, reason, stalled=phase == "Failed", admitted=admitted)
    job = obs.job
    if job is not None:
        worse = evaluation.fails_run(obs.spec, obs.status)
        if worse is not None and (_job_condition(job, "Complete") or _job_condition(job, "Failed")):
            message = (
                f"{worse.message} and spec.evaluation.failIfWorseThanBase is set; the outputs are published"
            )
            return _State("Failed", message, cond.REASON_WORSE_THAN_BASE, stalled=True)
        if _job_condition(job, "Complete") or _job_condition(job, "SuccessCriteriaMet"):
            done = "training finished and the outputs are published"
            if not obs.spec.get("output"):
                done = (
                    "training finished; with no spec.output, the results stayed in the pod's scratch volume"
                )
            return _State("Succeeded", done, cond.REASON_SUCCEEDED)
        failed = _job_condition(job, "Failed") or _job_condition(job, "FailureTarget")
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
    if (job.get("spec") or {}).get("suspend"):
        queue = (obs.spec.get("queueName")) or ""
        return _State(
            "Queued",
            f"waiting for Kueue to admit the Job in queue {queue}",
            cond.REASON_QUEUED_BY_KUEUE,
            admitted=("False", cond.REASON_QUEUED_BY_KUEUE),
        )
    if obs.quota_message and not obs.pods:
        return _State(
            "Pending",
            f"a ResourceQuota blocks the training pod: {obs.quota_message}",
            cond.REASON_QUOTA_EXCEEDED,
            admitted=("False", cond.REASON_QUOTA_EXCEEDED),
        )
    problem = waiting_problem(obs.pods)
    if problem:
        return _State(
            "Pending", problem[1], problem[0], stalled=True, admitted=("True", cond.REASON_ADMITTED)
        )
    admitted = ("True", cond.REASON_ADMITTED)
    if _running(obs.pods):
        stage = (progress.get("stage") or "").lower()
        if stage in {"uploading", "saving", "done"}:
            return _State("Uploading", "uploading the outputs", cond.REASON_UPLOADING, admitted=admitted)
        if stage == "training" or (progress.get("step") or 0) > 0:
            return _State("Training", "training", cond.REASON_TRAINING, admitted=admitted)
        what = f" ({progress['stage']})" if progress.get("stage") else ""
        return _State(
            "Initializing", f"the trainer is starting{what}", cond.REASON_WAITING_FOR_POD, admitted=admitted
        )
    if any((p.get("status") or {}).get("phase") == "Succeeded" for p in obs.pods):
        # The trainer exited 0; the Job controller has yet to mark the Job complete.
        return _State(
            "Uploading", "the trainer finished; completing the Job", cond.REASON_UPLOADING, admitted=admitted
        )
    return _State(
        "Initializing",
        "waiting for the training pod to start",
        cond.REASON_WAITING_FOR_POD,
        admitted=admitted,
    )


def derive(obs: Observation, now: str | None = None) -> Derived:
    """The operator-owned status fields for one observation."""
    now = now or now_iso()
    old = obs.status or {}
    st = _state(obs)
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
        put(
            cond.READY, "False", cond.REASON_IN_PROGRESS if st.phase != "Suspended" else st.reason, st.message
        )
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

    event = None
    if st.phase != old.get("phase") or (
        st.stalled
        and (get_condition(old.get("conditions") or [], cond.STALLED) or {}).get("reason") != st.reason
    ):
        kind = "Warning" if st.phase == "Failed" or st.stalled else "Normal"
        event = (kind, st.reason if st.stalled or st.phase == "Failed" else st.phase, st.message)
    if obs.group and status["message"] != old.get("message"):
        event = ("Warning", st.reason, st.message)  # each group restart, also one within the same phase
    best = evaluation.new_best(old)
    best_event = None
    if best is not None:
        status["announcedBestStep"] = best[0]
        best_event = ("Normal", cond.REASON_NEW_BEST_METRIC, best[1])
    return Derived(status=status, event=event, evaluation_event=best_event)


def changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether a status patch would change anything (ignoring what the derivation doesn't own)."""
    return any(old.get(k) != v for k, v in new.items())
