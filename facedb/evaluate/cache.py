"""The evaluation embedding cache: vectors of evaluation photos keyed by image SHA-256, one file per model
variant (model id, plus ``-flip`` etc.), so that re-running an evaluation takes seconds instead of an hour.

Safe under concurrent runs: :meth:`EmbeddingCache.save` takes an exclusive lock, re-reads the file, merges
what this process computed into what others saved meanwhile, and replaces the file atomically; so two runs
sharing a cache never drop each other's entries. The file holds only hashes, vectors and a found flag, no
names or paths; it is loaded with ``allow_pickle=False``, and a damaged file is recomputed, never trusted.

For an encrypted database (``facedb calibrate`` on one) the cache is encrypted too: with a ``cipher`` (derived
from the database's data key, ``FaceDB.cache_cipher()``) the file is ``embeddings-<variant>.<key id>.npz.enc``,
AES-256-GCM throughout; it is never mixed with the plain cache, and a re-encrypted database starts a new one.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..fsio import locked, write_atomic


def cache_dir() -> Path:
    """``$FACEDB_CACHE``, else ``$XDG_CACHE_HOME/facedb``, else ``~/.cache/facedb``."""
    base = os.environ.get("FACEDB_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "facedb")
    return Path(base).expanduser()


class EmbeddingCache:
    """(vector, found) per image SHA-256. ``found`` False = no face was acquired (the vector is NaN)."""

    def __init__(self, variant: str, dim: int, directory: Path | None = None, cipher: Any = None) -> None:
        name = f"embeddings-{variant}.npz" if cipher is None else f"embeddings-{variant}.{cipher.key_id}.npz.enc"
        self.path = (directory or cache_dir()) / name
        self.cipher = cipher
        self.dim = dim
        self._data = self._read()
        self._new: dict[str, tuple[np.ndarray, bool]] = {}

    def _read(self) -> dict[str, tuple[np.ndarray, bool]]:
        data: dict[str, tuple[np.ndarray, bool]] = {}
        if not self.path.is_file():
            return data
        try:
            source: Any = self.path
            if self.cipher is not None:
                from ..errors import TamperedError

                try:
                    source = io.BytesIO(self.cipher.open(self.path.read_bytes()))
                except TamperedError:
                    return {}  # altered or damaged: recomputed, never trusted
            with np.load(source, allow_pickle=False) as z:
                if z["vectors"].ndim != 2 or z["vectors"].shape[1] != self.dim:
                    return {}
                for key, vec, found in zip(z["keys"], z["vectors"], z["found"]):
                    data[str(key)] = (vec.astype(np.float32), bool(found))
        except (OSError, ValueError, KeyError, EOFError):
            return {}  # damaged: recomputed, never trusted
        return data

    def __len__(self) -> int:
        return len(self._data)

    def get(self, sha256: str) -> tuple[np.ndarray, bool] | None:
        return self._data.get(sha256)

    def put(self, sha256: str, vector: np.ndarray, found: bool) -> None:
        entry = (np.asarray(vector, dtype=np.float32).reshape(self.dim), bool(found))
        self._data[sha256] = entry
        self._new[sha256] = entry

    def save(self) -> None:
        """Merge this process's new entries into the file (under a lock) and write it atomically."""
        if not self._new:
            return
        with locked(self.path.with_name(self.path.name + ".lock")):
            merged = self._read()
            merged.update(self._new)
            keys = np.array(list(merged), dtype="<U64")
            vecs = np.array([v for v, _ in merged.values()], dtype=np.float32).reshape(-1, self.dim)
            found = np.array([f for _, f in merged.values()], dtype=bool)
            if self.cipher is None:
                write_atomic(self.path, lambda f: np.savez(f, keys=keys, vectors=vecs, found=found))
            else:
                buf = io.BytesIO()
                np.savez(buf, keys=keys, vectors=vecs, found=found)
                write_atomic(self.path, self.cipher.seal(buf.getvalue())[0])
        self._data.update(merged)
        self._new.clear()
