"""Speed of each face model through facedb's pipeline: ms per face (embedding an aligned crop) and ms per photo
(decode, MTCNN, align, embed: a photo to a vector), on one thread, medians over LFW photos; and a photo to a
decision at the door: ``FaceDB.search`` on a database made by ``facedb init --model M`` (its defaults: flip,
margin rule, audit trail on) with one photo each of ``--gallery`` LFW people enrolled, probed with their other
photos and with strangers.

    python scripts/bench_models.py [--model sface --model dlib-resnet] [--photos 100] [--gallery 100]
                                   [--out FILE.json]

``FACEDB_THREADS`` (default 1) sets the threads of torch (MTCNN) and onnxruntime (sface). Numbers are for the
machine it runs on (its load included: the JSON records the load average before and after); compare models only
within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from facedb import FaceDB
from facedb.evaluate import labelled_folder
from facedb.faces.pipeline import FaceChoice, Prepared, get_pipeline

REPO = Path(__file__).resolve().parents[1]


def photo_to_decision(model_id: str, paths: list[Path], labels: list[str], gallery: int, probes: int
                      ) -> dict[str, object]:
    """ms from a photo file to an answer (``FaceDB.search``: decode, detect, align, embed with the database's
    flip, search, decide, audit record), p50/p90 over ``probes`` photos: half of enrolled people, half strangers."""
    by_person: dict[str, list[Path]] = {}
    for p, name in zip(paths, labels):
        by_person.setdefault(name, []).append(p)
    rng = np.random.default_rng(1)
    several = sorted(n for n, ps in by_person.items() if len(ps) >= 2)
    enrolled = [several[i] for i in rng.choice(len(several), gallery, replace=False)]
    singles = sorted(n for n, ps in by_person.items() if len(ps) == 1)
    genuine = [by_person[n][1] for n in enrolled][: probes // 2]
    strangers = [by_person[singles[i]][0] for i in rng.choice(len(singles), probes - len(genuine), replace=False)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "db"
        subprocess.run([sys.executable, "-m", "facedb.cli", "--db", str(root), "-q", "init", "--model", model_id],
                       check=True, stdout=subprocess.DEVNULL)
        with FaceDB.open(root) as db:
            # LFW photos often hold a second face: the person is the largest, as for a badge photo
            db.enroll_many([(n, [by_person[n][0]]) for n in enrolled], on_multiple="largest")
            db.search(genuine[0])  # warm-up: models loaded, index built
            ms, named, accepted_strangers = [], 0, 0
            for i, probe in enumerate(genuine + strangers):
                t = time.perf_counter()
                answer = db.search(probe)
                ms.append(1000 * (time.perf_counter() - t))
                # the person at the door is the largest face in the frame
                who = max(answer, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1])).identity \
                    if answer else None
                if i < len(genuine):
                    named += who == enrolled[i]
                else:
                    accepted_strangers += who is not None
            settings = db.settings()
    return {"ms_p50": round(float(np.median(ms)), 1), "ms_p90": round(float(np.percentile(ms, 90)), 1),
            "gallery_people": gallery, "genuine_probes": len(genuine), "named_right": named,
            "stranger_probes": len(strangers), "strangers_accepted": accepted_strangers,
            "flip": settings.flip, "rule": settings.rule.kind}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=None)
    ap.add_argument("--photos", type=int, default=100)
    ap.add_argument("--gallery", type=int, default=100, help="people enrolled for the photo-to-decision run")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("FACEDB_TEST_DATA", REPO.parent / "shared" /
                                                                     "facedata")))
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "models-speed.json")
    args = ap.parse_args()
    paths, labels = labelled_folder(args.data / "lfw_deepfunneled")
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
        row["decision"] = photo_to_decision(model_id, paths, labels, args.gallery, args.photos)
        out["models"][model_id] = row  # type: ignore[index]
        print(model_id, row, flush=True)
    out["load_after"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
