"""Search at scale: every index kind at N templates, beside the peers' own search approaches.

Data (stated, synthetic, face-like): P = N/5 identities x 5 templates, 512-d unit vectors. Face embeddings are
not isotropic: identities spread over ~100 dominant directions, so two different people have cosine ~0 with a
spread of ~0.1 (not 1/sqrt(512) = 0.044). Identity centres are drawn from a Gaussian whose variances fall as
(i + 1)^-0.8 over the 512 axes (effective dimension ~110, different-identity cosine 0.00 +- 0.10); templates and
genuine probes are the centre plus isotropic noise (pose, light, age: spread over all directions), scaled so
two samples of one identity have cosine ~0.70 (FaceNet-like statistics; the script prints the measured ones).
`--isotropic` draws the centres isotropically too (harder for approximate indexes: no structure to cluster).
Probes: --queries genuine probes (fresh samples of enrolled identities) and half as many impostors (fresh
identities). Decisions use threshold 0.5. Each kind is opened from its file, answers one probe (the open
time), then 100 untimed warm-up searches (stored templates of other people), then the timed probes.

For each kind: build time, index file size and bytes per template, open time (open + first answer, no
rebuild), single-probe p50/p99, batch QPS (64 probes a call), recall@1 against exact search (same top person),
identity-correct@1 (genuine probes), and the share of accept/reject decisions identical to exact search.
Peers on the same data: deepface's ``find`` (a Python loop computing a cosine distance per stored
representation) and face_recognition's ``face_distance`` (numpy over a Python list of encodings).

    python scripts/bench_search.py --sizes 10000 100000 1000000

Milvus (``--index milvus``, README "Scale-out"): the same protocol through facedb's milvus kind. By default it
runs against **Milvus Lite** (in this process, a .db directory in the work directory): a test double for the
client protocol, **not a measure of a Milvus server or cluster**, whose searches run in its own processes
(and machines) behind gRPC. To measure a server, point it there:

    FACEDB_MILVUS_TOKEN=root:Milvus python scripts/bench_search.py --index ivf ivfpq milvus \
        --sizes 10000 100000 --milvus-uri http://milvus-host:19530 --no-peers

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--kinds", "--index", nargs="+", default=["flat", "flat16", "hnsw", "ivf", "ivfpq"],
                    help="index kinds to measure (flat always runs first, as the reference); milvus included")
    ap.add_argument("--milvus-uri", default=None,
                    help="milvus: a server (http://host:19530; token from FACEDB_MILVUS_TOKEN) or a .db path for "
                         "Milvus Lite (default: Lite in the work directory)")
    ap.add_argument("--no-peers", action="store_true", help="skip the peers' search loops")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--peer-reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench-results/search.json"))
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--isotropic", action="store_true", help="isotropic synthetic data (see above)")
    args = ap.parse_args()
    args.kinds = ["flat", *[k for k in args.kinds if k != "flat"]]
    bw = memory_bandwidth_gbs()
    results: dict[str, object] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                  "memory_read_gbs": bw, "isotropic": args.isotropic, "runs": []}
    print(f"memory read bandwidth {bw:.1f} GB/s")
    header = (f"{'N':>8} {'kind':7} {'build s':>8} {'B/tmpl':>7} {'open s':>7} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'QPS(64)':>8} {'rec@1':>6} {'id@1':>6} {'same dec':>8}")
    for n in args.sizes:
        templates, truth, genuine, impostor = synth(n, args.dim, args.queries, isotropic=args.isotropic)
        people = templates.shape[0]
        same = float(np.mean(np.sum(templates[:, 0] * templates[:, 1], axis=1)))
        cross = np.sum(templates[:-1, 0] * templates[1:, 0], axis=1)
        print(f"data: same-identity cosine {same:.3f}, different-identity {cross.mean():.3f} +- {cross.std():.3f}")
        probes = np.concatenate([genuine, impostor])
        # warm-up probes: stored templates of 100 other people (not timed, not scored)
        warmup = templates[np.random.default_rng(99).choice(people, 100, replace=False), 0]
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            root = Path(tmp) / "db"
            t = time.perf_counter()
            with FaceDB.create(root, model_id="synthetic", dim=args.dim, threshold=THRESHOLD) as db:
                db.configure_audit(enabled=False)  # a benchmark's probes are not decisions to keep
                for start in range(0, people, 20_000):
                    stop = min(people, start + 20_000)
                    db.add_templates_many([(f"id{i}", templates[i]) for i in range(start, stop)])
            import_s = time.perf_counter() - t
            exact = None
            print(f"\nN = {n:,} templates ({people:,} identities); store import {import_s:.1f} s")
            print(header)
            for kind in args.kinds:
                options = {}
                if kind == "milvus":
                    options = {"milvus_uri": args.milvus_uri or str(Path(tmp) / "milvus.db"),
                               "milvus_collection": f"facedb_bench_{n}"}
                with FaceDB.open(root) as db:
                    t = time.perf_counter()
                    db.reindex(kind, index_options=options)
                    build_s = time.perf_counter() - t
                if kind == "milvus" and options["milvus_uri"].endswith(".db"):
                    from pymilvus import MilvusClient  # only to release it, as a new Lite process finds it

                    MilvusClient(options["milvus_uri"]).release_collection(options["milvus_collection"])
                index_file = root / "index.faiss"
                size = index_file.stat().st_size if kind != "milvus" else 0  # Milvus keeps it server-side
                t = time.perf_counter()
                db = FaceDB.open(root)
                db.identify(probes[0], k=5)
                open_s = time.perf_counter() - t
                assert db.index_state().from_file, "opened without a rebuild"
                for w in warmup:  # steady state, as a running service would be: caches filled, code paths hot
                    db.identify(w, k=5)
                single = timed(lambda i, db=db, probes=probes: db.identify(probes[i], k=5), len(probes))
                t = time.perf_counter()
                answers = []
                for s in range(0, len(probes), 64):
                    answers += db.identify(probes[s:s + 64], k=5)
                qps = len(probes) / (time.perf_counter() - t)
                db.close()
                top1 = [a.candidates[0].name if a.candidates else None for a in answers]
                if exact is None:
                    exact = {"top1": top1, "dec": decisions(answers)}
                g = len(genuine)  # recall@1 on genuine probes: impostors have no meaningful nearest person
                rec1 = float(np.mean([a == b for a, b in zip(top1[:g], exact["top1"][:g])]))
                idc = float(np.mean([top1[i] == f"id{truth[i]}" for i in range(len(genuine))]))
                same = float(np.mean([a == b for a, b in zip(decisions(answers), exact["dec"])]))
                p50, p99 = np.percentile(np.array(single) * 1e3, [50, 99])
                if kind == "milvus":
                    row_engine = "Milvus Lite (in process)" if not (args.milvus_uri or "").startswith(
                        ("http", "tcp", "unix")) else f"Milvus at {args.milvus_uri}"
                row = {"n": n, "kind": kind, "build_s": build_s, "file_bytes": size, "bytes_per_template": size / n,
                       "open_s": open_s, "p50_ms": p50, "p99_ms": p99, "batch64_qps": qps, "recall_at_1": rec1,
                       "identity_correct_at_1": idc, "same_decision_as_exact": same, "import_s": import_s}
                if kind == "flat":
                    floor_ms = n * args.dim * 4 / (bw * 1e9) * 1e3
                    row["bandwidth_floor_ms"] = floor_ms
                    row["p50_over_floor"] = p50 / floor_ms
                    row["gbs_reached"] = n * args.dim * 4 / (p50 / 1e3) / 1e9
                if kind == "milvus":
                    row["engine"] = row_engine
                results["runs"].append(row)  # type: ignore[union-attr]
                print(f"{n:>8} {kind:7} {build_s:8.1f} {size / n:7.0f} {open_s:7.2f} {p50:7.2f} {p99:7.2f} "
                      f"{qps:8.0f} {rec1:6.3f} {idc:6.3f} {same:8.4f}")
                if kind == "flat":
                    print(f"{'':>8} flat p50 is {row['p50_over_floor']:.2f}x the memory-bandwidth floor "
                          f"({row['bandwidth_floor_ms']:.2f} ms; {row['gbs_reached']:.1f} GB/s reached)")
            if "milvus" in args.kinds:  # leave nothing in the engine: a last reindex drops the collection
                with FaceDB.open(root) as db:
                    db.reindex("flat")
        if args.no_peers:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))
            continue
        pr = peers(templates, probes, args.peer_reps)
        pr["n"] = n
        results.setdefault("peers", []).append(pr)  # type: ignore[union-attr]
        print(f"{'':>8} peers per probe: deepface loop {pr['deepface_loop_ms']:.1f} ms, "
              f"face_recognition face_distance {pr['face_recognition_face_distance_ms']:.1f} ms")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
