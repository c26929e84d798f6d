"""Concurrent readers with a writer, and SIGKILL at random moments: the short versions of the drills in
scripts/soak_concurrency.py and scripts/crash_drill.py."""

from __future__ import annotations

import pytest

from facedb.testing.soak import run_concurrency, run_crash_drill

pytestmark = pytest.mark.slow


def test_four_readers_and_a_writer():
    # the work is bounded (60 removals), not the time: on a loaded machine it takes longer and checks the same
    r = run_concurrency(removals=60, readers=4, people=120)
    assert r["removed_people"] == 60 and r["added_people"] == 60
    assert r["searches"] >= 4  # every reader searched at least once after the last removal
    assert r["errors"] == 0, r["error_samples"]
    assert r["results_naming_removed_people"] == 0
    assert r["crashed_processes"] == 0 and r["check_ok"]


def test_sigkill_loses_nothing_acknowledged_and_leaves_nothing_half_done():
    r = run_crash_drill(kills=8, seed=1)
    assert r["operations_acknowledged"] >= 8, r  # at least one before each kill: the work is bounded, not the time
    assert r["failures"] == 0, r["failure_samples"]


@pytest.mark.slow
def test_integrity_drill_service_cli_and_console_at_once_lose_nothing():
    """The short version of scripts/integrity_drill.py (issue #23): a real `facedb serve --workers 2` with the
    console, CLI processes beside it, worker and CLI SIGKILLs; every acknowledged operation checked at rest."""
    from facedb.testing.integrity import run_integrity_drill

    r = run_integrity_drill(operations=200, kill_every=50, seed=3, cli_kill_share=0.4)
    assert r["operations_acknowledged"] >= 200
    assert r["lost"] == 0 and r["problems"] == 0, r["problem_samples"]
    assert r["sigkills"].get("worker", 0) >= 3
    assert r["removals_checked"] > 0 and r["revoked_keys_checked"] > 0
