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

import os
from collections.abc import Callable, Sequence

import numpy as np

from .. import timings
from ..errors import InvalidInputError
from ..records import Candidate, Identification, Verification
from .decision import Policy
from .indexed import Gallery
from .scores import similarity_to_distance

#: person ids -> (person id of each row, sorted ascending; their template vectors (rows, dim) float32)
VectorFetch = Callable[[Sequence[int]], tuple[np.ndarray, np.ndarray]]
#: (person ids, probes (m, dim)) -> (person id of each row, sorted; similarities (rows, m)), or None (use fetch)
ScoreFetch = Callable[[Sequence[int], np.ndarray], "tuple[np.ndarray, np.ndarray] | None"]
#: template ids -> (the ids among them still stored; their vectors (rows, dim) float32): the store's read of a close
#: call's shortlist where the gallery does not hold its vectors in memory
TemplateFetch = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
#: person ids -> {person id: (name, external id or None)}
NameLookup = Callable[[Sequence[int]], dict[int, tuple[str, str | None]]]
Ranked = list[list[tuple[int, float]]]

#: Probes re-scored per block: bounds the (people x probes) score matrix.
RESCORE_BLOCK = 256


def candidate_people(gallery: Gallery, queries: np.ndarray, k: int, max_rounds: int | None = None,
                     wide: bool = False) -> Ranked:
    """For each query row, up to k (person id, best similarity found) pairs, best first, from the index.

    Searches the index for more templates than k, and widens the search for the queries whose templates
    came from fewer than k distinct people, until k people are found or the gallery is exhausted (or
    ``max_rounds`` widenings, for approximate indexes); so on an exact index the result is exactly the
    top-k people. ``wide``: through the index's wider search (``search_wide``, IVF kinds), for close calls.
    """
    m = len(queries)
    results: Ranked = [[] for _ in range(m)]
    total = len(gallery.index)
    if total == 0 or m == 0:
        return results
    pending = np.arange(m)
    kk = min(total, shortlist(k, gallery.templates_per_person()))
    search = gallery.index.search_wide if wide else gallery.index.search  # type: ignore[attr-defined]
    rounds = 0
    while len(pending):
        sims, ids = search(queries if len(pending) == m else queries[pending], kk)
        pids = gallery.person_of(ids)
        still: list[int] = []
        for row, q in enumerate(pending):
            people, best = first_people(pids[row], sims[row], k)
            if len(people) < k and kk < total and (max_rounds is None or rounds < max_rounds):
                still.append(int(q))
            else:
                results[q] = list(zip(people.tolist(), best.tolist()))
        pending = np.array(still, dtype=np.int64)
        kk = min(total, kk * 4)
        rounds += 1
    return results


#: Templates per person counted in the first search's shortlist, at most (see :func:`shortlist`).
SHORTLIST_PER_PERSON = 16


def shortlist(people: int, per_person: int) -> int:
    """Templates the first index search asks for to find ``people`` distinct people in a gallery of
    ``per_person`` templates a person (rounded up): ``people x per_person`` up to 16 a person, at least
    ``4 x people`` and 16. A probe's own person's templates come first, clustered, so a shortlist must hold
    them and still reach ``people - 1`` others; it need not hold every template of every candidate, because
    the index's results are in order: the first ``people`` distinct people of a shorter list are those of a
    longer one, and a list that holds fewer is searched again, wider (:func:`candidate_people`). Measured at
    1M templates, 50 a person, 300 probes (the ready databases of scripts/profile_query.py, 512-d;
    bench-results/shortlist-1m50-512.json): 100 templates held at least 9 people (median 21; 2 probes fewer
    than 10), 160 at least 15 (median 32), the 500 asked for before (10 people x 50) at least 42 (median 70),
    at more cost in the index search and in finding the people."""
    return max(4 * people, 16, people * min(per_person, SHORTLIST_PER_PERSON))


def first_people(pids: np.ndarray, sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` distinct people in one query's results (template person ids ``pids``, -1 for none, with
    their ``sims``, best first): (person ids, each one's best similarity among them), best first."""
    valid = pids >= 0
    if not valid.all():
        pids, sims = pids[valid], sims[valid]
    _, first = np.unique(pids, return_index=True)  # each person's first (best) row
    first.sort()
    first = first[:k]
    return pids[first], sims[first]


def rescore(queries: np.ndarray, ranked: Ranked, k: int, fetch: VectorFetch, score: ScoreFetch | None = None
            ) -> Ranked:
    """Replace each candidate's score by their exact best similarity over all of their stored templates,
    re-rank, keep k. ``score``, where given, computes the similarities where the vectors are (in memory);
    ``fetch`` is used when it cannot."""
    if len(ranked) > RESCORE_BLOCK:
        return [r for s in range(0, len(ranked), RESCORE_BLOCK)
                for r in rescore(queries[s:s + RESCORE_BLOCK], ranked[s:s + RESCORE_BLOCK], k, fetch, score)]
    wanted = [pid for pairs in ranked for pid, _ in pairs]
    got = score(wanted, queries) if score is not None else None
    if got is None:
        pids, vectors = fetch(wanted)
        sims = vectors @ queries.T
    else:
        pids, sims = got
    if not len(pids):
        return [[] for _ in ranked]
    # rows come grouped by person, sorted: each person's first row is where the id changes (no sort needed)
    starts = np.flatnonzero(np.concatenate(([True], pids[1:] != pids[:-1])))
    people = pids[starts]
    best = np.maximum.reduceat(sims, starts, axis=0)  # (people, queries): best template each
    out = []
    for j, pairs in enumerate(ranked):
        cand = np.fromiter((pid for pid, _ in pairs), dtype=np.int64, count=len(pairs))
        rows = np.minimum(np.searchsorted(people, cand), len(people) - 1)
        held = people[rows] == cand  # people removed since the index proposed them have no vectors: dropped
        cand, scores = cand[held], best[rows[held], j]
        order = np.argsort(-scores, kind="stable")[:k]
        out.append(list(zip(cand[order].tolist(), scores[order].astype(float).tolist())))
    return out


def rank_people(gallery: Gallery, queries: np.ndarray, k: int, fetch: VectorFetch, wide: bool = False,
                templates: TemplateFetch | None = None) -> Ranked:
    """The top-k people for each query with exact scores: straight from an exact index, else from a wider
    candidate list (k + max(5, k) people; ``wide``: from the index's wider search, see :func:`wide_candidates`,
    whose shortlist ``templates`` reads where memory does not hold it) re-scored exactly (from the gallery's
    in-memory vectors where it holds them, else through ``fetch``)."""
    if gallery.index.exact:
        return candidate_people(gallery, queries, k)
    people = k + max(5, k)
    found = wide_candidates(gallery, queries, people, templates) if wide else \
        candidate_people(gallery, queries, people, max_rounds=2)
    return rescore(queries, found, k, fetch, gallery.person_scores)


#: Templates a close call's wider search proposes; each is scored exactly where the vectors are in memory. At
#: 50 templates a person a stranger's nearest people each bring many of them: at 1M 128-d, 50 a person, with
#: 256 (over 512 lists) one ready stranger of 300 still got another decision than exact search's
#: (scripts/profile_query.py --ready), with 512 none of 300 and none of 600 over 256 or 512 lists
#: (bench-results/exact-agreement-1m50-128-codes64.json).
WIDE_SHORTLIST = 512


def wide_candidates(gallery: Gallery, queries: np.ndarray, people: int, templates: TemplateFetch | None = None
                    ) -> Ranked:
    """Up to ``people`` candidates for each query from the index's wider search (``search_wide``): its
    :data:`WIDE_SHORTLIST` best templates in the order of their exact scores, people in the order of their best
    template. Kinds whose search scores are exact (``scores_exact``: Milvus) are taken as they come; coded
    scores (ivfpq) are replaced by exact ones from the gallery's vectors where it holds them in memory, else
    from the store through ``templates`` (one read for the batch: the same answers, a close call then costs up
    to 512 row reads). Exact scores order a stranger's nearest templates, near-ties that coarse codes cannot
    (at 1M 128-d, 64-byte codes, 1,024 lists: the exact nearest among the 200 best-coded for 99.5% of
    near-threshold probes, among the 50 best for 98.4%), without re-scoring every template of every person
    proposed. InvalidInputError where coded scores would have to stand (no vectors and no ``templates``)."""
    sims, ids = gallery.index.search_wide(queries, min(len(gallery.index), WIDE_SHORTLIST))  # type: ignore[attr-defined]
    rows: list[tuple[np.ndarray, np.ndarray | None]] = []
    for row in range(len(queries)):
        live = gallery.person_of(ids[row]) >= 0  # FAISS padding, and ids this gallery does not map (yet)
        tids, scores = ids[row][live], sims[row][live]
        if not gallery.index.scores_exact:
            exact = gallery.template_scores(tids, queries[row:row + 1])
            scores = None if exact is None else exact[:, 0]
        rows.append((tids, scores))
    missing = [row for row, (_, scores) in enumerate(rows) if scores is None]
    if missing:
        if templates is None:
            raise InvalidInputError("a close call's shortlist has no exact scores: its vectors are not in memory "
                                    "and no store read was given")
        held, vectors = templates(np.unique(np.concatenate([rows[row][0] for row in missing])))
        for row in missing:  # the store's rows, in id order; ids removed since the index proposed them are gone
            tids = rows[row][0]
            at = np.minimum(np.searchsorted(held, tids), max(len(held) - 1, 0))
            kept = (held[at] == tids) if len(held) else np.zeros(len(tids), dtype=bool)
            rows[row] = (tids[kept], vectors[at[kept]] @ queries[row])
    out: Ranked = []
    for tids, scores in rows:
        assert scores is not None
        order = np.argsort(-scores, kind="stable")
        found, best = first_people(gallery.person_of(tids[order]), scores[order], people)
        out.append(list(zip(found.tolist(), best.tolist())))
    return out


#: A decision whose best exact score lies within this much (cosine) of its threshold is a close call: the
#: probe is searched again through the index's wider search (IVF kinds: ``search_wide``, 16 x nprobe, see
#: :func:`wide_candidates`), and the two candidate lists are merged (every score exact either way). Such a
#: probe (a stranger who resembles someone, or a poor photo of an enrolled person) is far from every
#: template, and its nearest ones lie in lists the default search does not reach: at 1M 128-d templates
#: (scripts/bench_search.py's data, threshold 0.5), 26 of 100 strangers of the ready probes got another
#: decision than exact search's; with 64-byte codes and this search none of the 300 ready probes did, 9 of
#: 1,000 with more strangers (at 50 a person: none of 300, none of 600; scripts/exact_agreement.py,
#: bench-results/exact-agreement-1m*-128-*.json). Probes outside the band
#: (genuine ones well above the threshold, clear strangers) pay nothing; a close call pays a second search.
CLOSE_CALL = 0.15
#: The band below the threshold is narrower: with 64-byte codes the decisions that differed from exact
#: search's had found best scores from 0.063 below the threshold to 0.105 above it (1,000 probes at 1M 128-d,
#: bench-results/exact-agreement-1m5-128-codes64-band.json), and strangers 0.08-0.15 below it (most of the
#: 512-d close calls, which found nothing better) are spared the second search.
CLOSE_CALL_BELOW = 0.08


#: ``FACEDB_CLOSE_CALLS=off`` skips the close calls' second search: decisions then come from the first search alone
#: (approximate near the threshold), for a door that puts its tail latency first. On by default: where most
#: strangers resemble someone (a very large gallery, or a threshold set low) nearly every stranger is a close
#: call and pays the wider search (measured at 10M 128-d in docs/performance-and-scale.md, both ways).
CLOSE_CALLS_ENV = "FACEDB_CLOSE_CALLS"


def close_calls_on() -> bool:
    """Whether close calls are searched again (``FACEDB_CLOSE_CALLS``: ``off``/``0``/``false``/``no`` turn it off,
    ``on``/``1``/``true``/``yes`` or unset leave it on; InvalidInputError for anything else, checked when a
    database is opened). Read at each close call, so a clear decision pays nothing for it."""
    raw = os.environ.get(CLOSE_CALLS_ENV, "on")
    value = raw.strip().lower()
    if value in {"off", "0", "false", "no"}:
        return False
    if value in {"on", "1", "true", "yes", ""}:
        return True
    raise InvalidInputError(f"{CLOSE_CALLS_ENV} must be on or off, got {raw!r}")


def settle_close_calls(gallery: Gallery, queries: np.ndarray, ranked: Ranked, k: int, threshold: float,
                       fetch: VectorFetch, templates: TemplateFetch | None = None) -> Ranked:
    """``ranked`` (exact scores, best first, per query) with its close calls (best score less than
    :data:`CLOSE_CALL` above ``threshold``, or less than :data:`CLOSE_CALL_BELOW` below it) searched again wider
    and merged: the same people or better ones,
    with the same exact scores. Unchanged for exact indexes and kinds without a wider search."""
    if gallery.index.exact or not hasattr(gallery.index, "search_wide"):
        return ranked
    below = min(CLOSE_CALL, CLOSE_CALL_BELOW)
    close = [i for i, pairs in enumerate(ranked) if pairs and -below < pairs[0][1] - threshold < CLOSE_CALL]
    if not close or not close_calls_on():
        return ranked
    out = list(ranked)
    for i, wider in zip(close, rank_people(gallery, queries[close], k, fetch, wide=True, templates=templates)):
        merged = dict(ranked[i])
        merged.update(wider)  # a person found by both has the same exact score in both
        out[i] = sorted(merged.items(), key=lambda pair: -pair[1])[:k]
    return out


def candidates(pairs: list[tuple[int, float]], names: dict[int, tuple[str, str | None]]) -> list[Candidate]:
    """Candidate records for (person id, similarity) pairs; people no longer in ``names`` are dropped."""
    return [
        Candidate(name=names[pid][0], person_id=pid, similarity=sim, distance=float(similarity_to_distance(sim)),
                  external_id=names[pid][1])
        for pid, sim in pairs
        if pid in names
    ]


def decide(cands: list[Candidate], policy: Policy | float, k: int | None = None) -> Identification:
    """The open-set decision for one probe from its ranked candidates, by ``policy`` (a float: a plain
    threshold), which the answer carries so it can be explained; ``k`` trims the candidates shown (the margin
    rule reads the runner-up even when one candidate is asked for)."""
    if not isinstance(policy, Policy):
        policy = Policy("given", float(policy), explanation="given")
    shown = cands if k is None else cands[:k]
    if not cands:
        return Identification(identity=None, similarity=None, distance=None, threshold=policy.threshold,
                              candidates=[], rule=policy.explanation, score_threshold=policy.margin)
    best = cands[0]
    accepted, score = policy.judge(best.similarity, cands[1].similarity if len(cands) > 1 else None)
    return Identification(
        identity=best.name if accepted else None,
        similarity=best.similarity,
        distance=best.distance,
        threshold=policy.threshold,
        candidates=shown,
        external_id=best.external_id if accepted else None,
        rule=policy.explanation,
        score=score,
        score_threshold=policy.margin if score is not None else None,
    )


def identify(gallery: Gallery, queries: np.ndarray, k: int, policy: Policy | float, fetch: VectorFetch,
             names: NameLookup, templates: TemplateFetch | None = None) -> list[Identification]:
    """The whole 1:N query for unit probe rows ``queries`` (m, dim): one Identification per row. ``fetch``
    reads candidates' vectors and ``templates`` a close call's shortlist where the gallery does not hold them in
    memory (both from the store, for the same answers as from memory)."""
    if not isinstance(policy, Policy):
        policy = Policy("given", float(policy), explanation="given")
    with timings.stage("search"):  # the index's candidates and their exact re-scoring
        kq = max(k, 2) if policy.needs_runner_up else k
        ranked = settle_close_calls(gallery, queries, rank_people(gallery, queries, kq, fetch), kq,
                                    policy.threshold, fetch, templates)
    with timings.stage("decide"):
        lookup = names([pid for pairs in ranked for pid, _ in pairs])
        return [decide(candidates(pairs, lookup), policy, k) for pairs in ranked]


def verify_scores(probe: np.ndarray, templates: np.ndarray, name: str, threshold: float,
                  external_id: str | None = None) -> Verification:
    """1:1 decision for one unit probe against a person's templates (best template wins)."""
    with timings.stage("decide"):
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
