"""Live database files: the one rule for touching a SQLite file (or its ``-wal``, ``-shm``, ``-journal``)
anywhere but through the SQLite connection that owns it.

Why this module exists. SQLite coordinates processes with POSIX advisory locks (``fcntl``). POSIX ties those
locks to the *process and the file*, not to the descriptor: closing **any** descriptor of a file releases
**every** lock the process holds on it. So a plain ``open(store).read(16)`` followed by ``close()`` in a process
that has the store open through SQLite silently drops that connection's locks. The next process then believes
it is the only user: it checkpoints, deletes the ``-wal`` and ``-shm`` files the first one still writes into,
and every write the first process acknowledges afterwards is lost ("How To Corrupt An SQLite Database File",
section 2.2; this was issue #23: ``GET /v1/stats`` scanned the directory for plain-text files, and the
service's later writes vanished when the CLI ran beside it). The same happens when two *different* SQLite
libraries in one process open one file: Python's ``sqlite3`` and ``sqlcipher3`` each bundle their own SQLite,
and neither knows the other's descriptors.

The rule, enforced here and nowhere else:

* Every SQLite connection facedb opens is made by :func:`connect`, which records the file's inode for as long
  as the connection lives (:class:`_Tracked` connections unregister on close). One file is opened through one
  SQLite library per process: a second library is refused (:class:`~facedb.errors.DatabaseError`).
* Every raw look at a database file or its companions (a header read, a WAL scan, overwriting a replaced
  original, an fsync of a copy) goes through :func:`raw_fd` / :func:`read_head` / :func:`pread_all`. While this
  process has a connection on the file, the descriptor is not closed but *parked* (and reused by the next raw
  look at the same file), exactly as SQLite itself defers closing descriptors of a file it still holds locks
  on; parked descriptors are closed when the file's last connection closes, when closing releases nothing.
* Metadata that needs no descriptor (``stat``, ``exists``, directory listings) is always safe.

``tests/test_livefiles.py`` scans the package for any other ``open``/``os.open``/``read_bytes`` of a database
file, and drives the service and the CLI on one database at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..errors import DatabaseError

#: The names SQLite gives a database file's companions.
COMPANIONS = ("-wal", "-shm", "-journal")

_Inode = tuple[int, int]

_lock = threading.RLock()
_connections: dict[_Inode, list[Any]] = {}  # a database file's inode -> [library name, open connection count]
_companions: dict[_Inode, _Inode] = {}  # a companion file's inode -> its database file's inode (while live)
_parked: dict[_Inode, dict[tuple[_Inode, int], int]] = {}  # database inode -> {(file inode, flags): descriptor}
_classes: dict[str, type] = {}
#: Parked descriptors a ``raw_fd`` block is using now, and how many blocks: a connection dropped without close()
#: is released by its ``__del__``, which the garbage collector may run in the middle of such a block (even on the
#: same thread); its parked descriptors are then closed when the last block using them ends, not under it.
_busy: dict[int, int] = {}
_close_when_idle: set[int] = set()


def _inode(path: Path | str) -> _Inode | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _owner(path: Path) -> _Inode | None:
    """The inode of the live database file that ``path`` is (or is a companion of), if this process has it
    open through SQLite; else None. Called under ``_lock``."""
    own = _inode(path)
    if own is not None and own in _connections:
        return own
    if own is not None and own in _companions:
        return _companions[own]
    name = str(path)
    for suffix in COMPANIONS:
        if name.endswith(suffix):
            base = _inode(name[: -len(suffix)])
            if base is not None and base in _connections:
                if own is not None:
                    _companions[own] = base
                return base
    return None


# ------------------------------------------------------------------------------------------ connections
def _tracked_class(driver: Any) -> type:
    """A subclass of ``driver``'s Connection that unregisters its file when closed."""
    name = driver.__name__
    cls = _classes.get(name)
    if cls is None:
        class _Tracked(driver.Connection):  # type: ignore[misc, name-defined]
            _facedb_inode: _Inode | None = None

            def close(self) -> None:
                super().close()  # SQLite closes its own descriptors first ...
                inode, self._facedb_inode = self._facedb_inode, None
                if inode is not None:
                    _release(inode)  # ... so closing parked ones afterwards releases nothing of anyone's

            def __del__(self) -> None:  # a connection dropped without close(): still unregister
                with contextlib.suppress(Exception):
                    self.close()

        cls = _classes[name] = _Tracked
    return cls


def connect(driver: Any, path: Path, *, readonly: bool = False, **kwargs: Any) -> Any:
    """Open ``path`` with the DB-API module ``driver`` (``sqlite3`` or ``sqlcipher3.dbapi2``), read-only with
    ``readonly``; ``kwargs`` go to ``driver.connect``. The connection is tracked until it is closed.

    DatabaseError if this process already has the file open through the other SQLite library (closing either
    would drop the other's locks); the driver's own errors otherwise."""
    path = Path(path)
    # A read-only open is a URI, where '#' starts a fragment and '?' a query: a folder named "door#3" would
    # open (and create) the file "door" beside it. Percent-encoding keeps the path whole ('/' stays as it is).
    target = f"file:{quote(str(path))}?mode=ro" if readonly else str(path)
    name = driver.__name__
    with _lock:
        before = _inode(path)
        if before is not None and before in _connections and _connections[before][0] != name:
            raise DatabaseError(f"{path} is in use in this process through another SQLite library "
                                f"({_connections[before][0]}); close that connection first")
        conn = driver.connect(target, uri=readonly, factory=_tracked_class(driver), **kwargs)
        inode = _inode(path)  # SQLite creates a new file at open
        if inode is not None:
            entry = _connections.setdefault(inode, [name, 0])
            entry[1] += 1
            conn._facedb_inode = inode
        return conn


def _release(inode: _Inode) -> None:
    with _lock:
        entry = _connections.get(inode)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _connections[inode]
        for companion in [c for c, base in _companions.items() if base == inode]:
            del _companions[companion]
        for fd in _parked.pop(inode, {}).values():
            if _busy.get(fd):
                _close_when_idle.add(fd)
                continue
            with contextlib.suppress(OSError):
                os.close(fd)


def connections_on(path: Path | str) -> int:
    """How many tracked SQLite connections this process has on the database file ``path`` (0 if none)."""
    with _lock:
        inode = _inode(path)
        entry = _connections.get(inode) if inode is not None else None
        return entry[1] if entry else 0


# ------------------------------------------------------------------------------------------- raw access
@contextlib.contextmanager
def raw_fd(path: Path | str, flags: int = os.O_RDONLY) -> Iterator[int]:
    """A descriptor of ``path`` for the block (OSError as ``os.open`` raises it). If ``path`` is a database file
    this process has open through SQLite, or one of its companions, the descriptor outlives the block: it is
    parked and reused, and closed only when the last connection closes (see the module's docstring). Use
    positional I/O (``os.pread`` / ``os.pwrite``): a reused descriptor's offset is not reset."""
    path = Path(path)
    with _lock:
        owner = _owner(path)
        if owner is None:
            fd, parked = os.open(path, flags), False
        else:
            slots = _parked.setdefault(owner, {})
            own = _inode(path)
            fd = slots.get((own, flags)) if own is not None else None
            if fd is None:
                fd = os.open(path, flags)
                st = os.fstat(fd)
                slots[((st.st_dev, st.st_ino), flags)] = fd
            parked = True
            _busy[fd] = _busy.get(fd, 0) + 1
    try:
        yield fd
    finally:
        if not parked:
            _close_unless_live(fd)
        else:
            with _lock:
                _busy[fd] -= 1
                if not _busy[fd]:
                    del _busy[fd]
                    if fd in _close_when_idle:
                        _close_when_idle.discard(fd)
                        with contextlib.suppress(OSError):
                            os.close(fd)


def _close_unless_live(fd: int) -> None:
    """Close ``fd``, unless a connection on its file opened meanwhile (another thread): then park it."""
    with _lock:
        try:
            st = os.fstat(fd)
        except OSError:
            return
        inode = (st.st_dev, st.st_ino)
        owner = inode if inode in _connections else _companions.get(inode)
        if owner is not None:
            _parked.setdefault(owner, {})[(inode, -fd)] = fd  # its own slot: never handed out again
            return
        os.close(fd)


def read_head(path: Path | str, size: int) -> bytes:
    """The first ``size`` bytes of ``path`` (fewer if it is shorter; b"" if it cannot be read)."""
    try:
        with raw_fd(path) as fd:
            return os.pread(fd, size, 0)
    except OSError:
        return b""


def fsync_file(path: Path | str) -> None:
    """Make ``path``'s content durable (a copy just written through SQLite and detached)."""
    with raw_fd(path) as fd:
        os.fsync(fd)


def parked_descriptors() -> int:
    """How many descriptors wait for their file's last connection to close (for the tests: bounded)."""
    with _lock:
        return sum(len(v) for v in _parked.values())


def read_all(path: Path | str) -> bytes:
    """Every byte of ``path`` (an erasure check looks for removed bytes in a live database's files)."""
    with raw_fd(path) as fd:
        size = os.fstat(fd).st_size
        chunks, offset = [], 0
        while offset < size and (chunk := os.pread(fd, min(1 << 24, size - offset), offset)):
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)


# ------------------------------------------------------------------------------------- holding unopened
#: SQLite's POSIX lock bytes (os_unix.c): in the database file PENDING, RESERVED and the 510-byte SHARED range
#: (every connection reading or writing, and every WAL-mode connection for as long as it is open, holds part of
#: it); in the ``-shm`` file the WAL locks and the dead-man-switch byte (held by every WAL-mode connection).
_DB_LOCK_RANGE = (0x40000000, 512)
_SHM_LOCK_RANGE = (120, 9)


@contextlib.contextmanager
def hold_unopened(path: Path | str) -> Iterator[None]:
    """Hold the database file ``path`` against every other SQLite user for the block, without opening it
    through SQLite: no key is needed, and a damaged or unreadable file is held as well as a sound one. Write
    locks are taken (never waited for) on the bytes SQLite locks in the file and in its ``-shm``; another
    process that opens the database meanwhile waits for them and then fails its busy timeout.

    DatabaseError if another process has the database open (or holds a lock on it), or if this process has it
    open through SQLite (its own locks would not conflict, and closing a descriptor would drop them); nothing
    is held then. Locks go when the block ends (the descriptors are closed: this process has no connection
    on the file, so that releases only these locks)."""
    path = Path(path)
    if connections_on(path):
        raise DatabaseError(f"{path} is in use by this process: close it before replacing it")
    with contextlib.ExitStack() as stack:
        targets = [(path, _DB_LOCK_RANGE)]
        if Path(f"{path}-shm").exists():
            targets.append((Path(f"{path}-shm"), _SHM_LOCK_RANGE))
        for target, (start, length) in targets:
            try:
                fd = stack.enter_context(raw_fd(target, os.O_RDWR))  # a write lock needs a descriptor for writing
            except OSError as exc:
                raise DatabaseError(f"{target}: cannot open it to hold it ({exc.strerror}); nothing was "
                                    "changed") from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start, os.SEEK_SET)
            except OSError:
                raise DatabaseError(f"{path} is in use by another process: stop every process using the database "
                                    "(the service: `systemctl stop facedb`; readers) and try again; nothing was "
                                    "changed") from None
        yield
