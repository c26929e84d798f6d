"""Door events for the service: webhooks, their signatures, and a delivery queue that never blocks a decision.

A webhook is a URL, the events it wants, a secret, and either one API key (only events caused by that key's
requests) or none (every event of the database). Events:

=====================  ========================================================================
``identify.match``     a face was identified as an enrolled person (subject: that person)
``identify.unknown``   a face matched nobody (subject: none; folded per key)
``verify.accept``      a 1:1 claim was accepted (subject: the claimed person)
``verify.reject``      a 1:1 claim was rejected (subject: the claimed person)
``person.enrolled``    photos or vectors were enrolled for a person
``person.removed``     a person was erased
=====================  ========================================================================

Each delivery is an HTTP POST of a JSON body with the headers ``X-FaceDB-Event``, ``X-FaceDB-Delivery`` (the
delivery's id: the same across retries, for de-duplication), ``X-FaceDB-Timestamp`` (Unix seconds, when this
attempt was sent) and ``X-FaceDB-Signature``: ``sha256=`` + hex HMAC-SHA256 of ``"{timestamp}." + body`` under
the webhook's secret. :func:`verify_signature` checks one (receivers in Python can import just this module).

Folding: the first event for a (webhook, event, subject, key) is sent at once; the same event again within
``fold_window`` seconds is not sent but counted, and when the window closes one delivery carries the last of
them with ``count`` (how many were folded) and ``first_time`` / ``last_time``. A person standing in front of a
door for a minute makes a handful of deliveries, not hundreds.

Delivery runs on a scheduler thread and, per webhook, a lane of its own (a bounded queue and at most
``per_hook`` sender threads): :meth:`Dispatcher.publish` only puts the event on a bounded queue (dropping it,
counted, when the queue is full), and a receiver that answers slowly or never holds only its own lane, never
another webhook's (issue #25, finding 3). Removing a webhook (:meth:`Dispatcher.forget`) drops its queued
deliveries, retries and fold windows at once and waits for the attempt in flight, so nothing reaches it after
the removal is acknowledged; every attempt first asks ``live(hook)`` (the store), so a webhook removed through
another worker or the CLI is not sent to either. Failed attempts (no connection, a timeout,
HTTP 408, 429 or 5xx) are retried with exponential backoff and jitter up to ``max_attempts``; any other
status is final. Deliveries live in memory: events queued when a process stops are lost (the audit trail is
the durable record of decisions). Folding is per process: each service worker folds its own events.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import json
import logging
import queue
import random
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import InvalidInputError
from ..records import _Record

if TYPE_CHECKING:
    from ..db import FaceDB

log = logging.getLogger("facedb.operations.hooks")

EVENTS = ("identify.match", "identify.unknown", "verify.accept", "verify.reject", "person.enrolled",
          "person.removed")

SIGNATURE_HEADER = "X-FaceDB-Signature"
TIMESTAMP_HEADER = "X-FaceDB-Timestamp"
EVENT_HEADER = "X-FaceDB-Event"
DELIVERY_HEADER = "X-FaceDB-Delivery"

#: How old a signed timestamp a receiver should accept by default (seconds): replayed deliveries are refused.
DEFAULT_TOLERANCE = 300


@dataclass(frozen=True)
class Webhook(_Record):
    """A stored webhook. ``key_id`` None = every event of the database. The secret is never in ``to_dict``."""

    id: int
    url: str
    events: list[str]
    key_id: str | None
    created_at: str
    secret: str = field(default="", repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "url": self.url, "events": list(self.events), "key_id": self.key_id,
                "created_at": self.created_at}

    def wants(self, event: str, key_id: str | None) -> bool:
        return event in self.events and (self.key_id is None or self.key_id == key_id)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Webhook:
        return cls(id=int(row["id"]), url=str(row["url"]), events=str(row["events"]).split(","),
                   key_id=row["key_id"], created_at=str(row["created_at"]), secret=str(row["secret"]))


def public_address(address: str) -> bool:
    """Whether an IP address is on the public internet: not loopback, link-local (169.254.0.0/16, where cloud
    metadata services answer), private (10/8, 172.16/12, 192.168/16, fc00::/7), shared (100.64/10), reserved,
    documentation, multicast or unspecified. An IPv4 address written as IPv6 (``::ffff:127.0.0.1``) is judged
    as the IPv4 address it is. Webhooks go to public addresses only unless the admin allows private ones (a
    webhook is a request the service makes on an admin's word: it must not reach what only the server can)."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone id (fe80::1%eth0) is link-local anyway
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return bool(ip.is_global) and not ip.is_multicast


class TargetRefusedError(InvalidInputError):
    """A webhook URL whose host is (or resolves to) an address webhooks may not reach."""


def check_url(url: object) -> str:
    """An http(s) URL with a host, or InvalidInputError."""
    if not isinstance(url, str) or len(url) > 2000:
        raise InvalidInputError("a webhook URL is a string of at most 2000 characters")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise InvalidInputError(f"not a URL: {url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInputError(f"a webhook URL is http:// or https:// with a host, got {url!r}")
    try:
        parts.port  # noqa: B018  (urlsplit checks the port only when asked: ":99999" and ":abc" raise here)
    except ValueError:
        raise InvalidInputError(f"a webhook URL's port is a number from 0 to 65535, got {url!r}") from None
    if "@" in parts.netloc:
        # credentials in a URL would be stored, listed by `hooks list` and GET /v1/hooks and written to the audit
        # trail in the clear; the signature (the hook's secret) is how a receiver authenticates facedb
        raise InvalidInputError("a webhook URL may not hold credentials (user:password@): the receiver checks "
                                "the X-FaceDB-Signature header instead")
    return url


def check_events(events: str | Sequence[str]) -> list[str]:
    """Event names (a list, or one comma-separated string; ``*`` = all), or InvalidInputError."""
    names = events.split(",") if isinstance(events, str) else list(events)
    names = [n.strip() for n in names if isinstance(n, str) and n.strip()]
    if "*" in names:
        return list(EVENTS)
    unknown = [n for n in names if n not in EVENTS]
    if unknown or not names:
        raise InvalidInputError(f"events are one or more of {', '.join(EVENTS)} (or *); got {events!r}")
    return sorted(set(names), key=EVENTS.index)


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of ``"{timestamp}." + body`` under ``secret``."""
    mac = hmac.new(secret.encode("utf-8"), f"{int(timestamp)}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(secret: str, timestamp: str | int, body: bytes, signature: str, *,
                     tolerance: float = DEFAULT_TOLERANCE, now: float | None = None) -> bool:
    """True iff ``signature`` is :func:`sign` of ``body`` at ``timestamp`` and the timestamp is within
    ``tolerance`` seconds of ``now`` (a replayed old delivery is refused)."""
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, ts, body), str(signature))


def add_recorded(db: FaceDB, url: str, events: str | Sequence[str], key_id: str | None,
                 secret: str | None) -> Webhook:
    """Register a webhook in ``db``'s store (:meth:`facedb.FaceDB.add_webhook`), recorded as ``hook-add``;
    InvalidInputError (TargetRefusedError for a private address) for a bad URL, event or secret. Under the
    facade's lock."""
    url, names = check_url(url), check_events(events)
    if secret is not None and (not isinstance(secret, str) or len(secret) < 16):
        raise InvalidInputError("a webhook secret is at least 16 characters")
    with db._lock:
        hook = Webhook.from_row(db.store.add_webhook(url, names, secret or new_secret(), key_id))
        db.trail.record("hook-add", [{"detail": {"hook": hook.id, "url": url, "events": names,
                                                 "key": key_id}}], db.settings())
        return hook


def remove_recorded(db: FaceDB, hook_id: int) -> Webhook:
    """Remove a webhook (NotFoundError if none), recorded as ``hook-remove``. The caller holds the lock."""
    hook = Webhook.from_row(db.store.remove_webhook(hook_id))
    db.trail.record("hook-remove", [{"detail": {"hook": hook.id, "url": hook.url}}], db.settings())
    return hook


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Event:
    name: str
    data: dict[str, Any]
    key_id: str | None
    subject: str | None
    time: float = field(default_factory=time.time)


@dataclass
class Delivery:
    hook: Webhook
    body: bytes
    event: str
    id: str
    attempt: int = 0


@dataclass
class _Window:
    until: float
    count: int = 0
    first: Event | None = None
    last: Event | None = None


#: ``send(url, body, headers) -> HTTP status`` (raise or return <= 0 for no answer). The service passes one
#: made with httpx; this module does no I/O of its own.
Sender = Callable[[str, bytes, dict[str, str]], int]


@dataclass
class DispatcherStats:
    published: int = 0
    dropped: int = 0
    folded: int = 0
    sent: int = 0
    delivered: int = 0
    retried: int = 0
    failed: int = 0

    cancelled: int = 0  # deliveries dropped because their webhook was removed
    refused: int = 0  # deliveries not sent: the target is an address webhooks may not reach

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Lane:
    """One webhook's deliveries: queued, and how many of its sender threads run and send."""

    queue: deque[Delivery] = field(default_factory=deque)
    threads: int = 0
    sending: int = 0


def _ident(hook: Webhook) -> tuple[int, str]:
    """A webhook's identity: its id and its secret (an id alone could be reused after a removal)."""
    return hook.id, hook.secret


class Dispatcher:
    """Folds events and delivers them to the webhooks that want them, off the caller's thread.

    ``hooks()`` lists the webhooks (read at most every ``hooks_ttl`` seconds, or after :meth:`invalidate`);
    ``send`` posts one delivery; ``live(hook)``, when given, says whether a webhook is still stored (asked before
    every attempt). ``backoff`` is the first retry's delay in seconds, doubled per attempt up to
    ``max_backoff``. ``per_hook``: sender threads per webhook; ``lane_size``: deliveries queued per webhook
    (more are dropped, counted).
    """

    def __init__(self, hooks: Callable[[], list[Webhook]], send: Sender, *, fold_window: float = 10.0,
                 max_attempts: int = 6, backoff: float = 0.5, max_backoff: float = 60.0, queue_size: int = 10_000,
                 per_hook: int = 2, lane_size: int = 1000, hooks_ttl: float = 2.0,
                 live: Callable[[Webhook], bool] | None = None) -> None:
        self._hooks_source = hooks
        self._send = send
        self._live = live
        self.per_hook = per_hook
        self.lane_size = lane_size
        self._lanes: dict[tuple[int, str], _Lane] = {}
        self._removed: set[tuple[int, str]] = set()
        self.fold_window = fold_window
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.hooks_ttl = hooks_ttl
        self.stats = DispatcherStats()
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=queue_size)
        self._timers: list[tuple[float, int, str, Any]] = []
        self._seq = itertools.count()
        self._windows: dict[tuple[int, str, str | None, str | None], _Window] = {}
        self._hooks: list[Webhook] = []
        self._hooks_read = -1e18
        self._in_flight = 0
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="facedb-hooks", daemon=True)
        self._stopping = False
        self._thread.start()

    # ------------------------------------------------------------------------------------ the caller's side
    def publish(self, name: str, data: dict[str, Any], *, key_id: str | None, subject: str | None) -> None:
        """Queue an event; returns at once. A full queue drops the event (counted in ``stats.dropped``)."""
        try:
            self._queue.put_nowait(("event", Event(name, data, key_id, subject)))
            self.stats.published += 1
        except queue.Full:
            self.stats.dropped += 1
            log.warning("webhook queue full: %s event dropped", name)

    def backlog(self) -> int:
        """What waits to be delivered now: events queued, deliveries being sent, and retries scheduled (open fold
        windows are not counted: they hold no delivery yet). A snapshot from any thread, for metrics."""
        retries = sum(1 for timer in list(self._timers) if timer[2] == "retry")  # list(): a copy, then counted
        return self._queue.qsize() + self._in_flight + retries

    def invalidate(self) -> None:
        """Re-read the webhooks before the next event (they were just changed)."""
        self._put(("invalidate", None))

    def _put(self, item: tuple[str, Any]) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            log.warning("webhook queue full: %s lost", item[0])

    def forget(self, hook: Webhook, timeout: float = 10.0) -> int:
        """Drop everything pending for a removed webhook, now: its queued deliveries, its retries and its fold
        windows (the scheduler drops those it holds; none of them is sent, since every attempt checks the
        removal first), and wait up to ``timeout`` seconds for an attempt already on the wire to end, so that
        nothing reaches the webhook after its removal is acknowledged. Returns the deliveries dropped here."""
        ident = _ident(hook)
        with self._idle:
            self._removed.add(ident)
            lane = self._lanes.pop(ident, None)
            dropped = len(lane.queue) if lane is not None else 0
            if lane is not None:
                lane.queue.clear()
                self._in_flight -= dropped
            self.stats.cancelled += dropped
            self._idle.notify_all()
        self._put(("forget", ident))
        self._hooks_read = -1e18
        deadline = time.monotonic() + timeout
        with self._idle:
            while lane is not None and lane.sending and time.monotonic() < deadline:
                self._idle.wait(0.05)
        return dropped

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until nothing is queued, in flight or waiting for a retry or a fold window (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._idle:
                if self._queue.empty() and not self._timers and self._in_flight == 0 and not self._busy:
                    return True
                self._idle.wait(0.02)
        return False

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what can be delivered within ``timeout`` seconds, then stop."""
        self.wait_idle(timeout)
        self._stopping = True
        self._put(("stop", None))
        self._thread.join(timeout=1.0)
        with self._idle:  # what is still queued is not sent (the lanes' threads end after their attempt)
            for lane in self._lanes.values():
                self._in_flight -= len(lane.queue)
                lane.queue.clear()

    # ----------------------------------------------------------------------------------- the scheduler thread
    _busy = False

    def _current_hooks(self) -> list[Webhook]:
        if time.monotonic() - self._hooks_read >= self.hooks_ttl:
            try:
                self._hooks = self._hooks_source()
            except Exception:  # the store is briefly unavailable: keep the last list, try again next event
                log.exception("cannot read the webhooks")
            self._hooks_read = time.monotonic()
        return self._hooks

    def _run(self) -> None:
        while not self._stopping:
            timeout = max(0.0, self._timers[0][0] - time.monotonic()) if self._timers else 0.5
            try:
                kind, item = self._queue.get(timeout=timeout)
            except queue.Empty:
                kind, item = "tick", None
            self._busy = True  # a tick too: a timer popped and not yet submitted is not idle (wait_idle)
            try:
                if kind == "event":
                    self._on_event(item)
                elif kind == "retry":
                    heapq.heappush(self._timers, (item[0], next(self._seq), "retry", item[1]))
                elif kind == "invalidate":
                    self._hooks_read = -1e18
                elif kind == "forget":
                    self._drop_pending(item)
                elif kind == "stop":
                    return
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    _, _, what, payload = heapq.heappop(self._timers)
                    if what == "fold":
                        self._close_window(payload)
                    else:
                        self._submit(payload)
            except Exception:  # never let one bad event stop delivery for the rest
                log.exception("webhook scheduler error")
            finally:
                self._busy = False
                with self._idle:
                    self._idle.notify_all()

    def _drop_pending(self, ident: tuple[int, str]) -> None:
        """The scheduler's part of :meth:`forget`: the removed webhook's fold windows and scheduled retries."""
        for fold_key in [k for k in self._windows if k[0] == ident[0]]:
            self._windows.pop(fold_key)
        kept = [t for t in self._timers
                if _ident(t[3][1] if t[2] == "fold" else t[3].hook) != ident]
        self.stats.cancelled += sum(1 for t in self._timers if t[2] == "retry") - sum(1 for t in kept
                                                                                  if t[2] == "retry")
        heapq.heapify(kept)
        self._timers = kept
        self._hooks = [h for h in self._hooks if _ident(h) != ident]

    def _on_event(self, event: Event) -> None:
        for hook in self._current_hooks():
            if _ident(hook) in self._removed or not hook.wants(event.name, event.key_id):
                continue
            fold_key = (hook.id, event.name, event.subject, event.key_id)
            window = self._windows.get(fold_key)
            if window is not None:
                window.count += 1
                window.first = window.first or event
                window.last = event
                self.stats.folded += 1
                continue
            if self.fold_window > 0:
                self._windows[fold_key] = _Window(until=time.monotonic() + self.fold_window)
                heapq.heappush(self._timers, (time.monotonic() + self.fold_window, next(self._seq), "fold",
                                              (fold_key, hook)))
            self._submit(self._delivery(hook, event, 1, event, event))

    def _close_window(self, payload: tuple[tuple[int, str, str | None, str | None], Webhook]) -> None:
        fold_key, hook = payload
        window = self._windows.pop(fold_key, None)
        if _ident(hook) in self._removed:
            return
        if window is not None and window.count and window.last is not None and window.first is not None:
            self._submit(self._delivery(hook, window.last, window.count, window.first, window.last))

    def _delivery(self, hook: Webhook, event: Event, count: int, first: Event, last: Event) -> Delivery:
        delivery_id = uuid.uuid4().hex
        body = {"id": delivery_id, "event": event.name, "time": _iso(event.time), "count": count,
                "first_time": _iso(first.time), "last_time": _iso(last.time), "key_id": event.key_id,
                "data": event.data}
        raw = json.dumps(body, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8")
        return Delivery(hook, raw, event.name, delivery_id)

    def _submit(self, delivery: Delivery) -> None:
        """Queue a delivery on its webhook's lane, starting a sender thread for the lane if it has fewer than
        ``per_hook``: one webhook's slow receiver holds its own threads only."""
        ident = _ident(delivery.hook)
        with self._idle:
            if ident in self._removed or self._stopping:
                self.stats.cancelled += 1
                return
            lane = self._lanes.setdefault(ident, _Lane())
            if len(lane.queue) >= self.lane_size:
                self.stats.dropped += 1
                log.warning("webhook %s: %d deliveries waiting, %s delivery dropped", delivery.hook.url,
                            len(lane.queue), delivery.event)
                return
            lane.queue.append(delivery)
            self._in_flight += 1
            if lane.threads >= self.per_hook:
                return
            lane.threads += 1
        threading.Thread(target=self._lane_run, args=(ident, lane), name=f"facedb-hook-{delivery.hook.id}",
                         daemon=True).start()

    # -------------------------------------------------------------------------------------- sender threads
    def _lane_run(self, ident: tuple[int, str], lane: _Lane) -> None:
        """A webhook's sender thread: its lane's deliveries, one at a time, until the lane is empty."""
        while True:
            with self._idle:
                if not lane.queue or self._stopping:
                    lane.threads -= 1
                    if not lane.threads and not lane.queue and self._lanes.get(ident) is lane:
                        del self._lanes[ident]  # an idle lane holds nothing: made again by the next delivery
                    self._idle.notify_all()
                    return
                delivery = lane.queue.popleft()
                lane.sending += 1
            try:
                self._attempt(delivery)
            finally:
                with self._idle:
                    lane.sending -= 1
                    self._idle.notify_all()

    def _attempt(self, delivery: Delivery) -> None:
        try:
            if _ident(delivery.hook) in self._removed or (self._live is not None and not self._live(delivery.hook)):
                self.stats.cancelled += 1  # removed here, or through another worker or the CLI
                return
            delivery.attempt += 1
            ts = int(time.time())
            headers = {"Content-Type": "application/json", EVENT_HEADER: delivery.event,
                       DELIVERY_HEADER: delivery.id, TIMESTAMP_HEADER: str(ts),
                       SIGNATURE_HEADER: sign(delivery.hook.secret, ts, delivery.body),
                       "User-Agent": "facedb-webhooks"}
            try:
                status = int(self._send(delivery.hook.url, delivery.body, headers))
            except TargetRefusedError as exc:  # final: asking again reaches the same address
                self.stats.refused += 1
                log.warning("webhook %s: %s; %s delivery %s not sent", delivery.hook.url, exc, delivery.event,
                            delivery.id)
                return
            except Exception as exc:
                log.info("webhook %s: %s", delivery.hook.url, exc)
                status = 0
            self.stats.sent += 1
            if 200 <= status < 300:
                self.stats.delivered += 1
                return
            retryable = status <= 0 or status in (408, 429) or status >= 500
            if retryable and delivery.attempt < self.max_attempts and not self._stopping:
                delay = min(self.max_backoff, self.backoff * 2 ** (delivery.attempt - 1))
                delay *= 1 + 0.1 * random.random()  # jitter, so that many retries do not arrive together
                self.stats.retried += 1
                self._put(("retry", (time.monotonic() + delay, delivery)))
            else:
                self.stats.failed += 1
                log.warning("webhook %s gave up on %s delivery %s after %d attempt(s) (last status %s)",
                            delivery.hook.url, delivery.event, delivery.id, delivery.attempt, status)
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()
