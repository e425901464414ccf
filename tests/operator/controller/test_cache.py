"""The operator's read cache (no cluster): slim copies keep what the reconcile reads, pods are grouped by
run, and a list drops what vanished without overwriting newer events."""

from __future__ import annotations

import asyncio

from visionft_operator import decision, jobs
from visionft_operator.controller import cache


def test_slim_copies_keep_what_the_reconcile_reads() -> None:
    job = {
        "metadata": {"name": "x-trainer", "namespace": "ns", "uid": "u", "managedFields": [{"big": 1}]},
        "spec": {"suspend": False, "parallelism": 1, "template": {"spec": {"containers": [{}]}}},
        "status": {"conditions": [{"type": "Complete", "status": "True"}]},
    }
    slim = cache.slim_job(job)
    assert "template" not in slim["spec"] and "managedFields" not in slim["metadata"]
    assert jobs.finished(slim)
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
    assert decision.settled(resource)
    body["spec"] = {"runPolicy": {"ttlSecondsAfterFinished": 60}}
    assert not decision.settled(cache.slim_resource(body))  # its TTL still needs a look


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
