"""Evaluation: embedding photos through facedb's own pipeline (with a cache), LFW's verification protocol,
and the error-rate arithmetic used by calibration.

Conventions: scores are cosine similarities; a pair/probe is *accepted* when ``score >= threshold``.
FAR = share of impostor pairs accepted; TAR = share of genuine pairs accepted.

Which face an evaluation photo stands for: the detected face whose box centre is nearest the image centre
(LFW and similar sets centre the labelled person; other people can appear at the edges). When no face is
detected, the photo is embedded from a centred box of half the image's side (the deep-funneled LFW face sits
there) and counted as a detection miss, so that every pair of the protocol is scored.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .detect import Face
from .errors import FaceDBError
from .images import load_photo
from .pipeline import FacePipeline


def cache_dir() -> Path:
    base = os.environ.get("FACEDB_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "facedb")
    return Path(base).expanduser()


class EmbeddingCache:
    """Embeddings of evaluation photos keyed by (model id, image SHA-256), in one .npz file per model.

    Saved atomically; loaded with ``allow_pickle=False``. Holds no names or paths, only hashes and vectors.
    """

    def __init__(self, model_id: str, dim: int, directory: Path | None = None) -> None:
        self.path = (directory or cache_dir()) / f"embeddings-{model_id}.npz"
        self.dim = dim
        self._data: dict[str, tuple[np.ndarray, bool]] = {}
        if self.path.is_file():
            try:
                with np.load(self.path, allow_pickle=False) as z:
                    for key, vec, found in zip(z["keys"], z["vectors"], z["found"]):
                        self._data[str(key)] = (vec.astype(np.float32), bool(found))
            except (OSError, ValueError, KeyError):
                self._data = {}  # a damaged cache is recomputed, never trusted

    def get(self, sha256: str) -> tuple[np.ndarray, bool] | None:
        return self._data.get(sha256)

    def put(self, sha256: str, vector: np.ndarray, found: bool) -> None:
        self._data[sha256] = (np.asarray(vector, dtype=np.float32), found)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = np.array(list(self._data), dtype="<U64")
        vecs = np.array([v for v, _ in self._data.values()], dtype=np.float32).reshape(-1, self.dim)
        found = np.array([f for _, f in self._data.values()], dtype=bool)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, keys=keys, vectors=vecs, found=found)
            os.replace(tmp, self.path)
        finally:
            Path(tmp).unlink(missing_ok=True)


def central_face(faces: list[Face], width: int, height: int) -> Face | None:
    if not faces:
        return None
    cx, cy = width / 2, height / 2
    return min(faces, key=lambda f: ((f.box[0] + f.box[2]) / 2 - cx) ** 2 + ((f.box[1] + f.box[3]) / 2 - cy) ** 2)


def fallback_face(width: int, height: int) -> Face:
    side = min(width, height) / 2
    x1, y1 = (width - side) / 2, (height - side) / 2
    return Face((x1, y1, x1 + side, y1 + side), 0.0, np.zeros((5, 2)))


@dataclass
class Embedded:
    vectors: np.ndarray  # (n, dim), row i for paths[i]; NaN rows for unreadable files
    found: np.ndarray  # bool: a face was detected (else the centred fallback box was used)
    unreadable: list[str]


def embed_photos(
    paths: Sequence[Path],
    pipeline: FacePipeline,
    *,
    cache: EmbeddingCache | None = None,
    flip: bool = False,
    progress: Callable[[int], None] | None = None,
    batch: int = 32,
    save_every: int = 512,
) -> Embedded:
    """Embed one face per photo through the real pipeline (detect, align, embed), reusing ``cache``.

    With ``flip``, each embedding is the renormalised mean of the crop's and its mirror image's embedding.
    """
    dim = pipeline.embedder.dim
    out = np.full((len(paths), dim), np.nan, dtype=np.float32)
    found = np.zeros(len(paths), dtype=bool)
    unreadable: list[str] = []
    pending: list[tuple[int, str, np.ndarray, Face, bool]] = []
    since_save = 0

    def flush() -> None:
        nonlocal since_save
        if not pending:
            return
        crops = [pipeline.embedder.align(px, face) for _, _, px, face, _ in pending]
        vecs = pipeline.embedder.embed(crops)
        if flip:
            mirrored = pipeline.embedder.embed([np.ascontiguousarray(c[:, ::-1]) for c in crops])
            vecs = vecs + mirrored
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        for (i, sha, _, _, ok), v in zip(pending, vecs):
            out[i], found[i] = v, ok
            if cache is not None:
                cache.put(sha, v, ok)
        since_save += len(pending)
        pending.clear()
        if cache is not None and since_save >= save_every:
            cache.save()
            since_save = 0

    for i, path in enumerate(paths):
        try:
            photo = load_photo(path)
        except FaceDBError:
            unreadable.append(str(path))
            continue
        hit = cache.get(photo.sha256) if cache is not None else None
        if hit is not None:
            out[i], found[i] = hit
        else:
            face = central_face(pipeline.detector.detect(photo.pixels), photo.width, photo.height)
            ok = face is not None
            pending.append((i, photo.sha256, photo.pixels, face or fallback_face(photo.width, photo.height), ok))
            if len(pending) >= batch:
                flush()
        if progress is not None:
            progress(i + 1)
    flush()
    if cache is not None:
        cache.save()
    return Embedded(out, found, unreadable)


# ------------------------------------------------------------------------------------------ LFW protocol
@dataclass(frozen=True)
class Pair:
    a: Path
    b: Path
    same: bool
    fold: int


def lfw_path(lfw_dir: Path, name: str, number: str) -> Path:
    return lfw_dir / name / f"{name}_{int(number):04d}.jpg"


def read_pairs(pairs_file: Path, lfw_dir: Path) -> list[Pair]:
    """LFW pairs files: a header line (``folds count`` or ``count``), then ``name i j`` (same person) or
    ``name1 i name2 j`` (different people). ``pairs.txt`` has 10 folds of count same + count different."""
    lines = [ln.split() for ln in pairs_file.read_text().splitlines() if ln.strip()]
    header, rows = lines[0], lines[1:]
    per_fold = 2 * int(header[-1])
    pairs = []
    for i, row in enumerate(rows):
        fold = i // per_fold if len(header) == 2 else 0
        if len(row) == 3:
            pairs.append(Pair(lfw_path(lfw_dir, row[0], row[1]), lfw_path(lfw_dir, row[0], row[2]), True, fold))
        elif len(row) == 4:
            pairs.append(Pair(lfw_path(lfw_dir, row[0], row[1]), lfw_path(lfw_dir, row[2], row[3]), False, fold))
        else:
            raise FaceDBError(f"{pairs_file}: line {i + 2} is not a pair")
    return pairs


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold of highest accuracy on (scores, same): the midpoint between adjacent sorted scores."""
    order = np.argsort(scores)
    s, y = scores[order], same[order]
    # accepting everything from index i upwards: correct = genuine at/above i + impostors below i
    genuine_above = np.concatenate([np.cumsum(y[::-1])[::-1], [0]])
    impostor_below = np.concatenate([[0], np.cumsum(~y)])
    correct = genuine_above + impostor_below
    i = int(np.argmax(correct))
    if i == 0:
        return float(s[0]) - 1e-6
    if i == len(s):
        return float(s[-1]) + 1e-6
    return float((s[i - 1] + s[i]) / 2)


def ten_fold_accuracy(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> dict[str, object]:
    """LFW's protocol: for each fold, choose the threshold on the other folds, measure on this one."""
    accs, thrs = [], []
    for f in np.unique(folds):
        train, test = folds != f, folds == f
        thr = best_threshold(scores[train], same[train])
        accs.append(float(np.mean((scores[test] >= thr) == same[test])))
        thrs.append(thr)
    return {"accuracy_mean": float(np.mean(accs)), "accuracy_std": float(np.std(accs)), "fold_accuracies": accs,
            "fold_thresholds": thrs}


def threshold_at_far(impostor: np.ndarray, far: float) -> float:
    """Smallest threshold whose false-accept rate on ``impostor`` scores is at most ``far``.

    Accepting ``score >= t``; with n impostors at most floor(far * n) may be at or above t. When far * n < 1
    the threshold sits just above the highest impostor (FAR 0 on this data; the estimate is then coarse).
    """
    s = np.sort(np.asarray(impostor, dtype=np.float64))[::-1]
    allowed = int(np.floor(far * len(s) + 1e-9))
    if allowed >= len(s):
        return float(s[-1])
    return float(np.nextafter(s[allowed], np.inf))


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray, far: float) -> tuple[float, float]:
    """(TAR, threshold) at the threshold giving at most ``far`` on the impostor scores."""
    t = threshold_at_far(impostor, far)
    return float(np.mean(genuine >= t)), t


def eer(genuine: np.ndarray, impostor: np.ndarray) -> tuple[float, float]:
    """(equal error rate, threshold): where FAR = FRR, by a scan over every observed score."""
    cand = np.unique(np.concatenate([genuine, impostor]))
    g = np.sort(genuine)
    imp = np.sort(impostor)
    frr = np.searchsorted(g, cand, side="left") / len(g)
    far = 1.0 - np.searchsorted(imp, cand, side="left") / len(imp)
    i = int(np.argmin(np.abs(far - frr)))
    return float((far[i] + frr[i]) / 2), float(cand[i])
