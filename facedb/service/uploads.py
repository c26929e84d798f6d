"""Uploaded photos: bytes with a printable label, handed to the same loader (and hostile-input defences) as
files on disk (``facedb.faces.images.load_photo``)."""

from __future__ import annotations

import io
import os
from typing import Annotated

from fastapi import Form, UploadFile

from ..errors import ImageError, InvalidInputError

#: The ``cropped`` form field of every photo route (facedb.faces.pipeline.find_faces).
CroppedForm = Annotated[bool, Form(description="The photo is a face crop (a camera's own detection, a badge "
                                               "photo): padded before detection, and taken whole when no face "
                                               "is found in it (det_score 0).")]


def label(filename: str | None, fallback: str) -> str:
    """A short printable name for an upload: the client's file name without folders or control characters."""
    name = os.path.basename((filename or "").replace("\\", "/"))
    name = "".join(c for c in name if c.isprintable())[:200]
    return name or fallback


def read(upload: UploadFile, fallback: str = "photo", max_pixels: int | None = None) -> io.BytesIO:
    """The upload's bytes as a binary file object named after it (its name labels the per-photo report).
    ``max_pixels``: an image whose header declares more pixels is refused (ImageError, 400) before it is
    decoded (the decision routes: a door camera's photo, FACEDB_DECISION_MAX_PIXELS)."""
    data = upload.file.read()
    if not data:
        raise InvalidInputError(f"{label(upload.filename, fallback)}: empty upload")
    if max_pixels is not None:
        from ..faces.images import pixel_count

        pixels = pixel_count(data)
        if pixels is not None and pixels > max_pixels:
            raise ImageError(f"{label(upload.filename, fallback)}: {pixels:,} pixels is over the limit of "
                             f"{max_pixels:,} for a decision photo (FACEDB_DECISION_MAX_PIXELS)")
    buf = io.BytesIO(data)
    buf.name = label(upload.filename, fallback)  # type: ignore[misc]
    return buf
