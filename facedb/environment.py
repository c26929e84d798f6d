"""Numbers facedb reads from its environment (``FACEDB_*``), through one parser: a value it cannot use (a typo,
``nan``, a negative wait) is an InvalidInputError naming the variable wherever it is read, never a quiet fall
back to the default (``FACEDB_RESCORE_MEMORY_MB=lots`` once meant 8 GiB, ``-5`` meant 0). Unset or empty: the
default. The database checks the query path's ones when it is opened (``gallery/query.py``)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from .errors import InvalidInputError


def number(name: str, default: float, *, minimum: float = 0.0, integer: bool = False, positive: bool = False,
           hint: str = "", environ: Mapping[str, str] | None = None) -> float:
    """``$name`` (in ``environ``, default ``os.environ``) as a number: ``default`` when unset or empty; a whole
    number with ``integer``; at least ``minimum`` (above 0 with ``positive``); finite. InvalidInputError
    otherwise (``hint`` says what the bound means, e.g. `` (0: always the store)``)."""
    raw = (os.environ if environ is None else environ).get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(int(raw)) if integer else float(raw)
    except ValueError:
        raise InvalidInputError(f"{name} must be a {'whole ' if integer else ''}number, got {raw!r}") from None
    if not math.isfinite(value) or value < minimum or (positive and value <= 0):
        bound = "> 0" if positive else f">= {minimum:g}"
        raise InvalidInputError(f"{name} must be {bound}{hint}, got {raw!r}")
    return value
