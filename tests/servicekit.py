"""Helpers for the service tests: a database with a key of every scope, a test client wired to the test-double
model, photos as PNG bytes, a webhook receiver on loopback, and a real `facedb serve` process."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from facedb import FaceDB
from facedb.testing.receiver import Receiver  # noqa: F401 (the tests import it from here)
from facedb.testing.serving import wait_until_ready

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def real_server(db: Path, *, workers: int = 2, timeout: float = 120.0, env: dict[str, str] | None = None,
                log_level: str = "warning"):
    """`facedb serve` in a process of its own on a free loopback port; yields (base URL, the process).
    Stopped with SIGTERM (then SIGKILL) at the end; its output is in ``<db>.serve.log``."""
    port = free_port()
    log = open(f"{db}.serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "facedb.cli", "--db", str(db), "serve", "--port", str(port), "--workers", str(workers),
         "--log-level", log_level],
        stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, proc, timeout, log=Path(f"{db}.serve.log"))
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


def console_login(client: Any, key: str, **kwargs: Any) -> Any:
    """POST the console's sign-in form as a browser does: the sign-in page first (which sets the form's
    anti-forgery cookie and puts the same token in the form), then the form with ``key`` and that token."""
    import re

    page = client.get("/console/login")
    token = re.search(r'name="csrf" value="([^"]*)"', page.text).group(1)
    return client.post("/console/login", data={"key": key, "csrf": token}, **kwargs)
