"""People and their templates: the gallery's writes that ``FaceDB`` offers one by one (add, rename, update,
remove, merge a person; add or remove templates), each recorded in the audit trail, removals erased from every
file (:mod:`facedb.operations.erasure`), the index brought level after each write.

Vectors arrive as unit rows of the database's dimension (:func:`facedb.gallery.scores.as_unit_rows`:
InvalidVectorError otherwise) and are stored as the database compares them (projected when it is cancellable).
``FaceDB`` calls these under its lock; moved out of ``db.py`` as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import PersonNotFoundError
from ..gallery.scores import as_unit_rows
from ..gallery.settings import check_count
from ..gallery.store import normalise_name
from ..gallery.thumbnails import keeps as keeps_thumbnails
from ..records import Person
from . import erasure

if TYPE_CHECKING:
    from ..db import FaceDB


def _record(db: FaceDB, operation: str, rows: list[dict[str, Any]]) -> None:
    db.trail.record(operation, rows, db.settings())


def people(db: FaceDB, query: str | None, limit: int | None, offset: int) -> list[Person]:
    """:meth:`facedb.FaceDB.people`: people in name order (:func:`facedb.gallery.store.name_sort_key`: base letters
    case- and accent-insensitively, then accents, then case); ``query`` keeps names or external ids containing it,
    case- and accent-insensitively ("jose" finds "José"); paged by ``limit`` (>= 1) and ``offset`` (>= 0;
    InvalidInputError otherwise)."""
    limit = None if limit is None else check_count(limit, "limit", 1)
    offset = check_count(offset, "offset")
    with db._lock:
        return db.store.people(query, limit, offset)


def add_person(db: FaceDB, name: str, external_id: str | None, metadata: dict[str, Any] | None) -> Person:
    """A new person with no templates (DuplicatePersonError, InvalidInputError), recorded as ``add-person``."""
    person = db.store.add_person(name, external_id, metadata)
    _record(db, "add-person", [{"identity": person.name}])
    return person


def rename(db: FaceDB, old: str, new: str) -> Person:
    """Rename ``old`` to ``new`` (PersonNotFoundError, DuplicatePersonError), recorded as ``rename``."""
    person = db.store.rename_person(old, new)
    _record(db, "rename", [{"identity": person.name, "detail": {"from": normalise_name(old)}}])
    return person


def update(db: FaceDB, name: str, metadata: dict[str, Any] | None, replace_metadata: bool,
           external_id: str | None, clear_external_id: bool) -> Person:
    """:meth:`facedb.FaceDB.update_person`, recorded as ``update``."""
    person = db.store.update_person(name, metadata=metadata, replace=replace_metadata,
                                    external_id=external_id, clear_external_id=clear_external_id)
    _record(db, "update", [{"identity": person.name}])
    return person


def remove(db: FaceDB, name: str) -> int:
    """Erase a person and their templates, images, metadata and thumbnails; returns the templates removed."""
    with erasure.erasing(db):
        ids = db.store.remove_person(name)
    _record(db, "remove", [{"identity": normalise_name(name), "detail": {"templates": len(ids)}}])
    return len(ids)


def merge(db: FaceDB, source: str, target: str) -> int:
    """Move ``source``'s templates and photos to ``target`` and erase ``source``; returns the templates moved."""
    with erasure.erasing(db):
        ids = db.store.merge_people(source, target)
    _record(db, "merge", [{"identity": normalise_name(target),
                           "detail": {"from": normalise_name(source), "templates": len(ids)}}])
    return len(ids)


def remove_template(db: FaceDB, template_id: int) -> str:
    """Erase one template; returns its person's name (they stay enrolled). NotFoundError if there is none."""
    with erasure.erasing(db):
        name = db.store.remove_template(template_id)
    _record(db, "remove-template", [{"identity": name, "detail": {"template": int(template_id)}}])
    return name


def _checked(db: FaceDB, vectors: object, model_id: str | None) -> np.ndarray:
    """``vectors`` as stored: unit rows ``(n, dim)``, projected when the database is cancellable; ``model_id``, when
    given, must be the database's (ModelMismatchError)."""
    if model_id is not None:
        db._same_model(model_id, np.shape(vectors)[-1] if np.ndim(vectors) else db.dim)
    return db._protect(as_unit_rows(vectors, db.dim))


def add_templates(db: FaceDB, name: str, vectors: object, *, model_id: str | None = None,
                  boxes: Sequence[Sequence[float] | None] | None = None,
                  det_scores: Sequence[float | None] | None = None, image: dict[str, Any] | None = None,
                  create: bool = False, metadata: dict[str, Any] | None = None, external_id: str | None = None,
                  thumbnails: Sequence[bytes | None] | None = None, made_by: str | None = None) -> list[int]:
    """:meth:`facedb.FaceDB.add_templates` without its audit record (enrolment records its own): unit vectors
    ``(dim,)`` or ``(n, dim)`` stored as templates of ``name`` in one transaction (all or nothing); returns their
    ids. ``model_id``, when given, must be the database's (ModelMismatchError). ``create``: the person is created
    if missing (PersonNotFoundError otherwise), with ``metadata`` and ``external_id``. ``boxes``, ``det_scores``,
    ``image``: where each face was found, and the photo's row. ``thumbnails``: a face JPEG (or None) per vector,
    kept if the database keeps enrolled thumbnails. ``made_by``: the model that embedded the photos, checked in
    the store's transaction (ModelChangedError after a move)."""
    x = _checked(db, vectors, model_id)
    if thumbnails is not None and not keeps_thumbnails(db.settings().thumbnails, "template"):
        thumbnails = None
    ids = db.store.add_templates(name, x, boxes=boxes, det_scores=det_scores, image=image,
                                 create_person=create, metadata=metadata, external_id=external_id,
                                 thumbnails=thumbnails, model_id=made_by)
    db.keeper.after_write(db.settings())
    return ids


def record_added(db: FaceDB, name: str, ids: list[int]) -> list[int]:
    """Record templates added by :meth:`facedb.FaceDB.add_templates` (``add-templates``); returns ``ids``."""
    _record(db, "add-templates", [{"identity": db.store.person(name).name, "detail": {"templates": len(ids)}}])
    return ids


def add_templates_many(db: FaceDB, items: Sequence[tuple[str, object]], model_id: str | None, create: bool) -> int:
    """:meth:`facedb.FaceDB.add_templates_many`: every vector checked first, then one transaction (all or nothing),
    one ``add-templates`` record per person; returns the templates added."""
    checked = [(name, _checked(db, vectors, model_id)) for name, vectors in items]
    added: list[tuple[str, int]] = []
    with db.store.write():
        for name, x in checked:
            added.append((name, len(db.store.add_templates(name, x, create_person=create))))
    settings = db.settings()
    db.keeper.after_write(settings)
    db.trail.record("add-templates", [{"identity": normalise_name(name), "detail": {"templates": n}}
                                      for name, n in added], settings)
    return sum(n for _, n in added)


def cover_templates(db: FaceDB, names: Sequence[str]) -> dict[str, int]:
    """:meth:`facedb.FaceDB.cover_templates`: names no longer enrolled are left out, not an error."""
    found = []
    for n in names:
        with contextlib.suppress(PersonNotFoundError):
            found.append(db.store.person(n))
    people = {p.id: p.name for p in found}
    return {people[pid]: tid for pid, tid in db.store.cover_templates(list(people)).items()}
