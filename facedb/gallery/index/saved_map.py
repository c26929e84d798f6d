"""What a gallery needs beside its index, saved inside the index file so that opening does not rebuild it.

A gallery is an index plus the template -> person map and, for kinds that keep only codes (ivfpq, flat16),
the exact float32 vectors that re-score candidates (``facedb/gallery/vectors.py``). Without this section a process
opening a 1M-template database read the map out of SQLite row by row (~1 s) and streamed the vectors out of
it in the background (~9 s, most of it converting blobs), re-scoring from the store meanwhile. Saved here they
load at disk speed: fixed-width arrays read straight into their numpy buffers.

The section follows the FAISS bytes in the same file, so everything the index file already is holds for it
too: written atomically with it, covered by the SHA-256 the store's stamp records (plain files) or sealed by
the same cipher and authenticated chunk by chunk (encrypted databases: no plaintext vector is ever written),
rewritten when a removal must be erased, copied by ``backup --with-index`` and carried by key conversions.

Layout (little-endian): the magic ``FDBMAP01``, a u32 header length, a JSON header ``{"generation", "n",
"dim", "vectors", "per_person"}``, then ``n`` int64 template ids (sorted), ``n`` int64 person ids, and with ``vectors``
``n x dim`` float32 rows in id order. A plain file ends with a 24-byte footer (``FDBMAPZ1``, the section's
offset, its length), so the reader can find the section without parsing FAISS's part; an encrypted file is
read as one stream, the section right after what FAISS consumed.

Trust: the section records the store generation it was saved at, which must equal the stamp's; the keeper then
levels it with the store through the change log (never trusting a map the stamp does not name).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MAGIC = b"FDBMAP01"
FOOTER_MAGIC = b"FDBMAPZ1"
FOOTER = struct.Struct("<8sQQ")  # magic, offset of the section, its length
#: Rows converted and written per call (a few MiB: no second copy of a multi-GB matrix while saving).
WRITE_ROWS = 16384
#: Bytes read per call when loading (FAISS's callback reader uses the same 4 MiB).
READ_BYTES = 1 << 22
_MAX_HEADER = 1 << 16


@dataclass
class SavedMap:
    """A gallery's template -> person map at store ``generation``: ``ids`` (n,) int64 sorted, ``pids`` (n,)
    int64, and the exact ``vectors`` (n, dim) float32 of those ids where the gallery keeps them (else None)."""

    generation: int
    ids: np.ndarray
    pids: np.ndarray
    vectors: np.ndarray | None = None
    dim: int = 0
    per_person: int = 0  # templates per person, rounded up, when saved (0: not recorded)
    #: where the vectors are not verified yet (memory-mapped from a plain file with their own digest): a
    #: function that hashes them and says whether they are the saved ones; None when already verified
    check: Callable[[], bool] | None = None


@dataclass
class MapSource:
    """What to save: the gallery's map at store ``generation`` (``ids`` sorted, ``pids``) and, where the gallery
    keeps them, ``rows(ids)``: the exact vectors of a slice of ``ids`` ((len, dim) float32, every id held)."""

    generation: int
    ids: np.ndarray
    pids: np.ndarray
    dim: int
    rows: Callable[[np.ndarray], np.ndarray | None] | None = None


def write_map(out: Callable[[bytes], object], source: MapSource,
              on_vectors: Callable[[], None] | None = None) -> int:
    """Write the section to ``out`` (a file's write, or a sealing writer's), ``WRITE_ROWS`` vectors at a time
    (no second copy of the matrix); returns the bytes written. RuntimeError when ``rows`` no longer holds an id
    (the caller checked it did just before: the save then fails as a whole and the old file stays)."""
    ids = np.ascontiguousarray(source.ids, dtype="<i8")
    pids = np.ascontiguousarray(source.pids, dtype="<i8")
    people = len(np.unique(pids)) if len(pids) else 0
    per_person = -(-len(ids) // max(people, 1)) if len(ids) else 1  # as Gallery.templates_per_person counts
    header = json.dumps({"generation": int(source.generation), "n": len(ids), "dim": int(source.dim),
                         "vectors": source.rows is not None, "per_person": per_person}).encode()
    written = 0
    for part in (MAGIC, struct.pack("<I", len(header)), header):
        out(part)
        written += len(part)
    for array in (ids, pids):
        out(memoryview(array).cast("B"))
        written += array.nbytes
    if source.rows is not None:
        if on_vectors is not None:
            on_vectors()  # the caller starts the vectors' own digest here
        for s in range(0, len(ids), WRITE_ROWS):
            block = source.rows(ids[s:s + WRITE_ROWS])
            if block is None or block.shape != (min(WRITE_ROWS, len(ids) - s), source.dim):
                raise RuntimeError("the in-memory vectors changed while the index was being saved")
            block = np.ascontiguousarray(block, dtype="<f4")
            out(memoryview(block).cast("B"))
            written += block.nbytes
    return written


def footer(offset: int, length: int) -> bytes:
    """The plain file's last bytes: where the section starts and how long it is."""
    return FOOTER.pack(FOOTER_MAGIC, offset, length)


def parse_footer(tail: bytes, size: int) -> tuple[int, int] | None:
    """(offset, length) of the section from a plain file's last ``FOOTER.size`` bytes (``size``: the file's),
    or None when the file has no section (written before it existed) or the footer does not add up."""
    if len(tail) != FOOTER.size:
        return None
    magic, offset, length = FOOTER.unpack(tail)
    if magic != FOOTER_MAGIC or offset + length + FOOTER.size != size:
        return None
    return int(offset), int(length)


def read_map(read: Callable[[int], bytes], dim: int,
             readinto: Callable[[memoryview], int] | None = None,
             mapped: Callable[[int], np.ndarray | None] | None = None) -> SavedMap | None:
    """The section from ``read(n)`` (which returns up to ``n`` bytes, fewer only at the end), or None when it is
    not one (damaged, another dimension, cut short): the caller then reads the map from the store.
    ``readinto(view)``, where given, fills the arrays in place instead (a plain file: no copy in Python);
    ``mapped(nbytes)`` gives the vectors as a uint8 view of the file's pages (memory-mapped, copy-on-write)
    instead of reading them into new memory: faulting in gigabytes of fresh memory cost more than the
    reading itself here (13 s for 2 GB on the loaded development machine, against ~4 s to hash it mapped)."""
    head = _exactly(read, len(MAGIC) + 4)
    if head is None or head[:len(MAGIC)] != MAGIC:
        return None
    (size,) = struct.unpack("<I", head[len(MAGIC):])
    if size > _MAX_HEADER:
        return None
    raw = _exactly(read, size)
    try:
        meta = json.loads(raw) if raw is not None else None
        n, gen, has_vectors = int(meta["n"]), int(meta["generation"]), bool(meta["vectors"])
        saved_dim = int(meta["dim"])
        per_person = int(meta.get("per_person", 0))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if n < 0 or saved_dim != dim:
        return None
    ids = np.empty(n, dtype="<i8")
    pids = np.empty(n, dtype="<i8")
    for array in (ids, pids):
        view = memoryview(array).cast("B")
        if not (_fill_into(readinto, view) if readinto is not None else _fill(read, view)):
            return None
    vectors = None
    if has_vectors and mapped is not None:
        raw_vectors = mapped(n * dim * 4)
        if raw_vectors is None:
            return None
        vectors = raw_vectors.view("<f4").reshape(n, dim)
    elif has_vectors:
        vectors = np.empty((n, dim), dtype="<f4")
        view = memoryview(vectors.reshape(-1)).cast("B")
        if not (_fill_into(readinto, view) if readinto is not None else _fill(read, view)):
            return None
    if n and (np.any(np.diff(ids) <= 0) or ids[0] < 0):
        return None  # not the sorted ids the keeper wrote
    return SavedMap(gen, ids, pids, vectors, dim, per_person)


def _fill_into(readinto: Callable[[memoryview], int], view: memoryview) -> bool:
    done = 0
    while done < len(view):
        got = readinto(view[done:done + READ_BYTES])
        if not got:
            return False
        done += got
    return True


def _exactly(read: Callable[[int], bytes], n: int) -> bytes | None:
    buf = bytearray(n)
    return bytes(buf) if _fill(read, memoryview(buf)) else None


def _fill(read: Callable[[int], bytes], view: memoryview) -> bool:
    """Fill ``view`` from ``read``; False when the stream ends first."""
    done = 0
    while done < len(view):
        chunk = read(min(READ_BYTES, len(view) - done))
        if not chunk:
            return False
        view[done:done + len(chunk)] = chunk
        done += len(chunk)
    return True
