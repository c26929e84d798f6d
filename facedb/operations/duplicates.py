"""Gallery hygiene (``facedb check --duplicates``): the same person enrolled under two names, and two people's
photos (or very different photos) under one name. A report only: nothing is changed; ``facedb merge`` and
``facedb remove-template`` are the operator's tools to act on it.

The criterion is the clustering's (:mod:`facedb.operations.cluster`, average linkage): two sets of templates are taken
for one person when the **mean** similarity over all pairs across them reaches the clustering threshold (by default
the database's, see :func:`facedb.operations.cluster.default_threshold`). A single look-alike pair does not make two
people one, which at a 1:1 threshold of FAR 1e-3 would flag about one pair in a thousand.

* Across names: candidate pairs of people come from the k-NN graph of all templates (edges at or above the
  threshold joining two people); each candidate's exact mean cross similarity is the dot product of the two
  people's vector sums over the product of their template counts.
* Within a name: each person's templates are clustered (average linkage, exact); a person whose templates form
  two or more groups of at least two templates each is reported as split; with three templates or more, a
  template that joins no group is an outlier (a wrong photo?).
"""

from __future__ import annotations

import numpy as np

from ..gallery.settings import Settings, check_threshold
from ..gallery.store import Store
from ..records import DuplicatePair, DuplicatesReport, SplitPerson
from . import cluster as clustering


def find_duplicates(store: Store, settings: Settings, threshold: float | None = None) -> DuplicatesReport:
    """The report described in the module docstring."""
    if threshold is None:
        thr, source = clustering.default_threshold(settings.threshold), "the database's threshold"
    else:
        thr, source = check_threshold(threshold), "given"
    _, ids, pids, x = store.snapshot()
    people = np.unique(pids)
    names = store.names(people.tolist())
    report = DuplicatesReport(threshold=thr, threshold_source=source, people=len(names), templates=len(ids),
                              same_person=[], split=[], outliers=[])
    if not len(ids):
        return report
    pos = np.searchsorted(people, pids)
    sums = np.zeros((len(people), x.shape[1]), dtype=np.float64)
    np.add.at(sums, pos, x)
    counts = np.bincount(pos, minlength=len(people)).astype(np.float64)

    graph, _ = clustering.knn_graph(x, clustering.DEFAULT_K, thr)
    pa, pb = pos[graph.rows], pos[graph.cols]
    cross = pa != pb
    lo, hi, sims = np.minimum(pa, pb)[cross], np.maximum(pa, pb)[cross], graph.sims[cross]
    if len(lo):
        key = lo * len(people) + hi
        uniq, inverse = np.unique(key, return_inverse=True)
        matches = np.bincount(inverse)
        best = np.full(len(uniq), -np.inf)
        np.maximum.at(best, inverse, sims)
        a, b = uniq // len(people), uniq % len(people)
        means = np.einsum("ij,ij->i", sums[a], sums[b]) / (counts[a] * counts[b])
        for i in np.argsort(-means, kind="stable"):
            if means[i] >= thr:
                na, nb = names[int(people[a[i]])][0], names[int(people[b[i]])][0]
                report.same_person.append(DuplicatePair(
                    a=na, b=nb, mean_similarity=round(float(means[i]), 4), best_similarity=round(float(best[i]), 4),
                    matching_pairs=int(matches[i]), templates_a=int(counts[a[i]]), templates_b=int(counts[b[i]])))

    order = np.argsort(pos, kind="stable")
    bounds = np.searchsorted(pos[order], np.arange(len(people) + 1))
    for p in range(len(people)):
        rows = order[bounds[p]:bounds[p + 1]]
        if len(rows) < 2:
            continue
        result = clustering.cluster(x[rows], thr, min_size=1)
        groups = result.members()
        big = [g for g in groups if len(g) >= 2]
        name = names[int(people[p])][0]
        if len(big) >= 2:
            g1, g2 = big[0], big[1]
            between = float(x[rows[g1]].sum(0) @ x[rows[g2]].sum(0) / (len(g1) * len(g2)))
            report.split.append(SplitPerson(
                name=name, templates=len(rows), groups=[len(g) for g in big],
                template_ids=[[int(t) for t in ids[rows[g]]] for g in big],
                mean_similarity_between=round(between, 4)))
        if len(rows) >= 3:
            for g in groups:
                if len(g) == 1:
                    others = np.delete(np.arange(len(rows)), g[0])
                    report.outliers.append({
                        "name": name, "template": int(ids[rows[g[0]]]),
                        "best_similarity_to_own": round(float(np.max(x[rows[others]] @ x[rows[g[0]]])), 4)})
    return report
