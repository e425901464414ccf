"""Each failure a user can fix gets its own error class and a message naming the URI and the fix."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from visionft.storage import (
    AccessDeniedError,
    BucketNotFoundError,
    CheckpointManager,
    StorageSettings,
    UnreachableHostError,
    WrongEndpointError,
    download_prefix,
    make_client,
    upload_folder,
)

from tests.harness.s3 import free_port
from tests.harness.s3_fixtures import S3Bucket

pytestmark = pytest.mark.s3


def client_for(**settings: object) -> object:
    # Two attempts: errors under test must not wait out the full retry budget.
    return make_client(
        StorageSettings.from_env(max_attempts=2, connect_timeout=1, read_timeout=5, **settings)
    )


@pytest.fixture
def html_server() -> Iterator[str]:
    """An HTTP server that is not S3: it answers every request with a small HTML page."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _page(self) -> None:
            body = b"<html><body>Welcome to nginx!</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _page

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_missing_bucket(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    uri = "s3://no-such-bucket-vft/datasets/x/"
    with pytest.raises(BucketNotFoundError) as err:
        download_prefix(uri, tmp_path, client=client_for())
    message = str(err.value)
    assert message.startswith(uri) and "'no-such-bucket-vft' does not exist" in message
    assert "create it" in message and s3_bucket.server.endpoint_url in message


def test_access_denied_wrong_secret(
    s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-right-secret-at-all-0123456789")
    uri = s3_bucket.uri("data/")
    with pytest.raises(AccessDeniedError) as err:
        download_prefix(uri, tmp_path, client=client_for())
    message = str(err.value)
    assert message.startswith(uri) and "SignatureDoesNotMatch" in message
    assert "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in message and "credentialsSecret" in message


def test_access_denied_unknown_key(
    s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("a")
    with pytest.raises(AccessDeniedError, match=r"^s3://.*/out/: access denied .*InvalidAccessKeyId"):
        upload_folder(tmp_path / "src", s3_bucket.uri("out/"), client=client_for())


def test_wrong_endpoint_nothing_listening(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    uri = s3_bucket.uri("data/")
    with pytest.raises(WrongEndpointError) as err:
        download_prefix(uri, tmp_path, client=client_for(endpoint_url=endpoint))
    message = str(err.value)
    assert message.startswith(uri) and f"nothing listens at {endpoint}" in message
    assert "check storage.endpoint" in message


def test_wrong_endpoint_not_s3(s3_bucket: S3Bucket, tmp_path: Path, html_server: str) -> None:
    uri = s3_bucket.uri("data/")
    with pytest.raises(WrongEndpointError) as err:
        download_prefix(uri, tmp_path, client=client_for(endpoint_url=html_server))
    message = str(err.value)
    assert message.startswith(uri) and "text/html, not an S3 listing" in message and html_server in message
    manager = CheckpointManager(s3_bucket.uri("run/"), client=client_for(endpoint_url=html_server))
    with pytest.raises(WrongEndpointError, match="checkpoints"):
        manager.find_latest_complete()
    manager.close()


def test_wrong_endpoint_other_http_error(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    """The SeaweedFS master port is an HTTP service but not S3: it answers JSON 404s."""
    endpoint = f"http://127.0.0.1:{s3_bucket.server.ports['master']}"
    uri = s3_bucket.uri("data/")
    with pytest.raises(WrongEndpointError, match=r"^s3://.*answered HTTP 404 with application/json, not S3"):
        download_prefix(uri, tmp_path, client=client_for(endpoint_url=endpoint))


def test_unreachable_host(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    endpoint = "http://visionft-no-such-host.invalid:9000"
    uri = s3_bucket.uri("data/")
    began = time.monotonic()
    with pytest.raises(UnreachableHostError) as err:
        download_prefix(uri, tmp_path, client=client_for(endpoint_url=endpoint))
    message = str(err.value)
    assert message.startswith(uri) and "does not resolve" in message and "DNS" in message
    assert time.monotonic() - began < 10
