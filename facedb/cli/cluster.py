"""Commands that group faces by identity: cluster (a folder of unlabelled photos), visitors (faces answered
unknown: list, enroll, forget, settings). ``check --duplicates`` lives with ``check`` in admin.py."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import FaceDBError, InvalidInputError
from . import EXIT_ERROR, Progress, WeightsOpt, app, command, emit, emit_kv, open_db, state


class Rule(str, Enum):
    """Grouping rules (facedb.operations.cluster.RULES)."""

    average = "average"
    chinese_whispers = "chinese-whispers"
    components = "components"


ClusterThresholdOpt = Annotated[
    float | None, typer.Option(help="Cosine similarity for grouping, in [-1, 1] (higher = stricter); default: "
                                    "derived from the database's threshold (see docs/clustering.md).")]
RuleOpt = Annotated[Rule, typer.Option(help="average (linkage; the default: keeps precision), chinese-whispers, "
                                            "or components (single linkage on the k-NN graph).")]


def _check_outputs(out: Path | None, sheet: Path | None) -> None:
    from ..operations.contact_sheet import SHEET_SUFFIXES

    if sheet is not None and sheet.suffix.lower() not in SHEET_SUFFIXES:
        raise InvalidInputError(f"--sheet is written as .html or .png, not {sheet.name!r}")
    for p in (out, sheet):
        if p is not None and not p.resolve().parent.is_dir():
            raise InvalidInputError(f"{p}: its folder does not exist")
        if p is not None and p.is_dir():
            raise InvalidInputError(f"{p} is a folder: give a file name")


def _write_outputs(report: Any, sources: list[Any], out: Path | None, sheet: Path | None,
                   sheet_clusters: int) -> None:
    from ..fsio import write_atomic
    from ..operations.contact_sheet import write_sheet

    target = out
    try:
        if out is not None:
            write_atomic(out, json.dumps(report.to_dict(), ensure_ascii=False, indent=1).encode("utf-8"))
        target = sheet
        if sheet is not None:
            write_sheet(report, sources, sheet, max_clusters=sheet_clusters)
    except OSError as exc:
        raise InvalidInputError(f"cannot write {target}: {exc.strerror or exc}") from None


@command(name="cluster")
def cluster_cmd(
    ctx: typer.Context,
    photos: Annotated[list[Path] | None, typer.Argument(help="Photos to cluster (or --folder).")] = None,
    folder: Annotated[Path | None, typer.Option(help="Cluster every photo under this folder (recursively).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the clusters as JSON here.")] = None,
    sheet: Annotated[Path | None, typer.Option(help="Write a contact sheet: .html (self-contained) or .png.")] = None,
    threshold: ClusterThresholdOpt = None,
    rule: RuleOpt = Rule.average,
    k: Annotated[int, typer.Option("-k", min=1, help="Neighbours per face in the similarity graph.")] = 10,
    min_size: Annotated[int, typer.Option(min=1, help="Smallest group reported as a cluster; smaller groups are "
                                                      "unclustered.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed (Chinese whispers' update order).")] = 0,
    sheet_clusters: Annotated[int, typer.Option(min=1, help="Clusters shown on the sheet (the largest).")] = 100,
    enroll_as_new: Annotated[bool, typer.Option("--enroll-as-new", help="Store each cluster as a new person "
                                                                        "cluster-0001, ... to rename later.")] = False,
    weights: WeightsOpt = None,
    workers: Annotated[int | None, typer.Option(min=0, envvar="FACEDB_ENROLL_WORKERS",
                                                help="Detection processes; 0 = a thread. Default as enroll.")] = None,
) -> None:
    """Group every face in unlabelled photos by identity. Prints one line per cluster; writes JSON and a contact
    sheet on request. The gallery is not read or changed, unless --enroll-as-new."""
    from ..operations.photo_clusters import list_photos

    if folder is not None and photos:
        raise InvalidInputError("give PHOTO... or --folder DIR, not both")
    sources = list_photos(folder) if folder is not None else list(photos or [])
    if not sources:
        raise InvalidInputError("give photos to cluster, or --folder DIR")
    _check_outputs(out, sheet)
    with open_db(ctx, weights=weights, readonly=not enroll_as_new) as db:
        with Progress(ctx, "detecting faces", len(sources)) as progress:
            report = db.cluster(sources, threshold=threshold, rule=rule.value, k=k, min_size=min_size, seed=seed,
                                workers=workers, progress=progress)
        _write_outputs(report, sources, out, sheet, sheet_clusters)  # before enrolling: a failed write stores nothing
        created = db.enroll_clusters(report) if enroll_as_new and report.clusters else []
    names = dict(enumerate(name for name, _ in created))
    if state(ctx).json:
        for c in report.clusters:
            typer.echo(json.dumps({"cluster": c.id, "size": c.size, "enrolled_as": names.get(c.id),
                                   "central": c.central.to_dict()}, ensure_ascii=False))
        typer.echo(json.dumps({"photos": report.photos, "faces": report.faces, "clusters": len(report.clusters),
                               "unclustered": len(report.unclustered), "skipped": [s.to_dict() for s in report.skipped],
                               "rule": report.rule, "threshold": report.threshold,
                               "threshold_source": report.threshold_source}, ensure_ascii=False))
    else:
        for s in report.skipped:
            typer.echo(f"skipped  {s.image}: {s.reason}")
        for c in report.clusters:
            enrolled = f"  enrolled as {names[c.id]}" if c.id in names else ""
            typer.echo(f"cluster {c.id}\t{c.size} faces\tcentral: {c.central.photo} box={c.central.box}{enrolled}")
        typer.echo(f"photos {report.photos}  faces {report.faces}  clusters {len(report.clusters)}  unclustered "
                   f"{len(report.unclustered)}  skipped {len(report.skipped)}  ({report.rule} at similarity "
                   f"{report.threshold:.4f}: {report.threshold_source})")
    if report.photos and not report.faces:
        raise typer.Exit(EXIT_ERROR)


# ------------------------------------------------------------------------------------------------- visitors
visitors_app = typer.Typer(
    help="Faces answered unknown (opt-in: `facedb visitors settings --enable`): list groups, enroll or forget "
         "one. Without a sub-command: list the groups.", no_args_is_help=False)
app.add_typer(visitors_app, name="visitors")

SinceOpt = Annotated[str | None, typer.Option(help="Only groups last seen at or after this time: ISO 8601 with any "
                                                   "offset (UTC if no zone) or an age (24h, 7d).")]


def _list_visitors(ctx: typer.Context, since: str | None, min_size: int, threshold: float | None,
                   rule: Rule | None) -> None:
    from ..gallery.store import utc_time

    since = utc_time(since, "--since")  # here, not in FaceDB.visitors, so that the error names the option
    with open_db(ctx) as db:
        if not db.settings().visitors.enabled:
            typer.echo("note: unknown visitors are not being kept (`facedb visitors settings --enable`)", err=True)
        groups = db.visitors(since, min_size=min_size, threshold=threshold,
                             rule=rule.value if rule else None)
    rows = []
    for g in groups:
        row = g.to_dict()
        if not state(ctx).json:
            row.pop("face_ids")
            row["actors"] = ", ".join(g.actors) or None
        rows.append(row)
    emit(ctx, rows, ["id", "faces", "photos", "first_seen", "last_seen", "best_similarity", "actors"])
    if not rows and not state(ctx).json:
        typer.echo("no groups")


@visitors_app.callback(invoke_without_command=True)
def visitors(
    ctx: typer.Context,
    since: SinceOpt = None,
    min_size: Annotated[int, typer.Option(min=1, help="Smallest group shown (1 shows faces seen once).")] = 2,
    threshold: ClusterThresholdOpt = None,
    rule: Annotated[Rule | None, typer.Option(help="Grouping rule (default: average).")] = None,
    db: Annotated[Path | None, typer.Option("--db", help="Database directory.", show_default=False)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List groups of faces answered unknown (most faces first), with counts, first and last seen."""
    root = ctx.find_root().obj
    if db is not None:
        root.db = db
    root.json = root.json or json_out
    if ctx.invoked_subcommand is not None:
        return
    try:
        _list_visitors(ctx, since, min_size, threshold, rule)
    except FaceDBError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR) from None


@command(name="list", group=visitors_app)
def visitors_list(
    ctx: typer.Context,
    since: SinceOpt = None,
    min_size: Annotated[int, typer.Option(min=1, help="Smallest group shown (1 shows faces seen once).")] = 2,
    threshold: ClusterThresholdOpt = None,
    rule: Annotated[Rule | None, typer.Option(help="Grouping rule (default: average).")] = None,
) -> None:
    """List groups of faces answered unknown (the same as `facedb visitors`)."""
    _list_visitors(ctx, since, min_size, threshold, rule)


@command(name="enroll", group=visitors_app)
def visitors_enroll(
    ctx: typer.Context,
    group: Annotated[str, typer.Argument(help="The group's id as listed (e.g. V17-3fa2c1).")],
    name: Annotated[str, typer.Option(help="The person to enrol them as (new or existing).")],
    threshold: ClusterThresholdOpt = None,
    rule: Annotated[Rule | None, typer.Option(help="The rule the group was listed with.")] = None,
) -> None:
    """Enrol a group's faces as NAME, in one transaction. Refused (nothing changes) if the group has changed
    since it was listed."""
    with open_db(ctx) as db:
        person = db.enroll_visitors(group, name, threshold=threshold, rule=rule.value if rule else None)
        emit_kv(ctx, {"enrolled": person.name, "group": group, "templates": person.templates})


@command(name="forget", group=visitors_app)
def visitors_forget(
    ctx: typer.Context,
    group: Annotated[str, typer.Argument(help="The group's id as listed (e.g. V17-3fa2c1).")],
    threshold: ClusterThresholdOpt = None,
    rule: Annotated[Rule | None, typer.Option(help="The rule the group was listed with.")] = None,
) -> None:
    """Erase a group's faces (run `facedb vacuum` to drop every byte of them from the files)."""
    with open_db(ctx) as db:
        n = db.forget_visitors(group, threshold=threshold, rule=rule.value if rule else None)
    emit_kv(ctx, {"forgotten": group, "faces": n})


@command(name="settings", group=visitors_app)
def visitors_settings(
    ctx: typer.Context,
    enable: Annotated[bool | None, typer.Option("--enable/--disable", help="Keep faces answered unknown.")] = None,
    retention_days: Annotated[float | None, typer.Option(help="Keep them this many days (default 30).")] = None,
) -> None:
    """Show or change whether faces answered unknown are kept, and for how long."""
    with open_db(ctx) as db:
        emit_kv(ctx, db.configure_visitors(enabled=enable, retention_days=retention_days).to_dict())


def print_duplicates(ctx: typer.Context, report: Any) -> None:
    """``check --duplicates`` output: one line per finding, then a summary."""
    if state(ctx).json:
        typer.echo(json.dumps(report.to_dict(), ensure_ascii=False))
        return
    for p in report.same_person:
        typer.echo(f"same person?  {p.a!r} and {p.b!r}: mean similarity {p.mean_similarity:.4f} (best "
                   f"{p.best_similarity:.4f}; {p.matching_pairs} template pairs at the threshold; {p.templates_a} + "
                   f"{p.templates_b} templates)  -> `facedb merge` if so")
    for s in report.split:
        groups = " | ".join(",".join(map(str, ids)) for ids in s.template_ids)
        typer.echo(f"split        {s.name!r}: {s.templates} templates in groups of "
                   f"{' + '.join(map(str, s.groups))} (mean similarity between the two largest "
                   f"{s.mean_similarity_between:.4f}); template ids: {groups}")
    for o in report.outliers:
        typer.echo(f"outlier      {o['name']!r}: template {o['template']} (best similarity to their others "
                   f"{o['best_similarity_to_own']:.4f})")
    typer.echo(f"{report.people} people, {report.templates} templates at similarity {report.threshold:.4f} "
               f"({report.threshold_source}): {len(report.same_person)} possible duplicates, {len(report.split)} "
               f"split, {len(report.outliers)} outlier templates. Nothing was changed.")


__all__ = ["cluster_cmd", "print_duplicates", "visitors"]
