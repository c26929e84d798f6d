"""Do an approximate index's decisions equal exact search's? Where they differ, why, and what the close-call
search (``facedb.gallery.engine.CLOSE_CALL``) changes, on a database built by ``profile_query.py --ready``.

    python scripts/exact_agreement.py --db /tmp/ready/m1p5d128 --extra 700 \
        --out bench-results/exact-agreement-1m5-128.json
    python scripts/exact_agreement.py --db /tmp/ready/m1p5d128 --extra 700 --codes 32 128   # also the PQ code sizes
    python scripts/exact_agreement.py --db /tmp/ready/m1p5d128 --wide-shortlist 128 256     # shorter close-call lists

The database is opened with facedb (nothing is written but the audit trail's table, untouched here: the engine
is called directly) and its index loaded with its re-scoring vectors. Probes: the ready probes beside the
database (200 genuine, 100 strangers) and ``--extra`` more strangers drawn the same way
(``bench_search.synth``'s recipe, another seed). Exact search is numpy over every template. Reported:

* decisions (the accepted person, or none) equal to exact search's, for the ready probes and for all, with the
  close-call search off (``CLOSE_CALL`` 0) and on (and, with ``--wide W ...``, reading W x nprobe lists), and
  the engine's CPU time per probe (``time.thread_time``; names and the audit trail are not included); with
  ``--wide-shortlist N ...`` also with the close call's shortlist (``engine.WIDE_SHORTLIST``) at N templates;
* for the probes whose exact best score is within 0.03 below the threshold or above it ("near-threshold"),
  the rank of the list holding their exact nearest template among the lists the index's coarse quantizer
  orders for them (how many lists an IVF search must read to see it);
* with ``--shortlist N ...``: how many distinct people the index's N first templates hold for the ready probes
  (``engine.shortlist``: enough for the 10 candidates of a k=5 query);
* with ``--codes M ...``: ivfpq indexes with M 4-bit sub-quantizers built on the same vectors and the same
  trained coarse quantizer: for the near-threshold probes, how often the exact nearest template is among the
  K best-coded at a given nprobe, and the FAISS search's CPU time (one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def strangers(n: int, dim: int, seed: int = 12345) -> np.ndarray:
    """``n`` unit probes of people not enrolled, drawn as ``bench_search.synth`` draws its impostors."""
    from bench_search import SAME_COS

    rng = np.random.default_rng(seed)
    scale = (np.arange(dim) + 1.0) ** -0.4
    scale = (scale / np.sqrt(np.sum(scale**2))).astype(np.float32)
    sigma = np.sqrt(1 / SAME_COS - 1)

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    centre = unit(rng.standard_normal((n, dim)).astype(np.float32) * scale)
    return unit(centre + sigma * rng.standard_normal((n, dim)).astype(np.float32) / np.float32(np.sqrt(dim)))


def exact_best(probes: np.ndarray, matrix: np.ndarray, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(row of the best template, its similarity) for each probe, by brute force."""
    rows, sims = [], []
    for s in range(0, len(probes), block):
        scores = probes[s:s + block] @ matrix.T
        best = scores.argmax(axis=1)
        rows.append(best)
        sims.append(scores[np.arange(len(best)), best])
    return np.concatenate(rows), np.concatenate(sims)


def list_of_rows(ivf: object, ids: np.ndarray) -> np.ndarray:
    """The inverted list holding each template (``ids`` sorted: the gallery's live ids)."""
    import faiss

    out = np.full(len(ids), -1, dtype=np.int32)
    invlists = ivf.invlists  # type: ignore[attr-defined]
    for lst in range(ivf.nlist):  # type: ignore[attr-defined]
        size = invlists.list_size(lst)
        if size:
            members = faiss.rev_swig_ptr(invlists.get_ids(lst), size).astype(np.int64)
            out[np.searchsorted(ids, members)] = lst
    return out


def decisions(gallery: object, probes: np.ndarray, threshold: float, close_call: float
              ) -> tuple[list[int | None], list[float], list[float]]:
    """The engine's decision (person id or None) for each probe asked alone, its CPU seconds and the best score
    it found."""
    from facedb.gallery import engine

    saved = engine.CLOSE_CALL
    engine.CLOSE_CALL = close_call
    try:
        out, cpu, found = [], [], []
        names = lambda pids: {int(p): (str(int(p)), None) for p in pids}  # noqa: E731
        for p in probes:
            t = time.thread_time()
            answer = engine.identify(gallery, p[None, :], 5, threshold, None, names)[0]  # type: ignore[arg-type]
            cpu.append(time.thread_time() - t)
            out.append(None if answer.identity is None else int(answer.identity))
            found.append(float("nan") if answer.similarity is None else float(answer.similarity))
        return out, cpu, found
    finally:
        engine.CLOSE_CALL = saved


def codes(gallery: object, probes: np.ndarray, want: np.ndarray, m: int) -> list[dict[str, float]]:
    """An ivfpq index with ``m`` sub-quantizers on the gallery's vectors and its trained quantizer: how often
    ``want`` (template ids) is among the K best-coded, per nprobe and K."""
    import faiss

    faiss.omp_set_num_threads(1)
    ivf = gallery.index._index  # type: ignore[attr-defined]
    ids = gallery.live_ids()  # type: ignore[attr-defined]
    vectors = gallery.vectors.get(ids)  # type: ignore[attr-defined]
    index = faiss.IndexIVFPQFastScan(ivf.quantizer, ivf.d, ivf.nlist, m, 4, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors[np.random.default_rng(0).choice(len(vectors), min(len(vectors), 65536), replace=False)])
    index.add_with_ids(vectors, ids)
    rows = []
    for nprobe in (16, 64, 256, 1024):
        index.nprobe = nprobe
        for k in (50, 200, 1000, 3000):
            t = time.thread_time()
            _, found = index.search(probes, k)
            cpu = (time.thread_time() - t) / len(probes)
            rows.append({"pq_m": m, "code_bytes": m // 2, "nprobe": nprobe, "k": k,
                         "nearest_found": float((found == want[:, None]).any(axis=1).mean()),
                         "search_cpu_us": cpu * 1e6})
            print(f"  pq_m {m} nprobe {nprobe} k {k}: nearest among them {rows[-1]['nearest_found']:.1%}, "
                  f"{rows[-1]['search_cpu_us']:.0f} us", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", type=Path, required=True)
    ap.add_argument("--extra", type=int, default=700, help="strangers added to the ready probes")
    ap.add_argument("--codes", type=int, nargs="*", default=[], help="PQ sub-quantizer counts to compare")
    ap.add_argument("--wide", type=int, nargs="*", default=[], help="close-call nprobe multiples to compare")
    ap.add_argument("--wide-shortlist", type=int, nargs="*", default=[],
                    help="close calls' shortlists (engine.WIDE_SHORTLIST) to compare")
    ap.add_argument("--shortlist", type=int, nargs="*", default=[],
                    help="templates asked of the index: how many distinct people they hold")
    ap.add_argument("--no-runs", action="store_true", help="skip the decision runs")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from facedb import FaceDB

    data = np.load(args.db.parent / f"{args.db.name}-probes.npz")
    db = FaceDB.open(args.db)
    db.load_index(wait=True)
    gallery = db.keeper.gallery
    threshold = float(db.settings().threshold)
    ready = data["probes"].astype(np.float32)
    probes = np.concatenate([ready, strangers(args.extra, ready.shape[1])]) if args.extra else ready
    ids, pids = gallery.live_ids(), gallery.person_ids()
    t = time.perf_counter()
    best_row, best_sim = exact_best(probes, gallery.vectors.get(ids))
    exact_s = time.perf_counter() - t
    exact = [int(pids[r]) if s >= threshold else None for r, s in zip(best_row, best_sim)]
    res: dict[str, object] = {
        "db": str(args.db), "templates": len(ids), "dim": int(ready.shape[1]), "threshold": threshold,
        "index": gallery.index.kind, "params": gallery.index.params, "probes": len(probes),
        "ready_probes": len(ready), "exact_accepts": int(sum(e is not None for e in exact)),
        "exact_search_s_per_probe": exact_s / len(probes), "load_average_at_start": os.getloadavg(), "runs": []}
    from facedb.gallery import engine

    modes = [("close-call search off", 0.0, None, None),
             ("close-call search on (default)", engine.CLOSE_CALL, None, None)]
    modes = [] if args.no_runs else modes
    modes += [(f"close-call search on, {w} x nprobe", engine.CLOSE_CALL, w, None)
              for w in args.wide if not args.no_runs]
    modes += [(f"close-call search on, shortlist {n}", engine.CLOSE_CALL, None, n)
              for n in args.wide_shortlist if not args.no_runs]
    nprobe = int(gallery.index.params.get("nprobe", 16))
    default_shortlist = engine.WIDE_SHORTLIST
    for label, close_call, wide, shortlist in modes:
        if wide is not None:
            gallery.index.params["nprobe_wide"] = wide * nprobe
        engine.WIDE_SHORTLIST = shortlist or default_shortlist
        got, cpu, found = decisions(gallery, probes, threshold, close_call)
        gallery.index.params.pop("nprobe_wide", None)
        engine.WIDE_SHORTLIST = default_shortlist
        same = np.array([g == e for g, e in zip(got, exact)])
        run = {"mode": label, "same_decision_ready": float(same[:len(ready)].mean()),
               "same_decision_all": float(same.mean()), "differ_ready": int((~same[:len(ready)]).sum()),
               "differ_all": int((~same).sum()), "engine_cpu_p50_us": float(np.median(cpu) * 1e6),
               "engine_cpu_p99_us": float(np.percentile(cpu, 99) * 1e6)}
        if close_call == 0.0:  # the first search's best scores: how many probes the close-call band takes
            gap = np.array(found) - threshold
            run["close_calls"] = int(((gap > -min(engine.CLOSE_CALL, engine.CLOSE_CALL_BELOW))
                                      & (gap < engine.CLOSE_CALL)).sum())
        if (~same).any():  # how far from the threshold the differing decisions' best found scores were
            off = np.array(found)[~same] - threshold
            run["differing_found_minus_threshold"] = [float(off.min()), float(off.max())]
        res["runs"].append(run)  # type: ignore[attr-defined]
        print(json.dumps(run), flush=True)
    near = best_sim >= threshold - 0.03
    if hasattr(gallery.index._index, "invlists"):
        ivf = gallery.index._index
        lists = list_of_rows(ivf, ids)
        _, order = ivf.quantizer.search(probes[near], ivf.nlist)
        ranks = np.array([int(np.flatnonzero(row == lst)[0]) for row, lst in zip(order, lists[best_row[near]])])
        res["near_threshold_probes"] = int(near.sum())
        res["nearest_list_rank_percentiles"] = dict(zip(["50", "90", "95", "99", "max"],
                                                        np.percentile(ranks, [50, 90, 95, 99, 100]).tolist()))
        print("near-threshold probes", int(near.sum()), "list rank of the nearest template",
              res["nearest_list_rank_percentiles"], flush=True)
    if args.shortlist:  # how many distinct people the index's first templates hold (engine.shortlist)
        res["shortlist_people"] = {}
        for kk in args.shortlist:
            _, found = gallery.index.search(ready, kk)
            people = np.array([len(np.unique(row[row >= 0])) for row in gallery.person_of(found)])
            res["shortlist_people"][str(kk)] = {  # type: ignore[index]
                "min": int(people.min()), "median": float(np.median(people)), "fewer_than_10": int((people < 10).sum())}
        print("distinct people among the first templates found (ready probes)", res["shortlist_people"], flush=True)
    if args.codes:
        res["codes"] = [row for m in args.codes for row in codes(gallery, probes[near], ids[best_row[near]], m)]
    res["load_average_at_end"] = os.getloadavg()
    db.close()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
