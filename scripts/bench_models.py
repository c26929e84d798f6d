"""Speed of each face model through facedb's pipeline: ms per face (embedding an aligned crop) and ms per photo
(decode, MTCNN, align, embed: a photo to a vector), on one thread, medians over LFW photos.

    python scripts/bench_models.py [--model sface --model dlib-resnet] [--photos 100] [--out FILE.json]

``FACEDB_THREADS`` (default 1) sets the threads of torch (MTCNN) and onnxruntime (sface). Numbers are for the
machine it runs on (its load included: the JSON records the load average before and after); compare models only
within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from facedb.evaluate import labelled_folder
from facedb.pipeline import FaceChoice, Prepared, get_pipeline

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=None)
    ap.add_argument("--photos", type=int, default=100)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("FACEDB_TEST_DATA", REPO.parent / "shared" /
                                                                     "facedata")))
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "models-speed.json")
    args = ap.parse_args()
    paths, _ = labelled_folder(args.data / "lfw_deepfunneled")
    pick = [paths[i] for i in np.random.default_rng(0).choice(len(paths), args.photos, replace=False)]
    out: dict[str, object] = {"photos": len(pick), "threads": os.environ.get("FACEDB_THREADS", "1"),
                              "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                              "load_before": os.getloadavg()[0], "models": {}}
    for model_id in args.model or ["sface", "dlib-resnet"]:
        pipe = get_pipeline(model_id)
        ready = [o for o in pipe.prepare(list(enumerate(pick[:20])), FaceChoice.CENTRAL) if isinstance(o, Prepared)]
        pipe.embed_crops([r.crop for r in ready[:2]], flip=True)  # warm-up
        crops = [o.crop for o in pipe.prepare(list(enumerate(pick)), FaceChoice.CENTRAL) if isinstance(o, Prepared)]
        face_ms = []
        for c in crops:
            t = time.perf_counter()
            pipe.embed_crops([c])
            face_ms.append(1000 * (time.perf_counter() - t))
        photo_ms, flip_ms = [], []
        for p in pick:
            t = time.perf_counter()
            analysed = pipe.analyse(p)
            if analysed.faces:
                pipe.embed_faces(analysed, analysed.faces[:1])
            photo_ms.append(1000 * (time.perf_counter() - t))
            t = time.perf_counter()
            if analysed.faces:
                pipe.embed_faces(analysed, analysed.faces[:1], flip=True)
            flip_ms.append(1000 * (time.perf_counter() - t))
        row = {"ms_per_face_p50": round(float(np.median(face_ms)), 1),
               "ms_per_face_p90": round(float(np.percentile(face_ms, 90)), 1),
               "ms_align_and_embed_with_flip_p50": round(float(np.median(flip_ms)), 1),
               "ms_per_photo_p50": round(float(np.median(photo_ms)), 1),
               "ms_per_photo_p90": round(float(np.percentile(photo_ms, 90)), 1), "faces": len(face_ms)}
        out["models"][model_id] = row  # type: ignore[index]
        print(model_id, row, flush=True)
    out["load_after"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
