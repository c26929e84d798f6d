"""The SQLite store: the source of truth for people, images, templates and settings.

This is the only module that talks to SQLite (through sqlite-utils). Choices, and why:

* WAL journal, ``synchronous=FULL``: readers never block the writer, and a transaction that returned is on disk
  even across a power cut, not only a process crash.
* Writers are serialised by SQLite's own write lock, taken up front with ``BEGIN IMMEDIATE`` (so two writers
  queue on ``busy_timeout`` rather than fail half-way with SQLITE_BUSY on a lock upgrade).
* ``secure_delete=ON``: deleted rows are overwritten with zeros, so a removed template does not linger in
  free pages (erasure).
* ``AUTOINCREMENT`` ids: a template id is never reused, so a stale index can never point at someone else.
* A ``generation`` counter, bumped by every write that adds or removes templates, plus a ``changes`` log of
  (generation, template id, op): an index at generation g catches up by replaying the log instead of a rebuild.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import sqlite_utils

from .errors import (
    DatabaseError,
    DatabaseExistsError,
    DuplicatePersonError,
    InvalidInputError,
    PersonNotFoundError,
)
from .records import Person
from .scores import UNIT_TOLERANCE, from_blob, to_blob

FORMAT = "facedb"

#: Versioned migrations: entry i takes the schema from version i to i + 1 (PRAGMA user_version).
MIGRATIONS: list[str] = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE people (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        external_id TEXT UNIQUE,
        metadata TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE images (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        person_id INTEGER NOT NULL REFERENCES people(id) ON DELETE CASCADE,
        sha256 TEXT NOT NULL UNIQUE,
        path TEXT,
        size INTEGER,
        width INTEGER,
        height INTEGER,
        created_at TEXT NOT NULL
    );
    CREATE INDEX images_person ON images(person_id);
    CREATE TABLE embeddings (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        person_id INTEGER NOT NULL REFERENCES people(id) ON DELETE CASCADE,
        image_id INTEGER REFERENCES images(id) ON DELETE CASCADE,
        box TEXT,
        det_score REAL,
        vector BLOB NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX embeddings_person ON embeddings(person_id);
    CREATE INDEX embeddings_image ON embeddings(image_id);
    CREATE TABLE changes (
        generation INTEGER NOT NULL,
        embedding_id INTEGER NOT NULL,
        op TEXT NOT NULL CHECK (op IN ('add', 'remove'))
    );
    CREATE INDEX changes_generation ON changes(generation);
    """,
    """
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        time TEXT NOT NULL,
        operation TEXT NOT NULL,
        image_sha256 TEXT,
        identity TEXT,
        similarity REAL,
        threshold REAL,
        model_id TEXT NOT NULL,
        detail TEXT,
        embedding BLOB
    );
    CREATE INDEX audit_time ON audit(time);
    INSERT OR IGNORE INTO meta (key, value) VALUES ('audit_enabled', '1');
    INSERT OR IGNORE INTO meta (key, value) VALUES ('audit_retention_days', '90');
    INSERT OR IGNORE INTO meta (key, value) VALUES ('audit_store_embeddings', '0');
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

#: How many generations of the change log to keep behind the saved index, so that processes holding a
#: slightly older index in memory can still catch up without a rebuild.
CHANGES_KEPT = 1000

MAX_NAME_LENGTH = 256


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InvalidInputError("a person's name must be a non-empty string")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidInputError(f"a person's name is at most {MAX_NAME_LENGTH} characters")
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        raise InvalidInputError("a person's name may not contain control characters")
    if name != name.strip():
        raise InvalidInputError("a person's name may not start or end with white space")
    return name


def _check_metadata(metadata: object) -> str:
    if metadata is None:
        return "{}"
    if not isinstance(metadata, dict):
        raise InvalidInputError("metadata must be a JSON object (a dict)")
    try:
        return json.dumps(metadata, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"metadata is not JSON-serialisable: {exc}") from None


class Store:
    """One SQLite database file. Use :meth:`create` or :meth:`open`; close with :meth:`close`."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn
        self.db = sqlite_utils.Database(conn)
        self._audit_conn: sqlite3.Connection | None = None
        self.dim = int(self.get_meta("dim", "0"))

    # ------------------------------------------------------------------ opening
    @staticmethod
    def _connect(path: Path, readonly: bool, new: bool = False) -> sqlite3.Connection:
        try:
            if readonly:
                conn = sqlite3.connect(
                    f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=30, check_same_thread=False
                )
            else:
                conn = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
            if new:
                # A 512-d template is a 2 KiB blob: with SQLite's default 4 KiB pages only one row fits a
                # page (half the file wasted); 16 KiB pages hold seven.
                conn.execute("PRAGMA page_size = 16384")
            conn.execute("PRAGMA busy_timeout = 30000")
            # 64 MiB of page cache (SQLite's default is 2 MiB): approximate indexes re-score every answer from
            # the stored vectors, and the people asked about again and again should stay in memory.
            conn.execute("PRAGMA cache_size = -65536")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA secure_delete = ON")
            if not readonly:
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.DatabaseError as exc:
            raise DatabaseError(f"{path}: cannot open as a facedb database ({exc})") from None
        return conn

    @classmethod
    def create(cls, path: Path, meta: dict[str, str]) -> Store:
        """Create a new store at ``path`` with the identity settings in ``meta`` (model_id, dim, ...)."""
        if path.exists() and path.stat().st_size > 0:
            raise DatabaseExistsError(f"{path} already exists")
        old_umask = os.umask(0o077)  # files private from birth: biometric data
        try:
            conn = cls._connect(path, readonly=False, new=True)
        finally:
            os.umask(old_umask)
        try:
            conn.execute("BEGIN IMMEDIATE")
            for script in MIGRATIONS:
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            now = utcnow()
            rows = {"format": FORMAT, "created_at": now, "generation": "0", "changes_floor": "0", **meta}
            conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", list(rows.items()))
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        return cls(path, conn)

    @classmethod
    def open(cls, path: Path, readonly: bool = False) -> Store:
        """Open an existing store; DatabaseError if it is missing or not a facedb database."""
        if not path.is_file():
            raise DatabaseError(f"no facedb database at {path} (create one with `facedb init`)")
        conn = cls._connect(path, readonly)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            fmt = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        except sqlite3.DatabaseError:
            conn.close()
            raise DatabaseError(f"{path} is not a facedb database") from None
        if fmt is None or fmt[0] != FORMAT:
            conn.close()
            raise DatabaseError(f"{path} is not a facedb database")
        if version > SCHEMA_VERSION:
            conn.close()
            raise DatabaseError(f"{path} has schema version {version}; this facedb knows up to {SCHEMA_VERSION}")
        store = cls(path, conn)
        if version < SCHEMA_VERSION and not readonly:
            store._migrate(version)
        return store

    def _migrate(self, version: int) -> None:
        with self.write():
            for script in MIGRATIONS[version:]:
                for statement in script.split(";"):
                    if statement.strip():
                        self.conn.execute(statement)
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        if self._audit_conn is not None:
            self._audit_conn.close()
        self.conn.close()

    # ------------------------------------------------------------ transactions
    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        """One write transaction, holding SQLite's write lock from its start. Nested use joins the outer one."""
        with self._transaction(self.conn, "write"):
            yield

    @contextlib.contextmanager
    def _transaction(self, conn: sqlite3.Connection, what: str) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT on ``conn``; any failure rolls back and surfaces as DatabaseError."""
        if conn.in_transaction:
            yield
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise DatabaseError(f"{self.path}: cannot {what} ({exc})") from None
        try:
            yield
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise DatabaseError(f"{self.path}: {what} failed, nothing was changed ({exc})") from None
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        """A read transaction: every query inside sees one consistent snapshot."""
        if self.conn.in_transaction:
            yield
            return
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            self._rollback()

    # -------------------------------------------------------------------- meta
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def all_meta(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM meta").fetchall())

    def set_meta(self, items: dict[str, str]) -> None:
        with self.write():
            self.db["meta"].upsert_all([{"key": k, "value": str(v)} for k, v in items.items()], pk="key")

    def generation(self) -> int:
        return int(self.get_meta("generation", "0") or 0)

    def _bump_generation(self, added: Sequence[int], removed: Sequence[int]) -> int:
        gen = self.generation() + 1
        self.conn.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(gen),))
        rows = [(gen, int(i), "add") for i in added] + [(gen, int(i), "remove") for i in removed]
        self.conn.executemany("INSERT INTO changes (generation, embedding_id, op) VALUES (?, ?, ?)", rows)
        return gen

    # ------------------------------------------------------------------ people
    _PERSON_SQL = """
        SELECT p.id, p.name, p.external_id, p.metadata, p.created_at, p.updated_at,
               (SELECT COUNT(*) FROM embeddings e WHERE e.person_id = p.id),
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
        row = self.conn.execute(self._PERSON_SQL + " WHERE p.name = ?", (name,)).fetchone()
        if row is None:
            raise PersonNotFoundError(f"no person named {name!r}")
        return self._person(row)

    def people(self) -> list[Person]:
        return [self._person(r) for r in self.conn.execute(self._PERSON_SQL + " ORDER BY p.name").fetchall()]

    def _person_id(self, name: str) -> int:
        row = self.conn.execute("SELECT id FROM people WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise PersonNotFoundError(f"no person named {name!r}")
        return int(row[0])

    def _insert_person(self, name: str, external_id: str | None, metadata: dict[str, Any] | None) -> int:
        name = _check_name(name)
        meta_json = _check_metadata(metadata)
        if external_id is not None and (not isinstance(external_id, str) or not external_id):
            raise InvalidInputError("external_id must be a non-empty string")
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
                     "created_at": now, "updated_at": now})
            .last_pk
        )

    def add_person(self, name: str, external_id: str | None = None, metadata: dict[str, Any] | None = None) -> Person:
        with self.write():
            self._insert_person(name, external_id, metadata)
        return self.person(name)

    def rename_person(self, old: str, new: str) -> Person:
        new = _check_name(new)
        with self.write():
            pid = self._person_id(old)
            if old != new and self.conn.execute("SELECT 1 FROM people WHERE name = ?", (new,)).fetchone():
                raise DuplicatePersonError(f"a person named {new!r} already exists")
            self.conn.execute("UPDATE people SET name = ?, updated_at = ? WHERE id = ?", (new, utcnow(), pid))
        return self.person(new)

    def update_metadata(self, name: str, metadata: dict[str, Any]) -> Person:
        """Merge ``metadata`` into the person's metadata (a key set to None is deleted)."""
        _check_metadata(metadata)
        with self.write():
            pid = self._person_id(name)
            current = json.loads(self.conn.execute("SELECT metadata FROM people WHERE id = ?", (pid,)).fetchone()[0])
            current.update(metadata)
            current = {k: v for k, v in current.items() if v is not None}
            self.conn.execute(
                "UPDATE people SET metadata = ?, updated_at = ? WHERE id = ?",
                (_check_metadata(current), utcnow(), pid),
            )
        return self.person(name)

    def remove_person(self, name: str) -> list[int]:
        """Delete the person with their images and templates in one transaction; returns the template ids."""
        with self.write():
            pid = self._person_id(name)
            ids = [r[0] for r in self.conn.execute("SELECT id FROM embeddings WHERE person_id = ?", (pid,))]
            # Cascades to images and embeddings; secure_delete zeroes the freed pages.
            self.conn.execute("DELETE FROM people WHERE id = ?", (pid,))
            self._bump_generation([], ids)
        return ids

    # --------------------------------------------------------------- templates
    def add_templates(
        self,
        name: str,
        vectors: np.ndarray,
        *,
        boxes: Sequence[Sequence[float] | None] | None = None,
        det_scores: Sequence[float | None] | None = None,
        image: dict[str, Any] | None = None,
        create_person: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> list[int]:
        """Store unit ``vectors`` (n, dim) for ``name``, with the image they came from, in one transaction.

        With ``create_person`` the person is created if missing (enrolment). ``image`` is a dict with sha256,
        path, size, width, height; the same sha256 cannot be stored twice.
        """
        n = len(vectors)
        boxes = list(boxes) if boxes is not None else [None] * n
        det_scores = list(det_scores) if det_scores is not None else [None] * n
        if len(boxes) != n or len(det_scores) != n:
            raise InvalidInputError("boxes and det_scores must have one entry per vector")
        now = utcnow()
        with self.write():
            try:
                pid = self._person_id(name)
                if metadata:
                    self.update_metadata(name, metadata)
            except PersonNotFoundError:
                if not create_person:
                    raise
                pid = self._insert_person(name, None, metadata)
            image_id = None
            if image is not None:
                owner = self.image_owner(image["sha256"])
                if owner is not None:
                    raise InvalidInputError(f"this photo is already enrolled (as {owner!r})")
                image_id = self.db["images"].insert({**image, "person_id": pid, "created_at": now}).last_pk
            sql = (
                "INSERT INTO embeddings (person_id, image_id, box, det_score, vector, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)"
            )
            ids = []
            for vec, box, score in zip(vectors, boxes, det_scores):
                cur = self.conn.execute(sql, (
                    pid,
                    image_id,
                    json.dumps([round(float(c), 2) for c in box]) if box is not None else None,
                    float(score) if score is not None else None,
                    to_blob(vec),
                    now,
                ))
                ids.append(int(cur.lastrowid))  # AUTOINCREMENT: never a reused id
            self.conn.execute("UPDATE people SET updated_at = ? WHERE id = ?", (now, pid))
            self._bump_generation(ids, [])
        return ids

    def image_owner(self, sha256: str) -> str | None:
        row = self.conn.execute(
            "SELECT p.name FROM images i JOIN people p ON p.id = i.person_id WHERE i.sha256 = ?", (sha256,)
        ).fetchone()
        return row[0] if row else None

    def _vectors(self, blobs: Sequence[bytes]) -> np.ndarray:
        if not blobs:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), self.dim).astype(np.float32)

    def snapshot(self, batch: int = 65536) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """(generation, template ids, person ids, vectors) of every template, from one consistent snapshot."""
        with self.read():
            gen = self.generation()
            ids: list[np.ndarray] = []
            pids: list[np.ndarray] = []
            vecs: list[np.ndarray] = []
            cursor = self.conn.execute("SELECT id, person_id, vector FROM embeddings ORDER BY id")
            while rows := cursor.fetchmany(batch):
                ids.append(np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)))
                pids.append(np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows)))
                vecs.append(self._vectors([r[2] for r in rows]))
        if not ids:
            empty = np.zeros(0, dtype=np.int64)
            return gen, empty, empty.copy(), np.zeros((0, self.dim), dtype=np.float32)
        return gen, np.concatenate(ids), np.concatenate(pids), np.concatenate(vecs)

    def template_map(self) -> tuple[int, np.ndarray, np.ndarray]:
        """(generation, template ids, person ids) of every template, sorted by id, from one snapshot."""
        with self.read():
            gen = self.generation()
            # From the (person_id, rowid) index alone: scanning the table would read every 2 KiB vector blob.
            rows = self.conn.execute("SELECT id, person_id FROM embeddings INDEXED BY embeddings_person").fetchall()
        arr = np.array(rows, dtype=np.int64).reshape(-1, 2)
        order = np.argsort(arr[:, 0], kind="stable")
        return gen, arr[order, 0], arr[order, 1]

    def templates(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, person ids, vectors) of the templates among ``ids`` that still exist, in id order."""
        out_ids: list[int] = []
        out_pids: list[int] = []
        blobs: list[bytes] = []
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), 900):  # SQLite's bound-parameter limit
            chunk = ids[start:start + 900]
            marks = ",".join("?" * len(chunk))
            for r in self.conn.execute(
                f"SELECT id, person_id, vector FROM embeddings WHERE id IN ({marks}) ORDER BY id", chunk
            ):
                out_ids.append(r[0])
                out_pids.append(r[1])
                blobs.append(r[2])
        return np.array(out_ids, dtype=np.int64), np.array(out_pids, dtype=np.int64), self._vectors(blobs)

    def person_vectors(self, person_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Every stored vector of the given people, grouped by person: (person id of each row, sorted; vectors
        ``(m, dim)``). One query and one buffer, since the query engine calls this for every probe."""
        keys = sorted({int(p) for p in person_ids})
        pids: list[int] = []
        blobs: list[bytes] = []
        for start in range(0, len(keys), 900):
            chunk = keys[start:start + 900]
            marks = ",".join("?" * len(chunk))
            for pid, blob in self.conn.execute(
                f"SELECT person_id, vector FROM embeddings WHERE person_id IN ({marks}) ORDER BY person_id", chunk
            ):
                pids.append(pid)
                blobs.append(blob)
        return np.array(pids, dtype=np.int64), self._vectors(blobs)

    def names(self, person_ids: Sequence[int]) -> dict[int, str]:
        keys = sorted({int(p) for p in person_ids})
        out: dict[int, str] = {}
        for start in range(0, len(keys), 900):
            chunk = keys[start:start + 900]
            marks = ",".join("?" * len(chunk))
            out.update(self.conn.execute(f"SELECT id, name FROM people WHERE id IN ({marks})", chunk).fetchall())
        return out

    def changes_since(self, generation: int) -> tuple[int, list[int], list[int]] | None:
        """(current generation, template ids added, ids removed) since ``generation``, net of each other.

        None when the log no longer reaches back that far (the caller must rebuild).
        """
        with self.read():
            current = self.generation()
            if generation < int(self.get_meta("changes_floor", "0") or 0) or generation > current:
                return None
            added: set[int] = set()
            removed: set[int] = set()
            for tid, op in self.conn.execute(
                "SELECT embedding_id, op FROM changes WHERE generation > ? ORDER BY generation", (generation,)
            ):
                if op == "add":
                    added.add(tid)
                elif tid in added:
                    added.discard(tid)  # added and removed since: never seen by the caller
                else:
                    removed.add(tid)
        return current, sorted(added), sorted(removed)

    def prune_changes(self, upto_generation: int) -> None:
        """Forget the change log up to ``upto_generation - CHANGES_KEPT``."""
        floor = upto_generation - CHANGES_KEPT
        if floor <= int(self.get_meta("changes_floor", "0") or 0):
            return
        with self.write():
            self.conn.execute("DELETE FROM changes WHERE generation <= ?", (floor,))
            self.conn.execute("UPDATE meta SET value = ? WHERE key = 'changes_floor'", (str(floor),))

    # ------------------------------------------------------------------- stats
    def counts(self) -> dict[str, int]:
        one = self.conn.execute
        return {
            "people": one("SELECT COUNT(*) FROM people").fetchone()[0],
            "images": one("SELECT COUNT(*) FROM images").fetchone()[0],
            "templates": one("SELECT COUNT(*) FROM embeddings").fetchone()[0],
        }

    def check(self) -> tuple[list[str], list[str]]:
        """(checks run, problems found) on the store alone."""
        checks: list[str] = []
        problems: list[str] = []
        integrity = [r[0] for r in self.conn.execute("PRAGMA integrity_check").fetchall()]
        checks.append("SQLite integrity_check")
        if integrity != ["ok"]:
            problems.extend(f"sqlite: {msg}" for msg in integrity[:10])
        fk = self.conn.execute("PRAGMA foreign_key_check").fetchall()
        checks.append("foreign keys")
        if fk:
            problems.append(f"{len(fk)} rows violate foreign keys")
        meta = self.all_meta()
        checks.append("identity settings (model_id, dim, threshold, generation)")
        for key in ("model_id", "dim", "threshold", "generation"):
            if key not in meta:
                problems.append(f"meta key {key!r} is missing")
        checks.append(f"every template is {self.dim} finite float32 values of unit length")
        bad_size = bad_norm = 0
        for (blob,) in self.conn.execute("SELECT vector FROM embeddings"):
            if len(blob) != 4 * self.dim:
                bad_size += 1
                continue
            v = from_blob(blob, self.dim)
            if not np.isfinite(v).all() or abs(float(np.linalg.norm(v)) - 1.0) > UNIT_TOLERANCE:
                bad_norm += 1
        if bad_size:
            problems.append(f"{bad_size} templates have the wrong size")
        if bad_norm:
            problems.append(f"{bad_norm} templates are not finite unit vectors")
        checks.append("every image has its templates, and each template's image belongs to the same person")
        orphans = self.conn.execute(
            "SELECT COUNT(*) FROM images i WHERE NOT EXISTS (SELECT 1 FROM embeddings e WHERE e.image_id = i.id)"
        ).fetchone()[0]
        if orphans:
            problems.append(f"{orphans} images have no templates (half-enrolled photos)")
        crossed = self.conn.execute(
            "SELECT COUNT(*) FROM embeddings e JOIN images i ON i.id = e.image_id WHERE i.person_id != e.person_id"
        ).fetchone()[0]
        if crossed:
            problems.append(f"{crossed} templates belong to a person other than their image's")
        return checks, problems

    # ------------------------------------------------------------------- audit
    def _audit_connection(self) -> sqlite3.Connection:
        # Decisions are logged on every search, so their commits must not cost an fsync each: a connection of
        # their own with synchronous=NORMAL (in WAL mode that survives a process crash; a power cut can lose
        # the last records before the next checkpoint). Templates and people stay synchronous=FULL.
        if self._audit_conn is None:
            conn = self._connect(self.path, readonly=False)
            conn.execute("PRAGMA synchronous = NORMAL")
            self._audit_conn = conn
        return self._audit_conn

    def append_audit(self, rows: Sequence[dict[str, Any]], retention_days: float | None) -> None:
        """Append decision records (one transaction) and drop those older than the retention period."""
        if not rows:
            return
        now = utcnow()
        conn = self._audit_connection()
        with self._transaction(conn, "write the audit trail"):
            conn.executemany(
                "INSERT INTO audit (time, operation, image_sha256, identity, similarity, threshold, model_id, "
                "detail, embedding) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(now, r["operation"], r.get("image_sha256"), r.get("identity"), r.get("similarity"),
                  r.get("threshold"), r["model_id"], json.dumps(r["detail"]) if r.get("detail") else None,
                  r.get("embedding")) for r in rows],
            )
            if retention_days is not None:
                cutoff = datetime.fromtimestamp(
                    datetime.now(timezone.utc).timestamp() - retention_days * 86400, timezone.utc
                ).isoformat(timespec="milliseconds")
                conn.execute("DELETE FROM audit WHERE time < ?", (cutoff,))

    def audit(self, since: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Audit records at or after ``since`` (ISO 8601, UTC), oldest first."""
        sql = "SELECT id, time, operation, image_sha256, identity, similarity, threshold, model_id, detail, " \
              "embedding IS NOT NULL FROM audit WHERE time >= ? ORDER BY id"
        params: list[Any] = [since or ""]
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        keys = ("id", "time", "operation", "image_sha256", "identity", "similarity", "threshold", "model_id",
                "detail", "has_embedding")
        out = []
        for row in self.conn.execute(sql, params):
            rec = dict(zip(keys, row))
            rec["detail"] = json.loads(rec["detail"]) if rec["detail"] else None
            rec["has_embedding"] = bool(rec["has_embedding"])
            out.append(rec)
        return out

    def vacuum(self) -> None:
        """Rewrite the file, dropping free pages, then truncate the WAL (so no removed bytes linger)."""
        try:
            self.conn.execute("VACUUM")
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            raise DatabaseError(f"{self.path}: vacuum failed ({exc})") from None
