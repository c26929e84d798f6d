"""Online triplet mining and the triplet loss, on one batch of embeddings.

All distances are squared Euclidean distances between L2-normalised embeddings (``2 - 2 cos``), as in the
FaceNet paper: ``L = mean over triplets of max(d(a,p) - d(a,n) + margin, 0)``.

* **semi-hard** (the paper's choice): every valid anchor-positive pair in the batch gets the negative that is
  *farther* from the anchor than the positive but closest to it, i.e. the smallest ``d(a,n) > d(a,p)``; it is
  semi-hard, and active, when ``d(a,n) < d(a,p) + margin``. Fallback rule when every negative is closer than
  the positive (no semi-hard one exists): the farthest negative, the least hard of the hard ones (as in
  TensorFlow Addons' ``triplet_semihard_loss``), so early batches still carry a gradient without the hardest
  negatives that make training collapse.
* **batch-hard** (Hermans et al. 2017): each anchor with its farthest positive and its closest negative.
"""

from __future__ import annotations

import torch


def pairwise_sq_dists(emb: torch.Tensor) -> torch.Tensor:
    """(n, n) squared L2 distances of unit rows: 2 - 2 * cosine, clamped at 0."""
    return (2.0 - 2.0 * emb @ emb.T).clamp_min(0.0)


def semi_hard_triplets(dist: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(t, 3) anchor, positive, negative indices: every ordered anchor-positive pair with its negative."""
    n = len(labels)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(n, dtype=torch.bool, device=labels.device)
    anchors, positives = torch.nonzero(same & ~eye, as_tuple=True)
    if not len(anchors):
        return torch.zeros((0, 3), dtype=torch.long, device=labels.device)
    d_ap = dist[anchors, positives]  # (t,)
    d_an = dist[anchors]  # (t, n)
    negative = ~same[anchors]  # (t, n)
    inf = torch.finfo(dist.dtype).max
    beyond = negative & (d_an > d_ap[:, None])
    semi = torch.where(beyond, d_an, torch.full_like(d_an, inf)).argmin(dim=1)
    has_semi = beyond.any(dim=1)
    farthest = torch.where(negative, d_an, torch.full_like(d_an, -inf)).argmax(dim=1)
    neg = torch.where(has_semi, semi, farthest)
    keep = negative.any(dim=1)
    return torch.stack([anchors, positives, neg], dim=1)[keep]


def batch_hard_triplets(dist: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(t, 3): for each anchor with a positive and a negative, its farthest positive and closest negative."""
    n = len(labels)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(n, dtype=torch.bool, device=labels.device)
    pos_mask = same & ~eye
    neg_mask = ~same
    inf = torch.finfo(dist.dtype).max
    hardest_pos = torch.where(pos_mask, dist, torch.full_like(dist, -inf)).argmax(dim=1)
    hardest_neg = torch.where(neg_mask, dist, torch.full_like(dist, inf)).argmin(dim=1)
    valid = pos_mask.any(dim=1) & neg_mask.any(dim=1)
    anchors = torch.arange(n, device=labels.device)
    return torch.stack([anchors, hardest_pos, hardest_neg], dim=1)[valid]


def triplet_loss(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.2,
                 mining: str = "semi-hard") -> tuple[torch.Tensor, float, int]:
    """(mean hinge loss over the mined triplets, fraction of them active (loss > 0), number of triplets)."""
    dist = pairwise_sq_dists(emb)
    with torch.no_grad():
        if mining == "semi-hard":
            trip = semi_hard_triplets(dist, labels)
        elif mining == "batch-hard":
            trip = batch_hard_triplets(dist, labels)
        else:
            raise ValueError(f"mining is semi-hard or batch-hard, not {mining!r}")
    if not len(trip):
        return emb.sum() * 0.0, 0.0, 0
    a, p, n = trip.T
    losses = (dist[a, p] - dist[a, n] + margin).clamp_min(0.0)
    return losses.mean(), float((losses > 0).float().mean()), len(trip)
