"""The photo loader on good, odd and hostile input."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from facedb.errors import ImageError
from facedb.faces.images import load_photo


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def rgb(w=32, h=24, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels in its header (and has almost no data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA"])
def test_modes_become_rgb(mode):
    im = rgb().convert(mode) if mode != "I;16" else Image.fromarray(
        np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 80)
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    photo = load_photo(encode(im, fmt), name="x")
    assert photo.pixels.dtype == np.uint8 and photo.pixels.shape == (24, 32, 3)
    if mode == "I;16":
        assert photo.pixels.max() > 200  # scaled from 16 bits, not clipped to black


def test_exif_orientation_is_applied():
    im = rgb(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    photo = load_photo(encode(im, "JPEG", exif=exif.tobytes()))
    assert photo.pixels.shape[:2] == (40, 20)


def test_corrupt_exif_is_ignored():
    data = bytearray(encode(rgb(), "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff"))
    photo = load_photo(bytes(data))
    assert photo.pixels.shape == (24, 32, 3)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    photo = load_photo(buf.getvalue())
    assert tuple(photo.pixels[0, 0]) == (255, 0, 0)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"hello, I am a text file renamed .jpg", "not a readable image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 20, "not a readable image"),
        (png_header_only(30000, 30000), "over the limit"),
    ],
)
def test_bad_bytes_are_refused_with_the_name(data, message):
    with pytest.raises(ImageError, match=message) as err:
        load_photo(data, name="upload-17.jpg")
    assert "upload-17.jpg" in str(err.value)


def test_one_pixel_image_loads():
    assert load_photo(png_header_only(1, 1)).pixels.shape == (1, 1, 3)


def test_truncated_jpeg_and_png(tmp_path):
    for fmt in ("JPEG", "PNG"):
        data = encode(rgb(200, 200), fmt)
        path = tmp_path / f"cut.{fmt.lower()}"
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(ImageError, match=path.name):
            load_photo(path)


def test_pixel_cap_is_a_setting(monkeypatch):
    data = encode(rgb(100, 100), "PNG")
    monkeypatch.setenv("FACEDB_MAX_PIXELS", "5000")
    with pytest.raises(ImageError, match="over the limit"):
        load_photo(data)
    monkeypatch.setenv("FACEDB_MAX_PIXELS", "20000")
    assert load_photo(data).width == 100


def test_sources_agree_and_sha_is_of_the_bytes(tmp_path):
    im = rgb()
    data = encode(im, "PNG")
    path = tmp_path / "a.png"
    path.write_bytes(data)
    a, b, c, d = load_photo(path), load_photo(data), load_photo(im), load_photo(np.asarray(im))
    for other in (b, c, d):
        assert np.array_equal(a.pixels, other.pixels)
    assert a.sha256 == b.sha256 and a.size == len(data)


def test_missing_file_and_bad_arrays(tmp_path):
    with pytest.raises(ImageError, match="cannot read"):
        load_photo(tmp_path / "nope.jpg")
    with pytest.raises(ImageError):
        load_photo(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ImageError):
        load_photo(np.zeros((4, 4, 4), dtype=np.uint8))
    with pytest.raises(ImageError):
        load_photo(12345)  # type: ignore[arg-type]


def test_non_utf8_file_name(tmp_path):
    name = b"caf\xe9-\xff.png"
    path = tmp_path.joinpath(name.decode("utf-8", "surrogateescape"))
    path.write_bytes(encode(rgb(), "PNG"))
    photo = load_photo(path)
    photo.name.encode("utf-8")  # printable, no surrogates
    assert photo.width == 32


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_fuzz_loader_only_raises_image_error(data):
    try:
        photo = load_photo(data)
    except ImageError:
        return
    assert photo.pixels.dtype == np.uint8 and photo.pixels.ndim == 3 and photo.pixels.shape[2] == 3


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**31), st.integers(0, 4000))
def test_fuzz_mutated_real_images(seed, position):
    data = bytearray(encode(rgb(48, 48, seed % 7), ("PNG", "JPEG", "GIF")[seed % 3]))
    rng = np.random.default_rng(seed)
    for _ in range(1 + seed % 8):
        data[min(position, len(data) - 1)] = int(rng.integers(0, 256))
        position = int(rng.integers(0, len(data)))
    try:
        load_photo(bytes(data))
    except ImageError:
        pass
