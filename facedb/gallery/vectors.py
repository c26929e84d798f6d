"""Exact template vectors in memory, for re-scoring the candidates of index kinds that do not keep them.

An approximate index only proposes candidates; the engine re-scores every candidate person exactly, from all of
their float32 templates. ``flat``, ``hnsw`` and ``ivf`` hold those vectors themselves. ``ivfpq`` and ``flat16``
(compressed codes) and ``milvus`` (a remote engine) do not, and reading them from SQLite costs a B-tree lookup
per candidate person (0.34 ms of a 1 ms query at 1M templates). :class:`TemplateVectors` keeps them in one
float32 matrix, addressed by template id through a dense id -> row table, so a query gathers its candidates'
rows with one numpy indexing operation.

* **Exact.** The rows are the stored float32 vectors bit for bit (template vectors never change; a template id
  is never reused), so scores and decisions are those of the store.
* **Memory**: ``4 x dim`` bytes per template (2,048 at 512-d, 512 at 128-d) plus 4 bytes per template id ever
  issued (the id -> row table) and up to a quarter of spare rows after growth. Kept only while the gallery's
  vectors fit the **budget** (:func:`budget_bytes`: ``FACEDB_RESCORE_MEMORY_MB``, default 8,192 MiB, the
  size at which ``auto`` used to leave float32 indexes); beyond it the keeper does not build one and a
  growing gallery drops its own, and re-scoring reads the store, as before.
* **Erasure and encryption.** A removed template's row is overwritten with zeros at once. The keeper saves
  the rows inside the index file (``facedb/gallery/index/saved_map.py``), which is written whole, sealed by the
  database's index cipher when the database is encrypted (no plaintext vector on disk), and rewritten at once
  after a removal, as the index itself is. The memory itself is outside what encryption at rest covers, as
  the index in memory always was.
* **Filling.** A gallery built from the store adopts the vectors it read (no copy), and so does one loaded from
  an index file that holds them (memory-mapped from a plain file, copy-on-write; decrypted into one matrix from
  an encrypted one). After an erasure rewrote the file, mapped rows are copied into the process (``own``).
  One loaded from a file without them (saved by an older version, or while over the budget) is filled by a
  background thread reading the store through a connection of its own (~1 M templates in ~9 s at 512-d);
  until a candidate's rows are present, its query reads the store (complete answers either way). Removals that
  land while it runs mark their ids, so that the fill never brings a removed template back. Rows mapped from
  a plain index file are checked against their own digest in the background the same way (``adopt_checked``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ..environment import number
from ..errors import InvalidInputError

#: Memory the re-scoring vectors may take, in MiB, when neither the caller nor FACEDB_RESCORE_MEMORY_MB says.
DEFAULT_BUDGET_MB = 8192
ENV_BUDGET = "FACEDB_RESCORE_MEMORY_MB"

_ABSENT, _REMOVED = -1, -2
_MAX_ID = 2**31 - 1  # the id -> row table is int32-indexed; larger ids (never made by the store) disable it


def budget_bytes(mb: float | None = None) -> int:
    """The re-scoring memory budget in bytes: ``mb`` if given, else ``$FACEDB_RESCORE_MEMORY_MB``, else 8,192
    MiB; 0 keeps no vectors in memory (re-scoring reads the store). InvalidInputError for anything but a finite
    number >= 0 (a typo must not quietly become the default, or 0)."""
    if mb is None:
        return int(number(ENV_BUDGET, DEFAULT_BUDGET_MB, hint=" MiB (0: re-score from the store)") * 2**20)
    try:
        value = math.nan if isinstance(mb, bool) else float(mb)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise InvalidInputError(f"rescore_memory_mb must be a number of MiB >= 0 (0: re-score from the store), "
                                f"got {mb!r}")
    return int(value * 2**20)


def bytes_for(templates: int, dim: int) -> int:
    """What :class:`TemplateVectors` takes for ``templates`` vectors of ``dim`` (the budget's measure)."""
    return int(templates) * (4 * int(dim) + 4)


class TemplateVectors:
    """Template id -> exact float32 vector, in memory. Thread-safe (one lock; a background fill takes it per
    batch)."""

    def __init__(self, dim: int, capacity: int = 0) -> None:
        self.dim = int(dim)
        self._matrix = np.zeros((max(int(capacity), 16), self.dim), dtype=np.float32)
        self._slot = np.full(max(int(capacity), 16) + 1, _ABSENT, dtype=np.int32)  # id -> row
        self._next = 0  # rows [0, _next) have been handed out
        self._free: list[np.ndarray] = []  # rows given back by removals (zeroed)
        self._live = 0
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._done.set()
        self._stop = False
        self.error: BaseException | None = None  # why a background fill stopped early

    @classmethod
    def adopt(cls, ids: np.ndarray, vectors: np.ndarray) -> TemplateVectors:
        """Keep ``vectors`` (rows of ``ids``, float32, C-contiguous) as they are: no copy."""
        out = cls(vectors.shape[1], 0)
        if len(ids) and int(np.max(ids)) > _MAX_ID:
            raise ValueError("template ids beyond 2**31 cannot be kept in memory")
        out._matrix = np.ascontiguousarray(vectors, dtype=np.float32)
        out._slot = np.full(int(np.max(ids, initial=0)) + 1, _ABSENT, dtype=np.int32)
        out._slot[np.asarray(ids, dtype=np.int64)] = np.arange(len(ids), dtype=np.int32)
        out._next = out._live = len(ids)
        return out

    @classmethod
    def adopt_checked(cls, ids: np.ndarray, vectors: np.ndarray, check: Callable[[], bool]) -> TemplateVectors:
        """Keep ``vectors`` (rows of sorted ``ids``, memory-mapped from an index file) once ``check()`` says they
        are the saved ones, which a background thread finds out (hashing them: seconds at 1M); until then the
        rows are absent, so queries re-score from the store. Writes that land meanwhile are kept: removed ids
        never come back, and added ones keep their rows. A failed check leaves ``error`` set and no rows."""
        out = cls(vectors.shape[1], 0)
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and int(ids[-1]) > _MAX_ID:
            raise ValueError("template ids beyond 2**31 cannot be kept in memory")
        # sized by the largest id, so that removals meanwhile are marked and never brought back
        out._slot = np.full(int(ids[-1]) + 1 if len(ids) else 17, _ABSENT, dtype=np.int32)
        out._done.clear()
        threading.Thread(target=out._adopt_when_checked, args=(ids, vectors, check), name="facedb-vectors",
                         daemon=True).start()
        return out

    def _adopt_when_checked(self, ids: np.ndarray, vectors: np.ndarray, check: Callable[[], bool]) -> None:
        try:
            if not check():
                from ..errors import TamperedError

                raise TamperedError("the re-scoring vectors in the index file do not match its stamp: they are "
                                    "not used (re-scoring reads the store)")
            with self._lock:
                untouched = self._next == 0 and not bool((self._slot == _REMOVED).any())
                if untouched and not self._stop:  # the common case: take the mapped matrix as it is
                    self._matrix = np.ascontiguousarray(vectors, dtype=np.float32)
                    self._slot[ids] = np.arange(len(ids), dtype=np.int32)
                    self._next = self._live = len(ids)
                    return
            for s in range(0, len(ids), 65536):  # writes landed meanwhile: put the rows, skipping those
                if self._stop:
                    break
                self.put(ids[s:s + 65536], vectors[s:s + 65536], live=False)
        except BaseException as exc:
            self.error = exc
            import warnings

            from ..errors import TamperedFileWarning

            warnings.warn(str(exc), TamperedFileWarning, stacklevel=1)
        finally:
            self._done.set()

    def __len__(self) -> int:
        return self._live

    @property
    def nbytes(self) -> int:
        return int(self._matrix.nbytes + self._slot.nbytes)

    @property
    def loading(self) -> bool:
        return not self._done.is_set()

    # ------------------------------------------------------------------------------------------ writes
    def put(self, ids: np.ndarray, vectors: np.ndarray, *, live: bool = True) -> None:
        """Keep ``vectors`` for template ``ids``. ``live``: the gallery just added them (a merge may add back an
        id it removed); otherwise (a background fill) ids already held or removed meanwhile are skipped."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return
        top = int(ids.max())
        if top > _MAX_ID:
            raise ValueError("template ids beyond 2**31 cannot be kept in memory")
        with self._lock:
            if top >= len(self._slot):
                grown = np.full(max(top + 1, len(self._slot) * 5 // 4), _ABSENT, dtype=np.int32)
                grown[:len(self._slot)] = self._slot
                self._slot = grown
            current = self._slot[ids]
            new = current < 0 if live else current == _ABSENT
            if not new.all():
                ids, vectors = ids[new], np.asarray(vectors)[new]
            if not len(ids):
                return
            rows = self._rows(len(ids))
            self._matrix[rows] = vectors
            self._slot[ids] = rows
            self._live += len(ids)

    def _rows(self, n: int) -> np.ndarray:
        """``n`` free rows (reused ones first), growing the matrix by a quarter when it is full."""
        taken: list[np.ndarray] = []
        while self._free and n:
            head = self._free.pop()
            use, rest = head[:n], head[n:]
            if len(rest):
                self._free.append(rest)
            taken.append(use)
            n -= len(use)
        if n:
            if self._next + n > len(self._matrix):
                grown = np.zeros((max(self._next + n, len(self._matrix) * 5 // 4), self.dim), dtype=np.float32)
                grown[:self._next] = self._matrix[:self._next]
                self._matrix = grown
            taken.append(np.arange(self._next, self._next + n, dtype=np.int32))
            self._next += n
        return np.concatenate(taken) if len(taken) > 1 else taken[0]

    def remove(self, ids: np.ndarray) -> None:
        """Forget template ``ids``: their rows are overwritten with zeros, and a fill still running will not put
        them back."""
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[(ids >= 0) & (ids < len(self._slot))] if len(ids) else ids
        with self._lock:
            if not len(ids):
                return
            rows = self._slot[ids]
            held = rows >= 0
            self._matrix[rows[held]] = 0.0
            if held.any():
                self._free.append(rows[held].astype(np.int32))
            self._live -= int(held.sum())
            self._slot[ids] = _REMOVED

    # ------------------------------------------------------------------------------------------- reads
    def holds(self, ids: np.ndarray) -> bool:
        """Whether every one of ``ids`` has its vector here (a saved copy may then include them)."""
        ids = np.asarray(ids, dtype=np.int64)
        with self._lock:
            if not len(ids):
                return True
            if int(ids.max()) >= len(self._slot) or int(ids.min()) < 0:
                return False
            return bool((self._slot[ids] >= 0).all())

    def get(self, ids: np.ndarray) -> np.ndarray | None:
        """The vectors of ``ids`` (``(len(ids), dim)``, a copy), or None when any of them is not held (not
        filled yet): the caller then reads the store."""
        ids = np.asarray(ids, dtype=np.int64)
        with self._lock:
            if len(ids) and int(ids.max()) >= len(self._slot):
                return None
            rows = self._slot[ids]
            if len(rows) and int(rows.min()) < 0:
                return None
            return self._matrix[rows]

    def scores(self, ids: np.ndarray, queries: np.ndarray) -> np.ndarray | None:
        """Similarities ``(len(ids), len(queries))`` of the vectors of ``ids`` with ``queries``, or None when any
        of them is not held. A person's templates sit in consecutive rows (filled in id order), so long runs of
        rows are read as slices, each multiplied in place, rather than gathered into a copy first."""
        ids = np.asarray(ids, dtype=np.int64)
        q = np.ascontiguousarray(queries, dtype=np.float32).T
        with self._lock:
            if len(ids) and int(ids.max()) >= len(self._slot):
                return None
            rows = self._slot[ids]
            if not len(rows):  # no candidate (an empty gallery): nothing to score
                return np.zeros((0, q.shape[1]), dtype=np.float32)
            if int(rows.min()) < 0:
                return None
            cuts = np.flatnonzero(np.diff(rows) != 1) + 1
            # One gather for scattered rows (after removals and re-use) and for short runs: a matmul call per
            # run costs more than copying a few rows. Measured at 512-d, 10 people: 5 templates each, gather 6.7
            # us against slices 23.8; 20 each, 21.9 against 28.9; 50 each, 64.1 against 38.5.
            if len(cuts) > 64 or len(rows) < 32 * (len(cuts) + 1):
                return self._matrix[rows] @ q
            out = np.empty((len(rows), q.shape[1]), dtype=np.float32)
            for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), len(rows)]):
                start = int(rows[a])
                np.matmul(self._matrix[start:start + b - a], q, out=out[a:b])
            return out

    # ------------------------------------------------------------------------------------------- filling
    def fill(self, batches: Iterable[tuple[Any, ...]]) -> None:
        """Start filling from ``batches`` of (..., ids, person ids, vectors) (``Store.stream_templates``) in a
        background thread; :meth:`wait` for it."""
        self._done.clear()
        thread = threading.Thread(target=self._fill, args=(batches,), name="facedb-vectors", daemon=True)
        thread.start()

    def _fill(self, batches: Iterable[tuple[Any, ...]]) -> None:
        try:
            for batch in batches:
                if self._stop:
                    break
                ids, vectors = batch[-3], batch[-1]
                self.put(ids, vectors, live=False)
        except BaseException as exc:  # the store could not be read: queries keep reading it themselves
            self.error = exc
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a background fill to finish; whether it has."""
        return self._done.wait(timeout)

    def own(self) -> None:
        """Copy rows that are memory-mapped from an index file into this process's memory, so that the file
        can go once it is replaced (after an erasure, its old copy must not stay allocated for this process)."""
        with self._lock:
            if not self._matrix.flags.owndata and self._matrix.base is not None:
                self._matrix = self._matrix.copy()

    def close(self) -> None:
        """Stop a background fill (at its next batch) and let the memory go."""
        self._stop = True
