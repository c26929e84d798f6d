"""Hostile and broken input through the CLI: clean one-line errors, no hang, database unchanged."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

import facedb.faces.pipeline
from facedb import FaceDB
from facedb.cli import app

from .conftest import FakeEmbedder, face_image

runner = CliRunner()


@pytest.fixture
def db(tmp_path, monkeypatch, fake_pipeline):
    monkeypatch.setattr(facedb.faces.pipeline, "get_pipeline", lambda *a, **k: fake_pipeline)
    root = tmp_path / "db"
    assert runner.invoke(app, ["--db", str(root), "init", "--model", FakeEmbedder.model_id, "--dim",
                               str(FakeEmbedder.dim)]).exit_code == 0
    Image.fromarray(face_image([(200, 40, 40)])).save(tmp_path / "red.png")
    assert runner.invoke(app, ["--db", str(root), "enroll", "red", str(tmp_path / "red.png")]).exit_code == 0
    return root


def snapshot(root):
    with FaceDB.open(root) as d:
        return [(p.name, p.templates, p.metadata) for p in d.people()], d.stats()["generation"]


def test_symlink_loops_in_an_enrol_folder_do_not_hang(tmp_path, db):
    folder = tmp_path / "people"
    (folder / "green").mkdir(parents=True)
    Image.fromarray(face_image([(40, 200, 40)])).save(folder / "green" / "g.png")
    os.symlink(folder, folder / "green" / "loop")  # a loop inside a person's folder
    os.symlink(folder, folder / "loopdir")  # a linked person folder pointing at the root
    res = runner.invoke(app, ["--db", str(db), "--json", "enroll", "--folder", str(folder)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["people"] == ["green"]


def test_non_utf8_file_name_is_enrolled_and_reported(tmp_path, db):
    name = os.fsdecode(b"caf\xe9-\xff.png")
    Image.fromarray(face_image([(40, 200, 40)])).save(tmp_path / name)
    res = runner.invoke(app, ["--db", str(db), "--json", "enroll", "green", str(tmp_path / name)])
    assert res.exit_code == 0 and json.loads(res.stdout)["faces_stored"] == 1


@pytest.mark.parametrize("name", ["", " ", "x" * 1000, "a\nb", "\x00"])
def test_bad_person_names_change_nothing(tmp_path, db, name):
    before = snapshot(db)
    res = runner.invoke(app, ["--db", str(db), "enroll", name, str(tmp_path / "red.png")])
    assert res.exit_code != 0
    assert snapshot(db) == before


@pytest.mark.parametrize("name", ["$(rm -rf /)", "'; DROP TABLE people; --", "`reboot`", "a|b&c>d"])
def test_metacharacters_in_names_are_only_characters(tmp_path, db, name):
    Image.fromarray(face_image([(40, 40, 200)])).save(tmp_path / "blue.png")
    res = runner.invoke(app, ["--db", str(db), "--json", "enroll", name, str(tmp_path / "blue.png")])
    assert res.exit_code == 0, res.output
    shown = json.loads(runner.invoke(app, ["--db", str(db), "--json", "show", name]).stdout)
    assert shown["name"] == name


def test_index_file_replaced_with_garbage(db):
    with FaceDB.open(db) as d:
        d.save_index()
    (db / "index.faiss").write_bytes(b"\x00garbage" * 1000)
    res = runner.invoke(app, ["--db", str(db), "--json", "check"])
    assert res.exit_code == 0 and json.loads(res.stdout)["ok"] is True


def test_a_file_that_is_not_a_facedb(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "facedb.sqlite3").write_bytes(np.random.default_rng(0).bytes(8192))
    res = runner.invoke(app, ["--db", str(tmp_path / "x"), "stats"])
    assert res.exit_code == 2 and "not a database" in res.stderr and "Traceback" not in res.output


WORDS = ["init", "people", "show", "remove", "rename", "stats", "check", "enroll", "search", "verify",
         "add-person", "audit", "reindex", "--json", "--meta", "--index", "-k", "--threshold", "--folder",
         "--on-multiple", "red", "nobody", "0", "-1", "1e309", "nan", "=", "a=b", "/dev/null", "/nonexistent",
         "--since", "--limit", "flat", "hnsw", "--help"]

FUZZ_INPUTS = 250


@settings(max_examples=FUZZ_INPUTS, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.sampled_from(WORDS), st.text(max_size=12)), max_size=6))
def test_fuzz_cli_arguments(db, args):
    before = snapshot(db)
    res = runner.invoke(app, ["--db", str(db), *args])
    # usage errors and facedb's own errors exit 2, a negative answer (verify: no; check: problems) 1; never an
    # uncaught exception
    assert res.exit_code in (0, 1, 2), (args, res.output)
    assert res.exception is None or isinstance(res.exception, SystemExit), (args, repr(res.exception))
    if res.exit_code != 0 and args[:1] not in (["rename"], ["remove"], ["add-person"], ["enroll"]):
        assert snapshot(db)[0] == before[0]


# ---- periods and times at the edge of what a date can hold (CI: schemathesis set the audit retention to 3.3e16
# days over PATCH /v1/settings, and every later audit write died in datetime.fromtimestamp with OverflowError)
@pytest.mark.parametrize("days", [3.3124633176273664e16, 36500.5, float("inf"), float("nan"), -1, True, "7"])
def test_an_impossible_audit_retention_is_refused_and_changes_nothing(tmp_path, days):
    from facedb.errors import InvalidInputError

    with FaceDB.create(tmp_path / "db", model_id="own", dim=4, threshold=0.9) as d:
        before = d.settings().audit.retention_days
        with pytest.raises(InvalidInputError, match="audit retention"):
            d.configure_audit(retention_days=days)
        with pytest.raises(InvalidInputError, match="visitors' retention"):
            d.configure_visitors(retention_days=days)
        assert d.settings().audit.retention_days == before
    with FaceDB.open(tmp_path / "db") as d:  # and nothing reached the file
        assert d.settings().audit.retention_days == before


def test_the_longest_retentions_are_accepted(tmp_path):
    with FaceDB.create(tmp_path / "db", model_id="own", dim=4, threshold=0.9) as d:
        assert d.configure_audit(retention_days=36500).retention_days == 36500
        assert d.configure_audit(retention_days=0).retention_days == 0  # forever
        assert d.configure_visitors(retention_days=3650).retention_days == 3650


def test_a_stored_retention_past_year_one_keeps_every_record_and_writes_on(tmp_path):
    """A database where an earlier version stored such a retention: decisions are still recorded (none lost to
    the purge), not refused with an OverflowError."""
    with FaceDB.create(tmp_path / "db", model_id="own", dim=4, threshold=0.9) as d:
        d.add_templates("ann", np.eye(4, dtype=np.float32)[:1], create=True)
        d.identify(np.eye(4, dtype=np.float32)[:1])
        d.store.set_meta({"audit_retention_days": repr(3.3124633176273664e16)})
    with FaceDB.open(tmp_path / "db") as d:
        d.identify(np.eye(4, dtype=np.float32)[:1])
        d.identify(np.eye(4, dtype=np.float32)[1:2])
        d.trail.flush()
        decisions = [r.identity for r in d.audit(operation="identify")]
    assert decisions == ["ann", "ann", None]


def test_time_before_clamps_to_the_first_day_and_orders_like_the_trail():
    from facedb.gallery.store import time_before, utcnow

    assert time_before(1e300) == "0001-01-01T00:00:00.000+00:00" == time_before(float("inf"))
    assert time_before(1e300) < time_before(86400) < utcnow()


def test_audit_since_an_age_older_than_dates_lists_everything(db):
    every = runner.invoke(app, ["--db", str(db), "--json", "audit"])
    old = runner.invoke(app, ["--db", str(db), "--json", "audit", "--since", "99999999999d"])
    assert old.exit_code == every.exit_code == 0, old.output
    assert old.stdout.strip() and old.stdout.splitlines()[:3] == every.stdout.splitlines()[:3]


@pytest.mark.parametrize("when", ["0001-01-01T00:00+14:00", "9999-12-31T23:59-14:00"])
def test_audit_since_a_time_its_zone_moves_out_of_range_is_one_line(db, when):
    res = runner.invoke(app, ["--db", str(db), "audit", "--since", when])
    assert res.exit_code == 2 and "--since takes an ISO time" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
