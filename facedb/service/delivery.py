"""Webhook sending with httpx, for :class:`facedb.hooks.Dispatcher` (which owns folding, signing, retries)."""

from __future__ import annotations

import httpx

from ..hooks import Sender


def http_sender(timeout: float) -> Sender:
    """``send(url, body, headers) -> status`` over one shared httpx client (thread-safe; keeps connections to
    receivers alive). Redirects are not followed: a receiver answers where it was registered."""
    client = httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False)

    def send(url: str, body: bytes, headers: dict[str, str]) -> int:
        return client.post(url, content=body, headers=headers).status_code

    return send
