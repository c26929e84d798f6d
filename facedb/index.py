"""Vector indexes: the only module that imports faiss.

An index is a cache derived from the store: ID-mapped (FAISS ids are template ids), searched by inner
product on unit vectors (= cosine similarity), rebuildable from SQLite at any time. Files are written
atomically (temporary file, fsync, rename) and identified by their SHA-256, which the store records: a file
whose hash does not match is never handed to ``faiss.deserialize_index`` (FAISS can crash on crafted input).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np


class VectorIndex(Protocol):
    """What the query engine needs from an index. Scores are cosine similarities, higher is closer."""

    kind: str
    dim: int

    def __len__(self) -> int: ...

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...

    def remove(self, ids: np.ndarray) -> None: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids), each (m, k'), best first, k' = min(k, len(self)); no padding."""
        ...

    def ids(self) -> np.ndarray:
        """Every template id held, as int64."""
        ...

    def to_bytes(self) -> bytes: ...


class FlatIndex:
    """Exact search: FAISS ``IndexIDMap2(IndexFlatIP)``."""

    kind = "flat"

    def __init__(self, dim: int, index: faiss.Index | None = None) -> None:
        self.dim = dim
        self._index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self._index.add_with_ids(
                np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64)
            )

    def remove(self, ids: np.ndarray) -> None:
        if len(ids):
            self._index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self))
        if k == 0:
            m = len(queries)
            return np.zeros((m, 0), dtype=np.float32), np.zeros((m, 0), dtype=np.int64)
        sims, ids = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return sims, ids

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def to_bytes(self) -> bytes:
        return faiss.serialize_index(self._index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, dim: int) -> FlatIndex:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if index.d != dim:
            raise ValueError(f"index has dimension {index.d}, expected {dim}")
        return cls(dim, index)


INDEX_KINDS: dict[str, type[FlatIndex]] = {"flat": FlatIndex}


def new_index(kind: str, dim: int) -> VectorIndex:
    try:
        return INDEX_KINDS[kind](dim)
    except KeyError:
        raise ValueError(f"unknown index kind {kind!r}; known: {', '.join(INDEX_KINDS)}") from None


def write_atomic(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically (readers see the old file or the new one, never a mix).

    Returns the SHA-256 of what was written. The file is created 0600.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return hashlib.sha256(data).hexdigest()


def save_index(index: VectorIndex, path: Path) -> str:
    """Save ``index`` atomically; returns the file's SHA-256 for the store's stamp."""
    return write_atomic(path, index.to_bytes())


def load_index(path: Path, kind: str, dim: int, sha256: str) -> VectorIndex | None:
    """The index in ``path`` if its SHA-256 is ``sha256`` and it parses; None otherwise (rebuild)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != sha256:
        return None
    try:
        return INDEX_KINDS[kind].from_bytes(data, dim)
    except Exception:  # a file FAISS cannot parse is a stale cache, not an error
        return None
