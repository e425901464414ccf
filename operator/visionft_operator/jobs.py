"""Reading the operator's batch/v1 Jobs and their pods (wire form, as the cache keeps them). Pure.

The reconcile, the status derivation, the gang restarts and the event handlers all ask the same
questions of a Job: has it finished, has it failed, how many GPUs does it hold, which pods are its own.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from visionft_operator.policy import Usage

#: Job conditions that end a Job (FailureTarget and SuccessCriteriaMet come first, while its pods stop).
FINISHED_CONDITIONS = frozenset({"Complete", "Failed", "FailureTarget", "SuccessCriteriaMet"})
#: How long a failed Job's status waits for the cache to show its failed pod (pods can also go away).
POD_LAG_SECONDS = 10.0


def condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    """The Job's condition of that type when it is True."""
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


def finished(job: dict[str, Any]) -> bool:
    return any(condition(job, type_) for type_ in FINISHED_CONDITIONS)


def failure(job: dict[str, Any]) -> dict[str, Any] | None:
    """The Job's Failed condition, or the FailureTarget one that comes first (its pods still stopping)."""
    return condition(job, "Failed") or condition(job, "FailureTarget")


def suspended(job: dict[str, Any]) -> bool:
    return bool((job.get("spec") or {}).get("suspend"))


def gpus(job: dict[str, Any]) -> int:
    """The GPUs a Job's pods hold at full parallelism (wire form with the pod template)."""
    spec = job.get("spec") or {}
    per_pod = 0
    for container in ((spec.get("template") or {}).get("spec") or {}).get("containers") or []:
        per_pod += int(((container.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu") or 0)
    return per_pod * int(spec.get("parallelism") or 1)


def usage(jobs: list[dict[str, Any]], exclude: str) -> Usage:
    """What the Jobs of a namespace (but ``exclude``) run now: those neither finished nor suspended."""
    running = [
        job for job in jobs if job["metadata"]["name"] != exclude and not finished(job) and not suspended(job)
    ]
    return Usage(jobs=len(running), gpus=sum(gpus(job) for job in running))


def owned_by(obj: dict[str, Any], uid: str | None) -> bool:
    return any(o.get("uid") == uid for o in (obj.get("metadata") or {}).get("ownerReferences") or [])


def controller(obj: dict[str, Any]) -> str:
    """Who controls an object, as "Kind name (uid ...)", or "nobody"."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return f"{ref.get('kind')} {ref.get('name')} (uid {ref.get('uid')})"
    return "nobody"


def own_pods(job: dict[str, Any], pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pods of ``pods`` that this Job made (not an earlier attempt's)."""
    uid = job["metadata"].get("uid")
    return [p for p in pods if owned_by(p, uid)]


def parse_time(timestamp: str) -> datetime:
    """A metav1.Time (RFC 3339, seconds) as an aware datetime."""
    return datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def pods_lag(job: dict[str, Any] | None, pods: list[dict[str, Any]], now: datetime) -> float | None:
    """Seconds to wait before reporting a failed Job whose failed pod the cache does not show yet (the
    Job's and the pods' watches are not ordered with each other); None when there is nothing to wait for:
    no failure, a failed pod of the Job in the cache, or more than POD_LAG_SECONDS since the failure."""
    if job is None:
        return None
    failed = failure(job)
    if failed is None:
        return None
    if any((p.get("status") or {}).get("phase") == "Failed" for p in own_pods(job, pods)):
        return None
    since = failed.get("lastTransitionTime")
    if not since or (now - parse_time(since)).total_seconds() > POD_LAG_SECONDS:
        return None
    return 1.0
