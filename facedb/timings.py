"""Stage timings for whoever wants them: the face pipeline and the query engine wrap their stages (``detect``,
``embed``, ``search``, ``decide``) in :func:`stage`, and an observer added with :func:`observe` is told each
stage's duration. The service's metrics (``facedb/service/metrics.py``) are the observer; the core imports no
metrics library.

With no observer (the CLI, the Python API, a benchmark) :func:`stage` times nothing (about a microsecond: the
context manager and one tuple check), so it can sit on the query path. Observers are per process and called on
the thread that ran the stage: keep them short and thread-safe (a histogram's ``observe``), and never raise
from one (a failing observer would fail the query).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

#: ``observer(stage, seconds)``
Observer = Callable[[str, float], None]

STAGES = ("detect", "embed", "search", "decide")

# A tuple, replaced whole under the lock: readers on the hot path take no lock and see the old or the new one.
_observers: tuple[Observer, ...] = ()
_lock = threading.Lock()


def observe(observer: Observer) -> Callable[[], None]:
    """Tell ``observer`` every stage's duration from now on; returns the function that stops it."""
    global _observers
    with _lock:
        _observers = (*_observers, observer)

    def stop() -> None:
        global _observers
        with _lock:
            _observers = tuple(o for o in _observers if o is not observer)

    return stop


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the block as stage ``name`` for the observers (a block that raises is timed too: a slow failure is
    still latency the caller waited for)."""
    if not _observers:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        took = time.perf_counter() - start
        for observer in _observers:
            observer(name, took)
