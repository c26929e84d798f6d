"""The SQLite store: the source of truth for people, images, templates and settings.

This is the only module that talks to SQLite. Choices, and why:

* sqlite-utils is used where it is the clearer code: inserting rows from dicts (``insert``, ``insert_all``),
  upserting settings (``upsert_all``), reading rows as dicts (``rows_where``). Hot paths (the vectors the query
  engine re-scores, the change log, bulk snapshots) use plain SQL on the same connection, because they need
  one statement and raw blobs, not dicts. Schema changes are numbered SQL scripts (below) applied in one
  transaction and tracked in ``PRAGMA user_version``: sqlite-utils has no migration system of its own, and a
  versioned list is what lets a database from any earlier release open in this one.
* Names are compared as people read them: every name is normalised to Unicode NFC where it enters (enrol,
  add, rename, remove, show, verify; folder names too), so "José" typed and "José" from a macOS folder (NFD)
  are one person.
* Lists of people are in one order and searched one way in every interface (API, CLI, HTTP, console), both
  decided here: :func:`name_sort_key` and :func:`name_search_key` (case- and accent-insensitive; not a
  locale's collation, so the same on every machine). Each person's keys are stored beside the name
  (``sort_key``, ``search_key``: migration 11), so that SQL orders, pages and counts with them (an index serves
  ``ORDER BY sort_key LIMIT``) with either driver and no function registered on the connection. Exact-name
  lookups (enrol into, show, rename, remove) stay exact NFC matches.

* WAL journal, ``synchronous=FULL``: readers never block the writer, and a transaction that returned is on disk
  even across a power cut, not only a process crash.
* Writers are serialised by SQLite's own write lock, taken up front with ``BEGIN IMMEDIATE`` (so two writers
  queue on ``busy_timeout`` rather than fail half-way with SQLITE_BUSY on a lock upgrade).
* ``secure_delete=ON``: deleted rows are overwritten with zeros, so a removed template does not linger in
  free pages (erasure).
* ``AUTOINCREMENT`` ids: a template id is never reused, so a stale index can never point at someone else.
* A ``generation`` counter, bumped by every write that adds or removes templates, plus a ``changes`` log of
  (generation, template id, op): an index at generation g catches up by replaying the log instead of a rebuild.
* Encrypted databases (``key`` given) are SQLCipher 4 end to end: the same schema and SQL through the
  ``sqlcipher3`` driver, keyed with a raw 256-bit key (SQLCipher's ``x'...'`` form: no PBKDF2 per connection,
  the key is already derived by ``protect.py``), 16 KiB cipher pages, temporary tables in memory. Every page of
  the file, of the WAL and of the free list is AES-256-CBC with a per-page HMAC-SHA512. Plain databases keep
  Python's ``sqlite3``.
* Erasure: after a removal the WAL is checkpointed and truncated (:meth:`Store.truncate_wal`), because it
  still holds the frames that wrote the removed rows; ``secure_delete`` has already zeroed them in the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import threading
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import sqlite_utils

from ..errors import (
    DatabaseError,
    DatabaseExistsError,
    DuplicateError,
    DuplicatePersonError,
    InvalidInputError,
    ModelChangedError,
    NotFoundError,
    PersonNotFoundError,
    TemplateNotFoundError,
)
from ..records import Person, Template
from . import livefiles
from .scores import UNIT_TOLERANCE, from_blob, to_blob

FORMAT = "facedb"

#: SQLCipher's page size: not stored in the (encrypted) header, so every connection must say it.
CIPHER_PAGE_SIZE = 16384
SQLITE_HEADER = b"SQLite format 3\x00"

# The exception classes of both drivers: sqlcipher3's are its own, not sqlite3's. Extended when the SQLCipher
# driver is first loaded; the ``except`` clauses read these names when an exception is raised.
_Error: tuple[type[BaseException], ...] = (sqlite3.Error,)
_DatabaseError: tuple[type[BaseException], ...] = (sqlite3.DatabaseError,)
_OperationalError: tuple[type[BaseException], ...] = (sqlite3.OperationalError,)


def _driver(encrypted: bool) -> Any:
    """The DB-API module: sqlite3, or sqlcipher3 for encrypted databases (EncryptionUnavailableError if the
    crypto extra is not installed)."""
    global _Error, _DatabaseError, _OperationalError
    if not encrypted:
        return sqlite3
    try:
        from sqlcipher3 import dbapi2 as sqlcipher
    except ImportError:
        from ..errors import EncryptionUnavailableError

        raise EncryptionUnavailableError("this database is encrypted: install the crypto extra (pip install "
                                         "'facedb[crypto]': sqlcipher3-binary, cryptography)") from None
    if sqlcipher.Error not in _Error:
        _Error = (*_Error, sqlcipher.Error)
        _DatabaseError = (*_DatabaseError, sqlcipher.DatabaseError)
        _OperationalError = (*_OperationalError, sqlcipher.OperationalError)
    return sqlcipher


def _key_connection(conn: Any, key: str) -> None:
    """Key a fresh SQLCipher connection (before anything reads the file)."""
    conn.execute("PRAGMA cipher_log_level = NONE")  # failures are raised as errors, not also logged to stderr
    conn.execute(f"PRAGMA key = \"x'{key}'\"")
    conn.execute(f"PRAGMA cipher_page_size = {CIPHER_PAGE_SIZE}")
    conn.execute("PRAGMA temp_store = MEMORY")  # sorts and temporary tables never reach a file


class _GuardedCursor:
    """A cursor whose errors are typed: see :class:`_Guarded`."""

    def __init__(self, cursor: Any, path: Path) -> None:
        self._cursor = cursor
        self._path = path

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)

    def __iter__(self) -> Iterator[Any]:
        with _typed_errors(self._path):
            yield from self._cursor

    def fetchone(self) -> Any:
        with _typed_errors(self._path):
            return self._cursor.fetchone()

    def fetchmany(self, size: int = 1) -> list[Any]:
        with _typed_errors(self._path):
            return self._cursor.fetchmany(size)

    def fetchall(self) -> list[Any]:
        with _typed_errors(self._path):
            return self._cursor.fetchall()


class _Guarded:
    """An encrypted database's connection, whose read errors are typed. A page that fails its HMAC surfaces
    from SQLCipher as "not a database", a logic error, or SQLITE_NOMEM (Python's MemoryError: the codec returns
    no page); any of those from an encrypted file is a TamperedError, not an untyped crash. Everything else is
    the connection itself (sqlite-utils uses it as it is)."""

    def __init__(self, conn: Any, path: Path) -> None:
        self._conn = conn
        self._path = path

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def execute(self, sql: str, params: Any = ()) -> _GuardedCursor:
        with _typed_errors(self._path):
            return _GuardedCursor(self._conn.execute(sql, params), self._path)

    def executemany(self, sql: str, rows: Any) -> _GuardedCursor:
        with _typed_errors(self._path):
            return _GuardedCursor(self._conn.executemany(sql, rows), self._path)


@contextlib.contextmanager
def _typed_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except MemoryError:
        from ..errors import TamperedError

        raise TamperedError(f"{path}: a page of the encrypted database failed authentication (altered or "
                            "damaged)") from None
    except _DatabaseError as exc:
        text = str(exc)
        if any(s in text for s in ("not a database", "malformed", "SQL logic error", "out of memory")):
            from ..errors import TamperedError

            raise TamperedError(f"{path}: a page of the encrypted database failed authentication (altered or "
                                f"damaged: {text})") from None
        raise


def is_plain_sqlite(path: Path) -> bool:
    """Whether ``path`` starts with SQLite's plain-text header (an unencrypted database)."""
    return livefiles.read_head(path, len(SQLITE_HEADER)) == SQLITE_HEADER  # never a plain open(): see livefiles


def opens_with(path: Path, key: str | None) -> bool:
    """Whether the database file at ``path`` can be read with ``key`` (None: as a plain database)."""
    driver = _driver(key is not None)
    try:
        conn = livefiles.connect(driver, path, readonly=True, isolation_level=None, timeout=30)
    except _Error:
        return False
    try:
        if key is not None:
            _key_connection(conn, key)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return True
    except _Error:
        return False
    finally:
        conn.close()

#: Versioned migrations: entry i takes the schema from version i to i + 1 (PRAGMA user_version). An entry is
#: an SQL script, or a function of the connection for changes SQL cannot express.
MIGRATIONS: list[str | Callable[[sqlite3.Connection], None]] = [
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
    # 3: who asked (a CLI user, an API key id) beside every audit record, and indexes for its filters
    """
    ALTER TABLE audit ADD COLUMN actor TEXT;
    CREATE INDEX audit_operation ON audit(operation, time);
    CREATE INDEX audit_actor ON audit(actor, time);
    """,
    # 4: names as people read them (NFC)
    lambda conn: _normalise_stored_names(conn),
    # 5: the decision rule; databases made before it keep their fixed threshold until told otherwise
    """
    INSERT OR IGNORE INTO meta (key, value) VALUES ('decision_rule', 'fixed');
    """,
    # 6: the service's API keys (only a hash of each key) and webhooks (facedb/operations/keys.py,
    # facedb/operations/hooks.py)
    """
    CREATE TABLE IF NOT EXISTS api_keys (
        id TEXT PRIMARY KEY,
        name TEXT,
        scope TEXT NOT NULL CHECK (scope IN ('identify', 'enroll', 'admin')),
        key_hash TEXT NOT NULL,
        created_at TEXT NOT NULL,
        revoked_at TEXT
    );
    CREATE UNIQUE INDEX IF NOT EXISTS api_keys_live_name ON api_keys(name) WHERE revoked_at IS NULL;
    CREATE TABLE IF NOT EXISTS webhooks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        url TEXT NOT NULL,
        events TEXT NOT NULL,
        secret TEXT NOT NULL,
        key_id TEXT REFERENCES api_keys(id),
        created_at TEXT NOT NULL
    );
    """,
    # 7: unknown visitors (opt-in): faces answered unknown, kept for a retention period to be grouped, then
    # enrolled or forgotten. No person, no name: a time, who asked, the photo's hash, the face box and the vector.
    """
    CREATE TABLE IF NOT EXISTS unassigned_faces (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        time TEXT NOT NULL,
        actor TEXT,
        image_sha256 TEXT,
        box TEXT,
        det_score REAL,
        similarity REAL,
        vector BLOB NOT NULL
    );
    CREATE INDEX IF NOT EXISTS unassigned_faces_time ON unassigned_faces(time);
    """,
    # 8: face thumbnails (facedb/gallery/thumbnails.py): each belongs to exactly one template, audit record or kept
    # unknown face, and goes with it (foreign keys). Databases made before keep none until told otherwise.
    """
    CREATE TABLE IF NOT EXISTS thumbnails (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        embedding_id INTEGER UNIQUE REFERENCES embeddings(id) ON DELETE CASCADE,
        audit_id INTEGER UNIQUE REFERENCES audit(id) ON DELETE CASCADE,
        visitor_id INTEGER UNIQUE REFERENCES unassigned_faces(id) ON DELETE CASCADE,
        jpeg BLOB NOT NULL,
        CHECK ((embedding_id IS NOT NULL) + (audit_id IS NOT NULL) + (visitor_id IS NOT NULL) = 1)
    );
    INSERT OR IGNORE INTO meta (key, value) VALUES ('thumbnails', 'off');
    """,
    # 9: derived templates: each person's mean template beside their photo templates (a database setting)
    lambda conn: _add_column(conn, "embeddings", "derived INTEGER NOT NULL DEFAULT 0"),
    # 10: version counters a query reads to know when its cached settings and names are stale (one small read
    # per query instead of parsing every setting; see facedb/gallery/settings_cache.py), and the audit trail's write
    # mode: databases made before it keep writing each decision's record before the answer (sync) until told
    # otherwise (new databases default to the background writer: README "Guarantees"). Branch speed (#17)
    # numbered it 7 before merging main's 7-9; INSERT OR IGNORE makes it safe to run on any of them.
    """
    INSERT OR IGNORE INTO meta (key, value) VALUES ('settings_version', '0');
    INSERT OR IGNORE INTO meta (key, value) VALUES ('people_version', '0');
    INSERT OR IGNORE INTO meta (key, value) VALUES ('audit_sync', '1');
    """,
    # 11: each person's order and search keys beside their name (name_sort_key, name_search_key), filled for
    # the people already there: listing, paging and searching are then plain SQL on indexed columns
    lambda conn: _add_name_keys(conn),
    # 12: what each API key is told beyond a decision (facedb/operations/keys.py GRANTS, comma-separated): existing
    # keys get none, so an identify key made before it is answered with the decision alone, as a door's key should be
    lambda conn: _add_column(conn, "api_keys", "grants TEXT NOT NULL DEFAULT ''"),
    # 13: the 'metrics' scope (a Prometheus scraper's key: GET /metrics and nothing else; facedb/operations/keys.py)
    lambda conn: _widen_key_scopes(conn),
    # 14: the console's sign-in sessions (facedb/service/console/session.py): the SHA-256 of a random token, the
    # key it signed in with, when it began and when it was last used (Unix seconds, for idle and absolute expiry)
    """
    CREATE TABLE IF NOT EXISTS console_sessions (
        token_hash TEXT PRIMARY KEY,
        key_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        seen_at REAL NOT NULL
    );
    CREATE INDEX IF NOT EXISTS console_sessions_key ON console_sessions(key_id);
    """,
]
#: The schema versions that have the service's key and webhook tables, the thumbnails table, and people's
#: order and search keys.
KEYS_VERSION = 6
THUMBNAILS_VERSION = 8
NAME_KEYS_VERSION = 11
GRANTS_VERSION = 12
METRICS_SCOPE_VERSION = 13
SESSIONS_VERSION = 14
SCHEMA_VERSION = len(MIGRATIONS)

#: How many generations of the change log to keep behind the saved index, so that processes holding a
#: slightly older index in memory can still catch up without a rebuild.
CHANGES_KEPT = 1000

MAX_NAME_LENGTH = 256
#: A person's metadata, as stored JSON (bytes), and their external id (characters): limits for every interface.
MAX_METADATA_BYTES = 16 * 1024
MAX_EXTERNAL_ID_LENGTH = 256
#: The last words of the service's person routes (/v1/people/{name}/templates, ...; the console's .../rename,
#: .../update, .../remove): a name with '/' may not end in one (check_name).
NAME_ROUTE_WORDS = ("templates", "vectors", "rename", "update", "remove")


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def time_before(seconds: float) -> str:
    """The ISO 8601 UTC time ``seconds`` ago, as the audit trail writes times. An age reaching before year 1
    (a retention of 1e16 days, ``--since 99999999999d``) is clamped to the earliest time instead of
    overflowing: everything is younger than it, which is what such an age means."""
    now = datetime.now(timezone.utc)
    try:
        return (now - timedelta(seconds=float(seconds))).isoformat(timespec="milliseconds")
    except OverflowError:
        return datetime.min.replace(tzinfo=timezone.utc).isoformat(timespec="milliseconds")


#: The units of a relative age (``90m``, ``24h``, ``7d``) wherever a time is taken.
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_AGE_NUMBER = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def utc_time(value: str | datetime | None, what: str = "time") -> str | None:
    """The one way a time given to facedb (an API argument, a CLI option, a query parameter, a console form)
    becomes the instant it means, in the one form every stored time has (:func:`utcnow`:
    ``2026-03-02T04:30:00.000+00:00``). Stored times are compared with it as text (``WHERE time >= ?``, a
    group's ``last_seen``): text order is time order only between strings of exactly that form, which is
    why nothing else may be compared with a stored time. Accepts an ISO 8601 time with any offset (``Z``,
    ``+05:30``, ``-08:00``), a date (midnight), a naive time (taken as UTC: a server's local zone is not the
    asker's), a relative age (``90m``, ``24h``, ``7d``: that long before now; one reaching before year 1
    means from the start), or a ``datetime`` / ``date`` (naive taken as UTC too). None stays None; anything
    else is an InvalidInputError naming ``what``, raised before anything is read or changed."""
    if value is None:
        return None
    if isinstance(value, datetime):
        when = value
    elif isinstance(value, date):
        when = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        text = value.strip()
        # an age: a number without a sign, in decimal or exponent notation ("1e9d" as "9999999999999s": both
        # reach before year 1 and mean from the start; one took the exponent as a 400, the other not, #25)
        if text[-1:] in AGE_UNITS and _AGE_NUMBER.fullmatch(text[:-1]):
            return time_before(float(text[:-1]) * AGE_UNITS[text[-1]])
        if text[-1:] in ("Z", "z"):  # Python 3.10's fromisoformat knows only numeric offsets
            text = text[:-1] + "+00:00"
        head, _, tail = text.rpartition(" ")
        if ":" in head and len(tail) in (2, 4, 5) and tail.replace(":", "", 1).isdigit():
            text = f"{head}+{tail}"  # an unescaped '+' in a URL's query arrives as a space
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            when = None
        if when is None:
            raise InvalidInputError(f"{what} takes an ISO time (2026-03-01T23:30:00-05:00; UTC if no zone) or "
                                    f"an age like 24h or 7d, got {value!r}")
    else:
        raise InvalidInputError(f"{what} takes an ISO time string, a datetime or an age like '7d', "
                                f"got {type(value).__name__}")
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    try:
        when = when.astimezone(timezone.utc)
        # Stored times are whole milliseconds: rounding a finer time up keeps both ``>= since`` and
        # ``< until`` exact against them (truncating would let in a record up to 1 ms early).
        if when.microsecond % 1000:
            when += timedelta(microseconds=1000 - when.microsecond % 1000)
    except OverflowError:  # a zone that moves year 1 or 9999 out of range
        raise InvalidInputError(f"{what} takes an ISO time within the years 1-9999 in UTC, got {value!r}") from None
    return when.isoformat(timespec="milliseconds")


def normalise_name(name: object) -> str:
    """A name as people read it: Unicode NFC (a typed "é" and a macOS file name's "e" + accent are equal)."""
    if not isinstance(name, str):
        raise InvalidInputError("a person's name must be a string")
    return unicodedata.normalize("NFC", name)


def _add_column(conn: sqlite3.Connection, table: str, definition: str) -> None:
    """ALTER TABLE ... ADD COLUMN, unless the column is there already (a migration run twice)."""
    name = definition.split()[0]
    if name not in {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}:
        conn.execute(f"ALTER TABLE {table} ADD COLUMN {definition}")


_KEY_SCOPES = "'identify', 'enroll', 'admin', 'metrics'"


def _widen_key_scopes(conn: sqlite3.Connection) -> None:
    """Migration 13: the api_keys table's CHECK admits the 'metrics' scope. SQLite cannot change a CHECK in place,
    so the table is rebuilt in this transaction: its rows are set aside, the table dropped and made again and
    the rows put back. webhooks.key_id references api_keys, and foreign keys cannot be switched off inside a
    transaction: deferred, the references the drop broke are checked at commit, when the rows are back."""
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'api_keys'").fetchone()
    if sql is None or "'metrics'" in sql[0]:  # no table (cannot be at 12) or already widened: nothing to do
        return
    conn.execute("PRAGMA defer_foreign_keys = ON")  # reset by SQLite at the transaction's end
    conn.execute("DROP TABLE IF EXISTS api_keys_v12")
    conn.execute("CREATE TABLE api_keys_v12 AS SELECT id, name, scope, key_hash, created_at, revoked_at, grants "
                 "FROM api_keys")
    conn.execute("DROP TABLE api_keys")
    conn.execute(f"""CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        name TEXT,
        scope TEXT NOT NULL CHECK (scope IN ({_KEY_SCOPES})),
        key_hash TEXT NOT NULL,
        created_at TEXT NOT NULL,
        revoked_at TEXT,
        grants TEXT NOT NULL DEFAULT ''
    )""")
    conn.execute("INSERT INTO api_keys (id, name, scope, key_hash, created_at, revoked_at, grants) "
                 "SELECT id, name, scope, key_hash, created_at, revoked_at, grants FROM api_keys_v12")
    conn.execute("DROP TABLE api_keys_v12")
    conn.execute("CREATE UNIQUE INDEX api_keys_live_name ON api_keys(name) WHERE revoked_at IS NULL")


def _normalise_stored_names(conn: sqlite3.Connection) -> None:
    """Migration 4: store names in NFC. A name whose NFC form another person already has is left as it was
    (two people, shown alike); ``facedb check`` reports them, to be merged by an operator."""
    rows = conn.execute("SELECT id, name FROM people").fetchall()
    taken = {name for _, name in rows}
    for pid, name in rows:
        nfc = unicodedata.normalize("NFC", name)
        if nfc != name and nfc not in taken:
            conn.execute("UPDATE people SET name = ? WHERE id = ?", (nfc, pid))
            taken.discard(name)
            taken.add(nfc)


# What "accent" means when names are searched and ordered: the combining diacritical marks (U+0300-036F and
# the blocks that extend them: acute, grave, diaeresis, caron, cedilla, ring, tilde...). Marks of other scripts
# (Indic vowel signs, the kana voicing marks, Hebrew points) spell different letters there, so they count.
_ACCENTS = ((0x0300, 0x036F), (0x1AB0, 0x1AFF), (0x1DC0, 0x1DFF), (0x20D0, 0x20FF), (0xFE20, 0xFE2F))
# Letters with a stroke or bar that Unicode does not decompose into a letter and a mark, but that people
# type as the bare letter ("lodz" for "Łódź", "orsted" for "Ørsted"); after case folding, so lower case only.
_BARE = str.maketrans({"ø": "o", "ł": "l", "đ": "d", "ħ": "h", "ŧ": "t", "ƀ": "b", "ɨ": "i", "ƶ": "z"})
# Joins the parts of a stored key; a control character, which no name holds (check_name), and the lowest
# code point there is, so a shorter part sorts first ("ann" before "anna") exactly as in a tuple.
_KEY_SEP = "\x01"


def _fold_case(text: str) -> str:
    """Compatibility-decomposed and case-folded: Python's documented caseless match (NFKD, casefold, NFKD):
    "ß" and "SS", full-width "Ａ" and "A", "ﬁ" and "fi" are alike; accents are still there, decomposed."""
    return unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", text).casefold())


def name_search_key(text: str) -> str:
    """``text`` as a search compares it: case-folded (:func:`_fold_case`), without accents, recomposed (NFC).
    A name matches a query when the query's key is part of the name's: "jose" finds "José", "ÉMILE" finds
    "Émile", "strasse" finds "Straße", "lodz" finds "Łódź"."""
    bare = "".join(c for c in _fold_case(text) if not any(lo <= ord(c) <= hi for lo, hi in _ACCENTS))
    return unicodedata.normalize("NFC", bare.translate(_BARE))


def name_sort_key(name: str) -> str:
    """The order of every list of people: a simplified Unicode ordering, not a locale's collation, so the same
    on every machine and in every interface. Names compare by their base letters first, case- and
    accent-insensitively (:func:`name_search_key`), then accents (unaccented first: "angel", "Ángel"), then
    case (the name's code points: "Anna", "anna"). So "zoe", "Émile", "bea", "Bob", "anna", "Ángel" are
    listed "Ángel", "anna", "bea", "Bob", "Émile", "zoe". Letters Unicode gives no base letter (æ, œ, þ) and other
    scripts follow their code points, after the Latin letters. Unicode's stability policies keep NFKD and case
    folding of assigned characters fixed, so a stored key stays right across Python versions."""
    name = normalise_name(name)
    return _KEY_SEP.join((name_search_key(name), _fold_case(name), name))


def name_search_text(name: str, external_id: str | None) -> str:
    """What a person's search matches against: their name's and their external id's search keys."""
    keys = [name_search_key(name)] + ([name_search_key(external_id)] if external_id else [])
    return _KEY_SEP.join(keys)


def _search_needle(query: str) -> str:
    # without the separator, a query can never match across a name and an external id
    return name_search_key(normalise_name(query)).replace(_KEY_SEP, "")


def _add_name_keys(conn: sqlite3.Connection) -> None:
    """Migration 11: ``sort_key`` and ``search_key`` on people, filled for every row, and the index that
    serves a page of the list. Stored columns rather than a collation or function registered on each
    connection: they work unchanged with the sqlite3 and sqlcipher3 drivers and for any other reader of the
    file, the index keeps a page of a large gallery one index walk instead of a sort of everyone through
    Python, and the key can never differ between two processes."""
    _add_column(conn, "people", "sort_key TEXT")
    _add_column(conn, "people", "search_key TEXT")
    rows = conn.execute("SELECT id, name, external_id FROM people").fetchall()
    conn.executemany("UPDATE people SET sort_key = ?, search_key = ? WHERE id = ?",
                     [(name_sort_key(name), name_search_text(name, ext), pid) for pid, name, ext in rows])
    conn.execute("CREATE INDEX IF NOT EXISTS people_sort ON people(sort_key)")


def check_name(name: object) -> str:
    name = normalise_name(name) if isinstance(name, str) else name
    if not isinstance(name, str) or not name.strip():
        raise InvalidInputError("a person's name must be a non-empty string")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidInputError(f"a person's name is at most {MAX_NAME_LENGTH} characters")
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise InvalidInputError("a person's name may not contain control characters")
    # Invisible format characters (zero-width space, bidi overrides) make two names look alike or a name look
    # like another; the joiners some scripts spell with (ZWNJ, ZWJ) stay allowed.
    hidden = [c for c in name if unicodedata.category(c) == "Cf" and c not in "\u200c\u200d"]
    if hidden:
        raise InvalidInputError(f"a person's name may not contain invisible characters (U+{ord(hidden[0]):04X})")
    if name != name.strip():
        raise InvalidInputError("a person's name may not start or end with white space")
    if name in (".", ".."):  # browsers and HTTP clients resolve them as path steps: no URL could reach the person
        raise InvalidInputError(f"a person's name may not be {name!r}")
    if "/" in name:
        # A name is a path in the service's URLs (/v1/people/{name}/...): "Ann/templates" would be read as Ann's
        # templates, and clients collapse "//" and resolve "." and ".." steps (issue #25). Such names are refused
        # everywhere (CLI and API alike), so that every person can be reached by name over HTTP.
        parts = name.split("/")
        if any(p.strip() in ("", ".", "..") for p in parts) or parts[-1] in NAME_ROUTE_WORDS:
            raise InvalidInputError(
                f"a person's name with '/' is a URL path too: no empty, '.' or '..' part, and no last part "
                f"{', '.join(repr(w) for w in NAME_ROUTE_WORDS)} (it would name a route); got {name!r}")
    return name


def _check_metadata(metadata: object) -> str:
    if metadata is None:
        return "{}"
    if not isinstance(metadata, dict):
        raise InvalidInputError("metadata must be a JSON object (a dict)")
    try:
        text = json.dumps(metadata, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"metadata is not JSON-serialisable: {exc}") from None
    if len(text.encode("utf-8")) > MAX_METADATA_BYTES:  # a badge number and a department, not a document
        raise InvalidInputError(f"a person's metadata is at most {MAX_METADATA_BYTES} bytes as JSON")
    return text


def _check_external_id(external_id: object) -> None:
    if not isinstance(external_id, str) or not external_id:
        raise InvalidInputError("external_id must be a non-empty string")
    if len(external_id) > MAX_EXTERNAL_ID_LENGTH:
        raise InvalidInputError(f"external_id is at most {MAX_EXTERNAL_ID_LENGTH} characters")


def _apply(conn: sqlite3.Connection, step: str | Callable[[sqlite3.Connection], None]) -> None:
    if callable(step):
        step(conn)
        return
    for statement in step.split(";"):
        if statement.strip():
            conn.execute(statement)


class Store:
    """One SQLite database file. Use :meth:`create` or :meth:`open`; close with :meth:`close`."""

    def __init__(self, path: Path, conn: sqlite3.Connection, key: str | None = None) -> None:
        self.path = path
        self.conn = conn
        self._key = key  # the SQLCipher key (hex), None for a plain database; never shown
        self.db = sqlite_utils.Database(conn)
        self._audit_conn: sqlite3.Connection | None = None
        # The audit connection is shared by every thread using this store, and FaceDB records some decisions
        # outside its own lock (so that a search does not wait for another's record): one transaction at a time.
        self._audit_lock = threading.Lock()
        self.readonly = False
        self.version = SCHEMA_VERSION
        self.dim = int(self.get_meta("dim", "0"))

    # ------------------------------------------------------------------ opening
    @property
    def encrypted(self) -> bool:
        return self._key is not None

    @staticmethod
    def _connect(path: Path, readonly: bool, new: bool = False, key: str | None = None) -> sqlite3.Connection:
        driver = _driver(key is not None)
        conn = None
        try:
            conn = livefiles.connect(driver, path, readonly=readonly, isolation_level=None, timeout=30,
                                     check_same_thread=False)
            if key is not None:
                _key_connection(conn, key)
                conn = _Guarded(conn, path)
            elif new:
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
        except _DatabaseError as exc:
            if conn is not None:
                conn.close()  # not left to the garbage collector: it is tracked (livefiles)
            if key is not None and "not a database" in str(exc):
                from ..errors import TamperedError

                raise TamperedError(f"{path}: the encrypted database failed authentication with its key (altered, "
                                    "truncated or damaged); nothing was changed") from None
            raise DatabaseError(f"{path}: cannot open as a facedb database ({exc})") from None
        return conn

    @classmethod
    def create(cls, path: Path, meta: dict[str, str], key: str | None = None) -> Store:
        """Create a new store at ``path`` with the identity settings in ``meta`` (model_id, dim, ...); encrypted
        with SQLCipher under ``key`` (64 hex digits) when given."""
        if path.exists() and path.stat().st_size > 0:
            raise DatabaseExistsError(f"{path} already exists")
        old_umask = os.umask(0o077)  # files private from birth: biometric data
        try:
            conn = cls._connect(path, readonly=False, new=True, key=key)
        finally:
            os.umask(old_umask)
        try:
            conn.execute("BEGIN IMMEDIATE")
            for step in MIGRATIONS:
                _apply(conn, step)
            now = utcnow()
            rows = {"format": FORMAT, "created_at": now, "generation": "0", "changes_floor": "0", **meta}
            # a new database's own settings win over the defaults migrations write for older ones
            conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(rows.items()))
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        return cls(path, conn, key)

    @classmethod
    def open(cls, path: Path, readonly: bool = False, key: str | None = None) -> Store:
        """Open an existing store (encrypted: with its SQLCipher ``key``); DatabaseError if it is missing or not
        a facedb database, TamperedError if an encrypted one fails authentication."""
        if not path.is_file():
            raise DatabaseError(f"no facedb database at {path} (create one with `facedb init`)")
        conn = cls._connect(path, readonly, key=key)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            fmt = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        except _DatabaseError as exc:
            conn.close()
            if key is not None and "not a database" in str(exc):
                from ..errors import TamperedError

                raise TamperedError(f"{path}: the encrypted database failed authentication with its key (altered, "
                                    "truncated or damaged); nothing was changed") from None
            raise DatabaseError(f"{path} is not a facedb database") from None
        if fmt is None or fmt[0] != FORMAT:
            conn.close()
            raise DatabaseError(f"{path} is not a facedb database")
        if version > SCHEMA_VERSION:
            conn.close()
            raise DatabaseError(f"{path} has schema version {version}; this facedb knows up to {SCHEMA_VERSION}")
        store = cls(path, conn, key)
        store.readonly = readonly
        store.version = version
        if version < SCHEMA_VERSION and not readonly:
            store._migrate(version)
            store.version = SCHEMA_VERSION
        return store

    def _migrate(self, version: int) -> None:
        with self.write():
            # Read again under the write lock: another process (a second service worker) may have migrated
            # since this one looked, and a step must never run twice.
            version = max(version, self.conn.execute("PRAGMA user_version").fetchone()[0])
            if version == 7 and not self.conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'unassigned_faces'").fetchone():
                # made by branch speed before it merged main: its 7 was today's 10, and main's 7-9 never ran.
                # Steps 7-10 are all idempotent, so run them all.
                version = 6
            for step in MIGRATIONS[version:]:
                _apply(self.conn, step)
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        if self._audit_conn is not None:
            self._audit_conn.close()
        self.conn.close()

    # ------------------------------------------------------------ transactions
    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        """One write transaction, holding SQLite's write lock from its start. Nested use joins the outer one.
        DatabaseError at once on a store opened read-only."""
        if self.readonly:
            raise DatabaseError(f"{self.path.parent} is open read-only: the gallery and settings cannot be changed")
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
        except _OperationalError as exc:
            raise DatabaseError(f"{self.path}: cannot {what} ({exc})") from None
        try:
            yield
            conn.execute("COMMIT")
        except _Error as exc:
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

    def _rows_in(self, sql: str, keys: Sequence[Any], *before: Any) -> Iterator[tuple[Any, ...]]:
        """Rows of ``sql`` (holding one ``{marks}`` for an ``IN (...)`` list) for every key, in chunks that stay
        under SQLite's bound-parameter limit; ``before`` are parameters that come ahead of the list."""
        keys = list(keys)
        for start in range(0, len(keys), 900):
            chunk = keys[start:start + 900]
            yield from self.conn.execute(sql.format(marks=",".join("?" * len(chunk))), [*before, *chunk])

    # -------------------------------------------------------------------- meta
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def all_meta(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM meta").fetchall())

    def set_meta(self, items: dict[str, str]) -> None:
        """Write settings rows, and bump ``settings_version`` in the same transaction, so that every process
        holding parsed settings (``memo.py``) sees the change at its next query."""
        with self.write():
            self.db["meta"].upsert_all([{"key": k, "value": str(v)} for k, v in items.items()], pk="key")
            self._bump("settings_version")

    def _bump(self, key: str) -> None:
        """Increment a version counter in ``meta`` (inside the caller's write transaction)."""
        self.conn.execute("INSERT INTO meta (key, value) VALUES (?, '1') ON CONFLICT(key) DO UPDATE SET "
                          "value = CAST(CAST(value AS INTEGER) + 1 AS TEXT)", (key,))

    #: The counters :meth:`versions` reads: templates (the change log's), settings, people's names.
    VERSION_KEYS = ("generation", "settings_version", "people_version")

    def versions(self) -> tuple[int, int, int]:
        """(generation, settings version, people version) in one read: what a query checks its cached
        settings, index and names against (a store from before the counters reads 0 for them)."""
        got = dict(self.conn.execute("SELECT key, value FROM meta WHERE key IN (?, ?, ?, ?)", (*self.VERSION_KEYS,
                                                                                                "dim")))
        if got.get("dim") and int(got["dim"]) != self.dim:
            self.dim = int(got["dim"])  # another process moved it to another model (operations/reembed.py)
        return int(got.get("generation") or 0), int(got.get("settings_version") or 0), \
            int(got.get("people_version") or 0)

    @property
    def in_transaction(self) -> bool:
        return bool(self.conn.in_transaction)

    def generation(self) -> int:
        return int(self.get_meta("generation", "0") or 0)

    def _bump_generation(self, added: Sequence[int], removed: Sequence[int]) -> int:
        gen = self.generation() + 1
        self.conn.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(gen),))
        rows = [(gen, int(i), "add") for i in added] + [(gen, int(i), "remove") for i in removed]
        self.conn.executemany("INSERT INTO changes (generation, embedding_id, op) VALUES (?, ?, ?)", rows)
        return gen

    # ------------------------------------------------------------------ people
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

    def remove_template(self, template_id: int) -> str:
        """Delete one template (and its photo's row once the photo has no template left); returns the name of
        the person it belonged to (who stays enrolled, possibly with no templates)."""
        with self.write():
            derived = "e.derived" if self._has_derived else "0"
            row = self.conn.execute(
                f"SELECT e.image_id, p.name, e.person_id, {derived} FROM embeddings e JOIN people p "
                "ON p.id = e.person_id WHERE e.id = ?", (int(template_id),)).fetchone()
            if row is None:
                raise TemplateNotFoundError(f"no template with id {template_id}")
            image_id, name, pid, is_derived = row
            if is_derived:
                raise InvalidInputError(f"template {template_id} is {name!r}'s mean template, derived from their "
                                        "photos: remove a photo's template and the mean follows")
            self.conn.execute("DELETE FROM embeddings WHERE id = ?", (int(template_id),))
            if image_id is not None and not self.conn.execute(
                    "SELECT 1 FROM embeddings WHERE image_id = ?", (image_id,)).fetchone():
                self.conn.execute("DELETE FROM images WHERE id = ?", (image_id,))
            self.conn.execute("UPDATE people SET updated_at = ? WHERE name = ?", (utcnow(), name))
            added, removed = self._refresh_mean(pid)
            self._bump_generation(added, [int(template_id), *removed])
        return str(name)

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

    # --------------------------------------------------------------- templates
    @property
    def _has_derived(self) -> bool:
        return self.version >= 9

    def _refresh_mean(self, pid: int) -> tuple[list[int], list[int]]:
        """Inside a write: replace the person's mean template (derived) by the renormalised mean of their other
        templates, when the ``mean_templates`` setting is on and they have at least two; returns (ids added,
        ids removed) for the change log."""
        if not self._has_derived:
            return [], []
        removed = [r[0] for r in self.conn.execute(
            "SELECT id FROM embeddings WHERE person_id = ? AND derived = 1", (pid,))]
        if removed:
            self.conn.execute("DELETE FROM embeddings WHERE person_id = ? AND derived = 1", (pid,))
        added: list[int] = []
        if self.get_meta("mean_templates") == "1":
            _, own = self.person_vectors([pid], photos_only=True)
            if len(own) >= 2:
                mean = own.mean(axis=0)
                norm = float(np.linalg.norm(mean))
                if norm > 1e-6:  # templates that cancel out have no mean direction
                    cur = self.conn.execute(
                        "INSERT INTO embeddings (person_id, image_id, box, det_score, vector, created_at, derived) "
                        "VALUES (?, NULL, NULL, NULL, ?, ?, 1)", (pid, to_blob(mean / norm), utcnow()))
                    added.append(int(cur.lastrowid))
        return added, removed

    def refresh_means(self) -> int:
        """Recompute every person's mean template (after the setting changed), in one transaction; returns how
        many people have one now."""
        with self.write():
            added_all: list[int] = []
            removed_all: list[int] = []
            for (pid,) in self.conn.execute("SELECT id FROM people").fetchall():
                added, removed = self._refresh_mean(pid)
                added_all += added
                removed_all += removed
            if added_all or removed_all:
                self._bump_generation(added_all, removed_all)
        return len(added_all)

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
        external_id: str | None = None,
        thumbnails: Sequence[bytes | None] | None = None,
        model_id: str | None = None,
    ) -> list[int]:
        """Store unit ``vectors`` (n, dim) for ``name``, with the image they came from, in one transaction.

        With ``create_person`` the person is created if missing (enrolment). ``image`` is a dict with sha256,
        path, size, width, height; the same sha256 cannot be stored twice. ``metadata`` is merged into the
        person's; ``external_id`` (if given) becomes theirs (DuplicatePersonError if another person has it).
        ``thumbnails``: a JPEG (or None) per vector, kept with its template (see :mod:`facedb.gallery.thumbnails`).
        ``model_id``: the model that made the vectors, checked in the transaction (ModelChangedError when the
        database was moved to another model meanwhile: facedb/operations/reembed.py).
        """
        n = len(vectors)
        boxes = list(boxes) if boxes is not None else [None] * n
        det_scores = list(det_scores) if det_scores is not None else [None] * n
        thumbs = list(thumbnails) if thumbnails is not None else [None] * n
        if len(boxes) != n or len(det_scores) != n or len(thumbs) != n:
            raise InvalidInputError("boxes, det_scores and thumbnails must have one entry per vector")
        now = utcnow()
        with self.write():
            if model_id is not None and self.get_meta("model_id") != model_id:
                raise ModelChangedError(f"the database was moved to {self.get_meta('model_id')!r} while these "
                                        f"photos were embedded by {model_id!r}: enrol them again")
            try:
                pid = self._person_id(name)
                if metadata or external_id is not None:
                    self.update_person(name, metadata=metadata or None, external_id=external_id)
            except PersonNotFoundError:
                if not create_person:
                    raise
                pid = self._insert_person(name, external_id, metadata)
            image_id = None
            if image is not None:
                owner = self.image_owner(image["sha256"])
                if owner is not None:
                    raise InvalidInputError(f"already enrolled (as {owner!r})")
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
            self._insert_thumbnails(self.conn, "embedding_id", ids, thumbs)
            self.conn.execute("UPDATE people SET updated_at = ? WHERE id = ?", (now, pid))
            added, removed = self._refresh_mean(pid)
            self._bump_generation(ids + added, removed)
        return ids

    def replace_all_templates(self, vectors: dict[int, np.ndarray], thumbnails: dict[int, bytes | None],
                              drop: Sequence[int], meta: dict[str, str], unset: Sequence[str]) -> dict[str, int]:
        """Put the whole gallery under another model in one transaction (facedb/operations/reembed.py): every photo
        template gets its new vector (``vectors``: template id -> unit vector of the new ``meta["dim"]``) or is dropped
        (``drop``, with its photo's row once it has no template left); thumbnails in ``thumbnails`` replace the
        template's (None: it keeps none); the unknown visitors' faces (the old model's vectors) are forgotten;
        ``meta`` rows are written and ``unset`` keys deleted; mean templates are recomputed; the change log is
        cut at the new generation, so every process rebuilds its index from the store instead of replaying it.
        InvalidInputError (nothing changed) when the photo templates are not exactly those given. Returns
        {"templates", "dropped", "visitors_forgotten", "mean_templates"}."""
        dim = int(meta["dim"])
        old_dim = self.dim
        with self.write():
            own = " WHERE derived = 0" if self._has_derived else ""
            held = {int(r[0]) for r in self.conn.execute(f"SELECT id FROM embeddings{own}")}
            given = set(vectors) | {int(i) for i in drop}
            if held != given:
                raise InvalidInputError(f"the gallery changed while it was re-embedded ({len(held - given)} templates "
                                        f"added, {len(given - held)} removed): nothing was changed; run it again")
            try:
                images = [r[0] for r in self._rows_in("SELECT DISTINCT image_id FROM embeddings WHERE id IN "
                                                      "({marks}) AND image_id IS NOT NULL", [int(i) for i in drop])]
                list(self._rows_in("DELETE FROM embeddings WHERE id IN ({marks})", [int(i) for i in drop]))
                list(self._rows_in("DELETE FROM images WHERE id IN ({marks}) AND NOT EXISTS (SELECT 1 FROM "
                                   "embeddings e WHERE e.image_id = images.id)", images))
                self.dim = dim  # what the rows read back from here on are
                self.conn.executemany("UPDATE embeddings SET vector = ? WHERE id = ?",
                                      [(to_blob(v), int(i)) for i, v in vectors.items()])
                if self.version >= THUMBNAILS_VERSION:
                    ids = [int(i) for i in thumbnails]
                    list(self._rows_in("DELETE FROM thumbnails WHERE embedding_id IN ({marks})", ids))
                    self._insert_thumbnails(self.conn, "embedding_id", ids, [thumbnails[i] for i in ids])
                forgotten = 0
                if self._has_unassigned():
                    forgotten = self.conn.execute("DELETE FROM unassigned_faces").rowcount
                self.db["meta"].upsert_all([{"key": k, "value": str(v)} for k, v in meta.items()], pk="key")
                list(self._rows_in("DELETE FROM meta WHERE key IN ({marks})", list(unset)))
                means = 0
                for (pid,) in self.conn.execute("SELECT id FROM people").fetchall():
                    means += len(self._refresh_mean(pid)[0])
                gen = str(self.generation() + 1)
                self.conn.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (gen,))
                self.conn.execute("DELETE FROM changes")
                self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('changes_floor', ?)", (gen,))
                self._bump("settings_version")
                self._bump("people_version")
            except BaseException:
                self.dim = old_dim
                raise
        return {"templates": len(vectors), "dropped": len(drop), "visitors_forgotten": forgotten,
                "mean_templates": means}

    def image_owner(self, sha256: str) -> str | None:
        row = self.conn.execute(
            "SELECT p.name FROM images i JOIN people p ON p.id = i.person_id WHERE i.sha256 = ?", (sha256,)
        ).fetchone()
        return row[0] if row else None

    def _vectors(self, blobs: Sequence[bytes]) -> np.ndarray:
        if not blobs:
            return np.zeros((0, self.dim), dtype=np.float32)
        raw = b"".join(blobs)
        if len(raw) != 4 * self.dim * len(blobs):
            bad = sum(1 for b in blobs if len(b) != 4 * self.dim)
            raise DatabaseError(f"{self.path}: {bad} stored template(s) are not {self.dim} float32 values: the "
                                "database is damaged (`facedb check` lists what)")
        return np.frombuffer(raw, dtype="<f4").reshape(len(blobs), self.dim).astype(np.float32)

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

    def stream_templates(self, batch: int = 16384) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """Every template as (generation, ids, person ids, vectors ``(rows, dim)`` float32) batches of ``batch``
        rows in id order, all from one snapshot (the generation is the same in every batch), read through a
        connection of its own: another thread may consume it while this store's connection answers queries,
        and no more than one batch is held in memory (a 10M-template gallery is 20 GB of vectors)."""
        conn = self._connect(self.path, readonly=True, key=self._key)
        try:
            conn.execute("BEGIN")  # one snapshot for every batch
            row = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
            gen = int(row[0]) if row else 0
            cursor = conn.execute("SELECT id, person_id, vector FROM embeddings ORDER BY id")
            while rows := cursor.fetchmany(batch):
                yield (gen, np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)),
                       np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows)),
                       self._vectors([r[2] for r in rows]))
        finally:
            conn.close()

    def stream_people(self) -> Iterator[tuple[int, str, str | None]]:
        """Every person's (id, name, external id), read through a connection of its own (a background thread
        preloads the names a query shows: ``memo.NameCache``)."""
        conn = self._connect(self.path, readonly=True, key=self._key)
        try:
            yield from conn.execute("SELECT id, name, external_id FROM people")
        finally:
            conn.close()

    def template_map(self) -> tuple[int, np.ndarray, np.ndarray]:
        """(generation, template ids, person ids) of every template, sorted by id, from one snapshot."""
        with self.read():
            gen = self.generation()
            # From the (person_id, rowid) index alone: scanning the table would read every 2 KiB vector blob.
            # Read in batches into arrays: 10M rows as one list of tuples would take over a gigabyte.
            cursor = self.conn.execute("SELECT id, person_id FROM embeddings INDEXED BY embeddings_person")
            parts = []
            while rows := cursor.fetchmany(65536):
                parts.append(np.array(rows, dtype=np.int64).reshape(-1, 2))
        arr = np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)
        order = np.argsort(arr[:, 0], kind="stable")
        return gen, arr[order, 0], arr[order, 1]

    def templates(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, person ids, vectors) of the templates among ``ids`` that still exist, in id order."""
        rows = sorted(self._rows_in("SELECT id, person_id, vector FROM embeddings WHERE id IN ({marks})",
                                    [int(i) for i in ids]))
        return (np.array([r[0] for r in rows], dtype=np.int64), np.array([r[1] for r in rows], dtype=np.int64),
                self._vectors([r[2] for r in rows]))

    def person_vectors(self, person_ids: Sequence[int], photos_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Every stored vector of the given people, grouped by person: (person id of each row, sorted; vectors
        ``(m, dim)``); ``photos_only``: without their mean templates. One query and one buffer per 900 people,
        since the query engine calls this per probe."""
        own = " AND derived = 0" if photos_only and self._has_derived else ""
        rows = list(self._rows_in(
            f"SELECT person_id, vector FROM embeddings WHERE person_id IN ({{marks}}){own} ORDER BY person_id",
            sorted({int(p) for p in person_ids})))
        return np.array([r[0] for r in rows], dtype=np.int64), self._vectors([r[1] for r in rows])

    def names(self, person_ids: Sequence[int]) -> dict[int, tuple[str, str | None]]:
        """{person id: (name, external id)} for the people among ``person_ids`` that exist."""
        return {pid: (name, ext) for pid, name, ext in self._rows_in(
            "SELECT id, name, external_id FROM people WHERE id IN ({marks})", sorted({int(p) for p in person_ids}))}

    def iter_templates(self, person: str | None = None, batch: int = 4096,
                       include_derived: bool = False) -> Iterator[Template]:
        """Every stored template (of ``person`` only, if given), in id order, with its person and photo; read in
        batches of ``batch`` rows, each batch a consistent snapshot. Mean templates (derived from a person's
        others) only with ``include_derived``."""
        clauses, params = [], []
        if person is not None:
            clauses.append("e.person_id = ?")
            params.append(self._person_id(person))
        if self._has_derived and not include_derived:
            clauses.append("e.derived = 0")
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        last = 0
        while True:
            derived = "e.derived" if self._has_derived else "0"
            rows = self.conn.execute(
                f"SELECT e.id, p.name, e.person_id, e.vector, i.sha256, e.box, e.det_score, e.created_at, {derived} "
                f"FROM embeddings e JOIN people p ON p.id = e.person_id LEFT JOIN images i ON i.id = e.image_id "
                f"{where} {'AND' if where else 'WHERE'} e.id > ? ORDER BY e.id LIMIT ?",
                [*params, last, batch]).fetchall()
            if not rows:
                return
            for r in rows:
                yield Template(id=r[0], person=r[1], person_id=r[2], vector=from_blob(r[3], self.dim),
                               image_sha256=r[4], box=json.loads(r[5]) if r[5] else None, det_score=r[6],
                               created_at=r[7], derived=bool(r[8]))
            last = rows[-1][0]

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
                "SELECT embedding_id, op FROM changes WHERE generation > ? ORDER BY generation, rowid", (generation,)
            ):
                if op == "add":
                    added.add(tid)  # a re-add after a remove (a merge) leaves the id in both: remove, then add
                elif tid in added:
                    added.discard(tid)  # added and removed since: never seen by the caller
                else:
                    removed.add(tid)
        return current, sorted(added), sorted(removed)

    def removed_template_ids(self) -> np.ndarray:
        """Ids (int64, sorted) of templates the change log records as removed and the store no longer holds: for
        ``check`` to ask a remote index engine whether it still returns any. Covers the log as kept (the last
        ``CHANGES_KEPT`` generations); older removals are covered by ``check``'s full listing of the engine."""
        with self.read():
            rows = self.conn.execute(
                "SELECT DISTINCT embedding_id FROM changes WHERE op = 'remove' "
                "AND embedding_id NOT IN (SELECT id FROM embeddings)").fetchall()
        return np.array(sorted(r[0] for r in rows), dtype=np.int64)

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
            "templates": one("SELECT COUNT(*) FROM embeddings" + (" WHERE derived = 0" if self._has_derived else "")
                             ).fetchone()[0],
            "mean_templates": one("SELECT COUNT(*) FROM embeddings WHERE derived = 1").fetchone()[0]
            if self._has_derived else 0,
        }

    def people_with_templates(self, at_most: int) -> int:
        """How many people have between 1 and ``at_most`` templates (enrolment advice: one is fragile)."""
        own = " WHERE derived = 0" if self._has_derived else ""
        return int(self.conn.execute(
            f"SELECT COUNT(*) FROM (SELECT person_id FROM embeddings{own} GROUP BY person_id HAVING COUNT(*) <= ?)",
            (int(at_most),)).fetchone()[0])

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
        checks.append("no two people's names are the same text in another Unicode form (NFC)")
        seen: dict[str, str] = {}
        for (name,) in self.conn.execute("SELECT name FROM people"):
            nfc = unicodedata.normalize("NFC", name)
            if nfc in seen:
                problems.append(f"two people are named {nfc!r} in different Unicode forms: merge them "
                                f"(`facedb merge`)")
            seen[nfc] = name
        if self._has_derived:
            checks.append("every mean template is the mean of its person's other templates (when kept)")
            on = self.get_meta("mean_templates") == "1"
            wrong = 0
            for (pid,) in self.conn.execute("SELECT id FROM people").fetchall():
                own = [r[0] for r in self.conn.execute(
                    "SELECT vector FROM embeddings WHERE person_id = ? AND derived = 0", (pid,))]
                kept = [r[0] for r in self.conn.execute(
                    "SELECT vector FROM embeddings WHERE person_id = ? AND derived = 1", (pid,))]
                if not on or len(own) < 2:
                    wrong += len(kept) > 0
                    continue
                if len(kept) != 1 or any(len(b) != 4 * self.dim for b in own + kept):
                    wrong += 1
                    continue
                mean = self._vectors(own).mean(axis=0)
                if float(np.linalg.norm(mean)) > 1e-6 and not np.allclose(
                        self._vectors(kept)[0], mean / np.linalg.norm(mean), atol=1e-5):
                    wrong += 1
            if wrong:
                problems.append(f"{wrong} people's mean templates do not match their templates "
                                "(`facedb mean-templates on` or `FaceDB.configure_templates(mean=True)` "
                                "recomputes them)")
        return checks, problems

    # ------------------------------------------------------------------- audit
    def _audit_connection(self) -> sqlite3.Connection:
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
                conn.execute("DELETE FROM audit WHERE time < ?", (self._cutoff(retention_days),))

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

    # ------------------------------------------------------------ API keys and webhooks (the service's)
    _KEY_COLUMNS_V6 = "id, name, scope, key_hash, created_at, revoked_at"

    @property
    def _key_columns(self) -> str:
        """The key table's columns this store's schema has (a read-only store may predate the grants)."""
        return self._KEY_COLUMNS_V6 + (", grants" if self.version >= GRANTS_VERSION else "")

    _HOOK_COLUMNS = "id, url, events, secret, key_id, created_at"

    def _need_version(self, version: int, what: str) -> None:
        if self.version < version:
            raise DatabaseError(f"{self.path} predates {what}: open it once writable to upgrade it")

    def add_api_key(self, key_id: str, name: str | None, scope: str, key_hash: str,
                    grants: str = "") -> dict[str, Any]:
        """Store a new API key (its hash only) with ``grants`` (comma-separated); DuplicateError when a live key
        already has ``name``."""
        self._need_version(GRANTS_VERSION if grants else KEYS_VERSION, "API keys' grants" if grants else "API keys")
        if scope == "metrics":
            self._need_version(METRICS_SCOPE_VERSION, "the metrics scope")
        row = {"id": key_id, "name": name, "scope": scope, "key_hash": key_hash, "created_at": utcnow(),
               "revoked_at": None}
        with self.write():
            if name is not None and self.conn.execute(
                    "SELECT 1 FROM api_keys WHERE name = ? AND revoked_at IS NULL", (name,)).fetchone():
                raise DuplicateError(f"a key named {name!r} already exists (revoke it first)")
            self.conn.execute("INSERT INTO api_keys (id, name, scope, key_hash, created_at, revoked_at) "
                              "VALUES (:id, :name, :scope, :key_hash, :created_at, :revoked_at)", row)
            if grants:
                self.conn.execute("UPDATE api_keys SET grants = ? WHERE id = ?", (grants, key_id))
        return {**row, "grants": grants}

    def api_key(self, key_id: str) -> dict[str, Any] | None:
        """The key row with id ``key_id`` (revoked or not), or None."""
        if self.version < KEYS_VERSION:
            return None
        row = self.conn.execute(f"SELECT {self._key_columns} FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return dict(zip(self._key_columns.split(", "), row)) if row else None

    def api_keys(self) -> list[dict[str, Any]]:
        """Every key row, oldest first (revoked ones too: they stay, so the audit trail's actors resolve)."""
        if self.version < KEYS_VERSION:
            return []
        rows = self.conn.execute(f"SELECT {self._key_columns} FROM api_keys ORDER BY created_at, id").fetchall()
        return [dict(zip(self._key_columns.split(", "), r)) for r in rows]

    def revoke_api_key(self, ref: str) -> dict[str, Any]:
        """Revoke the key whose id is ``ref``, or the live key named ``ref``; returns its row. NotFoundError if
        there is none; revoking a revoked key changes nothing."""
        self._need_version(KEYS_VERSION, "API keys")
        with self.write():
            row = self.conn.execute(f"SELECT {self._key_columns} FROM api_keys WHERE id = ?", (ref,)).fetchone()
            if row is None:
                row = self.conn.execute(f"SELECT {self._key_columns} FROM api_keys WHERE name = ? "
                                        "AND revoked_at IS NULL", (ref,)).fetchone()
            if row is None:
                raise NotFoundError(f"no API key with id or name {ref!r}")
            key = dict(zip(self._key_columns.split(", "), row))
            if key["revoked_at"] is None:
                key["revoked_at"] = utcnow()
                self.conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (key["revoked_at"], key["id"]))
            if self.version >= SESSIONS_VERSION:  # its console sessions end with it
                self.conn.execute("DELETE FROM console_sessions WHERE key_id = ?", (key["id"],))
        return key

    # --------------------------------------------------------------------- console sessions (the service's)
    def add_console_session(self, token_hash: str, key_id: str, now: float, expired_before: float,
                            idle_before: float) -> None:
        """Store a console session (the token's hash, never the token) and forget the sessions that began
        before ``expired_before`` or were last used before ``idle_before`` (Unix seconds)."""
        self._need_version(SESSIONS_VERSION, "console sessions")
        with self.write():
            self.conn.execute("DELETE FROM console_sessions WHERE created_at < ? OR seen_at < ?",
                              (expired_before, idle_before))
            self.conn.execute("INSERT INTO console_sessions (token_hash, key_id, created_at, seen_at) "
                              "VALUES (?, ?, ?, ?)", (token_hash, key_id, now, now))

    def console_session(self, token_hash: str) -> dict[str, Any] | None:
        """The session row for a token's hash (``key_id``, ``created_at``, ``seen_at``), or None."""
        if self.version < SESSIONS_VERSION:
            return None
        row = self.conn.execute("SELECT key_id, created_at, seen_at FROM console_sessions WHERE token_hash = ?",
                                (token_hash,)).fetchone()
        return {"key_id": row[0], "created_at": float(row[1]), "seen_at": float(row[2])} if row else None

    def touch_console_session(self, token_hash: str, now: float) -> None:
        """Mark a session used at ``now`` (its idle expiry starts again)."""
        self._need_version(SESSIONS_VERSION, "console sessions")
        with self.write():
            self.conn.execute("UPDATE console_sessions SET seen_at = ? WHERE token_hash = ?", (now, token_hash))

    def remove_console_session(self, token_hash: str) -> bool:
        """End a session (sign-out, or found expired); whether there was one."""
        self._need_version(SESSIONS_VERSION, "console sessions")
        with self.write():
            cur = self.conn.execute("DELETE FROM console_sessions WHERE token_hash = ?", (token_hash,))
        return cur.rowcount > 0

    def add_webhook(self, url: str, events: Sequence[str], secret: str, key_id: str | None) -> dict[str, Any]:
        """Store a webhook (for one key's requests, or database-wide when ``key_id`` is None)."""
        self._need_version(KEYS_VERSION, "webhooks")
        row = {"url": url, "events": ",".join(events), "secret": secret, "key_id": key_id, "created_at": utcnow()}
        with self.write():
            if key_id is not None and not self.conn.execute(
                    "SELECT 1 FROM api_keys WHERE id = ? AND revoked_at IS NULL", (key_id,)).fetchone():
                raise NotFoundError(f"no live API key with id {key_id!r}")
            cur = self.conn.execute("INSERT INTO webhooks (url, events, secret, key_id, created_at) "
                                    "VALUES (:url, :events, :secret, :key_id, :created_at)", row)
            row["id"] = int(cur.lastrowid)
        return row

    def webhooks(self) -> list[dict[str, Any]]:
        """Every webhook row (with its secret), oldest first."""
        if self.version < KEYS_VERSION:
            return []
        rows = self.conn.execute(f"SELECT {self._HOOK_COLUMNS} FROM webhooks ORDER BY id").fetchall()
        return [dict(zip(self._HOOK_COLUMNS.split(", "), r)) for r in rows]

    def remove_webhook(self, hook_id: int) -> dict[str, Any]:
        """Delete a webhook; returns its row. NotFoundError if there is none."""
        self._need_version(KEYS_VERSION, "webhooks")
        with self.write():
            row = self.conn.execute(f"SELECT {self._HOOK_COLUMNS} FROM webhooks WHERE id = ?",
                                    (int(hook_id),)).fetchone()
            if row is None:
                raise NotFoundError(f"no webhook with id {hook_id}")
            self.conn.execute("DELETE FROM webhooks WHERE id = ?", (int(hook_id),))
        return dict(zip(self._HOOK_COLUMNS.split(", "), row))
    # ------------------------------------------------------- unassigned faces (unknown visitors)
    def _has_unassigned(self, conn: sqlite3.Connection | None = None) -> bool:
        """Whether the table exists: a database opened read-only before its migration lacks it."""
        return (conn or self.conn).execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'unassigned_faces'").fetchone() is not None

    @staticmethod
    def _cutoff(retention_days: float) -> str:
        return time_before(retention_days * 86400)

    def append_unassigned(self, rows: Sequence[dict[str, Any]], retention_days: float) -> None:
        """Keep faces answered unknown (dicts with vector, and any of actor, image_sha256, box, det_score,
        similarity) and drop those past the retention period, in one transaction. Written through the audit
        trail's connection: a door reader opens read-only and its unknown faces are kept too, without an fsync
        per search (they survive a process crash; a power cut can lose the last few, as for the audit trail)."""
        if not rows:
            return
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
            conn.execute("DELETE FROM unassigned_faces WHERE time < ?", (self._cutoff(retention_days),))

    def purge_unassigned(self, retention_days: float) -> int:
        """Delete unknown faces older than the retention period; returns how many."""
        if self.readonly or not self._has_unassigned():
            return 0
        with self.write():
            return self.conn.execute("DELETE FROM unassigned_faces WHERE time < ?",
                                     (self._cutoff(retention_days),)).rowcount

    def unassigned(self, retention_days: float) -> tuple[list[tuple[Any, ...]], np.ndarray]:
        """Every unknown face kept and within the retention period, in id order, from one snapshot: (rows of
        (id, time, actor, image_sha256, box, det_score, similarity), vectors ``(n, dim)``)."""
        if not self._has_unassigned():
            return [], np.zeros((0, self.dim), dtype=np.float32)
        with self.read():
            raw = self.conn.execute(
                "SELECT id, time, actor, image_sha256, box, det_score, similarity, vector FROM unassigned_faces "
                "WHERE time >= ? ORDER BY id", (self._cutoff(retention_days),)).fetchall()
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

    # ------------------------------------------------------------------------------ face thumbnails
    _THUMB_OWNERS: ClassVar[dict[str, str]] = {"template": "embedding_id", "probe": "audit_id",
                                               "visitor": "visitor_id"}

    def _insert_thumbnails(self, conn: sqlite3.Connection, column: str, ids: Sequence[int],
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

    def vacuum(self) -> None:
        """Rewrite the file, dropping free pages, then truncate the WAL (so no removed bytes linger)."""
        try:
            self.conn.execute("VACUUM")
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except _Error as exc:
            raise DatabaseError(f"{self.path}: vacuum failed ({exc})") from None

    def truncate_wal(self, seconds: float = 5.0) -> bool:
        """Checkpoint the write-ahead log into the database file and truncate it to zero bytes, so that frames
        of removed rows leave the WAL (erasure). That needs a moment with no writer and every reader on the
        latest snapshot: with busy waiting off, it is tried every millisecond or so for up to ``seconds`` (SQLite's
        own busy handler backs off to 100 ms sleeps, which readers that log every decision can starve). Returns
        whether it completed; read-only stores cannot checkpoint: False."""
        if self.readonly:
            return False
        import time

        deadline = time.monotonic() + seconds
        self.conn.execute("PRAGMA busy_timeout = 0")
        try:
            while True:
                try:
                    busy = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                except _OperationalError:
                    busy = 1
                if not busy:
                    return True
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.001)
        finally:
            self.conn.execute("PRAGMA busy_timeout = 30000")

    def backup_to(self, dest: Path) -> None:
        """Write a consistent copy of this store to the new file ``dest`` through SQLite's online backup API (one
        step, from one read snapshot, through a connection of its own: writers go on meanwhile, and this store's
        connection keeps answering). An encrypted store's copy is encrypted under the same key (the backup API
        copies its ciphertext pages); the copy is fsynced, in rollback-journal mode (one file, nothing beside it).
        DatabaseExistsError if ``dest`` exists."""
        dest = Path(dest)
        if dest.exists():
            raise DatabaseExistsError(f"{dest} already exists")
        source = self._connect(self.path, readonly=True, key=self._key)
        driver = _driver(self._key is not None)
        old = os.umask(0o077)  # a copy of biometric data: private from birth
        try:
            target = livefiles.connect(driver, dest, isolation_level=None, check_same_thread=False)
        finally:
            os.umask(old)
        try:
            if self._key is not None:
                _key_connection(target, self._key)
            raw_source = source._conn if isinstance(source, _Guarded) else source
            with _typed_errors(self.path):
                raw_source.backup(target)  # pages=-1: every page in one step, one snapshot
                # The copy is a file at rest, not a live store: a rollback journal, so that reading it (from
                # read-only media, too) needs no -wal and -shm beside it. Opened writable, a store turns WAL on.
                target.execute("PRAGMA journal_mode = DELETE")
        except _Error as exc:
            target.close()
            dest.unlink(missing_ok=True)
            raise DatabaseError(f"{self.path}: backup failed ({exc})") from None
        finally:
            source.close()
        target.close()
        livefiles.fsync_file(dest)

    def erasure_pending(self) -> bool:
        """Whether a removal committed but its index file rewrite did not finish (a crash in between)."""
        return self.get_meta("erase_pending", "0") == "1"


class ExclusiveCopy:
    """One connection holding a database file exclusively while a copy of it is made under another key (or
    none): what ``facedb encrypt`` and ``facedb rotate-key --reencrypt`` do, before swapping the copy in.

    Exclusive means no other process can read or write the file until :meth:`close`: the WAL is checkpointed
    and the journal switched to rollback mode (SQLite refuses that while another connection has the database
    open: then :class:`DatabaseError` says so, and nothing has changed), and ``locking_mode=EXCLUSIVE`` keeps
    the write lock taken. A process that was waiting for the lock meanwhile finds the old file destroyed
    (:meth:`destroy_original`) and gets an error, never a write into a file that was replaced.
    """

    def __init__(self, path: Path, key: str | None) -> None:
        self.path = Path(path)
        driver = _driver(True)  # sqlcipher3 also reads plain files, and has sqlcipher_export
        conn = livefiles.connect(driver, self.path, isolation_level=None, timeout=2, check_same_thread=False)
        try:
            if key is not None:
                _key_connection(conn, key)
            self.version = conn.execute("PRAGMA user_version").fetchone()[0]
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            mode = conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
            if str(mode).lower() != "delete":
                raise sqlite3.OperationalError("database is locked")
            conn.execute("PRAGMA locking_mode = EXCLUSIVE")
            conn.execute("BEGIN EXCLUSIVE")  # taken now, and kept after COMMIT by the exclusive locking mode
            conn.execute("COMMIT")
        except _Error as exc:
            conn.close()
            if "locked" in str(exc) or "busy" in str(exc):
                raise DatabaseError(f"{self.path} is in use by another process: close every process using the "
                                    "database (services, readers) and try again; nothing was changed") from None
            raise DatabaseError(f"{self.path}: cannot take the database for conversion ({exc})") from None
        self.conn = conn
        # the original's inode, to destroy it after the swap; a descriptor of a file this process holds through
        # SQLite, so livefiles keeps it open until the connection has closed (closing it first would drop locks)
        with livefiles.raw_fd(self.path, os.O_RDWR) as fd:
            self._fd = fd

    def copy_to(self, dest: Path, key: str | None, meta: dict[str, str]) -> None:
        """Write the whole database to ``dest`` (SQLCipher under ``key``, or plain), with ``meta`` rows set in
        the copy, and make it durable."""
        if key is not None and not all(c in "0123456789abcdef" for c in key):
            raise ValueError("a store key is hex")
        Path(dest).unlink(missing_ok=True)
        clause = f"KEY \"x'{key}'\"" if key is not None else "KEY ''"
        old = os.umask(0o077)
        try:
            self.conn.execute(f"ATTACH DATABASE ? AS fresh {clause}", (str(dest),))
        finally:
            os.umask(old)
        try:
            if key is not None:
                self.conn.execute(f"PRAGMA fresh.cipher_page_size = {CIPHER_PAGE_SIZE}")
            else:
                self.conn.execute(f"PRAGMA fresh.page_size = {CIPHER_PAGE_SIZE}")
            self.conn.execute("SELECT sqlcipher_export('fresh')")
            self.conn.execute(f"PRAGMA fresh.user_version = {int(self.version)}")
            self.conn.executemany("INSERT OR REPLACE INTO fresh.meta (key, value) VALUES (?, ?)",
                                  [(k, str(v)) for k, v in meta.items()])
        finally:
            self.conn.execute("DETACH DATABASE fresh")
        livefiles.fsync_file(dest)

    def destroy_original(self, whole: bool) -> None:
        """Overwrite the original file's content with zeros (``whole``: every byte, for a plain-text original;
        else its first pages, which is enough to make any stale connection fail), through the descriptor kept
        since before the swap."""
        size = os.fstat(self._fd).st_size
        todo = size if whole else min(size, 1 << 20)
        block = bytes(1 << 20)
        done = 0
        while done < todo:
            done += os.pwrite(self._fd, block[:min(len(block), todo - done)], done)
        os.fsync(self._fd)

    def close(self) -> None:
        with contextlib.suppress(*_Error):
            self.conn.close()  # the kept descriptor closes with it (livefiles), never before
