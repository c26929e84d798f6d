"""Commands on photos: enroll, search, verify, detect."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ..choices import DetectorKind, OnMultiple, OnOtherMatch
from ..errors import FaceDBError, IndexUnavailableError, InvalidInputError
from ..records import EnrollReport
from . import EXIT_ERROR, EXIT_NO, Progress, command, open_db, parse_meta, state
from .admin import WeightsOpt

ThresholdOpt = Annotated[
    float | None, typer.Option(help="Cosine similarity to accept at, in [-1, 1]; default: the database's stored "
                                    "threshold.")
]

CroppedOpt = Annotated[
    bool, typer.Option("--cropped", help="The photos are face crops (badge photos, a camera's own detections): "
                                         "padded before detection, and where MTCNN still finds no face the whole "
                                         "photo is taken as the face (its det_score is then 0).")
]


def read_people_meta(path: Path) -> dict[str, dict[str, Any]]:
    """Per-person metadata from a CSV file (a ``name`` column; the other columns become metadata, except
    ``external_id``, which sets the person's external id) or a JSON object ``{name: {key: value}}`` (the same
    ``external_id`` key). Names are NFC-normalised like every name."""
    from ..gallery.store import normalise_name

    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"cannot read {path}: {exc}") from None
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise InvalidInputError(f"{path} is not JSON: {exc}") from None
        if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
            raise InvalidInputError(f"{path} must hold a JSON object of {{name: {{key: value}}}}")
        return {normalise_name(k): v for k, v in raw.items()}
    rows = list(csv.DictReader(text.splitlines()))
    if not rows or "name" not in rows[0]:
        raise InvalidInputError(f"{path} must be a CSV file with a 'name' column (or a .json file)")
    return {normalise_name(r.pop("name")): {k: v for k, v in r.items() if k and v not in (None, "")} for r in rows}


def _has_photos(db: Any, name: str) -> bool:
    from ..errors import PersonNotFoundError

    try:
        return db.person(name).images > 0
    except PersonNotFoundError:
        return False


@command()
def enroll(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Person's name (omit with --folder).")] = None,
    photos: Annotated[list[Path] | None, typer.Argument(help="Photos of them, one face each.")] = None,
    folder: Annotated[
        Path | None, typer.Option(help="A folder with one sub-folder of photos per person (sub-folder = name).")
    ] = None,
    meta: Annotated[list[str] | None, typer.Option(help="key=value metadata for every person; repeatable.")] = None,
    people_meta: Annotated[Path | None, typer.Option(help="Per-person metadata: a CSV file with a 'name' column, "
                                                          "or JSON {name: {key: value}}; an 'external_id' "
                                                          "column/key sets the person's external id.")] = None,
    on_multiple: Annotated[OnMultiple, typer.Option(help="A photo with several faces: error (skip it and say "
                                                         "so), largest, or skip.")] = OnMultiple.error,
    on_other_match: Annotated[OnOtherMatch, typer.Option(help="A face that matches another enrolled person: warn "
                                                              "(enrol anyway), refuse, or allow.")] = OnOtherMatch.warn,
    weights: WeightsOpt = None,
    workers: Annotated[
        int | None,
        typer.Option(min=0, envvar="FACEDB_ENROLL_WORKERS",
                     help="Detection processes beside the embedder; 0 = a thread. Default: cores - 1 for 64+ "
                          "photos with dlib on CPU, else 0."),
    ] = None,
    cropped: CroppedOpt = False,
) -> None:
    """Enrol photos of a person, or a whole folder of people. Prints a summary; skipped photos say why.

    Photos already enrolled are recognised by their bytes and skipped before detection, so re-running a folder
    is quick and exits 0. Exit 2 if some photo could not be enrolled (unreadable, no face, several faces,
    refused); the others are enrolled all the same. A photo stored whose face fails a quality floor (tiny, low
    contrast, lit from one side, over-exposed, turned away) is listed as "quality": enrol a better one beside
    it. Ctrl-C stops promptly and prints what was stored (each photo is its own transaction).
    """
    from ..faces.images import display_name
    from ..gallery.store import normalise_name

    batches, problems = _enrol_batches(name, photos, folder)
    per_person = read_people_meta(people_meta) if people_meta else {}
    unknown = set(per_person) - {normalise_name(n) for n, _ in batches}
    if unknown:
        problems.append(f"--people-meta names {len(unknown)} people with no photos here: "
                        f"{', '.join(sorted(unknown)[:5])}")
    for p in problems:
        typer.echo(f"warning: {p}", err=True)
    total = sum(len(files) for _, files in batches)
    interrupted = False
    with open_db(ctx, weights=weights) as db, Progress(ctx, "enrolling", total) as progress:
        try:
            report = db.enroll_many(batches, on_multiple=on_multiple.value, on_other_match=on_other_match.value,
                                    metadata=parse_meta(meta) or None, people_metadata=per_person,
                                    progress=progress, workers=workers, cropped=cropped)
        except KeyboardInterrupt as exc:
            report = getattr(exc, "report", None)
            if report is None:
                raise
            interrupted = True
        # people of this job with no photo in the database at all (every photo of theirs failed)
        empty = [display_name(n) for n, _ in batches if not _has_photos(db, n)]
    if state(ctx).json:
        out = report.to_dict()
        out.pop("template_ids")
        out.update(people_without_photos_stored=[] if interrupted else empty, layout_problems=problems,
                   interrupted=interrupted)
        typer.echo(json.dumps(out, ensure_ascii=False))
    else:
        _print_enrol_report(report, empty if folder is not None else [], interrupted)
    if interrupted:
        raise typer.Exit(130)
    if report.failed:  # the others were still enrolled; "already enrolled" is not a failure
        raise typer.Exit(EXIT_ERROR)


def _enrol_batches(name: str | None, photos: list[Path] | None,
                   folder: Path | None) -> tuple[list[tuple[str, list[Path]]], list[str]]:
    """``enroll``'s work as (person name, photo paths) batches, and the problems found laying it out (sub-folders
    whose name cannot be a person's are skipped and listed). InvalidInputError when the arguments do not name
    one person's photos or a folder, or when no sub-folder of the folder can be enrolled."""
    from ..faces.images import display_name
    from ..faces.pipeline import list_folder
    from ..gallery.store import check_name

    if folder is None:
        if name is None or not photos:
            raise InvalidInputError("give NAME and at least one PHOTO, or --folder DIR")
        return [(name, list(photos))], []
    if name is not None or photos:
        raise InvalidInputError("give either NAME PHOTO... or --folder DIR, not both")
    layout = list_folder(folder)
    problems = layout.problems
    batches = []
    for person, files in layout.people:
        try:
            check_name(person)
        except InvalidInputError as exc:  # one badly named folder does not stop the others
            problems.append(f"{display_name(person)}/: not used as a person's name ({exc}); skipped")
            continue
        batches.append((person, list(files)))
    if not batches:
        raise InvalidInputError(f"no folder in {display_name(folder)} can be enrolled: {'; '.join(problems)}")
    return batches, problems


def _print_enrol_report(report: EnrollReport, empty: list[str], interrupted: bool) -> None:
    """``enroll``'s text summary: each skipped, warned and low-quality photo, the people of a folder left with
    no photo stored (``empty``; not listed when interrupted: the rest was never tried), then the totals."""
    for sk in report.skipped:
        typer.echo(f"skipped  {sk.image}: {sk.reason}")
    for w in report.warnings:
        typer.echo(f"warning  {w.image}: {w.reason}")
    for q in report.quality:
        typer.echo(f"quality  {q.image}: {q.reason}")
    if empty and not interrupted:
        typer.echo(f"no photo stored for {len(empty)} people: {', '.join(empty[:10])}"
                   f"{' ...' if len(empty) > 10 else ''}")
    typer.echo(
        f"{'interrupted: ' if interrupted else ''}people {len(report.people)}  photos {report.photos}  "
        f"faces stored {report.faces_stored}  skipped {len(report.skipped)}  warnings {len(report.warnings)}"
    )


@command()
def search(
    ctx: typer.Context,
    photos: Annotated[list[Path], typer.Argument(help="Photos to identify; every face in each.")],
    k: Annotated[int, typer.Option("-k", "--top", min=1, help="Candidates per face.")] = 5,
    threshold: ThresholdOpt = None,
    weights: WeightsOpt = None,
    cropped: CroppedOpt = False,
) -> None:
    """Who is in these photos? One line per face: the identity or 'unknown' (JSON null), then the candidates.
    A photo with no face says so. Exit 2 if some photo could not be searched (the others are still answered)."""
    from ..faces.images import display_name
    from ..gallery.settings import check_threshold

    if threshold is not None:
        check_threshold(threshold)
    failed = 0
    with open_db(ctx, weights=weights) as db:
        if threshold is None and (warning := db.calibration_warning()):
            typer.echo(f"warning: {warning}", err=True)
        for photo in photos:
            label = display_name(photo)
            try:
                matches = db.search(photo, k=k, threshold=threshold, name=label, cropped=cropped)
            except IndexUnavailableError:
                raise  # not this photo's fault: the whole command fails (exit 2)
            except FaceDBError as exc:
                failed += 1
                typer.echo(f"error: {exc}", err=True)
                if state(ctx).json:  # every photo named gets its line, so a script can pair answers with photos
                    typer.echo(json.dumps({"image": label, "error": str(exc)}, ensure_ascii=False))
                continue
            if not matches:
                if state(ctx).json:
                    typer.echo(json.dumps({"image": label, "faces": 0, "identity": None}, ensure_ascii=False))
                else:
                    typer.echo(f"{label}\tno face")
                continue
            for m in matches:
                if state(ctx).json:
                    typer.echo(json.dumps(m.to_dict(), ensure_ascii=False))
                    continue
                sim = "-" if m.similarity is None else f"{m.similarity:.4f}"
                ext = f" [{m.external_id}]" if m.external_id else ""
                cands = ", ".join(f"{c.name} {c.similarity:.4f}" for c in m.candidates)
                # under the margin rule the decision is on score (s1 - 0.5 s2), not similarity: show it, or
                # "unknown similarity=0.93 threshold=0.929" reads as a contradiction
                rule = f"\tscore={m.score:.4f} (needs {m.score_threshold:.4f})" \
                    if m.score is not None and m.score_threshold is not None else ""
                typer.echo(f"{label}\t{m.identity or 'unknown'}{ext}\tsimilarity={sim}\tthreshold={m.threshold:.4f}"
                           f"{rule}\tbox={m.box}\tcandidates: {cands or '-'}")
    if failed:
        raise typer.Exit(EXIT_ERROR)


@command()
def verify(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Who the photo is claimed to be.")],
    photo: Annotated[Path, typer.Argument(help="The photo (its largest face is used).")],
    threshold: ThresholdOpt = None,
    weights: WeightsOpt = None,
    cropped: CroppedOpt = False,
) -> None:
    """Is this photo NAME? Prints yes or no and the score. Exit 0 for yes, 1 for no, 2 for an error."""
    with open_db(ctx, weights=weights) as db:
        result = db.verify(photo, name, threshold, cropped=cropped)
    if state(ctx).json:
        typer.echo(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        typer.echo(f"{'yes' if result.accepted else 'no'}\tsimilarity={result.similarity:.4f}\t"
                   f"threshold={result.threshold:.4f}")
    if not result.accepted:
        raise typer.Exit(EXIT_NO)


@command()
def detect(
    ctx: typer.Context,
    photos: Annotated[list[Path], typer.Argument(help="Photos to look for faces in.")],
    weights: WeightsOpt = None,
    cropped: CroppedOpt = False,
    detector: Annotated[DetectorKind | None, typer.Option(help="Face detector for this call, mtcnn or yunet; "
                                                               "default: the database's.")] = None,
) -> None:
    """Faces in photos: box, detector score and 5 landmarks each (no identification, nothing recorded). Exit 2 if
    some photo could not be read (the others are still done)."""
    from ..faces.images import display_name

    failed = 0
    with open_db(ctx, weights=weights) as db:
        model = None
        if detector is not None:
            from ..faces.pipeline import DetectorSettings, get_pipeline

            model = db.pipeline(get_pipeline(db.model_id, weights=weights,
                                             settings=DetectorSettings(detector=detector.value)))
        for photo in photos:
            label = display_name(photo)
            try:
                faces = db.detect(photo, name=label, cropped=cropped, model=model)
            except FaceDBError as exc:
                failed += 1
                typer.echo(f"error: {exc}", err=True)
                if state(ctx).json:  # every photo named gets its line, so a script can pair answers with photos
                    typer.echo(json.dumps({"image": label, "error": str(exc)}, ensure_ascii=False))
                continue
            for f in faces:
                row = {"image": label, "box": [round(c, 1) for c in f.box], "det_score": round(f.score, 4),
                       "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in f.landmarks]}
                typer.echo(json.dumps(row, ensure_ascii=False) if state(ctx).json else
                           f"{label}\tbox={row['box']}\tscore={row['det_score']}")
            if not faces:  # as search does: a photo with no face is an answer, not silence
                typer.echo(json.dumps({"image": label, "faces": 0}, ensure_ascii=False) if state(ctx).json else
                           f"{label}\tno face")
    if failed:
        raise typer.Exit(EXIT_ERROR)
