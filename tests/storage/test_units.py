"""Storage pieces that need no server: URIs, settings, manifests, backoff and log scrubbing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from visionft.storage import Manifest, StorageSettings, StorageURI, parse_uri
from visionft.storage.client import backoff_delay, make_client, scrub
from visionft.storage.manifest import ManifestEntry


@pytest.mark.parametrize(
    ("text", "scheme", "bucket", "key"),
    [
        ("s3://datasets/latex-ocr/", "s3", "datasets", "latex-ocr/"),
        ("s3://datasets", "s3", "datasets", ""),
        ("s3://my.bucket-1/a/b.png", "s3", "my.bucket-1", "a/b.png"),
        ("/data/train", "file", "", "/data/train"),
        ("relative/dir", "file", "", "relative/dir"),
        ("file:///abs/path", "file", "", "/abs/path"),
        ("https://example.com/cat.png", "https", "", "https://example.com/cat.png"),
    ],
)
def test_parse_uri(text: str, scheme: str, bucket: str, key: str) -> None:
    uri = parse_uri(text)
    assert (uri.scheme, uri.bucket, uri.key) == (scheme, bucket, key)


def test_uri_join_and_prefix() -> None:
    uri = parse_uri("s3://outputs/team-a/run/")
    assert (
        str(uri.join("checkpoints", "step-00000050")) == "s3://outputs/team-a/run/checkpoints/step-00000050"
    )
    assert uri.join("x").prefix == "team-a/run/x/"
    assert parse_uri("s3://outputs").join("a").key == "a"
    assert parse_uri(Path("/tmp/x")).join("y").path == Path("/tmp/x/y")
    assert parse_uri(uri) is uri and isinstance(uri, StorageURI)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("s3://", "no valid bucket name"),
        ("s3://UPPER/x", "no valid bucket name"),
        ("s3://key:secret@bucket/x", "credentials"),
        ("s3://bucket/x?versionId=1", "query"),
        ("https://user:pw@example.com/a.png", "user credentials"),
        ("ftp://host/x", "unsupported location"),
    ],
)
def test_parse_uri_rejects_with_the_fix(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_uri(text)


def test_settings_from_env_and_safe_to_print() -> None:
    env = {
        "AWS_ENDPOINT_URL_S3": "http://minio.storage.svc:9000",
        "AWS_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "VISIONFT_S3_VERIFY_TLS": "false",
    }
    settings = StorageSettings.from_env(env)
    assert settings.endpoint_url == "http://minio.storage.svc:9000" and settings.region == "eu-west-1"
    assert settings.path_style is True and settings.verify_tls is False
    text = repr(settings) + str(settings.to_dict())
    assert "AKIAEXAMPLE" not in text and "wJalr" not in text
    assert StorageSettings.from_env({}).path_style is False
    assert StorageSettings.from_env(env, region="us-east-1").region == "us-east-1"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"endpoint_url": "minio:9000"}, "must start with http"),
        ({"endpoint_url": "http://ak:sk@minio:9000"}, "user credentials"),
        ({"max_attempts": 0}, "max_attempts=0"),
        ({"ca_bundle": "/no/such/ca.pem"}, "ca_bundle='/no/such/ca.pem' is not a file"),
    ],
)
def test_settings_validation_names_the_field(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StorageSettings(**kwargs)  # type: ignore[arg-type]


def test_settings_env_bool_error() -> None:
    with pytest.raises(ValueError, match="VISIONFT_S3_PATH_STYLE='maybe'"):
        StorageSettings.from_env({"VISIONFT_S3_PATH_STYLE": "maybe"})


def test_manifest_round_trip_and_truncation() -> None:
    manifest = Manifest(files=(ManifestEntry("a.png", 3, "ab" * 32),), meta={"step": 5})
    again = Manifest.from_json(manifest.to_json())
    assert again.files == manifest.files and again.meta == {"step": 5} and again.total_bytes == 3
    with pytest.raises(ValueError):
        Manifest.from_json(manifest.to_json()[:-20])
    with pytest.raises(ValueError, match="counts"):
        Manifest.from_json(manifest.to_json().replace(b'"file_count": 1', b'"file_count": 2'))


def test_backoff_is_exponential_with_full_jitter() -> None:
    delays = [backoff_delay(4) for _ in range(200)]
    assert all(0 <= d <= 4.0 for d in delays) and max(delays) > 2.0 and min(delays) < 1.0
    assert all(backoff_delay(30) <= 20.0 for _ in range(50))


def test_scrub_removes_signed_headers_and_known_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDPLANTED000000001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted-secret-value-0123456789abcdef")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "planted-token-value-0123456789")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    make_client(StorageSettings(endpoint_url="http://127.0.0.1:1", region="us-east-1"))
    line = (
        "headers={'Authorization': b'AWS4-HMAC-SHA256 Credential=AKIDPLANTED000000001/20261126/us-east-1/s3/"
        "aws4_request, SignedHeaders=host, Signature=0123abcd', 'X-Amz-Security-Token': b'planted-token-value-0123456789'}"
        " secret=planted-secret-value-0123456789abcdef"
    )
    cleaned = scrub(line)
    for value in ("AKIDPLANTED", "planted-token", "planted-secret", "0123abcd"):
        assert value not in cleaned
    # And through logging, for any botocore logger (the record factory does it).
    records: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("botocore.some.new.module")
    handler = Grab()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        logger.debug("token %s", "planted-token-value-0123456789")
    finally:
        logger.removeHandler(handler)
    assert records == ["token <redacted>"]
