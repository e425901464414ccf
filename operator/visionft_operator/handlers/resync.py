"""The periodic resync: every ``resync_seconds``, queue every cached resource that is not settled.

It drives what no watch event announces: a ResourceQuota that blocks the pods (seen in the Job's Events,
which the operator does not watch), a policy change, a run waiting for capacity whose wake-up was missed.
It costs little: the reconciles read the cache, and finished resources are skipped (their TTL is queued
by the reconcile that saw them finish). Failed reconciles don't wait for it: the work queue retries them,
and a resource that waits out its backoff (a refused child) is left to it.
A background task rather than a Kopf timer, because Kopf timers put a finalizer on every resource.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from visionft_operator import decision
from visionft_operator.config import Config
from visionft_operator.controller import peering
from visionft_operator.controller.cache import Cache
from visionft_operator.controller.workqueue import WorkQueue

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Peer:
    """This process as a peer: its peering identity and priority."""

    identity: str
    priority: int


async def _may_act(cfg: Config, peer: Peer, namespace: str, seen: dict[str, bool]) -> bool:
    """With peering on, act only where no live peer outranks us (as Kopf does for watch streams)."""
    if not cfg.peering:
        return True
    scope = None if not cfg.namespaces else namespace
    key = scope or ""
    if key not in seen:
        try:
            seen[key] = await asyncio.to_thread(
                peering.may_act, cfg.peering_name, scope, peer.identity, peer.priority
            )
        except Exception:
            logger.exception("can't read the peering object %s; skipping this resync", cfg.peering_name)
            seen[key] = False
    return seen[key]


async def resync_forever(
    stopped: asyncio.Event, queue: WorkQueue, cache: Cache, cfg: Config, peer: Peer
) -> None:
    while not stopped.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopped.wait(), timeout=cfg.resync_seconds)
        if stopped.is_set():
            return
        leadership: dict[str, bool] = {}
        for key in cache.resource_keys():
            body = cache.resource(*key)
            if body is None or decision.settled(body) or queue.backing_off(key):
                continue
            if await _may_act(cfg, peer, key[0], leadership):
                queue.add(key)
