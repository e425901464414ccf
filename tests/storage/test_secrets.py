"""Credentials never reach logs (DEBUG included, botocore's too), error texts or written files."""

from __future__ import annotations

import io
import json
import logging
import traceback
from pathlib import Path

import pytest
from visionft.storage import (
    CheckpointManager,
    StorageError,
    StorageSettings,
    download_prefix,
    make_client,
    upload_folder,
)

from tests.harness.s3_fixtures import S3Bucket

pytestmark = pytest.mark.s3

PLANTED_WRONG_SECRET = "vft-planted-wrong-secret-9f8e7d6c5b4a39281706"
PLANTED_TOKEN = "vft-planted-session-token-0a1b2c3d4e5f60718293"


def test_no_credential_in_logs_errors_or_files(
    s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = s3_bucket.server.credentials
    secrets = [creds.access_key, creds.secret_key, PLANTED_WRONG_SECRET, PLANTED_TOKEN]

    log_text = io.StringIO()
    handler = logging.StreamHandler(log_text)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    errors: list[str] = []
    try:
        src = tmp_path / "src"
        (src / "sub").mkdir(parents=True)
        (src / "a.txt").write_text("hello")
        (src / "sub" / "b.bin").write_bytes(b"\1" * 20000)
        settings = StorageSettings.from_env(max_attempts=2, connect_timeout=1)
        (tmp_path / "settings.json").write_text(json.dumps(settings.to_dict()))
        repr_text = repr(settings)
        client = make_client(settings)
        # Successful operations: publish, download, checkpoint save and resume.
        upload_folder(src, s3_bucket.uri("out/"), client=client)
        download_prefix(s3_bucket.uri("out/"), tmp_path / "down", client=client)
        with CheckpointManager(s3_bucket.uri("run/"), client=client, keep=1) as manager:
            manager.save(src, 10)
            manager.flush()
            manager.download_latest(tmp_path / "resume")
        # Failures: a wrong secret with a session token, a missing bucket, an unreachable endpoint.
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED_WRONG_SECRET)
        monkeypatch.setenv("AWS_SESSION_TOKEN", PLANTED_TOKEN)
        failing = [
            lambda: download_prefix(s3_bucket.uri("out/"), tmp_path / "x", client=make_client(settings)),
            lambda: upload_folder(src, s3_bucket.uri("denied/"), client=make_client(settings)),
            lambda: download_prefix(
                "s3://no-such-bucket-vft/x/", tmp_path / "y", client=make_client(settings)
            ),
            lambda: download_prefix(
                s3_bucket.uri("out/"),
                tmp_path / "z",
                client=make_client(
                    StorageSettings.from_env(
                        endpoint_url="http://visionft-no-such-host.invalid:1", max_attempts=1
                    )
                ),
            ),
        ]
        for operation in failing:
            with pytest.raises(StorageError) as err:
                operation()
            errors.append("".join(traceback.format_exception(err.value)))
            errors.append(repr(err.value))
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)

    logs = log_text.getvalue()
    # The capture is real: botocore's wire-level DEBUG records (signed requests) are in it.
    assert "botocore.endpoint DEBUG Sending http request" in logs
    assert "<redacted>" in logs and "x-amz-security-token" in logs.lower()
    assert len(errors) == 8
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    raw = s3_bucket.server.client()
    stored = b"".join(
        raw.get_object(Bucket=s3_bucket.name, Key=key)["Body"].read()
        for key in s3_bucket.server.list_keys(s3_bucket.name)
    )
    for secret in secrets:
        assert secret not in logs, "a credential is in the logs"
        assert secret not in repr_text
        assert all(secret not in text for text in errors), "a credential is in an error text"
        assert secret.encode() not in written, "a credential is in a written file"
        assert secret.encode() not in stored, "a credential is in an uploaded object"
