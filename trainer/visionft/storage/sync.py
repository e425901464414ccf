"""Folder sync between a local directory and an S3 prefix: resumable downloads and atomic publishes.

Download (``download_prefix``):
    Lists the prefix, then fetches files on a bounded thread pool. A file is skipped when it is unchanged:
    its size and ETag match what the last sync recorded in ``.visionft-sync.json``, or its size and sha256
    match the prefix's manifest. Each file streams into ``<name>.visionft-part``; after a failure the next
    attempt (or the next run) continues from the bytes already there with a ranged GET, guarded by
    ``If-Match: <ETag>`` so that a changed object restarts from zero. Files of 64 MiB and more are fetched
    as 4 parallel ranged GETs of 16 MiB into a full-size part file, whose sidecar ``<part>.json`` lists the
    finished chunks, so a rerun fetches only the rest. A finished file is checked (size, and
    sha256 from the manifest or MD5 from a single-part ETag) before it is renamed into place, and the whole
    folder is checked against the plan before the call returns.

Upload (``upload_folder``):
    Compares with the prefix's current manifest (hashing only files whose path and size match it),
    removes that manifest (so readers stop trusting the prefix), uploads what changed while hashing it,
    and writes the new manifest last. Small files go as single PUTs on the pool; files at or
    above ``TransferConfig.multipart_threshold`` go one at a time as multipart uploads. Memory stays near
    ``concurrency x multipart_threshold`` for small files and ``max_concurrency x multipart_chunksize`` for a
    large one, since both stream from disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from visionft.storage.client import endpoint_of, make_client, retry_call
from visionft.storage.download import PART_SUFFIX, STATE_NAME, download_prefix
from visionft.storage.prefix import (
    RemoteObject,
    check_listing,
    delete_prefix,
    list_objects,
    read_manifest,
    verify_prefix,
)
from visionft.storage.progress import ProgressCallback, SyncProgress, SyncResult
from visionft.storage.upload import DEFAULT_TRANSFER, upload_folder
from visionft.storage.uri import StorageURI, parse_uri

__all__ = [
    "DEFAULT_TRANSFER",
    "PART_SUFFIX",
    "STATE_NAME",
    "ProgressCallback",
    "RemoteObject",
    "SyncProgress",
    "SyncResult",
    "check_listing",
    "delete_prefix",
    "download_prefix",
    "list_objects",
    "read_bytes",
    "read_manifest",
    "upload_folder",
    "verify_prefix",
]

# Single files ------------------------------------------------------------------------------------------


def read_bytes(uri: str | Path | StorageURI, *, client: Any = None) -> bytes:
    """Read one file (e.g. an image) from S3 or a local path.

    http(s) URLs are parsed by ``parse_uri`` but not fetched here: dataset images from the web go through
    ``visionft.data.images``, which refuses internal addresses (cloud metadata, cluster services) and caps
    sizes; a second, unchecked fetcher would undo that.

    Args:
        uri (str | Path | StorageURI): ``s3://bucket/key`` or a local path.
        client: an S3 client for s3:// URIs; ``make_client()`` when None.

    Raises:
        ValueError: for an http(s) URL.
        StorageError: for S3 failures (see ``errors``).
    """
    parsed = parse_uri(uri)
    if parsed.is_local:
        return parsed.path.read_bytes()
    if parsed.is_http:
        raise ValueError(
            f"{parsed.key}: fetch web images through visionft.data.images (it checks the address)"
        )
    client = client or make_client()
    return retry_call(
        lambda: client.get_object(Bucket=parsed.bucket, Key=parsed.key)["Body"].read(),
        uri=str(parsed),
        endpoint=endpoint_of(client),
    )
