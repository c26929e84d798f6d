"""Times as the store writes and compares them: the one stored form (:func:`utcnow`: ISO 8601 UTC with
milliseconds, ``2026-03-02T04:30:00.000+00:00``) and the one parser of times given to facedb (:func:`utc_time`).

Its own module because every table family stamps rows with it and every interface parses ``--since`` /
``?since=`` through it: stored times are compared as text, which is right only between strings of exactly this
form. No SQL here.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone

from ...errors import InvalidInputError


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def time_before(seconds: float) -> str:
    """The ISO 8601 UTC time ``seconds`` ago, as the audit trail writes times. An age reaching before year 1
    (a retention of 1e16 days, ``--since 99999999999d``) is clamped to the earliest time instead of
    overflowing: everything is younger than it, which is what such an age means."""
    now = datetime.now(timezone.utc)
    try:
        return (now - timedelta(seconds=float(seconds))).isoformat(timespec="milliseconds")
    except OverflowError:
        return datetime.min.replace(tzinfo=timezone.utc).isoformat(timespec="milliseconds")


#: The units of a relative age (``90m``, ``24h``, ``7d``) wherever a time is taken.
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_AGE_NUMBER = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def utc_time(value: str | datetime | None, what: str = "time") -> str | None:
    """The one way a time given to facedb (an API argument, a CLI option, a query parameter, a console form)
    becomes the instant it means, in the one form every stored time has (:func:`utcnow`:
    ``2026-03-02T04:30:00.000+00:00``). Stored times are compared with it as text (``WHERE time >= ?``, a
    group's ``last_seen``): text order is time order only between strings of exactly that form, which is
    why nothing else may be compared with a stored time. Accepts an ISO 8601 time with any offset (``Z``,
    ``+05:30``, ``-08:00``), a date (midnight), a naive time (taken as UTC: a server's local zone is not the
    asker's), a relative age (``90m``, ``24h``, ``7d``: that long before now; one reaching before year 1
    means from the start), or a ``datetime`` / ``date`` (naive taken as UTC too). None stays None; anything
    else is an InvalidInputError naming ``what``, raised before anything is read or changed."""
    if value is None:
        return None
    if isinstance(value, datetime):
        when = value
    elif isinstance(value, date):
        when = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        text = value.strip()
        # an age: a number without a sign, in decimal or exponent notation ("1e9d" as "9999999999999s": both
        # reach before year 1 and mean from the start; one took the exponent as a 400, the other not, #25)
        if text[-1:] in AGE_UNITS and _AGE_NUMBER.fullmatch(text[:-1]):
            return time_before(float(text[:-1]) * AGE_UNITS[text[-1]])
        if text[-1:] in ("Z", "z"):  # Python 3.10's fromisoformat knows only numeric offsets
            text = text[:-1] + "+00:00"
        head, _, tail = text.rpartition(" ")
        if ":" in head and len(tail) in (2, 4, 5) and tail.replace(":", "", 1).isdigit():
            text = f"{head}+{tail}"  # an unescaped '+' in a URL's query arrives as a space
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            when = None
        if when is None:
            raise InvalidInputError(f"{what} takes an ISO time (2026-03-01T23:30:00-05:00; UTC if no zone) or "
                                    f"an age like 24h or 7d, got {value!r}")
    else:
        raise InvalidInputError(f"{what} takes an ISO time string, a datetime or an age like '7d', "
                                f"got {type(value).__name__}")
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    try:
        when = when.astimezone(timezone.utc)
        # Stored times are whole milliseconds: rounding a finer time up keeps both ``>= since`` and
        # ``< until`` exact against them (truncating would let in a record up to 1 ms early).
        if when.microsecond % 1000:
            when += timedelta(microseconds=1000 - when.microsecond % 1000)
    except OverflowError:  # a zone that moves year 1 or 9999 out of range
        raise InvalidInputError(f"{what} takes an ISO time within the years 1-9999 in UTC, got {value!r}") from None
    return when.isoformat(timespec="milliseconds")


def retention_cutoff(retention_days: float) -> str:
    """The stored-form time ``retention_days`` ago: rows older than it are past a retention period (the audit
    trail's, the unknown visitors')."""
    return time_before(retention_days * 86400)
