"""API keys over HTTP: ``X-API-Key: <key>`` (or ``Authorization: Bearer <key>``), checked on every request
against the store (so a key revoked through any worker or the CLI is refused by the next request everywhere).

A route declares the scope it needs with ``Depends(need(Scope.enroll))`` and gets a :class:`Caller`: the
database, the key, and ``with caller:`` to record what it does under the key's id in the audit trail.
Refusals are 401 (no key, unknown, revoked: one message for all) or 403 (a valid key, too narrow a scope);
a revoked key or a too-narrow scope is recorded in the audit trail as ``denied`` under that key's id.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from ..audit import acting_as
from ..errors import AuthenticationError, PermissionDeniedError
from ..keys import ApiKey, Scope, authorise
from .logs import KEY_ID
from .state import ServiceState

if TYPE_CHECKING:
    from ..db import FaceDB

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="ApiKey",
                              description="An API key made with `facedb keys create --scope ...`.")
bearer = HTTPBearer(auto_error=False, scheme_name="Bearer", description="The same API key as a bearer token.")


class Caller:
    """Who is asking (``key``), what they may reach (``db``, ``state``), and ``with caller:`` to act as them."""

    def __init__(self, state: ServiceState, db: FaceDB, key: ApiKey) -> None:
        self.state = state
        self.db = db
        self.key = key
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> FaceDB:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(acting_as(self.key.actor))
        return self.db

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self._stack is not None
        self._stack.close()

    def publish(self, event: str, data: dict[str, Any], subject: str | None) -> None:
        self.state.publish(event, data, key_id=self.key.id, subject=subject)


def service(request: Request) -> ServiceState:
    return request.app.state.facedb  # type: ignore[no-any-return]


async def admit(request: Request, presented: str | None, scope: Scope) -> Caller:
    """The Caller for the key ``presented``, if it is live and its scope includes ``scope``: AuthenticationError
    (401) or PermissionDeniedError (403) otherwise, a revoked key or a too-narrow scope recorded as ``denied``.
    Every way in (the API's headers, the console's session cookie) comes through here.

    It runs on the event loop and reads the key from the worker's own read-only connection (a lookup by
    primary key: microseconds, and WAL readers never wait), so a request costs one hop to the thread pool (its
    route), not two. Recording a refusal, a write, goes to the thread pool."""
    state = service(request)
    db = state.ready_db()
    where = {"method": request.method, "path": request.url.path}
    try:
        key = state.authenticate(presented)
    except AuthenticationError as exc:
        known = getattr(exc, "key_id", None)
        _failed(state, "revoked" if known else "invalid" if presented else "missing")
        if known:
            setattr(request.state, KEY_ID, known)  # the access log's key id: an id, never the key
            await run_in_threadpool(_denied, db, f"key:{known}", {**where, "reason": "revoked key"})
        raise
    setattr(request.state, KEY_ID, key.id)
    try:
        authorise(key, scope)
    except PermissionDeniedError:
        _failed(state, "scope")
        await run_in_threadpool(_denied, db, key.actor, {**where, "reason": f"scope {key.scope}, needs {scope.value}"})
        raise
    return Caller(state, db, key)


def need(scope: Scope) -> Callable[..., Any]:
    """A dependency admitting keys (``X-API-Key`` or a bearer token) whose scope includes ``scope``."""

    async def dependency(request: Request, header: Annotated[str | None, Security(api_key_header)] = None,
                         token: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)] = None) -> Caller:
        return await admit(request, header or (token.credentials if token is not None else None), scope)

    dependency.__name__ = f"need_{scope.value}"
    return dependency


def _failed(state: ServiceState, reason: str) -> None:
    if state.metrics is not None:
        state.metrics.auth_failure(reason)


def _denied(db: FaceDB, actor: str, detail: dict[str, Any]) -> None:
    with acting_as(actor):
        db.note("denied", detail=detail)


IDENTIFY = need(Scope.identify)
ENROLL = need(Scope.enroll)
ADMIN = need(Scope.admin)
METRICS = need(Scope.metrics)  # a metrics key or an admin key
