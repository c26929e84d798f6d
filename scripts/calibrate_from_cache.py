"""A FAR threshold from the photos of some LFW people that the evaluation cache already holds (#24).

    python scripts/calibrate_from_cache.py --model facenet-casia-tf [--flip] [--far 1e-3]
        [--people peopleDevTrain.txt] [--check peopleDevTest.txt] [--out bench-results/...json]

What scripts/accuracy_report.py does in its section 2 (the threshold at FAR 1e-3 from up to 2M impostor pairs
of one set of people, FAR and TAR measured with it on disjoint people), restricted to photos whose embedding
is in the cache (scripts/warm_eval_cache.py, which a slow model on a busy CPU may not have finished): nothing
is embedded here. The JSON says how many photos of how many people each side had.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from facedb.evaluate import EmbeddingCache, impostor_pairs, labelled_folder, read_people, threshold_at_far
from facedb.faces.models import spec_for
from facedb.faces.pipeline import source_sha256


def scores(folder: Path, people: set[str], cache: EmbeddingCache, seed: int) -> dict[str, object]:
    paths, labels = labelled_folder(folder, people)
    rows, labs = [], []
    for p, lab in zip(paths, labels):
        hit = cache.get(source_sha256(p) or "")
        if hit is not None and hit[1]:
            rows.append(hit[0])
            labs.append(lab)
    x, lab = np.array(rows), np.array(labs)
    a, b, _ = impostor_pairs(lab, 2_000_000, np.random.default_rng(seed))
    imp = np.concatenate([np.sum(x[a[s:s + 65536]] * x[b[s:s + 65536]], axis=1) for s in range(0, len(a), 65536)])
    gen = []
    for name in np.unique(lab):
        idx = np.flatnonzero(lab == name)
        if len(idx) > 1:
            s = x[idx] @ x[idx].T
            gen.append(s[np.triu_indices(len(idx), 1)])
    return {"photos_in_cache": len(rows), "photos": len(paths), "people_in_cache": len(set(labs)),
            "people": len(people), "impostor_pairs": len(imp), "genuine_pairs": int(sum(len(g) for g in gen)),
            "_imp": imp, "_gen": np.concatenate(gen) if gen else np.zeros(0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--flip", action="store_true")
    ap.add_argument("--far", type=float, default=1e-3)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("FACEDB_TEST_DATA", "../shared/facedata")))
    ap.add_argument("--people", default="peopleDevTrain.txt")
    ap.add_argument("--check", default="peopleDevTest.txt")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    lfw, proto = args.data / "lfw_deepfunneled", args.data / "lfw_protocol"
    variant = args.model + ("-flip" if args.flip else "")
    cache = EmbeddingCache(variant, spec_for(args.model).dim)
    train = scores(lfw, read_people(proto / args.people), cache, 0)
    test = scores(lfw, read_people(proto / args.check), cache, 1)
    t = threshold_at_far(train["_imp"], args.far)  # type: ignore[arg-type]
    out = {"model_id": args.model, "flip": args.flip, "cache_variant": variant, "far_target": args.far,
           "threshold": t, "calibrated_on": args.people, "checked_on": args.check,
           "train": {k: v for k, v in train.items() if not k.startswith("_")},
           "train_far_at_threshold": float(np.mean(train["_imp"] >= t)),  # type: ignore[operator]
           "train_tar_at_threshold": float(np.mean(train["_gen"] >= t)),  # type: ignore[operator]
           "check": {k: v for k, v in test.items() if not k.startswith("_")},
           "check_far_at_threshold": float(np.mean(test["_imp"] >= t)),  # type: ignore[operator]
           "check_tar_at_threshold": float(np.mean(test["_gen"] >= t)),  # type: ignore[operator]
           "command": " ".join(["python", *sys.argv]), "load_average": os.getloadavg()}
    print(json.dumps(out, indent=2, default=float))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
