"""Batched MTCNN (photos of one size detected together) against one photo at a time: the same faces, and the same
LFW verification, before batching became enrolment's default.

1. Detection agreement on ``--photos`` LFW photos: for each photo, the faces found one at a time and in batches
   of ``--batch`` (boxes, scores and landmarks compared), and the detector's speed both ways.
2. LFW verification on a subset (the first ``--pairs`` pairs of pairsDevTest, balanced): every distinct photo
   embedded through ``facedb.evaluate.embed_photos`` (the evaluation path: detect, central face, align,
   embed) with batched and with one-at-a-time detection; pair scores, accuracy at the model's threshold and
   at the best threshold, both ways.

    python scripts/detect_agreement.py [--photos 400] [--pairs 300] [--model dlib-resnet]

Prints a table and writes JSON to ``bench-results/detect-agreement.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def data_root() -> Path:
    return Path(os.environ.get("FACEDB_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" /
                               "facedata"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=400)
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--model", default="dlib-resnet")
    ap.add_argument("--out", type=Path, default=Path("bench-results/detect-agreement.json"))
    args = ap.parse_args()

    from facedb.detect import MTCNNDetector
    from facedb.evaluate import embed_photos, read_pairs
    from facedb.evaluate.metrics import best_threshold
    from facedb.images import load_photo
    from facedb.models import MODELS
    from facedb.pipeline import get_detector, get_pipeline

    lfw = data_root() / "lfw_deepfunneled"
    if not lfw.is_dir():
        raise SystemExit(f"LFW not found at {lfw} (set FACEDB_TEST_DATA)")
    files = sorted(lfw.glob("*/*.jpg"))
    files = [files[i] for i in np.random.default_rng(0).choice(len(files), min(args.photos, len(files)),
                                                                replace=False)]
    pixels = [load_photo(f).pixels for f in files]
    det: MTCNNDetector = get_detector()
    det.detect(pixels[0])  # load
    t = time.perf_counter()
    single = [det.detect(p) for p in pixels]
    single_s = time.perf_counter() - t
    t = time.perf_counter()
    batched = [f for s in range(0, len(pixels), args.batch) for f in det.detect_many(pixels[s:s + args.batch])]
    batched_s = time.perf_counter() - t
    same_count = sum(len(a) == len(b) for a, b in zip(single, batched))
    box_diff = max((float(np.max(np.abs(np.subtract(fa.box, fb.box)))) for a, b in zip(single, batched)
                    if len(a) == len(b) for fa, fb in zip(a, b)), default=0.0)
    mark_diff = max((float(np.max(np.abs(fa.landmarks - fb.landmarks))) for a, b in zip(single, batched)
                     if len(a) == len(b) for fa, fb in zip(a, b)), default=0.0)
    score_diff = max((abs(fa.score - fb.score) for a, b in zip(single, batched) if len(a) == len(b)
                      for fa, fb in zip(a, b)), default=0.0)
    res: dict[str, object] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_average": os.getloadavg()[0],
        "photos": len(files), "batch": args.batch, "faces_single": sum(map(len, single)),
        "faces_batched": sum(map(len, batched)), "photos_same_face_count": same_count,
        "max_box_diff_px": box_diff, "max_landmark_diff_px": mark_diff, "max_score_diff": score_diff,
        "detect_single_photos_per_s": len(files) / single_s, "detect_batched_photos_per_s": len(files) / batched_s,
    }

    pairs = read_pairs(data_root() / "lfw_protocol" / "pairsDevTest.txt", lfw)
    same = [p for p in pairs if p.same][: args.pairs // 2]
    diff = [p for p in pairs if not p.same][: args.pairs - len(same)]
    pairs = same + diff
    unique = sorted({p.a for p in pairs} | {p.b for p in pairs})
    pipe = get_pipeline(args.model)
    threshold = MODELS[args.model].default_threshold(False)[0]

    def scores() -> np.ndarray:
        emb = embed_photos(unique, pipe)
        index = {p: i for i, p in enumerate(unique)}
        a = emb.vectors[[index[p.a] for p in pairs]]
        b = emb.vectors[[index[p.b] for p in pairs]]
        return np.nan_to_num(np.sum(a * b, axis=1), nan=-1.0)

    with_batches = scores()
    many = MTCNNDetector.detect_many
    try:
        MTCNNDetector.detect_many = None  # type: ignore[assignment,method-assign]  # one photo at a time
        one_by_one = scores()
    finally:
        MTCNNDetector.detect_many = many  # type: ignore[method-assign]
    labels = np.array([p.same for p in pairs])
    for name, s in (("batched", with_batches), ("one_at_a_time", one_by_one)):
        res[f"lfw_accuracy_at_{threshold:g}_{name}"] = float(np.mean((s >= threshold) == labels))
        res[f"lfw_best_accuracy_{name}"] = float(np.mean((s >= best_threshold(s, labels)) == labels))
    res["lfw_pairs"] = len(pairs)
    res["lfw_max_score_diff"] = float(np.max(np.abs(with_batches - one_by_one)))
    res["lfw_same_decisions"] = float(np.mean((with_batches >= threshold) == (one_by_one >= threshold)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    width = max(map(len, res))
    for k, v in res.items():
        print(f"{k.ljust(width)}  {v:.4f}" if isinstance(v, float) else f"{k.ljust(width)}  {v}")


if __name__ == "__main__":
    main()
