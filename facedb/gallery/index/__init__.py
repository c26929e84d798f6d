"""Vector index backends: the protocols the rest of facedb programs against, and the registry of kinds.

An index is a cache derived from the store: keyed by template id, searched by inner product on unit vectors
(= cosine similarity, higher is more similar), rebuildable from SQLite at any time. Two protocols:

* :class:`VectorIndex`, one built index in memory (or a handle on a remote one): add, remove, search,
  range search, the ids it holds, and the exact vectors where it keeps them.
* :class:`IndexBackend`, a family of kinds and **where they persist**: create an index, load the persisted
  copy if it matches the stamp the store recorded, save (returning what to stamp), verify, measure, discard.
  The keeper (``facedb/gallery/upkeep.py``) decides *when* to load, catch up, rebuild and save; the backend decides
  *how*. A backend whose ``add``/``remove`` are durable at once (a remote engine) says so with
  ``write_through``; the keeper then applies every write as it reaches the store, and calls its ``publish``
  to record in the engine which store generation it reflects (so other processes catch up from there).

Backends register here by name with the kinds they provide and a factory that imports them on first use, so
importing this module imports neither faiss nor any client library. To add one: implement both protocols in
its own module (the only one importing its engine), call :func:`register_backend`, add its kind to the
CLI's ``IndexKind``, and ``tests/test_contracts.py`` runs the contracts against it (docs/architecture.md,
"Where to change what").
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ...errors import InvalidInputError


class VectorIndex(Protocol):
    """What the query engine needs from an index. Scores are cosine similarities, higher is closer."""

    kind: str
    dim: int
    exact: bool  # scores are exact and nothing is missed
    keeps_vectors: bool  # holds the float32 vectors themselves, bit for bit (see exact_vectors)
    # the similarities its searches return are the templates' exact ones (full float32 vectors compared), though
    # a search may miss templates; False where they come from codes (ivfpq, flat16) and must be re-scored
    scores_exact: bool
    params: dict[str, Any]
    tombstones: int  # removed entries still held (HNSW), filtered by the engine

    def __len__(self) -> int:
        """Entries held, tombstones included."""
        ...

    def add(self, ids: np.ndarray, vectors: np.ndarray, person_ids: np.ndarray | None = None) -> None:
        """Add unit ``vectors`` (n, dim) float32 under template ``ids`` (n,) int64 (new ids only).
        ``person_ids`` (n,): whose templates they are, for engines that carry it (a shared collection's other
        readers); facedb itself maps ids to people through the store."""
        ...

    def remove(self, ids: np.ndarray) -> None:
        """Remove template ``ids`` (those not held are ignored)."""
        ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids), each (m, k'), best first, k' = min(k, len(self)); -1 ids are padding."""
        ...

    def range_search(self, queries: np.ndarray, min_similarity: float) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each query, (ids, similarities) of every entry with similarity >= ``min_similarity``, best first
        (approximate kinds may miss some, as in ``search``)."""
        ...

    def ids(self) -> np.ndarray:
        """Every template id held (tombstones included), as int64."""
        ...

    def exact_vectors(self, ids: np.ndarray) -> np.ndarray | None:
        """The stored float32 vectors of live ``ids`` (``(len(ids), dim)``), bit for bit as added; None unless
        ``keeps_vectors`` (the index holds only approximations: the caller reads the store)."""
        ...


@dataclass(frozen=True)
class IndexPlace:
    """Where a database's index persists: the database directory, and backend options (a remote engine's
    address, a cipher for files at rest). ``readonly``: the backend must not change the persisted copy."""

    root: Path
    readonly: bool = False
    options: dict[str, Any] = field(default_factory=dict)


class IndexBackend(Protocol):
    """A family of index kinds and the place they persist.

    Write-through backends (``write_through`` True: a remote engine several processes share) also give their
    indexes a ``reflects`` attribute, the store generation the engine had recorded when it was loaded (None if
    unknown), and implement :meth:`publish`; the keeper replays the store's change log from ``reflects``.
    """

    name: str
    kinds: tuple[str, ...]
    write_through: bool  # add/remove are durable at once; save only records the generation reflected

    def new(self, kind: str, dim: int, params: dict[str, Any], train: np.ndarray | None,
            place: IndexPlace, total: int | None = None) -> VectorIndex:
        """A new, empty index of ``kind`` (trained on ``train`` where the kind needs training). ``total``: the
        size of the gallery it is made for, when ``train`` is only a sample of it (the keeper streams builds:
        sizes like an IVF's list count follow ``total``); default ``len(train)``."""
        ...

    def load(self, place: IndexPlace, stamp: dict[str, Any], dim: int) -> VectorIndex | None:
        """The persisted index if it matches ``stamp`` (what :meth:`save` returned, plus the keeper's fields:
        kind, params, count, generation); None when missing, damaged or stale (the keeper rebuilds)."""
        ...

    def save(self, index: VectorIndex, place: IndexPlace) -> dict[str, Any]:
        """Persist ``index``; returns the fields to record in the store's stamp (e.g. the file's SHA-256)."""
        ...

    def verify(self, place: IndexPlace, stamp: dict[str, Any], dim: int) -> bool:
        """Whether the persisted copy still matches ``stamp`` (``facedb check``)."""
        ...

    def persisted_bytes(self, place: IndexPlace) -> int:
        """Size of the persisted copy on this machine (0 for none or a remote one)."""
        ...

    def discard(self, place: IndexPlace) -> None:
        """Delete the persisted copy (before a rebuild under another backend, or for erasure)."""
        ...

    def publish(self, index: VectorIndex, place: IndexPlace, generation: int) -> None:
        """Write-through backends only: make ``index`` the copy every process opens (after a rebuild) and
        record in the engine that it reflects store ``generation``."""
        ...


@dataclass(frozen=True)
class _Registration:
    name: str
    kinds: tuple[str, ...]
    factory: Callable[[], IndexBackend]
    description: dict[str, str]
    params: dict[str, int | tuple[str, ...]]  # tuning parameter -> smallest whole number, or the names, it accepts


_REGISTRY: dict[str, _Registration] = {}
_LOADED: dict[str, IndexBackend] = {}
_LOCK = threading.Lock()


def register_backend(name: str, kinds: dict[str, str], factory: Callable[[], IndexBackend],
                     params: dict[str, int | tuple[str, ...]] | None = None) -> None:
    """Register a backend: ``kinds`` maps each kind it provides to a one-line description; ``factory`` builds
    the backend on first use (and is where its engine gets imported); ``params`` maps each tuning parameter
    its kinds take (``facedb reindex --nprobe ...``) to the smallest whole number it accepts, or to the tuple of
    names it accepts (``--quantizer``)."""
    with _LOCK:
        for kind in kinds:
            owner = next((r.name for r in _REGISTRY.values() if kind in r.kinds and r.name != name), None)
            if owner is not None:
                raise ValueError(f"index kind {kind!r} is already provided by the {owner} backend")
        _REGISTRY[name] = _Registration(name, tuple(kinds), factory, dict(kinds), dict(params or {}))
        _LOADED.pop(name, None)


def index_kinds() -> dict[str, str]:
    """Every registered kind with its description (``auto`` not included)."""
    return {k: d for r in _REGISTRY.values() for k, d in r.description.items()}


def backend_names() -> list[str]:
    return list(_REGISTRY)


def backend_for(kind: str) -> IndexBackend:
    """The backend providing ``kind``, loaded on first use."""
    reg = next((r for r in _REGISTRY.values() if kind in r.kinds), None)
    if reg is None:
        raise InvalidInputError(f"unknown index kind {kind!r}; known: {', '.join(index_kinds())}, auto")
    with _LOCK:
        if reg.name not in _LOADED:
            _LOADED[reg.name] = reg.factory()
        return _LOADED[reg.name]


def check_kind(kind: str) -> str:
    """``kind`` if it is a registered kind or ``auto``; InvalidInputError listing the kinds otherwise."""
    if kind != "auto" and kind not in index_kinds():
        raise InvalidInputError(f"unknown index kind {kind!r}; known: {', '.join(index_kinds())}, auto")
    return kind


def check_index_params(kind: str, params: object) -> dict[str, Any]:
    """``params`` if every key is a tuning parameter of ``kind``'s backend (any backend's for ``auto``) and every
    value a whole number at or above that parameter's minimum, or one of its names (a choice such as the IVF
    coarse quantizer); InvalidInputError otherwise. The one check
    behind ``FaceDB.reindex`` and ``facedb reindex`` (a bad value could otherwise crash the index engine)."""
    check_kind(kind)
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidInputError("index parameters must be a dict of name: value")
    regs = [r for r in _REGISTRY.values() if kind == "auto" or kind in r.kinds]
    known = {k: v for r in regs for k, v in r.params.items()}
    for key, value in params.items():
        if key not in known:
            raise InvalidInputError(f"unknown index parameter {key!r} for {kind}; known: "
                                    f"{', '.join(sorted(known)) or 'none'}")
        choices = known[key]
        if isinstance(choices, tuple):
            if value not in choices:
                raise InvalidInputError(f"index parameter {key} is one of {', '.join(choices)}, got {value!r}")
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < choices:
            raise InvalidInputError(f"index parameter {key} must be a whole number >= {choices}, got {value!r}")
    return dict(params)


def auto_kind(n: int, dim: int) -> str:
    """The index kind ``auto`` picks for ``n`` templates: exact below 50,000; IVF-PQ fast-scan above (its
    candidates re-scored exactly from float32 vectors kept in memory up to the re-scoring budget, then from
    the store: ``facedb/gallery/vectors.py``). Before the in-memory vectors existed, ``auto`` picked IVF-Flat up to
    8 GiB of vectors; at the same memory IVF-PQ with exact re-scoring gives the same answers several times
    faster (docs/performance-and-scale.md). An ``auto`` index already built as ivf is kept until its next rebuild."""
    if n < 50_000:
        return "flat"
    return "ivfpq"


def _faiss_backend() -> IndexBackend:
    from .faiss_kinds import FaissBackend

    return FaissBackend()


register_backend("faiss", {
    "flat": "exact float32 inner-product scan (FAISS IndexFlatIP); numpy GEMM for batches",
    "flat16": "float16 scalar-quantised scan (half the memory, scores ~1e-3 off, re-scored exactly)",
    "hnsw": "HNSW graph over float32 vectors (fast; removal by tombstones, rebuilt past 10%)",
    "ivf": "inverted lists over float32 vectors (~4 sqrt(n) lists; exact vectors for re-scoring)",
    "ivfpq": "inverted lists of 4-bit fast-scan PQ codes (dim/8 bytes a template; re-scored from the store)",
}, _faiss_backend, params={"nlist": 1, "nprobe": 1, "M": 2, "ef_search": 1, "ef_construction": 1,
                            # IVF coarse quantizers (faiss_kinds.QUANTIZERS, not imported here: it imports faiss)
                            "quantizer": ("flat", "pca", "fp16", "hnsw"), "quantizer_ef": 1})


def _milvus_backend() -> IndexBackend:
    try:
        from .milvus import MilvusBackend
    except ImportError as exc:
        from ...errors import IndexUnavailableError

        raise IndexUnavailableError(f"the milvus index kind needs pymilvus: pip install 'facedb[milvus]' ({exc})"
                                    ) from None
    return MilvusBackend()


register_backend("milvus", {
    "milvus": "a Milvus collection (server, cluster or Milvus Lite): HNSW below 2M templates, IVF_FLAT above; "
              "re-scored from the store",
}, _milvus_backend, params={"M": 2, "ef_construction": 1, "ef_search": 1, "nlist": 1, "nprobe": 1})


__all__ = [
    "IndexBackend", "IndexPlace", "VectorIndex", "auto_kind", "backend_for", "backend_names", "check_index_params",
    "check_kind",
    "index_kinds", "register_backend",
]
