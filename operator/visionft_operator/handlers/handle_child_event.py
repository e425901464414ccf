"""Events of the operator's Jobs and pods, both handled alike: update the cache and queue the reconcile of
the VisionFineTune they belong to, so that the phase follows the pods (running, failed, stuck on a missing
Secret) without waiting for the resync. A Job that ends (or is suspended or deleted) also frees capacity:
the runs of its namespace that wait for capacity under a policy rule are queued too."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from visionft_operator import jobs
from visionft_operator.controller import cache as cache_mod
from visionft_operator.controller.cache import Cache
from visionft_operator.controller.metrics import REGISTRY
from visionft_operator.controller.workqueue import WorkQueue
from visionft_operator.reconciler import Reconciler


def _track(
    store: cache_mod.Store,
    owner_of: Callable[[Mapping[str, Any]], cache_mod.Key | None],
    event: dict[str, Any],
    body: Any,
    queue: WorkQueue,
) -> None:
    """Both kinds alike: the event updates the cache, and the run the object belongs to is queued."""
    if event.get("type") == "DELETED":
        store.delete(body)
    else:
        store.upsert(body)
    owner = owner_of(body)
    if owner is not None:
        queue.add(owner)


def _frees_capacity(event: dict[str, Any], body: Any) -> bool:
    return event.get("type") == "DELETED" or jobs.finished(body) or jobs.suspended(body)


async def handle_job_event(
    event: dict[str, Any], body: Any, *, cache: Cache, queue: WorkQueue, reconciler: Reconciler
) -> None:
    with REGISTRY.timed("job_event"):
        _track(cache.jobs, cache_mod.job_owner, event, body, queue)
        if _frees_capacity(event, body):
            for key in reconciler.capacity_waiters((body.get("metadata") or {}).get("namespace", "")):
                queue.add(key)


async def handle_pod_event(event: dict[str, Any], body: Any, *, cache: Cache, queue: WorkQueue) -> None:
    with REGISTRY.timed("pod_event"):
        _track(cache.pods, cache_mod.pod_owner, event, body, queue)
