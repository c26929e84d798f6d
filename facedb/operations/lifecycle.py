"""A database's birth: checking what ``FaceDB.create`` is given, making the directory, the keyring and the store,
and creating a remote index's collection at once, leaving nothing behind when any step fails.

A database is a directory (created 0700) holding ``facedb.sqlite3`` and the index's persisted copy (both 0600),
and for an encrypted database its keyring (``facedb/protection/encryption.py``). Index options are split here into
what is stored (a Milvus URI and collection, :func:`option_rows`) and what a process holds but never stores (a
token, an URI override: :func:`secrets_of`). Moved out of ``db.py`` as it was.
"""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DatabaseError, DatabaseExistsError, InvalidInputError, ModelMismatchError, warn_caller
from ..gallery.decision import ImpostorModel
from ..gallery.index import backend_for, check_kind
from ..gallery.query import check_query_environment
from ..gallery.settings import Settings, check_index_options, check_threshold
from ..gallery.store import Store
from ..protection import encryption
from . import erasure

if TYPE_CHECKING:
    from ..db import FaceDB
    from ..protection.encryption import ConversionReport
    from ..protection.keyring import Protection

STORE_FILE = encryption.STORE_FILE  # "facedb.sqlite3"


@dataclass
class Identity:
    """What ``FaceDB.create`` fixes for a database's life, and its first settings.

    ``model_id``, ``dim``: the model whose unit vectors it holds. ``threshold``: the default (1:1) decision
    threshold, a cosine similarity (higher is stricter), and ``threshold_source`` where it came from.
    ``impostors``: the model's 1:1 impostor score tail; given, the database uses the gallery rule (the 1:N
    threshold follows the gallery size to hold FPIR at 1%; see :mod:`facedb.gallery.decision`); ``margin``: the
    model's margin threshold (the margin rule: ``s1 - 0.5 s2`` must reach it, and ``s1`` the 1:1 threshold).
    ``rule``: ``fixed``, ``gallery`` or ``margin``; by default ``margin`` when a margin threshold is given,
    else ``gallery`` when an impostor model is, else ``fixed``. ``mean_templates``: keep each person's mean
    template (the renormalised mean of their templates, once they have two) beside their photo templates:
    on LFW with two or three photos enrolled it raised the identification rate at FPIR 1% by 3-4 points
    (docs "Accuracy"); off by default in the API (what you add is exactly what is matched), on by default in
    ``facedb init``. ``flip``: photos are embedded as the mean of the face's and its mirror image's embedding
    (flip test-time augmentation, at twice the embedding cost), fixed for the database's life, since templates
    made both ways should not be compared; it does not affect vectors added directly. ``index``: the index kind
    (``facedb.gallery.index.index_kinds()``, or ``auto``). ``cancellable``: every template and probe is projected
    by a keyed random orthogonal matrix of this database (``protection/projection.py``; scores unchanged,
    templates unlinkable across databases), fixed for the database's life. ``thumbnails``: which face thumbnails
    are kept, ``off``, ``enrolled`` or ``all`` (:mod:`facedb.gallery.thumbnails`). ``detector``: the face
    detector its photos go through, ``mtcnn`` (the default) or ``yunet`` (``faces/pipeline.py``), fixed for the
    database's life.
    """

    model_id: str
    dim: int
    threshold: float
    threshold_source: str = "model default"
    index: str = "flat"
    flip: bool = True
    impostors: ImpostorModel | None = None
    margin: float | None = None
    rule: str | None = None
    mean_templates: bool = False
    thumbnails: str = "enrolled"
    detector: str = "mtcnn"
    cancellable: bool = False


@dataclass
class Created:
    """A store just created: the store, its keyring's protection (None: plain), whether the directory was made
    by this creation (so a failure removes it), and the index options this process holds unstored."""

    store: Store
    protection: Protection | None
    made: bool
    given_options: dict[str, Any]


def check_photo_environment(rescore_memory_mb: float | None) -> None:
    """The settings of the environment a database's queries and photos use, checked before it is opened or
    created (InvalidInputError naming the variable): ``check_query_environment``, and ``FACEDB_MAX_PIXELS``
    where it is set (read from ``faces/images.py`` only then: no image library for a database of vectors)."""
    check_query_environment(rescore_memory_mb)
    if os.environ.get("FACEDB_MAX_PIXELS", "").strip():
        from ..faces.images import max_pixels

        max_pixels()


def create_store(root: Path, ident: Identity, index_options: dict[str, Any] | None, encrypt: bool,
                 key: object, rescore_memory_mb: float | None = None) -> Created:
    """Check ``ident``, the options and the query settings of the environment (InvalidInputError:
    ``check_query_environment``), refuse an existing database (DatabaseExistsError) or a
    file in the way (DatabaseError), then make the directory (0700), the keyring and the store with its first
    settings. Nothing is left behind on failure.

    ``index_options``: for ``index="milvus"``, ``milvus_uri`` (required) and ``milvus_collection`` (stored), and
    ``milvus_token`` (used by the FaceDB object only, never stored; else FACEDB_MILVUS_TOKEN). A remote index is
    created at once (:func:`first_index`), so an unreachable server or a refused token (IndexUnavailableError) or
    a collection of another model (ModelMismatchError) leaves no database behind. ``encrypt`` (or a ``key``): the
    database is encrypted at rest (docs "Protecting templates") under the key-encryption key ``key`` (a string,
    bytes, a key file's Path or a ``facedb.protection.keyring.KeySource``; default ``$FACEDB_KEY``;
    KeyMissingError when there is none). ``rescore_memory_mb`` (``FaceDB.create``): see :func:`opened`."""
    from ..faces.pipeline import check_detector

    check_photo_environment(rescore_memory_mb)
    if not ident.model_id:
        raise InvalidInputError("model_id must be given")
    if isinstance(ident.dim, bool) or not isinstance(ident.dim, int) or ident.dim < 1:
        raise InvalidInputError("dim must be a positive integer")
    threshold = check_threshold(ident.threshold)
    check_kind(ident.index)
    detector = check_detector(ident.detector)
    options = dict(index_options or {})
    rows = option_rows(ident.index, options)
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
    meta = {**Settings.initial(ident.model_id, ident.dim, threshold, ident.threshold_source, ident.index, ident.flip,
                               ident.impostors, ident.margin, ident.rule, ident.mean_templates,
                               thumbnails=ident.thumbnails, detector=detector),
            **rows,
            "database_id": secrets.token_hex(16)}
    if ident.cancellable:
        from ..protection import projection

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
    return Created(store, protection, made, secrets_of(options))


def first_index(db: FaceDB, kind: str, made: bool) -> None:
    """Create a write-through (remote) index's collection now: a bad URI, token or collection fails the creation
    (IndexUnavailableError, ModelMismatchError), not a later enrolment, and leaves no database behind."""
    if kind == "auto" or not backend_for(kind).write_through:
        return
    try:
        db.keeper.rebuild(db.settings())
    except BaseException:
        db.close(save_index=False)
        for name in (STORE_FILE, STORE_FILE + "-wal", STORE_FILE + "-shm"):
            (db.root / name).unlink(missing_ok=True)
        encryption.discard_keyring(db.root)
        if made:
            shutil.rmtree(db.root, ignore_errors=True)
        raise


def option_rows(kind: str, options: dict[str, Any], settings: Settings | None = None) -> dict[str, str]:
    """The ``meta`` rows for a kind's index options (validated; never the token). A remote kind needs a URI,
    given now or stored before (InvalidInputError otherwise)."""
    rows = check_index_options(options)
    if kind == "milvus":
        if "milvus_uri" not in rows and not (settings and settings.index_options.get("milvus_uri")):
            raise InvalidInputError("the milvus index needs a URI: --milvus-uri http://host:19530 (a server or "
                                    "cluster) or a path ending in .db (Milvus Lite)")
        if "milvus_collection" not in rows and not (settings and settings.index_options.get("milvus_collection")):
            rows["milvus_collection"] = check_index_options({"milvus_collection": "facedb"})["milvus_collection"]
    return rows


def secrets_of(options: dict[str, Any], uri_too: bool = False) -> dict[str, Any]:
    """The options a process holds but never stores: the token (and, at open, a URI override)."""
    keep = ("milvus_token", "milvus_uri") if uri_too else ("milvus_token",)
    out = {k: v for k, v in options.items() if k in keep and v}
    if "milvus_uri" in out:
        out["milvus_uri"] = check_index_options({"milvus_uri": out["milvus_uri"]})["milvus_uri"]
    return out


def open_database(facade: Any, root: Path, *, model_id: str | None, readonly: bool, weights: Any, model: Any,
                  actor: str | None, index_options: dict[str, Any] | None, key: object,
                  rescore_memory_mb: float | None) -> FaceDB:
    """``FaceDB.open`` (``facade``: the class): check the query settings of the environment (InvalidInputError,
    before anything is read), unlock (encrypted), open the store, make the FaceDB, then :func:`opened`.
    DatabaseError when ``root`` holds no database."""
    check_photo_environment(rescore_memory_mb)
    if not (root / STORE_FILE).is_file():
        raise DatabaseError(f"no facedb database at {root / STORE_FILE} (create one with `facedb init`)")
    protection = encryption.unlock(root, key, readonly)
    store = Store.open(root / STORE_FILE, readonly=readonly, key=protection.store_key() if protection else None)
    db = facade(root, store, readonly=readonly, weights=Path(weights) if weights else None, actor=actor,
                index_options=secrets_of(dict(index_options or {}), uri_too=True), protection=protection,
                rescore_memory_mb=rescore_memory_mb)
    return opened(db, model_id, model)


def opened(db: FaceDB, model_id: str | None, model: Any) -> FaceDB:
    """What ``FaceDB.open`` does once the store is open: pay an erasure debt a crash left (writable only), check
    the model (ModelMismatchError), and keep ``model`` as the pipeline for photos. The store is closed on failure.

    ``FaceDB.open``'s options: ``model_id``: refuse (ModelMismatchError) a database of another model.
    ``weights``: the FaceNet weights file to use when this process loads the model; ``model``: a face pipeline to
    use for photos (checked against the database's model); ``actor``: who the audit trail records as asking, when
    no ``acting_as`` block says otherwise (default ``local:<user>``). ``readonly``: nothing in the gallery can be
    changed (decisions are still written to the audit trail), and a remote index engine is never written to (docs
    "Scale-out" for read replicas). ``index_options``: for a Milvus index, ``milvus_token`` and/or ``milvus_uri``
    for this object only (default: FACEDB_MILVUS_TOKEN, FACEDB_MILVUS_URI, else the stored URI); never stored.
    ``key``: an encrypted database's key-encryption key (a string, bytes, a key file's Path or a
    ``facedb.protection.keyring.KeySource``; default ``$FACEDB_KEY``): KeyMissingError without one, WrongKeyError
    for another, TamperedError when the ciphertext fails authentication; nothing is changed then. Ignored for a
    plain database. ``rescore_memory_mb``: memory (MiB) this process may give the exact vectors that re-score
    candidates of index kinds that do not keep them (ivfpq, flat16, milvus): 2 KiB per 512-d template; beyond it
    they are read from the store (default ``$FACEDB_RESCORE_MEMORY_MB``, else 8,192; 0: always the store; see
    ``facedb/gallery/vectors.py``).
    """
    try:
        if not db.readonly and db.store.erasure_pending():  # a removal whose erasure a crash interrupted
            erasure.erase(db)
        if model_id is not None:
            db._same_model(model_id, db.dim)
        if model is not None:
            db.pipeline(model)
    except BaseException:
        db.store.close()
        raise
    db._model = model
    return db


def same_model(db: FaceDB, model_id: str, dim: int) -> None:
    """ModelMismatchError unless ``model_id``/``dim`` are the database's: the one model check."""
    if model_id != db.model_id or int(dim) != db.dim:
        raise ModelMismatchError(
            f"this database holds {db.dim}-d {db.model_id!r} embeddings; got {int(dim)}-d {model_id!r} "
            "(create another database for that model)")


def index_options(db: FaceDB) -> dict[str, Any]:
    """What an index backend needs to find its engine: the stored options (a Milvus URI and collection), the
    database's model and id (so a shared collection is never another database's), the options given to this
    process (a token, or a URI override: never stored) and, encrypted, the index file's cipher."""
    s = db.settings()
    cipher = {"cipher": db.protection.index_cipher()} if db.protection is not None else {}
    return {**s.index_options, "model_id": s.model_id, "database_id": s.database_id, **db._given_options, **cipher}


def settle(db: FaceDB) -> None:
    """Load the index and let its background reads of the store finish (a conversion needs the store to itself:
    no other connection open on it, even this process's)."""
    db.load_index(wait=True)
    if db._names.loading is not None:
        db._names.loading.join()


def close(db: FaceDB, save_index: bool) -> None:
    """``FaceDB.close`` under its lock: write the audit records still waiting, save the index if it is worth saving
    (a RuntimeWarning if it could not be: the index is a cache), close the store; then raise the DatabaseError of
    audit records that could not be written, if any."""
    if db.store is None:
        return
    failed: DatabaseError | None = None
    try:
        db.trail.close()
    except DatabaseError as exc:
        failed = exc
    try:
        if save_index and not db.readonly:
            db.keeper.save(db.settings())
    except DatabaseError as exc:  # the index is a cache: the next open catches up from the store
        warn_caller(f"{db.root}: the index was not saved on close ({exc})", RuntimeWarning)
    finally:
        db.keeper.close()
        db.store.close()
        db.store = None  # type: ignore[assignment]
    if failed is not None:
        raise failed


def encrypt_database(facade: Any, path: Path, key: object) -> ConversionReport:
    """``FaceDB.encrypt``: convert the plain database at ``path`` (opened with ``facade``, the FaceDB class, and
    settled: no other connection on its store) and record it (``encrypt``)."""
    if encryption.is_encrypted(path):
        raise InvalidInputError(f"{path} is already encrypted (rotate its key with `facedb rotate-key`)")
    db = facade.open(path)
    try:
        settle(db)
        report = encryption.encrypt_existing(path, key, db)
    finally:
        db.close(save_index=False)
    _record_conversion(facade, path, key, report)
    return report


def rotate_database(facade: Any, path: Path, key: object, new_key: object, reencrypt: bool) -> ConversionReport:
    """``FaceDB.rotate_key``: re-wrap the data key (or, ``reencrypt``, re-encrypt under a new one with the database
    open and settled) and record it (``rotate-key``) under the key now in force."""
    from ..protection.keyring import ENV_NEW_KEY, KeySource

    if not reencrypt:
        report = encryption.rotate_key(path, key, new_key)
    else:
        db = facade.open(path, key=key)
        try:
            settle(db)
            report = encryption.rotate_key(path, key, new_key, reencrypt=True, opened=db)
        finally:
            db.close(save_index=False)
    now = KeySource.of(new_key, env=ENV_NEW_KEY) or key
    _record_conversion(facade, path, now, report)
    return report


def _record_conversion(facade: Any, path: Path, key: object, report: ConversionReport) -> None:
    """Append an encrypt / rotate-key to the audit trail (opened with the key now in force)."""
    with facade.open(path, key=key) as db:
        db.trail.record(report.operation if report.operation == "encrypt" else "rotate-key",
                        [{"detail": report.to_dict()}], db.settings())
