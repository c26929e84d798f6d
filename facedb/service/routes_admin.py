"""Administration: stats, check, audit trail, settings, API keys, webhooks. Scope ``admin``."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..choices import RuleKind, ThumbnailMode
from ..errors import InvalidInputError
from ..operations.hooks import check_url
from ..operations.keys import Scope
from .auth import ADMIN, Caller

router = APIRouter(prefix="/v1", tags=["admin"])


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scope: Scope = Field(description="identify (identify, verify, detect), enroll (+ people, templates) or admin "
                                     "(+ keys, webhooks, settings, audit); metrics: GET /metrics "
                                     "only (a Prometheus scraper's key).")
    name: str | None = Field(None, description="A label, e.g. door-3 (unique among live keys).")
    grants: list[str] | None = Field(None, description="identify keys only: ['candidates'] lets the key see "
                                                       "candidate lists, raw similarities, k > 1 and batches of "
                                                       "vectors; without it a key is told the decision only.")


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
    audit_retention_days: float | None = Field(None, description="Keep audit records this many days "
                                                              "(0 = forever, else at most 36500).")
    audit_store_probes: bool | None = Field(None, description="Store each probe's embedding (biometric data).")
    thumbnails: ThumbnailMode | None = Field(None, description="Face thumbnails kept: off, enrolled (templates) or all "
                                                            "(also decisions' probes and unknown visitors); "
                                                            "narrowing erases those no longer covered.")
    visitors_enabled: bool | None = Field(None, description="Keep faces answered unknown (unknown visitors).")
    visitors_retention_days: float | None = Field(None, description="Keep them this many days: more than 0, "
                                                                 "at most 3650.")
    decision_rule: RuleKind | None = Field(None, description="fixed (the stored threshold), margin (the stored "
                                                         "threshold and s1 - 0.5 s2 >= decision_margin) or gallery "
                                                         "(follows the gallery size to hold FPIR at decision_target).")
    decision_target: float | None = Field(None, description="The gallery rule's target FPIR, in (0, 1); only with "
                                                            "the gallery rule.")
    decision_margin: float | None = Field(None, description="The margin rule's threshold for s1 - 0.5 s2; only with "
                                                            "the margin rule (default: the stored one, else the "
                                                            "model's).")


#: What ``/stats`` says of the index this worker holds in memory (``FaceDB.index_state``): whether it came from
#: the saved file or was built, the generation it answers at, and where re-scoring reads (``loading`` for the
#: seconds after an open, ``store`` past the memory budget: slower answers), so an operator can see it.
WORKER_INDEX_FIELDS = ("loaded", "built", "generation", "from_file", "rescore_from", "stand_in")


@router.get("/stats", summary="Model, threshold and its provenance, counts, index state (the stored one, and this "
                              "worker's in memory); this worker's pid.")
def stats(caller: Annotated[Caller, Depends(ADMIN)]) -> dict[str, Any]:
    with caller as db:
        out = db.stats().to_dict()
        held = db.index_state().to_dict()
        # nothing held (not loaded yet, or let go after an engine failure): no kind, origin or re-scoring to report
        out["worker_index"] = {k: held[k] if held["loaded"] or k in ("loaded", "stand_in") else None
                               for k in WORKER_INDEX_FIELDS}
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


class Order(str, Enum):
    asc = "asc"
    desc = "desc"


class Decision(str, Enum):
    match = "match"  # an identity was given (identify: a match; verify: accepted)
    unknown = "unknown"  # none (identify: unknown; verify: rejected)


#: The operations that are decisions about a face (what an access-control operator reviews).
DECISIONS = ("search", "identify", "verify")


@router.get("/audit", summary="The audit trail, oldest first, filtered by time, operation, actor, person and "
                              "decision; paged.")
def audit(caller: Annotated[Caller, Depends(ADMIN)],
          since: Annotated[str | None, Query(description="At or after this time: ISO 8601 with any offset "
                                                         "(2026-03-01T23:30:00-05:00, Z, +09:00; escape '+' as "
                                                         "%2B; UTC if no zone) or an age: 90m, 24h, 7d.")]
          = None,
          until: Annotated[str | None, Query(description="Before this time (as since).")] = None,
          operation: Annotated[str | None, Query(description="One operation, several comma-separated, or "
                                                             "'decisions' (search, identify, verify).")] = None,
          actor: Annotated[str | None, Query(description="key:<id>, cli:<user>, ...")] = None,
          identity: Annotated[str | None, Query(description="Records about this person (the name recorded).")]
          = None,
          decision: Annotated[Decision | None, Query(description="match (an identity given) or unknown (none).")]
          = None,
          after_id: Annotated[int | None, Query(ge=0, le=2**62, description="Only records after this id (a live "
                                                                            "view's poll; one that finds none is "
                                                                            "not recorded).")] = None,
          order: Order = Order.asc,
          limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
          offset: Annotated[int, Query(ge=0, le=2**62)] = 0) -> dict[str, Any]:
    from ..gallery.store import utc_time

    start, end = utc_time(since, "since"), utc_time(until, "until")
    ops: str | list[str] | None = operation
    if operation == "decisions":
        ops = list(DECISIONS)
    elif operation is not None and "," in operation:
        ops = [o.strip() for o in operation.split(",") if o.strip()]
    with caller as db:
        records = db.audit(start, limit, until=end, operation=ops, actor=actor, offset=offset, identity=identity,
                           decided=None if decision is None else decision is Decision.match, after_id=after_id,
                           newest_first=order is Order.desc)
        if records or after_id is None:
            db.note("read-audit", detail={"since": start, "until": end, "operation": operation, "actor": actor,
                                          **({"identity": identity} if identity is not None else {}),
                                          **({"decision": decision.value} if decision is not None else {})})
    return {"records": [r.to_dict() for r in records], "limit": limit, "offset": offset}


@router.get("/audit/{record_id}/thumbnail", summary="The probe's face thumbnail (JPEG) of a decision, where the "
                                                    "database keeps them (thumbnails: all).",
            response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
def audit_thumbnail(record_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
                    caller: Annotated[Caller, Depends(ADMIN)]) -> Response:
    from .routes_people import thumbnail_response

    return thumbnail_response(caller, "probe", record_id)


@router.get("/settings", summary="The decision threshold and its source, the audit trail's settings, the model.")
def get_settings(caller: Annotated[Caller, Depends(ADMIN)]) -> dict[str, Any]:
    with caller as db:
        db.note("read-settings")
        return _settings(caller)


@router.patch("/settings", summary="Change the default threshold or the audit trail's settings.")
def update_settings(body: SettingsUpdate, caller: Annotated[Caller, Depends(ADMIN)]) -> dict[str, Any]:
    if not body.model_fields_set - {"threshold_source"}:
        raise InvalidInputError("nothing to change: give threshold, an audit_* or visitors_* setting, thumbnails or "
                                "decision_rule / decision_target / decision_margin")
    with caller as db:
        from ..gallery.settings import Settings, check_threshold

        if body.threshold is not None:
            check_threshold(body.threshold)
        # all validated before any is written: a refused request changes nothing
        Settings.audit_rows(body.audit_enabled, body.audit_retention_days, body.audit_store_probes)
        Settings.visitor_rows(body.visitors_enabled, body.visitors_retention_days)
        rule = None
        if body.decision_rule is not None or body.decision_target is not None or body.decision_margin is not None:
            rule = body.decision_rule.value if body.decision_rule is not None else db.settings().rule.kind
            # a setting the rule in force ignores is refused, not silently kept
            if body.decision_target is not None and rule != "gallery":
                raise InvalidInputError(f"decision_target is the gallery rule's; the rule is {rule}")
            if body.decision_margin is not None and rule != "margin":
                raise InvalidInputError(f"decision_margin is the margin rule's; the rule is {rule}")
            Settings.rule_rows(rule, body.decision_target, margin=body.decision_margin)
            if rule == "gallery" and db.settings().rule.impostors is None:
                raise InvalidInputError(f"the gallery rule needs an impostor model: {db.model_id} ships none; build "
                                        "one with `facedb calibrate --far 1e-3 --folder DIR`")
        if rule is not None:
            db.set_rule(rule, target=body.decision_target, margin=body.decision_margin)
        if body.visitors_enabled is not None or body.visitors_retention_days is not None:
            db.configure_visitors(enabled=body.visitors_enabled, retention_days=body.visitors_retention_days)
            db.note("visitors-settings", detail=db.settings().visitors.to_dict())
        if body.thumbnails is not None:
            db.configure_thumbnails(body.thumbnails.value)
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
    stats = caller.db.stats()
    return {"model_id": s.model_id, "dim": s.dim, "flip": s.flip, "threshold": s.threshold,
            "threshold_source": s.threshold_source, "calibration": s.calibration.to_dict() if s.calibration else None,
            "decision_rule": s.rule.kind, "decision_target": s.rule.target, "decision_margin": s.rule.margin,
            "margin_available": s.rule.margin is not None or caller.db.shipped_margin() is not None,
            "impostor_model": s.rule.impostors is not None, "threshold_in_force": stats.threshold_in_force,
            "warnings": stats.warnings, "thumbnails": s.thumbnails, "visitors": s.visitors.to_dict(),
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
        key, secret = db.create_api_key(body.scope.value, body.name, body.grants)
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
    from .delivery import check_target

    check_url(body.url)  # the URL's form first, then where it points: loopback, link-local, private are refused
    check_target(body.url, caller.state.settings.allow_private_hooks)  # (unless allowed: issue #25, finding 3)
    with caller as db:
        hook = db.add_webhook(body.url, body.events, key_id=body.key_id)
    if caller.state.dispatcher is not None:
        caller.state.dispatcher.invalidate()
    return {**hook.to_dict(), "secret": hook.secret}


@router.delete("/hooks/{hook_id}", summary="Remove a webhook: nothing is sent to it after this answer.")
def remove_hook(hook_id: Annotated[int, Path(ge=1, le=2**63 - 1)], caller: Annotated[Caller, Depends(ADMIN)]
                ) -> dict[str, Any]:
    with caller as db:
        hook = db.remove_webhook(hook_id)
    if caller.state.dispatcher is not None:  # its queued deliveries, retries and fold windows go now, and the
        caller.state.dispatcher.forget(hook, timeout=caller.state.settings.hook_timeout + 1)  # one on the wire ends
    return hook.to_dict()
