"""Fill the evaluation embedding cache for a labelled folder, with and without flip, in one pass.

    python scripts/warm_eval_cache.py [--model dlib-resnet] [--folder $FACEDB_TEST_DATA/lfw_deepfunneled]

Each photo is detected and aligned once; the crop and its mirror image are embedded in one batch, which gives
both variants (without flip: the crop's embedding; with flip: the renormalised mean of both) for the cost of
the flip variant alone. Photos already in both caches are skipped, so an interrupted run resumes.
Every later `facedb eval` / `calibrate` / `scripts/accuracy_report.py` run then reads the cache.
`--first pairs.txt --first peopleDevTrain.txt` embeds the photos those LFW protocol files name before the others,
so a run stopped early (a slow model on a busy CPU) has what the 10-fold protocol and calibration need.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from facedb.evaluate import EmbeddingCache, labelled_folder
from facedb.faces.pipeline import FaceChoice, Prepared, get_pipeline, source_sha256


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dlib-resnet")
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--folder", type=Path, default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--first", type=Path, action="append", default=[],
                    help="an LFW pairs or people file whose photos are embedded before the rest (repeatable)")
    args = ap.parse_args()
    data = Path(os.environ.get("FACEDB_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "facedata"))
    folder = args.folder or data / "lfw_deepfunneled"
    paths, _ = labelled_folder(folder)
    if args.first:
        paths = sorted(paths, key=first_rank(args.first, folder))
    pipe = get_pipeline(args.model, weights=args.weights)
    plain = EmbeddingCache(pipe.model_id, pipe.embedder.dim)
    flip = EmbeddingCache(pipe.model_id + "-flip", pipe.embedder.dim)
    todo = [(i, p) for i, p in enumerate(paths)
            if (sha := source_sha256(p)) is None or plain.get(sha) is None or flip.get(sha) is None]
    print(f"{len(paths)} photos, {len(todo)} to embed", file=sys.stderr, flush=True)
    start = time.time()
    for s in range(0, len(todo), args.batch):
        outcomes = pipe.prepare(todo[s:s + args.batch], FaceChoice.CENTRAL)
        ready = [o for o in outcomes if isinstance(o, Prepared)]
        crops = [o.crop for o in ready]
        both = pipe.embedder.embed(crops + [np.ascontiguousarray(c[:, ::-1]) for c in crops]) if crops else []
        for o, a, b in zip(ready, both[: len(ready)], both[len(ready):]):
            m = a + b
            plain.put(o.sha256, a, True)
            flip.put(o.sha256, (m / np.linalg.norm(m)).astype(np.float32), True)
        for o in outcomes:
            if not isinstance(o, Prepared) and o.sha256 is not None:
                for cache in (plain, flip):
                    cache.put(o.sha256, np.full(pipe.embedder.dim, np.nan, dtype=np.float32), False)
        if (s // args.batch) % 16 == 15 or s + args.batch >= len(todo):
            plain.save()
            flip.save()
            done = min(s + args.batch, len(todo))
            rate = done / (time.time() - start)
            print(f"{done}/{len(todo)} photos, {rate:.2f}/s, ~{(len(todo) - done) / rate / 60:.0f} min left",
                  file=sys.stderr, flush=True)
    return 0


def first_rank(files: list[Path], folder: Path):
    """A sort key putting the photos named by the LFW protocol ``files`` (pairs or people files), in that
    order, before all others (stable: the folder's order within each group)."""
    from facedb.evaluate import read_pairs, read_people

    rank: dict[Path, int] = {}
    for i, f in enumerate(files):
        if f.name.startswith("pairs"):
            for pair in read_pairs(f, folder):
                rank.setdefault(pair.a, i)
                rank.setdefault(pair.b, i)
        else:
            for name in read_people(f):
                for photo in sorted((folder / name).glob("*.jpg")):
                    rank.setdefault(photo, i)
    return lambda p: rank.get(p, len(files))


if __name__ == "__main__":
    sys.exit(main())
