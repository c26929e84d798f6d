"""Enrolment: photos of named people to stored templates (``FaceDB.enroll``/``enroll_many``, ``facedb enroll``).

The job is checked whole before any photo is read (names, every person's metadata and external id: bad input
changes nothing), then scheduled in chunks: the face pipeline prepares photos (decode, detect, align; in a thread
or in worker processes, :func:`facedb.faces.pipeline.prepared_chunks`) while the embedder embeds the previous
chunk in one batch. Each photo is then stored in its own transaction (templates, image, thumbnail), counted and
audited as one step that a Ctrl-C cannot split; a photo already enrolled (known from its bytes' hash before
detection), one whose face matches *another* person (``on_other_match``) or one embedded by a model the database
has since left is skipped with its reason and never stops the others. Moved out of ``db.py`` as it was.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import (
    DatabaseError,
    DuplicatePersonError,
    InvalidInputError,
    ModelChangedError,
    ModelMismatchError,
    PersonNotFoundError,
)
from ..faces import quality
from ..gallery import thumbnails
from ..gallery.settings import check_count
from ..gallery.store import normalise_name
from ..records import EnrollReport, PhotoCheck, Skipped

if TYPE_CHECKING:
    from ..db import FaceDB
    from ..faces.images import PhotoSource
    from ..faces.pipeline import FaceChoice, FacePipeline, Outcome

#: What ``enroll`` does with a photo whose face matches *another* enrolled person above the threshold.
ON_OTHER_MATCH = ("warn", "refuse", "allow")


@contextlib.contextmanager
def interrupt_after() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the block has ended, then deliver it: the block
    (store a photo, count it, audit it) is done whole or not at all. Only the main thread receives signals;
    elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held and callable(previous):
            previous(signal.SIGINT, None)  # Python's own handler raises KeyboardInterrupt here


def enroll_many(db: FaceDB, batches: Sequence[tuple[str, Sequence[PhotoSource]]], *,
                model: FacePipeline | None = None, on_multiple: str | FaceChoice = "error",
                on_other_match: str = "warn", metadata: dict[str, Any] | None = None,
                people_metadata: dict[str, dict[str, Any]] | None = None, progress: Any = None,
                batch_size: int = 16, workers: int | None = 0, cropped: bool = False) -> EnrollReport:
    """:meth:`facedb.FaceDB.enroll_many`: enrol several people, ``[(name, photos), ...]``; faces are embedded in
    batches across photos.

    A photo that fails (unreadable, no face, several faces under ``on_multiple="error"``, already
    enrolled: known from its bytes' hash before detection) is skipped with its reason and never stops
    the others. ``on_multiple``: ``error`` (skip the photo), ``largest`` or ``skip``. ``on_other_match``:
    a face that matches *another* enrolled person at or above the threshold is enrolled with a warning
    (``warn``), skipped (``refuse``) or enrolled silently (``allow``). ``metadata`` goes to every person,
    ``people_metadata[name]`` to one. ``cropped``: the photos are face crops (badge photos, a camera's own
    detections; see :func:`facedb.faces.pipeline.find_faces`). Detection runs beside the embedder: in a thread
    by default, or in ``workers`` spawned processes (see :func:`facedb.faces.pipeline.prepared_chunks`; a script
    doing this must guard its entry point with ``if __name__ == "__main__":``); ``None`` = as many as suit
    the job. ``progress(done)``: called after each chunk with the photos done so far.

    InvalidInputError for bad options, names or metadata, DatabaseError read-only: nothing read, nothing
    stored. Interrupted (KeyboardInterrupt), it stops promptly and the exception carries ``report``: what was
    stored so far (each photo is its own transaction, so nothing is half stored).
    """
    from ..faces.pipeline import face_choice, prepared_chunks
    from ..gallery.store import check_name

    choice = face_choice(on_multiple)
    batch_size = check_count(batch_size, "batch_size", 1)
    if choice.value == "all":  # clustering's rule: enrolment stores one face per photo
        raise InvalidInputError("enrolment takes one face per photo: on_multiple is error, largest or skip")
    if on_other_match not in ON_OTHER_MATCH:
        raise InvalidInputError(f"on_other_match is one of {', '.join(ON_OTHER_MATCH)}")
    if db.readonly:
        raise DatabaseError(f"{db.root} is open read-only: cannot enrol")
    # Every name and every person's data is checked before any photo is read: bad input changes nothing.
    names = {check_name(name) for name, _ in batches}
    per_person = people_data(db, names, metadata, people_metadata)
    pipe = db.pipeline(model)
    report = EnrollReport()
    work = [(name, src) for name, srcs in batches for src in srcs]
    done = 0
    try:
        for chunk in prepared_chunks(pipe, work, choice, workers=workers, batch_size=batch_size,
                                     known=db._known_photo, cropped=cropped):
            store_chunk(db, chunk, pipe, on_other_match, per_person, report)
            done += len(chunk)
            if progress is not None:
                progress(done)
    except KeyboardInterrupt as exc:
        exc.report = report  # type: ignore[attr-defined]
        raise
    update_people_data(db, per_person)
    return report


def check_photo(db: FaceDB, photo: PhotoSource, model: FacePipeline | None, name: str | None,
                on_multiple: str) -> PhotoCheck:
    """:meth:`facedb.FaceDB.check_photo`: a photo's faces with their quality problems, and whether enrolment would
    store it (verdict ``ok``, ``no face``, ``several faces`` or ``duplicate``: :mod:`facedb.faces.precheck`).
    Stores nothing and records nothing."""
    from ..faces.precheck import check_photo as precheck

    def owner_of(sha256: str) -> str | None:
        with db._lock:
            return db.store.image_owner(sha256)

    return precheck(db.pipeline(model), photo, owner_of, name=name, on_multiple=on_multiple)


def update_people_data(db: FaceDB, data_of: dict[str, dict[str, Any]]) -> None:
    """Give people of the job who were already enrolled the metadata and external id the job names for
    them (a re-run with ``--people-meta`` stores no photo, but must still update the people)."""
    for name, data in data_of.items():
        if not data:
            continue
        try:
            person = db.store.person(name)
        except PersonNotFoundError:
            continue  # no photo of theirs could be stored: nobody to update
        meta = {k: v for k, v in data.items() if k != "external_id"}
        ext = data.get("external_id")
        if all(person.metadata.get(k) == v for k, v in meta.items()) and ext in (None, person.external_id):
            continue
        db.update_person(name, metadata=meta or None, external_id=ext)


def people_data(db: FaceDB, names: set[str], metadata: dict[str, Any] | None,
                people_metadata: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """{name (NFC): metadata to store, with an ``external_id`` key where one is to be set}, checked: metadata
    are JSON objects, and external ids are unique among these people and not another person's
    (InvalidInputError otherwise)."""
    from ..gallery.store import _check_metadata

    common = dict(metadata or {})
    _check_metadata(common)
    if "external_id" in common and len(names) > 1:
        raise InvalidInputError("an external id belongs to one person: give it per person (people_metadata / "
                                "--people-meta), not to everyone")
    out: dict[str, dict[str, Any]] = {}
    for name, meta in (people_metadata or {}).items():
        if not isinstance(meta, dict):
            raise InvalidInputError(f"the metadata of {name!r} must be a JSON object (a dict)")
        _check_metadata(meta)
        out.setdefault(normalise_name(name), {}).update(meta)
    data = {name: {**common, **out.get(name, {})} for name in names}
    owners: dict[str, str] = {}
    for name, meta in data.items():
        ext = meta.get("external_id")
        if ext is None:
            continue
        if not isinstance(ext, str) or not ext:
            raise InvalidInputError(f"the external id of {name!r} must be a non-empty string")
        if ext in owners:
            raise InvalidInputError(f"external id {ext!r} is given to both {owners[ext]!r} and {name!r}")
        owners[ext] = name
        holder = db.store.people_by_external_ids([ext]).get(ext)
        if holder is not None and holder != name:
            raise InvalidInputError(f"external id {ext!r} already belongs to {holder!r}")
    return data


def known_photo(db: FaceDB, sha256: str) -> str | None:
    """Why a photo with these bytes (their SHA-256) is not enrolled again, or None when it is new. Called through
    ``FaceDB._known_photo``, which a test replaces to play a second enrolment whose check ran before a commit."""
    owner = db.store.image_owner(sha256)
    return None if owner is None else f"already enrolled (as {owner!r})"


def store_chunk(db: FaceDB, chunk: list[Outcome], pipe: FacePipeline, on_other_match: str,
                data_of: dict[str, dict[str, Any]], report: EnrollReport) -> None:
    """Embed a chunk's prepared photos in one batch and store each in its own transaction."""
    from ..faces.pipeline import Prepared

    report.photos += len(chunk)
    fresh: list[Prepared] = []
    for item in chunk:
        if not isinstance(item, Prepared):
            report.skipped.append(item.skipped)
        else:
            fresh.append(item)
    if not fresh:
        return
    vectors = pipe.embed_crops([item.crop for item in fresh], flip=db.flip)
    for item, vec in zip(fresh, vectors):
        name = normalise_name(item.name)
        if (reason := db._known_photo(item.sha256)) is not None:  # a copy earlier in this same job
            report.skipped.append(Skipped(item.label, reason))
            continue
        # Checked photo by photo against the gallery as it is now, so that two photos of one face filed
        # under two new names in the same job are caught too.
        try:
            other = other_match(db, name, vec, pipe.model_id) if on_other_match != "allow" else None
        except ModelChangedError as exc:  # moved to another model (reembed) since this photo was embedded
            report.skipped.append(Skipped(item.label, str(exc)))
            continue
        if other is not None:
            note = f"matches {other[0]!r} (similarity {other[1]:.4f} >= threshold {other[2]:.4f})"
            if on_other_match == "refuse":
                report.skipped.append(Skipped(item.label, f"{note}: not enrolled as {name!r}"))
                continue
            report.warnings.append(Skipped(item.label, f"{note}, enrolled as {name!r} anyway"))
        meta = dict(data_of.get(name, {}))
        external_id = meta.pop("external_id", None)
        with interrupt_after():  # a photo stored is also counted and audited, even if Ctrl-C comes now
            try:
                ids = db._add_templates(name, vec, boxes=[item.face.box], det_scores=[item.face.score],
                                        image=item.image, create=True, metadata=meta or None,
                                        external_id=external_id,
                                        thumbnails=thumbnails.of_crops([item.crop], db.settings().thumbnails,
                                                                       "template"), made_by=pipe.model_id)
            except (InvalidInputError, ModelMismatchError, DuplicatePersonError) as exc:
                report.skipped.append(Skipped(item.label, str(exc)))
                continue
            report.template_ids.extend(ids)
            report.faces_stored += len(ids)
            if problems := quality.measure(item.crop, item.face.box, item.face.score,
                                           item.face.landmarks).problems:
                report.quality.append(Skipped(item.label, "stored; may match badly: " + "; ".join(problems)))
            if name not in report.people:
                report.people.append(name)
            db.trail.record("enroll", [{"image_sha256": item.sha256, "identity": name,
                                        "detail": {"templates": len(ids)}}], db.settings())


def other_match(db: FaceDB, name: str, vector: np.ndarray, made_by: str | None = None
                ) -> tuple[str, float, float] | None:
    """The best-matching enrolled person other than ``name`` (NFC), if they reach the threshold:
    (their name, similarity, threshold). ``made_by``: the model that made ``vector`` (ModelChangedError when the
    database has moved to another: see :meth:`facedb.gallery.query.Query.identify`)."""
    answers, settings = db.query.identify(db._protect(np.asarray(vector, dtype=np.float32)[None]), 2, None,
                                          made_by=made_by)
    other = next((c for c in answers[0].candidates if c.name != name), None)
    if other is None or other.similarity < settings.threshold:
        return None
    return other.name, other.similarity, settings.threshold
