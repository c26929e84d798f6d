"""Torch's thread count for facedb's models (FACEDB_THREADS): per-photo MTCNN detection, per-face FaceNet and
dlib embedding, with 1, 2, ... threads, on the machine as it is and with CPU competitors running (one
busy process per core, standing in for the other jobs of a shared host). Prints a table and writes JSON.

    python scripts/bench_threads.py [--threads 1 2] [--photos 24] [--competitors N] [--out FILE]

Every configuration runs in a fresh process (torch's thread pool is sized once per process), with the models
loaded and warmed up before timing, on the same LFW photos. FaceNet runs randomly initialised weights (the
published ones cannot be downloaded here): the same computation, so its speed is representative. FAISS's
IVF training (OpenMP) is timed too, with its thread count set to the same number, for comparison.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("FACEDB_TEST_DATA", REPO.parent / "shared" / "facedata"))


def photos(n: int) -> list[Path]:
    """``n`` LFW photos, one per person, the same every run."""
    lfw = data_root() / "lfw_deepfunneled"
    if not lfw.is_dir():
        sys.exit(f"LFW not found at {lfw} (set FACEDB_TEST_DATA)")
    people = sorted(p for p in lfw.iterdir() if p.is_dir())
    return [sorted(p.glob("*.jpg"))[0] for p in people[:: max(1, len(people) // n)][:n]]


def summary(seconds: list[float]) -> dict[str, float]:
    s = sorted(seconds)
    return {"median_ms": 1000 * statistics.median(s), "mean_ms": 1000 * statistics.fmean(s),
            "p90_ms": 1000 * s[min(len(s) - 1, int(0.9 * len(s)))], "n": len(s)}


# ------------------------------------------------------------------------------------------------ the child
def child(args: argparse.Namespace) -> None:
    """Time each stage in this process, whose FACEDB_THREADS the parent set; print one JSON line."""
    import numpy as np
    import torch

    from facedb.faces.images import load_photo
    from facedb.faces.models import configure_threads, load_embedder
    from facedb.faces.models.facenet import model_id_for
    from facedb.faces.pipeline import get_detector

    detector = get_detector()  # applies FACEDB_THREADS
    threads = torch.get_num_threads()
    pics = [load_photo(p).pixels for p in photos(args.photos)]
    detector.detect(pics[0])  # warm up
    det, faces = [], []
    for px in pics:
        t = time.perf_counter()
        found = detector.detect(px)
        det.append(time.perf_counter() - t)
        if found:
            faces.append((px, max(found, key=lambda f: f.area)))
    out: dict[str, object] = {"threads": threads, "configured": configure_threads(), "detect": summary(det)}

    dlib = load_embedder("dlib-resnet")
    crops = [dlib.align(px, f) for px, f in faces]
    dlib.embed(crops[:1])
    times = []
    for c in crops:
        t = time.perf_counter()
        dlib.embed([c])
        times.append(time.perf_counter() - t)
    out["dlib_embed"] = summary(times)

    weights = Path(args.facenet_weights)
    facenet = load_embedder(model_id_for(weights, "facenet-vggface2"), weights=weights)
    crops = [facenet.align(px, f) for px, f in faces]
    facenet.embed(crops[:2])
    times = []
    for c in crops:  # one face at a time: a search or a door camera
        t = time.perf_counter()
        facenet.embed([c])
        times.append(time.perf_counter() - t)
    out["facenet_embed"] = summary(times)
    batch = (crops * 2)[:16]
    times = []
    for _ in range(3):  # batches of 16: enrolment
        t = time.perf_counter()
        facenet.embed(batch)
        times.append((time.perf_counter() - t) / len(batch))
    out["facenet_embed_batch16_per_face"] = summary(times)

    import faiss

    faiss.omp_set_num_threads(threads)
    x = np.random.default_rng(0).standard_normal((20_000, 128)).astype(np.float32)
    times = []
    for _ in range(2):
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(128), 128, 128, faiss.METRIC_INNER_PRODUCT)
        t = time.perf_counter()
        index.train(x[: 128 * 40])
        times.append(time.perf_counter() - t)
    out["faiss_ivf_train_5120x128"] = summary(times)
    print(json.dumps(out))


# ------------------------------------------------------------------------------------------------ the parent
def burn() -> None:  # pragma: no cover - a competitor process
    x = 0
    while True:
        x = (x * 1103515245 + 12345) % 2**31


def run_config(threads: int, busy: int, args: argparse.Namespace, weights: Path) -> dict[str, object]:
    ctx = multiprocessing.get_context("spawn")
    competitors = [ctx.Process(target=burn, daemon=True) for _ in range(busy)]
    for p in competitors:
        p.start()
    try:
        load_before = os.getloadavg()[0]
        env = {**os.environ, "FACEDB_THREADS": str(threads), "PYTHONPATH": str(REPO)}
        out = subprocess.run([sys.executable, __file__, "--child", "--photos", str(args.photos),
                              "--facenet-weights", str(weights)], capture_output=True, text=True, env=env,
                             check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result.update(facedb_threads=threads, competitors=busy, load_before=load_before,
                      load_after=os.getloadavg()[0])
        return result
    finally:
        for p in competitors:
            p.terminate()
            p.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="FACEDB_THREADS values to compare")
    ap.add_argument("--photos", type=int, default=24)
    ap.add_argument("--competitors", type=int, default=os.cpu_count() or 1,
                    help="busy processes in the 'competitor' runs (default: one per core)")
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "threads.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--facenet-weights", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    import torch
    from facenet_pytorch import InceptionResnetV1

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "random-facenet.pt"
        torch.manual_seed(0)
        torch.save(InceptionResnetV1(pretrained=None).state_dict(), weights)
        for busy in (0, args.competitors):
            for threads in args.threads:
                print(f"FACEDB_THREADS={threads}, {busy} competitor(s) ...", file=sys.stderr, flush=True)
                rows.append(run_config(threads, busy, args, weights))
    stages = ["detect", "dlib_embed", "facenet_embed", "facenet_embed_batch16_per_face", "faiss_ivf_train_5120x128"]
    print(f"\n{'threads':>7} {'competitors':>11} {'load':>5} " + " ".join(f"{s[:22]:>24}" for s in stages))
    for r in rows:
        cells = " ".join(f"{r[s]['median_ms']:>10.1f} (mean {r[s]['mean_ms']:>6.1f})" for s in stages)
        print(f"{r['facedb_threads']:>7} {r['competitors']:>11} {r['load_before']:>5.1f} {cells}")
    print("\nmilliseconds, median (mean) per photo / face / training run")
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "torch_default_threads": torch.get_num_threads()},
              "photos": args.photos, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
