"""A Milvus server killed (or stopped gracefully) while a door asks questions: what the queries get.

Starts a server of its own (``scripts/milvus_server.sh start NAME --proxy-port PORT``: its own data, etcd ports
chosen by the script), enrols ``--people`` people x 3 synthetic 128-d templates in a facedb database whose index
is there, and identifies a stored template every 50 ms on a thread, as a door's service would. After 3 s the
server is killed with SIGKILL (``milvus_server.sh kill``), and restarted on the same data ``--down`` seconds
later; the loop goes on until Milvus answers again. Reported: answers after the kill (right / wrong / errors: the
query in flight at the kill included), the longest query after it, when the first answer came from the store
(the stand-in, ``facedb/gallery/standin.py``) after the kill, and when Milvus answered again after the restart
began. ``--graceful``: the server is stopped with ``milvus_server.sh stop`` instead (SIGTERM, up to 60 s of
its own shutdown, during which it still opens the collection but no longer searches), then restarted; also
reported: how many answers took over 0.5 s. JSON to ``--out``.

    python scripts/milvus_kill_under_queries.py --out bench-results/milvus-kill-under-queries.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from facedb import FaceDB


def server(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["scripts/milvus_server.sh", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="killtest")
    ap.add_argument("--port", type=int, default=20730)
    ap.add_argument("--people", type=int, default=2000)
    ap.add_argument("--down", type=float, default=15.0, help="seconds the server stays down")
    ap.add_argument("--graceful", action="store_true", help="stop the server gracefully instead of killing it")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    started = server("start", args.name, "--proxy-port", str(args.port))
    if started.returncode:
        raise SystemExit(f"the server did not start: {started.stderr.strip()}")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3 * args.people, 128)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    log: list[dict] = []
    stop = threading.Event()
    with tempfile.TemporaryDirectory() as tmp:
        db = FaceDB.create(Path(tmp) / "db", model_id="synthetic", dim=128, threshold=0.5, index="milvus",
                           index_options={"milvus_uri": f"http://127.0.0.1:{args.port}",
                                          "milvus_collection": args.name})
        try:
            db.add_templates_many([(f"p{i}", x[3 * i:3 * i + 3]) for i in range(args.people)])
            db.identify(x[0], k=3)

            def door() -> None:
                i = 0
                while not stop.is_set():
                    t, j = time.time(), i % len(x)
                    try:
                        ok, err = db.identify(x[j], k=3).identity == f"p{j // 3}", None
                    except Exception as exc:  # what the door would see: recorded, the loop goes on
                        ok, err = False, f"{type(exc).__name__}: {str(exc)[:100]}"
                    log.append({"t": t, "dt": time.time() - t, "ok": ok, "err": err,
                                "stand_in": db.index_state().stand_in is not None})
                    i += 1
                    time.sleep(0.05)

            thread = threading.Thread(target=door)
            thread.start()
            time.sleep(3)
            t_kill = time.time()
            server("stop" if args.graceful else "kill", args.name)  # stop returns once the server is gone
            time.sleep(args.down)
            t_restart = time.time()
            server("restart", args.name)
            t_up = time.time()
            deadline = t_up + 120
            while time.time() < deadline and not (log[-1]["t"] > t_up and not log[-1]["stand_in"]):
                time.sleep(0.5)
            stop.set()
            thread.join()
        finally:
            db.close()
            server("stop", args.name)
    after = [e for e in log if e["t"] + e["dt"] >= t_kill]
    errors = [e for e in after if e["err"]]
    first_store = next((e for e in after if e["stand_in"] and e["ok"]), None)
    back = next((e for e in log if e["t"] > t_up and not e["stand_in"] and e["ok"]), None)
    result = {
        "people": args.people, "templates": len(x), "down_s": args.down, "load_average": os.getloadavg(),
        "answers": len(log), "answers_after_kill": len(after),
        "right_after_kill": sum(e["ok"] for e in after),
        "wrong_after_kill": sum(1 for e in after if not e["ok"] and not e["err"]),
        "errors_after_kill": len(errors), "error_samples": [e["err"] for e in errors[:3]],
        "longest_query_after_kill_s": max(e["dt"] for e in after),
        "answers_over_half_a_second": sum(1 for e in after if e["dt"] > 0.5),
        "graceful": args.graceful, "stopped_for_s": t_restart - t_kill,
        "first_store_answer_after_kill_s": first_store["t"] + first_store["dt"] - t_kill if first_store else None,
        "milvus_again_after_restart_began_s": back["t"] - t_restart if back else None,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
