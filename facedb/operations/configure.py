"""Changing a database's settings, each recorded in the audit trail: the threshold and its calibration record, the
open-set decision rule, mean templates, the audit trail's own settings and the unknown-visitor log.

The settings' rows and their parsing are :mod:`facedb.gallery.settings`'s; this room chooses what to store (a
model's shipped impostor model or margin threshold when the rule needs one) and records it. ``FaceDB`` calls these
under its lock; moved out of ``db.py`` as they were.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import InvalidInputError
from ..gallery.decision import ImpostorModel
from ..gallery.settings import AuditSettings, Calibration, Settings, VisitorSettings, check_threshold

if TYPE_CHECKING:
    from ..db import FaceDB


def model_spec(model_id: str) -> Any:
    """The model's registered spec (:data:`facedb.faces.models.MODELS`; None for your own model id)."""
    from ..faces.models import MODELS

    return MODELS.get(model_id)


def set_threshold(db: FaceDB, threshold: float, source: str, calibration: Calibration | dict[str, Any] | None,
                  details: dict[str, Any]) -> None:
    """:meth:`facedb.FaceDB.set_threshold` (InvalidInputError for a threshold outside [-1, 1])."""
    threshold = check_threshold(threshold)
    raw = calibration.to_dict() if isinstance(calibration, Calibration) else dict(calibration or {})
    raw.update(details)
    cal = Calibration.from_dict({**raw, "threshold": threshold}) if raw else None
    db.store.set_meta(Settings.threshold_rows(threshold, source, cal))
    db.trail.record("calibrate", [{"threshold": threshold, "detail": {"source": source}}], db.settings())


def set_rule(db: FaceDB, rule: str, target: float | None, impostors: ImpostorModel | None,
             margin: float | None) -> Settings:
    """:meth:`facedb.FaceDB.set_rule`: the model's own impostor model (gallery rule) or margin threshold (margin
    rule) when none is given or stored; InvalidInputError when the model ships none."""
    s = db.settings()
    spec = model_spec(db.model_id)
    if rule == "gallery" and impostors is None and s.rule.impostors is None:
        impostors = spec.impostor_model(s.flip) if spec is not None else None
        if impostors is None:
            raise InvalidInputError(
                f"the gallery rule needs an impostor model: {db.model_id} ships none; build one from your "
                "labelled photos with `facedb calibrate --far 1e-3 --folder DIR`")
    if rule == "margin" and margin is None and s.rule.margin is None:
        margin = db.shipped_margin()
        if margin is None:
            raise InvalidInputError(
                f"the margin rule needs a margin threshold: {db.model_id} ships none; calibrate one from "
                "your labelled photos with `facedb calibrate --fpir 0.01 --folder DIR`")
    db.store.set_meta(Settings.rule_rows(rule, target, impostors, margin))
    settings = db.settings()
    db.trail.record("rule", [{"threshold": settings.threshold, "detail": {
        "rule": rule, "target": settings.rule.target, "margin": settings.rule.margin}}], settings)
    return settings


def set_mean_templates(db: FaceDB, mean: bool) -> Settings:
    """:meth:`facedb.FaceDB.configure_templates`: every person's mean template recomputed (kept or dropped) and
    the index brought level."""
    db.store.set_meta({"mean_templates": "1" if mean else "0"})
    db.store.refresh_means()
    settings = db.settings()
    db.keeper.after_write(settings)
    db.trail.record("templates-setting", [{"detail": {"mean_templates": mean}}], settings)
    return settings


def set_audit(db: FaceDB, enabled: bool | None, retention_days: float | None, store_probes: bool | None,
              sync: bool | None, store_embeddings: bool | None = None) -> AuditSettings:
    """:meth:`facedb.FaceDB.configure_audit`: switch the audit trail on or off, set its retention (days; 0 = keep
    forever), whether probe embeddings are stored with each decision (off by default: they are biometric data;
    ``store_embeddings`` is the older name of ``store_probes``), and whether each decision's record is committed
    before its answer (``sync``) or by the background writer within 20 ms after it (``operations/audit.py``, docs
    "Guarantees"). The change is recorded while the trail is on (before switching it off, after switching it
    on); InvalidInputError for a bad value, nothing changed."""
    probes = store_probes if store_probes is not None else store_embeddings
    rows = Settings.audit_rows(enabled, retention_days, probes, sync)
    if rows:
        with db._lock:
            before = db.settings()
            changed = {k: v for k, v in Settings.parse({**db.store.all_meta(), **rows}).audit.to_dict().items()
                       if v != before.audit.to_dict()[k]}
            record = [{"detail": changed}] if changed else []
            # Recorded while the trail is on: before switching it off, after switching it on.
            db.trail.record("audit-settings", record, before)
            db.store.set_meta(rows)
            if before.audit.enabled is False:
                db.trail.record("audit-settings", record, db.settings())
    return db.settings().audit


def set_visitors(db: FaceDB, enabled: bool | None, retention_days: float | None) -> VisitorSettings:
    """:meth:`facedb.FaceDB.configure_visitors`: keep faces answered unknown (``enabled``; off by default) and for
    how many days (default 30). Switching it off keeps what was kept until it expires
    (:meth:`facedb.FaceDB.forget_visitors` erases sooner). InvalidInputError for a bad value, nothing changed."""
    rows = Settings.visitor_rows(enabled, retention_days)
    if rows:
        db.store.set_meta(rows)
    return db.settings().visitors
