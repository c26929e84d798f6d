"""Detection as enrolment and search now run it against the detection it replaced: the same faces, and the same
LFW verification.

Detection now runs (1) MTCNN's three networks on ``channels_last`` tensors (``MTCNNDetector(channels_last=True)``,
the default on CPU) and (2) photos of one size in one batch (``detect_many``, enrolment's chunks). The reference
is the previous detection: the default memory layout, one photo at a time. Same minimum face size (20 px), same
score floor.

1. Detection on ``--photos`` random LFW photos: the faces found by the reference, by channels_last one photo at a
   time, and by channels_last in batches of ``--batch``; for each, faces missed or added against the reference,
   the largest box and landmark differences of matched faces (px) and of scores, and photos/s with one torch
   thread (``FACEDB_THREADS``, the default) and with torch's own default.
2. LFW verification on a subset (the first ``--pairs`` pairs of pairsDevTest, half same, half different; 0 skips
   it): every distinct photo embedded through the evaluation path (decode, detect, central face, align, embed)
   with the reference detector and with the new one; accuracy at the model's threshold and at the best
   threshold both ways, the largest score difference, and the share of identical accept/reject decisions.

    python scripts/detect_agreement.py [--photos 400] [--pairs 300] [--model dlib-resnet]

Prints the figures and writes JSON to ``bench-results/detect-agreement.json``.
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
    return Path(os.environ.get("FACEDB_TEST_DATA") or Path(__file__).resolve().parents[1].parent / "shared" /
                "facedata")


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def compare(reference: list[list], other: list[list]) -> dict[str, float]:
    """Faces of ``other`` matched to the reference's (best IoU >= 0.5), photo by photo."""
    boxes, marks, scores, missed, added = [], [], [], 0, 0
    for ref, got in zip(reference, other):
        matched = set()
        for f in ref:
            best = max(range(len(got)), key=lambda j: iou(f.box, got[j].box), default=None)
            if best is None or iou(f.box, got[best].box) < 0.5:
                missed += 1
                continue
            matched.add(best)
            g = got[best]
            boxes.append(float(np.max(np.abs(np.subtract(f.box, g.box)))))
            marks.append(float(np.max(np.abs(f.landmarks - g.landmarks))))
            scores.append(abs(f.score - g.score))
        added += len(got) - len(matched)
    return {"reference_faces": sum(map(len, reference)), "faces_found": sum(map(len, other)), "missed": missed,
            "added": added, "photos_same_face_count": sum(len(a) == len(b) for a, b in zip(reference, other)),
            "max_box_diff_px": max(boxes, default=0.0), "max_landmark_diff_px": max(marks, default=0.0),
            "max_score_diff": max(scores, default=0.0)}


def timed(fn, *args) -> tuple[list, float]:
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=400)
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--model", default="dlib-resnet")
    ap.add_argument("--out", type=Path, default=Path("bench-results/detect-agreement.json"))
    args = ap.parse_args()

    import torch

    from facedb.evaluate import embed_photos, read_pairs
    from facedb.evaluate.metrics import best_threshold
    from facedb.faces.detect import MTCNNDetector
    from facedb.faces.images import load_photo
    from facedb.faces.models import MODELS, configure_threads
    from facedb.faces.pipeline import FacePipeline, get_pipeline

    lfw = data_root() / "lfw_deepfunneled"
    if not lfw.is_dir():
        raise SystemExit(f"no LFW at {lfw} (set FACEDB_TEST_DATA)")
    files = sorted(lfw.rglob("*.jpg"))
    files = [files[i] for i in np.random.default_rng(0).choice(len(files), min(args.photos, len(files)),
                                                                replace=False)]
    pixels = [load_photo(f).pixels for f in files]
    configure_threads()
    default_threads = torch.get_num_threads()
    reference = MTCNNDetector(min_face_size=20, channels_last=False)
    new = MTCNNDetector(min_face_size=20, channels_last=True)

    def one_by_one(det: MTCNNDetector) -> list:
        return [det.detect(p) for p in pixels]

    def batched(det: MTCNNDetector) -> list:
        return [f for s in range(0, len(pixels), args.batch) for f in det.detect_many(pixels[s:s + args.batch])]

    res: dict[str, object] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
                              "load_average_before": os.getloadavg()[0], "photos": len(files), "batch": args.batch}
    for threads in sorted({default_threads, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        for det in (reference, new):
            det.detect(pixels[0])  # warm
        ref, ref_s = timed(one_by_one, reference)
        cl_one, cl_one_s = timed(one_by_one, new)
        cl_batch, cl_batch_s = timed(batched, new)
        res[f"photos_per_s_{threads}_threads"] = {
            "reference": len(files) / ref_s, "channels_last": len(files) / cl_one_s,
            "channels_last_batched": len(files) / cl_batch_s}
    torch.set_num_threads(default_threads)
    res["load_average_after_detection"] = os.getloadavg()[0]
    res["channels_last_vs_reference"] = compare(ref, cl_one)
    res["channels_last_batched_vs_reference"] = compare(ref, cl_batch)

    if args.pairs:
        pipe = get_pipeline(args.model)
        pairs = read_pairs(data_root() / "lfw_protocol" / "pairsDevTest.txt", lfw)
        same = [p for p in pairs if p.same][: args.pairs // 2]
        diff = [p for p in pairs if not p.same][: args.pairs - len(same)]
        pairs = same + diff
        unique = sorted({p.a for p in pairs} | {p.b for p in pairs})
        threshold = MODELS[args.model].default_threshold(False)[0]
        labels = np.array([p.same for p in pairs])
        index = {p: i for i, p in enumerate(unique)}
        scores = {}
        for name, det in (("reference", reference), ("channels_last", new)):
            emb = embed_photos(unique, FacePipeline(pipe.embedder, pipe.settings, det))
            a = emb.vectors[[index[p.a] for p in pairs]]
            b = emb.vectors[[index[p.b] for p in pairs]]
            s = np.nan_to_num(np.sum(a * b, axis=1), nan=-1.0)
            scores[name] = s
            res[f"lfw_{name}"] = {"accuracy_at_threshold": float(np.mean((s >= threshold) == labels)),
                                  "best_accuracy": float(np.mean((s >= best_threshold(s, labels)) == labels)),
                                  "failures_to_acquire": int((~emb.found).sum())}
        res["lfw_pairs"], res["lfw_threshold"] = len(pairs), threshold
        res["lfw_max_score_diff"] = float(np.max(np.abs(scores["reference"] - scores["channels_last"])))
        res["lfw_same_decisions"] = float(np.mean((scores["reference"] >= threshold)
                                                  == (scores["channels_last"] >= threshold)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    for k, v in res.items():
        print(f"{k:40} {json.dumps(v) if isinstance(v, dict) else v}")


if __name__ == "__main__":
    main()
