"""Running the service for years (issue #28): Prometheus metrics at /metrics, JSON request logs, the systemd
unit. Metrics are read back with prometheus_client's own parser; counters are checked to move by exactly what
the requests made, never by how long anything took."""

from __future__ import annotations

import io
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
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
from .servicekit import (
    BLUE,
    RED,
    free_port,
    make_db,
    png,
    ready_on_all_workers,
    real_server,
    snapshot,
    wait_ready,
)

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

    app = create_app(ServiceSettings(db=path, fold_window=0.0, log_format="json", allow_private_hooks=True),
                     model=fake_pipeline, sender=sender)  # (a webhook on 127.0.0.1: allowed here)
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

    from facedb.gallery.store import SCHEMA_VERSION

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
    granted = cli(root, "keys", "create", "--scope", "metrics", "--grant", "candidates")  # it sees no answers
    assert granted.returncode == 2 and "reads GET /metrics only" in granted.stderr, granted.stderr


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
                   "User=facedb", "EnvironmentFile=/etc/facedb/facedb.env", "ReadWritePaths=/var/lib/facedb",
                   "SystemCallErrorNumber=EPERM"):
        assert option in unit.splitlines()
    assert not [line for line in unit.splitlines() if line.startswith(("ProcSubset=", "MemoryDenyWriteExecute="))]
    ServiceSettings.from_env(settings)  # every value there is one `facedb serve` accepts


# ------------------------------------------------------------------------------------- graceful shutdown
def _unit_rows(seed: int, n: int, dim: int = 32) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class _Held:
    """One request sent on a raw socket up to the middle of its body, finished later: a request the server
    is reading when SIGTERM arrives."""

    def __init__(self, port: int, path: str, key: str, body: dict) -> None:
        import socket

        self.body = json.dumps(body).encode()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {key}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(self.body)}\r\n\r\n").encode()
        self.sock.sendall(head + self.body[:20])

    def finish(self) -> tuple[int, dict]:
        """Send the rest of the body; the status and the JSON answer."""
        self.sock.sendall(self.body[20:])
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            assert chunk, f"the connection closed before an answer: {data!r}"
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(rest) < int(headers["content-length"]):
            chunk = self.sock.recv(65536)
            assert chunk, "the connection closed in the middle of an answer"
            rest += chunk
        self.sock.close()
        return int(lines[0].split()[1]), json.loads(rest)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_under_load_drains_in_flight_requests_and_loses_nothing_acknowledged(tmp_path, workers):
    """`facedb serve` gets SIGTERM (to the main process only, as systemd's KillMode=mixed sends it) while four
    clients enrol and identify, once they have had 40 answers (a count of work, not a time). The database's
    audit trail uses the background writer (decision records committed after the answer), so the workers must
    flush it as they stop. Two requests are in the middle of their bodies when the signal lands (sent on raw
    sockets, finished once the server logs that it waits for connections): both must be answered. Then, at
    rest and after a restart: every acknowledged (2xx) enrolment is there whole, byte for byte, and identified;
    every acknowledged identify has its audit record; a request cut off by the shutdown (a connection error:
    the only other outcome allowed) is either wholly there or not at all; `check` passes."""
    import signal
    import threading

    db = tmp_path / "db"
    keys = make_db(db, sync_audit=False)
    anchors = _unit_rows(1, 400)
    with FaceDB.open(db) as d:
        assert d.settings().audit.sync is False
        for j, v in enumerate(anchors):
            d.add_templates(f"A{j:04d}", v[None], create=True)
        gate = d.create_api_key("identify", "gate", ["candidates"])  # full answers, no door pace limit
    gate_id, gate_key = gate[0].id, gate[1]

    lock = threading.Lock()
    enrolled: dict[str, np.ndarray] = {}  # acknowledged
    identified: list[int] = []  # acknowledged identifies, by anchor
    doubt_enrol: dict[str, np.ndarray] = {}
    doubt_identify: list[int] = []
    problems: list[str] = []
    acks = threading.Semaphore(0)
    terminated = threading.Event()
    next_anchor = iter(range(len(anchors)))

    def client(c: int, base: str) -> None:
        with httpx.Client(base_url=base, timeout=120) as http:
            for i in range(10_000):
                enrol = (c + i) % 2 == 0
                if enrol:
                    name, vectors = f"E{c}-{i:04d}", _unit_rows(1000 * c + i + 10, 2)
                    call = ("POST", f"/v1/people/{name}/vectors", keys["enroll"], {"vectors": vectors.tolist()})
                else:
                    with lock:
                        j = next(next_anchor, None)
                    if j is None:
                        return
                    call = ("POST", "/v1/identify/vector", gate_key, {"vector": anchors[j].tolist()})
                try:
                    r = http.request(call[0], call[1], headers=hdr(call[2]), json=call[3])
                except httpx.TimeoutException as exc:
                    with lock:
                        problems.append(f"{call[1]}: hung ({exc!r})")
                    return
                except httpx.TransportError as exc:  # refused or cut off: in doubt, never half-applied
                    with lock:
                        if not terminated.is_set():
                            problems.append(f"{call[1]}: connection error before SIGTERM ({exc!r})")
                        if enrol:
                            doubt_enrol[name] = vectors
                        else:
                            doubt_identify.append(j)
                    return  # the server is going: this client is done
                with lock:
                    if enrol and r.status_code == 201:
                        enrolled[name] = vectors
                    elif not enrol and r.status_code == 200 and r.json()["results"][0]["identity"] == f"A{j:04d}":
                        identified.append(j)
                    else:
                        problems.append(f"{call[1]}: {r.status_code} {r.text[:200]}")
                        return
                acks.release()

    # In the server's processes (a sitecustomize of the test's own) the background writer waits an hour, not
    # 20 ms, before it commits: the decisions answered after the last enrolment (a gallery change commits what
    # waits) reach the disk only through the flush at shutdown. Each process notes that it took the change.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\nimport facedb.operations.audit\nfacedb.operations.audit.FLUSH_DELAY_S = 3600.0\n"
        f"open({str(hook / 'took')!r}, 'a').write(f'{{os.getpid()}}\\n')\n")
    # the held bodies wait out the load (a count of answers, however long a loaded machine takes): no body
    # timeout (FACEDB_BODY_TIMEOUT, 30 s by default) may cut them first
    env = {"FACEDB_HOOK_FOLD_SECONDS": "0", "FACEDB_BODY_TIMEOUT": "3600", "PYTHONPATH": f"{hook}{os.pathsep}{REPO}"}
    with real_server(db, workers=workers, env=env, log_level="info") as (base, proc):
        if workers > 1:
            assert len(ready_on_all_workers(base, workers)) == workers
        port = int(base.rsplit(":", 1)[1])
        held_enrol = _Held(port, "/v1/people/Held/vectors", keys["enroll"], {"vectors": _unit_rows(7, 2).tolist()})
        held_identify = _Held(port, "/v1/identify/vector", gate_key, {"vector": anchors[399].tolist()})
        threads = [threading.Thread(target=client, args=(c, base), daemon=True) for c in range(4)]
        for t in threads:
            t.start()
        for _ in range(40):
            assert acks.acquire(timeout=300), f"the load stalled: {problems}"
        terminated.set()
        os.kill(proc.pid, signal.SIGTERM)  # the main process only (systemd's KillMode=mixed)
        log = Path(f"{db}.serve.log")
        while "Waiting for connections to close" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        assert held_enrol.finish()[0] == 201
        status, answer = held_identify.finish()
        assert status == 200 and answer["results"][0]["identity"] == "A0399"
        # uvicorn stops cleanly and then re-raises the signal it caught, so the process ends "killed by SIGTERM",
        # which systemd counts as a clean stop (no restart under Restart=on-failure); 0 is clean too
        assert proc.wait(timeout=120) in (0, -signal.SIGTERM), log.read_text()
        for t in threads:
            t.join(timeout=120)
            assert not t.is_alive()
    text = log.read_text()
    assert len(set((hook / "took").read_text().split())) >= workers + (workers > 1)  # the server, its workers
    assert problems == [], problems
    assert "Traceback" not in text and "timeout graceful shutdown exceeded" not in text, text
    enrolled["Held"] = _unit_rows(7, 2)
    identified.append(399)
    assert len(enrolled) >= 10 and len(identified) >= 10  # both kinds of work were under way

    with FaceDB.open(db, readonly=True) as d:
        assert d.check().ok
        stored: dict[str, list[bytes]] = {}
        for t in d.templates():
            stored.setdefault(t.person, []).append(t.vector.tobytes())
        for name, vectors in enrolled.items():
            assert stored.get(name) == [v.tobytes() for v in vectors], name
        for name, vectors in doubt_enrol.items():  # cut off: all there, or nothing
            assert stored.get(name) in (None, [v.tobytes() for v in vectors]), name
        trail = d.audit(operation="identify", actor=f"key:{gate_id}")
        recorded = [r.identity for r in trail]
        for j in identified:
            assert f"A{j:04d}" in recorded, f"acknowledged identify of A{j:04d} has no audit record"
        assert len(recorded) == len(set(recorded)) <= len(identified) + len(doubt_identify)
        enroll_id = next(k.id for k in d.api_keys() if k.name == "enroll-key")
        added = {r.identity for r in d.audit(operation="add-templates", actor=f"key:{enroll_id}")}
        assert set(enrolled) <= added

    with real_server(db, workers=1) as (base, _):  # restarted: every acknowledged enrolment is identified
        names = sorted(enrolled)
        probes = [enrolled[n][0].tolist() for n in names]
        r = httpx.post(f"{base}/v1/identify/vector", json={"vectors": probes, "k": 1},
                       headers=hdr(keys["enroll"]), timeout=60)
        assert r.status_code == 200, r.text
        assert [a["identity"] for a in r.json()["results"]] == names


@pytest.mark.slow
def test_the_units_sandbox_lets_facedb_load_its_model_answer_and_stop(tmp_path):
    """`systemd-analyze verify` checks the unit's syntax, not that facedb can run inside it. Here `facedb serve`
    runs with the unit's settings file (2 workers, JSON logs) inside what the unit does to a process, emulated
    (tests/unit_sandbox.py: its system-call filter through libseccomp from systemd's own group lists, its /proc
    in a namespace): it loads dlib-resnet and MTCNN, answers an identify, stops on SIGTERM, and writes nothing
    but JSON lines. Found this way: the unit as first written killed facedb at `import numpy` (mbind, in
    @resources, with no SystemCallErrorNumber=), and its ProcSubset=pid hid /proc/cpuinfo from PyTorch (a
    warning on every convolution)."""
    import signal

    from . import unit_sandbox
    from .conftest import test_data_dir
    from .test_livefiles import cli

    why = unit_sandbox.available()
    if why is not None:
        pytest.skip(why)
    unit = REPO / "deploy" / "facedb.service"
    db = tmp_path / "db"
    assert cli(db, "init", "--model", "dlib-resnet").returncode == 0
    with FaceDB.open(db) as d:
        key = d.create_api_key("identify", "door", ["candidates"])[1]
    settings = dict(line.split("=", 1) for line in (REPO / "deploy" / "facedb.env").read_text().splitlines()
                    if line and not line.startswith("#"))
    port = free_port()
    env = {**os.environ, **settings, "FACEDB_DB": str(db), "FACEDB_PORT": str(port), "FACEDB_HOST": "127.0.0.1",
           "PYTHONPATH": str(REPO)}
    serve = [sys.executable, str(REPO / "tests" / "unit_sandbox.py"), str(unit), "--", sys.executable, "-m",
             "facedb.cli", "serve"]
    options = unit_sandbox.proc_options(unit)
    inner = " ".join(shlex.quote(a) for a in serve)
    if options:
        inner = f"mount -t proc -o {options} proc /proc && exec {inner}"
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["unshare", "--mount", "--pid", "--fork", "sh", "-c", inner], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # a hang guard: loading two workers' models is the work waited for
        while True:
            assert proc.poll() is None, f"facedb died in the unit's sandbox: {log_path.read_text()}"
            try:
                if httpx.get(f"{base}/ready", timeout=5).json().get("model_loaded"):
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        photos = sorted((test_data_dir() / "lfw_deepfunneled" / "George_W_Bush").glob("*.jpg"))[:1]
        if photos:
            r = httpx.post(f"{base}/v1/identify", files={"photo": ("p.jpg", photos[0].read_bytes())},
                           headers=hdr(key), timeout=120)
            assert r.status_code == 200 and len(r.json()["faces"]) == 1, r.text  # detected and embedded
        else:  # no photos here: MTCNN still runs on a synthetic one
            r = httpx.post(f"{base}/v1/identify", files={"photo": ("p.png", png([RED], 1))}, headers=hdr(key),
                           timeout=120)
            assert r.status_code in (200, 422), r.text
        server = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(server) == 1
        os.kill(int(server[0]), signal.SIGTERM)  # `facedb serve`, PID 1 of its namespace
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    assert lines and all(line.startswith("{") for line in lines), [x for x in lines if not x.startswith("{")][:5]
    assert any("Stopping parent process" in json.loads(line)["message"] for line in lines)
