"""Does gating enrolment photos on quality help? Open-set identification on LFW with the enrolled photo of
each person chosen at random (baseline) or at random among the photos that pass the gates.

Gates (on the detected face nearest the centre): face width >= --min-size px, MTCNN score >= --min-score,
sharpness (variance of the Laplacian of the grey face crop) above the --blur-quantile of all photos, and a
frontal pose: |nose x - eye-midpoint x| / inter-ocular distance <= --max-yaw.

    python scripts/quality_gates.py
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from facedb import evaluate as ev
from facedb.faces.images import load_photo
from facedb.faces.models.facenet import crop_face
from facedb.faces.pipeline import FaceChoice, choose_face, get_pipeline


def quality(pixels: np.ndarray, face) -> tuple[float, float, float, float]:
    grey = crop_face(pixels, face.box, size=112, margin=0).mean(axis=2)
    lap = grey[1:-1, 1:-1] * -4 + grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:]
    lm = face.landmarks
    eyes = (lm[0] + lm[1]) / 2
    iod = max(float(np.linalg.norm(lm[1] - lm[0])), 1e-6)
    return face.width, face.score, float(lap.var()), abs(float(lm[2, 0] - eyes[0])) / iod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = Path(os.environ.get("FACEDB_TEST_DATA", "../shared/facedata"))
    ap.add_argument("--min-size", type=float, default=60)
    ap.add_argument("--min-score", type=float, default=0.99)
    ap.add_argument("--blur-quantile", type=float, default=0.10)
    ap.add_argument("--max-yaw", type=float, default=0.25)
    ap.add_argument("--out", type=Path, default=Path("bench-results/quality-gates.json"))
    args = ap.parse_args()
    lfw = data / "lfw_deepfunneled"
    pipe = get_pipeline("dlib-resnet")
    paths, labels = ev.labelled_folder(lfw)
    vectors = ev.embed_cached(paths, pipe, False, None, True).vectors
    q = np.full((len(paths), 4), np.nan)
    for i, p in enumerate(paths):
        photo = load_photo(p)
        face = choose_face(pipe.detector.detect(photo.pixels), FaceChoice.CENTRAL, photo.width, photo.height)
        if not isinstance(face, str):
            q[i] = quality(photo.pixels, face)
    blur_min = np.nanquantile(q[:, 2], args.blur_quantile)
    passes = (q[:, 0] >= args.min_size) & (q[:, 1] >= args.min_score) & (q[:, 2] >= blur_min) & (
        q[:, 3] <= args.max_yaw)
    lab = np.array(labels)
    out: dict[str, object] = {"photos": len(paths), "pass_share": float(passes.mean()),
                              "gates": vars(args) | {"blur_min": float(blur_min), "out": str(args.out)}}
    for mode in ("random", "gated"):
        rng = np.random.default_rng(0)
        split = ev.Split({}, [], [])
        for name in sorted(set(labels)):
            idx = np.flatnonzero(lab == name)
            if len(idx) < 2:
                split.impostor += idx.tolist()
                continue
            pool = idx[passes[idx]] if mode == "gated" and passes[idx].any() else idx
            chosen = int(rng.choice(pool))
            split.gallery[name] = [chosen]
            split.genuine += [(name, int(i)) for i in idx if i != chosen]
        with tempfile.TemporaryDirectory() as tmp:
            gen, imp = ev.open_set_scores(Path(tmp) / "db", vectors, split, pipe.model_id)
        rep = ev.open_set_report(split, gen, imp)
        out[mode] = {k: rep[k] for k in ("rank1", "rank5", "dir_at_fpir_0.01", "dir_at_fpir_0.001")}
        print(mode, out[mode])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=float))
    print(f"{passes.mean():.1%} of photos pass the gates")


if __name__ == "__main__":
    main()
