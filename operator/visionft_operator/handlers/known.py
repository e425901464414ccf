"""The resources this process has seen (namespace, name -> uid), for the periodic resync."""

from __future__ import annotations

KNOWN: dict[tuple[str, str], str] = {}


def remember(namespace: str, name: str, uid: str) -> None:
    KNOWN[(namespace, name)] = uid


def forget(namespace: str, name: str) -> None:
    KNOWN.pop((namespace, name), None)


def ref(namespace: str, name: str, uid: str) -> dict[str, dict[str, str]]:
    """The smallest body `reconcile` accepts: it reads the resource itself."""
    return {"metadata": {"namespace": namespace, "name": name, "uid": uid}}
