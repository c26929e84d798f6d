"""Issue #25, finding 2, measured: how much memory and time a real `facedb serve` gives to clients that declare a
large body, send most of it and stall.

Eight connections at once declare 19 MiB, send 18 MiB (1 MiB at a time, as fast as the server takes it) and then
send nothing more; once without a key, once with a valid key. For each: how many bytes the server took before it
answered or closed the connection, how long each connection was held open (until the server closed it, capped at
``--hold`` seconds), and the worker's resident memory at its peak against before. JSON on stdout (and to
``--out``).

    python scripts/body_hold.py --out bench-results/body-hold.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from facedb import FaceDB  # noqa: E402
from facedb.testing.serving import wait_until_ready  # noqa: E402

MIB = 1024 * 1024


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def client(port: int, key: str | None, hold: float, out: dict) -> None:
    head = ["POST /v1/people/Ann/vectors HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
            f"Content-Length: {19 * MIB}"] + ([f"X-API-Key: {key}"] if key else [])
    start = time.monotonic()
    sent = 0
    answer = b""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        try:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
            chunk = b"[" * MIB
            for _ in range(18):
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the server answered and closed: the rest is not taken
        sock.settimeout(max(0.1, hold - (time.monotonic() - start)))
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except (TimeoutError, OSError):
            pass
    out.update(sent_mib=round(sent / MIB, 1), held_s=round(time.monotonic() - start, 2),
               status=answer.split(b"\r\n", 1)[0].decode(errors="replace") or "(none: still open)")


def measure(port: int, pid: int, key: str | None, hold: float) -> dict:
    before = rss_mib(pid)
    results: list[dict] = [{} for _ in range(8)]
    threads = [threading.Thread(target=client, args=(port, key, hold, r)) for r in results]
    for t in threads:
        t.start()
    peak = before
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss_mib(pid))
        time.sleep(0.05)
    return {"key": "valid" if key else "none", "rss_before_mib": round(before, 1), "rss_peak_mib": round(peak, 1),
            "rss_added_mib": round(peak - before, 1), "connections": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hold", type=float, default=60.0, help="stop waiting for the server after this (s)")
    ap.add_argument("--body-timeout", type=float, default=None, help="FACEDB_BODY_TIMEOUT for the server")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="body-hold-")) / "db"
    with FaceDB.create(root, model_id="vectors-only", dim=128, threshold=0.5) as db:
        key = db.create_api_key("enroll", "bench")[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if args.body_timeout is not None:
        env["FACEDB_BODY_TIMEOUT"] = str(args.body_timeout)
    proc = subprocess.Popen([sys.executable, "-m", "facedb.cli", "--db", str(root), "serve", "--port", str(port),
                             "--workers", "1", "--log-level", "warning"], env=env, cwd=str(REPO))
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", proc, timeout=60)
        out = {"load_average": os.getloadavg(), "body_timeout_s": args.body_timeout or "default",
               "runs": [measure(port, proc.pid, None, args.hold), measure(port, proc.pid, key, args.hold)]}
    finally:
        proc.terminate()
        proc.wait(30)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
