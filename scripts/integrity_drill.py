"""The deployment-shaped integrity drill (issue #23; see facedb/testing/integrity.py): a real `facedb serve
--workers 2` with the console, CLI processes beside it, SIGKILLs of workers and CLI processes, and a ledger of
every acknowledged operation checked at the end. Reports operations acknowledged, lost (target 0), in doubt,
SIGKILLs and problems; writes JSON to bench-results/.

    python scripts/integrity_drill.py --operations 10000 --kill-every 150
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

from facedb.testing.integrity import run_integrity_drill

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--operations", type=int, default=10_000, help="acknowledged operations to reach")
    ap.add_argument("--kill-every", type=int, default=150, help="SIGKILL a service worker every N operations")
    ap.add_argument("--cli-kill-share", type=float, default=0.3, help="share of CLI processes killed mid-run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench-results/integrity-drill.json"))
    args = ap.parse_args()
    res = run_integrity_drill(args.operations, args.kill_every, seed=args.seed, cli_kill_share=args.cli_kill_share)
    res["command"] = " ".join(["python", *sys.argv])
    res["machine"] = f"{platform.machine()}, {platform.python_version()}"
    res["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    for k, v in res.items():
        print(f"{k:26s} {v}")
    sys.exit(0 if res["lost"] == 0 and res["problems"] == 0 else 1)
