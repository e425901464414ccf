"""The publish manifest: ``_visionft_manifest.json``, the last object written under a prefix.

A writer uploads every file first and the manifest last. A reader trusts a prefix only when the manifest
exists, parses, and every file it lists is present with the listed size; a download then checks each
file's sha256 against it. So a prefix whose upload died halfway is never taken for a complete one.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The manifest's object name, directly under the published prefix.
MANIFEST_NAME = "_visionft_manifest.json"
#: The format tag; bump on incompatible changes.
MANIFEST_FORMAT = "visionft-manifest/1"

_CHUNK = 1024 * 1024


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks (bounded memory)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ManifestEntry:
    """One published file: its path relative to the prefix (with "/"), size in bytes and sha256."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The list of files that make a prefix complete.

    Attributes:
        files (tuple[ManifestEntry, ...]): every file, sorted by path.
        created (float): Unix time of publication.
        meta (dict[str, Any]): free-form metadata, e.g. the checkpoint step.
    """

    files: tuple[ManifestEntry, ...]
    created: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """The sum of all file sizes."""
        return sum(f.size for f in self.files)

    def by_path(self) -> dict[str, ManifestEntry]:
        """Entries keyed by relative path."""
        return {f.path: f for f in self.files}

    def to_json(self) -> bytes:
        """Serialize; ``file_count`` and ``total_bytes`` let a reader check the list is whole."""
        body = {
            "format": MANIFEST_FORMAT,
            "created": self.created,
            "file_count": len(self.files),
            "total_bytes": self.total_bytes,
            "meta": self.meta,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
        }
        return json.dumps(body, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse and check a manifest.

        Raises:
            ValueError: when it is not a complete manifest of a known format (truncated JSON, counts that
                do not match its file list, an unknown format tag).
        """
        body = json.loads(data)
        if body.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"unknown manifest format {body.get('format')!r}, expected {MANIFEST_FORMAT}")
        files = tuple(
            ManifestEntry(path=str(f["path"]), size=int(f["size"]), sha256=str(f["sha256"]))
            for f in body["files"]
        )
        manifest = cls(files=files, created=float(body["created"]), meta=dict(body.get("meta", {})))
        if body.get("file_count") != len(files) or body.get("total_bytes") != manifest.total_bytes:
            raise ValueError("manifest counts do not match its file list")
        return manifest
