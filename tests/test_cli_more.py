"""End-to-end CLI tests for `keys`, `hooks` and `rule`: each checks the command's effect on the database."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from facedb import FaceDB
from facedb.cli import app
from facedb.errors import AuthenticationError
from facedb.gallery.decision import ImpostorModel

runner = CliRunner()


def cli(db, *args, code=0):
    res = runner.invoke(app, ["--db", str(db), *args])
    assert res.exit_code == code, res.output
    return res


def jline(res):
    return json.loads(res.stdout.strip().splitlines()[0])


def test_keys_create_list_revoke_take_effect_in_the_database(tmp_path):
    db = tmp_path / "db"
    cli(db, "init", "--model", "m", "--dim", "4")
    made = jline(cli(db, "--json", "keys", "create", "--scope", "identify", "--name", "door-3"))
    secret = made["key"]
    with FaceDB.open(db) as d:
        assert d.authenticate(secret).name == "door-3"  # the printed key works...
        stored = d.store.conn.execute("SELECT key_hash FROM api_keys").fetchall()
        assert secret not in str(stored)  # ...and only its hash is stored
    listed = [json.loads(line) for line in cli(db, "--json", "keys", "list").stdout.splitlines()]
    assert [(k["name"], k["scope"], k["revoked_at"]) for k in listed] == [("door-3", "identify", None)]
    assert "key" not in listed[0]
    cli(db, "keys", "create", "--scope", "identify", "--name", "door-3", code=2)  # a live name is unique
    cli(db, "keys", "create", "--scope", "root", code=2)
    cli(db, "keys", "revoke", "door-3")
    with FaceDB.open(db) as d:
        with pytest.raises(AuthenticationError):
            d.authenticate(secret)
        assert [k.revoked for k in d.api_keys()] == [True]
    cli(db, "keys", "revoke", "nobody", code=2)


def test_hooks_add_list_remove_take_effect_in_the_database(tmp_path):
    db = tmp_path / "db"
    cli(db, "init", "--model", "m", "--dim", "4")
    hook = jline(cli(db, "--json", "hooks", "add", "http://127.0.0.1:9/door", "--events",
                     "identify.unknown,verify.reject"))
    assert hook["secret"] and hook["url"] == "http://127.0.0.1:9/door"
    with FaceDB.open(db) as d:
        (stored,) = d.webhooks()
        assert stored.events == ["identify.unknown", "verify.reject"] or set(stored.events) == {
            "identify.unknown", "verify.reject"}
    listed = [json.loads(line) for line in cli(db, "--json", "hooks", "list").stdout.splitlines()]
    assert [h["id"] for h in listed] == [hook["id"]] and "secret" not in listed[0]
    cli(db, "hooks", "add", "ftp://example/x", "--events", "identify.match", code=2)
    cli(db, "hooks", "add", "http://127.0.0.1:9/x", "--events", "nonsense.event", code=2)
    cli(db, "hooks", "remove", str(hook["id"]))
    with FaceDB.open(db) as d:
        assert d.webhooks() == []
    cli(db, "hooks", "remove", str(hook["id"]), code=2)


def test_rule_shows_and_switches_the_decision_rule(tmp_path):
    db = tmp_path / "db"
    impostors = ImpostorModel.from_scores(np.random.default_rng(0).normal(0.3, 0.1, 100_000), source="test")
    with FaceDB.create(db, model_id="m", dim=4, threshold=0.5, impostors=impostors) as d:
        d.add_templates_many([(f"p{i}", np.eye(4, dtype=np.float32)[i % 4]) for i in range(40)])
    shown = jline(cli(db, "--json", "rule"))
    assert shown["decision_rule"] == "gallery" and shown["threshold_in_force"] > 0.5
    assert shown["predicted_fpir"] == pytest.approx(0.01, abs=0.003)
    fixed = jline(cli(db, "--json", "rule", "fixed"))
    assert fixed["decision_rule"] == "fixed" and fixed["threshold_in_force"] == 0.5 and fixed["warning"]
    with FaceDB.open(db) as d:
        assert d.settings().rule.kind == "fixed"
        assert d.identify(np.eye(4, dtype=np.float32)[0]).rule == "fixed"
        assert [r.operation for r in d.audit(operation="rule")] == ["rule"]
    cli(db, "--json", "rule", "gallery", "--target", "0.001")
    with FaceDB.open(db) as d:
        assert (d.settings().rule.kind, d.settings().rule.target) == ("gallery", 0.001)
    cli(db, "rule", "gallery", "--target", "2", code=2)
    cli(db, "rule", "sometimes", code=2)
    with FaceDB.open(db) as d:
        assert (d.settings().rule.kind, d.settings().rule.target) == ("gallery", 0.001)


def test_the_threshold_shown_is_the_one_searches_use_with_mean_templates(tmp_path):
    """Under the gallery rule the threshold follows the number of templates searched, mean templates included:
    `rule` and `stats` showed it for the photo templates alone (found by the newcomer check)."""
    db = tmp_path / "db"
    impostors = ImpostorModel.from_scores(np.random.default_rng(0).normal(0.3, 0.1, 100_000), source="test")
    rng = np.random.default_rng(1)
    with FaceDB.create(db, model_id="m", dim=8, threshold=0.5, impostors=impostors, mean_templates=True) as d:
        x = rng.standard_normal((30, 8)).astype(np.float32)
        d.add_templates_many([(f"p{i % 10}", v / np.linalg.norm(v)) for i, v in enumerate(x)])
        assert (d.stats().templates, d.stats().mean_templates) == (30, 10)
        used = d.identify(x[0] / np.linalg.norm(x[0])).threshold
        assert d.stats().threshold_in_force == pytest.approx(used)
    shown = jline(cli(db, "--json", "rule"))
    assert shown["templates"] == 40 and shown["threshold_in_force"] == pytest.approx(used)


def test_mean_templates_command_shows_switches_and_repairs(tmp_path):
    """`check` reported stale mean templates and pointed at a Python call; the README named `check --repair`,
    which does not exist (newcomer check). `facedb mean-templates on` recomputes every mean."""
    import sqlite3

    from facedb.db import STORE_FILE

    db = tmp_path / "db"
    e = np.eye(8, dtype=np.float32)
    with FaceDB.create(db, model_id="m", dim=8, threshold=0.5) as d:
        d.add_templates("ann", e[:2], create=True)
    shown = jline(cli(db, "--json", "mean-templates"))
    assert (shown["mean_templates_enabled"], shown["mean_templates"]) == (False, 0)
    assert jline(cli(db, "--json", "mean-templates", "on"))["mean_templates"] == 1
    conn = sqlite3.connect(db / STORE_FILE)
    conn.execute("UPDATE embeddings SET vector = ? WHERE derived = 1", (e[5].tobytes(),))  # a stale mean
    conn.commit()
    conn.close()
    assert "mean-templates on" in cli(db, "check", code=1).stdout
    cli(db, "mean-templates", "on")
    assert jline(cli(db, "--json", "check"))["ok"] is True
    with FaceDB.open(db) as d:
        mean = next(t for t in d.templates("ann", include_derived=True) if t.derived).vector
        assert np.allclose(mean, (e[0] + e[1]) / np.sqrt(2), atol=1e-6)
    assert jline(cli(db, "--json", "mean-templates", "off"))["mean_templates"] == 0
    cli(db, "mean-templates", "sometimes", code=2)
    with FaceDB.open(db) as d:
        assert d.stats().mean_templates == 0 and not d.settings().mean_templates


def test_names_with_invisible_characters_are_refused(tmp_path):
    """'a\\u200bb' was accepted and displays as 'ab' (newcomer check); bidi overrides spoof names the same way.
    The joiners some scripts are written with stay allowed."""
    db = tmp_path / "db"
    with FaceDB.create(db, model_id="m", dim=4, threshold=0.5) as d:
        d.add_templates("ab", np.eye(4, dtype=np.float32)[:1], create=True)
    for bad in ("a\u200bb", "Ann\u202eeoJ", "x\u0085y"):
        res = cli(db, "add-person", bad, code=2)
        assert "invisible" in res.stderr or "control" in res.stderr
        cli(db, "rename", "ab", bad, code=2)
    cli(db, "add-person", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645")  # Persian, with a ZWNJ
    with FaceDB.open(db) as d:
        assert sorted(p.name for p in d.people()) == ["ab", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"]


def test_a_metadata_key_given_twice_with_two_values_is_refused(tmp_path):
    """--meta external_id=E1 --meta external_id=E2 silently kept E2 (newcomer check)."""
    db = tmp_path / "db"
    FaceDB.create(db, model_id="m", dim=4, threshold=0.5).close()
    res = cli(db, "add-person", "ann", "--meta", "external_id=E1", "--meta", "external_id=E2", code=2)
    assert "twice" in res.stderr
    with FaceDB.open(db) as d:
        assert [p.name for p in d.people()] == []
    cli(db, "add-person", "ann", "--meta", "team=a", "--meta", "team=a")
    with FaceDB.open(db) as d:
        assert d.person("ann").metadata == {"team": "a"}
