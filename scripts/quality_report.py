"""Crop mode, the detectors and the probe quality check, measured on ORL (tight crops), Yale (directional light)
and LFW.

    python scripts/quality_report.py [--model sface] [--detector mtcnn|yunet] [--sets orl,yale,lfw]
        [--modes detect,cropped,tight-constant,tight-reflect,tight-assumed] [--lfw-probes 3000]
        [--out bench-results/quality-dlib-flip.json]

For each set, through facedb's own pipeline (the detector (default MTCNN), the model (default dlib-resnet),
flip) and the decision rule new databases use (the margin rule with the model's shipped thresholds):

* detection as usual and in crop mode (``cropped=True``: the photo padded before detection, then the detector's
  best candidate down to a relaxed score, then the whole photo with an assumed landmark layout): the share of
  photos with a face (failures to acquire) and, in crop mode, the share whose landmarks were assumed;
* ``tight-*``: each photo first cut to the face box the detector finds in it (a camera's own detection, a
  badge photo: no margin around the face; a photo without a face is kept whole), then crop mode with the
  padding filled with the photo's median grey (``constant``) or mirrored (``reflect``), or, for comparison,
  no detection at all: the assumed layout on every crop (``assumed``, what crop mode fell back to);
* open set: one photo enrolled per person for half of the people (a seeded split), their other photos are
  genuine probes, every photo of the other half is a stranger: rank-1 among genuine probes, correct accepts,
  **wrong accepts** (a genuine probe accepted as someone else, or a stranger accepted as anyone); DIR at FPIR
  1% (the threshold on the best score that lets at most 1% of the strangers in);
* the quality check (facedb/faces/quality.py FLOORS): of those decisions, how many wrong accepts it turns into
  "unusable photo", and how many correct accepts it costs; and each floor alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from facedb.evaluate import labelled_folder
from facedb.faces import pipeline as facedb_pipeline
from facedb.faces.models import MODELS
from facedb.faces.pipeline import DetectorSettings, FaceChoice, Prepared, get_pipeline, whole_face
from facedb.faces.quality import FLOORS, measure, problems
from facedb.gallery.decision import MARGIN_WEIGHT, Policy

REPO = Path(__file__).resolve().parents[1]


def embed_set(paths: list, cropped: bool, pipe, assumed_only: bool = False
              ) -> tuple[np.ndarray, np.ndarray, list[dict[str, float]], np.ndarray]:
    """(vectors (NaN where no face), found, quality measures, landmarks assumed) for each photo (a path or an
    RGB array). ``assumed_only``: no detection, the assumed landmark layout on the whole photo."""
    vectors = np.full((len(paths), pipe.embedder.dim), np.nan, dtype=np.float32)
    found = np.zeros(len(paths), dtype=bool)
    assumed = np.zeros(len(paths), dtype=bool)
    quality: list[dict[str, float]] = [{} for _ in paths]
    for s in range(0, len(paths), 32):
        if assumed_only:
            ready = []
            for i, p in enumerate(paths[s:s + 32], s):
                face = whole_face(p.shape[1], p.shape[0])
                ready.append(Prepared(i, {}, face, pipe.embedder.align(p, face)))
        else:
            outcomes = pipe.prepare([(i, p) for i, p in enumerate(paths[s:s + 32], s)], FaceChoice.CENTRAL,
                                    cropped)
            ready = [o for o in outcomes if isinstance(o, Prepared)]
        if ready:
            vecs = pipe.embed_crops([o.crop for o in ready], flip=True)
            for o, v in zip(ready, vecs):
                vectors[o.key], found[o.key], assumed[o.key] = v, True, o.face.assumed
                q = measure(o.crop, o.face.box, o.face.score, o.face.landmarks, floors=[])
                quality[o.key] = {k: v for k, v in q.to_dict().items() if k != "problems"}
    return vectors, found, quality, assumed


def tight_crops(paths: list[Path], pipe) -> tuple[list[np.ndarray], int]:
    """Each photo cut to the (clipped, whole-pixel) box of its central face as the pipeline's detector finds it;
    a photo without a face is kept whole. Returns (the crops, how many photos had no face)."""
    from facedb.faces.images import load_photo
    from facedb.faces.pipeline import choose_face

    crops, missed = [], 0
    for p in paths:
        pixels = load_photo(p).pixels
        face = choose_face(pipe.detector.detect(pixels), FaceChoice.CENTRAL, pixels.shape[1], pixels.shape[0])
        if isinstance(face, str):
            missed += 1
            crops.append(pixels)
            continue
        x1, y1, x2, y2 = (int(round(c)) for c in face.box)
        crops.append(np.ascontiguousarray(pixels[y1:y2, x1:x2]))
    return crops, missed


def open_set(vectors: np.ndarray, found: np.ndarray, labels: list[str], policy: Policy, seed: int = 0) -> dict:
    """Decisions for every probe with a face: (kind, accepted, right person) per probe index."""
    rng = np.random.default_rng(seed)
    people = sorted(set(labels))
    enrolled = set(rng.permutation(people)[: len(people) // 2].tolist())
    gallery: dict[str, int] = {}
    for name in sorted(enrolled):
        idx = [i for i, lab in enumerate(labels) if lab == name and found[i]]
        if idx:
            gallery[name] = int(rng.choice(idx))
    names = sorted(gallery)
    G = vectors[[gallery[n] for n in names]]
    out = {}
    for i, lab in enumerate(labels):
        if not found[i] or i in gallery.values():
            continue
        s = G @ vectors[i]
        order = np.argsort(-s)
        s1, s2 = float(s[order[0]]), float(s[order[1]]) if len(order) > 1 else None
        accepted, _ = policy.judge(s1, s2)
        best = names[order[0]]
        kind = "genuine" if lab in gallery else "stranger"
        out[i] = (kind, accepted, best == lab, s1)
    return out


def dir_at_fpir(decisions: dict, fpir: float = 0.01) -> float:
    """DIR at FPIR ``fpir``: the share of genuine probes named right with a best score above the threshold that
    lets at most ``fpir`` of the strangers' best scores above it (NaN without strangers or genuine probes)."""
    strangers = np.sort([d[3] for d in decisions.values() if d[0] == "stranger"])[::-1]
    genuine = [d for d in decisions.values() if d[0] == "genuine"]
    if not len(strangers) or not genuine:
        return float("nan")
    allowed = int(np.floor(fpir * len(strangers)))
    thr = strangers[allowed] if allowed < len(strangers) else -np.inf  # must beat the (allowed+1)-th best
    return float(np.mean([d[2] and d[3] > thr for d in genuine]))


def summarise(decisions: dict, usable: dict[int, bool] | None = None) -> dict[str, float | int]:
    rows = [(k, a, r, usable is None or usable[i]) for i, (k, a, r, _) in decisions.items()]
    gen = [x for x in rows if x[0] == "genuine"]
    out: dict[str, float | int] = {"probes": len(rows), "genuine": len(gen), "strangers": len(rows) - len(gen)}
    out["refused_unusable"] = sum(1 for x in rows if not x[3])
    out["correct_accepts"] = sum(1 for k, a, r, u in gen if a and r and u)
    out["wrong_accepts"] = sum(1 for k, a, r, u in rows if a and u and (k == "stranger" or not r))
    out["wrong_accepts_strangers"] = sum(1 for k, a, r, u in rows if a and u and k == "stranger")
    usable_gen = [x for x in gen if x[3]]
    out["rank1_usable"] = float(np.mean([r for _, _, r, _ in usable_gen])) if usable_gen else float("nan")
    if usable is None:
        out["dir_at_fpir_1pct"] = dir_at_fpir(decisions)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("FACEDB_TEST_DATA", REPO.parent / "shared" /
                                                                     "facedata")))
    ap.add_argument("--lfw-probes", type=int, default=3000, help="LFW photos measured (a seeded sample of people)")
    ap.add_argument("--model", default="dlib-resnet")
    ap.add_argument("--detector", default="mtcnn", choices=["mtcnn", "yunet"])
    ap.add_argument("--sets", default="orl,yale,lfw", help="comma-separated: orl, yale, lfw")
    ap.add_argument("--modes", default="detect,cropped",
                    help="comma-separated: detect, cropped, tight-constant, tight-reflect, tight-assumed")
    ap.add_argument("--no-floors", action="store_true", help="leave out the quality floors' rows")
    ap.add_argument("--out", type=Path, default=None, help="default bench-results/quality-<model>-flip.json")
    args = ap.parse_args()
    args.out = args.out or REPO / "bench-results" / f"quality-{args.model.split('-')[0]}-flip.json"
    pipe = get_pipeline(args.model, settings=DetectorSettings(detector=args.detector))
    spec = MODELS[args.model]
    policy = Policy("margin", spec.default_threshold(True)[0], MARGIN_WEIGHT, spec.margin_threshold(True))
    wanted, modes = args.sets.split(","), args.modes.split(",")
    out: dict[str, object] = {"policy": policy.explanation, "floors": FLOORS, "model": args.model,
                              "detector": args.detector, "command": " ".join(["python", *sys.argv]),
                              "load_average_at_start": os.getloadavg()}
    t0 = time.time()
    sets = {"orl": args.data / "att_orl", "yale": args.data / "yale_faces"}
    lfw_paths, lfw_labels = labelled_folder(args.data / "lfw_deepfunneled")
    people = sorted({lab for lab in lfw_labels if lfw_labels.count(lab) >= 2})
    rng = np.random.default_rng(0)
    pick = set(rng.permutation(people)[:600].tolist())
    singles = [p for p, lab in zip(lfw_paths, lfw_labels) if lab not in pick and lfw_labels.count(lab) == 1]
    chosen = [(p, lab) for p, lab in zip(lfw_paths, lfw_labels) if lab in pick][: args.lfw_probes]
    for name, folder in list(sets.items()):
        if name not in wanted:
            del sets[name]
            continue
        paths, labels = labelled_folder(folder)
        if name == "yale":  # byte-identical duplicates (normal = noglasses for some): count each picture once
            import hashlib
            seen, keep = set(), []
            for i, p in enumerate(paths):
                h = hashlib.sha256(p.read_bytes()).hexdigest()
                if h not in seen:
                    seen.add(h)
                    keep.append(i)
            paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        sets[name] = (paths, labels)  # type: ignore[assignment]
    if "lfw" in wanted:
        strangers = singles[: args.lfw_probes // 3]
        sets["lfw"] = ([p for p, _ in chosen] + strangers,  # type: ignore[assignment]
                       [lab for _, lab in chosen] + [f"single-{i}" for i in range(len(strangers))])
    for name, (paths, labels) in sets.items():  # type: ignore[misc]
        result: dict[str, object] = {"photos": len(paths), "people": len(set(labels))}
        tight: list[np.ndarray] | None = None
        for mode in modes:
            t1 = time.time()
            source = paths
            if mode.startswith("tight"):
                if tight is None:
                    tight, missed = tight_crops(paths, pipe)
                    result["tight_no_face_whole_photo_kept"] = missed
                source = tight
                facedb_pipeline.CROP_PAD_MODE = mode.split("-")[1] if mode != "tight-assumed" else "constant"
            vectors, found, quality, assumed = embed_set(source, mode != "detect", pipe,
                                                         assumed_only=mode == "tight-assumed")
            facedb_pipeline.CROP_PAD_MODE = "constant"
            decisions = open_set(vectors, found, labels, policy)
            usable = {i: not problems(quality[i], FLOORS) for i in decisions}
            row: dict[str, object] = {"face_found": float(found.mean()),
                                      "landmarks_found": float((found & ~assumed).mean()),
                                      "landmarks_assumed": int(assumed.sum()),
                                      "all_decisions": summarise(decisions),
                                      "quality_check": summarise(decisions, usable)}
            for floor in ([] if args.no_floors else FLOORS):
                alone = {i: not problems(quality[i], [floor]) for i in decisions}
                row[f"floor {floor[0]} {floor[1]} {floor[2]:g}"] = summarise(decisions, alone)
            q = [quality[i] for i in decisions]
            row["quality_percentiles"] = {k: [round(float(np.percentile([x[k] for x in q], p)), 3)
                                              for p in (5, 25, 50, 75, 95)] for k in q[0]} if q else {}
            row["seconds"] = round(time.time() - t1, 1)
            result[mode] = row
            print(name, mode, json.dumps({k: v for k, v in row.items() if k != "quality_percentiles"}), flush=True)
        out[name] = result
    out["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
