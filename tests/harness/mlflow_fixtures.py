"""Pytest fixtures for the MLflow tracking server: one server per session, its artifacts on the session's
S3 server (tests/harness/mlflow_server.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.mlflow_server import MlflowServer
from tests.harness.s3 import SeaweedS3


@pytest.fixture(scope="session")
def mlflow_server(s3_server_session: SeaweedS3) -> Iterator[MlflowServer]:
    """The session's MLflow server (backend store in SQLite, artifacts proxied to an S3 bucket)."""
    bucket = s3_server_session.create_bucket()
    server = MlflowServer(f"s3://{bucket}/mlflow", s3_server_session.env())
    try:
        seconds = server.start()
        print(f"\nMLflow tracking server at {server.uri} started in {seconds:.1f} s")
        yield server
    finally:
        server.stop()
