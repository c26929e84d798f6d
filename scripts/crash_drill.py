"""Crash drill: SIGKILL a writer at random moments during add, remove, reindex and calibrate; after each kill
`check` must pass and every acknowledged operation must be fully present.

    python scripts/crash_drill.py --kills 200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from facedb.testing.soak import run_crash_drill

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench-results/crash-drill.json"))
    args = ap.parse_args()
    res = run_crash_drill(args.kills, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    for k, v in res.items():
        print(f"{k:28s} {v}")
