"""A database's settings as typed values, parsed from the store's ``meta`` table once per change (``memo.py``
keeps the parsed settings until the store's ``settings_version`` says they changed).

On disk the settings are text rows of ``meta`` (key, value), so that any SQLite tool can read them and old
databases keep working: a key that is missing takes the default of the version that introduced it (a database
made before flip augmentation existed has ``flip`` off; one made before the audit trail has it on).
:meth:`Settings.parse` is the only place that turns those strings into values.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from ..errors import InvalidInputError
from .decision import MARGIN_WEIGHT, RULES, ImpostorModel, Rule
from .thumbnails import DEFAULT_MODE, MODES, check_mode


def check_threshold(value: object, what: str = "threshold") -> float:
    """``value`` as a decision threshold: a cosine similarity in [-1, 1] (higher is stricter). The one
    validation every entry point (API, CLI, service) uses; InvalidInputError otherwise."""
    try:
        t = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidInputError(f"{what} must be a number (a cosine similarity in [-1, 1])") from None
    if not -1.0 <= t <= 1.0:  # also refuses NaN
        raise InvalidInputError(f"{what} is a cosine similarity in [-1, 1], got {value!r}")
    return t


def check_rate(value: object, what: str = "the target rate") -> float:
    """``value`` as an error rate to calibrate for (FAR, FPIR): a fraction strictly between 0 and 1;
    InvalidInputError otherwise. Used by the CLI and the evaluation API alike."""
    try:
        r = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidInputError(f"{what} must be a number, a rate in (0, 1) such as 1e-3") from None
    if not 0.0 < r < 1.0:  # also refuses NaN
        raise InvalidInputError(f"{what} is a rate in (0, 1) such as 1e-3, got {value!r}")
    return r


#: The largest count anywhere (SQLite's INTEGER is 64-bit signed): larger limits and offsets are refused, not
#: passed on to overflow.
MAX_COUNT = 2**63 - 1


def check_count(value: object, what: str, minimum: int = 0) -> int:
    """``value`` as a whole number in [``minimum``, 2**63 - 1] (limits, offsets, batch sizes); InvalidInputError
    otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not minimum <= value <= MAX_COUNT:
        raise InvalidInputError(f"{what} must be a whole number from {minimum} to {MAX_COUNT}, got {value!r}")
    return int(value)

#: Threads each compute engine (torch for detection and FaceNet, FAISS's OpenMP for index training and batch
#: search) uses, unless ``FACEDB_THREADS`` says otherwise (0 = the engine's own default, one per core).
#: Measured on a shared 2-core machine (``scripts/bench_threads.py``, ``bench-results/threads.json``; median
#: per photo / face, 1 thread against 2): MTCNN 170 ms against 948 ms as the machine was (load ~13), 610 ms
#: against 6,657 ms with a busy process per core; FaceNet one face 129 against 1,427 ms (474 against 6,247);
#: FaceNet in batches of 16, 79 against 566 ms a face; FAISS IVF training 152 against 1,003 ms. More threads
#: than the cores left free make these engines' many small parallel steps wait on each other. dlib's embedder
#: is not affected (its own single thread: 308 and 295 ms). On a machine with idle cores to spare for facedb
#: alone, measure with that script and raise it.
DEFAULT_THREADS = 1


def threads_setting() -> int:
    """The thread count for torch and FAISS from ``FACEDB_THREADS`` (default
    :data:`DEFAULT_THREADS`, chosen from measurements; 0 = leave each engine's own default);
    InvalidInputError for a value that is not a whole number >= 0."""
    from ..environment import number

    return int(number("FACEDB_THREADS", DEFAULT_THREADS, integer=True, hint=" (0: each engine's own default)"))


def check_margin(value: object) -> float:
    """``value`` as a margin threshold: the margin rule's score ``s1 - 0.5 s2`` lies in [-1.5, 1.5]."""
    try:
        t = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidInputError("the margin threshold must be a number") from None
    if not -1.5 <= t <= 1.5:
        raise InvalidInputError(f"the margin threshold (s1 - 0.5 s2) is in [-1.5, 1.5], got {value!r}")
    return t


#: The longest retention offered (100 years): a record kept longer is kept forever (audit: 0), and a longer
#: period only ever reached the service as fuzzed or mistyped input.
MAX_RETENTION_DAYS = 36500.0


def check_days(value: object, what: str, *, forever: bool, most: float = MAX_RETENTION_DAYS) -> float:
    """``value`` as a retention period in days: more than 0 and at most ``most`` (and 0 for "forever" where
    ``forever``); InvalidInputError otherwise (a bool, a string, NaN, infinity, a negative or too long period)."""
    low = "0 (forever) or more" if forever else "more than 0"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidInputError(f"{what} is a number of days, got {value!r}")
    days = float(value)
    if not (0 < days <= most or (forever and days == 0)):  # NaN fails both
        raise InvalidInputError(f"{what} is {low} and at most {most:g} days, got {value!r}")
    return days


def check_k(value: object) -> int:
    """``value`` as a number of candidates: a positive integer; InvalidInputError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError("k must be a positive integer")
    return value


#: ``meta`` keys saying where a remote index engine keeps the index (``facedb init --index milvus``). Never a
#: credential: the token comes from the environment (FACEDB_MILVUS_TOKEN), so the database file never holds it.
INDEX_OPTION_KEYS = ("milvus_uri", "milvus_collection")
DEFAULT_MILVUS_COLLECTION = "facedb"
_COLLECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")


def check_index_options(options: dict[str, Any]) -> dict[str, str]:
    """The ``meta`` rows for index options, validated: a Milvus URI is ``http(s)://host:port`` (a server or a
    cluster's proxy), ``tcp://`` or ``unix://``, or a path ending in ``.db`` (Milvus Lite, made absolute so that
    it does not depend on the current directory); credentials inside the URI are refused (they would land in
    the database file). A collection name is what Milvus accepts: a letter or underscore, then letters, digits
    and underscores (at most 100). InvalidInputError otherwise."""
    rows: dict[str, str] = {}
    uri = options.get("milvus_uri")
    if uri is not None:
        uri = str(uri).strip()
        parts = urlsplit(uri)
        if parts.scheme in ("http", "https", "tcp", "unix", "grpc"):
            if parts.username or parts.password:
                raise InvalidInputError("put Milvus credentials in FACEDB_MILVUS_TOKEN, not in the URI (the URI is "
                                        "stored in the database file)")
            if parts.scheme != "unix" and not parts.hostname:
                raise InvalidInputError(f"Milvus URI {uri!r} names no host")
        elif uri.endswith(".db") and "://" not in uri:
            uri = str(Path(uri).expanduser().resolve())
        else:
            raise InvalidInputError(f"Milvus URI {uri!r}: give http(s)://host:19530 for a server or cluster, or a "
                                    "path ending in .db for Milvus Lite")
        rows["milvus_uri"] = uri
    name = options.get("milvus_collection")
    if name is not None:
        if not _COLLECTION_NAME.fullmatch(str(name)):
            raise InvalidInputError(f"Milvus collection name {name!r}: a letter or underscore, then letters, digits "
                                    "or underscores (at most 100)")
        rows["milvus_collection"] = str(name)
    return rows


@dataclass(frozen=True)
class Calibration:
    """Where a stored threshold came from (``facedb calibrate``).

    ``target`` is ``far`` (1:1 false accept rate) or ``fpir`` (1:N false positive identification rate) at
    ``target_rate``; ``gallery_size`` is the number of enrolled people an FPIR threshold was calibrated for;
    ``details`` keeps every other measured figure (comparisons, TAR / DIR at the threshold, data source, date).
    """

    target: str
    target_rate: float
    threshold: float
    source: str = ""
    date: str | None = None
    gallery_size: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    _FIELDS = ("target", "target_rate", "threshold", "source", "date", "gallery_size")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Calibration:
        size = raw.get("gallery_size")
        return cls(
            target=str(raw.get("target", "")),
            target_rate=float(raw.get("target_rate") or 0.0),
            threshold=float(raw.get("threshold") or 0.0),
            source=str(raw.get("source", "")),
            date=raw.get("date"),
            gallery_size=int(size) if size else None,
            details={k: v for k, v in raw.items() if k not in cls._FIELDS},
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.details)
        out.update({"target": self.target, "target_rate": self.target_rate, "threshold": self.threshold,
                    "source": self.source, "date": self.date, "gallery_size": self.gallery_size})
        return out

    def __getitem__(self, key: str) -> Any:  # older code read the record as a dict
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)


@dataclass(frozen=True)
class AuditSettings:
    """The audit trail: on or off, how many days records are kept (0 = forever), whether each probe's
    embedding is stored with its decision (off by default: it is biometric data), and whether a decision's
    record is committed before the answer is returned (``sync``) or by the background writer within
    ``audit.FLUSH_DELAY_S`` after it (new databases; see ``audit.py`` for what each guarantees)."""

    enabled: bool = True
    retention_days: float = 90.0
    store_probes: bool = False
    sync: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "retention_days": self.retention_days, "store_probes": self.store_probes,
                "sync": self.sync}

    def __getitem__(self, key: str) -> Any:
        if key == "store_embeddings":  # the older name
            key = "store_probes"
        return self.to_dict()[key]


@dataclass(frozen=True)
class VisitorSettings:
    """Unknown visitors (docs/clustering.md): whether faces answered *unknown* are kept, to be grouped and
    enrolled or forgotten later (off by default: it keeps biometric data of people who did not enrol), and how
    many days they are kept (default 30; purged on every write and by ``vacuum``)."""

    enabled: bool = False
    retention_days: float = 30.0

    def to_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "retention_days": self.retention_days}


@dataclass(frozen=True)
class Settings:
    """Everything a call needs to know about its database, read in one query."""

    model_id: str
    dim: int
    threshold: float
    threshold_source: str = ""
    metric: str = "cosine"
    flip: bool = False
    index_kind: str = "flat"
    index_params: dict[str, Any] = field(default_factory=dict)
    index_params_raw: str = "{}"  # as stored: the index stamp records exactly this text
    index_stamp: dict[str, Any] | None = None
    index_options: dict[str, str] = field(default_factory=dict)  # where a remote engine keeps it (no secrets)
    database_id: str | None = None  # a random id given at creation: binds a shared index collection to this store
    calibration: Calibration | None = None
    audit: AuditSettings = field(default_factory=AuditSettings)
    visitors: VisitorSettings = field(default_factory=VisitorSettings)
    thumbnails: str = "off"  # which face thumbnails are kept (facedb/gallery/thumbnails.py); older databases: off
    generation: int = 0
    created_at: str | None = None
    rule: Rule = field(default_factory=Rule)  # the open-set decision rule (facedb/gallery/decision.py)
    mean_templates: bool = False  # keep each person's mean template beside their photo templates
    detector: str = "mtcnn"  # the face detector photos go through (facedb/faces/pipeline.py); older databases: mtcnn
    extra: dict[str, str] = field(default_factory=dict)  # keys other collaborators own (encryption, keys...)

    @classmethod
    def parse(cls, meta: dict[str, str]) -> Settings:
        def js(key: str) -> Any:
            raw = meta.get(key)
            if not raw:
                return None
            try:
                return json.loads(raw)
            except ValueError:
                return None

        cal = js("calibration")
        known = {"model_id", "dim", "threshold", "threshold_source", "metric", "flip", "index_kind", "index_params",
                 "index_stamp", "calibration", "audit_enabled", "audit_retention_days", "audit_store_embeddings",
                 "generation", "created_at", "decision_rule", "decision_target", "impostor_model", "decision_margin",
                 "decision_weight", "mean_templates",
                 "database_id", *INDEX_OPTION_KEYS, "visitors_enabled", "visitors_retention_days",
                 "thumbnails", "audit_sync", "settings_version", "people_version", "detector"}
        impostors = None
        if meta.get("impostor_model"):
            try:
                impostors = ImpostorModel.from_json(meta["impostor_model"])
            except (ValueError, KeyError, TypeError):
                impostors = None  # unreadable: the gallery rule falls back to the fixed threshold (stats says so)
        return cls(
            model_id=meta.get("model_id", ""),
            dim=int(meta.get("dim") or 0),
            threshold=float(meta.get("threshold") or 0.0),
            threshold_source=meta.get("threshold_source", ""),
            metric=meta.get("metric", "cosine"),
            flip=meta.get("flip") == "1",
            index_kind=meta.get("index_kind") or "flat",
            index_params=js("index_params") or {},
            index_params_raw=meta.get("index_params", "{}"),
            index_stamp=js("index_stamp"),
            index_options={k: meta[k] for k in INDEX_OPTION_KEYS if meta.get(k)},
            database_id=meta.get("database_id") or None,
            calibration=Calibration.from_dict(cal) if isinstance(cal, dict) else None,
            audit=AuditSettings(
                enabled=meta.get("audit_enabled", "1") == "1",
                retention_days=float(meta.get("audit_retention_days", "90")),
                store_probes=meta.get("audit_store_embeddings", "0") == "1",
                sync=meta.get("audit_sync", "1") == "1",  # missing: a database from before the background writer
            ),
            visitors=VisitorSettings(
                enabled=meta.get("visitors_enabled", "0") == "1",
                retention_days=float(meta.get("visitors_retention_days", "30")),
            ),
            thumbnails=meta.get("thumbnails") if meta.get("thumbnails") in MODES else "off",
            generation=int(meta.get("generation") or 0),
            created_at=meta.get("created_at"),
            rule=Rule(kind=meta.get("decision_rule") or "fixed", target=float(meta.get("decision_target") or 0.01),
                      impostors=impostors, weight=float(meta.get("decision_weight") or MARGIN_WEIGHT),
                      margin=float(meta["decision_margin"]) if meta.get("decision_margin") else None),
            mean_templates=meta.get("mean_templates") == "1",
            detector=meta.get("detector") or "mtcnn",
            extra={k: v for k, v in meta.items() if k not in known},
        )

    @staticmethod
    def initial(model_id: str, dim: int, threshold: float, threshold_source: str, index_kind: str,
                flip: bool, impostors: ImpostorModel | None = None, margin: float | None = None,
                rule: str | None = None, mean_templates: bool = True, thumbnails: str = DEFAULT_MODE,
                detector: str = "mtcnn") -> dict[str, str]:
        """The ``meta`` rows of a new database. The rule: ``rule`` if given, else ``margin`` when the model ships
        a margin threshold, ``gallery`` when it ships an impostor model, else ``fixed``; ``thumbnails``: which
        face thumbnails are kept (see :mod:`facedb.gallery.thumbnails`); ``detector``: the face detector (``mtcnn`` or
        ``yunet``, checked by the caller)."""
        if rule is None:
            rule = "margin" if margin is not None else "gallery" if impostors is not None else "fixed"
        rows = {"model_id": model_id, "dim": str(int(dim)), "metric": "cosine", "threshold": repr(float(threshold)),
                "threshold_source": threshold_source, "index_kind": index_kind, "flip": "1" if flip else "0",
                "mean_templates": "1" if mean_templates else "0", "thumbnails": check_mode(thumbnails),
                "audit_sync": "0", "detector": detector, **Settings.rule_rows(rule, 0.01, impostors, margin)}
        return rows

    @staticmethod
    def rule_rows(kind: str, target: float | None = None, impostors: ImpostorModel | None = None,
                  margin: float | None = None) -> dict[str, str]:
        """The ``meta`` rows of a decision rule (facedb/gallery/decision.py); InvalidInputError for a rule that lacks
        what it needs is raised by the caller, who knows what the database already holds."""
        if kind not in RULES:
            raise InvalidInputError(f"the decision rule is one of {', '.join(RULES)}, got {kind!r}")
        rows = {"decision_rule": kind}
        if target is not None:
            if not 0 < target < 1:
                raise InvalidInputError("the target FPIR is a fraction in (0, 1), e.g. 0.01")
            rows["decision_target"] = repr(float(target))
        if impostors is not None:
            rows["impostor_model"] = impostors.to_json()
        if margin is not None:
            rows["decision_margin"] = repr(check_margin(margin))
            rows["decision_weight"] = repr(MARGIN_WEIGHT)
        return rows

    @staticmethod
    def threshold_rows(threshold: float, source: str, calibration: Calibration | None) -> dict[str, str]:
        rows = {"threshold": repr(float(threshold)), "threshold_source": source}
        if calibration is not None:
            rows["calibration"] = json.dumps(calibration.to_dict(), sort_keys=True)
        return rows

    @staticmethod
    def audit_rows(enabled: bool | None, retention_days: float | None, store_probes: bool | None,
                   sync: bool | None = None) -> dict[str, str]:
        rows: dict[str, str] = {}
        if sync is not None:
            rows["audit_sync"] = "1" if sync else "0"
        if enabled is not None:
            rows["audit_enabled"] = "1" if enabled else "0"
        if retention_days is not None:
            rows["audit_retention_days"] = repr(check_days(retention_days, "the audit retention", forever=True))
        if store_probes is not None:
            rows["audit_store_embeddings"] = "1" if store_probes else "0"
        return rows

    @staticmethod
    def visitor_rows(enabled: bool | None, retention_days: float | None) -> dict[str, str]:
        rows: dict[str, str] = {}
        if enabled is not None:
            rows["visitors_enabled"] = "1" if enabled else "0"
        if retention_days is not None:
            # "forever" is not offered for people who did not enrol, nor more than ten years
            rows["visitors_retention_days"] = repr(check_days(retention_days, "the visitors' retention",
                                                              forever=False, most=3650))
        return rows

    @staticmethod
    def index_rows(kind: str, params: dict[str, Any]) -> dict[str, str]:
        return {"index_kind": kind, "index_params": json.dumps(params or {}, sort_keys=True)}
