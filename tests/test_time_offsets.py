"""Times given with any UTC offset select by the instant they name, through every interface (Python API, CLI,
HTTP, console), on both sides of UTC and across midnight. Found in the field: a peer's event log compared
``since`` with stored times as text, so ``2026-03-01T23:30:00-05:00`` (04:30 next day, UTC) let in records
from 04:00 and ``+09:00`` forms hid records they should have shown. Records and unknown faces are stored at
known instants; no test depends on the wall clock's reading beyond "the stored times are within retention"."""

from __future__ import annotations

import warnings
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import facedb.gallery.store
import facedb.gallery.store.visitors
from facedb import FaceDB, InvalidInputError
from facedb.cli import app
from facedb.gallery.store import utc_time

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from facedb.service.app import create_app
from facedb.service.config import ServiceSettings

from .conftest import FakeEmbedder
from .servicekit import console_login, make_db, wait_ready

runner = CliRunner()

# Four decision records, in UTC: one before midnight, three the next day.
A, B, C, D = ("2026-03-01T23:00:00.000+00:00", "2026-03-02T04:00:00.000+00:00", "2026-03-02T05:00:00.000+00:00",
              "2026-03-02T15:00:00.000+00:00")
#: 04:30 UTC on 2 March, as written on both sides of UTC (and across midnight for the western ones).
AT_0430 = ["2026-03-01T23:30:00-05:00", "2026-03-01T20:30:00-08:00", "2026-03-02T13:30:00+09:00",
           "2026-03-02T10:00:00+05:30", "2026-03-02T04:30:00Z", "2026-03-02T04:30:00+00:00", "2026-03-02T04:30:00",
           "2026-03-02T04:30", "2026-03-02 04:30:00"]


def seed_audit(path: Path) -> None:
    """Search records at A, B, C, D (UTC), identities naming their instant."""
    with FaceDB.open(path) as db:
        db.configure_audit(retention_days=0)  # kept forever: the service's own records would expire them
        db.store.append_audit([{"time": t, "operation": "search", "identity": name, "model_id": FakeEmbedder.model_id}
                               for t, name in zip((A, B, C, D), "ABCD")], None)


def names(records) -> list[str]:
    return [r["identity"] if isinstance(r, dict) else r.identity for r in records]


@pytest.fixture
def made(tmp_path) -> tuple[Path, dict[str, str]]:
    """(database path, API key per scope), the four records seeded."""
    path = tmp_path / "db"
    keys = make_db(path)
    seed_audit(path)
    return path, keys


@pytest.fixture
def path(made) -> Path:
    return made[0]


@pytest.fixture
def keys(made) -> dict[str, str]:
    return made[1]


# ------------------------------------------------------------------------------------------ the one parser
@pytest.mark.parametrize("given", [*AT_0430, datetime(2026, 3, 1, 23, 30, tzinfo=timezone(timedelta(hours=-5))),
                                   datetime(2026, 3, 2, 13, 30, tzinfo=timezone(timedelta(hours=9))),
                                   datetime(2026, 3, 2, 4, 30)])
def test_every_form_of_one_instant_becomes_the_stored_form(given):
    assert utc_time(given) == "2026-03-02T04:30:00.000+00:00"


def test_dates_ages_and_finer_times():
    assert utc_time("2026-03-02") == utc_time(date(2026, 3, 2)) == "2026-03-02T00:00:00.000+00:00"
    assert utc_time(None) is None
    # stored times are whole milliseconds: a finer bound is rounded up, so >= and < stay exact against them
    assert utc_time("2026-03-02T04:30:00.000001+00:00") == "2026-03-02T04:30:00.001+00:00"
    assert utc_time("2026-03-02T04:30:00.002-01:00") == "2026-03-02T05:30:00.002+00:00"
    # an age is that long before now, in the same stored form
    assert utc_time("7d") < utc_time("1h") < facedb.gallery.store.utcnow()
    assert utc_time("7d").endswith("+00:00") and len(utc_time("7d")) == len(A)
    # an unescaped '+' in a URL arrives as a space: read back as the offset it was
    assert utc_time("2026-03-02T13:30:00 09:00") == "2026-03-02T04:30:00.000+00:00"


@pytest.mark.parametrize("bad", ["", "yesterday", "2026-02-30T10:00", "2026-03-02T25:00", "7 days", "-7d",
                                 "0001-01-01T00:00+14:00", "9999-12-31T23:59-14:00", 1772425800, 3.5, b"2026-03-02"])
def test_anything_else_is_a_typed_error_naming_the_option(bad):
    with pytest.raises(InvalidInputError, match=r"^--until takes"):
        utc_time(bad, "--until")


# --------------------------------------------------------------------------------------------- Python API
@pytest.mark.parametrize("since", AT_0430)
def test_api_audit_since_is_an_instant(path, since):
    with FaceDB.open(path, readonly=True) as db:
        assert names(db.audit(since, operation="search")) == ["C", "D"]


def test_api_audit_until_and_windows_across_midnight(path):
    with FaceDB.open(path, readonly=True) as db:
        assert names(db.audit(until="2026-03-01T23:30:00-05:00", operation="search")) == ["A", "B"]
        assert names(db.audit(until="2026-03-02T13:30:00+09:00", operation="search")) == ["A", "B"]
        # 23:30 UTC on 1 March to 04:30 UTC on 2 March, written east and west of UTC
        assert names(db.audit("2026-03-02T08:30:00+09:00", until="2026-03-01T20:30:00-08:00",
                              operation="search")) == ["B"]
        assert names(db.audit(datetime(2026, 3, 2, 14, 0, tzinfo=timezone(timedelta(hours=9))),
                              until=datetime(2026, 3, 2, 0, 1, tzinfo=timezone(timedelta(hours=-5))),
                              operation="search")) == ["C"]
        # since is inclusive (C at 05:00) and until exclusive (D at 15:00), whatever offsets name them
        assert names(db.audit("2026-03-02T00:00:00-05:00", until="2026-03-03T00:00:00+09:00",
                              operation="search")) == ["C"]
        # a finer time than the stored milliseconds: 5:00:00.0005 is after C, not at it
        assert names(db.audit("2026-03-02T05:00:00.000500Z", operation="search")) == ["D"]
        assert names(db.audit(until="2026-03-02T05:00:00.000500Z", operation="search")) == ["A", "B", "C"]
        assert names(db.audit(newest_first=True, since="2026-03-02T09:00:00-05:00", operation="search")) == ["D"]


def test_a_time_written_with_an_offset_is_stored_as_the_utc_instant(tmp_path):
    with FaceDB.create(tmp_path / "db", model_id="m", dim=4, threshold=0.5) as db:
        db.store.append_audit([{"time": "2026-03-01T23:00:00-05:00", "operation": "search", "model_id": "m"},
                               {"time": "2026-03-02T12:30:00+09:00", "operation": "search", "model_id": "m"}], None)
        times = [r.time for r in db.audit(operation="search")]
        assert times == ["2026-03-02T04:00:00.000+00:00", "2026-03-02T03:30:00.000+00:00"]
        assert [r.time for r in db.audit("2026-03-02T04:00:00+00:00", operation="search")] == times[:1]


def test_api_bad_times_are_typed_errors_and_change_nothing(path):
    with FaceDB.open(path) as db:
        before = db.store.conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
        for kw in ({"since": "2026-03-01T23:30:00-05:00x"}, {"until": "tomorrow"}, {"since": 1772425800}):
            with pytest.raises(InvalidInputError):
                db.audit(**kw)
        assert db.store.conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0] == before


# ------------------------------------------------------------------------------------------------- visitors
def seed_visitors(path: Path, monkeypatch) -> None:
    """Two groups of unknown faces: one last seen at 04:00 UTC on 2 March (faces at A and B), one at 05:00
    (faces at C and C + 1 min). Stored through append_unassigned with the clock held at each instant."""
    e = np.eye(FakeEmbedder.dim, dtype=np.float32)
    with FaceDB.open(path) as db, monkeypatch.context() as m:
        db.configure_visitors(enabled=True, retention_days=3650)
        for when, axis in ((A, 0), (B, 0), (C, 1), ("2026-03-02T05:01:00.000+00:00", 1)):
            v = e[axis] + 0.01 * e[axis + 2]
            m.setattr(facedb.gallery.store.visitors, "utcnow", lambda when=when: when)  # the clock visitors stamp with
            db.store.append_unassigned([{"vector": v / np.linalg.norm(v), "actor": "door"}], 3650)


def groups_last_seen(groups) -> list[str]:
    return sorted(g["last_seen"] if isinstance(g, dict) else g.last_seen for g in groups)


@pytest.mark.parametrize("since", ["2026-03-01T23:30:00-05:00", "2026-03-02T13:30:00+09:00",
                                   "2026-03-02T10:00:00+05:30", "2026-03-02T04:30:00Z"])
def test_api_visitors_since_is_an_instant(path, monkeypatch, since):
    seed_visitors(path, monkeypatch)
    with FaceDB.open(path) as db:
        assert groups_last_seen(db.visitors()) == [B, "2026-03-02T05:01:00.000+00:00"]
        assert groups_last_seen(db.visitors(since)) == ["2026-03-02T05:01:00.000+00:00"]
        assert groups_last_seen(db.visitors("2026-03-01T22:59:00-05:00")) == [B, "2026-03-02T05:01:00.000+00:00"]


def test_api_visitors_bad_since_purges_nothing(path, monkeypatch):
    seed_visitors(path, monkeypatch)
    with FaceDB.open(path) as db:
        db.configure_visitors(retention_days=30)  # every kept face is now past retention, not yet purged
        count = "SELECT COUNT(*) FROM unassigned_faces"
        with pytest.raises(InvalidInputError, match="since"):
            db.visitors("03/02/2026")
        assert db.store.conn.execute(count).fetchone()[0] == 4
        assert db.visitors() == [] and db.store.conn.execute(count).fetchone()[0] == 0


# ---------------------------------------------------------------------------------------------------- CLI
def cli(path: Path, *args: str):
    return runner.invoke(app, ["--db", str(path), "--json", *args])


def jnames(result) -> list[str]:
    import json

    assert result.exit_code == 0, result.output
    return [json.loads(line)["identity"] for line in result.stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("since", ["2026-03-01T23:30:00-05:00", "2026-03-02T13:30:00+09:00"])
def test_cli_audit_since_and_until_are_instants(path, since):
    assert jnames(cli(path, "audit", "--operation", "search", "--since", since)) == ["C", "D"]
    assert jnames(cli(path, "audit", "--operation", "search", "--until", since)) == ["A", "B"]
    assert jnames(cli(path, "audit", "--operation", "search", "--since", "2026-03-02T08:30:00+09:00",
                      "--until", "2026-03-01T20:30:00-08:00")) == ["B"]


def test_cli_visitors_since_is_an_instant(path, monkeypatch):
    import json

    seed_visitors(path, monkeypatch)
    res = cli(path, "visitors", "--since", "2026-03-01T23:30:00-05:00")
    assert res.exit_code == 0, res.output
    assert [json.loads(line)["last_seen"] for line in res.stdout.splitlines()] == ["2026-03-02T05:01:00.000+00:00"]


@pytest.mark.parametrize("args", [("audit", "--since", "2026-03-02T25:00"), ("audit", "--until", "last week"),
                                  ("visitors", "--since", "2026-03-01T23:30:00-05:00 EST")])
def test_cli_bad_times_are_one_line_exit_2(path, args):
    res = cli(path, *args)
    assert res.exit_code == 2 and f"{args[1]} takes an ISO time" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output


# -------------------------------------------------------------------------------------------- HTTP, console
@pytest.fixture
def client(path, fake_pipeline):
    app_ = create_app(ServiceSettings(db=path, fold_window=0.0), model=fake_pipeline,
                      sender=lambda url, body, headers: 200)
    with TestClient(app_, raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


@pytest.mark.parametrize("since", ["2026-03-01T23:30:00-05:00", "2026-03-02T13:30:00+09:00",
                                   "2026-03-02T10:00:00+05:30"])
def test_http_audit_since_and_until_are_instants(path, keys, client, since):
    h = {"X-API-Key": keys["admin"]}
    get = lambda **q: client.get("/v1/audit", params={"operation": "search", **q}, headers=h)  # noqa: E731
    assert names(get(since=since).json()["records"]) == ["C", "D"]
    assert names(get(until=since).json()["records"]) == ["A", "B"]
    assert names(get(since="2026-03-02T08:30:00+09:00", until="2026-03-01T20:30:00-08:00").json()["records"]) \
        == ["B"]
    # the read is recorded with the instant it meant
    with FaceDB.open(path, readonly=True) as db:
        assert db.audit(operation="read-audit")[-1].detail["until"] == "2026-03-02T04:30:00.000+00:00"


def test_http_an_unescaped_plus_in_the_url_still_means_the_offset(keys, client):
    h = {"X-API-Key": keys["admin"]}
    r = client.get("/v1/audit?operation=search&since=2026-03-02T13:30:00+09:00", headers=h)
    assert r.status_code == 200 and names(r.json()["records"]) == ["C", "D"]


def test_http_visitors_since_is_an_instant(path, keys, client, monkeypatch):
    seed_visitors(path, monkeypatch)
    h = {"X-API-Key": keys["enroll"]}
    r = client.get("/v1/visitors", params={"since": "2026-03-02T13:30:00+09:00"}, headers=h)
    assert r.status_code == 200 and groups_last_seen(r.json()["groups"]) == ["2026-03-02T05:01:00.000+00:00"]


@pytest.mark.parametrize("route,param,key", [("/v1/audit", "since", "admin"), ("/v1/audit", "until", "admin"),
                                             ("/v1/visitors", "since", "enroll")])
def test_http_bad_times_are_400_json_and_change_nothing(path, keys, client, route, param, key):
    with FaceDB.open(path, readonly=True) as db:
        before = len(db.audit())
    r = client.get(route, params={param: "2026-03-01T23:30:00-05:00 tomorrow"}, headers={"X-API-Key": keys[key]})
    assert r.status_code in (400, 422) and r.json()["error"] and f"{param} takes an ISO time" in r.json()["message"]
    with FaceDB.open(path, readonly=True) as db:  # nothing read, so no read-audit or read-visitors record
        assert all(rec.operation not in ("read-audit", "read-visitors") for rec in db.audit()[before:])


def test_console_decisions_since_is_an_instant(keys, client):
    r = console_login(client, keys["admin"], follow_redirects=True)
    assert r.status_code == 200
    got = client.get("/console/api/decisions", params={"since": "2026-03-01T23:30:00-05:00"}).json()["records"]
    assert names(got) == ["D", "C"]  # newest first
    assert [g["when"] for g in got] == ["2026-03-02 15:00:00 UTC", "2026-03-02 05:00:00 UTC"]
