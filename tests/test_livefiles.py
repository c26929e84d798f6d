"""Issue #23: no file of a live database is opened outside SQLite, so the service, the CLI and the console can
share one database without losing a write they acknowledged.

POSIX drops every fcntl lock a process holds on a file when it closes *any* descriptor of that file. A
``GET /v1/stats`` that read the store's header with ``open()`` left the service's SQLite connection without
locks; the next CLI process then thought it was the last user, checkpointed and deleted the -wal and -shm the
service still wrote into, and the service's later acknowledged writes were lost for good.

Three kinds of test: the reproduction (a real ``facedb serve`` and CLI processes, over HTTP); one probe per
place that used to touch a live file (each leaves this process's locks in place: a second process cannot
take the database exclusively); and a guard that instruments ``open`` while the product runs its whole
repertoire (API, service and console routes) and fails on any open of a live database file not made by
``facedb.gallery.livefiles``.
"""

from __future__ import annotations

import builtins
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pytest

from facedb import FaceDB
from facedb.db import STORE_FILE
from facedb.gallery import livefiles

from .conftest import REPO
from .servicekit import console_login, make_db, real_server

DIM = 16


def vec(i: int) -> np.ndarray:
    v = np.random.default_rng(500 + i).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def cli(db: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "facedb.cli", "--db", str(db), *args], capture_output=True,
                          text=True, cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                          timeout=300)


_PROBE = textwrap.dedent("""
    import sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], timeout=0)
    try:
        mode = conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
        print("TAKEN" if mode == "delete" else "HELD")
    except sqlite3.OperationalError as exc:
        print("HELD" if "locked" in str(exc) else f"ERROR {exc}")
""")


def others_see_it_held(store: Path) -> bool:
    """Whether another process sees that this process still holds the database (its WAL locks): it cannot
    switch the journal out of WAL mode. A process that can is the 'last user' that deletes a live WAL."""
    out = subprocess.run([sys.executable, "-c", _PROBE, str(store)], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() in ("HELD", "TAKEN"), out.stdout + out.stderr
    return out.stdout.strip() == "HELD"


def names(db: Path) -> set[str]:
    with FaceDB.open(db, readonly=True) as d:
        return {p.name for p in d.people()}


# ------------------------------------------------------------------------------------- the reproduction
@pytest.mark.slow
def test_service_writes_survive_stats_and_cli_processes_beside_it(tmp_path):
    """The issue's steps, and the removal sibling, against a real `facedb serve`."""
    db = tmp_path / "db"
    keys = make_db(db, model_id="vec-test", dim=DIM, threshold=0.9)
    h = {"X-API-Key": keys["admin"]}
    with real_server(db, workers=1) as (base, _proc):
        with httpx.Client(base_url=base, headers=h, timeout=60) as c:
            assert c.post("/v1/people", json={"name": "Gone"}).status_code == 201
            assert c.get("/v1/stats").status_code == 200
            assert c.post("/v1/people", json={"name": "Z1"}).status_code == 201
            assert cli(db, "check").returncode == 0
            assert c.post("/v1/people", json={"name": "Z2"}).status_code == 201
            assert c.delete("/v1/people/Gone").status_code == 200
            assert c.get("/v1/stats").status_code == 200
            assert cli(db, "people").returncode == 0
            assert c.post("/v1/people", json={"name": "Z3"}).status_code == 201
            listed = cli(db, "people", "--json")
            assert listed.returncode == 0, listed.stderr
            for name in ("Z1", "Z2", "Z3"):
                assert name in listed.stdout
            assert "Gone" not in listed.stdout
    # the server is gone: what is on disk is what it acknowledged
    assert names(db) == {"Z1", "Z2", "Z3"}
    assert cli(db, "check").returncode == 0


# --------------------------------------------------------------------------------- one probe per place
@pytest.fixture()
def live(tmp_path):
    db = FaceDB.create(tmp_path / "db", model_id="vec-test", dim=DIM, threshold=0.9)
    db.add_templates("Ann", vec(1)[None], create=True)
    assert others_see_it_held(db.root / STORE_FILE)
    yield db
    db.close()


def test_stats_keeps_the_locks(live):
    live.stats()  # the plain-text scan (encryption.plaintext_files)
    assert others_see_it_held(live.root / STORE_FILE)


def test_check_keeps_the_locks(live):
    live.check()
    assert others_see_it_held(live.root / STORE_FILE)


def test_a_second_open_in_the_same_process_keeps_the_locks(live):
    with FaceDB.open(live.root, readonly=True) as again:  # unlock() looks at the store's header
        assert again.people()
    assert others_see_it_held(live.root / STORE_FILE)


def test_the_wal_scan_keeps_the_locks(live):
    from facedb.protection import encryption

    wal = live.root / (STORE_FILE + "-wal")
    assert wal.exists()
    assert encryption._wal_has_plain_pages(wal) in (True, False)
    assert others_see_it_held(live.root / STORE_FILE)


def test_raw_reads_of_a_live_file_reuse_one_parked_descriptor(live):
    store = live.root / STORE_FILE
    before = livefiles.parked_descriptors()
    for _ in range(50):  # a service answering GET /v1/stats for years must not leak a descriptor each time
        live.stats()
    assert livefiles.parked_descriptors() - before <= 3
    assert others_see_it_held(store)


def test_parked_descriptors_close_with_the_last_connection(tmp_path):
    with FaceDB.create(tmp_path / "db", model_id="vec-test", dim=DIM, threshold=0.9) as db:
        db.stats()
        assert livefiles.connections_on(db.root / STORE_FILE) >= 1
    assert livefiles.connections_on(tmp_path / "db" / STORE_FILE) == 0
    fds = {p.name for p in Path("/proc/self/fd").iterdir()}
    held = {os.readlink(f"/proc/self/fd/{f}") for f in fds if Path(f"/proc/self/fd/{f}").exists()}
    assert not any(str(tmp_path / "db" / STORE_FILE) in h for h in held)


def test_a_second_sqlite_library_on_a_live_file_is_refused(tmp_path):
    """sqlite3 and sqlcipher3 bundle two SQLite libraries: neither knows the other's descriptors, so one file
    open through both in one process would lose locks the same way."""
    pytest.importorskip("sqlcipher3")
    from facedb.errors import DatabaseError
    from facedb.gallery.store import ExclusiveCopy

    with FaceDB.create(tmp_path / "db", model_id="vec-test", dim=DIM, threshold=0.9) as db:
        db.add_templates("Ann", vec(1)[None], create=True)
        with pytest.raises(DatabaseError, match="another SQLite library"):
            ExclusiveCopy(db.root / STORE_FILE, None)
        assert others_see_it_held(db.root / STORE_FILE)
        assert [p.name for p in db.people()] == ["Ann"]


def test_encrypting_beside_a_reader_in_the_same_process_changes_nothing(tmp_path, monkeypatch):
    pytest.importorskip("sqlcipher3")
    from facedb.errors import DatabaseError

    root = tmp_path / "db"
    with FaceDB.create(root, model_id="vec-test", dim=DIM, threshold=0.9) as db:
        db.add_templates("Ann", vec(1)[None], create=True)
    monkeypatch.setenv("FACEDB_KEY", "correct horse battery staple, long enough")
    reader = FaceDB.open(root, readonly=True)
    try:
        with pytest.raises(DatabaseError):
            FaceDB.encrypt(root)
        assert [p.name for p in reader.people()] == ["Ann"]
    finally:
        reader.close()
    assert not FaceDB.open(root).encrypted
    assert names(root) == {"Ann"}


# ----------------------------------------------------------------------------- the instrumented guard
@pytest.fixture()
def guard(monkeypatch):
    """Fail on any open of a live database file (or its companions) that does not come from livefiles."""
    breaches: list[str] = []
    real_open, real_io_open, real_os_open = builtins.open, io.open, os.open

    def held() -> set[str]:  # every file this process has a descriptor on (SQLite's own among them)
        out = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                out.add(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        return out

    def live(path) -> bool:
        if isinstance(path, int):
            return False
        p = os.path.abspath(os.fsdecode(path))
        for suffix in livefiles.COMPANIONS:
            if p.endswith(suffix):
                p = p[: -len(suffix)]
        return os.path.basename(p) == STORE_FILE and p in held()

    def caller_ok() -> bool:
        return sys._getframe(2).f_globals.get("__name__") == "facedb.gallery.livefiles"

    def checked(real):
        def opener(file, *args, **kwargs):
            if live(file) and not caller_ok():
                breaches.append(f"{file} opened by {sys._getframe(1).f_code.co_filename}:"
                                f"{sys._getframe(1).f_lineno}")
            return real(file, *args, **kwargs)
        return opener

    monkeypatch.setattr(builtins, "open", checked(real_open))
    monkeypatch.setattr(io, "open", checked(real_io_open))
    monkeypatch.setattr(os, "open", checked(real_os_open))
    yield breaches


def test_no_product_path_opens_a_live_file(tmp_path, guard, monkeypatch):
    """The Python API's whole repertoire on a live database, with a second connection held open all along."""
    root = tmp_path / "db"
    db = FaceDB.create(root, model_id="vec-test", dim=DIM, threshold=0.9)
    other = FaceDB.open(root, readonly=True)
    try:
        for i in range(6):
            db.add_templates(f"P{i}", np.stack([vec(i), vec(i + 100)]), create=True)
        db.identify(vec(1))
        db.verify(vec(2), "P2")
        db.rename_person("P0", "Q0")
        db.remove_person("P1")
        db.stats()
        db.check()
        db.save_index()
        db.vacuum()
        list(db.audit())
        other.stats()
        other.check()
        with FaceDB.open(root, readonly=True) as third:
            third.stats()
    finally:
        other.close()
        db.close()
    assert guard == []


def test_no_service_or_console_route_opens_a_live_file(tmp_path, guard, fake_pipeline):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from facedb.service.app import create_app
    from facedb.service.config import ServiceSettings

    from .servicekit import RED, png, wait_ready

    db = tmp_path / "db"
    keys = make_db(db)
    app = create_app(ServiceSettings(db=db, fold_window=0.0), model=fake_pipeline, sender=lambda *a: 200)
    with TestClient(app) as client:
        wait_ready(client)
        h = {"X-API-Key": keys["admin"]}
        r = client.post("/v1/people/Ann/templates", files=[("photos", ("a.png", png([RED]), "image/png"))],
                        headers=h)
        assert r.status_code == 201, r.text
        assert client.post("/v1/identify", files={"photo": ("a.png", png([RED]), "image/png")},
                           headers=h).status_code == 200
        for route in ("/v1/stats", "/v1/check", "/v1/audit", "/v1/settings", "/v1/keys", "/v1/hooks",
                      "/v1/people", "/v1/visitors"):
            assert client.get(route, headers=h).status_code == 200, route
        assert console_login(client, keys["admin"]).status_code == 200
        for page in ("/console/", "/console/settings", "/console/people", "/console/people/Ann",
                     "/console/decisions", "/console/visitors", "/console/identify", "/console/enrol"):
            assert client.get(page).status_code == 200, page
        assert client.delete("/v1/people/Ann", headers=h).status_code == 200
    assert guard == []


def test_no_encryption_path_opens_a_live_file(tmp_path, guard):
    """Encrypted databases: open, stats and check beside a second connection; encrypt and re-encrypt (which
    hold the file exclusively and overwrite the replaced original)."""
    pytest.importorskip("sqlcipher3")
    from facedb.protection.keyring import generate_key

    key = generate_key()
    enc = tmp_path / "enc"
    with FaceDB.create(enc, model_id="vec-test", dim=DIM, threshold=0.9, key=key) as db:
        db.add_templates("Ann", vec(1)[None], create=True)
        with FaceDB.open(enc, key=key, readonly=True) as other:
            assert other.stats().plaintext_files == []
            assert db.check().ok
    FaceDB.rotate_key(enc, key=key, reencrypt=True)
    plain = tmp_path / "plain"
    with FaceDB.create(plain, model_id="vec-test", dim=DIM, threshold=0.9) as db:
        db.add_templates("Bob", vec(2)[None], create=True)
    FaceDB.encrypt(plain, key=key)
    for root, name in ((enc, "Ann"), (plain, "Bob")):
        with FaceDB.open(root, key=key) as db:
            assert [p.name for p in db.people()] == [name] and db.check().ok
    assert guard == []


def test_a_connection_collected_in_the_middle_of_a_raw_read_does_not_close_its_descriptor(tmp_path):
    """CI found `read_all` failing with EBADF: a connection dropped without close() (a failed open) is released
    by its __del__ whenever the collector runs, which closed the parked descriptor a raw read was using (and the
    number could have been reused for another file). It is now closed when that read ends."""
    import gc
    import sqlite3

    path = tmp_path / "x.sqlite3"
    conn = livefiles.connect(sqlite3, path)
    conn.execute("CREATE TABLE t (v)")
    conn.execute("INSERT INTO t VALUES (zeroblob(70000))")
    conn.commit()
    with livefiles.raw_fd(path) as fd:
        del conn
        gc.collect()  # the tracked connection's __del__ releases the file here, inside the block
        assert livefiles.connections_on(path) == 0
        assert len(os.pread(fd, 100, 0)) == 100 and os.pread(fd, 16, 0).startswith(b"SQLite format 3")
    with pytest.raises(OSError):
        os.fstat(fd)  # closed when the block ended


@pytest.mark.parametrize("folder", ["door#3", "gate?b=1", "50%25 off", "a b"])
def test_a_database_folder_whose_name_holds_uri_characters(tmp_path, folder):
    """Read-only connections open the file as a SQLite URI, where '#' starts a fragment and '?' a query: a folder
    named "door#3" was opened as the file "door" beside it (created empty: a stray file outside the database)
    and the first search failed with "no such table: meta" (found by the docs test, whose FACEDB_DB then held
    a comment). The path is percent-encoded now."""
    v = np.eye(8, dtype=np.float32)[:3]
    root = tmp_path / folder / "db"
    with FaceDB.create(root, model_id="uri-test", dim=8, threshold=0.5) as d:
        d.add_templates("ann", v[:2], create=True)
        d.add_templates("bob", v[2:], create=True)
        assert d.identify(v[2]).identity == "bob"
    with FaceDB.open(root, readonly=True) as d:
        assert d.identify(v[0]).identity == "ann" and d.check().ok
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder]  # nothing written beside the folder
