"""The gallery: a vector index plus the template -> person map, at a known store generation.

The index holds template ids; the engine answers in people. This keeps the two in step: every add and
remove goes through here, and ``person_of`` turns the index's template ids into person ids (-1 for ids that
map to no one: FAISS padding, or HNSW tombstones of removed templates).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .index import VectorIndex


class Gallery:
    """An index of templates plus the template -> person map, at a known store generation."""

    def __init__(self, index: VectorIndex, generation: int) -> None:
        self.index = index
        self.generation = generation
        self._ids = np.zeros(0, dtype=np.int64)  # sorted template ids
        self._pids = np.zeros(0, dtype=np.int64)  # person id of each
        self._by_person: tuple[np.ndarray, np.ndarray] | None = None  # (person ids, template ids), by person
        self._per_person = (1, 0)  # (templates per person rounded up, gallery size it was counted at)

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, ids: np.ndarray, person_ids: np.ndarray, vectors: np.ndarray) -> None:
        if not len(ids):
            return
        self.index.add(ids, vectors, person_ids)
        all_ids = np.concatenate([self._ids, np.asarray(ids, dtype=np.int64)])
        all_pids = np.concatenate([self._pids, np.asarray(person_ids, dtype=np.int64)])
        order = np.argsort(all_ids, kind="stable")
        self._ids, self._pids = all_ids[order], all_pids[order]
        self._by_person = None

    def set_map(self, ids: np.ndarray, person_ids: np.ndarray) -> None:
        """Attach the person map to an index loaded from its persisted copy (which holds the vectors)."""
        order = np.argsort(ids, kind="stable")
        self._ids = np.asarray(ids, dtype=np.int64)[order]
        self._pids = np.asarray(person_ids, dtype=np.int64)[order]
        self._by_person = None

    def remove(self, ids: Sequence[int]) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        present = ids[np.isin(ids, self._ids)]
        if not len(present):
            return
        self.index.remove(present)
        keep = ~np.isin(self._ids, present)
        self._ids, self._pids = self._ids[keep], self._pids[keep]
        self._by_person = None

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

    def _person_order(self) -> tuple[np.ndarray, np.ndarray]:
        if self._by_person is None:  # rebuilt on the first re-scoring after a change: O(n log n), ~0.1 s at 1M
            order = np.argsort(self._pids, kind="stable")
            self._by_person = (self._pids[order], self._ids[order])
        return self._by_person

    def person_templates(self, person_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Every live template of the given people: (person id of each, sorted; template ids)."""
        pids, ids = self._person_order()
        wanted = np.unique(np.asarray(person_ids, dtype=np.int64))
        lo, hi = np.searchsorted(pids, wanted, "left"), np.searchsorted(pids, wanted, "right")
        rows = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)]) if len(wanted) else np.zeros(0, int)
        return pids[rows], ids[rows]

    def person_vectors(self, person_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray] | None:
        """Every live template vector of the given people, grouped by person: (person id of each row, sorted;
        vectors), from the index itself; None when the index does not keep exact vectors."""
        if not self.index.keeps_vectors:
            return None
        pids, ids = self.person_templates(person_ids)
        vectors = self.index.exact_vectors(ids)
        return (pids, vectors) if vectors is not None else None
