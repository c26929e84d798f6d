"""Open-set accuracy levers on LFW, each measured on and off, and the calibration the decision rules ship with.

    python scripts/open_set_report.py [--model dlib-resnet|sface] [--no-flip] [--write-model-files]
                                      [--out bench-results/open-set-dlib-flip.json]

Through facedb's own pipeline and embedding cache (`scripts/warm_eval_cache.py --model M` fills the cache).
Protocol as `facedb eval identify`: one photo enrolled for each LFW person with >= 2 photos, their other photos
are genuine probes, every photo of the single-photo people is an impostor probe (a stranger).

1. Calibration (on LFW's peopleDevTrain people only): the impostor model (1:1 impostor score tail: the gallery
   rule) and the margin rule's threshold for FPIR 1% (``s1 - 0.5 s2``, with ``s1`` held to the 1:1 default).
   ``--write-model-files`` writes the impostor model to facedb/faces/models/impostors/.
2. The rules on the disjoint peopleDevTest people at gallery sizes 30, 100, 300 and all (8 random galleries
   each): fixed 1:1 threshold, gallery rule, margin rule: FPIR and DIR.
3. The same rules on all of LFW at 30, 300, 1,000 and 1,680 people (the out-of-the-box table; the calibration
   people are among them).
4. Decision scores at one photo per person: raw best similarity against ``s1 - a s2`` (a = 0.1 ... 1.0).
5. Three photos enrolled (people with >= 4 photos): best template; best of templates and their mean; margin.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from facedb.evaluate import (
    LFW_NOT_STRANGERS,
    folder_embeddings,
    identify_split,
    impostor_pairs,
    read_people,
    threshold_at_far,
)
from facedb.faces.models import MODELS
from facedb.faces.pipeline import get_pipeline
from facedb.gallery.decision import MARGIN_WEIGHT, ImpostorModel, Policy, gallery_threshold

REPO = Path(__file__).resolve().parents[1]
#: How each model's faces are aligned, for the impostor model's provenance.
ALIGNMENT = {"dlib-resnet": "dlib chip", "sface": "five-point similarity warp to 112x112"}


def top2(S: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(best column, s1, s2) per row of a (probes, people) similarity matrix."""
    part = np.sort(S, 1)[:, -2:]
    return S.argmax(1), part[:, 1], part[:, 0]


def judge(S: np.ndarray, policy: Policy) -> tuple[np.ndarray, np.ndarray]:
    """(best column, accepted) per probe row under a decision policy."""
    arg, s1, s2 = top2(S)
    ok = np.array([policy.judge(float(a), float(b) if S.shape[1] > 1 else None)[0] for a, b in zip(s1, s2)])
    return arg, ok


class OpenSet:
    """One open-set split's similarity matrices: genuine probes and strangers against a one-photo gallery."""

    def __init__(self, X: np.ndarray, labels: list[str], people: set[str] | None = None, enroll: int = 1,
                 not_strangers: Iterable[str] = ()) -> None:
        split = identify_split(labels, enroll, np.random.default_rng(0), people, not_strangers=not_strangers)
        self.names = sorted(split.gallery)
        gi = {n: i for i, n in enumerate(self.names)}
        owner = np.concatenate([[gi[n]] * enroll for n in self.names])
        G = X[np.concatenate([split.gallery[n] for n in self.names])]
        gen = np.array([i for _, i in split.genuine])
        self.truth = np.array([gi[n] for n, _ in split.genuine])
        imp = np.array(split.impostor)
        self.Sg = self._per_person(X[gen] @ G.T, owner)
        self.Si = self._per_person(X[imp] @ G.T, owner)
        if enroll > 1:  # also each person's mean template (best of templates and mean)
            means = np.array([X[split.gallery[n]].mean(0) for n in self.names])
            means /= np.linalg.norm(means, axis=1, keepdims=True)
            self.Mg = np.maximum(self.Sg, X[gen] @ means.T)
            self.Mi = np.maximum(self.Si, X[imp] @ means.T)

    @staticmethod
    def _per_person(S: np.ndarray, owner: np.ndarray) -> np.ndarray:
        if len(np.unique(owner)) == len(owner):
            return S
        out = np.full((S.shape[0], owner.max() + 1), -2.0, dtype=np.float32)
        for p in np.unique(owner):
            out[:, p] = S[:, owner == p].max(1)
        return out

    def at_size(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(Sg, truth, Si) for a random gallery of ``n`` of the people."""
        pick = np.sort(np.random.default_rng(100 + seed).choice(len(self.names), n, replace=False))
        keep = np.isin(self.truth, pick)
        remap = {p: i for i, p in enumerate(pick)}
        return self.Sg[keep][:, pick], np.array([remap[t] for t in self.truth[keep]]), self.Si[:, pick]


def rates(Sg: np.ndarray, truth: np.ndarray, Si: np.ndarray, policy: Policy) -> dict[str, float]:
    arg, ok = judge(Sg, policy)
    _, bad = judge(Si, policy)
    return {"fpir": float(bad.mean()), "dir": float(np.mean((arg == truth) & ok)),
            "rank1": float(np.mean(arg == truth))}


def margin_threshold_for(Si: np.ndarray, floor: float, fpir: float, weight: float = MARGIN_WEIGHT) -> float:
    """The smallest margin threshold whose FPIR on these strangers is at most ``fpir``, with the floor applied."""
    _, s1, s2 = top2(Si)
    score = np.where(s1 >= floor, s1 - weight * s2, -9.0)
    return threshold_at_far(score, fpir)


def sizes_table(data: OpenSet, sizes: list[int], seeds: int, policies: dict[str, object]) -> list[dict]:
    rows = []
    for n in sizes:
        per: dict[str, list[dict[str, float]]] = {name: [] for name in policies}
        for seed in range(seeds if n < len(data.names) else 1):
            Sg, truth, Si = data.at_size(n, seed)
            for name, make in policies.items():
                per[name].append(rates(Sg, truth, Si, make(n)))  # type: ignore[operator]
        row: dict[str, object] = {"people": n, "strangers": int(data.Si.shape[0])}
        for name, results in per.items():
            row[name] = {k: float(np.mean([r[k] for r in results])) for k in results[0]}
            row[name]["fpir_max"] = float(max(r["fpir"] for r in results))
        rows.append(row)
    return rows


def all_of_lfw(X: np.ndarray, labels: list[str], policies: dict[str, object], not_strangers: Iterable[str] = ()
               ) -> dict[str, object]:
    """Sections 3-5 on all of LFW; ``not_strangers``: folders left out of the strangers (LFW_NOT_STRANGERS)."""
    out: dict[str, object] = {}
    # 3. all of LFW
    full = OpenSet(X, labels, not_strangers=not_strangers)
    out["lfw_sizes"] = sizes_table(full, [30, 300, 1000, len(full.names)], 5, policies)

    # 4. decision scores, one photo, full gallery (threshold for each at FPIR 1% and 0.1% on the strangers)
    arg, s1g, s2g = top2(full.Sg)
    _, s1i, s2i = top2(full.Si)
    right = arg == full.truth
    scores = {}
    for w in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0):
        sg, si = s1g - w * s2g, s1i - w * s2i
        row = {"rank1": float(right.mean())}
        for fpir in (1e-2, 1e-3):
            t = threshold_at_far(si, fpir)
            row[f"dir_at_fpir_{fpir:g}"] = float(np.mean(right & (sg >= t)))
        scores["raw" if w == 0 else f"s1 - {w:g} s2"] = row
    out["scores_1_photo"] = {"gallery_people": len(full.names), "genuine": int(len(full.truth)),
                             "strangers": int(full.Si.shape[0]), **scores}

    # 5. three photos
    three = OpenSet(X, labels, enroll=3, not_strangers=not_strangers)
    res3 = {}
    for name, (Sg, Si) in {"best": (three.Sg, three.Si), "best_or_mean": (three.Mg, three.Mi)}.items():
        for rule in ("raw", "margin"):
            w = MARGIN_WEIGHT if rule == "margin" else 0.0
            arg, s1g, s2g = top2(Sg)
            _, s1i, s2i = top2(Si)
            right = arg == three.truth
            row = {"rank1": float(right.mean())}
            for fpir in (1e-2, 1e-3):
                t = threshold_at_far(s1i - w * s2i, fpir)
                row[f"dir_at_fpir_{fpir:g}"] = float(np.mean(right & (s1g - w * s2g >= t)))
            res3[f"{name}, {rule}"] = row
        # what a database answers out of the box: the shipped thresholds, not ones set on these strangers
        templates = len(three.names) * (3 if name == "best" else 4)
        for pname, make in policies.items():
            res3[f"{name}, shipped {pname}"] = rates(Sg, three.truth, Si, make(templates))  # type: ignore[operator]
    out["three_photos"] = {"gallery_people": len(three.names), "genuine": int(len(three.truth)),
                           "strangers": int(three.Si.shape[0]), **res3}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dlib-resnet", choices=sorted(ALIGNMENT))
    ap.add_argument("--no-flip", action="store_true")
    ap.add_argument("--write-model-files", action="store_true")
    ap.add_argument("--margin-fpir", type=float, default=0.01, help="FPIR the margin threshold is calibrated for "
                                                                     "on the DevTrain people")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("FACEDB_TEST_DATA", REPO.parent / "shared" /
                                                                     "facedata")))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    flip = not args.no_flip
    lfw, proto = args.data / "lfw_deepfunneled", args.data / "lfw_protocol"
    pipe = get_pipeline(args.model)
    X, labels, counts = folder_embeddings(lfw, pipe, flip=flip)
    L = np.array(labels)
    floor = MODELS[args.model].default_threshold(flip)[0]
    out: dict[str, object] = {"model_id": pipe.model_id, "flip": flip, "one_to_one_threshold": floor, **counts}
    t0 = time.time()
    dev_train, dev_test = read_people(proto / "peopleDevTrain.txt"), read_people(proto / "peopleDevTest.txt")

    # 1. calibration, on DevTrain people only
    idx = np.flatnonzero(np.isin(L, list(dev_train)))
    a, b, _ = impostor_pairs(L[idx], 2_000_000, np.random.default_rng(0))
    train_imp = np.einsum("ij,ij->i", X[idx][a], X[idx][b])
    model = ImpostorModel.from_scores(train_imp, source=f"LFW peopleDevTrain, MTCNN + {ALIGNMENT[args.model]}" +
                                      (", flip" if flip else ""), flip=flip)
    train = OpenSet(X, labels, dev_train)
    margin = margin_threshold_for(train.Si, floor, args.margin_fpir)
    out["calibration"] = {"impostor_pairs": model.comparisons, "margin_threshold": margin,
                          "margin_calibrated_for_fpir": args.margin_fpir,
                          "margin_calibrated_on": f"{len(train.names)} DevTrain people, {train.Si.shape[0]} strangers"}
    if args.write_model_files:
        dest = REPO / "facedb" / "models" / "impostors" / f"{args.model}{'-flip' if flip else ''}.json"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(model.to_json() + "\n")
        out["calibration"]["written"] = str(dest.relative_to(REPO))  # type: ignore[index]

    policies = {
        "fixed": lambda n: Policy("fixed", floor),
        "gallery": lambda n: Policy("gallery", max(floor, gallery_threshold(model, 0.01, n))),
        "margin": lambda n: Policy("margin", floor, MARGIN_WEIGHT, margin),
    }
    # 2. disjoint people
    test = OpenSet(X, labels, dev_test)
    out["devtest_sizes"] = sizes_table(test, [30, 100, 300, len(test.names)], 8, policies)
    out.update(all_of_lfw(X, labels, policies))
    # The same with the strangers who are enrolled people filed under another name left out
    # (docs/thresholds-and-accuracy.md)
    out["label_corrected"] = {"left_out": {k: list(v) for k, v in LFW_NOT_STRANGERS.items()},
                              **all_of_lfw(X, labels, policies, LFW_NOT_STRANGERS)}
    out["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(out, indent=2)
    print(text)
    dest = args.out or REPO / "bench-results" / f"open-set-{args.model.split('-')[0]}{'-flip' if flip else ''}.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
