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
place, and refuses to replace a database another process has open (the exclusive hold key conversions use):
``--replace`` moves the old directory aside (``DB.replaced-<time>``) rather than deleting it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import encryption, livefiles
from .errors import DatabaseError, DatabaseExistsError, InvalidInputError, TamperedError
from .fsio import fsync_dir, write_atomic
from .protect import KEYRING_FILE
from .store import SCHEMA_VERSION, ExclusiveCopy, Store

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


def backup(db: Any, dest: Path, *, with_index: bool = False) -> BackupReport:
    """Back up the open FaceDB ``db`` into the new directory ``dest`` (see the module's docstring). The copy's
    counts are read from the copy itself (the snapshot), not from the live database. DatabaseExistsError if
    ``dest`` exists and is not empty, InvalidInputError if it is inside the database's directory; nothing is
    left behind on failure."""
    dest = Path(dest)
    if _overlap(dest, db.root):  # lost with the database, and moved aside with it by restore --replace
        raise InvalidInputError(f"{dest} is inside the database directory {db.root}: a backup there goes with "
                                "the database; back up to another directory (another disk, at best)")
    _fresh_dir(dest, "back up")
    try:
        db.store.backup_to(dest / STORE_FILE)
        protection = db.protection
        if protection is not None:
            shutil.copy2(db.root / KEYRING_FILE, dest / KEYRING_FILE)  # wrapped keys only: no KEK in it
        copied_index = False
        if with_index:
            db.save_index()
            if (db.root / INDEX_FILE).is_file():
                shutil.copy2(db.root / INDEX_FILE, dest / INDEX_FILE)  # written whole by rename: not SQLite's
                copied_index = True
        copy = Store.open(dest / STORE_FILE, readonly=True, key=protection.store_key() if protection else None)
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
            store_sha256=_sha256(dest / STORE_FILE), index=copied_index,
            database_id=protection.database_id if protection else None,
            key_version=protection.key_version if protection else None)
        write_atomic(dest / MANIFEST, json.dumps(report.to_dict(), indent=2).encode())
        fsync_dir(dest)
        return report
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
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
        return BackupReport(**{k: data[k] for k in BackupReport.__dataclass_fields__ if k in data})
    except TypeError as exc:
        raise InvalidInputError(f"{src}: {MANIFEST} is incomplete ({exc})") from None


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
    if manifest.encrypted != (src / KEYRING_FILE).is_file():
        raise DatabaseError(f"{src}: the manifest and the keyring disagree on whether the copy is encrypted")
    protection = encryption.unlock(src, key, readonly=True) if manifest.encrypted else None
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
    if found != (manifest.model_id, manifest.dim, manifest.people, manifest.templates):
        raise DatabaseError(f"{src}: the copy holds {found}, the manifest says "
                            f"{(manifest.model_id, manifest.dim, manifest.people, manifest.templates)}")
    return manifest


def restore(src: Path, dest: Path, *, key: object = None, replace: bool = False) -> BackupReport:
    """Restore the backup at ``src`` as the database directory ``dest`` after :func:`verify`. ``dest`` must
    not exist (or be empty) unless ``replace``: then the database there is held exclusively (DatabaseError if any
    process has it open; nothing changed) and moved aside to ``dest.replaced-<time>``. InvalidInputError if
    ``src`` and ``dest`` overlap (one directory, or one inside the other). Returns the manifest."""
    src, dest = Path(src), Path(dest)
    read_manifest(src)  # not a backup at all: say that first
    if _overlap(src, dest):  # --replace would move the backup aside, or turn it into a database
        raise InvalidInputError(f"{dest} and the backup {src} overlap (the same directory, or one inside the "
                                "other): restore into another directory")
    manifest = verify(src, key)
    occupied = dest.exists() and not (dest.is_dir() and not any(dest.iterdir()))
    if occupied and not replace:
        raise DatabaseExistsError(f"{dest} already exists: restore into a new directory, or replace it "
                                  "(`--replace`: the old directory is kept beside it)")
    staging = dest.parent / f".{dest.name}.restoring-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    _fresh_dir(staging, "restore")
    try:
        protection = encryption.unlock(src, key, readonly=True) if manifest.encrypted else None
        copy = Store.open(src / STORE_FILE, readonly=True, key=protection.store_key() if protection else None)
        try:
            copy.backup_to(staging / STORE_FILE)  # through SQLite, not a file copy: the result is checked below
        finally:
            copy.close()
        for name in (KEYRING_FILE, INDEX_FILE):
            if (src / name).is_file():
                shutil.copy2(src / name, staging / name)
        fsync_dir(staging)
        with _held(dest if occupied else None, key):
            if occupied:
                aside = dest.with_name(f"{dest.name}.replaced-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}")
                os.rename(dest, aside)
            elif dest.exists():
                dest.rmdir()
            os.rename(staging, dest)
            fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


@contextlib.contextmanager
def _held(root: Path | None, key: object) -> Any:
    """Hold the database at ``root`` exclusively for the block (nothing when None): DatabaseError if another
    process has it open."""
    if root is None or not (root / STORE_FILE).is_file():
        yield
        return
    protection = encryption.unlock(root, key, readonly=True) if encryption.is_encrypted(root) else None
    hold = ExclusiveCopy(root / STORE_FILE, protection.store_key() if protection else None)
    try:
        yield
    finally:
        hold.close()
