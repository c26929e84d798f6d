"""``FaceDB``: the one object users hold. A facade: each method reads the settings once, calls the room
that owns the job, and records the decision.

Rooms: the store (``store.py``, SQLite: the truth), the index keeper (``keeper.py``: the derived vector index,
kept level with the store), the query engine (``engine.py``: candidates, exact re-scoring, the decision), the
face pipeline (``pipeline.py``: photos to templates) and the audit trail (``audit.py``).

A database is a directory (created 0700) holding ``facedb.sqlite3`` and the index's persisted copy (both 0600),
and for an encrypted database its keyring ``facedb.operations.keys`` (see ``protect.py`` and ``encryption.py``).
Consistency rule: before answering, a FaceDB brings its index to the store's generation (see ``keeper.py``), so a
search that starts after an ``add``/``remove`` has returned - in this process or any other - sees its effect.
Erasure rule: when ``remove_person``/``remove_template``/``merge_people`` returns, no file of the directory holds
a byte of what it removed (the index file is rewritten if it held them, the WAL is checkpointed and truncated).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from . import timings
from .errors import (
    DatabaseError,
    DatabaseExistsError,
    DuplicatePersonError,
    ErasureWarning,
    IndexUnavailableError,
    InvalidInputError,
    ModelChangedError,
    ModelMismatchError,
    NoFaceError,
    NoTemplatesError,
    PersonNotFoundError,
)
from .faces import quality
from .gallery import engine
from .gallery.decision import ImpostorModel, Policy, predicted_fpir
from .gallery.index import backend_for, check_index_params, check_kind
from .gallery.scores import as_unit_rows
from .gallery.settings import (
    AuditSettings,
    Calibration,
    Settings,
    VisitorSettings,
    check_count,
    check_index_options,
    check_k,
    check_threshold,
)
from .gallery.settings_cache import NameCache, SettingsMemo
from .gallery.store import SCHEMA_VERSION, Store, normalise_name, utc_time
from .gallery.thumbnails import keeps as keeps_thumbnails
from .gallery.upkeep import IndexKeeper
from .gallery.vectors import budget_bytes
from .operations.audit import AuditTrail, acting_as, default_actor
from .operations.visitors import VisitorLog
from .protection import encryption
from .records import (
    AuditRecord,
    CheckReport,
    ClusterReport,
    DuplicatesReport,
    EnrollReport,
    FaceMatch,
    Identification,
    IndexState,
    Person,
    PhotoCheck,
    ReindexReport,
    Skipped,
    Stats,
    Template,
    Verification,
    VisitorGroup,
)

if TYPE_CHECKING:
    from .faces.images import PhotoSource
    from .faces.pipeline import FaceChoice, FacePipeline, Outcome
    from .operations.backup import BackupReport
    from .operations.hooks import Webhook
    from .operations.keys import ApiKey
    from .operations.reembed import ReembedReport
    from .protection.encryption import ConversionReport
    from .protection.keyring import FileCipher, Protection

STORE_FILE = "facedb.sqlite3"
INDEX_FILE = "index.faiss"  # the FAISS backend's file (facedb.gallery.index.faiss_kinds.INDEX_FILE)

#: How many stored templates ``check`` searches for to prove the index finds them.
CHECK_PROBES = 64

#: What ``enroll`` does with a photo whose face matches *another* enrolled person above the threshold.
ON_OTHER_MATCH = ("warn", "refuse", "allow")


@contextlib.contextmanager
def _interrupt_after() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the block has ended, then deliver it: the block
    (store a photo, count it, audit it) is done whole or not at all. Only the main thread receives signals;
    elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held and callable(previous):
            previous(signal.SIGINT, None)  # Python's own handler raises KeyboardInterrupt here


def verify_rule(threshold: float | None) -> str:
    """Which policy held a 1:1 decision, for its audit record and door event: the stored 1:1 threshold (``fixed``:
    the 1:N rules do not apply to one claimed person) or one ``given`` with the call."""
    return "fixed" if threshold is None else "given"


class FaceDB:
    """An identity database. Open with :meth:`create` or :meth:`open`, preferably as a context manager.

    Thread-safe: one lock serialises calls on the same object. For parallelism use one FaceDB per thread or
    process (SQLite WAL lets many readers run beside one writer).
    """

    def __init__(self, root: Path, store: Store, readonly: bool = False, weights: Path | None = None,
                 model: FacePipeline | None = None, actor: str | None = None,
                 index_options: dict[str, Any] | None = None, protection: Protection | None = None,
                 rescore_memory_mb: float | None = None) -> None:
        self.root = root
        self.store = store
        self._memo = SettingsMemo(store)  # settings parsed once per change, names cached (memo.py)
        self._names = NameCache(store.names, store.stream_people)
        self.readonly = readonly
        self._weights = weights
        self._model = model
        self._lock = threading.RLock()
        self._given_options = dict(index_options or {})
        self.protection = protection
        self._projection: Any = None  # loaded on first use (cancellable databases)
        self.keeper = IndexKeeper(store, root, readonly=readonly, options=self._index_options(),
                                  vector_budget=budget_bytes(rescore_memory_mb))
        self.trail = AuditTrail(store, actor or default_actor())
        self.visitor_log = VisitorLog(store, self.trail.actor)

    def _index_options(self) -> dict[str, Any]:
        """What an index backend needs to find its engine: the stored options (a Milvus URI and collection),
        the database's model and id (so a shared collection is never another database's), and the options
        given to this process (a token, or a URI override): those are never stored."""
        s = self.settings()
        cipher = {"cipher": self.protection.index_cipher()} if self.protection is not None else {}
        return {**s.index_options, "model_id": s.model_id, "database_id": s.database_id, **self._given_options,
                **cipher}

    # ---------------------------------------------------------------------------------------------- lifecycle
    @classmethod
    def create(cls, path: str | os.PathLike[str], *, model_id: str, dim: int, threshold: float,
               threshold_source: str = "model default", index: str = "flat", flip: bool = True,
               impostors: ImpostorModel | None = None, margin: float | None = None, rule: str | None = None,
               mean_templates: bool = False, actor: str | None = None,
               index_options: dict[str, Any] | None = None, encrypt: bool = False, key: object = None,
               cancellable: bool = False, thumbnails: str = "enrolled",
               rescore_memory_mb: float | None = None, detector: str = "mtcnn") -> FaceDB:
        """Create an empty database for vectors of ``model_id`` (``dim``-dimensional, unit length).

        ``threshold`` is the default (1:1) decision threshold, a cosine similarity (higher is stricter).
        ``impostors``: the model's 1:1 impostor score tail; given, the database uses the gallery rule (the 1:N
        threshold follows the gallery size to hold FPIR at 1%; see :mod:`facedb.gallery.decision`); ``margin``: the
        model's margin threshold (the margin rule: ``s1 - 0.5 s2`` must reach it, and ``s1`` the 1:1 threshold).
        ``rule``: ``fixed``, ``gallery`` or ``margin``; by default ``margin`` when a margin threshold is given,
        else ``gallery`` when an impostor model is, else ``fixed``. ``mean_templates``: keep each person's mean
        template (the renormalised mean of their templates, once they have two) beside their photo templates:
        on LFW with two or three photos enrolled it raised the identification rate at FPIR 1% by 3-4 points
        (README "Accuracy"); off by default here (what you add is exactly what is matched), on by default in
        ``facedb init``. ``flip``:
        photos are embedded as the mean of the face's and its mirror image's embedding (flip test-time
        augmentation, at twice the embedding cost; README "Accuracy"). Fixed for the database's life, since
        templates made both ways should not be compared; it does not affect vectors added directly.
        ``rescore_memory_mb``: see :meth:`open`.
        ``index_options``: for ``index="milvus"``, ``milvus_uri`` (required) and ``milvus_collection`` (stored),
        and ``milvus_token`` (used by this object only, never stored; else FACEDB_MILVUS_TOKEN). A remote
        index is created at once, so an unreachable server or a refused token (IndexUnavailableError) or a
        collection of another model (ModelMismatchError) leaves no database behind.

        ``encrypt`` (or a ``key``): the database is encrypted at rest (README "Protecting templates") under the
        key-encryption key ``key`` (a string, bytes, a key file's Path or a ``facedb.protection.keyring.KeySource``;
        default ``$FACEDB_KEY``; KeyMissingError when there is none). ``cancellable``: every template and probe is
        projected by a keyed random orthogonal matrix of this database (``projection.py``; scores unchanged,
        templates unlinkable across databases), fixed for the database's life. ``thumbnails``: which face
        thumbnails are kept, ``off``, ``enrolled`` or ``all`` (see :mod:`facedb.gallery.thumbnails`; changed later with
        :meth:`configure_thumbnails`). ``detector``: the face detector its photos go through, ``mtcnn`` (the
        default) or ``yunet`` (facedb/faces/pipeline.py; README "Models and weights"), fixed for the database's life.
        """
        from .faces.pipeline import check_detector

        root = Path(path)
        if not model_id:
            raise InvalidInputError("model_id must be given")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise InvalidInputError("dim must be a positive integer")
        threshold = check_threshold(threshold)
        check_kind(index)
        detector = check_detector(detector)
        options = dict(index_options or {})
        rows = _option_rows(index, options)
        if (root / STORE_FILE).exists():
            raise DatabaseExistsError(f"a facedb database already exists at {root}")
        if root.exists() and not root.is_dir():
            raise DatabaseError(f"{root} exists and is not a directory")
        material = encryption.new_key_material(root, key) if encrypt or key is not None else None
        made = not root.exists()
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseError(f"cannot create {root}: {exc.strerror}") from None
        meta = {**Settings.initial(model_id, dim, threshold, threshold_source, index, flip, impostors, margin, rule,
                                   mean_templates, thumbnails=thumbnails, detector=detector),
                **rows,
                "database_id": secrets.token_hex(16)}
        if cancellable:
            from .protection import projection

            meta.update({"projection": projection.METHOD, "projection_seed": projection.new_seed()})
        protection = None
        if material is not None:
            encryption.discard_keyring(root)  # one left by a creation that died before its store existed
            protection = encryption.create_keyring(root, material)
        try:
            store = Store.create(root / STORE_FILE, meta, key=protection.store_key() if protection else None)
        except BaseException:
            if protection is not None:
                encryption.discard_keyring(root)
            raise
        db = cls(root, store, actor=actor, index_options=_secrets_of(options), protection=protection,
                 rescore_memory_mb=rescore_memory_mb)
        if index != "auto" and backend_for(index).write_through:
            try:  # create the remote collection now: a bad URI, token or collection fails init, not a later enrol
                db.keeper.rebuild(db.settings())
            except BaseException:
                db.close(save_index=False)
                for name in (STORE_FILE, STORE_FILE + "-wal", STORE_FILE + "-shm"):
                    (root / name).unlink(missing_ok=True)
                encryption.discard_keyring(root)
                if made:
                    shutil.rmtree(root, ignore_errors=True)
                raise
        return db

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, model_id: str | None = None, readonly: bool = False,
             weights: str | os.PathLike[str] | None = None, model: FacePipeline | None = None,
             actor: str | None = None, index_options: dict[str, Any] | None = None, key: object = None,
             rescore_memory_mb: float | None = None) -> FaceDB:
        """Open an existing database. With ``model_id``, refuse (ModelMismatchError) a database of another model.

        ``weights``: the FaceNet weights file to use when this process loads the model; ``model``: a face
        pipeline to use for photos (checked against the database's model); ``actor``: who the audit trail
        records as asking, when no :meth:`acting_as` block says otherwise (default ``local:<user>``).
        ``readonly``: nothing in the gallery can be changed (decisions are still written to the audit trail), and
        a remote index engine is never written to (see README "Scale-out" for read replicas).
        ``index_options``: for a Milvus index, ``milvus_token`` and/or ``milvus_uri`` for this object only
        (default: FACEDB_MILVUS_TOKEN, FACEDB_MILVUS_URI, else the stored URI); never stored.
        ``key``: an encrypted database's key-encryption key (a string, bytes, a key file's Path or a
        ``facedb.protection.keyring.KeySource``; default ``$FACEDB_KEY``): KeyMissingError without one, WrongKeyError
        for another, TamperedError when the ciphertext fails authentication; nothing is changed then. Ignored for a
        plain database.
        ``rescore_memory_mb``: memory (MiB) this process may give the exact vectors that re-score candidates of
        index kinds that do not keep them (ivfpq, flat16, milvus): 2 KiB per 512-d template; beyond it they are
        read from the store (default ``$FACEDB_RESCORE_MEMORY_MB``, else 8,192; 0: always the store). See
        ``facedb/gallery/vectors.py``.
        """
        root = Path(path)
        if not (root / STORE_FILE).is_file():
            raise DatabaseError(f"no facedb database at {root / STORE_FILE} (create one with `facedb init`)")
        protection = encryption.unlock(root, key, readonly)
        store = Store.open(root / STORE_FILE, readonly=readonly, key=protection.store_key() if protection else None)
        db = cls(root, store, readonly=readonly, weights=Path(weights) if weights else None, actor=actor,
                 index_options=_secrets_of(dict(index_options or {}), uri_too=True), protection=protection,
                 rescore_memory_mb=rescore_memory_mb)
        try:
            if not readonly and store.erasure_pending():  # a removal whose erasure a crash interrupted
                db._erase()
            if model_id is not None:
                db._same_model(model_id, db.dim)
            if model is not None:
                db.pipeline(model)
        except BaseException:
            store.close()
            raise
        db._model = model
        return db

    def close(self, *, save_index: bool = True) -> None:
        """Write the audit records still waiting, save the index if it is worth saving (not with
        ``save_index=False``), then close the store. DatabaseError (after closing) when waiting audit records
        could not be written."""
        with self._lock:
            if self.store is None:
                return
            failed: DatabaseError | None = None
            try:
                self.trail.close()
            except DatabaseError as exc:
                failed = exc
            try:
                if save_index and not self.readonly:
                    self.keeper.save(self.settings())
            except DatabaseError as exc:  # the index is a cache: the next open catches up from the store
                warnings.warn(f"{self.root}: the index was not saved on close ({exc})", RuntimeWarning, stacklevel=2)
            finally:
                self.keeper.forget()
                self.store.close()
                self.store = None  # type: ignore[assignment]
            if failed is not None:
                raise failed

    # --------------------------------------------------------------------------------------------- protection
    @property
    def encrypted(self) -> bool:
        """Whether this database is encrypted at rest (README "Protecting templates")."""
        return self.protection is not None

    @property
    def cancellable(self) -> bool:
        """Whether templates are stored under this database's keyed orthogonal projection (``projection.py``)."""
        return bool(self.store.get_meta("projection_seed"))

    def _protect(self, x: np.ndarray) -> np.ndarray:
        """Vectors as this database stores and compares them: projected when it is cancellable."""
        if self._projection is None:
            seed = self.store.get_meta("projection_seed")
            if not seed:
                self._projection = False
            else:
                from .protection.projection import Projection

                self._projection = Projection(seed, self.dim)
        return self._projection(x) if self._projection else x

    def cache_cipher(self) -> FileCipher | None:
        """The cipher for files outside the database that hold vectors made for it (evaluation caches), or None
        for a plain database."""
        return self.protection.cache_cipher() if self.protection is not None else None

    @classmethod
    def encrypt(cls, path: str | os.PathLike[str], *, key: object = None) -> ConversionReport:
        """Convert the plain database at ``path`` to an encrypted one under ``key`` (default ``$FACEDB_KEY``),
        atomically: the plain files are overwritten and deleted. Needs the database closed everywhere else
        (DatabaseError otherwise, nothing changed)."""
        if encryption.is_encrypted(Path(path)):
            raise InvalidInputError(f"{path} is already encrypted (rotate its key with `facedb rotate-key`)")
        db = cls.open(path)
        try:
            db._settle()
            report = encryption.encrypt_existing(Path(path), key, db)
        finally:
            db.close(save_index=False)
        cls._record_conversion(path, key, report)
        return report

    @classmethod
    def _record_conversion(cls, path: str | os.PathLike[str], key: object, report: ConversionReport) -> None:
        """Append an encrypt / rotate-key to the audit trail (opened with the key now in force)."""
        with cls.open(path, key=key) as db:
            db.trail.record(report.operation if report.operation == "encrypt" else "rotate-key",
                            [{"detail": report.to_dict()}], db.settings())

    @classmethod
    def rotate_key(cls, path: str | os.PathLike[str], *, key: object = None, new_key: object = None,
                   reencrypt: bool = False) -> ConversionReport:
        """Re-wrap the data key under ``new_key`` (default ``$FACEDB_NEW_KEY``; fast); with ``reencrypt``, also
        re-encrypt everything under a new data key (needs the database closed everywhere else). ``key`` is the
        key in use. Wrong or missing keys change nothing."""
        from .protection.keyring import ENV_NEW_KEY, KeySource

        if not reencrypt:
            report = encryption.rotate_key(Path(path), key, new_key)
        else:
            db = cls.open(path, key=key)
            try:
                db._settle()
                report = encryption.rotate_key(Path(path), key, new_key, reencrypt=True, opened=db)
            finally:
                db.close(save_index=False)
        now = KeySource.of(new_key, env=ENV_NEW_KEY) or key
        cls._record_conversion(path, now, report)
        return report

    def _settle(self) -> None:
        """Load the index and let its background reads of the store finish (a conversion needs the store to
        itself: no other connection open on it, even this process's)."""
        self.load_index(wait=True)
        if self._names.loading is not None:
            self._names.loading.join()

    def __enter__(self) -> FaceDB:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------------- settings
    def settings(self) -> Settings:
        """Every setting, typed: parsed again only when they changed (in any process: the store's settings
        version, see ``memo.py``); one small read of the store otherwise."""
        return self._memo.current()

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

    @property
    def actor(self) -> str:
        """Who the audit trail records as asking when no :meth:`acting_as` block says otherwise."""
        return self.trail.actor

    def acting_as(self, actor: str) -> contextlib.AbstractContextManager[None]:
        """Record what is done inside the block as done by ``actor`` (an API key id, an operator)."""
        return acting_as(actor)

    def set_threshold(self, threshold: float, source: str, calibration: Calibration | dict[str, Any] | None = None,
                      **details: Any) -> None:
        """Store a new default threshold (cosine similarity) and the record of where it came from: a
        :class:`Calibration`, a dict with its fields, or its fields as keywords."""
        threshold = check_threshold(threshold)
        raw = calibration.to_dict() if isinstance(calibration, Calibration) else dict(calibration or {})
        raw.update(details)
        cal = Calibration.from_dict({**raw, "threshold": threshold}) if raw else None
        with self._lock:
            self.store.set_meta(Settings.threshold_rows(threshold, source, cal))
            self.trail.record("calibrate", [{"threshold": threshold, "detail": {"source": source}}], self.settings())

    def set_rule(self, rule: str, *, target: float | None = None, impostors: ImpostorModel | None = None,
                 margin: float | None = None) -> Settings:
        """Choose the open-set decision rule (:mod:`facedb.gallery.decision`): ``fixed`` (the stored threshold),
        ``margin`` (the stored threshold as a floor and ``s1 - 0.5 s2 >= margin``; needs a margin threshold:
        ``margin``, the one stored, or the model's own) or ``gallery`` (the threshold follows the gallery size to
        hold FPIR at ``target``; needs an impostor model: ``impostors``, the one stored, or the model's own)."""
        with self._lock:
            s = self.settings()
            spec = self._spec()
            if rule == "gallery" and impostors is None and s.rule.impostors is None:
                impostors = spec.impostor_model(s.flip) if spec is not None else None
                if impostors is None:
                    raise InvalidInputError(
                        f"the gallery rule needs an impostor model: {self.model_id} ships none; build one from your "
                        "labelled photos with `facedb calibrate --far 1e-3 --folder DIR`")
            if rule == "margin" and margin is None and s.rule.margin is None:
                margin = self.shipped_margin()
                if margin is None:
                    raise InvalidInputError(
                        f"the margin rule needs a margin threshold: {self.model_id} ships none; calibrate one from "
                        "your labelled photos with `facedb calibrate --fpir 0.01 --folder DIR`")
            self.store.set_meta(Settings.rule_rows(rule, target, impostors, margin))
            settings = self.settings()
            self.trail.record("rule", [{"threshold": settings.threshold, "detail": {
                "rule": rule, "target": settings.rule.target, "margin": settings.rule.margin}}], settings)
            return settings

    def shipped_margin(self) -> float | None:
        """The margin rule's threshold this database's model ships for its flip setting, or None."""
        spec = self._spec()
        return spec.margin_threshold(self.settings().flip) if spec is not None else None

    def configure_templates(self, *, mean: bool) -> Settings:
        """Keep (``mean=True``) or drop each person's mean template; every person's is recomputed at once."""
        with self._lock:
            self.store.set_meta({"mean_templates": "1" if mean else "0"})
            self.store.refresh_means()
            settings = self.settings()
            self.keeper.after_write(settings)
            self.trail.record("templates-setting", [{"detail": {"mean_templates": mean}}], settings)
            return settings

    def _spec(self) -> Any:
        """The model's registered spec (None for your own model id)."""
        from .faces.models import MODELS

        return MODELS.get(self.model_id)

    def _same_model(self, model_id: str, dim: int) -> None:
        """ModelMismatchError unless ``model_id``/``dim`` are the database's: the one model check."""
        if model_id != self.model_id or int(dim) != self.dim:
            raise ModelMismatchError(
                f"this database holds {self.dim}-d {self.model_id!r} embeddings; got {int(dim)}-d {model_id!r} "
                "(create another database for that model)")

    # ------------------------------------------------------------------------------------------------- people
    def add_person(self, name: str, *, external_id: str | None = None,
                   metadata: dict[str, Any] | None = None) -> Person:
        with self._lock:
            person = self.store.add_person(name, external_id, metadata)
            self.trail.record("add-person", [{"identity": person.name}], self.settings())
            return person

    def person(self, name: str) -> Person:
        with self._lock:
            return self.store.person(name)

    def people(self, query: str | None = None, *, limit: int | None = None, offset: int = 0) -> list[Person]:
        """People in name order (:func:`facedb.gallery.store.name_sort_key`: base letters case- and
        accent-insensitively, then accents, then case); ``query`` keeps names or external ids containing it, case- and
        accent-insensitively ("jose" finds "José"); paged by ``limit``/``offset``."""
        limit = None if limit is None else check_count(limit, "limit", 1)
        offset = check_count(offset, "offset")
        with self._lock:
            return self.store.people(query, limit, offset)

    def count_people(self, query: str | None = None) -> int:
        with self._lock:
            return self.store.count_people(query)

    def rename_person(self, old: str, new: str) -> Person:
        with self._lock:
            person = self.store.rename_person(old, new)
            self.trail.record("rename", [{"identity": person.name, "detail": {"from": normalise_name(old)}}],
                              self.settings())
            return person

    def update_person(self, name: str, *, metadata: dict[str, Any] | None = None, replace_metadata: bool = False,
                      external_id: str | None = None, clear_external_id: bool = False) -> Person:
        """Change a person's metadata (merged; a key set to None is deleted; all of it with ``replace_metadata``)
        and/or external id."""
        with self._lock:
            person = self.store.update_person(name, metadata=metadata, replace=replace_metadata,
                                              external_id=external_id, clear_external_id=clear_external_id)
            self.trail.record("update", [{"identity": person.name}], self.settings())
            return person

    def update_metadata(self, name: str, metadata: dict[str, Any]) -> Person:
        return self.update_person(name, metadata=metadata)

    def remove_person(self, name: str) -> int:
        """Erase a person: their templates, images and metadata leave the store and the index together.

        Returns how many templates were removed. No later search can return them.
        """
        with self._lock:
            with self._erasing():
                ids = self.store.remove_person(name)
            settings = self.settings()
            self.trail.record("remove", [{"identity": normalise_name(name), "detail": {"templates": len(ids)}}],
                              settings)
            return len(ids)

    @contextlib.contextmanager
    def _erasing(self) -> Iterator[None]:
        """A removal's transaction, marked ``erase_pending`` in it; once committed, its erasure from every file.
        Decision records still waiting for the background writer are committed first, so that what the removal
        erases (a removed person's probe thumbnails, thumbnails no longer kept) cannot be written after it."""
        self.trail.flush()
        # The index lock is held from the transaction to the erasure (lock order: index lock, then SQLite's
        # write lock, as every index save takes them), so `check` in another process can tell an erasure under
        # way (it waits for the lock) from one a killed writer left behind (the mark outlives the lock).
        with self.keeper.locked():
            with self.store.write():
                yield
                self.store.set_meta({"erase_pending": "1"})
            encryption.failpoint("removal-committed")
            self.keeper.after_write(self.settings())
            self._erase()

    def _erasure_under_way(self) -> bool:
        """Whether the ``erase_pending`` mark belongs to a removal still under way in another process: once that
        process releases the index lock (held from its transaction to its erasure) the mark is gone."""
        if self.store.readonly:
            return False  # a read-only process takes no index lock: it reports the mark as it finds it
        with self.keeper.locked():
            return not self.store.erasure_pending()

    def _erase(self) -> None:
        """Rewrite the index file if it holds removed templates, then checkpoint and truncate the WAL."""
        self.keeper.erase(self.settings())
        if not self.store.truncate_wal():
            warnings.warn(ErasureWarning(
                f"{self.root}: other processes kept reading old snapshots, so the write-ahead log still holds the "
                "removed rows (encrypted if the database is); the next removal or `facedb vacuum` truncates it"),
                stacklevel=3)

    def merge_people(self, source: str, target: str) -> int:
        """Move every template and photo of ``source`` to ``target`` and delete ``source`` (one person enrolled
        under two names); returns the templates moved."""
        with self._lock:
            with self._erasing():
                ids = self.store.merge_people(source, target)
            settings = self.settings()
            self.trail.record("merge", [{"identity": normalise_name(target),
                                         "detail": {"from": normalise_name(source), "templates": len(ids)}}],
                              settings)
            return len(ids)

    # ---------------------------------------------------------------------------------------------- templates
    def add_templates(self, name: str, vectors: object, *, model_id: str | None = None,
                      boxes: Sequence[Sequence[float] | None] | None = None,
                      det_scores: Sequence[float | None] | None = None, image: dict[str, Any] | None = None,
                      create: bool = False, metadata: dict[str, Any] | None = None,
                      thumbnails: Sequence[bytes | None] | None = None) -> list[int]:
        """Store unit vectors ``(dim,)`` or ``(n, dim)`` as templates of ``name``; returns their ids.

        ``model_id``, when given, must be the database's. With ``create`` the person is created if missing.
        ``thumbnails``: a face JPEG (or None) per vector, kept if the database keeps enrolled thumbnails.
        All rows are written in one transaction: all or nothing. Recorded in the audit trail (``add-templates``).
        """
        with self._lock:
            ids = self._add_templates(name, vectors, model_id=model_id, boxes=boxes, det_scores=det_scores,
                                      image=image, create=create, metadata=metadata, thumbnails=thumbnails)
            self.trail.record("add-templates", [{"identity": self.store.person(name).name,
                                                 "detail": {"templates": len(ids)}}], self.settings())
            return ids

    def _add_templates(self, name: str, vectors: object, *, model_id: str | None = None,
                       boxes: Sequence[Sequence[float] | None] | None = None,
                       det_scores: Sequence[float | None] | None = None, image: dict[str, Any] | None = None,
                       create: bool = False, metadata: dict[str, Any] | None = None,
                       external_id: str | None = None, thumbnails: Sequence[bytes | None] | None = None,
                       made_by: str | None = None) -> list[int]:
        """:meth:`add_templates` without its audit record (enrolment records its own). ``made_by``: the model that
        embedded the photos, checked in the store's transaction (ModelChangedError after a move)."""
        if model_id is not None:
            self._same_model(model_id, np.shape(vectors)[-1] if np.ndim(vectors) else self.dim)
        x = self._protect(as_unit_rows(vectors, self.dim))
        if thumbnails is not None and not keeps_thumbnails(self.settings().thumbnails, "template"):
            thumbnails = None
        ids = self.store.add_templates(name, x, boxes=boxes, det_scores=det_scores, image=image,
                                       create_person=create, metadata=metadata, external_id=external_id,
                                       thumbnails=thumbnails, model_id=made_by)
        self.keeper.after_write(self.settings())
        return ids

    def add_templates_many(self, items: Sequence[tuple[str, object]], *, model_id: str | None = None,
                           create: bool = True) -> int:
        """Bulk import: ``[(name, vectors), ...]`` in one transaction (all or nothing); returns templates added."""
        with self._lock:
            checked = []
            for name, vectors in items:
                if model_id is not None:
                    self._same_model(model_id, np.shape(vectors)[-1] if np.ndim(vectors) else self.dim)
                checked.append((name, self._protect(as_unit_rows(vectors, self.dim))))
            added: list[tuple[str, int]] = []
            with self.store.write():
                for name, x in checked:
                    added.append((name, len(self.store.add_templates(name, x, create_person=create))))
            settings = self.settings()
            self.keeper.after_write(settings)
            self.trail.record("add-templates", [{"identity": normalise_name(name), "detail": {"templates": n}}
                                                for name, n in added], settings)
            return sum(n for _, n in added)

    def add_embeddings(self, *args: Any, **kwargs: Any) -> list[int]:
        """Deprecated name of :meth:`add_templates`."""
        warnings.warn("add_embeddings is now add_templates", DeprecationWarning, stacklevel=2)
        return self.add_templates(*args, **kwargs)

    def add_embeddings_many(self, *args: Any, **kwargs: Any) -> int:
        """Deprecated name of :meth:`add_templates_many`."""
        warnings.warn("add_embeddings_many is now add_templates_many", DeprecationWarning, stacklevel=2)
        return self.add_templates_many(*args, **kwargs)

    def templates(self, person: str | None = None, *, include_derived: bool = False) -> Iterator[Template]:
        """Every stored template (of ``person`` only, if given) with its id, person and vector (``(dim,)``
        float32, unit length), in id order; read in batches, for clustering and export. Mean templates
        (``derived``) only with ``include_derived``."""
        return self.store.iter_templates(person, include_derived=include_derived)

    def remove_template(self, template_id: int) -> str:
        """Erase one template (a wrong photo); returns the person it belonged to, who stays enrolled."""
        with self._lock:
            with self._erasing():
                name = self.store.remove_template(template_id)
            settings = self.settings()
            self.trail.record("remove-template", [{"identity": name, "detail": {"template": int(template_id)}}],
                              settings)
            return name

    # ------------------------------------------------------------------------------------------------ queries
    def _fetch(self, gallery: engine.Gallery) -> engine.VectorFetch:
        """Candidates' exact vectors: from the index where it keeps them bit for bit, else from the store."""
        def fetch(person_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
            return gallery.person_vectors(person_ids) or self.store.person_vectors(person_ids)

        return fetch

    def _identify(self, x: np.ndarray, k: int, threshold: float | None, made_by: str | None = None
                  ) -> tuple[list[Identification], Settings]:
        """Answers, and the settings they were made under (read once per query: at 1M templates the whole
        query takes ~1 ms, and each SQLite round trip ~10-20 us). ``made_by``: the model that embedded ``x``;
        ModelChangedError when the database is (or, by the time the answer is made, was moved to) another one,
        so that a probe of the old model is never scored against a gallery moved to a new one (``reembed``)."""
        k = check_k(k)
        threshold = None if threshold is None else check_threshold(threshold)
        with self._lock:
            settings = self.settings()
            self._made_by(made_by, settings.model_id)
            try:
                gallery = self.keeper.current(settings)
                policy = Policy("given", threshold, explanation="given") if threshold is not None else \
                    settings.rule.policy(settings.threshold, len(gallery))
                answers = engine.identify(gallery, x, k, policy, self._fetch(gallery), self._lookup_names)
                if made_by is not None:  # one small read: a move that committed while the answer was made
                    self._made_by(made_by, self.store.get_meta("model_id") or "")
                return answers, settings
            except IndexUnavailableError:
                self.keeper.forget()  # a remote engine failed (or its collection was dropped): reopen next time
                raise

    @staticmethod
    def _made_by(made_by: str | None, model_id: str) -> None:
        if made_by is not None and made_by != model_id:
            raise ModelChangedError(f"the database was moved to {model_id!r} while this photo was embedded by "
                                    f"{made_by!r}; ask again")

    def _lookup_names(self, person_ids: Sequence[int]) -> dict[int, tuple[str, str | None]]:
        """Names of people, from memory while no one was renamed or removed (the query just read the people
        version with its settings)."""
        return self._names.lookup(person_ids, self._memo.people_version)

    def identify(self, vectors: object, k: int = 5,
                 threshold: float | None = None) -> Identification | list[Identification]:
        """Who is this? For a vector ``(dim,)`` one Identification; for ``(n, dim)`` a list of them.

        Returns the top-k people by their best template similarity (cosine; higher is more similar), and the
        decision: the best person if their similarity ``>= threshold`` (default: the stored one), else
        unknown (``identity is None``). Fewer than k candidates come back when fewer people exist. The
        whole batch goes to the index as one search.
        """
        single = np.ndim(vectors) == 1
        x = self._protect(as_unit_rows(vectors, self.dim))
        out, settings = self._identify(x, k, threshold)
        self.trail.record("identify", [  # the rule: which policy decided (a per-call threshold is "given")
            {"identity": a.identity, "similarity": a.similarity, "threshold": a.threshold, "vector": v,
             "detail": {"rule": a.rule}} for a, v in zip(out, x)], settings)
        self.visitor_log.keep([{"identity": a.identity, "similarity": a.similarity, "vector": v}
                               for a, v in zip(out, x)], settings)
        return out[0] if single else out

    def verify(self, probe: object, name: str, threshold: float | None = None, *,
               model: FacePipeline | None = None, cropped: bool = False) -> Verification:
        """Is this ``name``? 1:1: accepted iff the best similarity to their templates ``>= threshold``.

        ``probe`` is a unit vector ``(dim,)``, or a photo (path, bytes, file object, PIL image, HWC uint8
        array), in which the largest face is used (NoFaceError if there is none; ``cropped``: the photo is a
        face crop, see :func:`facedb.faces.pipeline.find_faces`).
        """
        threshold = None if threshold is None else check_threshold(threshold)
        sha = None
        if isinstance(probe, np.ndarray) and probe.ndim == 1:
            x = as_unit_rows(probe, self.dim)
        else:
            pipe = self.pipeline(model)
            analysed = pipe.analyse(probe, cropped=cropped)  # type: ignore[arg-type]
            if not analysed.faces:
                raise NoFaceError(f"{analysed.photo.name}: no face found")
            face = max(analysed.faces, key=lambda f: f.area)
            with timings.stage("embed"):
                x = pipe.embed_faces(analysed, [face], flip=self.flip)
            sha = analysed.photo.sha256
        x = self._protect(x)
        with self._lock:
            settings = self.settings()
            if sha is not None:
                self._made_by(pipe.model_id, settings.model_id)
            thr = settings.threshold if threshold is None else threshold
            person = self.store.person(name)
            # Photo templates only: the 1:1 threshold is calibrated photo against photo, and a mean template sits
            # nearer to everyone (a stranger's best score against it is higher), so it would raise the FAR.
            _, templates = self.store.person_vectors([person.id], photos_only=True)
            if not len(templates):
                raise NoTemplatesError(f"{person.name!r} has no templates to verify against")
            result = engine.verify_scores(x[0], templates, person.name, thr, person.external_id)
            self.trail.record("verify", [{"image_sha256": sha, "identity": person.name if result.accepted else None,
                                          "similarity": result.similarity, "threshold": thr,
                                          "detail": {"claimed": person.name, "rule": verify_rule(threshold)},
                                          "vector": x[0]}], settings)
        return result

    # ------------------------------------------------------------------------------------------------- photos
    def pipeline(self, model: FacePipeline | None = None, *, weights: Path | None = None) -> FacePipeline:
        """The face pipeline for this database's model: ``model`` if given (checked; its detector is used, which
        is how a call picks another detector), the one given at :meth:`open`, else the process-wide one for the
        database's model and detector (loaded once)."""
        model = model or self._model
        if model is None:
            from .faces.pipeline import DetectorSettings, check_detector, get_pipeline

            detector = check_detector(self.settings().detector)  # a hand-edited setting: a clear error
            model = get_pipeline(self.model_id, weights=weights or self._weights,
                                 settings=DetectorSettings(detector=detector))
        if model.model_id != self.model_id:
            raise ModelMismatchError(
                f"this database holds {self.model_id!r} embeddings; the model given is {model.model_id!r}")
        return model

    def detect(self, photo: PhotoSource, *, model: FacePipeline | None = None, name: str | None = None,
               cropped: bool = False) -> list[Any]:
        """Every face in a photo (box, detector score, 5 landmarks, all in the photo's pixel frame), no
        identification and no audit record."""
        return self.pipeline(model).analyse(photo, name=name, cropped=cropped).faces

    def check_photo(self, photo: PhotoSource, *, model: FacePipeline | None = None, name: str | None = None,
                    on_multiple: str = "error") -> PhotoCheck:
        """Look at a photo before enrolling it: its faces with their quality problems, and whether enrolment
        would store it (verdict ``ok``, ``no face``, ``several faces`` or ``duplicate``). Stores nothing and
        records nothing. See :mod:`facedb.faces.precheck`."""
        from .faces.precheck import check_photo

        def owner_of(sha256: str) -> str | None:
            with self._lock:
                return self.store.image_owner(sha256)

        return check_photo(self.pipeline(model), photo, owner_of, name=name, on_multiple=on_multiple)

    def search(self, photo: PhotoSource, *, model: FacePipeline | None = None, k: int = 5,
               threshold: float | None = None, name: str | None = None, cropped: bool = False) -> list[FaceMatch]:
        """Identify every face in a photo: one FaceMatch per face (an empty list when there is none).
        ``cropped``: the photo is a face crop (see :func:`facedb.faces.pipeline.find_faces`)."""
        check_k(k)
        threshold = None if threshold is None else check_threshold(threshold)
        for attempt in (1, 2):  # a second time only when the database moved to another model meanwhile
            pipe = self.pipeline(model)
            analysed = pipe.analyse(photo, name=name, cropped=cropped)
            if not analysed.faces:
                return []
            crops = analysed.crops(pipe.embedder.align)
            with timings.stage("embed"):  # a query photo's faces, one batch (enrolment's are not timed here)
                vectors = self._protect(pipe.embed_crops(crops, flip=self.flip))
            try:
                answers, settings = self._identify(vectors, k, threshold, made_by=pipe.model_id)
                break
            except ModelChangedError:
                if attempt == 2 or hasattr(photo, "read"):  # a file object cannot be read twice
                    raise
        thumbs = _thumbnails(crops, settings.thumbnails, "probe", "visitor")
        self.trail.record("search", [
            {"image_sha256": analysed.photo.sha256, "identity": a.identity, "similarity": a.similarity,
             "threshold": a.threshold, "detail": {"box": [round(c, 1) for c in face.box], "rule": a.rule},
             "vector": v,
             "thumbnail": t} for face, a, v, t in zip(analysed.faces, answers, vectors, thumbs)], settings)
        self.visitor_log.keep([{"identity": a.identity, "similarity": a.similarity, "vector": v,
                                "image_sha256": analysed.photo.sha256, "box": face.box, "det_score": face.score,
                                "thumbnail": t}
                               for face, a, v, t in zip(analysed.faces, answers, vectors, thumbs)], settings)
        return [FaceMatch(image=analysed.photo.name, box=[round(c, 1) for c in face.box],
                          det_score=round(face.score, 4), identity=a.identity, similarity=a.similarity,
                          distance=a.distance, threshold=a.threshold, candidates=a.candidates,
                          external_id=a.external_id, rule=a.rule, score=a.score,
                          score_threshold=a.score_threshold)
                for face, a in zip(analysed.faces, answers)]

    def enroll(self, name: str, photos: Sequence[PhotoSource], **options: Any) -> EnrollReport:
        """Enrol photos of ``name`` (created if new): one face per photo, one transaction per photo. The
        options are :meth:`enroll_many`'s."""
        return self.enroll_many([(name, list(photos))], **options)

    def enroll_many(self, batches: Sequence[tuple[str, Sequence[PhotoSource]]], *,
                    model: FacePipeline | None = None, on_multiple: str | FaceChoice = "error",
                    on_other_match: str = "warn", metadata: dict[str, Any] | None = None,
                    people_metadata: dict[str, dict[str, Any]] | None = None, progress: Any = None,
                    batch_size: int = 16, workers: int | None = 0, cropped: bool = False) -> EnrollReport:
        """Enrol several people: ``[(name, photos), ...]``. Faces are embedded in batches across photos.

        A photo that fails (unreadable, no face, several faces under ``on_multiple="error"``, already
        enrolled: known from its bytes' hash before detection) is skipped with its reason and never stops
        the others. ``on_multiple``: ``error`` (skip the photo), ``largest`` or ``skip``. ``on_other_match``:
        a face that matches *another* enrolled person at or above the threshold is enrolled with a warning
        (``warn``), skipped (``refuse``) or enrolled silently (``allow``). ``metadata`` goes to every person,
        ``people_metadata[name]`` to one. ``cropped``: the photos are face crops (badge photos, a camera's own
        detections; see :func:`facedb.faces.pipeline.find_faces`). Detection runs beside the embedder: in a thread
        by default, or in ``workers`` spawned processes (see :func:`facedb.faces.pipeline.prepared_chunks`; a script
        doing this must guard its entry point with ``if __name__ == "__main__":``); ``None`` = as many as suit
        the job.

        Interrupted (KeyboardInterrupt), it stops promptly and the exception carries ``report``: what was
        stored so far (each photo is its own transaction, so nothing is half stored).
        """
        from .faces.pipeline import face_choice, prepared_chunks

        choice = face_choice(on_multiple)
        batch_size = check_count(batch_size, "batch_size", 1)
        if choice.value == "all":  # clustering's rule: enrolment stores one face per photo
            raise InvalidInputError("enrolment takes one face per photo: on_multiple is error, largest or skip")
        if on_other_match not in ON_OTHER_MATCH:
            raise InvalidInputError(f"on_other_match is one of {', '.join(ON_OTHER_MATCH)}")
        if self.readonly:
            raise DatabaseError(f"{self.root} is open read-only: cannot enrol")
        from .gallery.store import check_name

        # Every name and every person's data is checked before any photo is read: bad input changes nothing.
        names = {check_name(name) for name, _ in batches}
        per_person = self._people_data(names, metadata, people_metadata)
        pipe = self.pipeline(model)
        report = EnrollReport()
        work = [(name, src) for name, srcs in batches for src in srcs]
        done = 0
        try:
            for chunk in prepared_chunks(pipe, work, choice, workers=workers, batch_size=batch_size,
                                         known=self._known_photo, cropped=cropped):
                self._store_chunk(chunk, pipe, on_other_match, per_person, report)
                done += len(chunk)
                if progress is not None:
                    progress(done)
        except KeyboardInterrupt as exc:
            exc.report = report  # type: ignore[attr-defined]
            raise
        self._update_people_data(per_person)
        return report

    def _update_people_data(self, people_data: dict[str, dict[str, Any]]) -> None:
        """Give people of the job who were already enrolled the metadata and external id the job names for
        them (a re-run with ``--people-meta`` stores no photo, but must still update the people)."""
        for name, data in people_data.items():
            if not data:
                continue
            try:
                person = self.store.person(name)
            except PersonNotFoundError:
                continue  # no photo of theirs could be stored: nobody to update
            meta = {k: v for k, v in data.items() if k != "external_id"}
            ext = data.get("external_id")
            if all(person.metadata.get(k) == v for k, v in meta.items()) and ext in (None, person.external_id):
                continue
            self.update_person(name, metadata=meta or None, external_id=ext)

    def _people_data(self, names: set[str], metadata: dict[str, Any] | None,
                     people_metadata: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
        """{name (NFC): metadata to store, with an ``external_id`` key where one is to be set}, checked: metadata
        are JSON objects, and external ids are unique among these people and not another person's."""
        from .gallery.store import _check_metadata

        common = dict(metadata or {})
        _check_metadata(common)
        if "external_id" in common and len(names) > 1:
            raise InvalidInputError("an external id belongs to one person: give it per person (people_metadata / "
                                    "--people-meta), not to everyone")
        out: dict[str, dict[str, Any]] = {}
        for name, meta in (people_metadata or {}).items():
            if not isinstance(meta, dict):
                raise InvalidInputError(f"the metadata of {name!r} must be a JSON object (a dict)")
            _check_metadata(meta)
            out.setdefault(normalise_name(name), {}).update(meta)
        data = {name: {**common, **out.get(name, {})} for name in names}
        owners: dict[str, str] = {}
        for name, meta in data.items():
            ext = meta.get("external_id")
            if ext is None:
                continue
            if not isinstance(ext, str) or not ext:
                raise InvalidInputError(f"the external id of {name!r} must be a non-empty string")
            if ext in owners:
                raise InvalidInputError(f"external id {ext!r} is given to both {owners[ext]!r} and {name!r}")
            owners[ext] = name
            holder = self.store.people_by_external_ids([ext]).get(ext)
            if holder is not None and holder != name:
                raise InvalidInputError(f"external id {ext!r} already belongs to {holder!r}")
        return data

    def _known_photo(self, sha256: str) -> str | None:
        owner = self.store.image_owner(sha256)
        return None if owner is None else f"already enrolled (as {owner!r})"

    def _store_chunk(self, chunk: list[Outcome], pipe: FacePipeline, on_other_match: str,
                     people_data: dict[str, dict[str, Any]], report: EnrollReport) -> None:
        """Embed a chunk's prepared photos in one batch and store each in its own transaction."""
        from .faces.pipeline import Prepared

        report.photos += len(chunk)
        fresh: list[Prepared] = []
        for item in chunk:
            if not isinstance(item, Prepared):
                report.skipped.append(item.skipped)
            else:
                fresh.append(item)
        if not fresh:
            return
        vectors = pipe.embed_crops([item.crop for item in fresh], flip=self.flip)
        for item, vec in zip(fresh, vectors):
            name = normalise_name(item.name)
            if (reason := self._known_photo(item.sha256)) is not None:  # a copy earlier in this same job
                report.skipped.append(Skipped(item.label, reason))
                continue
            # Checked photo by photo against the gallery as it is now, so that two photos of one face filed
            # under two new names in the same job are caught too.
            try:
                other = self._other_match(name, vec, pipe.model_id) if on_other_match != "allow" else None
            except ModelChangedError as exc:  # moved to another model (reembed) since this photo was embedded
                report.skipped.append(Skipped(item.label, str(exc)))
                continue
            if other is not None:
                note = f"matches {other[0]!r} (similarity {other[1]:.4f} >= threshold {other[2]:.4f})"
                if on_other_match == "refuse":
                    report.skipped.append(Skipped(item.label, f"{note}: not enrolled as {name!r}"))
                    continue
                report.warnings.append(Skipped(item.label, f"{note}, enrolled as {name!r} anyway"))
            meta = dict(people_data.get(name, {}))
            external_id = meta.pop("external_id", None)
            with _interrupt_after():  # a photo stored is also counted and audited, even if Ctrl-C comes now
                try:
                    ids = self._add_templates(name, vec, boxes=[item.face.box], det_scores=[item.face.score],
                                              image=item.image, create=True, metadata=meta or None,
                                              external_id=external_id,
                                              thumbnails=_thumbnails([item.crop], self.settings().thumbnails,
                                                                     "template"), made_by=pipe.model_id)
                except (InvalidInputError, ModelMismatchError, DuplicatePersonError) as exc:
                    report.skipped.append(Skipped(item.label, str(exc)))
                    continue
                report.template_ids.extend(ids)
                report.faces_stored += len(ids)
                if problems := quality.measure(item.crop, item.face.box, item.face.score,
                                               item.face.landmarks).problems:
                    report.quality.append(Skipped(item.label, "stored; may match badly: " + "; ".join(problems)))
                if name not in report.people:
                    report.people.append(name)
                self.trail.record("enroll", [{"image_sha256": item.sha256, "identity": name,
                                              "detail": {"templates": len(ids)}}], self.settings())

    def _other_match(self, name: str, vector: np.ndarray, made_by: str | None = None
                     ) -> tuple[str, float, float] | None:
        """The best-matching enrolled person other than ``name`` (NFC), if they reach the threshold:
        (their name, similarity, threshold). ``made_by``: the model that made ``vector`` (see :meth:`_identify`)."""
        answers, settings = self._identify(self._protect(np.asarray(vector, dtype=np.float32)[None]), 2, None,
                                           made_by=made_by)
        other = next((c for c in answers[0].candidates if c.name != name), None)
        if other is None or other.similarity < settings.threshold:
            return None
        return other.name, other.similarity, settings.threshold

    # -------------------------------------------------------------------------------------------------- audit
    def configure_audit(self, *, enabled: bool | None = None, retention_days: float | None = None,
                        store_probes: bool | None = None, store_embeddings: bool | None = None,
                        sync: bool | None = None) -> AuditSettings:
        """Switch the audit trail on or off, set its retention (days; 0 = keep forever), whether probe
        embeddings are stored with each decision (off by default: they are biometric data), and whether each
        decision's record is committed before its answer (``sync``) or by the background writer within 20 ms
        after it (see ``audit.py`` and README "Guarantees"). ``store_embeddings`` is the older name of
        ``store_probes``."""
        rows = Settings.audit_rows(enabled, retention_days, store_probes if store_probes is not None
                                   else store_embeddings, sync)
        if rows:
            with self._lock:
                before = self.settings()
                changed = {k: v for k, v in Settings.parse({**self.store.all_meta(), **rows}).audit.to_dict().items()
                           if v != before.audit.to_dict()[k]}
                record = [{"detail": changed}] if changed else []
                # Recorded while the trail is on: before switching it off, after switching it on.
                self.trail.record("audit-settings", record, before)
                self.store.set_meta(rows)
                if before.audit.enabled is False:
                    self.trail.record("audit-settings", record, self.settings())
        return self.audit_settings()

    def audit_settings(self) -> AuditSettings:
        return self.settings().audit

    def audit(self, since: str | datetime | None = None, limit: int | None = None, *,
              until: str | datetime | None = None, operation: str | Sequence[str] | None = None,
              actor: str | None = None, offset: int = 0, identity: str | None = None, decided: bool | None = None,
              after_id: int | None = None, newest_first: bool = False) -> list[AuditRecord]:
        """The audit trail, oldest first (or ``newest_first``), filtered by time (``since`` inclusive, ``until``
        exclusive: an ISO 8601 time with any offset, ``Z``, ``+05:30``, ``-08:00``, naive = UTC; a ``datetime``;
        or an age like ``7d``, compared as instants), operation (one, or any of several), actor, ``identity`` (a
        name as recorded), ``decided`` (True: an identity was given; False: unknown or rejected) and
        ``after_id`` (records after that one: a live view's next poll), paged. InvalidInputError for a time
        that is none of these."""
        limit = None if limit is None else check_count(limit, "limit", 1)
        offset = check_count(offset, "offset")
        since, until = utc_time(since, "since"), utc_time(until, "until")  # refused before the trail is flushed
        with self._lock:
            return self.trail.read(since, limit, until=until, operation=operation, actor=actor, offset=offset,
                                   identity=identity, decided=decided, after_id=after_id, newest_first=newest_first)

    # ----------------------------------------------------------------------------------------- thumbnails
    def configure_thumbnails(self, mode: str) -> str:
        """Which face thumbnails this database keeps: ``off``, ``enrolled`` or ``all`` (see
        :mod:`facedb.gallery.thumbnails`). Narrowing it erases the thumbnails no longer covered, from every file of the
        database as a removal does. Faces stored before it was widened get none. Returns the new setting."""
        from .gallery import thumbnails

        mode = thumbnails.check_mode(mode)
        if self.readonly:
            raise DatabaseError(f"{self.root} is open read-only: cannot change settings")
        with self._lock:
            old = self.settings().thumbnails
            gone = thumbnails.dropped(old, mode)
            with self._erasing():
                self.store.set_meta({"thumbnails": mode})
                erased = self.store.drop_thumbnails(gone)
            self.trail.record("thumbnails-settings", [{"detail": {"from": old, "to": mode, "erased": erased}}],
                              self.settings())
            return mode

    def count_thumbnails(self) -> dict[str, int]:
        """How many thumbnails are kept, by kind (template, probe, visitor), decision records still waiting for
        the background writer included."""
        with self._lock:
            self.trail.flush()
            return self.store.count_thumbnails()

    def thumbnail(self, kind: str, owner_id: int) -> bytes | None:
        """The face thumbnail (JPEG bytes) of a template (``kind`` "template"), of an audit record's probe
        ("probe") or of a kept unknown face ("visitor"), or None when none is kept."""
        with self._lock:
            return self.store.thumbnail(kind, owner_id)

    def cover_templates(self, names: Sequence[str]) -> dict[str, int]:
        """{name: id of the person's first template with a thumbnail} for those of ``names`` that have one. A
        name no longer enrolled is left out, not an error: the names come from a list read a moment before, and
        another process may have removed someone since (a list of people must not fail for that)."""
        with self._lock:
            found = []
            for n in names:
                with contextlib.suppress(PersonNotFoundError):
                    found.append(self.store.person(n))
            people = {p.id: p.name for p in found}
            return {people[pid]: tid for pid, tid in self.store.cover_templates(list(people)).items()}

    def note(self, operation: str, *, identity: str | None = None, detail: dict[str, Any] | None = None,
             image_sha256: str | None = None) -> None:
        """Append one audit record for something an interface did that FaceDB does not record by itself (a
        read over HTTP, a refused request), by the current actor."""
        with self._lock:
            self.trail.record(operation, [{"identity": identity, "detail": detail, "image_sha256": image_sha256}],
                              self.settings())

    # ------------------------------------------------------------------------------ API keys and webhooks
    def create_api_key(self, scope: str, name: str | None = None,
                       grants: Sequence[str] | None = None) -> tuple[ApiKey, str]:
        """Make an API key for the service (scope ``identify``, ``enroll``, ``admin`` or ``metrics``: GET /metrics
        only; ``grants``, for identify keys: ``candidates``); returns its record and the key itself, which is
        stored nowhere (only its hash).
        See ``facedb/operations/keys.py``."""
        from .operations import keys

        with self._lock:
            key, secret = keys.create(self.store, scope, name, grants)
            self.trail.record("key-create", [{"detail": {"key": key.id, "scope": key.scope, "name": key.name,
                                                         "grants": list(key.grants)}}], self.settings())
            return key, secret

    def api_keys(self) -> list[ApiKey]:
        """Every API key, revoked ones too, oldest first (never the keys themselves)."""
        from .operations.keys import ApiKey

        with self._lock:
            return [ApiKey.from_row(r) for r in self.store.api_keys()]

    def revoke_api_key(self, ref: str) -> ApiKey:
        """Revoke a key by id or by name (NotFoundError if none); its next request is refused, in every process."""
        from .operations.keys import ApiKey

        with self._lock:
            key = ApiKey.from_row(self.store.revoke_api_key(ref))
            self.trail.record("key-revoke", [{"detail": {"key": key.id, "name": key.name}}], self.settings())
            return key

    def start_console_session(self, token_hash: str, key_id: str, *, now: float, idle_s: float,
                              absolute_s: float) -> None:
        """Store a console sign-in session (the SHA-256 of its token; facedb/service/console/session.py) for the
        key ``key_id``, forgetting sessions past their idle or absolute expiry; recorded as ``console-sign-in``."""
        with self._lock:
            self.store.add_console_session(token_hash, key_id, now, now - absolute_s, now - idle_s)
            self.trail.record("console-sign-in", [{"detail": {"key": key_id}}], self.settings())

    def touch_console_session(self, token_hash: str, now: float) -> None:
        """A console session was used at ``now`` (Unix seconds): its idle expiry starts again."""
        with self._lock:
            self.store.touch_console_session(token_hash, now)

    def end_console_session(self, token_hash: str, reason: str = "console-sign-out") -> bool:
        """End a console session (sign-out: recorded as ``reason``; an expired one found on use); whether there
        was one."""
        with self._lock:
            ended = self.store.remove_console_session(token_hash)
            if ended and reason:
                self.trail.record(reason, [{}], self.settings())
            return ended

    def authenticate(self, presented: str | None) -> ApiKey:
        """The live key ``presented`` is, or AuthenticationError (saying nothing about why)."""
        from .operations import keys

        with self._lock:
            return keys.authenticate(self.store, presented)

    def add_webhook(self, url: str, events: str | Sequence[str], *, key_id: str | None = None,
                    secret: str | None = None) -> Webhook:
        """Register a webhook for ``events`` (names or a comma-separated string; see ``facedb/operations/hooks.py``),
        for one key's requests or (``key_id`` None) the whole database. The signing secret is made unless given;
        it is on the returned record (``.secret``) and not in its ``to_dict()``."""
        from .operations.hooks import Webhook, check_events, check_url, new_secret

        url, names = check_url(url), check_events(events)
        if secret is not None and (not isinstance(secret, str) or len(secret) < 16):
            raise InvalidInputError("a webhook secret is at least 16 characters")
        with self._lock:
            hook = Webhook.from_row(self.store.add_webhook(url, names, secret or new_secret(), key_id))
            self.trail.record("hook-add", [{"detail": {"hook": hook.id, "url": url, "events": names,
                                                       "key": key_id}}], self.settings())
            return hook

    def webhooks(self) -> list[Webhook]:
        """Every webhook, with its secret on the record."""
        from .operations.hooks import Webhook

        with self._lock:
            return [Webhook.from_row(r) for r in self.store.webhooks()]

    def remove_webhook(self, hook_id: int) -> Webhook:
        from .operations.hooks import Webhook

        with self._lock:
            hook = Webhook.from_row(self.store.remove_webhook(hook_id))
            self.trail.record("hook-remove", [{"detail": {"hook": hook.id, "url": hook.url}}], self.settings())
            return hook

    # --------------------------------------------------------------------------------------------- clustering
    def cluster_threshold(self, rule: str | None = None) -> tuple[float, str]:
        """The default clustering threshold (cosine similarity) for ``rule`` and where it comes from: derived
        from the database's threshold (see :func:`facedb.operations.cluster.default_threshold`)."""
        from .operations import cluster as clustering

        s = self.settings()
        rule = rule or clustering.DEFAULT_RULE
        value = clustering.default_threshold(s.threshold, rule)
        return value, f"{rule} default from the database's threshold {s.threshold:.4f} ({s.threshold_source})"

    def cluster(self, photos: Sequence[PhotoSource], *, threshold: float | None = None, rule: str = "average",
                k: int = 10, min_size: int = 2, seed: int = 0, model: FacePipeline | None = None,
                workers: int | None = 0, progress: Any = None) -> ClusterReport:
        """Group every face in ``photos`` by identity (nobody needs to be enrolled): a ClusterReport with the
        clusters (largest first, each with its central face), the faces left unclustered and the photos that
        gave no face. Faces are embedded as this database embeds (its model and flip setting); ``threshold``
        (cosine similarity) defaults to :meth:`cluster_threshold`. Reads nothing from and writes nothing to the
        gallery; :meth:`enroll_clusters` stores the result on request. See :mod:`facedb.operations.cluster` for the
        rules."""
        from .operations.photo_clusters import cluster_photos

        if threshold is None:
            threshold, source = self.cluster_threshold(rule)
        else:
            threshold, source = check_threshold(threshold), "given"
        return cluster_photos(self.pipeline(model), photos, flip=self.flip, threshold=threshold,
                              threshold_source=source, rule=rule, k=k, min_size=min_size, seed=seed,
                              workers=workers, progress=progress)

    def enroll_clusters(self, report: ClusterReport, prefix: str = "cluster-") -> list[tuple[str, list[int]]]:
        """Store every cluster of a :meth:`cluster` report as a new person (``cluster-0001``, ... to rename
        later), in one transaction; returns (name, template ids) per cluster."""
        from .operations.photo_clusters import enroll_clusters

        if self.readonly:
            raise DatabaseError(f"{self.root} is open read-only: cannot enrol")
        if report.vectors is not None and len(report.vectors):
            as_unit_rows(report.vectors, self.dim)  # another model's report: ModelMismatchError, nothing stored
        with self._lock:
            created = enroll_clusters(self.store, report, prefix)
            settings = self.settings()
            self.keeper.after_write(settings)
            self.trail.record("enroll", [{"identity": name, "detail": {"templates": len(ids), "from": "cluster"}}
                                         for name, ids in created], settings)
            return created

    def duplicates(self, threshold: float | None = None) -> DuplicatesReport:
        """People who look enrolled twice (under two names), people whose templates split into separate
        groups, and outlier templates: a report, nothing is changed. See :mod:`facedb.operations.duplicates`."""
        from .operations.duplicates import find_duplicates

        with self._lock:
            return find_duplicates(self.store, self.settings(), threshold)

    # ------------------------------------------------------------------------------------------------ visitors
    def configure_visitors(self, *, enabled: bool | None = None,
                           retention_days: float | None = None) -> VisitorSettings:
        """Keep faces answered unknown (``enabled``; off by default) and for how many days (default 30).
        Switching it off keeps what was kept until it expires; :meth:`forget_visitors` erases sooner."""
        rows = Settings.visitor_rows(enabled, retention_days)
        if rows:
            with self._lock:
                self.store.set_meta(rows)
        return self.settings().visitors

    def visitors(self, since: str | datetime | None = None, *, min_size: int = 2, threshold: float | None = None,
                 rule: str | None = None) -> list[VisitorGroup]:
        """Groups of kept unknown faces (at least ``min_size`` faces), most faces first; ``since`` (as
        :meth:`audit` takes it: any offset, naive = UTC, a ``datetime`` or an age) shows only groups last seen
        at or after that instant. Each group's ``id`` is stable while its faces stay the same
        (see :mod:`facedb.operations.visitors`)."""
        from .operations import visitors as visitor_groups
        from .operations.cluster import _check_positive

        min_size = _check_positive(min_size, "min_size")
        since = utc_time(since, "since")  # refused before expired faces are purged: bad input changes nothing
        with self._lock:
            settings = self.settings()
            self.store.purge_unassigned(settings.visitors.retention_days)
            found = visitor_groups.groups(self.store, settings, threshold=threshold, rule=rule, min_size=min_size)
            return visitor_groups.since_filter(found, since)

    def enroll_visitors(self, group: str, name: str, *, threshold: float | None = None,
                        rule: str | None = None) -> Person:
        """Enrol a visitor group (as listed by :meth:`visitors`) as ``name`` (a new or existing person): its faces
        become templates and leave the kept faces, in one transaction. InvalidInputError when the group has
        changed since it was listed (nothing is changed then)."""
        from .gallery.store import check_name
        from .operations import visitors as visitor_groups

        check_name(name)
        if self.readonly:
            raise DatabaseError(f"{self.root} is open read-only: cannot enrol")
        with self._lock:
            settings = self.settings()
            found = visitor_groups.find(self.store, settings, group, threshold=threshold, rule=rule)
            ids = self.store.enroll_unassigned(found.face_ids, name)
            settings = self.settings()
            self.keeper.after_write(settings)
            person = self.store.person(name)
            self.trail.record("enroll", [{"identity": person.name, "detail": {"visitors": group,
                                                                              "templates": len(ids)}}], settings)
            return person

    def forget_visitors(self, group: str, *, threshold: float | None = None, rule: str | None = None) -> int:
        """Erase a visitor group's faces (and any copy of their vectors in the audit trail); returns how many.
        After :meth:`vacuum` no byte of them remains in the database's files."""
        from .operations import visitors as visitor_groups

        if self.readonly:
            raise DatabaseError(f"{self.root} is open read-only: cannot forget")
        with self._lock:
            settings = self.settings()
            found = visitor_groups.find(self.store, settings, group, threshold=threshold, rule=rule)
            n = self.store.forget_unassigned(found.face_ids)
            self.trail.record("forget-visitors", [{"detail": {"visitors": group, "faces": n}}], settings)
            return n

    # -------------------------------------------------------------------------------------------------- index
    def index_state(self) -> IndexState:
        """What the vector index holds now (kind, generation, entries, tombstones, persisted copy)."""
        with self._lock:
            return self.keeper.describe(self.settings())

    def loaded_index(self) -> tuple[int, str] | None:
        """(store generation, kind) of the index this process holds in memory, None before one is loaded. No
        lock and no I/O (a metrics scrape reads it beside running queries): a snapshot that a query may move
        on a moment later. The index catches up with the store before each query, so a generation behind the
        store's means this process has had no query since those changes, not that it answered from them."""
        gallery = self.keeper.gallery
        return None if gallery is None else (int(gallery.generation), str(gallery.index.kind))

    def load_index(self, *, wait: bool = False) -> IndexState:
        """Bring the index into memory now, level with the store (a service does this at start-up, so that
        its first query does not pay for it). ``wait``: also wait until the exact re-scoring vectors are in
        memory (kinds that do not keep them read the store until then; ``facedb/gallery/vectors.py``)."""
        with self._lock:
            settings = self.settings()
            gallery = self.keeper.current(settings)
            vectors = gallery.vectors
        if wait and vectors is not None:
            vectors.wait()
        with self._lock:
            return self.keeper.describe(self.settings())

    def save_index(self) -> None:
        """Persist the index now (it is otherwise saved on close when it lags the store)."""
        with self._lock:
            settings = self.settings()
            self.keeper.current(settings)
            self.keeper.save(settings, force=True)

    def rebuild_index(self) -> int:
        """Rebuild the index from the store and save it; returns the number of templates indexed."""
        with self._lock:
            return len(self.keeper.rebuild(self.settings()).index)

    def reindex(self, kind: str, params: dict[str, Any] | None = None,
                index_options: dict[str, Any] | None = None) -> ReindexReport:
        """Change the index kind (see ``facedb.gallery.index.index_kinds()``, or auto) and its parameters, and rebuild.
        ``index_options``: where a remote kind keeps it (``milvus_uri``, ``milvus_collection``; stored) and its
        ``milvus_token`` (not stored). If the rebuild fails (an unreachable server...), the database keeps its
        former index settings."""
        params = check_index_params(kind, params)
        options = dict(index_options or {})
        with self._lock:
            before = self.store.all_meta()
            rows = {**Settings.index_rows(kind, params), **_option_rows(kind, options, self.settings())}
            if not before.get("database_id"):
                rows["database_id"] = secrets.token_hex(16)  # a database made before remote indexes existed
            self._given_options.update(_secrets_of(options))
            old_place, old_kind = self.keeper.place, (self.settings().index_stamp or {}).get("kind")
            self.store.set_meta(rows)
            self.keeper.place = replace(self.keeper.place, options=self._index_options())
            try:
                gallery = self.keeper.rebuild(self.settings())
            except BaseException:
                self.store.set_meta({k: before.get(k, "") for k in rows})
                self.keeper.place = replace(self.keeper.place, options=self._index_options())
                self.keeper.forget()
                raise
            self._drop_moved(old_kind, old_place, kind)
            report = ReindexReport(index_kind=kind, built=gallery.index.kind, params=gallery.index.params,
                                   indexed=len(gallery.index))
            self.trail.record("reindex", [{"detail": {"kind": kind, "params": params}}], self.settings())
            return report

    def _drop_moved(self, old_kind: str | None, old_place: Any, kind: str) -> None:
        """After a remote index moved to another place of the same kind (another collection or server), drop
        the one it left, so that no template stays behind there (a move to another kind is the keeper's)."""
        if old_kind != kind or old_kind is None or not backend_for(old_kind).write_through:
            return
        keys = ("milvus_uri", "milvus_collection")
        if all(old_place.options.get(k) == self.keeper.place.options.get(k) for k in keys):
            return
        try:
            backend_for(old_kind).discard(old_place)
        except IndexUnavailableError as exc:
            warnings.warn(f"the index moved, but its former collection could not be dropped (drop it by hand): {exc}",
                          stacklevel=3)

    def reembed(self, model_id: str, *, photos: str | os.PathLike[str] | None = None, crops: bool = True,
                drop_unembeddable: bool = False, dry_run: bool = False, weights: str | os.PathLike[str] | None = None,
                model: FacePipeline | None = None, progress: Any = None) -> ReembedReport:
        """Move the database to another embedding model ``model_id`` (all or nothing): every photo template made
        again by the new model from the photos in ``photos`` (``<folder>/<person>/<photos>``, recognised by their
        bytes) first, else from its kept face thumbnail (``crops``); the new model's id, dimension, thresholds and
        decision rule as ``facedb init`` sets them; mean templates recomputed; the index rebuilt; recorded in the
        audit trail. Templates that can be made from neither refuse the move (UnembeddableError naming them and
        why; nothing changed) unless ``drop_unembeddable`` (they are erased; their people stay). ``dry_run``:
        compute and report, change nothing. ``model``: the new model's face pipeline (else loaded, with
        ``weights``); ``progress(done, total)``: called as templates are made. InvalidInputError for an unknown
        model, a person folder naming no one enrolled, or the model in use; ModelUnavailableError for missing
        weights; DatabaseError read-only. See :mod:`facedb.operations.reembed` and README "Moving a database to another
        model"."""
        from .operations.reembed import move

        return move(self, model_id, photos=Path(photos) if photos is not None else None, use_crops=crops,
                    drop_unembeddable=drop_unembeddable, dry_run=dry_run,
                    weights=Path(weights) if weights is not None else None, model=model, progress=progress)

    def backup(self, dest: str | os.PathLike[str], *, with_index: bool = False) -> BackupReport:
        """An online, consistent copy of this database in the new directory ``dest`` while it keeps answering and
        writing (SQLite's backup API; encrypted stays encrypted, and the manifest names the key it needs; the index
        only ``with_index``): see ``facedb/operations/backup.py``. Recorded in the audit trail. DatabaseExistsError if
        ``dest`` exists and is not empty."""
        from .operations import backup

        report = backup.backup(self, Path(dest), with_index=with_index)
        with self._lock:
            self.trail.record("backup", [{"detail": {"to": report.path, "people": report.people,
                                                     "templates": report.templates}}], self.settings())
        return report

    @classmethod
    def restore(cls, src: str | os.PathLike[str], path: str | os.PathLike[str], *, key: object = None,
                replace: bool = False) -> BackupReport:
        """Restore the backup at ``src`` as the database ``path``, after checking it (manifest, SHA-256, key,
        integrity, model, schema); ``replace`` moves an existing database aside, refused while any process has it
        open. The restored database records the restore in its audit trail and passes ``check`` (run here;
        DatabaseError otherwise). A database indexed in a shared engine (Milvus) comes back pointing at the same
        collection, which may have seen writes the backup lacks: IndexUnavailableError then says that the files
        are in place and how to give the database an index of its own. See ``facedb/operations/backup.py``."""
        from .operations import backup

        root = Path(path).resolve()  # "." would name the directory moved aside (the process's cwd goes with it)
        report = backup.restore(Path(src), root, key=key, replace=replace)
        with cls.open(root, key=key) as db:  # recorded first: the files are in place whatever the check says
            db.trail.record("restore", [{"detail": {"from": str(src), "backup_created_at": report.created_at}}],
                            db.settings())
            try:
                result = db.check()
            except IndexUnavailableError as exc:
                raise IndexUnavailableError(
                    f"{path}: restored (the backup's files are in place), but its index is not usable as it is: "
                    f"{exc}. To replace the original, `facedb --db {path} rebuild-index`; to run beside it, give "
                    f"it a collection of its own: `facedb --db {path} reindex --index milvus --milvus-collection "
                    "NAME`") from None
            if not result.ok:
                raise DatabaseError(f"{path}: the restored database fails its check: {result.problems[0]}")
        return report

    def vacuum(self) -> None:
        """Compact the store (drop its free pages, so the file shrinks) and rewrite the index's persisted copy.
        Erasure no longer needs it: ``remove`` already leaves no byte of the removed templates in any file
        (zeroed pages, rewritten index file, truncated WAL). What it still does: give the space back, and
        truncate a WAL that readers kept from being truncated at a removal (an ErasureWarning said so)."""
        with self._lock:
            self.store.purge_unassigned(self.settings().visitors.retention_days)
            self.store.vacuum()
            settings = self.settings()
            self.keeper.current(settings)
            self.keeper.save(settings, force=True)
            self.store.vacuum()  # the stamp update above went through the WAL: truncate it again

    # --------------------------------------------------------------------------------------------- inspection
    def calibration_warning(self, settings: Settings | None = None) -> str | None:
        """A warning when the decision rule in force was not calibrated for the current gallery size.

        In 1:N search the chance that some stranger scores above the threshold grows with the gallery. The
        gallery rule follows it; a fixed threshold does not: warned about when the impostor model predicts
        an FPIR over twice the target (1% unless calibrated otherwise) at today's gallery, or, without one,
        when the gallery has grown past twice the size an FPIR threshold was calibrated for.
        """
        s = settings or self.settings()
        if (s.rule.kind == "gallery" and s.rule.impostors is not None) or (s.rule.kind == "margin"
                                                                          and s.rule.margin is not None):
            return None  # both rules hold their FPIR as the gallery grows
        templates = self.store.counts()["templates"]
        cal = s.calibration
        target = cal.target_rate if cal is not None and cal.target == "fpir" else s.rule.target
        impostors = s.rule.impostors or self._shipped_impostors(s)
        if impostors is not None and templates > 1 and (cal is None or cal.target != "fpir"):
            fpir = predicted_fpir(impostors, s.threshold, templates)
            if fpir > 2 * target:
                return (f"with {templates} templates enrolled, the fixed threshold {s.threshold:.4f} lets about "
                        f"{fpir:.0%} of strangers be identified as someone: use the gallery rule (`facedb rule "
                        f"gallery`) or calibrate for 1:N (`facedb calibrate --fpir ...`)")
            return None
        if cal is None or cal.target != "fpir" or not cal.gallery_size:
            if cal is not None and cal.target == "far" and self.store.count_people() > 1:
                return (f"the threshold was calibrated for 1:1 (FAR {cal.target_rate:g}); with "
                        f"{self.store.count_people()} people enrolled a stranger has that many chances: calibrate "
                        "for 1:N (`facedb calibrate --fpir ...`)")
            return None
        people = self.store.count_people()
        if people > 2 * cal.gallery_size:
            return (f"the threshold was calibrated for FPIR {cal.target_rate} at {cal.gallery_size} people; the "
                    f"gallery now has {people}: recalibrate (`facedb calibrate --fpir ...`)")
        return None

    @staticmethod
    def _shipped_impostors(s: Settings) -> ImpostorModel | None:
        """The impostor model the database's model ships (for warnings on databases made before it existed)."""
        from .faces.models import MODELS

        spec = MODELS.get(s.model_id)
        return spec.impostor_model(s.flip) if spec is not None else None

    def policy_in_force(self) -> tuple[Policy, int]:
        """(the decision policy a query without a given threshold is held to now, the number of templates it is
        held to it for: every template searched, mean templates included)."""
        with self._lock:
            return self._policy(self.settings(), self.store.counts())

    @staticmethod
    def _policy(s: Settings, counts: dict[str, int]) -> tuple[Policy, int]:
        templates = counts["templates"] + counts["mean_templates"]  # as the query engine counts its gallery
        return s.rule.policy(s.threshold, templates), templates

    def stats(self) -> Stats:
        with self._lock:
            s = self.settings()
            state = self.keeper.describe(s)
            counts = self.store.counts()
            in_force = self._policy(s, counts)[0].threshold
            return Stats(
                path=str(self.root), model_id=s.model_id, dim=s.dim, metric=s.metric, flip=s.flip,
                threshold=s.threshold, threshold_source=s.threshold_source,
                calibration=s.calibration.to_dict() if s.calibration else None, decision_rule=s.rule.kind,
                decision_target=s.rule.target, decision_margin=s.rule.margin, threshold_in_force=in_force,
                index_kind=s.index_kind,
                index_built=(s.index_stamp or {}).get("kind"), index_params=(s.index_stamp or {}).get("params"),
                people=counts["people"], images=counts["images"], templates=counts["templates"],
                mean_templates=counts["mean_templates"], mean_templates_enabled=s.mean_templates,
                people_with_one_template=self.store.people_with_templates(1), generation=s.generation,
                index_file_bytes=state.persisted_bytes, index_file_generation=state.persisted_generation,
                schema_version=SCHEMA_VERSION, created_at=s.created_at, audit=s.audit.to_dict(),
                warnings=[w for w in [self.calibration_warning(s)] if w],
                encrypted=self.encrypted, cancellable=bool(s.extra.get("projection_seed")), detector=s.detector,
                key_version=self.protection.key_version if self.protection else None,
                data_key_version=self.protection.data_key_version if self.protection else None,
                plaintext_files=encryption.plaintext_files(self.root, self.encrypted))

    def check(self) -> CheckReport:
        """Verify the store, that the index agrees with it exactly, and that the query path finds stored
        templates as their own best match. See README "facedb check"."""
        with self._lock:
            checks, problems = self.store.check()
            try:
                settings = self.settings()
                more_checks, more_problems = self.keeper.verify(settings)  # (heals a damaged index file first)
                checks += more_checks
                problems += more_problems
                if self.protection is not None:
                    checks.append(f"encrypted at rest (key version {self.protection.key_version}, data key version "
                                  f"{self.protection.data_key_version}): no plain-text file in the database directory")
                    problems += [f"plain-text file in an encrypted database: {f}"
                                 for f in encryption.plaintext_files(self.root, True)]
                else:
                    checks.append("not encrypted: the database's files hold templates in plain text (`facedb encrypt`)")
                checks.append("no removal awaits its erasure from the files")
                if self.store.erasure_pending() and not self._erasure_under_way():
                    problems.append("a removal's erasure from the index file did not finish (a process was killed "
                                    "after the removal: the next writable open finishes it)")
                gallery = self.keeper.current(self.settings())
                checks.append(f"up to {CHECK_PROBES} stored templates are found as their own best match")
                _, ids, _ = self.store.template_map()
                if len(ids):
                    sample = np.random.default_rng(0).choice(ids, size=min(CHECK_PROBES, len(ids)), replace=False)
                    sids, _, vecs = self.store.templates(sample)
                    missed = engine.self_match_misses(gallery, vecs, self._fetch(gallery))
                    if missed:
                        problems.append(f"{missed} of {len(sids)} sampled templates are not found by the index")
            except DatabaseError as exc:  # a damaged store: what was found so far is the report
                problems.append(f"the index could not be checked against the store: {exc}")
            return CheckReport(ok=not problems, checks=checks, problems=problems)


def _option_rows(kind: str, options: dict[str, Any], settings: Settings | None = None) -> dict[str, str]:
    """The ``meta`` rows for a kind's index options (validated; never the token). A remote kind needs a URI,
    given now or stored before."""
    rows = check_index_options(options)
    if kind == "milvus":
        if "milvus_uri" not in rows and not (settings and settings.index_options.get("milvus_uri")):
            raise InvalidInputError("the milvus index needs a URI: --milvus-uri http://host:19530 (a server or "
                                    "cluster) or a path ending in .db (Milvus Lite)")
        if "milvus_collection" not in rows and not (settings and settings.index_options.get("milvus_collection")):
            rows["milvus_collection"] = check_index_options({"milvus_collection": "facedb"})["milvus_collection"]
    return rows


def _secrets_of(options: dict[str, Any], uri_too: bool = False) -> dict[str, Any]:
    """The options a process holds but never stores: the token (and, at open, a URI override)."""
    keep = ("milvus_token", "milvus_uri") if uri_too else ("milvus_token",)
    out = {k: v for k, v in options.items() if k in keep and v}
    if "milvus_uri" in out:
        out["milvus_uri"] = check_index_options({"milvus_uri": out["milvus_uri"]})["milvus_uri"]
    return out


def _thumbnails(crops: Sequence[np.ndarray], mode: str, *kinds: str) -> list[bytes | None]:
    """A JPEG thumbnail of each aligned crop when the setting ``mode`` keeps any of ``kinds``, else Nones."""
    from .gallery import thumbnails

    if not any(thumbnails.keeps(mode, k) for k in kinds):
        return [None] * len(crops)
    return [thumbnails.encode(c) for c in crops]
