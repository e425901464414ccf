"""Events of the operator's Jobs and pods: update the cache and queue the reconcile of the VisionFineTune they belong to, so
that the phase follows the pods (running, failed, stuck on a missing Secret) without waiting for the
resync. A Job that ends (or is suspended or deleted) frees capacity: the runs of its namespace that wait
for capacity under a policy rule are queued too."""

from __future__ import annotations

from typing import Any

from visionft_operator import cache, reconcile
from visionft_operator.metrics import REGISTRY
from visionft_operator.workqueue import QUEUE


def _frees_capacity(event: dict[str, Any], body: Any) -> bool:
    return (
        event.get("type") == "DELETED"
        or reconcile.job_finished(body)
        or bool((body.get("spec") or {}).get("suspend"))
    )


async def handle_job_event(event: dict[str, Any], body: Any, **_: Any) -> None:
    with REGISTRY.timed("job_event"):
        if event.get("type") == "DELETED":
            cache.JOBS.delete(body)
        else:
            cache.JOBS.upsert(body)
        owner = cache.job_owner(body)
        if owner is not None:
            QUEUE.add(owner)
        namespace = (body.get("metadata") or {}).get("namespace", "")
        if _frees_capacity(event, body):
            for key in reconcile.capacity_waiters(namespace):
                QUEUE.add(key)


async def handle_pod_event(event: dict[str, Any], body: Any, **_: Any) -> None:
    with REGISTRY.timed("pod_event"):
        if event.get("type") == "DELETED":
            cache.PODS.delete(body)
        else:
            cache.PODS.upsert(body)
        owner = cache.pod_owner(body)
        if owner is not None:
            QUEUE.add(owner)
