"""The ``facedb`` command line: a thin layer where each command calls one FaceDB method.

Output is a readable table by default; ``--json`` prints one JSON object per line. Errors print one line
on stderr and exit non-zero, with no traceback (and no locals: probes are biometric data).
Heavy modules (faiss, torch) are imported inside commands so that ``facedb --help`` is instant.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from .errors import FaceDBError, InvalidInputError

if TYPE_CHECKING:
    from .db import FaceDB

app = typer.Typer(
    help="facedb: a face-recognition identity database. Scores are cosine similarities (higher = more alike).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

F = TypeVar("F", bound=Callable[..., Any])


class State:
    def __init__(self, db: Path, json_out: bool) -> None:
        self.db = db
        self.json = json_out


@app.callback()
def _main(
    ctx: typer.Context,
    db: Annotated[
        Path, typer.Option("--db", envvar="FACEDB_DB", help="Database directory.", show_default=True)
    ] = Path("facedb-data"),
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per line, for scripts.")] = False,
) -> None:
    ctx.obj = State(db, json_out)


def command(*args: Any, group: typer.Typer | None = None, **kwargs: Any) -> Callable[[F], F]:
    """``app.command`` (or ``group.command``) that turns FaceDBError into one line on stderr and exit 1."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            try:
                return fn(*a, **kw)
            except FaceDBError as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(exc.exit_code) from None
            except KeyboardInterrupt:
                typer.echo("interrupted", err=True)
                raise typer.Exit(130) from None

        (group or app).command(*args, **kwargs)(wrapper)
        return fn

    return decorate


def _open(ctx: typer.Context, weights: Path | None = None) -> FaceDB:
    from .db import FaceDB

    return FaceDB.open(ctx.obj.db, weights=weights)


def _emit(ctx: typer.Context, rows: Iterable[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    """JSON lines with --json, else an aligned table of ``columns``."""
    rows = list(rows)
    if ctx.obj.json:
        for row in rows:
            typer.echo(json.dumps(row, ensure_ascii=False, default=str))
        return
    if not rows:
        return
    columns = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}"
        if isinstance(v, (dict, list)):
            return json.dumps(v, ensure_ascii=False)
        return str(v)

    table = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(columns)]
    typer.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for t in table:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip())


def _emit_kv(ctx: typer.Context, obj: dict[str, Any]) -> None:
    if ctx.obj.json:
        typer.echo(json.dumps(obj, ensure_ascii=False, default=str))
        return
    width = max(len(k) for k in obj)
    for k, v in obj.items():
        shown = json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else ("-" if v is None else v)
        typer.echo(f"{k.ljust(width)}  {shown}")


def _parse_meta(pairs: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"--meta takes key=value, got {pair!r}")
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------- commands
@command()
def init(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Option(help="facenet-vggface2, facenet-casia, dlib-resnet, or your own id with --dim."),
    ] = None,
    dim: Annotated[int | None, typer.Option(help="Vector dimension, for a model facedb does not know.")] = None,
    threshold: Annotated[
        float | None, typer.Option(help="Decision threshold (cosine similarity); default: the model's.")
    ] = None,
    index: Annotated[
        str, typer.Option(help="Index kind: flat (exact), flat16, hnsw, ivf, ivfpq, or auto (by gallery size).")
    ] = "flat",
    weights: Annotated[
        Path | None, typer.Option(envvar="FACEDB_WEIGHTS", help="FaceNet weights file (.pt).")
    ] = None,
    flip: Annotated[
        bool, typer.Option(help="Embed photos with flip test-time augmentation (2x embedding time; more accurate).")
    ] = True,
) -> None:
    """Create a new, empty database."""
    from .db import FaceDB
    from .models import choose_default_model, spec_for

    note = None
    if weights is not None and (model is None or model.startswith("facenet")):
        from .models.facenet import embedding_dim, model_id_for
        from .models.weights import resolve_weights

        # the weights name the model: the published file keeps its id, any other gets facenet-custom-<hash>
        model = model_id_for(resolve_weights("facenet-vggface2", explicit=weights), model or "facenet-vggface2")
        if model.startswith("facenet-custom-"):
            dim = embedding_dim(weights)
    if model is None:
        model, note = choose_default_model(weights)
    spec = spec_for(model, dim)
    thr, source = spec.default_threshold(flip)
    if threshold is not None:
        thr, source = threshold, "given at init"
    with FaceDB.create(ctx.obj.db, model_id=spec.id, dim=spec.dim, threshold=thr, threshold_source=source,
                       index=index, flip=flip) as db:
        info = {"created": str(db.root), "model_id": db.model_id, "dim": db.dim, "threshold": db.threshold,
                "flip": db.flip, "index_kind": db.index_kind}
    if note:
        typer.echo(note, err=True)
    _emit_kv(ctx, info)


@command()
def people(ctx: typer.Context) -> None:
    """List enrolled people."""
    with _open(ctx) as db:
        rows = [p.to_dict() for p in db.people()]
    _emit(ctx, rows, ["name", "templates", "images", "external_id", "updated_at"])


@command()
def show(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Person's name.")]) -> None:
    """Show one person."""
    with _open(ctx) as db:
        _emit_kv(ctx, db.person(name).to_dict())


@command(name="add-person")
def add_person(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Person's name (unique).")],
    external_id: Annotated[str | None, typer.Option(help="Your system's id for them (unique).")] = None,
    meta: Annotated[list[str] | None, typer.Option(help="key=value metadata; repeatable.")] = None,
) -> None:
    """Create a person with no templates yet."""
    with _open(ctx) as db:
        _emit_kv(ctx, db.add_person(name, external_id=external_id, metadata=_parse_meta(meta)).to_dict())


@command()
def remove(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Person's name.")]) -> None:
    """Erase a person: templates, images and metadata, from the store and the index."""
    with _open(ctx) as db:
        n = db.remove_person(name)
    _emit_kv(ctx, {"removed": name, "templates": n})


@command()
def rename(
    ctx: typer.Context,
    old: Annotated[str, typer.Argument(help="Current name.")],
    new: Annotated[str, typer.Argument(help="New name.")],
) -> None:
    """Rename a person."""
    with _open(ctx) as db:
        _emit_kv(ctx, db.rename_person(old, new).to_dict())


@command()
def stats(ctx: typer.Context) -> None:
    """Model, threshold, counts and index state."""
    with _open(ctx) as db:
        _emit_kv(ctx, db.stats())


@command()
def check(ctx: typer.Context) -> None:
    """Verify the store's integrity and that the index agrees with it; exit 1 on any problem."""
    with _open(ctx) as db:
        report = db.check()
    if ctx.obj.json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        for c in report.checks:
            typer.echo(f"checked: {c}")
        for p in report.problems:
            typer.echo(f"PROBLEM: {p}")
        typer.echo("ok" if report.ok else f"{len(report.problems)} problem(s)")
    if not report.ok:
        raise typer.Exit(1)


@command()
def vacuum(ctx: typer.Context) -> None:
    """Compact the database so no byte of removed people's templates remains in its files."""
    with _open(ctx) as db:
        db.vacuum()
        _emit_kv(ctx, {"vacuumed": str(db.root)})


@command()
def reindex(
    ctx: typer.Context,
    index: Annotated[str, typer.Option(help="flat, flat16, hnsw, ivf, ivfpq, or auto.")],
    nprobe: Annotated[int | None, typer.Option(help="IVF: lists searched per probe.")] = None,
    nlist: Annotated[
        int | None, typer.Option(help="IVF: number of lists (default ~4 sqrt(n), a power of two, at most n/39).")
    ] = None,
    ef_search: Annotated[int | None, typer.Option(help="HNSW: search breadth.")] = None,
    ef_construction: Annotated[int | None, typer.Option(help="HNSW: build breadth.")] = None,
    m: Annotated[int | None, typer.Option("--m", help="HNSW: links per node.")] = None,
) -> None:
    """Change the index kind and its settings, and rebuild it from the store."""
    params = {k: v for k, v in {"nprobe": nprobe, "nlist": nlist, "ef_search": ef_search,
                                "ef_construction": ef_construction, "M": m}.items() if v is not None}
    with _open(ctx) as db:
        try:
            _emit_kv(ctx, db.reindex(index, params))
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from None


@command(name="rebuild-index")
def rebuild_index(ctx: typer.Context) -> None:
    """Rebuild the index from the store (it is also rebuilt by itself whenever found stale)."""
    with _open(ctx) as db:
        n = db.rebuild_index()
    _emit_kv(ctx, {"indexed": n})


WeightsOpt = Annotated[Path | None, typer.Option(envvar="FACEDB_WEIGHTS", help="FaceNet weights file (.pt).")]
ThresholdOpt = Annotated[
    float | None, typer.Option(help="Cosine similarity to accept at; default: the database's stored threshold.")
]


def _progress(total: int, label: str) -> tuple[Any, Callable[[int], None]]:
    from tqdm import tqdm

    bar = tqdm(total=total, unit="photo", desc=label, file=sys.stderr, disable=None, leave=False)

    def update(done: int) -> None:
        bar.update(done - bar.n)

    return bar, update


@command()
def enroll(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Person's name (omit with --folder).")] = None,
    photos: Annotated[list[Path] | None, typer.Argument(help="Photos of them, one face each.")] = None,
    folder: Annotated[
        Path | None, typer.Option(help="A folder with one sub-folder of photos per person (sub-folder = name).")
    ] = None,
    meta: Annotated[list[str] | None, typer.Option(help="key=value metadata for the person; repeatable.")] = None,
    on_multiple: Annotated[
        str, typer.Option(help="A photo with several faces: error (skip it), largest, or skip.")
    ] = "error",
    weights: WeightsOpt = None,
    workers: Annotated[
        int | None,
        typer.Option(min=0, envvar="FACEDB_ENROLL_WORKERS",
                     help="Detection processes beside the embedder; 0 = a thread. Default: cores - 1 for 64+ "
                          "photos with dlib on CPU, else 0."),
    ] = None,
) -> None:
    """Enrol photos of a person, or a whole folder of people. Prints a summary; skipped photos say why."""
    from .pipeline import list_folder

    if folder is not None:
        if name is not None or photos:
            raise InvalidInputError("give either NAME PHOTO... or --folder DIR, not both")
        batches = [(person, list(files)) for person, files in list_folder(folder)]
    else:
        if not name or not photos:
            raise InvalidInputError("give NAME and at least one PHOTO, or --folder DIR")
        batches = [(name, list(photos))]
    total = sum(len(files) for _, files in batches)
    with _open(ctx, weights=weights) as db:
        bar, update = _progress(total, "enrolling")
        try:
            report = db.enroll_many(batches, on_multiple=on_multiple, metadata=_parse_meta(meta) or None,
                                    progress=update, workers=workers)
        finally:
            bar.close()
    if ctx.obj.json:
        out = report.to_dict()
        out.pop("template_ids")
        typer.echo(json.dumps(out, ensure_ascii=False))
    else:
        for sk in report.skipped:
            typer.echo(f"skipped  {sk.image}: {sk.reason}")
        typer.echo(
            f"people {len(report.people)}  photos {report.photos}  faces stored {report.faces_stored}  "
            f"skipped {len(report.skipped)}"
        )
    if report.photos and not report.faces_stored:
        raise typer.Exit(1)


@command()
def search(
    ctx: typer.Context,
    photos: Annotated[list[Path], typer.Argument(help="Photos to identify; every face in each.")],
    k: Annotated[int, typer.Option("-k", "--top", help="Candidates per face.")] = 5,
    threshold: ThresholdOpt = None,
    weights: WeightsOpt = None,
) -> None:
    """Who is in these photos? One line per face; identity '-' (JSON null) means unknown."""
    from .images import display_name

    failed = 0
    with _open(ctx, weights=weights) as db:
        if threshold is None and (warning := db.calibration_warning()):
            typer.echo(f"warning: {warning}", err=True)
        for photo in photos:
            label = display_name(photo)
            try:
                matches = db.search(photo, k=k, threshold=threshold, name=label)
            except FaceDBError as exc:
                failed += 1
                typer.echo(f"error: {exc}", err=True)
                continue
            if not matches:
                if ctx.obj.json:
                    typer.echo(json.dumps({"image": label, "faces": 0, "identity": None}, ensure_ascii=False))
                else:
                    typer.echo(f"{label}\tno face")
                continue
            for m in matches:
                if ctx.obj.json:
                    typer.echo(json.dumps(m.to_dict(), ensure_ascii=False))
                else:
                    sim = "-" if m.similarity is None else f"{m.similarity:.4f}"
                    best = m.candidates[0].name if m.candidates else "-"
                    typer.echo(f"{label}\t{m.identity or 'unknown'}\tsimilarity={sim}\tbest={best}\t"
                               f"threshold={m.threshold:.4f}\tbox={m.box}")
    if failed:
        raise typer.Exit(1)


@command()
def verify(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Who the photo is claimed to be.")],
    photo: Annotated[Path, typer.Argument(help="The photo (its largest face is used).")],
    threshold: ThresholdOpt = None,
    weights: WeightsOpt = None,
) -> None:
    """Is this photo NAME? Prints yes or no and the score; exit 0 for yes, 2 for no."""
    with _open(ctx, weights=weights) as db:
        result = db.verify(photo, name, threshold)
    if ctx.obj.json:
        typer.echo(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        typer.echo(f"{'yes' if result.accepted else 'no'}\tsimilarity={result.similarity:.4f}\t"
                   f"threshold={result.threshold:.4f}")
    if not result.accepted:
        raise typer.Exit(2)


def _since(value: str | None) -> str | None:
    """'2026-11-28T10:00', '90m', '24h', '7d' -> an ISO 8601 UTC time."""
    from datetime import datetime, timedelta, timezone

    if value is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[-1:] in units and value[:-1].replace(".", "", 1).isdigit():
        when = datetime.now(timezone.utc) - timedelta(seconds=float(value[:-1]) * units[value[-1]])
    else:
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidInputError(f"--since takes an ISO time or an age like 24h or 7d, got {value!r}") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="milliseconds")


@command()
def audit(
    ctx: typer.Context,
    since: Annotated[str | None, typer.Option(help="ISO time (UTC if no zone) or an age: 90m, 24h, 7d.")] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many records.")] = None,
) -> None:
    """Read the audit trail of decisions (identity '-' / null = unknown), oldest first."""
    with _open(ctx) as db:
        rows = db.audit(_since(since), limit)
    _emit(ctx, rows, ["time", "operation", "identity", "similarity", "threshold", "image_sha256"])


@command(name="audit-settings")
def audit_settings(
    ctx: typer.Context,
    enable: Annotated[bool | None, typer.Option("--enable/--disable", help="Switch the trail on or off.")] = None,
    retention_days: Annotated[float | None, typer.Option(help="Keep records this many days (0 = forever).")] = None,
    store_embeddings: Annotated[
        bool | None,
        typer.Option("--store-embeddings/--no-store-embeddings", help="Also store each probe's embedding."),
    ] = None,
) -> None:
    """Show or change the audit trail's settings."""
    with _open(ctx) as db:
        _emit_kv(ctx, db.configure_audit(enabled=enable, retention_days=retention_days,
                                         store_embeddings=store_embeddings))


eval_app = typer.Typer(help="Measure accuracy: LFW verification, open-set identification.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


def _data_root() -> Path:
    import os

    return Path(os.environ.get("FACEDB_TEST_DATA", "../shared/facedata"))


def _eval_pipeline(ctx: typer.Context, model: str | None, weights: Path | None) -> Any:
    from .pipeline import get_pipeline

    if model is None:
        from .db import STORE_FILE

        if (ctx.obj.db / STORE_FILE).exists():
            with _open(ctx) as db:
                model = db.model_id
        else:
            from .models import choose_default_model

            model, note = choose_default_model(weights)
            if note:
                typer.echo(note, err=True)
    return get_pipeline(model, weights=weights)


def _photo_progress(label: str) -> tuple[Any, Callable[[int], None]]:
    from tqdm import tqdm

    bar = tqdm(unit="photo", desc=label, file=sys.stderr, disable=None, leave=False)
    return bar, lambda done: bar.update(done - bar.n)


ModelOpt = Annotated[str | None, typer.Option(help="Model id; default: the database's, else the default model.")]
PairsOpt = Annotated[
    Path | None, typer.Option(help="LFW pairs file; default: $FACEDB_TEST_DATA/lfw_protocol/pairs.txt.")
]
LfwOpt = Annotated[Path | None, typer.Option(help="LFW photo folder; default: $FACEDB_TEST_DATA/lfw_deepfunneled.")]


@command("lfw", group=eval_app)
def eval_lfw(
    ctx: typer.Context,
    pairs: PairsOpt = None,
    lfw: LfwOpt = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    flip: Annotated[bool, typer.Option(help="Average each embedding with its mirror image's (as databases do "
                                              "by default).")] = True,
    plot: Annotated[Path | None, typer.Option(help="Write ROC and score histograms to this PNG.")] = None,
) -> None:
    """LFW verification: 10-fold accuracy, TAR at FAR 1e-2/1e-3/1e-4, EER (through facedb's own pipeline)."""
    from .evaluate import run_lfw

    pairs = pairs or _data_root() / "lfw_protocol" / "pairs.txt"
    if not pairs.is_file():
        raise InvalidInputError(f"no pairs file at {pairs} (give --pairs, or set FACEDB_TEST_DATA)")
    pipe = _eval_pipeline(ctx, model, weights)
    bar, update = _photo_progress("embedding")
    try:
        report = run_lfw(pairs, lfw or _data_root() / "lfw_deepfunneled", pipe, flip=flip, progress=update,
                         plot=plot)
    finally:
        bar.close()
    _emit_kv(ctx, report)


@command("identify", group=eval_app)
def eval_identify(
    ctx: typer.Context,
    folder: Annotated[Path | None, typer.Option(help="One sub-folder per person; default: LFW.")] = None,
    enrol: Annotated[int, typer.Option(help="Photos enrolled per person.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the random split.")] = 0,
    half: Annotated[str | None, typer.Option(help="Use only half 'a' or 'b' of the people (split by person).")] = None,
    check_calibration: Annotated[
        bool, typer.Option(help="With --half: calibrate FPIR 1% on the other half, measure FPIR on this one.")
    ] = False,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    flip: Annotated[bool, typer.Option(help="Average each embedding with its mirror image's (as databases do "
                                              "by default).")] = True,
) -> None:
    """Open-set identification: rank-1/5 and DIR at FPIR 1% and 0.1%, through a real temporary facedb."""
    import tempfile

    from .evaluate import run_identify

    if half not in (None, "a", "b"):
        raise typer.BadParameter("--half is a or b")
    pipe = _eval_pipeline(ctx, model, weights)
    bar, update = _photo_progress("embedding")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            report = run_identify(folder or _data_root() / "lfw_deepfunneled", pipe, Path(tmp), enrol=enrol,
                                  seed=seed, half=half, flip=flip, progress=update,
                                  calibrate_on_other_half=check_calibration)
        finally:
            bar.close()
    _emit_kv(ctx, report)


@command()
def calibrate(
    ctx: typer.Context,
    far: Annotated[float | None, typer.Option(help="Target false accept rate, 1:1 (e.g. 1e-3).")] = None,
    fpir: Annotated[float | None, typer.Option(help="Target false positive identification rate, 1:N.")] = None,
    pairs: PairsOpt = None,
    lfw: LfwOpt = None,
    folder: Annotated[Path | None, typer.Option(help="Labelled folder (one sub-folder per person).")] = None,
    gallery_size: Annotated[
        int | None, typer.Option(help="With --fpir: gallery size to calibrate for; default: people enrolled now.")
    ] = None,
    people: Annotated[
        Path | None, typer.Option(help="With --folder: only the people named in this LFW people file.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for sampling.")] = 0,
    dry_run: Annotated[bool, typer.Option(help="Measure and print; do not store the threshold.")] = False,
    weights: WeightsOpt = None,
) -> None:
    """Choose the threshold for a target FAR (1:1) or FPIR (1:N) from labelled data and store it."""
    import tempfile
    from datetime import datetime, timezone

    from .evaluate import calibrate_far_folder, calibrate_far_pairs, calibrate_fpir_folder

    if (far is None) == (fpir is None):
        raise InvalidInputError("give exactly one of --far or --fpir")
    rate = far if far is not None else fpir
    assert rate is not None
    if not 0 < rate < 1:
        raise InvalidInputError("the target rate is a fraction in (0, 1), e.g. 1e-3")
    with _open(ctx, weights=weights) as db:
        pipe = db.pipeline()
        bar, update = _photo_progress("embedding")
        try:
            if far is not None and folder is None:
                rec = calibrate_far_pairs(pairs or _data_root() / "lfw_protocol" / "pairsDevTrain.txt",
                                          lfw or _data_root() / "lfw_deepfunneled", pipe, far, flip=db.flip,
                                          progress=update)
            elif far is not None:
                assert folder is not None
                from .evaluate import read_people

                rec = calibrate_far_folder(folder, pipe, far, seed=seed, progress=update, flip=db.flip,
                                           people=read_people(people) if people else None)
            else:
                assert fpir is not None
                size = gallery_size if gallery_size is not None else max(db.stats()["people"], 1)
                with tempfile.TemporaryDirectory() as tmp:
                    rec = calibrate_fpir_folder(folder or _data_root() / "lfw_deepfunneled", pipe, fpir, size,
                                                Path(tmp), seed=seed, flip=db.flip, progress=update)
        finally:
            bar.close()
        rec["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if not rec.get("resolvable", True):
            typer.echo("warning: too few impostor comparisons to resolve that rate; the threshold sits just above "
                       "the highest impostor score", err=True)
        if not dry_run:
            db.set_threshold(float(rec["threshold"]), f"calibrated: {rec['target']} {rate:g} on {rec['source']}",
                             **rec)
        rec["stored"] = not dry_run
    _emit_kv(ctx, rec)


@command()
def train(
    ctx: typer.Context,
    folder: Annotated[Path, typer.Option(help="Labelled photos: one sub-folder per person.")],
    out: Annotated[Path, typer.Option(help="Where to write the trained weights (.pt).")],
    people: Annotated[
        Path | None, typer.Option(help="Only the people named in this LFW people file (e.g. peopleDevTrain.txt).")
    ] = None,
    loss: Annotated[str, typer.Option(help="triplet or softmax.")] = "triplet",
    mining: Annotated[str, typer.Option(help="Triplet mining: semi-hard or batch-hard.")] = "semi-hard",
    embedding_size: Annotated[int, typer.Option(help="128 as in the paper, 512 as in the released weights.")] = 128,
    init_from: Annotated[str, typer.Option("--init", help="random, vggface2, casia-webface, or a .pt file.")
                         ] = "random",
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 10,
    steps: Annotated[int, typer.Option(help="Batches per epoch.")] = 100,
    people_per_batch: Annotated[int, typer.Option(help="P: people in a batch.")] = 16,
    faces_per_person: Annotated[int, typer.Option(help="K: faces per person in a batch.")] = 4,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    center_loss: Annotated[float, typer.Option(help="Centre-loss weight (softmax only).")] = 0.0,
    val_fraction: Annotated[float, typer.Option(help="Share of people held out for validation.")] = 0.1,
    minutes: Annotated[float | None, typer.Option(help="Stop after this many minutes.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    resume: Annotated[bool, typer.Option(help="Continue from OUT.ckpt.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for the split and batches.")] = 0,
) -> None:
    """Train or fine-tune a FaceNet embedding (triplet loss with online mining, or softmax)."""
    from .evaluate import cache_dir, read_people
    from .train.data import cache_name, prepare_crops, split_by_person
    from .train.loop import TrainConfig
    from .train.loop import train as run_training

    only = read_people(people) if people else None
    bar, update = _photo_progress("aligning")
    try:
        crops, labels, names = prepare_crops(folder, cache_dir() / "train-crops" / cache_name(folder, only),
                                             progress=update, people=only)
    finally:
        bar.close()
    _, val_mask = split_by_person(labels, val_fraction, seed)
    typer.echo(f"{len(crops)} faces of {len(names)} people; {int(val_mask.sum())} faces of held-out people "
               "for validation", err=True)
    cfg = TrainConfig(loss=loss, mining=mining, embedding_size=embedding_size, init=init_from, epochs=epochs,
                      steps_per_epoch=steps, people_per_batch=people_per_batch, faces_per_person=faces_per_person,
                      lr=lr, center_loss=center_loss, device=device, seed=seed, minutes=minutes)
    result = run_training(crops, labels, val_mask, cfg, out, resume=resume, log=lambda m: typer.echo(m, err=True))
    from .models.facenet import model_id_for

    result["model_id"] = model_id_for(out, "facenet-vggface2")
    result["use_with"] = f"facedb init --model facenet --weights {out}"
    result["history"] = result["history"][-1]
    _emit_kv(ctx, result)


def main() -> None:
    try:
        app()
    except BrokenPipeError:  # `facedb people | head`
        sys.stderr.close()


if __name__ == "__main__":
    main()
