"""facedb.operations.cluster (graph and grouping rules) against brute-force oracles and known answers, and the
clustering
metrics against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from facedb import InvalidInputError, InvalidVectorError
from facedb.evaluate.clustering import bcubed, clustering_report, nmi, pairwise_prf
from facedb.operations.cluster import (
    RULES,
    Graph,
    average_linkage,
    chinese_whispers,
    cluster,
    components,
    default_threshold,
    knn_graph,
)

from .conftest import unit_rows


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def identities(rng: np.random.Generator, people: int, per: int, dim: int = 64, noise: float = 0.07,
               strangers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``people`` identities x ``per`` faces, then ``strangers`` lone faces (label -1). With the defaults two faces
    of one identity have cosine ~0.75, of two identities 0.0 +- 0.13 (well separated at 0.55)."""
    centres = unit_rows(rng, people, dim)
    truth = np.repeat(np.arange(people), per)
    x = unit(centres[truth] + noise * rng.standard_normal((len(truth), dim)))
    if strangers:
        x = np.concatenate([x, unit_rows(rng, strangers, dim)])
        truth = np.concatenate([truth, -np.ones(strangers, dtype=int)])
    return x, truth


def union_find_all_pairs(x: np.ndarray, threshold: float, allowed: set[tuple[int, int]] | None = None) -> list[int]:
    """Oracle: components of the graph of all pairs >= threshold (only ``allowed`` pairs, if given), by a plain
    union-find over every pair."""
    parent = list(range(len(x)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    sims = x @ x.T
    for i, j in itertools.combinations(range(len(x)), 2):
        if sims[i, j] >= threshold and (allowed is None or (i, j) in allowed):
            a, b = root(i), root(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return [root(i) for i in range(len(x))]


def same_partition(a: np.ndarray | list[int], b: np.ndarray | list[int]) -> bool:
    """Two labellings group the items identically (labels themselves may differ)."""
    pairs = {(x, y) for x, y in zip(a, b)}
    return len({x for x, _ in pairs}) == len(pairs) == len({y for _, y in pairs})


def brute_knn_edges(x: np.ndarray, k: int, threshold: float) -> set[tuple[int, int]]:
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    edges = set()
    for i in range(len(x)):
        for j in np.argsort(-sims[i], kind="stable")[:k]:
            if sims[i, j] >= threshold:
                edges.add((min(i, int(j)), max(i, int(j))))
    return edges


def naive_average_linkage(x: np.ndarray, threshold: float) -> list[int]:
    """Oracle: merge the two groups with the highest mean pairwise similarity (from the full matrix) while it
    reaches the threshold; O(n^4), for a few dozen points."""
    sims = (x @ x.T).astype(np.float64)
    groups = [[i] for i in range(len(x))]
    while len(groups) > 1:
        best, pair = -np.inf, None
        for a, b in itertools.combinations(range(len(groups)), 2):
            m = sims[np.ix_(groups[a], groups[b])].mean()
            if m > best:
                best, pair = m, (a, b)
        if best < threshold:
            break
        a, b = pair
        groups[a] += groups[b]
        del groups[b]
    labels = [0] * len(x)
    for g, members in enumerate(groups):
        for i in members:
            labels[i] = g
    return labels


# ------------------------------------------------------------------------------------------------ graph
@pytest.mark.parametrize("k", [1, 3, 8])
def test_knn_graph_is_the_brute_force_knn_graph(rng, k):
    x = unit_rows(rng, 60, 8)
    graph, exact = knn_graph(x, k, 0.2)
    assert exact
    got = set(zip(graph.rows.tolist(), graph.cols.tolist()))
    assert got == brute_knn_edges(x, k, 0.2)
    assert np.all(graph.rows < graph.cols)
    np.testing.assert_allclose(graph.sims, np.einsum("ij,ij->i", x[graph.rows], x[graph.cols]), atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_components_with_every_neighbour_equal_union_find_over_all_pairs(seed):
    rng = np.random.default_rng(seed)
    x = unit_rows(rng, 70, 6)
    for threshold in (0.5, 0.7, 0.85):
        result = cluster(x, threshold, rule="components", k=len(x), min_size=1)
        assert same_partition(result.labels, union_find_all_pairs(x, threshold))


def test_components_on_a_sparse_graph_equal_union_find_over_its_edges(rng):
    x = unit_rows(rng, 80, 6)
    graph, _ = knn_graph(x, 3, 0.5)
    oracle = union_find_all_pairs(x, 0.5, brute_knn_edges(x, 3, 0.5))
    assert same_partition(components(graph), oracle)


def test_components_of_a_long_chain_and_a_star():
    n = 1000
    chain = Graph(n, np.arange(n - 1), np.arange(1, n), np.ones(n - 1, dtype=np.float32))
    assert set(components(chain).tolist()) == {0}
    rev = Graph(n, np.arange(n - 1)[::-1].copy(), np.arange(1, n)[::-1].copy(), np.ones(n - 1, dtype=np.float32))
    assert set(components(rev).tolist()) == {0}
    star = Graph(6, np.array([0, 0, 3]), np.array([1, 2, 4]), np.ones(3, dtype=np.float32))
    assert components(star).tolist() == [0, 0, 0, 3, 3, 5]


# -------------------------------------------------------------------------------------------- average
@pytest.mark.parametrize("seed", range(5))
def test_average_linkage_equals_the_naive_oracle(seed):
    rng = np.random.default_rng(seed)
    x, _ = identities(rng, 6, 4, dim=8, noise=0.5, strangers=6)
    for threshold in (0.3, 0.5, 0.7):
        oracle = naive_average_linkage(x, threshold)
        graph, _ = knn_graph(x, len(x), threshold)
        assert same_partition(average_linkage(x, graph, threshold), oracle), threshold
        # components too large for the dense matrix merge along graph edges: with every edge there, the same
        assert same_partition(average_linkage(x, graph, threshold, dense_max=0), oracle), threshold


def test_average_linkage_does_not_chain_where_single_linkage_does(rng):
    """Two tight groups joined by one look-alike pair: single linkage (components) merges them, average
    linkage keeps them apart."""
    a = unit(np.array([1, 0, 0, 0]) + 0.05 * rng.standard_normal((5, 4)))
    b = unit(np.array([0, 1, 0, 0]) + 0.05 * rng.standard_normal((5, 4)))
    bridge = unit(np.array([[1, 1, 0, 0]]))  # 0.7 to both groups
    x = np.concatenate([a, b, bridge]).astype(np.float32)
    assert cluster(x, 0.65, rule="components").n_clusters == 1
    avg = cluster(x, 0.65, rule="average")
    assert avg.n_clusters == 2 and same_partition(avg.labels[:10], [0] * 5 + [1] * 5)


# ------------------------------------------------------------------------------------------ known answers
@pytest.mark.parametrize("rule", RULES)
def test_separated_identities_are_recovered_exactly_and_strangers_stay_unclustered(rng, rule):
    x, truth = identities(rng, 40, 6, strangers=30)
    result = cluster(x, 0.55, rule=rule)
    known = truth >= 0
    assert same_partition(result.labels[known], truth[known])
    assert (result.labels[~known] == -1).all()
    assert result.n_clusters == 40 and len(result.unclustered) == 30


@pytest.mark.parametrize("rule", RULES)
def test_the_ivf_graph_gives_the_same_answer_on_separated_data(rng, rule):
    x, truth = identities(rng, 60, 5, strangers=20)
    exact = cluster(x, 0.55, rule=rule)
    approx = cluster(x, 0.55, rule=rule, exact_max=0)
    assert exact.exact_graph and not approx.exact_graph
    assert same_partition(approx.labels[truth >= 0], truth[truth >= 0])
    assert np.array_equal(exact.labels, approx.labels)


@pytest.mark.parametrize("rule", RULES)
def test_deterministic_for_a_seed(rule):
    x, _ = identities(np.random.default_rng(5), 30, 5, noise=0.2)
    first = cluster(x, 0.3, rule=rule, seed=3)
    again = cluster(x.copy(), 0.3, rule=rule, seed=3)
    assert np.array_equal(first.labels, again.labels) and np.array_equal(first.central, again.central)


def test_numbering_min_size_and_central_face(rng):
    x = np.concatenate([identities(rng, 1, n)[0] for n in (3, 7, 5, 1, 2)])
    result = cluster(x, 0.55, min_size=3)
    assert [len(m) for m in result.members()] == [7, 5, 3]  # largest first; the groups of 1 and 2 unclustered
    assert len(result.unclustered) == 3
    for members, central in zip(result.members(), result.central):
        sims = x[members] @ x[members].T
        mean_to_others = (sims.sum(1) - np.diag(sims)) / (len(members) - 1)
        assert central == members[int(np.argmax(mean_to_others))]
    assert cluster(x, 0.55, min_size=1).n_clusters == 5


def test_chinese_whispers_takes_the_heavier_neighbourhood():
    # node 0 links to a triangle {1,2,3} and to a lone node 4: it joins the triangle
    rows = np.array([0, 0, 0, 0, 1, 1, 2])
    cols = np.array([1, 2, 3, 4, 2, 3, 3])
    labels = chinese_whispers(Graph(5, rows, cols, np.full(7, 0.9, dtype=np.float32)), seed=1)
    assert len({labels[i] for i in (0, 1, 2, 3)}) == 1


def test_edge_cases_and_bad_input(rng):
    assert cluster(np.zeros((0, 8), dtype=np.float32), 0.5).n_clusters == 0
    one = cluster(unit_rows(rng, 1, 8), 0.5)
    assert one.labels.tolist() == [-1] and one.n_clusters == 0
    dup = unit_rows(rng, 1, 8)
    assert cluster(np.repeat(dup, 3, axis=0), 0.99).labels.tolist() == [0, 0, 0]
    x = unit_rows(rng, 5, 8)
    with pytest.raises(InvalidVectorError):
        cluster(x * 2, 0.5)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(InvalidVectorError):
        cluster(bad, 0.5)
    with pytest.raises(InvalidVectorError):
        cluster(x[0], 0.5)
    with pytest.raises(InvalidInputError):
        cluster(x, 1.5)
    with pytest.raises(InvalidInputError):
        cluster(x, 0.5, rule="kmeans")
    with pytest.raises(InvalidInputError):
        cluster(x, 0.5, k=0)
    with pytest.raises(InvalidInputError):
        cluster(x, 0.5, min_size=0)


def test_default_threshold_follows_the_database_threshold():
    assert default_threshold(0.929) == pytest.approx(0.935)
    assert default_threshold(0.929, "components") > default_threshold(0.929)
    assert default_threshold(0.929, "chinese-whispers") > default_threshold(0.929)
    assert default_threshold(0.999, "components") <= 1.0
    with pytest.raises(InvalidInputError):
        default_threshold(2.0)


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_against_brute_force(rng):
    for _ in range(5):
        n = 50
        truth, pred = rng.integers(0, 7, n), rng.integers(-1, 5, n)
        own = np.where(pred < 0, 1000 + np.arange(n), pred)  # -1: a cluster of its own
        tp = fp = fn = 0
        for i, j in itertools.combinations(range(n), 2):
            same, together = truth[i] == truth[j], own[i] == own[j]
            tp += same and together
            fp += together and not same
            fn += same and not together
        pw = pairwise_prf(truth, pred)
        assert pw["precision"] == pytest.approx(tp / (tp + fp)) and pw["recall"] == pytest.approx(tp / (tp + fn))
        bc = bcubed(truth, pred)
        assert bc["precision"] == pytest.approx(np.mean([np.mean(truth[own == own[i]] == truth[i]) for i in range(n)]))
        assert bc["recall"] == pytest.approx(np.mean([np.mean(own[truth == truth[i]] == own[i]) for i in range(n)]))
    assert pairwise_prf([1, 1, 2], [0, 0, -1])["f"] == 1.0
    perfect = clustering_report(["a", "a", "b"], [3, 3, 5])
    assert perfect["pairwise_f"] == perfect["bcubed_f"] == pytest.approx(1.0) and perfect["nmi"] == pytest.approx(1.0)
    assert nmi([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)


def test_nmi_matches_scikit_learn(rng):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    truth, pred = rng.integers(0, 9, 300), rng.integers(0, 6, 300)
    assert nmi(truth, pred) == pytest.approx(sklearn_metrics.normalized_mutual_info_score(truth, pred))
