"""Signing in to the console: a server-side session (issue #25, finding 4), checked on every request and then
authorised exactly as the API authorises a key (:func:`facedb.service.auth.admit_key`: the same scopes, door
rate, audit actor).

* Signing in with an API key (throttled and recorded as the API's keys are) makes a **session**: a random
  256-bit token in an HttpOnly cookie; the store keeps only its SHA-256, the key's id and two times. The key
  itself is not kept anywhere, in the browser or on the server.
* It **expires** after ``IDLE_S`` (30 minutes) without a request and ``ABSOLUTE_S`` (12 hours) after signing in,
  whatever happens; **signing out deletes it** on the server, so a copied cookie stops working at once; and
  **revoking its key** deletes the key's sessions (and every request checks the key is live anyway).
* The cookie: ``HttpOnly`` (no script reads it), ``SameSite=Strict`` (another site's page cannot make the
  browser send it), ``Path=/console`` (the API never sees it: it takes keys in headers only), ``Secure`` over
  HTTPS (a TLS proxy in front), no ``Max-Age`` (gone when the browser closes; the server's expiry holds anyway).
* **Anti-forgery tokens** on every state-changing request: for a session, an HMAC of its token (forms hold it in
  a hidden field, scripts send it as ``X-CSRF-Token``; sign-out included); for the sign-in form, a random token
  in a cookie of its own that the form must repeat (double submit), so another site's page cannot sign a
  browser in with the attacker's key.
* Sessions are in the store, so every worker knows them. A request reads its session through the worker's own
  read-only connection on the event loop; the last-use time is written at most once a minute per session.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData

from ...errors import InvalidInputError, PermissionDeniedError
from ...operations.keys import ApiKey, Scope
from ..auth import Caller, admit_key

COOKIE = "facedb_console"
LOGIN_COOKIE = "facedb_console_login"
FLASH = "facedb_console_flash"
PATH = "/console"
CSRF_HEADER = "x-csrf-token"

#: A session ends after this long without a request (seconds) ...
IDLE_S = 30 * 60
#: ... and this long after signing in, however busy (seconds).
ABSOLUTE_S = 12 * 60 * 60
#: A session's last-use time is written when it is older than this (seconds): one write a minute, not a click.
TOUCH_S = 60


class SignInRequired(Exception):
    """No key, or one that is no longer live: back to the sign-in page (``refused``: say so there)."""

    def __init__(self, refused: bool = False) -> None:
        super().__init__("sign in")
        self.refused = refused


class ScopeTooNarrow(Exception):
    """A live key whose scope does not reach this page."""

    def __init__(self, caller_scope: str, needed: Scope) -> None:
        super().__init__(f"needs {needed.value}")
        self.scope = caller_scope
        self.needed = needed


def csrf_token(session: str) -> str:
    """The anti-forgery token for the session whose token is ``session``."""
    return hmac.new(session.encode(), b"facedb-console-csrf", hashlib.sha256).hexdigest()[:40]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A session token or a sign-in form token: 256 random bits."""
    return secrets.token_urlsafe(32)


def signed_in(request: Request) -> str | None:
    """The session token the browser sent, if any."""
    return request.cookies.get(COOKIE) or None


def secure(request: Request) -> bool:
    """Whether the browser reached us over HTTPS (directly, or through a TLS proxy that says so)."""
    proto = request.headers.get("x-forwarded-proto", request.url.scheme)
    return proto.split(",")[0].strip().lower() == "https"


def live_session(state: Any, token: str | None, now: float | None = None) -> tuple[ApiKey, dict[str, Any]] | None:
    """The live key and the session row of the session ``token`` names, or None: no such session, past its idle
    or absolute expiry, or its key revoked. A read of the worker's own connection (the event loop's)."""
    if not token or state.key_store is None:
        return None
    now = time.time() if now is None else now
    row = state.key_store.console_session(token_hash(token))
    if row is None or now - row["seen_at"] > IDLE_S or now - row["created_at"] > ABSOLUTE_S:
        return None
    key_row = state.key_store.api_key(row["key_id"])
    if key_row is None:
        return None
    key = ApiKey.from_row(key_row)
    return (None if key.revoked else (key, row))


async def check_session(state: Any, scope: Any, headers: dict[bytes, bytes], address: str) -> bool:
    """Whether a console request carries a live session (the transport asks before reading a body: a request
    without one gets the small body limit of a request without a key)."""
    from http.cookies import SimpleCookie

    cookie: SimpleCookie = SimpleCookie()
    try:
        cookie.load(headers.get(b"cookie", b"").decode("latin-1"))
    except Exception:  # a malformed cookie header: no session
        return False
    morsel = cookie.get(COOKIE)
    return live_session(state, morsel.value if morsel is not None else None) is not None


async def session_caller(request: Request, scope: Scope) -> Caller:
    """The Caller of the request's session when its key's scope reaches ``scope``; SignInRequired (no session,
    or one that expired or whose key was revoked) or ScopeTooNarrow otherwise. Refreshes the session's last use
    (at most once a minute) and ends one found expired."""
    token = signed_in(request)
    if token is None:
        raise SignInRequired()
    state = request.app.state.facedb
    state.ready_db()
    now = time.time()
    found = live_session(state, token, now)
    if found is None:
        row = state.key_store.console_session(token_hash(token)) if state.key_store is not None else None
        if row is not None:  # expired, or its key revoked: gone from the store too
            await run_in_threadpool(state.db.end_console_session, token_hash(token), "")
        raise SignInRequired(refused=True)
    key, row = found
    try:
        caller = await admit_key(request, key, scope)
    except PermissionDeniedError:
        raise ScopeTooNarrow(key.scope, scope) from None
    if now - row["seen_at"] > TOUCH_S:
        await run_in_threadpool(state.db.touch_console_session, token_hash(token), now)
    caller.console_session = token  # type: ignore[attr-defined]  # for the anti-forgery token of its forms
    return caller


def page(scope: Scope) -> Callable[..., Any]:
    """A dependency for console pages and their actions: the Caller of the signed-in session when its key's
    scope reaches ``scope``; else SignInRequired or ScopeTooNarrow (rendered as pages, see :mod:`.views`).
    Recorded as the API records: reads and changes under ``key:<id>``, a too-narrow scope as ``denied``."""

    async def dependency(request: Request) -> Caller:
        return await session_caller(request, scope)

    dependency.__name__ = f"console_{scope.value}"
    return dependency


async def check_csrf(request: Request, caller: Caller) -> FormData | None:
    """Refuse a state-changing request whose anti-forgery token is missing or wrong (InvalidInputError, 400).
    Returns the parsed form when the token came in one."""
    expected = csrf_token(caller.console_session)  # type: ignore[attr-defined]
    given = request.headers.get(CSRF_HEADER)
    form = None
    if given is None:
        form = await request.form()
        value = form.get("csrf")
        given = value if isinstance(value, str) else None
    if given is None or not hmac.compare_digest(given, expected):
        raise InvalidInputError("the console's form token is missing or wrong: reload the page and try again")
    return form


IDENTIFY = page(Scope.identify)
ENROLL = page(Scope.enroll)
ADMIN = page(Scope.admin)
