"""The operator's read cache: slim copies of its VisionFineTunes, Jobs and pods, as an informer keeps them.

Reconciles read the resource, its Job and its pods from here instead of the API. The cache is filled the
way client-go fills an informer's store:

- from the watch events that Kopf delivers anyway (the event handlers call ``upsert`` and ``delete``);
- from chunked lists (``Cache.sync_forever``): one before the workers start, as controller-runtime waits for its caches to
  sync, so that a reconcile never sees a half-filled cache after a (re)start; then one every
  ``RELIST_SECONDS``, which drops what vanished while a watch was down (a Kopf re-list after an expired
  watch reports no deletions) and takes in what a lost event missed. An entry that an event touched after
  a list began is newer than the list, and stays.

Each entry is a slim copy: what the reconcile, the status derivation and the gang restarts read, without
managedFields, the Job's pod template, the pod's spec or the resource's annotations (a kubectl
last-applied annotation can be larger than the rest of the object). 3,000 objects then take a few MB.

Why not Kopf indexes: Kopf holds back every handler, of every resource kind, until all indexes have
taken in their initial listing, and each held-back event keeps its full body: at each start of an
operator with 1,000 runs (3,000 objects), well over 100 MB at once. Without them, Kopf hands each event
to its handler as it comes, and the body goes.

A cache lags the API by the watch's latency. The reconcile copes where it matters (``expectations.py``): a
Job it has just created counts from the create's answer until the cache has it; a status it has just
written is read back from the API while the cache does not show it yet; admission under a capacity rule
counts the namespace's Jobs with a fresh list.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from visionft_api.resource import KIND

from visionft_operator import constants as c
from visionft_operator.controller import kube

Key = tuple[str, str]
logger = logging.getLogger(__name__)
#: Seconds between two full lists of the cached kinds (the cache's repair; see the module's docstring).
RELIST_SECONDS = 600.0


def _meta(body: Mapping[str, Any], *fields: str) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", *fields) if k in meta}


def slim_resource(body: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": _meta(body, "generation", "creationTimestamp", "deletionTimestamp"),
        "spec": body.get("spec") or {},
        "status": body.get("status") or {},
    }


def slim_job(body: Mapping[str, Any]) -> dict[str, Any]:
    spec = body.get("spec") or {}
    return {
        "metadata": _meta(
            body, "labels", "annotations", "ownerReferences", "creationTimestamp", "deletionTimestamp"
        ),
        "spec": {k: v for k, v in spec.items() if k != "template"},
        "status": body.get("status") or {},
    }


def slim_pod(body: Mapping[str, Any]) -> dict[str, Any]:
    spec = body.get("spec") or {}
    return {
        "metadata": _meta(
            body, "labels", "annotations", "ownerReferences", "creationTimestamp", "deletionTimestamp"
        ),
        "spec": {k: spec[k] for k in ("nodeName",) if k in spec},
        "status": body.get("status") or {},
    }


def job_owner(body: Mapping[str, Any]) -> Key | None:
    """(namespace, name) of the VisionFineTune that owns a Job, from its ownerReferences."""
    meta = body.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == KIND:
            return meta.get("namespace", ""), ref["name"]
    return None


def pod_owner(body: Mapping[str, Any]) -> Key | None:
    """(namespace, name) of the VisionFineTune whose run a pod belongs to: the whole name from its
    annotation, else from its label (which holds names of up to 63 characters whole)."""
    meta = body.get("metadata") or {}
    name = (meta.get("annotations") or {}).get(c.ANNOTATION_NAME) or (meta.get("labels") or {}).get(
        c.LABEL_NAME
    )
    return (meta.get("namespace", ""), name) if name else None


class Store:
    """Slim objects of one kind by (namespace, name), optionally grouped by a second key (pods by run).

    Only the event loop touches it. Each entry remembers when it was last written (loop time), so that a
    list, which takes a while, never overwrites what an event wrote after the list began.
    """

    def __init__(
        self,
        slim: Callable[[Mapping[str, Any]], dict[str, Any]],
        group: Callable[[Mapping[str, Any]], Key | None] | None = None,
    ) -> None:
        self._slim = slim
        self._group = group
        self._items: dict[Key, tuple[dict[str, Any], float]] = {}
        self._groups: dict[Key, set[Key]] = defaultdict(set)

    def __len__(self) -> int:
        return len(self._items)

    @staticmethod
    def key_of(body: Mapping[str, Any]) -> Key:
        meta = body.get("metadata") or {}
        return meta.get("namespace", ""), meta.get("name", "")

    def get(self, key: Key) -> dict[str, Any] | None:
        entry = self._items.get(key)
        return entry[0] if entry is not None else None

    def keys(self) -> list[Key]:
        return list(self._items)

    def grouped(self, group: Key) -> list[dict[str, Any]]:
        return [self._items[key][0] for key in self._groups.get(group, ()) if key in self._items]

    def upsert(self, body: Mapping[str, Any]) -> None:
        self._put(self.key_of(body), self._slim(body), _now())

    def delete(self, body: Mapping[str, Any]) -> None:
        self.discard(self.key_of(body))

    def discard(self, key: Key) -> None:
        entry = self._items.pop(key, None)
        if entry is not None and self._group is not None:
            group = self._group(entry[0])
            if group is not None:
                self._groups[group].discard(key)
                if not self._groups[group]:
                    del self._groups[group]

    def replace(self, listed: Iterable[dict[str, Any]], since: float) -> list[Key]:
        """Apply a list of slim objects that began at loop time ``since``; returns the keys it dropped."""
        fresh = {self.key_of(obj): obj for obj in listed}
        dropped = [key for key, (_, at) in self._items.items() if key not in fresh and at < since]
        for key in dropped:
            self.discard(key)
        for key, obj in fresh.items():
            entry = self._items.get(key)
            if entry is None or entry[1] < since:
                self._put(key, obj, since)
        return dropped

    def _put(self, key: Key, obj: dict[str, Any], at: float) -> None:
        if self._group is not None:
            self.discard(key)
            group = self._group(obj)
            if group is not None:
                self._groups[group].add(key)
        self._items[key] = (obj, at)


def _now() -> float:
    return asyncio.get_running_loop().time()


class Cache:
    """The three stores of one operator process, and the lists that fill them.

    Args:
        client: what lists the cached kinds (``kube``, whose ``list_pages(kind, namespace)`` yields pages).
    """

    def __init__(self, client: Any = kube) -> None:
        self._client = client
        self.resources = Store(slim_resource)
        self.jobs = Store(slim_job)
        self.pods = Store(slim_pod, group=pod_owner)
        #: Set once the first full list is in: the workers wait for it.
        self.synced = asyncio.Event()

    # --- reading ------------------------------------------------------------------------------------------

    def resource(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.resources.get((namespace, name))

    def job(self, namespace: str, job_name: str) -> dict[str, Any] | None:
        return self.jobs.get((namespace, job_name))

    def pods_of(self, namespace: str, resource_name: str) -> list[dict[str, Any]]:
        """The pods of a resource's runs (all of its Jobs' pods, retries included)."""
        return self.pods.grouped((namespace, resource_name))

    def resource_keys(self) -> list[Key]:
        return self.resources.keys()

    # --- listing ------------------------------------------------------------------------------------------

    def _list_slim(self, namespaces: list[str]) -> list[list[dict[str, Any]]]:
        """Blocking: every resource, Job and pod in scope, as slim copies (each page slimmed as it comes,
        so that no full list is ever held)."""
        # Globs ("team-*") can't be listed one by one: list the whole cluster and keep the matches (this
        # needs list permission cluster-wide, which a glob-serving operator has anyway to watch what
        # matches).
        globbed = any(set(ns) & set("*?[") for ns in namespaces)
        scopes: list[str | None] = [None] if globbed or not namespaces else list(namespaces)

        def wanted(obj: dict[str, Any]) -> bool:
            ns = obj["metadata"].get("namespace", "")
            return not globbed or any(fnmatch.fnmatchcase(ns, pattern) for pattern in namespaces)

        out: list[list[dict[str, Any]]] = []
        for kind, slim in (("VisionFineTune", slim_resource), ("Job", slim_job), ("Pod", slim_pod)):
            objs = (
                slim(item)
                for scope in scopes
                for page in self._client.list_pages(kind, scope)
                for item in page
            )
            out.append([obj for obj in objs if wanted(obj)])
        return out

    async def relist(self, namespaces: list[str]) -> list[Key]:
        """One full list of the three kinds into the cache; returns the resources it dropped."""
        since = _now()
        resources, jobs, pods_ = await asyncio.to_thread(self._list_slim, namespaces)
        self.jobs.replace(jobs, since)
        self.pods.replace(pods_, since)
        return self.resources.replace(resources, since)

    async def sync_forever(
        self, namespaces: list[str], stopped: asyncio.Event, dropped: Callable[[Key], None]
    ) -> None:
        """List until the first full list succeeds (then ``synced`` is set), and again every RELIST_SECONDS.
        ``dropped`` hears of every resource that a list found gone."""
        delay = 1.0
        while not stopped.is_set():
            try:
                for key in await self.relist(namespaces):
                    dropped(key)
            except Exception as err:
                logger.error(
                    "listing the cached kinds failed; retrying in %.0f s: %s", delay, str(err) or repr(err)
                )
                wait, delay = delay, min(delay * 2, 60.0)
            else:
                if not self.synced.is_set():
                    logger.info(
                        "cache synced",
                        extra={
                            "resources": len(self.resources),
                            "jobs": len(self.jobs),
                            "pods": len(self.pods),
                        },
                    )
                self.synced.set()
                wait, delay = RELIST_SECONDS, 1.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopped.wait(), timeout=wait)
