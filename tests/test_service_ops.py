"""Running the service for years (issue #28): Prometheus metrics at /metrics, JSON request logs, the systemd
unit. Metrics are read back with prometheus_client's own parser; counters are checked to move by exactly what
the requests made, never by how long anything took."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from facedb import FaceDB

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from facedb.service.app import create_app
from facedb.service.config import ServiceSettings
from facedb.service.logs import JsonFormatter

from .conftest import REPO
from .servicekit import BLUE, RED, make_db, png, ready_on_all_workers, real_server, snapshot, wait_ready

NAME = "Zebulon Quartermaine"  # a name no log line may hold


def hdr(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def scrape(client, key: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from /metrics, parsed by prometheus_client's parser."""
    r = client.get("/metrics", headers=hdr(key))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def svc(tmp_path, fake_pipeline):
    path = tmp_path / "db"
    keys = make_db(path)
    sent: list[str] = []

    def sender(url, body, headers):  # a receiver that refuses every delivery for good (400: not retried)
        sent.append(url)
        return 400

    app = create_app(ServiceSettings(db=path, fold_window=0.0, log_format="json"), model=fake_pipeline,
                     sender=sender)
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client, keys, path, app


def test_metrics_count_decisions_enrolments_refusals_and_stages(svc):
    client, keys, _, _ = svc
    files = [("photos", (f"{NAME}-{i}.png", png([RED], i), "image/png")) for i in (1, 2)]
    assert client.post(f"/v1/people/{NAME}/templates", files=files, headers=hdr(keys["enroll"])).status_code == 201
    before = scrape(client, keys["admin"])
    assert value(before, "facedb_enrolments_total") == 1 and value(before, "facedb_templates_enrolled_total") == 2
    assert value(before, "facedb_model_info", model="fake-colour", index_kind="flat") == 1
    assert value(before, "facedb_workers_ready") == 1

    r = client.post("/v1/identify", files={"photo": ("door.png", png([RED, BLUE], 7))}, headers=hdr(keys["identify"]))
    assert [f["identity"] for f in r.json()["faces"]] == [NAME, None]  # one face matched, one unknown
    r = client.post("/v1/verify", files={"photo": ("p.png", png([RED], 8))}, data={"person": NAME},
                    headers=hdr(keys["identify"]))
    assert r.json()["accepted"] is True
    assert client.get("/v1/stats", headers=hdr("fdb_wrong_key")).status_code == 401
    assert client.get("/v1/stats").status_code == 401
    assert client.get("/v1/stats", headers=hdr(keys["identify"])).status_code == 403
    after = scrape(client, keys["admin"])

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert {o: moved("facedb_decisions_total", outcome=o) for o in ("match", "unknown", "accept", "reject")} == {
        "match": 1, "unknown": 1, "accept": 1, "reject": 0}
    assert {r: moved("facedb_auth_failures_total", reason=r) for r in ("missing", "invalid", "revoked", "scope")} == {
        "missing": 1, "invalid": 1, "revoked": 0, "scope": 1}
    # one identify photo and one verify photo: each was detected and embedded; the identify searched the index
    # and both decided
    assert moved("facedb_stage_seconds_count", stage="detect") == 2
    assert moved("facedb_stage_seconds_count", stage="embed") == 2
    assert moved("facedb_stage_seconds_count", stage="search") == 1
    assert moved("facedb_stage_seconds_count", stage="decide") == 2
    assert moved("facedb_http_request_duration_seconds_count", method="POST", route="/v1/identify",
                 status="200") == 1
    assert moved("facedb_http_request_duration_seconds_count", method="GET", route="/v1/stats", status="401") == 2
    # no person's name in any metric (route templates, not paths)
    assert NAME not in client.get("/metrics", headers=hdr(keys["admin"])).text
    assert "{name" in client.get("/metrics", headers=hdr(keys["admin"])).text  # the enrolment's route template


#: one route of each scope's own, and what it needs
SCOPE_ROUTES = {"identify": ("POST", "/v1/identify/vector"), "enroll": ("GET", "/v1/people"),
                "admin": ("GET", "/v1/stats"), "metrics": ("GET", "/metrics")}
#: key scope -> the scopes' routes it reaches (the rest: 403)
SCOPE_TABLE = {"identify": {"identify"}, "enroll": {"identify", "enroll"},
               "admin": {"identify", "enroll", "admin", "metrics"}, "metrics": {"metrics"}}


def test_scope_table_a_metrics_key_scrapes_and_does_nothing_else(svc):
    """Every scope's key against one route of every scope: a metrics key (a Prometheus server's) reaches
    /metrics and nothing else, an admin key everything; no other key scrapes. Each refusal is a 403 recorded as
    denied under the key's id, and changes nothing."""
    client, keys, path, _ = svc
    with FaceDB.open(path) as db:
        record, keys["metrics"] = db.create_api_key("metrics", "prometheus")
    assert record.scope == "metrics"
    before = snapshot(path)
    got: dict[str, set[str]] = {}
    for scope, key in keys.items():
        got[scope] = set()
        for route, (method, url) in SCOPE_ROUTES.items():
            r = client.request(method, url, headers=hdr(key),
                               **({"json": {"vector": np.eye(32)[0].tolist()}} if method == "POST" else {}))
            assert r.status_code in (200, 403), (scope, url, r.status_code, r.text)
            if r.status_code == 200:
                got[scope].add(route)
            else:
                assert r.json()["error"] == "PermissionDeniedError", r.text
    assert got == SCOPE_TABLE
    assert client.get("/metrics").status_code == 401
    with FaceDB.open(path, readonly=True) as db:
        denied = [r.detail["path"] for r in db.audit(operation="denied", actor=f"key:{record.id}")]
    assert sorted(denied) == ["/v1/identify/vector", "/v1/people", "/v1/stats"]
    after = snapshot(path)
    assert after["counts"] == before["counts"] and after["people"] == before["people"]


def test_metrics_keys_from_the_cli_and_a_database_made_before_them(tmp_path):
    """`facedb keys create --scope metrics`; a database of schema 12 (keys' CHECK without 'metrics', a webhook
    tied to a key) is migrated on open: its keys and webhooks kept, foreign keys intact, metrics keys allowed."""
    import sqlite3

    from facedb.store import SCHEMA_VERSION

    from .test_livefiles import cli

    root = tmp_path / "db"
    with FaceDB.create(root, model_id="vec-test", dim=8, threshold=0.5) as db:
        door, _ = db.create_api_key("identify", "door", ["candidates"])
        db.create_api_key("admin", "ops")
        hook = db.add_webhook("http://127.0.0.1:9/hook", ["*"], key_id=door.id)
        db.revoke_api_key(door.id)
        kept = ([k.to_dict() for k in db.api_keys()], [h.to_dict() for h in db.webhooks()])
    conn = sqlite3.connect(root / "facedb.sqlite3")  # back to schema 12: the table as migration 6 and 12 made it
    conn.executescript("""
        PRAGMA foreign_keys = OFF;
        BEGIN;
        CREATE TABLE old_keys AS SELECT * FROM api_keys;
        DROP TABLE api_keys;
        CREATE TABLE api_keys (id TEXT PRIMARY KEY, name TEXT,
            scope TEXT NOT NULL CHECK (scope IN ('identify', 'enroll', 'admin')), key_hash TEXT NOT NULL,
            created_at TEXT NOT NULL, revoked_at TEXT, grants TEXT NOT NULL DEFAULT '');
        INSERT INTO api_keys SELECT * FROM old_keys;
        DROP TABLE old_keys;
        CREATE UNIQUE INDEX api_keys_live_name ON api_keys(name) WHERE revoked_at IS NULL;
        PRAGMA user_version = 12;
        COMMIT;
    """)
    conn.close()
    res = cli(root, "--json", "keys", "create", "--scope", "metrics", "--name", "prometheus")
    assert res.returncode == 0, res.stderr
    made = json.loads(res.stdout)
    with FaceDB.open(root, readonly=True) as db:
        assert db.store.version == SCHEMA_VERSION
        assert [k.to_dict() for k in db.api_keys() if k.name != "prometheus"] == kept[0]
        assert [h.to_dict() for h in db.webhooks()] == kept[1] and kept[1][0]["key_id"] == hook.key_id
        assert [k.scope for k in db.api_keys() if k.name == "prometheus"] == ["metrics"]
        assert db.store.conn.execute("PRAGMA foreign_key_check").fetchall() == []
        tables = {r[0] for r in db.store.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "api_keys_v12" not in tables
    assert made["scope"] == "metrics"
    bad = cli(root, "keys", "create", "--scope", "metric")
    assert bad.returncode == 2


def test_metrics_webhook_failures_queue_and_generation_lag(svc):
    client, keys, path, app = svc
    assert client.post("/v1/hooks", json={"url": "http://127.0.0.1:9/hook", "events": ["*"]},
                       headers=hdr(keys["admin"])).status_code == 201
    before = scrape(client, keys["admin"])
    client.post("/v1/people/Ann/vectors", json={"vectors": [np.eye(32)[0].tolist()]}, headers=hdr(keys["enroll"]))
    client.post("/v1/identify/vector", json={"vector": np.eye(32)[0].tolist()}, headers=hdr(keys["identify"]))
    dispatcher = app.state.facedb.dispatcher
    assert dispatcher.wait_idle(30)
    after = scrape(client, keys["admin"])
    # person.enrolled and identify.match, each refused for good by the receiver (400: no retry)
    assert value(after, "facedb_webhook_deliveries_total", result="failed") - \
        value(before, "facedb_webhook_deliveries_total", result="failed") == 2
    assert value(after, "facedb_webhook_deliveries_total", result="delivered") == 0
    assert value(after, "facedb_webhook_queue_depth") == 0
    assert value(after, "facedb_index_generation_lag") == 0

    # a change made by another process (the CLI) moves the store on; this worker's index catches up at its
    # next query, and the gauge says how far behind it is until then
    with FaceDB.open(path) as db:
        db.add_templates("Ann", np.eye(32, dtype=np.float32)[1:3])
        db.add_person("Bob")
        db.add_templates("Bob", np.eye(32, dtype=np.float32)[3:4])
        generation = db.settings().generation
    lagging = scrape(client, keys["admin"])
    assert value(lagging, "facedb_store_generation") == generation
    assert value(lagging, "facedb_index_generation_lag") >= 1
    client.post("/v1/identify/vector", json={"vector": np.eye(32)[3].tolist()}, headers=hdr(keys["identify"]))
    assert value(scrape(client, keys["admin"]), "facedb_index_generation_lag") == 0


def test_json_request_log_has_ids_route_templates_and_no_names(svc):
    client, keys, _, _ = svc
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("facedb.access")
    access.addHandler(handler)
    old_level = access.level
    access.setLevel(logging.INFO)
    try:
        enrolled = client.post(f"/v1/people/{NAME}/templates", files=[("photos", ("a.png", png([RED], 1)))],
                               headers={**hdr(keys["enroll"]), "X-Request-Id": "door-3:req-42"})
        shown = client.get(f"/v1/people/{NAME}", headers=hdr(keys["enroll"]))
        forged = client.get("/health", headers={"X-Request-Id": 'x" \\n{"status": 200}'})
        refused = client.get(f"/v1/people/{NAME}", headers=hdr("fdb_not_a_key"))
        missing = client.get("/v1/people/Nobody%20Here", headers=hdr(keys["enroll"]))
    finally:
        access.removeHandler(handler)
        access.setLevel(old_level)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["method"], e["route"], e["status"]) for e in lines] == [
        ("POST", "/v1/people/{name:path}/templates", 201), ("GET", "/v1/people/{name:path}", 200),
        ("GET", "/health", 200), ("GET", "/v1/people/{name:path}", 401), ("GET", "/v1/people/{name:path}", 404)]
    with FaceDB.open(svc[2], readonly=True) as db:
        key_ids = {k.name: k.id for k in db.api_keys()}
    assert [e["key_id"] for e in lines] == [key_ids["enroll-key"], key_ids["enroll-key"], None, None,
                                           key_ids["enroll-key"]]
    for entry, response in zip(lines, (enrolled, shown, forged, refused, missing)):
        assert set(entry) >= {"time", "level", "request_id", "method", "route", "status", "duration_ms", "key_id",
                              "worker"}
        assert entry["duration_ms"] >= 0 and entry["time"].endswith("+00:00")
        assert response.headers["x-request-id"] == entry["request_id"]
    assert lines[0]["request_id"] == "door-3:req-42"  # the caller's id, honoured
    assert lines[2]["request_id"] != lines[1]["request_id"] and '"' not in lines[2]["request_id"]  # replaced
    text = out.getvalue()
    assert NAME not in text and "Zebulon" not in text and "Nobody" not in text
    assert not any(secret in text for secret in keys.values())  # key ids, never keys


def test_text_log_format_writes_no_access_lines_of_its_own(tmp_path, fake_pipeline):
    path = tmp_path / "db"
    keys = make_db(path)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    access = logging.getLogger("facedb.access")
    access.addHandler(handler)
    try:
        with TestClient(create_app(ServiceSettings(db=path), model=fake_pipeline)) as client:
            wait_ready(client)
            r = client.get("/v1/people", headers=hdr(keys["enroll"]))
    finally:
        access.removeHandler(handler)
    assert r.status_code == 200 and len(r.headers["x-request-id"]) == 32  # the id is there in either format
    assert out.getvalue() == ""  # uvicorn's own access line is the text format's


def test_log_format_is_checked():
    from facedb.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="log format"):
        ServiceSettings(log_format="xml")
    assert ServiceSettings.from_env({"FACEDB_LOG_FORMAT": "JSON"}).log_format == "json"
    assert ServiceSettings.from_env(ServiceSettings(log_format="json").to_env()).log_format == "json"


def test_help_imports_neither_prometheus_nor_fastapi():
    code = ("import sys\nfrom facedb.cli import app\n"
            "for args in (['--help'], ['serve', '--help']):\n"
            "    try:\n        app(args)\n    except SystemExit:\n        pass\n"
            "heavy = sorted(m for m in ('prometheus_client', 'fastapi', 'uvicorn') if m in sys.modules)\n"
            "print('heavy:', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert "heavy: []" in out.stdout and "--log-format" in out.stdout


@pytest.mark.slow
def test_two_workers_scrape_adds_up_every_worker_and_logs_json(tmp_path):
    """A real `facedb serve --workers 2 --log-format json`: the decisions made through both workers are all in
    one scrape (multiprocess mode), every request line is JSON, and the metrics directory is gone after."""
    db = tmp_path / "db"
    keys = make_db(db)
    with FaceDB.open(db) as d:
        d.add_person("Ann")
        d.add_templates("Ann", np.eye(32, dtype=np.float32)[:1])
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {"FACEDB_LOG_FORMAT": "json", "TMPDIR": str(scratch)}
    with real_server(db, workers=2, env=env, log_level="info") as (base, _):
        assert len(ready_on_all_workers(base, 2)) == 2
        assert len(list(scratch.glob("facedb-metrics-*"))) == 1  # this run's own, under the server's TMPDIR
        pids: set[int] = set()
        n = 0
        while len(pids) < 2 or n < 10:  # new connections: the kernel spreads them over the workers
            r = httpx.post(f"{base}/v1/identify/vector", json={"vector": np.eye(32)[0].tolist()},
                           headers=hdr(keys["identify"]), timeout=10)
            assert r.status_code == 200 and r.json()["results"][0]["identity"] == "Ann"
            pids.add(int(r.headers["x-facedb-worker"]))
            n += 1
            assert n < 400, "the requests never reached both workers"
        text = httpx.get(f"{base}/metrics", headers=hdr(keys["admin"]), timeout=10).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert value(samples, "facedb_decisions_total", outcome="match") == n  # both workers' counts, added up
    assert value(samples, "facedb_stage_seconds_count", stage="search") == n
    assert value(samples, "facedb_workers_ready") == 2
    assert not list(scratch.glob("facedb-metrics-*"))  # removed when the server stopped
    log = Path(f"{db}.serve.log").read_text()
    entries = [json.loads(line) for line in log.splitlines() if line.strip()]  # every line: uvicorn's too
    requests = [e for e in entries if e["logger"] == "facedb.access"]
    routes = {(e["route"], e["worker"]) for e in requests}
    assert {w for r, w in routes if r == "/v1/identify/vector"} == pids
    assert "Ann" not in log


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian package systemd)")
def test_systemd_unit_verifies(tmp_path):
    """deploy/facedb.service passes `systemd-analyze verify` with no complaint. Its ExecStart names where the
    README installs facedb (/opt/facedb/.venv); verify checks that the program exists, so the copy checked
    here points at this checkout's facedb instead, and nothing else is changed."""
    unit = (REPO / "deploy" / "facedb.service").read_text()
    installed = "/opt/facedb/.venv/bin/facedb"
    assert f"ExecStart={installed} serve" in unit
    here = Path(sys.executable).parent / "facedb"
    assert here.exists()
    checked = tmp_path / "facedb.service"
    checked.write_text(unit.replace(installed, str(here)))
    out = subprocess.run([SYSTEMD_ANALYZE, "verify", str(checked)], capture_output=True, text=True,
                         env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"})
    complaints = [line for line in (out.stdout + out.stderr).splitlines() if "facedb.service" in line]
    assert out.returncode == 0 and not complaints, out.stdout + out.stderr
    env = (REPO / "deploy" / "facedb.env").read_text()
    settings = dict(line.split("=", 1) for line in env.splitlines() if line and not line.startswith("#"))
    assert {"FACEDB_DB", "FACEDB_PORT", "FACEDB_WORKERS", "FACEDB_HOST"} <= set(settings)
    assert settings["FACEDB_DB"].startswith("/var/lib/facedb/")  # inside the unit's only writable directory
    for option in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "Restart=on-failure",
                   "User=facedb", "EnvironmentFile=/etc/facedb/facedb.env", "ReadWritePaths=/var/lib/facedb"):
        assert option in unit.splitlines()
    ServiceSettings.from_env(settings)  # every value there is one `facedb serve` accepts
