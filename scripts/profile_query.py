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


**Ready after a restart** (``--ready``, issue #27): how long a fresh process takes from ``FaceDB.open`` to its
first correct answer on a database that a bulk writer just filled, as a door's service restarted after an
import lives it. ``--build`` makes it once: ``FaceDB.create(index="auto")``, ``--n`` synthetic templates of
``--dim`` dimensions at ``--per`` a person added with ``add_templates_many`` (audit trail on, the default), then
the writer's ``close`` (which now builds and saves the index: timed as ``writer_close_s``). Each measurement is
a new Python process: import, ``FaceDB.open``, one genuine probe identified and checked (``first_answer_s``),
its CPU seconds (``first_answer_cpu_s``: on a shared machine
the wall time stretches with the other jobs), the wait until the re-scoring vectors are in memory
(``full_speed_s``), 100 untimed warm-up identifies, then
``--queries`` single identifies timed (p50/p99; right person first over the genuine ones; decisions identical
to exact search, computed here with numpy), file sizes and resident memory; a second process profiles the open
and first answer with cProfile (the top functions by cumulative time). ``--before CHECKOUT`` also measures that
code (``git worktree add /tmp/wt-before <commit>``) on a copy of the store alone, as the writer used to leave
it (no index file, no stamp):

    python scripts/profile_query.py --ready --build --db /tmp/ready/m1p5 --n 1000000 --per 5 --dim 128 \
        --before /tmp/wt-before --out bench-results/ready-1m5-128.json
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
    ("  probe checks (as_unit_rows)", "facedb.operations.recognition:as_unit_rows"),
    ("  query (lock, settings, index, engine)", "facedb.gallery.query:Query.identify"),
    ("    settings()", "facedb.db:FaceDB.settings"),
    ("    settings (memo)", "facedb.gallery.settings_cache:SettingsMemo.current"),
    ("    keeper.current", "facedb.gallery.upkeep:IndexKeeper.current"),
    ("    decision rule threshold", "facedb.gallery.decision:Rule.threshold"),
    ("    decision rule policy", "facedb.gallery.decision:Rule.policy"),
    ("    engine.identify", "facedb.gallery.engine:identify"),
    ("      rank_people", "facedb.gallery.engine:rank_people"),
    ("        candidate_people", "facedb.gallery.engine:candidate_people"),
    ("          index search (FAISS)", "index.search"),
    ("          template -> person", "facedb.gallery.indexed:Gallery.person_of"),
    ("        rescore", "facedb.gallery.engine:rescore"),
    ("          scores from memory (slices)", "facedb.gallery.indexed:Gallery.person_scores"),
    ("          vectors from the index", "facedb.gallery.indexed:Gallery.person_vectors"),
    ("          vectors from SQLite", "facedb.gallery.store:Store.person_vectors"),
    ("      names (cache)", "facedb.gallery.settings_cache:NameCache.lookup"),
    ("      names (SQLite)", "facedb.gallery.store:Store.names"),
    ("  audit record", "facedb.operations.audit:AuditTrail.record"),
    ("  visitor log", "facedb.operations.visitors:VisitorLog.keep"),
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

    if (args.db / "probes.npz").exists():
        data = np.load(args.db / "probes.npz")
        probes = np.concatenate([data["genuine"], data["impostor"]])[: args.queries]
    else:  # a database built by --ready --build: its probes are beside it
        data = np.load(probes_path(args.db))
        probes = data["probes"][: args.queries]
    t = time.perf_counter()
    db = FaceDB.open(args.db)
    db.identify(probes[0], k=5)
    open_s = time.perf_counter() - t
    ready(db)
    for w in data["warmup"]:
        db.identify(w, k=5)
    plain, cpu = [], []
    for _ in range(args.rounds):  # CPU time per query: on a shared machine the wall time stretches with others' jobs
        for p in probes:
            t, c = time.perf_counter(), time.thread_time()
            db.identify(p, k=5)
            cpu.append(time.thread_time() - c)
            plain.append(time.perf_counter() - t)
    spent, undo = instrument(db)
    for _ in range(args.rounds):
        for p in probes:
            db.identify(p, k=5)
    for owner, attr, original in reversed(undo):
        setattr(owner, attr, original)
    state = db.index_state()
    db.close()
    n = len(probes) * args.rounds
    steps = {label: float(np.sum(spent[label]) / n * 1e6) for label, _ in STEPS if label in spent}
    p50, p99 = np.percentile(np.array(plain) * 1e3, [50, 99])
    c50, c99 = np.percentile(np.array(cpu) * 1e3, [50, 99])
    classes: dict[str, float] = {}
    if "genuines" in data:  # the ready probes: genuine ones first, then strangers (whose close calls cost more)
        g = int(data["genuines"])
        per = np.array(cpu).reshape(args.rounds, len(probes)) * 1e3
        wall = np.array(plain).reshape(args.rounds, len(probes)) * 1e3
        classes = {"genuine_thread_cpu_p50_ms": float(np.median(per[:, :g])),
                   "stranger_thread_cpu_p50_ms": float(np.median(per[:, g:])),
                   "genuine_p50_ms": float(np.median(wall[:, :g])), "stranger_p50_ms": float(np.median(wall[:, g:]))}
    return {"db": str(args.db), "kind": state.built, "templates": state.live, "open_s": open_s,
            "queries": len(plain), "p50_ms": float(p50), "p99_ms": float(p99),
            "thread_cpu_p50_ms": float(c50), "thread_cpu_p99_ms": float(c99),
            "thread_cpu_mean_ms": float(np.mean(cpu) * 1e3), **classes,
            "steps_us_per_query": steps,
            "load_average": os.getloadavg(), "facedb": __import__("facedb").__file__}


def build_ready(args: argparse.Namespace) -> dict[str, object]:
    """The database a bulk writer leaves (see the module docstring), its probes and exact answers beside it."""
    from bench_search import THRESHOLD, exact_reference, synth

    from facedb import FaceDB

    templates, truth, genuine, impostor = synth(args.n, args.dim, args.queries * 2 // 3, per=args.per)
    probes = np.concatenate([genuine, impostor])[: args.queries]
    top, dec = exact_reference(templates, probes)
    people = templates.shape[0]
    warmup = templates[np.random.default_rng(99).choice(people, 100, replace=False), 0]
    args.db.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    db = FaceDB.create(args.db, model_id="synthetic", dim=args.dim, threshold=THRESHOLD, index="auto",
                       encrypt=args.encrypt)  # the key: $FACEDB_KEY, which the measuring processes open with
    step = max(1, 100_000 // args.per)
    for start in range(0, people, step):
        stop = min(people, start + step)
        db.add_templates_many([(f"id{i}", templates[i]) for i in range(start, stop)])
    import_s = time.perf_counter() - t
    del templates
    t = time.perf_counter()
    db.close()  # the writer leaves the index it builds here
    close_s = time.perf_counter() - t
    np.savez(probes_path(args.db), probes=probes, truth=truth, genuines=len(genuine), top=np.array(top),
             dec=np.array([d or "" for d in dec]), warmup=warmup)
    print(f"store import {import_s:.1f} s, writer close (index built and saved) {close_s:.1f} s", flush=True)
    return {"import_s": import_s, "writer_close_s": close_s, "load_average_at_build": os.getloadavg()}


def probes_path(db: Path) -> Path:
    return db.parent / f"{db.name}-probes.npz"


def measure_ready(db_path: Path, probes_file: Path, profile_open: bool) -> dict[str, object]:
    """One fresh process's figures (see the module docstring); run as a child of this script."""
    t = time.perf_counter()
    from facedb import FaceDB

    import_s = time.perf_counter() - t
    data = np.load(probes_file)
    probes, truth, g = data["probes"], data["truth"], int(data["genuines"])
    profiler = None
    if profile_open:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t, cpu = time.perf_counter(), time.process_time()
    db = FaceDB.open(db_path)
    first = db.identify(probes[0], k=5)
    first_s, first_cpu = time.perf_counter() - t, time.process_time() - cpu
    if profiler is not None:
        profiler.disable()
    state = db.index_state()
    out: dict[str, object] = {
        "import_s": import_s, "first_answer_s": first_s, "first_answer_correct": first.identity == f"id{truth[0]}",
        # CPU seconds of the process (all its threads) over the same span: on a loaded machine the wall time
        # stretches with the other jobs, this much less
        "first_answer_cpu_s": first_cpu,
        "from_file": state.from_file, "rescore_from_at_first_answer": state.rescore_from, "built": state.built,
        "templates": state.live, "load_average": os.getloadavg()}
    if profiler is not None:
        import pstats

        stats = pstats.Stats(profiler)
        rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][3])[:30]  # type: ignore[attr-defined]
        out["profile_top_cumulative"] = [
            {"function": f"{Path(f).name}:{line}({name})", "calls": int(nc), "own_s": round(tt, 4),
             "cum_s": round(ct, 4)} for (f, line, name), (_, nc, tt, ct, _) in rows]
        db.close()
        return out
    vectors = getattr(db.keeper.gallery, "vectors", None)
    if vectors is not None:
        vectors.wait()
    out["full_speed_s"] = time.perf_counter() - t
    for w in data["warmup"]:
        db.identify(w, k=5)
    times, answers = [], []
    for p in probes:
        t1 = time.perf_counter()
        answers.append(db.identify(p, k=5))
        times.append(time.perf_counter() - t1)
    p50, p99 = np.percentile(np.array(times) * 1e3, [50, 99])
    top1 = [a.candidates[0].name if a.candidates else None for a in answers]
    out.update({
        "p50_ms": float(p50), "p99_ms": float(p99), "queries": len(probes),
        "right_person_first": float(np.mean([top1[i] == f"id{truth[i]}" for i in range(g)])),
        "same_top_as_exact": float(np.mean([top1[i] == data["top"][i] for i in range(g)])),
        "same_decision_as_exact": float(np.mean([(a.identity or "") == d for a, d in zip(answers, data["dec"])])),
        "rescore_from": db.index_state().rescore_from, "rss_mb": rss_mb(),
        "files_bytes": {f.name: f.stat().st_size for f in sorted(db_path.iterdir()) if f.is_file()},
        "load_average_after": os.getloadavg()})
    db.close()
    return out


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(db: Path, probes: Path, profile_open: bool, code: Path | None = None) -> dict[str, object]:
    """Run :func:`measure_ready` in a new Python process (``code``: another checkout's facedb)."""
    import subprocess

    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = str(code)
    cmd = [sys.executable, __file__, "--db", str(db), "--measure-child", str(probes)]
    if profile_open:
        cmd.append("--profile-open")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def before_copy(db: Path) -> Path:
    """The store alone, as the writer used to leave it: no index file, no stamp."""
    import shutil
    import sqlite3

    dest = db.parent / f"{db.name}-before"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    shutil.copy2(db / "facedb.sqlite3", dest / "facedb.sqlite3")
    with sqlite3.connect(dest / "facedb.sqlite3") as conn:
        conn.execute("DELETE FROM meta WHERE key = 'index_stamp'")
    return dest


def run_ready(args: argparse.Namespace) -> None:
    res: dict[str, object] = {"n": args.n, "per": args.per, "dim": args.dim, "index": "auto", "audit": True,
                              "encrypted": args.encrypt,
                              "machine": f"{os.cpu_count()} cores, shared", "load_average_at_start": os.getloadavg()}
    if args.build:
        res["build"] = build_ready(args)
    probes = probes_path(args.db)
    res["after"] = child(args.db, probes, False)
    print("after:", json.dumps(res["after"]), flush=True)
    res["after_open_profile"] = child(args.db, probes, True)
    if args.before:
        copy = before_copy(args.db)
        res["before"] = child(copy, probes, True, args.before)  # profiled: the build dominates it
        res["before"]["code"] = str(args.before)  # type: ignore[index]
        print("before:", json.dumps({k: v for k, v in res["before"].items() if k != "profile_top_cumulative"}),
              flush=True)
        import shutil

        shutil.rmtree(copy, ignore_errors=True)
    res["load_average_at_end"] = os.getloadavg()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", type=Path, required=True)
    ap.add_argument("--build", action="store_true", help="create the database first (it must not exist)")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--per", type=int, default=50)
    ap.add_argument("--kind", default="ivfpq")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=1, help="profile: times each probe is asked (timed and profiled)")
    ap.add_argument("--ready", action="store_true", help="measure open-to-first-answer (see above)")
    ap.add_argument("--dim", type=int, default=128, help="--ready: template dimension")
    ap.add_argument("--before", type=Path, default=None, help="--ready: also measure this checkout's code")
    ap.add_argument("--encrypt", action="store_true", help="--ready --build: an encrypted database ($FACEDB_KEY)")
    ap.add_argument("--measure-child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--profile-open", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_child is not None:
        print(json.dumps(measure_ready(args.db, args.measure_child, args.profile_open)))
        return
    if args.ready:
        run_ready(args)
        return
    if args.build:
        build(args)
    res = profile(args)
    print(f"{res['kind']} at {res['templates']:,} templates: open + first answer {res['open_s']:.2f} s, "
          f"p50 {res['p50_ms']:.3f} ms, p99 {res['p99_ms']:.3f} ms, thread CPU p50 {res['thread_cpu_p50_ms']:.3f} ms "
          f"mean {res['thread_cpu_mean_ms']:.3f} ms (load average {res['load_average'][0]:.1f})")
    if "genuine_p50_ms" in res:
        print(f"genuine probes: p50 {res['genuine_p50_ms']:.3f} ms "
              f"(thread CPU {res['genuine_thread_cpu_p50_ms']:.3f}); "
              f"strangers: p50 {res['stranger_p50_ms']:.3f} ms (thread CPU {res['stranger_thread_cpu_p50_ms']:.3f})")
    print("mean us per query (inclusive):")
    for label, us in res["steps_us_per_query"].items():  # type: ignore[union-attr]
        print(f"  {label:44} {us:8.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
