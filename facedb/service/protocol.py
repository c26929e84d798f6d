"""uvicorn's HTTP/1.1 protocol (httptools, its C parser) with the bounds it lacks on a request's head (issue #25,
second pass, finding 1). uvicorn has no limit on header bytes and no timeout until the head is complete: one
keyless client held 128 MiB of a single header line (+245 MiB) and was answered 200, a connection sending
nothing or a header line every 5 s stayed open, and 150 half-sent requests took a server's file descriptors.

What this subclass adds, before anything reaches the app (and so before any key is checked):

* **Header bytes.** Bytes received while a request's head is incomplete are counted; past ``max_header_kb``
  the client gets 431 (``RequestTooLargeError``) and the connection is closed. Counted per read (asyncio reads
  at most 256 KiB at once), so the memory a head can hold is bounded by the limit plus one read.
* **Header time.** From a connection's start, and from each answer on a kept-alive connection, the next head
  must be complete within ``header_timeout`` seconds, however the bytes trickle: 408 (a head was begun) or a
  plain close (nothing sent). The body has its own timeout (``FACEDB_BODY_TIMEOUT``, app.Transport).
* **Connections per client address.** A worker keeps ``connections_per_client`` connections open per peer
  address; one more is answered 429 and closed at once, so one address cannot take every file descriptor.
  A reverse proxy named in ``FACEDB_FORWARDED_ALLOW_IPS`` is exempt (every client comes through it; bound
  connections there).

The parser is unchanged (httptools): the subclass adds a counter and a timer per connection, not a parse.
Limits are per worker process (``--workers N`` allows N times the connections per address).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .config import ServiceSettings

_REASONS = {408: "Request Timeout", 429: "Too Many Requests", 431: "Request Header Fields Too Large"}


def _answer(status: int, error: str, message: str, extra: bytes = b"") -> bytes:
    """A whole HTTP/1.1 answer with facedb's JSON error body (errors.body), closing the connection."""
    body = json.dumps({"error": error, "message": message, "status": status}).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n%s\r\n"
            % (status, _REASONS[status].encode(), len(body), extra)) + body


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with bounded heads and connections per address (see the module's docstring); the
    limits come from :class:`ServiceSettings` (``FACEDB_*``), read once per worker."""

    _settings: ClassVar[ServiceSettings | None] = None
    _open: ClassVar[dict[str, int]] = {}  # connections open per peer address, in this worker (one event loop: no lock)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cls = type(self)
        if cls._settings is None:
            cls._settings = ServiceSettings.from_env()
        self._limits = cls._settings
        self._max_head = cls._settings.max_header_bytes
        self._in_head = True  # the parser waits for (or is in) a request's line and headers
        self._head_bytes = 0
        self._heads = 0  # heads completed on this connection
        self._head_timer: asyncio.TimerHandle | None = None
        self._peer: str | None = None

    # --------------------------------------------------------------------------------------- connections
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        peer = self.client[0] if self.client else None
        trusted = self._limits.forwarded_allow_ips
        if peer is not None and not (trusted == "*" or peer in trusted.split(",")):
            if self._open.get(peer, 0) >= self._limits.connections_per_client:
                self.transport.write(_answer(429, "TooManyRequestsError",
                                             f"this address has {self._limits.connections_per_client} connections "
                                             "open already (FACEDB_CONNECTIONS_PER_CLIENT)", b"retry-after: 1\r\n"))
                self.transport.close()
                return
            self._open[peer] = self._open.get(peer, 0) + 1
            self._peer = peer
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._peer is not None:
            left = self._open.get(self._peer, 1) - 1
            if left <= 0:
                self._open.pop(self._peer, None)
            else:
                self._open[self._peer] = left
            self._peer = None
        super().connection_lost(exc)

    # ------------------------------------------------------------------------------------------- the head
    def data_received(self, data: bytes) -> None:
        was_in_head, heads = self._in_head, self._heads
        super().data_received(data)
        # only a read that began and ended inside one and the same head counts, whole (a read that completed a
        # head, e.g. a whole request and its body in one read, or that began in a body is not counted: an
        # undercount of one read at most, never a refusal of a request whose head was small)
        if was_in_head and self._in_head and self._heads == heads and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self._max_head:
                self._refuse(431, "RequestTooLargeError",
                             f"the request's line and headers are over {self._max_head} bytes (FACEDB_MAX_HEADER_KB)")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._heads += 1
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True  # the next bytes on this connection are the next request's head

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next head has header_timeout from now (uvicorn's keep-alive closes an idle one first)

    # ------------------------------------------------------------------------------------------ the timer
    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self._limits.header_timeout, self._head_late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # an answer is being made: on_response_complete arms the timer again
        if self._head_bytes or getattr(self, "url", None):
            self._refuse(408, "RequestTimeoutError", f"the request's head did not arrive within "
                                                     f"{self._limits.header_timeout:g} s (FACEDB_HEADER_TIMEOUT)")
        else:
            self.transport.close()

    def _refuse(self, status: int, error: str, message: str) -> None:
        self._disarm()
        self.transport.write(_answer(status, error, message))
        self.transport.close()
