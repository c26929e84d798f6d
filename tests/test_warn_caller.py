"""facedb's warnings name the user's line that called the API, however deep inside facedb they are raised."""

from __future__ import annotations

import warnings
from pathlib import Path

import facedb
from facedb.errors import ErasureWarning, warn_caller

INSIDE = str(Path(facedb.__file__).resolve().parent / "operations" / "not_a_real_module.py")


def test_the_warning_points_past_every_facedb_frame():
    ns: dict = {"warn_caller": warn_caller, "ErasureWarning": ErasureWarning}
    code = ("def deep():\n    warn_caller(ErasureWarning('kept'))\n"
            "def middle():\n    deep()\n"
            "def api():\n    middle()\n")
    exec(compile(code, INSIDE, "exec"), ns)  # three frames that claim to be facedb's own
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ns["api"]()
    assert [w.category for w in caught] == [ErasureWarning]
    assert caught[0].filename == __file__, caught[0].filename


def test_called_from_outside_it_points_at_the_caller():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_caller("plain", RuntimeWarning)
    assert caught[0].category is RuntimeWarning and caught[0].filename == __file__
