"""The S3 test server itself: objects round-trip, multipart works, and a restart keeps the data."""

from __future__ import annotations

import os

import pytest
from boto3.s3.transfer import TransferConfig

from tests.harness.s3_fixtures import S3Bucket

pytestmark = pytest.mark.s3


def test_write_list_read(s3_bucket: S3Bucket) -> None:
    client = s3_bucket.server.client()
    for i in range(3):
        client.put_object(Bucket=s3_bucket.name, Key=f"dir/obj-{i}.txt", Body=f"hello {i}".encode())
    assert s3_bucket.server.list_keys(s3_bucket.name, "dir/") == [f"dir/obj-{i}.txt" for i in range(3)]
    body = client.get_object(Bucket=s3_bucket.name, Key="dir/obj-1.txt")["Body"].read()
    assert body == b"hello 1"


def test_multipart_upload_over_20mb(s3_bucket: S3Bucket, tmp_path) -> None:
    payload = os.urandom(21 * 1024 * 1024 + 123)
    src = tmp_path / "big.bin"
    src.write_bytes(payload)
    client = s3_bucket.server.client()
    config = TransferConfig(multipart_threshold=8 * 1024 * 1024, multipart_chunksize=8 * 1024 * 1024)
    client.upload_file(str(src), s3_bucket.name, "big.bin", Config=config)
    head = client.head_object(Bucket=s3_bucket.name, Key="big.bin")
    assert head["ContentLength"] == len(payload)
    assert head["ETag"].strip('"').endswith("-3"), "three 8 MiB parts: the ETag of a multipart upload"
    dest = tmp_path / "back.bin"
    client.download_file(s3_bucket.name, "big.bin", str(dest))
    assert dest.read_bytes() == payload


def test_restart_within_a_test_keeps_data(s3_bucket: S3Bucket) -> None:
    server = s3_bucket.server
    server.client().put_object(Bucket=s3_bucket.name, Key="survivor", Body=b"still here")
    server.stop()
    assert not server.running
    seconds = server.restart()
    assert server.running and seconds < 60
    client = server.client()
    assert client.get_object(Bucket=s3_bucket.name, Key="survivor")["Body"].read() == b"still here"
    client.put_object(Bucket=s3_bucket.name, Key="after-restart", Body=b"new")
    assert server.list_keys(s3_bucket.name) == ["after-restart", "survivor"]


def test_kill_then_start_keeps_data(s3_bucket: S3Bucket) -> None:
    server = s3_bucket.server
    server.client().put_object(Bucket=s3_bucket.name, Key="k", Body=b"v")
    server.kill()
    server.start()
    assert server.client().get_object(Bucket=s3_bucket.name, Key="k")["Body"].read() == b"v"
