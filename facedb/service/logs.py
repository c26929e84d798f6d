"""The service's logs: a request id on every request, and with ``--log-format json`` one JSON object per line
for every request (and for every other log line, uvicorn's included, so a log shipper parses one format).

An access line holds the time, the request id (the caller's ``X-Request-Id`` when it is a sane token, else
one made here; echoed in the answer either way), the method, the route *template* (``/v1/people/{name}``,
never the path: a path holds people's names), the status, the duration in ms, the key id (never the key) and
the worker's pid. No photo, template, name or query string is logged: what a key did to whom is the audit
trail's job, which an admin key reads, not the log's, which anyone with shell access reads.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import InvalidInputError
from .config import LOG_FORMATS

REQUEST_ID_HEADER = b"x-request-id"
# A caller's id is echoed into our answer and our log: only a short token of safe characters is taken (no
# spaces, quotes or control characters: nothing that could forge a log line or a header).
_GOOD_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")

#: The state key under which the auth layer leaves the caller's key id for the access line (``request.state``
#: is this dict of the request's scope).
KEY_ID = "facedb_key_id"
REQUEST_ID = "facedb_request_id"

access_log = logging.getLogger("facedb.access")


def check_format(value: str) -> str:
    if value not in LOG_FORMATS:
        raise InvalidInputError(f"the log format is one of {', '.join(LOG_FORMATS)}, got {value!r}")
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601, ms), ``level``, ``logger``, ``message``, and the
    fields a record carries in ``extra={"fields": {...}}``; a traceback as ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def uvicorn_log_config(log_format: str, level: str = "info") -> dict[str, Any] | None:
    """uvicorn's ``log_config`` for ``log_format``: None (uvicorn's own) for text; for json every logger that
    writes (uvicorn's, facedb's) through :class:`JsonFormatter` to stderr. A dict, so that it reaches the
    worker processes (they configure logging from it)."""
    if check_format(log_format) == "text":
        return None
    level = level.upper()
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {"version": 1, "disable_existing_loggers": False,
            "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
            "handlers": {"json": handler},
            "loggers": {"uvicorn": {"handlers": ["json"], "level": level, "propagate": False},
                        "uvicorn.error": {"level": level},
                        "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
                        "facedb": {"handlers": ["json"], "level": level, "propagate": False}}}


class RequestDone(Protocol):
    def request(self, method: str, route: str, status: int, seconds: float) -> None: ...


def route_template(scope: Scope) -> str:
    """The matched route's path template, or ``(unmatched)`` (a 404, or refused before routing)."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) and path else "(unmatched)"


class RequestLog:
    """Pure ASGI middleware, the outermost: gives each request its id (``X-Request-Id``, in the answer too),
    times it, and when it is done tells ``metrics`` and, with ``log_json``, writes its access line."""

    def __init__(self, app: ASGIApp, *, log_json: bool, metrics: RequestDone | None = None) -> None:
        self.app = app
        self.log_json = log_json
        self.metrics = metrics
        self.pid = os.getpid()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER)
        request_id = given.decode("ascii") if given is not None and _GOOD_ID.fullmatch(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})  # request.state is this dict: the auth layer writes the key id
        state[REQUEST_ID] = request_id
        status = 500  # what the client sees if the app fails before answering (the error middleware's 500)

        async def stamped(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REQUEST_ID_HEADER, request_id.encode("ascii"))]}
            await send(message)

        try:
            await self.app(scope, receive, stamped)
        finally:
            seconds = time.perf_counter() - start
            route = route_template(scope)
            if self.metrics is not None:
                self.metrics.request(scope.get("method", ""), route, status, seconds)
            if self.log_json:
                access_log.info("request", extra={"fields": {
                    "request_id": request_id, "method": scope.get("method"), "route": route, "status": status,
                    "duration_ms": round(seconds * 1000, 3), "key_id": state.get(KEY_ID), "worker": self.pid}})
