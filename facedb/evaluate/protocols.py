"""Evaluation protocols through facedb's own pipeline and a real database: LFW verification, open-set
identification, and the calibration of thresholds (what ``facedb eval`` and ``facedb calibrate`` run).

Every figure states how much evidence it rests on: distinct comparisons are counted, and a rate the data
cannot resolve (fewer comparisons than one expected error at that rate) is refused for calibration and
flagged in reports. Failures to acquire (photos with no face found) are counted and reported, never scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidInputError
from ..faces.pipeline import FacePipeline
from ..gallery.decision import MARGIN_WEIGHT
from ..gallery.settings import check_rate
from .datasets import Pair, Split, identify_split, labelled_folder, read_pairs
from .embedding import Embedded, embed_cached, require_faces
from .metrics import (
    fpir_at,
    open_set_metrics,
    resolvable,
    threshold_at_far,
    verification_report,
)
from .plots import plot_verification

Progress = Callable[[int], None] | None

#: Impostor pairs drawn at most for a 1:1 calibration from a folder (all distinct pairs when there are fewer).
MAX_IMPOSTOR_PAIRS = 2_000_000


# ------------------------------------------------------------------------------------------------ verification
def score_pairs(pairs: Sequence[Pair], embedded: Embedded, index: dict[Path, int]) -> np.ndarray:
    """Similarity of each pair; a pair with an unreadable photo or a failure to acquire scores -1 (rejected,
    as the product would reject it)."""
    a = embedded.vectors[[index[p.a] for p in pairs]]
    b = embedded.vectors[[index[p.b] for p in pairs]]
    return np.nan_to_num(np.sum(a * b, axis=1), nan=-1.0)


@dataclass
class PairScores:
    """Similarity of every pair of an LFW-format pairs file, with its label and fold."""

    scores: np.ndarray
    same: np.ndarray
    folds: np.ndarray
    embedded: Embedded  # of the file's distinct photos
    distinct: np.ndarray | None = None  # bool: the first listing of each unordered pair (a repeat is no new evidence)

    def __post_init__(self) -> None:
        if self.distinct is None:
            self.distinct = np.ones(len(self.scores), dtype=bool)


def pair_scores(pairs_file: Path, lfw_dir: Path, pipeline: FacePipeline, *, flip: bool = False,
                progress: Progress = None, use_cache: bool = True, cipher: Any = None) -> PairScores:
    pairs = read_pairs(pairs_file, lfw_dir)
    unique = sorted({p.a for p in pairs} | {p.b for p in pairs})
    embedded = embed_cached(unique, pipeline, flip, progress, use_cache, cipher)
    require_faces(embedded, str(pairs_file))
    scores = score_pairs(pairs, embedded, {p: i for i, p in enumerate(unique)})
    seen: set[frozenset[Path]] = set()
    distinct = np.zeros(len(pairs), dtype=bool)
    for i, p in enumerate(pairs):
        key = frozenset((p.a, p.b))
        distinct[i] = key not in seen
        seen.add(key)
    return PairScores(scores, np.array([p.same for p in pairs]), np.array([p.fold for p in pairs]), embedded,
                      distinct)


def run_lfw(pairs_file: Path, lfw_dir: Path, pipeline: FacePipeline, *, flip: bool = False,
            progress: Progress = None, use_cache: bool = True, plot: Path | None = None) -> dict[str, object]:
    """LFW verification through the real pipeline: 10-fold accuracy, TAR@FAR, EER."""
    ps = pair_scores(pairs_file, lfw_dir, pipeline, flip=flip, progress=progress, use_cache=use_cache)
    scores, same = ps.scores, ps.same
    report = verification_report(scores, same, ps.folds)
    report.update({"model_id": pipeline.model_id, "pairs_file": pairs_file.name, "flip": flip,
                   "photos": len(ps.embedded.vectors), "failures_to_acquire": ps.embedded.failures_to_acquire,
                   "unreadable": len(ps.embedded.unreadable)})
    if plot is not None:
        thr = float(report["threshold_at_far_0.001"])  # type: ignore[arg-type]
        plot_verification(scores[same], scores[~same], thr, plot,
                          f"{pipeline.model_id} on LFW {pairs_file.name} (threshold at FAR 1e-3)")
        report["plot"] = str(plot)
    return report


# ----------------------------------------------------------------------------------------------- open set
def folder_embeddings(folder: Path, pipeline: FacePipeline, *, people: set[str] | None = None,
                      flip: bool = False, progress: Progress = None, use_cache: bool = True,
                      cipher: Any = None) -> tuple[np.ndarray, list[str], dict[str, int]]:
    """(vectors, labels, counts) of the photos of a labelled folder in which a face was acquired; ``counts``
    has ``photos``, ``failures_to_acquire`` and ``unreadable``. ``cipher``: encrypt the cache (see
    ``evaluate/cache.py``)."""
    paths, labels = labelled_folder(folder, people)
    embedded = embed_cached(paths, pipeline, flip, progress, use_cache, cipher)
    require_faces(embedded, str(folder))
    ok = embedded.found
    counts = {"photos": len(paths), "failures_to_acquire": embedded.failures_to_acquire,
              "unreadable": len(embedded.unreadable)}
    return embedded.vectors[ok], [lab for lab, good in zip(labels, ok) if good], counts


def open_set_scores(db_root: Path, vectors: np.ndarray, split: Split, model_id: str,
                    k: int = 5, encrypt: bool = False, runner_up: bool = False
                    ) -> tuple[list[list[tuple[str, float]]], list[float]]:
    """Enrol the split's gallery into a new facedb at ``db_root`` (real store and index), then identify
    every probe. Returns (top-k (name, similarity) per genuine probe, best similarity per impostor probe;
    with ``runner_up``, (best, runner-up) per impostor probe, the runner-up -1 when there is none).
    ``encrypt``: the temporary database is encrypted under a throw-away key (calibrating an encrypted one)."""
    from ..db import FaceDB

    dim = vectors.shape[1]
    key = None
    if encrypt:
        from ..protection.keyring import generate_key

        key = generate_key()
    with FaceDB.create(db_root, model_id=model_id, dim=dim, threshold=1.0, key=key) as db:
        db.configure_audit(enabled=False)  # an evaluation's probes are not decisions about anyone
        db.add_templates_many([(name, vectors[idx]) for name, idx in split.gallery.items()])
        gen_answers = db.identify(vectors[[i for _, i in split.genuine]], k=k) if split.genuine else []
        imp_answers = db.identify(vectors[split.impostor], k=2 if runner_up else 1) if split.impostor else []
    genuine = [[(c.name, c.similarity) for c in a.candidates] for a in gen_answers]
    if runner_up:
        return genuine, [(a.candidates[0].similarity, a.candidates[1].similarity if len(a.candidates) > 1 else -1.0)
                         for a in imp_answers]  # type: ignore[misc]
    impostor = [a.candidates[0].similarity for a in imp_answers]
    return genuine, impostor


def open_set_report(split: Split, genuine: list[list[tuple[str, float]]], impostor: list[float],
                    fpirs: Sequence[float] = (1e-2, 1e-3)) -> dict[str, object]:
    """Rank-1/5, and DIR (probe's own identity at rank 1 with score >= t) at the t giving each FPIR."""
    out: dict[str, object] = {"gallery_people": len(split.gallery),
                              "gallery_templates": sum(len(v) for v in split.gallery.values())}
    out.update(open_set_metrics([name for name, _ in split.genuine], genuine, impostor, fpirs))
    if not split.impostor:
        out["warning"] = ("no strangers: every person in this folder was enrolled, so FPIR and DIR cannot be "
                          "measured; hold some people out with --strangers 0.5")
    return out


def run_identify(folder: Path, pipeline: FacePipeline, work_dir: Path, *, enroll: int = 1, seed: int = 0,
                 half: str | None = None, flip: bool = False, progress: Progress = None, use_cache: bool = True,
                 calibrate_on_other_half: bool = False, strangers: float = 0.0) -> dict[str, object]:
    """Open-set identification on a labelled folder (see ``identify_split``), through a real facedb.

    ``half`` ("a" or "b") keeps only one half of the people (a seeded split by person). With
    ``calibrate_on_other_half`` the FPIR-1% threshold is chosen on the other half and its FPIR measured on
    this one: the "calibration holds" check. ``strangers``: the share of enrollable people held out as
    strangers (for folders where everyone has several photos).
    """
    vectors, labels, counts = folder_embeddings(folder, pipeline, flip=flip, progress=progress,
                                                use_cache=use_cache)
    names = sorted(set(labels))
    perm = np.random.default_rng(seed + 1).permutation(len(names))
    halves = {"a": {names[i] for i in perm[: len(names) // 2]}, "b": {names[i] for i in perm[len(names) // 2:]}}
    people = halves[half] if half else None
    split = identify_split(labels, enroll, np.random.default_rng(seed), people, strangers=strangers)
    genuine, impostor = open_set_scores(work_dir / "eval-db", vectors, split, pipeline.model_id)
    report = open_set_report(split, genuine, impostor)
    report.update({"model_id": pipeline.model_id, "folder": str(folder), "enroll": enroll, "seed": seed,
                   "half": half, "flip": flip, "strangers": split.strangers, **counts})
    if calibrate_on_other_half and half:
        other = "b" if half == "a" else "a"
        split2 = identify_split(labels, enroll, np.random.default_rng(seed), halves[other], strangers=strangers)
        if not split2.impostor or not impostor:
            raise InvalidInputError(f"half {other if not split2.impostor else half} has no strangers to measure "
                                    "FPIR with: hold some people out with --strangers 0.5")
        _, impostor2 = open_set_scores(work_dir / "eval-db-other", vectors, split2, pipeline.model_id)
        t = threshold_at_far(np.asarray(impostor2), 1e-2)
        report.update({
            "calibrated_on_half": other,
            "calibrated_gallery_people": len(split2.gallery),
            "calibrated_threshold_fpir_0.01": t,
            # how much evidence each side has: FPIR 1% needs >= 100 impostor probes to be resolved at all
            "calibrated_on_impostor_probes": len(impostor2),
            "calibrated_fpir_0.01_resolvable": resolvable(1e-2, len(impostor2)),
            "fpir_measured_at_calibrated_threshold": fpir_at(impostor, t),
            "fpir_measured_on_impostor_probes": len(impostor),
        })
    return report


# ------------------------------------------------------------------------------------------------ calibration
def _require_resolvable(rate: float, comparisons: int, what: str) -> None:
    if not resolvable(rate, comparisons):
        need = math.ceil(1 / rate)
        raise InvalidInputError(
            f"{comparisons:,} distinct {what} cannot resolve a rate of {rate:g}: at least {need:,} are needed for "
            f"one expected error at that rate; use more labelled data or a larger target rate")


def calibrate_far_pairs(pairs_file: Path, lfw_dir: Path, pipeline: FacePipeline, far: float, *, flip: bool = False,
                        progress: Progress = None, cipher: Any = None) -> dict[str, object]:
    """The 1:1 threshold for ``far`` from the impostor pairs of an LFW-format pairs file (each distinct pair
    counted once: a pair listed twice is not twice the evidence)."""
    check_rate(far, "the target FAR")
    ps = pair_scores(pairs_file, lfw_dir, pipeline, flip=flip, progress=progress, cipher=cipher)
    keep = ps.distinct
    scores, same = ps.scores[keep], ps.same[keep]
    _require_resolvable(far, int((~same).sum()), "impostor pairs")
    t = threshold_at_far(scores[~same], far)
    return {"threshold": t, "target": "far", "target_rate": far, "source": f"LFW {pairs_file.name}",
            "impostor_pairs": int((~same).sum()), "genuine_pairs": int(same.sum()),
            "tar_at_threshold": float(np.mean(scores[same] >= t)), "model_id": pipeline.model_id, "flip": flip,
            "failures_to_acquire": ps.embedded.failures_to_acquire, "resolvable": True}


def impostor_pairs(labels: np.ndarray, limit: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """(a, b, total): distinct unordered pairs of indices with different labels, all of them when there are at
    most ``limit``, else ``limit`` of them drawn without replacement; ``total`` = how many distinct ones exist."""
    n = len(labels)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    total = (n * (n - 1) - int(np.sum(counts * (counts - 1)))) // 2
    if total <= limit and n * (n - 1) // 2 <= 3 * limit:
        i, j = np.triu_indices(n, 1)
        keep = inverse[i] != inverse[j]
        return i[keep], j[keep], total
    if total <= limit:  # few, large groups: pair them group by group
        groups = [np.flatnonzero(inverse == g) for g in range(len(counts))]
        parts = [np.stack(np.meshgrid(g1, g2, indexing="ij"), -1).reshape(-1, 2)
                 for x, g1 in enumerate(groups) for g2 in groups[x + 1:]]
        both = np.sort(np.concatenate(parts), axis=1) if parts else np.zeros((0, 2), dtype=np.int64)
        return both[:, 0], both[:, 1], total
    codes = np.zeros(0, dtype=np.int64)
    while len(codes) < limit:
        a = rng.integers(0, n, 2 * (limit - len(codes)) + 16)
        b = rng.integers(0, n, len(a))
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        keep = inverse[lo] != inverse[hi]
        codes = np.unique(np.concatenate([codes, lo[keep] * n + hi[keep]]))
    if len(codes) > limit:
        codes = rng.choice(codes, limit, replace=False)
    return codes // n, codes % n, total


def folder_pair_scores(folder: Path, pipeline: FacePipeline, *, people: set[str] | None = None,
                       max_impostor_pairs: int = MAX_IMPOSTOR_PAIRS, seed: int = 0, flip: bool = False,
                       progress: Progress = None, cipher: Any = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(genuine, impostor, distinct impostor pairs that exist) similarities from a labelled folder: every pair of
    photos of one person, and every distinct pair of photos of different people (up to ``max_impostor_pairs``,
    drawn without replacement)."""
    x, labels, _ = folder_embeddings(folder, pipeline, people=people, flip=flip, progress=progress, cipher=cipher)
    lab = np.array(labels)
    a, b, total = impostor_pairs(lab, max_impostor_pairs, np.random.default_rng(seed))
    impostor = np.concatenate([np.sum(x[a[s:s + 65536]] * x[b[s:s + 65536]], axis=1)
                               for s in range(0, len(a), 65536)]) if len(a) else np.zeros(0)
    genuine = []
    for name in np.unique(lab):
        idx = np.flatnonzero(lab == name)
        if len(idx) > 1:
            s = x[idx] @ x[idx].T
            genuine.append(s[np.triu_indices(len(idx), 1)])
    return (np.concatenate(genuine) if genuine else np.zeros(0)), impostor, total


def calibrate_far_folder(folder: Path, pipeline: FacePipeline, far: float, *, seed: int = 0,
                         max_impostor_pairs: int = MAX_IMPOSTOR_PAIRS, people: set[str] | None = None,
                         flip: bool = False, progress: Progress = None, cipher: Any = None) -> dict[str, object]:
    """The 1:1 threshold for ``far`` from a labelled folder (see ``folder_pair_scores``)."""
    check_rate(far, "the target FAR")
    gen, impostor, total = folder_pair_scores(folder, pipeline, people=people, max_impostor_pairs=max_impostor_pairs,
                                              seed=seed, flip=flip, progress=progress, cipher=cipher)
    _require_resolvable(far, len(impostor), "impostor pairs")
    t = threshold_at_far(impostor, far)
    return {"threshold": t, "target": "far", "target_rate": far, "source": f"folder {folder}",
            "impostor_pairs": int(len(impostor)), "impostor_pairs_available": int(total),
            "genuine_pairs": int(len(gen)), "tar_at_threshold": float(np.mean(gen >= t)) if len(gen) else None,
            "model_id": pipeline.model_id, "flip": flip, "resolvable": True}


def calibrate_fpir_folder(folder: Path, pipeline: FacePipeline, fpir: float, gallery_size: int | None,
                          work_dir: Path, *, enroll: int = 1, seed: int = 0, flip: bool = False,
                          progress: Progress = None, cipher: Any = None,
                          margin_floor: float | None = None) -> dict[str, object]:
    """The 1:N threshold for ``fpir`` at a gallery of ``gallery_size`` people, simulated on a labelled folder:
    ``gallery_size`` people (of those with more than ``enroll`` photos) are enrolled, every photo of everyone
    else probes as an impostor; the threshold is the best-match similarity exceeded by at most ``fpir`` of them.
    With ``margin_floor`` (the database's 1:1 threshold), also the margin rule's threshold for ``fpir``
    (``margin_threshold``: facedb/gallery/decision.py).

    InvalidInputError when the folder has too few people for that gallery and enough strangers to resolve
    ``fpir`` (the gallery must leave people out to probe with).
    """
    check_rate(fpir, "the target FPIR")
    vectors, labels, _ = folder_embeddings(folder, pipeline, flip=flip, progress=progress, cipher=cipher)
    counts: dict[str, int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    eligible = sorted(n for n, c in counts.items() if c > enroll)
    size = len(eligible) if gallery_size is None else int(gallery_size)
    if size < 1:
        raise InvalidInputError("the gallery size to calibrate for must be at least 1")
    if size > len(eligible):
        raise InvalidInputError(
            f"{folder} has {len(eligible)} people with more than {enroll} photo(s): too few to simulate a gallery of "
            f"{size}; use a larger folder or --gallery-size {len(eligible)} or less")
    rng = np.random.default_rng(seed)
    gallery_people = set(rng.choice(eligible, size, replace=False).tolist())
    split = Split()
    for name in sorted(gallery_people):
        idx = [i for i, lab in enumerate(labels) if lab == name]
        chosen = sorted(rng.choice(idx, enroll, replace=False).tolist())
        split.gallery[name] = chosen
        split.genuine += [(name, i) for i in idx if i not in chosen]
    split.impostor = [i for i, lab in enumerate(labels) if lab not in gallery_people]
    strangers = len({labels[i] for i in split.impostor})
    if not split.impostor:
        raise InvalidInputError(f"every person in {folder} would be enrolled in a gallery of {size}: no strangers "
                                "are left to measure false positives with (use a folder with more people)")
    _require_resolvable(fpir, len(split.impostor), f"impostor probes (photos of {strangers} people not enrolled)")
    genuine, pairs = open_set_scores(work_dir / "calibrate-db", vectors, split, pipeline.model_id,
                                     encrypt=cipher is not None, runner_up=True)
    impostor = [p[0] for p in pairs]  # type: ignore[index]
    report = open_set_report(split, genuine, impostor, fpirs=(fpir,))
    t = threshold_at_far(np.asarray(impostor), fpir)
    out: dict[str, object] = {
        "threshold": t, "target": "fpir", "target_rate": fpir, "source": f"folder {folder}",
        "gallery_size": len(split.gallery), "impostor_probes": len(impostor), "strangers": strangers,
        "genuine_probes": len(genuine), "dir_at_threshold": report.get(f"dir_at_fpir_{fpir:g}"),
        "model_id": pipeline.model_id, "flip": flip, "resolvable": True}
    if margin_floor is not None:  # the margin rule: s1 held to the 1:1 floor, s1 - 0.5 s2 to what this finds
        s1 = np.array([p[0] for p in pairs])  # type: ignore[index]
        s2 = np.array([p[1] for p in pairs])  # type: ignore[index]
        score = np.where(s1 >= margin_floor, s1 - MARGIN_WEIGHT * s2, -9.0)
        m = float(np.clip(threshold_at_far(score, fpir), -1.5, 1.5))  # the floor alone may already hold fpir
        right = [bool(c) and c[0][0] == name for c, (name, _) in zip(genuine, split.genuine)]
        g1 = np.array([c[0][1] if c else -1.0 for c in genuine])
        g2 = np.array([c[1][1] if len(c) > 1 else -1.0 for c in genuine])
        accepted = (g1 >= margin_floor) & (g1 - MARGIN_WEIGHT * g2 >= m)
        out.update({"margin_threshold": m, "margin_floor": margin_floor,
                    "dir_at_margin_threshold": float(np.mean(np.array(right) & accepted)) if right else None})
    return out
