"""The database file: the only module that imports a SQLite driver (Python's ``sqlite3``, or ``sqlcipher3`` for
encrypted databases) or sqlite-utils. It opens, creates and migrates a store, runs its transactions, reads and
writes the ``meta`` rows, and does the whole-file work (vacuum, WAL truncation, online backup, the exclusive copy
``facedb encrypt`` makes). The table families (people, templates, audit, ...) are classes on top of
:class:`StoreBase` that use its connection and transactions: none of them imports a driver.

* WAL journal, ``synchronous=FULL``: readers never block the writer, and a transaction that returned is on disk
  even across a power cut, not only a process crash.
* Writers are serialised by SQLite's own write lock, taken up front with ``BEGIN IMMEDIATE`` (so two writers
  queue on ``busy_timeout`` rather than fail half-way with SQLITE_BUSY on a lock upgrade).
* ``secure_delete=ON``: deleted rows are overwritten with zeros, so a removed template does not linger in
  free pages (erasure).
* Encrypted databases (``key`` given) are SQLCipher 4 end to end: the same schema and SQL through the
  ``sqlcipher3`` driver, keyed with a raw 256-bit key (SQLCipher's ``x'...'`` form: no PBKDF2 per connection,
  the key is already derived by ``protection/keyring.py``), 16 KiB cipher pages, temporary tables in memory.
  Every page of the file, of the WAL and of the free list is AES-256-CBC with a per-page HMAC-SHA512. Plain
  databases keep Python's ``sqlite3``.
* Erasure: after a removal the WAL is checkpointed and truncated (:meth:`StoreBase.truncate_wal`), because it
  still holds the frames that wrote the removed rows; ``secure_delete`` has already zeroed them in the file.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import sqlite_utils

from ...errors import DatabaseError, DatabaseExistsError
from .. import livefiles
from .migrations import MIGRATIONS, SCHEMA_VERSION, _apply
from .times import utcnow

#: The connection type the table families annotate with (they import no driver themselves).
Connection: TypeAlias = sqlite3.Connection
_S = TypeVar("_S", bound="StoreBase")  # create() and open() return the class they are called on: Store

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
        from ...errors import EncryptionUnavailableError

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
        from ...errors import TamperedError

        raise TamperedError(f"{path}: a page of the encrypted database failed authentication (altered or "
                            "damaged)") from None
    except _DatabaseError as exc:
        text = str(exc)
        if any(s in text for s in ("not a database", "malformed", "SQL logic error", "out of memory")):
            from ...errors import TamperedError

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


class StoreBase:
    """One SQLite database file: its connection, transactions and ``meta`` rows. Use :meth:`create` or
    :meth:`open` (on :class:`~facedb.gallery.store.Store`, which adds the table families); close with
    :meth:`close`."""

    def __init__(self, path: Path, conn: Connection, key: str | None = None) -> None:
        self.path = path
        self.conn = conn
        self._key = key  # the SQLCipher key (hex), None for a plain database; never shown
        self.db = sqlite_utils.Database(conn)
        self.readonly = False
        self.version = SCHEMA_VERSION
        self.dim = int(self.get_meta("dim", "0"))

    # ------------------------------------------------------------------ opening
    @property
    def encrypted(self) -> bool:
        return self._key is not None

    @staticmethod
    def _connect(path: Path, readonly: bool, new: bool = False, key: str | None = None) -> Connection:
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
                from ...errors import TamperedError

                raise TamperedError(f"{path}: the encrypted database failed authentication with its key (altered, "
                                    "truncated or damaged); nothing was changed") from None
            raise DatabaseError(f"{path}: cannot open as a facedb database ({exc})") from None
        return conn

    @classmethod
    def create(cls: type[_S], path: Path, meta: dict[str, str], key: str | None = None) -> _S:
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
    def open(cls: type[_S], path: Path, readonly: bool = False, key: str | None = None) -> _S:
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
                from ...errors import TamperedError

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
    def _transaction(self, conn: Connection, what: str) -> Iterator[None]:
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

    def restore_meta(self, before: dict[str, str], keys: Iterable[str]) -> None:
        """Put the settings rows ``keys`` back as ``before`` had them (a row it lacked is deleted, not left
        empty: an empty row reads as a setting), with the ``settings_version`` bump of :meth:`set_meta`."""
        keys = list(keys)
        with self.write():
            self.db["meta"].upsert_all([{"key": k, "value": before[k]} for k in keys if k in before], pk="key")
            gone = [k for k in keys if k not in before]
            if gone:
                self.conn.execute(f"DELETE FROM meta WHERE key IN ({','.join('?' * len(gone))})", gone)
            self._bump("settings_version")

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

    @property
    def in_transaction(self) -> bool:
        return bool(self.conn.in_transaction)

    # ------------------------------------------------------------------ the whole file

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
