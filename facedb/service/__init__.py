"""``facedb serve``: the HTTP service for access-control systems (FastAPI on uvicorn).

The only package that imports FastAPI, uvicorn or httpx (``pip install 'facedb[service]'``). Its rooms:
``config`` (settings from options and the environment), ``errors`` (FaceDBError -> HTTP status, the one
table), ``auth`` (API keys as a FastAPI dependency), ``state`` (the resident database, model and index, and
readiness), ``delivery`` (webhook sending with httpx), ``routes_*`` (the resources), ``app`` (the factory and
the transport middleware: body size limit, CORS), ``metrics`` (``GET /metrics``: the only module that imports
prometheus_client), ``logs`` (request ids, JSON request lines) and ``server`` (uvicorn, one or N workers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app


def __getattr__(name: str) -> Any:
    if name == "create_app":  # FastAPI only when asked for: `from facedb.service.config import ...` stays light
        from .app import create_app

        return create_app
    raise AttributeError(name)


__all__ = ["create_app"]
