"""Checkpoints in S3: background upload, keep-newest-K retention, and resume from the newest complete one.

Layout: ``<output>/checkpoints/step-00000050/`` holds the files of one checkpoint and, written last, its
``_visionft_manifest.json``. A checkpoint without a manifest is an upload that died: it is never resumed from,
and it is deleted once a newer checkpoint is complete.

The training thread only pays for ``save()``: a hard-link snapshot of the checkpoint folder (no data copied)
and a queue append. One background thread uploads the snapshots in order. The queue is bounded: when the
network is slower than checkpointing, the oldest waiting snapshot is dropped (a newer one supersedes it),
so training never waits on the network. Only ``flush()`` (at the end of training) waits.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig

from visionft.storage.client import make_client
from visionft.storage.errors import IncompleteUploadError, StorageError
from visionft.storage.manifest import MANIFEST_NAME
from visionft.storage.sync import (
    ProgressCallback,
    RemoteObject,
    delete_prefix,
    download_prefix,
    list_objects,
    upload_folder,
    verify_prefix,
)
from visionft.storage.uri import StorageURI, parse_uri

logger = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step-(\d+)/?$")


def step_name(step: int) -> str:
    """The folder name of a checkpoint: ``step-00000050`` (zero-padded so names sort by step)."""
    return f"step-{step:08d}"


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint found in S3.

    Attributes:
        step (int): the global step it was saved at.
        uri (StorageURI): its prefix.
        complete (bool): whether its manifest exists and matches the objects.
    """

    step: int
    uri: StorageURI
    complete: bool


def _snapshot(src: Path, dest: Path) -> None:
    """Hard-link every file of ``src`` into ``dest`` (copy where links are impossible).

    A link costs no data copy, and the trainer may delete or rewrite its checkpoint folder (HF Trainer's
    save_total_limit) while the upload still reads the linked files.
    """
    for path in src.rglob("*"):
        target = dest / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


class CheckpointManager:
    """Uploads checkpoints to ``<output>/checkpoints/`` in the background and finds them again for resume.

    Args:
        output_uri (str | StorageURI): the run's output prefix, e.g. ``s3://outputs/team-a/latex-ocr/``.
        client: an S3 client; ``make_client()`` when None.
        keep (int): complete checkpoints kept in S3; older ones are deleted after a newer manifest is
            written. Default: 3.
        max_pending (int): snapshots waiting for upload (besides the one being uploaded); beyond it the
            oldest waiting one is dropped. Default: 2.
        staging_dir (str | Path | None): where snapshots live until uploaded; on the same filesystem as
            the checkpoints for hard links. A temporary folder when None. Default: None.
        concurrency (int): files uploaded at once. Default: 8.
        transfer_config (TransferConfig | None): multipart settings for large files. Default: None
            (``sync.DEFAULT_TRANSFER``).
        progress (ProgressCallback | None): called after each uploaded file. Default: None.
    """

    def __init__(
        self,
        output_uri: str | StorageURI,
        *,
        client: Any = None,
        keep: int = 3,
        max_pending: int = 2,
        staging_dir: str | Path | None = None,
        concurrency: int = 8,
        transfer_config: TransferConfig | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        if keep < 1:
            raise ValueError(
                f"CheckpointManager keep={keep} must be at least 1 (the checkpoint to resume from)"
            )
        if max_pending < 1:
            raise ValueError(f"CheckpointManager max_pending={max_pending} must be at least 1")
        self.output = parse_uri(output_uri)
        if not self.output.is_s3:
            raise ValueError(f"CheckpointManager needs an s3:// output URI, got {self.output}")
        self.root = self.output.join("checkpoints")
        self.client = client or make_client(max_pool_connections=max(10, concurrency))
        self.keep, self.max_pending = keep, max_pending
        self.concurrency, self.transfer_config, self.progress = concurrency, transfer_config, progress
        self._staging_dir = Path(staging_dir) if staging_dir is not None else None
        self._staging: Path | None = None  # made on the first save(): a reading-only manager leaves nothing
        self._queue: deque[tuple[int, Path]] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._errors: list[StorageError] = []
        self.uploaded: list[int] = []  #: steps whose manifest was written, in order
        self.dropped: list[int] = []  #: steps superseded before their upload started
        self._worker: threading.Thread | None = None

    def staging(self) -> Path:
        """The folder for snapshots waiting for upload (created on first use)."""
        if self._staging is None:
            if self._staging_dir is None:
                self._staging = Path(tempfile.mkdtemp(prefix="visionft-ckpt-"))
            else:
                self._staging = self._staging_dir
                self._staging.mkdir(parents=True, exist_ok=True)
        return self._staging

    def uri_for(self, step: int) -> StorageURI:
        """The prefix of the checkpoint at ``step``."""
        return self.root.join(step_name(step))

    # Writing -------------------------------------------------------------------------------------------

    def save(self, local_dir: str | Path, step: int) -> None:
        """Queue a checkpoint folder for upload and return at once.

        Args:
            local_dir (str | Path): the checkpoint folder (e.g. HF Trainer's ``checkpoint-50``). It may be
                deleted or changed right after this call returns.
            step (int): the global step; names the checkpoint.

        Raises:
            FileNotFoundError: ``local_dir`` is not a folder.
            RuntimeError: the manager was closed.
        """
        src = Path(local_dir)
        if not src.is_dir():
            raise FileNotFoundError(
                f"checkpoint folder {src} does not exist; pass the folder the trainer wrote"
            )
        snapshot = self.staging() / step_name(step)
        if snapshot.exists():
            shutil.rmtree(snapshot)
        _snapshot(src, snapshot)
        with self._cond:
            if self._closed:
                raise RuntimeError("CheckpointManager is closed; create a new one")
            while len(self._queue) >= self.max_pending:
                old_step, old_snapshot = self._queue.popleft()
                shutil.rmtree(old_snapshot, ignore_errors=True)
                self.dropped.append(old_step)
                logger.warning(
                    "checkpoint step %d dropped before upload: step %d supersedes it", old_step, step
                )
            self._queue.append((step, snapshot))
            self._cond.notify_all()
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="visionft-ckpt-upload", daemon=True)
                self._worker.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                step, snapshot = self._queue.popleft()
                self._busy = True
            try:
                self._upload(step, snapshot)
            except StorageError as exc:
                logger.error("checkpoint step %d not uploaded: %s", step, exc)
                with self._cond:
                    self._errors.append(exc)
            except Exception as exc:  # never let the worker die silently; flush() reports it
                logger.exception("checkpoint step %d not uploaded", step)
                with self._cond:
                    self._errors.append(StorageError(str(self.uri_for(step)), f"upload failed: {exc!r}"))
            finally:
                shutil.rmtree(snapshot, ignore_errors=True)
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _upload(self, step: int, snapshot: Path) -> None:
        uri = self.uri_for(step)
        result = upload_folder(
            snapshot,
            uri,
            client=self.client,
            concurrency=self.concurrency,
            transfer_config=self.transfer_config,
            progress=self.progress,
            meta={"step": step},
        )
        logger.info("checkpoint step %d published to %s (%.1f MB)", step, uri, result.bytes_transferred / 1e6)
        with self._cond:
            self.uploaded.append(step)
        self.prune()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued checkpoint is uploaded.

        Args:
            timeout (float | None): seconds to wait at most; None waits as long as it takes. Default: None.

        Raises:
            TimeoutError: uploads still running after ``timeout``.
            StorageError: an upload failed since the last flush (the last such error; all are logged).
        """
        with self._cond:
            done = self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)
            if not done:
                raise TimeoutError(f"checkpoint uploads to {self.root} still running after {timeout} s")
            errors, self._errors = self._errors, []
        if errors:
            raise errors[-1]

    def close(self, timeout: float | None = None) -> None:
        """Flush, stop the upload thread and remove the staging folder."""
        try:
            self.flush(timeout)
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            if self._worker is not None:
                self._worker.join(timeout)
            if self._staging is not None and self._staging_dir is None:
                shutil.rmtree(self._staging, ignore_errors=True)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Reading -------------------------------------------------------------------------------------------

    def list_checkpoints(self) -> list[CheckpointInfo]:
        """All checkpoints under ``<output>/checkpoints/``, oldest first, each marked complete or not.

        One recursive listing, grouped by step: some servers (SeaweedFS) keep an emptied folder as a
        common prefix, so a step counts only when it still holds objects.
        """
        by_step: dict[int, dict[str, RemoteObject]] = {}
        for rel, obj in list_objects(self.client, self.root).items():
            folder, _, name = rel.partition("/")
            match = _STEP_RE.match(folder)
            if match and name:
                by_step.setdefault(int(match.group(1)), {})[name] = obj
        return [
            CheckpointInfo(step, self.uri_for(step), self._complete(step, by_step[step]))
            for step in sorted(by_step)
        ]

    def _complete(self, step: int, listing: dict[str, RemoteObject]) -> bool:
        if MANIFEST_NAME not in listing:
            return False
        try:
            verify_prefix(self.uri_for(step), client=self.client, listing=listing)
        except IncompleteUploadError:
            return False
        return True

    def find_latest_complete(self) -> CheckpointInfo | None:
        """The newest checkpoint whose manifest exists and matches its objects, or None."""
        complete = [c for c in self.list_checkpoints() if c.complete]
        return complete[-1] if complete else None

    def download_latest(self, dest_dir: str | Path, *, folder: str = "checkpoint-{step}") -> Path | None:
        """Download the newest complete checkpoint for resume.

        Args:
            dest_dir (str | Path): the parent folder, e.g. the trainer's output_dir.
            folder (str): the checkpoint folder's name; ``{step}`` is replaced. The default is HF Trainer's
                naming, so the result can be passed as ``resume_from_checkpoint``.

        Returns:
            Path | None: the downloaded folder, or None when S3 holds no complete checkpoint.
        """
        latest = self.find_latest_complete()
        if latest is None:
            logger.info("no complete checkpoint under %s: starting fresh", self.root)
            return None
        target = Path(dest_dir) / folder.format(step=latest.step)
        download_prefix(
            latest.uri, target, client=self.client, concurrency=self.concurrency, require_manifest=True
        )
        logger.info("resuming from %s (step %d) in %s", latest.uri, latest.step, target)
        return target

    def prune(self) -> list[int]:
        """Apply retention: keep the newest ``keep`` complete checkpoints; delete older complete ones, and
        incomplete ones older than the newest complete one (uploads that died).

        Returns:
            list[int]: the steps deleted.
        """
        found = self.list_checkpoints()
        complete = [c.step for c in found if c.complete]
        if not complete:
            return []
        keep = set(complete[-self.keep :])
        newest = complete[-1]
        doomed = [c.step for c in found if c.step not in keep and (c.complete or c.step < newest)]
        for step in doomed:
            delete_prefix(self.uri_for(step), client=self.client)
            logger.info("deleted checkpoint step %d (keeping the newest %d)", step, self.keep)
        return doomed
