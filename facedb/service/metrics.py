"""Prometheus metrics for ``GET /metrics``: the only module that imports ``prometheus_client``.

What is counted, and where it comes from:

* ``facedb_decisions_total{outcome}``: match / unknown (identify, one per face) and accept / reject (verify),
  counted where the service raises the door event (:meth:`ServiceState.publish`), so metrics, webhooks and
  the answer agree.
* ``facedb_stage_seconds{stage}``: detect / embed / search / decide of each query, from the core's stage
  timer (``facedb/timings.py``: the core imports no metrics library, it calls an observer).
* ``facedb_http_request_duration_seconds{method,route,status}``: every request, by route *template*.
* ``facedb_enrolments_total``, ``facedb_templates_enrolled_total``, ``facedb_people_removed_total``.
* ``facedb_auth_failures_total{reason}``: missing, invalid, revoked (401), scope (403) and throttled (429).
* ``facedb_webhook_queue_depth`` and ``facedb_webhook_deliveries_total{result}`` (delivered, retried,
  failed: gave up, dropped: the queue was full), from the dispatcher's own counters.
* ``facedb_store_generation``, ``facedb_index_generation_lag`` (the store's generation minus the one the
  worker's in-memory index reflects), ``facedb_model_info{model,index_kind}`` (1), ``facedb_workers_ready``.

Several workers (``facedb serve --workers N``) are several processes: ``facedb serve`` then gives them a
private ``PROMETHEUS_MULTIPROC_DIR`` (server.py) and a scrape, answered by any one worker, adds up every
worker's counters and histograms from there (prometheus_client's multiprocess mode). Gauges that a scrape
computes (queue depth, lag, readiness) are refreshed by each worker every ``REFRESH_S`` seconds and by the
answering worker at the scrape; they are summed (queue depth, ready workers) or maxed (lag, generation)
over the live workers. One worker (the default) keeps its metrics in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client import values as prom_values

from .. import timings

if TYPE_CHECKING:
    from .state import ServiceState

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST

#: How often each worker refreshes the gauges a scrape reads, with several workers (seconds).
REFRESH_S = 5.0

#: Stage buckets, from a search of a small gallery (well under a ms) to MTCNN on a large photo (seconds).
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: door event -> decision outcome
OUTCOMES = {"identify.match": "match", "identify.unknown": "unknown", "verify.accept": "accept",
            "verify.reject": "reject"}
AUTH_REASONS = ("missing", "invalid", "revoked", "scope", "throttled")
HOOK_RESULTS = ("delivered", "retried", "failed", "dropped")


def multiprocess_mode() -> bool:
    """Whether this process's metric values live in ``PROMETHEUS_MULTIPROC_DIR`` (decided by prometheus_client
    when it was first imported, from that variable)."""
    return prom_values.ValueClass is not prom_values.MutexValue


class Metrics:
    """One worker's metrics. :meth:`start` / :meth:`stop` follow the worker's life (the app's lifespan)."""

    def __init__(self) -> None:
        self.multiprocess = multiprocess_mode()
        r = self.registry = CollectorRegistry()
        self.decisions = Counter("facedb_decisions", "Decisions by outcome: match, unknown (identify, per face); "
                                 "accept, reject (verify).", ["outcome"], registry=r)
        self.stage = Histogram("facedb_stage_seconds", "Time in each stage of a query: detect, embed (a photo's "
                               "faces), search (index and exact re-scoring), decide.", ["stage"],
                               buckets=STAGE_BUCKETS, registry=r)
        self.requests = Histogram("facedb_http_request_duration_seconds", "Requests by method, route template "
                                  "and status.", ["method", "route", "status"], buckets=REQUEST_BUCKETS, registry=r)
        self.enrolments = Counter("facedb_enrolments", "Enrolments that stored templates (photos, vectors or an "
                                  "unknown visitors' group).", registry=r)
        self.templates = Counter("facedb_templates_enrolled", "Templates stored by enrolments.", registry=r)
        self.removals = Counter("facedb_people_removed", "People erased.", registry=r)
        self.auth_failures = Counter("facedb_auth_failures", "Refused credentials: missing, invalid, revoked "
                                     "(401); scope (a valid key too narrow for the route, 403); throttled "
                                     "(429: too many failures from the address or for the key id).", ["reason"],
                                     registry=r)
        self.hook_queue = Gauge("facedb_webhook_queue_depth", "Webhook events and deliveries waiting (queued, "
                                "being sent, retries scheduled).", registry=r, multiprocess_mode="livesum")
        self.hook_deliveries = Counter("facedb_webhook_deliveries", "Webhook deliveries by result: delivered, "
                                       "retried (an attempt failed, another is scheduled), failed (gave up), "
                                       "dropped (the queue was full).", ["result"], registry=r)
        self.generation = Gauge("facedb_store_generation", "The store's generation (bumped by each change to "
                                "the templates).", registry=r, multiprocess_mode="livemax")
        self.lag = Gauge("facedb_index_generation_lag", "Store generation minus the in-memory index's (the "
                         "largest over the workers; an index catches up before its next query).", registry=r,
                         multiprocess_mode="livemax")
        self.info = Gauge("facedb_model_info", "The database's model and the index kind in memory (value 1).",
                          ["model", "index_kind"], registry=r, multiprocess_mode="livemax")
        self.ready = Gauge("facedb_workers_ready", "Workers with their model and index loaded.", registry=r,
                           multiprocess_mode="livesum")
        self.stand_in = Gauge("facedb_index_stand_in", "Workers whose queries are answered by an exact search of "
                              "the store's templates because the index engine cannot answer (a Milvus server "
                              "loading after a restart, or unreachable).", registry=r, multiprocess_mode="livesum")
        # every label value exported from the start (at 0), so a rate() has a series before its first event
        for outcome in OUTCOMES.values():
            self.decisions.labels(outcome)
        for reason in AUTH_REASONS:
            self.auth_failures.labels(reason)
        for result in HOOK_RESULTS:
            self.hook_deliveries.labels(result)
        self._stages = {name: self.stage.labels(name) for name in timings.STAGES}
        self._hooks_seen = dict.fromkeys(HOOK_RESULTS, 0)
        self._info: tuple[str, str] | None = None
        self._stop_timings: Any = None
        self._refresher: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------------------------------------- life
    @contextlib.asynccontextmanager
    async def running(self, state: ServiceState) -> AsyncIterator[None]:
        """The worker's life (inside the app's lifespan, after the state has loaded)."""
        if self._stop_timings is None:
            self._stop_timings = timings.observe(self._observe_stage)
        if self.multiprocess:
            forget_dead_workers()  # a worker killed (-9) never said so: its live gauges would count forever
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_every(state))
        self.refresh(state)
        try:
            yield
        finally:
            if self._refresher is not None:
                self._refresher.cancel()
                self._refresher = None
            if self._stop_timings is not None:
                self._stop_timings()
                self._stop_timings = None
            if self.multiprocess:
                prom_multiprocess.mark_process_dead(os.getpid())  # its gauges leave the sums; counters stay

    async def _refresh_every(self, state: ServiceState) -> None:
        # on the event loop, like authentication: the worker's read-only key connection is used by this thread
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                self.refresh(state)
            except Exception:  # a store briefly unreadable: the next round tries again; never stop the loop
                continue

    # ----------------------------------------------------------------------------------------- counting
    def _observe_stage(self, stage: str, seconds: float) -> None:
        child = self._stages.get(stage)
        if child is not None:
            child.observe(seconds)

    def event(self, name: str, data: dict[str, Any]) -> None:
        """A door event published by a route (see OUTCOMES; ``person.enrolled``; ``person.removed``)."""
        outcome = OUTCOMES.get(name)
        if outcome is not None:
            self.decisions.labels(outcome).inc()
        elif name == "person.enrolled":
            self.enrolments.inc()
            stored = data.get("faces_stored")
            if isinstance(stored, int) and stored > 0:
                self.templates.inc(stored)
        elif name == "person.removed":
            self.removals.inc()

    def auth_failure(self, reason: str) -> None:
        self.auth_failures.labels(reason if reason in AUTH_REASONS else "invalid").inc()

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).observe(seconds)

    # --------------------------------------------------------------------------------------------- scrape
    def refresh(self, state: ServiceState) -> None:
        """The gauges and the webhook counters, from the worker's state now. Call on the event loop's thread
        (it reads the store's generation through the worker's key connection, as authentication does)."""
        self.ready.set(1 if state.ready else 0)
        dispatcher = state.dispatcher
        if dispatcher is not None:
            self.hook_queue.set(dispatcher.backlog())
            stats = dispatcher.stats
            for result, now in (("delivered", stats.delivered), ("retried", stats.retried),
                                ("failed", stats.failed), ("dropped", stats.dropped)):
                if now > self._hooks_seen[result]:  # the dispatcher counts; a counter here only goes up
                    self.hook_deliveries.labels(result).inc(now - self._hooks_seen[result])
                    self._hooks_seen[result] = now
        db, keys = state.db, state.key_store
        if db is None or keys is None:
            return
        stored = keys.generation()
        self.generation.set(stored)
        self.stand_in.set(0 if db.keeper.stand_in is None else 1)  # a snapshot, no lock: as loaded_index()
        loaded = db.loaded_index()
        if loaded is None:
            return
        generation, kind = loaded
        self.lag.set(max(0, stored - generation))
        info = (state.model_id or db.model_id, kind)
        if info != self._info:
            if self._info is not None:  # the index was rebuilt as another kind: the old series says 0
                self.info.labels(*self._info).set(0)
            self.info.labels(*info).set(1)
            self._info = info

    def scrape(self, state: ServiceState) -> bytes:
        """The text exposition format: this worker's metrics, or with several workers all of theirs."""
        self.refresh(state)
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        prom_multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)


_PID_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db$")


def forget_dead_workers(path: str | None = None) -> None:
    """Drop the live gauges of workers that are gone (killed without a clean stop); uvicorn starts a new one
    in their place, which calls this."""
    where = path or os.environ.get(MULTIPROC_ENV)
    if not where:
        return
    for name in glob.glob(os.path.join(where, "gauge_live*.db")):
        found = _PID_FILE.search(os.path.basename(name))
        if found is None:
            continue
        pid = int(found.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            prom_multiprocess.mark_process_dead(pid, where)
        except PermissionError:  # alive, another user's
            continue
