"""What this process wrote that its cache has not shown yet, as controller-runtime's expectations track it.

A cache lags the API by a watch's latency. Two writes matter:

- a created object (a Job): until the cache shows it, the reconcile counts the create's answer, so that a
  second trigger never creates it twice (``Expectations``);
- a status write: its watch event echoes the write and needs no reconcile of its own, and while the cache
  still shows the status from before it, the reconcile must read the resource itself (``OwnWrites``).

Only the event loop touches them: no locks.
"""

from __future__ import annotations

from typing import Any

from visionft_operator.controller.clock import Clock

Key = tuple[str, str]


class Expectations:
    """Objects this process created, by key, until the cache shows them or ``ttl`` seconds pass (an object
    deleted before the cache ever saw it must not count for ever).

    Args:
        clock (Clock): the monotonic clock that times the expectations.
        ttl (float): how long an expectation lasts, in seconds. Default: 60.
    """

    def __init__(self, clock: Clock, ttl: float = 60.0) -> None:
        self._clock = clock
        self.ttl = ttl
        self._expected: dict[Key, tuple[float, dict[str, Any]]] = {}

    def expect(self, key: Key, obj: dict[str, Any]) -> None:
        """``obj`` was created just now."""
        self._expected[key] = (self._clock.monotonic() + self.ttl, obj)

    def resolve(self, key: Key, cached: dict[str, Any] | None) -> dict[str, Any] | None:
        """The object as the cache shows it, else as it was created while the expectation lasts."""
        if cached is not None:
            self._expected.pop(key, None)
            return cached
        expected = self._expected.get(key)
        if expected is None:
            return None
        if expected[0] < self._clock.monotonic():
            del self._expected[key]
            return None
        return expected[1]


class OwnWrites:
    """The resourceVersion of this process's last status write per resource, until its echo arrives."""

    def __init__(self) -> None:
        self._written: dict[Key, str] = {}

    def wrote(self, key: Key, resource_version: str) -> None:
        self._written[key] = resource_version

    def is_echo(self, key: Key, resource_version: str | None) -> bool:
        """Whether a watch event of this resourceVersion only echoes the last write (then it is consumed:
        a second event of the same version is news)."""
        if resource_version is not None and self._written.get(key) == resource_version:
            del self._written[key]
            return True
        return False

    def cache_is_behind(self, key: Key, cached_version: str | None) -> bool:
        """Whether the cache shows another version than the last write; the write is then forgotten (the
        caller reads the resource from the API instead)."""
        if key in self._written and cached_version != self._written[key]:
            del self._written[key]
            return True
        return False

    def forget(self, key: Key) -> None:
        self._written.pop(key, None)
