"""MTCNN against YuNet on LFW photos: faces found and milliseconds per photo, one thread.

    python scripts/bench_detect.py [--photos 1000] [--timed 200] [--out bench-results/detectors.json]

* faces found: on a seeded sample of ``--photos`` LFW photos (250 x 250, one labelled person each, centred),
  the share with at least one face, with exactly one, and how far apart the two detectors put the eyes
  (median and 95th percentile of the largest landmark distance, in pixels, on photos where both found the
  central face);
* speed: ``detect`` one photo at a time (a door's query), ``FACEDB_THREADS`` threads (default 1), over
  ``--timed`` photos after 10 warm-up calls: at 250 x 250 (the LFW photo) and at 1280 x 720 (a camera frame:
  the photo scaled x2 and placed at a seeded position on a grey 1280 x 720 frame); p50 and mean.

Rank-1, DIR at FPIR 1% and wrong accepts per detector come from ``scripts/quality_report.py --detector``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from facedb.evaluate import labelled_folder
from facedb.faces.images import load_photo
from facedb.faces.pipeline import DetectorSettings, FaceChoice, choose_face, get_detector

REPO = Path(__file__).resolve().parents[1]


def camera_frame(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 1280 x 720 grey frame with the photo scaled x2 (500 x 500) at a random place in it."""
    big = np.asarray(Image.fromarray(pixels).resize((2 * pixels.shape[1], 2 * pixels.shape[0]), Image.BILINEAR))
    frame = np.full((720, 1280, 3), 128, dtype=np.uint8)
    y = int(rng.integers(0, 720 - big.shape[0] + 1))
    x = int(rng.integers(0, 1280 - big.shape[1] + 1))
    frame[y:y + big.shape[0], x:x + big.shape[1]] = big
    return frame


def timed(detector, images: list[np.ndarray]) -> dict[str, float]:
    for image in images[:10]:
        detector.detect(image)
    ms = []
    for image in images:
        t = time.perf_counter()
        detector.detect(image)
        ms.append((time.perf_counter() - t) * 1000)
    return {"p50_ms": round(float(np.median(ms)), 2), "mean_ms": round(float(np.mean(ms)), 2),
            "p90_ms": round(float(np.percentile(ms, 90)), 2), "photos": len(ms)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("FACEDB_TEST_DATA", REPO.parent / "shared" /
                                                                     "facedata")))
    ap.add_argument("--photos", type=int, default=1000)
    ap.add_argument("--timed", type=int, default=200)
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "detectors.json")
    args = ap.parse_args()
    paths, _ = labelled_folder(args.data / "lfw_deepfunneled")
    rng = np.random.default_rng(0)
    sample = [paths[i] for i in sorted(rng.choice(len(paths), args.photos, replace=False))]
    photos = [load_photo(p).pixels for p in sample]
    frames = [camera_frame(p, rng) for p in photos[: args.timed]]
    out: dict[str, object] = {"command": " ".join(["python", *sys.argv]), "photos": len(photos),
                              "threads": os.environ.get("FACEDB_THREADS", "1 (default)"),
                              "load_average_at_start": os.getloadavg()}
    central: dict[str, list] = {}
    for name in ("mtcnn", "yunet"):
        det = get_detector(DetectorSettings(detector=name))
        t0 = time.time()
        found = [det.detect(p) for p in photos]
        central[name] = [choose_face(f, FaceChoice.CENTRAL, 250, 250) for f in found]
        out[name] = {
            "min_score": det.min_score,
            "any_face": float(np.mean([len(f) > 0 for f in found])),
            "one_face": float(np.mean([len(f) == 1 for f in found])),
            "seconds_for_all": round(time.time() - t0, 1),
            "250x250": timed(det, photos[: args.timed]),
            "1280x720": timed(det, frames),
            "1280x720_any_face": float(np.mean([len(det.detect(f)) > 0 for f in frames])),
        }
        print(name, json.dumps(out[name]), flush=True)
    gaps = [float(np.abs(a.landmarks - b.landmarks).max()) for a, b in zip(central["mtcnn"], central["yunet"])
            if not isinstance(a, str) and not isinstance(b, str)]
    out["landmark_gap_px"] = {"photos": len(gaps), "median": round(float(np.median(gaps)), 2),
                              "p95": round(float(np.percentile(gaps, 95)), 2)}
    out["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
