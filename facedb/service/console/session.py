"""Signing in to the console: the API key in an HttpOnly session cookie, checked on every request exactly as the
API checks its header (:func:`facedb.service.auth.admit`: the same keys, scopes, revocation and audit actor).

* The cookie holds the key itself, and nothing else: ``HttpOnly`` (no script can read it, so a script injected
  into a page could not take it away), ``SameSite=Strict`` (a page of another site cannot make the browser send
  it), ``Path=/console`` (the API routes never see it: they take keys in headers only), ``Secure`` when the
  console is reached over HTTPS (a TLS proxy in front), and no ``Max-Age`` (a session cookie: gone when the
  browser closes). The key never appears in a URL, a page or a log.
* Every request looks the key up in the store again, so a key revoked anywhere (the CLI, the API, another
  worker) is refused at the next click, and the browser is sent back to sign in.
* Each state-changing request also carries a token derived from the key (HMAC-SHA256 of a fixed label under the
  key): forms hold it in a hidden field, scripts send it as ``X-CSRF-Token``. Another site could not know it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any

from fastapi import Request
from starlette.datastructures import FormData

from ...errors import AuthenticationError, FaceDBError, InvalidInputError, PermissionDeniedError
from ...keys import Scope
from ..auth import Caller, admit

COOKIE = "facedb_console"
FLASH = "facedb_console_flash"
PATH = "/console"
CSRF_HEADER = "x-csrf-token"


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


def csrf_token(key: str) -> str:
    """The anti-forgery token for a session with ``key``."""
    return hmac.new(key.encode(), b"facedb-console-csrf", hashlib.sha256).hexdigest()[:40]


def signed_in(request: Request) -> str | None:
    return request.cookies.get(COOKIE) or None


def secure(request: Request) -> bool:
    """Whether the browser reached us over HTTPS (directly, or through a TLS proxy that says so)."""
    proto = request.headers.get("x-forwarded-proto", request.url.scheme)
    return proto.split(",")[0].strip().lower() == "https"


def page(scope: Scope) -> Callable[..., Any]:
    """A dependency for console pages and their actions: the Caller of the signed-in key when its scope reaches
    ``scope``; else SignInRequired or ScopeTooNarrow (rendered as pages, see :mod:`.views`). Recorded as the
    API records: reads and changes under ``key:<id>``, a revoked key or a too-narrow scope as ``denied``."""

    async def dependency(request: Request) -> Caller:
        key = signed_in(request)
        if key is None:
            raise SignInRequired()
        try:
            caller = await admit(request, key, scope)
        except AuthenticationError:
            raise SignInRequired(refused=True) from None
        except PermissionDeniedError:
            presented = request.app.state.facedb.authenticate(key)
            raise ScopeTooNarrow(presented.scope, scope) from None
        caller.console_key = key  # type: ignore[attr-defined]  # for the anti-forgery token of its forms
        return caller

    dependency.__name__ = f"console_{scope.value}"
    return dependency


async def check_csrf(request: Request, caller: Caller) -> FormData | None:
    """Refuse a state-changing request whose anti-forgery token is missing or wrong (InvalidInputError, 400).
    Returns the parsed form when the token came in one."""
    expected = csrf_token(caller.console_key)  # type: ignore[attr-defined]
    given = request.headers.get(CSRF_HEADER)
    form = None
    if given is None:
        form = await request.form()
        value = form.get("csrf")
        given = value if isinstance(value, str) else None
    if given is None or not hmac.compare_digest(given, expected):
        raise InvalidInputError("the console's form token is missing or wrong: reload the page and try again")
    return form


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
    if morsel is None or not morsel.value:
        return False
    try:
        state.authenticate(morsel.value)
    except FaceDBError:
        return False
    return True


IDENTIFY = page(Scope.identify)
ENROLL = page(Scope.enroll)
ADMIN = page(Scope.admin)
