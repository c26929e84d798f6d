"""Training data: a labelled folder detected and aligned once (the same MTCNN + FaceNet crop path enrolment
uses), cached as one uint8 array, split by person, served in identity-balanced P x K batches with flips and
small random crops."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..errors import FaceDBError
from ..faces.models.facenet import IMAGE_SIZE, crop_face
from ..fsio import write_atomic


def prepare_crops(folder: Path, cache: Path | None = None, progress: Callable[[int], None] | None = None,
                  min_photos: int = 1, people: set[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(crops uint8 (n, 160, 160, 3), labels int (n,), person names) for every photo with a face.

    The face is the one nearest the photo's centre; photos without one are skipped. With ``cache`` (an .npz
    path) the result is saved once and reused (loaded without pickle).
    """
    from ..evaluate import labelled_folder
    from ..faces.pipeline import FaceChoice, Prepared, get_detector, prepare

    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            return z["crops"], z["labels"], [str(n) for n in z["names"]]
    paths, labels = labelled_folder(folder, people)
    counts: dict[str, int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    detector = get_detector()
    names = sorted(n for n, c in counts.items() if c >= min_photos)
    index = {n: i for i, n in enumerate(names)}
    crops, ys = [], []
    wanted = [(lab, path) for path, lab in zip(paths, labels) if lab in index]
    for start in range(0, len(wanted), 32):
        # the same decode / detect / choose path as enrolment, with the face nearest the centre
        for outcome in prepare(detector, lambda px, face: crop_face(px, face.align_box), wanted[start:start + 32],
                               FaceChoice.CENTRAL):
            if isinstance(outcome, Prepared):
                crops.append(outcome.crop)
                ys.append(index[outcome.key])
        if progress is not None:
            progress(min(start + 32, len(wanted)))
    if not crops:
        raise FaceDBError(f"no faces found under {folder}")
    out = (np.stack(crops), np.array(ys, dtype=np.int64), names)
    if cache is not None:
        write_atomic(cache, lambda f: np.savez(f, crops=out[0], labels=out[1], names=np.array(names)))
    return out


def cache_name(folder: Path, people: set[str] | None = None) -> str:
    key = str(folder.resolve()) + "\n" + "\n".join(sorted(people or ()))
    return hashlib.sha256(key.encode()).hexdigest()[:16] + ".npz"


def split_by_person(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, val) over samples; no person is on both sides."""
    people = np.unique(labels)
    rng = np.random.default_rng(seed)
    val_people = set(rng.choice(people, max(1, int(round(len(people) * val_fraction))), replace=False).tolist())
    val = np.array([y in val_people for y in labels])
    return ~val, val


def pk_batches(labels: np.ndarray, p: int, k: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless batches of P people x K sample indices (people with >= 2 samples; K drawn with replacement
    when a person has fewer)."""
    by_person: dict[int, np.ndarray] = {}
    for y in np.unique(labels):
        idx = np.flatnonzero(labels == y)
        if len(idx) >= 2:
            by_person[int(y)] = idx
    people = np.array(sorted(by_person))
    if len(people) < 2:
        raise FaceDBError("training needs at least two people with two or more photos")
    p = min(p, len(people))
    while True:
        chosen = rng.choice(people, p, replace=False)
        yield np.concatenate([rng.choice(by_person[int(y)], k, replace=len(by_person[int(y)]) < k)
                              for y in chosen])


def augment(batch: np.ndarray, rng: np.random.Generator, shift: int = 8) -> np.ndarray:
    """Random horizontal flips and crops shifted by up to ``shift`` pixels (reflect-padded)."""
    n, h, w, _ = batch.shape
    padded = np.pad(batch, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="reflect")
    out = np.empty_like(batch)
    for i in range(n):
        dy, dx = rng.integers(0, 2 * shift + 1, 2)
        crop = padded[i, dy:dy + h, dx:dx + w]
        out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return out


__all__ = ["IMAGE_SIZE", "augment", "cache_name", "pk_batches", "prepare_crops", "split_by_person"]
