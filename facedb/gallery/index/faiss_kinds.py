"""The FAISS index backend: the only module that imports faiss.

The index persists as one file, ``index.faiss`` in the database directory, written atomically
(``fsio.write_atomic``) and identified by its SHA-256, which the store records in the index stamp: a file whose
hash does not match is never handed to FAISS's reader (FAISS can crash on crafted input).

For an encrypted database the place carries a file cipher (``place.options["cipher"]``, from ``protect.py``):
the file is then never written in plain text. FAISS serialises into a callback that encrypts as it goes
(AES-256-GCM in 4 MiB chunks) and deserialises from one that decrypts and authenticates each chunk before
FAISS sees a byte of it, so no plaintext copy exists outside memory and only one chunk is held at a time. The
stamp records the file's random id instead of a hash: a file from another save does not decrypt as this one,
and any altered byte fails its chunk's tag (so no separate SHA-256 pass over the file is needed).

After FAISS's bytes the file holds the gallery section the keeper gives (``saved_map.py``: the template ->
person map and, for ivfpq/flat16, the exact re-scoring vectors), under the same hash or the same cipher, so
that a process opening the database reads neither out of the store.

Kinds (``facedb init --index`` / ``facedb reindex --index``):

=========  ===========================================  =========  ==============  ===============
kind       FAISS structure                              scores     can miss?       removal
=========  ===========================================  =========  ==============  ===============
flat       IDMap2(FlatIP), float32                      exact      no              remove_ids
flat16     IDMap2(ScalarQuantizer fp16)                 ~1e-3      rarely          remove_ids
hnsw       IDMap2(HNSWFlat, M), efSearch                exact      yes             tombstones
ivf        IVFFlat(nlist), nprobe, trained on the data  exact      yes             remove_ids
ivfpq      IVFPQFastScan(nlist, 4-bit, dim/8 bytes)     ~0.1       yes             remove_ids
=========  ===========================================  =========  ==============  ===============

The query engine re-scores every candidate person exactly, from all of their stored vectors, for all kinds but
``flat``, so an approximate index can miss a person but never changes a score. Kinds that hold the float32
vectors (hnsw, ivf) hand them back by id (``exact_vectors``); for the others they are read from the store.
HNSW cannot remove vectors: removed ids stay in the graph as tombstones, filtered out (they map to no person),
and the keeper rebuilds the index when they pass ``keeper.TOMBSTONE_LIMIT`` of it.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ...errors import TamperedError, TamperedFileWarning
from ...fsio import sha256_file, write_atomic
from ..settings import threads_setting
from . import IndexPlace, VectorIndex
from .saved_map import FOOTER, MapSource, SavedMap, footer, parse_footer, read_map, write_map

#: The file the FAISS backend keeps in a database directory.
INDEX_FILE = "index.faiss"

def _threads() -> int:
    """FAISS's OpenMP threads: ``FACEDB_THREADS`` (default 1: measured, see facedb.gallery.settings.DEFAULT_THREADS;
    IVF training 152 ms against 1,003 ms with 2 threads on a shared 2-core machine), 0 = OpenMP's own."""
    n = threads_setting()
    if n:
        faiss.omp_set_num_threads(n)
    return faiss.omp_get_max_threads()


_OMP_THREADS = _threads()

#: A flat index answers batches of at least this many probes with numpy's GEMM (its OpenBLAS is faster than
#: the one bundled with faiss-cpu; measured in scripts/bench_search.py).
GEMM_MIN_BATCH = 16


class _Faiss:
    kind = "?"
    exact = False
    keeps_vectors = False
    scores_exact = False  # scores from codes (flat16, ivfpq): re-scored exactly by the engine

    def __init__(self, dim: int, index: faiss.Index, params: dict[str, Any]) -> None:
        self.dim = dim
        self._index = index
        self.params = params
        self.tombstones = 0
        #: the gallery map (and vectors) saved in the file it was loaded from, for the keeper to take (saved_map)
        self.saved_map: SavedMap | None = None

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray, person_ids: np.ndarray | None = None) -> None:
        if len(ids):
            self._index.add_with_ids(
                np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64)
            )

    def remove(self, ids: np.ndarray) -> None:
        if len(ids):
            self._index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))

    def _search(self, queries: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if len(q) > 1 or _OMP_THREADS == 1:
            return self._index.search(q, k, params=params)
        # One probe: FAISS's OpenMP split of a single scan costs more than it gains (5.4 ms against 0.7 ms
        # for 10k x 512 here, worse when other processes are busy), so scan on one thread.
        faiss.omp_set_num_threads(1)
        try:
            return self._index.search(q, k, params=params)
        finally:
            faiss.omp_set_num_threads(_OMP_THREADS)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self))
        if k == 0:
            m = len(queries)
            return np.zeros((m, 0), dtype=np.float32), np.zeros((m, 0), dtype=np.int64)
        return self._search(queries, k)

    def range_search(self, queries: np.ndarray, min_similarity: float) -> list[tuple[np.ndarray, np.ndarray]]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if not len(self):
            return [(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)) for _ in q]
        # FAISS keeps inner products strictly above the radius: step just below the threshold.
        radius = float(np.nextafter(np.float32(min_similarity), np.float32(-np.inf)))
        try:
            lims, sims, ids = self._index.range_search(q, radius)
        except RuntimeError:  # kinds without a range search (fast-scan PQ): widen a k-NN search instead
            return [self._range_by_knn(row[None, :], min_similarity) for row in q]
        out = []
        for i in range(len(q)):
            s, d = sims[lims[i]:lims[i + 1]], ids[lims[i]:lims[i + 1]].astype(np.int64)
            keep = s >= min_similarity
            order = np.argsort(-s[keep], kind="stable")
            out.append((d[keep][order], s[keep][order]))
        return out

    def _range_by_knn(self, q: np.ndarray, min_similarity: float) -> tuple[np.ndarray, np.ndarray]:
        k = 64
        while True:
            sims, ids = self.search(q, k)
            if sims.shape[1] < k or (sims.shape[1] and sims[0, -1] < min_similarity):
                keep = (sims[0] >= min_similarity) & (ids[0] >= 0)
                return ids[0][keep].astype(np.int64), sims[0][keep]
            k *= 4

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def exact_vectors(self, ids: np.ndarray) -> np.ndarray | None:
        if not self.keeps_vectors:
            return None
        if not len(ids):
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))

    def to_bytes(self) -> bytes:
        return faiss.serialize_index(self._index).tobytes()

    def configure(self) -> None:
        """Apply search-time parameters (they are not all kept in FAISS's serialised form)."""


class FlatIndex(_Faiss):
    """Exact search over float32 vectors. Batches go through numpy's GEMM on a zero-copy view of the
    FAISS storage; single probes through FAISS."""

    kind = "flat"
    exact = True
    keeps_vectors = True
    scores_exact = True

    @classmethod
    def new(cls, dim: int, params: dict[str, Any]) -> FlatIndex:
        return cls(dim, faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), params)

    def _matrix(self) -> np.ndarray:
        inner = faiss.downcast_index(self._index.index)
        n = len(self)
        return faiss.rev_swig_ptr(inner.get_xb(), n * self.dim).reshape(n, self.dim)

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if len(queries) < GEMM_MIN_BATCH:
            return super()._search(queries, k)
        x = self._matrix()
        id_map = faiss.vector_to_array(self._index.id_map)
        sims = np.empty((len(queries), k), dtype=np.float32)
        rows = np.empty((len(queries), k), dtype=np.int64)
        block = 256  # probes per GEMM: keeps the (block, n) score matrix within ~1 GB at n = 1M
        for start in range(0, len(queries), block):
            q = np.ascontiguousarray(queries[start:start + block], dtype=np.float32)
            s = q @ x.T
            top = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < s.shape[1] else np.tile(
                np.arange(s.shape[1]), (len(q), 1))
            top_s = np.take_along_axis(s, top, axis=1)
            order = np.argsort(-top_s, axis=1, kind="stable")
            sims[start:start + len(q)] = np.take_along_axis(top_s, order, axis=1)
            rows[start:start + len(q)] = np.take_along_axis(top, order, axis=1)
        return sims, id_map[rows]


class Flat16Index(_Faiss):
    kind = "flat16"

    @classmethod
    def new(cls, dim: int, params: dict[str, Any]) -> Flat16Index:
        sq = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        return cls(dim, faiss.IndexIDMap2(sq), params)


class HNSWIndex(_Faiss):
    kind = "hnsw"
    keeps_vectors = True  # HNSWFlat stores the float32 vectors
    scores_exact = True

    @classmethod
    def new(cls, dim: int, params: dict[str, Any]) -> HNSWIndex:
        params = {"M": 32, "ef_construction": 40, "ef_search": 128, **params}
        inner = faiss.IndexHNSWFlat(dim, int(params["M"]), faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = int(params["ef_construction"])
        index = cls(dim, faiss.IndexIDMap2(inner), params)
        index.configure()
        return index

    def configure(self) -> None:
        faiss.downcast_index(self._index.index).hnsw.efSearch = int(self.params.get("ef_search", 128))

    def remove(self, ids: np.ndarray) -> None:
        # HNSW graphs cannot drop nodes: the ids stay as tombstones, which map to no person (filtered by
        # the engine) until the index is rebuilt. Their vectors are overwritten with zeros at once, so that
        # a saved file never holds a removed template (erasure without a rebuild of the graph).
        if not len(ids):
            return
        rows = np.flatnonzero(np.isin(faiss.vector_to_array(self._index.id_map), np.asarray(ids, dtype=np.int64)))
        storage = faiss.downcast_index(faiss.downcast_index(self._index.index).storage)
        xb = faiss.rev_swig_ptr(storage.get_xb(), len(self) * self.dim).reshape(len(self), self.dim)
        xb[rows] = 0.0
        self.tombstones += len(ids)


#: Coarse quantizers: which lists a probe scans is chosen by comparing it with every list centroid. ``flat``
#: (float32, full dimension) reads nlist x dim x 4 bytes per probe: 8 MiB at 4,096 lists of 512-d, 0.15-0.3 ms,
#: most of an ivfpq query at 1M. ``pca`` (the default from 1,024 lists) clusters and compares in a PCA
#: projection to ``pca_dim`` dimensions (default dim/4, at least 64: 128 for 512-d), a quarter of the reads:
#: measured on scripts/bench_search.py's face-like data at 200k, 2,048 lists, nprobe 16: 94 us a probe
#: against 215 us, the exact nearest template among the 100 returned for 99.6% of probes against 99.2%, and a
#: build 9x faster (k-means in 128 dimensions). ``fp16`` (float32 centroids stored as float16, half the reads;
#: 99.9% the same lists as flat) and ``hnsw`` (a graph over the centroids, M 32, efSearch ``quantizer_ef``,
#: default 128; 99.3% of the lists) are the other choices. Whatever the quantizer, the engine's exact
#: re-scoring makes a missed list cost at most a missed candidate, never a wrong score.
QUANTIZERS = ("flat", "pca", "fp16", "hnsw")


def _quantizer_for(nlist: int) -> str:
    """flat below 1,024 lists (the scan is short), pca above."""
    return "flat" if nlist < 1024 else "pca"


def _pca_dim(dim: int) -> int:
    return min(dim, max(64, dim // 4))


#: The most lists a default IVF gets: k-means time grows with lists x training points (both ~sqrt(n)), and the
#: quantizer's reads with lists; at 10M templates 8,192 lists and nprobe 32 scan ~40k codes a probe
#: (scripts/bench_scale.py). Larger: `facedb reindex --nlist N`.
MAX_DEFAULT_NLIST = 8192


#: How many times its nprobe a close call's wider search reads (engine.CLOSE_CALL): 256 of 4,096 lists at 1M
#: templates. A stranger's nearest template near the threshold lies far from every enrolled person, in a list
#: the probe's own centroids rank low: at 1M 128-d templates, 5 a person (800 probes whose exact best score is
#: at most 0.03 below the threshold) its list ranked 12th at the median, 114th for 90%, 425th for 99%, 1,175th
#: at worst. Decisions equal to exact search's there (64-byte codes; the 300 ready probes / with 700 more
#: strangers): without the wider search 93.7% / 81.1%, 16 x nprobe 100% / 99.1%, 32 x 100% / 99.9%; at 50 a
#: person (with 300 more): 94.7% / 92.8%, 8 x 100% / 99.7%, 16 x and 32 x 100% / 100%. A close call's engine
#: time (CPU, load average 7-10): 1.8-2.2 ms at 16 x, 4.4-4.5 ms at 32 x (bench-results/exact-agreement-*).
WIDE_NPROBE = 16


def _nlist_for(n: int) -> int:
    """About 4 sqrt(n) lists (a power of two): 4,096 at 1M templates, at most MAX_DEFAULT_NLIST; at most n / 39
    (FAISS's k-means wants 39 training points per centroid), at least 1."""
    lists = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(max(n, 1)))))
    cap = 2 ** math.floor(math.log2(max(1.0, n / 39)))
    return int(min(MAX_DEFAULT_NLIST, max(1, min(lists, cap))))


class IVFIndex(_Faiss):
    kind = "ivf"
    keeps_vectors = True  # IVFFlat lists hold the float32 vectors themselves
    scores_exact = True

    @classmethod
    def new(cls, dim: int, params: dict[str, Any], train: np.ndarray | None = None,
            total: int | None = None) -> IVFIndex:
        n = 0 if train is None else len(train)
        gallery = n if total is None else max(int(total), n)  # train may be a sample of the gallery
        nlist = int(params.get("nlist", _nlist_for(gallery)))
        # nprobe: 1/256 of the lists, at least 16 (16 of 4,096 at 1M): the recall / speed trade measured in
        # scripts/bench_search.py (docs/performance-and-scale.md); raise it with `facedb reindex --index ivf --nprobe N`
        params = {"nlist": nlist, "nprobe": max(16, nlist // 256), **params}
        if train is None or len(train) < nlist:
            nlist = max(1, min(nlist, 0 if train is None else len(train)))
            params["nlist"] = max(nlist, 1)
        params.setdefault("quantizer", _quantizer_for(int(params["nlist"])))
        if params["quantizer"] not in QUANTIZERS:
            raise ValueError(f"the coarse quantizer is one of {', '.join(QUANTIZERS)}")
        if params["quantizer"] == "pca":
            params.setdefault("pca_dim", _pca_dim(dim))
            reduced = int(params["pca_dim"])
            if not 1 <= reduced <= dim:
                raise ValueError(f"pca_dim is between 1 and the dimension ({dim})")
            # trained in _train, from the same sample as the lists (IndexIVF then leaves it as it is)
            quantizer = faiss.IndexPreTransform(faiss.PCAMatrix(dim, reduced), faiss.IndexFlatIP(reduced))
        else:
            quantizer = faiss.IndexFlatIP(dim)
        inner = cls._make(dim, quantizer, params)
        index = cls(dim, inner, params)
        index._quantizer = quantizer  # keep it alive beside the IVF index that points to it
        index._train(train, gallery)
        index._swap_quantizer()
        index.configure()
        return index

    def _train_pca_quantizer(self, sample: np.ndarray) -> None:
        """Train the ``pca`` quantizer: the projection, then spherical k-means (as IndexIVF's own training does
        for inner products) in the projected space; the centroids go into its flat index."""
        quantizer = self._quantizer
        pca = faiss.downcast_VectorTransform(quantizer.chain.at(0))
        pca.train(sample)
        reduced = pca.apply(sample)
        nlist = int(self.params["nlist"])
        kmeans = faiss.Kmeans(reduced.shape[1], nlist, niter=25, spherical=True, seed=1234,
                              max_points_per_centroid=256)
        kmeans.train(np.ascontiguousarray(reduced, dtype=np.float32))
        faiss.downcast_index(quantizer.index).add(kmeans.centroids)
        quantizer.ntotal = nlist
        quantizer.is_trained = True

    def _swap_quantizer(self) -> None:
        """Replace the flat float32 coarse quantizer that k-means trained by the faster one ``params`` names,
        holding the same centroids (see QUANTIZERS)."""
        kind = self.params.get("quantizer", "flat")
        if kind in ("flat", "pca"):
            return
        trained = faiss.downcast_index(self._index.quantizer)
        centroids = trained.reconstruct_n(0, trained.ntotal)
        if kind == "fp16":
            quantizer = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_fp16,
                                                   faiss.METRIC_INNER_PRODUCT)
        else:
            quantizer = faiss.IndexHNSWFlat(self.dim, 32, faiss.METRIC_INNER_PRODUCT)
            quantizer.hnsw.efConstruction = 128
        quantizer.train(centroids)
        quantizer.add(centroids)
        self._index.quantizer = quantizer
        self._quantizer = quantizer

    @staticmethod
    def _make(dim: int, quantizer: faiss.Index, params: dict[str, Any]) -> faiss.Index:
        return faiss.IndexIVFFlat(quantizer, dim, int(params["nlist"]), faiss.METRIC_INNER_PRODUCT)

    def _train(self, train: np.ndarray | None, gallery: int | None = None) -> None:
        n = 0 if train is None else len(train)
        # FAISS's k-means wants 39 points per centroid (coarse lists, and 2**nbits PQ centroids per sub-space)
        need = 39 * max(int(self.params["nlist"]), 2 ** int(self.params.get("pq_nbits", 0)))
        sample = train if train is not None else np.zeros((0, self.dim), dtype=np.float32)
        if n < need:
            # Too few vectors to train on (a new or tiny gallery, or more lists asked for than the gallery can
            # fill): pad with random directions, so FAISS has what it needs and prints no warning; the index
            # is retrained once the gallery outgrows this (see trained_on).
            pad = np.random.default_rng(0).standard_normal((need - n, self.dim))
            pad = (pad / np.linalg.norm(pad, axis=1, keepdims=True)).astype(np.float32)
            sample = np.concatenate([sample, pad])
        cap = max(40 * int(self.params["nlist"]), need)  # FAISS wants >= 39 points per centroid; more costs time
        if len(sample) > cap:
            sample = train[np.random.default_rng(0).choice(len(train), cap, replace=False)]
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        if self.params.get("quantizer") == "pca":
            self._train_pca_quantizer(sample)
        self._index.train(sample)
        self.params["trained_on"] = n if gallery is None else gallery  # the gallery the sample stands for

    def search_wide(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` over ``nprobe_wide`` lists (default :data:`WIDE_NPROBE` x nprobe, at most all of
        them), for the engine's close calls (``engine.CLOSE_CALL``): a probe whose best match sits near the
        threshold is far from every enrolled template, and its nearest ones lie in lists the default nprobe
        does not reach (see WIDE_NPROBE). The index's own nprobe is not touched (FAISS's per-call parameters)."""
        k = min(k, len(self))
        if k == 0:
            return self.search(queries, k)
        nprobe = int(self.params.get("nprobe", 16))
        wide = int(self.params.get("nprobe_wide", WIDE_NPROBE * nprobe))
        return self._search(queries, k, faiss.SearchParametersIVF(nprobe=max(nprobe, min(wide, self._index.nlist))))

    def configure(self) -> None:
        self._index.nprobe = int(self.params.get("nprobe", 16))
        if self.params.get("quantizer") == "hnsw":
            hnsw = faiss.downcast_index(self._index.quantizer)
            if isinstance(hnsw, faiss.IndexHNSW):
                hnsw.hnsw.efSearch = int(self.params.get("quantizer_ef", 128))
        if self.keeps_vectors and self._index.direct_map.type != faiss.DirectMap.Hashtable:
            # id -> list position, so candidates' vectors are re-read from memory, not SQLite (measured:
            # the store's B-tree lookups cost more than the search itself at 1M); ~50 B per template
            self._index.set_direct_map_type(faiss.DirectMap.Hashtable)


    def ids(self) -> np.ndarray:
        invlists = self._index.invlists
        out = [
            faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
            for i in range(self._index.nlist)
            if invlists.list_size(i)
        ]
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)


class IVFPQIndex(IVFIndex):
    kind = "ivfpq"
    keeps_vectors = False  # PQ codes only: exact scores come from the store
    scores_exact = False

    @staticmethod
    def _make(dim: int, quantizer: faiss.Index, params: dict[str, Any]) -> faiss.Index:
        # FAISS's fast-scan IVF-PQ: 4-bit codes scanned with SIMD lookups, ~3x faster than 8-bit IVFPQ at 1M
        # (0.18 ms against 0.49 ms a probe here), and with nbits 4 it trains from a few hundred vectors.
        # Its scores are coarse, which the engine's exact re-scoring makes harmless; what matters is that the
        # right person is among the candidates: for 100% of genuine probes at 1M (scripts/bench_search.py).
        m = int(params.setdefault("pq_m", _pq_m(dim)))
        params["pq_nbits"] = 4
        return faiss.IndexIVFPQFastScan(quantizer, dim, int(params["nlist"]), m, 4, faiss.METRIC_INNER_PRODUCT)

    # FAISS's fast-scan lists pack 32 codes a block, nibble by nibble, and an add ORs its codes into the
    # block's free lanes, which it takes to be zero. Its remove_ids repacks the entries that stay but leaves
    # the lanes it freed holding the removed codes, so a template added after a removal got a code mixed
    # with a removed one's: found by nothing near it (faiss 1.15.1: after removing 1 in 7, 20-46% of new
    # templates were their own nearest; tests/test_index_kinds.py). So the freed lanes are cleared after
    # every removal, and once when a file is loaded (a file saved after a removal holds them too).

    def configure(self) -> None:
        super().configure()
        self._clear_free_lanes(range(self._index.nlist))

    def remove(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        lists = self._index.invlists
        before = np.array([lists.list_size(i) for i in range(self._index.nlist)])
        super().remove(ids)
        after = np.array([lists.list_size(i) for i in range(self._index.nlist)])
        self._clear_free_lanes(np.flatnonzero(after < before))

    def _clear_free_lanes(self, list_numbers: Any) -> None:
        """Zero the lanes past each list's last entry in its last block (see above)."""
        lists = faiss.downcast_InvertedLists(self._index.invlists)
        packer = self._index.get_CodePacker()
        nvec, block = int(packer.nvec), int(packer.block_size)
        keep = getattr(self, "_keep_lanes", None)
        if keep is None:  # keep[r]: the bits of lanes 0..r-1 of a block (each lane's bits found by packing ones)
            lanes = np.zeros((nvec, 1, block), dtype=np.uint8)
            ones = np.full(int(packer.code_size), 0xFF, dtype=np.uint8)
            for lane in range(nvec):
                packer.pack_1(ones, lane, lanes[lane])
            keep = np.zeros((nvec, block), dtype=np.uint8)
            keep[1:] = np.bitwise_or.accumulate(lanes[:-1, 0], axis=0)
            self._keep_lanes = keep
        for i in list_numbers:
            n = int(lists.list_size(int(i)))
            if n % nvec:
                blocks = -(-n // nvec)
                codes = faiss.rev_swig_ptr(lists.get_codes(int(i)), blocks * block)
                codes[(blocks - 1) * block:] &= keep[n % nvec]


#: Sub-quantizers of a new ivfpq index: at most this many (4 bits each: codes of PQ_M_MAX / 2 = 64 bytes).
PQ_M_MAX = 128


def _pq_m(dim: int) -> int:
    """Sub-quantizers: the largest divisor of ``dim`` up to 128, so a code is at most 64 bytes (4 bits each),
    whatever the dimension: 512-d as before (128 of 4 dimensions), 128-d with one dimension each (it was 32
    of 4, 16-byte codes). At 128-d the coarse codes could not order a stranger's nearest templates, which
    sit a few thousandths apart near the threshold: at 1M templates, 1,024 lists read, the exact nearest
    template of 800 near-threshold probes was among the 200 best-coded for 66.1% of them with 16-byte codes,
    99.5% with 64-byte ones (bench-results/exact-agreement-1m5-128-codes16.json, on the loaded machine: that
    search 1.2 ms against 0.6 ms, which only close calls pay; the default one, 16 lists and 50 templates,
    63 us against 44 us, which every query pays). Indexes built before keep their
    sub-quantizers (FAISS's file holds them) until they are rebuilt."""
    return next(m for m in range(max(1, min(dim, PQ_M_MAX)), 0, -1) if dim % m == 0)


INDEX_KINDS: dict[str, type[_Faiss]] = {
    "flat": FlatIndex, "flat16": Flat16Index, "hnsw": HNSWIndex, "ivf": IVFIndex, "ivfpq": IVFPQIndex,
}
TRAINED_KINDS = ("ivf", "ivfpq")


def new_index(kind: str, dim: int, params: dict[str, Any] | None = None,
              train: np.ndarray | None = None, total: int | None = None) -> VectorIndex:
    try:
        cls = INDEX_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown index kind {kind!r}; known: {', '.join(INDEX_KINDS)}, auto") from None
    params = dict(params or {})
    if issubclass(cls, IVFIndex):
        return cls.new(dim, params, train, total)
    return cls.new(dim, params)  # type: ignore[attr-defined,no-any-return]


def load_index(path: Path, kind: str, dim: int, sha256: str, params: dict[str, Any] | None = None,
               with_map: bool = False, digests: dict[str, Any] | None = None) -> VectorIndex | None:
    """The index in ``path`` if its SHA-256 is ``sha256`` and it parses; None otherwise (rebuild). With
    ``with_map``, the gallery section saved after FAISS's bytes (``saved_map``) is read into the index's
    ``saved_map`` in the same pass that hashes the file (None there when the file has none).

    The file is hashed and then parsed through the same open descriptor (``/proc/self/fd``), so FAISS reads
    the bytes that were checked even if the path is replaced meanwhile; streaming avoids holding a copy of a
    multi-GB file in Python (at 1M x 512 this takes the open from 13 s to about 4 s). The section's map is
    read straight into its arrays while hashed; its vectors are memory-mapped from the same descriptor
    (copy-on-write: a removal's zeroed rows stay in this process). facedb never writes an index file in place
    (it replaces it by rename), so the mapped pages stay the checked ones.

    ``digests`` (``head_sha256``, ``vectors_sha256``, recorded by :meth:`FaissBackend.save`): the file's part
    before the vectors is checked against the first, and the vectors are left to be checked against the second
    (``SavedMap.check``, which the keeper runs in the background while queries re-score from the store): at 1M
    x 512 they are 2 GB, hashed in ~1.2 s on a quiet machine, ~8 s on the loaded development machine. Without
    them, the whole file is checked against ``sha256`` before anything is used.
    """
    if kind not in INDEX_KINDS:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    split = bool(with_map and digests and digests.get("head_sha256") and digests.get("vectors_sha256"))
    try:
        file = _HashedFile(fd, with_map, hash_vectors=not split)
        saved = file.read_section(dim)
        if split and saved is not None and saved.vectors is not None:
            if file.digest.hexdigest() != digests["head_sha256"]:  # type: ignore[index]
                return None
            saved.check = _vectors_check(saved.vectors, str(digests["vectors_sha256"]))  # type: ignore[index]
        elif file.rest_hexdigest() != sha256:
            return None
        via_fd = f"/proc/self/fd/{fd}"
        raw = faiss.read_index(via_fd if os.path.exists(via_fd) else str(path))
    except Exception:  # unreadable, or a file FAISS cannot parse: a stale cache, not an error
        return None
    finally:
        os.close(fd)
    return _wrap(raw, kind, dim, params, saved)


def _wrap(raw: faiss.Index, kind: str, dim: int, params: dict[str, Any] | None, saved: SavedMap | None
          ) -> VectorIndex | None:
    """The loaded FAISS index ``raw`` as facedb's ``kind`` (None when it is not one: another dimension, or an
    untrained structure for a trained kind), configured, with the gallery section ``saved`` read after it."""
    if raw.d != dim or (kind in TRAINED_KINDS and not isinstance(raw, faiss.IndexIVF)):
        return None
    index = INDEX_KINDS[kind](dim, raw, dict(params or {}))
    index.configure()
    index.saved_map = saved
    return index


class _HashedFile:
    """One pass over an index file's descriptor ``fd`` that hashes every byte it hands out (``digest``): FAISS's
    part, then the gallery section (``saved_map``) read straight into its arrays, its vectors memory-mapped
    (hashed with the rest unless ``hash_vectors`` is False: they are then checked on their own, later)."""

    def __init__(self, fd: int, with_map: bool, hash_vectors: bool = True) -> None:
        self.fd, self.pos, self.hash_vectors = fd, 0, hash_vectors
        self.digest = hashlib.sha256()
        size = os.fstat(fd).st_size
        self.section = parse_footer(os.pread(fd, FOOTER.size, max(0, size - FOOTER.size)), size) if with_map \
            else None

    def read(self, n: int) -> bytes:
        chunk = os.pread(self.fd, n, self.pos)
        self.pos += len(chunk)
        self.digest.update(chunk)
        return chunk

    def _end(self) -> int:
        return self.section[0] + self.section[1]  # type: ignore[index]

    def _readinto(self, view: memoryview) -> int:  # straight into the arrays, hashed while in cache
        got = os.preadv(self.fd, [view[:max(0, self._end() - self.pos)]], self.pos)
        self.digest.update(view[:got])
        self.pos += got
        return got

    def _mapped(self, nbytes: int) -> np.ndarray | None:  # the file's pages, copy-on-write
        if self.pos + nbytes > self._end():
            return None
        pages = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY)  # stays open as long as the array uses it
        if self.hash_vectors:
            _hash_into(self.digest, pages, self.pos, nbytes)
        out = np.frombuffer(pages, dtype=np.uint8, count=nbytes, offset=self.pos)
        self.pos += nbytes
        return out

    def read_section(self, dim: int) -> SavedMap | None:
        """Hash FAISS's part and read the gallery section after it (None without one, or when it does not
        parse)."""
        if self.section is None:
            return None
        while self.pos < self.section[0]:
            self.read(min(1 << 24, self.section[0] - self.pos))
        return read_map(lambda n: self.read(min(n, self._end() - self.pos)), dim, self._readinto, self._mapped)

    def rest_hexdigest(self) -> str:
        """Hash the rest of the file; the whole file's SHA-256."""
        while self.read(1 << 24):
            pass
        return self.digest.hexdigest()


def _hash_into(digest: Any, pages: Any, start: int, nbytes: int) -> None:
    with memoryview(pages) as view:
        for at in range(start, start + nbytes, 1 << 22):
            digest.update(view[at:min(at + (1 << 22), start + nbytes)])


def _vectors_check(vectors: np.ndarray, expected: str) -> Any:
    """A function that hashes the mapped ``vectors`` and says whether they are the saved ones."""
    def check() -> bool:
        digest = hashlib.sha256()
        flat = vectors.reshape(-1).view(np.uint8)
        for at in range(0, len(flat), 1 << 22):
            digest.update(flat[at:at + (1 << 22)])
        return digest.hexdigest() == expected

    return check


def _cipher(place: IndexPlace) -> Any:
    return place.options.get("cipher")


def _save_sealed(index: _Faiss, path: Path, cipher: Any, gallery: MapSource | None) -> dict[str, Any]:
    """Serialise ``index`` (and the ``gallery`` section after it) through an encrypting callback into ``path``
    (atomically)."""
    sealed: dict[str, str] = {}

    def write(f: Any) -> None:
        with cipher.sealing(f) as out:
            faiss.write_index(index._index, faiss.PyCallbackIOWriter(out.write, 1 << 22))
            if gallery is not None:
                write_map(out.write, gallery)
        sealed["file_id"] = out.file_id

    write_atomic(path, write, digest=False)
    return {"cipher": cipher.name, "file_id": sealed["file_id"]}


def _load_sealed(path: Path, kind: str, dim: int, file_id: str, cipher: Any, params: dict[str, Any] | None,
                 with_map: bool = False) -> VectorIndex | None:
    """The index in the encrypted ``path`` if it is the file ``file_id`` and authenticates; None when it is
    missing or another save's (a stale cache); TamperedError when it fails authentication. ``with_map``: read
    the gallery section that follows FAISS's bytes in the same stream (``saved_map``)."""
    try:
        f = open(path, "rb")  # closed below, after FAISS has read through the callback
    except OSError:
        return None
    try:
        from ...protection.keyring import FileCipher

        head = f.read(64)
        if FileCipher.file_id_of(head) != file_id:
            return None  # another save's file (or a plain one): not this stamp's, rebuilt like any stale copy
        f.seek(0)
        reader = cipher.opening(f, file_id)
        failure: list[BaseException] = []

        def read(n: int) -> bytes:
            try:
                return reader.read(n)
            except BaseException as exc:  # surfaced after FAISS returns: it only sees a short read
                failure.append(exc)
                return b""

        try:
            raw = faiss.read_index(faiss.PyCallbackIOReader(read, 1 << 22))
        except RuntimeError:
            if failure:
                raise failure[0] from None
            return None
        if failure:
            raise failure[0]
        saved = read_map(reader.read, dim) if with_map else None  # FAISS's reader reads nothing ahead
        reader.finish()  # every chunk authenticates, including any FAISS did not need
    finally:
        f.close()
    return _wrap(raw, kind, dim, params, saved)


class FaissBackend:
    """The FAISS kinds, persisted as ``index.faiss`` beside the store (encrypted when the place has a
    cipher), with the gallery section (``saved_map``) after FAISS's bytes when the keeper gives one."""

    name = "faiss"
    kinds = tuple(INDEX_KINDS)
    write_through = False
    saves_map = True  # save() takes the gallery section; load() hands it back as the index's saved_map

    @staticmethod
    def path(place: IndexPlace) -> Path:
        return place.root / INDEX_FILE

    def new(self, kind: str, dim: int, params: dict[str, Any], train: np.ndarray | None,
            place: IndexPlace, total: int | None = None) -> VectorIndex:
        return new_index(kind, dim, params, train, total)

    def load(self, place: IndexPlace, stamp: dict[str, Any], dim: int) -> VectorIndex | None:
        cipher = _cipher(place)
        kind = str(stamp.get("kind"))
        if cipher is None:
            if stamp.get("cipher"):
                return None  # an encrypted file stamped in a database now opened without its key: not ours
            saved_map = stamp.get("map")
            return load_index(self.path(place), kind, dim, str(stamp.get("sha256", "")), stamp.get("params"),
                              with_map=bool(saved_map), digests=saved_map if isinstance(saved_map, dict) else None)
        if stamp.get("cipher") != cipher.name or not stamp.get("file_id") or kind not in INDEX_KINDS:
            return None  # a plain file (or another cipher's) is never loaded into an encrypted database
        try:
            return _load_sealed(self.path(place), kind, dim, str(stamp["file_id"]), cipher, stamp.get("params"),
                                with_map=bool(stamp.get("map")))
        except TamperedError as exc:
            import warnings

            # A derived cache: the authenticated store rebuilds it (the door keeps answering), said loudly.
            warnings.warn(f"{self.path(place)}: {exc}; it is not used: the index is rebuilt from the store",
                          TamperedFileWarning, stacklevel=2)
            return None

    def save(self, index: VectorIndex, place: IndexPlace, gallery: MapSource | None = None) -> dict[str, Any]:
        """Write ``index`` (and the ``gallery`` section after it, where given) atomically; returns the stamp's
        fields: the file's SHA-256, or its cipher and file id."""
        assert isinstance(index, _Faiss)
        cipher = _cipher(place)
        if cipher is not None:
            return _save_sealed(index, self.path(place), cipher, gallery)
        sha = hashlib.sha256()

        # Besides the whole file's digest (``verify``), the part before the vectors and the vectors each get
        # their own, so an open can trust the index and map at once and check the vectors in the background.
        parts = [hashlib.sha256()]

        def write(f: Any) -> None:  # streamed and hashed as it goes: no in-memory copy, no second pass to hash
            done = 0

            def out(chunk: bytes) -> None:
                nonlocal done
                sha.update(chunk)
                parts[-1].update(chunk)
                f.write(chunk)
                done += len(chunk)

            faiss.write_index(index._index, faiss.PyCallbackIOWriter(out, 1 << 22))
            if gallery is not None:
                offset = done
                length = write_map(out, gallery, on_vectors=lambda: parts.append(hashlib.sha256()))
                parts.append(hashlib.sha256())  # the footer: in the whole file's digest only
                out(footer(offset, length))

        write_atomic(self.path(place), write, digest=False)
        fields: dict[str, Any] = {"sha256": sha.hexdigest()}
        if len(parts) == 3:  # the section holds vectors
            fields["map_digests"] = {"head_sha256": parts[0].hexdigest(), "vectors_sha256": parts[1].hexdigest()}
        return fields

    def verify(self, place: IndexPlace, stamp: dict[str, Any], dim: int) -> bool:
        cipher = _cipher(place)
        if cipher is None:
            return not stamp.get("cipher") and _sha256_of(self.path(place)) == stamp.get("sha256")
        if stamp.get("cipher") != cipher.name:
            return False
        try:
            with open(self.path(place), "rb") as f:
                cipher.opening(f, str(stamp.get("file_id"))).finish()  # every chunk's tag
        except (OSError, TamperedError):
            return False
        return True

    def persisted_bytes(self, place: IndexPlace) -> int:
        try:
            return self.path(place).stat().st_size
        except OSError:
            return 0

    def discard(self, place: IndexPlace) -> None:
        self.path(place).unlink(missing_ok=True)


def _sha256_of(path: Path) -> str | None:
    try:
        return sha256_file(path, chunk=1 << 24)
    except OSError:
        return None
