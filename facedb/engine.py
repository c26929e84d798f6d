"""The query engine: templates in an index -> top-k *people* -> a decision.

Rules (stated once, here):

* A person's score for a probe is the **best** (highest) cosine similarity over all of their templates.
* ``identify`` ranks people by that score and returns the top k (fewer if fewer people exist).
* The decision is the best person if their score is ``>= threshold``, else *unknown* (``identity=None``).
* ``verify`` accepts iff the claimed person's score is ``>= threshold``; it reads the person's stored vectors,
  not the index, so it is exact whatever the index.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .index import VectorIndex
from .records import Candidate, Identification, Verification
from .scores import similarity_to_distance


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
        self.index.add(ids, vectors)
        all_ids = np.concatenate([self._ids, np.asarray(ids, dtype=np.int64)])
        all_pids = np.concatenate([self._pids, np.asarray(person_ids, dtype=np.int64)])
        order = np.argsort(all_ids, kind="stable")
        self._ids, self._pids = all_ids[order], all_pids[order]
        self._by_person = None

    def set_map(self, ids: np.ndarray, person_ids: np.ndarray) -> None:
        """Attach the person map to an index loaded from a file (which holds the vectors already)."""
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

    def person_of(self, ids: np.ndarray) -> np.ndarray:
        """Person id of each template id; -1 for ids not in the gallery (FAISS padding included)."""
        pos = np.searchsorted(self._ids, ids)
        pos = np.clip(pos, 0, max(len(self._ids) - 1, 0))
        if not len(self._ids):
            return np.full(ids.shape, -1, dtype=np.int64)
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

    def top_people(
        self, queries: np.ndarray, k: int, max_rounds: int | None = None
    ) -> list[list[tuple[int, float]]]:
        """For each query row, up to k (person id, best similarity) pairs, best first.

        Searches the index for more templates than k, and widens the search for the queries whose
        templates came from fewer than k distinct people, until k people are found or the gallery is
        exhausted (or ``max_rounds`` widenings, for approximate indexes); so on an exact index the result is
        exactly the top-k people.
        """
        m = len(queries)
        results: list[list[tuple[int, float]]] = [[] for _ in range(m)]
        total = len(self.index)
        if total == 0 or m == 0:
            return results
        pending = np.arange(m)
        # Enough templates for k people at the gallery's templates per person (a person's templates cluster
        # together, so fewer would mostly come back from k/t people and need a second search).
        kk = min(total, max(4 * k, 16, 2 * k * self.templates_per_person()))
        rounds = 0
        while len(pending):
            sims, ids = self.index.search(queries[pending], kk)
            pids = self.person_of(ids)
            still: list[int] = []
            for row, q in enumerate(pending):
                people: dict[int, float] = {}
                for pid, sim in zip(pids[row], sims[row]):
                    if pid >= 0 and pid not in people:
                        people[int(pid)] = float(sim)
                        if len(people) == k:
                            break
                if len(people) < k and kk < total and (max_rounds is None or rounds < max_rounds):
                    still.append(int(q))
                else:
                    results[q] = list(people.items())
            pending = np.array(still, dtype=np.int64)
            kk = min(total, kk * 4)
            rounds += 1
        return results


def candidates(pairs: list[tuple[int, float]], names: dict[int, str]) -> list[Candidate]:
    return [
        Candidate(name=names[pid], person_id=pid, similarity=sim, distance=float(similarity_to_distance(sim)))
        for pid, sim in pairs
        if pid in names
    ]


def decide(cands: list[Candidate], threshold: float) -> Identification:
    """The open-set decision for one probe from its ranked candidates."""
    if not cands:
        return Identification(identity=None, similarity=None, distance=None, threshold=threshold, candidates=[])
    best = cands[0]
    return Identification(
        identity=best.name if best.similarity >= threshold else None,
        similarity=best.similarity,
        distance=best.distance,
        threshold=threshold,
        candidates=cands,
    )


def verify_scores(probe: np.ndarray, templates: np.ndarray, name: str, threshold: float) -> Verification:
    """1:1 decision for one unit probe against a person's templates (best template wins)."""
    sim = float(np.max(templates @ probe)) if len(templates) else -1.0
    return Verification(
        name=name,
        accepted=sim >= threshold,
        similarity=sim,
        distance=float(similarity_to_distance(sim)),
        threshold=threshold,
    )
