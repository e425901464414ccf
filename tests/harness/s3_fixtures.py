"""Pytest fixtures for the S3 test server: one SeaweedFS per session, a fresh bucket per test.

Tests that stop, kill or restart the server must leave it running: `s3_server` restarts it after any
test that left it down, so the next test never sees a dead server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.harness.s3 import SeaweedS3, find_weed


def run_s3(make: Callable[[], SeaweedS3], label: str) -> Iterator[SeaweedS3]:
    """Make a server, start it, yield it, clean it up: the body of every S3 server fixture. Fails (never
    skips) when the `weed` binary is missing."""
    try:
        find_weed()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)
    server = make()
    try:
        seconds = server.start()
        print(f"\n{label} at {server.endpoint_url} started in {seconds:.1f} s")
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def s3_server_session() -> Iterator[SeaweedS3]:
    """The session's SeaweedFS S3 server; fails (not skips) when the `weed` binary is missing."""
    yield from run_s3(SeaweedS3, "S3 test server (SeaweedFS)")


@pytest.fixture
def s3_server(s3_server_session: SeaweedS3) -> Iterator[SeaweedS3]:
    """The session's S3 server, running at the start of the test and restarted after it if it was left down."""
    if not s3_server_session.running:
        s3_server_session.start()
    yield s3_server_session
    if not s3_server_session.running:
        s3_server_session.start()


@dataclass(frozen=True)
class S3Bucket:
    """A bucket made for one test, with the server that holds it."""

    name: str
    server: SeaweedS3

    def uri(self, prefix: str = "") -> str:
        """`s3://<bucket>/<prefix>`."""
        return f"s3://{self.name}/{prefix}"


@pytest.fixture
def s3_bucket(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    """A fresh bucket, and the process environment pointed at the server (credentials, endpoint, region).

    The environment is how the code under test gets credentials in production too (the AWS chain), so the
    storage layer is exercised exactly as a trainer pod would use it.
    """
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    name = s3_server.create_bucket()
    yield S3Bucket(name=name, server=s3_server)
    if s3_server.running:
        s3_server.delete_bucket(name)
