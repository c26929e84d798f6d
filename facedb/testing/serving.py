"""Waiting for a `facedb serve` started in a process of its own, for the tests, drills and benchmarks that start one.

One loop, so that every caller treats the same things as "not yet" (connection refused, a timeout, a 503 while
the index loads) and the same things as fatal (the server process has exited: waiting longer cannot help, and
its log says why).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path


class ServerNotReady(RuntimeError):
    """The server did not answer ``/ready`` with 200 in time, or exited first; the message carries its log tail."""


def wait_until_ready(base: str, process: subprocess.Popen | None = None, timeout: float = 120.0,
                     log: Path | None = None, poll_s: float = 0.2,
                     get: Callable[[str], int] | None = None) -> float:
    """Poll ``GET {base}/ready`` until it answers 200; return the seconds waited.

    ``process``: the server's process; if it exits, raise at once. ``log``: a file whose last 2,000 characters go
    into the error. ``get``: the status of one GET of a URL (default: httpx with a 5 s timeout); a transport error
    counts as "not yet". Raises :class:`ServerNotReady` after ``timeout`` seconds.
    """
    if get is None:
        import httpx

        def get(url: str) -> int:
            try:
                return httpx.get(url, timeout=5).status_code
            except httpx.HTTPError:
                return 0

    def tail() -> str:
        return log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""

    start = time.monotonic()
    while True:
        if process is not None and process.poll() is not None:
            raise ServerNotReady(f"facedb serve exited with {process.returncode}: {tail()}")
        if get(f"{base}/ready") == 200:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise ServerNotReady(f"facedb serve not ready in {timeout:g} s: {tail()}")
        time.sleep(poll_s)
