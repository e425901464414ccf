"""The operator's work queue and workers (no cluster): one reconcile per key however many events, never
two workers on one key, retries with a growing backoff, delayed adds; and the cache's slim copies."""

from __future__ import annotations

import asyncio

import kopf
import pytest
from visionft_operator import cache, reconcile, workqueue
from visionft_operator.workqueue import WorkQueue, run_worker

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


def test_the_process_queue_feeds_the_metrics() -> None:
    assert "visionft_workqueue_depth 0" in workqueue.REGISTRY.render()


def test_slim_copies_keep_what_the_reconcile_reads() -> None:
    job = {
        "metadata": {"name": "x-trainer", "namespace": "ns", "uid": "u", "managedFields": [{"big": 1}]},
        "spec": {"suspend": False, "parallelism": 1, "template": {"spec": {"containers": [{}]}}},
        "status": {"conditions": [{"type": "Complete", "status": "True"}]},
    }
    slim = cache.slim_job(job)
    assert "template" not in slim["spec"] and "managedFields" not in slim["metadata"]
    assert reconcile.job_finished(slim)
    body = {
        "apiVersion": "visionft.io/v1alpha1",
        "kind": "VisionFineTune",
        "metadata": {
            "name": "x",
            "namespace": "ns",
            "uid": "u",
            "generation": 2,
            "resourceVersion": "7",
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"},
        },
        "spec": {"runPolicy": {}},
        "status": {"phase": "Succeeded", "observedGeneration": 2},
    }
    resource = cache.slim_resource(body)
    assert "annotations" not in resource["metadata"] and resource["metadata"]["generation"] == 2
    assert reconcile.settled(resource)
    body["spec"] = {"runPolicy": {"ttlSecondsAfterFinished": 60}}
    assert not reconcile.settled(cache.slim_resource(body))  # its TTL still needs a look


def test_the_echo_of_an_own_status_write_is_recognised_once() -> None:
    reconcile._written[A] = "42"
    assert not reconcile.is_own_write(*A, "41")
    assert reconcile.is_own_write(*A, "42")
    assert not reconcile.is_own_write(*A, "42")


def _pod(name: str, run: str, rv: str) -> dict:
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "resourceVersion": rv,
            "labels": {"visionft.io/name": run},
            "managedFields": [{"manager": "kubelet"}],
        },
        "spec": {"nodeName": "n1", "containers": [{"name": "trainer"}]},
        "status": {"phase": "Running"},
    }


def test_the_cache_groups_pods_by_run_and_keeps_only_what_is_read() -> None:
    async def scenario() -> None:
        store = cache.Store(cache.slim_pod, group=cache.pod_owner)
        store.upsert(_pod("a-1", "a", "1"))
        store.upsert(_pod("a-2", "a", "2"))
        store.upsert(_pod("b-1", "b", "3"))
        assert sorted(p["metadata"]["name"] for p in store.grouped(("ns", "a"))) == ["a-1", "a-2"]
        (pod,) = store.grouped(("ns", "b"))
        assert pod["spec"] == {"nodeName": "n1"} and "managedFields" not in pod["metadata"]
        store.delete(_pod("a-1", "a", "4"))
        assert [p["metadata"]["name"] for p in store.grouped(("ns", "a"))] == ["a-2"]

    asyncio.run(scenario())


def test_a_list_drops_what_vanished_but_never_overwrites_newer_events() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        store = cache.Store(cache.slim_pod, group=cache.pod_owner)
        store.upsert(_pod("old", "a", "1"))  # deleted while the watch was down
        store.upsert(_pod("kept", "a", "2"))
        since = loop.time()
        await asyncio.sleep(0.01)
        store.upsert(_pod("new", "a", "9"))  # an event during the list: newer than the list
        store.upsert(_pod("kept", "a", "8"))
        listed = [cache.slim_pod(_pod("kept", "a", "5")), cache.slim_pod(_pod("missed", "a", "6"))]
        dropped = store.replace(listed, since)
        assert dropped == [("ns", "old")]
        names = {p["metadata"]["name"]: p["metadata"]["resourceVersion"] for p in store.grouped(("ns", "a"))}
        assert names == {"kept": "8", "new": "9", "missed": "6"}

    asyncio.run(scenario())


def test_a_failed_job_waits_briefly_for_its_failed_pod_in_the_cache() -> None:
    from datetime import UTC, datetime, timedelta

    def job(seconds_ago: float) -> dict:
        at = (datetime.now(UTC) - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")
        condition = {"type": "FailureTarget", "status": "True", "lastTransitionTime": at}
        return {"metadata": {"name": "x-trainer", "uid": "job-1"}, "status": {"conditions": [condition]}}

    def pod(phase: str) -> dict:
        return {
            "metadata": {"name": "x-trainer-abc", "ownerReferences": [{"uid": "job-1"}]},
            "status": {"phase": phase},
        }

    assert reconcile.pods_lag(job(1), [pod("Running")]) == 1.0  # the pod's Failed event is still on its way
    assert reconcile.pods_lag(job(1), []) == 1.0
    assert reconcile.pods_lag(job(1), [pod("Failed")]) is None
    assert reconcile.pods_lag(job(60), [pod("Running")]) is None  # don't wait for ever (pods can go away)
    assert reconcile.pods_lag({"metadata": {"uid": "job-1"}, "status": {}}, []) is None  # not failed
    assert reconcile.pods_lag(None, []) is None
