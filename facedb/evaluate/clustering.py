"""Clustering quality: pure functions of two labellings (truth, prediction), no I/O.

Conventions: ``truth[i]`` is face i's identity (any hashable labels); ``pred[i]`` its cluster id, where a
negative id (facedb's -1, *unclustered*) makes the face a cluster of its own, as the metrics' authors count
singletons. All three are computed from the contingency table, so they cost O(n log n), not O(n^2).

* **Pairwise** precision / recall / F (Otto, Wang & Jain 2018, "Clustering millions of faces by identity";
  learn-to-cluster): over all pairs of faces put in one cluster, the share of same-identity pairs (precision);
  over all same-identity pairs, the share put in one cluster (recall); F their harmonic mean. Dominated by
  the largest identities (a person with 530 photos has 140k pairs).
* **BCubed** precision / recall / F (Bagga & Baldwin 1998; Amigó et al. 2009): per face, the share of its
  cluster that is its identity (precision) and the share of its identity that is in its cluster (recall),
  averaged over faces. Every face weighs the same.
* **NMI**: mutual information of the two labellings over the arithmetic mean of their entropies
  (scikit-learn's default normalisation).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _codes(labels: Sequence[object] | np.ndarray, singletons: bool) -> np.ndarray:
    arr = np.asarray(labels)
    if singletons and arr.dtype.kind in "iu":
        arr = arr.astype(np.int64)
        loose = arr < 0
        if loose.any():  # unclustered faces: one cluster each, ids past every real one
            arr = arr.copy()
            arr[loose] = arr.max(initial=0) + 1 + np.arange(int(loose.sum()))
    return np.unique(arr, return_inverse=True)[1].reshape(-1)


def contingency(truth: Sequence[object] | np.ndarray, pred: Sequence[object] | np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(counts of each non-empty (identity, cluster) cell, identity of each cell, cluster of each cell)."""
    t = _codes(truth, singletons=False)
    p = _codes(pred, singletons=True)
    if len(t) != len(p):
        raise ValueError(f"truth has {len(t)} labels and the prediction {len(p)}")
    cells, counts = np.unique(np.stack([t, p]), axis=1, return_counts=True)
    return counts.astype(np.int64), cells[0], cells[1]


def _pairs(x: np.ndarray) -> float:
    x = x.astype(np.float64)
    return float(np.sum(x * (x - 1) / 2))


def pairwise_prf(truth: Sequence[object] | np.ndarray, pred: Sequence[object] | np.ndarray) -> dict[str, float]:
    """Pairwise precision, recall and F (1.0 where there is no pair to count)."""
    counts, t, p = contingency(truth, pred)
    same_both = _pairs(counts)
    pred_pairs = _pairs(np.bincount(p, weights=counts))
    true_pairs = _pairs(np.bincount(t, weights=counts))
    precision = same_both / pred_pairs if pred_pairs else 1.0
    recall = same_both / true_pairs if true_pairs else 1.0
    f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f": f}


def bcubed(truth: Sequence[object] | np.ndarray, pred: Sequence[object] | np.ndarray) -> dict[str, float]:
    """BCubed precision, recall and F."""
    counts, t, p = contingency(truth, pred)
    n = counts.sum()
    if not n:
        return {"precision": 1.0, "recall": 1.0, "f": 1.0}
    cluster_size = np.bincount(p, weights=counts)[p]
    identity_size = np.bincount(t, weights=counts)[t]
    sq = counts.astype(np.float64) ** 2
    precision = float(np.sum(sq / cluster_size) / n)
    recall = float(np.sum(sq / identity_size) / n)
    return {"precision": precision, "recall": recall, "f": 2 * precision * recall / (precision + recall)}


def nmi(truth: Sequence[object] | np.ndarray, pred: Sequence[object] | np.ndarray) -> float:
    """Normalised mutual information, arithmetic-mean normalisation; 1.0 when both labellings are trivial."""
    counts, t, p = contingency(truth, pred)
    n = float(counts.sum())
    if not n:
        return 1.0
    pt = np.bincount(t, weights=counts) / n
    pp = np.bincount(p, weights=counts) / n
    pij = counts / n
    mi = float(np.sum(pij * (np.log(pij) - np.log(pt[t]) - np.log(pp[p]))))
    ht = float(-np.sum(pt * np.log(pt)))
    hp = float(-np.sum(pp * np.log(pp)))
    if ht == 0 and hp == 0:
        return 1.0
    denom = (ht + hp) / 2
    return max(0.0, mi / denom) if denom else 0.0


def clustering_report(truth: Sequence[object] | np.ndarray, pred: Sequence[object] | np.ndarray
                      ) -> dict[str, float]:
    """Every measure above in one dict (``pairwise_*``, ``bcubed_*``, ``nmi``) plus counts."""
    pred_arr = np.asarray(pred)
    pw, bc = pairwise_prf(truth, pred), bcubed(truth, pred)
    out: dict[str, float] = {f"pairwise_{k}": v for k, v in pw.items()}
    out.update({f"bcubed_{k}": v for k, v in bc.items()})
    out["nmi"] = nmi(truth, pred)
    out["faces"] = float(len(pred_arr))
    if pred_arr.dtype.kind in "iu":
        out["clusters"] = float(len(np.unique(pred_arr[pred_arr >= 0])))
        out["unclustered"] = float(np.sum(pred_arr < 0))
    return out
