"""Open-set accuracy levers on LFW (and ORL / Yale), each measured on and off.

    python scripts/open_set_report.py [--no-flip] [--out bench-results/open-set-dlib-flip.json]

Through facedb's own pipeline and embedding cache (dlib-resnet; `scripts/warm_eval_cache.py` fills the cache).
Protocol as `facedb eval identify`: one photo enrolled for each LFW person with >= 2 photos (1,680 people), their
other photos are genuine probes, every photo of the 4,069 single-photo people is an impostor probe (a stranger).

1. The decision rule: raw best similarity against the margin rule ``s1 - a * s2`` (a = 0.1 ... 0.5).
2. FPIR at gallery sizes 30, 300, 1,000, 1,680 people (random subsets, 5 seeds) with the 1:1 default threshold
   and with the gallery rule (threshold from the model's impostor tail at the gallery size, target FPIR 1%).
3. Several photos enrolled (3, for people with >= 4 photos): best template, and best-or-mean template.
4. The impostor model itself: fitted on LFW peopleDevTrain people, checked on peopleDevTest people.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from facedb.decision import ImpostorModel, gallery_threshold, predicted_fpir
from facedb.evaluate import folder_embeddings, identify_split, impostor_pairs, read_people, threshold_at_far
from facedb.pipeline import get_pipeline

REPO = Path(__file__).resolve().parents[1]


def decide_scores(S: np.ndarray, rule: str, a: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(best gallery index, decision score) per probe row of a (probes, people) similarity matrix."""
    arg = S.argmax(1)
    if rule == "raw":
        return arg, S.max(1)
    top2 = np.sort(S, 1)[:, -2:]
    return arg, top2[:, 1] - a * top2[:, 0]


def open_set(Sg: np.ndarray, truth: np.ndarray, Si: np.ndarray, rule: str = "raw", a: float = 0.0) -> dict:
    arg_g, sc_g = decide_scores(Sg, rule, a)
    _, sc_i = decide_scores(Si, rule, a)
    right = arg_g == truth
    out = {"rank1": float(right.mean())}
    for fpir in (1e-2, 1e-3):
        t = threshold_at_far(sc_i, fpir)
        out[f"dir_at_fpir_{fpir:g}"] = float(np.mean(right & (sc_g >= t)))
        out[f"threshold_at_fpir_{fpir:g}"] = float(t)
    return out


def person_max(S: np.ndarray, owner: np.ndarray, people: int) -> np.ndarray:
    """(probes, people): each person's best template similarity."""
    out = np.full((S.shape[0], people), -2.0, dtype=np.float32)
    for p in range(people):
        out[:, p] = S[:, owner == p].max(1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-flip", action="store_true")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("FACEDB_TEST_DATA", REPO.parent / "shared" /
                                                                     "facedata")))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    flip = not args.no_flip
    lfw, proto = args.data / "lfw_deepfunneled", args.data / "lfw_protocol"
    pipe = get_pipeline("dlib-resnet")
    X, labels, counts = folder_embeddings(lfw, pipe, flip=flip)
    L = np.array(labels)
    out: dict[str, object] = {"model_id": pipe.model_id, "flip": flip, **counts}
    t0 = time.time()

    # 4. impostor model: DevTrain people -> DevTest people
    def pair_scores(people: set[str], seed: int) -> np.ndarray:
        idx = np.flatnonzero(np.isin(L, list(people)))
        a, b, _ = impostor_pairs(L[idx], 2_000_000, np.random.default_rng(seed))
        return np.einsum("ij,ij->i", X[idx][a], X[idx][b])

    train_imp = pair_scores(read_people(proto / "peopleDevTrain.txt"), 0)
    test_imp = pair_scores(read_people(proto / "peopleDevTest.txt"), 1)
    model = ImpostorModel.from_scores(train_imp, source="LFW peopleDevTrain, MTCNN + dlib chip" +
                                      (", flip" if flip else ""), flip=flip)
    out["impostor_model"] = {"comparisons": model.comparisons, "check": [
        {"far": far, "threshold": model.threshold_for_far(far), "measured_far_devtest":
         float(np.mean(test_imp >= model.threshold_for_far(far)))} for far in (1e-3, 1e-4, 1e-5, 1e-6)]}
    (REPO / "bench-results").mkdir(exist_ok=True)

    # 1. rules on the full open-set split
    split = identify_split(labels, 1, np.random.default_rng(0))
    names = sorted(split.gallery)
    gi = {n: i for i, n in enumerate(names)}
    G = X[[split.gallery[n][0] for n in names]]
    gen = np.array([i for _, i in split.genuine])
    truth = np.array([gi[n] for n, _ in split.genuine])
    imp = np.array(split.impostor)
    Sg, Si = X[gen] @ G.T, X[imp] @ G.T
    rules = {"raw": open_set(Sg, truth, Si)}
    for a in (0.1, 0.2, 0.3, 0.4, 0.5):
        rules[f"margin_{a}"] = open_set(Sg, truth, Si, "margin", a)
    out["rules_1_photo"] = {"gallery_people": len(names), "genuine": len(gen), "impostor": len(imp), **rules}

    # 2. FPIR against gallery size
    default_t = 0.929 if flip else 0.926
    sizes = []
    for n in (30, 300, 1000, len(names)):
        rows = []
        for seed in range(5 if n < len(names) else 1):
            pick = np.sort(np.random.default_rng(100 + seed).choice(len(names), n, replace=False))
            best_i = Si[:, pick].max(1)
            keep = np.isin(truth, pick)
            sub = Sg[keep][:, pick]
            right = pick[sub.argmax(1)] == truth[keep]
            best_g = sub.max(1)
            t_gal = max(default_t, gallery_threshold(model, 0.01, n))
            rows.append({"fpir_default": float(np.mean(best_i >= default_t)),
                         "fpir_gallery_rule": float(np.mean(best_i >= t_gal)), "threshold_gallery_rule": t_gal,
                         "predicted_fpir_default": predicted_fpir(model, default_t, n),
                         "dir_default": float(np.mean(right & (best_g >= default_t))),
                         "dir_gallery_rule": float(np.mean(right & (best_g >= t_gal)))})
        sizes.append({"people": n, **{k: float(np.median([r[k] for r in rows])) for k in rows[0]},
                      "fpir_gallery_rule_max": float(max(r["fpir_gallery_rule"] for r in rows))})
    out["gallery_sizes"] = sizes

    # 3. three photos enrolled
    split3 = identify_split(labels, 3, np.random.default_rng(0))
    split3_names = sorted(split3.gallery)
    owner = np.concatenate([[i] * 3 for i in range(len(split3_names))])
    G3 = X[np.concatenate([split3.gallery[n] for n in split3_names])]
    gen3 = np.array([i for _, i in split3.genuine])
    t3 = np.array([split3_names.index(n) for n, _ in split3.genuine])
    imp3 = np.array(split3.impostor)
    S3g, S3i = person_max(X[gen3] @ G3.T, owner, len(split3_names)), person_max(X[imp3] @ G3.T, owner,
                                                                               len(split3_names))
    means = np.array([X[split3.gallery[n]].mean(0) for n in split3_names])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    M3g, M3i = np.maximum(S3g, X[gen3] @ means.T), np.maximum(S3i, X[imp3] @ means.T)
    out["three_photos"] = {"gallery_people": len(split3_names), "genuine": len(gen3), "impostor": len(imp3),
                           "best": open_set(S3g, t3, S3i), "best_or_mean": open_set(M3g, t3, M3i),
                           "margin_0.3": open_set(S3g, t3, S3i, "margin", 0.3)}
    out["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(out, indent=2)
    print(text)
    dest = args.out or REPO / "bench-results" / f"open-set-dlib{'-flip' if flip else ''}.json"
    dest.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
