"""Commands on people and their templates: people, show, add-person, update, rename, merge, remove,
templates, remove-template."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import InvalidInputError
from . import command, emit, emit_kv, open_db, parse_meta

MetaOpt = Annotated[list[str] | None, typer.Option(help="key=value metadata; repeatable.")]


@command()
def people(
    ctx: typer.Context,
    query: Annotated[str | None, typer.Option(
        help="Only names or external ids containing this (case- and accent-insensitive).")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many.")] = None,
    offset: Annotated[int, typer.Option(min=0, help="Skip this many first.")] = 0,
) -> None:
    """List enrolled people in name order (base letters, then accents, then case; the same everywhere)."""
    with open_db(ctx, readonly=True) as db:
        rows = [p.to_dict() for p in db.people(query, limit=limit, offset=offset)]
    emit(ctx, rows, ["name", "templates", "images", "external_id", "updated_at"])


@command()
def show(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Person's name.")]) -> None:
    """Show one person."""
    with open_db(ctx, readonly=True) as db:
        emit_kv(ctx, db.person(name).to_dict())


@command(name="add-person")
def add_person(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Person's name (unique).")],
    external_id: Annotated[str | None, typer.Option(help="Your system's id for them (unique).")] = None,
    meta: MetaOpt = None,
) -> None:
    """Create a person with no templates yet."""
    with open_db(ctx) as db:
        emit_kv(ctx, db.add_person(name, external_id=external_id, metadata=parse_meta(meta)).to_dict())


@command()
def update(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Person's name.")],
    meta: MetaOpt = None,
    unset: Annotated[list[str] | None, typer.Option(help="Metadata key to delete; repeatable.")] = None,
    replace: Annotated[bool, typer.Option(help="Replace all metadata with --meta instead of merging.")] = False,
    external_id: Annotated[str | None, typer.Option(help="Set your system's id for them (unique).")] = None,
    clear_external_id: Annotated[bool, typer.Option(help="Remove their external id.")] = False,
) -> None:
    """Change a person's metadata or external id (badge number, department...)."""
    metadata = parse_meta(meta)
    for key in unset or []:
        metadata[key] = None
    if not metadata and not replace and external_id is None and not clear_external_id:
        raise InvalidInputError("nothing to change: give --meta, --unset, --replace, --external-id or "
                                "--clear-external-id")
    if external_id is not None and clear_external_id:
        raise InvalidInputError("give --external-id or --clear-external-id, not both")
    with open_db(ctx) as db:
        person = db.update_person(name, metadata=metadata if metadata or replace else None,
                                  replace_metadata=replace, external_id=external_id,
                                  clear_external_id=clear_external_id)
        emit_kv(ctx, person.to_dict())


@command()
def remove(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Person's name.")]) -> None:
    """Erase a person: templates, images and metadata, from the store and the index."""
    with open_db(ctx) as db:
        person = db.person(name)
        n = db.remove_person(name)
    emit_kv(ctx, {"removed": person.name, "templates": n})


@command()
def rename(
    ctx: typer.Context,
    old: Annotated[str, typer.Argument(help="Current name.")],
    new: Annotated[str, typer.Argument(help="New name.")],
) -> None:
    """Rename a person."""
    with open_db(ctx) as db:
        emit_kv(ctx, db.rename_person(old, new).to_dict())


@command()
def merge(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="The person to merge away (deleted afterwards).")],
    target: Annotated[str, typer.Argument(help="The person who keeps every template.")],
) -> None:
    """Merge two people (one person enrolled under two names): SOURCE's templates and photos move to TARGET."""
    with open_db(ctx) as db:
        moved = db.merge_people(source, target)
        emit_kv(ctx, {"merged": db.person(target).name, "from": source, "templates_moved": moved})


@command()
def templates(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Only this person's templates.")] = None,
    vectors: Annotated[bool, typer.Option(help="Include the vectors themselves (biometric data).")] = False,
    with_mean: Annotated[bool, typer.Option(help="Also list each person's mean template (derived from their "
                                                 "photos).")] = False,
    allow_plaintext: Annotated[bool, typer.Option(help="With --vectors on an encrypted database: print them anyway "
                                                       "(in plain text, wherever the output goes).")] = False,
) -> None:
    """List stored templates: id, person, photo hash, face box."""
    with open_db(ctx, readonly=True) as db:
        if vectors and db.encrypted and not allow_plaintext:
            raise InvalidInputError("this database is encrypted: --vectors would export its templates in plain "
                                    "text; add --allow-plaintext if that is what you want")
        rows = []
        for t in db.templates(name, include_derived=with_mean):
            row = t.to_dict()
            if not vectors:
                row.pop("vector")
            rows.append(row)
    emit(ctx, rows, ["id", "person", "image_sha256", "box", "det_score", "derived", "created_at"])


@command(name="remove-template")
def remove_template(
    ctx: typer.Context,
    template_id: Annotated[int, typer.Argument(help="Template id (see `facedb templates`).")],
) -> None:
    """Erase one template (a wrong photo); the person stays enrolled."""
    with open_db(ctx) as db:
        name = db.remove_template(template_id)
    emit_kv(ctx, {"removed_template": template_id, "person": name})
