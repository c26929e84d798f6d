"""The hot path's caches and background work (issue #17): settings parsed once per change, names cached,
exact re-scoring vectors in memory, streamed index builds, the background audit writer. Each cache is checked
against what the store says after changes made by another FaceDB (another process would bump the same
counters), and every answer against the exact one."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from facedb import DatabaseError, FaceDB, InvalidInputError
from facedb.db import STORE_FILE
from facedb.gallery.indexed import Gallery
from facedb.gallery.settings import Settings
from facedb.gallery.vectors import TemplateVectors, budget_bytes

from .conftest import unit_rows

DIM = 32


def make(path: Path, index: str = "flat", **kw) -> FaceDB:
    return FaceDB.create(path, model_id="speed-test", dim=DIM, threshold=0.5, index=index, **kw)


def people(rng: np.random.Generator, n: int, per: int = 3) -> list[tuple[str, np.ndarray]]:
    return [(f"p{i}", unit_rows(rng, per, DIM)) for i in range(n)]


def oracle(items: list[tuple[str, np.ndarray]], probe: np.ndarray, k: int = 5) -> list[tuple[str, float]]:
    best = sorted(((name, float(np.max(v @ probe))) for name, v in items), key=lambda p: -p[1])
    return best[:k]


# ------------------------------------------------------------------------------------------------ settings
def test_settings_are_parsed_once_per_change_and_other_writers_are_seen(tmp_path, rng, monkeypatch):
    root = tmp_path / "db"
    make(root).close()
    parses = []
    real = Settings.parse.__func__

    def counting(cls, meta):
        parses.append(1)
        return real(cls, meta)

    monkeypatch.setattr(Settings, "parse", classmethod(counting))
    with FaceDB.open(root) as reader, FaceDB.open(root) as writer:
        writer.add_templates("ann", unit_rows(rng, 2, DIM), create=True)
        probe = writer.templates("ann").__next__().vector
        reader.identify(probe)
        before = len(parses)
        for _ in range(20):
            assert reader.identify(probe).threshold == 0.5
        assert len(parses) == before, "no settings were parsed while nothing changed"
        writer.set_threshold(0.9, "test")  # another FaceDB: bumps settings_version in its transaction
        before = len(parses)
        assert reader.identify(probe).threshold == 0.9, "a threshold set elsewhere is used by the next query"
        assert reader.identify(probe).threshold == 0.9
        assert len(parses) == before + 1, "parsed once after the change"
        writer.add_templates("bob", unit_rows(rng, 1, DIM), create=True)  # a generation change only
        before = len(parses)
        assert reader.settings().generation == writer.store.generation()
        assert len(parses) == before, "a new generation does not need the settings parsed again"
        writer.configure_audit(enabled=False)
        assert reader.settings().audit.enabled is False


def test_settings_read_inside_a_write_transaction_are_never_kept(tmp_path):
    with make(tmp_path / "db") as db:
        with pytest.raises(RuntimeError), db.store.write():
            db.store.set_meta({"threshold": "0.77"})
            assert db.settings().threshold == 0.77  # the transaction's own view
            raise RuntimeError("roll back")
        assert db.settings().threshold == 0.5, "the rolled-back value is not served from memory"


def test_a_write_bumps_the_settings_version_in_its_own_transaction(tmp_path):
    with make(tmp_path / "db") as db:
        v0 = db.store.versions()[1]
        db.set_threshold(0.6, "test")
        conn = sqlite3.connect(tmp_path / "db" / STORE_FILE)
        assert int(conn.execute("SELECT value FROM meta WHERE key = 'settings_version'").fetchone()[0]) == v0 + 1
        conn.close()


# --------------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize("change", ["rename", "external-id", "merge", "remove"])
def test_cached_names_follow_changes_made_by_another_facedb(tmp_path, rng, change):
    root = tmp_path / "db"
    items = people(rng, 6)
    with make(root) as db:
        db.add_templates_many(items)
    probe = items[2][1][0]
    with FaceDB.open(root) as reader, FaceDB.open(root) as writer:
        assert reader.identify(probe).identity == "p2"
        if change == "rename":
            writer.rename_person("p2", "Ada")
            assert reader.identify(probe).identity == "Ada"
        elif change == "external-id":
            writer.update_person("p2", external_id="E-2")
            assert reader.identify(probe).external_id == "E-2"
        elif change == "merge":
            writer.merge_people("p2", "p3")
            answer = reader.identify(probe)
            assert answer.identity == "p3" and "p2" not in [c.name for c in answer.candidates]
        else:
            writer.remove_person("p2")
            assert "p2" not in [c.name for c in reader.identify(probe).candidates]


# ------------------------------------------------------------------------------------ in-memory vectors
@pytest.mark.parametrize("kind", ["ivfpq", "flat16"])
def test_rescoring_from_memory_gives_the_exact_answers(tmp_path, rng, kind):
    items = people(rng, 300, per=4)
    probes = np.concatenate([items[i][1][:1] + 0.05 * unit_rows(rng, 1, DIM) for i in range(0, 300, 7)])
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    with make(tmp_path / "db", index=kind) as db:
        db.add_templates_many(items)
        state = db.load_index(wait=True)
        assert state.rescore_from == "memory" and state.rescore_bytes >= 1200 * DIM * 4
        for probe in probes:
            got = [(c.name, c.similarity) for c in db.identify(probe, k=5).candidates]
            want = oracle(items, probe)
            assert got[0][0] == want[0][0]
            for name, sim in got:
                assert abs(sim - dict(oracle(items, probe, k=300))[name]) < 1e-5, "every score is exact"


def test_vectors_fill_in_the_background_after_open_and_never_bring_back_a_removed_template(tmp_path, rng):
    root = tmp_path / "db"
    items = people(rng, 200, per=3)
    with make(root, index="ivfpq") as db:
        db.add_templates_many(items)
        db.save_index()
    with FaceDB.open(root) as db:
        state = db.load_index()  # from the file: codes only; the vectors come from the store meanwhile
        assert state.from_file and state.rescore_from in ("loading", "memory")
        db.remove_person("p5")
        state = db.load_index(wait=True)
        assert state.rescore_from == "memory"
        vectors = db.keeper.gallery.vectors
        ids = [t.id for t in db.templates()]
        assert len(vectors) == len(ids) == 199 * 3, "the fill skipped the removed person's templates"
        assert vectors.get(np.array(ids)).tobytes() == np.stack([t.vector for t in db.templates()]).tobytes()
        assert db.identify(items[5][1][0]).identity != "p5"


def test_over_the_memory_budget_rescoring_reads_the_store(tmp_path, rng):
    items = people(rng, 100, per=3)
    with make(tmp_path / "db", index="ivfpq", rescore_memory_mb=0.01) as db:  # 10 KiB: less than 300 x 132 B
        db.add_templates_many(items)
        assert db.load_index().rescore_from == "store"
        assert db.identify(items[7][1][1]).identity == "p7"
    with FaceDB.open(tmp_path / "db", rescore_memory_mb=1) as db:
        assert db.load_index(wait=True).rescore_from == "memory"
        db.keeper.vector_budget = budget_bytes(0.05)
        db.keeper.gallery._vector_budget = budget_bytes(0.05)
        db.add_templates_many(people(np.random.default_rng(9), 200, per=1))  # grows past 50 KiB
        assert db.index_state().rescore_from == "store", "a gallery that outgrew the budget drops its vectors"
        assert db.identify(items[7][1][1]).identity == "p7"


def test_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("FACEDB_RESCORE_MEMORY_MB", "3")
    assert budget_bytes() == 3 * 2**20
    monkeypatch.delenv("FACEDB_RESCORE_MEMORY_MB")
    assert budget_bytes() == 8192 * 2**20
    assert budget_bytes(0) == 0


@pytest.mark.parametrize("variable,value", [("FACEDB_RESCORE_MEMORY_MB", "abc"), ("FACEDB_RESCORE_MEMORY_MB", "-5"),
                                            ("FACEDB_RESCORE_MEMORY_MB", "nan"), ("FACEDB_CLOSE_CALLS", "bogus"),
                                            ("FACEDB_STAND_IN_AFTER_S", "soon"), ("FACEDB_STAND_IN_AFTER_S", "-1"),
                                            ("FACEDB_THREADS", "lots"), ("FACEDB_MAX_PIXELS", "0")])
def test_a_query_setting_the_environment_gets_wrong_is_refused_at_open(tmp_path, rng, monkeypatch, variable, value):
    """A typo in a query setting (found by a newcomer: ``abc`` meant the 8 GiB default, ``-5`` meant 0, ``bogus``
    left close calls on) is refused when the database is opened or created, by the API with
    InvalidInputError and by the CLI with one line and exit 2, before anything is read or written."""
    from typer.testing import CliRunner

    from facedb.cli import app

    root = tmp_path / "db"
    with make(root) as db:
        db.add_templates_many(people(rng, 5, per=2))
    before = (root / STORE_FILE).read_bytes()
    monkeypatch.setenv(variable, value)
    with pytest.raises(InvalidInputError, match=variable):
        FaceDB.open(root)
    with pytest.raises(InvalidInputError, match=variable):
        make(tmp_path / "other")
    assert not (tmp_path / "other").exists()
    out = CliRunner().invoke(app, ["--db", str(root), "stats"])
    assert out.exit_code == 2 and variable in out.output and len(out.output.strip().splitlines()) == 1, out.output
    assert (root / STORE_FILE).read_bytes() == before
    monkeypatch.delenv(variable)
    with FaceDB.open(root) as db:
        assert db.count_people() == 5


@pytest.mark.parametrize("value", ["lots", "nan", "inf", "-3", "1e400"])
def test_every_number_read_from_the_environment_goes_through_one_strict_parser(monkeypatch, value):
    """The whole kind of fault: no FACEDB_* number is read with a quiet fall back. Each reader refuses a bad
    value with InvalidInputError naming its variable, and nothing in the package parses os.environ by hand."""
    import re

    from facedb.faces.images import max_pixels
    from facedb.gallery import standin
    from facedb.gallery.settings import threads_setting

    readers = {"FACEDB_MAX_PIXELS": max_pixels, "FACEDB_STAND_IN_AFTER_S": standin.after_s,
               "FACEDB_THREADS": threads_setting, "FACEDB_RESCORE_MEMORY_MB": budget_bytes}
    try:
        from facedb.gallery.index import milvus
    except ImportError:  # the milvus extra is not installed
        milvus = None
    if milvus is not None:
        readers[milvus.SEARCH_TIMEOUT_ENV] = milvus.search_timeout
    from facedb.service.config import ServiceSettings

    for variable in ("FACEDB_DOOR_RATE", "FACEDB_HOOK_ATTEMPTS", "FACEDB_BODY_TIMEOUT"):
        readers[variable] = ServiceSettings.from_env  # the service's own settings: the same parser
    for variable, read in readers.items():
        monkeypatch.setenv(variable, value)
        with pytest.raises(InvalidInputError, match=variable):
            read()
        monkeypatch.delenv(variable)
        read()  # unset: the default
    package = Path(__file__).resolve().parents[1] / "facedb"
    by_hand = [f"{path.name}: {line.strip()}" for path in package.rglob("*.py")
               for line in path.read_text().splitlines() if re.search(r"\b(float|int)\(os\.(environ|getenv)", line)]
    assert by_hand == []


def test_the_budget_given_to_open_is_checked_as_the_environments_is(tmp_path):
    for bad in (-1, float("nan"), float("inf"), "lots", "", True):
        with pytest.raises(InvalidInputError, match="rescore_memory_mb"):
            FaceDB.open(tmp_path / "absent", rescore_memory_mb=bad)
    assert budget_bytes(0.5) == 2**19


def test_template_vectors_remove_zeroes_and_reuses_rows(rng):
    v = TemplateVectors(DIM, capacity=2)
    x = unit_rows(rng, 5, DIM)
    v.put(np.array([3, 4, 9, 10, 11]), x)
    assert v.get(np.array([9, 3])).tobytes() == x[[2, 0]].tobytes()
    row = int(v._slot[9])
    v.remove(np.array([9]))
    assert not v._matrix[row].any(), "a removed template's row is zeroed at once"
    assert v.get(np.array([9])) is None and v.get(np.array([3, 4])) is not None
    v.put(np.array([9]), x[2:3], live=False)
    assert v.get(np.array([9])) is None, "a fill does not bring back a removed template"
    v.put(np.array([12]), x[4:5])
    assert int(v._slot[12]) == row, "freed rows are reused"
    v.put(np.array([9]), x[2:3])  # a merge adds the same template back under its new person
    assert v.get(np.array([9])).tobytes() == x[2:3].tobytes()
    assert v.get(np.array([10**6])) is None
    assert v.scores(np.array([], dtype=np.int64), x[:2]).shape == (0, 2), "no candidate: nothing to score"


# ----------------------------------------------------------------------------------------------- gallery
def test_gallery_maps_stay_right_through_adds_and_removes(rng):
    from facedb.gallery.index.faiss_kinds import new_index

    gallery = Gallery(new_index("flat", DIM), 0)
    truth: dict[int, int] = {}
    next_id = 1
    for step in range(30):
        n = int(rng.integers(1, 20))
        ids = np.arange(next_id, next_id + n)
        next_id += n + int(rng.integers(0, 3))
        pids = rng.integers(1, 40, n)
        gallery.add(ids, pids, unit_rows(rng, n, DIM))
        truth.update(zip(ids.tolist(), pids.tolist()))
        if step % 3 == 2:
            gone = rng.choice(list(truth), size=min(5, len(truth)), replace=False)
            gallery.remove(gone)
            for g in gone:
                truth.pop(int(g))
        probe_ids = np.array([*truth, next_id + 5, -1])
        assert gallery.person_of(probe_ids).tolist() == [truth[i] for i in truth] + [-1, -1]
        wanted = rng.choice(40, 6, replace=False)
        pids_got, ids_got = gallery.person_templates(wanted)
        want = sorted((p, i) for i, p in truth.items() if p in set(wanted.tolist()))
        assert list(zip(pids_got.tolist(), ids_got.tolist())) == want


# ------------------------------------------------------------------------------------------ streamed build
def test_a_streamed_build_trained_on_a_sample_holds_everything(tmp_path, rng, monkeypatch):
    import facedb.gallery.upkeep as keeper

    monkeypatch.setattr(keeper, "BUILD_BATCH", 97)
    monkeypatch.setattr(keeper, "training_rows", lambda n: min(n, 400))
    items = people(rng, 700, per=3)
    with make(tmp_path / "db") as db:
        db.add_templates_many(items)
        report = db.reindex("ivf", {"nlist": 16})
        assert report.params["trained_on"] == 2100, "trained_on is the gallery the sample stands for"
        assert db.keeper.rebuild_reason(db.keeper.gallery, db.settings()) is None
        assert db.check().ok
        assert db.identify(items[123][1][2]).identity == "p123"


@pytest.mark.parametrize("quantizer", ["flat", "pca", "fp16", "hnsw"])
@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_coarse_quantizers_survive_save_and_load(tmp_path, rng, kind, quantizer):
    items = people(rng, 400, per=3)
    root = tmp_path / "db"
    with make(root) as db:
        db.add_templates_many(items)
        db.reindex(kind, {"nlist": 32, "quantizer": quantizer})
    with FaceDB.open(root) as db:
        state = db.load_index(wait=True)
        assert state.from_file and state.params["quantizer"] == quantizer
        found = [db.identify(items[i][1][0]).identity == f"p{i}" for i in range(0, 400, 9)]
        assert all(found)
        assert db.check().ok


# -------------------------------------------------------------------------------------------- audit writer
def _audit_rows(root: Path) -> list[tuple]:
    conn = sqlite3.connect(root / STORE_FILE)
    try:
        return conn.execute("SELECT operation, identity FROM audit ORDER BY id").fetchall()
    finally:
        conn.close()


def test_async_decisions_are_committed_within_the_delay_and_changes_at_once(tmp_path, rng):
    root = tmp_path / "db"
    items = people(rng, 5)
    with make(root) as db:
        assert db.settings().audit.sync is False, "new databases use the background writer"
        db.add_templates_many(items)
        db.rename_person("p0", "Ann")
        assert _audit_rows(root)[-1][0] == "rename", "a gallery change is recorded before its call returns"
        for i in range(5):
            db.identify(items[i][1][0])
        deadline = time.monotonic() + 2.0
        while sum(op == "identify" for op, _ in _audit_rows(root)) < 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert sum(op == "identify" for op, _ in _audit_rows(root)) == 5, "committed shortly after the answers"
        db.identify(items[1][1][0])
    assert sum(op == "identify" for op, _ in _audit_rows(root)) == 6, "close() commits what waits"


def test_sync_mode_commits_each_decision_before_its_answer(tmp_path, rng):
    root = tmp_path / "db"
    items = people(rng, 3)
    with make(root) as db:
        db.add_templates_many(items)
        db.configure_audit(sync=True)
        for i in range(3):
            db.identify(items[i][1][0])
            assert _audit_rows(root)[-1] == ("identify", f"p{i}")


def test_a_failed_background_write_fails_the_next_decision_and_loses_nothing(tmp_path, rng, monkeypatch):
    root = tmp_path / "db"
    items = people(rng, 3)
    with make(root) as db:
        db.add_templates_many(items)
        real = db.store.append_audit_rows
        broken = {"on": True}

        def flaky(rows, retention):
            if broken["on"]:
                raise DatabaseError("disk full (simulated)")
            return real(rows, retention)

        monkeypatch.setattr(db.store, "append_audit_rows", flaky)
        db.identify(items[0][1][0])  # answered; its record waits for the writer, which fails
        deadline = time.monotonic() + 2.0
        while db.trail.failure is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert db.trail.failure is not None
        with pytest.raises(DatabaseError, match="audit trail cannot be written"):
            db.identify(items[1][1][0])
        broken["on"] = False
        db.identify(items[2][1][0])  # the retry succeeds: the waiting record is written first
        identities = [r.identity for r in db.audit(operation="identify")]
        assert identities == ["p0", "p2"], "the failed record was kept and written; the refused call has none"


def test_a_trail_that_cannot_be_written_at_all_refuses_the_first_decision_before_answering(tmp_path, rng,
                                                                                          monkeypatch):
    """A read-only folder: `facedb search` printed its answer, then said the trail could not be written and
    that no decision is given (newcomer check). The first decision of a trail is written before its answer."""
    root = tmp_path / "db"
    items = people(rng, 2)
    with make(root) as db:
        db.add_templates_many(items)
    with FaceDB.open(root) as db:
        def read_only(rows, retention):
            raise DatabaseError("attempt to write a readonly database (simulated)")

        real = db.store.append_audit_rows
        monkeypatch.setattr(db.store, "append_audit_rows", read_only)
        with pytest.raises(DatabaseError, match="audit trail cannot be written"):
            db.identify(items[0][1][0])
        monkeypatch.setattr(db.store, "append_audit_rows", real)
        db.identify(items[1][1][0])  # written before its answer; the refused call gave none and has no record
        assert [r for r in _audit_rows(root) if r[0] == "identify"] == [("identify", "p1")]
        db.identify(items[0][1][0])  # from now on the background writer
        assert db.trail._writer is not None
    assert sum(op == "identify" for op, _ in _audit_rows(root)) == 2


def test_older_databases_keep_synchronous_decision_records(tmp_path):
    root = tmp_path / "db"
    make(root).close()
    conn = sqlite3.connect(root / STORE_FILE)
    conn.execute("DELETE FROM meta WHERE key IN ('audit_sync', 'settings_version', 'people_version')")
    conn.execute("PRAGMA user_version = 9")  # main before the merge of speed: thumbnails, mean templates
    conn.commit()
    conn.close()
    with FaceDB.open(root) as db:
        assert db.settings().audit.sync is True
        assert db.store.versions()[1:] == (0, 0)


def test_a_database_made_by_branch_speed_before_the_merge_gets_mains_migrations(tmp_path):
    # Branch speed numbered its migration (the version counters) 7 before merging main's 7-9 (visitors,
    # thumbnails, derived templates): such a database at version 7 must still get main's tables and column.
    from facedb.gallery.store import MIGRATIONS, SCHEMA_VERSION, Store, _apply

    root = tmp_path / "db"
    make(root).close()
    path = root / STORE_FILE
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE thumbnails")
    conn.execute("DROP TABLE unassigned_faces")
    conn.execute("ALTER TABLE embeddings DROP COLUMN derived")
    conn.execute("DELETE FROM meta WHERE key = 'thumbnails'")
    conn.execute("PRAGMA user_version = 7")
    conn.commit()
    conn.close()
    store = Store.open(path)
    try:
        assert store.version == SCHEMA_VERSION == len(MIGRATIONS) >= 10  # every later step too
        tables = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"thumbnails", "unassigned_faces"} <= tables
        assert "derived" in {r[1] for r in store.conn.execute("PRAGMA table_info(embeddings)")}
        assert store.get_meta("thumbnails") == "off" and store.get_meta("audit_sync") == "0"
        for step in MIGRATIONS[6:]:  # every step from 7 on can run again (this one's fix relies on it)
            _apply(store.conn, step)
    finally:
        store.close()


def test_every_settings_writer_is_seen_by_a_memoised_reader(tmp_path, rng):
    # Settings main added (rule, margin, mean templates, thumbnails, visitors, index) go through Store.set_meta,
    # which bumps settings_version: a FaceDB holding parsed settings sees each at its next query.
    root = tmp_path / "db"
    make(root).close()
    with FaceDB.open(root) as reader, FaceDB.open(root) as writer:
        writer.add_templates("ann", unit_rows(rng, 2, DIM), create=True)
        probe = next(writer.templates("ann")).vector
        reader.identify(probe)
        writer.set_rule("margin", margin=0.3)
        assert reader.identify(probe).rule.startswith("margin")
        assert reader.settings().rule.margin == 0.3
        writer.configure_templates(mean=True)
        assert reader.settings().mean_templates is True
        writer.configure_thumbnails("all")
        assert reader.settings().thumbnails == "all"
        writer.configure_visitors(enabled=True, retention_days=7)
        assert reader.settings().visitors.enabled is True and reader.settings().visitors.retention_days == 7
        writer.configure_audit(sync=True, retention_days=3)
        assert reader.settings().audit.sync is True and reader.settings().audit.retention_days == 3
        writer.reindex("ivf", {"nlist": 2, "quantizer": "fp16"})
        assert reader.settings().index_kind == "ivf"
        writer.set_threshold(0.8, "test")
        assert reader.identify(probe).threshold == 0.8


def test_the_coarse_quantizer_is_an_index_parameter_checked_before_a_reindex(tmp_path):
    from facedb.errors import InvalidInputError
    from facedb.gallery.index import check_index_params
    from facedb.gallery.index.faiss_kinds import QUANTIZERS

    for q in QUANTIZERS:
        assert check_index_params("ivfpq", {"quantizer": q, "quantizer_ef": 64}) == {"quantizer": q,
                                                                                     "quantizer_ef": 64}
    with make(tmp_path / "db") as db:
        before = db.store.all_meta()
        for bad in ({"quantizer": "kmeans"}, {"quantizer": 3}, {"quantizer_ef": 0}):
            with pytest.raises(InvalidInputError):
                db.reindex("ivf", bad)
        assert db.store.all_meta() == before


CHILD = textwrap.dedent("""
    import sys, numpy as np
    from facedb import FaceDB
    db = FaceDB.open(sys.argv[1])
    x = np.load(sys.argv[2])
    for i, v in enumerate(x):
        db.identify(v)
        print(i, flush=True)
    sys.stdin.read()  # wait to be killed
""")


@pytest.mark.parametrize("sync", [True, False])
def test_sigkill_after_answers_loses_at_most_the_last_delay(tmp_path, rng, sync):
    """sync: every answered decision's record survives a SIGKILL; async: those answered more than the writer's
    delay (20 ms) before the kill do (here: all but the ones in the last half second are required)."""
    root = tmp_path / "db"
    items = people(rng, 10)
    with make(root) as db:
        db.add_templates_many(items)
        db.configure_audit(sync=sync)
    probes = tmp_path / "probes.npy"
    np.save(probes, np.stack([v[0] for _, v in items]))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(probes)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ})
    answered_at = {}
    for _ in range(10):
        line = proc.stdout.readline()
        answered_at[int(line)] = time.monotonic()
    time.sleep(0.5)
    kill_at = time.monotonic()
    proc.kill()
    proc.wait()
    recorded = [op for op, _ in _audit_rows(root) if op == "identify"]
    must = sum(1 for t in answered_at.values() if kill_at - t > (0 if sync else 0.4))
    assert len(recorded) >= must
    if sync:
        assert len(recorded) == 10


def test_cli_audit_settings_switches_the_mode(tmp_path):
    from typer.testing import CliRunner

    from facedb.cli import app

    root = tmp_path / "db"
    make(root).close()
    runner = CliRunner()
    out = runner.invoke(app, ["--db", str(root), "--json", "audit-settings", "--sync"])
    assert out.exit_code == 0, out.output
    with FaceDB.open(root) as db:
        assert db.settings().audit.sync is True
    out = runner.invoke(app, ["--db", str(root), "--json", "audit-settings", "--async"])
    assert out.exit_code == 0 and '"sync": false' in out.output
    conn = sqlite3.connect(root / STORE_FILE)
    assert conn.execute("SELECT value FROM meta WHERE key = 'audit_sync'").fetchone()[0] == "0"
    conn.close()


def test_the_service_records_decisions_in_the_background_and_on_shutdown(tmp_path, fake_pipeline):
    pytest.importorskip("fastapi", reason="the service extra is not installed")
    from fastapi.testclient import TestClient

    from facedb.service.app import create_app
    from facedb.service.config import ServiceSettings

    from .servicekit import make_db, wait_ready

    root = tmp_path / "db"
    keys = make_db(root, sync_audit=False)
    app = create_app(ServiceSettings(db=root, max_upload_mb=1, fold_window=0.0), model=fake_pipeline,
                     sender=lambda url, body, headers: 200)
    vector = [1.0] + [0.0] * 31
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        for _ in range(3):
            resp = client.post("/v1/identify/vector", json={"vector": vector}, headers={"X-API-Key": keys["identify"]})
            assert resp.status_code == 200, resp.text
        deadline = time.monotonic() + 2.0
        while sum(op == "identify" for op, _ in _audit_rows(root)) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert sum(op == "identify" for op, _ in _audit_rows(root)) == 3
        client.post("/v1/identify/vector", json={"vector": vector}, headers={"X-API-Key": keys["identify"]})
    assert sum(op == "identify" for op, _ in _audit_rows(root)) == 4, "shutting the service down commits the rest"


# ----------------------------------------------------------------------------- batched detection, cancellation
class BatchingDetector:
    """The conftest's fake detector with a ``detect_many`` (as MTCNN's batched one), counting the batches."""

    def __init__(self) -> None:
        from .conftest import FakeDetector

        self.one = FakeDetector()
        self.batches: list[int] = []

    def detect(self, image):
        self.batches.append(1)
        return self.one.detect(image)

    def detect_many(self, images):
        self.batches.append(len(images))
        return [self.one.detect(i) for i in images]


def _photos(n: int, faces_each: int = 1):
    import io

    from PIL import Image

    from .conftest import face_image

    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(face_image([(200, 40 + 20 * i, 40)] * faces_each, i)).save(buf, "PNG")
        out.append((i, buf.getvalue()))
    return out


def test_prepare_detects_a_chunk_in_one_batch_and_keeps_every_choice(fake_pipeline):
    # main's FaceChoice.ALL and speed's batched detection together: one detect_many call for the chunk, the
    # same faces as one photo at a time.
    from facedb.faces.pipeline import FaceChoice, Prepared, PreparedFaces, Unprepared, prepare

    align = fake_pipeline.embedder.align
    items = [*_photos(4, faces_each=2), (9, b"not an image")]
    alone = prepare(fake_pipeline.detector, align, items, FaceChoice.ALL)
    det = BatchingDetector()
    together = prepare(det, align, items, FaceChoice.ALL)
    assert det.batches == [4]
    assert [type(o) for o in together] == [PreparedFaces] * 4 + [Unprepared]
    for a, b in zip(alone[:4], together[:4]):
        assert a.key == b.key and [f.box for f in a.faces] == [f.box for f in b.faces]
        assert all(np.array_equal(x, y) for x, y in zip(a.crops, b.crops))
    largest = prepare(BatchingDetector(), align, items, FaceChoice.LARGEST)
    assert [type(o) for o in largest] == [Prepared] * 4 + [Unprepared]


def test_prepare_stops_before_detecting_when_the_consumer_is_gone():
    import threading

    from facedb.faces.pipeline import prepare

    stop = threading.Event()
    det = BatchingDetector()
    items = _photos(3)

    def interrupted():
        for n, item in enumerate(items):
            if n == 2:
                stop.set()  # the consumer was interrupted while this chunk was being decoded
            yield item

    out = prepare(det, lambda img, f: img, interrupted(), stop=stop)  # type: ignore[arg-type]
    assert out == [] and det.batches == [], "no detection batch runs once stopped"

    class StoppingDetector(BatchingDetector):  # one photo at a time (no detect_many), interrupted at the second
        detect_many = None

        def detect(self, image):
            if len(self.batches) == 1:
                stop.set()
            return super().detect(image)

    stop.clear()
    one = StoppingDetector()
    out = prepare(one, lambda img, f: img, items, stop=stop)
    assert len(out) == 2 and one.batches == [1, 1], "the photo being detected finishes; no other starts"
    stop.clear()
    assert len(prepare(det, lambda img, f: img, items, stop=stop)) == 3 and det.batches == [3]
