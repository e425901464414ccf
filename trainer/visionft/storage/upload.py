"""Atomic publish of a local folder to an S3 prefix: files first, manifest last (see ``sync``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig

from visionft.storage.client import endpoint_of, make_client, retry_call
from visionft.storage.download import PART_SUFFIX, STATE_NAME
from visionft.storage.manifest import MANIFEST_NAME, Manifest, ManifestEntry, sha256_file
from visionft.storage.prefix import RemoteObject, as_s3, list_objects, read_manifest
from visionft.storage.progress import ProgressCallback, SyncResult, Tracker, run_all
from visionft.storage.uri import StorageURI

logger = logging.getLogger(__name__)

_MiB = 1024 * 1024

#: Default multipart settings: 16 MiB parts, 8 in flight per large file (at most about 128 MiB of buffers).
DEFAULT_TRANSFER = TransferConfig(
    multipart_threshold=16 * _MiB, multipart_chunksize=16 * _MiB, max_concurrency=8, use_threads=True
)


def _local_files(src: Path, exclude: Sequence[str] = ()) -> list[str]:
    skip = (PART_SUFFIX, PART_SUFFIX + ".json", STATE_NAME, STATE_NAME + ".tmp")
    files = []
    for path in src.rglob("*"):
        rel = path.relative_to(src).as_posix()
        if rel.split("/", 1)[0] in exclude:
            continue
        if path.is_file() and not rel.endswith(skip) and rel != MANIFEST_NAME:
            files.append(rel)
    return sorted(files)


def upload_folder(
    src: str | Path,
    uri: str | StorageURI,
    *,
    client: Any = None,
    concurrency: int = 8,
    transfer_config: TransferConfig | None = None,
    progress: ProgressCallback | None = None,
    meta: dict[str, Any] | None = None,
    attempts: int = 3,
    exclude: Sequence[str] = (),
) -> SyncResult:
    """Publish a local folder to an S3 prefix atomically: files first, the manifest last.

    Files already published with the same size and sha256 (per the prefix's current manifest) are not sent
    again; the others are hashed while they upload (for a large file, in a thread beside its multipart
    upload), so the sha256 pass costs no extra wall time. While the upload runs the prefix has no manifest, so
    readers (``verify_prefix``, ``download_prefix(require_manifest=True)``,
    ``CheckpointManager.find_latest_complete``) do not trust it.

    Args:
        src (str | Path): the local folder.
        uri (str | StorageURI): the target prefix, ``s3://bucket/prefix/``.
        client: an S3 client; ``make_client()`` when None.
        concurrency (int): small files sent at once. Default: 8.
        transfer_config (TransferConfig | None): multipart threshold, part size and parts in flight for
            large files. Default: ``DEFAULT_TRANSFER`` (16 MiB parts, 8 in flight).
        progress (ProgressCallback | None): called after each file. Default: None.
        meta (dict | None): stored in the manifest, e.g. ``{"step": 50}``. Default: None.
        exclude (Sequence[str]): names of top-level files or folders to leave out, e.g. ``["checkpoints"]``.
            Default: ().
        attempts (int): tries per file beyond botocore's per-request retries. Default: 3.

    Returns:
        SyncResult: counts and timing.

    Raises:
        StorageError: the upload failed; the prefix then has no manifest and is not trusted by readers.
    """
    root = Path(src)
    dest = as_s3(uri)
    if not root.is_dir():
        raise FileNotFoundError(f"upload source {root} is not a folder; give the folder to publish")
    config = transfer_config or DEFAULT_TRANSFER
    client = client or make_client(max_pool_connections=max(10, concurrency, config.max_request_concurrency))
    endpoint = endpoint_of(client)
    began = time.monotonic()
    rels = _local_files(root, exclude)
    sizes = {rel: (root / rel).stat().st_size for rel in rels}
    old = read_manifest(dest, client=client)
    listing = list_objects(client, dest) if old is not None else {}
    published = old.by_path() if old else {}
    # A file can be unchanged only if the published one has its path and size: hash those now to decide.
    # Every other file is sent anyway and is hashed while it uploads.
    candidates = [
        rel
        for rel in rels
        if rel in published
        and published[rel].size == sizes[rel]
        and listing.get(rel, RemoteObject(-1, "")).size == sizes[rel]
    ]
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="visionft-hash") as pool:
        hashes = dict(zip(candidates, pool.map(lambda rel: sha256_file(root / rel), candidates)))
    unchanged = {rel for rel, digest in hashes.items() if digest == published[rel].sha256}
    todo = [rel for rel in rels if rel not in unchanged]
    tracker = Tracker(str(dest), len(rels), sum(sizes.values()), progress)
    if not todo and old is not None and set(published) == set(rels):
        for rel in rels:
            tracker.done(rel, sizes[rel], skipped=True)
        return SyncResult(len(rels), 0, len(rels), 0, time.monotonic() - began)
    if old is not None:
        # Unpublish first: from here until the new manifest lands, the prefix is incomplete.
        _retry_op(
            lambda: client.delete_object(Bucket=dest.bucket, Key=dest.prefix + MANIFEST_NAME), dest, endpoint
        )
    for rel in rels:
        if rel in unchanged:
            tracker.done(rel, sizes[rel], skipped=True)

    def put_small(rel: str) -> None:
        hashes[rel] = sha256_file(root / rel)

        def put() -> None:
            with (root / rel).open("rb") as body:
                client.put_object(Bucket=dest.bucket, Key=dest.prefix + rel, Body=body)

        retry_call(put, uri=str(dest.join(rel)), endpoint=endpoint, attempts=attempts)
        tracker.done(rel, sizes[rel], skipped=False)

    run_all(put_small, [rel for rel in todo if sizes[rel] < config.multipart_threshold], concurrency)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="visionft-hash") as hasher:
        for rel in (rel for rel in todo if sizes[rel] >= config.multipart_threshold):
            digest = hasher.submit(sha256_file, root / rel)  # overlaps the upload; both read the page cache
            retry_call(
                lambda rel=rel: client.upload_file(
                    str(root / rel), dest.bucket, dest.prefix + rel, Config=config
                ),
                uri=str(dest.join(rel)),
                endpoint=endpoint,
                attempts=attempts,
            )
            hashes[rel] = digest.result()
            tracker.done(rel, sizes[rel], skipped=False)
    entries = tuple(ManifestEntry(path=rel, size=sizes[rel], sha256=hashes[rel]) for rel in rels)
    manifest = Manifest(files=entries, meta=dict(meta or {}))
    # The manifest last: its presence is what makes the prefix complete.
    body = manifest.to_json()
    _retry_op(
        lambda: client.put_object(
            Bucket=dest.bucket, Key=dest.prefix + MANIFEST_NAME, Body=body, ContentType="application/json"
        ),
        dest,
        endpoint,
    )
    return tracker.finish(began, f"{root} -> {dest}", "sent", "; manifest written")


def _retry_op(fn: Callable[[], Any], uri: StorageURI, endpoint: str) -> Any:
    return retry_call(fn, uri=str(uri), endpoint=endpoint)
