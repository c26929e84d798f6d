"""The ``audit`` table: one record per decision and change (time, operation, actor, photo hash, identity,
score, threshold, model, detail, optionally the probe's template and thumbnail), written through a connection
of its own.

Its own family because it is written on every search, from a background thread or before the answer, and its
connection is not the store's: ``synchronous=NORMAL`` (no fsync per decision), read-write even when the store
was opened read-only (a door reader's decisions are logged too). The unknown visitors' faces are written
through the same connection (:mod:`~facedb.gallery.store.visitors`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .connection import Connection, StoreBase
from .migrations import THUMBNAILS_VERSION
from .times import retention_cutoff, utc_time, utcnow


class AuditRows(StoreBase):
    """The audit trail of a :class:`~facedb.gallery.store.Store`."""

    def __init__(self, path: Path, conn: Connection, key: str | None = None) -> None:
        super().__init__(path, conn, key)
        self._audit_conn: Connection | None = None
        # The audit connection is shared by every thread using this store, and FaceDB records some decisions
        # outside its own lock (so that a search does not wait for another's record): one transaction at a time.
        self._audit_lock = threading.Lock()

    def close(self) -> None:
        if self._audit_conn is not None:
            self._audit_conn.close()
        super().close()

    def _audit_connection(self) -> Connection:
        # Decisions are logged on every search, so their commits must not cost an fsync each: a connection of
        # their own with synchronous=NORMAL (in WAL mode that survives a process crash; a power cut can lose
        # the last records before the next checkpoint). Templates and people stay synchronous=FULL.
        if self._audit_conn is None:
            conn = self._connect(self.path, readonly=False, key=self._key)
            conn.execute("PRAGMA synchronous = NORMAL")
            self._audit_conn = conn
        return self._audit_conn

    _AUDIT_COLUMNS = ("time", "operation", "image_sha256", "identity", "similarity", "threshold", "model_id",
                      "detail", "embedding", "actor")

    def audit_row(self, r: dict[str, Any]) -> tuple[Any, ...]:
        """One record as the tuple :meth:`append_audit_rows` inserts (its ``time`` defaults to now): the audit
        table's columns (:attr:`_AUDIT_COLUMNS`, those this schema has), then the probe's thumbnail (JPEG bytes
        or None), which goes to the thumbnails table under the record's id."""
        # a given time is stored in the one form (utc_time), or text comparisons with it would be wrong
        row = (utc_time(r.get("time"), "an audit record's time") or utcnow(), r["operation"], r.get("image_sha256"),
               r.get("identity"), r.get("similarity"), r.get("threshold"), r["model_id"],
               json.dumps(r["detail"]) if r.get("detail") else None, r.get("embedding"))
        if self.version >= 3:
            row = (*row, r.get("actor"))
        return (*row, r.get("thumbnail"))

    def append_audit(self, rows: Sequence[dict[str, Any]], retention_days: float | None) -> None:
        """Append decision records (one transaction) and drop those older than the retention period. A row's
        ``time`` is when it was recorded (default: now), so that records written later in a group keep theirs.

        Written through a connection of its own, read-write even when this store was opened read-only (a door
        reader's decisions are logged too); DatabaseError when the file cannot be written, so that no decision
        is answered without its record."""
        self.append_audit_rows([self.audit_row(r) for r in rows], retention_days)

    def append_audit_rows(self, rows: Sequence[tuple[Any, ...]], retention_days: float | None) -> None:
        """:meth:`append_audit` for rows made by :meth:`audit_row`. A group is inserted by multi-row statements,
        few SQLite calls: a background writer thread hands Python's GIL back and forth once per call, and every
        hand-over can make the thread answering queries wait."""
        if not rows:
            return
        if self.version < 2:  # a read-only open of a database made before the audit trail existed
            return
        with self._audit_lock:
            self._append_audit(rows, retention_days)

    def _append_audit(self, rows: Sequence[tuple[Any, ...]], retention_days: float | None) -> None:
        conn = self._audit_connection()
        cols = self._AUDIT_COLUMNS[:len(rows[0]) - 1]  # the last is the thumbnail
        marks = f"({', '.join('?' * len(cols))})"
        per = max(1, 30000 // len(cols))  # under SQLite's bound-parameter limit (32,766)
        with self._transaction(conn, "write the audit trail"):
            sql = f"INSERT INTO audit ({', '.join(cols)}) VALUES "
            if any(row[-1] for row in rows):  # one insert at a time: each thumbnail needs its record's id
                ids = [int(conn.execute(sql + marks, row[:-1]).lastrowid) for row in rows]
                self._insert_thumbnails(conn, "audit_id", ids, [row[-1] for row in rows])
            else:
                for start in range(0, len(rows), per):
                    chunk = rows[start:start + per]
                    conn.execute(sql + ", ".join([marks] * len(chunk)), [v for row in chunk for v in row[:-1]])
            if retention_days is not None:
                conn.execute("DELETE FROM audit WHERE time < ?", (retention_cutoff(retention_days),))

    def audit(self, since: str | datetime | None = None, limit: int | None = None, *,
              until: str | datetime | None = None, operation: str | Sequence[str] | None = None,
              actor: str | None = None, offset: int = 0,
              identity: str | None = None, decided: bool | None = None, after_id: int | None = None,
              newest_first: bool = False) -> list[dict[str, Any]]:
        """Audit records at or after ``since`` and before ``until`` (anything :func:`utc_time` takes), of one
        operation (or any of several) and one actor if given, about ``identity`` if given, with an identity
        (``decided`` True) or none (False: unknown, rejected), with ids above ``after_id``; oldest first (or
        newest first), paged by ``limit`` / ``offset``."""
        if self.version < 2:
            return []
        # Compared as text, so both bounds go through utc_time (the stored form) whatever form they came in.
        since, until = utc_time(since, "since"), utc_time(until, "until")
        where = ["time >= ?"]
        params: list[Any] = [since or ""]
        if until is not None:
            where.append("time < ?")
            params.append(until)
        if isinstance(operation, str):
            where.append("operation = ?")
            params.append(operation)
        elif operation is not None:
            ops = list(operation)
            where.append(f"operation IN ({','.join('?' * len(ops))})" if ops else "0")
            params.extend(ops)
        if actor is not None and self.version >= 3:
            where.append("actor = ?")
            params.append(actor)
        if identity is not None:
            where.append("identity = ?")
            params.append(identity)
        if decided is not None:
            where.append("identity IS NOT NULL" if decided else "identity IS NULL")
        if after_id is not None:
            where.append("id > ?")
            params.append(int(after_id))
        actor_col = "actor" if self.version >= 3 else "NULL"
        thumb_col = ("EXISTS (SELECT 1 FROM thumbnails t WHERE t.audit_id = audit.id)"
                     if self.version >= THUMBNAILS_VERSION else "0")
        sql = (f"SELECT id, time, operation, {actor_col}, image_sha256, identity, similarity, threshold, model_id, "
               f"detail, embedding IS NOT NULL, {thumb_col} FROM audit WHERE {' AND '.join(where)} ORDER BY id"
               f"{' DESC' if newest_first else ''}")
        if limit is not None or offset:
            sql += " LIMIT ? OFFSET ?"
            params += [-1 if limit is None else int(limit), int(offset)]
        keys = ("id", "time", "operation", "actor", "image_sha256", "identity", "similarity", "threshold",
                "model_id", "detail", "has_embedding", "has_thumbnail")
        out = []
        for row in self.conn.execute(sql, params):
            rec = dict(zip(keys, row))
            rec["detail"] = json.loads(rec["detail"]) if rec["detail"] else None
            rec["has_embedding"] = bool(rec["has_embedding"])
            rec["has_thumbnail"] = bool(rec["has_thumbnail"])
            out.append(rec)
        return out

