"""A published prefix: listing it, reading and verifying its manifest, deleting it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from visionft.storage.client import endpoint_of, make_client, wrap_errors
from visionft.storage.errors import (
    IncompleteUploadError,
    ObjectNotFoundError,
    WrongEndpointError,
)
from visionft.storage.manifest import MANIFEST_NAME, Manifest
from visionft.storage.uri import StorageURI, parse_uri

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteObject:
    """An object in a listing: its size and ETag (without quotes)."""

    size: int
    etag: str


def as_s3(uri: str | StorageURI) -> StorageURI:
    parsed = parse_uri(uri)
    if not parsed.is_s3:
        raise ValueError(f"{parsed} is not an s3:// URI; this operation needs s3://bucket/prefix")
    return parsed


def list_objects(client: Any, uri: StorageURI) -> dict[str, RemoteObject]:
    """Objects under the prefix, keyed by path relative to it (folder markers left out)."""
    found: dict[str, RemoteObject] = {}
    paginator = client.get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=uri.bucket, Prefix=uri.prefix):
            check_listing(page, str(uri), endpoint_of(client))
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(uri.prefix) :]
                if rel and not rel.endswith("/"):
                    found[rel] = RemoteObject(size=int(obj["Size"]), etag=str(obj.get("ETag", "")).strip('"'))
    except Exception as exc:
        raise wrap_errors(str(uri), endpoint_of(client), exc) from exc
    return found


def check_listing(page: dict[str, Any], uri: str, endpoint: str) -> None:
    """Reject a listing that did not come from S3.

    botocore parses any 200 response, an HTML page included, into an empty listing; a real
    ListObjectsV2 answer always names the bucket and says whether it is truncated.

    Raises:
        WrongEndpointError: the response lacks the fields every S3 listing has.
    """
    if "IsTruncated" not in page and "Name" not in page:
        content_type = page.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("content-type", "?")
        raise WrongEndpointError(
            uri,
            f"the server at {endpoint} answered a listing with {content_type}, not an S3 listing; "
            "check storage.endpoint (scheme, host and port) points at the S3 API",
        )


def read_manifest(uri: str | StorageURI, *, client: Any = None) -> Manifest | None:
    """The manifest under a prefix, or None when there is none or it is not a complete manifest.

    Args:
        uri (str | StorageURI): the published prefix, ``s3://bucket/prefix/``.
        client: an S3 client; ``make_client()`` when None.

    Raises:
        StorageError: for a missing bucket, denied access or an unreachable endpoint.
    """
    parsed = as_s3(uri)
    client = client or make_client()
    key = parsed.prefix + MANIFEST_NAME
    try:
        data = client.get_object(Bucket=parsed.bucket, Key=key)["Body"].read()
    except Exception as exc:
        error = wrap_errors(str(parsed), endpoint_of(client), exc)
        if isinstance(error, ObjectNotFoundError):
            return None
        raise error from exc
    try:
        return Manifest.from_json(data)
    except (ValueError, KeyError, TypeError) as exc:
        logger.warning("%s: ignoring an unreadable manifest (%s)", parsed, exc)
        return None


def verify_prefix(
    uri: str | StorageURI, *, client: Any = None, listing: dict[str, Any] | None = None
) -> Manifest:
    """Check that a prefix is completely published: its manifest exists and every file it lists is there
    with the listed size.

    Args:
        uri (str | StorageURI): the prefix.
        client: an S3 client; ``make_client()`` when None.
        listing (dict | None): a listing already made (internal). Default: None.

    Returns:
        Manifest: the verified manifest.

    Raises:
        IncompleteUploadError: no manifest, or a file missing or of the wrong size.
    """
    parsed = as_s3(uri)
    client = client or make_client()
    manifest = read_manifest(parsed, client=client)
    if manifest is None:
        raise IncompleteUploadError(
            str(parsed),
            f"no complete {MANIFEST_NAME}: the upload to this prefix never finished (or is still running); "
            "use a completed prefix, or publish it again",
        )
    listing = list_objects(client, parsed) if listing is None else listing
    for entry in manifest.files:
        remote = listing.get(entry.path)
        if remote is None or remote.size != entry.size:
            raise IncompleteUploadError(
                str(parsed),
                f"{entry.path} is missing or has the wrong size, although the manifest lists it; "
                "publish the prefix again",
            )
    return manifest


def delete_prefix(uri: str | StorageURI, *, client: Any = None) -> int:
    """Delete everything under a prefix, the manifest first so that readers stop trusting it at once.

    Returns:
        int: objects deleted.
    """
    parsed = as_s3(uri)
    client = client or make_client()
    keys = [parsed.prefix + rel for rel in list_objects(client, parsed)]
    manifest_key = parsed.prefix + MANIFEST_NAME
    rest = [k for k in keys if k != manifest_key]
    try:
        if manifest_key in keys:
            client.delete_object(Bucket=parsed.bucket, Key=manifest_key)
        for start in range(0, len(rest), 1000):
            batch = [{"Key": k} for k in rest[start : start + 1000]]
            client.delete_objects(Bucket=parsed.bucket, Delete={"Objects": batch, "Quiet": True})
    except Exception as exc:
        raise wrap_errors(str(parsed), endpoint_of(client), exc) from exc
    return len(keys)
