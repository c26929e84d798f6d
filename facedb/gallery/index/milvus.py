"""The Milvus index backend: the only module that imports pymilvus (``pip install 'facedb[milvus]'``).

For galleries that outgrow one machine (10M x 512-d float32 is 20 GB before any index) or that many sites
must query at once: the index lives in a Milvus collection (a server, a cluster, or Milvus Lite, in process,
for one machine and tests), and facedb stays what it is around it. SQLite remains the truth for people,
images, metadata and the change log; the collection is derived from it and can be rebuilt from it at any time.

Layout. The name users give (``--milvus-collection``, default ``facedb``) is a Milvus **alias**; it points to
a physical collection ``<name>__<8 hex>`` with

* ``id`` INT64, the primary key: the template id (never reused by the store);
* ``person_id`` INT64: the person the template belonged to when it was written (for other readers of the
  collection; facedb itself maps ids to people through the store, which is the authority);
* ``vector`` FLOAT_VECTOR(dim), metric COSINE (= inner product on unit vectors: higher is more similar);
* an index chosen by size when built: HNSW (M 32, efConstruction 200, ef 128) below 2M templates, IVF_FLAT
  (~4 sqrt of one full segment's rows lists, see :func:`segment_rows`; nprobe max(16, nlist / 256)) above;
  ``facedb reindex --index milvus --ef-search N`` etc.;
* properties ``facedb.format``, ``facedb.database`` (the store's random id: two databases never share one
  collection), ``facedb.model_id``, ``facedb.dim``, ``facedb.params`` and ``facedb.generation``, the store
  generation the collection reflects.

A rebuild fills a new physical collection and then swings the alias to it and drops the old one, so other
processes searching the alias never see a half-built collection.

Freshness. Writes go to Milvus as they reach the store (``write_through``): upsert by primary key for adds,
delete by primary key for removals; both idempotent, so several processes catching up the same collection
from the change log can repeat each other's work harmlessly. A writable process then records the generation
it reflects in the collection; the next process to open it replays the store's change log from there (or
diffs ids when the log no longer reaches back, or the counts then disagree). Searches use consistency level
**Session**: a process sees its own writes at once, without paying Strong's wait for the server's next time
tick (200 ms on a 2.3 server). What keeps a removal from ever matching again is the
store, not Milvus: before every query a process reads the store's generation and catches up (removing the
removed ids from its template -> person map, and re-sending the write to Milvus, idempotently, which also makes
it part of this process's session), then maps every candidate id through that map and re-scores candidates
exactly from the store's vectors (``exact`` and ``keeps_vectors`` are False). An id Milvus still returns after
its removal maps to no one and is dropped (tested by feeding removed ids back into the results). What Session
consistency can cost is the other direction, briefly: a process that opened a collection already level with
its store, and wrote nothing since, may miss a template another process wrote within the server's last time
tick (an "unknown" for a person enrolled a fraction of a second ago). The count at open, ``check``'s id listing
and a read-only replica's presence queries use Strong.

Read-only opens (``FaceDB.open(readonly=True)``, a read replica with a copy of the store) never write to
the collection: templates the collection lacks are kept in a small in-memory overlay searched exactly, and
templates it holds that the store no longer has are hidden. A replica therefore answers as of **its copy of
the store** (its generation), whatever state the collection is in.

Errors: an unreachable server, refused credentials, a missing client library, a collection made by something
else or by another facedb database raise IndexUnavailableError; a collection of another model or dimension
raises ModelMismatchError. The token comes from ``FACEDB_MILVUS_TOKEN`` (or the API's ``index_options``),
never from the database file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException

from ...environment import number
from ...errors import (
    IndexCredentialsError,
    IndexLoadingError,
    IndexUnavailableError,
    IndexUnreachableError,
    InvalidInputError,
    ModelMismatchError,
)
from ..settings import DEFAULT_MILVUS_COLLECTION
from . import IndexPlace, VectorIndex

KIND = "milvus"
#: Environment variables: the token ("user:password" or an API key) and a URI that overrides the stored one
#: (a replica reaching the same cluster by another address).
TOKEN_ENV = "FACEDB_MILVUS_TOKEN"
URI_ENV = "FACEDB_MILVUS_URI"
#: Searches (and counts after this process's own writes) read at **Session** consistency: they see every write
#: this process made, without waiting for the server's next time tick, which a 2.3 server's Strong reads do
#: (``proxy.timeTickInterval``, 200 ms: a search took 200 ms at Strong, 2 ms at Session). Correctness does not rest
#: on it: see "Freshness" in the module docstring.
SEARCH_CONSISTENCY = "Session"
#: The count at open, ``check``'s id listing and a replica's presence queries wait for every acknowledged write
#: from any process: rare calls, where a complete answer matters more than 200 ms.
CONSISTENCY = "Strong"
#: Milvus's limit on results per query (topk).
MAX_TOPK = 16384
#: Rows per insert / upsert / delete request: 4,096 x 512-d float32 is 8 MiB, under gRPC's 64 MiB limit.
WRITE_ROWS = 4096
#: Seconds each call may take before it is an IndexUnavailableError; loading, flushing and creating a collection
#: (which waits for its index) may take minutes on a large gallery.
TIMEOUT_S = 60.0
SLOW_TIMEOUT_S = 1800.0
#: Seconds a search may take (FACEDB_MILVUS_SEARCH_TIMEOUT_S) before it is an IndexUnavailableError: pymilvus
#: retries a dead server's refused connections until the call's timeout, and a door's query in flight when the
#: server died waited the whole TIMEOUT_S for its error. With this, it fails in seconds and is asked again of the
#: stand-in (gallery/query.py). Searches took at most ~0.1 s here (1M, load 13), so 5 s is never a slow one.
SEARCH_TIMEOUT_ENV = "FACEDB_MILVUS_SEARCH_TIMEOUT_S"
SEARCH_TIMEOUT_S = 5.0
#: Seconds an open waits for a collection the server is already loading (FACEDB_MILVUS_LOAD_WAIT_S) before it says
#: so with IndexLoadingError (retry shortly) instead of holding the caller: a 2.3 server restarted moments ago
#: reassigns a collection only once its previous query node's session expires (common.session.ttl, 30 s), and a
#: door must not hang for that.
LOAD_WAIT_ENV = "FACEDB_MILVUS_LOAD_WAIT_S"
LOAD_WAIT_S = 5.0
#: Seconds a rebuild waits for the server to serve what it wrote from the index (``_wait_served_from_index``):
#: building HNSW over 1M x 128-d took minutes on this machine's two cores.
INDEX_WAIT_ENV = "FACEDB_MILVUS_INDEX_WAIT_S"
INDEX_WAIT_S = 900.0
#: Segments under this many rows are never indexed (the server's indexCoord.segment.minSegmentNumRowsToEnableIndex,
#: default 1,024): searched whole, they are not waited for.
UNINDEXED_ROWS = 1024
#: Galleries built at this size or more get IVF_FLAT instead of HNSW (cheaper to build, less memory).
HNSW_UP_TO = 2_000_000
FORMAT = "facedb-templates-1"
_P = "facedb."
_FLOAT_MIN = float(np.finfo(np.float32).min)  # padding score, as FAISS pads: keeps rows sorted


class _NoLiteTimestampNote(logging.Filter):
    """Milvus Lite returns no MVCC timestamp to a query iterator, so pymilvus warns and uses the client's clock:
    harmless for listing ids (``check``) under Strong consistency, and noise on a user's terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("failed to get mvccTs")


class _NoLiteLockTraceback(logging.Filter):
    """Milvus Lite logs a traceback when its .db is locked by another process; the IndexUnavailableError raised
    here already says so in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to start MilvusLite server")


logging.getLogger("pymilvus.client.iterator.query_iterator").addFilter(_NoLiteTimestampNote())
logging.getLogger("milvus_lite.server_manager").addFilter(_NoLiteLockTraceback())

_CLIENTS: dict[tuple[str, str], MilvusClient] = {}
_CLIENTS_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------------- connection
def _target(place: IndexPlace) -> tuple[str, str, str]:
    """(uri, token, alias) for ``place``: the URI from FACEDB_MILVUS_URI or the database's settings, the token
    from the options given to this process or FACEDB_MILVUS_TOKEN."""
    uri = os.environ.get(URI_ENV) or place.options.get("milvus_uri")
    if not uri:
        raise IndexUnavailableError("the milvus index needs a Milvus URI: `facedb init --index milvus --milvus-uri "
                                    "URI` (or `reindex`), or FACEDB_MILVUS_URI")
    token = place.options.get("milvus_token") or os.environ.get(TOKEN_ENV, "")
    return str(uri), str(token), str(place.options.get("milvus_collection") or DEFAULT_MILVUS_COLLECTION)


def _explain(uri: str, what: str, exc: BaseException) -> str:
    msg = str(getattr(exc, "message", "") or exc)
    text = f"Milvus at {uri}: {what} failed: {msg}"
    low = msg.lower()
    if any(w in low for w in ("auth", "credential", "token", "password", "permission", "privilege", "denied")):
        text += f" (wrong or missing token? set {TOKEN_ENV} to 'user:password' or an API key)"
    elif uri.endswith(".db"):
        text += (" (Milvus Lite could not open it: it serves one process at a time, so another process may be "
                 "using it (use a Milvus server for several processes), or the path is not a Milvus Lite "
                 "directory)") if "open local" in low else ""
    elif any(w in low for w in ("connect", "unavailable", "deadline", "timeout")):
        text += " (is the server running and reachable from here?)"
    return text


def _refused(exc: BaseException) -> bool:
    """Whether the server refused the credentials. pymilvus reports a refused token at connect time as "Fail
    connecting to server ... illegal connection params or server unavailable" (code 2), the same words as a
    server that is down; the gRPC error it wraps says UNAUTHENTICATED (a 2.3 server: "auth check failure")."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:  # the chain may loop back on itself
        seen.add(id(cur))
        code = getattr(cur, "code", None)
        if isinstance(cur, grpc.RpcError) and callable(code) and code() == grpc.StatusCode.UNAUTHENTICATED:
            return True
        if isinstance(cur, MilvusException) and code == 1800:  # Milvus's "auth check failure" on a later call
            return True
        cur = cur.__cause__ or cur.__context__
    return False


#: What a 2.3 server's proxy answers while its other components are gone (measured during a graceful stop:
#: "empty grpc client: failed to connect ...", "find no available rootcoord, check rootcoord state"): a
#: server that cannot answer yet, like one that is down.
_PARTLY_DOWN = ("empty grpc client", "no available rootcoord", "no available querynode", "service not ready",
                "is not ready", "stopping")


def _unreachable(exc: BaseException) -> bool:
    """Whether the failure is the server not answering (down, restarting, stopping, too slow): a gRPC
    UNAVAILABLE or DEADLINE_EXCEEDED in the chain, pymilvus's "Fail connecting" (code 2), a dropped connection,
    or a proxy whose other components are gone (:data:`_PARTLY_DOWN`); not a refusal (a wrong token, a missing
    collection), which a stand-in must not hide."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:  # the chain loops back on itself (pymilvus's retries)
        seen.add(id(cur))
        code = getattr(cur, "code", None)
        if isinstance(cur, grpc.RpcError) and callable(code) and code() in (grpc.StatusCode.UNAVAILABLE,
                                                                            grpc.StatusCode.DEADLINE_EXCEEDED):
            return True
        if (isinstance(cur, MilvusException) and code == 2) or isinstance(cur, ConnectionError):
            return True
        if isinstance(cur, MilvusException) and any(p in str(getattr(cur, "message", cur)).lower()
                                                    for p in _PARTLY_DOWN):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


@contextmanager
def _engine(uri: str, what: str) -> Iterator[None]:
    """Milvus and gRPC failures as IndexUnavailableError naming the server and the step (IndexCredentialsError
    when the server refused the token, IndexUnreachableError when it did not answer)."""
    try:
        yield
    except (MilvusException, grpc.RpcError, ConnectionError) as exc:
        if _refused(exc):
            raise IndexCredentialsError(
                f"Milvus at {uri}: {what} failed: the server refused the credentials (wrong or missing token: set "
                f"{TOKEN_ENV} to 'user:password' or an API key)") from None
        if not uri.endswith(".db") and _unreachable(exc):
            raise IndexUnreachableError(_explain(uri, what, exc)) from None
        raise IndexUnavailableError(_explain(uri, what, exc)) from None


def _client(uri: str, token: str) -> MilvusClient:
    """One client per (URI, token) and process (Milvus Lite: one in-process server per .db path)."""
    with _CLIENTS_LOCK:
        client = _CLIENTS.get((uri, token))
        if client is None:
            with _engine(uri, "connecting"):
                client = MilvusClient(uri=uri, token=token, timeout=TIMEOUT_S)
                client.list_collections(timeout=TIMEOUT_S)  # authenticates now, not at the first search
            _CLIENTS[(uri, token)] = client
        return client


def _describe(client: MilvusClient, uri: str, name: str) -> dict[str, Any] | None:
    with _engine(uri, f"reading collection {name!r}"):
        if not client.has_collection(name, timeout=TIMEOUT_S):
            return None
        return dict(client.describe_collection(name, timeout=TIMEOUT_S))


def _vector_dim(info: dict[str, Any]) -> int | None:
    for f in info.get("fields", []):
        if f.get("name") == "vector":
            return int(f.get("params", {}).get("dim", 0))
    return None


def _check_owner(info: dict[str, Any], place: IndexPlace, dim: int, uri: str, alias: str) -> None:
    """Refuse a collection facedb did not make, another database's, or one of another model or dimension."""
    props = info.get("properties") or {}
    physical = info.get("collection_name")
    if physical == alias:
        raise IndexUnavailableError(
            f"Milvus at {uri}: {alias!r} is a collection of its own, not the alias facedb keeps; facedb will not "
            "touch it: choose another --milvus-collection")
    if props.get(_P + "format") != FORMAT:
        raise IndexUnavailableError(f"Milvus at {uri}: collection {alias!r} was not made by facedb; choose another "
                                    "--milvus-collection")
    db_id = place.options.get("database_id")
    if db_id and props.get(_P + "database") != db_id:
        raise IndexUnavailableError(
            f"Milvus at {uri}: collection {alias!r} belongs to another facedb database; give each database its own "
            "--milvus-collection")
    model = place.options.get("model_id")
    theirs = props.get(_P + "model_id")
    their_dim = _vector_dim(info)
    if (model and theirs != model) or their_dim != dim or props.get(_P + "dim") != str(dim):
        raise ModelMismatchError(
            f"Milvus at {uri}: collection {alias!r} holds {their_dim}-d {theirs!r} templates; this database is "
            f"{dim}-d {model!r}")


#: How many times further a close call's second search reads, which only close calls pay: IVF_FLAT's nprobe as
#: the FAISS IVF kinds' wider search (faiss_kinds.WIDE_NPROBE); HNSW's ef 4x (and at least the 512 templates
#: the engine asks for: engine.WIDE_SHORTLIST): at 100k x 128-d the one stranger of 1,500 that ef 128 decided
#: unlike exact search was decided alike at 256 (docs/milvus.md), so 4x leaves room.
WIDE_NPROBE = 16
WIDE_EF = 4


#: A Milvus server builds one index per sealed segment, never one over the collection, and searches the segments'
#: indexes one by one. A segment holds at most ``dataCoord.segment.maxSize`` (512 MB by default; sealed at
#: ``sealProportion`` of it, ~262k rows of 128-d on a 2.3.5 server here, and merged up to it by compaction), so
#: an IVF's lists are sized for a full segment's rows, not the collection's: 4 sqrt(10M) = 16,384 lists had each
#: ~262k-row segment trained apart into lists of 16 rows, 7.7 min a segment on this machine (~5 h for 10M x
#: 128-d), where Milvus's own guidance sizes nlist by a segment's rows. A freshly sealed segment (about a quarter
#: of a full one) gets fewer rows a list (~64 at 128-d, ~30 at 512-d) until compaction merges it into a full one,
#: which is indexed again (measured at 10M x 128-d: bench-results/scale-10000000-128-milvus-server.json).
SEGMENT_BYTES = 512 * 2**20


def segment_rows(dim: int) -> int:
    """The rows of ``dim``-d templates a full segment holds (:data:`SEGMENT_BYTES`; a row is the float32
    vector and two int64 fields): 1,016,800 at 128-d, 260,111 at 512-d."""
    return SEGMENT_BYTES // (4 * dim + 16)


def _nlist(n: int) -> int:
    """About 4 sqrt(n) lists, a power of two, at most 65,536 (as the FAISS ivf kind)."""
    return int(min(65536, 2 ** round(math.log2(max(1.0, 4 * math.sqrt(max(n, 1)))))))


def index_params(n: int, given: dict[str, Any], dim: int) -> dict[str, Any]:
    """The index a collection of ``n`` ``dim``-d templates gets, with the user's settings (``facedb reindex``
    options: M, ef_construction, ef_search, nlist, nprobe; or ``index_type`` HNSW / IVF_FLAT / FLAT) over the
    defaults. IVF_FLAT's lists: about 4 sqrt of the rows of one segment (:func:`segment_rows`) where the
    collection fills more than one: 4,096 at 128-d, 2,048 at 512-d, from 2M templates up."""
    given = {k: v for k, v in given.items() if v is not None}
    kind = str(given.get("index_type") or ("HNSW" if n < HNSW_UP_TO else "IVF_FLAT")).upper()
    if kind == "HNSW":
        return {"M": 32, "ef_construction": 200, "ef_search": 128, **given, "index_type": kind}
    if kind == "IVF_FLAT":
        nlist = int(given.get("nlist") or _nlist(min(n, segment_rows(dim))))
        return {"nlist": nlist, "nprobe": max(16, nlist // 256), **given, "index_type": kind}
    if kind == "FLAT":
        return {**given, "index_type": kind}
    raise InvalidInputError(f"Milvus index type {kind!r}: HNSW, IVF_FLAT or FLAT")


# ----------------------------------------------------------------------------------------------- the index
class MilvusIndex:
    """A handle on facedb's collection in Milvus (see the module docstring). ``exact`` and ``keeps_vectors``
    are False: Milvus proposes candidates, the engine re-scores them from the store."""

    kind = KIND
    exact = False
    keeps_vectors = False
    scores_exact = True  # HNSW / IVF_FLAT / FLAT over the float32 vectors: a close call's shortlist needs no store read
    tombstones = 0  # deletes are real: nothing removed is held

    def __init__(self, client: MilvusClient, uri: str, alias: str, physical: str, dim: int, params: dict[str, Any],
                 *, readonly: bool, published: bool, reflects: int | None = None) -> None:
        self._client = client
        self.uri = uri
        self.alias = alias
        self.physical = physical
        self.name = alias if published else physical  # the alias once published: follows other processes' rebuilds
        self.dim = dim
        self.params = params
        self.readonly = readonly
        self.fresh = not published  # a new collection no one else writes to yet: plain inserts
        #: the store generation the collection recorded when this handle opened it (None: unknown)
        self.reflects = reflects
        self._count = 0
        self._overlay_ids = np.zeros(0, dtype=np.int64)  # read-only: templates the collection lacks
        self._overlay = np.zeros((0, dim), dtype=np.float32)
        self._hidden = np.zeros(0, dtype=np.int64)  # read-only: held by the collection, gone from the store
        self.compaction_job: int | None = None  # the last compaction asked for after a removal (server job id)

    def _call(self, what: str, fn: Any, *args: Any, timeout: float = TIMEOUT_S, **kwargs: Any) -> Any:
        with _engine(self.uri, what):
            return fn(*args, timeout=timeout, **kwargs)

    # ---------------------------------------------------------------------------------------------- counts
    def refresh(self, consistency: str = SEARCH_CONSISTENCY) -> None:
        """Re-read how many entries the collection holds (kept locally: ``len`` is asked on every query); after
        this process's own writes, Session consistency sees them."""
        rows = self._call("counting", self._client.query, self.name, filter="", output_fields=["count(*)"],
                          consistency_level=consistency)
        self._count = int(rows[0]["count(*)"]) if rows else 0

    def __len__(self) -> int:
        return self._count + len(self._overlay_ids) - len(self._hidden)

    def _present(self, ids: np.ndarray) -> np.ndarray:
        """Which of ``ids`` the collection holds now."""
        found: list[int] = []
        for s in range(0, len(ids), WRITE_ROWS):  # keeps each filter expression short (~40 KB)
            chunk = [int(i) for i in ids[s:s + WRITE_ROWS]]
            rows = self._call("reading ids", self._client.query, self.name, filter=f"id in {chunk}",
                              output_fields=["id"], consistency_level=CONSISTENCY)
            found += [int(r["id"]) for r in rows]
        return np.array(sorted(found), dtype=np.int64)

    # ---------------------------------------------------------------------------------------------- writes
    def add(self, ids: np.ndarray, vectors: np.ndarray, person_ids: np.ndarray | None = None) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.readonly:  # never write: keep what the collection lacks to search it here, exactly
            self._hidden = self._hidden[~np.isin(self._hidden, ids)]
            keep = ~np.isin(ids, self._present(ids)) & ~np.isin(ids, self._overlay_ids)
            self._overlay_ids = np.concatenate([self._overlay_ids, ids[keep]])
            self._overlay = np.concatenate([self._overlay, x[keep]])
            return
        pids = np.full(len(ids), -1, dtype=np.int64) if person_ids is None else np.asarray(person_ids, np.int64)
        write = self._client.insert if self.fresh else self._client.upsert  # upsert: idempotent by primary key
        for s in range(0, len(ids), WRITE_ROWS):
            rows = [{"id": int(i), "person_id": int(p), "vector": v}
                    for i, p, v in zip(ids[s:s + WRITE_ROWS], pids[s:s + WRITE_ROWS], x[s:s + WRITE_ROWS])]
            self._call("writing templates", write, self.name, rows)
        self.refresh()

    def remove(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return
        if self.readonly:
            keep = ~np.isin(self._overlay_ids, ids)
            self._overlay_ids, self._overlay = self._overlay_ids[keep], self._overlay[keep]
            self._hidden = np.union1d(self._hidden, self._present(ids))
            return
        for s in range(0, len(ids), MAX_TOPK):
            self._call("deleting templates", self._client.delete, self.name,
                       ids=[int(i) for i in ids[s:s + MAX_TOPK]])
        self.refresh()

    def erase(self) -> None:
        """Ask the server to drop deleted rows from its storage as soon as it can: a Milvus delete is only a
        marker (a delta log entry) until compaction rewrites the segments that hold the rows. The flush seals
        the deletes into the segments' delta logs (without it they wait in the growing segment and the message
        queue); the compaction request then rewrites the segments without the deleted rows. The compaction runs
        on the server, in the background (its job id is kept in ``compaction_job``); the files it replaces are
        removed by the server's garbage collection later (see docs/milvus.md, Erasure). Called once per
        removal, by the process that made it (``FaceDB``'s erasure step) and by ``check`` after deleting strays:
        not by ``remove``, which other processes' catch-ups repeat before a query (a removal with its flush took
        ~1 s on a 2.3 server, and a door must not pay it); a manual compaction covers every segment of the
        collection, so it also clears rows deleted by such catch-ups. IndexUnavailableError when the server
        cannot be reached."""
        self._call("flushing the removal", self._client.flush, self.name)
        self.compaction_job = int(self._call("asking for compaction", self._client.compact, self.name))

    def still_held(self, ids: np.ndarray) -> np.ndarray:
        """Which of ``ids`` (template ids, int64) the collection still returns to a query by primary key, at
        Strong consistency: for ``check``, asked about templates the store removed (any found is an erasure that
        did not reach the server). Sorted int64 array."""
        return self._present(np.asarray(ids, dtype=np.int64))

    # -------------------------------------------------------------------------------------------- searches
    def _search_params(self, limit: int, wide: bool = False) -> dict[str, Any]:
        """The server's search parameters; ``wide`` (a close call's second search) reads further: HNSW's ef
        :data:`WIDE_EF` times, IVF_FLAT's nprobe :data:`WIDE_NPROBE` times (at most every list)."""
        p = self.params
        if p.get("index_type") == "HNSW":  # Milvus wants ef >= the number of results asked for
            ef = (WIDE_EF if wide else 1) * int(p.get("ef_search", 128))
            return {"metric_type": "COSINE", "params": {"ef": max(ef, limit)}}
        if p.get("index_type") == "IVF_FLAT":
            nprobe = (WIDE_NPROBE if wide else 1) * int(p.get("nprobe", 16))
            return {"metric_type": "COSINE", "params": {"nprobe": min(nprobe, int(p.get("nlist", nprobe)))}}
        return {"metric_type": "COSINE", "params": {}}

    def search_wide(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` reading further (:meth:`_search_params` ``wide``), for the engine's close calls
        (``engine.CLOSE_CALL``): a probe whose best exact score sits near the threshold, whose deciding
        template HNSW at its own ef may not propose (at 100k x 128-d on a 2.3.5 server, one stranger of 1,500
        got another decision than exact search's at ef 128 without it, none with it; docs/milvus.md)."""
        return self.search(queries, k, wide=True)

    def search(self, queries: np.ndarray, k: int, wide: bool = False) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self), MAX_TOPK)
        sims = np.full((len(q), max(k, 0)), _FLOAT_MIN, dtype=np.float32)
        ids = np.full((len(q), max(k, 0)), -1, dtype=np.int64)
        if k <= 0 or not len(q):
            return sims, ids
        limit = min(MAX_TOPK, k + len(self._hidden))  # room for entries this read-only handle hides
        hits = []
        if self._count:
            hits = self._call("searching", self._client.search, self.name, data=list(q), limit=limit,
                              timeout=search_timeout() * math.ceil(len(q) / 64),  # per 64 probes
                              search_params=self._search_params(limit, wide), output_fields=["person_id"],
                              consistency_level=SEARCH_CONSISTENCY)
        extra = q @ self._overlay.T if len(self._overlay_ids) else None
        for row in range(len(q)):
            got = [(int(h["id"]), float(h["distance"])) for h in (hits[row] if len(hits) else [])]
            if len(self._hidden):
                got = [(i, s) for i, s in got if not _sorted_has(self._hidden, i)]
            if extra is not None:  # merge the overlay's exact scores (an id in both: the better score)
                best = dict(got)
                for i, s in zip(self._overlay_ids.tolist(), extra[row].tolist()):
                    best[i] = max(s, best.get(i, -2.0))
                got = sorted(best.items(), key=lambda p: -p[1])
            got = got[:k]
            if got:
                ids[row, :len(got)] = [i for i, _ in got]
                sims[row, :len(got)] = [s for _, s in got]
        return sims, ids

    def range_search(self, queries: np.ndarray, min_similarity: float) -> list[tuple[np.ndarray, np.ndarray]]:
        """A k-NN search widened (64, 256, ... up to Milvus's 16,384 results) until it passes below the
        threshold: portable across Milvus versions and Milvus Lite; misses what the index misses."""
        out = []
        for row in np.ascontiguousarray(queries, dtype=np.float32):
            k = 64
            while True:
                sims, ids = self.search(row[None, :], k)
                if sims.shape[1] < k or not sims.shape[1] or sims[0, -1] < min_similarity or k >= MAX_TOPK:
                    keep = (sims[0] >= min_similarity) & (ids[0] >= 0)
                    out.append((ids[0][keep], sims[0][keep]))
                    break
                k = min(k * 4, MAX_TOPK)
        return out

    def ids(self) -> np.ndarray:
        """Every template id the collection holds (less those hidden, plus the overlay), by a paged query."""
        found: list[np.ndarray] = []
        with _engine(self.uri, "listing ids"):
            it = self._client.query_iterator(self.name, batch_size=MAX_TOPK, filter="", output_fields=["id"],
                                             consistency_level=CONSISTENCY, timeout=TIMEOUT_S)
            try:
                while batch := it.next():
                    found.append(np.fromiter((r["id"] for r in batch), dtype=np.int64, count=len(batch)))
            finally:
                it.close()
        held = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
        if len(self._hidden):
            held = held[~np.isin(held, self._hidden)]
        return np.concatenate([held, self._overlay_ids])

    def exact_vectors(self, ids: np.ndarray) -> np.ndarray | None:
        return None  # re-scoring reads the store, the truth, which is local; Milvus is a network hop away


def _ensure_loaded(client: MilvusClient, uri: str, physical: str) -> None:
    """Make sure the server serves the collection, waiting FACEDB_MILVUS_LOAD_WAIT_S seconds at most: a released
    one (a restarted server reports its collections released, then reloads them by itself) is asked to load,
    without blocking on it; one still loading after the wait is an IndexLoadingError naming the progress, and the
    next query checks again. Milvus Lite loads in process, as long as that takes."""
    wait = number(LOAD_WAIT_ENV, LOAD_WAIT_S)
    deadline = time.monotonic() + wait
    asked = False
    with _engine(uri, f"loading collection {physical!r}"):
        while True:
            got = client.get_load_state(physical, timeout=TIMEOUT_S)
            state = str(got.get("state", ""))
            if state.endswith("Loaded"):
                return
            if not state.endswith("Loading") and not asked:  # NotLoad: released
                asked = True
                if uri.endswith(".db"):
                    client.load_collection(physical, timeout=SLOW_TIMEOUT_S)
                    continue
                # On a thread of its own: a restarted server's proxy holds even an asynchronous load request
                # until its query coordinator is back (~30 s measured), and the wait below is the caller's bound.
                threading.Thread(target=_load_quietly, args=(client, physical), daemon=True,
                                 name=f"milvus-load-{physical}").start()
            if time.monotonic() >= deadline:
                progress = f"{got['progress']}% " if "progress" in got else ""
                raise IndexLoadingError(
                    f"Milvus at {uri}: collection {physical!r} is still loading on the server ({progress}after "
                    f"{wait:g} s; a server restarted moments ago serves it once its previous query node's session "
                    "expires, ~30 s): retry shortly")
            time.sleep(0.2)


def search_timeout() -> float:
    """The seconds one search may take (FACEDB_MILVUS_SEARCH_TIMEOUT_S, default SEARCH_TIMEOUT_S)."""
    return number(SEARCH_TIMEOUT_ENV, SEARCH_TIMEOUT_S, positive=True)


def _wait_served_from_index(client: MilvusClient, uri: str, physical: str, rows: int) -> bool:
    """Wait (FACEDB_MILVUS_INDEX_WAIT_S seconds at most) until the server serves all ``rows`` of a collection a
    rebuild just sealed from segments that carry its vector index (or are too small for one: UNINDEXED_ROWS);
    False (and a warning) when the wait ran out.

    Why: a 2.3 server goes on answering from the rows as it received them until the sealed segments' index is
    built and handed to the query node, and those answers ignore ``ef`` and miss near neighbours (measured at
    100k x 128-d: recall@50 ~0.7 for ~30 s after the flush, 2 of 1,500 decisions unlike exact search's that
    no ef fixed; then HNSW, where ef works; docs/milvus.md). A rebuild's alias is swung only after this, so no
    door answers from an index that is not there yet. Milvus Lite indexes what it seals at once: not asked."""
    if uri.endswith(".db") or rows < UNINDEXED_ROWS:  # no segment of it can get an index: searched whole
        return True
    wait = number(INDEX_WAIT_ENV, INDEX_WAIT_S)
    deadline = time.monotonic() + wait
    while True:
        with _engine(uri, f"reading the segments of {physical!r}"):
            segments = client.list_loaded_segments(physical, timeout=TIMEOUT_S)
        served = sum(int(s.num_rows) for s in segments)
        indexed = sum(int(s.num_rows) for s in segments if s.index_name or s.num_rows < UNINDEXED_ROWS)
        if served >= rows and indexed == served:
            return True
        if time.monotonic() >= deadline:
            logging.getLogger(__name__).warning(
                "Milvus at %s: %d of %d rows of %r are served from its index after %g s; the rest are searched "
                "without it (approximately, ef ignored) until the server has indexed them", uri, indexed, rows,
                physical, wait)
            return False
        time.sleep(0.5)


def _load_quietly(client: MilvusClient, physical: str) -> None:
    """Ask the server to load a collection; a failure here is seen (and reported) by the next load-state check."""
    try:
        client.load_collection(physical, timeout=SLOW_TIMEOUT_S)
    except Exception:  # the caller's next get_load_state says what is wrong
        logging.getLogger(__name__).debug("loading %s failed", physical, exc_info=True)


def _orphans(client: MilvusClient, uri: str, alias: str, physical: str) -> list[str]:
    """The collections named ``<alias>__<8 hex>`` of the same facedb database as ``physical`` (its property
    ``facedb.database``), other than ``physical``: collections of another database or not facedb's are never
    listed."""
    mine = ((_describe(client, uri, physical) or {}).get("properties") or {}).get(_P + "database")
    if not mine:
        return []
    with _engine(uri, "listing collections"):
        names = client.list_collections(timeout=TIMEOUT_S)
    pattern = re.compile(re.escape(alias) + r"__[0-9a-f]{8}")
    return sorted(name for name in names if name != physical and pattern.fullmatch(name)
                  and ((_describe(client, uri, name) or {}).get("properties") or {}).get(_P + "database") == mine)


def _sorted_has(sorted_ids: np.ndarray, i: int) -> bool:
    pos = int(np.searchsorted(sorted_ids, i))
    return pos < len(sorted_ids) and int(sorted_ids[pos]) == i


# --------------------------------------------------------------------------------------------- the backend
class MilvusBackend:
    """The ``milvus`` kind: an alias and its physical collection in a Milvus server, cluster or Milvus Lite."""

    name = "milvus"
    kinds = (KIND,)
    write_through = True

    def new(self, kind: str, dim: int, params: dict[str, Any], train: np.ndarray | None,
            place: IndexPlace, total: int | None = None) -> VectorIndex:
        uri, token, alias = _target(place)
        if place.readonly:
            raise IndexUnavailableError(
                f"Milvus at {uri}: collection {alias!r} is missing or unusable, and a read-only open never writes "
                "to it: open the database writable once (e.g. `facedb rebuild-index`) to build it")
        client = _client(uri, token)
        info = _describe(client, uri, alias)
        if info is not None:  # what the alias points to now must be this database's before it is replaced
            _check_owner(info, place, dim, uri, alias)
        chosen = index_params(total if total is not None else 0 if train is None else len(train), params, dim)
        physical = f"{alias}__{secrets.token_hex(4)}"
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("person_id", DataType.INT64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        build = client.prepare_index_params()
        engine_params = ({"M": int(chosen["M"]), "efConstruction": int(chosen["ef_construction"])}
                         if chosen["index_type"] == "HNSW" else
                         {"nlist": int(chosen["nlist"])} if chosen["index_type"] == "IVF_FLAT" else {})
        build.add_index(field_name="vector", index_type=chosen["index_type"], metric_type="COSINE",
                        params=engine_params)
        props = {_P + "format": FORMAT, _P + "database": str(place.options.get("database_id") or ""),
                 _P + "model_id": str(place.options.get("model_id") or ""), _P + "dim": str(dim),
                 _P + "params": json.dumps(chosen, sort_keys=True), _P + "generation": "-1"}
        with _engine(uri, f"creating collection {physical!r}"):
            client.create_collection(physical, schema=schema, index_params=build, consistency_level=CONSISTENCY,
                                     properties=props, timeout=SLOW_TIMEOUT_S)
        return MilvusIndex(client, uri, alias, physical, dim, chosen, readonly=False, published=False)

    def load(self, place: IndexPlace, stamp: dict[str, Any], dim: int) -> VectorIndex | None:
        """The collection the alias points to, if it is this database's (None when there is none: the keeper
        builds one); IndexUnavailableError / ModelMismatchError when it belongs to something else."""
        uri, token, alias = _target(place)
        client = _client(uri, token)
        info = _describe(client, uri, alias)
        if info is None:
            return None
        _check_owner(info, place, dim, uri, alias)
        props = info.get("properties") or {}
        physical = str(info["collection_name"])
        _ensure_loaded(client, uri, physical)
        generation = int(props.get(_P + "generation", "-1"))
        index = MilvusIndex(client, uri, alias, physical, dim, json.loads(props.get(_P + "params", "{}")),
                            readonly=place.readonly, published=True,
                            reflects=generation if generation >= 0 else None)
        index.refresh(CONSISTENCY)
        return index

    def publish(self, index: VectorIndex, place: IndexPlace, generation: int) -> None:
        """Record that the collection reflects store ``generation``, and point the alias at it (dropping the
        collection it pointed to before, after a rebuild)."""
        assert isinstance(index, MilvusIndex)
        with _engine(index.uri, "recording the generation"):
            index._client.alter_collection_properties(index.physical, properties={_P + "generation": str(generation)},
                                                      timeout=TIMEOUT_S)
        self._point_alias(index)

    def _point_alias(self, index: MilvusIndex) -> None:
        if index.name == index.alias:
            return
        client, uri = index._client, index.uri
        with _engine(uri, f"flushing collection {index.physical!r}"):
            # Seal what the build wrote, so that it is indexed before anyone searches it (Milvus Lite searched
            # its unsealed rows at ~1 s a query at 10k x 512 here, its sealed HNSW segments at ~10 ms). Once per
            # rebuild; ordinary writes are never flushed (Milvus advises against frequent flushes).
            client.flush(index.physical, timeout=SLOW_TIMEOUT_S)
        _wait_served_from_index(client, uri, index.physical, index._count)
        info = _describe(client, uri, index.alias)
        old = None if info is None else str(info["collection_name"])
        with _engine(uri, f"pointing alias {index.alias!r} at {index.physical!r}"):
            if old is None:
                client.create_alias(index.physical, index.alias, timeout=TIMEOUT_S)
            else:
                client.alter_alias(index.physical, index.alias, timeout=TIMEOUT_S)
        index.name, index.fresh = index.alias, False
        if old is not None and old != index.physical:
            self._drop(client, uri, old)
            self._drop_orphans(index)

    def _drop_orphans(self, index: MilvusIndex) -> None:
        """Drop this database's collections the alias does not point to (``<alias>__<8 hex>``): what a rebuild
        killed before it swung the alias left behind (found by scripts/milvus_drill.py). They hold copies of
        templates, which must not outlive an erasure. Called after a rebuild is published (one writer host at a
        time, and a rebuild holds the database's index lock, so none of them is another rebuild in progress)."""
        for name in _orphans(index._client, index.uri, index.alias, index.physical):
            self._drop(index._client, index.uri, name)

    def leftovers(self, place: IndexPlace) -> list[str]:
        """This database's collections on the server that its alias does not point to (a killed rebuild's, or
        one under way in another process), for ``check``; [] when the alias points to none."""
        uri, token, alias = _target(place)
        client = _client(uri, token)
        info = _describe(client, uri, alias)
        if info is None or info.get("collection_name") == alias:
            return []
        return _orphans(client, uri, alias, str(info["collection_name"]))

    @staticmethod
    def _drop(client: MilvusClient, uri: str, physical: str) -> None:
        with _engine(uri, f"dropping collection {physical!r}"):
            if client.has_collection(physical, timeout=TIMEOUT_S):
                client.drop_collection(physical, timeout=TIMEOUT_S)

    def save(self, index: VectorIndex, place: IndexPlace) -> dict[str, Any]:
        """Nothing to write (every add and remove is already in Milvus): point the alias at the collection and
        return where it is, for the store's stamp."""
        assert isinstance(index, MilvusIndex)
        self._point_alias(index)
        return {"milvus_uri": index.uri, "milvus_collection": index.alias, "milvus_physical": index.physical}

    def verify(self, place: IndexPlace, stamp: dict[str, Any], dim: int) -> bool:
        """The alias exists and points to a collection of this database, model and dimension."""
        uri, token, alias = _target(place)
        info = _describe(_client(uri, token), uri, alias)
        if info is None:
            return False
        _check_owner(info, place, dim, uri, alias)
        return True

    def persisted_bytes(self, place: IndexPlace) -> int:
        return 0  # it lives in Milvus, not in a file of the database

    def discard(self, place: IndexPlace) -> None:
        """Drop this database's collection (and the alias), e.g. after ``reindex --index ivf``, so no template
        stays in Milvus; a collection that is not this database's is left alone."""
        uri, token, alias = _target(place)
        client = _client(uri, token)
        info = _describe(client, uri, alias)
        if info is None:
            return
        if info.get("collection_name") == alias or (info.get("properties") or {}).get(_P + "database") != str(
                place.options.get("database_id") or ""):
            return
        with _engine(uri, f"dropping alias {alias!r}"):
            client.drop_alias(alias, timeout=TIMEOUT_S)
        self._drop(client, uri, str(info["collection_name"]))
