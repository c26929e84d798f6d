"""The schema and its history: numbered migrations applied in one transaction and tracked in
``PRAGMA user_version``, and the schema versions at which each table family appeared (a store opened read-only
before a migration reads its tables as they were).

Its own module because the whole schema is read in one place: a new table or column is a new entry at the end of
:data:`MIGRATIONS` (never an edit of an old one, so that a database from any earlier release opens in this
one). sqlite-utils has no migration system of its own. The steps run on the connection
:mod:`~facedb.gallery.store.connection` opens; this module imports no driver.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from typing import TYPE_CHECKING

from .names import name_search_text, name_sort_key

if TYPE_CHECKING:
    from .connection import Connection


def _add_column(conn: Connection, table: str, definition: str) -> None:
    """ALTER TABLE ... ADD COLUMN, unless the column is there already (a migration run twice)."""
    name = definition.split()[0]
    if name not in {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}:
        conn.execute(f"ALTER TABLE {table} ADD COLUMN {definition}")


_KEY_SCOPES = "'identify', 'enroll', 'admin', 'metrics'"


def _widen_key_scopes(conn: Connection) -> None:
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


def _normalise_stored_names(conn: Connection) -> None:
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

def _add_name_keys(conn: Connection) -> None:
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


def _apply(conn: Connection, step: str | Callable[[Connection], None]) -> None:
    if callable(step):
        step(conn)
        return
    for statement in step.split(";"):
        if statement.strip():
            conn.execute(statement)


#: Versioned migrations: entry i takes the schema from version i to i + 1 (PRAGMA user_version). An entry is
#: an SQL script, or a function of the connection for changes SQL cannot express.
MIGRATIONS: list[str | Callable[[Connection], None]] = [
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
    # otherwise (new databases default to the background writer: docs/guarantees.md). Branch speed (#17)
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
