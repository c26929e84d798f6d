"""Vector identify through a real Milvus server: Strong vs Session consistency, and the first search after a
server restart. Writes JSON (bench-results/milvus-server.json by default).

Gallery: P people x T templates, synthetic unit vectors (the clustered data of facedb.testing.contracts), 128-d (the
offline models' dimension). Probes are enrolled templates' neighbours; the same probes go through a flat (exact,
in-process) database built from the same vectors, and every identity must agree.

    scripts/milvus_server.sh start plain
    .venv/bin/python scripts/bench_milvus_server.py --uri http://127.0.0.1:19530 [--restart plain]

``--restart NAME`` also restarts that server twice (scripts/milvus_server.sh restart NAME: same data) and times
the first answer after each: opening while waiting for the server to load the collection, and with the default
FACEDB_MILVUS_LOAD_WAIT_S (IndexLoadingError, retried every second).
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
from facedb.errors import IndexLoadingError
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uri", default="http://127.0.0.1:19530")
    ap.add_argument("--people", type=int, default=2000)
    ap.add_argument("--per", type=int, default=5, help="templates per person")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--restart", metavar="NAME", help="also restart this scripts/milvus_server.sh instance")
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
        for level in ("Strong", "Session", "Strong", "Session"):  # interleaved: the machine's load drifts
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
            res["after_restart"] = {}
            # Twice: opening waits as long as the server loads (what facedb did before: load_collection, blocking),
            # then with the default FACEDB_MILVUS_LOAD_WAIT_S, retrying every second after each IndexLoadingError.
            for label, wait in (("wait_until_loaded", "600"), ("default_load_wait", "")):
                for client in mv._CLIENTS.values():
                    client.close()  # a new process's view, and no connection left in TIME_WAIT on the server
                mv._CLIENTS.clear()
                subprocess.run([str(HERE / "milvus_server.sh"), "restart", args.restart], check=True,
                               stdout=subprocess.DEVNULL)
                os.environ[mv.LOAD_WAIT_ENV] = wait
                t = time.perf_counter()
                refusals, first_refusal = 0, None
                while True:
                    try:
                        with FaceDB.open(root) as db:
                            name = db.identify(probes[0], k=5).identity
                            answered = time.perf_counter() - t
                            later, _ = timed(db, probes[:50])
                        break
                    except IndexLoadingError:
                        refusals += 1
                        first_refusal = first_refusal or time.perf_counter() - t
                        time.sleep(1.0)
                res["after_restart"][label] = {
                    "load_wait_s": float(wait or mv.LOAD_WAIT_S), "open_to_first_answer_s": round(answered, 2),
                    "first_IndexLoadingError_s": None if first_refusal is None else round(first_refusal, 2),
                    "IndexLoadingErrors": refusals, "first_correct": name == exact[0],
                    "next_50_p50_ms": pct(later, 50)}
                write()
            os.environ.pop(mv.LOAD_WAIT_ENV, None)
        with FaceDB.open(root) as db:
            db.reindex("flat")  # drops the collection
    write()
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
