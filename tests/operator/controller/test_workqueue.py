"""The operator's work queue and workers (no cluster): one reconcile per key however many events, never
two workers on one key, retries with a growing backoff, delayed adds."""

from __future__ import annotations

import asyncio

import kopf
import pytest
from visionft_operator.controller.metrics import REGISTRY
from visionft_operator.controller.workqueue import WorkQueue, run_worker

A, B = ("ns", "a"), ("ns", "b")


def test_a_key_is_queued_once_however_often_it_is_added() -> None:
    async def scenario() -> list:
        queue = WorkQueue()
        for key in (A, B, A, A, B):
            queue.add(key)
        assert len(queue) == 2
        got = [await queue.get(), await queue.get()]
        assert len(queue) == 0
        return got

    assert asyncio.run(scenario()) == [A, B]


def test_a_key_added_while_processing_waits_for_done() -> None:
    async def scenario() -> None:
        queue = WorkQueue()
        queue.add(A)
        assert await queue.get() == A
        queue.add(A)  # an event during the reconcile
        queue.add(A)
        assert len(queue) == 0  # not handed to a second worker meanwhile
        queue.done(A)
        assert len(queue) == 1 and await queue.get() == A
        queue.done(A)
        assert len(queue) == 0

    asyncio.run(scenario())


def test_backoff_doubles_per_failure_and_resets_on_forget() -> None:
    async def scenario() -> None:
        queue = WorkQueue(base_delay=0.5, max_delay=3.0)
        assert [queue.add_rate_limited(A) for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
        queue.forget(A)
        assert queue.add_rate_limited(A) == 0.5
        queue.shutdown()

    asyncio.run(scenario())


def test_add_after_keeps_the_earliest_and_fires() -> None:
    async def scenario() -> None:
        queue = WorkQueue()
        queue.add_after(A, 0.05)
        queue.add_after(A, 30)  # later: the earlier one stands
        assert len(queue) == 0
        assert await asyncio.wait_for(queue.get(), timeout=2) == A

    asyncio.run(scenario())


def test_shutdown_releases_waiting_workers() -> None:
    async def scenario() -> object:
        queue = WorkQueue()
        waiting = asyncio.create_task(queue.get())
        await asyncio.sleep(0)
        queue.shutdown()
        return await asyncio.wait_for(waiting, timeout=2)

    assert asyncio.run(scenario()) is None


def test_workers_retry_failures_and_requeue_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[tuple[str, str]] = []

    async def flaky(key: tuple[str, str]) -> float | None:
        calls.append(key)
        if key == A and calls.count(A) == 1:
            raise OSError("connection refused")
        if key == B and calls.count(B) == 1:
            raise kopf.TemporaryError("not yet", delay=0.01)
        if key == B and calls.count(B) == 2:
            return 0.01  # look again soon (a TTL)
        return None

    async def scenario() -> None:
        queue = WorkQueue(base_delay=0.01)
        workers = [asyncio.create_task(run_worker(queue, flaky)) for _ in range(2)]
        queue.add(A)
        queue.add(B)
        for _ in range(200):
            if calls.count(A) >= 2 and calls.count(B) >= 3:
                break
            await asyncio.sleep(0.01)
        queue.shutdown()
        await asyncio.wait_for(asyncio.gather(*workers), timeout=2)
        assert queue.failures(A) == 0  # forgotten after the success

    asyncio.run(scenario())
    assert calls.count(A) == 2 and calls.count(B) == 3
    failed = [r for r in caplog.records if "failed temporarily" in r.getMessage()]
    assert len(failed) == 2 and not any(r.exc_info for r in failed)  # outages: one line, no traceback


def test_never_two_workers_on_one_key() -> None:
    running: set[tuple[str, str]] = set()
    overlaps = []
    count = 0

    async def slow(key: tuple[str, str]) -> None:
        nonlocal count
        if key in running:
            overlaps.append(key)
        running.add(key)
        await asyncio.sleep(0.01)
        running.discard(key)
        count += 1

    async def scenario() -> None:
        queue = WorkQueue()
        workers = [asyncio.create_task(run_worker(queue, slow)) for _ in range(4)]
        for _ in range(20):
            queue.add(A)
            queue.add(B)
            await asyncio.sleep(0.003)
        while len(queue) or running:
            await asyncio.sleep(0.01)
        queue.shutdown()
        await asyncio.gather(*workers)

    asyncio.run(scenario())
    assert not overlaps
    assert 2 <= count < 40  # events during a reconcile merge into one more reconcile


def test_the_queue_depth_feeds_the_metrics() -> None:
    async def scenario() -> str:
        queue = WorkQueue()
        REGISTRY.watch_queue(lambda: len(queue))
        queue.add(A)
        queue.add(B)
        return REGISTRY.render()

    assert "visionft_workqueue_depth 2" in asyncio.run(scenario())
