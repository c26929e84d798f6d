"""The audit trail: every decision (identify, search, verify) and every change to the gallery (enrol, remove,
rename, merge, calibrate, ...) is appended with its time, operation, **actor** (who asked: a CLI user, an API
key id), image SHA-256, the decided identity (None = unknown), score, threshold and model.

Who the actor is comes from the context: :func:`acting_as` sets it for the code inside it (per thread and per
asyncio task, through a ``ContextVar``), so one FaceDB can serve many callers; outside any such block the
FaceDB's default actor is used. Records are written even by a FaceDB opened read-only (a door reader opens
read-only; its decisions are still logged).

**When a record is written** (``audit-settings --sync/--async``, ``AuditSettings.sync``):

* *Gallery changes* (enrol, remove, rename, merge, calibrate, keys, ...) are always written before the call
  returns, in their own transaction after the change's (as before), together with any decision records still
  waiting, so the trail keeps the order things happened in.
* *Decisions* (identify, search, verify, and the service's reads and refusals), **sync**: committed before the
  answer is returned; a record that cannot be written fails the call, so no decision is given without its
  record on disk (``synchronous=NORMAL``: it survives a process crash; a power cut can lose the last
  transactions since the last WAL checkpoint).
* *Decisions*, **async** (the default for new databases): the answer returns at once and its record joins a
  queue that a background thread commits as one transaction (a group commit) at most ``FLUSH_DELAY_S``
  (20 ms) after the first record waiting, on ``close()``, before any read of the trail, with any gallery
  change, and at interpreter exit. Each record keeps the time of its decision. What can be lost: a process
  killed (SIGKILL, OOM, a crash in native code) loses the records of decisions answered in its last ~20 ms
  plus one commit; a power cut loses those and what ``synchronous=NORMAL`` loses. If the background write
  fails (disk full, a lock held past the 30 s busy timeout, a read-only file), the records stay queued and
  the **next** decision call retries them itself and, if that fails too, raises the error instead of
  answering: a failure is never silent, and at most the decisions answered while the failed write was in
  flight (~20 ms) were given before it surfaced.
"""

from __future__ import annotations

import atexit
import contextlib
import getpass
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from datetime import datetime
from typing import Any

import numpy as np

from ..errors import DatabaseError
from ..gallery import thumbnails
from ..gallery.scores import to_blob
from ..gallery.settings import Settings
from ..gallery.store import Store, utcnow
from ..records import AuditRecord

#: The background writer commits waiting decision records at most this long after the first of them.
FLUSH_DELAY_S = 0.020

#: Operations that record a decision, or a look at the data (``read-*``), rather than a change: with the trail
#: not ``sync``, their records may be committed after the answer. Every other operation is a change and is
#: committed before its call returns.
DECISIONS = frozenset({"identify", "search", "verify", "detect", "check", "denied"})


def deferrable(operation: str) -> bool:
    return operation in DECISIONS or operation.startswith("read-")

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
    """Appends decision records to the store's ``audit`` table (directly, or through a background writer) and
    reads them back."""

    def __init__(self, store: Store, actor: str) -> None:
        self.store = store
        self.actor = actor
        self._pending: list[tuple[Any, ...]] = []  # records (Store.audit_row) not yet committed, oldest first
        self._retention: float | None = None  # as of the newest record waiting
        self._cond = threading.Condition()
        self._flushing = threading.Lock()  # one group commit at a time, so the trail keeps its order
        self._writer: threading.Thread | None = None
        self._closed = False
        self.failure: BaseException | None = None  # why the last background write failed (records kept)
        self._proven = False  # a record was written by this trail: later decisions may be written after them
        _LIVE.add(self)

    def record(self, operation: str, records: Sequence[dict[str, Any]], settings: Settings) -> None:
        """Append ``records`` (dicts with any of image_sha256, identity, similarity, threshold, detail, vector,
        thumbnail) as ``operation`` by the current actor, unless the trail is switched off. The probe's vector is
        kept only when the trail is configured to store probes, its thumbnail (a JPEG) only when the database
        keeps probe thumbnails (:mod:`facedb.gallery.thumbnails`). A decision or a read (:func:`deferrable`) may be
        committed by the background writer after this returns, when the trail is not ``sync``; anything else
        is committed before. DatabaseError when the record cannot be written (a decision's: when an earlier
        background write failed and still does)."""
        if not records or not settings.audit.enabled:
            return
        actor = current_actor(self.actor)
        now = utcnow()
        keep_thumbnail = thumbnails.keeps(settings.thumbnails, "probe")
        rows = []
        for rec in records:
            row = {k: v for k, v in rec.items() if k not in ("vector", "thumbnail")}
            if keep_thumbnail and rec.get("thumbnail"):
                row["thumbnail"] = rec["thumbnail"]
            row.update(operation=operation, model_id=settings.model_id, actor=actor, time=now)
            vector = rec.get("vector")
            if settings.audit.store_probes and vector is not None:
                row["embedding"] = to_blob(np.asarray(vector))
            rows.append(self.store.audit_row(row))  # made here: the writer thread does as little as it can
        retention = settings.audit.retention_days or None
        if not settings.audit.sync and deferrable(operation) and not self._closed and self._proven:
            if self.failure is not None:
                self.flush()  # retry what the writer could not write; raises if it still cannot
            with self._cond:
                self._pending.extend(rows)
                self._retention = retention
                if self._writer is None:
                    self._writer = threading.Thread(target=self._write_loop, name="facedb-audit", daemon=True)
                    self._writer.start()
                self._cond.notify()
            return
        # Synchronous: a change, a sync trail, or the first decision of this trail, so that a trail that cannot
        # be written at all (a read-only folder or file system) refuses before any answer is given.
        with self._cond:
            self._pending.extend(rows)
            self._retention = retention
        try:
            self.flush()
        except BaseException:
            if deferrable(operation):
                # a decision that fails gives no answer: its records go (older waiting ones stay, in order); a
                # change's records stay to be retried, since the change itself is already made
                mine = {id(r) for r in rows}
                with self._cond:
                    self._pending = [r for r in self._pending if id(r) not in mine]
            raise
        self._proven = True

    def flush(self) -> None:
        """Commit every waiting record now, in one transaction (DatabaseError if it cannot be: they stay
        waiting, in order)."""
        with self._flushing:
            with self._cond:
                rows, self._pending = self._pending, []
                retention = self._retention
            if not rows:
                self.failure = None
                return
            try:
                self.store.append_audit_rows(rows, retention)
            except BaseException as exc:
                with self._cond:
                    self._pending[:0] = rows
                self.failure = exc
                if isinstance(exc, DatabaseError):
                    raise DatabaseError(f"the audit trail cannot be written ({exc}); {len(self._pending)} "
                                        "records wait to be written; no decision is given until they are"
                                        ) from None
                raise
            self.failure = None

    def _write_loop(self) -> None:
        """The background writer: wait for a record, give others FLUSH_DELAY_S to join it, commit them all."""
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            time.sleep(FLUSH_DELAY_S)
            try:
                self.flush()
            except BaseException:  # kept in self.failure: the next decision call retries, and raises
                with self._cond:
                    if not self._closed:
                        self._cond.wait(1.0)  # back off before trying again

    def close(self) -> None:
        """Commit what waits and stop the writer (DatabaseError if the last records cannot be written)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        _LIVE.discard(self)
        self.flush()

    def read(self, since: str | datetime | None = None, limit: int | None = None, *,
             until: str | datetime | None = None,
             operation: str | Sequence[str] | None = None, actor: str | None = None, offset: int = 0,
             **filters: Any) -> list[AuditRecord]:
        """Records oldest first, filtered by time (anything :func:`~facedb.gallery.store.utc_time` takes: ISO 8601 with
        any offset, naive = UTC, or an age; ``since`` inclusive, ``until`` exclusive), operation and actor,
        paged by ``limit`` / ``offset``; ``filters`` are :meth:`Store.audit`'s others (identity, decided,
        after_id, newest_first). Waiting records are committed first."""
        if self._pending:
            self.flush()
        return [AuditRecord(**row) for row in self.store.audit(since, limit, until=until, operation=operation,
                                                               actor=actor, offset=offset, **filters)]


_LIVE: weakref.WeakSet[AuditTrail] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    """A program that ends without closing its FaceDB still writes the records of the decisions it gave."""
    for trail in list(_LIVE):
        with contextlib.suppress(Exception):
            trail.flush()
