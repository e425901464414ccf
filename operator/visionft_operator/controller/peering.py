"""Which replica acts, when several run with Kopf peering.

Kopf pauses the watch streams of every replica but the one with the highest priority. The periodic resync
(handlers/resync.py) is not a watch stream, so it asks the same question itself: it reads the peering
object (ClusterKopfPeering, or KopfPeering in the resource's namespace) and acts only when no live peer
outranks this process. Each replica gets its own priority (random unless configured), since Kopf pauses
*all* replicas of equal priority.
"""

from __future__ import annotations

import json
import os
import random
import socket
from datetime import UTC, datetime, timedelta
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from visionft_operator.controller import kube

PEERING_GROUP, PEERING_VERSION = "kopf.dev", "v1"


def own_identity() -> str:
    """This process's peer id: the pod's name (or the host's), the pid and a random suffix."""
    host = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{host}/{os.getpid()}/{random.randint(0, 16**6):06x}"


def own_priority(configured: int) -> int:
    return configured or random.randint(1, 1_000_000)


def _peering_status(name: str, namespace: str | None) -> dict[str, Any]:
    api = kubernetes.client.CustomObjectsApi(kube.api_client())
    try:
        if namespace is None:
            response = api.get_cluster_custom_object(
                PEERING_GROUP, PEERING_VERSION, "clusterkopfpeerings", name, _preload_content=False
            )
        else:
            response = api.get_namespaced_custom_object(
                PEERING_GROUP, PEERING_VERSION, namespace, "kopfpeerings", name, _preload_content=False
            )
    except ApiException as err:
        if err.status == 404:
            return {}
        raise
    return json.loads(response.data).get("status") or {}


def outranked(status: dict[str, Any], identity: str, priority: int, now: datetime | None = None) -> bool:
    """Whether a live peer other than us has a higher or equal priority (equal: Kopf pauses all)."""
    now = now or datetime.now(UTC)
    for peer, info in status.items():
        if peer == identity or not isinstance(info, dict):
            continue
        try:
            seen = datetime.fromisoformat(str(info.get("lastseen")))
        except ValueError:
            continue
        if seen.tzinfo is None:
            seen = seen.replace(tzinfo=UTC)
        if seen + timedelta(seconds=int(info.get("lifetime") or 60)) < now:
            continue  # dead
        if int(info.get("priority") or 0) >= priority:
            return True
    return False


def may_act(name: str, namespace: str | None, identity: str, priority: int) -> bool:
    """Blocking: whether this replica should reconcile resources under that peering object."""
    return not outranked(_peering_status(name, namespace), identity, priority)
