"""Locations: ``s3://bucket/prefix``, local paths (plain or ``file://``), and http(s) URLs for single images.

``parse_uri`` is the one place that decides what a string names; the rest of the storage code takes a
``StorageURI``. An S3 prefix is kept without a leading slash; ``join`` adds path parts with single slashes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

Scheme = Literal["s3", "file", "http", "https"]

# S3 bucket naming rules (the subset every S3-compatible server accepts).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class StorageURI:
    """A parsed location.

    Attributes:
        scheme (str): "s3", "file", "http" or "https".
        bucket (str): the S3 bucket; "" for other schemes.
        key (str): the S3 key or prefix without a leading slash; the local path for "file"; the full URL
            for http(s).
    """

    scheme: Scheme
    bucket: str
    key: str

    @property
    def is_s3(self) -> bool:
        """Whether this names an S3 object or prefix."""
        return self.scheme == "s3"

    @property
    def is_local(self) -> bool:
        """Whether this names a local file or folder."""
        return self.scheme == "file"

    @property
    def is_http(self) -> bool:
        """Whether this is an http(s) URL (single files only: there is no listing over HTTP)."""
        return self.scheme in ("http", "https")

    @property
    def path(self) -> Path:
        """The local path (only for local URIs).

        Raises:
            ValueError: for a non-local URI.
        """
        if not self.is_local:
            raise ValueError(f"{self} is not a local path")
        return Path(self.key)

    @property
    def prefix(self) -> str:
        """The S3 key as a folder prefix: "" or ending in "/"."""
        return self.key if not self.key or self.key.endswith("/") else self.key + "/"

    def join(self, *parts: str) -> StorageURI:
        """Append path parts, e.g. ``uri.join("checkpoints", "step-00000050")``."""
        cleaned = [p.strip("/") for p in parts if p.strip("/")]
        if self.is_local:
            return StorageURI("file", "", str(Path(self.key, *cleaned)))
        base = self.key.rstrip("/")
        key = "/".join([base, *cleaned]) if base else "/".join(cleaned)
        return StorageURI(self.scheme, self.bucket, key)

    def __str__(self) -> str:
        if self.is_s3:
            return f"s3://{self.bucket}/{self.key}"
        return self.key


def parse_uri(value: str | Path | StorageURI) -> StorageURI:
    """Parse a dataset, model or output location.

    Args:
        value (str | Path | StorageURI): ``s3://bucket/prefix``, ``file:///abs/path``, a plain local
            path, or an ``http(s)://`` URL.

    Returns:
        StorageURI: the parsed location.

    Raises:
        ValueError: for an S3 URI without a valid bucket, with user info or a query, or an unknown scheme;
            the message names the value and the expected form.
    """
    if isinstance(value, StorageURI):
        return value
    if isinstance(value, Path):
        return StorageURI("file", "", str(value))
    text = value.strip()
    if "://" not in text:
        return StorageURI("file", "", text)
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "file":
        return StorageURI("file", "", parts.path)
    if scheme in ("http", "https"):
        if parts.username or parts.password:
            # Credentials in a URL would end up in logs and saved configs.
            raise ValueError(
                f"URL for host {parts.hostname!r} holds user credentials; remove them from the URL "
                "(http(s) locations are for public single images)"
            )
        return StorageURI(scheme, "", text)  # type: ignore[arg-type]
    if scheme in ("s3", "s3a"):
        bucket = parts.netloc
        if parts.username or parts.password or "@" in bucket:
            raise ValueError(
                "S3 URI holds credentials before the bucket; credentials come from the environment or the "
                "AWS credential chain, write s3://bucket/prefix"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"S3 URI {text!r} has a query or fragment; write s3://bucket/prefix")
        if not _BUCKET_RE.match(bucket):
            raise ValueError(
                f"S3 URI {text!r} has no valid bucket name (3-63 characters: lowercase letters, digits, "
                "dots and hyphens); write s3://bucket/prefix"
            )
        return StorageURI("s3", bucket, parts.path.lstrip("/"))
    raise ValueError(
        f"unsupported location {text!r}: use s3://bucket/prefix, a local path, or an http(s) URL for an image"
    )
