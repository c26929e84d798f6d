"""Enrolment throughput: end to end (decode -> detect -> align -> embed -> store -> index) against the raw
embedder on pre-aligned crops, and the detector alone. Prints a table and writes JSON.

End to end runs twice, into fresh databases: with the detection thread (`workers` 0) and with the detection
processes `facedb enroll` starts by default (`--workers`; their start-up time is included).

    python scripts/bench_enroll.py [--model dlib-resnet] [--photos 200] [--weights FILE]

FaceNet with --weights random runs randomly initialised InceptionResnetV1 weights: the same computation as
the published weights (which cannot be downloaded here), so its speed, not its accuracy, is representative.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from facedb import FaceDB
from facedb.faces.pipeline import auto_workers, get_pipeline, list_folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dlib-resnet")
    ap.add_argument("--weights", default=None, help="FaceNet weights file, or 'random'")
    ap.add_argument("--photos", type=int, default=200)
    ap.add_argument("--folder", type=Path, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                    help="flip test-time augmentation, in the databases and the raw embedder alike (default: on, "
                         "as in new databases)")
    ap.add_argument("--workers", type=int, default=None, help="detection processes; default: as `facedb enroll`")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    os.environ["FACEDB_DEVICE"] = args.device  # the databases' own pipelines run there too
    data = os.environ.get("FACEDB_TEST_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "facedata"
    folder = args.folder or Path(data) / "lfw_deepfunneled"
    people = list_folder(folder).people
    photos = [p for _, files in people for p in files][: args.photos]
    weights = None
    tmp = tempfile.TemporaryDirectory()
    if args.weights == "random":
        import torch
        from facenet_pytorch import InceptionResnetV1

        weights = Path(tmp.name) / "random.pt"
        torch.save(InceptionResnetV1().state_dict(), weights)
    elif args.weights:
        weights = Path(args.weights)
    from facedb.faces.pipeline import DetectorSettings

    pipe = get_pipeline(args.model, weights=weights, settings=DetectorSettings(device=args.device))
    pipe.analyse(photos[0])  # load the models before timing
    load_at_start = os.getloadavg()  # on a shared machine every rate here stretches with the other jobs

    t = time.perf_counter()
    analysed = [pipe.analyse(p) for p in photos]
    detect_s = time.perf_counter() - t
    items = [(a.photo, a.faces[0]) for a in analysed if a.faces]
    crops = [pipe.embedder.align(p.pixels, f) for p, f in items]
    t = time.perf_counter()
    pipe.embed_crops(crops, flip=args.flip)
    embed_s = time.perf_counter() - t

    by_person: dict[str, list[Path]] = {}
    chosen = set(photos)
    for name, files in people:
        for f in files:
            if f in chosen:
                by_person.setdefault(name, []).append(f)
    workers = auto_workers(len(photos), args.device, pipe.embedder.holds_gil) if args.workers is None else args.workers

    def end_to_end(n_workers: int) -> tuple[float, int]:
        """Seconds and faces stored for one enrolment into a fresh database (process start-up included)."""
        root = Path(tmp.name) / f"db-{n_workers}"
        FaceDB.create(root, model_id=pipe.model_id, dim=pipe.embedder.dim, threshold=0.5, flip=args.flip).close()
        with FaceDB.open(root, weights=weights) as db:
            t = time.perf_counter()
            report = db.enroll_many(list(by_person.items()), on_multiple="largest", workers=n_workers)
            db.save_index()
            return time.perf_counter() - t, report.faces_stored

    thread_s, thread_faces = end_to_end(0)
    e2e_s, faces = end_to_end(workers) if workers else (thread_s, thread_faces)
    res = {
        "model": pipe.model_id,
        "device": args.device,
        "flip": args.flip,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "photos": len(photos),
        "faces_stored": faces,
        "detect_photos_per_s": len(photos) / detect_s,
        "raw_embed_faces_per_s": len(crops) / embed_s,
        "end_to_end_thread_faces_per_s": thread_faces / thread_s,
        "workers": workers,
        "end_to_end_photos_per_s": len(photos) / e2e_s,
        "end_to_end_faces_per_s": faces / e2e_s,
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
    }
    res["end_to_end_share_of_raw_embedder"] = res["end_to_end_faces_per_s"] / res["raw_embed_faces_per_s"]
    out = args.out or Path(f"bench-results/enroll-{pipe.model_id.split('-')[0]}-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    width = max(len(k) for k in res)
    for k, v in res.items():
        print(f"{k.ljust(width)}  {v:.3f}" if isinstance(v, float) else f"{k.ljust(width)}  {v}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
