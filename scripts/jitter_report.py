"""Enrolment jitter, measured: the open-set figures on LFW with each gallery template the mean of the photo's,
its mirror image's and N jittered copies' embeddings (N = 0, 4, 8), probes as usual (photo + mirror).

    python scripts/jitter_report.py [--jitters 0 4 8] [--out bench-results/jitter-dlib.json]

Only the 1,680 enrolled photos are re-embedded (jitter is an enrolment-time lever: probes are not jittered);
probes and strangers come from the evaluation cache. Also reports the enrolment time per photo for each N.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from facedb.evaluate import embed_cached, identify_split, labelled_folder, threshold_at_far
from facedb.faces.pipeline import FaceChoice, Prepared, get_pipeline

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jitters", type=int, nargs="+", default=[0, 4, 8])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("FACEDB_TEST_DATA", REPO.parent / "shared" /
                                                                     "facedata")))
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "jitter-dlib.json")
    args = ap.parse_args()
    lfw = args.data / "lfw_deepfunneled"
    pipe = get_pipeline("dlib-resnet")
    all_paths, all_labels = labelled_folder(lfw)
    embedded = embed_cached(all_paths, pipe, True)  # probes: photo + mirror, from the evaluation cache
    ok = embedded.found
    X = embedded.vectors[ok]
    paths = [p for p, good in zip(all_paths, ok) if good]
    labels = [lab for lab, good in zip(all_labels, ok) if good]
    split = identify_split(labels, 1, np.random.default_rng(0))
    names = sorted(split.gallery)
    gi = {n: i for i, n in enumerate(names)}
    gen = np.array([i for _, i in split.genuine])
    truth = np.array([gi[n] for n, _ in split.genuine])
    imp = np.array(split.impostor)
    prepared = pipe.prepare([(i, paths[split.gallery[n][0]]) for i, n in enumerate(names)], FaceChoice.CENTRAL)
    crops = {o.key: o.crop for o in prepared if isinstance(o, Prepared)}
    out: dict[str, object] = {"gallery_people": len(names), "genuine": len(gen), "impostor": len(imp), "runs": {}}
    for n in args.jitters:
        t0 = time.time()
        G = np.concatenate([pipe.embed_crops([crops[i] for i in range(s, min(s + 32, len(names)))], flip=True,
                                             jitter=n) for s in range(0, len(names), 32)])
        seconds = time.time() - t0
        Sg, Si = X[gen] @ G.T, X[imp] @ G.T
        right = Sg.argmax(1) == truth
        row = {"rank1": float(right.mean()), "enrol_seconds_per_photo": seconds / len(names)}
        for fpir in (1e-2, 1e-3):
            t = threshold_at_far(Si.max(1), fpir)
            row[f"dir_at_fpir_{fpir:g}"] = float(np.mean(right & (Sg.max(1) >= t)))
        out["runs"][str(n)] = row  # type: ignore[index]
        print(n, json.dumps(row), flush=True)
        args.out.parent.mkdir(exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
