"""scripts/bench_scale.py's import resumes chunk by chunk (#27: a 10M import outlives a session): the exact
answers of a resumed import, whose progress file lags the store (a kill between a chunk's commit and the file,
or a store filled before the file existed), are those of an uninterrupted one, and the store holds each
template once."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from facedb import FaceDB

from .conftest import REPO

SCRIPT = REPO / "scripts" / "bench_scale.py"
ARGS = ["--n", "600", "--per", "3", "--dim", "16", "--chunk", "40", "--queries", "12", "--kind", "flat",
        "--step", "import"]


def run_import(work):
    subprocess.run([sys.executable, str(SCRIPT), *ARGS, "--workdir", str(work)], check=True, cwd=str(REPO),
                   capture_output=True)


def test_a_resumed_import_has_the_exact_answers_of_an_uninterrupted_one(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_import(whole)
    expected = np.load(whole / "probes.npz")
    assert (expected["exact_id"] >= 0).all()

    run_import(resumed)
    # the progress file lagging the store by every chunk: the resumed import scores them again from their seeds
    (resumed / "state.json").unlink()
    people = 600 // 3
    np.savez(resumed / "import-progress.npz", best_sim=np.full(18, -2.0, np.float32),
             best_id=np.full(18, -1, np.int64), chunks=0, seconds=0.0)
    (resumed / "probes.npz").unlink()
    run_import(resumed)
    got = np.load(resumed / "probes.npz")
    for key in expected.files:
        assert np.array_equal(got[key], expected[key]), key
    with FaceDB.open(resumed / "db", readonly=True) as db:
        assert db.count_people() == people
        assert db.stats().templates == 600  # no chunk imported twice
