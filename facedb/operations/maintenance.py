"""Maintenance of an open database: changing the index kind (``reindex``), compacting (``vacuum``), narrowing the
thumbnails kept, and ``check`` (the store, the index against it, the query path, encryption, erasure debts).

Each works through the rooms that own the parts (the store, :class:`facedb.gallery.upkeep.IndexKeeper`, the
query room, :mod:`facedb.operations.erasure`) and records what it changed in the audit trail. ``FaceDB`` calls
these under its lock; moved out of ``db.py`` as they were.
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DatabaseError, IndexUnavailableError, warn_caller
from ..gallery import engine
from ..gallery.index import backend_for, check_index_params
from ..gallery.settings import Settings
from ..protection import encryption
from ..records import CheckReport, IndexState, ReindexReport
from . import erasure, lifecycle
from .lifecycle import option_rows, secrets_of

if TYPE_CHECKING:
    from ..db import FaceDB

#: How many stored templates ``check`` searches for to prove the index finds them.
CHECK_PROBES = 64


def reindex(db: FaceDB, kind: str, params: dict[str, Any] | None,
            index_options: dict[str, Any] | None) -> ReindexReport:
    """:meth:`facedb.FaceDB.reindex`: change the index kind (``facedb.gallery.index.index_kinds()``, or ``auto``)
    and its parameters, and rebuild. ``index_options``: where a remote kind keeps it (``milvus_uri``,
    ``milvus_collection``; stored) and its ``milvus_token`` (not stored). If the rebuild fails (an unreachable
    server...), the former index settings are stored back and the exception raised. The caller holds the lock."""
    params = check_index_params(kind, params)
    options = dict(index_options or {})
    before = db.store.all_meta()
    rows = {**Settings.index_rows(kind, params), **option_rows(kind, options, db.settings())}
    if not before.get("database_id"):
        rows["database_id"] = secrets.token_hex(16)  # a database made before remote indexes existed
    db._given_options.update(secrets_of(options))
    stamp = db.settings().index_stamp
    old_place, old_kind = db.keeper.place, (stamp or {}).get("kind")
    leaving_remote(db, old_kind, kind, stamp)
    db.store.set_meta(rows)
    db.keeper.place = replace(db.keeper.place, options=lifecycle.index_options(db))
    try:
        gallery = db.keeper.rebuild(db.settings())
    except BaseException:
        db.store.restore_meta(before, rows)
        db.keeper.place = replace(db.keeper.place, options=lifecycle.index_options(db))
        db.keeper.forget()
        raise
    drop_moved(db, old_kind, old_place, kind)
    report = ReindexReport(index_kind=kind, built=gallery.index.kind, params=gallery.index.params,
                           indexed=len(gallery.index))
    db.trail.record("reindex", [{"detail": {"kind": kind, "params": params}}], db.settings())
    return report


def leaving_remote(db: FaceDB, old_kind: str | None, kind: str, stamp: dict[str, Any] | None) -> None:
    """Before a move off a write-through engine (Milvus to a FAISS kind) writes any setting: the collection it
    must drop has to be reachable with the credentials given, else IndexUnavailableError (a refused token: its
    subclass) and nothing is written, not even for the moment a failed move takes to put them back (a newcomer
    saw other processes read the new kind meanwhile). The drop itself can still fail later (the keeper then
    puts everything back)."""
    if old_kind is None or stamp is None or old_kind == kind:
        return
    old = backend_for(old_kind)
    if old.write_through and backend_for(kind).name != old.name:
        old.load(db.keeper.place, stamp, db.dim)


def drop_moved(db: FaceDB, old_kind: str | None, old_place: Any, kind: str) -> None:
    """After a remote index moved to another place of the same kind (another collection or server), drop
    the one it left, so that no template stays behind there (a move to another kind is the keeper's)."""
    if old_kind != kind or old_kind is None or not backend_for(old_kind).write_through:
        return
    keys = ("milvus_uri", "milvus_collection")
    if all(old_place.options.get(k) == db.keeper.place.options.get(k) for k in keys):
        return
    try:
        backend_for(old_kind).discard(old_place)
    except IndexUnavailableError as exc:
        warn_caller(f"the index moved, but its former collection could not be dropped (drop it by hand): {exc}")


def load_index(db: FaceDB, wait: bool) -> IndexState:
    """:meth:`facedb.FaceDB.load_index`: bring the index into memory now, level with the store (a service does this
    at start-up, so that its first query does not pay for it). ``wait``: also wait until the exact re-scoring
    vectors are in memory (kinds that do not keep them read the store until then; ``gallery/vectors.py``)."""
    with db._lock:
        vectors = db.keeper.current(db.settings(), rebuild_now=True).vectors
    if wait and vectors is not None:
        vectors.wait()
    return db.index_state()


def save_index(db: FaceDB) -> None:
    """:meth:`facedb.FaceDB.save_index`: bring the index level with the store and persist it now. Under the lock."""
    settings = db.settings()
    db.keeper.current(settings)
    db.keeper.save(settings, force=True)


def vacuum(db: FaceDB) -> None:
    """:meth:`facedb.FaceDB.vacuum`: purge expired visitors, compact the store, rewrite the index's persisted
    copy, and truncate the WAL that rewrite went through. The caller holds the lock."""
    db.store.purge_unassigned(db.settings().visitors.retention_days)
    db.store.vacuum()
    settings = db.settings()
    db.keeper.current(settings)
    db.keeper.save(settings, force=True)
    db.store.vacuum()  # the stamp update above went through the WAL: truncate it again


def set_thumbnails(db: FaceDB, mode: str) -> str:
    """:meth:`facedb.FaceDB.configure_thumbnails`: store the setting and erase, as a removal does, the thumbnails
    it no longer covers (InvalidInputError for an unknown mode, DatabaseError read-only). The caller holds the
    lock."""
    from ..gallery import thumbnails

    mode = thumbnails.check_mode(mode)
    if db.readonly:
        raise DatabaseError(f"{db.root} is open read-only: cannot change settings")
    old = db.settings().thumbnails
    gone = thumbnails.dropped(old, mode)
    with erasure.erasing(db):
        db.store.set_meta({"thumbnails": mode})
        erased = db.store.drop_thumbnails(gone)
    db.trail.record("thumbnails-settings", [{"detail": {"from": old, "to": mode, "erased": erased}}], db.settings())
    return mode


def check(db: FaceDB) -> CheckReport:
    """:meth:`facedb.FaceDB.check`: the store's own checks, the index against the store (healing a damaged index
    file first), encryption (no plain-text file), no erasure debt, and up to :data:`CHECK_PROBES` stored templates
    found as their own best match. A damaged store ends the report with what was found so far. The caller holds
    the lock."""
    checks, problems = db.store.check()
    try:
        settings = db.settings()
        more_checks, more_problems = db.keeper.verify(settings)  # (heals a damaged index file first)
        checks += more_checks
        problems += more_problems
        if db.protection is not None:
            checks.append(f"encrypted at rest (key version {db.protection.key_version}, data key version "
                          f"{db.protection.data_key_version}): no plain-text file in the database directory")
            problems += [f"plain-text file in an encrypted database: {f}"
                         for f in encryption.plaintext_files(db.root, True)]
        else:
            checks.append("not encrypted: the database's files hold templates in plain text (`facedb encrypt`)")
        checks.append("no removal awaits its erasure from the files")
        if db.store.erasure_pending() and not erasure.under_way(db):
            problems.append("a removal's erasure from the index file did not finish (a process was killed "
                            "after the removal: the next writable open finishes it)")
        gallery = db.keeper.current(db.settings())
        checks.append(f"up to {CHECK_PROBES} stored templates are found as their own best match")
        _, ids, _ = db.store.template_map()
        if len(ids):
            sample = np.random.default_rng(0).choice(ids, size=min(CHECK_PROBES, len(ids)), replace=False)
            sids, _, vecs = db.store.templates(sample)
            missed = engine.self_match_misses(gallery, vecs, db.query.fetch(gallery))
            if missed:
                problems.append(f"{missed} of {len(sids)} sampled templates are not found by the index")
    except DatabaseError as exc:  # a damaged store: what was found so far is the report
        problems.append(f"the index could not be checked against the store: {exc}")
    return CheckReport(ok=not problems, checks=checks, problems=problems)
