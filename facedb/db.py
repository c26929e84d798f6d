"""``FaceDB``: the one object users hold. A facade: each method takes the lock and calls the room that owns the
job, which records what it did in the audit trail. The rooms: the store, the index keeper and the query room
(``gallery/``), the face pipeline (``faces/``), and in ``operations/`` recognition (probe to recorded decision),
enrolment, people (writes), erasure, configure, maintenance, inspection, lifecycle (create, open, close,
encrypt), the audit trail, visitors, clustering, keys, webhooks, backup and reembed (docs "Architecture").
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import records
from .gallery.decision import ImpostorModel, Policy
from .gallery.query import Query
from .gallery.query import verify_rule as verify_rule  # its old place, for the service and scripts
from .gallery.settings import AuditSettings, Calibration, Settings, VisitorSettings
from .gallery.settings_cache import NameCache, SettingsMemo
from .gallery.store import Store
from .gallery.upkeep import IndexKeeper
from .gallery.vectors import budget_bytes
from .operations import (
    backup,
    configure,
    duplicates,
    enrolment,
    erasure,
    hooks,
    inspection,
    keys,
    lifecycle,
    maintenance,
    recognition,
)
from .operations import people as writes
from .operations import visitors as visitor_groups
from .operations.audit import AuditTrail, acting_as, default_actor
from .operations.enrolment import ON_OTHER_MATCH as ON_OTHER_MATCH
from .operations.hooks import Webhook
from .operations.keys import ApiKey
from .operations.maintenance import CHECK_PROBES as CHECK_PROBES
from .operations.visitors import VisitorLog
from .protection import projection

if TYPE_CHECKING:
    from .faces.images import PhotoSource
    from .faces.pipeline import FaceChoice, FacePipeline
    from .operations.backup import BackupReport
    from .operations.reembed import ReembedReport
    from .protection.encryption import ConversionReport
    from .protection.keyring import FileCipher, Protection

STORE_FILE, INDEX_FILE = lifecycle.STORE_FILE, "index.faiss"  # the store's file, the FAISS backend's index file


class FaceDB:
    """An identity database. Open with :meth:`create` or :meth:`open`, preferably as a context manager. Thread-safe:
    one lock serialises calls on the same object; for parallelism use one FaceDB per thread or process."""

    def __init__(self, root: Path, store: Store, readonly: bool = False, weights: Path | None = None,
                 model: FacePipeline | None = None, actor: str | None = None,
                 index_options: dict[str, Any] | None = None, protection: Protection | None = None,
                 rescore_memory_mb: float | None = None) -> None:
        self.root = root
        self.store = store
        self._memo = SettingsMemo(store)  # settings parsed once per change, names cached (settings_cache.py)
        self._names = NameCache(store.names, store.stream_people)
        self.readonly = readonly
        self._weights = weights
        self._model = model
        self._lock = threading.RLock()
        self._given_options = dict(index_options or {})
        self.protection = protection
        self._projection: Any = None  # loaded on first use (cancellable databases)
        self.keeper = IndexKeeper(store, root, readonly=readonly, options=lifecycle.index_options(self),
                                  vector_budget=budget_bytes(rescore_memory_mb))
        self.query = Query(store, self.keeper, self._memo, self._names, self._lock)
        self.trail = AuditTrail(store, actor or default_actor())
        self.visitor_log = VisitorLog(store, self.trail.actor)

    # ---------------------------------------------------------------------------------------------- lifecycle
    @classmethod
    def create(cls, path: str | os.PathLike[str], *, model_id: str, dim: int, threshold: float,
               threshold_source: str = "model default", index: str = "flat", flip: bool = True,
               impostors: ImpostorModel | None = None, margin: float | None = None, rule: str | None = None,
               mean_templates: bool = False, actor: str | None = None,
               index_options: dict[str, Any] | None = None, encrypt: bool = False, key: object = None,
               cancellable: bool = False, thumbnails: str = "enrolled",
               rescore_memory_mb: float | None = None, detector: str = "mtcnn") -> FaceDB:
        """Create an empty database for unit vectors of ``model_id`` (``dim``-d) and open it. ``threshold``: the
        1:1 decision threshold (cosine similarity, higher is stricter). The options: ``operations/lifecycle.py``
        (``Identity``, ``create_store``). InvalidInputError, DatabaseExistsError, IndexUnavailableError,
        ModelMismatchError (a remote index), KeyMissingError: nothing is left behind then."""
        ident = lifecycle.Identity(model_id, dim, threshold, threshold_source, index, flip, impostors, margin, rule,
                                   mean_templates, thumbnails, detector, cancellable)
        made = lifecycle.create_store(Path(path), ident, index_options, encrypt, key, rescore_memory_mb)
        db = cls(Path(path), made.store, actor=actor, index_options=made.given_options, protection=made.protection,
                 rescore_memory_mb=rescore_memory_mb)
        lifecycle.first_index(db, index, made.made)
        return db

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, model_id: str | None = None, readonly: bool = False,
             weights: str | os.PathLike[str] | None = None, model: FacePipeline | None = None,
             actor: str | None = None, index_options: dict[str, Any] | None = None, key: object = None,
             rescore_memory_mb: float | None = None) -> FaceDB:
        """Open an existing database; with ``model_id``, refuse (ModelMismatchError) one of another model.
        ``readonly``: nothing in the gallery can be changed (decisions are still audited). ``key``: an encrypted
        database's key (default ``$FACEDB_KEY``): KeyMissingError, WrongKeyError, TamperedError; nothing changed.
        The other options: :func:`facedb.operations.lifecycle.opened`."""
        return lifecycle.open_database(cls, Path(path), model_id=model_id, readonly=readonly, weights=weights,
                                       model=model, actor=actor, index_options=index_options, key=key,
                                       rescore_memory_mb=rescore_memory_mb)

    def close(self, *, save_index: bool = True) -> None:
        """Write the audit records still waiting, save the index (not with ``save_index=False``), close the store:
        :func:`facedb.operations.lifecycle.close`."""
        with self._lock:
            lifecycle.close(self, save_index)

    def __enter__(self) -> FaceDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def encrypted(self) -> bool:
        """Whether this database is encrypted at rest (docs "Protecting templates")."""
        return self.protection is not None

    @property
    def cancellable(self) -> bool:
        """Whether templates are stored under this database's keyed orthogonal projection (``projection.py``)."""
        return bool(self.store.get_meta("projection_seed"))

    def _protect(self, x: np.ndarray) -> np.ndarray:
        """Vectors ``(n, dim)`` as this database stores and compares them: projected when it is cancellable."""
        if self._projection is None:  # False for a database that is not cancellable
            self._projection = projection.for_seed(self.store.get_meta("projection_seed"), self.dim)
        return self._projection(x) if self._projection else x

    def cache_cipher(self) -> FileCipher | None:
        """The cipher for files outside the database holding its vectors (evaluation caches); None when plain."""
        return self.protection.cache_cipher() if self.protection is not None else None

    @classmethod
    def encrypt(cls, path: str | os.PathLike[str], *, key: object = None) -> ConversionReport:
        """Convert a plain database to an encrypted one under ``key`` (default ``$FACEDB_KEY``), atomically; it must
        be closed everywhere else (DatabaseError otherwise, nothing changed): ``protection/encryption.py``."""
        return lifecycle.encrypt_database(cls, Path(path), key)

    @classmethod
    def rotate_key(cls, path: str | os.PathLike[str], *, key: object = None, new_key: object = None,
                   reencrypt: bool = False) -> ConversionReport:
        """Re-wrap the data key under ``new_key`` (default ``$FACEDB_NEW_KEY``); ``reencrypt``: also re-encrypt under
        a new data key (closed everywhere else). ``key``: the key in use. Wrong or missing keys change nothing."""
        return lifecycle.rotate_database(cls, Path(path), key, new_key, reencrypt)

    # ----------------------------------------------------------------------------------------------- settings
    def settings(self) -> Settings:
        """Every setting, typed: parsed again only when they changed (``gallery/settings_cache.py``)."""
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
        """Store a new default threshold (cosine similarity) and its source: :mod:`facedb.operations.configure`."""
        with self._lock:
            configure.set_threshold(self, threshold, source, calibration, details)

    def set_rule(self, rule: str, *, target: float | None = None, impostors: ImpostorModel | None = None,
                 margin: float | None = None) -> Settings:
        """Choose the open-set decision rule, ``fixed``, ``margin`` or ``gallery``
        (:func:`facedb.operations.configure.set_rule`, :mod:`facedb.gallery.decision`)."""
        with self._lock:
            return configure.set_rule(self, rule, target, impostors, margin)

    def shipped_margin(self) -> float | None:
        """The margin rule's threshold this database's model ships for its flip setting, or None."""
        spec = configure.model_spec(self.model_id)
        return spec.margin_threshold(self.settings().flip) if spec is not None else None

    def configure_templates(self, *, mean: bool) -> Settings:
        """Keep (``mean=True``) or drop each person's mean template; every person's is recomputed at once."""
        with self._lock:
            return configure.set_mean_templates(self, mean)

    def _same_model(self, model_id: str, dim: int) -> None:
        """ModelMismatchError unless ``model_id``/``dim`` are the database's: the one model check."""
        lifecycle.same_model(self, model_id, dim)

    # ------------------------------------------------------------------------------------------------- people
    def add_person(self, name: str, *, external_id: str | None = None,
                   metadata: dict[str, Any] | None = None) -> records.Person:
        """A new person with no templates yet (DuplicatePersonError if the name is taken)."""
        with self._lock:
            return writes.add_person(self, name, external_id, metadata)

    def person(self, name: str) -> records.Person:
        with self._lock:
            return self.store.person(name)

    def people(self, query: str | None = None, *, limit: int | None = None, offset: int = 0) -> list[records.Person]:
        """People in name order, ``query`` keeping names or external ids containing it, paged:
        :func:`facedb.operations.people.people`."""
        return writes.people(self, query, limit, offset)

    def count_people(self, query: str | None = None) -> int:
        with self._lock:
            return self.store.count_people(query)

    def rename_person(self, old: str, new: str) -> records.Person:
        with self._lock:
            return writes.rename(self, old, new)

    def update_person(self, name: str, *, metadata: dict[str, Any] | None = None, replace_metadata: bool = False,
                      external_id: str | None = None, clear_external_id: bool = False) -> records.Person:
        """Change a person's metadata (merged; None deletes a key; all with ``replace_metadata``), external id."""
        with self._lock:
            return writes.update(self, name, metadata, replace_metadata, external_id, clear_external_id)

    def update_metadata(self, name: str, metadata: dict[str, Any]) -> records.Person:
        return self.update_person(name, metadata=metadata)

    def remove_person(self, name: str) -> int:
        """Erase a person (templates, images, metadata, from every file); returns how many templates were removed."""
        with self._lock:
            return writes.remove(self, name)

    def _erasing(self) -> contextlib.AbstractContextManager[None]:
        """A removal's transaction, then its erasure from every file (``operations/erasure.py``)."""
        return erasure.erasing(self)

    def merge_people(self, source: str, target: str) -> int:
        """Move ``source``'s templates and photos to ``target`` and erase ``source``; returns the templates moved."""
        with self._lock:
            return writes.merge(self, source, target)

    # ---------------------------------------------------------------------------------------------- templates
    def add_templates(self, name: str, vectors: object, *, model_id: str | None = None,
                      boxes: Sequence[Sequence[float] | None] | None = None,
                      det_scores: Sequence[float | None] | None = None, image: dict[str, Any] | None = None,
                      create: bool = False, metadata: dict[str, Any] | None = None,
                      thumbnails: Sequence[bytes | None] | None = None) -> list[int]:
        """Store unit vectors ``(dim,)`` or ``(n, dim)`` as templates of ``name`` (one transaction); returns their
        ids. The options: :func:`facedb.operations.people.add_templates`. Recorded (``add-templates``)."""
        with self._lock:
            ids = self._add_templates(name, vectors, model_id=model_id, boxes=boxes, det_scores=det_scores,
                                      image=image, create=create, metadata=metadata, thumbnails=thumbnails)
            return writes.record_added(self, name, ids)

    def _add_templates(self, name: str, vectors: object, **options: Any) -> list[int]:
        """:meth:`add_templates` without its audit record: :func:`facedb.operations.people.add_templates`."""
        return writes.add_templates(self, name, vectors, **options)

    def add_templates_many(self, items: Sequence[tuple[str, object]], *, model_id: str | None = None,
                           create: bool = True) -> int:
        """Bulk import: ``[(name, vectors), ...]`` in one transaction (all or nothing); returns templates added."""
        with self._lock:
            return writes.add_templates_many(self, items, model_id, create)

    def add_embeddings(self, *args: Any, **kwargs: Any) -> list[int]:
        """Deprecated name of :meth:`add_templates`."""
        warnings.warn("add_embeddings is now add_templates", DeprecationWarning, stacklevel=2)
        return self.add_templates(*args, **kwargs)

    def add_embeddings_many(self, *args: Any, **kwargs: Any) -> int:
        """Deprecated name of :meth:`add_templates_many`."""
        warnings.warn("add_embeddings_many is now add_templates_many", DeprecationWarning, stacklevel=2)
        return self.add_templates_many(*args, **kwargs)

    def templates(self, person: str | None = None, *, include_derived: bool = False) -> Iterator[records.Template]:
        """Every stored template (of ``person``), vector ``(dim,)`` float32 unit, in id order; means if asked."""
        return self.store.iter_templates(person, include_derived=include_derived)

    def remove_template(self, template_id: int) -> str:
        """Erase one template (a wrong photo); returns the person it belonged to, who stays enrolled."""
        with self._lock:
            return writes.remove_template(self, template_id)

    # ------------------------------------------------------------------------------------------------ queries
    def identify(self, vectors: object, k: int = 5,
                 threshold: float | None = None) -> records.Identification | list[records.Identification]:
        """Who is this? One Identification per unit vector (``(dim,)``: one, ``(n, dim)``: a list): the top-k people
        by cosine similarity (higher is more alike) and the decision (``identity`` None: unknown): ``recognition``."""
        return recognition.identify(self, vectors, k, threshold)

    def verify(self, probe: object, name: str, threshold: float | None = None, *,
               model: FacePipeline | None = None, cropped: bool = False) -> records.Verification:
        """Is this ``name``? 1:1: accepted iff the best similarity to their photo templates ``>= threshold``.
        ``probe``: a unit vector ``(dim,)`` or a photo (its largest face; NoFaceError without one)."""
        return recognition.verify(self, probe, name, threshold, model, cropped)

    def search(self, photo: PhotoSource, *, model: FacePipeline | None = None, k: int = 5,
               threshold: float | None = None, name: str | None = None,
               cropped: bool = False) -> list[records.FaceMatch]:
        """Identify every face in a photo: one FaceMatch per face (none without faces)."""
        return recognition.search(self, photo, model, k, threshold, name, cropped)

    def policy_in_force(self) -> tuple[Policy, int]:
        """(the policy a query without a given threshold is held to now, the templates it is held to it for)."""
        return self.query.policy_in_force()

    def pipeline(self, model: FacePipeline | None = None, *, weights: Path | None = None) -> FacePipeline:
        """The face pipeline for this database's model: :func:`facedb.operations.recognition.pipeline_for`."""
        return recognition.pipeline_for(self, model, weights)

    def detect(self, photo: PhotoSource, *, model: FacePipeline | None = None, name: str | None = None,
               cropped: bool = False) -> list[Any]:
        """Every face in a photo (box, detector score, 5 landmarks, in the photo's pixels); records nothing."""
        return self.pipeline(model).analyse(photo, name=name, cropped=cropped).faces

    def check_photo(self, photo: PhotoSource, *, model: FacePipeline | None = None, name: str | None = None,
                    on_multiple: str = "error") -> records.PhotoCheck:
        """Whether enrolment would store a photo, and its faces' quality problems; stores and records nothing."""
        return enrolment.check_photo(self, photo, model, name, on_multiple)

    def enroll(self, name: str, photos: Sequence[PhotoSource], **options: Any) -> records.EnrollReport:
        """Enrol photos of ``name`` (created if new); the options are :meth:`enroll_many`'s."""
        return self.enroll_many([(name, list(photos))], **options)

    def enroll_many(self, batches: Sequence[tuple[str, Sequence[PhotoSource]]], *,
                    model: FacePipeline | None = None, on_multiple: str | FaceChoice = "error",
                    on_other_match: str = "warn", metadata: dict[str, Any] | None = None,
                    people_metadata: dict[str, dict[str, Any]] | None = None, progress: Any = None,
                    batch_size: int = 16, workers: int | None = 0, cropped: bool = False) -> records.EnrollReport:
        """Enrol several people, ``[(name, photos), ...]``: one face per photo, one transaction per photo; a photo
        that fails is skipped with its reason. The options: :func:`facedb.operations.enrolment.enroll_many`."""
        return enrolment.enroll_many(self, batches, model=model, on_multiple=on_multiple, on_other_match=on_other_match,
                                     metadata=metadata, people_metadata=people_metadata, progress=progress,
                                     batch_size=batch_size, workers=workers, cropped=cropped)

    def _known_photo(self, sha256: str) -> str | None:
        """Why a photo with these bytes (SHA-256) is not enrolled again, or None: :mod:`.operations.enrolment`."""
        return enrolment.known_photo(self, sha256)

    # -------------------------------------------------------------------------------------------------- audit
    def configure_audit(self, *, enabled: bool | None = None, retention_days: float | None = None,
                        store_probes: bool | None = None, store_embeddings: bool | None = None,
                        sync: bool | None = None) -> AuditSettings:
        """The audit trail's settings: :func:`facedb.operations.configure.set_audit` (``store_embeddings`` is the
        older name of ``store_probes``)."""
        return configure.set_audit(self, enabled, retention_days, store_probes, sync, store_embeddings)

    def audit_settings(self) -> AuditSettings:
        return self.settings().audit

    def audit(self, since: str | datetime | None = None, limit: int | None = None, *,
              until: str | datetime | None = None, operation: str | Sequence[str] | None = None,
              actor: str | None = None, offset: int = 0, identity: str | None = None, decided: bool | None = None,
              after_id: int | None = None, newest_first: bool = False) -> list[records.AuditRecord]:
        """The audit trail, oldest first, filtered and paged: :func:`facedb.operations.inspection.audit`."""
        return inspection.audit(self, since, limit, until=until, operation=operation, actor=actor, offset=offset,
                                identity=identity, decided=decided, after_id=after_id, newest_first=newest_first)

    def note(self, operation: str, *, identity: str | None = None, detail: dict[str, Any] | None = None,
             image_sha256: str | None = None) -> None:
        """Append one audit record, by the current actor, for what an interface did (a read, a refusal)."""
        with self._lock:
            self.trail.record(operation, [{"identity": identity, "detail": detail, "image_sha256": image_sha256}],
                              self.settings())

    def configure_thumbnails(self, mode: str) -> str:
        """Keep ``off``, ``enrolled`` or ``all`` face thumbnails (:mod:`facedb.gallery.thumbnails`); narrowing
        erases the ones no longer covered, as a removal does. Returns the new setting."""
        with self._lock:
            return maintenance.set_thumbnails(self, mode)

    def count_thumbnails(self) -> dict[str, int]:
        """Thumbnails kept by kind (template, probe, visitor), decision records still waiting included."""
        with self._lock:
            self.trail.flush()
            return self.store.count_thumbnails()

    def thumbnail(self, kind: str, owner_id: int) -> bytes | None:
        """The JPEG of a template's, an audit record's probe's or a kept unknown face's thumbnail, or None."""
        with self._lock:
            return self.store.thumbnail(kind, owner_id)

    def cover_templates(self, names: Sequence[str]) -> dict[str, int]:
        """{name: the person's first template with a thumbnail}; names no longer enrolled are left out."""
        with self._lock:
            return writes.cover_templates(self, names)

    # ------------------------------------------------------------------------------ API keys and webhooks
    def create_api_key(self, scope: str, name: str | None = None,
                       grants: Sequence[str] | None = None) -> tuple[ApiKey, str]:
        """A service key (scope ``identify``, ``enroll``, ``admin`` or ``metrics``; ``grants``: ``candidates``) and
        the key itself, stored nowhere (only its hash): ``facedb/operations/keys.py``."""
        with self._lock:
            return keys.create_recorded(self, scope, name, grants)

    def api_keys(self) -> list[ApiKey]:
        """Every API key, revoked ones too, oldest first (never the keys themselves)."""
        with self._lock:
            return [ApiKey.from_row(r) for r in self.store.api_keys()]

    def revoke_api_key(self, ref: str) -> ApiKey:
        """Revoke a key by id or by name (NotFoundError if none); its next request is refused, in every process."""
        with self._lock:
            return keys.revoke_recorded(self, ref)

    def start_console_session(self, token_hash: str, key_id: str, *, now: float, idle_s: float,
                              absolute_s: float) -> None:
        """Store a console sign-in session for ``key_id``: :func:`facedb.operations.keys.start_session`."""
        with self._lock:
            keys.start_session(self, token_hash, key_id, now, idle_s, absolute_s)

    def touch_console_session(self, token_hash: str, now: float) -> None:
        """A console session was used at ``now`` (Unix seconds): its idle expiry starts again."""
        with self._lock:
            self.store.touch_console_session(token_hash, now)

    def end_console_session(self, token_hash: str, reason: str = "console-sign-out") -> bool:
        """End a console session (recorded as ``reason``); whether there was one."""
        with self._lock:
            return keys.end_session(self, token_hash, reason)

    def authenticate(self, presented: str | None) -> ApiKey:
        """The live key ``presented`` is, or AuthenticationError (saying nothing about why)."""
        with self._lock:
            return keys.authenticate(self.store, presented)

    def add_webhook(self, url: str, events: str | Sequence[str], *, key_id: str | None = None,
                    secret: str | None = None) -> Webhook:
        """Register a webhook for ``events``, one key's or (``key_id`` None) the database's; the signing secret is
        made unless given (on ``.secret``, not in ``to_dict()``): ``facedb/operations/hooks.py``."""
        return hooks.add_recorded(self, url, events, key_id, secret)

    def webhooks(self) -> list[Webhook]:
        """Every webhook, with its secret on the record."""
        with self._lock:
            return [Webhook.from_row(r) for r in self.store.webhooks()]

    def remove_webhook(self, hook_id: int) -> Webhook:
        """Remove a webhook by id (NotFoundError if none)."""
        with self._lock:
            return hooks.remove_recorded(self, hook_id)

    # ---------------------------------------------------------------------------------- clustering and visitors
    def cluster_threshold(self, rule: str | None = None) -> tuple[float, str]:
        """The default clustering threshold (cosine similarity) for ``rule``, and where it comes from."""
        from .operations import photo_clusters

        return photo_clusters.threshold_for(self, rule)

    def cluster(self, photos: Sequence[PhotoSource], *, threshold: float | None = None, rule: str = "average",
                k: int = 10, min_size: int = 2, seed: int = 0, model: FacePipeline | None = None,
                workers: int | None = 0, progress: Any = None) -> records.ClusterReport:
        """Group every face in ``photos`` by identity (nobody enrolled; the gallery untouched): a ClusterReport.
        See :func:`facedb.operations.photo_clusters.cluster_for` and :mod:`facedb.operations.cluster`."""
        from .operations import photo_clusters

        return photo_clusters.cluster_for(self, photos, threshold=threshold, rule=rule, k=k, min_size=min_size,
                                          seed=seed, model=model, workers=workers, progress=progress)

    def enroll_clusters(self, report: records.ClusterReport, prefix: str = "cluster-") -> list[tuple[str, list[int]]]:
        """Store every cluster of a :meth:`cluster` report as a new person, in one transaction."""
        from .operations import photo_clusters

        return photo_clusters.enroll_report(self, report, prefix)

    def duplicates(self, threshold: float | None = None) -> records.DuplicatesReport:
        """People who look enrolled twice, split people and outlier templates (:mod:`facedb.operations.duplicates`)."""
        with self._lock:
            return duplicates.find_duplicates(self.store, self.settings(), threshold)

    def configure_visitors(self, *, enabled: bool | None = None,
                           retention_days: float | None = None) -> VisitorSettings:
        """Keep faces answered unknown (``enabled``; off by default) and for how many days (default 30)."""
        with self._lock:
            return configure.set_visitors(self, enabled, retention_days)

    def visitors(self, since: str | datetime | None = None, *, min_size: int = 2, threshold: float | None = None,
                 rule: str | None = None) -> list[records.VisitorGroup]:
        """Groups of kept unknown faces, most faces first: :func:`facedb.operations.visitors.listed`."""
        return visitor_groups.listed(self, since, min_size, threshold, rule)

    def enroll_visitors(self, group: str, name: str, *, threshold: float | None = None,
                        rule: str | None = None) -> records.Person:
        """Enrol a visitor group as ``name``: :func:`facedb.operations.visitors.enroll_group`."""
        return visitor_groups.enroll_group(self, group, name, threshold, rule)

    def forget_visitors(self, group: str, *, threshold: float | None = None, rule: str | None = None) -> int:
        """Erase a visitor group's faces; returns how many: :func:`facedb.operations.visitors.forget_group`."""
        return visitor_groups.forget_group(self, group, threshold, rule)

    # -------------------------------------------------------------------------------------------------- index
    def index_state(self) -> records.IndexState:
        """What the vector index holds now (kind, generation, entries, tombstones, persisted copy)."""
        with self._lock:
            return self.keeper.describe(self.settings())

    def loaded_index(self) -> tuple[int, str] | None:
        """(store generation, kind) of the index in memory, or None; no lock, no I/O: a metrics scrape's snapshot."""
        gallery = self.keeper.gallery
        return None if gallery is None else (int(gallery.generation), str(gallery.index.kind))

    def load_index(self, *, wait: bool = False) -> records.IndexState:
        """Bring the index into memory now, level with the store: :func:`facedb.operations.maintenance.load_index`."""
        return maintenance.load_index(self, wait)

    def save_index(self) -> None:
        """Persist the index now (it is otherwise saved on close when it lags the store)."""
        with self._lock:
            maintenance.save_index(self)

    def rebuild_index(self) -> int:
        """Rebuild the index from the store and save it; returns the number of templates indexed."""
        with self._lock:
            return len(self.keeper.rebuild(self.settings()).index)

    def reindex(self, kind: str, params: dict[str, Any] | None = None,
                index_options: dict[str, Any] | None = None) -> records.ReindexReport:
        """Change the index kind and parameters, and rebuild: :func:`facedb.operations.maintenance.reindex`."""
        with self._lock:
            return maintenance.reindex(self, kind, params, index_options)

    def reembed(self, model_id: str, *, photos: str | os.PathLike[str] | None = None, crops: bool = True,
                drop_unembeddable: bool = False, dry_run: bool = False, weights: str | os.PathLike[str] | None = None,
                model: FacePipeline | None = None, progress: Any = None) -> ReembedReport:
        """Move the database to another embedding model, all or nothing: :mod:`facedb.operations.reembed`."""
        from .operations.reembed import move

        return move(self, model_id, photos=Path(photos) if photos is not None else None, use_crops=crops,
                    drop_unembeddable=drop_unembeddable, dry_run=dry_run,
                    weights=Path(weights) if weights is not None else None, model=model, progress=progress)

    def backup(self, dest: str | os.PathLike[str], *, with_index: bool = False) -> BackupReport:
        """An online, consistent copy in the new directory ``dest``, recorded: ``facedb/operations/backup.py``."""
        return backup.backup_recorded(self, Path(dest), with_index)

    @classmethod
    def restore(cls, src: str | os.PathLike[str], path: str | os.PathLike[str], *, key: object = None,
                replace: bool = False) -> BackupReport:
        """Restore the backup ``src`` as the database ``path``, checked: :func:`facedb.operations.backup.restore`
        and :func:`~facedb.operations.backup.restore_checked`."""
        return backup.restore_checked(cls, src, path, key=key, replace=replace)

    def vacuum(self) -> None:
        """Compact the store, rewrite the index's persisted copy, truncate the WAL: give the space back."""
        with self._lock:
            maintenance.vacuum(self)

    def calibration_warning(self, settings: Settings | None = None) -> str | None:
        """A warning when the rule in force was not calibrated for today's gallery size, else None."""
        return inspection.calibration_warning(self, settings or self.settings())

    @staticmethod
    def _shipped_impostors(s: Settings) -> ImpostorModel | None:
        return inspection.shipped_impostors(s)

    def stats(self) -> records.Stats:
        """Settings, counts, the index, warnings and protection: :func:`facedb.operations.inspection.stats`."""
        with self._lock:
            return inspection.stats(self)

    def check(self) -> records.CheckReport:
        """Verify the store, the index against it and the query path: :func:`facedb.operations.maintenance.check`."""
        with self._lock:
            return maintenance.check(self)
