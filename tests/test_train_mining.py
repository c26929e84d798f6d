"""Triplet mining against a brute-force numpy oracle, and the loss in closed form."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from facedb.train.mining import (  # noqa: E402
    batch_hard_triplets,
    pairwise_sq_dists,
    semi_hard_triplets,
    triplet_loss,
)


def batch(seed: int, people: int = 5, per: int = 4, dim: int = 8):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((people * per, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.repeat(np.arange(people), per)
    return x, labels


def oracle_semi_hard(x: np.ndarray, labels: np.ndarray) -> set[tuple[int, int, int]]:
    """Enumerate every triplet; per (a, p) pick by the definition in facedb.train.mining."""
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    out = set()
    for a, p in itertools.permutations(range(len(x)), 2):
        if labels[a] != labels[p]:
            continue
        negs = [n for n in range(len(x)) if labels[n] != labels[a]]
        if not negs:
            continue
        beyond = [n for n in negs if d[a, n] > d[a, p]]
        if beyond:
            n = min(beyond, key=lambda n: (d[a, n], n))
        else:
            n = max(negs, key=lambda n: (d[a, n], -n))
        out.add((a, p, n))
    return out


def oracle_batch_hard(x: np.ndarray, labels: np.ndarray) -> set[tuple[int, int, int]]:
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    out = set()
    for a in range(len(x)):
        pos = [p for p in range(len(x)) if p != a and labels[p] == labels[a]]
        neg = [n for n in range(len(x)) if labels[n] != labels[a]]
        if pos and neg:
            out.add((a, max(pos, key=lambda p: (d[a, p], -p)), min(neg, key=lambda n: (d[a, n], n))))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_semi_hard_matches_the_oracle(seed):
    x, labels = batch(seed)
    got = semi_hard_triplets(pairwise_sq_dists(torch.from_numpy(x)), torch.from_numpy(labels))
    expected = oracle_semi_hard(x, labels)
    assert len(got) == len(expected) == 5 * 4 * 3  # every ordered anchor-positive pair
    assert {tuple(t) for t in got.tolist()} == expected


@pytest.mark.parametrize("seed", range(6))
def test_batch_hard_matches_the_oracle(seed):
    x, labels = batch(seed, people=4, per=3)
    got = batch_hard_triplets(pairwise_sq_dists(torch.from_numpy(x)), torch.from_numpy(labels))
    assert {tuple(t) for t in got.tolist()} == oracle_batch_hard(x, labels)


def test_semi_hard_fallback_when_all_negatives_are_closer():
    # anchor 0 and positive 1 far apart; negatives 2 and 3 both nearer to 0 than 1 is
    x = np.array([[1, 0], [-1, 0], [0.9, 0.436], [0.6, 0.8]], dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = torch.tensor([0, 0, 1, 2])
    trip = semi_hard_triplets(pairwise_sq_dists(torch.from_numpy(x)), labels)
    row = next(t for t in trip.tolist() if t[:2] == [0, 1])
    assert row[2] == 3  # the farthest negative: the least hard of the hard ones


def test_loss_in_closed_form():
    # Unit vectors at known angles: d = 2 - 2 cos.
    ang = np.array([0.0, 0.5, 2.0, 3.0])
    x = torch.tensor(np.stack([np.cos(ang), np.sin(ang)], 1), dtype=torch.float32)
    labels = torch.tensor([0, 0, 1, 1])
    loss, active, n = triplet_loss(x, labels, margin=0.2, mining="batch-hard")
    d = lambda i, j: 2 - 2 * np.cos(ang[i] - ang[j])  # noqa: E731
    expected = np.mean([max(d(0, 1) - d(0, 2) + 0.2, 0), max(d(1, 0) - d(1, 2) + 0.2, 0),
                        max(d(2, 3) - d(2, 1) + 0.2, 0), max(d(3, 2) - d(3, 1) + 0.2, 0)])
    assert n == 4 and float(loss) == pytest.approx(expected, abs=1e-5)
    assert active == pytest.approx(np.mean([e > 0 for e in [
        d(0, 1) - d(0, 2) + 0.2, d(1, 0) - d(1, 2) + 0.2, d(2, 3) - d(2, 1) + 0.2, d(3, 2) - d(3, 1) + 0.2]]))
    # identical embeddings for one person, far from the other: no active triplet
    y = torch.tensor([[1.0, 0], [1.0, 0], [-1.0, 0], [-1.0, 0]])
    loss, active, _ = triplet_loss(y, labels, margin=0.2)
    assert float(loss) == 0.0 and active == 0.0


def test_loss_has_gradient():
    x, labels = batch(1)
    emb = torch.from_numpy(x).requires_grad_(True)
    loss, _, _ = triplet_loss(torch.nn.functional.normalize(emb, dim=1), torch.from_numpy(labels))
    loss.backward()
    assert emb.grad is not None and float(emb.grad.abs().sum()) > 0
