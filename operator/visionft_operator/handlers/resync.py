"""The periodic resync: every `resync_seconds`, reconcile every known resource again.

It is the level-triggered safety net (a missed event, a failed reconcile), and it drives what no watch
event announces: a run waiting for policy capacity, a ResourceQuota event, ttlSecondsAfterFinished.
A background task rather than a Kopf timer, because Kopf timers put a finalizer on every resource.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from visionft_operator import config, peering, reconcile
from visionft_operator.handlers import known

HANDLER_ID = "resync"
log = logging.getLogger(__name__)
#: This process's peering identity and priority (set by main before Kopf starts).
RUNTIME: dict[str, Any] = {"identity": "", "priority": 0}


async def _may_act(namespace: str, cache: dict[str, bool]) -> bool:
    """With peering on, act only where no live peer outranks us (as Kopf does for watch streams)."""
    cfg = config.get()
    if not cfg.peering:
        return True
    scope = None if not cfg.namespaces else namespace
    key = scope or ""
    if key not in cache:
        try:
            cache[key] = await asyncio.to_thread(
                peering.may_act, cfg.peering_name, scope, RUNTIME["identity"], RUNTIME["priority"]
            )
        except Exception:
            log.exception("can't read the peering object %s; skipping this resync", cfg.peering_name)
            cache[key] = False
    return cache[key]


async def resync_forever(stopped: asyncio.Event) -> None:
    while not stopped.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopped.wait(), timeout=config.get().resync_seconds)
        if stopped.is_set():
            return
        leadership: dict[str, bool] = {}
        for (namespace, name), uid in list(known.KNOWN.items()):
            if not await _may_act(namespace, leadership):
                continue
            try:
                await reconcile.reconcile(known.ref(namespace, name, uid), HANDLER_ID)
            except Exception:
                log.exception("resync of %s/%s failed", namespace, name)
