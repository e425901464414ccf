"""Folder sync against the real S3 server: round trip, skipping, resume, and atomic publish under failure."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from boto3.s3.transfer import TransferConfig
from PIL import Image
from visionft.storage import (
    MANIFEST_NAME,
    IncompleteUploadError,
    StorageError,
    StorageSettings,
    download_prefix,
    make_client,
    read_manifest,
    upload_folder,
    verify_prefix,
)
from visionft.storage.sync import PART_SUFFIX, SyncProgress

from tests.harness.s3_fixtures import S3Bucket

pytestmark = pytest.mark.s3


def make_dataset(root: Path, images: int = 24, big_mb: int = 0) -> Path:
    """An imagefolder-style dataset: PNGs in two class folders, a JSONL of labels, optionally a big file."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(images):
        folder = root / "images" / ("cats" if i % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        # Random pixels, so PNG compression cannot shrink the files to nothing.
        image = Image.frombytes("RGB", (64, 48 + i), os.urandom(64 * (48 + i) * 3))
        image.save(folder / f"img_{i:03d}.png")
        lines.append(f'{{"image": "images/{folder.name}/img_{i:03d}.png", "text": "label {i}"}}')
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    if big_mb:
        (root / "blob.bin").write_bytes(os.urandom(big_mb * 1024 * 1024))
    return root


def tree(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every data file (sync bookkeeping left out)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".visionft-sync")
    }


def counting_client(**settings: Any) -> tuple[Any, Counter[str]]:
    """A storage client whose real requests are counted by operation name (a botocore event hook)."""
    client = make_client(StorageSettings.from_env(**settings))
    calls: Counter[str] = Counter()
    client.meta.events.register("before-call.s3.*", lambda model, **_: calls.update([model.name]))
    return client, calls


def test_round_trip_then_second_sync_transfers_nothing(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "src", big_mb=20)  # 20 MiB: above the 16 MiB multipart threshold
    client, calls = counting_client()
    uri = s3_bucket.uri("datasets/pets/")
    up = upload_folder(src, uri, client=client)
    assert up.files_transferred == up.files_total == 26 and calls["CreateMultipartUpload"] == 1
    keys = s3_bucket.server.list_keys(s3_bucket.name, "datasets/pets/")
    assert f"datasets/pets/{MANIFEST_NAME}" in keys and len(keys) == 27
    manifest = verify_prefix(uri, client=client)
    assert {f.path for f in manifest.files} == set(tree(src))

    reports: list[SyncProgress] = []
    down = download_prefix(uri, tmp_path / "dst", client=client, progress=reports.append)
    assert tree(tmp_path / "dst") == tree(src)
    assert down.files_transferred == 26 and down.bytes_transferred == manifest.total_bytes
    assert [r.files_done for r in reports] == list(range(1, 27)) and reports[
        -1
    ].bytes_done == manifest.total_bytes

    calls.clear()
    again = download_prefix(uri, tmp_path / "dst", client=client)
    assert (again.files_transferred, again.files_skipped, again.bytes_transferred) == (0, 26, 0)
    assert calls["GetObject"] == 1, "only the manifest is read; no file is fetched again"

    calls.clear()
    republish = upload_folder(src, uri, client=client)
    assert republish.files_transferred == 0
    assert calls["PutObject"] == 0 and calls["DeleteObject"] == 0, "unchanged: the manifest stays as it is"

    # One changed file: only it goes up, and only it comes down.
    (src / "train.jsonl").write_text("changed\n")
    assert upload_folder(src, uri, client=client).files_transferred == 1
    assert download_prefix(uri, tmp_path / "dst", client=client).files_transferred == 1
    assert tree(tmp_path / "dst") == tree(src)


def test_download_without_manifest_uses_size_and_etag(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    """A dataset uploaded by another tool (no manifest): the listing is the plan, ETags decide skipping."""
    raw = s3_bucket.server.client()
    for i in range(5):
        raw.put_object(Bucket=s3_bucket.name, Key=f"raw/{i}.txt", Body=f"file {i}".encode())
    client, calls = counting_client()
    first = download_prefix(s3_bucket.uri("raw/"), tmp_path / "raw", client=client)
    assert first.files_transferred == 5 and (tmp_path / "raw" / "3.txt").read_text() == "file 3"
    calls.clear()
    assert download_prefix(s3_bucket.uri("raw/"), tmp_path / "raw", client=client).files_transferred == 0
    assert calls["GetObject"] == 0
    with pytest.raises(IncompleteUploadError, match=r"s3://.*/raw/.*no complete _visionft_manifest.json"):
        download_prefix(s3_bucket.uri("raw/"), tmp_path / "x", client=client, require_manifest=True)


def test_interrupted_download_resumes_after_restart(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "src", images=40)
    uri = s3_bucket.uri("ds/")
    upload_folder(src, uri, client=make_client(StorageSettings.from_env()))
    server = s3_bucket.server
    # Few retries, so the sync gives up quickly once the server is gone.
    client, _ = counting_client(max_attempts=2, connect_timeout=1)

    def stop_halfway(report: SyncProgress) -> None:
        if report.files_done == 15:
            server.stop()

    with pytest.raises(StorageError) as failure:
        download_prefix(
            uri, tmp_path / "dst", client=client, concurrency=2, progress=stop_halfway, attempts=2
        )
    assert str(failure.value).startswith("s3://" + s3_bucket.name + "/ds/")
    done_before = [p for p in (tmp_path / "dst").rglob("*.png")]
    assert 15 <= len(done_before) < 40
    assert not any(p.name.endswith(PART_SUFFIX) and p.stat().st_size > 0 for p in done_before)

    server.start()
    client, calls = counting_client()
    resumed = download_prefix(uri, tmp_path / "dst", client=client)
    assert tree(tmp_path / "dst") == tree(src)
    assert resumed.files_skipped >= 15 and resumed.files_transferred <= 41 - 15
    assert calls["GetObject"] == resumed.files_transferred + 1  # + the manifest
    assert not list((tmp_path / "dst").rglob("*" + PART_SUFFIX))


def test_partial_file_resumes_with_a_ranged_get(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    payload = os.urandom(3 * 1024 * 1024 + 7)
    (src / "weights.bin").write_bytes(payload)
    uri = s3_bucket.uri("model/")
    client, _ = counting_client()
    upload_folder(src, uri, client=client)
    dst = tmp_path / "dst"
    dst.mkdir()
    # What an interrupted stream leaves behind: the first megabyte in the part file.
    (dst / ("weights.bin" + PART_SUFFIX)).write_bytes(payload[: 1024 * 1024])
    ranges: list[str] = []
    client.meta.events.register(
        "before-call.s3.GetObject",
        lambda params, **_: ranges.append(params.get("headers", {}).get("Range", "")),
    )
    result = download_prefix(uri, dst, client=client)
    assert (dst / "weights.bin").read_bytes() == payload
    assert f"bytes={1024 * 1024}-" in ranges
    assert result.files_transferred == 1

    # A corrupt part file (wrong bytes) fails the sha256 check and is fetched again from zero.
    (dst / "weights.bin").unlink()
    (dst / ("weights.bin" + PART_SUFFIX)).write_bytes(b"\0" * 1024)
    download_prefix(uri, dst, client=client)
    assert (dst / "weights.bin").read_bytes() == payload


def test_large_file_ranges_resume_only_the_missing_chunk(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    """A large file comes down as parallel ranged GETs; the server stops before the last chunk, and after
    the restart only that chunk is fetched."""
    mib = 1024 * 1024
    src = tmp_path / "src"
    src.mkdir()
    payload = os.urandom(40 * mib + 5)  # three 16 MiB chunks, the last one short
    (src / "model.safetensors").write_bytes(payload)
    uri = s3_bucket.uri("model/")
    upload_folder(src, uri, client=make_client(StorageSettings.from_env()))
    server = s3_bucket.server
    dst = tmp_path / "dst"
    part = dst / ("model.safetensors" + PART_SUFFIX)
    sidecar = part.with_name(part.name + ".json")

    def finished_chunks() -> list[int]:
        try:
            return list(json.loads(sidecar.read_text())["done"])
        except (OSError, ValueError):
            return []

    def stop_before_last_chunk(params: dict[str, Any], **_: Any) -> None:
        if str(params.get("Range", "")).startswith(f"bytes={32 * mib}-"):
            deadline = time.monotonic() + 30
            while len(finished_chunks()) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)  # let the first two chunks land
            server.stop()

    client, _ = counting_client(max_attempts=2, connect_timeout=1)
    client.meta.events.register("before-parameter-build.s3.GetObject", stop_before_last_chunk)
    with pytest.raises(StorageError):
        download_prefix(uri, dst, client=client, large_file_threshold=8 * mib, attempts=1)
    assert finished_chunks() == [0, 16 * mib] and part.stat().st_size == len(payload)

    server.start()
    client, _ = counting_client()
    ranges: list[str | None] = []
    client.meta.events.register(
        "before-parameter-build.s3.GetObject", lambda params, **_: ranges.append(params.get("Range"))
    )
    download_prefix(uri, dst, client=client, large_file_threshold=8 * mib)
    assert (dst / "model.safetensors").read_bytes() == payload
    assert ranges == [None, f"bytes={32 * mib}-{len(payload) - 1}"], "the manifest, then the missing chunk"
    assert not part.exists() and not sidecar.exists()


def test_server_killed_mid_upload_never_looks_complete(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    """The server dies after a third of the files and stays down: the upload fails, no manifest exists,
    and readers refuse the prefix."""
    src = make_dataset(tmp_path / "src", images=30)
    uri = s3_bucket.uri("out/run-1/")
    server = s3_bucket.server
    client, _ = counting_client(max_attempts=2, connect_timeout=1)

    def kill_early(report: SyncProgress) -> None:
        if report.files_done == 10:
            server.kill()

    with pytest.raises(StorageError, match=r"^s3://"):
        upload_folder(src, uri, client=client, concurrency=2, progress=kill_early, attempts=1)
    server.start()
    reader, _ = counting_client()
    assert read_manifest(uri, client=reader) is None
    assert 0 < len(server.list_keys(s3_bucket.name, "out/run-1/")) < 31
    with pytest.raises(IncompleteUploadError, match="never finished"):
        verify_prefix(uri, client=reader)
    with pytest.raises(IncompleteUploadError):
        download_prefix(uri, tmp_path / "reader", client=reader, require_manifest=True)
    # Publishing again completes it.
    assert upload_folder(src, uri, client=reader).files_total == 31
    assert verify_prefix(uri, client=reader).total_bytes == sum(len(v) for v in tree(src).values())


def test_server_restarted_mid_upload_retry_finishes_or_fails_cleanly(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    """The server is killed in the middle of a multipart upload and comes back: botocore's backoff retries
    carry the upload over the gap, or the upload fails with no manifest. Either way no reader is fooled."""
    src = make_dataset(tmp_path / "src", images=10, big_mb=24)
    uri = s3_bucket.uri("out/run-2/")
    server = s3_bucket.server
    client, _ = counting_client(max_attempts=8, connect_timeout=1)
    restarts: list[threading.Thread] = []

    def kill_and_restart(params: dict[str, Any], **_: Any) -> None:
        # Kill it when the second part of the large file is about to be sent; start it again meanwhile.
        if params["PartNumber"] == 2 and not restarts:
            server.kill()
            restarts.append(threading.Thread(target=server.start, daemon=True))
            restarts[0].start()

    client.meta.events.register("before-parameter-build.s3.UploadPart", kill_and_restart)
    config = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20, max_concurrency=1)
    try:
        upload_folder(src, uri, client=client, transfer_config=config)
        outcome = "finished"
    except StorageError:
        outcome = "failed"
    print(f"upload across the server restart: {outcome}")
    assert restarts, "the server was killed mid-upload"
    restarts[0].join(90)
    assert server.running
    reader, _ = counting_client()
    if outcome == "finished":
        download_prefix(uri, tmp_path / "dst", client=reader, require_manifest=True)
        assert tree(tmp_path / "dst") == tree(src)
    else:
        assert read_manifest(uri, client=reader) is None
        with pytest.raises(IncompleteUploadError):
            verify_prefix(uri, client=reader)
