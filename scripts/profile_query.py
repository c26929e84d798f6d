"""Where the time of one ``FaceDB.identify`` goes: a per-step profile of single-probe queries, as a door runs
them (audit trail on, the database's defaults), on a database built once and kept.

    python scripts/profile_query.py --db /tmp/p1m50 --build --n 1000000 --per 50 --kind ivfpq
    python scripts/profile_query.py --db /tmp/p1m50                     # profile it (again)

Building uses the synthetic face-like data of ``bench_search.py`` (``--per`` templates per identity) and keeps
the probes beside the database (``probes.npz``), so that runs of different code versions answer the same
probes. Profiling opens the database, waits until it is ready to answer at full speed (index loaded; re-scoring
vectors in memory where the code has them), answers 100 untimed warm-up probes, then times ``--queries``
probes twice: plain (the p50 / p99 reported) and with every step wrapped in a timer (the breakdown: median
microseconds per query of each step (mean), inclusive of the steps inside it; the wrappers add ~1 us each).
Steps that the code being profiled does not have are left out, so the same script profiles older versions
(``PYTHONPATH=old-checkout python scripts/profile_query.py ...``). JSON goes to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: (label, "module:qualified.name") of each step wrapped; nesting shown by the label's indentation.
STEPS = [
    ("identify (whole call)", "facedb.db:FaceDB.identify"),
    ("  settings()", "facedb.db:FaceDB.settings"),
    ("  keeper.current", "facedb.keeper:IndexKeeper.current"),
    ("  decision rule threshold", "facedb.decision:Rule.threshold"),
    ("  engine.identify", "facedb.engine:identify"),
    ("    candidate_people", "facedb.engine:candidate_people"),
    ("      index search (FAISS)", "index.search"),
    ("      template -> person", "facedb.gallery:Gallery.person_of"),
    ("    rescore", "facedb.engine:rescore"),
    ("      scores from memory (slices)", "facedb.gallery:Gallery.person_scores"),
    ("      vectors from the index", "facedb.gallery:Gallery.person_vectors"),
    ("      vectors from SQLite", "facedb.store:Store.person_vectors"),
    ("    names (cache)", "facedb.memo:NameCache.lookup"),
    ("    names (SQLite)", "facedb.store:Store.names"),
    ("  audit record", "facedb.audit:AuditTrail.record"),
]


def build(args: argparse.Namespace) -> None:
    from bench_search import synth

    from facedb import FaceDB

    templates, truth, genuine, impostor = synth(args.n, 512, args.queries, per=args.per)
    people = templates.shape[0]
    args.db.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with FaceDB.create(args.db, model_id="synthetic", dim=512, threshold=0.5) as db:
        step = max(1, 100_000 // args.per)
        for start in range(0, people, step):
            stop = min(people, start + step)
            db.add_templates_many([(f"id{i}", templates[i]) for i in range(start, stop)])
    print(f"store import {time.perf_counter() - t:.1f} s")
    warmup = templates[np.random.default_rng(99).choice(people, 100, replace=False), 0]
    np.savez(args.db / "probes.npz", truth=truth, genuine=genuine, impostor=impostor, warmup=warmup)
    del templates
    with FaceDB.open(args.db) as db:
        t = time.perf_counter()
        db.reindex(args.kind)
        print(f"{args.kind} built in {time.perf_counter() - t:.1f} s")


def resolve(path: str, db: object) -> tuple[object, str, object] | None:
    """(owner, attribute, original) for a step, or None when this code version has no such step."""
    if path == "index.search":
        gallery = db.keeper.gallery  # type: ignore[attr-defined]
        return (gallery.index, "search", gallery.index.search) if gallery is not None else None
    mod_name, qual = path.split(":")
    try:
        owner: object = importlib.import_module(mod_name)
    except ImportError:
        return None
    *parents, attr = qual.split(".")
    for p in parents:
        owner = getattr(owner, p, None)
        if owner is None:
            return None
    original = getattr(owner, attr, None)
    return (owner, attr, original) if original is not None else None


def instrument(db: object) -> tuple[dict[str, list[float]], list[tuple[object, str, object]]]:
    spent: dict[str, list[float]] = defaultdict(list)
    undo = []
    for label, path in STEPS:
        found = resolve(path, db)
        if found is None:
            continue
        owner, attr, original = found

        def wrap(fn, label=label):
            @functools.wraps(fn)
            def timed(*a, **kw):
                t = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    spent[label].append(time.perf_counter() - t)
            return timed

        setattr(owner, attr, wrap(original))
        undo.append((owner, attr, original))
    return spent, undo


def ready(db: object) -> None:
    """Load the index and, where this code has them, the in-memory re-scoring vectors."""
    try:
        db.load_index(wait=True)  # type: ignore[attr-defined]
    except TypeError:  # older code: no in-memory vectors to wait for
        db.load_index()  # type: ignore[attr-defined]


def profile(args: argparse.Namespace) -> dict[str, object]:
    from facedb import FaceDB

    data = np.load(args.db / "probes.npz")
    probes = np.concatenate([data["genuine"], data["impostor"]])[: args.queries]
    t = time.perf_counter()
    db = FaceDB.open(args.db)
    db.identify(probes[0], k=5)
    open_s = time.perf_counter() - t
    ready(db)
    for w in data["warmup"]:
        db.identify(w, k=5)
    plain = []
    for p in probes:
        t = time.perf_counter()
        db.identify(p, k=5)
        plain.append(time.perf_counter() - t)
    spent, undo = instrument(db)
    for p in probes:
        db.identify(p, k=5)
    for owner, attr, original in reversed(undo):
        setattr(owner, attr, original)
    state = db.index_state()
    db.close()
    n = len(probes)
    steps = {label: float(np.sum(spent[label]) / n * 1e6) for label, _ in STEPS if label in spent}
    p50, p99 = np.percentile(np.array(plain) * 1e3, [50, 99])
    return {"db": str(args.db), "kind": state.built, "templates": state.live, "open_s": open_s,
            "p50_ms": float(p50), "p99_ms": float(p99), "steps_us_per_query": steps,
            "load_average": os.getloadavg(), "facedb": __import__("facedb").__file__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", type=Path, required=True)
    ap.add_argument("--build", action="store_true", help="create the database first (it must not exist)")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--per", type=int, default=50)
    ap.add_argument("--kind", default="ivfpq")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.build:
        build(args)
    res = profile(args)
    print(f"{res['kind']} at {res['templates']:,} templates: open + first answer {res['open_s']:.2f} s, "
          f"p50 {res['p50_ms']:.3f} ms, p99 {res['p99_ms']:.3f} ms (load average {res['load_average'][0]:.1f})")
    print("mean us per query (inclusive):")
    for label, us in res["steps_us_per_query"].items():  # type: ignore[union-attr]
        print(f"  {label:44} {us:8.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
