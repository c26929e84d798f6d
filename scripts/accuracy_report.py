"""Every accuracy figure in docs/thresholds-and-accuracy.md, through facedb's own pipeline, for one model.

    python scripts/accuracy_report.py [--model dlib-resnet] [--flip] [--out bench-results/accuracy-dlib-flip.json]

1. LFW verification, pairs.txt: 10-fold accuracy, TAR at FAR 1e-2/1e-3/1e-4, EER; ROC + histograms PNG.
2. 1:1 calibration holds: threshold for FAR 1e-3 from pairsDevTrain (official) and from all people of
   peopleDevTrain.txt (2M random impostor pairs), FAR measured on pairsDevTest / peopleDevTest people.
3. Open set on LFW: 1 photo enrolled per person with >= 2 photos (real facedb store and index), probes =
   their other photos + every photo of the 4,069 single-photo people. Rank-1, rank-5, DIR at FPIR 1%/0.1%.
4. 1:N calibration holds: FPIR-1% threshold from one half of the people, FPIR measured on the other half.
5. Levers: several templates per person (best / mean / top-2 mean) and quality gates at enrolment.
Embeddings come from the evaluation cache (FACEDB_CACHE), so reruns take seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from facedb import evaluate as ev
from facedb.faces.pipeline import get_pipeline


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dlib-resnet")
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--flip", action="store_true", help="flip test-time augmentation")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("FACEDB_TEST_DATA", "../shared/facedata")))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--skip-levers", action="store_true")
    ap.add_argument("--skip-open-set", action="store_true", help="sections 1-2 only (verification, 1:1 calibration)")
    ap.add_argument("--skip-calibration", action="store_true",
                    help="with --skip-open-set: section 1 alone (calibrate_from_cache.py does 2 from cached photos)")
    args = ap.parse_args()
    lfw = args.data / "lfw_deepfunneled"
    proto = args.data / "lfw_protocol"
    if not lfw.is_dir():
        print(f"no LFW at {lfw}", file=sys.stderr)
        return 2
    pipe = get_pipeline(args.model, weights=args.weights)
    tag = pipe.model_id.split("-")[0] + ("-flip" if args.flip else "")
    out: dict[str, object] = {"model_id": pipe.model_id, "flip": args.flip}

    # 1. LFW 10-fold
    plot = args.plot or Path(f"docs/lfw-{tag}.png")
    rep = ev.run_lfw(proto / "pairs.txt", lfw, pipe, flip=args.flip, plot=plot)
    out["lfw_pairs"] = rep
    print(f"LFW pairs.txt: accuracy {rep['accuracy_mean']:.4f} +- {rep['accuracy_std']:.4f}; "
          f"TAR@FAR1e-2 {rep['tar_at_far_0.01']:.4f}, 1e-3 {rep['tar_at_far_0.001']:.4f}, "
          f"1e-4 {rep['tar_at_far_0.0001']:.4f} (resolvable: {rep['far_0.0001_resolvable']}); "
          f"EER {rep['eer']:.4f}; failures to acquire {rep['failures_to_acquire']}/{rep['photos']}")

    if args.skip_calibration and args.skip_open_set:
        return write(out, args, tag, plot)
    # 2. 1:1 calibration holds
    dev_train = ev.run_lfw(proto / "pairsDevTrain.txt", lfw, pipe, flip=args.flip)
    dev_test = ev.pair_scores(proto / "pairsDevTest.txt", lfw, pipe, flip=args.flip)
    scores, same = dev_test.scores, dev_test.same
    t_pairs = float(dev_train["threshold_at_far_0.001"])  # type: ignore[arg-type]
    gen_tr, imp_tr, _ = ev.folder_pair_scores(lfw, pipe, people=ev.read_people(proto / "peopleDevTrain.txt"),
                                           flip=args.flip)
    gen_te, imp_te, _ = ev.folder_pair_scores(lfw, pipe, people=ev.read_people(proto / "peopleDevTest.txt"), seed=1,
                                           flip=args.flip)
    t_people = ev.threshold_at_far(imp_tr, 1e-3)
    out["calibration_1to1"] = {
        "pairs_threshold_far_1e-3": t_pairs,
        "pairsDevTest_far_at_it": float(np.mean(scores[~same] >= t_pairs)),
        "pairsDevTest_impostor_pairs": int((~same).sum()),
        "pairsDevTest_tar_at_it": float(np.mean(scores[same] >= t_pairs)),
        "people_threshold_far_1e-3": t_people,
        "peopleDevTrain_impostor_pairs": int(len(imp_tr)),
        "peopleDevTest_far_at_it": float(np.mean(imp_te >= t_people)),
        "peopleDevTest_impostor_pairs": int(len(imp_te)),
        "peopleDevTest_tar_at_it": float(np.mean(gen_te >= t_people)),
        "peopleDevTrain_tar_at_it": float(np.mean(gen_tr >= t_people)),
    }
    c: dict[str, float] = out["calibration_1to1"]  # type: ignore[assignment]
    print(f"1:1 FAR 1e-3: threshold {t_people:.4f} from {len(imp_tr):,} DevTrain-people impostor pairs -> "
          f"FAR {c['peopleDevTest_far_at_it']:.5f} on {len(imp_te):,} DevTest-people pairs "
          f"(TAR {c['peopleDevTest_tar_at_it']:.4f}); official pairs: threshold {t_pairs:.4f} -> "
          f"FAR {c['pairsDevTest_far_at_it']:.4f} on 500 pairs")

    # 3 + 4. open set, and FPIR calibration across halves
    with tempfile.TemporaryDirectory() as tmp:
        if args.skip_open_set:
            return write(out, args, tag, plot)
        full = ev.run_identify(lfw, pipe, Path(tmp) / "full", flip=args.flip)
        out["open_set_lfw"] = full
        print(f"open set: gallery {full['gallery_people']} people, {full['genuine_probes']} genuine + "
              f"{full['impostor_probes']} impostor probes; rank-1 {full['rank1']:.4f}, rank-5 {full['rank5']:.4f}, "
              f"DIR@FPIR1% {full['dir_at_fpir_0.01']:.4f} (t={full['threshold_at_fpir_0.01']:.4f}), "
              f"DIR@FPIR0.1% {full['dir_at_fpir_0.001']:.4f} (t={full['threshold_at_fpir_0.001']:.4f})")
        halves = {}
        for half in ("a", "b"):
            r = ev.run_identify(lfw, pipe, Path(tmp) / f"half-{half}", half=half, flip=args.flip,
                                calibrate_on_other_half=True)
            halves[half] = r
            print(f"half {half}: gallery {r['gallery_people']}, FPIR-1% threshold from half "
                  f"{r['calibrated_on_half']} = {r['calibrated_threshold_fpir_0.01']:.4f} -> FPIR here "
                  f"{r['fpir_measured_at_calibrated_threshold']:.4f} over {r['impostor_probes']} impostor probes")
        out["calibration_1toN_halves"] = halves

    # 5. levers
    if not args.skip_levers:
        out["levers"] = levers(lfw, pipe, args.flip)
    return write(out, args, tag, plot)


def write(out: dict[str, object], args: argparse.Namespace, tag: str, plot: Path) -> int:
    path = args.out or Path(f"bench-results/accuracy-{tag}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=float))
    print(f"wrote {path} and {plot}")
    return 0


def levers(lfw: Path, pipe, flip: bool) -> dict[str, object]:
    """Template aggregation with 2 enrolled photos (people with >= 3), and enrolment quality gates."""
    x, labels, _ = ev.folder_embeddings(lfw, pipe, flip=flip)
    lab = np.array(labels)
    rng = np.random.default_rng(0)
    names = sorted(set(labels))
    gal: dict[str, list[int]] = {}
    probes: list[tuple[str, int]] = []
    impostors: list[int] = []
    for name in names:
        idx = np.flatnonzero(lab == name)
        if len(idx) >= 3:
            chosen = rng.choice(idx, 2, replace=False)
            gal[name] = chosen.tolist()
            probes += [(name, int(i)) for i in idx if i not in chosen]
        elif len(idx) == 1:
            impostors.append(int(idx[0]))
    people = sorted(gal)
    templates = np.stack([x[gal[p]] for p in people])  # (P, 2, d)
    res: dict[str, object] = {"gallery_people": len(people), "genuine_probes": len(probes),
                              "impostor_probes": len(impostors)}

    def evaluate(score_fn) -> dict[str, float]:
        g = np.array([x[i] for _, i in probes])
        s_g = score_fn(np.einsum("ptd,qd->qpt", templates, g))
        s_i = score_fn(np.einsum("ptd,qd->qpt", templates, x[impostors]))
        top = s_g.argmax(1)
        truth = np.array([people.index(n) for n, _ in probes])
        best_g = s_g.max(1)
        t = ev.threshold_at_far(s_i.max(1), 1e-2)
        return {"rank1": float(np.mean(top == truth)),
                "dir_at_fpir_0.01": float(np.mean((top == truth) & (best_g >= t))), "threshold": t}

    res["aggregation"] = {
        "best": evaluate(lambda s: s.max(2)),
        "mean": evaluate(lambda s: s.mean(2)),
        "top2_mean": evaluate(lambda s: np.sort(s, 2)[:, :, -2:].mean(2)),
        "single_template": evaluate(lambda s: s[:, :, 0]),
    }
    print("aggregation (2 templates/person):", {k: round(v["dir_at_fpir_0.01"], 4)
                                                for k, v in res["aggregation"].items()})  # type: ignore[union-attr]
    return res


if __name__ == "__main__":
    sys.exit(main())
