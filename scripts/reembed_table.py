"""The table of docs/models.md ("Moving a database to another model"): identification against a dlib-resnet
gallery and against the same gallery moved to sface, from its kept crops and from its photos, rendered from the
JSON scripts/bench_reembed.py wrote (nothing measured here, nothing typed by hand).

    python scripts/reembed_table.py [--json bench-results/reembed-dlib-to-sface.json]

Rates are shares of the probes (mated probes for rank-1 and DIR, strangers for FPIR), shown as percentages
rounded half up to one decimal; the move time in whole seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench-results"
SOURCE = "reembed-dlib-to-sface.json"
#: (the JSON's section, the row's label): the gallery before the move, then moved from crops and from photos.
ROWS = [("before_move", "dlib-resnet, before the move (probes by dlib)"),
        ("from_crops", "sface, re-made **from the kept crops**"),
        ("from_photos", "sface, re-made **from the photos**")]


def pct(share: float) -> str:
    """0.9635 -> "96.4%": half up from the decimal the JSON holds (not from the binary float)."""
    return f"{(Decimal(str(share)) * 100).quantize(Decimal('0.1'), ROUND_HALF_UP)}%"


def render(path: Path | None = None) -> str:
    """The table as Markdown (header, rule, one row per gallery) from ``path`` (default: bench-results/)."""
    data = json.loads((path or RESULTS / SOURCE).read_text(encoding="utf-8"))
    lines = ["| gallery | rank-1 | DIR at FPIR 1% | DIR at FPIR 5% | out of the box (the model's margin rule): "
             "DIR / FPIR | move time |",
             "|---|---|---|---|---|---|"]
    for key, label in ROWS:
        r = data[key]
        dir1 = pct(r["dir_at_fpir_0.01"])
        moved = "move_seconds" in r
        seconds = (f"{Decimal(str(r['move_seconds'])).quantize(Decimal('1'), ROUND_HALF_UP)} s" if moved else "—")
        lines.append(f"| {label} | {pct(r['rank1'])} | {f'**{dir1}**' if moved else dir1} | "
                     f"{pct(r['dir_at_fpir_0.05'])} | {pct(r['shipped_dir'])} / {pct(r['shipped_fpir'])} | {seconds} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=RESULTS / SOURCE)
    args = ap.parse_args()
    print(render(args.json), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
