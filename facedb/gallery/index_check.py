"""The index half of ``facedb check`` and ``index_state()``: does the index hold exactly the store's templates,
mapped to the right people, and nothing it should not? Heals what is a cache's damage (a persisted copy that does
not match its stamp, a remote engine missing writes or holding strays) when the database is writable; reports
the rest; and describes what the index holds now.

Kept apart from the keeper (``upkeep.py``), which it drives through its public methods: keeping the index level
is one job, inspecting it another.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from ..records import IndexState
from .indexed import Gallery
from .settings import Settings

if TYPE_CHECKING:
    from .upkeep import IndexKeeper


def verify(keeper: IndexKeeper, settings: Settings) -> tuple[list[str], list[str]]:
    """(checks, problems) for ``keeper``'s index: the persisted copy matches its stamp (else it is rebuilt and
    saved, when writable); a remote engine holds no removed template (asked by id), no collection of this
    database that its alias does not point to (a killed rebuild's leftover), and exactly the stored templates,
    mapped to the right people. Uses the engine itself, never the stand-in (IndexUnavailableError while a
    remote engine cannot answer)."""
    checks: list[str] = []
    problems: list[str] = []
    gallery = keeper.engine_gallery(settings)
    stamp = settings.index_stamp
    ok = False
    if stamp is not None:
        try:
            ok = keeper.backend(str(stamp.get("kind"))).verify(keeper.place, stamp, settings.dim)
        except Exception:
            ok = False
    backend = keeper.backend_in_use
    remote = backend is not None and backend.write_through
    if ok:
        checks.append("persisted index matches its stamp (SHA-256 for files)")
    elif not keeper.readonly:
        # The persisted copy is a cache: a missing or damaged one is healed, not a problem of the data.
        if remote:
            gallery = keeper.rebuild(settings)  # the engine's copy is the index itself: refill it
        else:
            keeper.save(settings, force=True)
        checks.append("persisted index was missing or did not match its stamp: rebuilt from the store and saved")
    if remote:
        leftovers(keeper, checks, problems)
    gen, ids, pids = keeper.store.template_map()
    checks.append("index holds exactly the stored templates, mapped to the right people")
    held = gallery.index.ids()
    probe = getattr(gallery.index, "still_held", None)
    if probe is not None:  # a remote engine: did every removal's erasure reach it? (asked before any repair)
        gone = keeper.store.removed_template_ids()
        back = probe(gone) if len(gone) else np.zeros(0, dtype=np.int64)
        checks.append(f"no removed template is still returned by the index engine ({len(gone)} removed ids "
                      "queried by id)")
        listed = f"{', '.join(map(str, back[:10].tolist()))}{' ...' if len(back) > 10 else ''}"
        if len(back) and keeper.readonly:  # a copy of the store ahead of the writer's engine writes
            checks.append(f"the index engine still returns {len(back)} templates this copy of the store removed "
                          f"(ids {listed}): they map to no one here; the writer's next open deletes them")
        elif len(back):
            problems.append(f"{len(back)} removed templates are still returned by the index engine (ids "
                            f"{listed}); deleted again now: run check again")
    if remote and gallery.generation == gen:
        held = level_engine(keeper, gallery, held, ids, checks)
    if gallery.generation == gen:
        live = gallery.live_ids()
        if len(live) != len(ids) or not np.array_equal(live, ids) or not np.isin(ids, held).all():
            problems.append(f"index holds {len(live)} live templates, the store {len(ids)}")
        elif len(ids) and not np.array_equal(gallery.person_of(ids), pids):
            problems.append("index maps some templates to the wrong person")
        if gallery.dead():
            checks.append(f"{gallery.dead()} removed templates await compaction (HNSW tombstones)")
    return checks, problems


def leftovers(keeper: IndexKeeper, checks: list[str], problems: list[str]) -> None:
    """A remote engine's collections of this database that its alias does not point to: what a rebuild killed
    before it swung the alias left behind (scripts/milvus_drill.py). They hold copies of templates, which must
    not outlive an erasure: a problem, with the command that drops them (the next rebuild drops them too)."""
    backend = keeper.backend_in_use
    listing = getattr(backend, "leftovers", None)
    if listing is None:
        return
    names = listing(keeper.place)
    checks.append("no collection of this database is left on the index engine besides the one in use")
    if names:
        problems.append(
            f"{len(names)} collections of this database on the index engine are not the one in use "
            f"({', '.join(names[:5])}{' ...' if len(names) > 5 else ''}): left by a rebuild that was killed before "
            "it finished (or one under way in another process), and holding copies of templates; "
            "`facedb rebuild-index` drops them")


def level_engine(keeper: IndexKeeper, gallery: Gallery, held: np.ndarray, ids: np.ndarray, checks: list[str]
                 ) -> np.ndarray:
    """Write-through engines (``check``): entries the store no longer holds, and stored templates the engine
    lacks (a write that never reached it), are deleted and written now by a writable process (the engine is
    a cache, as a damaged index file is); a read-only one only reports them. Returns the ids held after."""
    stray = held[~np.isin(held, ids)]
    missing = ids[~np.isin(ids, held)]
    if keeper.readonly:
        if len(stray):
            checks.append(f"the index engine holds {len(stray)} templates this copy of the store does not have "
                          "(newer writes, or removals not yet copied here); they map to no one")
        return held
    if len(stray):
        gallery.index.remove(stray)
        erase = getattr(gallery.index, "erase", None)
        if erase is not None:
            erase()  # deleted rows leave the engine's storage at its compaction: ask for it
        checks.append(f"{len(stray)} index engine entries the store no longer holds were deleted")
    if len(missing):
        m_ids, m_pids, vectors = keeper.store.templates(missing)
        gallery.index.add(m_ids, vectors, m_pids)
        checks.append(f"{len(m_ids)} stored templates missing from the index engine were written to it")
    return np.union1d(held[np.isin(held, ids)], missing) if len(stray) or len(missing) else held


def describe(keeper: IndexKeeper, settings: Settings) -> IndexState:
    """What ``keeper``'s index holds now, without loading it (``loaded`` False when no query has needed it yet;
    ``stand_in`` set while the store answers for a remote engine that cannot)."""
    stamp = settings.index_stamp or {}
    g = keeper.gallery
    persisted = 0
    if stamp.get("kind"):
        try:
            persisted = keeper.backend(str(stamp["kind"])).persisted_bytes(keeper.place)
        except Exception:
            persisted = 0
    vectors = g.vectors if g is not None else None
    rescore = None if g is None or g.index.exact else "index" if g.index.keeps_vectors else \
        "store" if vectors is None or vectors.error is not None else "loading" if vectors.loading else "memory"
    backend = keeper.backend_in_use
    s = keeper.stand_in
    return IndexState(
        kind=settings.index_kind,
        built=g.index.kind if g is not None else stamp.get("kind"),
        params=g.index.params if g is not None else stamp.get("params"),
        generation=g.generation if g is not None else None,
        entries=len(g.index) if g is not None else int(stamp.get("count", 0)),
        live=len(g) if g is not None else int(stamp.get("count", 0)),
        tombstones=g.dead() if g is not None else 0,
        loaded=g is not None,
        from_file=keeper.from_file,
        persisted_generation=stamp.get("generation"),
        persisted_bytes=persisted,
        backend=(backend.name if backend is not None else str(stamp.get("backend", "faiss"))),
        rescore_from=rescore,
        rescore_bytes=vectors.nbytes if vectors is not None else 0,
        stand_in=None if s is None else f"queries answered by an exact search of the store's {len(s.gallery)} "
        f"templates (generation {s.gallery.generation}) since {time.strftime('%H:%M:%S', time.localtime(s.since))}"
        f": {s.reason}",
    )
