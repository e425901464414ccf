"""Why a run can't start, in the user's terms: which reason to report and which field to change. Pure.

A run that passed validation can still be stuck before its trainer starts, for reasons only the cluster
knows. Each is read from where Kubernetes reports it and becomes one ``Problem``:

- the apiserver refused a child the operator writes (its validation, an admission policy, a quota, RBAC,
  a name taken by another owner): ``ChildRejected``, from the write's answer;
- the run's Job name is held by another owner's Job (most often an earlier resource of the same name,
  whose Job is being deleted): ``NameTaken``, from the cache;
- the Job can't create its pod (a missing PriorityClass, Pod Security, a quota): ``FailedCreate``, from the
  Job's Events (a ResourceQuota is reported apart, as capacity the run waits for);
- the scheduler finds no node for the pod: ``Unschedulable``, from the pod's PodScheduled condition;
- the kubelet can't start the container: a missing Secret or key, another ``CreateContainerConfigError``,
  an image that can't be pulled, from the container's waiting state.

Each message says what happened in the cluster's own words and which spec field (or which cluster object)
to change. All of them but Unschedulable and NameTaken need a person (Stalled); a pod that waits for a node
may get one when other runs end or the cluster grows, and a Job being deleted goes by itself, so those stay
in progress.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from visionft_api import conditions as cond


@dataclass(frozen=True)
class Problem:
    """A reason (CamelCase), a message that names what to change, and whether it needs a person."""

    reason: str
    message: str
    stalled: bool = True


# What the cluster's messages name -> the field or object to change.
_HINTS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), hint)
    for pattern, hint in (
        (
            r"tolerations|untolerated taint",
            "spec.resources.tolerations (or the operator policy's tolerations)",
        ),
        (r"nodeSelector|node selector|didn't match Pod's node affinity", "spec.resources.nodeSelector"),
        (r"PriorityClass|priorityClassName", "spec.resources.priorityClassName"),
        (r"nvidia\.com/gpu", "spec.resources.gpusPerNode (or spec.resources.nodes)"),
        (r"Insufficient cpu|requests\.cpu|limits\.cpu|\bcpu\b", "spec.resources.cpu"),
        (r"Insufficient memory|requests\.memory|limits\.memory|\bmemory\b", "spec.resources.memory"),
        (r"ephemeral-storage|sizeLimit", "spec.resources.scratchSize"),
        (r"PodSecurity|pod security", "the namespace's Pod Security level"),
        (r"image", "spec.image"),
        (r"queue-name", "spec.queueName"),
        (r"secretKeyRef|secret", "spec.storage.credentialsSecret"),
        (r"configMap", "spec.storage.caBundleConfigMap"),
        (r"exists and is controlled by", "the conflicting object (delete it), or this resource's name"),
        (r"forbidden: User", "the operator's RBAC (its chart values)"),
    )
)


def what_to_change(message: str) -> str:
    """The fields or objects that a cluster message points to (a scheduler's message can name several
    reasons, one per kind of node)."""
    hints = list(dict.fromkeys(hint for pattern, hint in _HINTS if pattern.search(message)))
    if not hints:
        return "the spec, or the cluster rule that the message names"
    return " or ".join(hints)


def child_rejected(what: str, message: str) -> Problem:
    """The apiserver refused to create or update a child (``what``: "Job team-a/x-trainer")."""
    return Problem(
        cond.REASON_CHILD_REJECTED,
        f"the apiserver refused the {what}: {message}; change {what_to_change(message)}. The operator "
        "retries with a backoff and picks up a changed spec at once",
    )


def name_taken(what: str, owner: str) -> Problem:
    """A child's name is held by another owner's object (``owner``: "VisionFineTune x (uid ...)")."""
    return Problem(
        cond.REASON_NAME_TAKEN,
        f"the {what} belongs to {owner}, not to this resource: it goes with its owner (an earlier "
        "VisionFineTune of the same name being deleted); otherwise delete it, or rename this VisionFineTune",
        stalled=False,
    )


def failed_create(message: str) -> Problem:
    """The Job controller can't create the training pod (its FailedCreate Event)."""
    if "exceeded quota" in message:
        return Problem(
            cond.REASON_QUOTA_EXCEEDED,
            f"a ResourceQuota blocks the training pod: {message}",
            stalled=False,
        )
    return Problem(
        cond.REASON_FAILED_CREATE,
        f"the Job can't create the training pod: {message}; change {what_to_change(message)}",
    )


def newest_failed_create(events: list[dict[str, Any]]) -> str | None:
    """The message of a Job's newest FailedCreate Event."""
    failed = [e for e in events if e.get("reason") == "FailedCreate"]
    if not failed:
        return None
    newest = max(failed, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    return str(newest.get("message") or "")


def _pod_time(pod: dict[str, Any]) -> str:
    return (pod.get("metadata") or {}).get("creationTimestamp") or ""


def _newest_pending(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    live = [
        p
        for p in pods
        if (p.get("status") or {}).get("phase") in (None, "Pending")
        and not (p.get("metadata") or {}).get("deletionTimestamp")
    ]
    return max(live, key=_pod_time) if live else None


_SECRET_MISSING = re.compile(r'secret "([^"]+)" not found')
_KEY_MISSING = re.compile(r"couldn't find key (\S+) in Secret (\S+)")
_IMAGE_PULL = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName"})


def _container_problem(reason: str, message: str) -> Problem | None:
    if reason == "CreateContainerConfigError":
        key = _KEY_MISSING.search(message)
        if key:
            return Problem(
                cond.REASON_MISSING_SECRET_KEY,
                f"the Secret {key.group(2)} has no key {key.group(1)}: add it, or change "
                f"spec.storage.accessKeyIdKey / secretAccessKeyKey: {message}",
            )
        secret = _SECRET_MISSING.search(message)
        if secret:
            return Problem(
                cond.REASON_MISSING_SECRET,
                f"the Secret {secret.group(1)} named in spec.storage.credentialsSecret does not exist in "
                f"this namespace: create it, or change spec.storage.credentialsSecret: {message}",
            )
        return Problem(
            cond.REASON_CREATE_CONTAINER_CONFIG,
            f"the kubelet can't set up the trainer container: {message}; change {what_to_change(message)}",
        )
    if reason in _IMAGE_PULL:
        return Problem(
            reason,
            f"the trainer image can't be pulled: {message or reason}; change spec.image (or the "
            "operator's trainer image), or give the namespace access to its registry",
        )
    return None


def pod_problem(pods: list[dict[str, Any]]) -> Problem | None:
    """What keeps the newest pending pod from running: its container can't start, or no node takes it."""
    pod = _newest_pending(pods)
    if pod is None:
        return None
    status = pod.get("status") or {}
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        found = _container_problem(waiting.get("reason") or "", waiting.get("message") or "")
        if found is not None:
            return found
    for condition in status.get("conditions") or []:
        if (
            condition.get("type") == "PodScheduled"
            and condition.get("status") == "False"
            and condition.get("reason") == "Unschedulable"
        ):
            message = condition.get("message") or "no node fits the pod"
            return Problem(
                cond.REASON_UNSCHEDULABLE,
                f"no node can run the training pod yet: {message}; it waits for a node (other runs "
                f"ending, the cluster growing), or change {what_to_change(message)}",
                stalled=False,
            )
    return None
