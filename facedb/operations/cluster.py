"""Clustering faces by identity: pure functions over ``(n, d)`` unit vectors, no I/O and no database.

Scores are cosine similarities of unit vectors (higher is more alike), as everywhere in facedb. The flow:

1. :func:`knn_graph`: each face's ``k`` nearest neighbours, kept as an undirected edge where their similarity
   is ``>= threshold``. Exact (blocked GEMM) up to :data:`EXACT_MAX` faces; above that through the index
   backend's IVF kind (``facedb.gallery.index.backend_for("ivf")``; approximate: a neighbour can be missed, a kept
   score is exact). A caller that already holds an index (the database's gallery) passes its own ``search``.
2. A grouping rule (:data:`RULES`):

   * ``average`` (the default): average-linkage agglomerative clustering (UPGMA). Two groups merge while the
     **mean** similarity over all pairs of their faces is ``>= threshold``, best pair first. Exact within each
     connected component of the graph of up to :data:`DENSE_MAX` faces (the mean of cosine similarities
     between two groups is the dot product of their vector sums over the product of their sizes, so nothing
     is approximated there); a larger component (only with a threshold far too low) merges along graph edges
     only. Groups in different components never merge: were the graph to hold every pair at or above the
     threshold, every pair across them would be below it, and so their mean; with k neighbours a face whose
     matches all lie beyond its k nearest can stay apart (a split, never a merge). A single look-alike pair
     cannot join two people (the mean of the other pairs stays low): the rule that keeps precision.
   * ``chinese-whispers`` (Biemann 2006; dlib's ``chinese_whispers``): every face starts in its own group and
     repeatedly takes the group with the largest summed edge weight among its neighbours. Updated in random
     blocks (at least 16 a round; a face's update sees the blocks before it), until no face changes or
     :data:`CW_ROUNDS` rounds.
   * ``components``: connected components of the graph (single linkage on the k-NN graph). The fastest;
     one look-alike edge chains two people together.

3. Groups smaller than ``min_size`` (default 2) are **unclustered** (label -1), never clusters of one.
   Clusters are numbered 0, 1, ... by size (largest first), ties by their first face's position. Each has a
   **central** face: the member with the highest mean similarity to the other members.

Deterministic: the same vectors, parameters and ``seed`` give the same labels (the seed only matters to
Chinese whispers' update order and to FAISS's training sample).

Where the default threshold comes from: :func:`default_threshold`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InvalidInputError, InvalidVectorError
from ..gallery.scores import UNIT_TOLERANCE
from ..gallery.settings import check_threshold

#: Grouping rules, the default first.
RULES = ("average", "chinese-whispers", "components")
DEFAULT_RULE = "average"
#: Neighbours per face in the graph.
DEFAULT_K = 10
#: Up to this many faces the k-NN graph is computed exactly (blocked GEMM); above, through an IVF index.
EXACT_MAX = 50_000
#: Components up to this many faces get exact dense average linkage (a DENSE_MAX^2 float32 matrix: 64 MiB).
DENSE_MAX = 4096
#: Chinese whispers: most rounds (each face updated once a round); it usually settles in under 20.
CW_ROUNDS = 50
#: How far above the database's 1:1 threshold each rule's default sits (see default_threshold; measured on LFW's
#: peopleDevTrain people in scripts/bench_cluster.py, docs/clustering.md).
RULE_OFFSET = {"average": 0.006, "chinese-whispers": 0.016, "components": 0.021}

#: (query vectors (m, d), k) -> (similarities (m, k'), row indices (m, k'), -1 = none), best first.
KnnSearch = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Graph:
    """An undirected similarity graph over ``n`` faces: edge ``rows[e] < cols[e]`` with similarity ``sims[e]``,
    each pair once."""

    n: int
    rows: np.ndarray
    cols: np.ndarray
    sims: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class Clustering:
    """The result of :func:`cluster`: ``labels[i]`` is face i's cluster (0 = the largest), -1 = unclustered;
    ``central[c]`` is the row of cluster c's most central face; the parameters that made it."""

    labels: np.ndarray
    central: np.ndarray
    rule: str
    threshold: float
    k: int
    min_size: int
    seed: int
    edges: int
    exact_graph: bool
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def n_clusters(self) -> int:
        return len(self.central)

    @property
    def unclustered(self) -> np.ndarray:
        return np.flatnonzero(self.labels < 0)

    def members(self) -> list[np.ndarray]:
        """Row indices of each cluster's faces, in cluster order (each sorted)."""
        order = np.argsort(self.labels, kind="stable")
        sorted_labels = self.labels[order]
        bounds = np.searchsorted(sorted_labels, np.arange(self.n_clusters + 1))
        return [order[bounds[c]:bounds[c + 1]] for c in range(self.n_clusters)]


# --------------------------------------------------------------------------------------------- validation
def check_vectors(x: object) -> np.ndarray:
    """``x`` as C-contiguous float32 ``(n, d)`` unit rows; InvalidVectorError otherwise."""
    try:
        arr = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidVectorError(f"not a numeric vector array: {exc}") from None
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise InvalidVectorError(f"expected shape (n, d), got {tuple(np.shape(x))}")
    if not np.isfinite(arr).all():
        raise InvalidVectorError("vectors contain NaN or infinity")
    if len(arr):
        norms = np.linalg.norm(arr, axis=1)
        bad = np.flatnonzero(np.abs(norms - 1.0) > UNIT_TOLERANCE)
        if bad.size:
            raise InvalidVectorError(f"vector {int(bad[0])} has norm {float(norms[bad[0]]):.4f}; clustering "
                                     "compares unit vectors (L2-normalise them first)")
    return np.ascontiguousarray(arr)


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise InvalidInputError(f"the grouping rule is one of {', '.join(RULES)}; got {rule!r}")
    return rule


def _check_positive(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidInputError(f"{what} must be a positive integer")
    return int(value)


def default_threshold(db_threshold: float, rule: str = DEFAULT_RULE) -> float:
    """The clustering threshold for a database whose 1:1 decision threshold is ``db_threshold``.

    The database's threshold is calibrated for one comparison (dlib-resnet: FAR 1e-3). A clustering of n faces
    makes ~n^2/2 comparisons, so at that threshold every face has ~n/1000 look-alike strangers: a rule that
    links on a single edge (``components``, ``chinese-whispers``) chains them, and even ``average`` (which needs
    the mean over all pairs of two groups, so one look-alike pair cannot join two people seen several times)
    pairs up strangers seen once. Each rule's default is the database's threshold raised by
    :data:`RULE_OFFSET`, the best pairwise + BCubed F on LFW's peopleDevTrain people for dlib-resnet (0.929 ->
    0.935 average, 0.945 Chinese whispers, 0.950 components; measured in ``scripts/bench_cluster.py``).
    Measured on LFW in ``scripts/bench_cluster.py`` (docs/clustering.md).
    """
    t = check_threshold(db_threshold) + RULE_OFFSET[check_rule(rule)]
    return float(min(1.0, max(-1.0, t)))


# ------------------------------------------------------------------------------------------------- graph
def exact_knn(x: np.ndarray, k: int, min_similarity: float = -np.inf, block_bytes: int = 64 * 2**20
              ) -> tuple[np.ndarray, np.ndarray]:
    """Every row's ``k`` most similar other rows with similarity ``>= min_similarity``, exactly: (similarities,
    rows), each ``(n, min(k, n - 1))``, best first (ties by row), padded with -inf / -1. Blocked GEMM holding at
    most ``block_bytes`` of scores at a time; where few scores reach ``min_similarity`` (clustering's high
    thresholds) only those are ranked, which costs far less than a top-k over every score."""
    n = len(x)
    k = max(0, min(k, n - 1))
    sims = np.full((n, k), -np.inf, dtype=np.float32)
    idx = np.full((n, k), -1, dtype=np.int64)
    if k == 0:
        return sims, idx
    block = max(1, min(n, block_bytes // (4 * n)))
    for s in range(0, n, block):
        q = x[s:s + block]
        m = len(q)
        scores = q @ x.T
        scores[np.arange(m), np.arange(s, s + m)] = -np.inf  # never one's own neighbour
        passing = scores >= min_similarity
        if np.count_nonzero(passing) <= 8 * k * m:
            r, c = np.nonzero(passing)
            v = scores[r, c]
            order = np.lexsort((c, -v, r))
            r, c, v = r[order], c[order], v[order]
            rank = np.arange(len(r)) - np.searchsorted(r, r)  # position within its row
            keep = rank < k
            sims[s + r[keep], rank[keep]] = v[keep]
            idx[s + r[keep], rank[keep]] = c[keep]
            continue
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < n - 1 else np.argsort(-scores, axis=1)[:, :k]
        top_s = np.take_along_axis(scores, top, axis=1)
        order = np.lexsort((top, -top_s), axis=1)
        top_s, top = np.take_along_axis(top_s, order, axis=1), np.take_along_axis(top, order, axis=1)
        ok = top_s >= min_similarity
        sims[s:s + m] = np.where(ok, top_s, -np.inf)
        idx[s:s + m] = np.where(ok, top, -1)
    return sims, idx


def index_search(x: np.ndarray, *, kind: str = "ivf", nprobe: int | None = None, seed: int = 0) -> KnnSearch:
    """A k-NN search over the rows of ``x`` through the index backend providing ``kind`` (FAISS's IVF by
    default: trained on ``x``, approximate, exact scores). Returns row indices."""
    from ..gallery.index import IndexPlace, backend_for

    params: dict[str, object] = {} if nprobe is None else {"nprobe": int(nprobe)}
    train = x
    cap = 200_000  # k-means needs ~40 points a list; more only costs training time
    if len(x) > cap:
        train = x[np.sort(np.random.default_rng(seed).choice(len(x), cap, replace=False))]
    place = IndexPlace(Path(tempfile.gettempdir()), readonly=True)  # in memory only: never saved
    index = backend_for(kind).new(kind, x.shape[1], params, train, place)
    index.add(np.arange(len(x), dtype=np.int64), x)

    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return index.search(queries, k)

    return search


def knn_graph(x: np.ndarray, k: int = DEFAULT_K, threshold: float = -1.0, *, search: KnnSearch | None = None,
              exact_max: int = EXACT_MAX, nprobe: int | None = None, seed: int = 0,
              block: int = 65536) -> tuple[Graph, bool]:
    """The undirected k-NN graph of unit rows ``x``: an edge joins i and j when one is among the other's ``k``
    nearest neighbours and their similarity is ``>= threshold``. Returns (graph, exact): ``exact`` is False when
    the neighbours came from an approximate search.

    ``search``: a k-NN search of your own (e.g. over an index you hold), returning row indices of ``x``;
    else exact for up to ``exact_max`` rows, an IVF index (``nprobe`` lists a query) above.
    """
    x = check_vectors(x)
    k = _check_positive(k, "k")
    threshold = check_threshold(threshold)
    n = len(x)
    empty = Graph(n, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if n < 2:
        return empty, True
    exact = search is None and n <= exact_max
    rows_l, cols_l, sims_l = [], [], []
    if exact:
        sims, idx = exact_knn(x, k, threshold)
        starts = [0]
        parts = [(sims, idx)]
    else:
        search = search or index_search(x, nprobe=nprobe, seed=seed)
        starts, parts = [], []
        for s in range(0, n, block):
            kk = min(k + 1, n)
            sims, idx = search(x[s:s + block], kk)
            idx = np.asarray(idx, dtype=np.int64)
            sims = np.asarray(sims, dtype=np.float32)
            self_hit = idx == np.arange(s, s + len(idx))[:, None]
            idx = np.where(self_hit, -1, idx)
            starts.append(s)
            parts.append((sims, idx))
    for s, (sims, idx) in zip(starts, parts):
        me = np.broadcast_to(np.arange(s, s + len(idx))[:, None], idx.shape)
        keep = (idx >= 0) & (sims >= threshold)
        rows_l.append(me[keep])
        cols_l.append(idx[keep])
        sims_l.append(sims[keep])
    r = np.concatenate(rows_l).astype(np.int64)
    c = np.concatenate(cols_l).astype(np.int64)
    s_ = np.concatenate(sims_l).astype(np.float32)
    if not exact:  # an approximate search may rank a face among its own neighbours: keep the others only
        keep = r != c
        r, c, s_ = r[keep], c[keep], s_[keep]
    lo, hi = np.minimum(r, c), np.maximum(r, c)
    key = lo * n + hi
    order = np.lexsort((-s_, key))
    key, s_ = key[order], s_[order]
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    key, s_ = key[first], s_[first]
    return Graph(n, key // n, key % n, s_), exact


# ------------------------------------------------------------------------------------------------- rules
def components(graph: Graph) -> np.ndarray:
    """Connected components: for each node, the smallest node of its component. Vectorised union-find (hook
    each edge's larger root under its smaller one, then compress paths), O(E log n)."""
    parent = np.arange(graph.n, dtype=np.int64)
    rows, cols = graph.rows, graph.cols
    while len(rows):
        pr, pc = parent[rows], parent[cols]
        differ = pr != pc
        if not differ.any():
            break
        rows, cols, pr, pc = rows[differ], cols[differ], pr[differ], pc[differ]
        np.minimum.at(parent, np.maximum(pr, pc), np.minimum(pr, pc))  # roots only point downwards: no cycles
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return parent


def _csr(graph: Graph) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, neighbours, weights) of the graph with both directions of every edge."""
    src = np.concatenate([graph.rows, graph.cols])
    dst = np.concatenate([graph.cols, graph.rows])
    w = np.concatenate([graph.sims, graph.sims]).astype(np.float64)
    order = np.lexsort((dst, src))
    indptr = np.zeros(graph.n + 1, dtype=np.int64)
    np.cumsum(np.bincount(src, minlength=graph.n), out=indptr[1:])
    return indptr, dst[order], w[order]


def chinese_whispers(graph: Graph, *, seed: int = 0, rounds: int = CW_ROUNDS) -> np.ndarray:
    """Chinese whispers (Biemann 2006): a label per node. Each node takes the label with the largest summed
    edge weight (similarity) among its neighbours; ties go to the smaller label. Nodes are updated in a random
    order (``seed``) in blocks, a block seeing the updates of the blocks before it."""
    n = graph.n
    labels = np.arange(n, dtype=np.int64)
    if not len(graph):
        return labels
    indptr, nbr, w = _csr(graph)
    deg = np.diff(indptr)
    active = np.flatnonzero(deg)
    rng = np.random.default_rng(seed)
    blocks = min(len(active), max(16, len(active) // 4096))
    for _ in range(rounds):
        changed = 0
        for batch in np.array_split(rng.permutation(active), blocks):
            counts = deg[batch]
            owner = np.repeat(np.arange(len(batch)), counts)
            edge = np.repeat(indptr[batch], counts) + (np.arange(counts.sum()) - np.repeat(
                np.cumsum(counts) - counts, counts))
            key = owner * n + labels[nbr[edge]]
            uniq, inverse = np.unique(key, return_inverse=True)
            score = np.bincount(inverse, weights=w[edge])
            u_owner, u_label = uniq // n, uniq % n
            order = np.lexsort((u_label, -score, u_owner))
            first = np.ones(len(order), dtype=bool)
            first[1:] = u_owner[order][1:] != u_owner[order][:-1]
            new = u_label[order][first]  # one per owner, owners ascending = batch order
            changed += int(np.count_nonzero(new != labels[batch]))
            labels[batch] = new
        if not changed:
            break
    return labels


def _average_dense(x: np.ndarray, threshold: float) -> np.ndarray:
    """Exact average linkage over the rows of ``x`` stopped at ``threshold``: a label per row (the row of the
    group's first survivor). Nearest-neighbour chain (Murtagh 1983): O(m^2) for m rows, exact because average
    linkage is reducible; a group whose best mean similarity is below the threshold can never merge again
    (merging others only averages their similarities to it), so it is retired at once."""
    m = len(x)
    sim = (x @ x.T).astype(np.float64)
    np.fill_diagonal(sim, -np.inf)
    size = np.ones(m)
    alive = np.ones(m, dtype=bool)
    label = np.arange(m, dtype=np.int64)
    chain: list[int] = []
    start = 0
    while True:
        if not chain:
            while start < m and not alive[start]:
                start += 1
            if start >= m:
                break
            chain.append(start)
        a = chain[-1]
        row = sim[a]
        b = int(np.argmax(row))
        best = row[b]
        if len(chain) >= 2 and row[chain[-2]] >= best:  # ties: the reciprocal pair wins (keeps the chain finite)
            b, best = chain[-2], row[chain[-2]]
        if not best >= threshold:  # retire a: nothing it can join reaches the threshold, now or later
            alive[a] = False
            sim[a, :] = -np.inf
            sim[:, a] = -np.inf
            chain.pop()
            continue
        if len(chain) >= 2 and b == chain[-2]:
            merged = (size[a] * sim[a] + size[b] * sim[b]) / (size[a] + size[b])
            sim[a], sim[:, a] = merged, merged
            sim[a, a] = -np.inf
            sim[b, :] = -np.inf
            sim[:, b] = -np.inf
            size[a] += size[b]
            label[label == b] = a
            alive[b] = False
            chain.pop()
            chain.pop()
        else:
            chain.append(b)
    return label


def _average_sparse(x: np.ndarray, graph: Graph, threshold: float) -> np.ndarray:
    """Average linkage restricted to graph edges (for components too large for the dense matrix): exact mean
    similarities (vector sums), candidates only among graph neighbours; a label per row."""
    m = len(x)
    sums = x.astype(np.float64)
    size = np.ones(m)
    nbrs: list[set[int]] = [set() for _ in range(m)]
    for i, j in zip(graph.rows.tolist(), graph.cols.tolist()):
        nbrs[i].add(j)
        nbrs[j].add(i)
    alive = np.ones(m, dtype=bool)
    parent = np.arange(m, dtype=np.int64)
    chain: list[int] = []
    in_chain: set[int] = set()
    start = 0
    while True:
        if not chain:
            while start < m and not alive[start]:
                start += 1
            if start >= m:
                break
            chain.append(start)
            in_chain.add(start)
        a = chain[-1]
        cands = np.fromiter(nbrs[a], dtype=np.int64, count=len(nbrs[a]))
        if len(cands):
            means = sums[cands] @ sums[a] / (size[cands] * size[a])
            order = np.lexsort((cands, -means))
            b, best = int(cands[order[0]]), float(means[order[0]])
            if len(chain) >= 2 and chain[-2] in nbrs[a]:
                prev = float(sums[chain[-2]] @ sums[a] / (size[chain[-2]] * size[a]))
                if prev >= best:
                    b, best = chain[-2], prev
        else:
            b, best = -1, -np.inf
        if not best >= threshold:
            alive[a] = False
            chain.pop()
            in_chain.discard(a)
            continue
        if b in in_chain:  # reciprocal (or, where graph limits break reducibility, a loop): merge now
            pos = chain.index(b)
            in_chain.difference_update(chain[pos:])
            del chain[pos:]
            sums[a] += sums[b]
            size[a] += size[b]
            parent[b] = a
            alive[b] = False
            for c in nbrs[b]:
                if c != a:
                    nbrs[c].discard(b)
                    nbrs[c].add(a)
            nbrs[a] |= nbrs[b]
            nbrs[a] -= {a, b}
            nbrs[b] = set()
        else:
            chain.append(b)
            in_chain.add(b)
    while True:  # parent pointers to roots
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def average_linkage(x: np.ndarray, graph: Graph, threshold: float, *, dense_max: int = DENSE_MAX) -> np.ndarray:
    """Average linkage stopped at ``threshold``, run per connected component of ``graph`` (whose edges must be
    those ``>= threshold``): exact (dense) for components of up to ``dense_max`` faces, along graph edges above.
    A label per row."""
    comp = components(graph)
    labels = np.arange(graph.n, dtype=np.int64)
    order = np.argsort(comp, kind="stable")
    starts = np.flatnonzero(np.r_[True, comp[order][1:] != comp[order][:-1]])
    ends = np.r_[starts[1:], len(order)]
    sizes = ends - starts
    pairs = sizes == 2  # two faces joined by an edge >= threshold: their mean is that edge
    labels[order[starts[pairs] + 1]] = order[starts[pairs]]
    for s, e in zip(starts[sizes > 2], ends[sizes > 2]):
        rows = order[s:e]
        if len(rows) <= dense_max:
            local = _average_dense(x[rows], threshold)
        else:
            pos = np.full(graph.n, -1, dtype=np.int64)
            pos[rows] = np.arange(len(rows))
            inside = (pos[graph.rows] >= 0) & (pos[graph.cols] >= 0)
            sub = Graph(len(rows), pos[graph.rows[inside]], pos[graph.cols[inside]], graph.sims[inside])
            local = _average_sparse(x[rows], sub, threshold)
        labels[rows] = rows[local]
    return labels


# ----------------------------------------------------------------------------------------------- cluster
def finish(x: np.ndarray, groups: np.ndarray, min_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw group ids -> (labels numbered by size, largest first, ties by first row; -1 for groups smaller than
    ``min_size``) and each cluster's central row (highest mean similarity to the other members)."""
    n = len(groups)
    labels = np.full(n, -1, dtype=np.int64)
    if not n:
        return labels, np.zeros(0, dtype=np.int64)
    uniq, first, inverse, counts = np.unique(groups, return_index=True, return_inverse=True, return_counts=True)
    keep = counts >= min_size
    kept = np.flatnonzero(keep)
    ranked = kept[np.lexsort((first[kept], -counts[kept]))]
    new_id = np.full(len(uniq), -1, dtype=np.int64)
    new_id[ranked] = np.arange(len(ranked))
    labels = new_id[inverse]
    central = np.zeros(len(ranked), dtype=np.int64)
    if len(ranked):
        sums = np.zeros((len(ranked), x.shape[1]), dtype=np.float64)
        inside = labels >= 0
        np.add.at(sums, labels[inside], x[inside])
        score = np.full(n, -np.inf)
        score[inside] = np.einsum("ij,ij->i", x[inside].astype(np.float64), sums[labels[inside]])
        order = np.lexsort((np.arange(n), -score, labels))  # by cluster, best score first, then row
        order = order[labels[order] >= 0]
        lab_sorted = labels[order]
        heads = np.flatnonzero(np.r_[True, lab_sorted[1:] != lab_sorted[:-1]])
        central[lab_sorted[heads]] = order[heads]
    return labels, central


def cluster(x: object, threshold: float, *, rule: str = DEFAULT_RULE, k: int = DEFAULT_K, min_size: int = 2,
            seed: int = 0, search: KnnSearch | None = None, exact_max: int = EXACT_MAX,
            nprobe: int | None = None, dense_max: int = DENSE_MAX) -> Clustering:
    """Cluster unit vectors ``x`` ``(n, d)`` by identity. See the module docstring for the rules.

    ``threshold``: cosine similarity (higher = stricter; see :func:`default_threshold`); ``k``: neighbours per
    face in the graph; ``min_size``: smallest group reported as a cluster (smaller ones are unclustered);
    ``seed``: Chinese whispers' update order and the IVF training sample; ``search``: your own k-NN search
    over the rows of ``x`` (see :func:`knn_graph`).
    Raises InvalidVectorError (shape, NaN, not unit length) and InvalidInputError (rule, k, min_size,
    threshold outside [-1, 1]).
    """
    x = check_vectors(x)
    check_rule(rule)
    threshold = check_threshold(threshold)
    k = _check_positive(k, "k")
    min_size = _check_positive(min_size, "min_size")
    graph, exact = knn_graph(x, k, threshold, search=search, exact_max=exact_max, nprobe=nprobe, seed=seed)
    if rule == "components":
        groups = components(graph)
    elif rule == "chinese-whispers":
        groups = chinese_whispers(graph, seed=seed)
    else:
        groups = average_linkage(x, graph, threshold, dense_max=dense_max)
    labels, central = finish(x, groups, min_size)
    return Clustering(labels=labels, central=central, rule=rule, threshold=threshold, k=k, min_size=min_size,
                      seed=seed, edges=len(graph), exact_graph=exact)


__all__ = [
    "DEFAULT_K", "DEFAULT_RULE", "RULES", "Clustering", "Graph", "KnnSearch", "average_linkage", "check_rule",
    "check_vectors", "chinese_whispers", "cluster", "components", "default_threshold", "exact_knn", "finish",
    "index_search", "knn_graph",
]
