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
        vecs = pipeline.embed_crops(crops, flip)
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
    try:
        lines = [ln.split() for ln in pairs_file.read_text().splitlines() if ln.strip()]
    except OSError as exc:
        raise FaceDBError(f"cannot read pairs file {pairs_file}: {exc.strerror or exc}") from None
    if not lines:
        raise FaceDBError(f"{pairs_file} is empty")
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


# ------------------------------------------------------------------------------------------ LFW verification
def lfw_report(scores: np.ndarray, same: np.ndarray, folds: np.ndarray,
               fars: Sequence[float] = (1e-2, 1e-3, 1e-4)) -> dict[str, object]:
    """10-fold accuracy (when there are folds), TAR at each FAR over all pairs, and the EER."""
    genuine, impostor = scores[same], scores[~same]
    out: dict[str, object] = {"pairs": int(len(scores)), "genuine_pairs": int(same.sum()),
                              "impostor_pairs": int((~same).sum())}
    if len(np.unique(folds)) > 1:
        out.update(ten_fold_accuracy(scores, same, folds))
    else:
        thr = best_threshold(scores, same)
        out.update({"accuracy": float(np.mean((scores >= thr) == same)), "best_threshold": thr})
    for far in fars:
        tar, thr = tar_at_far(genuine, impostor, far)
        out[f"tar_at_far_{far:g}"] = tar
        out[f"threshold_at_far_{far:g}"] = thr
        out[f"far_{far:g}_resolvable"] = bool(far * len(impostor) >= 1)
    out["eer"], out["eer_threshold"] = eer(genuine, impostor)
    return out


def score_pairs(pairs: Sequence[Pair], embedded: Embedded, index: dict[Path, int]) -> np.ndarray:
    a = embedded.vectors[[index[p.a] for p in pairs]]
    b = embedded.vectors[[index[p.b] for p in pairs]]
    return np.nan_to_num(np.sum(a * b, axis=1), nan=-1.0)  # an unreadable photo rejects its pairs


# ---------------------------------------------------------------------------------- open-set identification
@dataclass
class Split:
    """Who is enrolled with which photos, and the genuine and impostor probes."""

    gallery: dict[str, list[int]]  # person -> indices of enrolled photos
    genuine: list[tuple[str, int]]  # (person, photo index)
    impostor: list[int]  # photo indices of people not enrolled


def identify_split(labels: Sequence[str], enrol: int, rng: np.random.Generator,
                   people: set[str] | None = None) -> Split:
    """Enrol ``enrol`` random photos of each person with more than ``enrol`` photos; their other photos are
    genuine probes; every photo of the other people is an impostor probe. ``people`` restricts to a subset."""
    by_person: dict[str, list[int]] = {}
    for i, name in enumerate(labels):
        if people is None or name in people:
            by_person.setdefault(name, []).append(i)
    split = Split({}, [], [])
    for name in sorted(by_person):
        idx = by_person[name]
        if len(idx) > enrol:
            chosen = set(rng.choice(idx, enrol, replace=False).tolist())
            split.gallery[name] = sorted(chosen)
            split.genuine += [(name, i) for i in idx if i not in chosen]
        else:
            split.impostor += idx
    return split


def open_set_scores(db_root: Path, vectors: np.ndarray, split: Split, model_id: str,
                    k: int = 5) -> tuple[list[list[tuple[str, float]]], list[float]]:
    """Enrol the split's gallery into a new facedb at ``db_root`` (real store and index), then identify
    every probe. Returns (top-k (name, similarity) per genuine probe, best similarity per impostor probe)."""
    from .db import FaceDB

    dim = vectors.shape[1]
    with FaceDB.create(db_root, model_id=model_id, dim=dim, threshold=1.0) as db:
        db.add_embeddings_many([(name, vectors[idx]) for name, idx in split.gallery.items()])
        gen_answers = db.identify(vectors[[i for _, i in split.genuine]], k=k) if split.genuine else []
        imp_answers = db.identify(vectors[split.impostor], k=1) if split.impostor else []
    genuine = [[(c.name, c.similarity) for c in a.candidates] for a in gen_answers]
    impostor = [a.candidates[0].similarity for a in imp_answers]
    return genuine, impostor


def open_set_report(split: Split, genuine: list[list[tuple[str, float]]], impostor: list[float],
                    fpirs: Sequence[float] = (1e-2, 1e-3)) -> dict[str, object]:
    """Rank-1/5, and DIR (probe's own identity at rank 1 with score >= t) at the t giving each FPIR."""
    truth = [name for name, _ in split.genuine]
    rank1 = np.array([bool(c) and c[0][0] == t for c, t in zip(genuine, truth)])
    rank5 = np.array([t in [n for n, _ in c[:5]] for c, t in zip(genuine, truth)])
    top = np.array([c[0][1] if c else -1.0 for c in genuine])
    imp = np.asarray(impostor)
    out: dict[str, object] = {
        "gallery_people": len(split.gallery),
        "gallery_templates": sum(len(v) for v in split.gallery.values()),
        "genuine_probes": len(genuine),
        "impostor_probes": len(imp),
        "rank1": float(rank1.mean()) if len(rank1) else None,
        "rank5": float(rank5.mean()) if len(rank5) else None,
    }
    for fpir in fpirs:
        if len(imp) == 0:
            continue
        t = threshold_at_far(imp, fpir)
        out[f"threshold_at_fpir_{fpir:g}"] = t
        out[f"dir_at_fpir_{fpir:g}"] = float(np.mean(rank1 & (top >= t))) if len(top) else None
        out[f"fpir_{fpir:g}_resolvable"] = bool(fpir * len(imp) >= 1)
    return out


def fpir_at(impostor: Sequence[float], threshold: float) -> float:
    """Share of impostor probes whose best similarity reaches ``threshold`` (false positive identification)."""
    imp = np.asarray(impostor)
    return float(np.mean(imp >= threshold)) if len(imp) else float("nan")


def labelled_folder(folder: Path, people: set[str] | None = None) -> tuple[list[Path], list[str]]:
    """(photo paths, person labels) of a folder with one sub-folder per person (only ``people``, if given)."""
    from .pipeline import list_folder

    paths: list[Path] = []
    labels: list[str] = []
    for name, files in list_folder(folder):
        if people is None or name in people:
            paths += files
            labels += [name] * len(files)
    return paths, labels


def read_people(people_file: Path) -> set[str]:
    """Names from an LFW people file (``peopleDevTrain.txt``: a count line, then ``name count`` lines)."""
    try:
        rows = [ln.split() for ln in people_file.read_text().splitlines() if ln.strip()]
    except OSError as exc:
        raise FaceDBError(f"cannot read {people_file}: {exc.strerror or exc}") from None
    return {r[0] for r in rows if len(r) == 2 and not r[0].isdigit()}


# ------------------------------------------------------------------------------------------------- plots
def plot_verification(genuine: np.ndarray, impostor: np.ndarray, threshold: float, out: Path, title: str) -> None:
    """ROC (TAR against FAR, log scale) and genuine/impostor histograms with the threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    thr = np.unique(np.concatenate([genuine, impostor]))[::-1]
    tar = np.searchsorted(np.sort(genuine), thr, side="left")
    tar = 1 - tar / len(genuine)
    far = 1 - np.searchsorted(np.sort(impostor), thr, side="left") / len(impostor)
    ax1.plot(np.maximum(far, 1e-5), tar)
    ax1.set_xscale("log")
    ax1.set_xlabel("false accept rate")
    ax1.set_ylabel("true accept rate")
    ax1.set_title("ROC")
    ax1.grid(True, which="both", alpha=0.3)
    bins = np.linspace(min(genuine.min(), impostor.min()), 1.0, 80)
    ax2.hist(impostor, bins=bins, alpha=0.6, label=f"impostor ({len(impostor)})", density=True)
    ax2.hist(genuine, bins=bins, alpha=0.6, label=f"genuine ({len(genuine)})", density=True)
    ax2.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.3f}")
    ax2.set_xlabel("cosine similarity (higher = more alike)")
    ax2.legend()
    ax2.set_title("score distributions")
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- high-level runs (CLI targets)
def embed_cached(paths: Sequence[Path], pipeline: FacePipeline, flip: bool,
                 progress: Callable[[int], None] | None, use_cache: bool) -> Embedded:
    """``embed_photos`` with the evaluation cache of the pipeline's model (a separate one with ``flip``)."""
    cache = None
    if use_cache:
        suffix = "-flip" if flip else ""
        cache = EmbeddingCache(pipeline.model_id + suffix, pipeline.embedder.dim)
    return embed_photos(paths, pipeline, cache=cache, flip=flip, progress=progress)


@dataclass
class PairScores:
    """Similarity of every pair of an LFW-format pairs file, with its label and fold."""

    scores: np.ndarray
    same: np.ndarray
    folds: np.ndarray
    embedded: Embedded  # of the file's distinct photos


def pair_scores(pairs_file: Path, lfw_dir: Path, pipeline: FacePipeline, *, flip: bool = False,
                progress: Callable[[int], None] | None = None, use_cache: bool = True) -> PairScores:
    pairs = read_pairs(pairs_file, lfw_dir)
    unique = sorted({p.a for p in pairs} | {p.b for p in pairs})
    embedded = embed_cached(unique, pipeline, flip, progress, use_cache)
    scores = score_pairs(pairs, embedded, {p: i for i, p in enumerate(unique)})
    return PairScores(scores, np.array([p.same for p in pairs]), np.array([p.fold for p in pairs]), embedded)


def folder_embeddings(folder: Path, pipeline: FacePipeline, *, people: set[str] | None = None,
                      flip: bool = False, progress: Callable[[int], None] | None = None,
                      use_cache: bool = True) -> tuple[np.ndarray, list[str], int]:
    """(vectors, labels, detection misses) of a labelled folder's readable photos."""
    paths, labels = labelled_folder(folder, people)
    embedded = embed_cached(paths, pipeline, flip, progress, use_cache)
    ok = ~np.isnan(embedded.vectors).any(axis=1)
    return embedded.vectors[ok], [lab for lab, good in zip(labels, ok) if good], int((~embedded.found).sum())


def run_lfw(pairs_file: Path, lfw_dir: Path, pipeline: FacePipeline, *, flip: bool = False,
            progress: Callable[[int], None] | None = None, use_cache: bool = True,
            plot: Path | None = None) -> dict[str, object]:
    """LFW verification through the real pipeline: 10-fold accuracy, TAR@FAR, EER."""
    ps = pair_scores(pairs_file, lfw_dir, pipeline, flip=flip, progress=progress, use_cache=use_cache)
    scores, same = ps.scores, ps.same
    report = lfw_report(scores, same, ps.folds)
    report.update({"model_id": pipeline.model_id, "pairs_file": pairs_file.name, "flip": flip,
                   "photos": len(ps.embedded.vectors), "detection_misses": int((~ps.embedded.found).sum()),
                   "unreadable": len(ps.embedded.unreadable)})
    if plot is not None:
        thr = float(report["threshold_at_far_0.001"])  # type: ignore[arg-type]
        plot_verification(scores[same], scores[~same], thr, plot,
                          f"{pipeline.model_id} on LFW {pairs_file.name} (threshold at FAR 1e-3)")
        report["plot"] = str(plot)
    return report


def run_identify(folder: Path, pipeline: FacePipeline, work_dir: Path, *, enrol: int = 1, seed: int = 0,
                 half: str | None = None, flip: bool = False, progress: Callable[[int], None] | None = None,
                 use_cache: bool = True, calibrate_on_other_half: bool = False) -> dict[str, object]:
    """Open-set identification on a labelled folder (see ``identify_split``), through a real facedb.

    ``half`` ("a" or "b") keeps only one half of the people (a seeded split by person). With
    ``calibrate_on_other_half`` the FPIR-1% threshold is chosen on the other half and its FPIR measured on
    this one: the "calibration holds" check.
    """
    vectors, labels, misses = folder_embeddings(folder, pipeline, flip=flip, progress=progress,
                                                use_cache=use_cache)
    names = sorted(set(labels))
    perm = np.random.default_rng(seed + 1).permutation(len(names))
    halves = {"a": {names[i] for i in perm[: len(names) // 2]}, "b": {names[i] for i in perm[len(names) // 2:]}}
    people = halves[half] if half else None
    split = identify_split(labels, enrol, np.random.default_rng(seed), people)
    genuine, impostor = open_set_scores(work_dir / "eval-db", vectors, split, pipeline.model_id)
    report = open_set_report(split, genuine, impostor)
    report.update({"model_id": pipeline.model_id, "folder": str(folder), "enrol": enrol, "seed": seed,
                   "half": half, "flip": flip, "detection_misses": misses})
    if calibrate_on_other_half and half:
        other = "b" if half == "a" else "a"
        split2 = identify_split(labels, enrol, np.random.default_rng(seed), halves[other])
        _, impostor2 = open_set_scores(work_dir / "eval-db-other", vectors, split2, pipeline.model_id)
        t = threshold_at_far(np.asarray(impostor2), 1e-2)
        report.update({
            "calibrated_on_half": other,
            "calibrated_gallery_people": len(split2.gallery),
            "calibrated_threshold_fpir_0.01": t,
            "fpir_measured_at_calibrated_threshold": fpir_at(impostor, t),
        })
    return report


def calibrate_far_pairs(pairs_file: Path, lfw_dir: Path, pipeline: FacePipeline, far: float, *, flip: bool = False,
                        progress: Callable[[int], None] | None = None) -> dict[str, object]:
    """The 1:1 threshold for ``far`` from the impostor pairs of an LFW-format pairs file."""
    ps = pair_scores(pairs_file, lfw_dir, pipeline, flip=flip, progress=progress)
    scores, same = ps.scores, ps.same
    t = threshold_at_far(scores[~same], far)
    return {"threshold": t, "target": "far", "target_rate": far, "source": f"LFW {pairs_file.name}",
            "impostor_pairs": int((~same).sum()), "genuine_pairs": int(same.sum()),
            "tar_at_threshold": float(np.mean(scores[same] >= t)), "model_id": pipeline.model_id, "flip": flip,
            "resolvable": bool(far * (~same).sum() >= 1)}


def folder_pair_scores(folder: Path, pipeline: FacePipeline, *, people: set[str] | None = None,
                       max_impostor_pairs: int = 2_000_000, seed: int = 0, flip: bool = False,
                       progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(genuine, impostor) similarities from a labelled folder: every pair of photos of one person, and up
    to ``max_impostor_pairs`` random pairs of photos of different people."""
    x, labels, _ = folder_embeddings(folder, pipeline, people=people, flip=flip, progress=progress)
    lab = np.array(labels)
    rng = np.random.default_rng(seed)
    a = rng.integers(0, len(x), max_impostor_pairs)
    b = rng.integers(0, len(x), max_impostor_pairs)
    diff = lab[a] != lab[b]
    impostor = np.sum(x[a[diff]] * x[b[diff]], axis=1)
    genuine = []
    for name in np.unique(lab):
        idx = np.flatnonzero(lab == name)
        if len(idx) > 1:
            s = x[idx] @ x[idx].T
            genuine.append(s[np.triu_indices(len(idx), 1)])
    return (np.concatenate(genuine) if genuine else np.zeros(0)), impostor


def calibrate_far_folder(folder: Path, pipeline: FacePipeline, far: float, *, seed: int = 0,
                         max_impostor_pairs: int = 2_000_000, people: set[str] | None = None, flip: bool = False,
                         progress: Callable[[int], None] | None = None) -> dict[str, object]:
    """The 1:1 threshold for ``far`` from a labelled folder (see ``folder_pair_scores``)."""
    gen, impostor = folder_pair_scores(folder, pipeline, people=people, max_impostor_pairs=max_impostor_pairs,
                                       seed=seed, flip=flip, progress=progress)
    t = threshold_at_far(impostor, far)
    return {"threshold": t, "target": "far", "target_rate": far, "source": f"folder {folder}",
            "impostor_pairs": int(len(impostor)), "genuine_pairs": int(len(gen)),
            "tar_at_threshold": float(np.mean(gen >= t)) if len(gen) else None, "model_id": pipeline.model_id,
            "flip": flip, "resolvable": bool(far * len(impostor) >= 1)}


def calibrate_fpir_folder(folder: Path, pipeline: FacePipeline, fpir: float, gallery_size: int | None,
                          work_dir: Path, *, enrol: int = 1, seed: int = 0, flip: bool = False,
                          progress: Callable[[int], None] | None = None) -> dict[str, object]:
    """The 1:N threshold for ``fpir`` at a gallery of ``gallery_size`` people, simulated on a labelled folder:
    ``gallery_size`` people (of those with more than ``enrol`` photos) are enrolled, every photo of everyone
    else probes as an impostor; the threshold is the best-match similarity exceeded by at most ``fpir`` of them.
    """
    vectors, labels, _ = folder_embeddings(folder, pipeline, flip=flip, progress=progress)
    counts: dict[str, int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    eligible = sorted(n for n, c in counts.items() if c > enrol)
    rng = np.random.default_rng(seed)
    size = len(eligible) if gallery_size is None else min(gallery_size, len(eligible))
    gallery_people = set(rng.choice(eligible, size, replace=False).tolist()) if size else set()
    split = Split({}, [], [])
    for name in sorted(gallery_people):
        idx = [i for i, lab in enumerate(labels) if lab == name]
        chosen = sorted(rng.choice(idx, enrol, replace=False).tolist())
        split.gallery[name] = chosen
        split.genuine += [(name, i) for i in idx if i not in chosen]
    split.impostor = [i for i, lab in enumerate(labels) if lab not in gallery_people]
    genuine, impostor = open_set_scores(work_dir / "calibrate-db", vectors, split, pipeline.model_id)
    report = open_set_report(split, genuine, impostor, fpirs=(fpir,))
    t = threshold_at_far(np.asarray(impostor), fpir)
    return {"threshold": t, "target": "fpir", "target_rate": fpir, "source": f"folder {folder}",
            "gallery_size": len(split.gallery), "impostor_probes": len(impostor),
            "genuine_probes": len(genuine), "dir_at_threshold": report.get(f"dir_at_fpir_{fpir:g}"),
            "model_id": pipeline.model_id, "flip": flip, "resolvable": bool(fpir * len(impostor) >= 1)}
