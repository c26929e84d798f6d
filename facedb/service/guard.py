"""Throttles for one worker (issue #25, finding 6): failed authentications per client address and per key id,
requests per door key, uploads in progress per client address, and a bound on how many failed authentications
are written to the audit trail (so that guessing leaves a trace without the trail itself being flooded).

Everything here is in the worker's memory, per process: with ``--workers N`` each worker keeps its own counts
(an attacker spread over the workers gets up to N times the budget). Token buckets: each source starts with
``capacity`` tokens, each event takes one, and tokens come back at ``capacity / window`` per second, so a
source is held to ``capacity`` events per ``window`` seconds on average, with bursts up to ``capacity``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

#: How many sources each table remembers; the least recently seen is forgotten beyond it (a flood of
#: addresses or made-up key ids cannot grow the worker's memory without bound).
MAX_SOURCES = 10_000


@dataclass
class _Bucket:
    tokens: float
    at: float


class Buckets:
    """Token buckets by source (an address, a key id). ``capacity`` events per ``window`` seconds."""

    def __init__(self, capacity: float, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(capacity)
        self.rate = self.capacity / window if window > 0 else float("inf")
        self._clock = clock
        self._table: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def _bucket(self, source: str) -> _Bucket:
        now = self._clock()
        bucket = self._table.get(source)
        if bucket is None:
            bucket = self._table[source] = _Bucket(self.capacity, now)
            while len(self._table) > MAX_SOURCES:
                self._table.popitem(last=False)
        else:
            self._table.move_to_end(source)
            bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.at) * self.rate)
            bucket.at = now
        return bucket

    def wait(self, source: str) -> float:
        """Seconds until ``source`` has a token again (0: it has one now). Takes nothing."""
        with self._lock:
            tokens = self._bucket(source).tokens
            return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def take(self, source: str) -> float:
        """Take a token for ``source``: 0 when it had one, else the seconds until it will (nothing taken)."""
        with self._lock:
            bucket = self._bucket(source)
            if bucket.tokens >= 1:
                bucket.tokens -= 1
                return 0.0
            return (1 - bucket.tokens) / self.rate


class Guard:
    """One worker's throttles. ``auth_failures``: failed authentications allowed per ``window`` seconds, per
    client address and per key id; ``door_rate``: requests per second for an identify key without the
    ``candidates`` grant (0 = no limit; bursts of two seconds' worth, at least one); ``uploads``: request
    bodies being read at once per client address; ``records``: failed-authentication audit records per
    ``window`` (all sources)."""

    def __init__(self, auth_failures: int = 20, window: float = 60.0, door_rate: float = 10.0,
                 uploads: int = 8, records: int = 60, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self.by_address = Buckets(auth_failures, window, clock)
        self.by_key = Buckets(auth_failures, window, clock)
        burst = max(1.0, 2 * door_rate)  # two seconds' worth, and at least one request
        self.door = Buckets(burst, burst / door_rate, clock) if door_rate > 0 else None
        self.uploads = uploads
        self._uploading: dict[str, int] = {}
        self._records = Buckets(records, window, clock)
        self._recorded: OrderedDict[tuple[str, str | None], float] = OrderedDict()
        self._unrecorded: dict[tuple[str, str | None], int] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------- failed authentication
    def address_wait(self, address: str) -> float:
        """Seconds this address must wait before it may try a key again (0: it may now)."""
        return self.by_address.wait(address)

    def failed(self, address: str, key_id: str | None) -> float:
        """Count a failed authentication; 0 while its address and its key id are within their allowance (the
        answer is 401), else the seconds until they are again (the answer is 429)."""
        waits = [self.by_address.take(address)]
        if key_id is not None:
            waits.append(self.by_key.take(key_id))
        return max(waits)

    def to_record(self, address: str, key_id: str | None) -> int | None:
        """Whether this failure goes to the audit trail: the failures of this (address, key id) to record now
        (this one and those left out since its last record), or None to leave it out. One record per source per
        window, and at most ``records`` per window in all."""
        source = (address, key_id)
        now = self._clock()
        with self._lock:
            last = self._recorded.get(source)
            pending = self._unrecorded.get(source, 0) + 1
            if (last is not None and now - last < self.window) or self._records.take("all") > 0:
                self._unrecorded[source] = pending
                if len(self._unrecorded) > MAX_SOURCES:
                    self._unrecorded.pop(next(iter(self._unrecorded)))
                return None
            self._unrecorded.pop(source, None)
            self._recorded[source] = now
            self._recorded.move_to_end(source)
            while len(self._recorded) > MAX_SOURCES:
                self._recorded.popitem(last=False)
            return pending

    # ------------------------------------------------------------------------------------------ door keys
    def door_wait(self, key_id: str) -> float:
        """Take one request from a door key's allowance: 0, or the seconds until it may ask again."""
        return self.door.take(key_id) if self.door is not None else 0.0

    # ---------------------------------------------------------------------------------------------- uploads
    def start_upload(self, address: str) -> bool:
        """Count a body being read from ``address``; False (nothing counted) when it has ``uploads`` already."""
        with self._lock:
            n = self._uploading.get(address, 0)
            if n >= self.uploads:
                return False
            self._uploading[address] = n + 1
            return True

    def end_upload(self, address: str) -> None:
        with self._lock:
            n = self._uploading.get(address, 1) - 1
            if n <= 0:
                self._uploading.pop(address, None)
            else:
                self._uploading[address] = n
