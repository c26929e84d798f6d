"""Store, index and query engine, through the FaceDB API, against a brute-force numpy oracle."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from facedb import (
    DatabaseError,
    DatabaseExistsError,
    DuplicatePersonError,
    FaceDB,
    InvalidInputError,
    InvalidVectorError,
    ModelMismatchError,
    PersonNotFoundError,
)
from facedb.db import INDEX_FILE, STORE_FILE
from facedb.gallery import livefiles
from facedb.gallery.store import SCHEMA_VERSION

from .conftest import unit_rows

DIM = 64


@pytest.fixture(autouse=True, params=["plain", "encrypted"])
def storage(request, monkeypatch):
    """Every behaviour here holds for a plain and for an encrypted database (docs/protection.md): the
    encrypted run sets $FACEDB_KEY, which make_db encrypts with and every FaceDB.open reads."""
    if request.param == "encrypted":
        pytest.importorskip("sqlcipher3", reason="the crypto extra is not installed")
        from facedb.protection.keyring import generate_key

        monkeypatch.setenv("FACEDB_KEY", generate_key())
    else:
        monkeypatch.delenv("FACEDB_KEY", raising=False)
    return request.param


def make_db(path, dim: int = DIM, threshold: float = 0.5) -> FaceDB:
    return FaceDB.create(path, model_id="test-model", dim=dim, threshold=threshold,
                         encrypt=bool(os.environ.get("FACEDB_KEY")))


@pytest.fixture
def gallery(tmp_path, rng):
    """A database of 300 people with 1-19 templates each (~3,000 vectors), and the same data in numpy."""
    db = make_db(tmp_path / "db")
    names, vecs = [], []
    for p in range(300):
        n = int(rng.integers(1, 20))
        v = unit_rows(rng, n, DIM)
        db.add_templates(f"person-{p:03d}", v, create=True)
        names += [f"person-{p:03d}"] * n
        vecs.append(v)
    yield db, np.array(names), np.concatenate(vecs)
    db.close()


def oracle_top_people(q: np.ndarray, names: np.ndarray, vecs: np.ndarray, k: int) -> list[tuple[str, float]]:
    sims = vecs @ q
    best: dict[str, float] = {}
    for name, s in zip(names, sims):
        best[name] = max(best.get(name, -2.0), float(s))
    return sorted(best.items(), key=lambda kv: -kv[1])[:k]


def test_identify_matches_brute_force_oracle(gallery, rng):
    db, names, vecs = gallery
    assert len(vecs) > 2500
    # Probes: noisy copies of stored templates (genuine-like) and fresh random vectors (impostor-like).
    probes = np.concatenate([vecs[rng.choice(len(vecs), 40)] + 0.05 * unit_rows(rng, 40, DIM), unit_rows(rng, 20, DIM)])
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    for k in (1, 5, 17):
        answers = db.identify(probes, k=k, threshold=0.5)
        assert len(answers) == len(probes)
        for q, ans in zip(probes, answers):
            expected = oracle_top_people(q, names, vecs, k)
            assert [c.name for c in ans.candidates] == [n for n, _ in expected]
            np.testing.assert_allclose([c.similarity for c in ans.candidates], [s for _, s in expected], atol=1e-5)
            np.testing.assert_allclose([c.distance for c in ans.candidates], [2 - 2 * s for _, s in expected],
                                       atol=2e-5)
            best_name, best_sim = expected[0]
            assert ans.identity == (best_name if best_sim >= 0.5 else None)


def test_single_vector_gives_single_answer_and_batch_equals_singles(gallery, rng):
    db, _names, _vecs = gallery
    probes = unit_rows(rng, 5, DIM)
    batch = db.identify(probes, k=3)
    singles = [db.identify(p, k=3) for p in probes]
    assert batch == singles


def test_verify_matches_oracle(gallery, rng):
    db, names, vecs = gallery
    for i in rng.choice(len(vecs), 30):
        name = names[i]
        probe = vecs[i] + 0.3 * unit_rows(rng, 1, DIM)[0]
        probe /= np.linalg.norm(probe)
        expected = float(np.max(vecs[names == name] @ probe))
        res = db.verify(probe, str(name), threshold=0.6)
        assert res.similarity == pytest.approx(expected, abs=1e-5)
        assert res.accepted == (expected >= 0.6)
        assert res.distance == pytest.approx(2 - 2 * expected, abs=2e-5)


def test_k_larger_than_people_returns_fewer_and_no_padding(tmp_path, rng):
    with make_db(tmp_path / "db") as db:
        assert db.identify(unit_rows(rng, 1, DIM)[0], k=5).candidates == []
        assert db.identify(unit_rows(rng, 1, DIM)[0], k=5).identity is None
        db.add_templates("a", unit_rows(rng, 3, DIM), create=True)
        db.add_templates("b", unit_rows(rng, 1, DIM), create=True)
        ans = db.identify(unit_rows(rng, 1, DIM)[0], k=10)
        assert sorted(c.name for c in ans.candidates) == ["a", "b"]
        assert all(c.person_id > 0 for c in ans.candidates)


def test_unknown_is_an_answer(tmp_path, rng):
    with make_db(tmp_path / "db", threshold=0.9) as db:
        v = unit_rows(rng, 1, DIM)
        db.add_templates("alice", v, create=True)
        far = unit_rows(rng, 1, DIM)[0]
        ans = db.identify(far, k=1)
        assert ans.is_unknown and ans.candidates[0].name == "alice"
        assert db.identify(v[0], k=1).identity == "alice"
        assert db.identify(far, k=1, threshold=-1.0).identity == "alice"


def test_invalid_vectors_are_refused_and_change_nothing(tmp_path, rng):
    with make_db(tmp_path / "db") as db:
        db.add_person("a")
        gen = db.stats()["generation"]
        bad_nan = unit_rows(rng, 1, DIM)
        bad_nan[0, 3] = np.nan
        with pytest.raises(InvalidVectorError):
            db.add_templates("a", bad_nan)
        with pytest.raises(InvalidVectorError):
            db.add_templates("a", unit_rows(rng, 1, DIM) * 2)
        with pytest.raises(InvalidVectorError):
            db.add_templates("a", np.zeros((2, 2, DIM), dtype=np.float32))
        with pytest.raises(ModelMismatchError):
            db.add_templates("a", unit_rows(rng, 1, DIM + 1))
        with pytest.raises(ModelMismatchError):
            db.add_templates("a", unit_rows(rng, 1, DIM), model_id="other-model")
        with pytest.raises(InvalidVectorError):
            db.identify(np.full(DIM, np.inf, dtype=np.float32))
        with pytest.raises(InvalidInputError):
            db.identify(unit_rows(rng, 1, DIM)[0], k=0)
        with pytest.raises(PersonNotFoundError):
            db.add_templates("nobody", unit_rows(rng, 1, DIM))
        assert db.stats()["generation"] == gen and db.stats()["templates"] == 0


def test_model_mismatch_on_open(tmp_path):
    make_db(tmp_path / "db").close()
    with pytest.raises(ModelMismatchError):
        FaceDB.open(tmp_path / "db", model_id="another-model")
    FaceDB.open(tmp_path / "db", model_id="test-model").close()


def test_create_refuses_existing_and_open_refuses_non_facedb(tmp_path):
    make_db(tmp_path / "db").close()
    with pytest.raises(DatabaseExistsError):
        make_db(tmp_path / "db")
    with pytest.raises(DatabaseError):
        FaceDB.open(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / STORE_FILE).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DatabaseError):
        FaceDB.open(tmp_path / "junk")
    other = tmp_path / "other"
    other.mkdir()
    sqlite3.connect(other / STORE_FILE).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(DatabaseError, match="not a facedb"):
        FaceDB.open(other)


def test_people_rename_duplicates_and_metadata(tmp_path, rng):
    with make_db(tmp_path / "db") as db:
        p = db.add_person("Ann", external_id="E1", metadata={"team": "red"})
        assert p.metadata == {"team": "red"} and p.external_id == "E1"
        with pytest.raises(DuplicatePersonError):
            db.add_person("Ann")
        with pytest.raises(DuplicatePersonError):
            db.add_person("Bob", external_id="E1")
        db.add_person("Bob")
        with pytest.raises(DuplicatePersonError):
            db.rename_person("Bob", "Ann")
        for bad in ("", "   ", " lead", "x" * 300, "tab\there"):
            with pytest.raises(InvalidInputError):
                db.add_person(bad)
        with pytest.raises(InvalidInputError):
            db.add_person("Cy", metadata={"x": float("nan")})
        with pytest.raises(InvalidInputError):
            db.add_person("Cy", metadata=["not", "a", "dict"])  # type: ignore[arg-type]
        v = unit_rows(rng, 1, DIM)
        db.add_templates("Bob", v)
        db.rename_person("Bob", "Robert")
        assert db.identify(v[0], k=1).identity == "Robert"
        assert [p.name for p in db.people()] == ["Ann", "Robert"]
        # SQL metacharacters are just characters
        evil = "Robert'); DROP TABLE people;--"
        db.add_person(evil)
        assert db.person(evil).name == evil and len(db.people()) == 3


def test_remove_is_erasure_from_search(gallery, rng):
    db, names, vecs = gallery
    victim = "person-007"
    mine = vecs[names == victim]
    assert db.identify(mine[0], k=1).identity == victim
    removed = db.remove_person(victim)
    assert removed == len(mine)
    for v in mine:
        assert victim not in [c.name for c in db.identify(v, k=300).candidates]
    with pytest.raises(PersonNotFoundError):
        db.verify(mine[0], victim)
    # also for another FaceDB that had the index loaded before the removal, and for a fresh open
    db2 = FaceDB.open(db.root)
    db2.identify(mine[0], k=1)
    db.remove_person("person-008")
    assert "person-008" not in [c.name for c in db2.identify(vecs[names == "person-008"][0], k=300).candidates]
    db2.close()
    db.close()
    with FaceDB.open(db.root) as db3:
        for v in mine:
            assert victim not in [c.name for c in db3.identify(v, k=300).candidates]
        assert db3.check().ok


def test_ids_are_never_reused(tmp_path, rng):
    with make_db(tmp_path / "db") as db:
        first = db.add_templates("a", unit_rows(rng, 3, DIM), create=True)
        db.remove_person("a")
        second = db.add_templates("a", unit_rows(rng, 3, DIM), create=True)
        assert min(second) > max(first)


def _templates_and_answers(db, probes):
    return [(a.identity, [(c.name, round(c.similarity, 5)) for c in a.candidates]) for a in db.identify(probes, k=3)]


@pytest.mark.parametrize("damage", ["delete", "truncate", "garbage", "stale"])
def test_index_is_rebuilt_when_file_is_missing_damaged_or_stale(gallery, rng, damage):
    db, _names, _vecs = gallery
    probes = unit_rows(rng, 20, DIM)
    db.save_index()
    root = db.root
    extra = unit_rows(rng, 2, DIM)
    if damage == "stale":
        # A write that lands while the index file is not saved (another process, or a crash before close).
        with FaceDB.open(root) as other:
            other.add_templates("late-arrival", extra, create=True)
            other.close(save_index=False)  # nothing saved on close
    expected = _templates_and_answers(db, probes) if damage != "stale" else None
    db.close()
    path = root / INDEX_FILE
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(np.random.default_rng(5).bytes(path.stat().st_size))
    with FaceDB.open(root) as again:
        got = _templates_and_answers(again, probes)
        if expected is not None:
            assert got == expected
        else:
            assert again.identify(extra[0], k=1).identity == "late-arrival"
        report = again.check()
        assert report.ok, report.problems
    with FaceDB.open(root) as third:  # and the healed file is used afterwards
        assert third.check().ok


def test_check_reports_a_corrupted_template(tmp_path, rng):
    with make_db(tmp_path / "db") as db:
        db.add_templates("a", unit_rows(rng, 2, DIM), create=True)
        assert db.check().ok
        db.store.conn.execute("UPDATE embeddings SET vector = zeroblob(?) WHERE id = 1", (4 * DIM,))
        report = db.check()
        assert not report.ok and any("unit" in p for p in report.problems)


def test_files_are_private(tmp_path, rng):
    with make_db(tmp_path / "db") as db:
        db.add_templates("a", unit_rows(rng, 2, DIM), create=True)
        db.save_index()
    assert (tmp_path / "db").stat().st_mode & 0o777 == 0o700
    for f in (tmp_path / "db").iterdir():
        assert f.stat().st_mode & 0o077 == 0, f


def test_add_is_atomic_when_a_row_fails(tmp_path, rng):
    with make_db(tmp_path / "db") as db:
        db.add_person("a")
        with pytest.raises(InvalidInputError):
            db.add_templates("a", unit_rows(rng, 3, DIM), boxes=[[0, 0, 1, 1]])  # 1 box for 3 vectors
        assert db.stats()["templates"] == 0


def test_stored_threshold_is_used_and_growth_past_calibration_warns(tmp_path, rng):
    with make_db(tmp_path / "db", threshold=0.99) as db:
        v = unit_rows(rng, 1, DIM)
        db.add_templates("a", v, create=True)
        probe = v[0] + 0.4 * unit_rows(rng, 1, DIM)[0]
        probe /= np.linalg.norm(probe)
        sim = db.identify(probe, k=1).similarity
        assert db.identify(probe, k=1).identity is None  # 0.99 is stricter than this probe
        db.set_threshold(sim - 0.01, "calibrated: fpir 0.01 on test", target="fpir", target_rate=0.01,
                         gallery_size=2)
        assert db.identify(probe, k=1).identity == "a" and db.identify(probe, k=1).threshold == sim - 0.01
        stats = db.stats()
        assert stats["calibration"]["gallery_size"] == 2 and stats["warnings"] == []
        db.add_templates_many([(f"p{i}", unit_rows(rng, 1, DIM)) for i in range(5)])
        assert "recalibrate" in db.calibration_warning()
        with pytest.raises(InvalidInputError):
            db.set_threshold(1.5, "nonsense")


def test_older_schema_is_migrated_on_open(tmp_path, rng):
    with make_db(tmp_path / "db") as db:
        db.add_templates("a", unit_rows(rng, 1, DIM), create=True)
        conn = db.store.conn
        conn.execute("DROP TABLE audit")
        conn.execute("DELETE FROM meta WHERE key LIKE 'audit_%'")
        conn.execute("PRAGMA user_version = 1")
    with FaceDB.open(tmp_path / "db") as db:
        assert db.store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.audit_settings()["enabled"] is True
        db.identify(unit_rows(rng, 1, DIM)[0])
        assert [r["operation"] for r in db.audit()] == ["identify"]
        assert db.person("a").templates == 1


def test_no_byte_of_a_removed_template_remains_after_remove_and_after_vacuum(tmp_path, rng, storage):
    root = tmp_path / "db"
    plain = storage == "plain"
    with make_db(root) as db:
        keep = unit_rows(rng, 3, DIM)
        gone = unit_rows(rng, 4, DIM)
        db.add_templates("keep", keep, create=True)
        db.add_templates("gone", gone, create=True)
        db.identify(keep[0])
        db.save_index()

        def files_hold(vectors):
            blobs = [np.asarray(v, dtype="<f4").tobytes() for v in vectors]
            data = [livefiles.read_all(f) for f in root.iterdir() if f.is_file()]
            return [any(b in d for d in data) for b in blobs]

        assert all(files_hold(gone)) == plain  # the scan finds templates that are there (in plain text)
        db.remove_person("gone")
        assert not any(files_hold(gone))  # at once: index file rewritten, WAL truncated, pages zeroed
        db.vacuum()
        assert not any(files_hold(gone))
        assert all(files_hold(keep)) == plain
        assert db.identify(keep[0]).identity == "keep" and db.check().ok


def test_full_disk_leaves_the_database_unchanged(tmp_path, rng):
    with make_db(tmp_path / "db") as db:
        db.add_templates("a", unit_rows(rng, 1, DIM), create=True)
        before = (db.stats()["templates"], db.stats()["generation"])
        pages = db.store.conn.execute("PRAGMA page_count").fetchone()[0]
        db.store.conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLite now answers "disk is full"
        with pytest.raises(DatabaseError, match="full"):
            db.add_templates_many([(f"p{i}", unit_rows(rng, 20, DIM)) for i in range(50)])
        assert (db.stats()["templates"], db.stats()["generation"]) == before
        db.store.conn.execute("PRAGMA max_page_count = 1073741823")  # space again (check may save the index)
        assert db.check().ok


def test_readonly_open_refuses_writes_cleanly(tmp_path, rng):
    with make_db(tmp_path / "db") as db:
        db.add_templates("a", unit_rows(rng, 1, DIM), create=True)
    with FaceDB.open(tmp_path / "db", readonly=True) as db:
        assert db.identify(unit_rows(rng, 1, DIM)[0], k=1).candidates[0].name == "a"
        with pytest.raises(DatabaseError):
            db.add_person("b")


def test_a_database_made_by_the_previous_release_opens_and_is_migrated(tmp_path):
    """tests/data/v2-db was written by facedb 0.1 (schema 2): a person named in NFD, one removed, an audit trail
    and a saved index. Opened read-only it answers without changing the schema (and still logs the decision);
    opened normally it is migrated: the audit trail gains its actor column, names become NFC, and the saved
    index is used as it is."""
    import shutil
    import unicodedata

    from facedb.gallery.store import SCHEMA_VERSION

    root = tmp_path / "db"
    shutil.copytree(Path(__file__).parent / "data" / "v2-db", root)
    os.chmod(root, 0o700)
    probe_name = "José Martí"
    with FaceDB.open(root, readonly=True) as db:
        assert db.store.version == 2
        assert db.identify(np.eye(8, dtype=np.float32)[0], k=1).candidates
        assert len(db.audit()) == 3 and db.audit()[-1].actor is None
    with FaceDB.open(root) as db:
        assert db.store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        names = [p.name for p in db.people()]
        assert names == ["Ann", probe_name] and unicodedata.is_normalized("NFC", names[1])
        assert db.person("Jose\u0301 Marti\u0301").metadata == {"badge": "17"}  # either spelling finds him
        ann = next(db.templates("Ann")).vector
        assert db.identify(ann, k=1).identity == "Ann"
        state = db.index_state()
        assert state.from_file and state.live == 4
        assert [r.operation for r in db.audit()] == ["identify", "remove", "identify", "identify"]
        assert db.audit()[-1].actor and db.check().ok
