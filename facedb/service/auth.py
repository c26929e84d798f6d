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

from ..errors import AuthenticationError, PermissionDeniedError, TooManyRequestsError
from ..operations.audit import acting_as
from ..operations.keys import ApiKey, Scope, authorise, claimed_id
from .logs import KEY_ID
from .state import ServiceState

if TYPE_CHECKING:
    from ..db import FaceDB

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="ApiKey",
                              description="An API key made with `facedb keys create --scope ...`.")
bearer = HTTPBearer(auto_error=False, scheme_name="Bearer", description="The same API key as a bearer token.")


class Caller:
    """Who is asking (``key``), what they may reach (``db``, ``state``), and ``with caller:`` to act as them."""

    def __init__(self, state: ServiceState, db: FaceDB, key: ApiKey, address: str = "unknown") -> None:
        self.state = state
        self.db = db
        self.key = key
        self.address = address  # the client's (auth.client_address), for the refusal throttle
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


def client_address(scope: Any) -> str:
    """The client's address as uvicorn gives it (behind a trusted proxy, its ``X-Forwarded-For``: uvicorn's
    ``--forwarded-allow-ips``), for throttles and the trail of failed authentications."""
    client = scope.get("client") if isinstance(scope, dict) else None
    return str(client[0]) if client else "unknown"


async def check_key(state: ServiceState, presented: str | None, address: str, where: dict[str, Any]) -> ApiKey:
    """The live key ``presented`` is, with the failed-authentication throttle (docs/service.md, "Threat model",
    finding 6):

    * an address that used up its allowance of failures (``auth_failures`` a minute) is refused before its key
      is looked at: TooManyRequestsError (429, ``Retry-After``);
    * a failure (no key, unknown or wrong, revoked) takes one from its address's allowance and from its key id's
      (the public ``fdb_<id>_`` part, when it names one): 401 while both last, 429 once either is used up.
      A right key is never refused for its id's failures: someone who knows a door's key id cannot lock the
      door out, only their own address;
    * failures are recorded in the audit trail (``auth-failed``, a revoked key as ``denied``) with the key id,
      the address, the reason and how many failures of that (address, key id) were left out since its last
      record: one record per source a minute and 60 a minute in all per worker, so guessing cannot flood the
      trail; ``facedb_auth_failures_total`` counts every one.

    Runs on the event loop (the key lookup is one read of the worker's own connection); a record goes to the
    thread pool. Used by the routes (:func:`admit`) and by the transport, before a request body is read."""
    guard = state.guard
    wait = guard.address_wait(address)
    if wait > 0:
        _failed(state, "throttled")
        raise TooManyRequestsError("too many failed authentications from this address: retry later", wait)
    try:
        return state.authenticate(presented)
    except AuthenticationError as exc:
        known = getattr(exc, "key_id", None)  # a revoked key, presented correctly
        claimed = known or claimed_id(presented)
        reason = "revoked" if known else "invalid" if presented else "missing"
        _failed(state, reason)
        wait = guard.failed(address, claimed)
        failures = guard.to_record(address, claimed)
        if failures is not None and state.db is not None:
            detail = {**where, "address": address, "key_id": claimed, "failures": failures}
            if known:
                await run_in_threadpool(record_denied, state.db, f"key:{known}", {**detail, "reason": "revoked key"})
            else:
                await run_in_threadpool(record_denied, state.db, None, {**detail, "reason": reason}, "auth-failed")
        if wait > 0:
            _failed(state, "throttled")
            raise TooManyRequestsError("too many failed authentications: retry later", wait) from None
        raise


async def admit(request: Request, presented: str | None, scope: Scope) -> Caller:
    """The Caller for the key ``presented``, if it is live and its scope includes ``scope``: AuthenticationError
    (401), TooManyRequestsError (429: :func:`check_key`'s throttle, or a door key over ``door_rate`` requests a
    second) or PermissionDeniedError (403) otherwise, a too-narrow scope recorded as ``denied``.
    Every way in (the API's headers, the console's session) comes through here.

    It runs on the event loop and reads the key from the worker's own read-only connection (a lookup by
    primary key: microseconds, and WAL readers never wait), so a request costs one hop to the thread pool (its
    route), not two. Recording a refusal, a write, goes to the thread pool."""
    state = service(request)
    state.ready_db()  # 503 while loading
    where = {"method": request.method, "path": request.url.path}
    try:
        key = await check_key(state, presented, client_address(request.scope), where)
    except AuthenticationError as exc:
        if getattr(exc, "key_id", None):
            setattr(request.state, KEY_ID, exc.key_id)  # type: ignore[attr-defined]  # an id, never the key
        raise
    return await admit_key(request, key, scope)


async def admit_key(request: Request, key: ApiKey, scope: Scope) -> Caller:
    """The Caller for a live ``key`` (authenticated by :func:`admit`, or the key of a console session): its
    scope checked (403, recorded as ``denied``) and a door key's request rate (429)."""
    state = service(request)
    db = state.ready_db()
    where = {"method": request.method, "path": request.url.path}
    setattr(request.state, KEY_ID, key.id)
    address = client_address(request.scope)
    try:
        authorise(key, scope)
    except PermissionDeniedError:
        _failed(state, "scope")
        reason = f"scope {key.scope}, needs {scope.value}"
        refusals = denied_to_record(state, address, key.id, reason)
        if refusals is not None:
            await run_in_threadpool(record_denied, db, key.actor, {**where, "reason": reason, "address": address,
                                                             "refusals": refusals})
        wait = state.guard.failed(address, key.id)
        if wait > 0:
            _failed(state, "throttled")
            raise TooManyRequestsError("too many refused requests: retry later", wait) from None
        raise
    if not key.full_answers and request.method == "POST":
        # a door key's decisions (identify, verify, detect: POSTs; its pages are GETs), at a door's pace:
        # hill-climbing on the confidence bands needs many
        wait = state.guard.door_wait(key.id)
        if wait > 0:
            raise TooManyRequestsError(f"this key may make {state.settings.door_rate:g} requests a second", wait)
    return Caller(state, db, key, address)


def denied_to_record(state: ServiceState, address: str, key_id: str, reason: str) -> int | None:
    """Whether a refusal of a live key (too narrow a scope, a door key asking for more than it may) goes to the
    audit trail: how many refusals of this (address, key) the record stands for, or None to leave it out. Bounded
    as failed authentications are (:meth:`Guard.to_record`: one record per source a minute, a total per
    minute; the source is the address, the key and the reason, so each kind of refusal leaves its trace): 200
    ``GET /v1/audit`` with a door key wrote 200 rows (issue #25, second pass)."""
    return state.guard.to_record(address, f"denied:{key_id}:{reason}")


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


def record_denied(db: FaceDB, actor: str | None, detail: dict[str, Any], operation: str = "denied") -> None:
    """Write one refusal to the audit trail under ``actor`` (None: no one's). A write: call it in a thread."""
    with acting_as(actor) if actor is not None else contextlib.nullcontext():
        db.note(operation, detail=detail)


IDENTIFY = need(Scope.identify)
ENROLL = need(Scope.enroll)
ADMIN = need(Scope.admin)
METRICS = need(Scope.metrics)  # a metrics key or an admin key
