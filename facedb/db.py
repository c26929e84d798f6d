"""``FaceDB``: the one object users hold. It keeps the SQLite store (truth) and the vector index (derived
cache) in step, and answers identify / verify.

A database is a directory (created 0700) holding ``facedb.sqlite3`` and ``index.faiss`` (both 0600).

Consistency rule: before answering, a FaceDB compares its index's generation with the store's and catches
up (replaying the store's change log, or reloading / rebuilding the index). So a search that starts after
an ``add``/``remove`` has returned - in this process or any other - sees its effect.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from . import engine
from .engine import Gallery
from .errors import (
    DatabaseError,
    DatabaseExistsError,
    FaceDBError,
    InvalidInputError,
    ModelMismatchError,
    NoFaceError,
)
from .index import TOMBSTONE_LIMIT, auto_kind, check_kind, load_index, new_index, save_index
from .records import CheckReport, EnrollReport, FaceMatch, Identification, Person, Skipped, Verification
from .scores import as_unit_rows, to_blob
from .store import SCHEMA_VERSION, Store

if TYPE_CHECKING:
    from .images import PhotoSource
    from .pipeline import FacePipeline, Prepared

STORE_FILE = "facedb.sqlite3"
INDEX_FILE = "index.faiss"

#: Save the index file when it lags the store by this many generations (or has no valid file). Between
#: saves, opening levels the file with the store by a diff of template ids, adding only what is new.
SAVE_EVERY = 32

#: How many stored templates ``check`` searches for to prove the index finds them.
CHECK_PROBES = 64


class FaceDB:
    """An identity database. Open with :meth:`create` or :meth:`open`, preferably as a context manager.

    Thread-safe: one lock serialises calls on the same object. For parallelism use one FaceDB per thread or
    process (SQLite WAL lets many readers run beside one writer).
    """

    def __init__(self, root: Path, store: Store, readonly: bool = False, weights: Path | None = None) -> None:
        self.root = root
        self._weights = weights
        self.store = store
        self.readonly = readonly
        self._gallery: Gallery | None = None
        self._from_file = False  # the gallery came from a valid index file (so need not be saved at once)
        self._lock = threading.RLock()

    # ---------------------------------------------------------------- lifecycle
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        model_id: str,
        dim: int,
        threshold: float,
        threshold_source: str = "model default",
        index: str = "flat",
        flip: bool = True,
    ) -> FaceDB:
        """Create an empty database for vectors of ``model_id`` (``dim``-dimensional, unit length).

        ``threshold`` is the default decision threshold, a cosine similarity (higher is stricter). ``flip``:
        photos are embedded as the mean of the face's and its mirror image's embedding (flip test-time
        augmentation, at twice the embedding cost; README "Accuracy"). Fixed for the database's life, since
        templates made both ways should not be compared; it does not affect vectors added directly.
        """
        root = Path(path)
        if not model_id:
            raise InvalidInputError("model_id must be given")
        if int(dim) < 1:
            raise InvalidInputError("dim must be positive")
        if not -1.0 <= float(threshold) <= 1.0:
            raise InvalidInputError("threshold is a cosine similarity in [-1, 1]")
        try:
            check_kind(index)
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from None
        if (root / STORE_FILE).exists():
            raise DatabaseExistsError(f"a facedb database already exists at {root}")
        if root.exists() and not root.is_dir():
            raise DatabaseError(f"{root} exists and is not a directory")
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseError(f"cannot create {root}: {exc.strerror}") from None
        meta = {
            "model_id": model_id,
            "dim": str(int(dim)),
            "metric": "cosine",
            "threshold": repr(float(threshold)),
            "threshold_source": threshold_source,
            "index_kind": index,
            "flip": "1" if flip else "0",
        }
        return cls(root, Store.create(root / STORE_FILE, meta))

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        model_id: str | None = None,
        readonly: bool = False,
        weights: str | os.PathLike[str] | None = None,
    ) -> FaceDB:
        """Open an existing database. With ``model_id``, refuse (ModelMismatchError) a database of another model.

        ``weights`` is the FaceNet weights file to use when this process loads the model.
        """
        root = Path(path)
        store = Store.open(root / STORE_FILE, readonly=readonly)
        db = cls(root, store, readonly=readonly, weights=Path(weights) if weights else None)
        if model_id is not None and model_id != db.model_id:
            held = db.model_id
            store.close()
            raise ModelMismatchError(f"{root} holds {held!r} embeddings; refusing to use {model_id!r} with it")
        return db

    def close(self) -> None:
        """Save the index if it is worth saving, then close the store."""
        with self._lock:
            if self.store is None:
                return
            try:
                if self._gallery is not None and not self.readonly:
                    self._maybe_save()
            finally:
                self.store.close()
                self.store = None  # type: ignore[assignment]

    def __enter__(self) -> FaceDB:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --------------------------------------------------------------- settings
    @property
    def model_id(self) -> str:
        return self.store.get_meta("model_id") or ""

    @property
    def dim(self) -> int:
        return self.store.dim

    @property
    def threshold(self) -> float:
        """The stored decision threshold: a cosine similarity; probes scoring ``>=`` it are accepted."""
        return float(self.store.get_meta("threshold") or 0.0)

    @property
    def flip(self) -> bool:
        """Whether photos are embedded with flip test-time augmentation (databases made before it: no)."""
        return self.store.get_meta("flip") == "1"

    @property
    def index_kind(self) -> str:
        return self.store.get_meta("index_kind") or "flat"

    def set_threshold(self, threshold: float, source: str, **calibration: Any) -> None:
        """Store a new default threshold (cosine similarity) and a record of where it came from."""
        if not -1.0 <= float(threshold) <= 1.0:
            raise InvalidInputError("threshold is a cosine similarity in [-1, 1]")
        items = {"threshold": repr(float(threshold)), "threshold_source": source}
        if calibration:
            items["calibration"] = json.dumps(calibration, sort_keys=True)
        self.store.set_meta(items)
        self._audit("calibrate", [{"threshold": float(threshold), "detail": {"source": source}}])

    def check_model(self, model_id: str, dim: int) -> None:
        """Raise ModelMismatchError unless ``model_id``/``dim`` are the database's."""
        if model_id != self.model_id or int(dim) != self.dim:
            raise ModelMismatchError(
                f"this database holds {self.dim}-d {self.model_id!r} embeddings; "
                f"got {int(dim)}-d {model_id!r} (create another database for that model)"
            )

    # ------------------------------------------------------------------ people
    def add_person(
        self, name: str, *, external_id: str | None = None, metadata: dict[str, Any] | None = None
    ) -> Person:
        with self._lock:
            return self.store.add_person(name, external_id, metadata)

    def person(self, name: str) -> Person:
        with self._lock:
            return self.store.person(name)

    def people(self) -> list[Person]:
        with self._lock:
            return self.store.people()

    def rename_person(self, old: str, new: str) -> Person:
        with self._lock:
            person = self.store.rename_person(old, new)
        self._audit("rename", [{"identity": new, "detail": {"from": old}}])
        return person

    def update_metadata(self, name: str, metadata: dict[str, Any]) -> Person:
        with self._lock:
            return self.store.update_metadata(name, metadata)

    def remove_person(self, name: str) -> int:
        """Erase a person: their templates, images and metadata leave the store and the index together.

        Returns how many templates were removed. No later search can return them.
        """
        with self._lock:
            ids = self.store.remove_person(name)
            if self._gallery is not None:
                self._sync()
        self._audit("remove", [{"identity": name, "detail": {"templates": len(ids)}}])
        return len(ids)

    def add_embeddings(
        self,
        name: str,
        vectors: object,
        *,
        model_id: str | None = None,
        boxes: Sequence[Sequence[float] | None] | None = None,
        det_scores: Sequence[float | None] | None = None,
        image: dict[str, Any] | None = None,
        create: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> list[int]:
        """Store unit vectors ``(dim,)`` or ``(n, dim)`` as templates of ``name``; returns their ids.

        ``model_id``, when given, must be the database's. With ``create`` the person is created if missing.
        All rows are written in one transaction: all or nothing.
        """
        with self._lock:
            if model_id is not None and model_id != self.model_id:
                raise ModelMismatchError(
                    f"this database holds {self.model_id!r} embeddings; refusing {model_id!r} ones"
                )
            x = as_unit_rows(vectors, self.dim)
            ids = self.store.add_templates(
                name, x, boxes=boxes, det_scores=det_scores, image=image, create_person=create, metadata=metadata
            )
            if self._gallery is not None:
                self._sync()
            return ids

    def add_embeddings_many(
        self, items: Sequence[tuple[str, object]], *, model_id: str | None = None, create: bool = True
    ) -> int:
        """Bulk import: ``[(name, vectors), ...]`` in one transaction (all or nothing); returns templates added."""
        with self._lock:
            if model_id is not None and model_id != self.model_id:
                raise ModelMismatchError(
                    f"this database holds {self.model_id!r} embeddings; refusing {model_id!r} ones"
                )
            checked = [(name, as_unit_rows(vectors, self.dim)) for name, vectors in items]
            added = 0
            with self.store.write():
                for name, x in checked:
                    added += len(self.store.add_templates(name, x, create_person=create))
            if self._gallery is not None:
                self._sync()
            return added

    # ---------------------------------------------------------------- queries
    def identify(
        self, vectors: object, k: int = 5, threshold: float | None = None
    ) -> Identification | list[Identification]:
        """Who is this? For a vector ``(dim,)`` one Identification; for ``(n, dim)`` a list of them.

        Returns the top-k people by their best template similarity (cosine; higher is more similar), and the
        decision: the best person if their similarity ``>= threshold`` (default: the stored one), else
        unknown (``identity is None``). Fewer than k candidates come back when fewer people exist. The
        whole batch goes to the index as one search.
        """
        single = np.ndim(vectors) == 1
        x = as_unit_rows(vectors, self.dim)
        out, meta = self._identify(x, k, threshold)
        self._audit("identify", meta=meta, records=[
            {"identity": a.identity, "similarity": a.similarity, "threshold": a.threshold, "vector": v}
            for a, v in zip(out, x)
        ])
        return out[0] if single else out

    def _identify(self, x: np.ndarray, k: int, threshold: float | None
                  ) -> tuple[list[Identification], dict[str, str]]:
        """Answers, and the settings they were made under (one read of them per query: at 1M templates the
        whole query takes ~1 ms, and each SQLite round trip ~10-20 us)."""
        if not isinstance(k, int) or k < 1:
            raise InvalidInputError("k must be a positive integer")
        with self._lock:
            meta = self.store.all_meta()
            thr = float(meta.get("threshold") or 0.0) if threshold is None else float(threshold)
            gallery = self._sync(meta)
            if gallery.index.exact:
                ranked = gallery.top_people(x, k)
            else:
                ranked = self._rescore(gallery, x, gallery.top_people(x, k + max(5, k), max_rounds=2), k)
            names = self.store.names([pid for pairs in ranked for pid, _ in pairs])
        return [engine.decide(engine.candidates(pairs, names), thr) for pairs in ranked], meta

    def _rescore(
        self, gallery: Gallery, x: np.ndarray, ranked: list[list[tuple[int, float]]], k: int
    ) -> list[list[tuple[int, float]]]:
        """Replace approximate scores by each candidate person's exact best similarity over all of their
        stored templates, re-rank, keep k: an approximate index may miss a person, never change a score.

        The vectors come from the index where it holds them bit for bit (hnsw, ivf), else from the store."""
        if len(ranked) > 256:  # bounds the (people x probes) score matrix below
            return [r for s in range(0, len(ranked), 256)
                    for r in self._rescore(gallery, x[s:s + 256], ranked[s:s + 256], k)]
        wanted = [pid for pairs in ranked for pid, _ in pairs]
        if gallery.index.keeps_vectors:
            pids, ids = gallery.person_templates(wanted)
            vectors = gallery.index.exact_vectors(ids)
        else:
            pids, vectors = self.store.person_vectors(wanted)
        if not len(pids):
            return [[] for _ in ranked]
        people, starts = np.unique(pids, return_index=True)  # rows come grouped by person, sorted
        best = np.maximum.reduceat(vectors @ x.T, starts, axis=0)  # (people, queries): best template each
        out = []
        for j, pairs in enumerate(ranked):
            rows = np.searchsorted(people, [pid for pid, _ in pairs])
            exact = [(pid, float(best[r, j])) for (pid, _), r in zip(pairs, rows)
                     if r < len(people) and people[r] == pid]
            exact.sort(key=lambda p: -p[1])
            out.append(exact[:k])
        return out

    def verify(
        self, probe: object, name: str, threshold: float | None = None, *, model: FacePipeline | None = None
    ) -> Verification:
        """Is this ``name``? 1:1: accepted iff the best similarity to their templates ``>= threshold``.

        ``probe`` is a unit vector ``(dim,)``, or a photo (path, bytes, PIL image, HWC uint8 array), in which
        the largest face is used (NoFaceError if there is none).
        """
        sha = None
        if isinstance(probe, np.ndarray) and probe.ndim == 1:
            x = as_unit_rows(probe, self.dim)
        else:
            pipe = self.pipeline(model)
            analysed = pipe.analyse(probe)  # type: ignore[arg-type]
            if not analysed.faces:
                raise NoFaceError(f"{analysed.photo.name}: no face found")
            face = max(analysed.faces, key=lambda f: f.area)
            x = pipe.embed([(analysed.photo, face)], flip=self.flip)
            sha = analysed.photo.sha256
        with self._lock:
            thr = self.threshold if threshold is None else float(threshold)
            person = self.store.person(name)
            _, templates = self.store.person_vectors([person.id])
        if not len(templates):
            raise InvalidInputError(f"{name!r} has no templates to verify against")
        result = engine.verify_scores(x[0], templates, name, thr)
        self._audit("verify", [{"image_sha256": sha, "identity": name if result.accepted else None,
                                "similarity": result.similarity, "threshold": thr, "detail": {"claimed": name},
                                "vector": x[0]}])
        return result

    # ------------------------------------------------------------------ photos
    def pipeline(self, model: FacePipeline | None = None, *, weights: Path | None = None) -> FacePipeline:
        """The face pipeline for this database's model: ``model`` if given (checked), else loaded once per process."""
        if model is None:
            from .pipeline import get_pipeline

            model = get_pipeline(self.model_id, weights=weights or self._weights)
        if model.model_id != self.model_id:
            raise ModelMismatchError(
                f"this database holds {self.model_id!r} embeddings; the model given is {model.model_id!r}"
            )
        return model

    def enroll(
        self,
        name: str,
        photos: Sequence[PhotoSource],
        *,
        model: FacePipeline | None = None,
        on_multiple: str = "error",
        metadata: dict[str, Any] | None = None,
        progress: Any = None,
    ) -> EnrollReport:
        """Enrol photos of ``name`` (created if new): one face per photo, one transaction per photo.

        A photo that fails (unreadable, no face, several faces under ``on_multiple="error"``, already
        enrolled) is skipped with its reason and never stops the others. ``on_multiple``: ``error`` (skip
        the photo), ``largest`` (enrol the largest face) or ``skip``.
        """
        return self.enroll_many([(name, list(photos))], model=model, on_multiple=on_multiple, metadata=metadata,
                                progress=progress)

    def enroll_many(
        self,
        batches: Sequence[tuple[str, Sequence[PhotoSource]]],
        *,
        model: FacePipeline | None = None,
        on_multiple: str = "error",
        metadata: dict[str, Any] | None = None,
        progress: Any = None,
        batch_size: int = 16,
        workers: int | None = 0,
    ) -> EnrollReport:
        """Enrol several people: ``[(name, photos), ...]``. Faces are embedded in batches across photos.

        Decoding and detection run beside the embedder: in one thread by default, or in ``workers`` spawned
        processes (true parallelism; worth it from ~64 photos, see ``pipeline.auto_workers``; a script doing
        this must guard its entry point with ``if __name__ == "__main__":``). Processes need the database's
        own pipeline, so ``workers`` is ignored when ``model`` is given. ``workers=None``: as many as
        ``pipeline.auto_workers`` says for this job and model (what ``facedb enroll`` does).
        """
        from .pipeline import ON_MULTIPLE, auto_workers, prepare, preparer_pool, worker_prepare

        if on_multiple not in ON_MULTIPLE:
            raise InvalidInputError(f"on_multiple must be one of {', '.join(ON_MULTIPLE)}")
        if workers is not None and (not isinstance(workers, int) or workers < 0):
            raise InvalidInputError("workers must be an integer >= 0")
        pipe = self.pipeline(model)
        report = EnrollReport()
        work = [(name, src) for name, srcs in batches for src in srcs]
        if workers is None:
            workers = auto_workers(len(work), pipe.settings.device, getattr(pipe.embedder, "holds_gil", False))
        chunks = [work[i:i + batch_size] for i in range(0, len(work), batch_size)]
        if workers and model is None:
            pool = preparer_pool(workers, self.model_id, self._weights, pipe.settings)
            submit = lambda chunk: pool.submit(worker_prepare, chunk, on_multiple)  # noqa: E731
            ahead = 2 * workers  # chunks in flight: keeps every worker busy, bounds memory
        else:
            # A thread decodes and detects the next chunk while this one embeds and stores (torch and numpy
            # release the GIL; dlib does not, hence the processes above).
            pool = ThreadPoolExecutor(max_workers=1)
            submit = lambda chunk: pool.submit(prepare, pipe, chunk, on_multiple)  # noqa: E731
            ahead = 1
        done = 0
        with pool:
            pending = [submit(c) for c in chunks[:ahead]]
            for i, chunk in enumerate(chunks):
                try:
                    ready, skipped = pending.pop(0).result()
                except BrokenProcessPool as exc:  # a worker was killed (out of memory?): stop, keep what is stored
                    raise FaceDBError(f"a detection worker process died ({exc}); photos enrolled so far are "
                                      f"kept (enrol again to finish: enrolled photos are skipped)") from None
                if i + ahead < len(chunks):
                    pending.append(submit(chunks[i + ahead]))
                report.photos += len(chunk)
                report.skipped.extend(skipped)
                self._store_prepared(ready, pipe, metadata, report)
                done += len(chunk)
                if progress is not None:
                    progress(done)
        return report

    def _store_prepared(self, ready: list[Prepared], pipe: FacePipeline, metadata: dict[str, Any] | None,
                        report: EnrollReport) -> None:
        """Embed prepared photos in one batch and store each in its own transaction (skipping duplicates)."""
        fresh = []
        for item in ready:
            owner = self.store.image_owner(item.sha256)
            if owner is not None:
                report.skipped.append(Skipped(item.label, f"already enrolled (as {owner!r})"))
            else:
                fresh.append(item)
        vectors = pipe.embed_crops([item.crop for item in fresh], flip=self.flip) if fresh else []
        for item, vec in zip(fresh, vectors):
            try:
                ids = self.add_embeddings(
                    item.name, vec, boxes=[item.face.box], det_scores=[item.face.score], image=item.image,
                    create=True, metadata=metadata,
                )
            except (InvalidInputError, ModelMismatchError) as exc:
                report.skipped.append(Skipped(item.label, str(exc)))
                continue
            report.template_ids.extend(ids)
            report.faces_stored += len(ids)
            self._audit("enroll", [{"image_sha256": item.sha256, "identity": item.name,
                                    "detail": {"templates": len(ids)}}])
            if item.name not in report.people:
                report.people.append(item.name)

    def search(
        self,
        photo: PhotoSource,
        *,
        model: FacePipeline | None = None,
        k: int = 5,
        threshold: float | None = None,
        name: str | None = None,
    ) -> list[FaceMatch]:
        """Identify every face in a photo: one FaceMatch per face (an empty list when there is none)."""
        pipe = self.pipeline(model)
        analysed = pipe.analyse(photo, name=name)
        if not analysed.faces:
            return []
        vectors = pipe.embed([(analysed.photo, f) for f in analysed.faces], flip=self.flip)
        answers, meta = self._identify(vectors, k, threshold)
        self._audit("search", meta=meta, records=[
            {"image_sha256": analysed.photo.sha256, "identity": a.identity, "similarity": a.similarity,
             "threshold": a.threshold, "detail": {"box": [round(c, 1) for c in face.box]}, "vector": v}
            for face, a, v in zip(analysed.faces, answers, vectors)
        ])
        return [
            FaceMatch(
                image=analysed.photo.name, box=[round(c, 1) for c in face.box], det_score=round(face.score, 4),
                identity=a.identity, similarity=a.similarity, distance=a.distance, threshold=a.threshold,
                candidates=a.candidates,
            )
            for face, a in zip(analysed.faces, answers)
        ]

    # ------------------------------------------------------------------- audit
    def configure_audit(
        self, *, enabled: bool | None = None, retention_days: float | None = None,
        store_embeddings: bool | None = None,
    ) -> dict[str, Any]:
        """Switch the audit trail on or off, set its retention (days; 0 = keep forever), and whether probe
        embeddings are stored with each decision (off by default: they are biometric data)."""
        items: dict[str, str] = {}
        if enabled is not None:
            items["audit_enabled"] = "1" if enabled else "0"
        if retention_days is not None:
            if retention_days < 0:
                raise InvalidInputError("retention_days must be >= 0 (0 keeps records forever)")
            items["audit_retention_days"] = repr(float(retention_days))
        if store_embeddings is not None:
            items["audit_store_embeddings"] = "1" if store_embeddings else "0"
        if items:
            self.store.set_meta(items)
        return self.audit_settings()

    def audit_settings(self, meta: dict[str, str] | None = None) -> dict[str, Any]:
        meta = self.store.all_meta() if meta is None else meta
        return {
            "enabled": meta.get("audit_enabled", "1") == "1",
            "retention_days": float(meta.get("audit_retention_days", "90")),
            "store_embeddings": meta.get("audit_store_embeddings", "0") == "1",
        }

    def audit(self, since: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """The audit trail from ``since`` (ISO 8601 UTC time) on, oldest first."""
        with self._lock:
            return self.store.audit(since, limit)

    def _audit(self, operation: str, records: list[dict[str, Any]], meta: dict[str, str] | None = None) -> None:
        """Append decisions to the audit trail: time, operation, image hash, identity (None = unknown),
        similarity, threshold, model. The probe's embedding only when configured to. ``meta``: the settings
        as the caller already read them."""
        if self.readonly or not records:
            return
        meta = self.store.all_meta() if meta is None else meta
        settings = self.audit_settings(meta)
        if not settings["enabled"]:
            return
        keep = settings["retention_days"] or None
        rows = []
        for rec in records:
            vector = rec.pop("vector", None)
            rec.update(operation=operation, model_id=meta.get("model_id", ""))
            if settings["store_embeddings"] and vector is not None:
                rec["embedding"] = to_blob(vector)
            rows.append(rec)
        with self._lock:
            self.store.append_audit(rows, keep)

    # ------------------------------------------------------------------- index
    def _stamp(self) -> dict[str, Any] | None:
        raw = self.store.get_meta("index_stamp")
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None

    def _index_params(self) -> dict[str, Any]:
        raw = self.store.get_meta("index_params")
        return json.loads(raw) if raw else {}

    def _kind_for(self, n: int, meta: dict[str, str] | None = None) -> str:
        kind = (meta.get("index_kind") or "flat") if meta is not None else self.index_kind
        return auto_kind(n, self.dim) if kind == "auto" else kind

    def _sync(self, meta: dict[str, str] | None = None) -> Gallery:
        """The gallery, caught up with the store's current generation (rebuilt when it must be). ``meta``: the
        settings, if the caller has just read them."""
        meta = self.store.all_meta() if meta is None else meta
        generation = int(meta.get("generation") or 0)
        if self._gallery is None:
            self._gallery = self._load() or self._build()
        elif self._gallery.generation != generation and not self._catch_up(self._gallery):
            self._gallery = self._build()
        if self._rebuild_reason(self._gallery, meta):
            self._gallery = self._build()
        return self._gallery

    def _rebuild_reason(self, gallery: Gallery, meta: dict[str, str]) -> str | None:
        """Why the index should be rebuilt now: too many tombstones, an IVF trained on a much smaller gallery,
        or ``auto`` now choosing another kind."""
        n = len(gallery)
        if gallery.dead() > max(64, TOMBSTONE_LIMIT * len(gallery.index)):
            return "tombstones"
        trained = gallery.index.params.get("trained_on")
        if trained is not None and n > 4 * max(int(trained), 256):
            return "retrain"
        if self._kind_for(n, meta) != gallery.index.kind:
            return "kind"
        return None

    def _catch_up(self, gallery: Gallery) -> bool:
        changes = self.store.changes_since(gallery.generation)
        if changes is None:
            return False
        current, added, removed = changes
        gallery.remove(removed)
        ids, pids, vectors = self.store.templates(added)
        gallery.add(ids, pids, vectors)
        gallery.generation = current
        return True

    def _load(self) -> Gallery | None:
        """The index file, if its stamp and SHA-256 match, brought level with the store by a full diff of ids
        (so any staleness is repaired, however old the file)."""
        stamp = self._stamp()
        if not stamp or stamp.get("model_id") != self.model_id or stamp.get("dim") != self.dim:
            return None
        if stamp.get("params_of") != self.store.get_meta("index_params", "{}"):
            return None
        # The store's id map is read beside the index file (SQLite and FAISS both release the GIL): at 1M
        # templates that takes the open from 6 s to under 5.
        with ThreadPoolExecutor(max_workers=1) as pool:
            mapping = pool.submit(self.store.template_map)
            index = load_index(self.root / INDEX_FILE, stamp["kind"], self.dim, stamp.get("sha256", ""),
                               stamp.get("params"))
            gen, ids, pids = mapping.result()
        if index is None or len(index) != stamp.get("count"):
            return None
        held = index.ids()
        in_index = np.isin(ids, held)
        dead = held[~np.isin(held, ids)]
        index.remove(dead)  # removed since the file was written (tombstones for HNSW)
        gallery = Gallery(index, gen)
        gallery.set_map(ids[in_index], pids[in_index])
        new_ids, new_pids, vectors = self.store.templates(ids[~in_index])
        gallery.add(new_ids, new_pids, vectors)
        gallery.generation = gen
        self._from_file = len(dead) == 0 and not len(new_ids)
        return gallery

    def _build(self) -> Gallery:
        gen, ids, pids, vectors = self.store.snapshot()
        kind = self._kind_for(len(ids))
        gallery = Gallery(new_index(kind, self.dim, self._index_params(), train=vectors), gen)
        gallery.add(ids, pids, vectors)
        del vectors
        self._catch_up(gallery)  # writes that landed while we read
        self._from_file = False
        return gallery

    def _maybe_save(self, force: bool = False) -> None:
        if self._gallery is None or self.readonly:
            return
        stamp = self._stamp()
        if not force and self._from_file and stamp is not None:
            if 0 <= self._gallery.generation - int(stamp["generation"]) < SAVE_EVERY:
                return
        gallery = self._sync()
        if gallery.dead():  # never write removed templates to disk: drop the tombstones first
            self._gallery = gallery = self._build()
        sha = save_index(gallery.index, self.root / INDEX_FILE)
        self.store.set_meta(
            {
                "index_stamp": json.dumps(
                    {
                        "generation": gallery.generation,
                        "count": len(gallery.index),
                        "model_id": self.model_id,
                        "dim": self.dim,
                        "kind": gallery.index.kind,
                        "params": gallery.index.params,
                        "params_of": self.store.get_meta("index_params", "{}"),
                        "sha256": sha,
                    },
                    sort_keys=True,
                )
            }
        )
        self._from_file = True
        self.store.prune_changes(gallery.generation)

    def save_index(self) -> None:
        """Write the index file now (it is otherwise written on close when it lags the store)."""
        with self._lock:
            self._sync()
            self._maybe_save(force=True)

    def rebuild_index(self) -> int:
        """Rebuild the index from the store and save it; returns the number of templates indexed."""
        with self._lock:
            self._gallery = self._build()
            self._maybe_save(force=True)
            return len(self._gallery.index)

    def reindex(self, kind: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Change the index kind (flat, flat16, hnsw, ivf, ivfpq or auto) and its parameters, and rebuild."""
        try:
            check_kind(kind)
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from None
        with self._lock:
            self.store.set_meta({"index_kind": kind, "index_params": json.dumps(params or {}, sort_keys=True)})
            n = self.rebuild_index()
            assert self._gallery is not None
            return {"index_kind": kind, "built": self._gallery.index.kind, "params": self._gallery.index.params,
                    "indexed": n}

    def vacuum(self) -> None:
        """Compact the store and rewrite the index file, so that no byte of a removed template remains in any
        file of the database (``remove`` already zeroes freed SQLite pages; this also drops them, truncates the
        write-ahead log and replaces the index file)."""
        with self._lock:
            self.store.vacuum()
            self._sync()
            self._maybe_save(force=True)
            self.store.vacuum()  # the stamp update above went through the WAL: truncate it again

    # ------------------------------------------------------------ inspection
    def calibration_warning(self) -> str | None:
        """A warning when the gallery has grown well past (over 2x) the size the threshold was calibrated for.

        In 1:N search the chance that some stranger scores above the threshold grows with the gallery, so a
        threshold calibrated for FPIR at N people admits more false matches at 10 N.
        """
        raw = self.store.get_meta("calibration")
        if not raw:
            return None
        cal = json.loads(raw)
        size = cal.get("gallery_size")
        if cal.get("target") != "fpir" or not size:
            return None
        people = self.store.counts()["people"]
        if people > 2 * int(size):
            return (f"the threshold was calibrated for FPIR {cal.get('target_rate')} at {size} people; the "
                    f"gallery now has {people}: recalibrate (`facedb calibrate --fpir ...`)")
        return None

    def stats(self) -> dict[str, Any]:
        with self._lock:
            meta = self.store.all_meta()
            stamp = self._stamp()
            index_file = self.root / INDEX_FILE
            calibration = json.loads(meta["calibration"]) if "calibration" in meta else None
            return {
                "path": str(self.root),
                "model_id": meta.get("model_id"),
                "dim": self.dim,
                "metric": meta.get("metric"),
                "flip": meta.get("flip") == "1",
                "threshold": self.threshold,
                "threshold_source": meta.get("threshold_source"),
                "calibration": calibration,
                "index_kind": self.index_kind,
                "index_built": stamp.get("kind") if stamp else None,
                "index_params": stamp.get("params") if stamp else None,
                **self.store.counts(),
                "generation": self.store.generation(),
                "index_file_bytes": index_file.stat().st_size if index_file.exists() else 0,
                "index_file_generation": stamp["generation"] if stamp else None,
                "schema_version": SCHEMA_VERSION,
                "created_at": meta.get("created_at"),
                "warnings": [w for w in [self.calibration_warning()] if w],
            }

    def check(self) -> CheckReport:
        """Verify the store and that the index agrees with it exactly. See README "facedb check"."""
        with self._lock:
            checks, problems = self.store.check()
            gallery = self._sync()
            stamp = self._stamp()
            file_ok = stamp is not None and load_index(
                self.root / INDEX_FILE, stamp["kind"], self.dim, stamp.get("sha256", "")
            ) is not None
            if file_ok:
                checks.append("index file's SHA-256 matches its stamp")
            elif not self.readonly:
                # The file is a cache: a missing or damaged one is healed, not a problem of the data.
                self._maybe_save(force=True)
                checks.append("index file was missing or did not match its stamp: rebuilt from the store and saved")
            gen, ids, pids = self.store.template_map()
            checks.append("index holds exactly the stored templates, mapped to the right people")
            held = gallery.index.ids()
            if gallery.generation == gen:
                live = gallery.live_ids()
                if len(live) != len(ids) or not np.array_equal(live, ids) or not np.isin(ids, held).all():
                    problems.append(f"index holds {len(live)} live templates, the store {len(ids)}")
                elif len(ids) and not np.array_equal(gallery.person_of(ids), pids):
                    problems.append("index maps some templates to the wrong person")
                if gallery.dead():
                    checks.append(f"{gallery.dead()} removed templates await compaction (HNSW tombstones)")
            checks.append(f"up to {CHECK_PROBES} stored templates are found as their own best match")
            if len(ids):
                rng = np.random.default_rng(0)
                sample = rng.choice(ids, size=min(CHECK_PROBES, len(ids)), replace=False)
                sids, _, vecs = self.store.templates(sample)
                ranked = gallery.top_people(vecs, 1)
                if not gallery.index.exact:
                    ranked = self._rescore(gallery, vecs, gallery.top_people(vecs, 6, max_rounds=2), 1)
                missed = sum(1 for pairs in ranked if not pairs or pairs[0][1] < 1.0 - 1e-4)
                if missed:
                    problems.append(f"{missed} of {len(sids)} sampled templates are not found by the index")
            return CheckReport(ok=not problems, checks=checks, problems=problems)
