"""Any event of a VisionFineTune (added, modified, and the initial listing when the operator starts):
reconcile it. Deletion needs nothing: the children go with the resource (ownerReferences)."""

from __future__ import annotations

from typing import Any

from visionft_operator import reconcile
from visionft_operator.handlers import known
from visionft_operator.metrics import REGISTRY

HANDLER_ID = "resource_event"


async def handle_resource_event(event: dict[str, Any], body: Any, **_: Any) -> None:
    meta = body.get("metadata") or {}
    namespace, name = meta.get("namespace", ""), meta.get("name", "")
    if event.get("type") == "DELETED":
        known.forget(namespace, name)
        REGISTRY.set_phase(namespace, name, None)
        return
    known.remember(namespace, name, meta.get("uid", ""))
    await reconcile.reconcile(dict(body), HANDLER_ID)
