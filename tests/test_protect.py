"""Template protection: encryption at rest, keys and their rotation, erasure that holds on disk, cancellable
templates. Every test that claims "no byte remains" scans every file of the database directory (WAL, shared
memory, journals, temporary files, the keyring) for the little-endian float32 bytes of known templates, and
first proves the scan finds templates that are there."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from facedb import DatabaseError, FaceDB, InvalidInputError
from facedb.errors import KeyMissingError, TamperedError, TamperedFileWarning, WrongKeyError
from facedb.gallery import livefiles
from facedb.protection.keyring import KEYRING_FILE, generate_key

from .conftest import unit_rows

pytest.importorskip("sqlcipher3", reason="the crypto extra is not installed")
pytest.importorskip("cryptography", reason="the crypto extra is not installed")

DIM = 64
REPO = Path(__file__).resolve().parent.parent


def make(root: Path, key: str | None = None, **kw) -> FaceDB:
    return FaceDB.create(root, model_id="test-model", dim=DIM, threshold=0.5, key=key, **kw)


def template_bytes(vectors: np.ndarray) -> list[bytes]:
    return [np.asarray(v, dtype="<f4").tobytes() for v in vectors]


def files_holding(root: Path, vectors: np.ndarray) -> list[str]:
    """Names of the files under ``root`` that hold the bytes of any of ``vectors``."""
    needles = template_bytes(vectors)
    found = []
    for f in sorted(Path(root).rglob("*")):
        if f.is_file():
            data = livefiles.read_all(f)  # the database may be open in this process: see facedb/gallery/livefiles.py
            if any(n in data for n in needles):
                found.append(f.name)
    return found


def digest(root: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(livefiles.read_all(f)).hexdigest() for f in sorted(Path(root).iterdir())
            if f.is_file() and not f.name.endswith("-shm") and f.stat().st_size}  # (-shm: changed by any reader)


def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def key() -> str:
    return generate_key()


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch):
    monkeypatch.delenv("FACEDB_KEY", raising=False)
    monkeypatch.delenv("FACEDB_NEW_KEY", raising=False)


# ------------------------------------------------------------------------------------------ at rest
def test_an_encrypted_database_holds_no_template_in_plain_text_open_or_closed(tmp_path, rng, key):
    root = tmp_path / "db"
    vecs = unit_rows(rng, 40, DIM)
    plain = tmp_path / "plain"
    with make(plain) as db:  # the scan is not vacuous: a plain database holds them
        db.add_templates("a", vecs, create=True)
        db.save_index()
        assert set(files_holding(plain, vecs)) >= {"facedb.sqlite3", "index.faiss"} or \
            "facedb.sqlite3-wal" in files_holding(plain, vecs)
    with make(root, key=key) as db:
        db.add_templates_many([(f"p{i}", vecs[i:i + 1]) for i in range(40)])
        db.save_index()
        db.configure_audit(store_probes=True)
        db.identify(vecs[3])  # the probe goes into the audit trail too
        assert files_holding(root, vecs) == []  # WAL, shared memory and index while open
        assert db.stats().encrypted and db.stats().plaintext_files == []
    assert files_holding(root, vecs) == []
    names = {f.name for f in root.iterdir()}
    assert {"facedb.sqlite3", "index.faiss", KEYRING_FILE} <= names
    assert not (root / "facedb.sqlite3").read_bytes().startswith(b"SQLite format 3")
    keyring = json.loads((root / KEYRING_FILE).read_text())
    assert key not in (root / KEYRING_FILE).read_text() and keyring["state"] == "active"
    with FaceDB.open(root, key=key) as db:
        assert db.identify(vecs[7]).identity == "p7" and db.index_state().from_file
        assert db.check().ok


def test_sigkill_mid_write_leaves_no_plain_text_and_loses_nothing_acknowledged(tmp_path, key):
    root = tmp_path / "db"
    make(root, key=key).close()
    code = f"""
        import numpy as np, sys
        from facedb import FaceDB
        db = FaceDB.open({str(root)!r}, key={key!r})
        for i in range(100000):
            v = np.random.default_rng(i).standard_normal((3, {DIM})).astype(np.float32)
            db.add_templates(f"p{{i}}", v / np.linalg.norm(v, axis=1, keepdims=True), create=True)
            if i % 7 == 0:
                db.save_index()  # index files (and their temporaries) being written when the kill comes
            print(i, flush=True)
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    acknowledged = -1
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while acknowledged < 60 and time.monotonic() < deadline:
        acknowledged = int(proc.stdout.readline())
    time.sleep(0.05 * (os.getpid() % 5))
    proc.send_signal(signal.SIGKILL)
    rest = proc.stdout.read().split()
    proc.wait()
    acknowledged = int(rest[-1]) if rest else acknowledged
    written = []
    for i in range(acknowledged + 3):
        v = np.random.default_rng(i).standard_normal((3, DIM)).astype(np.float32)
        written.append(v / np.linalg.norm(v, axis=1, keepdims=True))
    assert files_holding(root, np.concatenate(written)) == []
    with FaceDB.open(root, key=key) as db:
        assert db.check().ok
        for i in range(acknowledged + 1):
            assert db.person(f"p{i}").templates == 3
        assert db.identify(written[acknowledged][0]).identity == f"p{acknowledged}"
        assert db.stats().plaintext_files == []


# ------------------------------------------------------------------------------------------ erasure
@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfpq"])
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_remove_erases_from_every_file_at_once_without_vacuum(tmp_path, rng, kind, encrypted):
    root = tmp_path / "db"
    key = generate_key() if encrypted else None
    people = {f"p{i:03d}": unit_rows(rng, int(rng.integers(1, 6)), DIM) for i in range(300)}
    with make(root, key=key, index=kind) as db:
        db.add_templates_many(list(people.items()))
        db.identify(people["p001"][0])
        db.save_index()
        late = unit_rows(rng, 2, DIM)
        db.add_templates("p010", late)  # after the save: only in the WAL / store
        victims = np.concatenate([people["p010"], late, people["p200"]])
        if not encrypted and kind != "ivfpq":  # (ivfpq's file holds 4-bit codes, not the vectors)
            assert "index.faiss" in files_holding(root, people["p200"])  # the scan finds what is there
            assert files_holding(root, late)
        db.remove_person("p010")
        tid = next(db.templates("p200")).id
        db.remove_template(tid)
        gone = np.concatenate([people["p010"], late, people["p200"][:1]])
        assert files_holding(root, gone) == []  # no vacuum
        assert bool(files_holding(root, people["p005"])) != encrypted  # what was kept is still there (if plain)
        db.merge_people("p201", "p202")
        assert db.identify(people["p201"][0], k=1).identity == "p202"
        assert db.check().ok
    assert files_holding(root, gone) == []
    with FaceDB.open(root, key=key) as db:
        assert "p010" not in [c.name for c in db.identify(victims[0], k=50).candidates]
        assert db.check().ok


def test_vacuum_is_still_what_gives_the_space_back(tmp_path, rng):
    root = tmp_path / "db"
    with make(root) as db:
        db.add_templates_many([(f"p{i}", unit_rows(rng, 5, DIM)) for i in range(400)])
        for i in range(0, 300, 30):
            with db.store.write():  # (300 removals through the store alone: this test is about the file size)
                for j in range(i, i + 30):
                    db.store.remove_person(f"p{j}")
        db.store.truncate_wal()
        size = (root / "facedb.sqlite3").stat().st_size
        db.vacuum()
        assert (root / "facedb.sqlite3").stat().st_size < 0.7 * size  # removal alone never shrinks it


def test_a_crash_between_removal_and_erasure_is_paid_at_the_next_open(tmp_path, rng):
    root = tmp_path / "db"
    vecs = unit_rows(rng, 4, DIM)
    with make(root) as db:
        db.add_templates("victim", vecs, create=True)
        db.add_templates("other", unit_rows(rng, 2, DIM), create=True)
        db.save_index()
    assert "index.faiss" in files_holding(root, vecs)
    done = run_python(f"""
        from facedb import FaceDB
        db = FaceDB.open({str(root)!r})
        db.remove_person("victim")
    """, env={"FACEDB_FAILPOINT": "removal-committed"})
    assert done.returncode == -signal.SIGKILL
    assert "index.faiss" in files_holding(root, vecs)  # the debt: committed, not yet erased from the file
    with FaceDB.open(root, readonly=True) as db:
        assert db.check().problems  # a read-only open cannot pay it, and says so
    with FaceDB.open(root) as db:  # a writable open pays it before answering anything
        assert files_holding(root, vecs) == []
        assert db.check().ok and db.stats().people == 1


def test_a_temporary_index_file_left_by_a_killed_writer_is_erased(tmp_path, rng):
    root = tmp_path / "db"
    vecs = unit_rows(rng, 3, DIM)
    with make(root) as db:
        db.add_templates("a", vecs, create=True)
        db.save_index()
        (root / ".index.faiss.abc123.tmp").write_bytes((root / "index.faiss").read_bytes())
        db.remove_person("a")
    assert files_holding(root, vecs) == []


# ------------------------------------------------------------------------------------------ keys
def test_wrong_missing_and_misplaced_keys_are_typed_errors_that_change_nothing(tmp_path, rng, key, monkeypatch):
    root = tmp_path / "db"
    with make(root, key=key) as db:
        db.add_templates("a", unit_rows(rng, 3, DIM), create=True)
    before = digest(root)
    with pytest.raises(KeyMissingError):
        FaceDB.open(root)
    with pytest.raises(WrongKeyError):
        FaceDB.open(root, key=generate_key())
    with pytest.raises(WrongKeyError):
        FaceDB.open(root, key="a passphrase that is not the key")
    inside = root / "key.txt"
    inside.write_text(key)
    from facedb.protection.keyring import KeySource

    with pytest.raises(InvalidInputError, match="inside the database directory"):
        FaceDB.open(root, key=KeySource(file=inside))
    inside.unlink()
    with pytest.raises(KeyMissingError, match="failed"):
        FaceDB.open(root, key=KeySource(command="echo nope >&2; exit 3"))
    assert digest(root) == before
    monkeypatch.setenv("FACEDB_KEY", key)  # the environment variable works too
    with FaceDB.open(root) as db:
        assert db.person("a").templates == 3
    with FaceDB.open(root, key=KeySource(command=f"echo {key}")) as db:
        assert db.person("a").templates == 3


def test_passphrases_and_binary_key_files_work(tmp_path, rng):
    phrase = "correct horse battery staple"
    from facedb.protection.keyring import KeySource

    with make(tmp_path / "a", key=phrase) as db:
        db.add_templates("a", unit_rows(rng, 1, DIM), create=True)
    with FaceDB.open(tmp_path / "a", key=phrase) as db:
        assert db.person("a").templates == 1
    with pytest.raises(InvalidInputError, match="passphrase"):
        make(tmp_path / "b", key="short")
    with pytest.raises(KeyMissingError):
        make(tmp_path / "b", key=KeySource(command="false"))
    assert not (tmp_path / "b").exists()  # bad keys are refused before anything is created

    raw = tmp_path / "raw.key"
    raw.write_bytes(os.urandom(32))
    make(tmp_path / "c", key=KeySource(file=raw)).close()
    FaceDB.open(tmp_path / "c", key=KeySource(file=raw)).close()


def test_tampered_ciphertext_is_a_typed_error_and_the_database_unchanged(tmp_path, rng, key):
    root = tmp_path / "db"
    vecs = unit_rows(rng, 20, DIM)
    with make(root, key=key) as db:
        db.add_templates("a", vecs, create=True)
        db.save_index()
    store = root / "facedb.sqlite3"
    good = store.read_bytes()
    page = 16384
    for offset in (100, page + 100):  # page 1 (the schema) and page 2 (the settings): refused at open
        bad = bytearray(good)
        bad[offset] ^= 0x40
        store.write_bytes(bytes(bad))
        before = digest(root)
        with pytest.raises(TamperedError):
            FaceDB.open(root, key=key)
        assert digest(root) == before
    for number in range(2, len(good) // page):  # any other page: refused wherever it is read (check reads all)
        bad = bytearray(good)
        bad[number * page + 200] ^= 0x40
        store.write_bytes(bytes(bad))
        before = digest(root)
        with pytest.raises(TamperedError):
            with FaceDB.open(root, key=key, readonly=True) as db:
                list(db.templates())
                db.check()
        assert digest(root) == before
    store.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises((TamperedError, DatabaseError)):
        with FaceDB.open(root, key=key) as db:
            list(db.templates())
    store.write_bytes(good)
    ring = json.loads((root / KEYRING_FILE).read_text())
    wrapped = bytearray(ring["keys"][0]["wrapped"].encode())
    wrapped[5] = ord("A") if wrapped[5] != ord("A") else ord("B")
    altered = {**ring, "keys": [{**ring["keys"][0], "wrapped": wrapped.decode()}]}
    (root / KEYRING_FILE).write_text(json.dumps(altered))
    with pytest.raises(WrongKeyError):
        FaceDB.open(root, key=key)
    (root / KEYRING_FILE).write_text("{not json")
    with pytest.raises(TamperedError):
        FaceDB.open(root, key=key)
    (root / KEYRING_FILE).write_text(json.dumps(ring))
    index = root / "index.faiss"
    raw = bytearray(index.read_bytes())
    raw[len(raw) // 2] ^= 1
    index.write_bytes(bytes(raw))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with FaceDB.open(root, key=key) as db:
            assert db.identify(vecs[4]).identity == "a"  # rebuilt from the authenticated store
            assert not db.index_state().from_file
    assert any(issubclass(w.category, TamperedFileWarning) for w in caught)
    with FaceDB.open(root, key=key) as db:  # the rebuilt file was saved and is used again
        assert db.identify(vecs[4]).identity == "a" and db.index_state().from_file and db.check().ok


def test_a_store_without_its_keyring_is_refused_clearly(tmp_path, key):
    root = tmp_path / "db"
    make(root, key=key).close()
    (root / KEYRING_FILE).unlink()
    with pytest.raises(DatabaseError, match="keyring"):
        FaceDB.open(root, key=key)


def test_rotate_key_rewraps_fast_and_the_old_key_stops_working(tmp_path, rng, key):
    root = tmp_path / "db"
    vecs = unit_rows(rng, 10, DIM)
    with make(root, key=key) as db:
        db.add_templates("a", vecs, create=True)
    from facedb.gallery.store import opens_with
    from facedb.protection.keyring import Keyring

    data_key = Keyring.read(root).unlock(key.encode())["current"].store_key()
    new = generate_key()
    with pytest.raises(WrongKeyError):
        FaceDB.rotate_key(root, key=generate_key(), new_key=new)
    with pytest.raises(KeyMissingError):
        FaceDB.rotate_key(root, key=key)
    report = FaceDB.rotate_key(root, key=key, new_key=new)
    assert report.operation == "rewrap" and report.key_version == 2 and report.data_key_version == 1
    assert opens_with(root / "facedb.sqlite3", data_key)  # the data was not re-encrypted: only re-wrapped
    with pytest.raises(WrongKeyError):
        FaceDB.open(root, key=key)
    with FaceDB.open(root, key=new) as db:
        assert db.identify(vecs[2]).identity == "a"
        assert (db.stats().key_version, db.stats().data_key_version) == (2, 1)
        rotations = db.audit(operation="rotate-key")
        assert len(rotations) == 1 and rotations[0].detail["key_version"] == 2  # recorded in the audit trail


@pytest.mark.slow
def test_key_rotation_under_concurrent_readers(tmp_path, rng, key):
    """Readers in other processes open, identify and close in a loop with whichever of the keys works, and one
    stays open throughout, while the key is rotated back and forth: every open succeeds with the key in force
    (never neither), every answer is right, and the long-lived reader never notices."""
    root = tmp_path / "db"
    vecs = unit_rows(rng, 30, DIM)
    with make(root, key=key) as db:
        db.add_templates_many([(f"p{i}", vecs[i:i + 1]) for i in range(30)])
    keys = [key, generate_key(), generate_key(), generate_key()]
    keyfile = tmp_path / "keys.json"
    keyfile.write_text(json.dumps(keys))
    np.save(tmp_path / "vecs.npy", vecs)
    reader = f"""
        import json, sys, time, numpy as np
        from facedb import FaceDB
        from facedb.errors import WrongKeyError
        keys = json.load(open({str(keyfile)!r})); vecs = np.load({str(tmp_path / 'vecs.npy')!r})
        held = FaceDB.open({str(root)!r}, key=keys[0], readonly=True)
        print("ready", flush=True)
        opens = wrong = neither = 0
        end = time.monotonic() + 6
        while time.monotonic() < end:
            for attempt in range(3):  # a rotation may land between two tries: a whole pass again
                for k in keys:
                    try:
                        db = FaceDB.open({str(root)!r}, key=k, readonly=True)
                    except WrongKeyError:
                        continue
                    i = opens % 30
                    wrong += db.identify(vecs[i]).identity != f"p{{i}}"
                    db.close(); opens += 1
                    break
                else:
                    continue
                break
            else:
                neither += 1
            wrong += held.identify(vecs[opens % 30]).identity != f"p{{opens % 30}}"
        print(opens, wrong, neither)
    """
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(reader)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}) for _ in range(2)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    rotations = 0
    deadline = time.monotonic() + 3.5
    while time.monotonic() < deadline:
        FaceDB.rotate_key(root, key=keys[rotations % 4], new_key=keys[(rotations + 1) % 4])
        rotations += 1
        time.sleep(0.2)
    results = [p.communicate(timeout=60)[0].split() for p in procs]
    assert rotations >= 5
    for opens, wrong, neither in results:
        assert int(opens) > 10 and int(wrong) == 0 and int(neither) == 0, results


def test_reencrypt_renews_the_data_key_and_keeps_everything(tmp_path, rng, key):
    root = tmp_path / "db"
    vecs = unit_rows(rng, 50, DIM)
    with make(root, key=key, index="hnsw") as db:
        ids = db.add_templates_many([(f"p{i}", vecs[i:i + 1]) for i in range(50)])
        db.remove_person("p3")
        db.identify(vecs[0])
    old_store = (root / "facedb.sqlite3").read_bytes()
    new = generate_key()
    report = FaceDB.rotate_key(root, key=key, new_key=new, reencrypt=True)
    assert (report.operation, report.data_key_version, report.key_version) == ("reencrypt", 2, 2)
    assert report.index_file and report.templates == 49 and ids == 50
    assert (root / "facedb.sqlite3").read_bytes()[:4096] != old_store[:4096]
    with pytest.raises(WrongKeyError):
        FaceDB.open(root, key=key)
    with FaceDB.open(root, key=new) as db:
        assert db.identify(vecs[9]).identity == "p9" and db.index_state().from_file  # the index came along
        assert db.check().ok
        assert (db.stats().key_version, db.stats().data_key_version) == (2, 2)
        db.add_templates("p3", vecs[3:4], create=True)  # ids continue (AUTOINCREMENT came along)
        assert max(t.id for t in db.templates()) > 50
    assert not (root / ".facedb-rekey").exists()


def _points(names: list[str]) -> list:
    """Every step of a conversion; the two on either side of the commit run by default, the rest are slow."""
    return [n if n in ("copied", "swapped") else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.mark.parametrize("point", _points(["keyring-pending", "staged", "copied", "swapped", "index-swapped",
                                           "keyring-final"]))
def test_sigkill_during_reencrypt_old_or_new_key_works_and_nothing_is_lost(tmp_path, rng, key, point):
    root = tmp_path / "db"
    vecs = unit_rows(rng, 60, DIM)
    with make(root, key=key) as db:
        db.add_templates_many([(f"p{i}", vecs[i:i + 1]) for i in range(60)])
        db.identify(vecs[0])
    new = generate_key()
    done = run_python(f"""
        from facedb import FaceDB
        FaceDB.rotate_key({str(root)!r}, key={key!r}, new_key={new!r}, reencrypt=True)
    """, env={"FACEDB_FAILPOINT": point})
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert files_holding(root, vecs) == []
    opened = None
    for k in (key, new):
        try:
            opened = FaceDB.open(root, key=k)
            break
        except WrongKeyError:
            continue
    assert opened is not None, "neither the old nor the new key opens the database"
    with opened as db:
        assert db.stats().templates == 60 and db.check().ok
        got = {t.person: t.vector for t in db.templates()}
        assert all(np.array_equal(got[f"p{i}"], vecs[i]) for i in range(60))
        assert db.identify(vecs[17]).identity == "p17"
    assert not (root / ".facedb-rekey").exists()
    assert json.loads((root / KEYRING_FILE).read_text())["state"] == "active"
    committed = point in ("swapped", "index-swapped", "keyring-final")
    with pytest.raises(WrongKeyError):  # settled: the key asked for once the data moved, else the old one
        FaceDB.open(root, key=key if committed else new)
    with FaceDB.open(root, key=new if committed else key) as db:
        assert db.stats().templates == 60
        assert db.stats().data_key_version == (2 if committed else 1)


@pytest.mark.parametrize("point", _points(["keyring-pending", "staged", "copied", "swapped", "index-swapped"]))
def test_sigkill_during_encrypt_leaves_the_plain_or_the_encrypted_database(tmp_path, rng, key, point):
    root = tmp_path / "db"
    vecs = unit_rows(rng, 30, DIM)
    with make(root) as db:
        db.add_templates_many([(f"p{i}", vecs[i:i + 1]) for i in range(30)])
        db.identify(vecs[0])
    done = run_python(f"""
        from facedb import FaceDB
        FaceDB.encrypt({str(root)!r}, key={key!r})
    """, env={"FACEDB_FAILPOINT": point})
    assert done.returncode == -signal.SIGKILL, done.stderr
    with FaceDB.open(root, key=key) as db:
        assert db.stats().templates == 30 and db.check().ok
        assert db.identify(vecs[5]).identity == "p5"
        encrypted = db.encrypted
    assert encrypted == (point in ("swapped", "index-swapped"))
    if encrypted:
        assert files_holding(root, vecs) == []  # the plain copy was destroyed
    else:
        FaceDB.encrypt(root, key=key)  # and it can be encrypted afterwards
        assert files_holding(root, vecs) == []
    assert not (root / ".facedb-rekey").exists()


def test_encrypt_destroys_the_plain_copy_and_refuses_while_in_use(tmp_path, rng, key):
    root = tmp_path / "db"
    vecs = unit_rows(rng, 20, DIM)
    with make(root, index="ivf") as db:
        db.add_templates_many([(f"p{i}", vecs[i:i + 1]) for i in range(20)])
        db.configure_audit(store_probes=True)
        db.identify(vecs[1])
        db.save_index()
    assert files_holding(root, vecs)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from facedb import FaceDB
        db = FaceDB.open({str(root)!r}, readonly=True); db.people()
        print("open", flush=True); time.sleep(30)
    """)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
    before = digest(root)
    try:
        with pytest.raises(DatabaseError, match="in use"):
            FaceDB.encrypt(root, key=key)
    finally:
        holder.kill()
        holder.wait()
    assert digest(root) == before and not (root / KEYRING_FILE).exists()
    report = FaceDB.encrypt(root, key=key)
    assert report.templates == 20 and report.index_file
    with FaceDB.open(root, key=key) as db:
        assert [r.operation for r in db.audit(operation="encrypt")] == ["encrypt"]
    assert files_holding(root, vecs) == []
    with pytest.raises(InvalidInputError):
        FaceDB.encrypt(root, key=key)
    with FaceDB.open(root, key=key) as db:
        assert db.identify(vecs[4]).identity == "p4" and db.index_state().from_file
        assert len(db.audit()) >= 1 and db.check().ok


def test_check_and_stats_report_a_plain_text_file_in_an_encrypted_database(tmp_path, rng, key):
    root = tmp_path / "db"
    with make(root, key=key) as db:
        db.add_templates("a", unit_rows(rng, 2, DIM), create=True)
        assert db.check().ok and db.stats().plaintext_files == []
        (root / "export.npy").write_bytes(b"\x93NUMPY leaked vectors")
        stats = db.stats()
        assert stats.plaintext_files and "export.npy" in stats.plaintext_files[0]
        report = db.check()
        assert not report.ok and any("export.npy" in p for p in report.problems)
    with make(tmp_path / "plain") as db:
        db.add_templates("a", unit_rows(rng, 2, DIM), create=True)
        assert not db.stats().encrypted and any("facedb.sqlite3" in f for f in db.stats().plaintext_files)
        assert db.check().ok


def test_encrypted_index_backends_meet_the_contract(tmp_path):
    from facedb.gallery.index import IndexPlace, backend_for
    from facedb.protection.keyring import DataKey
    from facedb.testing import contracts

    cipher = DataKey(1, os.urandom(32)).file_cipher("index")
    for kind in ("flat", "hnsw", "ivfpq"):
        contracts.check_index_backend(backend_for(kind), kind, tmp_path,
                                      place=IndexPlace(tmp_path, options={"cipher": cipher}))


def test_file_cipher_rejects_reordered_truncated_extended_and_foreign_files():
    from facedb.protection.keyring import DataKey

    cipher = DataKey(1, os.urandom(32)).file_cipher("index")
    data = os.urandom(10_000)
    sealed, fid = cipher.seal(data)
    import io

    buf = io.BytesIO()
    with cipher.sealing(buf, chunk=1000) as w:
        w.write(data)
    multi = buf.getvalue()
    assert cipher.open(multi) == data and cipher.open(sealed, fid) == data
    head, body = multi[:28], multi[28:]
    blocks = [body[i:i + 1016] for i in range(0, len(body), 1016)]
    for broken in (head + b"".join(blocks[:-1]),  # last chunk dropped
                   head + blocks[1] + blocks[0] + b"".join(blocks[2:]),  # reordered
                   multi + blocks[-1],  # extended
                   multi[:-1]):  # cut short
        with pytest.raises(TamperedError):
            cipher.open(broken)
    with pytest.raises(TamperedError):
        cipher.open(sealed, "0" * 32)  # another save's file id
    with pytest.raises(TamperedError):
        DataKey(1, os.urandom(32)).file_cipher("index").open(sealed)  # another key


# ------------------------------------------------------------------------------------- other vector files
def test_evaluation_cache_is_encrypted_for_an_encrypted_database(tmp_path, rng, key):
    from facedb.evaluate.cache import EmbeddingCache

    with make(tmp_path / "db", key=key) as db:
        cipher = db.cache_cipher()
    vecs = unit_rows(rng, 5, DIM)
    cache = EmbeddingCache("m-flip", DIM, directory=tmp_path / "cache", cipher=cipher)
    for i, v in enumerate(vecs):
        cache.put(f"{i:064x}", v, True)
    cache.save()
    assert cache.path.name.endswith(".npz.enc") and files_holding(tmp_path / "cache", vecs) == []
    again = EmbeddingCache("m-flip", DIM, directory=tmp_path / "cache", cipher=cipher)
    assert len(again) == 5 and np.array_equal(again.get(f"{3:064x}")[0], vecs[3])
    plain = EmbeddingCache("m-flip", DIM, directory=tmp_path / "cache")
    assert len(plain) == 0  # never mixed with the plain cache
    raw = bytearray(cache.path.read_bytes())
    raw[-3] ^= 1
    cache.path.write_bytes(bytes(raw))
    assert len(EmbeddingCache("m-flip", DIM, directory=tmp_path / "cache", cipher=cipher)) == 0  # recomputed


def test_cli_encryption_commands_and_their_effect(tmp_path, rng):
    from typer.testing import CliRunner

    from facedb.cli import app

    runner = CliRunner()
    keyfile, newkey = tmp_path / "k1", tmp_path / "k2"
    assert runner.invoke(app, ["genkey", "--out", str(keyfile)]).exit_code == 0
    assert runner.invoke(app, ["genkey", "--out", str(newkey)]).exit_code == 0
    assert runner.invoke(app, ["genkey", "--out", str(keyfile)]).exit_code == 2  # never overwritten
    db = tmp_path / "db"
    res = runner.invoke(app, ["--db", str(db), "init", "--model", "m", "--dim", str(DIM), "--threshold", "0.5",
                              "--encrypt"])
    assert res.exit_code == 2 and "key" in res.output and not (db / "facedb.sqlite3").exists()
    res = runner.invoke(app, ["--db", str(db), "--key-file", str(keyfile), "init", "--model", "m", "--dim",
                              str(DIM), "--threshold", "0.5", "--encrypt"])
    assert res.exit_code == 0, res.output
    vecs = unit_rows(rng, 3, DIM)
    with FaceDB.open(db, key=keyfile.read_text()) as fdb:
        fdb.add_templates("a", vecs, create=True)
    res = runner.invoke(app, ["--db", str(db), "stats", "--json"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "key" in res.output
    res = runner.invoke(app, ["--db", str(db), "stats", "--json", "--key-file", str(keyfile)])
    stats = json.loads(res.output)
    assert stats["encrypted"] and stats["key_version"] == 1 and stats["templates"] == 3
    res = runner.invoke(app, ["--db", str(db), "--key-file", str(keyfile), "templates", "--vectors"])
    assert res.exit_code == 2 and "--allow-plaintext" in res.output
    res = runner.invoke(app, ["--db", str(db), "--key-file", str(keyfile), "--json", "templates", "--vectors",
                              "--allow-plaintext"])
    assert res.exit_code == 0 and len(json.loads(res.output.splitlines()[0])["vector"]) == DIM
    res = runner.invoke(app, ["--db", str(db), "--key-file", str(keyfile), "rotate-key", "--new-key-file",
                              str(newkey)])
    assert res.exit_code == 0, res.output
    assert runner.invoke(app, ["--db", str(db), "--key-file", str(keyfile), "people"]).exit_code == 2
    res = runner.invoke(app, ["--db", str(db), "--key-file", str(newkey), "--json", "rotate-key", "--reencrypt"])
    assert res.exit_code == 0 and json.loads(res.output)["data_key_version"] == 2
    res = runner.invoke(app, ["--db", str(db), "--key-file", str(newkey), "check"])
    assert res.exit_code == 0 and "encrypted at rest" in res.output
    plain = tmp_path / "plain"
    with make(plain) as fdb:
        fdb.add_templates("a", vecs, create=True)
    res = runner.invoke(app, ["--db", str(plain), "encrypt"])
    assert res.exit_code == 2 and not (plain / KEYRING_FILE).exists()
    res = runner.invoke(app, ["--db", str(plain), "encrypt", "--key-command", f"cat {keyfile}"])
    assert res.exit_code == 0, res.output
    assert files_holding(plain, vecs) == []
    res = runner.invoke(app, ["--db", str(plain), "--key-file", str(keyfile), "--json", "stats"])
    assert json.loads(res.output)["encrypted"] is True


# ------------------------------------------------------------------------------------- cancellable
def test_cancellable_templates_keep_every_score_and_are_unlinkable(tmp_path, rng):
    from facedb.protection.projection import Projection, new_seed

    a, b = unit_rows(rng, 200, DIM), unit_rows(rng, 200, DIM)
    p = Projection(new_seed(), DIM)
    np.testing.assert_allclose(np.sum(p(a) * p(b), axis=1), np.sum(a * b, axis=1), atol=1e-6)  # inner products
    np.testing.assert_allclose(np.linalg.norm(p(a), axis=1), 1.0, atol=1e-6)
    people = {f"p{i}": unit_rows(rng, 3, DIM) for i in range(100)}
    probes = np.concatenate([people[f"p{i}"][0] + 0.3 * unit_rows(rng, 1, DIM)[0] for i in range(50)]
                            ).reshape(50, DIM)
    probes = np.concatenate([probes, unit_rows(rng, 20, DIM)])
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    answers = []
    for name, cancellable in (("plain", False), ("c1", True), ("c2", True)):
        with make(tmp_path / name, cancellable=cancellable) as db:
            db.add_templates_many(list(people.items()))
            answers.append(db.identify(probes, k=5))
            assert db.stats().cancellable == cancellable
            ver = db.verify(probes[0], "p0")
            assert ver.similarity == pytest.approx(float(np.max(people["p0"] @ probes[0])), abs=1e-6)
        if cancellable:
            assert files_holding(tmp_path / name, people["p7"]) == []  # raw templates are never stored
    for got in answers[1:]:
        for x, y in zip(answers[0], got):
            assert x.identity == y.identity and [c.name for c in x.candidates] == [c.name for c in y.candidates]
            np.testing.assert_allclose([c.similarity for c in x.candidates], [c.similarity for c in y.candidates],
                                       atol=1e-6)
    with FaceDB.open(tmp_path / "c1") as d1, FaceDB.open(tmp_path / "c2") as d2:
        t1 = np.array([t.vector for t in d1.templates("p7")])
        t2 = np.array([t.vector for t in d2.templates("p7")])
    assert np.abs(np.sum(t1 * t2, axis=1)).max() < 0.6  # the same face: unrelated templates in two databases


def test_calibrating_an_encrypted_database_builds_its_temporary_database_encrypted(tmp_path, rng):
    from facedb.evaluate.datasets import Split
    from facedb.evaluate.protocols import open_set_scores

    vecs = unit_rows(rng, 30, DIM)
    split = Split(gallery={f"p{i}": [i] for i in range(10)}, genuine=[(f"p{i}", i) for i in range(10)],
                  impostor=list(range(20, 30)))
    plain = open_set_scores(tmp_path / "plain", vecs, split, "m")
    encrypted = open_set_scores(tmp_path / "enc", vecs, split, "m", encrypt=True)
    assert [[n for n, _ in c] for c in plain[0]] == [[n for n, _ in c] for c in encrypted[0]]
    np.testing.assert_allclose(plain[1], encrypted[1], atol=1e-6)
    assert (tmp_path / "enc" / KEYRING_FILE).exists() and files_holding(tmp_path / "enc", vecs) == []
    assert files_holding(tmp_path / "plain", vecs)  # (the scan finds them where they are in plain text)


@pytest.mark.slow
def test_sigkill_at_random_moments_of_reencrypt_through_the_cli(tmp_path, rng):
    """The failpoints above kill each step; this kills `facedb rotate-key --reencrypt` wherever it happens to be."""
    import random

    root = tmp_path / "db"
    vecs = unit_rows(rng, 2000, DIM)
    keys = [generate_key()]
    with make(root, key=keys[0], index="hnsw") as db:
        db.add_templates_many([(f"p{i}", vecs[i:i + 1]) for i in range(2000)])
        db.identify(vecs[0])
    chance = random.Random(5)
    for _ in range(4):
        new = generate_key()
        proc = subprocess.Popen([sys.executable, "-m", "facedb.cli", "--db", str(root), "rotate-key", "--reencrypt"],
                                env={**os.environ, "PYTHONPATH": str(REPO), "FACEDB_KEY": keys[-1],
                                     "FACEDB_NEW_KEY": new}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(chance.uniform(0.2, 2.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        opened = None
        for k in (keys[-1], new):
            with contextlib.suppress(WrongKeyError):
                opened = FaceDB.open(root, key=k)
                break
        assert opened is not None, "neither the old nor the new key opens the database"
        if k == new:
            keys.append(new)
        with opened as db:
            assert db.stats().templates == 2000 and db.check().ok and db.identify(vecs[1234]).identity == "p1234"
        assert files_holding(root, vecs[:200]) == []


def test_the_http_service_serves_an_encrypted_database(tmp_path, fake_pipeline, monkeypatch, key):
    pytest.importorskip("fastapi", reason="the service extra is not installed")
    from fastapi.testclient import TestClient

    from facedb.service.app import create_app
    from facedb.service.config import ServiceSettings

    from .servicekit import RED, png, wait_ready

    path = tmp_path / "db"
    keyfile = tmp_path / "facedb.key"
    keyfile.write_text(key)
    with FaceDB.create(path, model_id="fake-colour", dim=32, threshold=0.7, key=key) as db:  # the test double's
        secret = db.create_api_key("admin", "admin-key")[1]
    monkeypatch.setenv("FACEDB_KEY_FILE", str(keyfile))  # how `facedb serve` hands the key to its workers
    app = create_app(ServiceSettings(db=path, fold_window=0.0), model=fake_pipeline, sender=lambda *a: 200)
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        resp = client.post("/v1/people/Ann/templates", headers={"X-API-Key": secret},
                           files=[("photos", ("a.png", png([RED]), "image/png"))])
        assert resp.status_code in (200, 201), resp.text
    with FaceDB.open(path, key=key) as db:
        assert db.person("Ann").templates == 1
    assert files_holding(path, np.array([t.vector for t in FaceDB.open(path, key=key).templates()])) == []
