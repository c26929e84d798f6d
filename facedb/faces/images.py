"""Loading photos: path, bytes, binary file object, PIL image or HWC uint8 RGB array -> RGB uint8 array +
provenance. Every form gives the same pixels for the same picture.

Refusals are ImageError naming the file and saying why: not an image, truncated, more pixels than
``max_pixels`` (decompression bombs; checked from the header, before decoding), or a pixel format whose
brightness scale cannot be known. EXIF orientation is applied, to PIL images too. Conversions to 8-bit RGB:
greyscale, palette, RGBA / LA / PA (composited over white), CMYK, YCbCr, HSV as Pillow converts them; 16-bit
and 32-bit integer greyscale scaled from their range (0..65535 when any value passes 255); 32-bit float
greyscale read as 0..1 when every value lies in [0, 1], else as 0..255 when every value lies there (anything
else is refused); LAB is refused (no conversion without a colour profile). An animated image gives its first frame.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps

from ..environment import number
from ..errors import ImageError

#: Default pixel cap (width x height); the FACEDB_MAX_PIXELS setting overrides it.
DEFAULT_MAX_PIXELS = 50_000_000
#: Files larger than this are refused before being read (a 50 MP JPEG is ~30 MB).
MAX_FILE_BYTES = 200 * 1024 * 1024

#: Photo file name endings (case-insensitive) that folder listings pick up (``enroll --folder``, ``eval``,
#: ``calibrate``, ``cluster``): formats Pillow reads. Other files in a photo folder (notes.txt, Thumbs.db) are
#: ignored with a note; a photo named explicitly is read whatever its name.
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")

PhotoSource = Union[str, os.PathLike, bytes, BinaryIO, "Image.Image", np.ndarray]


@dataclass(frozen=True)
class Photo:
    """A decoded photo: ``pixels`` is (H, W, 3) uint8 RGB. ``sha256`` identifies the source bytes."""

    pixels: np.ndarray
    sha256: str
    name: str
    size: int

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    def record(self) -> dict[str, object]:
        """The store's row for this image."""
        return {"sha256": self.sha256, "path": self.name, "size": self.size,
                "width": self.width, "height": self.height}


def max_pixels() -> int:
    """The largest photo decoded, in pixels (FACEDB_MAX_PIXELS; InvalidInputError for a value that is not a
    whole number >= 1)."""
    return int(number("FACEDB_MAX_PIXELS", DEFAULT_MAX_PIXELS, minimum=1, integer=True))


def display_name(path: str | os.PathLike[str]) -> str:
    """A printable file name, even for names that are not valid UTF-8."""
    return os.fsdecode(path).encode("utf-8", "backslashreplace").decode("utf-8")


def is_regular_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is (or links to) a regular file. Devices (``/dev/zero``), FIFOs and sockets are not:
    reading them may never end or never fill, so they are refused before being opened."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def is_photo_name(name: str | os.PathLike[str]) -> bool:
    """Whether a file of this name is taken as a photo by folder listings: not hidden (a dot-file such as
    .DS_Store) and ending in one of :data:`PHOTO_SUFFIXES`."""
    base = os.path.basename(os.fsdecode(name))
    return not base.startswith(".") and base.lower().endswith(PHOTO_SUFFIXES)


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    """8-bit RGB, or ImageError saying why a mode cannot be converted faithfully."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        if arr.size and arr.min() < 0:
            raise ImageError(f"{name}: 32-bit integer pixels with negative values: no brightness scale to read")
        top = 255.0 if not arr.size or arr.max() <= 255 else 65535.0
        if arr.size and arr.max() > 65535:
            raise ImageError(f"{name}: 32-bit integer pixels above 65535: no brightness scale to read")
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ImageError(f"{name}: floating-point pixels with NaN or infinity")
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < 0 or hi > 255:
            raise ImageError(f"{name}: floating-point pixels outside [0, 255] ({lo:g} to {hi:g}): no brightness "
                             "scale to read")
        scale = 255.0 if hi <= 1.0 else 1.0  # [0, 1] is the usual float convention
        im = Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "LAB":
        raise ImageError(f"{name}: CIELAB pixels cannot be converted to RGB without a colour profile")
    if im.mode in ("RGBa", "La"):  # premultiplied alpha: Pillow converts these only to their plain forms
        im = im.convert("RGBA" if im.mode == "RGBa" else "LA")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return im.convert("RGB")


def _oriented(im: Image.Image) -> Image.Image:
    """``im`` turned upright by its EXIF Orientation (a corrupt EXIF block leaves the pixels as stored)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ImageOps.exif_transpose(im) or im
    except Exception:
        return im


def pixel_count(data: bytes) -> int | None:
    """Width x height an encoded image declares in its header, without decoding its pixels; None when the header
    cannot be read (the decoder then says why). For refusing a photo over a limit before it costs anything."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w, h = Image.open(io.BytesIO(data)).size
        return int(w) * int(h)
    except Exception:
        return None


def _decode(data: bytes, name: str, cap: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w < 1 or h < 1:
                raise ImageError(f"{name}: image has no pixels")
            if w * h > cap:
                raise ImageError(
                    f"{name}: {w}x{h} pixels is over the limit of {cap} (FACEDB_MAX_PIXELS; decompression bomb?)"
                )
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            im.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: more pixels than PIL's own limit, over the limit for a photo; refused") from None
    except Image.UnidentifiedImageError:  # its message names the in-memory buffer (an address), not the file
        raise ImageError(f"{name}: not a readable image (not a format Pillow can read, or broken)") from None
    except Exception as exc:  # PIL raises many types for broken files; all mean "not a usable image"
        raise ImageError(f"{name}: not a readable image ({type(exc).__name__}: {exc})") from None
    im = _oriented(im)
    try:
        return np.ascontiguousarray(np.asarray(_to_rgb(im, name), dtype=np.uint8))
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"{name}: cannot convert to RGB ({type(exc).__name__}: {exc})") from None


def load_photo(source: PhotoSource, *, name: str | None = None, cap: int | None = None) -> Photo:
    """Decode ``source`` into a Photo, or raise ImageError naming it."""
    cap = max_pixels() if cap is None else cap
    if isinstance(source, np.ndarray):
        arr = source
        label = name or "<array>"
        if arr.dtype != np.uint8 or not ((arr.ndim == 3 and arr.shape[2] == 3) or arr.ndim == 2):
            raise ImageError(f"{label}: arrays must be HxWx3 (RGB) or HxW uint8, got {arr.dtype} {arr.shape}")
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.shape[0] * arr.shape[1] > cap or 0 in arr.shape:
            raise ImageError(f"{label}: {arr.shape[1]}x{arr.shape[0]} pixels is not accepted")
        arr = np.ascontiguousarray(arr)
        return Photo(arr, hashlib.sha256(arr.tobytes()).hexdigest(), label, arr.nbytes)
    if isinstance(source, Image.Image):
        label = name or "<PIL image>"
        if source.size[0] * source.size[1] > cap:
            raise ImageError(f"{label}: {source.size[0]}x{source.size[1]} pixels is over the limit of {cap}")
        try:
            arr = np.ascontiguousarray(np.asarray(_to_rgb(_oriented(source), label), dtype=np.uint8))
        except ImageError:
            raise
        except Exception as exc:
            raise ImageError(f"{label}: cannot convert to RGB ({type(exc).__name__}: {exc})") from None
        return Photo(arr, hashlib.sha256(arr.tobytes()).hexdigest(), label, arr.nbytes)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = name or "<bytes>"
    elif hasattr(source, "read"):  # a binary file object (an upload, an open file)
        own = getattr(source, "name", None)
        label = name or (display_name(own) if isinstance(own, (str, bytes)) and own else "<file>")
        try:
            data = source.read(MAX_FILE_BYTES + 1)
        except (OSError, ValueError) as exc:
            raise ImageError(f"{label}: cannot read ({exc})") from None
        if not isinstance(data, bytes):
            raise ImageError(f"{label}: not a binary file (open it with 'rb')")
        if len(data) > MAX_FILE_BYTES:
            raise ImageError(f"{label}: file is larger than {MAX_FILE_BYTES} bytes")
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = name or display_name(path)
        try:
            info = path.stat()  # follows symlinks: a link to a photo is fine
            if not stat.S_ISREG(info.st_mode):
                raise ImageError(f"{label}: not a regular file (a device, FIFO, socket or folder is not read)")
            if info.st_size > MAX_FILE_BYTES:
                raise ImageError(f"{label}: file is larger than {MAX_FILE_BYTES} bytes")
            data = path.read_bytes()
        except ImageError:
            raise
        except OSError as exc:
            raise ImageError(f"{label}: cannot read ({exc.strerror or exc})") from None
    else:
        raise ImageError(f"cannot load a photo from {type(source).__name__}")
    if not data:
        raise ImageError(f"{label}: empty file")
    pixels = _decode(data, label, cap)
    return Photo(pixels, hashlib.sha256(data).hexdigest(), label, len(data))
