"""Request heads against a real server, uvicorn's own httptools protocol vs facedb's bounded subclass
(facedb/service/protocol.py; issue #25, second pass, finding 1): what one keyless client sending a single header
line of up to ``--mib`` MiB makes the server hold (its resident memory before and after, and the answer), whether
an idle connection is closed, and what the subclass costs per request (/health over one kept-alive connection,
p50 and p99 in ms, the same app and parser either way).

    python scripts/head_hold.py                # 128 MiB line, 2000 requests; writes bench-results/head-hold.json

Everything goes to 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from facedb.testing.serving import wait_until_ready

REPO = Path(__file__).resolve().parents[1]
PROTOCOLS = {"httptools": "httptools", "bounded": "facedb.service.protocol:BoundedHttpToolsProtocol"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_line(port: int, mib: int) -> tuple[str, int]:
    """Send a GET whose one header line grows to ``mib`` MiB; (the answer's status line, bytes sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Junk: ")
            for _ in range(mib * 16):
                sock.sendall(b"Z" * 65536)
                sent += 65536
            sock.sendall(b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return data.split(b"\r\n", 1)[0].decode("latin-1") or "(closed, no answer)", sent


def idle_closed(port: int, wait: float) -> bool:
    """Whether a connection that sends nothing is closed by the server within ``wait`` seconds."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        try:
            return sock.recv(1) == b""
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True


def run(protocol: str, db: Path, args: argparse.Namespace) -> dict:
    port = free_port()
    env = {**os.environ, "FACEDB_DB": str(db), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "facedb.service.app:app_from_env", "--factory",
                             "--http", PROTOCOLS[protocol], "--port", str(port), "--log-level", "warning"],
                            env=env, cwd=str(REPO), start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, proc, timeout=60)
        times = []
        with httpx.Client() as client:
            for _ in range(50):
                client.get(f"{base}/health")
            for _ in range(args.requests):
                t0 = time.perf_counter()
                client.get(f"{base}/health")
                times.append((time.perf_counter() - t0) * 1000)
        before = rss_mib(proc.pid)
        status, sent = one_line(port, args.mib)
        after = rss_mib(proc.pid)
        closed = idle_closed(port, args.idle)
        return {"protocol": PROTOCOLS[protocol], "health_p50_ms": round(statistics.median(times), 3),
                "health_p99_ms": round(sorted(times)[int(0.99 * len(times)) - 1], 3),
                "header_line_answer": status, "header_bytes_sent": sent, "rss_before_mib": round(before, 1),
                "rss_after_mib": round(after, 1), "rss_growth_mib": round(after - before, 1),
                f"idle_connection_closed_within_{args.idle:g}_s": closed}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=128, help="the header line's size, MiB")
    ap.add_argument("--requests", type=int, default=2000, help="/health requests for the per-request cost")
    ap.add_argument("--idle", type=float, default=12.0, help="seconds to wait for an idle connection's close")
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "head-hold.json")
    args = ap.parse_args()
    from facedb import FaceDB

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "db"
        FaceDB.create(db, model_id="fake-colour", dim=32, threshold=0.7).close()  # as the service tests serve
        results = [run(p, db, args) for p in ("httptools", "bounded", "httptools", "bounded")]
    out = {"load_average": os.getloadavg(), "cpus": os.cpu_count(), "defaults": {"FACEDB_MAX_HEADER_KB": 32,
           "FACEDB_HEADER_TIMEOUT": 10}, "runs": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for r in results:
        print(r)
    print("load average", os.getloadavg())


if __name__ == "__main__":
    main()
