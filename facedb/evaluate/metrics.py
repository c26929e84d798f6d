"""Error-rate arithmetic: pure functions of score arrays, no I/O.

Conventions: scores are cosine similarities (higher is more alike); a pair or probe is *accepted* when
``score >= threshold``. FAR = share of impostor comparisons accepted (1:1); TAR = share of genuine ones
accepted. FPIR = share of impostor probes (people not enrolled) whose best gallery score is accepted (1:N);
DIR = share of genuine probes whose own identity is ranked first *and* accepted (ISO/IEC 19795-1 terms).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold of highest accuracy on (scores, same): the midpoint between adjacent sorted scores."""
    order = np.argsort(scores)
    s, y = scores[order], same[order]
    # accepting everything from index i upwards: correct = genuine at/above i + impostors below i
    genuine_above = np.concatenate([np.cumsum(y[::-1])[::-1], [0]])
    impostor_below = np.concatenate([[0], np.cumsum(~y)])
    correct = genuine_above + impostor_below
    i = int(np.argmax(correct))
    if i == 0:
        return float(s[0]) - 1e-6
    if i == len(s):
        return float(s[-1]) + 1e-6
    return float((s[i - 1] + s[i]) / 2)


def ten_fold_accuracy(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> dict[str, object]:
    """LFW's protocol: for each fold, choose the threshold on the other folds, measure on this one."""
    accs, thrs = [], []
    for f in np.unique(folds):
        train, test = folds != f, folds == f
        thr = best_threshold(scores[train], same[train])
        accs.append(float(np.mean((scores[test] >= thr) == same[test])))
        thrs.append(thr)
    return {"accuracy_mean": float(np.mean(accs)), "accuracy_std": float(np.std(accs)), "fold_accuracies": accs,
            "fold_thresholds": thrs}


def threshold_at_far(impostor: np.ndarray, far: float) -> float:
    """Smallest threshold whose false-accept rate on ``impostor`` scores is at most ``far``.

    Accepting ``score >= t``; with n impostors at most floor(far * n) may be at or above t. When far * n < 1
    the threshold sits just above the highest impostor (FAR 0 on this data; the estimate is then coarse:
    see :func:`resolvable`).
    """
    s = np.sort(np.asarray(impostor, dtype=np.float64))[::-1]
    if not len(s):
        raise ValueError("no impostor scores to choose a threshold from")
    allowed = int(np.floor(far * len(s) + 1e-9))
    if allowed >= len(s):
        return float(s[-1])
    return float(np.nextafter(s[allowed], np.inf))


def resolvable(rate: float, comparisons: int, at_least: int = 1) -> bool:
    """Whether ``comparisons`` independent trials can show an error rate as small as ``rate``: at least
    ``at_least`` errors are expected at that rate. With fewer, "0 errors" says nothing about the target."""
    return rate * comparisons >= at_least


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray, far: float) -> tuple[float, float]:
    """(TAR, threshold) at the threshold giving at most ``far`` on the impostor scores."""
    t = threshold_at_far(impostor, far)
    return float(np.mean(genuine >= t)), t


def eer(genuine: np.ndarray, impostor: np.ndarray) -> tuple[float, float]:
    """(equal error rate, threshold): where FAR = FRR, by a scan over every observed score."""
    cand = np.unique(np.concatenate([genuine, impostor]))
    g = np.sort(genuine)
    imp = np.sort(impostor)
    frr = np.searchsorted(g, cand, side="left") / len(g)
    far = 1.0 - np.searchsorted(imp, cand, side="left") / len(imp)
    i = int(np.argmin(np.abs(far - frr)))
    return float((far[i] + frr[i]) / 2), float(cand[i])


def fpir_at(impostor: Sequence[float], threshold: float) -> float:
    """Share of impostor probes whose best similarity reaches ``threshold`` (false positive identification)."""
    imp = np.asarray(impostor)
    return float(np.mean(imp >= threshold)) if len(imp) else float("nan")


def verification_report(scores: np.ndarray, same: np.ndarray, folds: np.ndarray,
                        fars: Sequence[float] = (1e-2, 1e-3, 1e-4)) -> dict[str, object]:
    """10-fold accuracy (when there are folds), TAR at each FAR over all pairs, and the EER."""
    genuine, impostor = scores[same], scores[~same]
    out: dict[str, object] = {"pairs": int(len(scores)), "genuine_pairs": int(same.sum()),
                              "impostor_pairs": int((~same).sum())}
    if len(np.unique(folds)) > 1:
        out.update(ten_fold_accuracy(scores, same, folds))
    else:
        thr = best_threshold(scores, same)
        out.update({"accuracy": float(np.mean((scores >= thr) == same)), "best_threshold": thr})
    for far in fars:
        tar, thr = tar_at_far(genuine, impostor, far)
        out[f"tar_at_far_{far:g}"] = tar
        out[f"threshold_at_far_{far:g}"] = thr
        out[f"far_{far:g}_resolvable"] = resolvable(far, len(impostor))
    out["eer"], out["eer_threshold"] = eer(genuine, impostor)
    return out


def open_set_metrics(truth: Sequence[str], genuine: Sequence[Sequence[tuple[str, float]]],
                    impostor: Sequence[float], fpirs: Sequence[float] = (1e-2, 1e-3)) -> dict[str, object]:
    """Rank-1/5, and DIR at the threshold giving each FPIR on ``impostor``.

    ``truth[i]`` is genuine probe i's identity, ``genuine[i]`` its ranked (name, similarity) candidates;
    ``impostor`` the best similarity of each impostor probe. A rate the impostors cannot resolve is reported
    with ``fpir_<rate>_resolvable: False``; with no impostors, ``strangers: 0`` says why no DIR is given.
    """
    rank1 = np.array([bool(c) and c[0][0] == t for c, t in zip(genuine, truth)], dtype=bool)
    rank5 = np.array([t in [n for n, _ in c[:5]] for c, t in zip(genuine, truth)], dtype=bool)
    top = np.array([c[0][1] if c else -1.0 for c in genuine])
    imp = np.asarray(impostor, dtype=np.float64)
    out: dict[str, object] = {
        "genuine_probes": len(genuine),
        "impostor_probes": len(imp),
        "rank1": float(rank1.mean()) if len(rank1) else None,
        "rank5": float(rank5.mean()) if len(rank5) else None,
    }
    for fpir in fpirs:
        if len(imp) == 0:
            continue
        t = threshold_at_far(imp, fpir)
        out[f"threshold_at_fpir_{fpir:g}"] = t
        out[f"dir_at_fpir_{fpir:g}"] = float(np.mean(rank1 & (top >= t))) if len(top) else None
        out[f"fpir_{fpir:g}_resolvable"] = resolvable(fpir, len(imp))
    return out
