"""Load one image from whatever a dataset holds, safely, as RGB; and fit it to a pixel budget.

Accepted sources: a ``PIL.Image``, raw ``bytes``, a ``{"bytes": ..., "path": ...}`` dict (the form of a
``datasets`` Image column), a ``data:`` URI, a local path, an ``https://`` URL (``http://`` only when allowed)
and an ``s3://`` URI (read through ``visionft.storage``).

The loader is the trainer's boundary with untrusted data, so its rules are strict by default:

- Schemes: ``s3://``, ``https://`` and ``data:`` only; ``http://`` only with ``allow_http=True``. ``file://``
  and every other scheme are rejected, so a dataset cannot name files outside its own folder through a URL.
- Local paths: relative paths are resolved against the dataset root, and the fully resolved path (``..``
  and symlinks followed) must stay inside it. With ``dataset_root=None`` the caller vouches for its paths
  (the Python API on one's own data); the CLI always sets the root to the dataset folder.
- URLs go through ``visionft.data.fetch.GuardedFetch``: public addresses only (private networks by explicit
  opt-in), checked after DNS and connected to as checked, with a time-out and a byte limit.
- Decompression bombs: the image header is read first (``Image.open`` decodes nothing) and ``width x
  height`` is checked against ``max_decode_pixels`` before any pixel is decoded; PIL's own
  ``MAX_IMAGE_PIXELS`` guard is set to the same limit as a second line. Truncated or corrupt files raise.

Every failure is a ``BadSampleError`` (``visionft.data.errors``) whose message names the sample, the field
and the fix.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

from PIL import Image, UnidentifiedImageError

from visionft.data.errors import BadSampleError
from visionft.data.fetch import GuardedFetch, short_url

# The AWS metadata service's IPv6 address is inside the ULA range, so "private" would not catch it alone.


@dataclass(frozen=True)
class ImageLimits:
    """What the loader accepts.

    Attributes:
        max_bytes (int): largest encoded image (file, download or inline bytes). Default: 32 MiB.
        max_decode_pixels (int): largest ``width x height`` decoded, checked from the header before
            decoding. Default: 64 Mpx (the schema's ceiling for ``maxImagePixels``).
        timeout_s (float): time-out for connecting and for each read of a URL fetch. Default: 20.
        allow_http (bool): allow plain ``http://`` URLs. Default: False.
        allow_private_networks (bool): allow URLs that resolve to RFC 1918 / ULA / CGNAT addresses.
            Loopback, link-local, metadata, multicast and unspecified addresses stay refused. Default: False.
    """

    max_bytes: int = 32 * 1024 * 1024
    max_decode_pixels: int = 64 * 1024 * 1024
    timeout_s: float = 20.0
    allow_http: bool = False
    allow_private_networks: bool = False


S3Reader = Callable[[str, int], bytes]
"""Reads an ``s3://`` object, at most ``max_bytes`` (raising when larger), and returns its bytes."""


class _StorageS3Reader:
    """Reads ``s3://`` images through ``visionft.storage`` (credentials and endpoint from the environment,
    as the trainer pod gets them), checking the object's size with a HEAD request before fetching it."""

    def __init__(self):
        self._client = None

    def __call__(self, uri: str, max_bytes: int) -> bytes:
        from visionft.storage import make_client, parse_uri, read_bytes

        if self._client is None:
            self._client = make_client()
        parsed = parse_uri(uri)
        size = self._client.head_object(Bucket=parsed.bucket, Key=parsed.key).get("ContentLength", 0)
        if size > max_bytes:
            raise BadSampleError(f"{uri} is {size} bytes, over the {max_bytes}-byte limit; shrink the image")
        return read_bytes(parsed, client=self._client)


class ImageLoader:
    """Turns one image reference into an RGB ``PIL.Image`` under the rules in the module docstring.

    Args:
        dataset_root (str | os.PathLike | None): local paths must resolve inside this folder; relative
            paths are taken from it. None trusts every local path (Python API on the caller's own data).
            Default: None.
        limits (ImageLimits): size, time and network limits. Default: ``ImageLimits()``.
        s3_reader (S3Reader | None): reads ``s3://`` objects; default: through ``visionft.storage``.
        resolver (Callable | None): ``socket.getaddrinfo``-compatible resolver (tests inject a fixed
            table to check address rules without a network). Default: ``socket.getaddrinfo``.
    """

    def __init__(
        self,
        dataset_root: str | os.PathLike | None = None,
        limits: ImageLimits | None = None,
        s3_reader: S3Reader | None = None,
        resolver: Callable[..., list] | None = None,
    ):
        self.root = Path(dataset_root).resolve() if dataset_root is not None else None
        self.limits = limits or ImageLimits()
        self._s3 = s3_reader or _StorageS3Reader()
        #: The guarded GET that ``https://`` (and allowed ``http://``) images go through.
        self.fetch = GuardedFetch(
            self.limits.max_bytes,
            self.limits.timeout_s,
            allow_http=self.limits.allow_http,
            allow_private_networks=self.limits.allow_private_networks,
            resolver=resolver,
        )

    # ---------------------------------------------------------------------------------------------
    # Entry point
    # ---------------------------------------------------------------------------------------------

    def load(self, source: Any, index: int | None = None, field: str = "image") -> Image.Image:
        """Loads ``source`` as an RGB image.

        Args:
            source: a PIL image, bytes, a datasets image dict, a data URI, a path, or an s3/https URL.
            index (int | None): the sample index, for error messages.
            field (str): the field name, for error messages.

        Raises:
            BadSampleError: the source is refused, missing, too large or not a decodable image.
        """
        try:
            if isinstance(source, Image.Image):
                return self._decode_opened(source)
            return self._decode(self._read(source))
        except BadSampleError as err:
            raise err.at(index, field) from err.__cause__

    # ---------------------------------------------------------------------------------------------
    # Reading bytes
    # ---------------------------------------------------------------------------------------------

    def _read(self, source: Any) -> bytes:
        if isinstance(source, (bytes, bytearray, memoryview)):
            return self._bounded(bytes(source), "inline image bytes")
        if isinstance(source, dict):
            if source.get("bytes"):
                return self._bounded(bytes(source["bytes"]), "inline image bytes")
            if source.get("path"):
                return self._read(source["path"])
            raise BadSampleError("an image dict needs 'bytes' or 'path'; got neither")
        if isinstance(source, os.PathLike):
            return self._read_local(os.fspath(source))
        if not isinstance(source, str):
            raise BadSampleError(
                f"an image must be a PIL image, bytes, a path or a URL; got {type(source).__name__}"
            )
        if not source.strip():
            raise BadSampleError("the image reference is empty; give a path, URL or image")
        scheme = urlsplit(source).scheme.lower() if "://" in source or source.startswith("data:") else ""
        if scheme == "data":
            return self._read_data_uri(source)
        if scheme == "s3":
            return self._read_s3(source)
        if scheme in ("https", "http"):
            if scheme == "http" and not self.limits.allow_http:
                raise BadSampleError(
                    f"{short_url(source)} uses http://, which is refused by default; use https:// or s3://, "
                    "or allow plain HTTP explicitly"
                )
            return self.fetch.get(source)
        if scheme:
            raise BadSampleError(
                f"{short_url(source)} uses the unsupported scheme {scheme}://; images may be s3://, "
                "https://, data: URIs or paths inside the dataset folder"
            )
        return self._read_local(source)

    def _bounded(self, data: bytes, what: str) -> bytes:
        if len(data) > self.limits.max_bytes:
            raise BadSampleError(
                f"{what} are {len(data)} bytes, over the {self.limits.max_bytes}-byte limit; shrink the image"
            )
        return data

    def _read_data_uri(self, uri: str) -> bytes:
        header, sep, payload = uri.partition(",")
        if not sep:
            raise BadSampleError("the data: URI has no ',' before its payload; use data:image/png;base64,...")
        # Base64 inflates by 4/3: refuse before decoding anything too large.
        if len(payload) * 3 // 4 > self.limits.max_bytes:
            raise BadSampleError(
                f"the data: URI holds about {len(payload) * 3 // 4} bytes, over the "
                f"{self.limits.max_bytes}-byte limit; shrink the image"
            )
        try:
            data = (
                base64.b64decode(payload, validate=True)
                if header.endswith(";base64")
                else unquote_to_bytes(payload)
            )
        except (binascii.Error, ValueError) as err:
            raise BadSampleError(
                f"the data: URI's base64 payload is malformed ({err}); re-encode it"
            ) from err
        return self._bounded(data, "the data: URI's bytes")

    def _read_local(self, raw: str) -> bytes:
        path = Path(raw).expanduser()
        if self.root is not None:
            candidate = path if path.is_absolute() else self.root / path
            # resolve() follows symlinks and "..", so a link or ../ that leaves the root is caught here.
            resolved = candidate.resolve()
            if not resolved.is_relative_to(self.root):
                raise BadSampleError(
                    f"path {raw!r} resolves outside the dataset folder {self.root}; image paths must stay "
                    "inside it (no ../, no absolute paths or symlinks elsewhere)"
                )
            path = resolved
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise BadSampleError(f"path {raw!r} is not a regular file; point it at an image file")
            if size > self.limits.max_bytes:
                raise BadSampleError(
                    f"file {raw!r} is {size} bytes, over the {self.limits.max_bytes}-byte limit; shrink it"
                )
            return path.read_bytes()
        except FileNotFoundError as err:
            raise BadSampleError(
                f"file {raw!r} does not exist{' under ' + str(self.root) if self.root else ''}; fix the path "
                "or remove the sample"
            ) from err
        except PermissionError as err:
            raise BadSampleError(f"file {raw!r} is not readable (permission denied); fix its mode") from err

    def _read_s3(self, uri: str) -> bytes:
        try:
            data = self._s3(uri, self.limits.max_bytes)
        except BadSampleError:
            raise
        except Exception as err:  # the storage layer's errors vary (botocore, network); report them uniformly
            raise BadSampleError(f"{uri} could not be read from S3 ({type(err).__name__}: {err})") from err
        return self._bounded(data, f"{uri}'s bytes")

    # ---------------------------------------------------------------------------------------------
    # Decoding
    # ---------------------------------------------------------------------------------------------

    def _check_pixels(self, size: tuple[int, int]) -> None:
        width, height = size
        if width * height > self.limits.max_decode_pixels:
            raise BadSampleError(
                f"the image is {width}x{height} = {width * height} pixels, over the decode limit of "
                f"{self.limits.max_decode_pixels} (decompression-bomb guard); downscale it before training"
            )

    def _decode(self, data: bytes) -> Image.Image:
        if not data:
            raise BadSampleError("the image is empty (0 bytes); replace the file")
        # PIL checks its process-wide bomb guard in open() too; keep it equal to our limit.
        Image.MAX_IMAGE_PIXELS = self.limits.max_decode_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise BadSampleError(
                f"the image is over the decode limit of {self.limits.max_decode_pixels} pixels "
                f"(decompression-bomb guard: {err}); downscale it before training"
            ) from err
        except UnidentifiedImageError as err:
            raise BadSampleError(
                "the bytes are not an image PIL can read (corrupt, or not an image format); replace the file"
            ) from err
        except (OSError, SyntaxError, ValueError) as err:
            raise BadSampleError(
                f"the image header is corrupt ({err}); re-export or replace the file"
            ) from err
        return self._decode_opened(image)

    def _decode_opened(self, image: Image.Image) -> Image.Image:
        """Checks the size of an opened (maybe still lazy) image, then decodes it."""
        self._check_pixels(image.size)  # from the header: a lazily opened image has decoded nothing yet
        # PIL's own bomb guard is process-wide; set it to our limit so the header check and PIL agree.
        Image.MAX_IMAGE_PIXELS = self.limits.max_decode_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise BadSampleError(
                f"the image is over the decode limit of {self.limits.max_decode_pixels} pixels "
                f"(decompression-bomb guard: {err}); downscale it before training"
            ) from err
        except (OSError, SyntaxError, ValueError) as err:
            # PIL reports truncated files as OSError ("image file is truncated") and some corrupt headers
            # as SyntaxError.
            raise BadSampleError(
                f"the image is truncated or corrupt ({err}); re-export or replace the file"
            ) from err
        return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (a black background would change what the image shows)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def fit_to_budget(image: Image.Image, max_pixels: int | None, multiple: int = 1) -> Image.Image:
    """Downscales ``image`` to at most ``max_pixels`` pixels, keeping its aspect ratio, with both sides
    multiples of ``multiple`` (the architecture's patch x merge size, so no patch is cut in half).

    Images within the budget are only aligned (rounded to the nearest multiple) when ``multiple > 1``;
    they are never upscaled beyond one multiple.

    Args:
        image (Image.Image): an RGB image.
        max_pixels (int | None): the pixel budget; None means no budget (alignment only).
        multiple (int): side lengths are rounded to this. Default: 1.

    Returns:
        Image.Image: the resized image (the same object when nothing changes).
    """
    width, height = image.size
    scale = 1.0
    if max_pixels is not None and width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
    new_w = max(multiple, _round_to(width * scale, multiple, down=scale < 1))
    new_h = max(multiple, _round_to(height * scale, multiple, down=scale < 1))
    # Rounding to the nearest multiple may overshoot the budget; step the longer side down until it fits.
    while max_pixels is not None and new_w * new_h > max_pixels and max(new_w, new_h) > multiple:
        if new_w >= new_h:
            new_w -= multiple
        else:
            new_h -= multiple
    if (new_w, new_h) == (width, height):
        return image
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


def _round_to(value: float, multiple: int, down: bool) -> int:
    if multiple <= 1:
        return max(1, int(value) if down else round(value))
    return int(value // multiple) * multiple if down else round(value / multiple) * multiple
