"""The shared wait for a started `facedb serve` (facedb.testing.serving): what counts as "not yet" and as fatal."""

from __future__ import annotations

import subprocess
import sys

import pytest

from facedb.testing.serving import ServerNotReady, wait_until_ready


def test_waits_through_refusals_and_503_until_200():
    answers = iter([0, 503, 503, 200])
    seen: list[str] = []

    def get(url: str) -> int:
        seen.append(url)
        return next(answers)

    wait_until_ready("http://127.0.0.1:1", get=get, poll_s=0)
    assert seen == ["http://127.0.0.1:1/ready"] * 4


def test_an_exited_server_fails_at_once_with_its_log(tmp_path):
    log = tmp_path / "serve.log"
    log.write_text("Error: no database at /nowhere\n")
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(2)"])
    proc.wait()
    with pytest.raises(ServerNotReady, match="exited with 2: Error: no database"):
        wait_until_ready("http://127.0.0.1:1", proc, timeout=60, log=log, get=lambda url: 503)


def test_gives_up_after_the_timeout():
    with pytest.raises(ServerNotReady, match=r"not ready in 0\.05 s"):
        wait_until_ready("http://127.0.0.1:1", timeout=0.05, poll_s=0.01, get=lambda url: 503)
