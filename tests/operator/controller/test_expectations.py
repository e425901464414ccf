"""What the process wrote that its cache has not shown yet (no cluster): created Jobs count until the
cache has them or their expectation runs out; a status write's echo is recognised once."""

from __future__ import annotations

from visionft_operator.controller.expectations import Expectations, OwnWrites

from tests.operator.clock import FixedClock

A = ("ns", "a")


def test_a_created_job_counts_until_the_cache_shows_it() -> None:
    clock = FixedClock()
    expected = Expectations(clock, ttl=60)
    made = {"metadata": {"name": "a-trainer", "resourceVersion": "1"}}
    expected.expect(A, made)
    assert expected.resolve(A, None) is made
    cached = {"metadata": {"name": "a-trainer", "resourceVersion": "2"}}
    assert expected.resolve(A, cached) is cached
    assert expected.resolve(A, None) is None  # the cache had it: the expectation is gone


def test_an_expectation_runs_out() -> None:
    clock = FixedClock()
    expected = Expectations(clock, ttl=60)
    expected.expect(A, {"metadata": {"name": "a-trainer"}})
    clock.advance(59)
    assert expected.resolve(A, None) is not None
    clock.advance(2)  # deleted before the cache ever saw it
    assert expected.resolve(A, None) is None


def test_the_echo_of_an_own_status_write_is_recognised_once() -> None:
    writes = OwnWrites()
    writes.wrote(A, "42")
    assert not writes.is_echo(A, "41")
    assert writes.is_echo(A, "42")
    assert not writes.is_echo(A, "42")


def test_a_cache_behind_the_last_write_is_noticed_once() -> None:
    writes = OwnWrites()
    writes.wrote(A, "42")
    assert not writes.cache_is_behind(A, "42")  # the cache shows the write
    assert writes.cache_is_behind(A, "41")
    assert not writes.cache_is_behind(A, "41")  # forgotten: the caller read the resource itself
    assert not writes.is_echo(A, "42")
