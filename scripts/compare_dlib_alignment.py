"""Which box should dlib's 5-point shape predictor start from: MTCNN's (facedb's choice) or dlib's own HOG
detector's (what the predictor was trained with)? Measured on an LFW pairs file.

    python scripts/compare_dlib_alignment.py [--pairs pairsDevTest.txt]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from facedb import evaluate as ev
from facedb.faces.detect import Face
from facedb.faces.images import load_photo
from facedb.faces.pipeline import FaceChoice, choose_face, get_pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = Path(os.environ.get("FACEDB_TEST_DATA", "../shared/facedata"))
    ap.add_argument("--pairs", type=Path, default=data / "lfw_protocol" / "pairsDevTest.txt")
    ap.add_argument("--out", type=Path, default=Path("bench-results/dlib-alignment.json"))
    args = ap.parse_args()
    import dlib

    hog = dlib.get_frontal_face_detector()
    pipe = get_pipeline("dlib-resnet")
    pairs = ev.read_pairs(args.pairs, data / "lfw_deepfunneled")
    unique = sorted({p.a for p in pairs} | {p.b for p in pairs})
    index = {p: i for i, p in enumerate(unique)}
    same = np.array([p.same for p in pairs])
    results = {}
    vectors = {"mtcnn": [], "hog": []}
    hog_found = 0
    for path in unique:
        photo = load_photo(path)
        m = choose_face(pipe.detector.detect(photo.pixels), FaceChoice.CENTRAL, photo.width, photo.height)
        if isinstance(m, str):  # MTCNN found no face: a centred box of half the side, as LFW centres the face
            side = min(photo.width, photo.height) / 2
            x1, y1 = (photo.width - side) / 2, (photo.height - side) / 2
            m = Face((x1, y1, x1 + side, y1 + side), 0.0, np.zeros((5, 2)))
        rects = hog(photo.pixels, 1)
        faces = [Face((r.left(), r.top(), r.right(), r.bottom()), 1.0, np.zeros((5, 2))) for r in rects]
        h = choose_face(faces, FaceChoice.CENTRAL, photo.width, photo.height)
        h = None if isinstance(h, str) else h
        hog_found += h is not None
        crops = [pipe.embedder.align(photo.pixels, m), pipe.embedder.align(photo.pixels, h or m)]
        a, b = pipe.embedder.embed(crops)
        vectors["mtcnn"].append(a)
        vectors["hog"].append(b)
    for name, vecs in vectors.items():
        x = np.array(vecs)
        scores = np.array([float(x[index[p.a]] @ x[index[p.b]]) for p in pairs])
        t = ev.best_threshold(scores, same)
        tar, _ = ev.tar_at_far(scores[same], scores[~same], 1e-2)
        results[name] = {"accuracy_at_best_threshold": float(np.mean((scores >= t) == same)),
                         "tar_at_far_0.01": tar, "eer": ev.eer(scores[same], scores[~same])[0]}
    results["hog_detected_share"] = hog_found / len(unique)
    results["pairs"] = args.pairs.name
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
