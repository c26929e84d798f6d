"""A fault drill for the milvus index kind on a real server (issue #26): the server is killed (SIGKILL to the milvus
process, ``scripts/milvus_server.sh kill``) in the middle of an enrolment, a removal and a rebuild, each run by a
separate facedb process, then restarted on the same data. After each restart it checks that nothing acknowledged
is lost (every template the writer's call returned for is in the store and, once facedb has opened the collection
again, in the collection, and identifies its person), nothing removed comes back (no acknowledged removal's id is
in the collection or answered), and ``check`` passes. What facedb does to recover is its ordinary open: the
store is the truth; the open replays the change log from the generation the collection records, or diffs ids.

Bounded by work, not by time: each phase kills the server after a given number of acknowledged writes (the
rebuild: once its new collection exists), and the writer stops at its first error. Only the waits for the server
itself (health, its collection loading after a restart: ~30-50 s on a 2.3 server) are bounded by time.

It starts its own server (``--name``, ports 19930 and up, data under ``--run-dir``) and stops it at the end, so a
shared server (CI's) is never touched::

    .venv/bin/python scripts/milvus_drill.py --people 200 --out bench-results/milvus-drill.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "scripts" / "milvus_server.sh"
DIM = 128
COLLECTION = "drill"
#: Ports far from the defaults (19530, CI's second server at 19630): proxy, internal proxy, etcd (and etcd + 1),
#: coordinators and nodes.
PORTS = {"--proxy-port": 19930, "--proxy-internal-port": 19929, "--etcd-port": 2879, "--root-coord-port": 53600,
         "--query-coord-port": 19931, "--query-node-port": 21623, "--index-node-port": 21621,
         "--index-coord-port": 23430, "--data-coord-port": 13833, "--data-node-port": 21624}


def server(cmd: str, name: str, run_dir: str, *args: str) -> str:
    env = {**os.environ, "MILVUS_RUN": run_dir}
    got = subprocess.run([str(SERVER), cmd, name, *args], env=env, capture_output=True, text=True, check=False)
    if got.returncode != 0:
        raise SystemExit(f"milvus_server.sh {cmd} {name} failed: {got.stderr.strip()}")
    return got.stdout.strip()


def gallery(people: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from facedb.testing.contracts import clustered

    return clustered(np.random.default_rng(seed), people, 3, DIM)


# ------------------------------------------------------------------------------------------ the writer (child)
def child(args: argparse.Namespace) -> int:
    """One facedb process doing one phase's writes, printing each acknowledged one (flushed) as it returns."""
    from facedb import FaceDB

    warnings.simplefilter("ignore")
    x, pids = gallery(args.people)
    names = [f"p{p}" for p in np.unique(pids)]
    with FaceDB.open(args.db) as db:
        try:
            if args.child == "enrol":
                for p in np.unique(pids)[args.start:args.start + args.count]:
                    with warnings.catch_warnings():
                        warnings.simplefilter("error")  # an IndexBehindWarning: stored, engine behind: stop here
                        db.add_templates(f"p{p}", x[pids == p], create=True)
                    print(f"ack p{p}", flush=True)
            elif args.child == "remove":
                for name in names[args.start:args.start + args.count]:
                    with warnings.catch_warnings():
                        warnings.simplefilter("error")
                        db.remove_person(name)
                    print(f"ack {name}", flush=True)
            elif args.child == "rebuild":
                print(f"ack rebuilt {db.rebuild_index()}", flush=True)
        except Exception as exc:  # the server died under it: the drill expects this; say what the caller saw
            print(f"error {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
            return 1
    return 0


# ------------------------------------------------------------------------------------------------ the drill
def wait_ready(db_path: Path, probe: np.ndarray, expected: str, bound_s: float) -> dict:
    """Open the database once the server is healthy again and identify ``probe`` (a template of ``expected``)
    until Milvus itself answers: while the restarted server cannot (it serves its collections ~30 s later), the
    store answers by an exact search (``index_state().stand_in``). Returns when the first answer came and whether
    it was right and from the store, when Milvus answered again, and whether every answer meanwhile was right."""
    from facedb import FaceDB
    from facedb.errors import IndexUnavailableError

    t0 = time.monotonic()
    out: dict = {"first_answer_s": None, "first_answer_right": None, "first_from_store": None,
                 "answers_meanwhile": 0, "all_right": True, "errors": 0, "last_error": ""}
    while True:
        try:
            with FaceDB.open(db_path) as db:
                while time.monotonic() - t0 <= bound_s:
                    right = db.identify(probe, k=1).identity == expected
                    from_store = db.index_state().stand_in is not None
                    if out["first_answer_s"] is None:
                        out.update(first_answer_s=round(time.monotonic() - t0, 2), first_answer_right=right,
                                   first_from_store=from_store)
                    out["answers_meanwhile"] += 1
                    out["all_right"] = out["all_right"] and right
                    if not from_store:
                        out["milvus_answers_s"] = round(time.monotonic() - t0, 1)
                        return out
                    time.sleep(0.5)
        except IndexUnavailableError as exc:  # one the store cannot stand in for: an error, never an answer
            out["errors"] += 1
            out["last_error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            time.sleep(1.0)
        if time.monotonic() - t0 > bound_s:
            raise SystemExit(f"Milvus not answering {bound_s:g} s after the restart: {out}")


def verify(db_path: Path, uri: str, x: np.ndarray, pids: np.ndarray, acked_in: set[str],
           acked_out: set[str]) -> dict:
    """The outcome after a restart: what the store, the collection and facedb's answers say."""
    from pymilvus import MilvusClient

    from facedb import FaceDB

    client = MilvusClient(uri)
    with FaceDB.open(db_path) as db:
        _, ids, _ = db.store.template_map()
        stored = {p.name for p in db.people()}
        lost = sorted(n for n in acked_in if n not in stored)
        back = sorted(n for n in acked_out if n in stored)
        wrong = []
        for p in np.unique(pids):
            name = f"p{p}"
            if name in acked_in or name in acked_out:
                answer = db.identify(x[pids == p][0], k=1).identity
                if (name in acked_in and answer != name) or (name in acked_out and answer == name):
                    wrong.append((name, answer))
        report = db.check()
        rows = []
        it = client.query_iterator(COLLECTION, batch_size=16384, filter="", output_fields=["id"],
                                   consistency_level="Strong")
        while batch := it.next():
            rows += [int(r["id"]) for r in batch]
        it.close()
        removed = db.store.removed_template_ids()
        physical = client.list_collections()
    held = np.array(sorted(rows), dtype=np.int64)
    return {"acknowledged_added": len(acked_in), "acknowledged_removed": len(acked_out),
            "lost": lost, "removed_came_back": back, "wrong_answers": wrong,
            "store_templates": len(ids), "collection_templates": len(held),
            "collection_equals_store": bool(np.array_equal(held, ids)),
            "removed_ids_in_collection": int(np.isin(removed, held).sum()),
            "check_ok": report.ok, "check_problems": report.problems,
            "collections_on_server": physical}


def phase(name: str, args: argparse.Namespace, db_path: Path, uri: str, kill_after: int, **child_args: int) -> dict:
    """Run the writer, kill the server after ``kill_after`` acknowledgements (rebuild: once the new collection
    exists), let the writer fail, restart the server: (acknowledged items, the writer's last line, timings)."""
    from pymilvus import MilvusClient

    cmd = [sys.executable, __file__, "--child", name, "--db", str(db_path), "--people", str(args.people)]
    for k, v in child_args.items():
        cmd += [f"--{k}", str(v)]
    log = open(Path(args.run_dir) / f"{args.name}-{name}-writer.log", "w")  # pymilvus's retries, tracebacks
    writer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
    acked: list[str] = []
    killed = False
    lines: list[str] = []
    if name == "rebuild":
        client = MilvusClient(uri)
        before = set(client.list_collections())
        while writer.poll() is None and not (set(client.list_collections()) - before):
            time.sleep(0.02)
        if writer.poll() is None:
            server("kill", args.name, args.run_dir)
            killed = True
    assert writer.stdout is not None
    for line in writer.stdout:
        lines.append(line.strip())
        if line.startswith("ack "):
            acked.append(line.split()[1])
            if len(acked) == kill_after and not killed:
                server("kill", args.name, args.run_dir)
                killed = True
    writer.wait()
    log.close()
    t0 = time.monotonic()
    server("restart", args.name, args.run_dir)
    healthy_s = time.monotonic() - t0
    return {"acked": acked, "killed": killed, "writer_exit": writer.returncode,
            "writer_last": lines[-1] if lines else "", "healthy_after_restart_s": round(healthy_s, 1)}


def drill(args: argparse.Namespace) -> dict:
    from facedb import FaceDB

    x, pids = gallery(args.people)
    people = np.unique(pids)
    base = len(people) // 2
    result: dict = {"people": int(len(people)), "templates_per_person": 3, "dim": DIM,
                    "load_average": os.getloadavg(), "phases": {}}
    args_list = [a for kv in PORTS.items() for a in (kv[0], str(kv[1]))]
    if args.session_ttl:
        args_list += ["--extra-config", f"common.session.ttl={args.session_ttl}"]
    result["session_ttl_s"] = args.session_ttl or 30
    uri = server("start", args.name, args.run_dir, *args_list)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            db_path = Path(tmp) / "db"
            db = FaceDB.create(db_path, model_id="synthetic", dim=DIM, threshold=0.8, index="milvus",
                               index_options={"milvus_uri": uri, "milvus_collection": COLLECTION})
            db.configure_audit(enabled=False)
            db.add_templates_many([(f"p{p}", x[pids == p]) for p in people[:base]])
            db.close()
            acked_in = {f"p{p}" for p in people[:base]}
            acked_out: set[str] = set()
            plan = [("enrol", {"start": base, "count": len(people) - base}, args.kill_after),
                    ("remove", {"start": 0, "count": base // 2}, args.kill_after),
                    ("rebuild", {}, 0)]
            stays = people[base - 1]  # enrolled at the start, never removed: the probe after each restart
            for name, child_args, kill_after in [p for p in plan if p[0] in args.kills]:
                run = phase(name, args, db_path, uri, kill_after, **child_args)
                if name == "enrol":
                    acked_in |= set(run["acked"])
                elif name == "remove":
                    acked_out |= set(run["acked"])
                    # the removal in flight when the server died was never acknowledged: it may or may not have
                    # reached the store, so it is held to neither side
                    in_flight = [f"p{p}" for p in people[len(run["acked"]):len(run["acked"]) + 1]]
                    acked_in -= set(run["acked"]) | set(in_flight)
                    run["in_flight"] = in_flight
                run["after_restart"] = wait_ready(db_path, x[pids == stays][0], f"p{stays}", args.ready_bound_s)
                run["outcome"] = verify(db_path, uri, x, pids, acked_in, acked_out)
                if name == "rebuild":  # `check` lists the killed rebuild's collection; its remedy, then again
                    run["leftover_listed"] = bool(run["outcome"]["check_problems"]) and all(
                        "left by a rebuild" in p for p in run["outcome"]["check_problems"])
                    with FaceDB.open(db_path) as db:
                        db.rebuild_index()
                    run["after_rebuild_index"] = verify(db_path, uri, x, pids, acked_in, acked_out)
                run["acked"] = len(run["acked"])
                result["phases"][name] = run
                print(json.dumps({name: run}), flush=True)
    finally:  # a disposable server: killed, not stopped gracefully (that took ~60 s, and nothing is kept)
        try:
            server("kill", args.name, args.run_dir)
        except SystemExit:
            pass  # not running
        server("stop", args.name, args.run_dir)
    result["passed"] = bool(result["phases"]) and all(passed(p) for p in result["phases"].values())
    return result


def passed(p: dict) -> bool:
    """One phase's verdict: nothing lost, nothing removed back, the collection is the store's, the answers after
    the restart right, and `check` passing (after a killed rebuild: listing its leftover collection, and passing
    once `facedb rebuild-index`, the remedy it names, has run)."""
    outcome = p.get("after_rebuild_index", p["outcome"])
    return (not outcome["lost"] and not outcome["removed_came_back"] and not outcome["wrong_answers"]
            and outcome["check_ok"] and outcome["collection_equals_store"] and p["killed"]
            and not p["outcome"]["lost"] and not p["outcome"]["removed_came_back"]
            and p["outcome"]["collection_equals_store"] and p.get("leftover_listed", p["outcome"]["check_ok"])
            and len(outcome["collections_on_server"]) == 1
            and p["after_restart"]["first_answer_right"] and p["after_restart"]["all_right"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--people", type=int, default=200, help="people in the drill (3 templates each)")
    ap.add_argument("--kill-after", type=int, default=10, help="acknowledged writes before the server is killed")
    ap.add_argument("--kills", nargs="+", choices=["enrol", "remove", "rebuild"],
                    default=["enrol", "remove", "rebuild"], help="the phases to run (a server kill each)")
    ap.add_argument("--session-ttl", type=int, default=0,
                    help="the server's common.session.ttl in seconds (default: Milvus's 30): how long a restarted "
                         "server waits for its killed predecessor's sessions to expire before it serves")
    ap.add_argument("--name", default="drill", help="the server instance's name (scripts/milvus_server.sh)")
    ap.add_argument("--run-dir", default=os.environ.get("MILVUS_RUN", str(ROOT / ".milvus-run")),
                    help="where the instance keeps its data (MILVUS_RUN)")
    ap.add_argument("--ready-bound-s", type=float, default=300.0, help="give up waiting for the restarted server")
    ap.add_argument("--out", help="write the result as JSON here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    result = drill(args)
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
