"""The operator console: web pages served by ``facedb serve`` at ``/console`` (``--no-console`` turns it off).

Server-rendered HTML (Jinja2 templates in ``templates/``) with one small script (``static/console.js``) for
uploads with face boxes, the camera, and the live decisions table; every asset is served from ``static/``, so
nothing is fetched from anywhere else at run time, and there is no build step. Its rooms: ``session`` (signing
in with an API key held in an HttpOnly session cookie, anti-forgery tokens), ``views`` (the pages and their
actions).

Every page and action calls the API's own route functions (``routes_*``) with the signed-in key's
:class:`~facedb.service.auth.Caller`: the same scopes, the same audit records (``key:<id>``), the same webhooks
and the same errors. There is no second authorisation system: a page needs the scope its routes need
(identify: check a photo; enroll: people, enrolment, unknown visitors; admin: decisions, settings, keys,
webhooks).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

HERE = Path(__file__).resolve().parent


def install(app: FastAPI) -> None:
    """Add the console's pages, actions and static files to ``app``."""
    from starlette.staticfiles import StaticFiles

    from . import views

    app.include_router(views.router)
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")
    views.install_handlers(app)
