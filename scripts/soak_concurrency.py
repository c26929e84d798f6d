"""Concurrency soak: N reader processes search while a writer enrols and removes a given number of people.

    python scripts/soak_concurrency.py --removals 200 --readers 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from facedb.testing.soak import run_concurrency

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--removals", type=int, default=200)
    ap.add_argument("--readers", type=int, default=4)
    ap.add_argument("--people", type=int, default=400)
    ap.add_argument("--out", type=Path, default=Path("bench-results/soak-concurrency.json"))
    args = ap.parse_args()
    res = run_concurrency(args.removals, args.readers, args.people)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    for k, v in res.items():
        print(f"{k:32s} {v}")
