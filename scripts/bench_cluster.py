"""Clustering faces by identity: quality on all of LFW, and time and memory at scale.

    python scripts/bench_cluster.py                       # LFW (dlib-resnet, flip) + 13k / 100k / 1M synthetic
    python scripts/bench_cluster.py --sizes 13233 100000  # skip the 1M run
    python scripts/bench_cluster.py --no-lfw --sizes 1000000
    python scripts/bench_cluster.py --cached-only         # LFW photos already in the evaluation cache only

**LFW** (13,233 photos of 5,749 people, deep-funneled; ``$FACEDB_TEST_DATA/lfw_deepfunneled``): one face per
photo (the one nearest the centre, as facedb's evaluation does), embedded with dlib-resnet and flip
augmentation (what a new database uses) through the evaluation cache (``facedb.evaluate.embed_cached``: photos
not yet cached are embedded, ~0.15 s each). Photos where no face was found are left out (stated). Every rule of
``facedb.operations.cluster`` at its default threshold (derived from dlib-resnet's 0.929), and scikit-learn's DBSCAN
(cosine, eps = 1 - threshold, min_samples 2) and HDBSCAN (min_cluster_size 2) as baselines, each on the same
vectors: pairwise precision / recall / F, BCubed precision / recall / F, NMI, clusters, unclustered faces, time.
Singletons (unclustered, DBSCAN's noise) count as clusters of one. A threshold sweep is run on LFW's
``peopleDevTrain.txt`` people and reported on the ``peopleDevTest.txt`` people (disjoint), so the defaults
are not chosen on the data they are judged on.

**Scale**: synthetic face-like vectors (``scripts/bench_search.py``'s generator: identity centres over ~110
dominant directions, isotropic within-identity noise, same-identity cosine 0.70, different 0.00 +- 0.08; 5
faces per identity), at 128-d (dlib's size; ``--dim``), threshold 0.5. Each size runs in a fresh process (the
graph once, then each rule on it): wall time of the k-NN graph and of the grouping, the process's CPU time (user
+ system: the figure that other work on the machine does not inflate), peak resident memory (and the vectors'
own size), and the quality against the known identities. Exact graph up to 50,000 faces, IVF above.

Prints tables and writes ``bench-results/cluster.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from facedb.evaluate import EmbeddingCache, labelled_folder, read_people
from facedb.evaluate.clustering import clustering_report
from facedb.faces.pipeline import source_sha256
from facedb.operations import cluster as clustering

HERE = Path(__file__).resolve().parent
DB_THRESHOLD = 0.929  # dlib-resnet with flip: FAR 1e-3 on LFW peopleDevTrain (docs/thresholds-and-accuracy.md)
SYNTH_THRESHOLD = 0.5


def data_root() -> Path:
    return Path(os.environ.get("FACEDB_TEST_DATA", HERE.parents[1] / "shared" / "facedata"))


# ------------------------------------------------------------------------------------------------------ LFW
def lfw_vectors(cached_only: bool) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
    folder = data_root() / "lfw_deepfunneled"
    paths, labels = labelled_folder(folder)
    if cached_only:
        cache = EmbeddingCache("dlib-resnet-flip", 128)
        rows, keep = [], []
        for i, p in enumerate(paths):
            hit = cache.get(source_sha256(p) or "")
            if hit is not None:
                rows.append(hit[0])
                keep.append(i)
        x = np.array(rows, dtype=np.float32).reshape(-1, 128)
        found = np.isfinite(x).all(axis=1)
        y = np.array(labels)[keep]
    else:
        from facedb.evaluate import embed_cached
        from facedb.faces.pipeline import get_pipeline

        emb = embed_cached(paths, get_pipeline("dlib-resnet"), flip=True)
        x, found, y = emb.vectors, emb.found, np.array(labels)
    info = {"photos": len(paths), "embedded": int(len(x)), "no_face": int((~found).sum()),
            "people": len(set(labels)), "cached_only": cached_only}
    return x[found], y[found], info


def baselines(x: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    from sklearn.cluster import DBSCAN, HDBSCAN

    out = {}
    t = time.perf_counter()
    out["sklearn DBSCAN"] = (DBSCAN(eps=1 - threshold, min_samples=2, metric="cosine", algorithm="brute",
                                    n_jobs=1).fit_predict(x), time.perf_counter() - t)
    t = time.perf_counter()
    out["sklearn HDBSCAN"] = (HDBSCAN(min_cluster_size=2, copy=True).fit_predict(x), time.perf_counter() - t)
    return out


def lfw_part(args: argparse.Namespace) -> dict[str, object]:
    x, y, info = lfw_vectors(args.cached_only)
    print(f"LFW: {len(x)} faces of {len(set(y))} people ({info})", flush=True)
    rows = []
    for rule in clustering.RULES:
        thr = clustering.default_threshold(DB_THRESHOLD, rule)
        t = time.perf_counter()
        labels = clustering.cluster(x, thr, rule=rule).labels
        rows.append({"method": f"facedb {rule}", "threshold": thr, "seconds": time.perf_counter() - t,
                     **clustering_report(y, labels)})
    if not args.no_baselines:
        for name, (labels, secs) in baselines(x, DB_THRESHOLD).items():
            rows.append({"method": name, "threshold": DB_THRESHOLD if "DBSCAN" in name and "H" not in name else None,
                         "seconds": secs, **clustering_report(y, labels)})
    table(rows, "LFW, all photos (dlib-resnet, flip)")

    # sweep on DevTrain people, judged on DevTest people
    proto = data_root() / "lfw_protocol"
    train, test = read_people(proto / "peopleDevTrain.txt"), read_people(proto / "peopleDevTest.txt")
    sweep = []
    for rule in [*clustering.RULES, "DBSCAN"]:
        for thr in np.round(np.arange(0.90, 0.9701, 0.005), 3):
            row = {"method": rule, "threshold": float(thr)}
            for split, people in (("train", train), ("test", test)):
                mask = np.isin(y, list(people))
                if rule == "DBSCAN":
                    if args.no_baselines:
                        continue
                    from sklearn.cluster import DBSCAN

                    labels = DBSCAN(eps=1 - thr, min_samples=2, metric="cosine", algorithm="brute").fit_predict(
                        x[mask])
                else:
                    labels = clustering.cluster(x[mask], float(thr), rule=rule).labels
                m = clustering_report(y[mask], labels)
                row.update({f"{split}_pairwise_f": m["pairwise_f"], f"{split}_bcubed_f": m["bcubed_f"],
                            f"{split}_pairwise_precision": m["pairwise_precision"]})
            if len(row) > 2:
                sweep.append(row)
    best = {}
    for rule in {r["method"] for r in sweep}:
        cand = [r for r in sweep if r["method"] == rule]
        b = max(cand, key=lambda r: r["train_pairwise_f"] + r["train_bcubed_f"])
        best[rule] = b
        default = clustering.default_threshold(DB_THRESHOLD, rule) if rule in clustering.RULES else DB_THRESHOLD
        print(f"  sweep {rule:17s} best on DevTrain at {b['threshold']:.3f} (default {default:.3f}): DevTest "
              f"pairwise F {b['test_pairwise_f']:.3f}, BCubed F {b['test_bcubed_f']:.3f}, pairwise precision "
              f"{b['test_pairwise_precision']:.3f}")
    return {"info": info, "rows": rows, "sweep": sweep, "best_on_devtrain": best}


def table(rows: list[dict[str, object]], title: str) -> None:
    print(f"\n{title}")
    print(f"{'method':26s} {'thr':>6s} {'pw P':>6s} {'pw R':>6s} {'pw F':>6s} {'B3 P':>6s} {'B3 R':>6s} {'B3 F':>6s} "
          f"{'NMI':>6s} {'clusters':>8s} {'unclust':>8s} {'s':>7s}")
    for r in rows:
        thr = "-" if r.get("threshold") is None else f"{r['threshold']:.3f}"
        print(f"{r['method']:26s} {thr:>6s} {r['pairwise_precision']:6.3f} {r['pairwise_recall']:6.3f} "
              f"{r['pairwise_f']:6.3f} {r['bcubed_precision']:6.3f} {r['bcubed_recall']:6.3f} {r['bcubed_f']:6.3f} "
              f"{r['nmi']:6.3f} {int(r['clusters']):8d} {int(r['unclustered']):8d} {r['seconds']:7.1f}", flush=True)


# ---------------------------------------------------------------------------------------------------- scale
def synthetic(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    sys.path.insert(0, str(HERE))
    from bench_search import synth

    templates, *_ = synth(n, dim, 2, seed=seed)
    people, per, _ = templates.shape
    return templates.reshape(-1, dim), np.repeat(np.arange(people), per)


def one(n: int, rules: list[str], dim: int, out: Path) -> None:
    """Child process: the k-NN graph of ``n`` synthetic faces once, then each rule on it; figures to ``out``.
    Peak memory is the process's so far: each rule's figure includes the graph and the rules before it."""
    x, truth = synthetic(n, dim)
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    c0, t0 = cpu(), time.perf_counter()
    graph, exact = clustering.knn_graph(x, clustering.DEFAULT_K, SYNTH_THRESHOLD)
    graph_s, graph_cpu = time.perf_counter() - t0, cpu() - c0
    rows = []
    for rule in rules:
        c1, t1 = cpu(), time.perf_counter()
        if rule == "components":
            groups = clustering.components(graph)
        elif rule == "chinese-whispers":
            groups = clustering.chinese_whispers(graph)
        else:
            groups = clustering.average_linkage(x, graph, SYNTH_THRESHOLD)
        labels, _ = clustering.finish(x, groups, 2)
        group_s, group_cpu = time.perf_counter() - t1, cpu() - c1
        rows.append({
            "n": int(len(x)), "dim": dim, "rule": rule, "exact_graph": exact, "edges": len(graph),
            "graph_s": graph_s, "group_s": group_s, "total_s": graph_s + group_s, "cpu_s": graph_cpu + group_cpu,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_data_mib": rss_data, "vectors_mib": x.nbytes / 2**20, **clustering_report(truth, labels)})
        out.write_text(json.dumps(rows))


def scale_part(args: argparse.Namespace) -> list[dict[str, object]]:
    rows = []
    print(f"\nScale: synthetic face-like {args.dim}-d, threshold {SYNTH_THRESHOLD}, k {clustering.DEFAULT_K}")
    print(f"{'n':>9s} {'rule':17s} {'graph':>6s} {'graph s':>8s} {'group s':>8s} {'total s':>8s} {'CPU s':>7s} "
          f"{'peak MiB':>9s} {'data MiB':>9s} {'pw F':>6s} {'B3 F':>6s}", flush=True)
    for n in args.sizes:
        out = Path(args.out).with_suffix(f".{n}.tmp.json")
        cmd = [sys.executable, __file__, "--one", str(n), ",".join(args.rules), "--dim", str(args.dim), "--out",
               str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{n:9d} failed: {proc.stderr[-500:]}", flush=True)
        got = json.loads(out.read_text()) if out.exists() else []
        out.unlink(missing_ok=True)
        for r in got:
            rows.append(r)
            print(f"{r['n']:9d} {r['rule']:17s} {'exact' if r['exact_graph'] else 'ivf':>6s} {r['graph_s']:8.1f} "
                  f"{r['group_s']:8.1f} {r['total_s']:8.1f} {r['cpu_s']:7.1f} {r['peak_rss_mib']:9.0f} "
                  f"{r['vectors_mib']:9.0f} {r['pairwise_f']:6.3f} {r['bcubed_f']:6.3f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[13_233, 100_000, 1_000_000])
    ap.add_argument("--rules", nargs="+", default=list(clustering.RULES))
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--no-lfw", action="store_true")
    ap.add_argument("--no-baselines", action="store_true", help="skip scikit-learn's DBSCAN / HDBSCAN")
    ap.add_argument("--cached-only", action="store_true", help="LFW: only photos already in the embedding cache")
    ap.add_argument("--out", type=Path, default=Path("bench-results/cluster.json"))
    ap.add_argument("--one", nargs=2, metavar=("N", "RULE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(int(args.one[0]), args.one[1].split(","), args.dim, args.out)
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, object] = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if not args.no_lfw:
        result["lfw"] = lfw_part(args)
        args.out.write_text(json.dumps(result, indent=1))
    if args.sizes:
        result["scale"] = scale_part(args)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
