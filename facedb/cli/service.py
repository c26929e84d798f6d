"""Commands for the HTTP service: ``serve``, ``keys create|list|revoke``, ``hooks add|list|remove``."""

from __future__ import annotations

import dataclasses
import errno
import importlib.util
import ipaddress
import os
import socket
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..errors import FaceDBError, InvalidInputError
from . import app, command, emit, emit_kv, open_db, state
from .admin import WeightsOpt

keys_app = typer.Typer(help="API keys for `facedb serve`: create (shown once), list, revoke.", no_args_is_help=True)
hooks_app = typer.Typer(help="Webhooks for door events from `facedb serve`.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(hooks_app, name="hooks")


class LogFormat(str, Enum):
    text = "text"
    json = "json"


class ScopeOpt(str, Enum):
    identify = "identify"
    enroll = "enroll"
    admin = "admin"
    metrics = "metrics"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port(host: str, port: int) -> None:
    """InvalidInputError unless ``host:port`` can be listened on now, checked before the model is loaded (as
    uvicorn binds: with SO_REUSEADDR, so a port in TIME_WAIT after a restart is not refused)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidInputError(f"cannot listen on {host}:{port}: unknown address ({exc})") from None
    family, kind, proto, _, address = infos[0]
    try:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        why = exc.strerror or str(exc)
        hint = " (another server is using it: stop it or choose another --port)" \
            if exc.errno == errno.EADDRINUSE else ""
        raise InvalidInputError(f"cannot listen on {host}:{port}: {why}{hint}") from None


@command()
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(envvar="FACEDB_HOST", help="Address to listen on (loopback by default; "
                                                                 "put TLS in a reverse proxy).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="FACEDB_PORT", min=0, max=65535, help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(envvar="FACEDB_WORKERS", min=1, help="Worker processes; each loads the "
                                                                              "model once.")] = 1,
    max_upload_mb: Annotated[float, typer.Option(envvar="FACEDB_MAX_UPLOAD_MB", help="Largest request body "
                                                                                    "(uploads), in MiB.")] = 20.0,
    cors_origins: Annotated[str, typer.Option(envvar="FACEDB_CORS_ORIGINS", help="Comma-separated origins "
                                                                                 "allowed by CORS (default: "
                                                                                 "CORS off).")] = "",
    fold_window: Annotated[float, typer.Option(envvar="FACEDB_HOOK_FOLD_SECONDS", help="Seconds within which "
                                               "repeated webhook events for one person are folded.")] = 10.0,
    weights: WeightsOpt = None,
    console: Annotated[bool, typer.Option("--console/--no-console", envvar="FACEDB_CONSOLE",
                                          help="Serve the operator console (web pages) at /console.")] = True,
    forwarded_allow_ips: Annotated[str, typer.Option(
        envvar="FACEDB_FORWARDED_ALLOW_IPS",
        help="Your reverse proxy's addresses (comma-separated, or *): only these may set the client address with "
             "X-Forwarded-For. Default: none, the address is the connection's peer.")] = "",
    log_level: Annotated[str, typer.Option(help="uvicorn's log level.")] = "info",
    log_format: Annotated[LogFormat, typer.Option(envvar="FACEDB_LOG_FORMAT", help="text (uvicorn's lines) or "
                                                  "json: one JSON object per line, one per request (request id, "
                                                  "key id, route, status, duration; never a name).")
                          ] = LogFormat.text,
) -> None:
    """Run the HTTP API (FastAPI on uvicorn; OpenAPI at /openapi.json). Needs `pip install 'facedb\\[service]'`."""
    # (help text is rich markup: an unescaped [service] would be read as a style tag and vanish)
    _check_port(host, port)
    try:
        import facedb.service.app  # noqa: F401  (fastapi and httpx present)

        from ..service.server import run
    except ImportError as exc:
        raise FaceDBError(f"the service needs its extra: pip install 'facedb[service]' ({exc.name} is missing)"
                          ) from None
    # looked for, not imported: prometheus_client picks its mode when first imported, which must happen in the
    # worker, after the server has set PROMETHEUS_MULTIPROC_DIR (server.py)
    if importlib.util.find_spec("prometheus_client") is None:
        raise FaceDBError("the service needs its extra: pip install 'facedb[service]' (prometheus_client is "
                          "missing)")
    from ..service.config import ServiceSettings

    # the settings without an option of their own (FACEDB_BODY_TIMEOUT, FACEDB_HOOK_ATTEMPTS, ...) from the
    # environment, then the options: built from the options alone, they were put back to their defaults
    settings = dataclasses.replace(
        ServiceSettings.from_env(), db=state(ctx).db, host=host, port=port, workers=workers,
        max_upload_mb=max_upload_mb, cors_origins=tuple(o.strip() for o in cors_origins.split(",") if o.strip()),
        fold_window=fold_window, weights=weights, console=console, log_format=log_format.value,
        forwarded_allow_ips=",".join(a.strip() for a in forwarded_allow_ips.split(",") if a.strip()))
    st = state(ctx)  # an encrypted database's key source reaches the workers through the environment
    if st.key_file is not None:
        os.environ["FACEDB_KEY_FILE"] = str(Path(st.key_file).resolve())
    if st.key_command is not None:
        os.environ["FACEDB_KEY_COMMAND"] = st.key_command
    # a missing or foreign database fails here, not in every worker; an older one is migrated here, once
    with open_db(ctx) as db:
        if not db.api_keys():
            typer.echo("note: no API key exists yet: make one with `facedb keys create --scope admin`", err=True)
    if not _loopback(host):
        typer.echo(f"warning: listening on {host}, beyond this machine: facedb speaks plain HTTP; put TLS in a "
                   "reverse proxy in front of it", err=True)
    try:
        run(settings, log_level)
    except OSError as exc:  # the port taken between the check above and uvicorn's bind
        raise InvalidInputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    except SystemExit as exc:  # uvicorn exits 1 after logging why it could not start (a bind, a worker)
        if exc.code not in (0, None):
            raise FaceDBError(f"the service could not start on {host}:{port} (uvicorn's message above)") from None
        raise


@command(name="create", group=keys_app)
def keys_create(
    ctx: typer.Context,
    scope: Annotated[ScopeOpt, typer.Option(help="identify (identify, verify, detect), enroll (+ people and "
                                                 "templates), admin (+ keys, webhooks, settings, audit); metrics: "
                                                 "GET /metrics only (a Prometheus scraper's key).")],
    name: Annotated[str | None, typer.Option(help="A label, e.g. door-3 (unique among live keys).")] = None,
    grant: Annotated[list[str] | None, typer.Option(
        help="For identify keys: 'candidates' lets the key see candidate lists, raw similarities, k > 1 and "
             "batches of vectors. Without it (the default) a door's key is told the decision only.")] = None,
) -> None:
    """Make an API key. The key is printed once and stored nowhere (only its hash)."""
    with open_db(ctx) as db:
        key, secret = db.create_api_key(scope.value, name, grant or None)
    emit_kv(ctx, {**key.to_dict(), "key": secret})
    if not state(ctx).json:
        typer.echo("the key is shown only now: store it (send it as the X-API-Key header)", err=True)


@command(name="list", group=keys_app)
def keys_list(ctx: typer.Context) -> None:
    """Every API key, revoked ones too (never the keys themselves)."""
    with open_db(ctx, readonly=True) as db:
        rows = [k.to_dict() for k in db.api_keys()]
    for row in rows:  # one cell in the table; JSON keeps the list
        row["grants"] = ",".join(row["grants"]) if not state(ctx).json else row["grants"]
    emit(ctx, rows, ["id", "name", "scope", "grants", "created_at", "revoked_at"])


@command(name="revoke", group=keys_app)
def keys_revoke(ctx: typer.Context, ref: Annotated[str, typer.Argument(help="The key's id or name.")]) -> None:
    """Revoke a key: its next request is refused, by every running service worker."""
    with open_db(ctx) as db:
        emit_kv(ctx, db.revoke_api_key(ref).to_dict())


@command(name="add", group=hooks_app)
def hooks_add(
    ctx: typer.Context,
    url: Annotated[str, typer.Argument(help="http(s) URL the events are POSTed to.")],
    events: Annotated[str, typer.Option(help="Comma-separated: identify.match, identify.unknown, verify.accept, "
                                             "verify.reject, person.enrolled, person.removed, or *.")],
    key: Annotated[str | None, typer.Option(help="Only events caused by this key's requests (its id or name); "
                                                 "default: every event of the database.")] = None,
    secret_file: Annotated[Path | None, typer.Option(help="Read the signing secret from this file instead of "
                                                          "making one.")] = None,
) -> None:
    """Register a webhook. Prints its signing secret once (HMAC-SHA256; see docs/service.md)."""
    secret = None
    if secret_file is not None:
        try:
            secret = secret_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise InvalidInputError(f"cannot read {secret_file}: {exc.strerror}") from None
    with open_db(ctx) as db:
        key_id = None
        if key is not None:
            match = [k for k in db.api_keys() if not k.revoked and key in (k.id, k.name)]
            if not match:
                raise InvalidInputError(f"no live API key with id or name {key!r}")
            key_id = match[0].id
        hook = db.add_webhook(url, events, key_id=key_id, secret=secret)
    emit_kv(ctx, {**hook.to_dict(), "secret": hook.secret})


@command(name="list", group=hooks_app)
def hooks_list(ctx: typer.Context) -> None:
    """Every webhook (without secrets)."""
    with open_db(ctx, readonly=True) as db:
        rows = [h.to_dict() for h in db.webhooks()]
    emit(ctx, rows, ["id", "url", "events", "key_id", "created_at"])


@command(name="remove", group=hooks_app)
def hooks_remove(ctx: typer.Context, hook_id: Annotated[int, typer.Argument(help="The webhook's id.")]) -> None:
    """Remove a webhook."""
    with open_db(ctx) as db:
        emit_kv(ctx, db.remove_webhook(hook_id).to_dict())
