"""Face thumbnails: small JPEG pictures of faces, for people who look at the gallery (the operator console).

A thumbnail is the face's **aligned crop** (what the embedder reads: the face upright, eyes level), shrunk to
:data:`SIZE` x :data:`SIZE` pixels and saved as a JPEG of quality :data:`QUALITY` with no metadata: about 3 KB a
face. It is biometric data (a picture of a face, unlike a template, which is not a picture), so:

* what is kept is a **database setting** (``thumbnails``): ``off`` (none), ``enrolled`` (the default for new
  databases: one per template, so an operator can see whose photo was enrolled under a name and catch a wrong
  one) or ``all`` (also the probe of every photo decision in the audit trail, and the unknown visitors' faces
  when those are kept). Databases made before thumbnails existed keep ``off`` until told otherwise. Narrowing
  the setting erases the thumbnails it no longer covers.
* they live **in the SQLite store** (table ``thumbnails``), so encryption at rest covers them, and each belongs
  to exactly one template, audit record or kept unknown face, which SQLite's foreign keys delete it with:
  removing a person, a template, an audit record past its retention or a forgotten visitor erases its
  thumbnail in the same transaction. Removing a person also erases the thumbnails of the decisions that named
  them (the decisions stay).
* vectors added directly (no photo) have none.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from ..errors import InvalidInputError

#: What a database may keep: nothing, its templates' faces, or also probes and unknown visitors.
MODES = ("off", "enrolled", "all")
#: A new database's setting.
DEFAULT_MODE = "enrolled"
#: What a thumbnail can belong to.
KINDS = ("template", "probe", "visitor")
SIZE = 96
QUALITY = 80


def check_mode(value: object) -> str:
    """``value`` as a thumbnails setting (one of :data:`MODES`); InvalidInputError otherwise."""
    if value not in MODES:
        raise InvalidInputError(f"the thumbnails setting is one of {', '.join(MODES)}, got {value!r}")
    return str(value)


def keeps(mode: str, kind: str) -> bool:
    """Whether a database whose setting is ``mode`` keeps thumbnails of ``kind`` (one of :data:`KINDS`)."""
    return mode == "all" or (mode == "enrolled" and kind == "template")


def dropped(old: str, new: str) -> list[str]:
    """The kinds kept under ``old`` and no longer under ``new`` (to erase when the setting narrows)."""
    return [k for k in KINDS if keeps(old, k) and not keeps(new, k)]


def encode(crop: np.ndarray, size: int = SIZE) -> bytes:
    """A face crop ``(H, W, 3)`` uint8 RGB as a ``size`` x ``size`` JPEG (the centred square of the crop, no
    metadata). ``size`` is 16-512 pixels."""
    from PIL import Image

    if not 16 <= int(size) <= 512:
        raise InvalidInputError("a thumbnail is 16-512 pixels across")
    arr = np.asarray(crop)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 2 or arr.shape[1] < 2:
        raise InvalidInputError("a face crop is an (H, W, 3) image")
    h, w = arr.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    img = Image.fromarray(np.ascontiguousarray(arr[top:top + side, left:left + side]).astype(np.uint8), "RGB")
    img = img.resize((int(size), int(size)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=QUALITY, optimize=True)
    return buf.getvalue()


def of_crops(crops: Sequence[np.ndarray], mode: str, *kinds: str) -> list[bytes | None]:
    """A JPEG thumbnail of each aligned crop when the setting ``mode`` keeps any of ``kinds``, else Nones."""
    if not any(keeps(mode, k) for k in kinds):
        return [None] * len(crops)
    return [encode(c) for c in crops]
