"""What a move to another model costs in accuracy: templates re-made from the kept face crops against templates
made from the photos (``facedb reembed``, facedb/operations/reembed.py).

    python scripts/bench_reembed.py [--people 300] [--strangers 500] [--from dlib-resnet] [--to sface]
                                    [--no-flip] [--no-baseline] [--out bench-results/reembed-dlib-to-sface.json]

LFW (deep-funneled) through facedb's own pipeline: ``--people`` people with two or more photos (a seeded random
choice) are enrolled with their first photo in a ``--from`` database (``FaceDB.create`` with that model's
threshold, thumbnails of enrolled faces kept, as ``facedb init`` keeps them); up to two of their other photos are
the mated probes, and the first photo of ``--strangers`` people who are not enrolled are the non-mated probes.
The database is copied twice and moved to ``--to``: once from the kept crops alone, once from the photos given
again. The probes are embedded once by ``--to`` and identified against each gallery (the same probes):

* rank-1: the mated probes whose best person is right;
* DIR at FPIR 1% and 5%: the threshold on the best score that lets that share of the strangers in, and the mated
  probes whose best person is right at or above it;
* the shipped rule: what the moved database answers out of the box (its model's threshold and rule, as
  ``init`` sets them): mated probes named right, strangers named as someone.

``--no-baseline`` skips the old model's own figures (the same protocol with ``--from`` probes). Also recorded:
the kept thumbnails' size, and in how many the detector found the face again in crop mode, with the distance
between the eyes it found (px in the thumbnail). Writes the JSON and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from facedb import FaceDB
from facedb.faces.models import resolve_model
from facedb.faces.pipeline import find_faces, get_pipeline

REPO = Path(__file__).resolve().parents[1]


def lfw_root() -> Path:
    root = Path(os.environ.get("FACEDB_TEST_DATA", REPO.parent / "shared" / "facedata")) / "lfw_deepfunneled"
    if not root.is_dir():
        sys.exit(f"LFW not found at {root} (set FACEDB_TEST_DATA)")
    return root


def choose(root: Path, people: int, strangers: int, seed: int) -> tuple[dict[str, list[Path]], list[Path]]:
    """({enrolled person: [enrolment photo, probe photos...]}, stranger photos)."""
    rng = np.random.default_rng(seed)
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    many = [p for p in folders if len(list(p.iterdir())) >= 2]
    rng.shuffle(many)
    chosen = {p.name: sorted(p.iterdir())[:3] for p in many[:people]}
    others = [p for p in folders if p.name not in chosen]
    rng.shuffle(others)
    return chosen, [sorted(p.iterdir())[0] for p in others[:strangers]]


def probe_vectors(model_id: str, paths: list[Path], flip: bool) -> tuple[np.ndarray, list[int]]:
    """(unit rows of the largest face of each photo that has one, indices of those photos)."""
    pipe = get_pipeline(model_id)
    rows, kept = [], []
    for i, path in enumerate(paths):
        analysed = pipe.analyse(path)
        if not analysed.faces:
            continue
        face = max(analysed.faces, key=lambda f: f.area)
        rows.append(pipe.embed_faces(analysed, [face], flip=flip)[0])
        kept.append(i)
    return np.array(rows, dtype=np.float32), kept


def measure(db: FaceDB, probes: np.ndarray, truth: list[str | None]) -> dict[str, float | int]:
    """rank-1, DIR at FPIR 1% / 5% (threshold on the best score), and the database's own rule's answers."""
    names, gallery = [], []
    for t in db.templates():
        names.append(t.person)
        gallery.append(t.vector)
    G = np.array(gallery, dtype=np.float32)
    S = probes @ G.T
    best = S.argmax(1)
    s1 = S.max(1)
    named = np.array([names[j] for j in best], dtype=object)
    mated = np.array([t is not None for t in truth])
    right = np.array([n == t for n, t in zip(named, truth)])
    out: dict[str, float | int] = {"mated_probes": int(mated.sum()), "strangers": int((~mated).sum()),
                                   "rank1": round(float(right[mated].mean()), 4)}
    for fpir in (0.01, 0.05):
        stranger_scores = np.sort(s1[~mated])
        k = int(np.floor(fpir * len(stranger_scores)))  # at most k strangers strictly above the threshold
        thr = float(stranger_scores[-k - 1]) + 1e-7 if k < len(stranger_scores) else -1.0
        out[f"dir_at_fpir_{fpir:g}"] = round(float((right & (s1 >= thr))[mated].mean()), 4)
        out[f"threshold_at_fpir_{fpir:g}"] = round(thr, 4)
    answers = db.identify(probes, k=2)
    ident = np.array([a.identity for a in answers], dtype=object)
    out["shipped_rule"] = db.settings().rule.kind
    out["shipped_dir"] = round(float(np.mean([i == t for i, t in zip(ident[mated], np.array(truth)[mated])])), 4)
    out["shipped_fpir"] = round(float(np.mean([i is not None for i in ident[~mated]])), 4)
    return out


def thumbnail_geometry(db: FaceDB, to_model: str) -> dict[str, object]:
    """The kept crops' size, and how often crop-mode detection finds a face in them again, with the eye distance."""
    from facedb.faces.images import load_photo

    pipe = get_pipeline(to_model)
    sizes, found, eyes = set(), 0, []
    n = 0
    for t in db.templates():
        jpeg = db.thumbnail("template", t.id)
        if jpeg is None:
            continue
        n += 1
        pixels = load_photo(jpeg).pixels
        sizes.add(f"{pixels.shape[1]}x{pixels.shape[0]}")
        faces, _ = find_faces(pipe.detector, pixels, cropped=True)
        real = [f for f in faces if f.score > 0]
        if real:
            found += 1
            lm = max(real, key=lambda f: f.area).landmarks
            eyes.append(float(np.linalg.norm(lm[1] - lm[0])))
    return {"thumbnails": n, "sizes": sorted(sizes), "face_found_again": found,
            "eye_distance_px_median": round(float(np.median(eyes)), 1) if eyes else None,
            "eye_distance_px_p10_p90": [round(float(np.percentile(eyes, q)), 1) for q in (10, 90)] if eyes else None}


def upsample_crops(factor: float) -> None:
    """The experiment ``--crop-upsample``: kept crops enlarged before facedb.operations.reembed detects and aligns
    them."""
    import io

    from PIL import Image

    import facedb.operations.reembed as reembed

    real = reembed.crop_from_thumbnail

    def larger(pipe, jpeg):  # type: ignore[no-untyped-def]
        img = Image.open(io.BytesIO(jpeg)).convert("RGB")
        img = img.resize((round(img.width * factor), round(img.height * factor)), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return real(pipe, buf.getvalue())

    reembed.crop_from_thumbnail = larger


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--people", type=int, default=300)
    ap.add_argument("--strangers", type=int, default=500)
    ap.add_argument("--from", dest="source", default="dlib-resnet")
    ap.add_argument("--to", dest="target", default="sface")
    ap.add_argument("--no-flip", dest="flip", action="store_false")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sources", default="crops,photos", help="which moves to measure (crops, photos or both)")
    ap.add_argument("--crop-upsample", type=float, default=1.0,
                    help="an experiment: enlarge each kept crop by this factor (Lanczos) before it is detected "
                         "again and aligned (1: what facedb does)")
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "reembed-dlib-to-sface.json")
    args = ap.parse_args()
    started = time.time()
    if args.crop_upsample != 1.0:
        upsample_crops(args.crop_upsample)
    result: dict[str, object] = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                                 "load_average_at_start": os.getloadavg(), "cpus": os.cpu_count(),
                                 "from": args.source, "to": args.target, "flip": args.flip, "seed": args.seed}
    chosen, stranger_photos = choose(lfw_root(), args.people, args.strangers, args.seed)
    probes = [(name, p) for name, files in chosen.items() for p in files[1:]] + [(None, p) for p in stranger_photos]
    spec, _ = resolve_model(args.source)
    work = Path(tempfile.mkdtemp(prefix="facedb-reembed-bench-"))
    try:
        base = work / "base"
        enrol = work / "enrolment-photos"
        t0 = time.time()
        with FaceDB.create(base, model_id=spec.id, dim=spec.dim, threshold=spec.default_threshold(args.flip)[0],
                           flip=args.flip, thumbnails="enrolled", mean_templates=True,
                           impostors=spec.impostor_model(args.flip), margin=spec.margin_threshold(args.flip)) as db:
            for name, files in chosen.items():
                (enrol / name).mkdir(parents=True)
                shutil.copy(files[0], enrol / name / files[0].name)
            report = db.enroll_many([(name, [enrol / name / files[0].name]) for name, files in chosen.items()],
                                    workers=1)
            result["enrolled"] = {"people": len(report.people), "templates": report.faces_stored,
                                  "skipped": len(report.skipped), "seconds": round(time.time() - t0, 1)}
            result["kept_crops"] = thumbnail_geometry(db, args.target)
        enrolled = set(report.people)
        for name in set(chosen) - enrolled:  # no face found at enrolment: not a person of the database
            shutil.rmtree(enrol / name)
        probes = [(n, p) for n, p in probes if n is None or n in enrolled]
        if args.baseline:
            t0 = time.time()
            vecs, kept = probe_vectors(args.source, [p for _, p in probes], args.flip)
            with FaceDB.open(base) as db:
                result["before_move"] = {**measure(db, vecs, [probes[i][0] for i in kept]),
                                         "probe_seconds": round(time.time() - t0, 1)}
        t0 = time.time()
        vecs, kept = probe_vectors(args.target, [p for _, p in probes], args.flip)
        truth = [probes[i][0] for i in kept]
        result["probes"] = {"given": len(probes), "with_a_face": len(kept), "seconds": round(time.time() - t0, 1)}
        for source in args.sources.split(","):
            root = work / source
            shutil.copytree(base, root)
            t0 = time.time()
            with FaceDB.open(root) as db:
                moved = db.reembed(args.target, photos=enrol if source == "photos" else None,
                                   crops=source == "crops", drop_unembeddable=True)
                seconds = round(time.time() - t0, 1)
                result[f"from_{source}"] = {
                    "templates": moved.templates, "from_photos": moved.from_photos, "from_crops": moved.from_crops,
                    "dropped": moved.dropped, "move_seconds": seconds, **measure(db, vecs, truth)}
                print(source, json.dumps(result[f"from_{source}"]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["load_average_at_end"] = os.getloadavg()
    result["seconds"] = round(time.time() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
