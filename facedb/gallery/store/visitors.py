"""The ``unassigned_faces`` table: faces answered unknown, kept (opt-in) for a retention period to be grouped,
then enrolled as someone's templates or forgotten. No person and no name: a time, who asked, the photo's hash,
the face box and the vector.

Its own family because its rows are written on the query path through the audit trail's connection, expire on
their own, and leave only by becoming templates (:meth:`VisitorRows.enroll_unassigned`) or by erasure.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...errors import DatabaseError, InvalidInputError, PersonNotFoundError
from ..scores import to_blob
from .connection import Connection, StoreBase
from .migrations import THUMBNAILS_VERSION
from .names import check_name
from .times import retention_cutoff, utcnow


class VisitorRows(StoreBase):
    """The unknown visitors' faces of a :class:`~facedb.gallery.store.Store`."""

    def _has_unassigned(self, conn: Connection | None = None) -> bool:
        """Whether the table exists: a database opened read-only before its migration lacks it."""
        return (conn or self.conn).execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'unassigned_faces'").fetchone() is not None

    def append_unassigned(self, rows: Sequence[dict[str, Any]], retention_days: float) -> None:
        """Keep faces answered unknown (dicts with vector, and any of actor, image_sha256, box, det_score,
        similarity) and drop those past the retention period, in one transaction. Written through the audit
        trail's connection: a door reader opens read-only and its unknown faces are kept too, without an fsync
        per search (they survive a process crash; a power cut can lose the last few, as for the audit trail)."""
        if not rows:
            return
        # The audit trail's background writer uses this connection too: under its lock, one transaction at a
        # time. Without it this transaction could join the writer's (``_transaction`` joins an open one) and read
        # the audit row's id as the face's (a thumbnail's FOREIGN KEY failed in CI, at a load of ~3).
        with self._audit_lock:  # type: ignore[attr-defined]
            self._append_unassigned(rows, retention_days)

    def _append_unassigned(self, rows: Sequence[dict[str, Any]], retention_days: float) -> None:
        conn = self._audit_connection()
        if not self._has_unassigned(conn):
            return
        now = utcnow()
        with self._transaction(conn, "keep unknown faces"):
            ids = [int(conn.execute(
                "INSERT INTO unassigned_faces (time, actor, image_sha256, box, det_score, similarity, vector) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (now, r.get("actor"), r.get("image_sha256"),
                 json.dumps([round(float(c), 2) for c in r["box"]]) if r.get("box") is not None else None,
                 r.get("det_score"), r.get("similarity"), to_blob(r["vector"]))).lastrowid) for r in rows]
            self._insert_thumbnails(conn, "visitor_id", ids, [r.get("thumbnail") for r in rows])
            conn.execute("DELETE FROM unassigned_faces WHERE time < ?", (retention_cutoff(retention_days),))

    def purge_unassigned(self, retention_days: float) -> int:
        """Delete unknown faces older than the retention period; returns how many."""
        if self.readonly or not self._has_unassigned():
            return 0
        with self.write():
            return self.conn.execute("DELETE FROM unassigned_faces WHERE time < ?",
                                     (retention_cutoff(retention_days),)).rowcount

    def unassigned(self, retention_days: float) -> tuple[list[tuple[Any, ...]], np.ndarray]:
        """Every unknown face kept and within the retention period, in id order, from one snapshot: (rows of
        (id, time, actor, image_sha256, box, det_score, similarity), vectors ``(n, dim)``)."""
        if not self._has_unassigned():
            return [], np.zeros((0, self.dim), dtype=np.float32)
        with self.read():
            raw = self.conn.execute(
                "SELECT id, time, actor, image_sha256, box, det_score, similarity, vector FROM unassigned_faces "
                "WHERE time >= ? ORDER BY id", (retention_cutoff(retention_days),)).fetchall()
        rows = [(r[0], r[1], r[2], r[3], json.loads(r[4]) if r[4] else None, r[5], r[6]) for r in raw]
        return rows, self._vectors([r[7] for r in raw])

    def _unassigned_rows(self, ids: Sequence[int]) -> list[tuple[Any, ...]]:
        rows = sorted(self._rows_in(
            "SELECT id, image_sha256, box, det_score, vector FROM unassigned_faces WHERE id IN ({marks})",
            [int(i) for i in ids]))
        if len(rows) != len(set(int(i) for i in ids)):
            raise InvalidInputError(f"{len(set(ids)) - len(rows)} of the group's faces are no longer kept (expired, "
                                    "enrolled or forgotten meanwhile): nothing was changed; list the groups again")
        return rows

    def enroll_unassigned(self, ids: Sequence[int], name: str) -> list[int]:
        """Move the unknown faces ``ids`` to the person ``name`` (created if new) as templates, in one
        transaction: all of them or none. A face's photo becomes an image row of that person unless another
        person's enrolment already holds that photo (the template then has no image row; its box is kept).
        Returns the new template ids."""
        name = check_name(name)
        now = utcnow()
        with self.write():
            rows = self._unassigned_rows(ids)
            try:
                pid = self._person_id(name)
            except PersonNotFoundError:
                pid = self._insert_person(name, None, None)
            images: dict[str, int | None] = {}
            new_ids: list[int] = []
            for face_id, sha, box, det_score, blob in rows:
                if len(blob) != 4 * self.dim:
                    raise DatabaseError(f"{self.path}: a kept face has the wrong size; nothing was changed")
                image_id = None
                if sha is not None:
                    if sha not in images:
                        owner = self.conn.execute("SELECT id, person_id FROM images WHERE sha256 = ?",
                                                  (sha,)).fetchone()
                        if owner is None:
                            images[sha] = int(self.db["images"].insert(
                                {"sha256": sha, "person_id": pid, "created_at": now}).last_pk)
                        else:
                            images[sha] = int(owner[0]) if owner[1] == pid else None
                    image_id = images[sha]
                cur = self.conn.execute(
                    "INSERT INTO embeddings (person_id, image_id, box, det_score, vector, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)", (pid, image_id, box, det_score, blob, now))
                new_ids.append(int(cur.lastrowid))
                if self.version >= THUMBNAILS_VERSION:  # the face's thumbnail becomes the template's
                    self.conn.execute("UPDATE thumbnails SET embedding_id = ?, visitor_id = NULL WHERE visitor_id = ?",
                                      (new_ids[-1], face_id))
            list(self._rows_in("DELETE FROM unassigned_faces WHERE id IN ({marks})", [r[0] for r in rows]))
            self.conn.execute("UPDATE people SET updated_at = ? WHERE id = ?", (now, pid))
            added, removed = self._refresh_mean(pid)
            self._bump_generation(new_ids + added, removed)
        return new_ids

    def forget_unassigned(self, ids: Sequence[int]) -> int:
        """Erase the unknown faces ``ids`` (all or none), and the copies of their vectors that the audit trail
        kept if it stores probes; ``secure_delete`` zeroes the freed pages, ``vacuum`` drops them."""
        with self.write():
            rows = self._unassigned_rows(ids)
            blobs = [r[4] for r in rows]
            list(self._rows_in("DELETE FROM unassigned_faces WHERE id IN ({marks})", [r[0] for r in rows]))
            if self.version >= 2 and blobs:
                list(self._rows_in("UPDATE audit SET embedding = NULL WHERE embedding IN ({marks})", blobs))
        return len(rows)

