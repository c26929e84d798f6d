"""Reliability drills used by the tests and by ``scripts/soak_concurrency.py`` / ``scripts/crash_drill.py``.

* ``run_concurrency``: reader processes search continuously while a writer enrols and removes people; counts
  errors and any result naming a person whose removal had returned before that search started.
* ``run_crash_drill``: a writer process is killed with SIGKILL at random moments during add, remove, reindex
  and calibrate; after each kill the database must pass ``check`` and hold exactly what was acknowledged.

Processes are started with ``spawn`` (after torch or faiss are loaded, a forked child can hang). Vectors are
synthetic unit vectors: these drills test the database, not a model.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DIM = 32
MODEL = "soak-synthetic"


def person_vectors(name: str, n: int = 2) -> np.ndarray:
    """Deterministic unit vectors for a person name (the same in every process)."""
    seed = int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little") ^ len(name)
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reader(root: str, done: str, victims: list[str], out: str, seed: int, limit: float) -> None:
    """Search until the writer's report exists (the work is done), then once more; ``limit`` seconds is only a
    guard against a hung writer, never a budget the drill is judged by."""
    from ..db import FaceDB

    rng = np.random.default_rng(seed)
    records: list[tuple[float, list[str]]] = []
    errors: list[str] = []
    guard = time.monotonic() + limit
    with FaceDB.open(root) as db:
        last = False
        while not last:
            last = Path(done).exists() or time.monotonic() > guard
            name = victims[int(rng.integers(len(victims)))]
            probe = person_vectors(name)[0]
            started = time.time()
            try:
                ans = db.identify(probe, k=3)
                records.append((started, [c.name for c in ans.candidates]))
            except Exception as exc:  # every error counts; the drill must see 0
                errors.append(f"{type(exc).__name__}: {exc}")
    Path(out).write_text(json.dumps({"records": records, "errors": errors}))


def _writer(root: str, removals: int, victims: list[str], out: str, pause: float) -> None:
    """Enrol a new person and remove a victim, ``removals`` times (then write the report)."""
    from ..db import FaceDB

    removed: dict[str, float] = {}
    errors: list[str] = []
    added = 0
    with FaceDB.open(root) as db:
        for i in range(removals):
            try:
                db.add_templates(f"new-{i}", person_vectors(f"new-{i}"), create=True)
                added += 1
                db.remove_person(victims[i])
                removed[victims[i]] = time.time()  # after it returned
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            time.sleep(pause)  # leave the readers room to search between writes
    tmp = Path(out + ".tmp")
    tmp.write_text(json.dumps({"removed": removed, "errors": errors, "added": added}))
    tmp.replace(out)  # the readers stop when this appears, whole


def run_concurrency(removals: int = 60, readers: int = 4, people: int = 200, *, pause: float = 0.01,
                    limit: float = 1800.0) -> dict[str, Any]:
    """Run the concurrent readers + writer drill on a fresh database: the writer enrols and removes
    ``removals`` people (``people // 2`` at most) while ``readers`` processes search until it is done. The work
    is bounded, not the time: on a loaded machine it takes longer and checks the same. Returns the counts (and
    the seconds it took, for the scripts)."""
    from ..db import FaceDB

    removals = min(removals, people // 2)
    ctx = mp.get_context("spawn")
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        root = str(Path(tmp) / "db")
        names = [f"person-{i}" for i in range(people)]
        with FaceDB.create(root, model_id=MODEL, dim=DIM, threshold=0.5) as db:
            db.add_templates_many([(n, person_vectors(n)) for n in names])
            db.save_index()
        victims = names[: people // 2]
        wout = str(Path(tmp) / "writer.json")
        procs = []
        outs = []
        for r in range(readers):
            out = str(Path(tmp) / f"reader-{r}.json")
            outs.append(out)
            procs.append(ctx.Process(target=_reader, args=(root, wout, victims, out, r, limit)))
        procs.append(ctx.Process(target=_writer, args=(root, removals, victims, wout, pause)))
        for p in procs:
            p.start()
        for p in procs:
            p.join(limit + 120)
        crashed = [p.exitcode for p in procs if p.exitcode != 0]
        w = json.loads(Path(wout).read_text()) if Path(wout).exists() else {"removed": {}, "errors": ["missing"]}
        searches = 0
        stale = 0
        errors = list(w["errors"])
        for out in outs:
            if not Path(out).exists():
                errors.append("reader produced no report")
                continue
            r = json.loads(Path(out).read_text())
            errors += r["errors"]
            searches += len(r["records"])
            for started, names_found in r["records"]:
                stale += sum(1 for n in names_found if n in w["removed"] and w["removed"][n] < started)
        with FaceDB.open(root) as db:
            ok = db.check().ok
    return {"seconds": round(time.monotonic() - began, 1), "readers": readers, "searches": searches,
            "errors": len(errors), "error_samples": errors[:3], "removed_people": len(w["removed"]),
            "added_people": w.get("added", 0), "results_naming_removed_people": stale,
            "crashed_processes": len(crashed), "check_ok": ok}


# ------------------------------------------------------------------------------------------ crash drill
def crash_writer(root: str, journal: str, seed: int) -> None:
    """Loop forever doing writes; journal 'begin <op> <arg>' before and 'done <op> <arg>' after each (fsynced)."""
    from ..db import FaceDB

    rng = np.random.default_rng(seed)

    def note(log: Any, line: str) -> None:
        log.write(line + "\n")
        log.flush()
        os.fsync(log.fileno())

    with FaceDB.open(root) as db, open(journal, "a") as log:
        i = 0
        while True:
            op = ("add", "add", "remove", "reindex", "calibrate")[int(rng.integers(5))]
            if op == "add":
                arg = f"s{seed}-{i}"
            elif op == "remove":
                alive = [p.name for p in db.people()]
                if not alive:
                    continue
                arg = alive[int(rng.integers(len(alive)))]
            elif op == "calibrate":
                arg = str(round(float(rng.uniform(0.3, 0.9)), 4))
            else:
                arg = "-"
            note(log, f"begin {op} {arg}")
            if op == "add":
                db.add_templates(arg, person_vectors(arg, 3), create=True)
            elif op == "remove":
                db.remove_person(arg)
            elif op == "reindex":
                db.rebuild_index()
            else:
                db.set_threshold(float(arg), "drill")
            note(log, f"done {op} {arg}")
            i += 1


def _expected(journal: Path) -> tuple[set[str], set[str], set[str]]:
    """(acknowledged present, acknowledged removed, allowed thresholds).

    An op that began but never finished (killed) may or may not have committed: its person is neither
    required present nor required absent, and its threshold is allowed."""
    present: set[str] = set()
    gone: set[str] = set()
    thresholds = {"0.5"}
    pending = None

    def unresolved(op: str, arg: str) -> None:
        if op == "calibrate":
            thresholds.add(arg)
        elif op in ("add", "remove"):
            present.discard(arg)
            gone.discard(arg)

    for line in journal.read_text().splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue  # a line cut by the kill
        kind, op, arg = parts
        if kind == "begin":
            if pending is not None:
                unresolved(*pending)
            pending = (op, arg)
            continue
        pending = None
        if op == "add":
            present.add(arg)
            gone.discard(arg)
        elif op == "remove":
            present.discard(arg)
            gone.add(arg)
        elif op == "calibrate":
            thresholds = {arg}
    if pending is not None:
        unresolved(*pending)
    return present, gone, thresholds


def _acknowledged(journal: Path) -> int:
    """How many operations the crash writer's journal says were acknowledged."""
    return sum(1 for ln in journal.read_text().splitlines() if ln.startswith("done "))


def run_crash_drill(kills: int = 200, seed: int = 0, jitter: float = 0.06) -> dict[str, Any]:
    """Kill a writer ``kills`` times at random moments of its work (after 1-12 more acknowledged operations,
    then up to ``jitter`` seconds into the next); verify the database after each kill."""
    from ..db import FaceDB

    rng = np.random.default_rng(seed)
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = str(Path(tmp) / "db")
        journal = Path(tmp) / "journal.txt"
        journal.touch()
        FaceDB.create(root, model_id=MODEL, dim=DIM, threshold=0.5).close()
        for k in range(kills):
            proc = subprocess.Popen(
                [sys.executable, "-c", f"from facedb.testing.soak import crash_writer; crash_writer({root!r}, "
                 f"{str(journal)!r}, {k})"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            # The kill lands after a random amount of the writer's *work* (1-12 more acknowledged operations,
            # then a random instant inside the next one), not after a time: a loaded machine slows the writer's
            # start and its work alike, and the drill still checks kills in the middle of operations.
            target = _acknowledged(journal) + int(rng.integers(1, 13))
            guard = time.monotonic() + 600  # only a hung writer reaches this
            while _acknowledged(journal) < target and proc.poll() is None and time.monotonic() < guard:
                time.sleep(0.01)
            time.sleep(float(rng.uniform(0.0, jitter)))
            if proc.poll() is not None:
                failures.append(f"kill {k}: writer exited by itself: {proc.stderr.read().decode()[-300:]}")
                continue
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stderr.close()
            present, gone, thresholds = _expected(journal)
            with FaceDB.open(root) as db:
                report = db.check()
                if not report.ok:
                    failures.append(f"kill {k}: check failed: {report.problems}")
                names = {p.name for p in db.people()}
                missing = present - names
                if missing:
                    failures.append(f"kill {k}: acknowledged adds missing: {sorted(missing)[:3]}")
                back = gone & names
                if back:
                    failures.append(f"kill {k}: acknowledged removals present: {sorted(back)[:3]}")
                for p in names:
                    if db.person(p).templates != 3:  # all or nothing, in flight or not
                        failures.append(f"kill {k}: {p} has {db.person(p).templates} templates, not 3")
                if repr(db.threshold) not in thresholds and str(db.threshold) not in thresholds:
                    failures.append(f"kill {k}: threshold {db.threshold} is none of {sorted(thresholds)}")
                for v in gone:
                    ans = db.identify(person_vectors(v, 3)[0], k=5)
                    if any(c.name == v for c in ans.candidates):
                        failures.append(f"kill {k}: removed {v} still found")
        with FaceDB.open(root) as db:
            people = len(db.people())
        acknowledged = _acknowledged(journal)
    return {"kills": kills, "failures": len(failures), "failure_samples": failures[:5], "people_at_end": people,
            "operations_acknowledged": acknowledged}


# ----------------------------------------------------------------------------- visitors enrol drill
VISITOR = "Visitor"


def visitor_enroll_writer(root: str, journal: str, group: str) -> None:
    """Enrol one visitor group as ``VISITOR``, journalling 'begin <time>' and 'done <time>' (fsynced)."""
    from ..db import FaceDB

    with FaceDB.open(root) as db, open(journal, "a") as log:
        log.write(f"begin {time.time()}\n")
        log.flush()
        os.fsync(log.fileno())
        db.enroll_visitors(group, VISITOR)
        log.write(f"done {time.time()}\n")
        log.flush()
        os.fsync(log.fileno())


def run_visitor_enroll_drill(kills: int = 20, seed: int = 0, faces: int = 3000) -> dict[str, Any]:
    """SIGKILL a process enrolling a visitor group of ``faces`` unknown faces, ``kills`` times, each on a fresh
    copy of the same database, at delays spread from the moment it starts the enrolment to past the time an
    unkilled run takes. After each kill the database must pass ``check`` and be in the old state (no such person,
    every face still kept) or the new one (the person with every face as a template, none kept): nothing
    between, and the new one whenever the writer had journalled 'done'."""
    import shutil

    from ..db import FaceDB

    rng = np.random.default_rng(seed)
    failures: list[str] = []
    outcomes = {"old": 0, "new": 0}
    with tempfile.TemporaryDirectory() as tmp:
        template = str(Path(tmp) / "template")
        with FaceDB.create(template, model_id=MODEL, dim=DIM, threshold=0.5) as db:
            db.add_templates("staff", person_vectors("staff"), create=True)
            db.configure_visitors(enabled=True)
            centre = person_vectors("visitor-centre", 1)[0]
            x = centre + 0.05 * rng.standard_normal((faces, DIM)).astype(np.float32)
            db.identify((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
            groups = db.visitors()
            assert len(groups) == 1 and groups[0].faces == faces, groups
            group = groups[0].id

        def attempt(k: int, delay: float | None) -> tuple[Path, bool, float]:
            root = Path(tmp) / f"db-{k}"
            shutil.copytree(template, root)
            journal = Path(tmp) / f"journal-{k}.txt"
            journal.touch()
            proc = subprocess.Popen(
                [sys.executable, "-c", f"from facedb.testing.soak import visitor_enroll_writer; "
                 f"visitor_enroll_writer({str(root)!r}, {str(journal)!r}, {group!r})"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            while proc.poll() is None and not journal.read_text().startswith("begin"):
                time.sleep(0.005)
            if delay is not None:
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            err = proc.stderr.read().decode()
            proc.stderr.close()
            if delay is None and proc.returncode != 0:
                failures.append(f"unkilled writer failed: {err[-300:]}")
            lines = journal.read_text().split()
            took = float(lines[3]) - float(lines[1]) if len(lines) >= 4 else 0.0
            return root, "done" in lines, took

        _, _, took = attempt(-1, None)  # how long an enrolment takes here, unkilled
        for k in range(kills):
            delay = 2.5 * took * (k + float(rng.uniform())) / kills  # spread over the enrolment and past it
            root, done, _ = attempt(k, delay)
            with FaceDB.open(root) as db:
                report = db.check()
                if not report.ok:
                    failures.append(f"kill {k}: check failed: {report.problems}")
                kept = len(db.store.unassigned(30)[0])
                names = {p.name for p in db.people()}
                if VISITOR not in names and kept == faces and not done:
                    outcomes["old"] += 1
                elif VISITOR in names and db.person(VISITOR).templates == faces and kept == 0:
                    outcomes["new"] += 1
                    if db.identify(centre, k=1).identity != VISITOR:
                        failures.append(f"kill {k}: enrolled visitor not recognised")
                else:
                    failures.append(f"kill {k}: half done or lost: person {VISITOR in names}, kept {kept}, "
                                    f"journal done {done}")
    return {"kills": kills, "failures": len(failures), "failure_samples": failures[:5],
            "old_state": outcomes["old"], "new_state": outcomes["new"], "enrol_seconds": round(took, 3)}
