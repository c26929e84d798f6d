"""Search at scale: index kinds at N templates, as a door runs them, beside the peers' own search approaches.

Data (stated, synthetic, face-like): P = N/T identities x T templates (``--per``, default 5), 512-d unit
vectors. Face embeddings are not isotropic: identities spread over ~100 dominant directions, so two different
people have cosine ~0 with a spread of ~0.1 (not 1/sqrt(512) = 0.044). Identity centres are drawn from a
Gaussian whose variances fall as (i + 1)^-0.8 over the 512 axes (effective dimension ~110, different-identity
cosine 0.00 +- 0.10); templates and genuine probes are the centre plus isotropic noise (pose, light, age:
spread over all directions), scaled so two samples of one identity have cosine ~0.70 (FaceNet-like statistics;
the script prints the measured ones). `--isotropic` draws the centres isotropically too (harder for
approximate indexes: no structure to cluster).
Probes: --queries genuine probes (fresh samples of enrolled identities) and half as many impostors (fresh
identities). Decisions use threshold 0.5, with the database's defaults otherwise: **the audit trail on** (as
new databases have it: decisions recorded by the background writer; ``--audit-sync`` to commit each record before
its answer, ``--no-audit`` for the older figures). The re-scoring memory budget is ``FACEDB_RESCORE_MEMORY_MB``
(default 8,192 MiB; 0: candidates re-scored from the store), recorded with the results.

Each kind is built once, then measured ``--runs`` times (default 3), each run a fresh open: open + first answer
(the open time), the wait until it answers at full speed (re-scoring vectors in memory: "ready"), 100 untimed
warm-up searches (stored templates of other people), then the timed single probes and the batches. Reported:
the median of the runs and their spread (min-max). The reference for recall and decisions is exact search,
computed here with numpy over every template (per-person best score); ``flat`` can also be measured as a kind.

For each kind: build time, index file size and bytes per template, open time (no rebuild), ready time, single-
probe p50/p99, batch QPS (64 probes a call), resident memory of the process after the runs, recall@1 against
exact search (same top person), identity-correct@1 (genuine probes), and the share of accept/reject decisions
identical to exact search. ``auto`` is measured as the kind it builds. Peers on the same data: deepface's
``find`` (a Python loop computing a cosine distance per stored representation) and face_recognition's
``face_distance`` (numpy over a Python list of encodings), with ``--peers``.

    python scripts/bench_search.py --sizes 10000 100000 1000000 --kinds flat ivf ivfpq --runs 1

The issue #17 tables (1M templates, 5 and 50 per person, auto's kind and the fastest, three runs; ~40 min and
~10 GB of RAM here; the load average is recorded with each run: quiet machines only for final figures):

    python scripts/bench_search.py --final

Milvus (``--index milvus``, docs/milvus.md): the same protocol through facedb's milvus kind. By default it
runs against **Milvus Lite** (in this process, a .db directory in the work directory): a test double for the
client protocol, **not a measure of a Milvus server or cluster**, whose searches run in its own processes
(and machines) behind gRPC. To measure a server, point it there:

    FACEDB_MILVUS_TOKEN=root:Milvus python scripts/bench_search.py --index ivf ivfpq milvus \
        --sizes 10000 100000 --milvus-uri http://milvus-host:19530

Open time for milvus is what a facedb process pays with the engine running: connect, describe, load the
collection if the engine holds it released, read the store's id map. With Milvus Lite the collection is
released after the build, so the open includes Lite loading it as a new process would (Lite searches the
rows a build just wrote far slower than the segments it loads: ~0.25 s against ~20 ms a query at 10k here).
The exact ``flat`` kind always runs first: it is the reference for recall and decisions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from facedb import FaceDB

SAME_COS = 0.70
THRESHOLD = 0.5


def synth(n: int, dim: int, queries: int, seed: int = 0, isotropic: bool = False, per: int = 5):
    """(templates (people, per, dim), truth (queries,), genuine (queries, dim), impostor (queries // 2, dim))."""
    rng = np.random.default_rng(seed)
    people = n // per
    sigma = np.sqrt(1 / SAME_COS - 1)
    scale = np.ones(dim) if isotropic else (np.arange(dim) + 1.0) ** -0.4  # std; variance ~ (i + 1)^-0.8
    scale = (scale / np.sqrt(np.sum(scale**2))).astype(np.float32)  # E|draw|^2 = 1

    def draw(shape: tuple[int, ...]) -> np.ndarray:
        return rng.standard_normal((*shape, dim)).astype(np.float32) * scale

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    def noise(shape: tuple[int, ...]) -> np.ndarray:
        return rng.standard_normal((*shape, dim)).astype(np.float32) / np.float32(np.sqrt(dim))

    centres = unit(draw((people,)))
    templates = unit(centres[:, None, :] + sigma * noise((people, per)))
    truth = rng.choice(people, queries, replace=False)
    genuine = unit(centres[truth] + sigma * noise((queries,)))
    impostor = unit(unit(draw((queries // 2,))) + sigma * noise((queries // 2,)))
    return templates, truth, genuine, impostor


def memory_bandwidth_gbs() -> float:
    x = np.ones(256 * 2**20 // 4, dtype=np.float32)  # 256 MiB
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        float(x.sum())
        best = max(best, x.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def timed(fn, reps: int) -> list[float]:
    out = []
    for i in range(reps):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return out


def peers(templates: np.ndarray, probes: np.ndarray, reps: int) -> dict[str, float]:
    """Per-probe seconds of the peers' search loops over the same stored vectors."""
    flat = templates.reshape(-1, templates.shape[-1])
    as_list = [v for v in flat]  # how both keep representations: one array per face

    def deepface_find(i: int) -> None:  # deepface: for each stored representation, a cosine distance
        q = probes[i]
        best = 2.0
        for v in as_list:
            d = 1 - float(np.dot(v, q) / (np.linalg.norm(v) * np.linalg.norm(q)))
            best = min(best, d)

    def face_distance(i: int) -> None:  # face_recognition.face_distance(list, probe)
        np.linalg.norm(np.array(as_list) - probes[i], axis=1).argmin()

    return {
        "deepface_loop_ms": float(np.median(timed(deepface_find, reps))) * 1e3,
        "face_recognition_face_distance_ms": float(np.median(timed(face_distance, reps))) * 1e3,
    }


def decisions(answers) -> list[str | None]:
    return [a.identity for a in answers]


def exact_reference(templates: np.ndarray, probes: np.ndarray, block: int = 64) -> tuple[list[str], list[str | None]]:
    """Exact search by brute force: (top person of each probe, decision at THRESHOLD: the person or None)."""
    top, dec = [], []
    flat = templates.reshape(-1, templates.shape[-1])
    per = templates.shape[1]
    for s in range(0, len(probes), block):
        sims = (probes[s:s + block] @ flat.T).reshape(len(probes[s:s + block]), -1, per).max(axis=2)
        best = sims.argmax(axis=1)
        for row, b in enumerate(best):
            top.append(f"id{b}")
            dec.append(f"id{b}" if sims[row, b] >= THRESHOLD else None)
    return top, dec


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def spread(values: list[float]) -> dict[str, float]:
    return {"median": float(np.median(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def server_rss_mb(name: str | None) -> float | None:
    """Resident memory of a scripts/milvus_server.sh instance's milvus process (MILVUS_RUN, default .milvus-run),
    or None without one."""
    if not name:
        return None
    run = Path(os.environ.get("MILVUS_RUN", ".milvus-run")) / name
    wrapper = (run / "wrapper.pid").read_text().strip()
    for child in Path(f"/proc/{wrapper}/task/{wrapper}/children").read_text().split():
        if Path(f"/proc/{child}/comm").read_text().strip() == "milvus":
            for line in Path(f"/proc/{child}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    return None


def measure(root: Path, probes: np.ndarray, warmup: np.ndarray, stand_in: bool = False) -> dict[str, object]:
    """One run: open, first answer, ready, warm-up, timed single probes and batches. ``stand_in``: the milvus
    kind with its server unreachable (FACEDB_MILVUS_URI pointed at a port nothing listens on), so that the store
    answers by an exact search (facedb/gallery/standin.py); its open includes reading every template."""
    if stand_in:  # for the whole run: the keeper keeps trying the server, and would go back to it
        os.environ["FACEDB_MILVUS_URI"] = "http://127.0.0.1:9"
        try:
            return measure(root, probes, warmup)
        finally:
            os.environ.pop("FACEDB_MILVUS_URI", None)
    t = time.perf_counter()
    db = FaceDB.open(root)
    db.identify(probes[0], k=5)
    open_s = time.perf_counter() - t
    state = db.index_state()
    assert state.stand_in is not None if os.environ.get("FACEDB_MILVUS_URI") else state.from_file, \
        "opened without a rebuild (stand-in: answered by the store)"
    db.load_index(wait=True)
    ready_s = time.perf_counter() - t
    for w in warmup:  # steady state, as a running service would be: caches filled, code paths hot
        db.identify(w, k=5)
    single = timed(lambda i, db=db, probes=probes: db.identify(probes[i], k=5), len(probes))
    t = time.perf_counter()
    answers = []
    for s in range(0, len(probes), 64):
        answers += db.identify(probes[s:s + 64], k=5)
    qps = len(probes) / (time.perf_counter() - t)
    state = db.index_state()
    db.close()
    p50, p99 = np.percentile(np.array(single) * 1e3, [50, 99])
    return {"open_s": open_s, "ready_s": ready_s, "p50_ms": float(p50), "p99_ms": float(p99), "batch64_qps": qps,
            "answers": answers, "built": state.built, "params": state.params, "rescore_from": state.rescore_from,
            "rescore_bytes": state.rescore_bytes, "rss_mb": rss_mb(), "load_average": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--per", type=int, nargs="+", default=[5], help="templates per identity (each a data set)")
    ap.add_argument("--kinds", "--index", nargs="+", default=["auto", "ivfpq"],
                    help="index kinds to measure (flat, flat16, hnsw, ivf, ivfpq, auto, milvus)")
    ap.add_argument("--runs", type=int, default=3, help="measurements of each built index (median and spread)")
    ap.add_argument("--no-audit", action="store_true", help="switch the audit trail off (the older figures)")
    ap.add_argument("--audit-sync", action="store_true", help="commit each decision's record before its answer")
    ap.add_argument("--note", default="", help="recorded with the results (e.g. 'shared machine: provisional')")
    ap.add_argument("--milvus-uri", default=None,
                    help="milvus: a server (http://host:19530; token from FACEDB_MILVUS_TOKEN) or a .db path for "
                         "Milvus Lite (default: Lite in the work directory)")
    ap.add_argument("--milvus-server", default=None, metavar="NAME",
                    help="a scripts/milvus_server.sh instance on this machine serving --milvus-uri: its resident "
                         "memory is recorded after the milvus runs")
    ap.add_argument("--milvus-params", type=json.loads, default=None, metavar="JSON",
                    help='the milvus kind\'s index parameters, e.g. \'{"ef_search": 256}\' (default: facedb\'s)')
    ap.add_argument("--stand-in", action="store_true",
                    help="milvus: also measure queries answered by the store while the server cannot answer")
    ap.add_argument("--peers", action="store_true", help="also time the peers' search loops")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000, help="genuine probes (and half as many impostors)")
    ap.add_argument("--peer-reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench-results/search.json"))
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--isotropic", action="store_true", help="isotropic synthetic data (see above)")
    ap.add_argument("--final", action="store_true", help="the issue #17 tables: --sizes 1000000 --per 5 50 "
                    "--kinds auto ivfpq --runs 3 --out bench-results/search-final.json")
    args = ap.parse_args()
    if args.final:
        args.sizes, args.per, args.kinds, args.runs = [1_000_000], [5, 50], ["auto", "ivfpq"], 3
        args.out = Path("bench-results/search-final.json")
    bw = memory_bandwidth_gbs()
    results: dict[str, object] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                  "memory_read_gbs": bw, "isotropic": args.isotropic, "audit": not args.no_audit,
                                  "audit_sync": args.audit_sync,
                                  "rescore_memory_mb": os.environ.get("FACEDB_RESCORE_MEMORY_MB") or "default",
                                  "load_average_at_start": os.getloadavg(), "note": args.note, "runs": []}
    print(f"memory read bandwidth {bw:.1f} GB/s; load average {os.getloadavg()[0]:.1f}; "
          f"audit trail {'off' if args.no_audit else 'on, sync' if args.audit_sync else 'on'}")
    header = (f"{'N':>8} {'T':>3} {'kind':12} {'build s':>7} {'B/tmpl':>6} {'open s':>6} {'ready s':>7} "
              f"{'p50 ms (spread)':>18} {'p99 ms (spread)':>18} {'QPS(64)':>7} {'RSS MB':>7} {'rec@1':>6} "
              f"{'id@1':>6} {'same dec':>8} {'load':>5}")
    for n in args.sizes:
        for per in args.per:
            run_size(args, n, per, header, results, bw)


def run_size(args: argparse.Namespace, n: int, per: int, header: str, results: dict[str, object], bw: float) -> None:
    templates, truth, genuine, impostor = synth(n, args.dim, args.queries, isotropic=args.isotropic, per=per)
    people = templates.shape[0]
    same = float(np.mean(np.sum(templates[:, 0] * templates[:, 1], axis=1)))
    cross = np.sum(templates[:-1, 0] * templates[1:, 0], axis=1)
    print(f"data: same-identity cosine {same:.3f}, different-identity {cross.mean():.3f} +- {cross.std():.3f}")
    probes = np.concatenate([genuine, impostor])
    exact_top, exact_dec = exact_reference(templates, probes)
    # warm-up probes: stored templates of 100 other people (not timed, not scored)
    warmup = templates[np.random.default_rng(99).choice(people, 100, replace=False), 0]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp) / "db"
        t = time.perf_counter()
        with FaceDB.create(root, model_id="synthetic", dim=args.dim, threshold=THRESHOLD) as db:
            if args.no_audit:
                db.configure_audit(enabled=False)
            elif args.audit_sync:
                db.configure_audit(sync=True)
            step = max(1, 100_000 // per)
            for start in range(0, people, step):
                stop = min(people, start + step)
                db.add_templates_many([(f"id{i}", templates[i]) for i in range(start, stop)])
        import_s = time.perf_counter() - t
        if not args.peers:
            del templates  # the process's memory is then the database's
        print(f"\nN = {n:,} templates ({people:,} identities x {per}); store import {import_s:.1f} s")
        print(header)
        measured: dict[str, dict] = {}  # built kind -> its row: auto's kind is not built and measured twice
        for kind in args.kinds:
            if kind in measured:
                row = {**measured[kind], "kind": kind}
                results["runs"].append(row)  # type: ignore[union-attr]
                print(f"{n:>8} {per:>3} {kind:12} (the index auto built: the same figures)")
                continue
            options = {}
            if kind == "milvus":
                options = {"milvus_uri": args.milvus_uri or str(Path(tmp) / "milvus.db"),
                           "milvus_collection": f"facedb_bench_{n}"}
            with FaceDB.open(root) as db:
                t = time.perf_counter()
                db.reindex(kind, params=args.milvus_params if kind == "milvus" else None, index_options=options)
                build_s = time.perf_counter() - t
            if kind == "milvus" and options["milvus_uri"].endswith(".db"):
                from pymilvus import MilvusClient  # only to release it, as a new Lite process finds it

                MilvusClient(options["milvus_uri"]).release_collection(options["milvus_collection"])
            index_file = root / "index.faiss"
            size = index_file.stat().st_size if kind != "milvus" else 0  # Milvus keeps it server-side
            runs = [measure(root, probes, warmup) for _ in range(args.runs)]
            if kind == "milvus":
                server_rss = server_rss_mb(args.milvus_server)
            answers = runs[-1]["answers"]
            top1 = [a.candidates[0].name if a.candidates else None for a in answers]
            g = len(genuine)  # recall@1 on genuine probes: impostors have no meaningful nearest person
            rec1 = float(np.mean([a == b for a, b in zip(top1[:g], exact_top[:g])]))
            idc = float(np.mean([top1[i] == f"id{truth[i]}" for i in range(g)]))
            same_dec = float(np.mean([a == b for a, b in zip(decisions(answers), exact_dec)]))
            label = kind if kind == runs[0]["built"] else f"{kind}->{runs[0]['built']}"
            row = {"n": n, "per": per, "kind": kind, "built": runs[0]["built"], "params": runs[0]["params"],
                   "build_s": build_s, "file_bytes": size, "bytes_per_template": size / n, "import_s": import_s,
                   "rescore_from": runs[0]["rescore_from"], "rescore_bytes": runs[0]["rescore_bytes"],
                   "recall_at_1": rec1, "identity_correct_at_1": idc, "same_decision_as_exact": same_dec,
                   "decisions": len(probes), "runs": args.runs}
            for key in ("open_s", "ready_s", "p50_ms", "p99_ms", "batch64_qps", "rss_mb", "load_average"):
                row[key] = spread([r[key] for r in runs])
            if kind == "milvus":
                row["engine"] = "Milvus Lite (in process)" if not (args.milvus_uri or "").startswith(
                    ("http", "tcp", "unix")) else f"Milvus at {args.milvus_uri}"
                row["server_rss_mb"] = server_rss
            results["runs"].append(row)  # type: ignore[union-attr]
            measured[str(runs[0]["built"])] = row

            def ms(key: str, row: dict = row) -> str:
                v = row[key]
                return f"{v['median']:.3f} ({v['min']:.2f}-{v['max']:.2f})"

            print(f"{n:>8} {per:>3} {label:12} {build_s:7.1f} {size / n:6.0f} {row['open_s']['median']:6.2f} "
                  f"{row['ready_s']['median']:7.2f} {ms('p50_ms'):>18} {ms('p99_ms'):>18} "
                  f"{row['batch64_qps']['median']:7.0f} {row['rss_mb']['median']:7.0f} {rec1:6.3f} {idc:6.3f} "
                  f"{same_dec:8.4f} {row['load_average']['median']:5.1f}", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))
        if "milvus" in args.kinds and args.stand_in:
            stand_in_row(args, root, probes, warmup, exact_top, exact_dec, truth, n, per, genuine, results)
        if "milvus" in args.kinds:  # leave nothing in the engine: a last reindex drops the collection
            with FaceDB.open(root) as db:
                db.reindex("flat")
    if args.peers:
        pr = peers(templates, probes, args.peer_reps)
        pr["n"] = n
        results.setdefault("peers", []).append(pr)  # type: ignore[union-attr]
        print(f"{'':>8} peers per probe: deepface loop {pr['deepface_loop_ms']:.1f} ms, "
              f"face_recognition face_distance {pr['face_recognition_face_distance_ms']:.1f} ms")
    results["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


def stand_in_row(args: argparse.Namespace, root: Path, probes: np.ndarray, warmup: np.ndarray, exact_top: list,
                 exact_dec: list, truth: np.ndarray, n: int, per: int, genuine: np.ndarray,
                 results: dict[str, object]) -> None:
    """The milvus kind's queries while its server cannot answer: the store's exact stand-in, measured as a kind."""
    runs = [measure(root, probes, warmup, stand_in=True) for _ in range(args.runs)]
    answers = runs[-1]["answers"]
    top1 = [a.candidates[0].name if a.candidates else None for a in answers]
    g = len(genuine)
    row = {"n": n, "per": per, "kind": "milvus-stand-in", "built": "flat (store, exact)", "build_s": None,
           "recall_at_1": float(np.mean([a == b for a, b in zip(top1[:g], exact_top[:g])])),
           "identity_correct_at_1": float(np.mean([top1[i] == f"id{truth[i]}" for i in range(g)])),
           "same_decision_as_exact": float(np.mean([a == b for a, b in zip(decisions(answers), exact_dec)])),
           "decisions": len(probes), "runs": args.runs,
           "note": "milvus kind, server unreachable: queries answered by an exact search of the store's templates; "
                   "open = open + reading every template + the first answer"}
    for key in ("open_s", "ready_s", "p50_ms", "p99_ms", "batch64_qps", "rss_mb", "load_average"):
        row[key] = spread([r[key] for r in runs])
    results["runs"].append(row)  # type: ignore[union-attr]
    print(f"{n:>8} {per:>3} {'stand-in':12} {'':>7} {'':>6} {row['open_s']['median']:6.2f} "
          f"{row['ready_s']['median']:7.2f} {row['p50_ms']['median']:18.3f} {row['p99_ms']['median']:18.3f} "
          f"{row['batch64_qps']['median']:7.0f} {row['rss_mb']['median']:7.0f} {row['recall_at_1']:6.3f} "
          f"{row['identity_correct_at_1']:6.3f} {row['same_decision_as_exact']:8.4f} "
          f"{row['load_average']['median']:5.1f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
