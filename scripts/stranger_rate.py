"""Strangers let in on ORL and Yale, the shipped rule out of the box (issue #24's target: <= 1%).

    python scripts/stranger_rate.py [--model sface --model dlib-resnet] [--no-flip] [--out FILE.json]

Every person in turn is the stranger: the gallery holds one photo (the first, in name order) of each of the
*other* people, and every photo of the stranger is a probe. A probe is let in when the decision rule that
`facedb init --model M` ships (margin rule where the model has one, else the gallery rule, else the fixed 1:1
threshold) accepts its best candidate. The stranger rate is let-in probes over all probes (FPIR), pooled over the
people; also per person, the worst. Faces come through facedb's own pipeline and embedding cache
(`facedb.evaluate.folder_embeddings`), as the LFW reports'.

Which photo is enrolled decides much of it on sets this small (one look-alike pair is 2% of ORL's probes), so
`enrolled_photo_choices` repeats the whole protocol with the k-th photo of everyone enrolled, for every k up to
the fewest photos anyone has: the rate of each choice (the first is the figure above), their mean, and the
let-ins of all choices by stranger.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from facedb.evaluate import folder_embeddings
from facedb.faces.models import MODELS
from facedb.faces.pipeline import get_pipeline
from facedb.gallery.decision import MARGIN_WEIGHT, Policy, gallery_threshold

REPO = Path(__file__).resolve().parents[1]
SETS = {"orl": "att_orl", "yale": "yale_faces"}
#: The protocol as the JSON records it: the docstring's paragraphs after the usage line (the JSON once carried
#: the usage line instead).
PROTOCOL = " ".join(__doc__.split("\n\n")[2:]).replace("\n", " ").strip()


def shipped_policy(model_id: str, flip: bool, gallery: int) -> Policy:
    """The rule `facedb init --model M` gives a new database, made concrete for ``gallery`` templates."""
    spec = MODELS[model_id]
    floor = spec.default_threshold(flip)[0]
    margin, impostors = spec.margin_threshold(flip), spec.impostor_model(flip)
    if margin is not None:
        return Policy("margin", floor, MARGIN_WEIGHT, margin)
    if impostors is not None:
        return Policy("gallery", max(floor, gallery_threshold(impostors, 0.01, gallery)))
    return Policy("fixed", floor)


def stranger_rate(X: np.ndarray, labels: list[str], policy_for: object, enrolled: int = 0) -> dict[str, object]:
    """Every person a stranger against a gallery of one photo of each of the others: ``X`` (n, d) unit rows,
    ``labels`` their people, ``policy_for(gallery people)`` the decision Policy. ``enrolled``: which photo of each
    person (in the order given, modulo their count) is the gallery's. Let-in probes over all probes (FPIR)."""
    people = sorted(set(labels))
    L = np.array(labels)
    first = {p: int(np.flatnonzero(L == p)[enrolled % int((L == p).sum())]) for p in people}
    let_in, probes, worst = 0, 0, (0.0, "")
    by_stranger: dict[str, int] = {}
    for stranger in people:
        others = [p for p in people if p != stranger]
        G = X[[first[p] for p in others]]
        S = X[L == stranger] @ G.T
        part = np.sort(S, 1)
        policy = policy_for(len(others))  # type: ignore[operator]
        ok = [policy.judge(float(r[-1]), float(r[-2]) if len(r) > 1 else None)[0] for r in part]
        let_in += int(sum(ok))
        probes += len(ok)
        by_stranger[stranger] = int(sum(ok))
        worst = max(worst, (float(np.mean(ok)), stranger))
    return {"people": len(people), "probes": probes, "let_in": let_in, "fpir": let_in / probes,
            "worst_person": worst[1], "worst_person_fpir": worst[0],
            "let_in_by_stranger": {p: n for p, n in by_stranger.items() if n}}


def enrolled_photo_choices(X: np.ndarray, labels: list[str], policy_for: object) -> dict[str, object]:
    """:func:`stranger_rate` with the k-th photo of everyone enrolled, for k = 0 .. (fewest photos anyone has) - 1:
    the FPIR of each choice, their mean, min and max, and the let-ins of all choices pooled by stranger."""
    fewest = min(labels.count(p) for p in set(labels))
    runs = [stranger_rate(X, labels, policy_for, k) for k in range(fewest)]
    pooled: dict[str, int] = {}
    for r in runs:
        for p, n in r["let_in_by_stranger"].items():  # type: ignore[union-attr]
            pooled[p] = pooled.get(p, 0) + n
    rates = [float(r["fpir"]) for r in runs]  # type: ignore[arg-type]
    return {"choices": len(runs), "fpir": rates, "mean_fpir": float(np.mean(rates)), "min_fpir": min(rates),
            "max_fpir": max(rates), "let_in": sum(int(r["let_in"]) for r in runs),  # type: ignore[call-overload]
            "probes": sum(int(r["probes"]) for r in runs),  # type: ignore[call-overload]
            "let_in_by_stranger": dict(sorted(pooled.items(), key=lambda kv: -kv[1]))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=None)
    ap.add_argument("--no-flip", action="store_true")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("FACEDB_TEST_DATA", REPO.parent / "shared" /
                                                                     "facedata")))
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "stranger-rate-orl-yale.json")
    args = ap.parse_args()
    flip = not args.no_flip
    out: dict[str, object] = {"flip": flip, "protocol": PROTOCOL, "load_average_start": os.getloadavg(),
                              "models": {}}
    t0 = time.time()
    for model_id in args.model or ["sface", "dlib-resnet"]:
        pipe = get_pipeline(model_id)
        row: dict[str, object] = {}
        for name, folder in SETS.items():
            X, labels, counts = folder_embeddings(args.data / folder, pipe, flip=flip)
            policy = lambda n, m=model_id: shipped_policy(m, flip, n)  # noqa: E731
            row[name] = {**stranger_rate(X, labels, policy), **counts, "rule": shipped_policy(model_id, flip, 2).kind,
                         "enrolled_photo_choices": enrolled_photo_choices(X, labels, policy)}
            print(model_id, name, row[name], flush=True)
        out["models"][model_id] = row  # type: ignore[index]
    out["seconds"] = round(time.time() - t0, 1)
    out["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
