"""Any event of a VisionFineTune (added, modified, deleted, and the initial listing when the operator
starts): update the cache and queue its reconcile. Deletion needs nothing more: the children go with the
resource (ownerReferences), and the reconcile of a key that is no longer cached forgets it."""

from __future__ import annotations

from typing import Any

from visionft_operator.controller.cache import Cache
from visionft_operator.controller.metrics import REGISTRY
from visionft_operator.controller.workqueue import WorkQueue
from visionft_operator.reconciler import Reconciler

HANDLER_ID = "resource_event"


async def handle_resource_event(
    event: dict[str, Any], body: Any, *, cache: Cache, queue: WorkQueue, reconciler: Reconciler
) -> None:
    meta = body.get("metadata") or {}
    namespace, name = meta.get("namespace", ""), meta.get("name", "")
    with REGISTRY.timed(HANDLER_ID):
        if event.get("type") == "DELETED":
            cache.resources.delete(body)
        else:
            cache.resources.upsert(body)
        if event.get("type") != "DELETED" and reconciler.is_own_write(
            namespace, name, meta.get("resourceVersion")
        ):
            return  # the echo of the operator's own status write
        queue.add((namespace, name))
