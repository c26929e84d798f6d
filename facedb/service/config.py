"""The service's settings: one typed object, from ``facedb serve`` options or ``FACEDB_*`` environment
variables (which is also how ``facedb serve --workers N`` hands them to its worker processes)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..environment import number
from ..errors import InvalidInputError

#: ``log_format``: uvicorn's text lines, or one JSON object per line (facedb/service/logs.py).
LOG_FORMATS = ("text", "json")

#: Default request body limit (uploads): 20 MiB, room for a few full-resolution photos per enrolment.
DEFAULT_MAX_UPLOAD_MB = 20.0


@dataclass(frozen=True)
class ServiceSettings:
    """``db``: the database directory. ``host``/``port``: where to listen (loopback unless told otherwise;
    TLS belongs in a reverse proxy). ``workers``: uvicorn worker processes, each loading the model once.
    ``max_upload_mb``: request bodies above this are refused (413) before they are parsed.
    ``cors_origins``: origins allowed by CORS (empty = CORS off). ``fold_window``: seconds within which
    repeated webhook events for one person are folded; ``hook_attempts`` / ``hook_backoff`` /
    ``hook_timeout``: delivery retries, first retry delay and per-attempt timeout (seconds).
    ``weights``: a FaceNet weights file. ``console``: serve the operator console at ``/console``.
    ``log_format``: ``text`` (uvicorn's lines) or ``json`` (one JSON object per line and per request, see
    ``logs.py``).

    Threat model (docs/service.md): ``body_timeout``: seconds a request body may take to arrive (408 after, the
    connection closed); ``auth_failures``: failed authentications per minute allowed per client address and
    per key id before 429; ``door_rate``: requests per second for an identify key without the candidates grant
    (0 = unlimited); ``uploads_per_client``: request bodies read at once per client address;
    ``allow_private_hooks``: let webhooks target loopback, link-local and private addresses (off: refused when
    added over HTTP and when sent); ``docs``: serve Swagger UI at ``/docs`` (off: it loads its scripts from a
    CDN; ``/openapi.json`` is always served); ``decision_max_pixels``: the largest photo (width x height) the
    decision routes (identify, verify, detect) decode: a door camera's (4K is 8.3 MP); enrolment keeps
    ``FACEDB_MAX_PIXELS``.

    Before a request reaches the app (facedb/service/protocol.py): ``header_timeout``: seconds from a
    connection's start (or its previous answer) to the end of the next request's head (408 / closed after);
    ``max_header_kb``: the request line and headers together, KiB (431 after); ``connections_per_client``:
    connections open at once per client address (the next is answered 429 and closed).
    ``forwarded_allow_ips``: the reverse proxies (comma-separated addresses, or ``*``) whose
    ``X-Forwarded-For`` / ``X-Forwarded-Proto`` are believed; empty (the default): none, the client address is
    the connection's peer (uvicorn's own default trusted 127.0.0.1, so any local process could pose as any
    address)."""

    db: Path = Path("facedb-data")
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    cors_origins: tuple[str, ...] = field(default_factory=tuple)
    fold_window: float = 10.0
    hook_attempts: int = 6
    hook_backoff: float = 0.5
    hook_timeout: float = 5.0
    weights: Path | None = None
    console: bool = True
    log_format: str = "text"
    body_timeout: float = 30.0
    auth_failures: int = 20
    door_rate: float = 10.0
    uploads_per_client: int = 8
    allow_private_hooks: bool = False
    docs: bool = False
    decision_max_pixels: int = 16_000_000
    header_timeout: float = 10.0
    max_header_kb: float = 32.0
    connections_per_client: int = 32
    forwarded_allow_ips: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidInputError(f"port is 0-65535, got {self.port}")
        if self.workers < 1:
            raise InvalidInputError("workers must be at least 1")
        if not self.max_upload_mb > 0:
            raise InvalidInputError("the upload limit must be a positive number of MB")
        if self.fold_window < 0 or self.hook_backoff < 0 or not self.hook_timeout > 0 or self.hook_attempts < 1:
            raise InvalidInputError("webhook settings: fold window and backoff >= 0, timeout > 0, attempts >= 1")
        if self.decision_max_pixels < 1:
            raise InvalidInputError("the decision photo pixel limit must be at least 1")
        if not self.body_timeout > 0 or self.auth_failures < 1 or self.door_rate < 0 or self.uploads_per_client < 1:
            raise InvalidInputError("limits: body timeout > 0, auth failures >= 1, door rate >= 0, uploads per "
                                    "client >= 1")
        if not self.header_timeout > 0 or not self.max_header_kb > 0 or self.connections_per_client < 1:
            raise InvalidInputError("connection limits: header timeout > 0, header size > 0, connections per "
                                    "client >= 1")
        if self.log_format not in LOG_FORMATS:
            raise InvalidInputError(f"the log format is one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_header_bytes(self) -> int:
        return int(self.max_header_kb * 1024)

    _ENV: ClassVar[dict[str, str]] = {
            "db": "FACEDB_DB", "host": "FACEDB_HOST", "port": "FACEDB_PORT", "workers": "FACEDB_WORKERS",
            "max_upload_mb": "FACEDB_MAX_UPLOAD_MB", "cors_origins": "FACEDB_CORS_ORIGINS",
            "fold_window": "FACEDB_HOOK_FOLD_SECONDS", "hook_attempts": "FACEDB_HOOK_ATTEMPTS",
            "hook_backoff": "FACEDB_HOOK_BACKOFF", "hook_timeout": "FACEDB_HOOK_TIMEOUT",
            "weights": "FACEDB_WEIGHTS", "console": "FACEDB_CONSOLE", "log_format": "FACEDB_LOG_FORMAT",
            "body_timeout": "FACEDB_BODY_TIMEOUT", "auth_failures": "FACEDB_AUTH_FAILURES",
            "door_rate": "FACEDB_DOOR_RATE", "uploads_per_client": "FACEDB_UPLOADS_PER_CLIENT",
            "allow_private_hooks": "FACEDB_ALLOW_PRIVATE_HOOKS", "docs": "FACEDB_DOCS",
            "decision_max_pixels": "FACEDB_DECISION_MAX_PIXELS", "header_timeout": "FACEDB_HEADER_TIMEOUT",
            "max_header_kb": "FACEDB_MAX_HEADER_KB", "connections_per_client": "FACEDB_CONNECTIONS_PER_CLIENT",
            "forwarded_allow_ips": "FACEDB_FORWARDED_ALLOW_IPS"}

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ServiceSettings:
        """Settings from ``FACEDB_*`` variables (see ``_ENV``), defaults for those unset."""
        env = os.environ if environ is None else environ
        raw = {name: env[var] for name, var in cls._ENV.items() if env.get(var, "").strip()}

        def num(name: str, default: float, **kw: Any) -> float:  # one strict parser: environment.py
            return number(cls._ENV[name], default, environ=env, **kw)

        return cls(
            db=Path(raw.get("db", "facedb-data")),
            host=raw.get("host", "127.0.0.1"),
            port=int(num("port", 8000, integer=True)),
            workers=int(num("workers", 1, integer=True)),
            max_upload_mb=num("max_upload_mb", DEFAULT_MAX_UPLOAD_MB),
            cors_origins=tuple(o.strip() for o in raw.get("cors_origins", "").split(",") if o.strip()),
            fold_window=num("fold_window", 10.0),
            hook_attempts=int(num("hook_attempts", 6, integer=True)),
            hook_backoff=num("hook_backoff", 0.5),
            hook_timeout=num("hook_timeout", 5.0),
            weights=Path(raw["weights"]) if raw.get("weights") else None,
            console=_flag(raw.get("console", "1"), "FACEDB_CONSOLE"),
            log_format=raw.get("log_format", "text").strip().lower(),
            body_timeout=num("body_timeout", 30.0),
            auth_failures=int(num("auth_failures", 20, integer=True)),
            door_rate=num("door_rate", 10.0),
            uploads_per_client=int(num("uploads_per_client", 8, integer=True)),
            allow_private_hooks=_flag(raw.get("allow_private_hooks", "0"), "FACEDB_ALLOW_PRIVATE_HOOKS"),
            docs=_flag(raw.get("docs", "0"), "FACEDB_DOCS"),
            decision_max_pixels=int(num("decision_max_pixels", 16_000_000, integer=True)),
            header_timeout=num("header_timeout", 10.0),
            max_header_kb=num("max_header_kb", 32.0),
            connections_per_client=int(num("connections_per_client", 32, integer=True)),
            forwarded_allow_ips=",".join(a.strip() for a in raw.get("forwarded_allow_ips", "").split(",")
                                         if a.strip()),
        )

    def to_env(self) -> dict[str, str]:
        """The ``FACEDB_*`` variables that give these settings back through :meth:`from_env`."""
        out = {var: str(getattr(self, name)) for name, var in self._ENV.items()
               if name not in ("cors_origins", "weights", "console", "allow_private_hooks", "docs")}
        for name in ("console", "allow_private_hooks", "docs"):
            out[self._ENV[name]] = "1" if getattr(self, name) else "0"
        out["FACEDB_DB"] = str(Path(self.db).resolve())
        out["FACEDB_CORS_ORIGINS"] = ",".join(self.cors_origins)
        if self.weights is not None:
            out["FACEDB_WEIGHTS"] = str(Path(self.weights).resolve())
        return out


def _flag(value: str, var: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise InvalidInputError(f"{var} is 1 or 0 (true or false), got {value!r}")
