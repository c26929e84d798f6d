"""Why strangers get in on ORL with sface: the model's look-alikes, or facedb's handling of small grey photos?

    python scripts/lookalike_report.py [--model sface] [--skip-variants] [--skip-controlled]
                                       [--png /tmp/lookalike-crops.png] [--out bench-results/lookalike-orl-sface.json]

Issue #24's stranger target (ORL and Yale, every person a stranger against one photo of each of the others, the
shipped rule: ``scripts/stranger_rate.py``) was missed on ORL by one pair, ``s5`` and ``s21``. This script puts
the evidence in one JSON, all with flip (the ``facedb init`` default) and facedb's own pipeline:

1. ``impostors``: the impostor score distribution (every pair of photos of different people) of ORL and Yale
   against LFW's (4,000 seeded LFW photos from the evaluation cache): do small grey photos score high against
   each other in general? Also ORL's FAR at the shipped 1:1 threshold with and without the worst pair.
2. ``pairs``: the mean score over all photo pairs of two people, for every pair of ORL people (780), per model
   (``--model`` and dlib-resnet), and how many LFW person pairs (people with >= 5 photos, 10 photos each at most)
   are as alike as ORL's worst.
3. ``variants`` (ORL re-embedded, not cached, about a minute each here): the pair and the stranger rate under
   other crops of the same photos: YuNet instead of MTCNN, the photo upscaled 2x before detection, no flip,
   and crop mode (the photo padded with its median grey: alignment's border is then grey, not black; and the
   same landmarks with the crop cut from the photo itself, black past its edges).
4. ``controlled``: the same 1,444 LFW photos (``peopleDevTest.txt`` people with >= 2 photos, 4 each at most;
   disjoint from the calibration people) in colour, turned grey, and grey and downscaled so that the eyes are as
   far apart as in ORL (median inter-ocular distance of 40 photos each, by MTCNN): impostor and genuine scores.
   Cached under ``embeddings-<model>-flip-<transform>.npz`` (the evaluation cache folder).
5. ``floors``: what a higher 1:1 floor under the margin rule would cost: DIR and FPIR on LFW galleries of 10 to
   300 people (40 random draws each; corrected labels), correct accepts on ORL and Yale (everyone enrolled with
   their first photo), and the ORL/Yale stranger rate.

``--png``: the aligned crops of the worst pair and the next two ORL pairs, one row per person (never into the
repository: ORL's photos are not ours to copy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from facedb.evaluate import (
    LFW_NOT_STRANGERS,
    EmbeddingCache,
    folder_embeddings,
    identify_split,
    labelled_folder,
    read_people,
)
from facedb.faces.images import load_photo
from facedb.faces.models import MODELS
from facedb.faces.pipeline import (
    DetectorSettings,
    FaceChoice,
    Prepared,
    get_detector,
    get_pipeline,
    prepare,
    source_sha256,
)
from facedb.gallery.decision import MARGIN_WEIGHT, Policy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stranger_rate import shipped_policy, stranger_rate  # scripts/ is not a package: found by the path above

REPO = Path(__file__).resolve().parents[1]


def impostor_stats(X: np.ndarray, labels: list[str] | np.ndarray, threshold: float) -> dict[str, float]:
    """Impostor (different people) and genuine (same person) score summaries of every photo pair of ``X``
    ((n, d) unit rows, cosine): mean, sd, quantiles, and the share of impostor pairs at or above ``threshold``."""
    L = np.asarray(labels)
    S = X @ X.T
    iu = np.triu_indices(len(L), 1)
    same = (L[:, None] == L[None, :])[iu]
    imp, gen = S[iu][~same], S[iu][same]
    return {"photos": int(len(L)), "people": int(len(set(L.tolist()))), "impostor_pairs": int(len(imp)),
            "impostor_mean": float(imp.mean()), "impostor_sd": float(imp.std()),
            "impostor_q99": float(np.quantile(imp, 0.99)), "impostor_q999": float(np.quantile(imp, 0.999)),
            "impostor_max": float(imp.max()), "far_at_threshold": float(np.mean(imp >= threshold)),
            "genuine_pairs": int(len(gen)), "genuine_mean": float(gen.mean()) if len(gen) else float("nan"),
            "tar_at_threshold": float(np.mean(gen >= threshold)) if len(gen) else float("nan")}


def person_pairs(X: np.ndarray, labels: list[str] | np.ndarray, cap: int | None = None) -> list[tuple[float, str, str]]:
    """(mean score over every photo of one person against every photo of the other, a, b) for every pair of
    people, highest first; ``cap``: at most that many photos per person (their first)."""
    L = np.asarray(labels)
    people = sorted(set(L.tolist()))
    E = {p: X[np.flatnonzero(L == p)[:cap]] for p in people}
    rows = [(float((E[a] @ E[b].T).mean()), a, b) for i, a in enumerate(people) for b in people[i + 1:]]
    return sorted(rows, reverse=True)


def pair_block(X: np.ndarray, labels: list[str] | np.ndarray, a: str, b: str, threshold: float) -> dict[str, float]:
    L = np.asarray(labels)
    blk = X[L == a] @ X[L == b].T
    return {"mean": float(blk.mean()), "min": float(blk.min()), "max": float(blk.max()),
            "at_or_above_threshold": int((blk >= threshold).sum()), "of": int(blk.size)}


def embed_transformed(paths: list[Path], pipe: object, detector: object, transform: Callable[[np.ndarray], np.ndarray],
                      flip: bool, cropped: bool = False, cache: EmbeddingCache | None = None,
                      crops: dict[int, np.ndarray] | None = None, photo_frame: bool = False) -> np.ndarray:
    """(n, d) embeddings of the photos after ``transform`` (pixels -> pixels), NaN rows where no face was
    found; the central face, as the evaluation does. ``cache``: keyed by the source file's SHA-256 (the cache's
    variant must name the transform). ``photo_frame`` (with ``cropped``): landmarks found in crop mode's padded
    frame, but the crop cut from the photo itself (black past its edges, as outside crop mode)."""
    if photo_frame:
        return _crop_mode_from_photo(paths, pipe, detector, transform, flip)
    dim = pipe.embedder.dim  # type: ignore[attr-defined]
    X = np.full((len(paths), dim), np.nan, dtype=np.float32)
    todo = []
    for i, p in enumerate(paths):
        hit = cache.get(source_sha256(p) or "") if cache is not None else None
        if hit is not None:
            X[i] = hit[0]
        else:
            todo.append(i)
    for start in range(0, len(todo), 32):
        part = todo[start:start + 32]
        items = [(i, transform(load_photo(paths[i]).pixels)) for i in part]
        out = prepare(detector, pipe.embedder.align, items, FaceChoice.CENTRAL, cropped)  # type: ignore[attr-defined]
        ok = [o for o in out if isinstance(o, Prepared)]
        vecs = pipe.embed_crops([o.crop for o in ok], flip)  # type: ignore[attr-defined]
        for o, v in zip(ok, vecs):
            X[o.key] = v
            if crops is not None:
                crops[o.key] = o.crop
        if cache is not None:
            for i in part:
                cache.put(source_sha256(paths[i]) or "", X[i], bool(np.isfinite(X[i]).all()))
            cache.save()
    return X


def _crop_mode_from_photo(paths: list[Path], pipe: object, detector: object,
                          transform: Callable[[np.ndarray], np.ndarray], flip: bool) -> np.ndarray:
    from dataclasses import replace

    from facedb.faces.pipeline import CROP_PAD, choose_face, find_faces

    dim = pipe.embedder.dim  # type: ignore[attr-defined]
    X = np.full((len(paths), dim), np.nan, dtype=np.float32)
    keys, crops = [], []
    for i, p in enumerate(paths):
        px = transform(load_photo(p).pixels)
        faces, _ = find_faces(detector, px, cropped=True)
        face = choose_face(faces, FaceChoice.CENTRAL, px.shape[1], px.shape[0])
        if isinstance(face, str):
            continue
        pad = int(round(CROP_PAD * max(px.shape[:2])))  # the padded frame's offset (pipeline._padded)
        face = replace(face, raw_box=tuple(c - pad for c in face.align_box), raw_landmarks=face.align_landmarks - pad)
        keys.append(i)
        crops.append(pipe.embedder.align(px, face))  # type: ignore[attr-defined]
    if crops:
        X[keys] = pipe.embed_crops(crops, flip)  # type: ignore[attr-defined]
    return X


def grey(px: np.ndarray) -> np.ndarray:
    """The photo in greyscale (ITU-R 601 luma, as Pillow's ``L``), replicated to 3 channels as facedb loads a
    grey PGM."""
    from PIL import Image

    return np.repeat(np.asarray(Image.fromarray(px).convert("L"))[..., None], 3, axis=2)


def scaled(px: np.ndarray, scale: float) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray(px)
    return np.asarray(im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC))


def inter_ocular(paths: list[Path], detector: object, n: int, rng: np.random.Generator) -> float:
    """Median distance between the eye landmarks (pixels) of the central face of ``n`` random photos."""
    out = []
    for i in rng.choice(len(paths), min(n, len(paths)), replace=False):
        px = load_photo(paths[i]).pixels
        faces = detector.detect(px)  # type: ignore[attr-defined]
        if faces:
            f = min(faces, key=lambda g: abs((g.box[0] + g.box[2]) / 2 - px.shape[1] / 2))
            out.append(float(np.linalg.norm(f.landmarks[0] - f.landmarks[1])))
    return float(np.median(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sface")
    ap.add_argument("--skip-variants", action="store_true")
    ap.add_argument("--skip-controlled", action="store_true")
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("FACEDB_TEST_DATA", REPO.parent / "shared" /
                                                                     "facedata")))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    model, flip, data = args.model, True, args.data
    out_path = args.out or REPO / "bench-results" / f"lookalike-orl-{model}.json"
    spec = MODELS[model]
    floor = spec.default_threshold(flip)[0]
    pipe = get_pipeline(model)
    t0 = time.time()
    out: dict[str, object] = {"model": model, "flip": flip, "threshold": floor, "load_average_start": os.getloadavg()}

    # 1. impostor distributions
    X_orl, L_orl, _ = folder_embeddings(data / "att_orl", pipe, flip=flip)
    X_yale, L_yale, _ = folder_embeddings(data / "yale_faces", pipe, flip=flip)
    lfw_paths, lfw_labels = labelled_folder(data / "lfw_deepfunneled")
    cache = EmbeddingCache(f"{model}-flip", spec.dim)
    rng = np.random.default_rng(0)
    rows = [(cache.get(source_sha256(lfw_paths[i]) or ""), lfw_labels[i])
            for i in rng.choice(len(lfw_paths), 4000, replace=False)]
    rows = [(hit[0], lab) for hit, lab in rows if hit is not None and hit[1]]
    if len(rows) < 3000:
        sys.exit(f"the {model}-flip evaluation cache holds {len(rows)} of 4,000 sampled LFW photos: run "
                 f"scripts/warm_eval_cache.py --model {model} first")
    X_lfw, L_lfw = np.array([v for v, _ in rows]), [lab for _, lab in rows]
    orl_pairs = person_pairs(X_orl, L_orl)
    worst = orl_pairs[0]
    L_arr = np.array(L_orl)
    keep = ~np.isin(L_arr, [worst[1], worst[2]]) | (L_arr == worst[1])  # drop one of the two: no pair left
    out["impostors"] = {"orl": impostor_stats(X_orl, L_orl, floor),
                        "orl_without_" + worst[2]: impostor_stats(X_orl[keep], L_arr[keep], floor),
                        "yale": impostor_stats(X_yale, L_yale, floor),
                        "lfw_4000_photos": impostor_stats(X_lfw, L_lfw, floor)}
    print("impostors", json.dumps(out["impostors"]), flush=True)

    # 2. person pairs, per model, and LFW's
    pairs: dict[str, object] = {}
    for m in dict.fromkeys([model, "dlib-resnet"]):
        Xm, Lm, _ = folder_embeddings(data / "att_orl", get_pipeline(m), flip=flip)
        rows_m = person_pairs(Xm, Lm)
        rank = next(k for k, (_, a, b) in enumerate(rows_m) if {a, b} == {worst[1], worst[2]})
        thr = MODELS[m].default_threshold(flip)[0]
        pairs[m] = {"pair": [worst[1], worst[2]], "rank": rank + 1, "of": len(rows_m),
                    "block": pair_block(Xm, Lm, worst[1], worst[2], thr), "threshold": thr,
                    "top": [[round(s, 4), a, b] for s, a, b in rows_m[:5]]}
    by_person: dict[str, list[int]] = defaultdict(list)
    for i, lab in enumerate(lfw_labels):
        by_person[lab].append(i)
    lfw_rows, lfw_lab = [], []
    for lab, idx in by_person.items():
        if len(idx) >= 5:
            for i in idx[:10]:
                hit = cache.get(source_sha256(lfw_paths[i]) or "")
                if hit is not None and hit[1]:
                    lfw_rows.append(hit[0])
                    lfw_lab.append(lab)
    lfw_pairs = person_pairs(np.array(lfw_rows), lfw_lab)
    s = np.array([r[0] for r in lfw_pairs])
    n_alike = int((s >= worst[0]).sum())
    pairs["lfw"] = {"people": len(set(lfw_lab)), "person_pairs": len(lfw_pairs), "mean": float(s.mean()),
                    "q99": float(np.quantile(s, 0.99)), "q999": float(np.quantile(s, 0.999)),
                    "as_alike_as_orl_worst": n_alike,
                    "chance_of_one_in_780_pairs": float(1 - (1 - n_alike / len(s)) ** len(orl_pairs)),
                    "top": [[round(v, 4), a, b] for v, a, b in lfw_pairs[:10]]}
    out["pairs"] = pairs
    print("pairs", json.dumps(pairs), flush=True)

    # 3. the same ORL photos through other crops
    orl_paths, orl_labels = labelled_folder(data / "att_orl")
    if not args.skip_variants:
        variants: dict[str, object] = {}
        mtcnn, yunet = get_detector(DetectorSettings()), get_detector(DetectorSettings(detector="yunet"))
        for name, det, transform, vflip, cropped in [
                ("mtcnn (as shipped)", mtcnn, None, True, False), ("no flip", mtcnn, None, False, False),
                ("yunet", yunet, None, True, False), ("upscaled 2x before detection", mtcnn, 2.0, True, False),
                ("crop mode (median-grey padding)", mtcnn, None, True, True),
                ("crop mode, cut from the photo (black border)", mtcnn, None, True, True)]:
            t = time.time()
            crops: dict[int, np.ndarray] = {}
            tf = (lambda px: px) if transform is None else (lambda px, k=transform: scaled(px, k))
            X = embed_transformed(orl_paths, pipe, det, tf, vflip, cropped,
                                  crops=crops if name.startswith("mtcnn") else None, photo_frame="black" in name)
            ok = np.isfinite(X).all(1)
            Xo, Lo = X[ok], [lab for lab, good in zip(orl_labels, ok) if good]
            thr = spec.default_threshold(vflip)[0]
            sr = stranger_rate(Xo, Lo, lambda n, f=vflip: shipped_policy(model, f, n))
            variants[name] = {"faces_found": int(ok.sum()), "pair": pair_block(Xo, Lo, worst[1], worst[2], thr),
                              "impostors": impostor_stats(Xo, Lo, thr), "threshold": thr,
                              **{k: sr[k] for k in ("let_in", "probes", "fpir", "worst_person", "worst_person_fpir")},
                              "seconds": round(time.time() - t, 1)}
            print("variant", name, json.dumps(variants[name]), flush=True)
            if crops and args.png:
                from PIL import Image

                people = [worst[1], worst[2], orl_pairs[1][1], orl_pairs[1][2]]
                blank = np.zeros((112, 112, 3), np.uint8)
                grid = [np.hstack([crops.get(i, blank) for i, lab in enumerate(orl_labels) if lab == p][:10])
                        for p in people]
                Image.fromarray(np.vstack(grid)).save(args.png)
                print("crops of", people, "->", args.png, flush=True)
        out["variants"] = variants

    # 4. controlled: LFW photos turned grey and small
    if not args.skip_controlled:
        mtcnn = get_detector(DetectorSettings())
        iod_orl = inter_ocular(orl_paths, mtcnn, 40, np.random.default_rng(0))
        iod_lfw = inter_ocular(lfw_paths, mtcnn, 40, np.random.default_rng(0))
        scale = iod_orl / iod_lfw
        dev = read_people(data / "lfw_protocol" / "peopleDevTest.txt")
        by_dev: dict[str, list[Path]] = defaultdict(list)
        for p, lab in zip(lfw_paths, lfw_labels):
            if lab in dev:
                by_dev[lab].append(p)
        paths, labels = [], []
        for lab in sorted(by_dev):
            if len(by_dev[lab]) >= 2:
                paths += by_dev[lab][:4]
                labels += [lab] * len(by_dev[lab][:4])
        controlled: dict[str, object] = {"inter_ocular_px_orl": iod_orl, "inter_ocular_px_lfw": iod_lfw,
                                         "scale": scale, "photos": len(paths), "people": len(set(labels))}
        for name, tf in [("colour", None), ("grey", grey), ("grey, ORL's size", lambda px: scaled(grey(px), scale))]:
            t = time.time()
            if tf is None:  # the photos as they are: the evaluation cache's own embeddings
                X = np.array([(cache.get(source_sha256(p) or "") or (np.full(spec.dim, np.nan), False))[0]
                              for p in paths])
            else:
                variant = f"{model}-flip-" + ("grey" if name == "grey" else f"grey-x{scale:.3f}")
                X = embed_transformed(paths, pipe, mtcnn, tf, flip, cache=EmbeddingCache(variant, spec.dim))
            ok = np.isfinite(X).all(1)
            controlled[name] = {"faces_found": int(ok.sum()),
                                **impostor_stats(X[ok], [lab for lab, g in zip(labels, ok) if g], floor),
                                "seconds": round(time.time() - t, 1)}
            print("controlled", name, json.dumps(controlled[name]), flush=True)
        out["controlled"] = controlled

    # 5. a higher floor under the margin rule: its cost
    margin = spec.margin_threshold(flip)
    floors: dict[str, object] = {}
    if margin is not None:
        X, L, _ = folder_embeddings(data / "lfw_deepfunneled", pipe, flip=flip)
        split = identify_split(L, 1, np.random.default_rng(0), not_strangers=LFW_NOT_STRANGERS)
        names = sorted(split.gallery)
        gidx = np.array([split.gallery[n][0] for n in names])
        gen_by: dict[str, list[int]] = defaultdict(list)
        for n, i in split.genuine:
            gen_by[n].append(i)
        imp_all = X[split.impostor] @ X[gidx].T
        values = (floor, 0.40, 0.42, 0.44, round(spec.impostor_model(flip).threshold_for_far(1e-4), 4), 0.46)

        def judge(S: np.ndarray, f: float) -> tuple[np.ndarray, np.ndarray]:
            part = np.sort(S, 1)
            s1, s2 = part[:, -1], part[:, -2]
            return (s1 >= f) & (s1 - MARGIN_WEIGHT * s2 >= margin), S.argmax(1)

        draw = np.random.default_rng(1)
        lfw_floors: dict[str, object] = {}
        for size in (10, 30, 100, 300, len(names)):
            acc = {f: [0, 0, 0, 0] for f in values}
            for _ in range(40 if size < len(names) else 1):
                pick = draw.choice(len(names), size, replace=False)
                probes = [(k, i) for k, p in enumerate(pick) for i in gen_by[names[p]]]
                Sg = X[[i for _, i in probes]] @ X[gidx[pick]].T
                truth = np.array([k for k, _ in probes])
                for f in values:
                    okg, arg = judge(Sg, f)
                    oki, _ = judge(imp_all[:, pick], f)
                    a = acc[f]
                    a[0] += int((okg & (arg == truth)).sum())
                    a[1] += len(probes)
                    a[2] += int(oki.sum())
                    a[3] += len(oki)
            lfw_floors[str(size)] = {str(f): {"dir": a[0] / a[1], "fpir": a[2] / a[3]} for f, a in acc.items()}
            print("floors lfw", size, json.dumps(lfw_floors[str(size)]), flush=True)
        own: dict[str, object] = {}
        for folder, (Xo, Lo) in {"orl": (X_orl, L_orl), "yale": (X_yale, L_yale)}.items():
            La = np.array(Lo)
            people = sorted(set(Lo))
            first = np.array([np.flatnonzero(La == p)[0] for p in people])
            probes = np.setdiff1d(np.arange(len(La)), first)
            truth = np.array([people.index(p) for p in La[probes]])
            S = Xo[probes] @ Xo[first].T
            own[folder] = {}
            for f in values:
                ok, arg = judge(S, f)
                rate = stranger_rate(Xo, Lo, lambda n, f=f: Policy("margin", f, MARGIN_WEIGHT, margin))
                own[folder][str(f)] = {"correct_accepts": float(np.mean(ok & (arg == truth))),
                                       "probes": int(len(probes)), "stranger_rate": rate["fpir"]}
            print("floors", folder, json.dumps(own[folder]), flush=True)
        floors = {"margin": margin, "lfw_galleries_one_photo_corrected_labels": lfw_floors,
                  "everyone_enrolled_first_photo": own}
    out["floors"] = floors
    out["seconds"] = round(time.time() - t0, 1)
    out["load_average_end"] = os.getloadavg()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
