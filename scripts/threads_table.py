"""The table of docs/performance-and-scale.md ("Threads"): median milliseconds per photo (detection) or per face
(embedding) with one and two threads, on the machine as it was and with a busy process per core added,
rendered from the JSON scripts/bench_threads.py wrote (nothing measured here, nothing typed by hand). The
one-thread figure is in bold where it beats two threads under the same load.

    python scripts/threads_table.py [--json bench-results/threads.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "bench-results" / "threads.json"
#: The JSON's measurement and the row's label, in the table's order.
ENGINES = [("detect", "MTCNN detection"), ("facenet_embed", "FaceNet, one face (search)"),
           ("facenet_embed_batch16_per_face", "FaceNet, batches of 16 (enrolment), per face"),
           ("faiss_ivf_train_5120x128", "FAISS IVF training, 5,120 x 128-d"),
           ("dlib_embed", "dlib ResNet, one face (not threaded by torch)")]


def ms(value: float) -> str:
    return f"{int(Decimal(str(value)).quantize(Decimal('1'), ROUND_HALF_UP)):,} ms"


def render(path: Path = SOURCE) -> str:
    """The table as Markdown: one row per engine; columns 1 and 2 threads, then the same with competitors."""
    rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
    busy = max(r["competitors"] for r in rows)
    cell = {(r["threads"], r["competitors"]): r for r in rows}
    lines = [f"| | 1 thread | 2 threads (torch's default here) | 1 thread, {busy} busy processes | "
             f"2 threads, {busy} busy processes |", "|---|---|---|---|---|"]
    for key, label in ENGINES:
        cells = []
        for competitors in (0, busy):
            one, two = (cell[(t, competitors)][key]["median_ms"] for t in (1, 2))
            cells += [f"**{ms(one)}**" if one < two else ms(one), ms(two)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=SOURCE)
    print(render(ap.parse_args().json), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
