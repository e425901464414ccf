"""Resumable, verified download of an S3 prefix into a local folder (see ``sync`` for the overview)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Any

from botocore.exceptions import ClientError

from visionft.storage.client import endpoint_of, make_client, retry_call
from visionft.storage.errors import (
    IntegrityError,
    StorageError,
    TransientStorageError,
)
from visionft.storage.manifest import MANIFEST_NAME, ManifestEntry, sha256_file
from visionft.storage.prefix import RemoteObject, as_s3, list_objects, verify_prefix
from visionft.storage.progress import ProgressCallback, SyncResult, Tracker, run_all
from visionft.storage.uri import StorageURI

logger = logging.getLogger(__name__)

#: Suffix of a file being downloaded; it is renamed into place only when complete and verified.
PART_SUFFIX = ".visionft-part"
#: Local record of what the last download fetched (size, ETag, mtime per file), for skipping.
STATE_NAME = ".visionft-sync.json"

_CHUNK = 1024 * 1024
#: Files at least this large are fetched as parallel ranged GETs (one stream tops out well below the
#: link on most S3 servers).
LARGE_FILE_THRESHOLD = 64 * _CHUNK
#: Bytes per ranged GET of a large file.
RANGE_CHUNK = 16 * _CHUNK
#: Ranged GETs in flight per large file (each streams to disk: no chunk is held in memory).
RANGE_WORKERS = 4


def _safe_local(dest: Path, rel: str, uri: str) -> Path:
    parts = PurePosixPath(rel).parts
    if not parts or ".." in parts or PurePosixPath(rel).is_absolute():
        raise StorageError(
            uri, f"object name {rel!r} would escape the target folder; rename it in the bucket"
        )
    return dest.joinpath(*parts)


def _load_state(dest: Path) -> dict[str, dict[str, Any]]:
    try:
        return dict(json.loads((dest / STATE_NAME).read_text()))
    except (OSError, ValueError):
        return {}


def _save_state(dest: Path, state: dict[str, dict[str, Any]]) -> None:
    tmp = dest / (STATE_NAME + ".tmp")
    tmp.write_text(json.dumps(state, sort_keys=True))
    os.replace(tmp, dest / STATE_NAME)


def _unchanged(
    local: Path, remote: RemoteObject, entry: ManifestEntry | None, recorded: dict[str, Any] | None
) -> bool:
    try:
        stat = local.stat()
    except FileNotFoundError:
        return False
    if stat.st_size != remote.size:
        return False
    if recorded and recorded.get("etag") == remote.etag and recorded.get("mtime_ns") == stat.st_mtime_ns:
        return True
    # No record of the last sync (or the file was touched): the manifest's hash decides.
    return entry is not None and sha256_file(local) == entry.sha256


def _get_body(client: Any, request: dict[str, Any], part: Path, uri: str) -> Any:
    """GET (a range of) an object; a changed object (412/416) drops the partial file and is retried whole."""
    try:
        return client.get_object(**request)["Body"]
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("PreconditionFailed", "412", "InvalidRange", "416"):
            part.unlink(missing_ok=True)
            _sidecar(part).unlink(missing_ok=True)
            raise TransientStorageError(
                uri, "the object changed during the download; fetching it again"
            ) from exc
        raise


def _sidecar(part: Path) -> Path:
    """The record of finished chunks of a ranged download."""
    return part.with_name(part.name + ".json")


def _fetch(client: Any, bucket: str, key: str, part: Path, remote: RemoteObject, uri: str) -> None:
    """Append the missing bytes of ``key`` to ``part`` (one attempt; the caller retries)."""
    offset = part.stat().st_size if part.exists() else 0
    if offset > remote.size:
        part.unlink()
        offset = 0
    if offset == remote.size and remote.size > 0:
        return
    request: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if remote.etag:
        request["IfMatch"] = remote.etag
    if offset:
        request["Range"] = f"bytes={offset}-"
    body = _get_body(client, request, part, uri)
    with part.open("ab") as handle:
        for chunk in body.iter_chunks(_CHUNK):
            handle.write(chunk)
    size = part.stat().st_size
    if size != remote.size:
        # The stream ended early without an exception (a proxy cut it): transient, resume from here.
        raise TransientStorageError(uri, f"got {size} of {remote.size} bytes; resuming")


def _fetch_ranges(
    client: Any, bucket: str, key: str, part: Path, remote: RemoteObject, uri: str, workers: int
) -> None:
    """Fetch a large object as parallel ranged GETs into a part file of its full size (one attempt).

    The sidecar ``<part>.json`` lists the finished chunks with the object's ETag, so the next attempt (or
    the next run) fetches only the missing ones; a different ETag starts over.
    """
    sidecar = _sidecar(part)
    chunks = range(0, remote.size, RANGE_CHUNK)
    done: set[int] = set()
    try:
        record = json.loads(sidecar.read_text())
        if record.get("etag") == remote.etag and part.stat().st_size == remote.size:
            done = {int(i) for i in record.get("done", [])}
    except (OSError, ValueError):
        pass
    if not done:
        with part.open("wb") as handle:
            handle.truncate(remote.size)  # sparse: chunks land at their offsets in any order
    lock = threading.Lock()

    def fetch_chunk(start: int) -> None:
        end = min(remote.size, start + RANGE_CHUNK) - 1
        request: dict[str, Any] = {"Bucket": bucket, "Key": key, "Range": f"bytes={start}-{end}"}
        if remote.etag:
            request["IfMatch"] = remote.etag
        body = _get_body(client, request, part, uri)
        written = 0
        with part.open("r+b") as handle:
            handle.seek(start)
            for piece in body.iter_chunks(_CHUNK):
                handle.write(piece)
                written += len(piece)
        if written != end - start + 1:
            raise TransientStorageError(uri, f"range {start}-{end} ended early; resuming")
        with lock:
            done.add(start)
            tmp = sidecar.with_name(sidecar.name + ".tmp")
            tmp.write_text(json.dumps({"etag": remote.etag, "done": sorted(done)}))
            os.replace(tmp, sidecar)

    run_all(fetch_chunk, [c for c in chunks if c not in done], workers)


def _check(part: Path, remote: RemoteObject, entry: ManifestEntry | None, uri: str) -> None:
    """Verify a complete part file: sha256 from the manifest, else MD5 when the ETag is a plain MD5."""
    size = part.stat().st_size
    expected_size = entry.size if entry else remote.size
    if size != expected_size:
        raise IntegrityError(uri, f"downloaded {size} bytes, expected {expected_size}; sync again")
    plain_md5 = len(remote.etag) == 32 and "-" not in remote.etag
    if entry is None and not plain_md5:
        return  # a multipart ETag is not a hash of the content: size is all we can check
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with part.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha.update(chunk)
            if entry is None:
                md5.update(chunk)
    if entry is not None and sha.hexdigest() != entry.sha256:
        raise IntegrityError(
            uri, "sha256 does not match the manifest; the object was changed after publishing"
        )
    if entry is None and md5.hexdigest() != remote.etag:
        raise IntegrityError(uri, "MD5 does not match the object's ETag; the download was corrupted")


def _download_file(
    client: Any,
    src: StorageURI,
    rel: str,
    local: Path,
    remote: RemoteObject,
    entry: ManifestEntry | None,
    attempts: int,
    large_file_threshold: int,
) -> None:
    uri = str(src.join(rel))
    local.parent.mkdir(parents=True, exist_ok=True)
    part = local.with_name(local.name + PART_SUFFIX)
    key = src.prefix + rel

    def fetch_and_check() -> None:
        # A part without a sidecar came from a single-stream attempt: keep appending to it.
        sequential = part.exists() and not _sidecar(part).exists()
        if remote.size >= large_file_threshold and not sequential:
            _fetch_ranges(client, src.bucket, key, part, remote, uri, RANGE_WORKERS)
        else:
            _fetch(client, src.bucket, key, part, remote, uri)
        try:
            _check(part, remote, entry, uri)
        except IntegrityError:
            part.unlink(missing_ok=True)  # corrupt bytes must not be resumed from
            _sidecar(part).unlink(missing_ok=True)
            raise

    try:
        retry_call(fetch_and_check, uri=uri, endpoint=endpoint_of(client), attempts=attempts)
    except IntegrityError:
        # One fresh download from byte zero: a resumed part may have mixed two versions of the object.
        retry_call(fetch_and_check, uri=uri, endpoint=endpoint_of(client), attempts=attempts)
    os.replace(part, local)
    _sidecar(part).unlink(missing_ok=True)


def download_prefix(
    uri: str | StorageURI,
    dest: str | Path,
    *,
    client: Any = None,
    concurrency: int = 8,
    require_manifest: bool = False,
    progress: ProgressCallback | None = None,
    attempts: int = 3,
    large_file_threshold: int = LARGE_FILE_THRESHOLD,
) -> SyncResult:
    """Download everything under an S3 prefix into a local folder, skipping unchanged files.

    When the prefix has a manifest, exactly its files are fetched and each is checked against its sha256;
    without one (a dataset uploaded by other tools) the listing is the plan and sizes (and MD5 ETags) are
    checked.

    Args:
        uri (str | StorageURI): ``s3://bucket/prefix/``.
        dest (str | Path): the local folder; created if missing. Files not under the prefix are left alone.
        client: an S3 client; ``make_client()`` (settings and credentials from the environment) when None.
        concurrency (int): files fetched at once. Default: 8.
        require_manifest (bool): refuse a prefix without a complete manifest (use for checkpoints and
            outputs, which VisionFT publishes). Default: False.
        progress (ProgressCallback | None): called after each file. Default: None.
        attempts (int): tries per file for faults that outlast botocore's own retries (a body cut off
            mid-stream); each try resumes where the last stopped. Default: 3.
        large_file_threshold (int): files of at least this many bytes are fetched as RANGE_WORKERS
            parallel ranged GETs of RANGE_CHUNK bytes. Default: LARGE_FILE_THRESHOLD (64 MiB).

    Returns:
        SyncResult: counts and timing.

    Raises:
        IncompleteUploadError: ``require_manifest`` is set and the prefix is not completely published, or a
            manifest lists a file that is missing.
        IntegrityError: a file does not match its manifest or ETag after a fresh retry.
        StorageError: a missing bucket, denied access, a wrong endpoint, an unreachable host, or transient
            faults that outlasted the retries. Finished files are kept, and a rerun resumes.
    """
    src = as_s3(uri)
    dest = Path(dest)
    client = client or make_client(max_pool_connections=max(10, concurrency * RANGE_WORKERS))
    began = time.monotonic()
    listing = list_objects(client, src)
    manifest = None
    if MANIFEST_NAME in listing:
        manifest = verify_prefix(src, client=client, listing=listing)
    elif require_manifest:
        verify_prefix(src, client=client, listing=listing)  # raises IncompleteUploadError
    if manifest is not None:
        entries: dict[str, ManifestEntry | None] = dict(manifest.by_path())
    else:
        entries = {rel: None for rel in listing if not rel.endswith((PART_SUFFIX, PART_SUFFIX + ".json"))}
    if not listing and not require_manifest:
        logger.warning("%s: the prefix is empty", src)
    plan = {rel: (_safe_local(dest, rel, str(src)), listing[rel], entries[rel]) for rel in sorted(entries)}
    dest.mkdir(parents=True, exist_ok=True)
    state = _load_state(dest)
    state_lock = threading.Lock()
    tracker = Tracker(str(src), len(plan), sum(r.size for _, r, _ in plan.values()), progress)

    def one(rel: str) -> None:
        local, remote, entry = plan[rel]
        skipped = _unchanged(local, remote, entry, state.get(rel))
        if not skipped:
            _download_file(client, src, rel, local, remote, entry, attempts, large_file_threshold)
        with state_lock:
            state[rel] = {"size": remote.size, "etag": remote.etag, "mtime_ns": local.stat().st_mtime_ns}
        tracker.done(rel, remote.size, skipped)

    try:
        run_all(one, list(plan), concurrency)
    finally:
        with state_lock:
            _save_state(dest, state)
    # Completeness before use: every planned file is in place with its size.
    for rel, (local, remote, entry) in plan.items():
        expected = entry.size if entry else remote.size
        if not local.is_file() or local.stat().st_size != expected:
            raise IntegrityError(str(src.join(rel)), "missing or wrong size after the sync; sync again")
    return tracker.finish(began, f"{src} -> {dest}", "fetched")
