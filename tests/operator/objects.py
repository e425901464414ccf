"""Wire-form Jobs and pods as the operator's cache holds them, and the status derived from them, for the
tests of the status derivation (no cluster)."""

from __future__ import annotations

from typing import Any

from visionft_operator import status as st

from tests.operator.specs import spec

T0, T1 = "2026-11-26T10:00:00Z", "2026-11-26T10:05:00Z"
JOB_UID = "job-uid"
#: The scheduler's report on a pod that fits no node.
UNSCHEDULABLE = {
    "type": "PodScheduled",
    "status": "False",
    "reason": "Unschedulable",
    "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
}


def job(
    suspend: bool = False, conditions: list[dict[str, Any]] | None = None, **status: Any
) -> dict[str, Any]:
    return {
        "metadata": {"name": "r-trainer", "uid": JOB_UID},
        "spec": {"suspend": suspend},
        "status": {"conditions": conditions or [], **status},
    }


def pod(phase: str, name: str = "r-trainer-abc", **status: Any) -> dict[str, Any]:
    meta = {"name": name, "creationTimestamp": T0, "ownerReferences": [{"kind": "Job", "uid": JOB_UID}]}
    return {"metadata": meta, "status": {"phase": phase, **status}}


def waiting_pod(reason: str, message: str = "") -> dict[str, Any]:
    """A pending pod whose container waits, as the kubelet reports it."""
    waiting = {"reason": reason, "message": message}
    return pod("Pending", containerStatuses=[{"name": "trainer", "state": {"waiting": waiting}}])


def derive(status: dict[str, Any] | None = None, **kw: Any) -> st.Derived:
    """The derivation at T1 for generation 3 of the base spec (or `spec=`)."""
    obs = st.Observation(generation=3, spec=kw.pop("spec", spec()), status=status or {}, **kw)
    return st.derive(obs, now=T1)
