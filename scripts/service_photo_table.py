"""The table of docs/performance-and-scale.md ("The photo path at the door"): one photo to one decision through
`facedb serve` against the in-process call, at each number of doors: p50 / p99 as the caller saw them, and each
call's mean time split into the core's stages and the rest, rendered from the JSON scripts/bench_service.py
wrote (nothing measured here, nothing typed by hand).

    python scripts/service_photo_table.py [--json bench-results/service-photo-sface.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "bench-results" / "service-photo-sface.json"


def ms(value: float) -> str:
    return f"{value:,.1f}"


def render(path: Path = SOURCE) -> str:
    """The table as Markdown: for each number of doors, an in-process row and a service row."""
    res = json.loads(path.read_text(encoding="utf-8"))
    rows = {(r["clients"], "API" if r["scenario"].endswith("in-process API") else "HTTP"): r
            for r in res["rows"] if r["scenario"].startswith("photo identify")}
    stages = res["photo"]["stages"]
    lines = ["| doors | call | p50 / p99 ms (the caller's) | mean ms | detect | embed | search + decide | the rest | "
             "loopback (client − inside) |", "|---|---|---|---|---|---|---|---|---|"]
    for doors in sorted({c for c, _ in rows}):
        part = stages[str(doors)]
        for side, label, split in (("API", "in-process API", part["in_process"]),
                                   ("HTTP", "HTTP (means: inside the service)", part["service"])):
            r = rows[(doors, side)]
            st = split["stages_ms"]
            loop = ms(part["http_client_ms"] - split["call_ms"]) if side == "HTTP" else "—"
            lines.append(f"| {doors} | {label} | {r['p50_ms']:,.0f} / {r['p99_ms']:,.0f} | {ms(split['call_ms'])} | "
                         f"{ms(st.get('detect', 0.0))} | {ms(st.get('embed', 0.0))} | "
                         f"{ms(st.get('search', 0.0) + st.get('decide', 0.0))} | {ms(split['outside_stages_ms'])} | "
                         f"{loop} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=SOURCE)
    print(render(ap.parse_args().json), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
