"""Recognition requests from probe to recorded decision: identify (vectors), search (every face of a photo) and
verify (1:1, a vector or a photo).

Each embeds what it was given (the database's face pipeline, its flip setting), projects it as the database
stores templates (cancellable databases), asks the gallery's query room (:mod:`facedb.gallery.query`), records
every decision in the audit trail (:mod:`facedb.operations.audit`) and keeps faces answered unknown for the
visitor log (:mod:`facedb.operations.visitors`) when that is on. ``FaceDB.identify``/``search``/``verify`` call
these; moved out of ``db.py`` as they were.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import timings
from ..errors import ModelChangedError, ModelMismatchError, NoFaceError
from ..gallery import thumbnails
from ..gallery.query import verify_rule
from ..gallery.scores import as_unit_rows
from ..gallery.settings import check_k, check_threshold
from ..records import FaceMatch, Identification, Verification

if TYPE_CHECKING:
    from ..db import FaceDB
    from ..faces.images import PhotoSource
    from ..faces.pipeline import FacePipeline


def pipeline_for(db: FaceDB, model: FacePipeline | None, weights: Path | None) -> FacePipeline:
    """:meth:`facedb.FaceDB.pipeline`: ``model`` if given (checked; its detector is used, which is how a call picks
    another detector), the one given at open, else the process-wide one for the database's model and detector
    (loaded once, with ``weights`` or the weights given at open). ModelMismatchError for another model's pipeline."""
    model = model or db._model
    if model is None:
        from ..faces.pipeline import DetectorSettings, check_detector, get_pipeline

        detector = check_detector(db.settings().detector)  # a hand-edited setting: a clear error
        model = get_pipeline(db.model_id, weights=weights or db._weights, settings=DetectorSettings(detector=detector))
    if model.model_id != db.model_id:
        raise ModelMismatchError(
            f"this database holds {db.model_id!r} embeddings; the model given is {model.model_id!r}")
    return model


def identify(db: FaceDB, vectors: object, k: int, threshold: float | None) -> Identification | list[Identification]:
    """:meth:`facedb.FaceDB.identify`: who is this? For a unit vector ``(dim,)`` one Identification, for ``(n, dim)``
    a list (InvalidVectorError for anything else). Each holds the top-``k`` people by their best template
    similarity (cosine; higher is more similar; fewer than ``k`` when fewer people exist) and the decision: the
    best person if they pass the rule in force (with ``threshold`` given: similarity ``>= threshold``), else
    unknown (``identity is None``). The whole batch goes to the index as one search; each decision is recorded
    (``identify``) with the rule that decided, and unknown faces are kept for the visitor log when it is on."""
    single = np.ndim(vectors) == 1
    x = db._protect(as_unit_rows(vectors, db.dim))
    out, settings = db.query.identify(x, k, threshold)
    db.trail.record("identify", [  # the rule: which policy decided (a per-call threshold is "given")
        {"identity": a.identity, "similarity": a.similarity, "threshold": a.threshold, "vector": v,
         "detail": {"rule": a.rule}} for a, v in zip(out, x)], settings)
    db.visitor_log.keep([{"identity": a.identity, "similarity": a.similarity, "vector": v}
                         for a, v in zip(out, x)], settings)
    return out[0] if single else out


def verify(db: FaceDB, probe: object, name: str, threshold: float | None, model: FacePipeline | None,
           cropped: bool) -> Verification:
    """:meth:`facedb.FaceDB.verify`: a unit vector ``(dim,)`` or a photo (its largest face; NoFaceError without
    one) against ``name``'s photo templates, recorded (``verify``) with the claim and the rule."""
    threshold = None if threshold is None else check_threshold(threshold)
    sha = made_by = None
    if isinstance(probe, np.ndarray) and probe.ndim == 1:
        x = as_unit_rows(probe, db.dim)
    else:
        pipe = db.pipeline(model)
        analysed = pipe.analyse(probe, cropped=cropped)  # type: ignore[arg-type]
        if not analysed.faces:
            raise NoFaceError(f"{analysed.photo.name}: no face found")
        face = max(analysed.faces, key=lambda f: f.area)
        with timings.stage("embed"):
            x = pipe.embed_faces(analysed, [face], flip=db.flip)
        sha, made_by = analysed.photo.sha256, pipe.model_id
    x = db._protect(x)
    with db._lock:
        result, settings, thr = db.query.verify(x[0], name, threshold, made_by)
        db.trail.record("verify", [{"image_sha256": sha, "identity": result.name if result.accepted else None,
                                    "similarity": result.similarity, "threshold": thr,
                                    "detail": {"claimed": result.name, "rule": verify_rule(threshold)},
                                    "vector": x[0]}], settings)
    return result


def search(db: FaceDB, photo: PhotoSource, model: FacePipeline | None, k: int, threshold: float | None,
           name: str | None, cropped: bool) -> list[FaceMatch]:
    """:meth:`facedb.FaceDB.search`: identify every face of a photo (one FaceMatch each, none without faces); each
    decision recorded (``search``) with its box and, where the thumbnail setting keeps them, the face's thumbnail.
    Asked a second time when the database moved to another model while the photo was embedded."""
    check_k(k)
    threshold = None if threshold is None else check_threshold(threshold)
    for attempt in (1, 2):  # a second time only when the database moved to another model meanwhile
        pipe = db.pipeline(model)
        analysed = pipe.analyse(photo, name=name, cropped=cropped)
        if not analysed.faces:
            return []
        crops = analysed.crops(pipe.embedder.align)
        with timings.stage("embed"):  # a query photo's faces, one batch (enrolment's are not timed here)
            vectors = db._protect(pipe.embed_crops(crops, flip=db.flip))
        try:
            answers, settings = db.query.identify(vectors, k, threshold, made_by=pipe.model_id)
            break
        except ModelChangedError:
            if attempt == 2 or hasattr(photo, "read"):  # a file object cannot be read twice
                raise
    thumbs = thumbnails.of_crops(crops, settings.thumbnails, "probe", "visitor")
    db.trail.record("search", [
        {"image_sha256": analysed.photo.sha256, "identity": a.identity, "similarity": a.similarity,
         "threshold": a.threshold, "detail": {"box": [round(c, 1) for c in face.box], "rule": a.rule},
         "vector": v,
         "thumbnail": t} for face, a, v, t in zip(analysed.faces, answers, vectors, thumbs)], settings)
    db.visitor_log.keep([{"identity": a.identity, "similarity": a.similarity, "vector": v,
                          "image_sha256": analysed.photo.sha256, "box": face.box, "det_score": face.score,
                          "thumbnail": t}
                         for face, a, v, t in zip(analysed.faces, answers, vectors, thumbs)], settings)
    return [FaceMatch(image=analysed.photo.name, box=[round(c, 1) for c in face.box],
                      det_score=round(face.score, 4), identity=a.identity, similarity=a.similarity,
                      distance=a.distance, threshold=a.threshold, candidates=a.candidates,
                      external_id=a.external_id, rule=a.rule, score=a.score,
                      score_threshold=a.score_threshold)
            for face, a in zip(analysed.faces, answers)]
