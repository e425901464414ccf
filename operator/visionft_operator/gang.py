"""Gang restarts of a multi-node run: when one pod fails, all of its pods start again.

torchrun's static rendezvous can't take in one replaced pod: its peers keep waiting on the dead rank (or
hang in a collective until NCCL times out). So a run over several nodes restarts as a group:

- Its Job fails as a whole on the first pod failure (``children.pod_failure_policy(multi_node=True)``:
  FailJob rules and backoffLimit 0), and the Job controller stops the peers at once.
- ``decide`` (pure) reads the failed Job and its pods: a disruption (DisruptionTarget, as preemption or a
  node drain set it) restarts the group without counting; an exit code in NON_RETRYABLE_EXIT_CODES ends
  the run at once; any other failure restarts the group and counts one restart against
  spec.runPolicy.backoffLimit, until the restarts are used up. A restart due once
  spec.runPolicy.activeDeadlineSeconds has run out (counted from the run's first start, ``deadline.py``)
  ends the run with reason DeadlineExceeded instead. A suspended Job (spec.suspend, Kueue) normally
  doesn't fail, since the Job controller lets go of the pods it stops; should one of them still match a
  FailJob rule, the Job is replaced without counting.
- A restart (``reconciler.py``, from ``record``) writes the new count to status.restarts and the pods
  started so far to status.attempts, then deletes the failed Job in the foreground: the Job stays until all of its pods are gone, so the
  next attempt's pods never meet the old ones (GPUs, the anti-affinity, the pods' DNS names). Once it is
  gone, the reconcile creates the Job again as for a new run, with the same name, ConfigMap and headless
  Service, and its pods resume from the newest complete checkpoint under spec.output.uri (the trainer
  does that on every start). The new Job gets only what is left of the deadline.

Counting survives an operator restart and a reconcile that runs twice: each Job carries the restart count
it was created with (annotation ``visionft.io/restarts``), and a failed Job's restart is always that count
plus one, so the same failure is never counted twice. Likewise for status.attempts: each new Job carries
the pods that its run's earlier Jobs started (annotation ``visionft.io/attempts``), and adds its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from visionft_api import VisionFineTuneSpec
from visionft_api import conditions as cond

from visionft_operator import constants as c
from visionft_operator import deadline, jobs
from visionft_operator import status as st

# The pod that the Job controller names in a FailJob message ("... for pod <ns>/<name> ...", "Pod
# <ns>/<name> has condition ...").
_POD_IN_MESSAGE = re.compile(r"\b[Pp]od ([a-z0-9][-a-z0-9.]*)/([a-z0-9][-a-z0-9.]*)")
_EXIT_CODE_IN_MESSAGE = re.compile(r"failed with exit code (-?\d+)")
# Job failure reasons that a pod failure causes (a FailJob rule; a pod that failed with no exit code).
_POD_CAUSED = {"PodFailurePolicy", "BackoffLimitExceeded"}


@dataclass(frozen=True)
class Verdict:
    """What to do about a multi-node run's failed Job, and what the status says meanwhile."""

    #: Whether to delete the failed Job so that the next reconcile starts the group again.
    restart: bool
    #: status.restarts after this verdict.
    restarts: int
    #: (phase, reason, message) that the status reports instead of the failed Job's own state; None
    #: where the usual derivation is right (a suspended run shows Suspended once the Job is gone).
    state: tuple[str, str, str] | None


def job_restarts(job: dict[str, Any], default: int) -> int:
    """The restart count a Job was created with (its annotation), else ``default``."""
    value = ((job.get("metadata") or {}).get("annotations") or {}).get(c.ANNOTATION_RESTARTS)
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _disrupted(pod: dict[str, Any]) -> bool:
    return any(
        x.get("type") == "DisruptionTarget" and x.get("status") == "True"
        for x in (pod.get("status") or {}).get("conditions") or []
    )


def _exit_code(pod: dict[str, Any]) -> int | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated") or {}
        if cs.get("name") == c.CONTAINER_NAME and term.get("exitCode") is not None:
            return int(term["exitCode"])
    return None


def _finished_at(pod: dict[str, Any]) -> str:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        finished = ((cs.get("state") or {}).get("terminated") or {}).get("finishedAt")
        if finished:
            return str(finished)
    return str((pod.get("metadata") or {}).get("creationTimestamp") or "")


def failed_pod(failure: dict[str, Any], pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The pod whose failure failed the Job: the one its FailJob message names, else the first to fail
    of those the Job controller did not stop itself (those have a deletionTimestamp)."""
    named = _POD_IN_MESSAGE.search(failure.get("message") or "")
    if named:
        for pod in pods:
            if pod["metadata"].get("name") == named.group(2):
                return pod
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    if not failed:
        return None
    return min(failed, key=lambda p: (bool(p["metadata"].get("deletionTimestamp")), _finished_at(p)))


def _kind(failure: dict[str, Any], pod: dict[str, Any] | None) -> str | None:
    """How the Job's failure counts: a disruption, fatal (a non-retryable exit code) or a failure; None
    when no pod caused it (the deadline, say)."""
    if failure.get("reason") not in _POD_CAUSED:
        return None
    message = failure.get("message") or ""
    if (pod is not None and _disrupted(pod)) or "has condition DisruptionTarget" in message:
        return "disruption"
    code = _exit_code(pod) if pod is not None else None
    if code is None and (found := _EXIT_CODE_IN_MESSAGE.search(message)):
        code = int(found.group(1))
    if code in c.NON_RETRYABLE_EXIT_CODES:
        return "fatal"
    return "failure"


def decide(
    spec: VisionFineTuneSpec,
    job: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    restarts: int,
    elapsed: int = 0,
) -> Verdict | None:
    """What a multi-node run's failed Job means; None for one node, a Job that has not failed, or a
    failure that no pod caused (the Job's own deadline: the Job's own report stands).

    Args:
        spec (VisionFineTuneSpec): the resource's spec.
        job (dict | None): the run's Job (wire form).
        pods (list[dict]): the run's pods; only those of this Job are looked at.
        restarts (int): status.restarts, for a Job made before it carried its own count.
        elapsed (int): seconds since the run first started (``deadline.elapsed``), for the run's deadline.
            Default: 0.
    """
    if spec.resources.nodes <= 1 or job is None:
        return None
    failure = jobs.failure(job)
    if failure is None:
        return None
    done = job_restarts(job, restarts)
    pod = failed_pod(failure, jobs.own_pods(job, pods))
    kind = _kind(failure, pod)
    if kind is None:
        return None
    if (job.get("spec") or {}).get("suspend"):
        # Its pods were stopped on purpose (spec.suspend, Kueue), and they failed on the way out.
        return Verdict(restart=True, restarts=done, state=None)
    job_says = f"{failure.get('reason')}: {failure.get('message') or 'the Job failed'}"
    what = (st.pod_failure([pod]) if pod is not None else None) or job_says
    if kind == "fatal":
        # The run ends as the Job says, with the failed pod's own words (its peers failed after it).
        message = job_says if pod is None else f"{job_says}; {what}"
        return Verdict(False, done, ("Failed", cond.REASON_POD_FAILED, message))
    limit = spec.run_policy.backoff_limit
    if kind == "failure" and done >= limit:
        message = (
            f"BackoffLimitExceeded: {what}; the group was restarted {done} times "
            f"(spec.runPolicy.backoffLimit is {limit})"
        )
        return Verdict(False, done, ("Failed", cond.REASON_BACKOFF_LIMIT, message))
    if deadline.run_out(spec, elapsed):
        message = f"DeadlineExceeded: {what}; {deadline.message(spec, elapsed)}"
        return Verdict(False, done, ("Failed", cond.REASON_DEADLINE_EXCEEDED, message))
    if kind == "disruption":
        message = f"restarting the group from the last checkpoint (a disruption: not counted): {what}"
        return Verdict(True, done, ("Pending", cond.REASON_RESTARTING_GROUP, message))
    message = f"restarting the group from the last checkpoint (restart {done + 1} of {limit}): {what}"
    return Verdict(True, done + 1, ("Pending", cond.REASON_RESTARTING_GROUP, message))


def record(
    job: dict[str, Any], pods: list[dict[str, Any]], verdict: Verdict, status: dict[str, Any]
) -> dict[str, int]:
    """What a restart writes to the status before the failed Job goes: the restart count and the pods
    started so far (the failed Job's included), where they grew past status.restarts and status.attempts
    (the next Job is made with those)."""
    grew: dict[str, int] = {}
    if verdict.restarts > int(status.get("restarts") or 0):
        grew["restarts"] = verdict.restarts
    attempts = st.attempts(job, status.get("attempts"), len(jobs.own_pods(job, pods)))
    if attempts > int(status.get("attempts") or 0):
        grew["attempts"] = attempts
    return grew
