"""CheckpointManager against the real S3 server: background upload, retention, and finding a resume point."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from visionft.storage import MANIFEST_NAME, CheckpointManager, StorageSettings, make_client, read_manifest
from visionft.storage.checkpoints import step_name
from visionft.storage.sync import SyncProgress

from tests.harness.s3_fixtures import S3Bucket

pytestmark = pytest.mark.s3


def write_checkpoint(root: Path, step: int) -> Path:
    """A folder shaped like HF Trainer's checkpoint-N (contents are stand-ins)."""
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(200_000))
    (folder / "optimizer.pt").write_bytes(os.urandom(300_000))
    (folder / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    return folder


def test_save_returns_before_the_upload_and_flush_waits(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    gate = threading.Event()
    seen: list[SyncProgress] = []

    def slow_network(report: SyncProgress) -> None:  # runs on the upload thread
        seen.append(report)
        gate.wait(30)

    client = make_client(StorageSettings.from_env())
    manager = CheckpointManager(s3_bucket.uri("run/"), client=client, progress=slow_network)
    folder = write_checkpoint(tmp_path, 5)
    began = time.monotonic()
    manager.save(folder, 5)
    assert time.monotonic() - began < 1.0
    # The trainer may delete its folder at once (save_total_limit): the snapshot keeps the upload whole.
    shutil.rmtree(folder)
    time.sleep(0.3)
    assert read_manifest(manager.uri_for(5), client=client) is None, "the upload is still held at the gate"
    with pytest.raises(TimeoutError):
        manager.flush(timeout=0.5)
    gate.set()
    manager.flush(timeout=60)
    assert manager.uploaded == [5] and len(seen) == 3
    latest = manager.find_latest_complete()
    assert latest is not None and latest.step == 5
    manager.close()


def test_keep_newest_k_and_drop_superseded(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    client = make_client(StorageSettings.from_env())
    with CheckpointManager(s3_bucket.uri("run/"), client=client, keep=2) as manager:
        for step in (10, 20, 30, 40):
            manager.save(write_checkpoint(tmp_path, step), step)
            manager.flush()
        steps = [c.step for c in manager.list_checkpoints()]
        assert steps == [30, 40]
        assert all(c.complete for c in manager.list_checkpoints())
    keys = s3_bucket.server.list_keys(s3_bucket.name, "run/checkpoints/")
    assert f"run/checkpoints/{step_name(40)}/{MANIFEST_NAME}" in keys and len(keys) == 2 * 4

    # With a slow network, checkpoints pile up: the oldest waiting one is dropped, never the newest.
    gate = threading.Event()
    with CheckpointManager(
        s3_bucket.uri("run2/"), client=client, keep=5, max_pending=1, progress=lambda _: gate.wait(30)
    ) as manager:
        for step in (1, 2, 3, 4):
            manager.save(write_checkpoint(tmp_path / "r2", step), step)
            time.sleep(0.2)  # let the worker pick up step 1 before the others queue
        gate.set()
        manager.flush()
        assert manager.uploaded == [1, 4] and manager.dropped == [2, 3]


def test_find_latest_complete_ignores_a_checkpoint_without_manifest(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    client = make_client(StorageSettings.from_env())
    manager = CheckpointManager(s3_bucket.uri("run/"), client=client, keep=3)
    assert manager.find_latest_complete() is None
    assert manager.download_latest(tmp_path / "out") is None
    manager.save(write_checkpoint(tmp_path / "src", 100), 100)
    manager.flush()
    # A newer one whose manifest lists a file that has gone since.
    manager.save(write_checkpoint(tmp_path / "src", 300), 300)
    manager.flush()
    raw = s3_bucket.server.client()
    raw.delete_object(Bucket=s3_bucket.name, Key=f"run/checkpoints/{step_name(300)}/optimizer.pt")
    # And one whose upload died: files but no manifest.
    key = f"run/checkpoints/{step_name(200)}/optimizer.pt"
    raw.put_object(Bucket=s3_bucket.name, Key=key, Body=b"partial")

    found = {c.step: c.complete for c in manager.list_checkpoints()}
    assert found == {100: True, 200: False, 300: False}
    latest = manager.find_latest_complete()
    assert latest is not None and latest.step == 100
    folder = manager.download_latest(tmp_path / "out")
    assert folder == tmp_path / "out" / "checkpoint-100"
    for name in ("adapter_model.safetensors", "optimizer.pt", "trainer_state.json"):
        assert (folder / name).read_bytes() == (tmp_path / "src" / "checkpoint-100" / name).read_bytes()

    # Once a newer checkpoint is complete, the dead upload older than it is cleaned away.
    manager.save(write_checkpoint(tmp_path / "src", 400), 400)
    manager.flush()
    assert [c.step for c in manager.list_checkpoints()] == [100, 400]
    manager.close()
