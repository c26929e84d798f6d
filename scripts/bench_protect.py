"""What template protection costs: plain against encrypted databases, on the product as users run it (audit trail
on, the default flat index unless --kind says otherwise).

At --n templates (default 100,000; 512-d face-like synthetic vectors from bench_search.py, 5 per person):
  * identify p50 / p99: one ``FaceDB.identify(probe, k=5)`` call end to end, after 100 untimed warm-up calls;
  * enrol throughput: ``add_templates`` one person (one photo's template) per call and per transaction, as
    ``enroll`` stores them, and bulk ``add_templates_many`` (10,000 people per transaction);
And the cost of projecting one probe for cancellable templates (``--cancellable``).
At each --open-sizes (default 100,000 and 1,000,000):
  * open time: ``FaceDB.open`` + the first answer (the index loaded from its file: plain + SHA-256 check, or
    AES-256-GCM decrypted into memory), and the alternative of not persisting the index at all for an encrypted
    database (rebuilt from the SQLCipher store at every open);
  * the cost of a removal (``remove_person``, 5 templates): in a process that has the index loaded (a service),
    and in a fresh process as ``facedb remove`` runs it (open, load, remove, rewrite the index file, close).
    Both include the erasure: index file rewritten, WAL truncated.

Prints a table and writes JSON (default bench-results/protect.json). On a busy machine the figures are
provisional: say so when you quote them.

    python scripts/bench_protect.py --n 100000 --open-sizes 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_search import synth  # the same face-like generator

from facedb import FaceDB
from facedb.protection.keyring import generate_key

DIM = 512


def build(root: Path, templates: np.ndarray, key: str | None, kind: str) -> float:
    """A database of ``templates`` ((people, 5, dim)), bulk-added; returns templates per second."""
    people = len(templates)
    t = time.perf_counter()
    with FaceDB.create(root, model_id="bench", dim=DIM, threshold=0.5, index=kind, key=key) as db:
        for start in range(0, people, 10_000):
            db.add_templates_many([(f"p{i}", templates[i]) for i in range(start, min(people, start + 10_000))])
        db.identify(templates[0, 0])  # builds the index; saved on close
    return people * 5 / (time.perf_counter() - t)


def open_time(root: Path, key: str | None, probe: np.ndarray, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        db = FaceDB.open(root, key=key)
        db.identify(probe)
        best = min(best, time.perf_counter() - t)
        db.close(save_index=False)
    return best


def rebuild_open_time(root: Path, key: str | None, probe: np.ndarray) -> float:
    """Open + first answer with no persisted index (what "not persisted, rebuilt at open" would cost)."""
    copy = root.parent / (root.name + "-noindex")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(root, copy)
    (copy / "index.faiss").unlink()
    t = time.perf_counter()
    db = FaceDB.open(copy, key=key)
    db.identify(probe)
    took = time.perf_counter() - t
    db.close(save_index=False)
    shutil.rmtree(copy, ignore_errors=True)
    return took


def identify_latency(roots: dict[str, tuple[Path, str | None]], probes: np.ndarray, warm: np.ndarray
                     ) -> dict[str, tuple[float, float]]:
    """p50 / p99 ms of ``identify(probe, k=5)`` for each database, measured interleaved (plain, encrypted,
    plain, ...) so that other load on the machine falls on both alike."""
    dbs = {mode: FaceDB.open(root, key=key) for mode, (root, key) in roots.items()}
    try:
        for db in dbs.values():
            for v in warm:
                db.identify(v)
        times: dict[str, list[float]] = {mode: [] for mode in dbs}
        for i, v in enumerate(probes):
            order = list(dbs) if i % 2 == 0 else list(reversed(list(dbs)))
            for mode in order:
                t = time.perf_counter()
                dbs[mode].identify(v, k=5)
                times[mode].append(time.perf_counter() - t)
    finally:
        for db in dbs.values():
            db.close(save_index=False)
    out = {}
    for mode, ts in times.items():
        ms = np.array(ts) * 1e3
        out[mode] = (float(np.percentile(ms, 50)), float(np.percentile(ms, 99)))
    return out


def enrol_rate(roots: dict[str, tuple[Path, str | None]], count: int) -> dict[str, float]:
    """Single-template enrolments per second (one person and one transaction each, as ``enroll`` stores a
    photo), interleaved in blocks of 10 between the databases."""
    vecs = np.random.default_rng(7).standard_normal((count, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    dbs = {mode: FaceDB.open(root, key=key) for mode, (root, key) in roots.items()}
    spent = dict.fromkeys(dbs, 0.0)
    try:
        for db in dbs.values():
            db.identify(vecs[0])  # index loaded, as in a running service
        for start in range(0, count, 10):
            for mode, db in dbs.items():
                t = time.perf_counter()
                for i in range(start, min(count, start + 10)):
                    db.add_templates(f"new{i}", vecs[i], create=True)
                spent[mode] += time.perf_counter() - t
    finally:
        for db in dbs.values():
            db.close(save_index=False)
    return {mode: count / s for mode, s in spent.items()}


def removal_costs(root: Path, key: str | None, victims: list[str]) -> dict[str, float]:
    """Seconds per ``remove_person``: in a process with the index loaded, and as a fresh CLI process does."""
    loaded = []
    with FaceDB.open(root, key=key) as db:
        db.identify(np.eye(DIM, dtype=np.float32)[0])
        for name in victims[:2]:
            t = time.perf_counter()
            db.remove_person(name)
            loaded.append(time.perf_counter() - t)
    fresh = []
    for name in victims[2:4]:
        t = time.perf_counter()
        with FaceDB.open(root, key=key) as db:
            db.remove_person(name)
        fresh.append(time.perf_counter() - t)
    return {"remove_loaded_s": float(np.median(loaded)), "remove_fresh_process_s": float(np.median(fresh))}


def projection_cost(reps: int = 2000) -> float:
    """Microseconds to project one probe (``--cancellable``), median over ``reps``."""
    from facedb.protection.projection import Projection, new_seed

    project = Projection(new_seed(), DIM)
    probe = np.random.default_rng(0).standard_normal((1, DIM)).astype(np.float32)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        project(probe)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="templates for latency and enrolment")
    ap.add_argument("--open-sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--kind", default="flat", help="index kind (default flat, the product's default)")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--enrol", type=int, default=500, help="single-template enrolments timed")
    ap.add_argument("--work", type=Path, default=None, help="where to build the databases (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=Path("bench-results/protect.json"))
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="facedb-bench-protect-"))
    work.mkdir(parents=True, exist_ok=True)
    key = generate_key()
    results: dict[str, object] = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                                  "load_average": os.getloadavg(), "kind": args.kind, "dim": DIM, "rows": []}
    rows: list[dict[str, object]] = results["rows"]  # type: ignore[assignment]
    sizes = sorted(set(args.open_sizes) | {args.n})
    for n in sizes:
        templates, _truth, genuine, impostor = synth(n, DIM, args.queries)
        probes = np.concatenate([genuine, impostor])
        roots = {mode: (work / f"{mode}-{n}", k) for mode, k in (("plain", None), ("encrypted", key))}
        found: dict[str, dict[str, object]] = {}
        for mode, (root, k) in roots.items():
            shutil.rmtree(root, ignore_errors=True)
            row: dict[str, object] = {"n": n, "mode": mode}
            row["bulk_add_templates_per_s"] = round(build(root, templates, k, args.kind))
            row["store_bytes"] = (root / "facedb.sqlite3").stat().st_size
            row["index_file_bytes"] = (root / "index.faiss").stat().st_size
            found[mode] = row
        for _ in range(2):  # alternating, best of each
            for mode, (root, k) in roots.items():
                took = open_time(root, k, probes[0], reps=1)
                found[mode]["open_s"] = round(min(float(found[mode].get("open_s", took)), took), 3)
        found["encrypted"]["open_rebuilt_s"] = round(rebuild_open_time(*roots["encrypted"], probes[0]), 3)
        if n == args.n:
            warm = templates[np.arange(100) % len(templates), 1]
            for mode, (p50, p99) in identify_latency(roots, probes, warm).items():
                found[mode].update(identify_p50_ms=round(p50, 3), identify_p99_ms=round(p99, 3))
            for mode, rate in enrol_rate(roots, args.enrol).items():
                found[mode]["enrol_templates_per_s"] = round(rate, 1)
        for mode, (root, k) in roots.items():
            found[mode].update({k2: round(v, 3) for k2, v in removal_costs(root, k, [f"p{i}" for i in (3, 5, 7, 9)]
                                                                           ).items()})
            rows.append(found[mode])
            print(json.dumps(found[mode]), flush=True)
            shutil.rmtree(root, ignore_errors=True)
    by = {(r["n"], r["mode"]): r for r in rows}
    print(f"\nkind {args.kind}, {DIM}-d, audit trail on; {results['cpus']} CPUs, load average "
          f"{results['load_average'][0]:.1f}")
    head = ("N", "mode", "identify p50 ms", "p99 ms", "enrol/s", "bulk add/s", "open s", "open (rebuild) s",
            "remove (loaded) s", "remove (fresh) s")
    print(" | ".join(head))
    for n in sizes:
        for mode in ("plain", "encrypted"):
            r = by[(n, mode)]
            print(" | ".join(str(r.get(c, "-")) for c in (
                "n", "mode", "identify_p50_ms", "identify_p99_ms", "enrol_templates_per_s", "bulk_add_templates_per_s",
                "open_s", "open_rebuilt_s", "remove_loaded_s", "remove_fresh_process_s")))
        p, e = by[(n, "plain")], by[(n, "encrypted")]
        cost = {"n": n, "open_overhead": round(float(e["open_s"]) / float(p["open_s"]) - 1, 3)}
        if "identify_p50_ms" in p:
            cost["identify_p50_overhead"] = round(float(e["identify_p50_ms"]) / float(p["identify_p50_ms"]) - 1, 3)
            cost["enrol_overhead"] = round(1 - float(e["enrol_templates_per_s"]) / float(p["enrol_templates_per_s"]),
                                           3)
        results.setdefault("overheads", []).append(cost)  # type: ignore[union-attr]
        print(f"  encryption costs at {n:,}: {cost}")
    results["projection_us_per_probe"] = round(projection_cost(), 1)
    print(f"  cancellable templates: {results['projection_us_per_probe']} us per probe for the {DIM}x{DIM} projection")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
