"""The gallery: a vector index plus the template -> person map, at a known store generation.

The index holds template ids; the engine answers in people. This keeps the two in step: every add and
remove goes through here, and ``person_of`` turns the index's template ids into person ids (-1 for ids that
map to no one: FAISS padding, or HNSW tombstones of removed templates).

Both directions are arrays, so a query never loops in Python: template id -> person is a dense table indexed by
id (4 bytes per id ever issued; template ids are AUTOINCREMENT, so dense), person -> templates the template ids
sorted by person (CSR-like, searched with ``searchsorted``). For index kinds that do not keep exact vectors,
the gallery may also hold them in memory (``vectors``, see ``vectors.py``) for re-scoring.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .index import VectorIndex
from .vectors import TemplateVectors, bytes_for

#: The dense id -> person table is used while the largest id is at most this many times the live templates
#: (plus a margin); past that (a gallery that removed most of what it ever held) ids are searched instead.
DENSE_SLACK = 4


class Gallery:
    """An index of templates plus the template -> person map, at a known store generation."""

    def __init__(self, index: VectorIndex, generation: int) -> None:
        self.index = index
        self.generation = generation
        self._ids = np.zeros(0, dtype=np.int64)  # sorted template ids
        self._pids = np.zeros(0, dtype=np.int64)  # person id of each
        self._by_person: np.ndarray | None = None  # (person id << 32 | template id), sorted: person -> templates
        self._starts: np.ndarray | None = None  # person id -> their first row in _by_person (and id + 1 -> end)
        self._dense: np.ndarray | None = None  # template id -> person id (-1: none), when ids are dense enough
        self._per_person = (1, 0)  # (templates per person rounded up, gallery size it was counted at)
        self.vectors: TemplateVectors | None = None  # exact vectors in memory (kinds that do not keep them)
        self._vector_budget = 0

    def __len__(self) -> int:
        return len(self._ids)

    def keep_vectors(self, vectors: TemplateVectors, budget: int) -> None:
        """Re-score from ``vectors`` (in memory) while the gallery's vectors fit ``budget`` bytes."""
        self.vectors, self._vector_budget = vectors, budget

    def drop_vectors(self) -> None:
        if self.vectors is not None:
            self.vectors.close()
        self.vectors = None

    def close(self) -> None:
        """Let a replaced gallery's background work stop."""
        self.drop_vectors()

    def add(self, ids: np.ndarray, person_ids: np.ndarray, vectors: np.ndarray) -> None:
        if not len(ids):
            return
        ids = np.asarray(ids, dtype=np.int64)
        person_ids = np.asarray(person_ids, dtype=np.int64)
        self.index.add(ids, vectors, person_ids)
        all_ids = np.concatenate([self._ids, ids])
        all_pids = np.concatenate([self._pids, person_ids])
        order = np.argsort(all_ids, kind="stable")  # already sorted runs: a merge, not a full sort
        self._ids, self._pids = all_ids[order], all_pids[order]
        if self._by_person is not None:  # insert the new pairs where they belong: O(n) copy, no sort
            keys = np.sort(_person_keys(person_ids, ids))
            self._by_person = np.insert(self._by_person, np.searchsorted(self._by_person, keys), keys)
        self._starts = None
        self._index_dense(ids, person_ids)
        if self.vectors is not None:
            if bytes_for(len(self._ids), self.index.dim) > self._vector_budget:
                self.drop_vectors()  # grew past the memory budget: re-score from the store from now on
            else:
                self.vectors.put(ids, vectors)

    def set_map(self, ids: np.ndarray, person_ids: np.ndarray, per_person: int = 0) -> None:
        """Attach the person map to an index loaded from its persisted copy (which holds the vectors).
        ``per_person``: templates per person (rounded up) where the copy recorded it, so the first query does
        not count them (a sort of every person id: ~0.2 s at 1M)."""
        ids = np.asarray(ids, dtype=np.int64)
        person_ids = np.asarray(person_ids, dtype=np.int64)
        if len(ids) > 1 and not bool(np.all(ids[1:] > ids[:-1])):  # saved copies are sorted already
            order = np.argsort(ids, kind="stable")
            ids, person_ids = ids[order], person_ids[order]
        self._ids, self._pids = ids, person_ids
        self._by_person = self._starts = None
        self._dense = None
        if per_person > 0:
            self._per_person = (per_person, len(ids))
        self._index_dense(self._ids, self._pids)

    def remove(self, ids: Sequence[int]) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        present = ids[np.isin(ids, self._ids)]
        if not len(present):
            return
        self.index.remove(present)
        keep = ~np.isin(self._ids, present)
        self._ids, self._pids = self._ids[keep], self._pids[keep]
        if self._by_person is not None:
            self._by_person = self._by_person[~np.isin(self._by_person & _LOW, present)]
        self._starts = None
        if self._dense is not None:
            self._dense[present[present < len(self._dense)]] = -1
        if self.vectors is not None:
            self.vectors.remove(present)

    def _index_dense(self, ids: np.ndarray, person_ids: np.ndarray) -> None:
        """Enter (id, person) pairs in the dense id -> person table, making or dropping it as the ids allow."""
        top = int(self._ids[-1]) if len(self._ids) else 0
        if top > DENSE_SLACK * len(self._ids) + (1 << 20) or int(np.max(self._pids, initial=0)) >= 2**31:
            self._dense = None  # too sparse (or ids beyond int32): searchsorted instead
            return
        if self._dense is None:
            self._dense = np.full(top + 1, -1, dtype=np.int32)
            self._dense[self._ids] = self._pids
            return
        if top >= len(self._dense):
            grown = np.full(max(top + 1, len(self._dense) * 5 // 4), -1, dtype=np.int32)
            grown[:len(self._dense)] = self._dense
            self._dense = grown
        self._dense[ids] = person_ids

    def dead(self) -> int:
        """Index entries that map to no person (HNSW tombstones)."""
        return len(self.index) - len(self._ids)

    def live_ids(self) -> np.ndarray:
        return self._ids

    def person_ids(self) -> np.ndarray:
        """Person id of each live template, in the order of :meth:`live_ids`."""
        return self._pids

    def person_of(self, ids: np.ndarray) -> np.ndarray:
        """Person id of each template id; -1 for ids not in the gallery (FAISS padding included)."""
        if not len(self._ids):
            return np.full(np.shape(ids), -1, dtype=np.int64)
        dense = self._dense
        if dense is not None:
            ids = np.asarray(ids)
            out = dense.take(ids, mode="clip").astype(np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= len(dense)):  # FAISS's -1 padding, or an unknown id
                out[(ids < 0) | (ids >= len(dense))] = -1
            return out
        pos = np.searchsorted(self._ids, ids)
        pos = np.clip(pos, 0, len(self._ids) - 1)
        found = self._ids[pos] == ids
        return np.where(found, self._pids[pos], -1)

    def templates_per_person(self) -> int:
        """Templates per person, rounded up (1 when empty). An estimate for sizing searches, recounted when the
        gallery has grown or shrunk by a quarter since the last count, not after every change (counting
        sorts the whole gallery: ~0.1 s at 1M, which every query after an enrolment would pay)."""
        per, at = self._per_person
        n = len(self._pids)
        if not 0.75 * at <= n <= 1.25 * at or at == 0:
            per = max(1, -(-n // max(len(np.unique(self._pids)), 1)))
            self._per_person = (per, n)
        return per

    def _person_order(self) -> np.ndarray:
        if self._by_person is None:  # made on the first re-scoring (then kept up to date by add and remove)
            keys = _person_keys(self._pids, self._ids)
            # A bulk import adds each person's templates together, so the keys usually come sorted already:
            # checking costs ~2 ms at 1M, the sort ~0.1 s (0.45 s on the loaded development machine), which the
            # first answer after an open would pay.
            if len(keys) > 1 and not bool(np.all(keys[1:] >= keys[:-1])):
                keys.sort()
            self._by_person = keys
        return self._by_person

    def _person_starts(self) -> np.ndarray:
        """Person id -> the first row of their templates in :meth:`_person_order` (id + 1: the end), made on the
        first re-scoring after a change (a count over the gallery: a few ms at 1M). Binary searches of the
        1M keys instead cost ~40-140 us a query here (10 people: 20 searches, each ~20 cache misses)."""
        if self._starts is None:
            keys = self._person_order()
            counts = np.bincount(keys >> 32) if len(keys) else np.zeros(0, dtype=np.int64)
            self._starts = np.concatenate(([0], np.cumsum(counts)))
        return self._starts

    def person_templates(self, person_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Every live template of the given people: (person id of each, sorted; template ids)."""
        keys = self._person_order()
        starts = self._person_starts()
        wanted = np.unique(np.asarray(person_ids, dtype=np.int64))
        if len(wanted) and (wanted[0] < 0 or wanted[-1] >= len(starts) - 1):
            wanted = wanted[(wanted >= 0) & (wanted < len(starts) - 1)]  # ids no template was ever kept for
        lo, hi = starts[wanted], starts[wanted + 1]
        counts = hi - lo
        # the rows lo[i] .. hi[i] - 1 of every wanted person, concatenated, without a Python loop
        rows = np.arange(int(counts.sum())) + np.repeat(lo - (np.cumsum(counts) - counts), counts)
        found = keys[rows]
        return found >> 32, found & _LOW

    def person_scores(self, person_ids: Sequence[int], queries: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(person id of each row, sorted; similarities ``(rows, len(queries))``) of every live template of the
        given people, computed from the in-memory vectors; None when they do not hold them all."""
        if self.vectors is None or self.index.keeps_vectors:
            return None
        pids, ids = self.person_templates(person_ids)
        sims = self.vectors.scores(ids, queries)
        return (pids, sims) if sims is not None else None

    def template_scores(self, ids: np.ndarray, queries: np.ndarray) -> np.ndarray | None:
        """Exact similarities ``(len(ids), len(queries))`` of these templates (live ids), from the index's own
        float32 vectors or the in-memory ones; None when neither holds them all (not read from the store)."""
        if self.index.keeps_vectors:
            vectors = self.index.exact_vectors(np.asarray(ids, dtype=np.int64))
            return None if vectors is None else vectors @ np.asarray(queries, dtype=np.float32).T
        return self.vectors.scores(ids, queries) if self.vectors is not None else None

    def person_vectors(self, person_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray] | None:
        """Every live template vector of the given people, grouped by person: (person id of each row, sorted;
        vectors), from the index itself or the in-memory vectors; None when neither holds them all (the caller
        reads the store)."""
        if self.index.keeps_vectors:
            pids, ids = self.person_templates(person_ids)
            vectors = self.index.exact_vectors(ids)
        elif self.vectors is not None:
            pids, ids = self.person_templates(person_ids)
            vectors = self.vectors.get(ids)
        else:
            return None
        return (pids, vectors) if vectors is not None else None


_LOW = np.int64(2**32 - 1)


def _person_keys(person_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """One sortable int64 per (person, template) pair: person id in the high half, template id in the low.
    Store ids are AUTOINCREMENT integers far below 2**31; larger ones cannot be paired this way."""
    person_ids, ids = np.asarray(person_ids, dtype=np.int64), np.asarray(ids, dtype=np.int64)
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) > _LOW or int(person_ids.min()) < 0
                     or int(person_ids.max()) >= 2**31):
        raise ValueError("template ids beyond 2**32 or person ids beyond 2**31 are not supported")
    return (person_ids << 32) | ids
