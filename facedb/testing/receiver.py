"""A webhook receiver on loopback for the tests and the drills: records every delivery and answers as told."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


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
