"""Backup and restore of a database directory (``facedb backup DEST``, ``facedb restore SRC``).

A backup is a directory holding:

* ``facedb.sqlite3``: a consistent copy of the store made online by SQLite's backup API from one read snapshot
  (never a file copy of a live file: see ``livefiles.py``), while the service keeps answering and writing. The
  store holds everything that is the truth: people, templates, settings, calibration, API keys, webhooks and
  the audit trail. An encrypted store's copy stays encrypted under the same data key.
* ``facedb.keys`` for an encrypted database: its keyring (data keys wrapped under the KEK; the KEK itself is
  never written anywhere). The manifest says which KEK the copy needs.
* ``index.faiss`` only when asked (``--with-index``): the index is derived, and a restored database rebuilds
  or loads it as any database does (a file that does not match the store's stamp is never trusted).
* ``backup.json``: the manifest (format, time, model, dimension, schema version, counts, the store copy's
  SHA-256, and for an encrypted copy the database id and key version whose KEK opens it).

Restore checks the copy before it changes anything (manifest, the copy's SHA-256, the key, SQLite's
``integrity_check``, model and schema version), builds the new directory beside the target and renames it into
place. ``--replace`` moves only a facedb database directory, and only while no process has a database at or
beneath it open (held by SQLite's own file locks, without opening it: no key needed, so a damaged database, or
one whose key is gone or was rotated after the backup, is replaced as any other). The old directory is moved
aside (``DB.replaced-<time>``), never deleted. A backup is built the same way, in a staging directory beside
its destination, so a killed run leaves no partial backup behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from dataclasses import replace as with_fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import (
    DatabaseError,
    DatabaseExistsError,
    IndexUnavailableError,
    InvalidInputError,
    KeyMissingError,
    TamperedError,
    WrongKeyError,
)
from ..fsio import fsync_dir, write_atomic
from ..gallery import livefiles
from ..gallery.store import SCHEMA_VERSION, Store
from ..protection import encryption
from ..protection.keyring import KEYRING_FILE, keyring_file

MANIFEST = "backup.json"
FORMAT = "facedb-backup/1"
STORE_FILE = encryption.STORE_FILE
INDEX_FILE = encryption.INDEX_FILE


@dataclass(frozen=True)
class BackupReport:
    """What a backup holds (the manifest) or what a restore put in place."""

    path: str
    created_at: str
    model_id: str
    dim: int
    schema_version: int
    people: int
    templates: int
    encrypted: bool
    store_sha256: str
    index: bool
    database_id: str | None = None
    key_version: int | None = None
    format: str = FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sha256(path: Path) -> str:
    """SHA-256 of ``path``, streamed (a store is many GB at scale: never held whole in memory)."""
    h = hashlib.sha256()
    with livefiles.raw_fd(path) as fd:
        offset = 0
        while chunk := os.pread(fd, 1 << 24, offset):
            h.update(chunk)
            offset += len(chunk)
    return h.hexdigest()


def _overlap(a: Path, b: Path) -> bool:
    """Whether the directories ``a`` and ``b`` are one, or one is inside the other (links resolved)."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents


def _fresh_dir(path: Path, what: str) -> None:
    """Create ``path`` (0700); DatabaseExistsError if it exists and is not an empty directory."""
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise DatabaseExistsError(f"{path} already exists: {what} into a new directory")
    old = os.umask(0o077)
    try:
        path.mkdir(parents=True, exist_ok=True)
    finally:
        os.umask(old)


def _staging(dest: Path, what: str) -> Path:
    """A new, empty staging directory beside ``dest`` (``.NAME.WHAT-PID``), where a backup or restore is built
    whole before one rename puts it at ``dest``: a process killed midway leaves no partial ``dest``. Staging
    directories of processes that no longer run are removed first (a SIGKILLed run cannot clean up)."""
    prefix = f".{dest.name}.{what}-"
    if dest.parent.is_dir():
        for old in dest.parent.glob(f"{prefix}*"):
            pid = old.name[len(prefix):]
            if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
    staging = dest.parent / f"{prefix}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    _fresh_dir(staging, what)
    return staging


def _running(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _put_in_place(staging: Path, dest: Path, what: str) -> None:
    """Rename the finished ``staging`` to ``dest`` (which must not exist, or be an empty directory: rename(2)
    replaces an empty one atomically). DatabaseExistsError, in one line, if another process made ``dest``
    meanwhile."""
    try:
        os.rename(staging, dest)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise DatabaseExistsError(f"{dest} was made by another process meanwhile (another {what} into it?): "
                                      f"this {what} was not put there; {what} into a new directory") from None
        raise
    fsync_dir(dest.parent)


def backup(db: Any, dest: Path, *, with_index: bool = False) -> BackupReport:
    """Back up the open FaceDB ``db`` into the new directory ``dest`` (see the module's docstring). The copy's
    counts are read from the copy itself (the snapshot), not from the live database. The copy is built in a
    staging directory beside ``dest`` and renamed into place when whole. DatabaseExistsError if ``dest`` exists
    and is not empty, InvalidInputError if it is inside the database's directory (or holds it); nothing is
    left behind on failure."""
    dest = Path(dest).resolve()
    root = Path(db.root).resolve()
    if dest == root or root in dest.parents:  # lost with the database, and moved aside with it by restore --replace
        raise InvalidInputError(f"{dest} is inside the database directory {root}: a backup there goes with "
                                "the database; back up to another directory (another disk, at best)")
    if dest in root.parents:
        raise InvalidInputError(f"the database directory {root} is inside {dest}: back up to a new directory "
                                "outside the database (another disk, at best)")
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        raise DatabaseExistsError(f"{dest} already exists: back up into a new directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging(dest, "backup")
    try:
        db.store.backup_to(staging / STORE_FILE)
        protection = db.protection
        if protection is not None:
            shutil.copy2(db.root / KEYRING_FILE, staging / KEYRING_FILE)  # wrapped keys only: no KEK in it
        copied_index = False
        if with_index:
            db.save_index()
            if (db.root / INDEX_FILE).is_file():
                shutil.copy2(db.root / INDEX_FILE, staging / INDEX_FILE)  # written whole by rename: not SQLite's
                copied_index = True
        copy = Store.open(staging / STORE_FILE, readonly=True, key=protection.store_key() if protection else None)
        try:
            meta = copy.all_meta()
            counts = copy.counts()
            version = copy.version
        finally:
            copy.close()
        report = BackupReport(
            path=str(dest), created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            model_id=str(meta.get("model_id")), dim=int(meta.get("dim", 0)), schema_version=int(version),
            people=int(counts["people"]), templates=int(counts["templates"]), encrypted=protection is not None,
            store_sha256=_sha256(staging / STORE_FILE), index=copied_index,
            database_id=protection.database_id if protection else None,
            key_version=protection.key_version if protection else None)
        write_atomic(staging / MANIFEST, json.dumps(report.to_dict(), indent=2).encode())
        fsync_dir(staging)
        _put_in_place(staging, dest, "backup")
        return report
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_manifest(src: Path) -> BackupReport:
    """The manifest of the backup at ``src``; InvalidInputError if it is not a facedb backup."""
    path = Path(src) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise InvalidInputError(f"{src} is not a facedb backup (no readable {MANIFEST})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InvalidInputError(f"{src} is not a facedb backup this version reads (format {data.get('format')!r})"
                                if isinstance(data, dict) else f"{src}: {MANIFEST} is not a manifest")
    try:
        manifest = BackupReport(**{k: data[k] for k in BackupReport.__dataclass_fields__ if k in data})
    except TypeError as exc:
        raise InvalidInputError(f"{src}: {MANIFEST} is incomplete ({exc})") from None
    version = manifest.schema_version
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InvalidInputError(f"{src}: {MANIFEST} gives no valid schema_version ({version!r})")
    if version > SCHEMA_VERSION:  # a newer facedb made it: this one cannot know what the copy means
        raise DatabaseError(f"{src}: the backup has schema version {version}; this facedb knows up to "
                            f"{SCHEMA_VERSION}: restore it with the facedb version that made it, or a newer one")
    return manifest


def _fields(model_id: str, dim: int, people: int, templates: int) -> str:
    return f"model {model_id}, dimension {dim}, {people} people, {templates} templates"


def _unlock_backup(src: Path, key: object, manifest: BackupReport) -> Any:
    """The backup's keyring opened with ``key`` (None for a plain backup); the key errors name the backup and
    the key it needs, which is the database's key when the backup was made (a later rotate-key does not
    change what a backup needs)."""
    if not manifest.encrypted:
        return None
    try:
        return encryption.unlock(src, key, readonly=True)
    except (KeyMissingError, WrongKeyError) as exc:
        needs = (f"it needs the key of database {manifest.database_id}, key version {manifest.key_version}, as "
                 f"it was at {manifest.created_at} (a rotate-key since then does not change it)")
        raise type(exc)(f"the backup {src}: {exc}; {needs}") from None


def verify(src: Path, key: object = None) -> BackupReport:
    """Check the backup at ``src`` without changing anything: manifest, the store copy's SHA-256, the key
    (KeyMissingError / WrongKeyError), SQLite's integrity check, model, dimension, counts and schema version.
    TamperedError or DatabaseError say what failed."""
    src = Path(src)
    manifest = read_manifest(src)
    store_path = src / STORE_FILE
    if not store_path.is_file():
        raise DatabaseError(f"{src}: the backup has no {STORE_FILE}")
    if _sha256(store_path) != manifest.store_sha256:
        raise TamperedError(f"{store_path}: its SHA-256 differs from the manifest's (altered or damaged)")
    if manifest.encrypted != keyring_file(src).is_file():
        raise DatabaseError(f"{src}: the manifest and the keyring disagree on whether the copy is encrypted")
    protection = _unlock_backup(src, key, manifest)
    store = Store.open(store_path, readonly=True, key=protection.store_key() if protection else None)
    try:
        _, problems = store.check()
        meta = store.all_meta()
        counts = store.counts()
        version = store.version
    finally:
        store.close()
    if problems:
        raise DatabaseError(f"{store_path}: the copy fails its check: {problems[0]}")
    if version > SCHEMA_VERSION:
        raise DatabaseError(f"{src}: schema version {version}; this facedb knows up to {SCHEMA_VERSION}")
    found = (str(meta.get("model_id")), int(meta.get("dim", 0)), int(counts["people"]), int(counts["templates"]))
    said = (manifest.model_id, manifest.dim, manifest.people, manifest.templates)
    if found != said:
        raise DatabaseError(f"{src}: the copy holds {_fields(*found)}; the manifest says {_fields(*said)}")
    return manifest


@dataclass(frozen=True)
class RestoreReport(BackupReport):
    """A restore: the backup's manifest (``path`` is the folder restored from), where it was restored to, and
    where the database it replaced was moved (None if it replaced none)."""

    restored_to: str = ""
    replaced: str | None = None


def _database_dir(path: Path) -> None:
    """InvalidInputError unless ``path`` is a facedb database directory by its files (it holds a regular
    ``facedb.sqlite3``), sound or not: ``--replace`` moves a database aside, never any other folder or file."""
    if not path.is_dir() or path.is_symlink() or not (path / STORE_FILE).is_file():
        what = "a directory" if path.is_dir() else "a file" if path.exists() else "missing"
        raise InvalidInputError(f"{path} is not a facedb database directory ({what} without {STORE_FILE}): "
                                "--replace only moves a database aside; nothing was moved")


def _stores_under(path: Path) -> list[Path]:
    """Every ``facedb.sqlite3`` at or beneath ``path`` (links not followed): a database kept inside another
    one's directory is moved with it, so it must not be in use either."""
    found = []
    for top, dirs, files in os.walk(path):
        dirs.sort()
        if STORE_FILE in files:
            found.append(Path(top) / STORE_FILE)
    return found


def restore(src: Path, dest: Path, *, key: object = None, replace: bool = False) -> RestoreReport:
    """Restore the backup at ``src`` as the database directory ``dest`` after :func:`verify` (``key`` opens the
    backup: the key its database had when it was made). ``dest`` must not exist (or be an empty directory)
    unless ``replace``: then it must be a facedb database directory (InvalidInputError otherwise: no other
    folder or file is ever moved), and it is moved aside to ``dest.replaced-<time>`` while held against every
    other process without opening it (no key needed: a damaged database, or one whose key is gone or was
    rotated, is replaced as any other). DatabaseError if any process has a database at or beneath ``dest``
    open; nothing changed. InvalidInputError if ``src`` and ``dest`` overlap (one directory, or one inside the
    other). The copy is built beside ``dest`` and renamed into place. Returns the manifest, with ``path`` the
    folder restored from."""
    src, dest = Path(src).resolve(), Path(dest).resolve()  # "." has no name to put a copy beside
    manifest = read_manifest(src)  # not a backup at all: say that first
    if _overlap(src, dest):  # --replace would move the backup aside, or turn it into a database
        raise InvalidInputError(f"{dest} and the backup {src} overlap (the same directory, or one inside the "
                                "other): restore into another directory")
    occupied = dest.exists() and not (dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir()))
    if occupied and not replace:
        raise DatabaseExistsError(f"{dest} already exists: restore into a new directory, or replace it "
                                  "(`--replace`: the old directory is kept beside it)")
    if occupied:
        _database_dir(dest)
        with _held(dest):  # in use now: say so before the (long) check of the copy
            pass
    manifest = verify(src, key)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging(dest, "restore")
    aside = None
    try:
        protection = _unlock_backup(src, key, manifest)
        copy = Store.open(src / STORE_FILE, readonly=True, key=protection.store_key() if protection else None)
        try:
            copy.backup_to(staging / STORE_FILE)  # through SQLite, not a file copy: the result is checked below
        finally:
            copy.close()
        keyring_file(src)  # a misnamed keyring under its own name first
        for name in (KEYRING_FILE, INDEX_FILE):
            if (src / name).is_file():
                shutil.copy2(src / name, staging / name)
        fsync_dir(staging)
        if occupied:
            with _held(dest):
                aside = dest.with_name(f"{dest.name}.replaced-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}")
                if aside.exists():
                    aside = aside.with_name(f"{aside.name}-{os.getpid()}")
                os.rename(dest, aside)
                _put_in_place(staging, dest, "restore")
        else:
            _put_in_place(staging, dest, "restore")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return RestoreReport(**{**with_fields(manifest, path=str(src)).to_dict(), "restored_to": str(dest),
                            "replaced": str(aside) if aside else None})


@contextlib.contextmanager
def _held(root: Path) -> Any:
    """Hold every database at or beneath ``root`` against other processes for the block, without opening any
    (``livefiles.hold_unopened``): DatabaseError if one is in use."""
    with contextlib.ExitStack() as stack:
        for store in _stores_under(root):
            stack.enter_context(livefiles.hold_unopened(store))
        yield


# ------------------------------------------------------------------------------------ FaceDB's backup glue
def backup_recorded(db: Any, dest: Path, with_index: bool) -> BackupReport:
    """:meth:`facedb.FaceDB.backup`: :func:`backup`, then recorded in the audit trail (``backup``)."""
    report = backup(db, dest, with_index=with_index)
    with db._lock:
        db.trail.record("backup", [{"detail": {"to": report.path, "people": report.people,
                                               "templates": report.templates}}], db.settings())
    return report


def restore_checked(facade: Any, src: str | os.PathLike[str], path: str | os.PathLike[str], *, key: object,
                    replace: bool) -> RestoreReport:
    """:meth:`facedb.FaceDB.restore`: :func:`restore`, then the restored database (opened with ``facade``, the
    FaceDB class) records the restore and must pass ``check`` (DatabaseError otherwise; IndexUnavailableError,
    saying what to do, when its shared index engine is not usable as it is)."""
    root = Path(path).resolve()  # "." would name the directory moved aside (the process's cwd goes with it)
    report = restore(Path(src), root, key=key, replace=replace)
    with facade.open(root, key=key) as db:  # recorded first: the files are in place whatever the check says
        db.trail.record("restore", [{"detail": {"from": str(src), "backup_created_at": report.created_at}}],
                        db.settings())
        try:
            result = db.check()
        except IndexUnavailableError as exc:
            raise IndexUnavailableError(
                f"{path}: restored (the backup's files are in place), but its index is not usable as it is: "
                f"{exc}. To replace the original, `facedb --db {path} rebuild-index`; to run beside it, give "
                f"it a collection of its own: `facedb --db {path} reindex --index milvus --milvus-collection "
                "NAME`") from None
        if not result.ok:
            raise DatabaseError(f"{path}: the restored database fails its check: {result.problems[0]}")
    return report
