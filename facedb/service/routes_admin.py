"""Administration: stats, check, audit trail, settings, API keys, webhooks. Scope ``admin``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..errors import InvalidInputError
from ..keys import Scope
from .auth import ADMIN, Caller

router = APIRouter(prefix="/v1", tags=["admin"])


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scope: Scope = Field(description="identify (identify, verify, detect), enroll (+ people, templates) or admin "
                                     "(+ keys, webhooks, settings, audit).")
    name: str | None = Field(None, description="A label, e.g. door-3 (unique among live keys).")


class NewHook(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(description="http(s) URL the events are POSTed to.")
    events: list[str] = Field(description="identify.match, identify.unknown, verify.accept, verify.reject, "
                                          "person.enrolled, person.removed (or *).")
    key_id: str | None = Field(None, description="Only events caused by this key's requests; none = all.")


class SettingsUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threshold: float | None = Field(None, description="New default decision threshold (cosine similarity).")
    threshold_source: str = Field("set over HTTP", description="Where the threshold came from (kept with it).")
    audit_enabled: bool | None = None
    audit_retention_days: float | None = Field(None, description="Keep audit records this many days (0 = forever).")
    audit_store_probes: bool | None = Field(None, description="Store each probe's embedding (biometric data).")


@router.get("/stats", summary="Model, threshold and its provenance, counts, index state; this worker's pid.")
def stats(caller: Annotated[Caller, Depends(ADMIN)]) -> dict[str, Any]:
    with caller as db:
        out = db.stats().to_dict()
        db.note("read-stats")
    dispatcher = caller.state.dispatcher
    out.update(version=__version__, worker_pid=caller.state.pid,
               webhooks=dispatcher.stats.to_dict() if dispatcher is not None else None)
    return out


@router.get("/check", summary="Verify the store and that the index agrees with it; ok false on any problem.")
def check(caller: Annotated[Caller, Depends(ADMIN)]) -> dict[str, Any]:
    with caller as db:
        report = db.check()
        db.note("check", detail={"ok": report.ok, "problems": len(report.problems)})
    return report.to_dict()


@router.get("/audit", summary="The audit trail, oldest first, filtered by time, operation and actor; paged.")
def audit(caller: Annotated[Caller, Depends(ADMIN)],
          since: Annotated[str | None, Query(description="ISO 8601 time (UTC if no zone) or an age: 90m, 24h, 7d.")]
          = None,
          until: Annotated[str | None, Query(description="Before this time (ISO or an age).")] = None,
          operation: str | None = None,
          actor: Annotated[str | None, Query(description="key:<id>, cli:<user>, ...")] = None,
          limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
          offset: Annotated[int, Query(ge=0, le=2**62)] = 0) -> dict[str, Any]:
    from ..cli.admin import since_time

    start, end = since_time(since), since_time(until, "until")
    with caller as db:
        records = db.audit(start, limit, until=end, operation=operation, actor=actor, offset=offset)
        db.note("read-audit", detail={"since": start, "until": end, "operation": operation, "actor": actor})
    return {"records": [r.to_dict() for r in records], "limit": limit, "offset": offset}


@router.get("/settings", summary="The decision threshold and its source, the audit trail's settings, the model.")
def get_settings(caller: Annotated[Caller, Depends(ADMIN)]) -> dict[str, Any]:
    with caller as db:
        db.note("read-settings")
        return _settings(caller)


@router.patch("/settings", summary="Change the default threshold or the audit trail's settings.")
def update_settings(body: SettingsUpdate, caller: Annotated[Caller, Depends(ADMIN)]) -> dict[str, Any]:
    if body.threshold is None and body.audit_enabled is None and body.audit_retention_days is None \
            and body.audit_store_probes is None:
        raise InvalidInputError("nothing to change: give threshold or an audit_* setting")
    with caller as db:
        from ..settings import Settings, check_threshold

        if body.threshold is not None:
            check_threshold(body.threshold)
        # both validated before either is written: a refused request changes nothing
        Settings.audit_rows(body.audit_enabled, body.audit_retention_days, body.audit_store_probes)
        if body.threshold is not None:
            db.set_threshold(body.threshold, body.threshold_source[:200] or "set over HTTP")
        if body.audit_enabled is not None or body.audit_retention_days is not None \
                or body.audit_store_probes is not None:
            db.configure_audit(enabled=body.audit_enabled, retention_days=body.audit_retention_days,
                               store_probes=body.audit_store_probes)
            db.note("audit-settings", detail=db.audit_settings().to_dict())
        return _settings(caller)


def _settings(caller: Caller) -> dict[str, Any]:
    s = caller.db.settings()
    cfg = caller.state.settings
    return {"model_id": s.model_id, "dim": s.dim, "flip": s.flip, "threshold": s.threshold,
            "threshold_source": s.threshold_source, "calibration": s.calibration.to_dict() if s.calibration else None,
            "index_kind": s.index_kind, "audit": s.audit.to_dict(),
            "service": {"max_upload_mb": cfg.max_upload_mb, "fold_window_s": cfg.fold_window,
                        "hook_attempts": cfg.hook_attempts, "cors_origins": list(cfg.cors_origins)}}


@router.get("/keys", summary="Every API key (never the keys themselves), revoked ones too.")
def list_keys(caller: Annotated[Caller, Depends(ADMIN)]) -> dict[str, Any]:
    with caller as db:
        keys = db.api_keys()
        db.note("read-keys")
    return {"keys": [k.to_dict() for k in keys]}


@router.post("/keys", status_code=201, summary="Make an API key; the key is in this answer and nowhere else.")
def create_key(body: NewKey, caller: Annotated[Caller, Depends(ADMIN)]) -> dict[str, Any]:
    with caller as db:
        key, secret = db.create_api_key(body.scope.value, body.name)
    return {**key.to_dict(), "key": secret}


@router.delete("/keys/{ref}", summary="Revoke a key (by id or name); its next request is refused everywhere.")
def revoke_key(ref: Annotated[str, Path(max_length=200)], caller: Annotated[Caller, Depends(ADMIN)]
               ) -> dict[str, Any]:
    with caller as db:
        return db.revoke_api_key(ref).to_dict()


@router.get("/hooks", summary="Every webhook (without its secret).")
def list_hooks(caller: Annotated[Caller, Depends(ADMIN)]) -> dict[str, Any]:
    with caller as db:
        hooks = db.webhooks()
        db.note("read-hooks")
    return {"hooks": [h.to_dict() for h in hooks]}


@router.post("/hooks", status_code=201, summary="Register a webhook; its signing secret is in this answer only.")
def add_hook(body: NewHook, caller: Annotated[Caller, Depends(ADMIN)]) -> dict[str, Any]:
    with caller as db:
        hook = db.add_webhook(body.url, body.events, key_id=body.key_id)
    if caller.state.dispatcher is not None:
        caller.state.dispatcher.invalidate()
    return {**hook.to_dict(), "secret": hook.secret}


@router.delete("/hooks/{hook_id}", summary="Remove a webhook.")
def remove_hook(hook_id: Annotated[int, Path(ge=1, le=2**63 - 1)], caller: Annotated[Caller, Depends(ADMIN)]
                ) -> dict[str, Any]:
    with caller as db:
        hook = db.remove_webhook(hook_id)
    if caller.state.dispatcher is not None:
        caller.state.dispatcher.invalidate()
    return hook.to_dict()
