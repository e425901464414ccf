"""Any event of a VisionFineTune (added, modified, deleted, and the initial listing when the operator
starts): update the cache and queue its reconcile. Deletion needs nothing more: the children go with the
resource (ownerReferences), and the reconcile of a key that is no longer cached forgets it."""

from __future__ import annotations

from typing import Any

from visionft_operator import cache, reconcile
from visionft_operator.metrics import REGISTRY
from visionft_operator.workqueue import QUEUE

HANDLER_ID = "resource_event"


async def handle_resource_event(event: dict[str, Any], body: Any, **_: Any) -> None:
    meta = body.get("metadata") or {}
    namespace, name = meta.get("namespace", ""), meta.get("name", "")
    with REGISTRY.timed(HANDLER_ID):
        if event.get("type") == "DELETED":
            cache.RESOURCES.delete(body)
        else:
            cache.RESOURCES.upsert(body)
        if event.get("type") != "DELETED" and reconcile.is_own_write(
            namespace, name, meta.get("resourceVersion")
        ):
            return  # the echo of the operator's own status write
        QUEUE.add((namespace, name))
