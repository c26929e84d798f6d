"""Webhook sending with httpx, for :class:`facedb.operations.hooks.Dispatcher` (which owns folding, signing, retries
and the per-webhook lanes), and where a webhook may point (issue #25, finding 3).

* **Targets.** Unless the admin allows private targets (``FACEDB_ALLOW_PRIVATE_HOOKS=1``), a webhook's host must
  be, or resolve only to, public addresses (:func:`facedb.operations.hooks.public_address`): loopback, link-local (cloud
  metadata at 169.254.169.254), private, shared and reserved ranges are refused when the webhook is added over
  HTTP (:func:`check_target`, 400) and again at every send, after resolving the name then (DNS rebinding: a
  name that resolved to a public address when added and to 127.0.0.1 now is refused). The send then connects
  to the very address it checked (the URL's host replaced by it, ``Host`` and, for https, the TLS server name
  and certificate check kept on the name), so the name cannot be resolved a second time to somewhere else.
* **A deadline per attempt.** httpx's timeout is per read: a receiver that answers a byte every few seconds
  never trips it. Each attempt has ``timeout`` seconds in all; past that its socket is shut down (the
  attempt fails and is retried later), so a slow receiver holds its own lane's thread for ``timeout`` at most.
  Each delivery opens its own connection (no keep-alive), which is what lets the deadline find its socket.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from ..operations.hooks import Sender, TargetRefusedError, public_address


class UnresolvedError(TargetRefusedError):
    """The webhook's host name does not resolve (now)."""


@dataclass(frozen=True)
class Target:
    """Where one attempt goes: ``url`` with the checked address as its host; ``host`` the original name."""

    url: str
    host: str
    host_header: str


def resolve(url: str, allow_private: bool) -> Target:
    """The address ``url``'s host resolves to now, checked: TargetRefusedError when any address it resolves to
    is not public (unless ``allow_private``), or it resolves to none."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnresolvedError(f"the webhook's host {host!r} does not resolve ({exc})") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise UnresolvedError(f"the webhook's host {host!r} does not resolve")
    if not allow_private:
        private = [a for a in addresses if not public_address(a)]
        if private:
            raise TargetRefusedError(
                f"the webhook's host {host!r} is {private[0]}, a loopback, link-local, private or reserved "
                "address: webhooks go to public addresses unless the admin sets FACEDB_ALLOW_PRIVATE_HOOKS=1")
    address = addresses[0]
    netloc = f"[{address}]" if ":" in address else address
    if parts.port is not None:
        netloc += f":{parts.port}"
    host_header = parts.netloc.rsplit("@", 1)[-1]  # the name (and port) as written, without credentials
    return Target(urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")), host, host_header)


def check_target(url: str, allow_private: bool) -> None:
    """Refuse a new webhook whose host is or resolves to an address webhooks may not reach (TargetRefusedError,
    an InvalidInputError: 400). A name that does not resolve yet is taken: it is checked again at every send."""
    if allow_private:
        return
    try:
        resolve(url, allow_private=False)
    except UnresolvedError:
        pass


def http_sender(timeout: float, allow_private: bool = False) -> Sender:
    """``send(url, body, headers) -> status`` over one httpx client (thread-safe), a new connection per
    delivery, to the address checked at send time, ``timeout`` seconds per attempt in all. Redirects are not
    followed: a receiver answers where it was registered."""
    client = httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False,
                          limits=httpx.Limits(max_keepalive_connections=0))

    def send(url: str, body: bytes, headers: dict[str, str]) -> int:
        target = resolve(url, allow_private)
        sockets: list[Any] = []

        def trace(event: str, info: dict[str, Any]) -> None:
            if event == "connection.connect_tcp.complete" and info.get("return_value") is not None:
                sockets.append(info["return_value"].get_extra_info("socket"))

        def cut() -> None:  # the attempt's time is up: its blocked read or write fails at once
            for sock in sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        timer = threading.Timer(timeout, cut)
        timer.daemon = True
        timer.start()
        try:
            extensions: dict[str, Any] = {"trace": trace}
            if target.url.startswith("https:"):
                extensions["sni_hostname"] = target.host  # TLS (and its certificate check) on the name
            response = client.post(target.url, content=body, headers={**headers, "Host": target.host_header},
                                   extensions=extensions)
            return response.status_code
        finally:
            timer.cancel()

    return send
