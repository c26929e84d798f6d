"""Error-rate arithmetic and the LFW / open-set protocols, on data with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facedb import evaluate as ev

from .conftest import unit_rows


def test_threshold_at_far_allows_at_most_the_target():
    rng = np.random.default_rng(0)
    imp = rng.normal(0.3, 0.1, 10_000)
    for far in (1e-1, 1e-2, 1e-3, 1e-4):
        t = ev.threshold_at_far(imp, far)
        assert np.mean(imp >= t) <= far
        # and it is the smallest such threshold: one step lower admits more than allowed
        assert np.mean(imp >= np.nextafter(np.sort(imp)[::-1][int(far * len(imp))], -np.inf)) > far
    assert ev.threshold_at_far(np.array([0.1, 0.2, 0.3]), 1e-3) > 0.3


def test_best_threshold_and_ten_folds_on_separable_scores():
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9] * 10)
    same = np.array([False, False, False, True, True, True] * 10)
    t = ev.best_threshold(scores, same)
    assert 0.3 < t < 0.7
    rep = ev.ten_fold_accuracy(scores, same, np.repeat(np.arange(10), 6))
    assert rep["accuracy_mean"] == 1.0 and rep["accuracy_std"] == 0.0


def test_best_threshold_matches_brute_force():
    rng = np.random.default_rng(3)
    scores = np.concatenate([rng.normal(0.6, 0.15, 300), rng.normal(0.3, 0.15, 300)])
    same = np.array([True] * 300 + [False] * 300)
    t = ev.best_threshold(scores, same)
    acc = np.mean((scores >= t) == same)
    brute = max(np.mean((scores >= c) == same) for c in np.concatenate([scores, [2.0]]))
    assert acc == pytest.approx(brute)


def test_eer_of_symmetric_distributions():
    rng = np.random.default_rng(1)
    gen = rng.normal(1.0, 1.0, 20_000)
    imp = rng.normal(-1.0, 1.0, 20_000)
    rate, thr = ev.eer(gen, imp)
    assert rate == pytest.approx(0.1587, abs=0.01)  # Phi(-1)
    assert abs(thr) < 0.05


def test_read_pairs_formats(tmp_path):
    f = tmp_path / "pairs.txt"
    f.write_text("2\t1\nAnn\t1\t2\nBob\t1\tCy\t3\nAnn\t2\t3\nBob\t2\tCy\t1\n")
    pairs = ev.read_pairs(f, Path("/lfw"))
    assert [p.same for p in pairs] == [True, False, True, False]
    assert [p.fold for p in pairs] == [0, 0, 1, 1]
    assert pairs[0].a == Path("/lfw/Ann/Ann_0001.jpg") and pairs[1].b == Path("/lfw/Cy/Cy_0003.jpg")
    dev = tmp_path / "dev.txt"
    dev.write_text("1\nAnn\t1\t2\nBob\t1\tCy\t3\n")
    assert [p.fold for p in ev.read_pairs(dev, Path("/lfw"))] == [0, 0]
    with pytest.raises(ev.FaceDBError):
        ev.read_pairs(tmp_path / "missing.txt", Path("/lfw"))


def test_open_set_protocol_through_a_real_facedb(tmp_path):
    rng = np.random.default_rng(5)
    centres = unit_rows(rng, 60, 16)
    labels, vecs = [], []
    for p in range(60):
        n = 3 if p < 40 else 1  # 40 people with 3 photos, 20 with one (impostors)
        for _ in range(n):
            v = centres[p] + 0.05 * rng.standard_normal(16)
            vecs.append(v / np.linalg.norm(v))
            labels.append(f"p{p}")
    vecs = np.array(vecs, dtype=np.float32)
    split = ev.identify_split(labels, 1, np.random.default_rng(0))
    assert len(split.gallery) == 40 and len(split.genuine) == 80 and len(split.impostor) == 20
    genuine, impostor = ev.open_set_scores(tmp_path / "db", vecs, split, "synthetic")
    report = ev.open_set_report(split, genuine, impostor, fpirs=(0.1,))
    assert report["rank1"] == 1.0 and report["rank5"] == 1.0
    t = report["threshold_at_fpir_0.1"]
    assert ev.fpir_at(impostor, t) <= 0.1
    # DIR is rank-1 correct AND above the threshold
    assert report["dir_at_fpir_0.1"] == pytest.approx(np.mean([g[0][1] >= t for g in genuine]))


def test_identify_split_leaves_out_people_filed_twice_without_changing_the_draw():
    # LFW files some enrolled people a second time under another name; as "strangers" they are label errors
    labels = [f"p{p}" for p in range(30) for _ in range(3)] + [f"s{s}" for s in range(10)]
    whole = ev.identify_split(labels, 1, np.random.default_rng(7))
    fixed = ev.identify_split(labels, 1, np.random.default_rng(7), not_strangers={"s3", "s4"})
    assert fixed.gallery == whole.gallery and fixed.genuine == whole.genuine
    assert sorted(fixed.impostor) == sorted(set(whole.impostor) - {labels.index("s3"), labels.index("s4")})
    # every listed folder names its enrolled identity and the evidence
    assert all(len(v) == 2 and all(v) for v in ev.LFW_NOT_STRANGERS.values())


def test_embedding_cache_round_trip_and_damage(tmp_path):
    cache = ev.EmbeddingCache("m", 4, tmp_path)
    cache.put("a" * 64, np.array([1, 0, 0, 0], dtype=np.float32), True)
    cache.save()
    again = ev.EmbeddingCache("m", 4, tmp_path)
    vec, found = again.get("a" * 64)
    assert found and vec.tolist() == [1, 0, 0, 0]
    cache.path.write_bytes(b"garbage")
    assert ev.EmbeddingCache("m", 4, tmp_path).get("a" * 64) is None
