"""A de-duplicating, rate-limited work queue of resource keys, and the workers that drain it.

This is the shape of client-go's workqueue, on which controller-runtime's controllers run:

- Event handlers only ``add`` the key (namespace, name) of the VisionFineTune concerned, and return at once.
  A key is queued at most once, however many events name it: the events of a resource, its Job and its
  pods (or a whole re-listing after a restart) collapse into one reconcile.
- A key being reconciled is never handed to a second worker. Adding it meanwhile marks it dirty, and it
  is queued again when the first worker is ``done`` with it, so no event is lost.
- A reconcile that raised is retried with a per-key exponential backoff (``add_rate_limited``); a success
  resets it (``forget``). ``add_after`` queues a key later (a TTL that runs out, a TemporaryError's delay).

Everything runs on the operator's event loop (Kopf's): no locks. ``run_worker`` is one worker task; the
operator starts ``Config.workers`` of them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

import kopf
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from visionft_operator.controller.kube import NotOurs
from visionft_operator.controller.metrics import REGISTRY

Key = tuple[str, str]
#: A reconcile of one key; returns seconds after which to reconcile the key again, or None.
Reconcile = Callable[[Key], Awaitable[float | None]]
logger = logging.getLogger(__name__)


class RetryLater(Exception):
    """Raised by a reconcile that did what it could and reported why the resource is stuck (a child the
    apiserver refused): the key is retried with its growing backoff, and the resync does not shorten it.
    Logged in one line at INFO: the resource's status and Events carry the news."""


# Failures that an outage (apiserver or etcd restart, a dropped connection) or the cluster's state explains:
# logged in one line. Anything else is a bug, logged with its traceback.
_EXPLAINED = (ApiException, urllib3.exceptions.HTTPError, OSError, kopf.TemporaryError, NotOurs)


class WorkQueue:
    """Keys waiting for a worker, with de-duplication, retry backoff and delayed adds.

    Args:
        base_delay (float): backoff after a key's first failure, doubled after each further one.
        max_delay (float): the longest backoff.
    """

    def __init__(self, base_delay: float = 0.5, max_delay: float = 120.0) -> None:
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._queue: deque[Key] = deque()
        self._dirty: set[Key] = set()  # queued, or to be queued again when its worker is done
        self._processing: set[Key] = set()
        self._failures: dict[Key, int] = {}
        self._timers: dict[Key, tuple[float, asyncio.TimerHandle]] = {}
        self._waiters: deque[asyncio.Future[Key | None]] = deque()
        self._shut = False

    def __len__(self) -> int:
        """Keys waiting for a worker (the queue's depth)."""
        return len(self._queue)

    def add(self, key: Key) -> None:
        if self._shut or key in self._dirty:
            return
        self._dirty.add(key)
        if key in self._processing:
            return  # queued again by ``done``
        self._queue.append(key)
        self._wake()

    def add_after(self, key: Key, delay: float) -> None:
        """Queue the key after ``delay`` seconds; an earlier pending add of the same key wins."""
        if self._shut:
            return
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        pending = self._timers.get(key)
        if pending is not None:
            if pending[0] <= when:
                return
            pending[1].cancel()
        self._timers[key] = (when, loop.call_at(when, self._fire, key))

    def add_rate_limited(self, key: Key) -> float:
        """Queue the key after its backoff (0.5 s, 1 s, 2 s, ... up to max_delay); returns the delay."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        delay = min(self.base_delay * 2**failures, self.max_delay)
        self.add_after(key, delay)
        return delay

    def failures(self, key: Key) -> int:
        return self._failures.get(key, 0)

    def backing_off(self, key: Key) -> bool:
        """Whether the key waits out a backoff after a failure (then a resync leaves it be)."""
        return self._failures.get(key, 0) > 0 and key in self._timers

    def forget(self, key: Key) -> None:
        """The key's reconcile succeeded: its next failure starts the backoff from the beginning."""
        self._failures.pop(key, None)

    async def get(self) -> Key | None:
        """The next key (now marked as processing), or None once the queue is shut down."""
        while not self._queue:
            if self._shut:
                return None
            waiter: asyncio.Future[Key | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        key = self._queue.popleft()
        self._dirty.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: Key) -> None:
        """The worker has finished with the key; queue it again if it was added meanwhile."""
        self._processing.discard(key)
        if key in self._dirty:
            self._queue.append(key)
            self._wake()

    def shutdown(self) -> None:
        """Stop handing out keys: waiting workers get None."""
        self._shut = True
        for _, timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _fire(self, key: Key) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


async def run_worker(queue: WorkQueue, reconcile: Reconcile) -> None:
    """Take keys from the queue and reconcile them, until the queue shuts down."""
    while True:
        key = await queue.get()
        if key is None:
            return
        try:
            with REGISTRY.timed("reconcile"):
                again = await reconcile(key)
        except asyncio.CancelledError:
            queue.done(key)
            raise
        except RetryLater as err:
            backoff = queue.add_rate_limited(key)
            REGISTRY.retry()
            logger.info("%s/%s is stuck (%s); looking again in %.1f s", *key, err, backoff)
        except Exception as err:
            delay = getattr(err, "delay", None) if isinstance(err, kopf.TemporaryError) else None
            if delay:
                queue.add_after(key, float(delay))
            else:
                delay = queue.add_rate_limited(key)
            REGISTRY.retry()
            logger.error(
                "reconcile of %s/%s failed temporarily (attempt %d), retrying in %.1f s: %s",
                *key,
                max(queue.failures(key), 1),
                delay,
                str(err) or repr(err),
                exc_info=not isinstance(err, _EXPLAINED),
            )
        else:
            queue.forget(key)
            if again is not None:
                queue.add_after(key, again)
        queue.done(key)
