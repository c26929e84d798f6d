"""People and their templates: create, list (paged), show, update, rename, remove (erasure); enrol photos
(multipart, several at once, one transaction each, the CLI's per-photo report) or vectors; list and remove
templates. Scope ``enroll``."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Path, Query, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from ..choices import OnMultiple, OnOtherMatch
from ..errors import InvalidInputError, NoFaceError, NotFoundError
from . import uploads
from .auth import ENROLL, Caller
from .uploads import CroppedForm

router = APIRouter(prefix="/v1", tags=["people"])

#: The most people one page lists.
MAX_PAGE = 1000


class NewPerson(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Unique name (compared in Unicode NFC).")
    external_id: str | None = Field(None, description="Your system's id for them (unique).")
    metadata: dict[str, Any] | None = Field(None, description="Any JSON object (badge, department...).")


class PersonUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metadata: dict[str, Any] | None = Field(None, description="Merged into the stored metadata; a key set to "
                                                              "null is deleted.")
    replace_metadata: bool = Field(False, description="Replace all metadata with 'metadata' instead of merging.")
    external_id: str | None = None
    clear_external_id: bool = False


class Rename(BaseModel):
    model_config = ConfigDict(extra="forbid")
    new_name: str


class Vectors(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vectors: list[list[float]] = Field(description="Unit vectors of the database's dimension, from its model.")
    create: bool = Field(True, description="Create the person if they do not exist yet.")


class NothingEnrolled(NoFaceError):
    """No photo of an enrolment request could be enrolled (each photo's reason is in ``report``)."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


@router.get("/people", summary="List people in name order, paged; 'query' keeps names or external ids "
            "containing it, case- and accent-insensitively (docs/cli.md: names' order and search).")
def list_people(caller: Annotated[Caller, Depends(ENROLL)], query: str | None = None,
                limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
                offset: Annotated[int, Query(ge=0)] = 0) -> dict[str, Any]:
    with caller as db:
        people = db.people(query, limit=limit, offset=offset)
        total = db.count_people(query)
        covers = db.cover_templates([p.name for p in people])
        db.note("read-people", detail={"query": query, "limit": limit, "offset": offset})
    return {"people": [{**p.to_dict(), "thumbnail_template": covers.get(p.name)} for p in people], "total": total,
            "limit": limit, "offset": offset}


@router.post("/people", status_code=201, summary="Create a person with no templates yet.")
def create_person(body: NewPerson, caller: Annotated[Caller, Depends(ENROLL)]) -> dict[str, Any]:
    with caller as db:
        return db.add_person(body.name, external_id=body.external_id, metadata=body.metadata).to_dict()


@router.get("/people/{name:path}/templates", summary="A person's templates (vectors only if asked).")
def list_templates(name: str, caller: Annotated[Caller, Depends(ENROLL)], vectors: bool = False) -> dict[str, Any]:
    with caller as db:
        person = db.person(name)
        rows = []
        for t in db.templates(person.name):
            row = t.to_dict()
            if not vectors:
                row.pop("vector")
            rows.append(row)
        with_thumbnail = db.store.thumbnail_owners("template", [r["id"] for r in rows])
        for row in rows:
            row["has_thumbnail"] = row["id"] in with_thumbnail
        db.note("read-templates", identity=person.name, detail={"vectors": vectors})
    return {"person": person.name, "templates": rows}


@router.post("/people/{name:path}/templates", summary="Enrol photos of a person (created if new): one face per "
                                                      "photo, one transaction per photo, a report per photo.")
def enroll_photos(name: str, photos: Annotated[list[UploadFile], File(description="One or more photos.")],
                  caller: Annotated[Caller, Depends(ENROLL)],
                  on_multiple: Annotated[OnMultiple, Form(description="A photo with several faces: error (skip "
                                                                      "it), largest, or skip.")] = OnMultiple.error,
                  on_other_match: Annotated[OnOtherMatch, Form(description="A face matching another person: "
                                                                           "warn, refuse or allow.")]
                  = OnOtherMatch.warn,
                  create: Annotated[bool, Form(description="Create the person if new.")] = True,
                  metadata: Annotated[str | None, Form(description="JSON object of metadata for a new person.")]
                  = None, cropped: CroppedForm = False) -> JSONResponse:
    meta = _json_object(metadata)
    sources = [uploads.read(p, f"photo-{i + 1}") for i, p in enumerate(photos)]
    with caller as db:
        if not create:
            db.person(name)  # PersonNotFoundError (404) before any photo is looked at
        report = db.enroll(name, sources, model=caller.state.photo_model(), on_multiple=on_multiple.value,
                           on_other_match=on_other_match.value, metadata=meta, workers=0,
                           cropped=cropped)
        if not report.faces_stored:  # FaceDB records each stored photo: record the request that stored none
            db.note("enroll-skipped", identity=name, detail={"photos": report.photos,
                                                             "reasons": [s.reason for s in report.skipped][:20]})
    out = report.to_dict()
    if report.faces_stored:
        caller.publish("person.enrolled", {"person": report.people[0], "faces_stored": report.faces_stored,
                                           "template_ids": report.template_ids}, subject=report.people[0])
        return JSONResponse(out, status_code=201)
    if report.only_known:
        return JSONResponse(out, status_code=200)
    first = report.skipped[0] if report.skipped else None
    reason = "" if first is None else first.reason if first.reason.startswith(first.image) else \
        f"{first.image}: {first.reason}"
    raise NothingEnrolled(f"no photo was enrolled ({reason})" if reason else "no photo was enrolled", out)


@router.post("/people/{name:path}/vectors", status_code=201,
             summary="Enrol your own vectors for a person (one transaction: all or nothing).")
def enroll_vectors(name: str, body: Vectors, caller: Annotated[Caller, Depends(ENROLL)]) -> dict[str, Any]:
    import numpy as np

    try:
        with np.errstate(over="ignore"):
            vectors = np.asarray(body.vectors, dtype=np.float32)
    except ValueError:
        raise InvalidInputError("'vectors' must be a list of equally long lists of numbers") from None
    if vectors.ndim != 2 or not len(vectors):
        raise InvalidInputError("'vectors' must be a non-empty list of vectors")
    with caller as db:
        ids = db.add_templates(name, vectors, create=body.create)
        person = db.person(name)
        db.note("add-templates", identity=person.name, detail={"templates": len(ids)})
    caller.publish("person.enrolled", {"person": person.name, "faces_stored": len(ids), "template_ids": ids},
                   subject=person.name)
    return {"person": person.name, "template_ids": ids}


@router.post("/people/{name:path}/rename", summary="Rename a person.")
def rename_person(name: str, body: Rename, caller: Annotated[Caller, Depends(ENROLL)]) -> dict[str, Any]:
    with caller as db:
        return db.rename_person(name, body.new_name).to_dict()


@router.get("/people/{name:path}", summary="One person: metadata, external id, template and photo counts.")
def show_person(name: str, caller: Annotated[Caller, Depends(ENROLL)]) -> dict[str, Any]:
    with caller as db:
        person = db.person(name)
        db.note("read-person", identity=person.name)
    return person.to_dict()


@router.patch("/people/{name:path}", summary="Change a person's metadata or external id.")
def update_person(name: str, body: PersonUpdate, caller: Annotated[Caller, Depends(ENROLL)]) -> dict[str, Any]:
    if body.metadata is None and not body.replace_metadata and body.external_id is None \
            and not body.clear_external_id:
        raise InvalidInputError("nothing to change: give metadata, replace_metadata, external_id or "
                                "clear_external_id")
    if body.external_id is not None and body.clear_external_id:
        raise InvalidInputError("give external_id or clear_external_id, not both")
    with caller as db:
        metadata = body.metadata if body.metadata is not None else ({} if body.replace_metadata else None)
        return db.update_person(name, metadata=metadata, replace_metadata=body.replace_metadata,
                                external_id=body.external_id, clear_external_id=body.clear_external_id).to_dict()


@router.delete("/people/{name:path}", summary="Erase a person: templates, photos' records and metadata, from the "
                                              "store and the index.")
def remove_person(name: str, caller: Annotated[Caller, Depends(ENROLL)]) -> dict[str, Any]:
    with caller as db:
        person = db.person(name)
        removed = db.remove_person(person.name)
    caller.publish("person.removed", {"person": person.name, "templates": removed}, subject=person.name)
    return {"removed": person.name, "templates": removed}


@router.post("/photos/check", summary="Look at a photo before enrolling it: faces, quality problems, whether it is "
                                     "enrolled already, and the verdict enrolment would reach. Stores nothing.")
def check_photo(photo: Annotated[UploadFile, File(description="The photo.")],
                caller: Annotated[Caller, Depends(ENROLL)],
                on_multiple: Annotated[OnMultiple, Form()] = OnMultiple.error) -> dict[str, Any]:
    source = uploads.read(photo)
    with caller as db:
        result = db.check_photo(source, model=caller.state.photo_model(), name=source.name,
                                on_multiple=on_multiple.value)
        db.note("check-photo", identity=result.enrolled_as, image_sha256=result.sha256,
                detail={"faces": len(result.faces), "verdict": result.verdict})
    return result.to_dict()


@router.get("/templates/{template_id}/thumbnail", summary="A template's face thumbnail (JPEG), where the database "
                                                          "keeps them.", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}}})
def template_thumbnail(template_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
                       caller: Annotated[Caller, Depends(ENROLL)]) -> Response:
    return thumbnail_response(caller, "template", template_id)


def thumbnail_response(caller: Caller, kind: str, owner_id: int, *, note: bool = True) -> Response:
    """The JPEG kept for a template, audit record or unknown face, or NotFoundError. Never cached by the
    browser (biometric data). ``note``: record the read (a page that listed them has recorded its own)."""
    with caller as db:
        jpeg = db.thumbnail(kind, owner_id)
        if jpeg is None:
            raise NotFoundError(f"no thumbnail is kept for {kind} {owner_id}")
        if note:
            db.note("read-thumbnail", detail={kind: owner_id})
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, no-store"})


@router.delete("/templates/{template_id}", summary="Erase one template (a wrong photo); the person stays.")
def remove_template(template_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
                    caller: Annotated[Caller, Depends(ENROLL)]) -> dict[str, Any]:
    with caller as db:
        person = db.remove_template(template_id)
    return {"removed_template": template_id, "person": person}


def _json_object(text: str | None) -> dict[str, Any] | None:
    if text is None or not text.strip():
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise InvalidInputError("metadata must be a JSON object") from None
    if not isinstance(value, dict):
        raise InvalidInputError("metadata must be a JSON object")
    return value
