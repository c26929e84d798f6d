"""A photo looked at before it is enrolled: the faces found (box, score, landmarks), each face's quality
(:mod:`facedb.faces.quality`: the floors measured in the accuracy work), whether the photo is already enrolled, and
what enrolment would do with it. Nothing is stored; the photo is not embedded (that is the enrolment's work).

The verdict is enrolment's own rule (:func:`facedb.faces.pipeline.choose_face` with ``on_multiple``): ``ok`` (one face,
or the largest under ``largest``), ``no face``, ``several faces`` or ``duplicate`` (the same bytes are enrolled,
as someone); quality problems are warnings, since enrolment does not refuse on them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import InvalidInputError
from ..records import FaceCheck, PhotoCheck
from . import quality
from .pipeline import FaceChoice, choose_face, face_choice

if TYPE_CHECKING:
    from .images import PhotoSource
    from .pipeline import FacePipeline


def check_photo(pipe: FacePipeline, photo: PhotoSource, owner_of: Callable[[str], str | None], *,
                name: str | None = None, on_multiple: str = "error") -> PhotoCheck:
    """What enrolling ``photo`` would meet (see the module docstring); ``owner_of(sha256)`` names the person a
    photo with those bytes is enrolled as, or None. ImageError for an unreadable photo."""
    choice = face_choice(on_multiple)
    if choice not in (FaceChoice.ERROR, FaceChoice.LARGEST, FaceChoice.SKIP):
        raise InvalidInputError("on_multiple is error, largest or skip")
    analysed = pipe.analyse(photo, name=name)
    p = analysed.photo
    owner = owner_of(p.sha256)
    crops = analysed.crops(pipe.embedder.align)
    faces = [FaceCheck(box=[round(float(c), 1) for c in f.box], det_score=round(float(f.score), 4),
                       landmarks=[[round(float(x), 1), round(float(y), 1)] for x, y in f.landmarks],
                       problems=quality.measure(crop, f.box, f.score, f.landmarks).problems)
             for f, crop in zip(analysed.faces, crops)]
    chosen = choose_face(analysed.faces, choice, p.width, p.height)
    if owner is not None:
        verdict, reason, index = "duplicate", f"already enrolled (as {owner!r})", None
    elif isinstance(chosen, str):
        verdict = "no face" if not analysed.faces else "several faces"
        reason, index = chosen, None
    else:
        verdict, reason, index = "ok", "", analysed.faces.index(chosen)
    warnings = list(faces[index].problems) if index is not None else []
    return PhotoCheck(image=p.name, sha256=p.sha256, width=p.width, height=p.height, faces=faces,
                      verdict=verdict, reason=reason, chosen=index, enrolled_as=owner, warnings=warnings)
