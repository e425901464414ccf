"""Image loading and its input hardening: schemes, path confinement, byte and pixel limits, corrupt and
truncated files, and the pixel-budget resize. URLs: test_fetch.py."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib

import pytest
from PIL import Image
from visionft.data.errors import BadSampleError
from visionft.data.images import ImageLimits, ImageLoader, fit_to_budget


def png_bytes(size=(32, 24), color=(10, 200, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def huge_png(side: int = 20_000) -> bytes:
    """A valid 1-bit greyscale PNG of side x side pixels: 50 MB of zero rows compress to ~50 KB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + side // 8)  # filter byte + packed bits
    idat = zlib.compress(row * side, 9)
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    return data[: len(data) // 2]


# ------------------------------------------------------------------------------------------------------
# Sources that load
# ------------------------------------------------------------------------------------------------------


def test_every_local_form_loads_as_rgb(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    data = png_bytes(mode="RGBA", color=(0, 0, 255, 0))
    loader = ImageLoader(tmp_path)
    uri = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    for source in (
        "a.png",
        str(tmp_path / "a.png"),
        tmp_path / "a.png",
        png_bytes(),
        {"bytes": png_bytes()},
        {"path": "a.png", "bytes": None},
        uri,
        Image.new("L", (32, 24)),
    ):
        image = loader.load(source)
        assert image.mode == "RGB" and image.size == (32, 24), source
    # Transparent pixels are composited on white, not black.
    assert loader.load(data).getpixel((0, 0)) == (255, 255, 255)


# ------------------------------------------------------------------------------------------------------
# Refused sources: each error names the sample, the field and a fix
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("file:///etc/passwd", "unsupported scheme file://"),
        ("ftp://example.com/a.png", "unsupported scheme ftp://"),
        ("gopher://example.com/a.png", "unsupported scheme gopher://"),
        ("http://example.com/a.png", "http://, which is refused"),
        ("../outside.png", "outside the dataset folder"),
        ("sub/../../outside.png", "outside the dataset folder"),
        ("/etc/hostname", "outside the dataset folder"),
        ("missing.png", "does not exist"),
        ("", "empty"),
        (12345, "must be a PIL image, bytes, a path or a URL"),
        (b"", "empty (0 bytes)"),
        (b"this is not an image at all", "not an image PIL can read"),
        ("data:image/png;base64,@@@", "malformed"),
    ],
)
def test_refusals_name_sample_field_and_reason(tmp_path, source, expected):
    (tmp_path.parent / "outside.png").write_bytes(png_bytes())
    (tmp_path / "sub").mkdir()
    with pytest.raises(BadSampleError) as info:
        ImageLoader(tmp_path).load(source, index=7, field="messages[0].content[0].image")
    message = str(info.value)
    assert message.startswith("sample 7, field messages[0].content[0].image: ")
    assert expected in message
    assert info.value.index == 7


def test_symlink_out_of_the_root_is_refused(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(png_bytes())
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    (root / "ok.png").write_bytes(png_bytes())
    (root / "inner.png").symlink_to(root / "ok.png")
    with pytest.raises(BadSampleError, match="outside the dataset folder"):
        ImageLoader(root).load("link.png")
    assert ImageLoader(root).load("inner.png").size == (32, 24)  # links that stay inside are fine


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    data = huge_png()
    assert len(data) < 200_000  # the file itself is small: only its header gives it away
    started = time.perf_counter()
    with pytest.raises(BadSampleError, match="over the decode limit") as info:
        ImageLoader(tmp_path).load(data, index=3, field="image")
    assert "400000000 pixels" in str(info.value)
    # Decoding 400 Mpx would take seconds and gigabytes; the header check takes milliseconds.
    assert time.perf_counter() - started < 2.0


def test_pixel_limit_applies_to_in_memory_images_too():
    loader = ImageLoader(limits=ImageLimits(max_decode_pixels=100 * 100))
    with pytest.raises(BadSampleError, match="over the decode limit"):
        loader.load(Image.new("RGB", (101, 100)))


def test_truncated_jpeg_gives_a_clear_error(tmp_path):
    with pytest.raises(BadSampleError, match="truncated or corrupt"):
        ImageLoader(tmp_path).load(truncated_jpeg(), index=0)


def test_byte_limit_on_files_inline_bytes_and_data_uris(tmp_path):
    data = png_bytes((64, 64))
    (tmp_path / "a.png").write_bytes(data)
    loader = ImageLoader(tmp_path, ImageLimits(max_bytes=len(data) - 1))
    uri = "data:image/png;base64," + base64.b64encode(data * 2).decode()
    for source in ("a.png", data, uri):
        with pytest.raises(BadSampleError, match="limit"):
            loader.load(source)


# ------------------------------------------------------------------------------------------------------
# Resizing
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "budget", "multiple"),
    [((1000, 500), 100_000, 28), ((640, 480), 50_000, 28), ((333, 1000), 20_000, 32), ((90, 60), None, 28)],
)
def test_fit_to_budget_keeps_aspect_and_alignment(size, budget, multiple):
    out = fit_to_budget(Image.new("RGB", size), budget, multiple)
    w, h = out.size
    assert w % multiple == 0 and h % multiple == 0
    if budget is not None:
        assert w * h <= budget
        # The aspect ratio survives up to one patch of rounding on each side.
        assert abs(w / h - size[0] / size[1]) <= (multiple / min(w, h)) * (size[0] / size[1]) + 1e-9


def test_fit_to_budget_leaves_aligned_images_alone():
    image = Image.new("RGB", (56, 84))
    assert fit_to_budget(image, 10_000, 28) is image
