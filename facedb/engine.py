"""The query engine: probe vectors -> candidate templates -> exact per-person scores -> top-k people -> a
decision. ``identify``, ``search``, ``verify`` and ``check`` all answer through here.

Rules (stated once, here):

* A person's score for a probe is the **best** (highest) cosine similarity over all of their templates.
* ``identify`` ranks people by that score and returns the top k (fewer if fewer people exist).
* The decision is the best person if their score is ``>= threshold``, else *unknown* (``identity=None``).
* An approximate index only proposes candidates: every candidate person is re-scored exactly from all of
  their stored vectors before ranking, so it may miss a person but never changes a score.
* ``verify`` accepts iff the claimed person's score is ``>= threshold``; it reads the person's stored vectors,
  not the index, so it is exact whatever the index.

The engine never touches the store: the caller hands it a ``fetch`` function (person ids -> their stored
vectors) and a ``names`` function (person ids -> names).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .gallery import Gallery
from .records import Candidate, Identification, Verification
from .scores import similarity_to_distance

#: person ids -> (person id of each row, sorted ascending; their template vectors (rows, dim) float32)
VectorFetch = Callable[[Sequence[int]], tuple[np.ndarray, np.ndarray]]
#: person ids -> {person id: (name, external id or None)}
NameLookup = Callable[[Sequence[int]], dict[int, tuple[str, str | None]]]
Ranked = list[list[tuple[int, float]]]

#: Probes re-scored per block: bounds the (people x probes) score matrix.
RESCORE_BLOCK = 256


def candidate_people(gallery: Gallery, queries: np.ndarray, k: int, max_rounds: int | None = None) -> Ranked:
    """For each query row, up to k (person id, best similarity found) pairs, best first, from the index.

    Searches the index for more templates than k, and widens the search for the queries whose templates
    came from fewer than k distinct people, until k people are found or the gallery is exhausted (or
    ``max_rounds`` widenings, for approximate indexes); so on an exact index the result is exactly the
    top-k people.
    """
    m = len(queries)
    results: Ranked = [[] for _ in range(m)]
    total = len(gallery.index)
    if total == 0 or m == 0:
        return results
    pending = np.arange(m)
    # Enough templates for k people at the gallery's templates per person (a person's templates cluster
    # together, so fewer would mostly come back from k/t people and need a second search).
    kk = min(total, max(4 * k, 16, 2 * k * gallery.templates_per_person()))
    rounds = 0
    while len(pending):
        sims, ids = gallery.index.search(queries[pending], kk)
        pids = gallery.person_of(ids)
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


def rescore(queries: np.ndarray, ranked: Ranked, k: int, fetch: VectorFetch) -> Ranked:
    """Replace each candidate's score by their exact best similarity over all of their stored templates,
    re-rank, keep k."""
    if len(ranked) > RESCORE_BLOCK:
        return [r for s in range(0, len(ranked), RESCORE_BLOCK)
                for r in rescore(queries[s:s + RESCORE_BLOCK], ranked[s:s + RESCORE_BLOCK], k, fetch)]
    wanted = [pid for pairs in ranked for pid, _ in pairs]
    pids, vectors = fetch(wanted)
    if not len(pids):
        return [[] for _ in ranked]
    people, starts = np.unique(pids, return_index=True)  # rows come grouped by person, sorted
    best = np.maximum.reduceat(vectors @ queries.T, starts, axis=0)  # (people, queries): best template each
    out = []
    for j, pairs in enumerate(ranked):
        rows = np.searchsorted(people, [pid for pid, _ in pairs])
        exact = [(pid, float(best[r, j])) for (pid, _), r in zip(pairs, rows)
                 if r < len(people) and people[r] == pid]
        exact.sort(key=lambda p: -p[1])
        out.append(exact[:k])
    return out


def rank_people(gallery: Gallery, queries: np.ndarray, k: int, fetch: VectorFetch) -> Ranked:
    """The top-k people for each query with exact scores: straight from an exact index, else from a wider
    candidate list (k + max(5, k) people) re-scored exactly."""
    if gallery.index.exact:
        return candidate_people(gallery, queries, k)
    return rescore(queries, candidate_people(gallery, queries, k + max(5, k), max_rounds=2), k, fetch)


def candidates(pairs: list[tuple[int, float]], names: dict[int, tuple[str, str | None]]) -> list[Candidate]:
    """Candidate records for (person id, similarity) pairs; people no longer in ``names`` are dropped."""
    return [
        Candidate(name=names[pid][0], person_id=pid, similarity=sim, distance=float(similarity_to_distance(sim)),
                  external_id=names[pid][1])
        for pid, sim in pairs
        if pid in names
    ]


def decide(cands: list[Candidate], threshold: float, rule: str | None = None) -> Identification:
    """The open-set decision for one probe from its ranked candidates, held to ``threshold`` (chosen by
    ``rule``, which the answer carries so it can be explained)."""
    if not cands:
        return Identification(identity=None, similarity=None, distance=None, threshold=threshold, candidates=[],
                              rule=rule)
    best = cands[0]
    accepted = best.similarity >= threshold
    return Identification(
        identity=best.name if accepted else None,
        similarity=best.similarity,
        distance=best.distance,
        threshold=threshold,
        candidates=cands,
        external_id=best.external_id if accepted else None,
        rule=rule,
    )


def identify(gallery: Gallery, queries: np.ndarray, k: int, threshold: float, fetch: VectorFetch,
             names: NameLookup, rule: str | None = None) -> list[Identification]:
    """The whole 1:N query for unit probe rows ``queries`` (m, dim): one Identification per row."""
    ranked = rank_people(gallery, queries, k, fetch)
    lookup = names([pid for pairs in ranked for pid, _ in pairs])
    return [decide(candidates(pairs, lookup), threshold, rule) for pairs in ranked]


def verify_scores(probe: np.ndarray, templates: np.ndarray, name: str, threshold: float,
                  external_id: str | None = None) -> Verification:
    """1:1 decision for one unit probe against a person's templates (best template wins)."""
    sim = float(np.max(templates @ probe)) if len(templates) else -1.0
    return Verification(
        name=name,
        accepted=sim >= threshold,
        similarity=sim,
        distance=float(similarity_to_distance(sim)),
        threshold=threshold,
        external_id=external_id,
    )


def self_match_misses(gallery: Gallery, vectors: np.ndarray, fetch: VectorFetch) -> int:
    """How many of these stored template vectors the query path does not find as a perfect match (``check``)."""
    ranked = rank_people(gallery, vectors, 1, fetch)
    return sum(1 for pairs in ranked if not pairs or pairs[0][1] < 1.0 - 1e-4)


def neighbours(gallery: Gallery, queries: np.ndarray, min_similarity: float
               ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For each query, every live template with similarity ``>= min_similarity``: (template ids, person ids,
    similarities), best first (through the index's range search; approximate kinds may miss some)."""
    out = []
    for ids, sims in gallery.index.range_search(queries, min_similarity):
        pids = gallery.person_of(ids)
        live = pids >= 0
        out.append((ids[live], pids[live], sims[live]))
    return out
