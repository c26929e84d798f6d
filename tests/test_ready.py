"""Ready after a restart (#27): the writer leaves the index it built, with the template -> person map and the
re-scoring vectors inside it, so the next process answers without reading the store's map or vectors and
without building anything; answers after reopening equal those of a freshly rebuilt index and of exact search;
a copy that is not the stamp's is never trusted; the saved vectors are erased and encrypted as the index is."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from facedb import FaceDB
from facedb.errors import TamperedFileWarning
from facedb.gallery.settings import Settings
from facedb.gallery.store import Store

from .conftest import unit_rows

DIM = 32
KINDS = ["flat", "flat16", "hnsw", "ivf", "ivfpq"]
KEY = "correct horse battery staple for facedb tests"


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(27)
    centres = unit_rows(rng, 150, DIM)
    items = []
    for p, c in enumerate(centres):
        t = c + 0.05 * rng.standard_normal((4, DIM))
        items.append((f"p{p:03d}", (t / np.linalg.norm(t, axis=1, keepdims=True)).astype(np.float32)))
    probes = centres[:60] + 0.05 * rng.standard_normal((60, DIM))
    probes = np.concatenate([probes, unit_rows(rng, 20, DIM)])  # 20 strangers
    return items, (probes / np.linalg.norm(probes, axis=1, keepdims=True)).astype(np.float32)


def exact(items, probes, k=3):
    """Exact search by brute force: each probe's top-k (name, best similarity over the person's templates)."""
    scores = np.stack([np.max(v @ probes.T, axis=0) for _, v in items], axis=1)  # (probes, people)
    names = [n for n, _ in items]
    out = []
    for row in scores:
        top = np.argsort(-row, kind="stable")[:k]
        out.append([(names[j], float(row[j])) for j in top])
    return out


def ranked(answers):
    return [[(c.name, c.similarity) for c in a.candidates] for a in answers]


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert [n for n, _ in x] == [n for n, _ in y]
        assert np.allclose([s for _, s in x], [s for _, s in y], atol=1e-5)


def agrees_with_exact(answers, items, probes):
    """Exact search's decision for every probe (and its best person wherever that is accepted), and every
    candidate shown with its exact score (an approximate index may miss a lower candidate, or a stranger's
    nearest non-match, never change a score or a decision here)."""
    truth = exact(items, probes, k=len(items))
    for a, t in zip(answers, truth):
        if t[0][1] >= 0.5:
            assert a.candidates[0].name == t[0][0]
        assert a.identity == (t[0][0] if t[0][1] >= 0.5 else None)
        scores = dict(t)
        assert all(c.similarity == pytest.approx(scores[c.name], abs=1e-5) for c in a.candidates)


def no_store_reads(monkeypatch):
    """Make the store's whole-gallery reads fail: an open that needs them is not loading from the file."""
    def refuse(*a, **kw):
        raise AssertionError("the store's whole map or vectors were read at open")

    monkeypatch.setattr(Store, "template_map", refuse)
    monkeypatch.setattr(Store, "stream_templates", refuse)


def auto_gallery_of_240(root, items, monkeypatch):
    """An ``auto`` database of 60 people (240 templates), with ``auto`` picking flat below 300 templates and
    ivfpq from there (50,000 in the product), so that a few more people move it to another kind."""
    monkeypatch.setattr("facedb.gallery.upkeep.auto_kind", lambda n, dim: "flat" if n < 300 else "ivfpq")
    with FaceDB.create(root, model_id="m", dim=DIM, threshold=0.5, index="auto") as db:
        db.add_templates_many(items[:60])


def count_builds(door, monkeypatch) -> list[int]:
    """A list that grows by one at each index build of ``door``'s own (not of another process's close)."""
    builds: list[int] = []
    real_build = door.keeper._build
    monkeypatch.setattr(door.keeper, "_build", lambda s: builds.append(1) or real_build(s))
    return builds


@pytest.mark.parametrize("kind", KINDS)
def test_writer_leaves_index_and_reopen_answers_as_rebuilt_and_exact(tmp_path, data, kind, monkeypatch):
    items, probes = data
    root = tmp_path / "db"
    params = {"nlist": 8, "nprobe": 8} if kind.startswith("ivf") else {}
    with FaceDB.create(root, model_id="m", dim=DIM, threshold=0.5, index=kind) as db:
        db.store.set_meta(Settings.index_rows(kind, params))  # what reindex records, without building
    # 600 templates stand for a bulk import here (a writer settles from SETTLE_TEMPLATES added templates on)
    monkeypatch.setattr("facedb.gallery.upkeep.SETTLE_TEMPLATES", 100)
    with FaceDB.open(root) as db:
        db.add_templates_many(items)  # a bulk import that never queries
        assert db.keeper.gallery is None
    assert (root / "index.faiss").is_file()  # left by the writer's close
    with FaceDB.open(root) as db:
        stamp = db.settings().index_stamp
        assert stamp["generation"] == db.stats().generation and stamp["live"] == 600 and stamp["map"]
        assert stamp["map"]["vectors"] == (kind in ("ivfpq", "flat16"))
        with monkeypatch.context() as m:
            no_store_reads(m)
            reopened = db.identify(probes, k=3)
            db.load_index(wait=True)  # the mapped vectors' check, in the background
            state = db.index_state()
        assert state.from_file and state.built == kind
        assert state.rescore_from == {"ivfpq": "memory", "flat16": "memory"}.get(kind, state.rescore_from)
        loaded = db.keeper.gallery
        db.rebuild_index()
        assert db.keeper.gallery is not loaded  # built afresh from the store
        rebuilt = db.identify(probes, k=3)
    same(ranked(reopened), ranked(rebuilt))
    agrees_with_exact(reopened, items, probes)
    assert [a.identity for a in reopened] == [a.identity for a in rebuilt]


def test_changes_after_the_save_are_levelled_from_the_change_log(tmp_path, data, monkeypatch):
    """A copy saved at generation g, then a few writes by a process that did not save (a killed one): the
    next open takes the map and vectors from the file and only the changes since g from the store."""
    items, probes = data
    root = tmp_path / "db"
    with FaceDB.create(root, model_id="m", dim=DIM, threshold=0.5, index="ivfpq") as db:
        db.reindex("ivfpq", {"nlist": 8, "nprobe": 8})
        db.add_templates_many(items[:-10])
    db = FaceDB.open(root)
    db.add_templates_many(items[-10:])
    db.close(save_index=False)  # as if killed: the file lacks the last ten people
    with FaceDB.open(root) as db:
        saved_at = db.settings().index_stamp["generation"]
        assert saved_at < db.stats().generation
        with monkeypatch.context() as m:
            no_store_reads(m)
            got = db.identify(probes, k=3)
            db.load_index(wait=True)
        assert db.index_state().rescore_from == "memory" and not db.index_state().from_file
        generation = db.stats().generation
    agrees_with_exact(got, items, probes)
    with FaceDB.open(root) as db:  # the close saved the levelled copy
        assert db.settings().index_stamp["generation"] == generation


def test_a_copy_that_is_not_the_stamps_is_never_trusted(tmp_path, data):
    items, probes = data
    root = tmp_path / "db"
    with FaceDB.create(root, model_id="m", dim=DIM, threshold=0.5, index="ivfpq") as db:
        db.reindex("ivfpq", {"nlist": 8, "nprobe": 8})
        db.add_templates_many(items[:100])
        db.save_index()
        old = (root / "index.faiss").read_bytes()  # saved at an earlier generation
        db.add_templates_many(items[100:])
        db.save_index()
    (root / "index.faiss").write_bytes(old)  # an older copy put back: its SHA-256 is not the stamp's
    with FaceDB.open(root) as db:
        got = db.identify(probes, k=3)
        assert not db.index_state().from_file  # rebuilt
    agrees_with_exact(got, items, probes)

    # A stamp that names another generation than the section the file holds: the map is not taken from it
    with FaceDB.open(root) as db:
        stamp = db.settings().index_stamp
        taken = []
        real = db.keeper._from_saved
        db.keeper._from_saved = lambda *a: taken.append(real(*a)) or taken[-1]
        db.store.set_meta({"index_stamp": __import__("json").dumps({**stamp, "generation": stamp["generation"] - 1})})
        got = db.identify(probes, k=3)
        assert taken == [None]
    agrees_with_exact(got, items, probes)


def test_saved_vectors_are_erased_with_the_person(tmp_path, data):
    items, probes = data
    root = tmp_path / "db"
    with FaceDB.create(root, model_id="m", dim=DIM, threshold=0.5, index="ivfpq") as db:
        db.reindex("ivfpq", {"nlist": 8, "nprobe": 8})
        db.add_templates_many(items)
    gone = items[5][1]
    data_before = (root / "index.faiss").read_bytes()
    assert all(np.asarray(v, "<f4").tobytes() in data_before for v in gone)  # the re-scoring vectors are there
    with FaceDB.open(root) as db:
        db.identify(probes[0])  # loaded: its vectors are mapped from the file
        assert not db.keeper.gallery.vectors._matrix.flags.owndata
        db.remove_person("p005")
        data_after = (root / "index.faiss").read_bytes()  # rewritten by the removal
        assert not any(np.asarray(v, "<f4").tobytes() in data_after for v in gone)
        assert db.keeper.gallery.vectors._matrix.flags.owndata  # the old file is no longer mapped
    with FaceDB.open(root) as db:
        got = db.identify(probes, k=3)
    agrees_with_exact(got, [it for it in items if it[0] != "p005"], probes)


def test_encrypted_database_saves_them_sealed(tmp_path, data, monkeypatch):
    items, probes = data
    root = tmp_path / "db"
    with FaceDB.create(root, model_id="m", dim=DIM, threshold=0.5, index="ivfpq", key=KEY) as db:
        db.reindex("ivfpq", {"nlist": 8, "nprobe": 8})
        db.add_templates_many(items)
    raw = (root / "index.faiss").read_bytes()
    assert not any(np.asarray(v, "<f4").tobytes() in raw for _, t in items for v in t)
    with FaceDB.open(root, key=KEY) as db:
        assert db.settings().index_stamp["map"] == {"vectors": True}
        with monkeypatch.context() as m:
            no_store_reads(m)
            got = db.identify(probes, k=3)
        assert db.index_state().from_file and db.index_state().rescore_from == "memory"
    agrees_with_exact(got, items, probes)


def test_small_writes_leave_the_saved_copy_to_be_levelled_at_open(tmp_path, data):
    """A writer that added a few templates to a database whose copy is recent does not rebuild on close: the
    next open adds them to the saved copy (the settle threshold is for bulk imports)."""
    items, probes = data
    root = tmp_path / "db"
    with FaceDB.create(root, model_id="m", dim=DIM, threshold=0.5, index="ivfpq") as db:
        db.reindex("ivfpq", {"nlist": 8, "nprobe": 8})
        db.add_templates_many(items[:-1])
    saved = (root / "index.faiss").stat().st_mtime_ns
    with FaceDB.open(root) as db:
        db.add_templates(*items[-1], create=True)
    assert (root / "index.faiss").stat().st_mtime_ns == saved
    with FaceDB.open(root) as db:
        got = db.identify(probes, k=3)
    agrees_with_exact(got, items, probes)


def test_a_process_holding_its_gallery_saves_after_a_bulk_write(tmp_path, data, monkeypatch):
    """A service (its gallery loaded) that takes a bulk import saves before the call returns: a crash right
    after it leaves a copy level with the store."""
    items, probes = data
    root = tmp_path / "db"
    monkeypatch.setattr("facedb.gallery.upkeep.SETTLE_TEMPLATES", 100)
    with FaceDB.create(root, model_id="m", dim=DIM, threshold=0.5, index="ivfpq") as db:
        db.reindex("ivfpq", {"nlist": 8, "nprobe": 8})
        db.add_templates_many(items[:10])
    db = FaceDB.open(root)
    db.identify(probes[0])  # loaded, as a service's is
    db.add_templates_many(items[10:20])  # 40 templates: below the threshold, kept in memory only
    assert db.settings().index_stamp["generation"] < db.stats().generation
    db.add_templates_many(items[20:])  # 520 more: saved before the call returns
    assert db.settings().index_stamp["generation"] == db.stats().generation
    db.close(save_index=False)  # as if killed now
    with FaceDB.open(root) as db:
        got = db.identify(probes, k=3)
        assert db.index_state().from_file
    agrees_with_exact(got, items, probes)


def test_mapped_vectors_are_checked_in_the_background_and_answers_meanwhile_come_from_the_store(
        tmp_path, data, monkeypatch):
    """The part of the file before the vectors is checked at open; the vectors (gigabytes at 1M) are checked
    in the background: until then queries re-score from the store (the same answers), and a removal made
    meanwhile is never brought back by them."""
    items, probes = data
    root = tmp_path / "db"
    with FaceDB.create(root, model_id="m", dim=DIM, threshold=0.5, index="ivfpq") as db:
        db.reindex("ivfpq", {"nlist": 8, "nprobe": 8})
        db.add_templates_many(items)
    from facedb.gallery.index import faiss_kinds

    release = threading.Event()
    real = faiss_kinds._vectors_check

    def slow_check(vectors, expected):
        check = real(vectors, expected)
        return lambda: release.wait(30) and check()

    monkeypatch.setattr(faiss_kinds, "_vectors_check", slow_check)
    with FaceDB.open(root) as db:
        during = db.identify(probes, k=3)
        assert db.index_state().rescore_from == "loading"
        threading.Timer(0.5, release.set).start()  # the removal's erasure waits for the check to save them
        db.remove_person("p007")
        db.load_index(wait=True)
        assert db.index_state().rescore_from == "memory"
        after = db.identify(probes, k=3)
    agrees_with_exact(during, items, probes)
    agrees_with_exact(after, [it for it in items if it[0] != "p007"], probes)


def test_altered_vectors_are_never_used(tmp_path, data):
    items, probes = data
    root = tmp_path / "db"
    with FaceDB.create(root, model_id="m", dim=DIM, threshold=0.5, index="ivfpq") as db:
        db.reindex("ivfpq", {"nlist": 8, "nprobe": 8})
        db.add_templates_many(items)
    raw = bytearray((root / "index.faiss").read_bytes())
    at = bytes(raw).find(np.asarray(items[3][1][0], "<f4").tobytes())
    assert at > 0
    raw[at:at + 4] = np.float32(0.9).tobytes()  # p003's first template, altered in the saved vectors
    (root / "index.faiss").write_bytes(bytes(raw))
    with pytest.warns(TamperedFileWarning):
        with FaceDB.open(root) as db:
            got = db.identify(probes, k=3)
            db.load_index(wait=True)
            assert db.index_state().rescore_from == "store"  # the altered rows are not used
            got_after = db.identify(probes, k=3)
            assert db.check().ok  # the check heals the file (rebuilt from the store, saved)
    agrees_with_exact(got, items, probes)
    agrees_with_exact(got_after, items, probes)


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_a_running_process_left_behind_by_a_bulk_import_loads_the_writers_copy(tmp_path, data, kind, monkeypatch):
    """A door's process holds its gallery while another process (the CLI, an import) adds more people than the
    change log keeps behind the copy it saves: the door's next query takes that copy and levels it with the
    store, never rebuilds the index (a rebuild inside a query: minutes at 1M). Found by a newcomer: 1,200
    people imported beside a running service made its next identify take 12.9 s (ivfpq, ~150k templates)."""
    items, probes = data
    root = tmp_path / "db"
    monkeypatch.setattr("facedb.gallery.store.changes.CHANGES_KEPT", 20)  # 1,000 by default
    monkeypatch.setattr("facedb.gallery.upkeep.SETTLE_TEMPLATES", 100)
    with FaceDB.create(root, model_id="m", dim=DIM, threshold=0.5, index=kind) as db:
        if kind == "ivfpq":
            db.reindex("ivfpq", {"nlist": 8, "nprobe": 8})
        db.add_templates_many(items[:20])
    door = FaceDB.open(root)
    try:
        door.identify(probes[0])  # loaded, as a service's is
        behind = door.keeper.gallery.generation
        with FaceDB.open(root) as writer:  # another process: 130 people, each its own generation
            writer.add_templates_many(items[20:])
        with FaceDB.open(root) as other:
            assert other.store.changes_since(behind) is None  # the log no longer reaches the door's copy
        builds = count_builds(door, monkeypatch)
        got = door.identify(probes, k=3)
        door.load_index(wait=True)
        assert builds == [] and door.index_state().from_file
    finally:
        door.close()
    agrees_with_exact(got, items, probes)


def test_a_door_keeps_answering_while_an_import_moves_auto_to_another_kind(tmp_path, data, monkeypatch):
    """An import by another process takes an ``auto`` gallery past the size where ``auto`` picks another kind:
    the door's queries meanwhile answer from the gallery they have (level with the store, exact here) instead of
    rebuilding inside a query (found by a newcomer: 5.6-9.9 s stalls of every door at 50,000 templates), then
    take the copy the writer saved at its close; the door's own close leaves that copy alone."""
    items, probes = data
    root = tmp_path / "db"
    auto_gallery_of_240(root, items, monkeypatch)
    door = FaceDB.open(root)
    try:
        door.identify(probes[0])
        assert door.index_state().built == "flat"
        builds = count_builds(door, monkeypatch)
        writer = FaceDB.open(root)
        writer.add_templates_many(items[60:])  # 600 templates: auto now wants ivfpq; the writer has not closed
        during = door.identify(probes, k=3)
        assert builds == [] and door.index_state().built == "flat"
        writer.close()  # builds and saves the ivfpq copy the next open would otherwise build
        saved = door.settings().index_stamp
        assert saved["kind"] == "ivfpq"
        after = door.identify(probes, k=3)
        state = door.index_state()
        assert builds == [] and state.built == "ivfpq" and state.from_file
    finally:
        door.close()
    assert FaceDB.open(root).settings().index_stamp == saved  # not written over by the door's close
    agrees_with_exact(during, items, probes)
    agrees_with_exact(after, items, probes)


def test_a_close_never_writes_its_gallery_over_a_newer_saved_copy(tmp_path, data):
    """A process that built its own gallery (no copy was saved when it opened) closes after another process
    added people and saved a copy of its own: the newer copy stays, not the closing process's (trained on
    fewer templates), caught up and written over it (found by a newcomer: stopping a service replaced the
    writer's freshly saved index with the service's own)."""
    items, probes = data
    root = tmp_path / "db"
    with FaceDB.create(root, model_id="m", dim=DIM, threshold=0.5, index="ivfpq") as db:
        db.reindex("ivfpq", {"nlist": 8, "nprobe": 8})
        db.add_templates_many(items[:100])
    (root / "index.faiss").unlink()  # so the next process builds its own
    door = FaceDB.open(root)
    door.identify(probes[0])
    assert not door.index_state().from_file and door.index_state().params["trained_on"] == 400
    with FaceDB.open(root) as other:
        other.add_templates_many(items[100:])
        other.rebuild_index()  # a copy of all 600, saved
        saved = other.settings().index_stamp
    assert saved["params"]["trained_on"] == 600
    door.close()
    with FaceDB.open(root) as db:
        assert db.settings().index_stamp == saved
        agrees_with_exact(db.identify(probes, k=3), items, probes)


def test_load_index_rebuilds_at_start_up_so_no_query_pays_for_it(tmp_path, data, monkeypatch):
    """A service's start-up (``load_index``) does what a query would put off: a writer killed after taking an
    ``auto`` gallery past its kind's size left only the old copy, and the door's first query must not build
    (found by a reviewer: the put-off applied to ``load_index`` too)."""
    items, probes = data
    root = tmp_path / "db"
    auto_gallery_of_240(root, items, monkeypatch)
    writer = FaceDB.open(root)
    writer.add_templates_many(items[60:])
    writer.close(save_index=False)  # as if killed: the saved copy is the flat one
    with FaceDB.open(root) as door:
        assert door.load_index(wait=True).built == "ivfpq"
        builds = count_builds(door, monkeypatch)
        got = door.identify(probes, k=3)
        assert builds == []
    agrees_with_exact(got, items, probes)


def test_a_saved_copy_that_fails_to_load_leaves_the_door_answering(tmp_path, data, monkeypatch):
    """Loading the writer's copy raises (a busy or damaged store read): the query answers from the gallery it
    had, level with the store, rather than failing the door's request (found by a reviewer)."""
    items, probes = data
    root = tmp_path / "db"
    auto_gallery_of_240(root, items, monkeypatch)
    door = FaceDB.open(root)
    try:
        door.identify(probes[0])
        with FaceDB.open(root) as writer:
            writer.add_templates_many(items[60:])
        def broken(settings, wait_s):
            raise OSError("the store is busy")
        monkeypatch.setattr(door.keeper, "_load_noted", broken)
        got = door.identify(probes, k=3)
        assert door.index_state().built == "flat" and door.keeper.gallery is not None
    finally:
        door.close(save_index=False)
    agrees_with_exact(got, items, probes)
