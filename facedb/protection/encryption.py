"""Encryption at rest for a database directory: unlocking it at open, making a new encrypted one, converting a
plain one (``facedb encrypt``), rotating its key (``facedb rotate-key``, ``--reencrypt``), finishing or rolling
back one of those that was interrupted, and finding plain-text files.

Keys and ciphers are ``protect.py``'s; SQL is ``gallery/store``'s; the index is the keeper's. This module only puts
them in order, so that every step can be killed and the database still opens with the old key or the new one,
with nothing lost.

**Converting** (encrypt, re-encrypt) works on copies in a staging directory (``.facedb-rekey/``) while one
connection holds the database exclusively (``store.ExclusiveCopy``: refused while another process has it
open), then swaps them in:

1. the keyring gains the new data key as ``next`` (state ``encrypting`` / ``reencrypting``);
2. the index is written to the staging directory under the new key, and the store is copied there under the
   new key (SQLCipher's ``sqlcipher_export``), stamped with the new index file;
3. **commit point**: the new store is renamed over the old one; the old file is overwritten with zeros
   (every byte of a plain-text original: "the plain copy destroyed"), then the staged index replaces the
   old index file (a plain one is overwritten first);
4. the keyring keeps only the new data key (state ``active``).

A crash before 3 leaves the old store, which the old key opens: the next open rolls back (drops the staging
directory and the ``next`` key). A crash after 3 leaves the new store: the next open finishes steps 3-4. The
old KEK unwraps both data keys until step 4, so it always works; a new KEK given to ``rotate-key`` works once
step 4 is done (or, when given at the next open, after step 3).
"""

from __future__ import annotations

import os
import shutil
import signal
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import DatabaseError, InvalidInputError, KeyMissingError, TamperedError, WrongKeyError
from ..fsio import fsync_dir, overwrite_and_unlink
from ..gallery import livefiles
from ..gallery.store import SQLITE_HEADER, ExclusiveCopy, is_plain_sqlite, opens_with
from .keyring import KEYRING_FILE, DataKey, FileCipher, Keyring, KeySource, Protection, check_new_key, wrap

STORE_FILE = "facedb.sqlite3"
INDEX_FILE = "index.faiss"
STAGING = ".facedb-rekey"
#: Files facedb keeps in a database directory that never hold templates or keys.
_NO_CONTENT = {KEYRING_FILE, ".index.lock", STORE_FILE + "-shm"}

#: A test hook: the named step kills its own process (SIGKILL), to prove each step can die safely.
FAILPOINT_ENV = "FACEDB_FAILPOINT"


def failpoint(name: str) -> None:
    """Die here (SIGKILL) when ``$FACEDB_FAILPOINT`` names this step: how the tests kill each step."""
    if os.environ.get(FAILPOINT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def key_source(key: object, root: Path, what: str = "this database is encrypted") -> KeySource:
    """The KEK's source for ``root`` (``key`` as the API takes it, else $FACEDB_KEY); KeyMissingError if none,
    InvalidInputError if it is a file inside the database directory."""
    source = KeySource.of(key)
    if source is None:
        raise KeyMissingError(f"{root}: {what}: give its key (FACEDB_KEY, --key-file or --key-command)")
    source.check_outside(root)
    return source


# ------------------------------------------------------------------------------------------------ opening
def is_encrypted(root: Path) -> bool:
    """Whether the database at ``root`` is encrypted (it has a keyring)."""
    return Keyring.exists(Path(root))


def unlock(root: Path, key: object, readonly: bool = False) -> Protection | None:
    """The data key of the database at ``root`` (None for a plain database), after finishing or rolling back
    an interrupted conversion (not when ``readonly``: then it only picks the key that opens the store)."""
    root = Path(root)
    store = root / STORE_FILE
    if not Keyring.exists(root):
        if (root / STAGING).is_dir() and not readonly:
            shutil.rmtree(root / STAGING, ignore_errors=True)  # a conversion that died before its keyring
        if store.is_file() and store.stat().st_size > 0 and not is_plain_sqlite(store):
            raise DatabaseError(f"{store}: file is not a database facedb can read (not a plain SQLite file, and no "
                                f"keyring {KEYRING_FILE}: if it is an encrypted database, restore its keyring from a "
                                "backup)")
        return None
    ring = Keyring.read(root)
    keys = ring.unlock(key_source(key, root).material())
    if ring.state == "active" and "current" in keys and not (root / STAGING).exists():
        return Protection(keys["current"], ring.key_version, ring.database_id)
    return _recover(root, ring, keys, readonly)


def _recover(root: Path, ring: Keyring, keys: dict[str, DataKey], readonly: bool) -> Protection | None:
    """Finish or roll back an interrupted encrypt / re-encrypt, decided by which key opens the store."""
    store = root / STORE_FILE
    staging = root / STAGING
    current, nxt = keys.get("current"), keys.get("next")
    if ring.state == "encrypting" and is_plain_sqlite(store):
        if not readonly:  # not committed: still the plain database
            shutil.rmtree(staging, ignore_errors=True)
            Keyring.path(root).unlink(missing_ok=True)
            fsync_dir(root)
        return None
    if current is not None and opens_with(store, current.store_key()):
        if not readonly:  # not committed: roll back to the current key
            shutil.rmtree(staging, ignore_errors=True)
            ring.keys, ring.state = ring.entries("current"), "active"
            ring.write(root)
        return Protection(current, ring.key_version, ring.database_id)
    if nxt is not None and opens_with(store, nxt.store_key()):
        if readonly:
            return Protection(nxt, ring.key_version, ring.database_id)
        _finish(root, ring, staging, plain_index=ring.state == "encrypting")
        return Protection(nxt, ring.key_version, ring.database_id)
    if nxt is not None and current is None:
        raise WrongKeyError(f"{root}: a key rotation was interrupted before it took effect: open the database with "
                            "the previous key (that finishes rolling it back), then rotate again")
    raise TamperedError(f"{store}: no key in the keyring opens the store (altered or damaged)")


def _finish(root: Path, ring: Keyring, staging: Path, plain_index: bool) -> None:
    """Steps 3b-4 of a conversion whose store is already swapped in."""
    staged = staging / INDEX_FILE
    if staged.is_file():
        if plain_index:
            overwrite_and_unlink(root / INDEX_FILE)
        os.replace(staged, root / INDEX_FILE)
        fsync_dir(root)
    failpoint("index-swapped")
    final = [e for e in ring.entries("next") if e.get("kek_is_new")] or ring.entries("next")[:1]
    ring.keys = [{**{k: v for k, v in e.items() if k != "kek_is_new"}, "role": "current"} for e in final]
    if ring.state == "reencrypting":
        ring.key_version += 1
    ring.state = "active"
    ring.rotated_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    ring.write(root)
    failpoint("keyring-final")
    shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- creating
def new_key_material(root: Path, key: object) -> bytes:
    """The KEK for a new encrypted database at ``root``, checked (present, outside ``root``, a 256-bit key or a
    long enough passphrase) before anything is created."""
    material = key_source(key, root, "an encrypted database needs a key").material()
    check_new_key(material)
    return material


def create_keyring(root: Path, material: bytes) -> Protection:
    """The keyring of a new encrypted database at ``root`` (written before its store)."""
    ring, data_key = Keyring.new(material)
    ring.write(root)
    return Protection(data_key, ring.key_version, ring.database_id)


def discard_keyring(root: Path) -> None:
    """Drop the keyring of a database whose creation failed before its store existed."""
    Keyring.path(root).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- converting
@dataclass
class ConversionReport:
    """What ``encrypt`` / ``rotate-key`` did."""

    operation: str
    key_version: int
    data_key_version: int
    templates: int = 0
    index_file: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"operation": self.operation, "key_version": self.key_version,
                "data_key_version": self.data_key_version, "templates": self.templates,
                "index_file": self.index_file, **self.details}


def _stage(root: Path, keeper: Any, settings: Any, new: DataKey) -> str:
    """Step 2a, while the database is still open: the staging directory, and the index written there under the
    new key. Returns the stamp of the staged index file ("" when there is none)."""
    from ..gallery.index import IndexPlace

    staging = root / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    old = os.umask(0o077)
    try:
        staging.mkdir(mode=0o700)
    finally:
        os.umask(old)
    if keeper.gallery is None:
        return ""
    return str(keeper.save_to(IndexPlace(staging, options={"cipher": new.file_cipher("index")}), settings))


def _swap(root: Path, source_key: str | None, new: DataKey, stamp: str, plain_source: bool, ring: Keyring) -> None:
    """Steps 2b-4: copy the store under the new key (exclusively), swap it in, destroy the old, finish."""
    staging = root / STAGING
    hold = ExclusiveCopy(root / STORE_FILE, source_key)
    try:
        hold.copy_to(staging / STORE_FILE, new.store_key(), {"erase_pending": "0", "index_stamp": stamp})
        failpoint("copied")
        for leftover in (STORE_FILE + "-wal", STORE_FILE + "-journal"):
            if (root / leftover).exists() and (root / leftover).stat().st_size:
                raise DatabaseError(f"{root / leftover} is not empty: another process holds the database")
        os.replace(staging / STORE_FILE, root / STORE_FILE)  # the commit point
        fsync_dir(root)
        failpoint("swapped")
        hold.destroy_original(whole=plain_source)
    finally:
        hold.close()
    # The old file's -shm stays: a process may have opened the new store since the swap and be using it, and
    # deleting a live -shm is how SQLite databases lose writes (livefiles). SQLite itself re-initialises a
    # stale one: the first connection to take its lock truncates it.
    if not stamp:  # no index was carried: the old file (if any) must not outlive its key
        if plain_source:
            overwrite_and_unlink(root / INDEX_FILE)
        else:
            (root / INDEX_FILE).unlink(missing_ok=True)
    _finish(root, ring, staging, plain_index=plain_source)


def _prepare(opened: Any) -> tuple[Any, Any, int]:
    """The open database's settings, its gallery loaded (the index travels with the conversion: no rebuild
    afterwards), and its template count."""
    settings = opened.settings()
    opened.keeper.current(settings)
    return opened.keeper, settings, opened.store.counts()["templates"]


def encrypt_existing(root: Path, key: object, opened: Any) -> ConversionReport:
    """Convert the plain database at ``root`` (``opened``: a writable FaceDB on it, which this closes) to an
    encrypted one under the KEK ``key``; the plain files are destroyed. DatabaseError if another process has it
    open; nothing is changed then."""
    root = Path(root)
    if is_encrypted(root):
        raise InvalidInputError(f"{root} is already encrypted (rotate its key with `facedb rotate-key`)")
    material = new_key_material(root, key)
    keeper, settings, templates = _prepare(opened)
    ring, data_key = Keyring.new(material)
    ring.keys = [{**ring.keys[0], "role": "next"}]
    ring.state = "encrypting"
    try:
        ring.write(root)
        failpoint("keyring-pending")
        stamp = _stage(root, keeper, settings, data_key)
        opened.close(save_index=False)
        failpoint("staged")
        _swap(root, None, data_key, stamp, True, ring)
    except DatabaseError:
        opened.close(save_index=False)
        _recover(root, ring, {"next": data_key}, readonly=False)  # roll back what was staged
        raise
    return ConversionReport("encrypt", ring.key_version, data_key.version, templates, bool(stamp))


def rotate_key(root: Path, key: object, new_key: object, reencrypt: bool = False,
               opened: Any = None) -> ConversionReport:
    """Re-wrap the data key under the KEK ``new_key`` (fast: the keyring is rewritten), and with ``reencrypt``
    make a new data key and re-encrypt the store and the index under it (``opened``: a writable FaceDB on the
    database, which this closes; exclusive access needed). ``new_key`` None keeps the KEK (``reencrypt`` only).
    Wrong or missing keys change nothing."""
    root = Path(root)
    if not Keyring.exists(root):
        raise InvalidInputError(f"{root} is not encrypted (encrypt it with `facedb encrypt`)")
    old_material = key_source(key, root).material()
    new_source = KeySource.of(new_key, env="FACEDB_NEW_KEY") if new_key is not None else None
    if new_source is None and not reencrypt:
        raise KeyMissingError("rotate-key needs the new key (FACEDB_NEW_KEY, --new-key-file or --new-key-command), "
                              "or --reencrypt to keep the key and renew the data key")
    new_material = None
    if new_source is not None:
        new_source.check_outside(root)
        new_material = new_source.material()
        check_new_key(new_material)
        if new_material == old_material:
            raise InvalidInputError("the new key is the key in use: give another one")
    ring = Keyring.read(root)
    keys = ring.unlock(old_material)
    if ring.state != "active" or "current" not in keys:
        raise DatabaseError(f"{root}: an earlier conversion is unfinished: open the database once (that completes "
                            "it), then rotate")
    current = keys["current"]
    if not reencrypt:
        assert new_material is not None
        ring.keys = [wrap(new_material, current.secret, ring.database_id, current.version, "current")]
        ring.key_version += 1
        ring.rotated_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        ring.write(root)
        if opened is not None:
            opened.close(save_index=False)
        return ConversionReport("rewrap", ring.key_version, current.version)
    if opened is None:
        raise InvalidInputError("rotate-key --reencrypt needs the database open (FaceDB.rotate_key)")
    keeper, settings, templates = _prepare(opened)
    fresh = DataKey(current.version + 1, os.urandom(32))
    pending = [wrap(old_material, fresh.secret, ring.database_id, fresh.version, "next")]
    if new_material is not None:
        pending.append({**wrap(new_material, fresh.secret, ring.database_id, fresh.version, "next"),
                        "kek_is_new": True})
    ring.keys = ring.entries("current") + pending
    ring.state = "reencrypting"
    try:
        ring.write(root)
        failpoint("keyring-pending")
        stamp = _stage(root, keeper, settings, fresh)
        opened.close(save_index=False)
        failpoint("staged")
        _swap(root, current.store_key(), fresh, stamp, False, ring)
    except DatabaseError:
        opened.close(save_index=False)
        _recover(root, ring, {"current": current, "next": fresh}, readonly=False)
        raise
    return ConversionReport("reencrypt", ring.key_version, fresh.version, templates, bool(stamp),
                            {"new_kek": new_material is not None})


# ------------------------------------------------------------------------------------------------- report
def plaintext_files(root: Path, encrypted: bool) -> list[str]:
    """Files in the database directory that a thief could read without the key, each with why: for a plain
    database every file that holds data; for an encrypted one, any file that is not ciphertext (a plain store,
    index or WAL page, a leftover, a file facedb did not write)."""
    found: list[str] = []
    root = Path(root)
    for f in sorted(root.iterdir()):
        name = f.name
        if f.is_dir():
            if name == STAGING:
                found.append(f"{name}/ (an interrupted key conversion: opening the database finishes it)")
            else:
                found.append(f"{name}/ (a directory facedb did not make)")
            continue
        if name in _NO_CONTENT or (name.endswith(".lock") and f.stat().st_size == 0):
            continue
        # through livefiles, never open(): this process (the service answering GET /v1/stats) may hold the
        # store through SQLite, and closing any descriptor of it would drop that connection's locks (#23)
        try:
            with livefiles.raw_fd(f) as fd:
                head = os.pread(fd, 64, 0)
        except OSError:
            continue
        if not encrypted:
            if f.stat().st_size:
                found.append(f"{name} (unencrypted)")
            continue
        if name == STORE_FILE:
            if head.startswith(SQLITE_HEADER):
                found.append(f"{name} (a plain SQLite database)")
        elif name == STORE_FILE + "-wal":
            if _wal_has_plain_pages(f):
                found.append(f"{name} (a write-ahead log with plain pages)")
        elif name == INDEX_FILE or (name.startswith(".index") and name.endswith(".tmp")):
            if head and not FileCipher.is_sealed(head):
                found.append(f"{name} (a plain index file)")
        elif f.stat().st_size:
            found.append(f"{name} (a file facedb did not write)")
    return found


def _wal_has_plain_pages(path: Path) -> bool:
    """Whether any frame of a WAL holds a plain SQLite page 1 (SQLCipher's frames are ciphertext throughout)."""
    try:
        with livefiles.raw_fd(path) as fd:  # a live WAL: see plaintext_files
            head = os.pread(fd, 32, 0)
            if len(head) < 32:
                return False
            page = int.from_bytes(head[8:12], "big") or 65536
            offset = 32
            while frame := os.pread(fd, 24 + page, offset):
                if len(frame) < 24 + page:
                    return False
                if int.from_bytes(frame[:4], "big") == 1 and frame[24:40] == SQLITE_HEADER:
                    return True
                offset += len(frame)
    except OSError:
        return False
    return False
