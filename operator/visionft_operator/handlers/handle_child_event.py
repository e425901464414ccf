"""Events of the operator's Jobs and pods, both handled alike: update the cache and queue the reconcile of
the VisionFineTune they belong to, so that the phase follows the pods (running, failed, stuck on a missing
Secret) without waiting for the resync. A Job that ends (or is suspended or deleted) also frees capacity:
the runs of its namespace that wait for capacity under a policy rule are queued too."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from visionft_operator import cache, reconcile
from visionft_operator.metrics import REGISTRY
from visionft_operator.workqueue import QUEUE


def _track(
    store: cache.Store,
    owner_of: Callable[[Mapping[str, Any]], cache.Key | None],
    event: dict[str, Any],
    body: Any,
) -> None:
    """Both kinds alike: the event updates the cache, and the run the object belongs to is queued."""
    if event.get("type") == "DELETED":
        store.delete(body)
    else:
        store.upsert(body)
    owner = owner_of(body)
    if owner is not None:
        QUEUE.add(owner)


def _frees_capacity(event: dict[str, Any], body: Any) -> bool:
    return (
        event.get("type") == "DELETED"
        or reconcile.job_finished(body)
        or bool((body.get("spec") or {}).get("suspend"))
    )


async def handle_job_event(event: dict[str, Any], body: Any, **_: Any) -> None:
    with REGISTRY.timed("job_event"):
        _track(cache.JOBS, cache.job_owner, event, body)
        if _frees_capacity(event, body):
            for key in reconcile.capacity_waiters((body.get("metadata") or {}).get("namespace", "")):
                QUEUE.add(key)


async def handle_pod_event(event: dict[str, Any], body: Any, **_: Any) -> None:
    with REGISTRY.timed("pod_event"):
        _track(cache.PODS, cache.pod_owner, event, body)
