"""Vector identify through a real Milvus server: Strong vs Session consistency, and the first search after a
server restart. Writes JSON (bench-results/milvus-server.json by default).

Gallery: P people x T templates, synthetic unit vectors (the clustered data of facedb.testing.contracts), 128-d (the
offline models' dimension). Probes are enrolled templates' neighbours; the same probes go through a flat (exact,
in-process) database built from the same vectors, and every identity must agree.

    scripts/milvus_server.sh start plain
    .venv/bin/python scripts/bench_milvus_server.py --uri http://127.0.0.1:19530 [--restart plain]

``--restart NAME`` also restarts that server (scripts/milvus_server.sh restart NAME: same data; ``--restarts``
times) and, from the moment it is healthy again, times open -> the first answer (target <= 2 s: the store answers
by an exact search while the server cannot, facedb/gallery/standin.py), checks every answer against exact search
until Milvus answers again (and when that is), and the latency of the queries the store answered meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

import facedb.gallery.index.milvus as mv
from facedb import FaceDB
from facedb.testing.contracts import clustered

HERE = Path(__file__).resolve().parent


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.array(values) * 1e3, q)), 3)


def timed(db: FaceDB, probes: np.ndarray) -> tuple[list[float], list[str | None]]:
    times, names = [], []
    for p in probes:
        t = time.perf_counter()
        answer = db.identify(p, k=5)
        times.append(time.perf_counter() - t)
        names.append(answer.identity)
    return times, names


def restart(args: argparse.Namespace, root: Path, probes: np.ndarray, exact: list[str | None]) -> dict:
    """Restart the server, then from the moment it is healthy: open -> first answer, every answer checked against
    exact search while the store stands in, until Milvus answers; then 50 queries through Milvus."""
    for client in mv._CLIENTS.values():
        client.close()  # a new process's view
    mv._CLIENTS.clear()
    t = time.perf_counter()
    subprocess.run([str(HERE / "milvus_server.sh"), "restart", args.restart], check=True,
                   stdout=subprocess.DEVNULL)
    healthy_s = time.perf_counter() - t
    t = time.perf_counter()
    with FaceDB.open(root) as db:
        first = db.identify(probes[0], k=5).identity
        first_s = time.perf_counter() - t
        first_from_store = db.index_state().stand_in is not None
        meanwhile, wrong, i = [], 0, 1
        while db.index_state().stand_in is not None and time.perf_counter() - t < 600:
            q = time.perf_counter()
            name = db.identify(probes[i % len(probes)], k=5).identity
            meanwhile.append(time.perf_counter() - q)
            wrong += name != exact[i % len(probes)]
            i += 1
        back_s = time.perf_counter() - t
        later, names = timed(db, probes[:50])
    return {"restart_until_healthy_s": round(healthy_s, 1), "open_to_first_answer_s": round(first_s, 2),
            "first_answer_correct": first == exact[0], "first_answer_from_store": first_from_store,
            "milvus_answers_after_s": round(back_s, 1), "answers_from_store": len(meanwhile),
            "answers_from_store_wrong": int(wrong),
            "from_store_p50_ms": pct(meanwhile, 50) if meanwhile else None,
            "from_store_p99_ms": pct(meanwhile, 99) if meanwhile else None,
            "milvus_after_p50_ms": pct(later, 50), "milvus_after_correct": names == exact[:50],
            "load_average": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uri", default="http://127.0.0.1:19530")
    ap.add_argument("--people", type=int, default=2000)
    ap.add_argument("--per", type=int, default=5, help="templates per person")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--restart", metavar="NAME", help="also restart this scripts/milvus_server.sh instance")
    ap.add_argument("--restarts", type=int, default=2, help="how many restarts (--restart)")
    ap.add_argument("--levels", nargs="+", default=["Strong", "Session"], choices=["Strong", "Session"],
                    help="consistency levels to time identify at")
    ap.add_argument("--out", type=Path, default=Path("bench-results/milvus-server.json"))
    args = ap.parse_args()
    os.environ.pop(mv.URI_ENV, None)
    x, pids = clustered(np.random.default_rng(0), args.people, args.per, args.dim)
    rng = np.random.default_rng(1)
    pick = rng.choice(len(x), args.queries, replace=False)
    probes = x[pick] + rng.standard_normal((args.queries, args.dim)).astype(np.float32) * 0.02
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    res: dict[str, object] = {
        "uri": args.uri, "server": "milvus==2.3.5 (PyPI) standalone, etcd + RocksMQ embedded, same machine",
        "people": args.people, "templates": len(x), "dim": args.dim, "queries": args.queries, "k": 5,
        "index": "HNSW (facedb's default below 2M templates)",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at start"}
    people = [(f"p{p}", x[pids == p]) for p in np.unique(pids)]
    collection = f"bench_{secrets.token_hex(4)}"  # never another run's leftover
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:  # after each stage: a later stage's failure keeps what was measured
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        with FaceDB.create(Path(tmp) / "flat", model_id="synthetic", dim=args.dim, threshold=0.8,
                           index="flat") as flat:
            flat.configure_audit(enabled=False)
            flat.add_templates_many(people)
            flat_times, exact = timed(flat, probes)
        res["flat_in_process"] = {"p50_ms": pct(flat_times, 50), "p99_ms": pct(flat_times, 99)}
        root = Path(tmp) / "db"
        t = time.perf_counter()
        with FaceDB.create(root, model_id="synthetic", dim=args.dim, threshold=0.8, index="milvus",
                           index_options={"milvus_uri": args.uri, "milvus_collection": collection}) as db:
            db.configure_audit(enabled=False)
            db.add_templates_many(people)
            db.rebuild_index()
            res["build_s"] = round(time.perf_counter() - t, 2)
        levels = {}
        for level in args.levels * 2:  # interleaved: the machine's load drifts
            mv.SEARCH_CONSISTENCY = level
            with FaceDB.open(root) as db:
                timed(db, probes[:10])  # warm: the connection, the store's id map
                times, names = timed(db, probes)
            levels.setdefault(level, []).extend(times)
            assert names == exact, f"{level}: decisions differ from exact search"
        mv.SEARCH_CONSISTENCY = "Session"
        res["identify"] = {level: {"p50_ms": pct(v, 50), "p99_ms": pct(v, 99), "n": len(v)}
                           for level, v in levels.items()}
        res["decisions_identical_to_flat"] = True
        write()
        if args.restart:
            res["after_restart"] = [restart(args, root, probes, exact) for _ in range(args.restarts)]
            write()
        with FaceDB.open(root) as db:
            db.reindex("flat")  # drops the collection
    write()
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
