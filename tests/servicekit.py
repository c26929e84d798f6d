"""Helpers for the service tests: a database with a key of every scope, a test client wired to the test-double
model, photos as PNG bytes, a webhook receiver on loopback, and a real `facedb serve` process."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from facedb import FaceDB

from .conftest import REPO, face_image

RED, GREEN, BLUE, GREY = (200, 40, 40), (40, 200, 40), (40, 40, 200), (120, 120, 120)


def png(colours: list[tuple[int, int, int]], seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(face_image(colours, seed)).save(buf, "PNG")
    return buf.getvalue()


def blank_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (80, 40)).save(buf, "PNG")
    return buf.getvalue()


def make_db(path: Path, *, model_id: str = "fake-colour", dim: int = 32, threshold: float = 0.7,
            sync_audit: bool = True) -> dict[str, str]:
    """A database and one API key per scope: {"identify": key, "enroll": key, "admin": key}. ``sync_audit``: the
    service commits each decision's audit record before answering, so that a test reading the trail through
    another connection right after a response finds it (new databases' background writer commits it within
    20 ms instead: tests/test_speed.py checks that through the service)."""
    with FaceDB.create(path, model_id=model_id, dim=dim, threshold=threshold) as db:
        if sync_audit:
            db.configure_audit(sync=True)
        return {scope: db.create_api_key(scope, f"{scope}-key")[1] for scope in ("identify", "enroll", "admin")}


def wait_ready(client: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/ready").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"service not ready after {timeout} s: {client.get('/ready').text}")


def snapshot(path: Path) -> dict[str, Any]:
    """What a failed request must leave unchanged: counts, generation, every person with their metadata, keys
    and webhooks."""
    with FaceDB.open(path, readonly=True) as db:
        s = db.settings()
        return {"counts": db.store.counts(), "generation": s.generation, "threshold": s.threshold,
                "people": [p.to_dict() for p in db.people()], "keys": [k.to_dict() for k in db.api_keys()],
                "hooks": [h.to_dict() for h in db.webhooks()], "audit": s.audit.to_dict()}


class Receiver:
    """A webhook receiver on 127.0.0.1: records every POST (time, headers, body) and answers with the statuses
    in ``script`` in turn (then 200), after ``delay`` seconds, or once ``gate`` is set (a threading.Event: a
    receiver that answers only when the test lets it; ``answered`` counts the answers sent)."""

    def __init__(self, script: list[int] | None = None, delay: float = 0.0,
                 gate: threading.Event | None = None) -> None:
        self.script = list(script or [])
        self.delay = delay
        self.gate = gate
        self.answered = 0
        self.received: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.lock:
                    status = outer.script.pop(0) if outer.script else 200
                    outer.received.append({"time": time.monotonic(), "headers": dict(self.headers), "body": body,
                                           "status": status})
                if outer.delay:
                    time.sleep(outer.delay)
                if outer.gate is not None:
                    outer.gate.wait(300)
                with outer.lock:
                    outer.answered += 1
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.received) >= n:
                    return list(self.received)
            time.sleep(0.01)
        raise AssertionError(f"expected {n} deliveries, got {len(self.received)}")

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(r["body"]) for r in self.received]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def real_server(db: Path, *, workers: int = 2, timeout: float = 120.0, env: dict[str, str] | None = None):
    """`facedb serve` in a process of its own on a free loopback port; yields (base URL, the process).
    Stopped with SIGTERM (then SIGKILL) at the end; its output is in ``<db>.serve.log``."""
    port = free_port()
    log = open(f"{db}.serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "facedb.cli", "--db", str(db), "serve", "--port", str(port), "--workers", str(workers),
         "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"facedb serve exited: {Path(f'{db}.serve.log').read_text()}")
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"not ready in {timeout} s: {Path(f'{db}.serve.log').read_text()}")
            time.sleep(0.2)
        yield base, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: a session of its own
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def ready_on_all_workers(base: str, workers: int, timeout: float = 120.0) -> set[int]:
    """Wait until ``workers`` distinct worker pids have answered /ready with 200 (each on a new connection)."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < workers and time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base}/ready", timeout=5)
            if r.status_code == 200:
                seen.add(int(r.headers["x-facedb-worker"]))
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return seen
