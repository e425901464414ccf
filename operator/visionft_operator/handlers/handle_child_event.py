"""Events of the operator's Jobs and pods: reconcile the VisionFineTune that owns them, so that the phase
follows the pods (running, failed, stuck on a missing Secret) without waiting for the resync."""

from __future__ import annotations

from typing import Any

from visionft_api.resource import KIND

from visionft_operator import constants as c
from visionft_operator import reconcile
from visionft_operator.handlers import known

HANDLER_ID = "child_event"


def owner_of(body: Any) -> tuple[str, str, str] | None:
    """(namespace, name, uid) of the VisionFineTune behind a Job or a pod."""
    meta = body.get("metadata") or {}
    namespace = meta.get("namespace", "")
    name = (meta.get("labels") or {}).get(c.LABEL_NAME)
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == KIND:  # the Job
            return namespace, ref["name"], ref["uid"]
    if name and (namespace, name) in known.KNOWN:  # a pod: owned by the Job, labelled with the resource
        return namespace, name, known.KNOWN[(namespace, name)]
    return None


async def handle_child_event(body: Any, **_: Any) -> None:
    owner = owner_of(body)
    if owner is None:
        return
    await reconcile.reconcile(known.ref(*owner), HANDLER_ID)
