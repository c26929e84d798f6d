"""The audit trail: every decision (identify, search, verify) and every change to the gallery (enrol, remove,
rename, merge, calibrate, ...) is appended with its time, operation, **actor** (who asked: a CLI user, an API
key id), image SHA-256, the decided identity (None = unknown), score, threshold and model.

Who the actor is comes from the context: :func:`acting_as` sets it for the code inside it (per thread and per
asyncio task, through a ``ContextVar``), so one FaceDB can serve many callers; outside any such block the
FaceDB's default actor is used. Records are written even by a FaceDB opened read-only (a door reader opens
read-only; its decisions are still logged), and a record that cannot be written fails the call: no decision
is given without its record.
"""

from __future__ import annotations

import contextlib
import getpass
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import numpy as np

from . import thumbnails
from .records import AuditRecord
from .scores import to_blob
from .settings import Settings
from .store import Store

_ACTOR: ContextVar[str | None] = ContextVar("facedb_actor", default=None)


def default_actor(kind: str = "local") -> str:
    """``kind:user`` for the user running this process (e.g. ``cli:alice``)."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment (a container without passwd entries)
        user = "unknown"
    return f"{kind}:{user}"


@contextlib.contextmanager
def acting_as(actor: str) -> Iterator[None]:
    """Record everything done inside the block as done by ``actor`` (e.g. ``key:3f2a`` for an API key)."""
    token = _ACTOR.set(actor)
    try:
        yield
    finally:
        _ACTOR.reset(token)


def current_actor(fallback: str) -> str:
    return _ACTOR.get() or fallback


class AuditTrail:
    """Appends decision records to the store's ``audit`` table and reads them back."""

    def __init__(self, store: Store, actor: str) -> None:
        self.store = store
        self.actor = actor

    def record(self, operation: str, records: Sequence[dict[str, Any]], settings: Settings) -> None:
        """Append ``records`` (dicts with any of image_sha256, identity, similarity, threshold, detail, vector,
        thumbnail) as ``operation`` by the current actor, unless the trail is switched off. The probe's vector is
        kept only when the trail is configured to store probes, its thumbnail (a JPEG) only when the database
        keeps probe thumbnails (:mod:`facedb.thumbnails`)."""
        if not records or not settings.audit.enabled:
            return
        actor = current_actor(self.actor)
        keep_thumbnail = thumbnails.keeps(settings.thumbnails, "probe")
        rows = []
        for rec in records:
            row = {k: v for k, v in rec.items() if k not in ("vector", "thumbnail")}
            if keep_thumbnail and rec.get("thumbnail"):
                row["thumbnail"] = rec["thumbnail"]
            row.update(operation=operation, model_id=settings.model_id, actor=actor)
            vector = rec.get("vector")
            if settings.audit.store_probes and vector is not None:
                row["embedding"] = to_blob(np.asarray(vector))
            rows.append(row)
        self.store.append_audit(rows, settings.audit.retention_days or None)

    def read(self, since: str | None = None, limit: int | None = None, *, until: str | None = None,
             operation: str | Sequence[str] | None = None, actor: str | None = None, offset: int = 0,
             **filters: Any) -> list[AuditRecord]:
        """Records oldest first, filtered by time (ISO 8601 UTC, ``since`` inclusive, ``until`` exclusive),
        operation and actor, paged by ``limit`` / ``offset``; ``filters`` are :meth:`Store.audit`'s others
        (identity, decided, after_id, newest_first)."""
        return [AuditRecord(**row) for row in self.store.audit(since, limit, until=until, operation=operation,
                                                               actor=actor, offset=offset, **filters)]
