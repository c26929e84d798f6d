"""What an operator reads about a database: its statistics (``facedb stats``, GET /stats), the warning when
the decision rule in force was not calibrated for today's gallery size, and the audit trail. Reads only; moved
out of ``db.py`` as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from ..gallery.decision import ImpostorModel, predicted_fpir
from ..gallery.query import policy_for
from ..gallery.settings import Settings, check_count
from ..gallery.store import SCHEMA_VERSION, utc_time
from ..protection import encryption
from ..records import AuditRecord, Stats

if TYPE_CHECKING:
    from ..db import FaceDB


def shipped_impostors(s: Settings) -> ImpostorModel | None:
    """The impostor model the database's model ships (for warnings on databases made before it existed)."""
    from ..faces.models import MODELS

    spec = MODELS.get(s.model_id)
    return spec.impostor_model(s.flip) if spec is not None else None


def calibration_warning(db: FaceDB, s: Settings) -> str | None:
    """:meth:`facedb.FaceDB.calibration_warning` under the settings ``s``: a warning when the decision rule in force
    was not calibrated for the current gallery size, else None.

    In 1:N search the chance that some stranger scores above the threshold grows with the gallery. The gallery
    and margin rules follow it; a fixed threshold does not: warned about when the impostor model predicts an FPIR
    over twice the target (1% unless calibrated otherwise) at today's gallery, or, without one, when the gallery
    has grown past twice the size an FPIR threshold was calibrated for (or a 1:1 threshold is used for 1:N).
    """
    if (s.rule.kind == "gallery" and s.rule.impostors is not None) or (s.rule.kind == "margin"
                                                                      and s.rule.margin is not None):
        return None  # both rules hold their FPIR as the gallery grows
    templates = db.store.counts()["templates"]
    cal = s.calibration
    target = cal.target_rate if cal is not None and cal.target == "fpir" else s.rule.target
    impostors = s.rule.impostors or shipped_impostors(s)
    if impostors is not None and templates > 1 and (cal is None or cal.target != "fpir"):
        fpir = predicted_fpir(impostors, s.threshold, templates)
        if fpir > 2 * target:
            return (f"with {templates} templates enrolled, the fixed threshold {s.threshold:.4f} lets about "
                    f"{fpir:.0%} of strangers be identified as someone: use the gallery rule (`facedb rule "
                    f"gallery`) or calibrate for 1:N (`facedb calibrate --fpir ...`)")
        return None
    if cal is None or cal.target != "fpir" or not cal.gallery_size:
        if cal is not None and cal.target == "far" and db.store.count_people() > 1:
            return (f"the threshold was calibrated for 1:1 (FAR {cal.target_rate:g}); with "
                    f"{db.store.count_people()} people enrolled a stranger has that many chances: calibrate "
                    "for 1:N (`facedb calibrate --fpir ...`)")
        return None
    people = db.store.count_people()
    if people > 2 * cal.gallery_size:
        return (f"the threshold was calibrated for FPIR {cal.target_rate} at {cal.gallery_size} people; the "
                f"gallery now has {people}: recalibrate (`facedb calibrate --fpir ...`)")
    return None


def stats(db: FaceDB) -> Stats:
    """:meth:`facedb.FaceDB.stats`: settings, counts, the index's state and file, warnings, protection. The caller
    holds the lock."""
    s = db.settings()
    state = db.keeper.describe(s)
    counts = db.store.counts()
    in_force = policy_for(s, counts)[0].threshold
    protection = db.protection
    return Stats(
        path=str(db.root), model_id=s.model_id, dim=s.dim, metric=s.metric, flip=s.flip,
        threshold=s.threshold, threshold_source=s.threshold_source,
        calibration=s.calibration.to_dict() if s.calibration else None, decision_rule=s.rule.kind,
        decision_target=s.rule.target, decision_margin=s.rule.margin, threshold_in_force=in_force,
        index_kind=s.index_kind,
        index_built=(s.index_stamp or {}).get("kind"), index_params=(s.index_stamp or {}).get("params"),
        people=counts["people"], images=counts["images"], templates=counts["templates"],
        mean_templates=counts["mean_templates"], mean_templates_enabled=s.mean_templates,
        people_with_one_template=db.store.people_with_templates(1), generation=s.generation,
        index_file_bytes=state.persisted_bytes, index_file_generation=state.persisted_generation,
        schema_version=SCHEMA_VERSION, created_at=s.created_at, audit=s.audit.to_dict(),
        warnings=[w for w in [db.calibration_warning(s)] if w],
        encrypted=protection is not None, cancellable=bool(s.extra.get("projection_seed")), detector=s.detector,
        key_version=protection.key_version if protection else None,
        data_key_version=protection.data_key_version if protection else None,
        plaintext_files=encryption.plaintext_files(db.root, protection is not None))


def audit(db: FaceDB, since: str | datetime | None = None, limit: int | None = None, *,
          until: str | datetime | None = None, operation: str | Sequence[str] | None = None,
          actor: str | None = None, offset: int = 0, identity: str | None = None, decided: bool | None = None,
          after_id: int | None = None, newest_first: bool = False) -> list[AuditRecord]:
    """:meth:`facedb.FaceDB.audit`: the audit trail, oldest first (or ``newest_first``), filtered by time (``since``
    inclusive, ``until`` exclusive: an ISO 8601 time with any offset, ``Z``, ``+05:30``, ``-08:00``, naive = UTC;
    a ``datetime``; or an age like ``7d``, compared as instants), operation (one, or any of several), actor,
    ``identity`` (a name as recorded), ``decided`` (True: an identity was given; False: unknown or rejected) and
    ``after_id`` (records after that one: a live view's next poll), paged. InvalidInputError for a time that is
    none of these, or a bad page, before the trail is flushed."""
    limit = None if limit is None else check_count(limit, "limit", 1)
    offset = check_count(offset, "offset")
    since, until = utc_time(since, "since"), utc_time(until, "until")  # refused before the trail is flushed
    with db._lock:
        return db.trail.read(since, limit, until=until, operation=operation, actor=actor, offset=offset,
                             identity=identity, decided=decided, after_id=after_id, newest_first=newest_first)
