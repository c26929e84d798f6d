"""While a remote index engine cannot answer, queries are answered by an exact search of the store's templates.

A Milvus 2.3 server restarted moments ago answers ``/healthz`` but serves facedb's collection only ~30 s later
(its query coordinator waits for the previous query node's session to expire), and a server that is down does
not answer at all; a door cannot wait that long, and must never answer from a stale or partial engine. The store
is the truth and holds every template's vector, so an exact search over them gives the answers exact search
gives (the engine only ever proposes candidates; decisions are exact either way). Two pieces:

* :class:`EngineOpening`: one attempt at opening the engine's index (connect, find the collection, wait for the
  server to load it, count it) on a thread of its own, so that the caller waits a bounded time whatever call the
  server holds. (Measured on a 2.3.5 server: after a restart it reported the collection "Loaded" at once, and
  then held the first count query ~30 s.) An attempt still running when the wait ends carries on; the next
  call takes its result.
* :class:`StandIn`: an exact in-memory gallery (FAISS flat, keyed by template id) of every stored template,
  built from the store when the engine first cannot answer, caught up with the store's change log before every
  query like any gallery (so an acknowledged removal is never returned), and dropped as soon as the engine
  answers again. Only where the vectors fit the re-scoring memory budget (``FACEDB_RESCORE_MEMORY_MB``); past
  it, queries fail closed as before (IndexLoadingError / IndexUnreachableError).

The keeper (``upkeep.py``) decides when to use them; while the stand-in answers, ``FaceDB.index_state()``
says so (``stand_in``: why) and the ``facedb`` logger warns once when it starts and notes when it ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..environment import number
from ..errors import IndexLoadingError, IndexUnavailableError, IndexUnreachableError
from .index import IndexPlace, backend_for
from .indexed import Gallery
from .settings import Settings
from .store import Store
from .vectors import bytes_for

if TYPE_CHECKING:
    from .upkeep import IndexKeeper

log = logging.getLogger(__name__)

#: Seconds a query waits for the engine to open before the stand-in answers (FACEDB_STAND_IN_AFTER_S): an open of
#: a healthy server (connect, describe, load state, count) took ~10-50 ms here, so a second is a sick engine.
AFTER_ENV = "FACEDB_STAND_IN_AFTER_S"
AFTER_S = 1.0
#: Seconds into that wait when the stand-in starts being read from the store, on a thread of its own, in case it
#: is needed (100k 128-d templates took 1.8 s to read at a load of 10 here: read after the wait, the first answer
#: after a restart came at ~2.9 s); an engine that opens by then costs nothing, one that opens later the read.
PREPARE_S = 0.25
#: Seconds other calls (writes, ``check``, saves) wait for the engine to open before they fail: longer than the
#: engine's own bounded wait for a collection being loaded (milvus: FACEDB_MILVUS_LOAD_WAIT_S, 5 s), so that its
#: error, which names the progress, is the one raised.
OPEN_WAIT_S = 8.0
#: While the stand-in answers, a failed attempt at opening the engine is repeated at most this often (seconds).
RETRY_S = 1.0
#: Templates read from the store at a time when building the stand-in (64 MiB of 512-d float32).
BATCH = 32768
#: After the engine answers again, its stand-in is kept this long (seconds; a *spare*), levelled with the change
#: log like any gallery when it is taken up again: a server shutting down gracefully (30-61 s for a 2.3 server)
#: still opens the collection but no longer searches, and each query that found it failed waited
#: FACEDB_STAND_IN_AFTER_S for it and read the store again (a newcomer measured ten 1.0 s answers in one stop).
SPARE_S = 60.0


def cannot_answer(exc: BaseException) -> bool:
    """Whether ``exc`` says the engine cannot answer *yet* (still loading, not reachable): what the stand-in
    covers. Not a refused token, a foreign collection or a missing client library: those are for a person to
    fix, and stay errors."""
    return isinstance(exc, (IndexLoadingError, IndexUnreachableError))


def after_s() -> float:
    """The query's wait for the engine (FACEDB_STAND_IN_AFTER_S, default 1 s; InvalidInputError for a value
    that is not a number >= 0, checked when a database is opened)."""
    return number(AFTER_ENV, AFTER_S)


class EngineOpening:
    """One attempt at opening a remote engine's index, on a daemon thread: ``open_`` runs there (it must not
    touch the keeper or the store: only the engine), and :meth:`result` waits for it a bounded time."""

    def __init__(self, open_: Callable[[], Any], place: IndexPlace) -> None:
        self.place = place  # where it opens: an attempt for another place (after a reindex) is not taken
        self.started = time.monotonic()
        self._done = threading.Event()
        self._index: Any = None
        self._error: BaseException | None = None
        self._open = open_
        threading.Thread(target=self._run, daemon=True, name="facedb-engine-open").start()

    def _run(self) -> None:
        try:
            self._index = self._open()
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc
        finally:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    @property
    def error(self) -> BaseException | None:
        """What the finished attempt raised (None: it opened, or it is still running)."""
        return self._error if self._done.is_set() else None

    def result(self, wait_s: float) -> Any:
        """The opened index (None: the engine has no collection for it), waiting ``wait_s`` seconds at most;
        the attempt's own error; or IndexLoadingError when it is still running (it carries on)."""
        if not self._done.wait(max(0.0, wait_s)):
            raise IndexLoadingError(
                f"the index engine has not answered within {wait_s:g} s (a server restarted moments ago serves its "
                f"collections only after ~30 s; still trying for {time.monotonic() - self.started:.0f} s): "
                "retry shortly")
        if self._error is not None:
            raise self._error
        return self._index


def exact_gallery(store: Store, dim: int, place: IndexPlace, stop: threading.Event | None = None
                  ) -> Gallery | None:
    """Every stored template in an exact in-memory index (FAISS flat: it keeps the vectors themselves), mapped to
    its person, at the generation of the snapshot it was read from (through a connection of its own: any thread).
    Reads the whole store once (100k 128-d templates: 1.8 s at a load of 10 here, docs/milvus.md). None when
    ``stop`` was set before it finished."""
    index = backend_for("flat").new("flat", dim, {}, None, place)
    gen = None
    ids: list[np.ndarray] = []
    pids: list[np.ndarray] = []
    for batch in store.stream_templates(BATCH):
        if stop is not None and stop.is_set():
            return None
        gen, b_ids, b_pids, vectors = batch  # the snapshot's generation, the same in every batch
        index.add(b_ids, vectors, b_pids)
        ids.append(b_ids)
        pids.append(b_pids)
    gallery = Gallery(index, store.generation() if gen is None else gen)
    if ids:
        gallery.set_map(np.concatenate(ids), np.concatenate(pids))
    return gallery


class Reading:
    """The stand-in read from the store on a thread of its own, starting ``delay`` seconds from now unless it is
    cancelled first; :meth:`result` takes it (reading it on the caller's thread if it has not started)."""

    def __init__(self, store: Store, dim: int, place: IndexPlace, delay: float) -> None:
        self._read = lambda: exact_gallery(store, dim, place, self._stop)
        self._stop = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._claimed = False
        self._gallery: Gallery | None = None
        self._error: BaseException | None = None
        self._seconds = 0.0
        self._timer = threading.Timer(delay, self._run)
        self._timer.daemon = True
        self._timer.name = "facedb-stand-in-read"
        self._timer.start()

    def _run(self) -> None:
        with self._lock:
            if self._claimed:
                return
            self._claimed = True
        t = time.monotonic()
        try:
            self._gallery = self._read()
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc
        finally:
            self._seconds = time.monotonic() - t
            self._done.set()

    def result(self) -> tuple[Gallery, float]:
        """(the gallery, seconds its read took); the read's error if it failed."""
        self._timer.cancel()
        self._run()  # reads here if the thread has not started; else returns at once
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._gallery is not None
        return self._gallery, self._seconds

    def cancel(self) -> None:
        """Not needed: no read starts, one under way gives up at its next batch."""
        self._timer.cancel()
        self._stop.set()


class StandIn:
    """The exact gallery that answers queries while the engine cannot, and why (see the module docstring)."""

    def __init__(self, gallery: Gallery, reason: str) -> None:
        self.gallery = gallery
        self.reason = reason
        self.since = time.time()
        self.next_try = time.monotonic() + RETRY_S

    @staticmethod
    def fits(templates: int, dim: int, budget: int) -> bool:
        """Whether a stand-in of ``templates`` vectors fits the memory budget (bytes) re-scoring vectors get."""
        return bytes_for(max(templates, 1), dim) <= budget

    @classmethod
    def start(cls, gallery: Gallery, exc: IndexUnavailableError, read_s: float) -> StandIn:
        """The stand-in for ``gallery`` (read from the store in ``read_s`` seconds), warning (``facedb`` logger)
        that queries are answered from the store."""
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("the index engine cannot answer (%s): queries are answered by an exact search of the store's "
                    "%d templates (read in %.2f s) until it can", reason, len(gallery), read_s)
        return cls(gallery, reason)

    def level(self, store: Store, settings: Settings, catch_up: Callable[[Gallery], bool], place: IndexPlace
              ) -> Gallery:
        """The gallery caught up with the store's generation in ``settings`` by ``catch_up`` (the keeper's
        change-log replay), or read again when the log no longer reaches back: an acknowledged removal is gone
        before the answer."""
        if self.gallery.generation != settings.generation and not catch_up(self.gallery):
            self.gallery.close()
            self.gallery = exact_gallery(store, settings.dim, place) or self.gallery
        return self.gallery

    def close(self, engine_back: bool) -> None:
        """Let the gallery go: the engine answers again (``engine_back``: logged), or the keeper forgets both."""
        if engine_back:
            self.announce_back()
        self.gallery.close()

    def announce_back(self) -> None:
        log.warning("the index engine answers again: queries go to it (the store answered for %.1f s)",
                    time.time() - self.since)


# ------------------------------------------------------------------------------------ the keeper's query path
def answer(keeper: IndexKeeper, settings: Settings) -> Gallery:
    """For ``IndexKeeper.current`` with a write-through engine and no gallery loaded: the engine's gallery if it
    opens within the query's wait (FACEDB_STAND_IN_AFTER_S; the stand-in is read from the store meanwhile, from
    PREPARE_S on), else the stand-in. While the stand-in answers no query waits for the engine: an attempt still
    running is only looked at, a failed one repeated every ``RETRY_S``."""
    s = keeper.stand_in or _take_spare(keeper)
    if s is not None:
        stamp = settings.index_stamp
        if keeper.opening is None and time.monotonic() >= s.next_try and stamp is not None:
            keeper.start_opening(keeper.backend(str(stamp.get("kind"))), stamp, settings.dim)
        opening = keeper.opening
        if opening is None or not opening.done():
            return s.level(keeper.store, settings, keeper.catch_up, keeper.place)
        if opening.error is not None:  # it failed: no store read to find that out
            keeper.opening = None
            if not cannot_answer(opening.error):
                raise opening.error
            s.next_try = time.monotonic() + RETRY_S
            return s.level(keeper.store, settings, keeper.catch_up, keeper.place)
    # The stand-in is read from PREPARE_S on, on a thread of its own, in case the engine does not open in time
    # (one wait, so the store's id map that the engine's open reads beside it is read once).
    reading = None if s is not None else Reading(keeper.store, settings.dim, keeper.place, min(PREPARE_S, after_s()))
    try:
        gallery = keeper.engine_gallery(settings, 0.0 if s is not None else after_s())
    except IndexUnavailableError as exc:
        if not _may(keeper, exc, settings):
            raise
        if s is None:
            assert reading is not None
            got, read_s = reading.result()
            s = keeper.stand_in = StandIn.start(got, exc, read_s)
        s.next_try = time.monotonic() + RETRY_S
        return s.level(keeper.store, settings, keeper.catch_up, keeper.place)
    finally:
        if reading is not None and keeper.stand_in is None:
            reading.cancel()  # the engine opened first (or the error is not one to stand in for)
    drop(keeper)
    return gallery


def _may(keeper: IndexKeeper, exc: IndexUnavailableError, settings: Settings) -> bool:
    """Whether the stand-in may answer for this error: the engine cannot answer yet, and the vectors fit."""
    counts = keeper.store.counts()
    return cannot_answer(exc) and StandIn.fits(counts["templates"] + counts["mean_templates"], settings.dim,
                                               keeper.vector_budget)


def drop(keeper: IndexKeeper, engine_back: bool = True) -> None:
    """Let the stand-in go (``engine_back``: because the engine answers again, which is logged, and the stand-in
    is kept as the keeper's spare for :data:`SPARE_S`); a spare past its time is let go here too (every query
    the engine answers passes through)."""
    spare = keeper.stand_in_spare
    if spare is not None and (time.monotonic() >= spare[1] or (engine_back and keeper.stand_in is not None)):
        drop_spare(keeper)
    if keeper.stand_in is not None:
        if engine_back:
            keeper.stand_in.announce_back()
            keeper.stand_in_spare = (keeper.stand_in, time.monotonic() + SPARE_S)
        else:
            keeper.stand_in.close(engine_back=False)
        keeper.stand_in = None


def drop_spare(keeper: IndexKeeper) -> None:
    """Let the spare go now (the database is closing)."""
    if keeper.stand_in_spare is not None:
        keeper.stand_in_spare[0].close(engine_back=False)
        keeper.stand_in_spare = None


def _take_spare(keeper: IndexKeeper) -> StandIn | None:
    """The spare, made the stand-in again, if it is within its time: the engine failed soon after it came back,
    and the query is answered from it at once (levelled with the change log by the caller); the engine is tried
    again in the background after :data:`RETRY_S`."""
    spare, keeper.stand_in_spare = keeper.stand_in_spare, None
    if spare is None:
        return None
    s, until = spare
    if time.monotonic() >= until:
        s.close(engine_back=False)
        return None
    s.since, s.next_try = time.time(), time.monotonic() + RETRY_S
    log.warning("the index engine cannot answer again: queries are answered by an exact search of the store's "
                "templates (kept from %.0f s ago) until it can", SPARE_S - (until - time.monotonic()))
    keeper.stand_in = s
    return s
