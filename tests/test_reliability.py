"""Concurrent readers with a writer, and SIGKILL at random moments: the short versions of the drills in
scripts/soak_concurrency.py and scripts/crash_drill.py."""

from __future__ import annotations

import pytest

from facedb.soak import run_concurrency, run_crash_drill

pytestmark = pytest.mark.slow


def test_four_readers_and_a_writer():
    r = run_concurrency(seconds=6, readers=4, people=120)
    assert r["searches"] > 200 and r["removed_people"] == 60
    assert r["errors"] == 0, r["error_samples"]
    assert r["results_naming_removed_people"] == 0
    assert r["crashed_processes"] == 0 and r["check_ok"]


def test_sigkill_loses_nothing_acknowledged_and_leaves_nothing_half_done():
    r = run_crash_drill(kills=8, seed=1)
    assert r["operations_acknowledged"] > 50, r
    assert r["failures"] == 0, r["failure_samples"]
