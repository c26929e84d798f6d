"""The models table of docs/thresholds-and-accuracy.md, every model on the same protocol through facedb, rendered
from the JSON the measuring scripts wrote (nothing is measured here, and nothing is typed by hand: a figure no
script has measured prints as "–").

    python scripts/models_table.py [--out bench-results/models-table.md]

Sources, each with flip (the `facedb init` default):
  bench-results/accuracy-<M>-flip.json   scripts/accuracy_report.py: LFW pairs.txt 10-fold, TAR at FAR 1e-3 / 1e-4
                                         (1e-4 is not resolvable with pairs.txt's 3,000 impostor pairs: shown in
                                         brackets, as the report flags it)
  bench-results/open-set-<M>-flip.json   scripts/open_set_report.py: DIR at FPIR 1% / 0.1%, one photo each of 1,678
                                         people (raw LFW labels; "corrected": LFW_NOT_STRANGERS left out) and three
                                         photos (610 people, best template or mean)
  bench-results/stranger-rate-orl-yale.json  scripts/stranger_rate.py: ORL and Yale, every person a stranger
                                         (the first photo of each enrolled; in brackets, the mean over every
                                         choice of the enrolled photo)
  bench-results/models-speed.json        scripts/bench_models.py: ms per face (one aligned crop, one thread)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench-results"
#: Where each model's weights come from and under which licence (docs/models.md, "Models and weights").
MODELS = {
    "sface": ("SFace 2021dec (OpenCV Zoo), 128-d", "Apache-2.0"),
    "dlib-resnet": ("dlib ResNet, 128-d", "CC0 (dlib's model files)"),
    "facenet-casia-tf": ("FaceNet 20180408-102900 (CASIA-WebFace), 512-d, converted from the graph", "MIT"),
}
FILES = {"sface": "sface", "dlib-resnet": "dlib", "facenet-casia-tf": "facenet-casia-tf"}


def load(name: str) -> dict:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else {}


def pct(value: object, resolvable: bool = True) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    text = f"{100 * value:.1f}%"
    return text if resolvable else f"({text})"


def strangers_cell(orl_yale: dict) -> str:
    """ORL / Yale let-in rates with the first photo of everyone enrolled, then (in brackets) the mean over every
    choice of the enrolled photo, where measured: on 40 and 15 people one look-alike pair moves the first figure
    by 2 points (docs/thresholds-and-accuracy.md, "Every person a stranger")."""
    orl, yale = orl_yale.get("orl", {}), orl_yale.get("yale", {})
    text = f"{pct(orl.get('fpir'))} / {pct(yale.get('fpir'))}"
    mean_orl = orl.get("enrolled_photo_choices", {}).get("mean_fpir")
    mean_yale = yale.get("enrolled_photo_choices", {}).get("mean_fpir")
    if mean_orl is not None or mean_yale is not None:
        text += f" ({pct(mean_orl)} / {pct(mean_yale)})"
    return text


def row(model: str, speed: dict, strangers: dict) -> str:
    stem = FILES[model]
    acc = load(f"accuracy-{stem}-flip.json").get("lfw_pairs", {})
    openset = load(f"open-set-{stem}-flip.json")
    # one photo each: open_set_report's figures, else accuracy_report's own open-set run (the same protocol)
    one = openset.get("scores_1_photo", {}).get("raw", {}) or load(f"accuracy-{stem}-flip.json").get("open_set_lfw", {})
    fixed = openset.get("label_corrected", {}).get("scores_1_photo", {}).get("raw", {})
    three = openset.get("three_photos", {}).get("best_or_mean, raw", {})
    orl_yale = strangers.get("models", {}).get(model, {})
    ms = speed.get("models", {}).get(model, {}).get("ms_per_face_p50")
    ten = (f"{100 * acc['accuracy_mean']:.2f}% ± {100 * acc['accuracy_std']:.2f}" if "accuracy_mean" in acc
           else "–")
    cells = [
        MODELS[model][0], ten, pct(acc.get("tar_at_far_0.001")),
        pct(acc.get("tar_at_far_0.0001"), bool(acc.get("far_0.0001_resolvable", True))),
        f"{pct(one.get('dir_at_fpir_0.01'))} / {pct(one.get('dir_at_fpir_0.001'))}",
        f"{pct(fixed.get('dir_at_fpir_0.01'))} / {pct(fixed.get('dir_at_fpir_0.001'))}",
        f"{pct(three.get('dir_at_fpir_0.01'))} / {pct(three.get('dir_at_fpir_0.001'))}",
        strangers_cell(orl_yale),
        f"{ms:.0f}" if isinstance(ms, (int, float)) else "–", MODELS[model][1],
    ]
    return "| " + " | ".join(cells) + " |"


def render() -> str:
    """The table as Markdown (header, rule, one row per model), from the JSON in bench-results/ as it is now.
    docs/thresholds-and-accuracy.md quotes it verbatim; tests/test_docs_figures.py checks that it still does."""
    speed, strangers = load("models-speed.json"), load("stranger-rate-orl-yale.json")
    lines = ["| model | LFW 10-fold | TAR at FAR 1e-3 | TAR at FAR 1e-4 | DIR at FPIR 1% / 0.1%, 1 photo | "
             "the same, corrected labels | DIR at FPIR 1% / 0.1%, 3 photos | ORL / Yale strangers let in "
             "(mean over the enrolled photo) | "
             "ms per face | licence |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row(m, speed, strangers) for m in MODELS]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS / "models-table.md")
    args = ap.parse_args()
    text = render()
    print(text, end="")
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
