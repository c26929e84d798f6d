"""Contract checks every implementation must pass: the store, an index backend (each of its kinds), and the
query engine over that backend. Each check builds its own data, compares with a brute-force numpy oracle, and
raises AssertionError naming what broke.

They live in the package (not only in ``tests/``) so that a backend developed elsewhere runs the same checks:
``facedb.testing.contracts.check_index_backend(my_backend, "mykind", tmp_dir)``. facedb's own test suite runs them for
every registered kind (``tests/test_contracts.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ModelMismatchError
from ..gallery import engine
from ..gallery.index import IndexBackend, IndexPlace, VectorIndex
from ..gallery.indexed import Gallery

if TYPE_CHECKING:
    from ..gallery.store import Store


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(rng: np.random.Generator, people: int, per: int, dim: int, noise: float = 0.35
              ) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, person of each): ``per`` noisy unit vectors around each of ``people`` random centres."""
    centres = unit_rows(rng, people, dim)
    pids = np.repeat(np.arange(1, people + 1), per)
    x = centres[pids - 1] + noise * rng.standard_normal((len(pids), dim)).astype(np.float32) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), pids.astype(np.int64)


def _oracle_top(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = q @ x.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), ids[order]


def _probes(rng: np.random.Generator, x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(probes, near): 12 random unit probes, then 12 near-copies of stored vectors (``near`` marks them: the
    probes with a clear nearest, on which approximate kinds are judged)."""
    q = unit_rows(rng, 12, dim)
    q = np.concatenate([q, x[:: len(x) // 12][:12] + 0.05 * unit_rows(rng, 12, dim)])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q, np.arange(len(q)) >= 12


def _check_search(index: VectorIndex, q: np.ndarray, near: np.ndarray, floor: float, live: np.ndarray,
                  xs: np.ndarray, what: str) -> None:
    """``index.search`` of the probes ``q`` against the oracle over ``live`` ids (vectors ``xs``): exact kinds
    give its ids and scores; approximate ones have the true nearest among 10 for at least ``floor`` of the
    ``near`` probes. Only live ids come back (tombstoned ones are dropped first, as the engine does)."""
    sims, got = index.search(q, 10)
    assert sims.shape == got.shape == (len(q), min(10, len(index))), f"{what}: search shape"
    want_s, want = _oracle_top(xs, live, q, 10)
    assert np.all(np.diff(sims, axis=1) <= 1e-6), f"{what}: results come best first"
    valid = got >= 0
    if index.tombstones:  # removed ids may come back; the engine drops them
        valid &= np.isin(got, live)
        sims, got = np.where(valid, sims, -2.0), np.where(valid, got, -1)
    assert np.isin(got[valid], live).all(), f"{what}: only live ids are returned"
    if index.exact:
        assert np.array_equal(got, want) or np.allclose(sims, want_s, atol=1e-5), f"{what}: exact top-10"
        np.testing.assert_allclose(sims, want_s, atol=1e-5, err_msg=f"{what}: exact scores")
    else:  # judged on the probes that have a clear nearest (near-copies), the engine's real case
        recall = np.mean([w[0] in g for g, w in zip(got[near], want[near])])
        assert recall >= floor, f"{what}: the true nearest is among 10 candidates for {recall:.0%} of probes"
        assert np.isfinite(sims[valid]).all(), f"{what}: finite scores"


def _check_range_and_vectors(index: VectorIndex, q: np.ndarray, gone: np.ndarray, live: np.ndarray,
                             xl: np.ndarray) -> None:
    """After ``gone`` was removed: range search at 0.5 keeps the threshold and returns no removed id (exact
    kinds: every live one above it); ``exact_vectors`` are the added ones bit for bit, or None."""
    for (rid, rs), qq in zip(index.range_search(q, 0.5), q):
        assert not np.isin(rid, gone).any() or index.tombstones, "range search returns no removed id"
        rid_live = rid[np.isin(rid, live)]
        truth = live[xl @ qq >= 0.5]
        assert np.all(rs >= 0.5 - 1e-6), "range search keeps the threshold"
        if index.exact:  # approximate kinds may miss some, as their search does (with coarse scores, many)
            assert set(rid_live.tolist()) == set(truth.tolist()), "exact range search finds all of them"
    sims, ids = index.search(q, 10)
    held = np.isin(ids, live)  # a tombstoned (HNSW) or padding id has no vector to compare with
    if index.scores_exact:  # what wide_candidates relies on to skip re-scoring a close call's shortlist
        lookup = {int(i): row for i, row in zip(live, xl)}
        for s, i, qq in zip(sims[held], ids[held], np.repeat(q, held.sum(axis=1), axis=0)):
            assert int(i) in lookup and abs(float(s) - float(lookup[int(i)] @ qq)) < 1e-5, \
                "an index whose scores are exact returns each template's exact similarity"
    if index.keeps_vectors:
        got = index.exact_vectors(live[:50])
        assert got is not None and got.tobytes() == xl[:50].tobytes(), "exact_vectors are the added ones, bit for bit"
    else:
        assert index.exact_vectors(live[:5]) is None, "an index without exact vectors says so"


def _check_saved_copy(backend: IndexBackend, kind: str, place: IndexPlace, index: VectorIndex, q: np.ndarray,
                      live: np.ndarray, dim: int) -> tuple[dict[str, object], VectorIndex]:
    """Save ``index``, then: the copy verifies against its stamp and loads answering as the saved one; a copy
    whose stamp does not match, or checked against another dimension, is not trusted. Returns (stamp, the
    loaded copy)."""
    fields = backend.save(index, place)
    stamp = {**fields, "kind": kind, "params": index.params, "count": len(index)}
    assert backend.verify(place, stamp, dim), "a saved copy verifies against its stamp"
    assert backend.persisted_bytes(place) >= 0
    loaded = backend.load(place, stamp, dim)
    assert loaded is not None, "a saved copy loads"
    assert len(loaded) == len(index), "the loaded copy holds what was saved"
    a_s, a_i = index.search(q, 10)
    b_s, b_i = loaded.search(q, 10)
    live_a = np.isin(a_i, live)
    assert np.array_equal(np.where(live_a, a_i, -1), np.where(np.isin(b_i, live), b_i, -1)) or \
        np.allclose(a_s, b_s, atol=1e-5), "the loaded copy answers as the saved one"
    if backend.persisted_bytes(place):
        bad = dict(stamp, sha256="0" * 64) if "sha256" in stamp else \
            dict(stamp, file_id="0" * 32) if "file_id" in stamp else dict(stamp, count=-1)
        assert not backend.verify(place, bad, dim) or backend.load(place, bad, dim) is None, \
            "a copy that does not match its stamp is not trusted"
    try:
        other_dim = backend.load(place, stamp, dim + 1)
    except ModelMismatchError:
        other_dim = None
    assert other_dim is None, "a copy of another dimension is never loaded"
    return stamp, loaded


def check_index_backend(backend: IndexBackend, kind: str, root: Path, *, dim: int = 32, n: int = 600,
                        seed: int = 0, min_recall: float | None = None, place: IndexPlace | None = None) -> None:
    """The :class:`~facedb.gallery.index.IndexBackend` / :class:`~facedb.gallery.index.VectorIndex` contract for one
    kind.

    Checks: search against a numpy oracle (exact kinds: the same ids and scores; approximate ones: for probes
    near a stored vector, the true nearest among the 10 returned for at least ``min_recall`` of them, default
    0.9, which is what the engine's exact re-scoring needs; their scores may be coarse); removal (no
    removed id is ever returned, by search or range search); range search against the oracle; ``ids`` and
    ``exact_vectors`` (bit for bit where ``keeps_vectors``); save, verify and load give the same answers;
    a tampered or missing persisted copy is not loaded, nor one checked against another dimension; ``discard``
    removes it. ``place``: where it persists (default: ``root``, no options; a remote engine needs its
    address in ``options``). Write-through backends are also held to :func:`check_write_through`.
    """
    rng = np.random.default_rng(seed)
    x, _ = clustered(rng, n // 6, 6, dim)
    ids = np.arange(1000, 1000 + len(x), dtype=np.int64) * 3  # sparse, large ids: never positions
    q, near = _probes(rng, x, dim)
    place = place or IndexPlace(root)
    index = backend.new(kind, dim, {}, x, place)
    assert index.kind == kind and index.dim == dim, "kind and dim are what was asked"
    assert len(index) == 0, "a new index is empty"
    index.add(ids, x)
    assert len(index) == len(ids), "len counts what was added"
    assert np.array_equal(np.sort(index.ids()), np.sort(ids)), "ids() returns every id added"
    floor = 0.9 if min_recall is None else min_recall
    _check_search(index, q, near, floor, ids, x, "fresh")
    gone = ids[::7]
    index.remove(gone)
    keep = ~np.isin(ids, gone)
    live, xl = ids[keep], x[keep]
    _check_search(index, q, near, floor, live, xl, "after removal")
    _check_range_and_vectors(index, q, gone, live, xl)
    stamp, loaded = _check_saved_copy(backend, kind, place, index, q, live, dim)
    if backend.write_through:
        check_write_through(backend, place, stamp, loaded, live, xl, dim, rng)
    backend.discard(place)
    assert backend.persisted_bytes(place) == 0, "discard removes the persisted copy"
    assert backend.load(place, stamp, dim) is None, "nothing loads after discard"


def check_write_through(backend: IndexBackend, place: IndexPlace, stamp: dict[str, object], index: object,
                        live: np.ndarray, xl: np.ndarray, dim: int, rng: np.random.Generator) -> None:
    """What a write-through backend (a shared engine) promises beyond the others, on a saved ``index`` holding
    ``live`` (vectors ``xl``): an add or remove is seen at once by another handle on the same place, without a
    save; ``publish`` records the generation that the next handle ``reflects``; a read-only handle answers with
    its own adds and removes but never writes them to the engine; writes repeated by two processes catching up
    the same log (the same add twice, a remove of what is gone) leave one entry, or none."""
    new_ids = np.arange(10, 16, dtype=np.int64) * 7 + 5  # never among the contract's ids (multiples of 3 >= 3000)
    new_x = unit_rows(rng, len(new_ids), dim)
    gone = live[:4]
    index.add(new_ids, new_x)  # type: ignore[attr-defined]
    index.remove(gone)  # type: ignore[attr-defined]
    index.add(new_ids[:2], new_x[:2])  # type: ignore[attr-defined]  # a second process replaying the same add
    index.remove(gone)  # type: ignore[attr-defined]  # ... and the same removal
    other = backend.load(place, stamp, dim)
    assert other is not None, "another handle opens the engine's copy"
    want = np.setdiff1d(np.union1d(live, new_ids), gone)
    assert len(other) == len(want), "another handle sees each add and remove once, without a save"
    assert np.array_equal(np.sort(other.ids()), want), "another handle holds exactly what was written"
    _, got = other.search(new_x, 3)
    assert np.array_equal(got[:, 0], new_ids), "a template added through one handle is found through another"
    _, got = other.search(xl[:4], 3)
    assert not np.isin(got, gone).any(), "a removed template is never returned by the next search, anywhere"
    backend.publish(index, place, 41)  # type: ignore[arg-type]
    reopened = backend.load(place, stamp, dim)
    assert reopened is not None and getattr(reopened, "reflects", None) == 41, \
        "a handle opened after publish reflects the published generation"
    ro = backend.load(replace(place, readonly=True), stamp, dim)
    assert ro is not None, "a read-only handle opens the engine's copy"
    extra_ids, extra_x = np.array([9_000_001, 9_000_002], dtype=np.int64), unit_rows(rng, 2, dim)
    ro.add(extra_ids, extra_x)
    ro.remove(new_ids[:1])
    _, got = ro.search(extra_x, 2)
    assert np.array_equal(got[:, 0], extra_ids), "a read-only handle finds what it was given, exactly"
    _, got = ro.search(new_x[:1], 3)
    assert new_ids[0] not in got, "a read-only handle hides what it removed"
    after = backend.load(place, stamp, dim)
    assert after is not None and np.array_equal(np.sort(after.ids()), want), "a read-only handle wrote nothing"


def check_engine(backend: IndexBackend, kind: str, root: Path, *, dim: int = 32, seed: int = 1,
                 place: IndexPlace | None = None, in_memory: bool | None = None) -> None:
    """The query engine over one index kind, against a brute-force oracle of per-person best scores: the
    top-k people and their scores are exact (approximate kinds: every score returned is exact and the right
    person is first for near-copies of stored templates), and decisions follow the threshold.

    Kinds whose index keeps no exact vectors re-score from the in-memory vectors (``vectors.py``) and from
    the store's (the fetch function); ``in_memory`` None checks both, True / False one of them."""
    if in_memory is None:
        probe = backend.new(kind, dim, {}, None, place or IndexPlace(root))
        both = not probe.keeps_vectors and not probe.exact
        for mode in ((False, True) if both else (False,)):
            check_engine(backend, kind, root, dim=dim, seed=seed, place=place, in_memory=mode)
        return
    rng = np.random.default_rng(seed)
    x, pids = clustered(rng, 120, 5, dim, noise=0.6)
    ids = np.arange(1, len(x) + 1, dtype=np.int64)
    gallery = Gallery(backend.new(kind, dim, {}, x, place or IndexPlace(root)), 0)
    if in_memory:
        from ..gallery.vectors import TemplateVectors

        gallery.keep_vectors(TemplateVectors(dim), budget=1 << 40)
    gallery.add(ids, pids, x)
    names = {int(p): (f"p{p}", None) for p in np.unique(pids)}

    def from_store(people: object) -> tuple[np.ndarray, np.ndarray]:
        wanted = np.unique(np.asarray(people, dtype=np.int64))
        rows = np.flatnonzero(np.isin(pids, wanted))
        order = np.argsort(pids[rows], kind="stable")
        return pids[rows][order], x[rows][order]

    def fetch(people: object) -> tuple[np.ndarray, np.ndarray]:
        return gallery.person_vectors(people) or from_store(people)  # type: ignore[arg-type]

    def templates(wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # the store's read of a shortlist
        rows = np.flatnonzero(np.isin(ids, wanted))
        return ids[rows], x[rows]

    if in_memory:
        held, want = gallery.person_vectors(np.unique(pids)), from_store(np.unique(pids))
        assert held is not None, "the in-memory vectors hold every live template"
        assert np.array_equal(held[0], want[0]) and held[1].tobytes() == want[1].tobytes(), \
            "in-memory vectors are the stored ones, bit for bit, grouped by person"

    q = x[rng.choice(len(x), 30, replace=False)] + 0.02 * rng.standard_normal((30, dim)).astype(np.float32)
    q = np.concatenate([q, unit_rows(rng, 10, dim)])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    answers = engine.identify(gallery, q, 5, 0.8, fetch, lambda p: {i: names[int(i)] for i in p}, templates)
    sims = q @ x.T
    for row, ans in enumerate(answers):
        best: dict[int, float] = {}
        for p, s in zip(pids, sims[row]):
            best[int(p)] = max(best.get(int(p), -2.0), float(s))
        truth = sorted(best.items(), key=lambda kv: -kv[1])[:5]
        for c in ans.candidates:
            assert abs(c.similarity - best[c.person_id]) < 1e-5, "every candidate's score is its exact best"
        if gallery.index.exact:
            assert [c.person_id for c in ans.candidates] == [p for p, _ in truth], "exact top-5 people"
        elif row < 30:
            assert ans.candidates and ans.candidates[0].person_id == truth[0][0], "near-copies find their person"
        if ans.candidates:
            top = ans.candidates[0]
            assert (ans.identity == top.name) == (top.similarity >= 0.8), "accepted iff at or above the threshold"
    gallery.remove(ids[pids == pids[0]])
    after = engine.identify(gallery, x[:1], 5, 0.8, fetch, lambda p: {i: names[int(i)] for i in p}, templates)[0]
    assert all(c.person_id != pids[0] for c in after.candidates), "a removed person is never a candidate"
    found = engine.neighbours(gallery, x[10:11], 0.99)[0]
    assert 11 in found[0].tolist() or not gallery.index.exact, "range search finds a template's own copy"


def check_store(open_store: Callable[[Path], Store], root: Path, *, dim: int = 8, seed: int = 2) -> None:
    """The store contract: every write bumps the generation and logs its template ids, and replaying the log
    from any generation reproduces the store's own id -> person map (adds, removals, a merge, a template
    removal); names are one person whatever their Unicode form; a failing write changes nothing; templates read
    back bit for bit. ``open_store(path)`` creates a store for ``dim``-d vectors at ``path``."""
    from ..errors import DuplicatePersonError, InvalidInputError

    rng = np.random.default_rng(seed)
    store = open_store(root / "contract.sqlite3")
    try:
        seen: dict[int, tuple[dict[int, int], int]] = {}  # generation -> (id -> person map, generation)

        def snap() -> None:
            gen, ids, pids = store.template_map()
            seen[gen] = ({int(i): int(p) for i, p in zip(ids, pids)}, gen)

        snap()
        vectors: dict[int, np.ndarray] = {}
        for name in ("ann", "bob", "José", "dora"):
            v = unit_rows(rng, 3, dim)
            for i, vec in zip(store.add_templates(name, v, create_person=True), v):
                vectors[i] = vec
            snap()
        assert store.person("Jose\u0301").name == "José", "NFC and NFD spellings are one person"
        try:
            store.add_person("Jose\u0301")
            raise AssertionError("a second person with the same name in another Unicode form was accepted")
        except DuplicatePersonError:
            pass
        gen = store.generation()
        try:
            store.add_templates("ann", unit_rows(rng, 2, dim), boxes=[[0, 0, 1, 1]])
            raise AssertionError("a write with one box for two vectors was accepted")
        except InvalidInputError:
            pass
        assert store.generation() == gen, "a failed write does not bump the generation"
        store.remove_person("bob")
        snap()
        first = next(iter(store.iter_templates("ann"))).id
        assert store.remove_template(first) == "ann"
        snap()
        moved = store.merge_people("dora", "ann")
        assert len(moved) == 3 and store.person("ann").templates == 5, "a merge moves every template"
        snap()
        final_gen, ids, pids = store.template_map()
        final = {int(i): int(p) for i, p in zip(ids, pids)}
        for gen, (state, _) in seen.items():
            changes = store.changes_since(gen)
            assert changes is not None, "the log reaches back to every generation since creation"
            current, added, removed = changes
            assert current == final_gen
            replayed = {i: p for i, p in state.items() if i not in set(removed)}
            a_ids, a_pids, _ = store.templates(added)
            replayed.update({int(i): int(p) for i, p in zip(a_ids, a_pids)})
            assert replayed == final, f"replaying the log from generation {gen} gives the store's map"
        for t in store.iter_templates():
            assert t.vector.tobytes() == vectors[t.id].astype("<f4").tobytes(), "templates read back bit for bit"
    finally:
        store.close()


def check_embedder(embedder: object, image: np.ndarray, faces: list[object], *, model_id: str | None = None,
                   dim: int | None = None, batch_tolerance: float = 1e-4) -> None:
    """The :class:`~facedb.faces.models.Embedder` contract every face model passes (tests/test_sface.py runs it for
    each model that can be loaded where the tests run).

    ``image``: an (H, W, 3) uint8 RGB photo; ``faces``: at least two detected faces in it (objects with ``box``,
    ``landmarks``, ``align_box`` and ``align_landmarks``, like :class:`facedb.faces.detect.Face`), of different
    people or at least different pixels. Checks: the id and dimension it declares (and ``holds_gil``); ``align``
    gives uint8 (h, w, 3) crops of one fixed size and does not change the image; ``embed`` of no crops is
    float32 (0, dim); of crops, float32 (n, dim) finite rows of unit length (so that inner products are cosine
    similarities, higher is more similar), the same rows for the same crops every time, the same row for a
    crop alone as in a batch (within ``batch_tolerance``), different rows for different crops, and a crop
    compared with itself scores 1.
    """
    if model_id is not None:
        assert embedder.model_id == model_id, f"model_id {embedder.model_id!r}, expected {model_id!r}"  # type: ignore[attr-defined]
    d = int(embedder.dim)  # type: ignore[attr-defined]
    if dim is not None:
        assert d == dim, f"dim {d}, expected {dim}"
    assert isinstance(embedder.holds_gil, bool), "holds_gil is a bool"  # type: ignore[attr-defined]
    assert len(faces) >= 2, "the contract needs two faces"
    before = image.copy()
    crops = [embedder.align(image, f) for f in faces]  # type: ignore[attr-defined]
    assert np.array_equal(image, before), "align must not change the image"
    shapes = {c.shape for c in crops}
    assert len(shapes) == 1, f"align gives crops of one size, got {shapes}"
    (shape,) = shapes
    assert len(shape) == 3 and shape[2] == 3 and all(c.dtype == np.uint8 for c in crops), \
        f"crops are (h, w, 3) uint8, got {shape} {crops[0].dtype}"
    empty = embedder.embed([])  # type: ignore[attr-defined]
    assert empty.shape == (0, d) and empty.dtype == np.float32, f"embed([]) is float32 (0, {d}), got {empty.shape}"
    x = embedder.embed(crops)  # type: ignore[attr-defined]
    assert x.shape == (len(crops), d) and x.dtype == np.float32, f"embed gives float32 (n, {d}), got {x.shape}"
    assert np.isfinite(x).all(), "embeddings are finite"
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5), "embeddings have unit length"
    again = embedder.embed(crops)  # type: ignore[attr-defined]
    assert np.allclose(x, again, atol=1e-6), "the same crops give the same embeddings"
    for i, crop in enumerate(crops):
        one = embedder.embed([crop])[0]  # type: ignore[attr-defined]
        assert float(np.abs(one - x[i]).max()) <= batch_tolerance, "a crop alone embeds as in a batch"
        assert abs(float(one @ x[i]) - 1.0) < 1e-5, "a crop compared with itself scores 1"
    sims = x @ x.T
    assert float(sims[0, 1]) < 0.999, "different crops give different embeddings"
