"""Commands that create, inspect and maintain a database: init, stats, check, vacuum, reindex, rebuild-index,
audit, audit-settings."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from ..choices import DetectorKind, RuleKind, ThumbnailMode
from ..errors import InvalidInputError
from . import EXIT_NO, WeightsOpt, command, emit, emit_kv, open_db, state


class IndexKind(str, Enum):
    """Index kinds ``init``/``reindex`` offer (the FAISS backend's, Milvus, and ``auto``)."""

    flat = "flat"
    flat16 = "flat16"
    hnsw = "hnsw"
    ivf = "ivf"
    ivfpq = "ivfpq"
    milvus = "milvus"
    auto = "auto"


class Quantizer(str, Enum):
    """IVF coarse quantizers (``facedb/gallery/index/faiss_kinds.py`` QUANTIZERS)."""

    flat = "flat"
    pca = "pca"
    fp16 = "fp16"
    hnsw = "hnsw"


MilvusUriOpt = Annotated[str | None, typer.Option(
    envvar="FACEDB_MILVUS_URI", help="--index milvus: http(s)://host:19530 (a Milvus server or cluster) or a path "
                                     "ending in .db (Milvus Lite, one process). Stored in the database.")]
MilvusCollectionOpt = Annotated[str | None, typer.Option(
    help="--index milvus: the collection (alias) name, one per database; default facedb. Stored in the database.")]
MilvusTokenOpt = Annotated[str | None, typer.Option(
    envvar="FACEDB_MILVUS_TOKEN", show_envvar=True,
    help="--index milvus: 'user:password' or an API key, for this command only (never stored: every later command "
         "reads FACEDB_MILVUS_TOKEN). Prefer the environment variable to the option.")]


def milvus_options(index: IndexKind, uri: str | None, collection: str | None, token: str | None) -> dict[str, str]:
    """The index options the Milvus flags give (none unless the kind is milvus)."""
    if index is not IndexKind.milvus:
        if collection is not None:
            raise InvalidInputError("--milvus-collection goes with --index milvus")
        return {}
    given = {"milvus_uri": uri, "milvus_collection": collection, "milvus_token": token}
    return {k: v for k, v in given.items() if v}


def _initial_decision(spec: Any, flip: bool, rule: RuleKind | None, threshold: float | None
                      ) -> tuple[RuleKind, float, str, float | None, Any]:
    """(rule, threshold, its source, margin, impostor model) a new database of model ``spec`` starts with: the
    rule given, else the one the model's calibration supports (margin, else gallery, else fixed); the threshold
    given, else the model's default. InvalidInputError when the rule given needs calibration the model lacks."""
    margin = spec.margin_threshold(flip)
    impostors = spec.impostor_model(flip)
    if rule is None:
        rule = RuleKind.margin if margin is not None else RuleKind.gallery if impostors is not None else RuleKind.fixed
    thr, source = spec.default_threshold(flip)
    if threshold is not None:
        thr, source = threshold, "given at init"
    if rule is RuleKind.gallery and impostors is None:
        raise InvalidInputError(f"{spec.id} ships no impostor model for the gallery rule: use --rule fixed and "
                                "calibrate (`facedb calibrate --far ... --folder DIR` builds one from your photos)")
    if rule is RuleKind.margin and margin is None:
        raise InvalidInputError(f"{spec.id} ships no margin threshold for the margin rule: use --rule fixed and "
                                "calibrate (`facedb calibrate --fpir 0.01 --folder DIR`)")
    return rule, thr, source, margin, impostors


def _encryption_key(ctx: typer.Context) -> Any:
    """The source of the key ``init --encrypt`` encrypts under (--key-file, --key-command or $FACEDB_KEY: a
    ``KeySource``); KeyMissingError when none is given."""
    key = state(ctx).key()
    if key is None:
        from ..errors import KeyMissingError

        raise KeyMissingError("--encrypt needs a key: --key-file, --key-command or $FACEDB_KEY (`facedb genkey` "
                              "makes one)")
    return key


@command()
def init(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Option(help="facenet-vggface2, facenet-casia, sface, dlib-resnet, or your own id with --dim."),
    ] = None,
    dim: Annotated[int | None, typer.Option(min=1, help="Vector dimension, for a model facedb does not know.")] = None,
    threshold: Annotated[
        float | None, typer.Option(help="Decision threshold (cosine similarity); default: the model's.")
    ] = None,
    index: Annotated[IndexKind, typer.Option(help="Index kind: flat (exact), flat16, hnsw, ivf, ivfpq, milvus (a "
                                                  "Milvus collection: see --milvus-uri), or auto (by gallery "
                                                  "size).")] = IndexKind.flat,
    weights: WeightsOpt = None,
    flip: Annotated[
        bool, typer.Option(help="Embed photos with flip test-time augmentation (2x embedding time; more accurate).")
    ] = True,
    force: Annotated[bool, typer.Option(help="Create the database even if the model's weights cannot be found "
                                              "now (it cannot enrol or search photos until they are).")] = False,
    milvus_uri: MilvusUriOpt = None,
    milvus_collection: MilvusCollectionOpt = None,
    milvus_token: MilvusTokenOpt = None,
    mean_templates: Annotated[bool, typer.Option(help="Keep each person's mean template beside their photo "
                                                      "templates (more accurate with 2+ photos each).")] = True,
    rule: Annotated[RuleKind | None, typer.Option(help="Open-set decision rule: margin (the best score and its "
                                                       "lead over the runner-up; the default when the model ships "
                                                       "its calibration), gallery (the 1:N threshold follows the "
                                                       "gallery size), or fixed.")] = None,
    encrypt: Annotated[bool, typer.Option(help="Encrypt it at rest under the key from --key-file, --key-command or "
                                                "$FACEDB_KEY (docs/protection.md).")] = False,
    cancellable: Annotated[bool, typer.Option(help="Store templates under a keyed random orthogonal projection of "
                                                    "this database (same scores; unlinkable across databases).")
                           ] = False,
    thumbnails: Annotated[ThumbnailMode, typer.Option(help="Face thumbnails kept in the store (biometric data): off, "
                                                        "enrolled (templates' faces) or all (also decisions' and "
                                                        "unknown visitors' faces). See docs/console.md.")
                          ] = ThumbnailMode.enrolled,
    detector: Annotated[DetectorKind, typer.Option(help="Face detector: mtcnn (the default) or yunet (OpenCV's "
                                                        "YuNet: needs the opencv extra). See docs/models.md, "
                                                        "\"Detectors\".")] = DetectorKind.mtcnn,
) -> None:
    """Create a new, empty database."""
    from ..db import FaceDB
    from ..faces.models import resolve_model

    options = milvus_options(index, milvus_uri, milvus_collection, milvus_token)
    spec, note = resolve_model(model, weights=weights, dim=dim, check_weights=not force)
    rule, thr, source, margin, impostors = _initial_decision(spec, flip, rule, threshold)
    if detector is DetectorKind.yunet and not force:  # OpenCV and the weights now, not at the first enrolment
        from ..faces.yunet import check_available

        check_available()
    key = _encryption_key(ctx) if encrypt else None
    with FaceDB.create(state(ctx).db, model_id=spec.id, dim=spec.dim, threshold=thr, threshold_source=source,
                       index=index.value, flip=flip, impostors=impostors, margin=margin, rule=rule.value,
                       mean_templates=mean_templates,
                       index_options=options, encrypt=encrypt,
                       key=key, cancellable=cancellable, thumbnails=thumbnails.value,
                       detector=detector.value) as db:
        s = db.settings()
        info = {"created": str(db.root), "model_id": db.model_id, "dim": db.dim, "threshold": db.threshold,
                "flip": db.flip, "index_kind": db.index_kind, "decision_rule": s.rule.kind, **s.index_options,
                "encrypted": db.encrypted, "cancellable": db.cancellable, "thumbnails": s.thumbnails,
                "detector": s.detector}
    if note:
        typer.echo(note, err=True)
    emit_kv(ctx, info)


@command(name="thumbnails")
def thumbnails_cmd(
    ctx: typer.Context,
    mode: Annotated[ThumbnailMode | None, typer.Argument(help="off, enrolled or all; none: show the setting and "
                                                           "the counts.")] = None,
) -> None:
    """Which face thumbnails the database keeps (off, enrolled, all); narrowing erases those no longer kept."""
    with open_db(ctx, readonly=mode is None) as db:
        if mode is not None:
            db.configure_thumbnails(mode.value)
        emit_kv(ctx, {"thumbnails": db.settings().thumbnails, **db.count_thumbnails()})


class OnOff(str, Enum):
    on = "on"
    off = "off"


@command(name="mean-templates")
def mean_templates_cmd(
    ctx: typer.Context,
    state_: Annotated[OnOff | None, typer.Argument(metavar="[on|off]", help="on: keep (and recompute now) each "
                                                   "person's mean template; off: drop them; none: show.")] = None,
) -> None:
    """Each person's mean template, searched beside their photo templates (docs/thresholds-and-accuracy.md):
    show, switch on (every mean recomputed from the photo templates: also the repair when `check` finds one
    stale) or off."""
    with open_db(ctx, readonly=state_ is None) as db:
        if state_ is not None:
            db.configure_templates(mean=state_ is OnOff.on)
        s = db.stats()
        emit_kv(ctx, {"mean_templates_enabled": s.mean_templates_enabled, "mean_templates": s.mean_templates,
                      "people_with_one_template": s.people_with_one_template})


@command()
def stats(ctx: typer.Context) -> None:
    """Model, threshold and its provenance, counts, index state, warnings."""
    with open_db(ctx, readonly=True) as db:
        emit_kv(ctx, db.stats().to_dict())


@command()
def check(
    ctx: typer.Context,
    duplicates: Annotated[bool, typer.Option("--duplicates", help="Instead: report people who look enrolled twice "
                                                                   "(under two names) or split in two (never a "
                                                                   "change); exit 1 if any.")] = False,
    threshold: Annotated[float | None, typer.Option(help="--duplicates: cosine similarity at which two sets of "
                                                         "templates are one person (default: the clustering "
                                                         "threshold).")] = None,
) -> None:
    """Verify the store's integrity and that the index agrees with it; exit 1 on any problem."""
    if threshold is not None and not duplicates:
        raise InvalidInputError("--threshold goes with --duplicates")
    if duplicates:
        from .cluster import print_duplicates

        with open_db(ctx, readonly=True) as db:
            found = db.duplicates(threshold)
        print_duplicates(ctx, found)
        if found.found:
            raise typer.Exit(EXIT_NO)
        return
    with open_db(ctx) as db:
        report = db.check()
    if state(ctx).json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        for c in report.checks:
            typer.echo(f"checked: {c}")
        for p in report.problems:
            typer.echo(f"PROBLEM: {p}")
        typer.echo("ok" if report.ok else f"{len(report.problems)} problem(s)")
    if not report.ok:
        raise typer.Exit(EXIT_NO)


@command()
def vacuum(ctx: typer.Context) -> None:
    """Compact the database so no byte of removed people's templates remains in its files."""
    with open_db(ctx) as db:
        db.vacuum()
        emit_kv(ctx, {"vacuumed": str(db.root)})


@command()
def backup(
    ctx: typer.Context,
    dest: Annotated[str, typer.Argument(help="A new directory for the copy.")],
    with_index: Annotated[bool, typer.Option(
        "--with-index", help="Copy the index file too (it is derived: a restored database rebuilds it otherwise).")
    ] = False,
) -> None:
    """An online, consistent copy of the database while the service keeps answering and writing; an encrypted
    one stays encrypted (the copy names the key it needs; the key is never written)."""
    if not dest.strip():  # Path("") is ".": the current directory is never what an empty argument meant
        raise InvalidInputError("DEST is empty: name a new directory for the backup")
    with open_db(ctx) as db:
        emit_kv(ctx, db.backup(Path(dest), with_index=with_index).to_dict())


@command()
def restore(
    ctx: typer.Context,
    src: Annotated[Path, typer.Argument(help="A directory `facedb backup` made.")],
    replace: Annotated[bool, typer.Option("--replace", help="Replace the database at --db (moved aside to "
                                                             "DB.replaced-TIME; refused while any process has it "
                                                             "open, or if --db is not a facedb database).")] = False,
) -> None:
    """Check a backup (its hash, key, integrity, model, schema) and restore it as the database at --db."""
    from ..db import FaceDB

    st = state(ctx)
    # the key opens the backup (its database's key when it was made); the database replaced needs none
    emit_kv(ctx, FaceDB.restore(src, st.db, key=st.key(), replace=replace).to_dict())


@command()
def reindex(
    ctx: typer.Context,
    index: Annotated[IndexKind, typer.Option(help="flat, flat16, hnsw, ivf, ivfpq, milvus, or auto.")],
    nprobe: Annotated[int | None, typer.Option(min=1, help="IVF: lists searched per probe.")] = None,
    nlist: Annotated[
        int | None, typer.Option(min=1, help="IVF: number of lists (default ~4 sqrt(n), a power of two, at most "
                                             "n/39).")
    ] = None,
    ef_search: Annotated[int | None, typer.Option(min=1, help="HNSW: search breadth.")] = None,
    ef_construction: Annotated[int | None, typer.Option(min=1, help="HNSW: build breadth.")] = None,
    m: Annotated[int | None, typer.Option("--m", min=2, help="HNSW: links per node.")] = None,
    quantizer: Annotated[
        Quantizer | None, typer.Option(help="ivf, ivfpq: how a probe's lists are chosen: flat (float32), pca "
                                            "(in a PCA projection to dim/4; the default from 1,024 lists), fp16 or "
                                            "hnsw.")
    ] = None,
    milvus_uri: MilvusUriOpt = None,
    milvus_collection: MilvusCollectionOpt = None,
    milvus_token: MilvusTokenOpt = None,
) -> None:
    """Change the index kind and its settings, and rebuild it from the store (moving to Milvus fills the
    collection; moving back to a FAISS kind drops it)."""
    params = {k: v for k, v in {"nprobe": nprobe, "nlist": nlist, "ef_search": ef_search,
                                "ef_construction": ef_construction, "M": m,
                                "quantizer": quantizer.value if quantizer else None}.items() if v is not None}
    options = milvus_options(index, milvus_uri, milvus_collection, milvus_token)
    with open_db(ctx) as db:
        try:
            emit_kv(ctx, db.reindex(index.value, params, options).to_dict())
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from None


@command()
def reembed(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="The model to move to: sface, dlib-resnet, facenet-vggface2, "
                                            "facenet-casia (or a FaceNet weights file's id with --weights).")],
    photos: Annotated[Path | None, typer.Option(help="The enrolled photos, laid out as `enroll --folder` takes "
                                                      "them (<dir>/<person>/<photos>): used first, matched by "
                                                      "their bytes.")] = None,
    crops: Annotated[bool, typer.Option(help="Re-embed from the kept face thumbnails where no photo is given.")
                     ] = True,
    drop_unembeddable: Annotated[bool, typer.Option(help="Erase the templates that cannot be made again (their "
                                                         "people stay, to enrol again) instead of refusing the "
                                                         "move.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Make every template, report, change nothing.")] = False,
    weights: WeightsOpt = None,
) -> None:
    """Move the database to another embedding model: every template made again by it (from --photos, else from
    the kept face crops), with that model's thresholds and rule, all at once or not at all."""
    from . import Progress

    with open_db(ctx) as db:
        with Progress(ctx, "re-embedding", total=None, unit="template") as bar:
            report = db.reembed(model, photos=photos, crops=crops, drop_unembeddable=drop_unembeddable,
                                dry_run=dry_run, weights=weights, progress=lambda done, total: bar(done))
    out = report.to_dict()
    unembeddable = out.pop("unembeddable")
    if not state(ctx).json:
        for u in unembeddable:
            typer.echo(f"{'dropped' if report.moved else 'cannot re-embed'}: {u['person']} (template "
                       f"{u['template_id']}): {u['reason']}", err=True)
        for note in report.photos_ignored:
            typer.echo(f"photo not used: {note}", err=True)
        out.pop("photos_ignored")
        out["unembeddable"] = len(unembeddable)
    else:
        out["unembeddable"] = unembeddable
    emit_kv(ctx, out)


@command(name="rebuild-index")
def rebuild_index(ctx: typer.Context) -> None:
    """Rebuild the index from the store (it is also rebuilt by itself whenever found stale)."""
    with open_db(ctx) as db:
        n = db.rebuild_index()
    emit_kv(ctx, {"indexed": n})


@command()
def audit(
    ctx: typer.Context,
    since: Annotated[str | None, typer.Option(help="At or after this time: ISO 8601 with any offset "
                                                   "(2026-03-01T23:30-05:00, Z; UTC if no zone) or an age: "
                                                   "90m, 24h, 7d.")] = None,
    until: Annotated[str | None, typer.Option(help="Before this time (as --since).")] = None,
    operation: Annotated[str | None, typer.Option(help="Only this operation (identify, search, verify, enroll, "
                                                       "remove, ...).")] = None,
    actor: Annotated[str | None, typer.Option(help="Only what this actor asked (cli:USER, key:ID).")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many records.")] = None,
    offset: Annotated[int, typer.Option(min=0, help="Skip this many records first.")] = 0,
) -> None:
    """Read the audit trail of decisions (identity '-' / null = unknown), oldest first."""
    # the one parser of times (docs/cli.md, "Times"); here so errors name the option
    from ..gallery.store import utc_time

    with open_db(ctx, readonly=True) as db:
        rows = [r.to_dict() for r in db.audit(utc_time(since, "--since"), limit, until=utc_time(until, "--until"),
                                              operation=operation, actor=actor, offset=offset)]
    emit(ctx, rows, ["time", "operation", "actor", "identity", "similarity", "threshold", "image_sha256"])


@command(name="audit-settings")
def audit_settings(
    ctx: typer.Context,
    enable: Annotated[bool | None, typer.Option("--enable/--disable", help="Switch the trail on or off.")] = None,
    retention_days: Annotated[float | None, typer.Option(help="Keep records this many days (0 = forever).")] = None,
    store_probes: Annotated[
        bool | None,
        typer.Option("--store-probes/--no-store-probes", "--store-embeddings/--no-store-embeddings",
                     help="Also store each probe's embedding (biometric data; off by default)."),
    ] = None,
    sync: Annotated[
        bool | None,
        typer.Option("--sync/--async", help="--sync: each decision's record is committed before its answer; "
                                            "--async (new databases): by a background writer within 20 ms after it "
                                            "(docs/guarantees.md). Gallery changes are always synchronous."),
    ] = None,
) -> None:
    """Show or change the audit trail's settings."""
    with open_db(ctx) as db:
        emit_kv(ctx, db.configure_audit(enabled=enable, retention_days=retention_days,
                                        store_probes=store_probes, sync=sync).to_dict())


@command(name="rule")
def rule_cmd(
    ctx: typer.Context,
    kind: Annotated[RuleKind | None, typer.Argument(help="fixed, margin or gallery; omit to show the rule in force.")
                    ] = None,
    target: Annotated[float | None, typer.Option(help="gallery: the FPIR to hold (default 0.01).")] = None,
    margin: Annotated[float | None, typer.Option(help="margin: the threshold for s1 - 0.5 s2 (default: the "
                                                      "stored one, else the model's).")] = None,
) -> None:
    """Show or choose the open-set decision rule: a fixed threshold, the margin rule, or a threshold that follows
    the gallery size (docs/thresholds-and-accuracy.md)."""
    from ..gallery.decision import predicted_fpir

    with open_db(ctx, readonly=kind is None) as db:
        s = db.set_rule(kind.value, target=target, margin=margin) if kind is not None else db.settings()
        policy, templates = db.policy_in_force()
        impostors = s.rule.impostors or db._shipped_impostors(s)
        predicted = (predicted_fpir(impostors, policy.threshold, templates)
                     if impostors and policy.kind in ("fixed", "gallery") else None)
        emit_kv(ctx, {"decision_rule": s.rule.kind, "target_fpir": s.rule.target if s.rule.kind == "gallery" else None,
                      "margin_threshold": s.rule.margin if s.rule.kind == "margin" else None,
                      "templates": templates, "threshold_in_force": policy.threshold, "because": policy.explanation,
                      "predicted_fpir": predicted, "impostor_model": impostors.source if impostors else None,
                      "warning": db.calibration_warning(s)})
