"""Two checks of the converted CASIA-WebFace FaceNet (`facenet-casia-tf`) on one LFW pairs file (#24):

    python scripts/casia_tf_checks.py [--pairs pairsDevTest.txt] [--finetuned FT.pt --train-command "..."]
        [--out bench-results/casia-tf-checks.json]

The pairs' photos are detected once through facedb's pipeline (MTCNN, the face nearest the centre); then
1. alignment: the same network embeds three crops of each detected face: facedb's (the box grown by a margin
   of 32 of the 160 output pixels, as facenet-pytorch does: 0.25 x the box side), Sandberg's LFW validation
   alignment (the box grown by 32 pixels of the photo, clipped, resized to 160: align_dataset_mtcnn.py
   --image_size 160 --margin 32), and his training alignment (44 pixels at 182, centre 160 crop);
2. fine-tuning (with --finetuned): the start and the fine-tuned network embed facedb's crops.
Each is scored by 10-fold accuracy on the pairs (interleaved folds: pairsDevTest lists its 500 same pairs
first; each fold's threshold chosen on the other nine), cosine, no flip. pairsDevTest's people are disjoint
from peopleDevTrain.txt's, which a fine-tune trains on.
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

from facedb.evaluate import read_pairs, ten_fold_accuracy
from facedb.faces.models.facenet import FaceNet, model_id_for
from facedb.faces.pipeline import FaceChoice, Prepared, get_pipeline


def sandberg_crop(image: np.ndarray, box: tuple[float, float, float, float], margin: int, size: int,
                  final: int = 160) -> np.ndarray:
    """align_dataset_mtcnn.py's crop: box +- margin/2 photo pixels, clipped, truncated to ints, resized
    bilinearly to ``size``; then the centre ``final`` x ``final`` (facenet's evaluation of a 182 alignment)."""
    h, w = image.shape[:2]
    x1, y1 = int(max(box[0] - margin / 2, 0)), int(max(box[1] - margin / 2, 0))
    x2, y2 = int(min(box[2] + margin / 2, w)), int(min(box[3] + margin / 2, h))
    crop = np.asarray(Image.fromarray(image[y1:y2, x1:x2]).resize((size, size), Image.BILINEAR))
    off = (size - final) // 2
    return np.ascontiguousarray(crop[off:off + final, off:off + final])


def accuracy(net: FaceNet, crops: dict[Path, np.ndarray], pairs: list, keep: list[int]) -> dict[str, object]:
    order = sorted(crops)
    row = {p: i for i, p in enumerate(order)}
    t = time.time()
    emb = net.embed([crops[p] for p in order])
    scores = np.array([float(emb[row[pairs[i].a]] @ emb[row[pairs[i].b]]) for i in keep])
    same = np.array([pairs[i].same for i in keep])
    rep = ten_fold_accuracy(scores, same, np.array([i % 10 for i in range(len(keep))]))
    return {"accuracy_mean": rep["accuracy_mean"], "accuracy_std": rep["accuracy_std"],
            "same_mean": float(scores[same].mean()), "different_mean": float(scores[~same].mean()),
            "embed_seconds": round(time.time() - t, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("FACEDB_TEST_DATA", "../shared/facedata")))
    ap.add_argument("--pairs", default="pairsDevTest.txt")
    ap.add_argument("--finetuned", type=Path, default=None, help="weights from facedb train --init casia-tf")
    ap.add_argument("--train-command", default="", help="the facedb train command that made --finetuned")
    ap.add_argument("--skip-alignment", action="store_true")
    ap.add_argument("--folds", type=int, default=10, help="score only pairs i with i %% 10 < FOLDS (a busy CPU)")
    ap.add_argument("--out", type=Path, default=Path("bench-results/casia-tf-checks.json"))
    args = ap.parse_args()
    lfw = args.data / "lfw_deepfunneled"
    pairs = [p for i, p in enumerate(read_pairs(args.data / "lfw_protocol" / args.pairs, lfw)) if i % 10 < args.folds]
    photos = sorted({p for pair in pairs for p in (pair.a, pair.b)})
    pipe = get_pipeline("facenet-casia-tf")
    start = time.time()
    variants: dict[str, dict[Path, np.ndarray]] = {"facedb": {}, "sandberg_m32_160": {}, "sandberg_m44_182_c160": {}}
    for s in range(0, len(photos), 32):
        for o in pipe.prepare([(p, p) for p in photos[s:s + 32]], FaceChoice.CENTRAL):
            if isinstance(o, Prepared):
                variants["facedb"][o.key] = o.crop
                if not args.skip_alignment:
                    image = np.asarray(Image.open(o.key).convert("RGB"))
                    box = o.face.box  # clipped to the photo, as Sandberg's crop clips
                    variants["sandberg_m32_160"][o.key] = sandberg_crop(image, box, 32, 160)
                    variants["sandberg_m44_182_c160"][o.key] = sandberg_crop(image, box, 44, 182)
    crops = variants["facedb"]
    print(f"{len(crops)}/{len(photos)} photos aligned in {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    keep = [i for i, pr in enumerate(pairs) if pr.a in crops and pr.b in crops]
    out: dict[str, object] = {"pairs_file": args.pairs, "pairs": len(pairs), "pairs_scored": len(keep),
                              "photos_aligned": len(crops), "model_id": pipe.model_id, "flip": False}
    if not args.skip_alignment:
        out["alignment"] = {}
        for name, v in variants.items():
            out["alignment"][name] = accuracy(pipe.embedder, v, pairs, keep)  # type: ignore[index]
            print(name, out["alignment"][name], file=sys.stderr, flush=True)  # type: ignore[index]
    if args.finetuned is not None:
        tuned = FaceNet.load(model_id_for(args.finetuned, "facenet-vggface2"), weights=args.finetuned)
        start_rep = (out["alignment"]["facedb"] if not args.skip_alignment  # type: ignore[index]
                     else accuracy(pipe.embedder, crops, pairs, keep))  # the same network on the same crops
        out["finetune"] = {"train_command": args.train_command, "finetuned_model_id": tuned.model_id,
                           "start": start_rep,
                           "finetuned": accuracy(tuned, crops, pairs, keep)}
        print(out["finetune"], file=sys.stderr, flush=True)
    out["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=float))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
