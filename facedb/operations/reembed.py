"""Moving a database to another embedding model (``facedb reembed``, :meth:`facedb.FaceDB.reembed`).

Templates of two models are never compared, so a database that changes model must have **every** template made
again by the new one. They are made from what the database keeps, or from the photos given again:

* **photos** (``photos``: a folder laid out as enrolment takes it, ``<folder>/<person>/<photos>``): a photo is
  recognised by its bytes' SHA-256 as the one a template was enrolled from, detected again, and the face whose
  box best overlaps the stored box is aligned for the new model. Photos first: they are the best source.
* **face crops** (the ``enrolled`` thumbnails, :mod:`facedb.gallery.thumbnails`): a 96 x 96 JPEG of the *old* model's
  aligned crop (dlib-resnet: its 150 x 150 chip; sface: its 112 x 112 warp; FaceNet: its 160 x 160 box crop),
  which holds no landmarks. The crop is padded and detected again (:func:`facedb.faces.pipeline.find_faces` in crop
  mode: MTCNN in a frame padded around it, the whole crop with an average face's landmarks if even that finds
  none) and aligned from those landmarks for the new model; the crop is smaller than every model's input
  (112, 150, 160 px), so it is upsampled: docs/models.md, "Moving a database to another model" gives what that costs.

Who can be made from neither (a vector added through the API, a database that keeps no thumbnails and whose
photos were not given, a photo or crop in which no face is found again) is **unembeddable**: the move is
refused, naming them and why (:class:`UnembeddableError`), unless ``drop_unembeddable``, which erases those
templates (the person stays, with their other templates or none, to be enrolled again under the new model).

The move is one SQLite transaction (:meth:`facedb.gallery.store.Store.replace_all_templates`), taken after every new
template has been computed: the model id, dimension, thresholds and decision rule of the new model as ``facedb
init`` sets them, every template's vector and thumbnail, the mean templates, and a change log cut at the new
generation so that every process rebuilds its index from the store. A crash or SIGKILL before the commit leaves
the old database exactly as it was; after it, the index file is rewritten (the old model's vectors erased from
it, as a removal does) and a writable open finishes that if the process died first. Queries in other processes
see the old gallery or the new one, never a mix: a photo embedded by the old model is not searched in the new
gallery (``FaceDB.search`` checks the model before and after and asks again). The move is recorded in the audit
trail (operation ``reembed``).

Templates enrolled while the move computes are caught in the transaction and made then (under the write lock);
templates removed meanwhile are simply not written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DatabaseError, InvalidInputError
from ..gallery.store import normalise_name
from ..records import _Record

if TYPE_CHECKING:
    from ..db import FaceDB
    from ..faces.pipeline import FacePipeline
    from ..gallery.settings import Settings

#: Faces re-made per embedding call (one progress step).
BATCH = 32

#: A detected face is the one a template was enrolled from when its box overlaps the stored box at least this
#: much (intersection over union); MTCNN finds the same face in the same photo within a pixel or two.
SAME_FACE_IOU = 0.5

#: The settings that belong to the old model and are deleted by a move (a calibration, an impostor model and a
#: margin measured on the old model's scores mean nothing for the new one); the new model's are written.
OLD_MODEL_KEYS = ("calibration", "impostor_model", "decision_margin", "decision_weight")


@dataclass(frozen=True)
class Unembeddable(_Record):
    """A template that could not be made again under the new model, and why."""

    template_id: int
    person: str
    reason: str


@dataclass
class ReembedReport(_Record):
    """What a move did (or, with ``dry_run``, would do): the models, how many templates were made from photos
    and from kept face crops, the templates that could not be made (dropped, or the reason the move was refused),
    photos given that were not used and why, the new rule, and what the move forgot."""

    from_model: str
    to_model: str
    dim: int
    templates: int = 0
    from_photos: int = 0
    from_crops: int = 0
    unembeddable: list[Unembeddable] = field(default_factory=list)
    dropped: int = 0
    photos_ignored: list[str] = field(default_factory=list)
    threshold: float | None = None
    decision_rule: str | None = None
    mean_templates: int = 0
    visitors_forgotten: int = 0
    people_without_templates: list[str] = field(default_factory=list)
    dry_run: bool = False
    moved: bool = False


class UnembeddableError(InvalidInputError):
    """The move was refused because some templates could not be made under the new model (``unembeddable``,
    each with why); nothing was changed. Give their photos, or consent to dropping them."""

    def __init__(self, unembeddable: Sequence[Unembeddable]) -> None:
        self.unembeddable = list(unembeddable)
        people = sorted({u.person for u in self.unembeddable})
        shown = "; ".join(f"{u.person!r} (template {u.template_id}): {u.reason}" for u in self.unembeddable[:3])
        more = f"; and {len(self.unembeddable) - 3} more" if len(self.unembeddable) > 3 else ""
        super().__init__(
            f"{len(self.unembeddable)} template(s) of {len(people)} person(s) cannot be made under the new model "
            f"({shown}{more}); nothing was changed: give their photos (--photos DIR), or drop those templates "
            "(--drop-unembeddable; the people stay, to be enrolled again)")


@dataclass
class _Source:
    """Where one photo template can be made again from."""

    template_id: int
    person: str
    sha256: str | None
    box: list[float] | None
    photo: Path | None = None


# -------------------------------------------------------------------------------------------------- planning
def target_pipeline(db: FaceDB, model_id: str, *, weights: Path | None = None,
                    model: FacePipeline | None = None) -> tuple[Any, FacePipeline]:
    """(the new model's spec, its face pipeline). ``model``: a pipeline to use (its model id must be a known
    model); else the model is resolved (InvalidInputError for an unknown id) and loaded with its weights
    (ModelUnavailableError when they cannot be found, WeightsHashError for a wrong file), with the database's
    detector settings."""
    from ..faces.models import resolve_model, spec_for

    if model is not None:
        if model.model_id != model_id:
            raise InvalidInputError(f"the pipeline given computes {model.model_id!r}, not {model_id!r}")
        return spec_for(model_id), model
    spec, _ = resolve_model(model_id, weights=weights)
    from ..faces.pipeline import get_pipeline

    return spec, get_pipeline(spec.id, weights=weights, settings=_detector_settings(db))


def _detector_settings(db: FaceDB) -> Any:
    """The detector settings the database's photos go through (a per-database detector where it has one)."""
    from ..faces.pipeline import DetectorSettings

    base = DetectorSettings()
    chosen = getattr(db.settings(), "detector", None)
    if chosen and any(f.name == "detector" for f in dataclasses.fields(base)):
        return dataclasses.replace(base, detector=chosen)
    return base


def photo_map(db: FaceDB, folder: Path, report: ReembedReport) -> dict[str, Path]:
    """{image SHA-256: photo file} for the photos in ``folder`` (``<folder>/<person>/<photos>``) that are the
    photos the database enrolled for that person. InvalidInputError (before anything is read or changed) when a
    person folder names no one in the database; photos not enrolled, or enrolled for another person, are listed
    in ``report.photos_ignored`` and not used."""
    from ..faces.images import display_name
    from ..faces.pipeline import list_folder, source_sha256

    layout = list_folder(Path(folder))
    report.photos_ignored.extend(layout.problems)
    known = {p.name for p in db.people()}
    unknown = sorted(display_name(n) for n, _ in layout.people if normalise_name(n) not in known)
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise InvalidInputError(f"{display_name(folder)}: {len(unknown)} person folder(s) name no one in this database "
                                f"({shown}); nothing was changed (the folder gives photos of enrolled people)")
    found: dict[str, Path] = {}
    for name, files in layout.people:
        person = normalise_name(name)
        for path in files:
            sha = source_sha256(path)
            with db._lock:  # one FaceDB is shared by threads: its connection is used under its lock
                owner = db.store.image_owner(sha) if sha else None
            if owner is None:
                report.photos_ignored.append(f"{display_name(name)}/{display_name(path.name)}: not enrolled here")
            elif owner != person:
                report.photos_ignored.append(f"{display_name(name)}/{display_name(path.name)}: enrolled for "
                                             f"{owner!r}, not {person!r}")
            else:
                found[str(sha)] = path
    return found


def sources(db: FaceDB, photos: dict[str, Path]) -> list[_Source]:
    """Every photo template of the database (mean templates are recomputed, not re-embedded), with its photo file
    where one was given."""
    with db._lock:
        return [_Source(t.id, t.person, t.image_sha256, t.box, photos.get(t.image_sha256) if t.image_sha256 else None)
                for t in db.store.iter_templates()]


# ------------------------------------------------------------------------------------------------- embedding
def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def crop_from_photo(pipe: FacePipeline, path: Path, box: Sequence[float] | None) -> np.ndarray | str:
    """The new model's aligned crop of the face enrolled from the photo at ``path`` (the detected face that
    best overlaps ``box``, the stored box in the photo's pixels; the largest face when none is stored), or
    the reason there is none."""
    from ..errors import ImageError

    try:
        analysed = pipe.analyse(path)
    except ImageError as exc:
        return f"the photo cannot be read again ({exc})"
    if not analysed.faces:
        return "no face found in the photo given"
    if box is None:
        face = max(analysed.faces, key=lambda f: f.area)
    else:
        face = max(analysed.faces, key=lambda f: _iou(f.box, box))
        if _iou(face.box, box) < SAME_FACE_IOU:
            return "the face enrolled from the photo given is not found in it again"
    return analysed.crops(pipe.embedder.align, [face])[0]


def crop_from_thumbnail(pipe: FacePipeline, jpeg: bytes) -> np.ndarray | str:
    """The new model's aligned crop made from a kept face thumbnail (the old model's aligned crop, a JPEG), or
    the reason there is none: the thumbnail is detected again in crop mode (padded; the whole crop with an
    average face's landmarks if no face is found) and the face nearest its centre is aligned."""
    from ..errors import ImageError
    from ..faces.images import load_photo
    from ..faces.pipeline import find_faces

    try:
        pixels = load_photo(jpeg, name="thumbnail").pixels
    except ImageError as exc:
        return f"the kept face crop cannot be read ({exc})"
    faces, frame = find_faces(pipe.detector, pixels, cropped=True)
    if not faces:
        return "the kept face crop is featureless (no face in it)"
    h, w = pixels.shape[:2]

    def off_centre(f: Any) -> float:
        x1, y1, x2, y2 = f.box
        return float(np.hypot((x1 + x2) / 2 - w / 2, (y1 + y2) / 2 - h / 2)) - 0.25 * min(f.width, f.height)

    face = min(faces, key=off_centre)
    return pipe.embedder.align(frame, face)


def compute(db: FaceDB, pipe: FacePipeline, todo: Sequence[_Source], *, use_crops: bool, flip: bool,
            report: ReembedReport, progress: Callable[[int], None] | None = None
            ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], list[Unembeddable]]:
    """({template id: new unit vector}, {template id: the new aligned crop}, the unembeddable), photos first,
    then kept crops (``use_crops``). Counts go to ``report``; nothing is written."""
    vectors: dict[int, np.ndarray] = {}
    crops: dict[int, np.ndarray] = {}
    failed: list[Unembeddable] = []
    pending: list[tuple[int, np.ndarray]] = []
    done = 0

    def flush() -> None:
        nonlocal done
        if not pending:
            return
        out = pipe.embed_crops([c for _, c in pending], flip=flip)
        for (tid, crop), vec in zip(pending, out):
            vectors[tid] = vec
            crops[tid] = crop
        done += len(pending)
        pending.clear()
        if progress is not None:
            progress(done)

    for src in todo:
        reasons = []
        crop: np.ndarray | str | None = None
        if src.photo is not None:
            crop = crop_from_photo(pipe, src.photo, src.box)
            if isinstance(crop, str):
                reasons.append(crop)
            else:
                report.from_photos += 1
        if not isinstance(crop, np.ndarray):
            jpeg = db.thumbnail("template", src.template_id) if use_crops else None
            if jpeg is not None:
                crop = crop_from_thumbnail(pipe, jpeg)
                if isinstance(crop, str):
                    reasons.append(crop)
                else:
                    report.from_crops += 1
            elif src.photo is None:
                reasons.append("vector added without a photo" if src.sha256 is None else
                               "no photo given" + (" and no face crop kept" if use_crops else ""))
        if isinstance(crop, np.ndarray):
            pending.append((src.template_id, crop))
            if len(pending) >= BATCH:
                flush()
        else:
            failed.append(Unembeddable(src.template_id, src.person, "; ".join(reasons)))
    flush()
    return vectors, crops, failed


# ------------------------------------------------------------------------------------------------------ move
def _movable(db: FaceDB, model_id: str, photos: Path | None, use_crops: bool) -> Settings:
    """The database's settings, once it is known that ``db`` can be moved to ``model_id``: DatabaseError /
    InvalidInputError, before anything is embedded, when it is read-only, already there, cancellable, on a
    shared index, or has nothing to re-embed from."""
    from ..gallery.index import backend_for

    if db.readonly:
        raise DatabaseError(f"{db.root} is open read-only: the gallery cannot be moved to another model")
    s = db.settings()
    if model_id == s.model_id:
        raise InvalidInputError(f"the database already holds {model_id!r} templates")
    if s.extra.get("projection_seed"):
        raise InvalidInputError("a cancellable database (keyed projection) cannot be moved to another model yet: "
                                "enrol it again in a new database")
    if s.index_kind != "auto" and backend_for(s.index_kind).write_through:
        raise InvalidInputError(f"the {s.index_kind} index is shared outside the database: `facedb reindex --index "
                                "flat`, move, then reindex back")
    if not use_crops and photos is None:
        raise InvalidInputError("nothing to re-embed from: give the photos (--photos DIR), or allow the kept face "
                                "crops")
    return s


def _refuse_hopeless(db: FaceDB, todo: Sequence[_Source], use_crops: bool) -> None:
    """UnembeddableError at once for the templates that have neither a photo given nor a kept face crop: the
    cheap part already shows them, before hours of embedding."""
    with db._lock:
        kept = db.store.thumbnail_owners("template", [t.template_id for t in todo]) if use_crops else set()
    hopeless = [Unembeddable(t.template_id, t.person, "vector added without a photo" if t.sha256 is None else
                             "no photo given" + (" and no face crop kept" if use_crops else ""))
                for t in todo if t.photo is None and t.template_id not in kept]
    if hopeless:
        raise UnembeddableError(hopeless)


def _new_rule(spec: Any, s: Settings) -> tuple[float, str, str, Any, float | None]:
    """(threshold, its source, rule, impostor model, margin) the new model ``spec`` starts with: its default
    threshold, and the rule its calibration supports (margin, else gallery, else fixed)."""
    margin = spec.margin_threshold(s.flip)
    impostors = spec.impostor_model(s.flip)
    threshold, source = spec.default_threshold(s.flip)
    rule = "margin" if margin is not None else "gallery" if impostors is not None else "fixed"
    return threshold, source, rule, impostors, margin


def _catch_up(db: FaceDB, pipe: FacePipeline, given: dict[str, Path], vectors: dict[int, np.ndarray],
              crops: dict[int, np.ndarray], failed: list[Unembeddable], *, use_crops: bool, flip: bool,
              drop_unembeddable: bool, report: ReembedReport) -> tuple[dict[int, np.ndarray], set[int]]:
    """Under the write lock: embed the templates enrolled while the others were computed (``crops`` and
    ``failed`` grow in place), and leave out those removed meanwhile. Returns (the vectors of the templates
    held now, their ids)."""
    now = sources(db, given)
    held = {t.template_id for t in now}
    late = [t for t in now if t.template_id not in vectors and t.template_id not in {u.template_id
                                                                                    for u in failed}]
    if late:
        more, more_crops, more_failed = compute(db, pipe, late, use_crops=use_crops, flip=flip, report=report)
        if more_failed and not drop_unembeddable:
            raise UnembeddableError(more_failed)
        vectors.update(more)
        crops.update(more_crops)
        failed += more_failed
    return {i: v for i, v in vectors.items() if i in held}, held


def _report_moved(db: FaceDB, report: ReembedReport, done: dict[str, int], failed: list[Unembeddable],
                  held: set[int]) -> None:
    """Fill ``report`` from the committed move (``done``: the store's counts) and record it in the audit trail."""
    settings = db.settings()
    report.templates, report.dropped = done["templates"], done["dropped"]
    report.mean_templates, report.visitors_forgotten = done["mean_templates"], done["visitors_forgotten"]
    report.unembeddable = [u for u in failed if u.template_id in held]
    report.people_without_templates = sorted(p.name for p in db.people() if p.templates == 0)
    report.moved = True
    db.trail.record("reembed", [{"detail": {
        "from": report.from_model, "to": report.to_model, "templates": report.templates,
        "from_photos": report.from_photos, "from_crops": report.from_crops, "dropped": report.dropped,
        "visitors_forgotten": report.visitors_forgotten}}], settings)


def move(db: FaceDB, model_id: str, *, photos: Path | None = None, use_crops: bool = True,
         drop_unembeddable: bool = False, dry_run: bool = False, weights: Path | None = None,
         model: FacePipeline | None = None, progress: Callable[[int, int], None] | None = None) -> ReembedReport:
    """Move ``db`` to ``model_id``: see the module's docstring and :meth:`facedb.FaceDB.reembed`."""
    from ..gallery import thumbnails
    from ..gallery.settings import Settings
    from ..protection.encryption import failpoint

    s = _movable(db, model_id, photos, use_crops)
    spec, pipe = target_pipeline(db, model_id, weights=weights, model=model)
    report = ReembedReport(from_model=s.model_id, to_model=spec.id, dim=spec.dim, dry_run=dry_run)
    given = photo_map(db, photos, report) if photos is not None else {}
    todo = sources(db, given)
    if not drop_unembeddable:
        _refuse_hopeless(db, todo, use_crops)
    total = len(todo)
    vectors, crops, failed = compute(db, pipe, todo, use_crops=use_crops, flip=s.flip, report=report,
                                     progress=None if progress is None else (lambda n: progress(n, total)))
    if failed and not drop_unembeddable:
        raise UnembeddableError(failed)
    threshold, source, rule, impostors, margin = _new_rule(spec, s)
    report.threshold, report.decision_rule = threshold, rule
    report.unembeddable = failed
    if dry_run:
        report.templates = len(vectors)
        return report
    meta = {"model_id": spec.id, "dim": str(spec.dim), **Settings.threshold_rows(threshold, source, None),
            **Settings.rule_rows(rule, 0.01, impostors, margin)}
    unset = [k for k in OLD_MODEL_KEYS if k not in meta]
    keep_thumbs = thumbnails.keeps(s.thumbnails, "template")
    with db._lock:
        with db._erasing():
            # Under the write lock: templates enrolled while the others were computed are made now, and those
            # removed meanwhile are left out (the store refuses any other difference).
            vectors, held = _catch_up(db, pipe, given, vectors, crops, failed, use_crops=use_crops, flip=s.flip,
                                      drop_unembeddable=drop_unembeddable, report=report)
            drop = [u.template_id for u in failed if u.template_id in held]
            thumbs = {i: (thumbnails.encode(crops[i]) if keep_thumbs else None) for i in vectors}
            done = db.store.replace_all_templates(vectors, thumbs, drop, meta, unset)
            failpoint("reembed-written")  # every row written, not yet committed: the kill test's step
        db._model = model  # the pipeline given (or none: the process-wide one of the new model)
        if weights is not None:
            db._weights = weights  # the new model's weights file, for this object's later photos
        _report_moved(db, report, done, failed, held)
    return report


__all__ = ["ReembedReport", "Unembeddable", "UnembeddableError", "move"]
