"""The main job, end to end: create a database, enrol a folder of labelled photos, identify held-back photos.

FOLDER holds one sub-folder of photos per person (default: LFW in $FACEDB_TEST_DATA, ../shared/facedata).
For up to --people people with more than --enrol photos, the first --enrol photos are enrolled and up to
--probes of the rest are held back as probes; as many people again, not enrolled, give "stranger" probes
that should come back unknown. Prints each decision and the rates of correct ones.

    python scripts/quickstart.py [FOLDER] [--people 30] [--enrol 2] [--probes 3] [--db DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from facedb import FaceDB
from facedb.faces.models import choose_default_model, spec_for
from facedb.faces.pipeline import get_pipeline, list_folder


def default_folder() -> Path:
    root = Path(os.environ.get("FACEDB_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "facedata"))
    return root / "lfw_deepfunneled"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", type=Path, default=None)
    ap.add_argument("--people", type=int, default=30)
    ap.add_argument("--enrol", type=int, default=2)
    ap.add_argument("--probes", type=int, default=3)
    ap.add_argument("--db", type=Path, default=None, help="database directory (default: a temporary one)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    folder = args.folder or default_folder()
    if not folder.is_dir():
        print(f"no photo folder at {folder}: pass FOLDER (one sub-folder per person)", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    everyone = list_folder(folder).people
    eligible = [(n, f) for n, f in everyone if len(f) > args.enrol]
    others = [(n, f) for n, f in everyone if len(f) <= args.enrol]
    pick = [eligible[i] for i in sorted(rng.choice(len(eligible), min(args.people, len(eligible)), replace=False))]
    strangers = [others[i] for i in sorted(rng.choice(len(others), min(args.people, len(others)), replace=False))]

    model_id, note = choose_default_model()
    if note:
        print(note)
    spec = spec_for(model_id)
    threshold, source = spec.default_threshold(flip=True)  # new databases embed with flip augmentation
    tmp = tempfile.TemporaryDirectory()
    root = args.db or Path(tmp.name) / "db"
    print(f"database {root}  model {spec.id} ({spec.dim}-d)  threshold {threshold:.3f} ({source})")
    pipe = get_pipeline(spec.id)
    margin = spec.margin_threshold(True)  # the decision rule `facedb init` gives this model's databases
    rule = "margin" if margin is not None else "gallery" if spec.impostor_model(True) is not None else "fixed"
    print(f"decision rule {rule}" + (f" (margin threshold {margin:.4f})" if margin is not None else ""))
    with FaceDB.create(root, model_id=spec.id, dim=spec.dim, threshold=threshold, threshold_source=source,
                       impostors=spec.impostor_model(True), margin=margin, rule=rule) as db:
        t = time.perf_counter()
        report = db.enroll_many([(n, f[: args.enrol]) for n, f in pick], model=pipe, on_multiple="largest")
        dt = time.perf_counter() - t
        print(f"enrolled {len(report.people)} people from {report.photos} photos: {report.faces_stored} faces "
              f"stored, {len(report.skipped)} skipped, {report.photos / dt:.1f} photos/s")
        for s in report.skipped:
            print(f"  skipped {s.image}: {s.reason}")
        enrolled = set(report.people)
        probes = [(n, p) for n, f in pick if n in enrolled for p in f[args.enrol: args.enrol + args.probes]]
        probes += [(n, f[0]) for n, f in strangers]
        right = genuine = rejected = stranger_total = rank1 = 0
        for truth, photo in probes:
            matches = db.search(photo, model=pipe, k=5)
            if not matches:
                print(f"{photo.name:40s} no face")
                continue
            # the labelled person is taken to be the largest face in the photo
            m = max(matches, key=lambda m: (m.box[2] - m.box[0]) * (m.box[3] - m.box[1]))
            known = truth in enrolled
            decided = m.identity or "unknown"
            ok = decided == truth if known else m.identity is None
            if known:
                genuine += 1
                right += ok
                rank1 += bool(m.candidates) and m.candidates[0].name == truth
            else:
                stranger_total += 1
                rejected += ok
            tag = truth if known else f"{truth} (not enrolled)"
            print(f"{'ok  ' if ok else 'MISS'} {photo.name:34s} -> {decided:26s} sim={m.similarity:.3f}  truth={tag}")
        print()
        print(f"enrolled people, probes identified correctly: {right}/{genuine} = {right / max(genuine, 1):.1%}"
              f"  (rank-1 ignoring the threshold: {rank1 / max(genuine, 1):.1%})")
        print(f"strangers, probes answered unknown:          {rejected}/{stranger_total} = "
              f"{rejected / max(stranger_total, 1):.1%}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
