"""FaceDBError -> HTTP: the one table, and the one JSON error body every refusal uses.

Body: ``{"error": "<error class>", "message": "<one line>", "status": <code>}``. A request FastAPI cannot
parse (a missing field, a wrong type, malformed JSON) is a 400 InvalidInputError like any other bad input, so
422 always means "no face". Anything unexpected is a 500 that says only "internal error" (the traceback goes
to the server's log, never to the caller).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    AuthenticationError,
    DatabaseError,
    DatabaseExistsError,
    DuplicateError,
    FaceDBError,
    ImageError,
    IndexUnavailableError,
    InvalidInputError,
    InvalidVectorError,
    ModelMismatchError,
    ModelUnavailableError,
    NoFaceError,
    NotFoundError,
    NotReadyError,
    PermissionDeniedError,
    RequestTimeoutError,
    RequestTooLargeError,
    TooManyRequestsError,
)

log = logging.getLogger("facedb.service")

#: First match wins (subclasses before their bases).
STATUS: list[tuple[type[FaceDBError], int]] = [
    (RequestTooLargeError, 413),
    (RequestTimeoutError, 408),  # a body that did not arrive in time (the connection is closed)
    (TooManyRequestsError, 429),  # failed authentications, a door key's request rate, uploads per client
    (NotFoundError, 404),  # PersonNotFoundError, TemplateNotFoundError, unknown key or webhook
    (DuplicateError, 409),  # DuplicatePersonError, a key name in use
    (ModelMismatchError, 409),
    (DatabaseExistsError, 409),
    (InvalidInputError, 400),
    (InvalidVectorError, 400),
    (ImageError, 400),
    (AuthenticationError, 401),
    (PermissionDeniedError, 403),
    (NoFaceError, 422),
    (NotReadyError, 503),
    (IndexUnavailableError, 503),  # the vector engine (Milvus) cannot be reached: retry later
    (ModelUnavailableError, 503),
    (DatabaseError, 503),  # cannot write (locked past the timeout, disk full, read-only)
    (FaceDBError, 500),
]


class ErrorBody(BaseModel):
    """Every refusal's body (``report``: an enrolment's per-photo report, where one was made)."""

    model_config = ConfigDict(extra="allow")
    error: str
    message: str
    status: int


#: The refusals any API route may answer, for the OpenAPI document (so that clients and schemathesis's
#: conformance checks know them): the one error body for each.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": why} for code, why in (
        (400, "Bad input (InvalidInputError, InvalidVectorError, ImageError)"),
        (401, "No key, an unknown or a revoked key (AuthenticationError)"),
        (403, "A key whose scope or grants do not allow this (PermissionDeniedError)"),
        (404, "An unknown person, template, key, webhook or route"),
        (405, "A method the route does not take"),
        (408, "The request body did not arrive in time (RequestTimeoutError)"),
        (409, "A name or external id taken; another model's vectors"),
        (413, "A request body over the limit (RequestTooLargeError)"),
        (422, "No face where one was needed; nothing of an enrolment stored"),
        (429, "Too many failed authentications, a door key's request rate, uploads at once (Retry-After)"),
        (500, "A bug: the traceback is in the server's log"),
        (503, "Starting, the index unreachable, photos to a vectors-only database, the store not writable"),
    )}


def status_of(exc: FaceDBError) -> int:
    return next(code for cls, code in STATUS if isinstance(exc, cls))


def body(error: str, message: str, status: int, **extra: Any) -> dict[str, Any]:
    return {"error": error, "message": message, "status": status, **extra}


def error_response(exc: FaceDBError) -> JSONResponse:
    """The response for a FaceDBError: its status from :data:`STATUS`, its class and message."""
    status = status_of(exc)
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'ApiKey header="X-API-Key"'
    if status == 503 and isinstance(exc, NotReadyError):
        headers["Retry-After"] = "2"
    if isinstance(exc, TooManyRequestsError):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    extra = {"report": exc.report} if isinstance(getattr(exc, "report", None), dict) else {}
    return JSONResponse(body(type(exc).__name__, str(exc), status, **extra), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header"))
        parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request is not valid"


def install(app: FastAPI) -> None:
    """Register the handlers that turn every refusal into the one JSON error body."""

    async def facedb_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)  # type: ignore[arg-type]

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(InvalidInputError(_validation_message(exc)))  # type: ignore[arg-type]

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        # Starlette's and FastAPI's own refusals (a multipart part over 1 MiB, broken multipart, JSON nested too
        # deep for the parser, an integer of thousands of digits) as the documented classes: bad input is
        # InvalidInputError, too large is RequestTooLargeError, never an "HTTPError" no client knows
        names = {400: "InvalidInputError", 404: "NotFound", 405: "MethodNotAllowed", 413: "RequestTooLargeError"}
        message = exc.detail if isinstance(exc.detail, str) else "refused"
        return JSONResponse(body(names.get(exc.status_code, "HTTPError"), message, exc.status_code),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # the route's template and the request id, not the path: a path holds people's names (see logs.py)
        from .logs import REQUEST_ID, route_template

        log.error("unexpected error on %s %s (request %s)", request.method, route_template(request.scope),
                  request.scope.get("state", {}).get(REQUEST_ID, "-"), exc_info=exc)
        return JSONResponse(body("InternalError", "internal error (logged by the server)", 500), status_code=500)

    app.add_exception_handler(FaceDBError, facedb_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
