"""Files written whole or not at all: the one atomic-write helper every writer in facedb uses.

A reader sees the old file or the new one, never a mix, and a write that returned survives a power cut: the
data goes to a temporary file in the same directory, which is fsync'ed, renamed over the target, and the
directory is fsync'ed so the rename itself is durable. New files are created 0600 (they may hold biometric
data), and a failure at any point leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of the file at ``path``, read in ``chunk``-byte pieces (never held whole: weights, index files
    and photos alike). Raises OSError when it cannot be read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(chunk):
            h.update(piece)
    return h.hexdigest()


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | Callable[[BinaryIO], None], digest: bool = True) -> str:
    """Write ``data`` to ``path`` atomically and durably; returns the SHA-256 (hex) of the bytes written ("" with
    ``digest=False``: for content that authenticates itself, such as an encrypted file, where re-reading a large
    file to hash it would only cost time).

    ``data`` is the bytes, or a function that writes them to the open binary file it is given (for content
    produced by a library that wants a file: numpy, torch, a download).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w+b") as f:
            if callable(data):
                data(f)
                f.flush()
                sha = hashlib.sha256()
                if digest:
                    f.seek(0)
                    while chunk := f.read(1 << 24):
                        sha.update(chunk)
                hexdigest = sha.hexdigest() if digest else ""
            else:
                f.write(data)
                hexdigest = hashlib.sha256(data).hexdigest() if digest else ""
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return hexdigest


def overwrite_and_unlink(path: Path) -> None:
    """Overwrite a file's bytes with zeros, make that durable, then delete it: for a plain-text copy of data that
    now lives encrypted. (On copy-on-write file systems and SSDs the old blocks may survive elsewhere on the
    device; encryption from the start is what protects against that.)"""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        size = os.fstat(fd).st_size
        block = bytes(1 << 20)
        done = 0
        while done < size:
            done += os.pwrite(fd, block[:min(len(block), size - done)], done)
        os.fsync(fd)
    finally:
        os.close(fd)
    Path(path).unlink(missing_ok=True)
    fsync_dir(Path(path).parent)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if missing) for the duration of the block: serialises
    read-merge-write cycles of processes sharing one file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def held_elsewhere(path: Path) -> bool:
    """Whether another open file (another process, or another :func:`locked` block) holds the lock on ``path``
    now: a shared lock tried without waiting and let go at once. False when ``path`` does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY)  # a read-only replica can look too
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # conflicts with a holder of the lock, not with other lookers
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: Path, prefix: str) -> int:
    """Delete the temporary files that :func:`write_atomic` left behind in ``directory`` for files named
    ``prefix...`` when its process was killed mid-write (they may hold a copy of the data being written);
    returns how many. Call it only where no other writer of those files can be writing (under their lock)."""
    gone = 0
    for tmp in Path(directory).glob(f".{prefix}*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            gone += 1
    return gone
