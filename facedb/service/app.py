"""The app factory: FastAPI with the routes, the error table, the transport middleware (request body limit,
the worker's pid on every answer, CORS when configured) and the start-up that loads the model and the index.

``uvicorn facedb.service.app:app_from_env --factory`` (what ``facedb serve`` runs, once per worker) builds it
from ``FACEDB_*`` variables; tests call :func:`create_app` with a test-double model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..errors import (
    FaceDBError,
    InvalidInputError,
    RequestTimeoutError,
    RequestTooLargeError,
    TooManyRequestsError,
)
from ..operations.hooks import Sender
from . import auth, errors, routes_admin, routes_people, routes_query, routes_visitors
from .auth import METRICS, Caller
from .config import ServiceSettings
from .logs import KEY_ID, JsonFormatter, RequestLog
from .state import ServiceState

DESCRIPTION = """\
facedb's HTTP API for access-control systems: identify (1:N) and verify (1:1) faces in photos or your own
vectors, manage people and their templates, read the audit trail, and receive door events by webhook.

Authenticate with `X-API-Key: <key>` (or `Authorization: Bearer <key>`); keys are made with
`facedb keys create --scope identify|enroll|admin|metrics`. Scores are cosine similarities (higher = more alike).

**No liveness detection / anti-spoofing**: a printed photo or a screen showing an enrolled person's face is that
person's face to facedb. Pair it with a presentation-attack-detecting camera where that matters.
"""

WORKER_HEADER = b"x-facedb-worker"


#: The body limit of a request that names no key (the console's sign-in form: a key and a token), bytes.
KEYLESS_BODY = 16 * 1024

#: The decision routes that take a JSON vector, and what one number of it may take in the body (a float's
#: longest text, "-1.2345678901234567e-05", and ", "), and the rest of the largest valid request (a name of
#: 256 characters written as \uXXXX escapes, the field names, white space): a door key sends one vector a
#: call, so its body is bounded by the dimension; a 19 MiB vector was parsed before its length was checked
#: (+230 MiB, 2 s; issue #25, second pass, finding 7).
VECTOR_ROUTES = ("/v1/identify/vector", "/v1/verify/vector")
BYTES_PER_NUMBER = 32
VECTOR_SLACK = 16 * 1024


class Transport:
    """Pure ASGI middleware, in front of everything but the request log and CORS (so that its refusals carry
    CORS headers like any answer). Before a byte of a request body is read (issue #25, finding 2):

    1. the caller is authenticated: an API route (``/v1/...``, ``/metrics``) by its key (:func:`auth.check_key`,
       with the failed-authentication throttle: 401 or 429), a console action by its session
       (:func:`console.session.check_session`); a request with neither (the console's sign-in form, a console
       action without a live session, which its route then sends to sign in) may send ``KEYLESS_BODY`` bytes;
    2. the declared ``Content-Length`` is held to that limit (413);
    3. the client's address may have ``uploads_per_client`` bodies being read at once (429).

    Then the body is read, bounded by the limit (counted, for a chunked body) and by ``body_timeout`` seconds in
    all (408: a stalled or trickling body is dropped, the connection closed), and replayed to the app. uvicorn
    has no body timeout of its own (``timeout_keep_alive`` covers only the idle time between requests), so this
    middleware is it. (The worker's pid is stamped by :class:`WorkerStamp`, outside CORS.)"""

    def __init__(self, app: ASGIApp, state: ServiceState) -> None:
        self.app = app
        self.state = state
        self.max_body = state.settings.max_upload_bytes
        self.timeout = state.settings.body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        if not chunked and (declared is None or declared.strip() in (b"", b"0")):
            await self.app(scope, receive, send)  # no body: nothing to hold
            return
        address = auth.client_address(scope)
        uploading = False
        door: list[Any] = []  # the door key whose vector body is bounded by the dimension, if it is one
        try:
            limit = await self._admit(scope, headers, address, door)
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise RequestTooLargeError(f"the request body is over the limit of {limit} bytes"
                                           + (" (FACEDB_MAX_UPLOAD_MB)" if limit == self.max_body else
                                              " for a request without a key" if limit == KEYLESS_BODY else
                                              " for one vector of this database's dimension"))
            uploading = self.state.guard.start_upload(address)
            if not uploading:
                raise TooManyRequestsError(f"this client is sending {self.state.guard.uploads} request bodies "
                                           "already: wait for one to finish", 1.0)
            body = await self._read(receive, limit)
        except FaceDBError as exc:
            if door and isinstance(exc, RequestTooLargeError):
                await self._record_door_refusal(door[0], address, scope)  # the attempt is in the trail
            await self._refuse(exc, scope, receive, send)
            return
        except _Gone:
            return
        finally:
            if uploading:
                self.state.guard.end_upload(address)
        await self.app(scope, _replaying(body, receive), send)

    async def _admit(self, scope: Scope, headers: dict[bytes, bytes], address: str, door: list[Any]) -> int:
        """Authenticate a request that carries a body, before the body; its body limit in bytes. A door key on a
        vector route is appended to ``door``."""
        path = scope.get("path", "")
        if path.startswith("/v1/") or path == "/metrics":
            presented = headers.get(b"x-api-key")
            bearer = headers.get(b"authorization", b"")
            if presented is None and bearer[:7].lower() == b"bearer ":
                presented = bearer[7:]
            key = await auth.check_key(self.state, presented.decode("latin-1") if presented is not None else None,
                                       address, {"method": scope.get("method"), "path": path})
            scope.setdefault("state", {})[KEY_ID] = key.id
            db = self.state.db
            if path in VECTOR_ROUTES and not key.full_answers and db is not None:
                door.append(key)
                return min(self.max_body, db.dim * BYTES_PER_NUMBER + VECTOR_SLACK)  # one vector a call
            return self.max_body
        if path.startswith("/console/") and self.state.settings.console:
            from .console.session import check_session

            if await check_session(self.state, scope, headers, address):
                return self.max_body
        return KEYLESS_BODY

    async def _record_door_refusal(self, key: Any, address: str, scope: Scope) -> None:
        """Record a door key's vector body over one vector's size as ``denied`` (bounded like every refusal,
        :func:`auth.denied_to_record`): several vectors in one call are how a door key would read the gallery
        out, and the attempt must be in the trail as the 403 for ``k > 1`` is."""
        reason = "a vector body over one vector's size from an identify key without the candidates grant"
        refusals = auth.denied_to_record(self.state, address, key.id, reason)
        db = self.state.db
        if refusals is not None and db is not None:
            detail = {"method": scope.get("method"), "path": scope.get("path"), "reason": reason,
                      "address": address, "refusals": refusals}
            await run_in_threadpool(auth.record_denied, db, key.actor, detail)

    async def _read(self, receive: Receive, limit: int) -> bytes:
        """The whole body, or RequestTooLargeError past ``limit`` bytes, RequestTimeoutError past the body
        timeout; _Gone when the client went away."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise RequestTimeoutError(f"the request body did not arrive within {self.timeout:g} s "
                                          "(FACEDB_BODY_TIMEOUT)") from None
            if message["type"] == "http.disconnect":
                raise _Gone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestTooLargeError(f"the request body is over the limit of {limit} bytes")
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _refuse(self, exc: FaceDBError, scope: Scope, receive: Receive, send: Send) -> None:
        response = errors.error_response(exc)
        response.headers["connection"] = "close"  # the unread rest of the body is not worth reading
        await response(scope, receive, send)


class WorkerStamp:
    """Pure ASGI middleware, outside CORS: every answer carries ``X-FaceDB-Worker: <pid>``, CORS preflights
    (answered by the CORS middleware itself) included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.pid = str(os.getpid()).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (WORKER_HEADER, self.pid)]}
            await send(message)

        await self.app(scope, receive, stamped)


class _Gone(Exception):
    """The client disconnected while its body was being read."""


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A receive channel that hands the app the body a middleware already read, then the client's own messages
    (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _json_media(headers: dict[bytes, bytes]) -> bool:
    """Whether FastAPI will parse this request's body as JSON (its rule: a ``json`` or ``+json`` subtype)."""
    media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    subtype = media.partition(b"/")[2]
    return subtype == b"json" or subtype.endswith(b"+json")


def unreadable_text(body: bytes) -> str | None:
    r"""Why a JSON body's text cannot be stored or answered, or None. Python's ``json.loads`` takes raw surrogate
    bytes (it decodes with ``surrogatepass``) and ``"\udc80"`` escapes, and a lone surrogate in a str then fails
    far from the request, when SQLite or the JSON answer encodes it to UTF-8: a 500 on 8 routes (issue #25,
    finding 5), including error answers that quote the field. Checked once here, before routing, for every
    route. The escape is parsed only when ``\u`` occurs at all, so a vector (digits) costs one scan."""
    try:
        text = body.decode("utf-8")  # strict: raw surrogate bytes (ED A0..BF ..) and other non-UTF-8 fail here
    except UnicodeDecodeError:
        return "the request body is not valid UTF-8 (JSON is UTF-8, RFC 8259)"
    if "\\u" not in text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None  # malformed JSON: FastAPI's own 400 says where
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return "a string in the request holds a lone UTF-16 surrogate (e.g. \\udc80): it is not text"
    return None


class TextCheck:
    """Pure ASGI middleware: a JSON body whose strings are not text (:func:`unreadable_text`) is a 400
    InvalidInputError before any route sees it. It sits inside CORS, so a browser client can read the refusal."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _json_media(dict(scope.get("headers") or [])):
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:  # Transport has read the whole body already (bounded): this is one message, replayed
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        why = unreadable_text(body)
        if why is not None:
            await errors.error_response(InvalidInputError(why))(scope, receive, send)
            return
        await self.app(scope, _replaying(body, receive), send)


def create_app(settings: ServiceSettings, *, model: Any = None, sender: Sender | None = None) -> FastAPI:
    """The service for ``settings.db``. ``model``: a face pipeline to use instead of loading the database's
    (tests); ``sender``: how webhooks are posted (default: httpx)."""
    from .metrics import CONTENT_TYPE, Metrics  # prometheus_client: imported by the worker, not by `facedb --help`

    state = ServiceState(settings, model=model, sender=sender)
    metrics = state.metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(state.start)  # the worker takes connections once this has loaded everything
        try:
            async with metrics.running(state):
                yield
        finally:
            await run_in_threadpool(state.stop)

    # /docs (Swagger UI) and /redoc load their scripts from a public CDN: off unless the admin asks for them
    # (FACEDB_DOCS=1, e.g. on a development machine); /openapi.json, the document itself, is always served
    # (issue #25, finding 7)
    app = FastAPI(title="facedb", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  docs_url="/docs" if settings.docs else None, redoc_url=None)
    app.state.facedb = state
    errors.install(app)

    @app.get("/health", tags=["service"], summary="Liveness: the process answers (no key needed).")
    def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/ready", tags=["service"], summary="Readiness: 200 once the model and the index are loaded, else 503 "
                                                 "(no key needed).")
    def ready() -> JSONResponse:
        body = {"ready": state.ready, "model_loaded": state.pipeline is not None,
                "vectors_only": state.ready and state.pipeline is None}
        if not state.ready:
            body["reason"] = "starting" if state.error is None else "failed to start (see the server's log)"
        return JSONResponse(body, status_code=200 if state.ready else 503)

    @app.get("/metrics", tags=["service"], response_class=Response,
             summary="Prometheus metrics (text format; a metrics or admin key). With several workers: all of them.",
             responses={200: {"content": {"text/plain": {}}}})
    async def prometheus_metrics(caller: Annotated[Caller, Depends(METRICS)]) -> Response:
        # async: on the event loop, where the worker's key connection (read for the store's generation) is used.
        # Not in the audit trail: a scrape every 15 s would bury the trail, and the answer holds no one's data.
        return Response(metrics.scrape(caller.state), media_type=CONTENT_TYPE)

    for router in (routes_query.router, routes_people.router, routes_visitors.router, routes_admin.router):
        app.include_router(router, responses=errors.ERROR_RESPONSES)  # every refusal, in the OpenAPI document
    if settings.console:
        from .console import install as install_console

        install_console(app)
    app.add_middleware(TextCheck)  # added first: innermost
    # then Transport inside CORS: its refusals before routing (401, 408, 413, 429) carry the CORS headers, so a
    # browser client on an allowed origin can read why (issue #25, finding 7)
    app.add_middleware(Transport, state=state)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST", "PATCH", "DELETE"],
                           allow_headers=["X-API-Key", "Authorization", "Content-Type"])
    app.add_middleware(WorkerStamp)  # outside CORS: its preflight answers carry the worker's pid too
    # added last: outermost, so a refusal by Transport (413) is timed, counted and logged like any answer
    app.add_middleware(RequestLog, log_json=settings.log_format == "json", metrics=metrics)
    return app


def app_from_env() -> FastAPI:
    """The app as ``facedb serve`` configures it, through ``FACEDB_*`` variables (uvicorn ``--factory``)."""
    import logging

    settings = ServiceSettings.from_env()
    log = logging.getLogger("facedb")  # facedb's own messages beside uvicorn's, not every library's
    if not log.handlers:  # (with --log-format json, uvicorn's log config has given it the JSON handler)
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter() if settings.log_format == "json"
                             else logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    return create_app(settings)
