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


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | Callable[[BinaryIO], None]) -> str:
    """Write ``data`` to ``path`` atomically and durably; returns the SHA-256 (hex) of the bytes written.

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
                f.seek(0)
                sha = hashlib.sha256()
                while chunk := f.read(1 << 24):
                    sha.update(chunk)
                digest = sha.hexdigest()
            else:
                f.write(data)
                digest = hashlib.sha256(data).hexdigest()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return digest


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
