"""How long identify takes as the gallery grows (exact flat index), on synthetic unit vectors.

Data: P = N/5 people x 5 templates, 512-d. Each person has a random centre; templates are the centre plus
Gaussian noise, renormalised (same-person cosine ~0.7, different-person ~0). Probes are fresh noisy draws
around enrolled centres (genuine) and random vectors (impostors). Prints a table and writes JSON.

    python scripts/bench_identify.py --n 100000
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from facedb import FaceDB


def synth(n: int, dim: int, per_person: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    people = n // per_person
    centres = rng.standard_normal((people, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = rng.standard_normal((people, per_person, dim)).astype(np.float32) * (0.65 / np.sqrt(dim))
    x = centres[:, None, :] + noise
    x /= np.linalg.norm(x, axis=2, keepdims=True)
    return centres, x


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1e3, q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="templates")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("bench-results/identify.json"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    centres, templates = synth(args.n, args.dim, 5, rng)
    people = len(centres)
    res: dict[str, object] = {"n_templates": people * 5, "people": people, "dim": args.dim,
                              "machine": f"{platform.machine()}, {platform.processor() or ''} "
                                         f"{__import__('os').cpu_count()} cores"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "db"
        t = time.perf_counter()
        with FaceDB.create(root, model_id="synthetic", dim=args.dim, threshold=0.5) as db:
            for start in range(0, people, 5000):
                db.add_templates_many([(f"p{i}", templates[i]) for i in range(start, min(people, start + 5000))])
            res["import_s"] = time.perf_counter() - t
            t = time.perf_counter()
            db.rebuild_index()
            res["build_and_save_index_s"] = time.perf_counter() - t
        t = time.perf_counter()
        db = FaceDB.open(root)
        db.identify(centres[0], k=5)
        res["open_and_load_index_s"] = time.perf_counter() - t
        probes = centres[rng.choice(people, args.queries)] + rng.standard_normal(
            (args.queries, args.dim)).astype(np.float32) * (0.65 / np.sqrt(args.dim))
        probes /= np.linalg.norm(probes, axis=1, keepdims=True)
        single = []
        for q in probes:
            t = time.perf_counter()
            db.identify(q, k=5)
            single.append(time.perf_counter() - t)
        res["identify_p50_ms"], res["identify_p99_ms"] = pct(single, 50), pct(single, 99)
        t = time.perf_counter()
        for start in range(0, len(probes), 64):
            db.identify(probes[start:start + 64], k=5)
        res["identify_batch64_qps"] = len(probes) / (time.perf_counter() - t)
        ver = []
        for i, q in enumerate(probes[:100]):
            t = time.perf_counter()
            db.verify(q, f"p{i}")
            ver.append(time.perf_counter() - t)
        res["verify_p50_ms"] = pct(ver, 50)
        t = time.perf_counter()
        report = db.check()
        res["check_s"] = time.perf_counter() - t
        res["check_ok"] = report.ok
        res["index_file_mb"] = (root / "index.faiss").stat().st_size / 1e6
        res["store_file_mb"] = (root / "facedb.sqlite3").stat().st_size / 1e6
        db.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    width = max(len(k) for k in res)
    for k, v in res.items():
        print(f"{k.ljust(width)}  {v:.3f}" if isinstance(v, float) else f"{k.ljust(width)}  {v}")


if __name__ == "__main__":
    main()
