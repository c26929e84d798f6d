"""The ``people`` table: who is enrolled, their names, external ids and metadata, and the order and search keys
stored beside each name (migration 11; the rules are :mod:`~facedb.gallery.store.names`).

Its own family because every list, lookup, rename and merge of people goes through it, in every interface.
Removing or merging a person also touches their templates and thumbnails (the foreign keys cascade): the change
log records it (:class:`~facedb.gallery.store.changes.ChangeLog`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from ...errors import DuplicatePersonError, InvalidInputError, PersonNotFoundError
from ...records import Person
from .connection import StoreBase
from .migrations import NAME_KEYS_VERSION, THUMBNAILS_VERSION
from .names import (
    _check_external_id,
    _check_metadata,
    _search_needle,
    check_name,
    name_search_text,
    name_sort_key,
    normalise_name,
)
from .times import utcnow


class PeopleRows(StoreBase):
    """The people of a :class:`~facedb.gallery.store.Store`."""

    @property
    def _PERSON_SQL(self) -> str:
        own = " AND e.derived = 0" if self._has_derived else ""  # a mean template is not one of their photos
        return f"""
        SELECT p.id, p.name, p.external_id, p.metadata, p.created_at, p.updated_at,
               (SELECT COUNT(*) FROM embeddings e WHERE e.person_id = p.id{own}),
               (SELECT COUNT(*) FROM images i WHERE i.person_id = p.id)
        FROM people p
    """

    @staticmethod
    def _person(row: Sequence[Any]) -> Person:
        return Person(
            id=row[0], name=row[1], external_id=row[2], metadata=json.loads(row[3]),
            created_at=row[4], updated_at=row[5], templates=row[6], images=row[7],
        )

    def person(self, name: str) -> Person:
        name = normalise_name(name)
        row = self.conn.execute(self._PERSON_SQL + " WHERE p.name = ?", (name,)).fetchone()
        if row is None:
            raise PersonNotFoundError(f"no person named {name!r}")
        return self._person(row)

    def people(self, query: str | None = None, limit: int | None = None, offset: int = 0) -> list[Person]:
        """People in name order (:func:`name_sort_key`); ``query`` keeps those whose name or external id
        contains it, case- and accent-insensitively (:func:`name_search_key`). Every list of people in every
        interface comes from here."""
        if self.version < NAME_KEYS_VERSION:
            return self._people_unkeyed(query, limit, offset)
        sql, params = self._PERSON_SQL, []
        if query:
            sql += " WHERE instr(p.search_key, ?) > 0"  # instr, not LIKE: the query's % and _ are just text
            params.append(_search_needle(query))
        sql += " ORDER BY p.sort_key"
        if limit is not None:
            sql += " LIMIT ? OFFSET ?"
            params += [int(limit), int(offset)]
        return [self._person(r) for r in self.conn.execute(sql, params).fetchall()]

    def count_people(self, query: str | None = None) -> int:
        """How many :meth:`people` lists without a limit."""
        if not query:
            return int(self.conn.execute("SELECT COUNT(*) FROM people").fetchone()[0])
        if self.version < NAME_KEYS_VERSION:
            return len(self._unkeyed_ids(query))
        return int(self.conn.execute("SELECT COUNT(*) FROM people WHERE instr(search_key, ?) > 0",
                                     (_search_needle(query),)).fetchone()[0])

    def _unkeyed_ids(self, query: str | None) -> list[int]:
        """:meth:`people`'s ids for a database opened read-only before migration 11 gave it stored keys: the
        same keys, computed here."""
        needle = _search_needle(query) if query else None
        rows = self.conn.execute("SELECT id, name, external_id FROM people").fetchall()
        return [pid for _, pid in sorted((name_sort_key(name), pid) for pid, name, ext in rows
                                         if needle is None or needle in name_search_text(name, ext))]

    def _people_unkeyed(self, query: str | None, limit: int | None, offset: int) -> list[Person]:
        ids = self._unkeyed_ids(query)
        ids = ids[int(offset):] if limit is None else ids[int(offset):int(offset) + int(limit)]
        found = {r[0]: self._person(r) for r in self._rows_in(self._PERSON_SQL + " WHERE p.id IN ({marks})", ids)}
        return [found[pid] for pid in ids if pid in found]

    def _set_name_keys(self, pid: int) -> None:
        """Store person ``pid``'s order and search keys for their name and external id as they are now (in the
        caller's write transaction: every change to either calls this)."""
        name, ext = self.conn.execute("SELECT name, external_id FROM people WHERE id = ?", (pid,)).fetchone()
        self.conn.execute("UPDATE people SET sort_key = ?, search_key = ? WHERE id = ?",
                          (name_sort_key(name), name_search_text(name, ext), pid))

    def person_by_id(self, person_id: int) -> Person:
        row = self.conn.execute(self._PERSON_SQL + " WHERE p.id = ?", (int(person_id),)).fetchone()
        if row is None:
            raise PersonNotFoundError(f"no person with id {person_id}")
        return self._person(row)

    def people_by_external_ids(self, external_ids: Sequence[str]) -> dict[str, str]:
        """{external id: name} for those of ``external_ids`` that a person has."""
        return {ext: name for ext, name in self._rows_in(
            "SELECT external_id, name FROM people WHERE external_id IN ({marks})", list(external_ids))}

    def person_by_external_id(self, external_id: str) -> Person:
        row = self.conn.execute(self._PERSON_SQL + " WHERE p.external_id = ?", (external_id,)).fetchone()
        if row is None:
            raise PersonNotFoundError(f"no person with external id {external_id!r}")
        return self._person(row)

    def _person_id(self, name: str) -> int:
        name = normalise_name(name)
        row = self.conn.execute("SELECT id FROM people WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise PersonNotFoundError(f"no person named {name!r}")
        return int(row[0])

    def _insert_person(self, name: str, external_id: str | None, metadata: dict[str, Any] | None) -> int:
        name = check_name(name)
        meta_json = _check_metadata(metadata)
        if external_id is not None:
            _check_external_id(external_id)
        if self.conn.execute("SELECT 1 FROM people WHERE name = ?", (name,)).fetchone():
            raise DuplicatePersonError(f"a person named {name!r} already exists")
        if external_id is not None and self.conn.execute(
            "SELECT 1 FROM people WHERE external_id = ?", (external_id,)
        ).fetchone():
            raise DuplicatePersonError(f"external id {external_id!r} is already used")
        now = utcnow()
        return int(
            self.db["people"]
            .insert({"name": name, "external_id": external_id, "metadata": meta_json,
                     "created_at": now, "updated_at": now, "sort_key": name_sort_key(name),
                     "search_key": name_search_text(name, external_id)})
            .last_pk
        )

    def add_person(self, name: str, external_id: str | None = None, metadata: dict[str, Any] | None = None) -> Person:
        with self.write():
            self._insert_person(name, external_id, metadata)
        return self.person(name)

    def rename_person(self, old: str, new: str) -> Person:
        new = check_name(new)
        with self.write():
            pid = self._person_id(old)
            other = self.conn.execute("SELECT id FROM people WHERE name = ?", (new,)).fetchone()
            if other is not None and other[0] != pid:
                raise DuplicatePersonError(f"a person named {new!r} already exists")
            self.conn.execute("UPDATE people SET name = ?, updated_at = ? WHERE id = ?", (new, utcnow(), pid))
            self._set_name_keys(pid)
            self._bump("people_version")
        return self.person(new)

    def update_person(self, name: str, *, metadata: dict[str, Any] | None = None, replace: bool = False,
                      external_id: str | None = None, clear_external_id: bool = False) -> Person:
        """Change a person's metadata (merged in, a key set to None is deleted; all of it with ``replace``)
        and/or external id, in one transaction."""
        if metadata is not None:
            _check_metadata(metadata)
        if external_id is not None:
            _check_external_id(external_id)
        with self.write():
            pid = self._person_id(name)
            fields: dict[str, Any] = {"updated_at": utcnow()}
            if metadata is not None:
                current = {} if replace else json.loads(
                    self.conn.execute("SELECT metadata FROM people WHERE id = ?", (pid,)).fetchone()[0])
                current.update(metadata)
                fields["metadata"] = _check_metadata({k: v for k, v in current.items() if v is not None})
            if external_id is not None:
                other = self.conn.execute("SELECT id FROM people WHERE external_id = ?", (external_id,)).fetchone()
                if other is not None and other[0] != pid:
                    raise DuplicatePersonError(f"external id {external_id!r} is already used")
                fields["external_id"] = external_id
            elif clear_external_id:
                fields["external_id"] = None
            self.db["people"].update(pid, fields)
            if "external_id" in fields:
                self._set_name_keys(pid)  # a search matches external ids too
                self._bump("people_version")  # answers carry the external id: cached names must be re-read
        return self.person(name)

    def update_metadata(self, name: str, metadata: dict[str, Any]) -> Person:
        """Merge ``metadata`` into the person's metadata (a key set to None is deleted)."""
        return self.update_person(name, metadata=metadata)

    def remove_person(self, name: str) -> list[int]:
        """Delete the person with their images and templates in one transaction; returns the template ids."""
        with self.write():
            pid = self._person_id(name)
            ids = [r[0] for r in self.conn.execute("SELECT id FROM embeddings WHERE person_id = ?", (pid,))]
            if self.version >= THUMBNAILS_VERSION:  # the faces of the decisions that named them; the decisions stay
                stored = self.conn.execute("SELECT name FROM people WHERE id = ?", (pid,)).fetchone()[0]
                self.conn.execute("DELETE FROM thumbnails WHERE audit_id IN (SELECT id FROM audit WHERE identity = ?)",
                                  (stored,))
            # Cascades to images, embeddings and their thumbnails; secure_delete zeroes the freed pages.
            self.conn.execute("DELETE FROM people WHERE id = ?", (pid,))
            self._bump_generation([], ids)
            self._bump("people_version")
        return ids

    def merge_people(self, source: str, target: str) -> list[int]:
        """Move every template and photo of ``source`` to ``target`` and delete ``source`` (its metadata is
        merged under the target's: the target's keys win), in one transaction; returns the moved template ids.
        The index sees each moved template removed and added again under its new person."""
        with self.write():
            src, dst = self._person_id(source), self._person_id(target)
            if src == dst:
                raise InvalidInputError("a person cannot be merged into themselves")
            ids = [r[0] for r in self.conn.execute("SELECT id FROM embeddings WHERE person_id = ?", (src,))]
            meta_src, meta_dst = (json.loads(self.conn.execute("SELECT metadata FROM people WHERE id = ?",
                                                               (p,)).fetchone()[0]) for p in (src, dst))
            self.conn.execute("UPDATE embeddings SET person_id = ? WHERE person_id = ?", (dst, src))
            self.conn.execute("UPDATE images SET person_id = ? WHERE person_id = ?", (dst, src))
            self.conn.execute("DELETE FROM people WHERE id = ?", (src,))
            self.conn.execute("UPDATE people SET metadata = ?, updated_at = ? WHERE id = ?",
                              (_check_metadata({**meta_src, **meta_dst}), utcnow(), dst))
            added, removed = self._refresh_mean(dst)
            gen = self.generation() + 1
            self.conn.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(gen),))
            self.conn.executemany("INSERT INTO changes (generation, embedding_id, op) VALUES (?, ?, ?)",
                                  [(gen, i, op) for i in ids for op in ("remove", "add")]
                                  + [(gen, i, "remove") for i in removed] + [(gen, i, "add") for i in added])
            self._bump("people_version")
        return [i for i in ids if i not in set(removed)]

    def names(self, person_ids: Sequence[int]) -> dict[int, tuple[str, str | None]]:
        """{person id: (name, external id)} for the people among ``person_ids`` that exist."""
        return {pid: (name, ext) for pid, name, ext in self._rows_in(
            "SELECT id, name, external_id FROM people WHERE id IN ({marks})", sorted({int(p) for p in person_ids}))}

    def stream_people(self) -> Iterator[tuple[int, str, str | None]]:
        """Every person's (id, name, external id), read through a connection of its own (a background thread
        preloads the names a query shows: ``memo.NameCache``)."""
        conn = self._connect(self.path, readonly=True, key=self._key)
        try:
            yield from conn.execute("SELECT id, name, external_id FROM people")
        finally:
            conn.close()

