"""Index upkeep: keeps the derived vector index level with the store, in memory and where it persists.

The store is the truth; the index is a cache stamped (in the store's ``meta``) with the generation it reflects,
its kind, parameters, entry count and whatever its backend needs to recognise its persisted copy (a file's
SHA-256). Before every answer, :meth:`IndexKeeper.current` brings the in-memory gallery to the store's
generation: replaying the store's change log, or loading the persisted copy and levelling it by a full diff of
template ids, or rebuilding from the store. So an answer that starts after a write returned, in any process,
sees it; a damaged or stale persisted copy is rebuilt, never trusted.

The keeper takes the store, the database directory and the settings explicitly; it never sees the FaceDB.
Which backend persists how is the backend's business (``facedb/gallery/index``).

**Erasure.** A persisted copy saved at generation g holds exactly the templates live at g, so it holds a
removed template exactly when the change log records a removal since g. After every removal
(:meth:`IndexKeeper.erase`), and whenever a loaded copy turns out to hold removed templates (a crash came
between a removal and its rewrite), the file is rewritten at once. Removals are marked ``erase_pending`` in the
store in their own transaction, so a process that dies before the rewrite leaves a debt the next writable open
pays before it answers. Index files are written under an advisory lock (``.index.lock``), so two processes
never interleave a stale save with an erasure. (A write-through engine removes at once and keeps no file here.)

Write-through backends (a shared remote engine: Milvus) get four small differences, each marked below: a write
is applied to the engine before the call returns, even when no query has loaded the index yet (other hosts
search the engine directly); opening replays the change log from the generation the engine records (its count
stands in for the stamp's); a writable process records in the engine each generation it reaches
(``publish``); and a read-only process never asks the engine to write (the backend keeps what it lacks locally).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IndexBehindWarning, IndexUnavailableError, warn_caller
from ..fsio import held_elsewhere, locked, remove_stale_temporaries
from ..records import IndexState
from . import index_check, rebuilds, standin
from .index import IndexBackend, IndexPlace, VectorIndex, auto_kind, backend_for
from .index.saved_map import MapSource, SavedMap
from .indexed import Gallery
from .settings import Settings
from .standin import OPEN_WAIT_S, EngineOpening, StandIn
from .store import Store
from .vectors import TemplateVectors, budget_bytes, bytes_for

#: Save the persisted copy when it lags the store by this many generations (or has no valid copy). Between
#: saves, opening levels the copy with the store by a diff of template ids, adding only what is new.
SAVE_EVERY = 32

#: Share of an index's entries that may be tombstones (removed, not yet dropped) before it is rebuilt.
TOMBSTONE_LIMIT = 0.10

#: The advisory lock every writer of the persisted index takes (see "Erasure" above).
LOCK_FILE = ".index.lock"

#: A writer closing with no gallery loaded (a bulk import that never queried) builds and saves the index when
#: the next open would otherwise rebuild it or add this many templates (or more) to the saved copy itself.
SETTLE_TEMPLATES = 10_000

#: Templates read from the store at a time when building (64 MiB of 512-d vectors): a build holds the index,
#: a training sample and one batch, not every vector (10M x 512-d is 20 GB).
BUILD_BATCH = 32768


def training_rows(n: int) -> int:
    """How many templates a build trains on: what FAISS's IVF k-means uses (~40 points for each of the ~4
    sqrt(n) lists, at most 8,192 lists: ``faiss_kinds._nlist_for``; more only costs time), at least 65,536
    (PQ codebooks and small galleries), at most the gallery."""
    return int(min(n, max(65_536, min(160 * math.sqrt(max(n, 1)), 40 * 8192))))


def _outdated(stamp: dict[str, Any]) -> bool:
    """Whether a saved copy lacks what this version saves with it: the gallery section, or (plain files) the
    vectors' own digest that lets an open check them in the background. Such a copy is saved again."""
    saved = stamp.get("map")
    if not isinstance(saved, dict):
        return True
    return bool(saved.get("vectors")) and "sha256" in stamp and not saved.get("vectors_sha256")


class IndexKeeper:
    """Loads, catches up, rebuilds, saves, verifies and describes one database's index."""

    def __init__(self, store: Store, root: Path, *, readonly: bool = False,
                 options: dict[str, Any] | None = None, vector_budget: int | None = None) -> None:
        self.store = store
        # memory the in-memory re-scoring vectors may take (vectors.py); None: FACEDB_RESCORE_MEMORY_MB or 8 GiB
        self.vector_budget = budget_bytes() if vector_budget is None else int(vector_budget)
        self.root = Path(root)
        self.place = IndexPlace(root, readonly, dict(options or {}))
        self.readonly = readonly
        self.gallery: Gallery | None = None
        self.from_file = False  # the gallery came from a valid persisted copy (so need not be saved at once)
        self._backend: IndexBackend | None = None
        self._published: tuple[Gallery, int] | None = None  # write-through: (gallery, generation) last recorded
        self._holds_removed = False  # the persisted copy just loaded holds removed templates: rewrite it
        self._locked = False  # this keeper holds the index lock now (its methods do not take it again)
        self.stand_in: StandIn | None = None  # answers queries while a remote engine cannot (standin.py)
        self.stand_in_spare: tuple[StandIn, float] | None = None  # the last one, until (monotonic) (standin.py)
        self.opening: EngineOpening | None = None  # an attempt at opening the engine: running, or not yet read
        self._tried_stamp: tuple[Any, ...] | None = None  # rebuilds.py: the copy tried instead of a rebuild
        self._unusable: tuple[Any, ...] | None = None  # a copy that failed to load here

    # ------------------------------------------------------------------------------------------------ policy
    @staticmethod
    def kind_for(settings: Settings, n: int) -> str:
        return auto_kind(n, settings.dim) if settings.index_kind == "auto" else settings.index_kind

    def backend(self, kind: str) -> IndexBackend:
        return backend_for(kind)

    def rebuild_reason(self, gallery: Gallery, settings: Settings) -> str | None:
        """Why the index should be rebuilt now: too many tombstones, an IVF trained on a much smaller gallery,
        or ``auto`` now choosing another kind."""
        n = len(gallery)
        # Tombstones, not every unmapped entry: a shared engine may hold newer templates of another process.
        dead = gallery.index.tombstones
        if dead and dead > max(64, TOMBSTONE_LIMIT * len(gallery.index)):
            return "tombstones"
        return rebuilds.outgrown(gallery.index.kind, gallery.index.params.get("trained_on"), n,
                                 self.kind_for(settings, n))

    # ------------------------------------------------------------------------------------------- freshness
    def current(self, settings: Settings, rebuild_now: bool = False) -> Gallery:
        """The gallery queries answer from, caught up with the store's generation in ``settings`` (rebuilt when
        it must be). While a remote engine cannot answer (loading after a restart, unreachable: it did not open
        within FACEDB_STAND_IN_AFTER_S) and the store's vectors fit the memory budget, that is the **stand-in**,
        an exact search of the store's templates (``standin.py``), until the engine opens again. Writes, saves
        and ``check`` use the engine itself (:meth:`_current`) and fail while it cannot answer."""
        if self.gallery is None and self._write_through(settings):
            return standin.answer(self, settings)
        gallery = self._current(settings, query=not rebuild_now)  # load_index: rebuild now, not in a query
        standin.drop(self)
        return gallery

    def _current(self, settings: Settings, wait_s: float = OPEN_WAIT_S, query: bool = False) -> Gallery:
        """The engine's (or the file's) gallery, caught up with the store's generation in ``settings`` (rebuilt
        when it must be: for a ``query`` see ``rebuilds.py``); a remote engine that does not open within
        ``wait_s`` seconds is an error."""
        # a query that finds writes it did not make (another process's) puts a rebuild off (rebuilds.py)
        elsewhere = query and (self.gallery is None or self.gallery.generation != settings.generation)
        if self.gallery is None:
            self.gallery = self._load_noted(settings, wait_s) or self._build(settings)
        elif self.gallery.generation != settings.generation and not self.catch_up(self.gallery):
            # The log no longer reaches back (another process wrote more than CHANGES_KEPT generations, and the
            # copy it saved let it trim the log): take that copy, levelled with the store (a shared engine by a
            # diff of ids), as a restart would; only without a usable copy rebuild (minutes at 1M, in a query).
            # The old gallery goes first (it cannot be caught up): not two indexes in memory at once.
            self._replace(None)
            self.gallery = self._load_noted(settings, wait_s) or self._build(settings)
        reason = self.rebuild_reason(self.gallery, settings)
        if reason:
            rebuilds.improve(self, settings, wait_s, reason,
                             query and (elsewhere or held_elsewhere(self.root / LOCK_FILE)))
        if self._holds_removed and not self.readonly and not self._locked:
            self._holds_removed = False
            self.erase(settings)  # the file holds templates removed since it was saved: erase them now
        self._publish(self.gallery)
        return self.gallery

    def _load_noted(self, settings: Settings, wait_s: float) -> Gallery | None:
        """:meth:`_load`, remembering a saved copy that could not be used (a close may then write over it)."""
        gallery = self._load(settings, wait_s)
        if gallery is None and settings.index_stamp:
            self._unusable = rebuilds.stamp_key(settings.index_stamp)
        return gallery

    def stands_in_for(self, settings: Settings) -> bool:
        """Whether a query this keeper cannot answer from its engine may be answered by the stand-in (a remote,
        write-through engine: standin.py decides, by the memory budget, when it is asked)."""
        return self._write_through(settings)

    def close(self) -> None:
        """Let everything in memory go: the gallery, any stand-in and its spare (the database is closing)."""
        self.forget()
        standin.drop_spare(self)

    def forget(self) -> None:
        """Drop the gallery in memory, and any stand-in (the next query loads or rebuilds it)."""
        self._replace(None)
        standin.drop(self, engine_back=False)
        self.opening = None

    def _replace(self, gallery: Gallery | None) -> None:
        """Put ``gallery`` in place of the current one, whose background work (a vector fill) is stopped."""
        if self.gallery is not None and self.gallery is not gallery:
            self.gallery.close()
        self.gallery = gallery

    def after_write(self, settings: Settings) -> None:
        """Apply a write this process just made: only if the gallery is loaded (otherwise the next query does),
        except for a write-through engine, which gets it now so that other hosts searching it see the write when
        the call returns. If that engine cannot be reached, the write stays in the store (the truth) and this
        warns (IndexBehindWarning): the engine's recorded generation now lags, so the next process to open it,
        this one included, replays the change log."""
        if self.gallery is None and not self._write_through(settings):
            return
        try:
            gallery = self._current(settings)
        except IndexUnavailableError as exc:
            self._replace(None)  # reconnect and catch up on the next query
            warn_caller(f"stored, but the index engine is behind until it can be reached: {exc}",
                        IndexBehindWarning)
            return
        # A process that holds its gallery (a service) and has just taken a bulk write saves before the call
        # returns, so that a restart (or a crash) does not leave the next open to add it to the old copy.
        stamp = settings.index_stamp
        if not self.readonly and not self._write_through(settings) and len(gallery) and (
                not stamp or abs(len(gallery) - int(stamp.get("live", 0))) >= SETTLE_TEMPLATES):
            self.save(settings, force=True)

    def _write_through(self, settings: Settings) -> bool:
        if self._backend is not None:
            return self._backend.write_through
        if settings.index_kind == "auto":  # auto chooses among the FAISS kinds
            return False
        try:
            return self.backend(settings.index_kind).write_through
        except Exception:
            return False

    def _publish(self, gallery: Gallery) -> None:
        """Write-through engines, writable processes: record the generation the engine now reflects (after a
        rebuild, also make it the copy every process opens, then catch up with writes that other processes
        applied to the copy it replaced)."""
        backend = self._backend
        if backend is None or not backend.write_through or self.readonly:
            return
        if self._published is not None and self._published[0] is gallery \
                and self._published[1] == gallery.generation:
            return
        first = self._published is None or self._published[0] is not gallery
        backend.publish(gallery.index, self.place, gallery.generation)
        self._published = (gallery, gallery.generation)
        if first and self.catch_up(gallery) and gallery.generation != self._published[1]:
            backend.publish(gallery.index, self.place, gallery.generation)
            self._published = (gallery, gallery.generation)

    def catch_up(self, gallery: Gallery) -> bool:
        """Apply the store's change log since ``gallery``'s generation to it (False: the log no longer reaches
        back that far)."""
        changes = self.store.changes_since(gallery.generation)
        if changes is None:
            return False
        current, added, removed = changes
        gallery.remove(removed)
        ids, pids, vectors = self.store.templates(added)
        gallery.add(ids, pids, vectors)
        gallery.generation = current
        return True

    def _stamp_matches(self, stamp: dict[str, Any] | None, settings: Settings) -> bool:
        return bool(stamp) and stamp.get("model_id") == settings.model_id and stamp.get("dim") == settings.dim \
            and stamp.get("params_of") == settings.index_params_raw

    def _load(self, settings: Settings, wait_s: float = OPEN_WAIT_S) -> Gallery | None:
        """The persisted copy, if its stamp matches, brought level with the store: from the map (and re-scoring
        vectors) saved in it by the change log since its generation, else by a full diff of ids against the
        store's map (so any staleness is repaired, however old the copy). A remote engine is opened on a thread
        of its own and waited for ``wait_s`` seconds at most (IndexLoadingError after that; the attempt goes on,
        and the next call takes its result)."""
        stamp = settings.index_stamp
        if stamp is None or not self._stamp_matches(stamp, settings):
            return None
        try:
            backend = self.backend(str(stamp.get("kind")))
        except Exception:  # a kind no longer registered: rebuild
            return None
        if stamp.get("map") and getattr(backend, "saves_map", False) and not backend.write_through:
            # The map comes from the file (no store read at all when nothing changed since it was saved).
            index = backend.load(self.place, stamp, settings.dim)
            if index is None or len(index) != stamp.get("count"):
                return None
            saved: SavedMap | None = getattr(index, "saved_map", None)
            index.saved_map = None  # type: ignore[attr-defined]
            gallery = self._from_saved(backend, index, saved, stamp, settings)
            if gallery is not None:
                return gallery
            gen, ids, pids = self.store.template_map()  # the log no longer reaches back: diff with the store
            return self._level(backend, index, stamp, settings, gen, ids, pids)
        # The store's id map is read beside the persisted copy (SQLite and FAISS both release the GIL): at 1M
        # templates that takes the open from 6 s to under 5.
        with ThreadPoolExecutor(max_workers=1) as pool:
            mapping = pool.submit(self.store.template_map)
            index = self._open_engine(backend, stamp, settings.dim, wait_s) if backend.write_through \
                else backend.load(self.place, stamp, settings.dim)
            gen, ids, pids = mapping.result()
        if index is None or (not backend.write_through and len(index) != stamp.get("count")):
            return None
        self._backend = backend
        reflects = getattr(index, "reflects", None)
        if backend.write_through and not self.readonly and reflects is not None \
                and int(reflects) > self.store.generation():
            # The engine has seen writes this store never had: this is an older copy of the store (a replica's,
            # or a restored backup). Levelling the shared engine to it would undo the writer's work.
            raise IndexUnavailableError(
                f"the index engine reflects store generation {reflects}, this store is at {self.store.generation()}: "
                "an older copy of the store must be opened read-only (a read replica: `facedb --read-only`, "
                "FaceDB.open(readonly=True)); if this store really is the truth now (restored from a backup), run "
                "`facedb rebuild-index` to rebuild the index from it")
        if backend.write_through and self._replay(index, len(ids)):
            gallery = Gallery(index, gen)
            gallery.set_map(ids, pids)
            self._fill_vectors(gallery, settings.dim)
            self.from_file = True
            return gallery
        return self._level(backend, index, stamp, settings, gen, ids, pids)

    def _open_engine(self, backend: IndexBackend, stamp: dict[str, Any], dim: int, wait_s: float
                     ) -> VectorIndex | None:
        """A remote engine's index, opened by an :class:`EngineOpening` (the one still running from an earlier
        call, if any), waited for ``wait_s`` seconds at most."""
        opening = self.start_opening(backend, stamp, dim)
        try:
            return opening.result(wait_s)
        finally:
            if opening.done():
                self.opening = None

    def start_opening(self, backend: IndexBackend, stamp: dict[str, Any], dim: int) -> EngineOpening:
        """The attempt at opening the engine: the one under way (or finished and not yet read), else a new one."""
        if self.opening is None or self.opening.place != self.place:
            place = self.place
            self.opening = EngineOpening(lambda: backend.load(place, stamp, dim), place)
        return self.opening

    def _from_saved(self, backend: IndexBackend, index: VectorIndex, saved: SavedMap | None,
                    stamp: dict[str, Any], settings: Settings) -> Gallery | None:
        """A gallery from the map and vectors saved in the index file, levelled with the store by its change log
        since the stamp's generation; None when the file holds no such section, it is not the stamp's (another
        generation, another count), or the log no longer reaches back (the caller diffs ids instead)."""
        if saved is None or saved.generation != stamp.get("generation") \
                or len(saved.ids) != int(stamp.get("live", stamp.get("count", -1))):
            return None
        changes = self.store.changes_since(saved.generation)
        if changes is None:
            return None
        current, added, removed = changes
        gallery = Gallery(index, saved.generation)
        gallery.set_map(saved.ids, saved.pids, per_person=saved.per_person)
        if self._wants_vectors(index, len(saved.ids), settings.dim):
            if saved.vectors is not None and int(np.max(saved.ids, initial=0)) < 2**31:
                if saved.check is not None:  # verified in the background; queries re-score from the store meanwhile
                    vectors = TemplateVectors.adopt_checked(saved.ids, saved.vectors, saved.check)
                else:
                    vectors = TemplateVectors.adopt(saved.ids, saved.vectors)
                gallery.keep_vectors(vectors, self.vector_budget)
            else:
                self._fill_vectors(gallery, settings.dim)
        saved.vectors = None  # the gallery holds them now (no copy)
        gallery.remove(removed)
        new_ids, new_pids, vectors = self.store.templates(added)
        gallery.add(new_ids, new_pids, vectors)
        gallery.generation = current
        self._backend = backend
        self.from_file = not added and not removed
        self._holds_removed = bool(set(removed) - set(added)) and self._file_holds_removed(settings)
        return gallery

    def _level(self, backend: IndexBackend, index: VectorIndex, stamp: dict[str, Any], settings: Settings,
               gen: int, ids: np.ndarray, pids: np.ndarray) -> Gallery:
        """The persisted ``index`` levelled with the store's map (``gen``, ``ids``, ``pids``) by a diff of ids."""
        self._backend = backend
        held = index.ids()
        in_index = np.isin(ids, held)
        dead = held[~np.isin(held, ids)]
        index.remove(dead)  # removed since the copy was written (tombstones for HNSW)
        gallery = Gallery(index, gen)
        gallery.set_map(ids[in_index], pids[in_index])
        self._fill_vectors(gallery, settings.dim)
        new_ids, new_pids, vectors = self.store.templates(ids[~in_index])
        gallery.add(new_ids, new_pids, vectors)
        gallery.generation = gen
        # HNSW files keep the tombstones they were saved with (their vectors zeroed): not a difference
        saved_dead = int(stamp.get("count", 0)) - int(stamp.get("live", stamp.get("count", 0)))
        self.from_file = len(dead) == saved_dead and not len(new_ids)
        self._holds_removed = len(dead) > saved_dead and self._file_holds_removed(settings)
        return gallery

    def _replay(self, index: VectorIndex, count: int) -> bool:
        """Write-through engines: bring the engine's copy level by replaying the store's change log from the
        generation it records. False when it records none, the log no longer reaches back that far, or its
        count then differs from the store's ``count`` (the caller diffs ids, which also drops strays)."""
        reflects = getattr(index, "reflects", None)
        changes = None if reflects is None else self.store.changes_since(int(reflects))
        if changes is None:
            return False
        _, added, removed = changes
        index.remove(np.asarray(removed, dtype=np.int64))  # idempotent: others may have applied them already
        ids, pids, vectors = self.store.templates(added)
        index.add(ids, vectors, pids)
        return len(index) == count

    def _wants_vectors(self, index: VectorIndex, n: int, dim: int) -> bool:
        """Whether re-scoring should read this gallery's vectors from memory: the index does not keep them, it
        is not exact (no re-scoring), and they fit the budget."""
        return not index.keeps_vectors and not index.exact and 0 < bytes_for(max(n, 1), dim) <= self.vector_budget

    def _fill_vectors(self, gallery: Gallery, dim: int) -> None:
        """Give a gallery loaded from its persisted copy (codes only) its exact vectors, read from the store in
        the background (queries read the store for whatever is not in memory yet)."""
        if not self._wants_vectors(gallery.index, len(gallery), dim):
            return
        vectors = TemplateVectors(dim, capacity=len(gallery))
        gallery.keep_vectors(vectors, self.vector_budget)
        vectors.fill(self.store.stream_templates(BUILD_BATCH // 4))

    def _training_sample(self, ids: np.ndarray) -> np.ndarray | None:
        """A random sample of the stored vectors to train on (``training_rows``), read by id."""
        if not len(ids):
            return None
        take = training_rows(len(ids))
        chosen = ids if take >= len(ids) else np.sort(np.random.default_rng(0).choice(ids, take, replace=False))
        return self.store.templates(chosen)[2]

    def _build(self, settings: Settings) -> Gallery:
        """A new index from the store, streamed: trained on a sample, then filled batch by batch from one
        snapshot (at most one batch of vectors in memory beside the index, and the in-memory re-scoring vectors
        where they fit the budget), then levelled with writes that landed meanwhile."""
        _, ids, _ = self.store.template_map()
        n = len(ids)
        kind = self.kind_for(settings, n)
        backend = self.backend(kind)
        sample = self._training_sample(ids)
        index = backend.new(kind, settings.dim, dict(settings.index_params), sample, self.place, total=n)
        del sample
        vectors = TemplateVectors(settings.dim, capacity=n) if self._wants_vectors(index, n, settings.dim) else None
        gen = None
        all_ids: list[np.ndarray] = []
        all_pids: list[np.ndarray] = []
        for batch in self.store.stream_templates(BUILD_BATCH):
            gen, b_ids, b_pids, b_vectors = batch  # the snapshot's generation, the same in every batch
            index.add(b_ids, b_vectors, b_pids)
            if vectors is not None:
                vectors.put(b_ids, b_vectors)
            all_ids.append(b_ids)
            all_pids.append(b_pids)
        gallery = Gallery(index, self.store.generation() if gen is None else gen)
        if all_ids:
            gallery.set_map(np.concatenate(all_ids), np.concatenate(all_pids))
        if vectors is not None:
            gallery.keep_vectors(vectors, self.vector_budget)
        self.catch_up(gallery)  # writes that landed while we read
        self._backend = backend
        self.from_file = False
        return gallery

    # ------------------------------------------------------------------------------------------ persistence
    def save(self, settings: Settings, force: bool = False) -> None:
        """Persist the index if it lags its persisted copy by ``SAVE_EVERY`` generations or more (always with
        ``force``), and record the stamp in the store. Removed templates are never written: removals leave the
        index at once (HNSW tombstones are zeroed)."""
        if self.readonly:
            return
        stamp = settings.index_stamp
        if self.gallery is None:
            # A writer that changed the gallery without querying it (a bulk import) leaves the index it would
            # have made the next process build (docs/performance-and-scale.md: ready after a restart).
            if not self._unsettled(settings):
                return
        elif not force and stamp is not None and not (self._saves_map() and _outdated(stamp)):
            behind = self.gallery.generation - int(stamp.get("generation", -1))
            if self.from_file and 0 <= behind < SAVE_EVERY:
                return
            # a copy as new or newer, saved by another process, is never written over (a stopped service did that)
            if behind <= 0 and self._stamp_matches(stamp, settings) and rebuilds.stamp_key(stamp) != self._unusable \
                    and self.backend(str(stamp.get("kind"))).persisted_bytes(self.place) > 0:
                return
        try:
            with self._lock():
                self._save_locked(Settings.parse(self.store.all_meta()))
        except IndexUnavailableError:
            if force or self._backend is None or not self._backend.write_through:
                raise
            return  # on close: a write-through engine records its own generation; nothing here to save

    def _saves_map(self) -> bool:
        return self._backend is not None and bool(getattr(self._backend, "saves_map", False))

    def _unsettled(self, settings: Settings) -> bool:
        """Whether the persisted copy is missing, or so far behind the store that the next open would rebuild it
        or add ``SETTLE_TEMPLATES`` or more to it (or lags ``SAVE_EVERY`` generations, or has no saved map):
        then a closing writer builds and saves it, so the next process loads it at disk speed. A
        write-through engine holds its own copy: never."""
        if settings.generation <= 0 or self._write_through(settings):
            return False
        stamp = settings.index_stamp
        if not stamp or not self._stamp_matches(stamp, settings) or "generation" not in stamp:
            return True
        lag = settings.generation - int(stamp["generation"])
        if lag == 0:
            return _outdated(stamp) and getattr(self.backend(str(stamp.get("kind"))), "saves_map", False)
        if lag < 0 or lag >= SAVE_EVERY:
            return True
        changes = self.store.changes_since(int(stamp["generation"]))
        if changes is None:
            return True
        n = len(changes[1])
        trained = (stamp.get("params") or {}).get("trained_on")
        live = int(stamp.get("live", 0)) + n - len(changes[2])
        return n >= SETTLE_TEMPLATES or (trained is not None and live > 4 * max(int(trained), 256)) \
            or (settings.index_kind == "auto" and auto_kind(live, settings.dim) != stamp.get("kind"))

    def _map_source(self, gallery: Gallery) -> MapSource | None:
        """What the backend saves beside the index (where it does): the map and, where the gallery keeps them in
        memory, the re-scoring vectors (waiting for a fill still under way: it takes seconds, and saves the next
        open that long)."""
        if not self._saves_map():
            return None
        ids, pids = gallery.live_ids(), gallery.person_ids()
        vectors = gallery.vectors
        rows = None
        if vectors is not None:
            vectors.wait()
            if vectors.error is None and vectors.holds(ids):
                rows = vectors.get
        return MapSource(gallery.generation, ids, pids, gallery.index.dim, rows)

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """The index lock for a block (re-entrant in this keeper): a removal holds it from its transaction to its
        erasure, so another process that takes it and still finds ``erase_pending`` knows that an erasure was
        left behind (a killed writer), not one under way."""
        return self._lock()

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        if self._locked:
            yield
            return
        with locked(self.root / LOCK_FILE):
            self._locked = True
            try:
                yield
            finally:
                self._locked = False

    def _save_locked(self, settings: Settings, also: dict[str, str] | None = None) -> None:
        """Write the file and its stamp (with the ``also`` meta rows, in the same transaction); the caller holds
        the index lock and passes settings read under it."""
        gallery = self._current(settings)
        assert self._backend is not None
        remove_stale_temporaries(self.root, "index")  # a killed writer's half-written file may hold templates
        fields = self._save_fields(gallery, self.place)
        stamp = settings.index_stamp
        old_kind = stamp.get("kind") if stamp else None
        if old_kind and old_kind != gallery.index.kind:
            # The copy the former backend keeps is dropped before the stamp moves: when it cannot be (a server
            # that refuses the token or cannot be reached), the move fails and the database stays where it was,
            # stamp and all, with the copy just written removed. Recording the move first left every template
            # in the old collection with nothing pointing at it: no later removal reached it, and the next
            # reindex, reading the new stamp, never tried to drop it (found by a newcomer's wrong token).
            try:
                self._discard_other(str(old_kind))
            except BaseException:
                self._backend.discard(self.place)
                raise
        self.store.set_meta({"index_stamp": self._stamp(fields, gallery, settings), **(also or {})})
        self.from_file = True
        self._holds_removed = False
        self.store.prune_changes(gallery.generation)

    def _file_holds_removed(self, settings: Settings) -> bool:
        """Whether the persisted copy (saved at its stamp's generation) holds a template removed since."""
        stamp = settings.index_stamp
        if not stamp or "generation" not in stamp:
            return False
        changes = self.store.changes_since(int(stamp["generation"]))
        # a merge removes and re-adds the same ids (same vectors, another person): not an erasure
        return changes is None or bool(set(changes[2]) - set(changes[1]))

    def erase(self, settings: Settings) -> bool:
        """After a removal committed (or a crash interrupted one): make sure no persisted copy of the index holds
        a removed template, rewriting it from the gallery if it does (loading it first if this process had not),
        then clear the store's ``erase_pending`` mark. Returns whether the file was rewritten. (A write-through
        engine removed them when the removal was applied: nothing to rewrite.)"""
        if self.readonly:
            return False
        with self._lock():
            settings = Settings.parse(self.store.all_meta())
            rewrite = not self._write_through(settings) and self._file_holds_removed(settings)
            done = {"erase_pending": "0"} if settings.extra.get("erase_pending") == "1" else {}
            self._erase_engine(settings)
            if rewrite:
                self._save_locked(settings, done)
                if self.gallery is not None and self.gallery.vectors is not None:
                    self.gallery.vectors.own()  # let the replaced file (which held the removed rows) go
            else:
                remove_stale_temporaries(self.root, "index")
                if done:
                    self.store.set_meta(done)
        return rewrite

    def _erase_engine(self, settings: Settings) -> None:
        """A write-through engine with an ``erase`` step (Milvus: flush the deletes, ask for compaction) takes it
        now, once, in the process that made the removal; unreachable, it warns (the deletes reach it on the next
        open's replay, and the next removal's compaction covers them)."""
        if not self._write_through(settings) or self.gallery is None:
            return
        erase = getattr(self.gallery.index, "erase", None)
        if erase is None:
            return
        try:
            erase()
        except IndexUnavailableError as exc:
            warn_caller(f"removed, but the index engine was not asked to compact its storage: {exc}",
                        IndexBehindWarning)

    def save_to(self, place: IndexPlace, settings: Settings) -> str:
        """Write the current gallery to another place (a staging directory, under another cipher) without
        touching this database's file; returns the stamp (JSON) to record with it. For key conversions."""
        gallery = self._current(settings)
        assert self._backend is not None
        return self._stamp(self._save_fields(gallery, place), gallery, settings)

    def _save_fields(self, gallery: Gallery, place: IndexPlace) -> dict[str, Any]:
        """Save the gallery's index (with its map and vectors where the backend keeps them: ``saved_map``) to
        ``place``; the stamp's fields."""
        assert self._backend is not None
        source = self._map_source(gallery)
        if source is None:
            return self._backend.save(gallery.index, place)
        fields = self._backend.save(gallery.index, place, source)  # type: ignore[call-arg]
        digests = fields.pop("map_digests", {})
        return {**fields, "map": {"vectors": source.rows is not None, **digests}}

    def _stamp(self, fields: dict[str, Any], gallery: Gallery, settings: Settings) -> str:
        """The store's record of a persisted copy: the backend's fields plus what the keeper checks at load."""
        assert self._backend is not None
        return json.dumps({
            **fields,
            "generation": gallery.generation,
            "count": len(gallery.index),
            "live": len(gallery),
            "model_id": settings.model_id,
            "dim": settings.dim,
            "kind": gallery.index.kind,
            "backend": self._backend.name,
            "params": gallery.index.params,
            "params_of": settings.index_params_raw,
        }, sort_keys=True)

    def _discard_other(self, kind: str) -> None:
        """Drop the persisted copy an earlier backend left behind (it would otherwise keep old vectors)."""
        try:
            old = self.backend(kind)
        except Exception:
            return
        if self._backend is not None and old.name != self._backend.name:
            old.discard(self.place)

    def rebuild(self, settings: Settings) -> Gallery:
        """Rebuild from the store and persist."""
        self._replace(self._build(settings))
        self.save(settings, force=True)
        return self.gallery

    # ------------------------------------------------------------------------------------------ inspection
    def verify(self, settings: Settings) -> tuple[list[str], list[str]]:
        """(checks, problems): the persisted copy matches its stamp (else it is rebuilt and saved, when
        writable), and the index holds exactly the stored templates, mapped to the right people
        (``index_check.verify``)."""
        return index_check.verify(self, settings)

    def engine_gallery(self, settings: Settings, wait_s: float = OPEN_WAIT_S) -> Gallery:
        """The engine's (or the file's) own gallery, never the stand-in: IndexUnavailableError while a remote
        engine cannot answer (``check``, saves; ``standin.answer``, which waits ``wait_s`` for it to open)."""
        return self._current(settings, wait_s)

    @property
    def backend_in_use(self) -> IndexBackend | None:
        """The backend of the gallery loaded or built last (None before one is)."""
        return self._backend

    def describe(self, settings: Settings) -> IndexState:
        """What the index holds now, without loading it (``index_check.describe``)."""
        return index_check.describe(self, settings)
