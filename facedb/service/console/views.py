"""The console's pages and actions. Each page reads through the API's route functions with the signed-in key's
Caller (so it is recorded, scoped and refused exactly as the API would be); each action checks the anti-forgery
token, calls the route, and sends the browser back to a page with one line saying what happened (Post /
Redirect / Get). The ``/console/api/...`` endpoints answer the page script in JSON, through the same routes and
the API's error bodies.

Pages and the scope they need: sign-in (none); Check a photo (identify); People, a person, Enrol, Unknown
visitors (enroll); Decisions, Settings (admin).
"""

from __future__ import annotations

import hmac
import json
import math
import time
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import quote, unquote

import jinja2
from fastapi import APIRouter, Depends, FastAPI, File, Form, Path, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.datastructures import UploadFile as StarletteUpload

from ... import __version__
from ...choices import OnMultiple, OnOtherMatch, RuleKind, ThumbnailMode
from ...errors import AuthenticationError, FaceDBError, InvalidInputError, PersonNotFoundError, TooManyRequestsError
from ...gallery.store import utc_time
from ...operations.keys import Scope
from .. import routes_admin, routes_people, routes_query, routes_visitors
from ..auth import Caller, admit
from ..errors import error_response
from . import HERE
from .session import (
    ABSOLUTE_S,
    ADMIN,
    COOKIE,
    ENROLL,
    FLASH,
    IDENTIFY,
    LOGIN_COOKIE,
    PATH,
    ScopeTooNarrow,
    SignInRequired,
    check_csrf,
    csrf_token,
    new_token,
    secure,
    session_caller,
    signed_in,
    token_hash,
)

router = APIRouter(prefix="/console", include_in_schema=False)

#: People per page of the list.
PAGE = 24
#: Decisions the table shows at first (newer ones arrive live).
DECISION_ROWS = 100

#: Served with every page: only this origin's scripts, styles and images (and the camera's blob: pictures), no
#: framing (clickjacking), no referrer, never cached (pages show biometric data and names).
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                               "media-src 'self' blob:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}

NAV = [("identify", "Check a photo", Scope.identify), ("people", "People", Scope.enroll),
       ("enrol", "Enrol", Scope.enroll), ("visitors", "Unknown visitors", Scope.enroll),
       ("decisions", "Decisions", Scope.admin), ("settings", "Settings", Scope.admin)]

EVENTS = ("identify.match", "identify.unknown", "verify.accept", "verify.reject", "person.enrolled",
          "person.removed")


# ------------------------------------------------------------------------------------------------ rendering
def _when(value: str | None) -> str:
    """A stored time as ``2026-11-29 13:31:02 UTC``: through utc_time, so that one carrying another offset
    (or none) is still shown as the UTC instant it is, not its wall-clock digits labelled UTC."""
    if not value:
        return ""
    try:
        return datetime.fromisoformat(utc_time(value) or "").strftime("%Y-%m-%d %H:%M:%S UTC")
    except (ValueError, InvalidInputError):
        return value


def _score(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.4f}"


env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                         autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined,
                         trim_blocks=True, lstrip_blocks=True)
env.filters["q"] = lambda s: quote(str(s), safe="")
env.filters["when"] = _when
env.filters["score"] = _score
env.filters["tojson_attr"] = lambda v: json.dumps(v)


def render(request: Request, template: str, caller: Caller | None = None, status: int = 200,
           **context: Any) -> HTMLResponse:
    """A page: its template with the navigation for the signed-in key's scope, the anti-forgery token and the
    one-line message left by the last action."""
    flash = _read_flash(request)
    context.setdefault("page", "")
    scope = Scope(caller.key.scope) if caller is not None else None
    nav = [(slug, label, scope is not None and scope.allows(needed)) for slug, label, needed in NAV]
    html = env.get_template(template).render(
        request_path=request.url.path, caller=caller, key=caller.key if caller else None, nav=nav,
        csrf=csrf_token(caller.console_session) if caller is not None else context.pop("login_csrf", ""),  # type: ignore[attr-defined]
        flash=flash, version=__version__, **context)
    response = HTMLResponse(html, status_code=status, headers=HEADERS)
    if flash is not None:
        response.delete_cookie(FLASH, path=PATH, httponly=True, samesite="strict", secure=secure(request))
    return response


def redirect(request: Request, url: str, message: str | None = None, error: bool = False) -> RedirectResponse:
    """303 to ``url`` (a console path), leaving ``message`` for the next page."""
    response = RedirectResponse(url, status_code=303, headers={"Cache-Control": "no-store"})
    if message:
        response.set_cookie(FLASH, quote(json.dumps({"text": message[:600], "error": error})), path=PATH,
                            httponly=True, samesite="strict", secure=secure(request))
    return response


def _read_flash(request: Request) -> dict[str, Any] | None:
    raw = request.cookies.get(FLASH)
    if not raw:
        return None
    try:
        value = json.loads(unquote(raw))
        return {"text": str(value["text"]), "error": bool(value.get("error"))}
    except (ValueError, KeyError, TypeError):
        return None


def install_handlers(app: FastAPI) -> None:
    """Console refusals as pages: back to sign-in for a missing or dead key, a 403 page for a narrow scope."""

    async def sign_in(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SignInRequired)
        response = RedirectResponse(f"{PATH}/login{'?refused=1' if exc.refused else ''}", status_code=303)
        if exc.refused:
            response.delete_cookie(COOKIE, path=PATH, httponly=True, samesite="strict", secure=secure(request))
        return response

    async def too_narrow(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ScopeTooNarrow)
        caller = await session_caller(request, Scope.identify)
        return render(request, "denied.html", caller, status=403, needed=exc.needed.value)

    app.add_exception_handler(SignInRequired, sign_in)
    app.add_exception_handler(ScopeTooNarrow, too_narrow)


async def act(request: Request, caller: Caller, back: str,
              work: Callable[[FormData], tuple[str, str]]) -> Response:
    """An action from a form: check its token, run ``work(form)`` (a route call, off the event loop) which says
    where to go and what happened; a refusal goes back to ``back`` with its message."""
    try:
        form = await check_csrf(request, caller) or await request.form()
        url, message = await run_in_threadpool(work, form)
    except FaceDBError as exc:
        return redirect(request, back, str(exc), error=True)
    return redirect(request, url, message)


def _text(form: FormData, field: str, default: str = "") -> str:
    value = form.get(field)
    return value.strip() if isinstance(value, str) else default


def _person_url(name: str) -> str:
    return f"{PATH}/people/{quote(name, safe='')}"


# ----------------------------------------------------------------------------------------------- signing in
@router.get("", response_class=HTMLResponse)
@router.get("/", response_class=HTMLResponse)
async def home(request: Request) -> Response:
    if signed_in(request) is None:
        return RedirectResponse(f"{PATH}/login", status_code=303)
    caller = await session_caller(request, Scope.identify)
    first = "people" if Scope(caller.key.scope).allows(Scope.enroll) else "identify"
    return RedirectResponse(f"{PATH}/{first}", status_code=303)


def _login_page(request: Request, status: int = 200, message: str | None = None, error: bool = False) -> Response:
    """The sign-in page, with the anti-forgery token its form must repeat (in a cookie of its own: double
    submit; kept while the browser has one, so two tabs agree)."""
    token = request.cookies.get(LOGIN_COOKIE) or new_token()
    response = render(request, "login.html", status=status, message=message, error=error, login_csrf=token)
    if request.cookies.get(LOGIN_COOKIE) != token:
        response.set_cookie(LOGIN_COOKIE, token, path=PATH, httponly=True, samesite="strict", secure=secure(request))
    return response


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, refused: int = 0, out: int = 0) -> Response:
    message = ("Your session is no longer accepted (signed out, expired, or its key revoked): sign in again."
               if refused else "Signed out." if out else None)
    return _login_page(request, message=message, error=bool(refused))


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, key: Annotated[str, Form(max_length=200)] = "",
                csrf: Annotated[str, Form(max_length=100)] = "") -> Response:
    """Sign in: the form's token must repeat the sign-in cookie's (a foreign page cannot sign this browser in
    with a key of its choosing); the key is checked as the API checks it (throttled, failures recorded); a new
    session's token goes in the cookie, the key nowhere."""
    expected = request.cookies.get(LOGIN_COOKIE)
    if not expected or not hmac.compare_digest(csrf, expected):
        return _login_page(request, status=400, error=True,
                           message="The sign-in form's token is missing or wrong: sign in again from this page.")
    try:
        caller = await admit(request, key.strip(), Scope.identify)
    except AuthenticationError:
        return _login_page(request, status=401, error=True,
                           message="This key was refused: it is wrong, unknown or revoked.")
    except TooManyRequestsError as exc:
        response = _login_page(request, status=429, error=True, message="Too many refused keys from here: try "
                               f"again in {math.ceil(exc.retry_after)} seconds.")
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        return response
    token = new_token()
    await run_in_threadpool(_start, caller, token)
    response = RedirectResponse(f"{PATH}/", status_code=303)
    response.set_cookie(COOKIE, token, path=PATH, httponly=True, samesite="strict", secure=secure(request))
    response.delete_cookie(LOGIN_COOKIE, path=PATH, httponly=True, samesite="strict", secure=secure(request))
    return response


def _start(caller: Caller, token: str) -> None:
    from .session import IDLE_S

    with caller as db:
        db.start_console_session(token_hash(token), caller.key.id, now=time.time(), idle_s=IDLE_S,
                                 absolute_s=ABSOLUTE_S)


@router.post("/logout")
async def logout(request: Request) -> Response:
    """Sign out: the session is deleted on the server (a copy of the cookie stops working too); the form's
    anti-forgery token must match the session (another site cannot sign this browser out)."""
    response = RedirectResponse(f"{PATH}/login?out=1", status_code=303)
    try:
        caller = await session_caller(request, Scope.identify)
    except SignInRequired:  # no live session: nothing to end on the server
        response.delete_cookie(COOKIE, path=PATH, httponly=True, samesite="strict", secure=secure(request))
        return response
    await check_csrf(request, caller)
    await run_in_threadpool(_end, caller, token_hash(caller.console_session))  # type: ignore[attr-defined]
    response.delete_cookie(COOKIE, path=PATH, httponly=True, samesite="strict", secure=secure(request))
    return response


def _end(caller: Caller, hashed: str) -> None:
    with caller as db:
        db.end_console_session(hashed)


# ------------------------------------------------------------------------------------------ check a photo
@router.get("/identify", response_class=HTMLResponse)
def identify_page(request: Request, caller: Annotated[Caller, Depends(IDENTIFY)]) -> HTMLResponse:
    return render(request, "identify.html", caller, page="identify", faces=None)


@router.post("/identify", response_class=HTMLResponse)
async def identify_form(request: Request, caller: Annotated[Caller, Depends(IDENTIFY)]) -> Response:
    """Without the script: the photo as a plain form upload, the answers as a list."""
    form = await check_csrf(request, caller) or await request.form()
    photo = form.get("photo")
    try:
        if not isinstance(photo, StarletteUpload) or not photo.filename:
            raise InvalidInputError("choose a photo first")
        out = await run_in_threadpool(routes_query.identify_photo, photo, caller)
    except FaceDBError as exc:
        return render(request, "identify.html", caller, status=error_response(exc).status_code, page="identify",
                      faces=None, error=str(exc))
    return render(request, "identify.html", caller, page="identify", faces=out["faces"])


@router.post("/api/identify")
async def identify_api(request: Request, caller: Annotated[Caller, Depends(IDENTIFY)],
                       photo: Annotated[UploadFile, File()]) -> dict[str, Any]:
    await check_csrf(request, caller)
    return await run_in_threadpool(routes_query.identify_photo, photo, caller)  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------------------- people
@router.get("/people", response_class=HTMLResponse)
def people_page(request: Request, caller: Annotated[Caller, Depends(ENROLL)],
                q: Annotated[str, Query(max_length=200)] = "",
                page: Annotated[int, Query(le=10**9)] = 1) -> HTMLResponse:
    page = max(1, page)  # a page number typed into the address bar: the first page, not an error
    out = routes_people.list_people(caller, q.strip() or None, limit=PAGE, offset=(page - 1) * PAGE)
    pages = max(1, math.ceil(out["total"] / PAGE))
    return render(request, "people.html", caller, page="people", people=out["people"], total=out["total"],
                  q=q.strip(), current=page, pages=pages)


@router.get("/people/{name:path}", response_class=HTMLResponse)
def person_page(request: Request, name: str, caller: Annotated[Caller, Depends(ENROLL)]) -> HTMLResponse:
    try:
        person = routes_people.show_person(name, caller)
        templates = routes_people.list_templates(name, caller)["templates"]
    except PersonNotFoundError as exc:
        return render(request, "notfound.html", caller, status=404, page="people", message=str(exc))
    meta = [(k, v if isinstance(v, str) else json.dumps(v), not isinstance(v, str))
            for k, v in sorted(person["metadata"].items())]
    thumbnails = caller.db.settings().thumbnails
    return render(request, "person.html", caller, page="people", person=person, templates=templates, meta=meta,
                  thumbnails=thumbnails)


@router.post("/people/{name:path}/rename")
async def rename(request: Request, name: str, caller: Annotated[Caller, Depends(ENROLL)]) -> Response:
    def work(form: FormData) -> tuple[str, str]:
        new = _text(form, "new_name")
        person = routes_people.rename_person(name, routes_people.Rename(new_name=new), caller)
        return _person_url(person["name"]), f"Renamed {name} to {person['name']}."

    return await act(request, caller, _person_url(name), work)


@router.post("/people/{name:path}/update")
async def update(request: Request, name: str, caller: Annotated[Caller, Depends(ENROLL)]) -> Response:
    def work(form: FormData) -> tuple[str, str]:
        person = routes_people.show_person(name, caller)
        metadata = _metadata_from(form, person["metadata"])
        ext = _text(form, "external_id")
        body = routes_people.PersonUpdate(metadata=metadata, replace_metadata=True,
                                          external_id=ext or None, clear_external_id=not ext)
        routes_people.update_person(name, body, caller)
        return _person_url(name), f"Saved {name}'s details."

    return await act(request, caller, _person_url(name), work)


def _metadata_from(form: FormData, old: dict[str, Any]) -> dict[str, Any]:
    """The metadata a person's form describes: each row kept (value in the type it had: text stays text, a
    number or a JSON value is read back as JSON), dropped if ticked, plus the new row if filled."""
    out: dict[str, Any] = {}
    for i in range(len(old) + 1):
        key = _text(form, f"meta_key_{i}")
        if not key or form.get(f"meta_drop_{i}"):
            continue
        raw = _text(form, f"meta_value_{i}")
        if key in old and not isinstance(old[key], str):
            try:
                out[key] = json.loads(raw)
                continue
            except ValueError:
                pass
        out[key] = raw
    new_key, new_value = _text(form, "meta_key_new"), _text(form, "meta_value_new")
    if new_key:
        out[new_key] = new_value
    return out


@router.post("/people/{name:path}/remove")
async def remove(request: Request, name: str, caller: Annotated[Caller, Depends(ENROLL)]) -> Response:
    def work(form: FormData) -> tuple[str, str]:
        import unicodedata

        typed = unicodedata.normalize("NFC", _text(form, "confirm"))
        if typed != unicodedata.normalize("NFC", name):
            raise InvalidInputError(f"to remove {name}, type their name exactly as shown; nothing was removed")
        out = routes_people.remove_person(name, caller)
        return f"{PATH}/people", (f"Removed {out['removed']}: {out['templates']} template(s), their photos' "
                                  "records, metadata and face thumbnails were erased.")

    return await act(request, caller, _person_url(name), work)


@router.post("/templates/{template_id}/remove")
async def remove_template(request: Request, template_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
                          caller: Annotated[Caller, Depends(ENROLL)]) -> Response:
    def work(form: FormData) -> tuple[str, str]:
        out = routes_people.remove_template(template_id, caller)
        return _person_url(out["person"]), f"Removed template {template_id} of {out['person']}."

    return await act(request, caller, f"{PATH}/people", work)


@router.get("/thumbs/{kind}/{owner_id}")
async def thumbnail(request: Request, kind: str, owner_id: Annotated[int, Path(ge=1, le=2**63 - 1)]) -> Response:
    """A face thumbnail shown on a page (whose own read was recorded): templates and unknown visitors need
    enroll, decisions' probes admin."""
    needed = {"template": ENROLL, "visitor": ENROLL, "probe": ADMIN}.get(kind)
    if needed is None:
        return error_response(InvalidInputError("a thumbnail is of a template, a visitor or a probe"))
    caller = await needed(request)
    try:
        return await run_in_threadpool(routes_people.thumbnail_response, caller, kind, owner_id, note=False)
    except FaceDBError as exc:
        return error_response(exc)


# ------------------------------------------------------------------------------------------------- enrol
@router.get("/enrol", response_class=HTMLResponse)
def enrol_page(request: Request, caller: Annotated[Caller, Depends(ENROLL)],
               name: Annotated[str, Query(max_length=300)] = "") -> HTMLResponse:
    return render(request, "enrol.html", caller, page="enrol", name=name, report=None)


@router.post("/enrol", response_class=HTMLResponse)
async def enrol_form(request: Request, caller: Annotated[Caller, Depends(ENROLL)]) -> Response:
    """Without the script: the photos as a plain form upload, the per-photo report as a table."""
    form = await check_csrf(request, caller) or await request.form()
    name = _text(form, "name")
    photos = [p for p in form.getlist("photos") if isinstance(p, StarletteUpload) and p.filename]
    try:
        if not name:
            raise InvalidInputError("give the person's name")
        if not photos:
            raise InvalidInputError("choose at least one photo")
        out = await run_in_threadpool(_enrol, caller, name, photos)
    except FaceDBError as exc:
        return render(request, "enrol.html", caller, status=error_response(exc).status_code, page="enrol",
                      name=name, report=getattr(exc, "report", None), error=str(exc))
    return render(request, "enrol.html", caller, page="enrol", name=name, report=out)


def _enrol(caller: Caller, name: str, photos: list[Any]) -> dict[str, Any]:
    response = routes_people.enroll_photos(name, photos, caller, OnMultiple.error,
                                           OnOtherMatch.warn, True, None)
    return json.loads(response.body)  # type: ignore[no-any-return]


@router.post("/api/check")
async def check_api(request: Request, caller: Annotated[Caller, Depends(ENROLL)],
                    photo: Annotated[UploadFile, File()]) -> dict[str, Any]:
    await check_csrf(request, caller)
    return await run_in_threadpool(routes_people.check_photo, photo, caller)  # type: ignore[no-any-return]


@router.post("/api/enrol")
async def enrol_api(request: Request, caller: Annotated[Caller, Depends(ENROLL)],
                    name: Annotated[str, Form(max_length=300)], photos: Annotated[list[UploadFile], File()]
                    ) -> JSONResponse:
    await check_csrf(request, caller)
    out = await run_in_threadpool(_enrol, caller, name.strip(), photos)
    return JSONResponse(out, status_code=201 if out["faces_stored"] else 200)


# ---------------------------------------------------------------------------------------------- decisions
@router.get("/decisions", response_class=HTMLResponse)
def decisions_page(request: Request, caller: Annotated[Caller, Depends(ADMIN)],
                   since: Annotated[str, Query(max_length=40)] = "24h",
                   key: Annotated[str, Query(max_length=40)] = "",
                   decision: Annotated[str, Query(max_length=10)] = "",
                   person: Annotated[str, Query(max_length=300)] = "") -> HTMLResponse:
    filters = {"since": since, "key": key, "decision": decision, "person": person}
    try:
        records = _decisions(caller, filters, None)
        error = None
    except FaceDBError as exc:
        records, error = [], str(exc)
    keys = _key_names(caller)
    return render(request, "decisions.html", caller, page="decisions", records=records, keys=keys,
                  filters=filters, error=error, last_id=max((r["id"] for r in records), default=0))


@router.get("/api/decisions")
def decisions_api(caller: Annotated[Caller, Depends(ADMIN)],
                  after_id: Annotated[int, Query(ge=0, le=2**62)] = 0,
                  since: Annotated[str, Query(max_length=40)] = "24h",
                  key: Annotated[str, Query(max_length=40)] = "",
                  decision: Annotated[str, Query(max_length=10)] = "",
                  person: Annotated[str, Query(max_length=300)] = "") -> dict[str, Any]:
    filters = {"since": since, "key": key, "decision": decision, "person": person}
    records = _decisions(caller, filters, after_id)
    names = _key_names(caller)
    for r in records:
        r["key_name"] = names.get(r["actor"] or "", "")
    return {"records": records}


def _decisions(caller: Caller, filters: dict[str, str], after_id: int | None) -> list[dict[str, Any]]:
    """Decision records (search, identify, verify) newest first, through the audit route (which records the
    read; a live poll that finds nothing new is not recorded)."""
    decision = routes_admin.Decision(filters["decision"]) if filters["decision"] in ("match", "unknown") else None
    out = routes_admin.audit(caller, since=filters["since"] or None, until=None, operation="decisions",
                             actor=f"key:{filters['key']}" if filters["key"] else None,
                             identity=filters["person"] or None, decision=decision, after_id=after_id,
                             order=routes_admin.Order.desc, limit=DECISION_ROWS, offset=0)
    rows = []
    for r in out["records"]:
        detail = r.get("detail") or {}
        verdict = ("accepted" if r["identity"] else "rejected") if r["operation"] == "verify" else \
            ("match" if r["identity"] else "unknown")
        rows.append({"id": r["id"], "time": r["time"], "when": _when(r["time"]), "actor": r["actor"],
                     "operation": r["operation"], "decision": verdict, "identity": r["identity"],
                     "similarity": _score(r["similarity"]), "threshold": _score(r["threshold"]),
                     "faces": detail.get("faces"), "thumbnail": r.get("has_thumbnail", False)})
    return rows


def _key_names(caller: Caller) -> dict[str, str]:
    """{actor: key name} for every key (a door's name beside its key id)."""
    return {k.actor: k.name or "" for k in caller.db.api_keys()}


# ----------------------------------------------------------------------------------------- unknown visitors
@router.get("/visitors", response_class=HTMLResponse)
def visitors_page(request: Request, caller: Annotated[Caller, Depends(ENROLL)],
                  since: Annotated[str, Query(max_length=40)] = "",
                  min_size: Annotated[int, Query(le=1000)] = 2) -> HTMLResponse:
    min_size = max(1, min_size)
    out = routes_visitors.list_visitors(caller, since=since or None, min_size=min_size)
    keys = _key_names(caller)
    return render(request, "visitors.html", caller, page="visitors", groups=out["groups"], enabled=out["enabled"],
                  retention=out["retention_days"], since=since, min_size=min_size, keys=keys,
                  thumbnails=caller.db.settings().thumbnails)


@router.post("/visitors/{group}/enroll")
async def visitors_enroll(request: Request, group: Annotated[str, Path(max_length=40)],
                          caller: Annotated[Caller, Depends(ENROLL)]) -> Response:
    def work(form: FormData) -> tuple[str, str]:
        name = _text(form, "name")
        if not name:
            raise InvalidInputError("give the name to enrol the group as")
        out = routes_visitors.enroll_visitors(group, routes_visitors.EnrollGroup(name=name), caller)
        return _person_url(out["person"]["name"]), f"Enrolled visitor group {group} as {out['person']['name']}."

    return await act(request, caller, f"{PATH}/visitors", work)


@router.post("/visitors/{group}/forget")
async def visitors_forget(request: Request, group: Annotated[str, Path(max_length=40)],
                          caller: Annotated[Caller, Depends(ENROLL)]) -> Response:
    def work(form: FormData) -> tuple[str, str]:
        out = routes_visitors.forget_visitors(group, caller)
        return f"{PATH}/visitors", f"Forgot visitor group {group}: {out['forgotten']} face(s) erased."

    return await act(request, caller, f"{PATH}/visitors", work)


# ------------------------------------------------------------------------------------------------ settings
@router.get("/settings", response_class=HTMLResponse)
def settings_page(request: Request, caller: Annotated[Caller, Depends(ADMIN)]) -> HTMLResponse:
    return _settings_page(request, caller)


def _settings_page(request: Request, caller: Caller, status: int = 200, **shown: Any) -> HTMLResponse:
    settings = routes_admin.get_settings(caller)
    stats = routes_admin.stats(caller)
    keys = routes_admin.list_keys(caller)["keys"]
    hooks = routes_admin.list_hooks(caller)["hooks"]
    return render(request, "settings.html", caller, status=status, page="settings", s=settings, stats=stats,
                  keys=keys, hooks=hooks, events=EVENTS, **shown)


def _number(form: FormData, field: str) -> float | None:
    raw = _text(form, field)
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise InvalidInputError(f"{field.replace('_', ' ')} must be a number, got {raw!r}") from None


@router.post("/settings/threshold")
async def settings_threshold(request: Request, caller: Annotated[Caller, Depends(ADMIN)]) -> Response:
    def work(form: FormData) -> tuple[str, str]:
        value = _number(form, "threshold")
        if value is None:
            raise InvalidInputError("give a threshold (a cosine similarity in [-1, 1])")
        source = _text(form, "source") or "set in the console"
        routes_admin.update_settings(routes_admin.SettingsUpdate(threshold=value, threshold_source=source), caller)
        return f"{PATH}/settings", f"Threshold set to {value:g} ({source})."

    return await act(request, caller, f"{PATH}/settings", work)


@router.post("/settings/rule")
async def settings_rule(request: Request, caller: Annotated[Caller, Depends(ADMIN)]) -> Response:
    def work(form: FormData) -> tuple[str, str]:
        rule = _text(form, "rule")
        if rule not in ("fixed", "margin", "gallery"):
            raise InvalidInputError("the decision rule is fixed, margin or gallery")
        target = _number(form, "target") if rule == "gallery" else None  # the form always sends the field
        routes_admin.update_settings(routes_admin.SettingsUpdate(decision_rule=RuleKind(rule),
                                                                 decision_target=target), caller)
        return f"{PATH}/settings", f"Decision rule set to {rule}."

    return await act(request, caller, f"{PATH}/settings", work)


@router.post("/settings/keeping")
async def settings_keeping(request: Request, caller: Annotated[Caller, Depends(ADMIN)]) -> Response:
    def work(form: FormData) -> tuple[str, str]:
        mode = _text(form, "thumbnails")
        if mode not in ("off", "enrolled", "all"):
            raise InvalidInputError("thumbnails is off, enrolled or all")
        body = routes_admin.SettingsUpdate(
            thumbnails=ThumbnailMode(mode), visitors_enabled=bool(form.get("visitors_enabled")),
            visitors_retention_days=_number(form, "visitors_retention_days"),
            audit_retention_days=_number(form, "audit_retention_days"),
            audit_store_probes=bool(form.get("audit_store_probes")))
        routes_admin.update_settings(body, caller)
        return f"{PATH}/settings", "Saved what the database keeps."

    return await act(request, caller, f"{PATH}/settings", work)


@router.post("/settings/keys", response_class=HTMLResponse)
async def settings_key_create(request: Request, caller: Annotated[Caller, Depends(ADMIN)]) -> Response:
    """The new key is shown on this answer's page and nowhere else (not in a redirect, a cookie or a URL)."""
    form = await check_csrf(request, caller) or await request.form()
    try:
        scope = _text(form, "scope")
        if scope not in ("identify", "enroll", "admin"):
            raise InvalidInputError("a key's scope is identify, enroll or admin")
        body = routes_admin.NewKey(scope=Scope(scope), name=_text(form, "name") or None)
        made = await run_in_threadpool(routes_admin.create_key, body, caller)
    except FaceDBError as exc:
        return _settings_page(request, caller, status=error_response(exc).status_code, error=str(exc))
    return _settings_page(request, caller, status=201, new_key=made)


@router.post("/settings/keys/{ref}/revoke")
async def settings_key_revoke(request: Request, ref: Annotated[str, Path(max_length=200)],
                              caller: Annotated[Caller, Depends(ADMIN)]) -> Response:
    def work(form: FormData) -> tuple[str, str]:
        key = routes_admin.revoke_key(ref, caller)
        return f"{PATH}/settings", f"Revoked key {key['name'] or key['id']}: its next request is refused."

    return await act(request, caller, f"{PATH}/settings", work)


@router.post("/settings/hooks", response_class=HTMLResponse)
async def settings_hook_add(request: Request, caller: Annotated[Caller, Depends(ADMIN)]) -> Response:
    """The signing secret is shown on this answer's page only."""
    form = await check_csrf(request, caller) or await request.form()
    try:
        events = [e for e in form.getlist("events") if isinstance(e, str)]
        if not events:
            raise InvalidInputError("choose at least one event for the webhook")
        body = routes_admin.NewHook(url=_text(form, "url"), events=events, key_id=_text(form, "key_id") or None)
        made = await run_in_threadpool(routes_admin.add_hook, body, caller)
    except FaceDBError as exc:
        return _settings_page(request, caller, status=error_response(exc).status_code, error=str(exc))
    return _settings_page(request, caller, status=201, new_hook=made)


@router.post("/settings/hooks/{hook_id}/remove")
async def settings_hook_remove(request: Request, hook_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
                               caller: Annotated[Caller, Depends(ADMIN)]) -> Response:
    def work(form: FormData) -> tuple[str, str]:
        hook = routes_admin.remove_hook(hook_id, caller)
        return f"{PATH}/settings", f"Removed the webhook to {hook['url']}."

    return await act(request, caller, f"{PATH}/settings", work)
