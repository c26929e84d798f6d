"""The ``thumbnails`` table: a face JPEG belonging to exactly one template, audit record or kept unknown face,
deleted with it (foreign keys). What the JPEGs are and when they are kept is :mod:`facedb.gallery.thumbnails`;
this module only stores and reads them.

Its own family because three others own thumbnails (templates, the audit trail, the unknown visitors) and
insert theirs through :meth:`ThumbnailRows._insert_thumbnails`, each on its own connection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from ...errors import InvalidInputError
from .connection import Connection, StoreBase
from .migrations import THUMBNAILS_VERSION


class ThumbnailRows(StoreBase):
    """The face thumbnails of a :class:`~facedb.gallery.store.Store`."""

    _THUMB_OWNERS: ClassVar[dict[str, str]] = {"template": "embedding_id", "probe": "audit_id",
                                               "visitor": "visitor_id"}

    def _insert_thumbnails(self, conn: Connection, column: str, ids: Sequence[int],
                           jpegs: Sequence[bytes | None]) -> None:
        """Inside the caller's transaction: a thumbnail row for each (owner id, JPEG) whose JPEG is given."""
        rows = [(int(i), bytes(j)) for i, j in zip(ids, jpegs) if j]
        if rows and self.version >= THUMBNAILS_VERSION:
            conn.executemany(f"INSERT INTO thumbnails ({column}, jpeg) VALUES (?, ?)", rows)

    def thumbnail(self, kind: str, owner_id: int) -> bytes | None:
        """The JPEG kept for a template (``kind`` "template"), an audit record ("probe") or a kept unknown face
        ("visitor") with id ``owner_id``, or None."""
        if kind not in self._THUMB_OWNERS:
            raise InvalidInputError(f"a thumbnail belongs to a {', '.join(self._THUMB_OWNERS)}")
        if self.version < THUMBNAILS_VERSION:
            return None
        row = self.conn.execute(f"SELECT jpeg FROM thumbnails WHERE {self._THUMB_OWNERS[kind]} = ?",
                                (int(owner_id),)).fetchone()
        return bytes(row[0]) if row else None

    def thumbnail_owners(self, kind: str, owner_ids: Sequence[int]) -> set[int]:
        """Which of ``owner_ids`` (templates, audit records or kept faces, by ``kind``) have a thumbnail."""
        if self.version < THUMBNAILS_VERSION or not owner_ids:
            return set()
        column = self._THUMB_OWNERS[kind]
        return {int(r[0]) for r in self._rows_in(f"SELECT {column} FROM thumbnails WHERE {column} IN ({{marks}})",
                                                 [int(i) for i in owner_ids])}

    def cover_templates(self, person_ids: Sequence[int]) -> dict[int, int]:
        """{person id: the id of their first template that has a thumbnail}, for the people among
        ``person_ids`` that have one (a list of people shows that face beside each name)."""
        if self.version < THUMBNAILS_VERSION or not person_ids:
            return {}
        return {int(p): int(e) for p, e in self._rows_in(
            "SELECT e.person_id, MIN(e.id) FROM thumbnails t JOIN embeddings e ON e.id = t.embedding_id "
            "WHERE e.person_id IN ({marks}) GROUP BY e.person_id", sorted({int(p) for p in person_ids}))}

    def count_thumbnails(self) -> dict[str, int]:
        """How many thumbnails are kept, by kind."""
        if self.version < THUMBNAILS_VERSION:
            return {k: 0 for k in self._THUMB_OWNERS}
        return {k: int(self.conn.execute(f"SELECT COUNT(*) FROM thumbnails WHERE {c} IS NOT NULL").fetchone()[0])
                for k, c in self._THUMB_OWNERS.items()}

    def drop_thumbnails(self, kinds: Sequence[str]) -> int:
        """Delete every thumbnail of ``kinds`` (in the caller's transaction, or one of its own); returns how many."""
        if self.version < THUMBNAILS_VERSION or not kinds:
            return 0
        where = " OR ".join(f"{self._THUMB_OWNERS[k]} IS NOT NULL" for k in kinds)
        with self.write():
            return int(self.conn.execute(f"DELETE FROM thumbnails WHERE {where}").rowcount)
