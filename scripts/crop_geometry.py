"""How large the face is in each model's aligned crop, and in the 96x96 thumbnail kept of it: whether a kept crop
has the resolution another model needs when a database moves to it (``facedb reembed``; docs/models.md,
"Moving a database to another model").

    python scripts/crop_geometry.py [--photos 60] [--out bench-results/crop-geometry.json]

For LFW photos (the first photo of the first ``--photos`` people, sorted), MTCNN's five landmarks give the
distance between the eyes in the photo; each model's alignment maps it into its crop:

* ``sface``: the similarity warp to the ArcFace 112x112 template (eyes 35.2 px apart there, by construction);
* ``facenet-*``: the MTCNN box grown by a 32 px margin, resized to 160x160 (the eye distance scales with it);
* ``dlib-resnet``: dlib's own 5-point fit and ``get_face_chip`` (150x150, padding 0.25): the eyes are found
  again by MTCNN in the chip, padded (the chip's geometry is dlib's, not exposed).

A thumbnail (facedb/gallery/thumbnails.py) is the crop shrunk to 96x96, so its eye distance is the crop's times 96 over
the crop's side. The ratio target / thumbnail is how much a move from one model's thumbnails must upsample the
face for the other model (above 1: the thumbnail has fewer pixels across the face than the new model reads).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from facedb.faces.models.facenet import IMAGE_SIZE as FACENET_SIZE
from facedb.faces.models.facenet import MARGIN as FACENET_MARGIN
from facedb.faces.models.sface import SIZE as SFACE_SIZE
from facedb.faces.models.sface import TEMPLATE
from facedb.faces.pipeline import find_faces, get_detector, get_pipeline
from facedb.gallery.thumbnails import SIZE as THUMB

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=60)
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "crop-geometry.json")
    args = ap.parse_args()
    root = Path(os.environ.get("FACEDB_TEST_DATA", REPO.parent / "shared" / "facedata")) / "lfw_deepfunneled"
    if not root.is_dir():
        sys.exit(f"LFW not found at {root} (set FACEDB_TEST_DATA)")
    detector = get_detector()
    dlib = get_pipeline("dlib-resnet")
    eyes: dict[str, list[float]] = {"sface": [], "facenet": [], "dlib-resnet": []}
    sface_eyes = float(np.linalg.norm(TEMPLATE[1] - TEMPLATE[0]))
    for person in sorted(p for p in root.iterdir() if p.is_dir())[:args.photos]:
        analysed = dlib.analyse(sorted(person.iterdir())[0])
        if not analysed.faces:
            continue
        face = max(analysed.faces, key=lambda f: f.area)
        lm = face.landmarks
        eyes["sface"].append(sface_eyes)
        x1, y1, x2, y2 = face.box
        side = max(x2 - x1, y2 - y1)
        region = side + 2 * FACENET_MARGIN * side / (FACENET_SIZE - FACENET_MARGIN)
        eyes["facenet"].append(float(np.linalg.norm(lm[1] - lm[0])) * FACENET_SIZE / region)
        chip = analysed.crops(dlib.embedder.align, [face])[0]
        found, _ = find_faces(detector, chip, cropped=True)
        real = [f for f in found if f.score > 0]
        if real:
            c = max(real, key=lambda f: f.area).landmarks
            eyes["dlib-resnet"].append(float(np.linalg.norm(c[1] - c[0])))
    side = {"sface": SFACE_SIZE, "facenet": FACENET_SIZE, "dlib-resnet": 150}
    crop = {m: float(np.median(v)) for m, v in eyes.items() if v}
    thumb = {m: crop[m] * THUMB / side[m] for m in crop}
    out = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "load_average": os.getloadavg(),
        "photos": len(eyes["sface"]), "thumbnail_side_px": THUMB,
        "crop_side_px": side,
        "eye_distance_px_in_crop_median": {m: round(v, 1) for m, v in crop.items()},
        "eye_distance_px_in_thumbnail_median": {m: round(v, 1) for m, v in thumb.items()},
        "upsampling_thumbnail_of_row_to_column": {a: {b: round(crop[b] / thumb[a], 2) for b in crop} for a in crop},
        "dlib_chips_with_a_face_found_again": len(eyes["dlib-resnet"]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
