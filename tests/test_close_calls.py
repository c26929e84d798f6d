"""Close calls (#27): an approximate index's decisions equal exact search's where the probe's best match sits
near the threshold, on a gallery of the shape that failed at 1M 128-d (scripts/bench_search.py's face-like
data, 5 templates a person, strangers whose nearest templates are near-ties around the threshold)."""

from __future__ import annotations

import numpy as np
import pytest

from facedb import FaceDB
from facedb.gallery import engine
from facedb.gallery.index import faiss_kinds

DIM, PEOPLE, PER = 128, 2000, 5


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def shape():
    """Templates, probes (100 genuine, then 300 strangers), exact decisions at a threshold where half the
    strangers' best scores lie above it (exact search's false accepts: the decisions an index can miss)."""
    rng = np.random.default_rng(7)
    scale = (np.arange(DIM) + 1.0) ** -0.4  # the face-like data's falling variances
    scale /= np.sqrt(np.sum(scale**2))
    sigma = np.sqrt(1 / 0.7 - 1)  # a template's similarity to its person's centre ~0.84
    centres = _unit(rng.standard_normal((PEOPLE, DIM)) * scale)
    templates = _unit(centres[:, None, :] + sigma * rng.standard_normal((PEOPLE, PER, DIM)) / np.sqrt(DIM))
    strangers = _unit(_unit(rng.standard_normal((300, DIM)) * scale)
                      + sigma * rng.standard_normal((300, DIM)) / np.sqrt(DIM))
    genuine = _unit(centres[:100] + sigma * rng.standard_normal((100, DIM)) / np.sqrt(DIM))
    probes = np.concatenate([genuine, strangers])
    sims = probes @ templates.reshape(-1, DIM).T
    best, who = sims.max(axis=1), sims.argmax(axis=1) // PER
    threshold = float(np.median(best[100:]))
    exact = [f"p{w}" if b >= threshold else None for w, b in zip(who, best)]
    return templates, probes, threshold, exact, best


@pytest.fixture(scope="module")
def db(tmp_path_factory, shape):
    templates, probes, threshold, _, _ = shape
    with FaceDB.create(tmp_path_factory.mktemp("close") / "db", model_id="m", dim=DIM, threshold=threshold,
                       index="ivfpq") as db:
        db.add_templates_many([(f"p{i}", templates[i]) for i in range(PEOPLE)])
        db.identify(probes[0])  # builds the index
        yield db


def _decisions(db, probes):
    return [db.identify(p).identity for p in probes]


def test_close_calls_decide_as_exact_search(db, shape, monkeypatch):
    _, probes, _, exact, _ = shape
    state = db.index_state()
    assert state.built == "ivfpq" and state.params["pq_m"] == DIM  # 64-byte codes: one dimension a sub-quantizer
    assert _decisions(db, probes) == exact
    # the shape fails without the close-call search: strangers' nearest templates lie in lists nprobe misses
    band = engine.CLOSE_CALL
    monkeypatch.setenv("FACEDB_CLOSE_CALLS", "off")  # the operator's switch: the first search alone
    switched_off = _decisions(db, probes)
    monkeypatch.delenv("FACEDB_CLOSE_CALLS")
    monkeypatch.setattr(engine, "CLOSE_CALL", 0.0)
    missed = sum(g != e for g, e in zip(_decisions(db, probes), exact))
    assert missed >= 5  # 15 of 400 when written
    assert switched_off == _decisions(db, probes)
    monkeypatch.setenv("FACEDB_CLOSE_CALLS", "on")
    monkeypatch.setattr(engine, "CLOSE_CALL", band)
    assert _decisions(db, probes) == exact


def test_only_close_calls_search_wider(db, shape, monkeypatch):
    _, probes, threshold, _, best = shape
    index = db.keeper.gallery.index
    calls = []
    wide = index.search_wide
    monkeypatch.setattr(index, "search_wide", lambda q, k: (calls.append(len(q)), wide(q, k))[1])
    clear = [i for i in range(len(probes)) if abs(best[i] - threshold) > 2 * engine.CLOSE_CALL]
    assert len(clear) >= 50  # the genuine probes, far above the threshold
    for i in clear:
        db.identify(probes[i])
    assert calls == []  # a clear decision costs one search
    close = int(np.argmin(np.abs(best - threshold)))
    db.identify(probes[close])
    assert calls == [1]


def test_an_index_with_the_older_code_size_still_loads_and_answers(tmp_path, shape, monkeypatch):
    templates, probes, threshold, exact, _ = shape
    root = tmp_path / "db"
    with monkeypatch.context() as m:
        m.setattr(faiss_kinds, "_pq_m", lambda dim: dim // 4)  # the rule before: 32 sub-quantizers at 128-d
        with FaceDB.create(root, model_id="m", dim=DIM, threshold=threshold, index="ivfpq") as db:
            db.add_templates_many([(f"p{i}", templates[i]) for i in range(PEOPLE)])
            assert db.reindex("ivfpq")["built"] == "ivfpq"
    with FaceDB.open(root) as db:
        genuine = [a.identity for a in db.identify(probes[:100])]
        state = db.index_state()
        assert state.from_file and state.params["pq_m"] == 32  # loaded as saved, not rebuilt
        assert genuine == exact[:100]


def test_close_calls_read_from_the_store_decide_as_from_memory(db, shape, monkeypatch):
    """Where the gallery's vectors are not in memory (past FACEDB_RESCORE_MEMORY_MB, or while they load after an
    open) a close call's shortlist is scored exactly from the store: the same answers as from memory. The wider
    search is made to hand its templates back in a scrambled coded order, so that only exact scores can find
    the right people in it (found by a newcomer: at 100k with the budget 0, 3 of 300 answers differed, one of
    them another person accepted)."""
    _, probes, _, exact, _ = shape
    root = db.root
    with FaceDB.open(root, rescore_memory_mb=0) as from_store:
        from_store.identify(probes[0])
        assert from_store.index_state().rescore_from == "store"
        for handle in (db, from_store):
            index = handle.keeper.gallery.index
            real = index.search_wide

            def scrambled(q, k, real=real):
                sims, ids = real(q, k)
                return sims, ids[:, ::-1].copy()  # the worst-coded templates first, under the best codes' scores
            monkeypatch.setattr(index, "search_wide", scrambled)
        memory_answers = [db.identify(p, k=3) for p in probes]
        store_answers = [from_store.identify(p, k=3) for p in probes]
    assert [a.identity for a in store_answers] == [a.identity for a in memory_answers] == exact
    for m, s in zip(memory_answers, store_answers):
        assert [c.name for c in s.candidates] == [c.name for c in m.candidates]
        assert np.allclose([c.similarity for c in s.candidates], [c.similarity for c in m.candidates], atol=1e-6)
