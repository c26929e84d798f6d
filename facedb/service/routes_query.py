"""Decisions: identify (1:N), verify (1:1), detect. Scope ``identify``. Photos as multipart uploads, or vectors
as JSON for callers that embed themselves. Each decision is in the audit trail (by FaceDB) and may raise a
door event (webhooks), queued after the answer is made: delivery never delays it.

What a door's key (identify, without the ``candidates`` grant) may send and is told is :mod:`.disclosure`'s:
no per-call threshold, k = 1, one vector per call, the decision without scores."""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, File, Form, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from ..db import verify_rule
from ..errors import InvalidInputError, NoTemplatesError, PersonNotFoundError
from ..gallery.store import check_name
from ..records import Identification, Verification
from . import disclosure, uploads
from .auth import IDENTIFY, Caller
from .uploads import CroppedForm

router = APIRouter(prefix="/v1", tags=["decisions"])

#: The most candidates one answer lists: a bound on the work (and memory) one request can ask for.
MAX_K = 1000

KForm = Annotated[int | None, Form(ge=1, le=MAX_K, description="Candidates per face (top-k people); default 5. "
                                                               "Identify keys without the candidates grant: 1.")]
ThresholdForm = Annotated[float | None, Form(description="Cosine similarity to accept at, in [-1, 1]; default: "
                                                         "the database's stored policy. Enroll and admin keys "
                                                         "only: an identify key is refused (403).")]


class VectorIdentify(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vector: list[float] | None = Field(None, description="One probe: a unit vector of the database's dimension.")
    vectors: list[list[float]] | None = Field(None, description="Several probes, searched as one batch.")
    k: int | None = Field(None, ge=1, le=MAX_K, description="Candidates per probe; default 5. Identify keys "
                                                             "without the candidates grant: 1, one vector a call.")
    threshold: float | None = Field(None, description="Cosine similarity to accept at; default: the stored policy. "
                                                      "Enroll and admin keys only (identify keys: 403).")


class VectorVerify(BaseModel):
    model_config = ConfigDict(extra="forbid")
    person: str = Field(description="Who the probe is claimed to be.")
    vector: list[float] = Field(description="The probe: a unit vector of the database's dimension.")
    threshold: float | None = Field(None, description="Enroll and admin keys only (identify keys: 403).")


def _identified(caller: Caller, answer: Identification, extra: dict[str, Any]) -> None:
    data = {"identity": answer.identity, "external_id": answer.external_id, "similarity": answer.similarity,
            "threshold": answer.threshold, "rule": answer.rule, **extra}  # rule: which policy decided
    caller.publish("identify.match" if answer.identity is not None else "identify.unknown", data,
                   subject=answer.identity)


def _verified(caller: Caller, result: Verification, rule: str, enrolled: bool = True) -> None:
    """The door event; for a claim to a name with no templates (a door key's), no similarity was computed and
    the event says so (``enrolled: false``) instead of carrying a made-up score."""
    data: dict[str, Any] = {"person": result.name, "similarity": result.similarity if enrolled else None,
                            "threshold": result.threshold, "rule": rule}
    if not enrolled:
        data["enrolled"] = False
    caller.publish("verify.accept" if result.accepted else "verify.reject", data, subject=result.name)


def _verify(caller: Caller, probe: Any, person: str, threshold: float | None, **photo: Any) -> dict[str, Any]:
    """One 1:1 decision. A door key is told the same for a name that is not enrolled (or has no templates) as
    for a refused claim, and that claim is recorded and sent as a rejection like any other; keys told more get
    404 / 400 as before. The photo is read first either way, so "no face" (422) says nothing about the name.

    ``person`` is held to the store's name rules first (length, control and invisible characters, ...) and
    normalised (NFC) as the store does: a name that could never be enrolled is a 400 before anything is recorded
    or sent (a 5 MiB name was recorded, echoed and sent by webhook), and the answer echoes the normalised name
    whether or not it is enrolled (echoing it as sent for a stranger only told a door key who is enrolled)."""
    person = check_name(person)
    enrolled = True
    with caller as db:
        try:
            result = db.verify(probe, person, threshold, **photo)
        except (PersonNotFoundError, NoTemplatesError):
            if caller.key.full_answers:
                raise
            enrolled = False
            stored = db.settings().threshold
            db.note("verify", detail={"claimed": person, "rule": verify_rule(threshold), "enrolled": False})
            result = Verification(name=person, accepted=False, similarity=-1.0, distance=4.0, threshold=stored)
    _verified(caller, result, verify_rule(threshold), enrolled)
    return disclosure.verification(caller, result.to_dict())


@router.post("/identify", summary="Who is in this photo? One answer per face (identity null = unknown).")
def identify_photo(photo: Annotated[UploadFile, File(description="The photo (JPEG, PNG, ...).")],
                   caller: Annotated[Caller, Depends(IDENTIFY)], k: KForm = None,
                   threshold: ThresholdForm = None, cropped: CroppedForm = False) -> dict[str, Any]:
    disclosure.check_policy(caller, threshold)
    k = disclosure.check_reach(caller, k)
    source = uploads.read(photo, max_pixels=caller.state.settings.decision_max_pixels)
    with caller as db:
        faces = db.search(source, model=caller.state.photo_model(), k=k, threshold=threshold, name=source.name,
                          cropped=cropped)
        if not faces:  # FaceDB records one row per face: record the question that had none
            db.note("search", image_sha256=hashlib.sha256(source.getvalue()).hexdigest(), detail={"faces": 0})
    for face in faces:
        _identified(caller, face, {"box": face.box, "det_score": face.det_score})  # type: ignore[arg-type]
    return {"faces": [disclosure.identification(caller, f.to_dict()) for f in faces]}


@router.post("/identify/vector", summary="Who is this vector (or these vectors)? 1:N on your own embeddings.")
def identify_vector(body: VectorIdentify, caller: Annotated[Caller, Depends(IDENTIFY)]) -> dict[str, Any]:
    if (body.vector is None) == (body.vectors is None):
        raise InvalidInputError("give either 'vector' or 'vectors'")
    disclosure.check_policy(caller, body.threshold)
    k = disclosure.check_reach(caller, body.k, 1 if body.vectors is None else len(body.vectors))
    try:
        with np.errstate(over="ignore"):  # 1e39 becomes inf, which the unit-vector check then refuses
            probes = np.asarray(body.vectors if body.vectors is not None else [body.vector], dtype=np.float32)
    except ValueError:  # ragged lists
        probes = np.zeros(0, dtype=np.float32)
    if probes.ndim != 2:
        raise InvalidInputError("'vectors' must be a list of equally long lists of numbers")
    with caller as db:
        answers = db.identify(probes, k=k, threshold=body.threshold)
    assert isinstance(answers, list)
    for answer in answers:
        _identified(caller, answer, {})
    return {"results": [disclosure.identification(caller, a.to_dict()) for a in answers]}


@router.post("/verify", summary="Is this photo the claimed person? 1:1 on the photo's largest face.")
def verify_photo(photo: Annotated[UploadFile, File(description="The photo; its largest face is used.")],
                 person: Annotated[str, Form(description="Who the photo is claimed to be.")],
                 caller: Annotated[Caller, Depends(IDENTIFY)], threshold: ThresholdForm = None,
                 cropped: CroppedForm = False) -> dict[str, Any]:
    disclosure.check_policy(caller, threshold)
    source = uploads.read(photo, max_pixels=caller.state.settings.decision_max_pixels)
    return _verify(caller, source, person, threshold, model=caller.state.photo_model(), cropped=cropped)


@router.post("/verify/vector", summary="Is this vector the claimed person? 1:1 on your own embeddings.")
def verify_vector(body: VectorVerify, caller: Annotated[Caller, Depends(IDENTIFY)]) -> dict[str, Any]:
    disclosure.check_policy(caller, body.threshold)
    with np.errstate(over="ignore"):
        vector = np.asarray(body.vector, dtype=np.float32)
    return _verify(caller, vector, body.person, body.threshold)


@router.post("/detect", summary="Faces in a photo: box, detector score, 5 landmarks (no identification).")
def detect(photo: Annotated[UploadFile, File(description="The photo.")],
           caller: Annotated[Caller, Depends(IDENTIFY)], cropped: CroppedForm = False) -> dict[str, Any]:
    source = uploads.read(photo, max_pixels=caller.state.settings.decision_max_pixels)
    with caller as db:
        faces = db.detect(source, model=caller.state.photo_model(), name=source.name, cropped=cropped)
        db.note("detect", detail={"faces": len(faces)})
    return {"faces": [{"box": [round(float(c), 1) for c in f.box], "det_score": round(float(f.score), 4),
                       "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in f.landmarks]}
                      for f in faces]}
