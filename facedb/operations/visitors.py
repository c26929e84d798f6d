"""Unknown visitors: faces that a search answered *unknown*, kept (only where the database opts in) so that an
operator can see that the same stranger came seven times this week, and enrol or forget them.

* Kept: when the setting is on (``FaceDB.configure_visitors(enabled=True)``, ``facedb visitors settings
  --enable``; off by default, since it keeps biometric data of people who did not enrol), every face answered
  unknown by ``search`` (photos) or ``identify`` (vectors) is appended to the store's ``unassigned_faces``
  table with its time, actor, photo SHA-256 and face box (photos only) and the best similarity it reached.
  Kept ``retention_days`` (default 30): older faces are purged on every append, on listing and by ``vacuum``,
  and never listed.
* Grouped: on demand, by the clustering module (average linkage at the database's clustering threshold, see
  :func:`facedb.operations.cluster.default_threshold`) over **every** kept face, so a group's membership does not depend
  on the time window asked for; ``since`` only chooses which groups are shown (last seen at or after it).
* Named stably: ``V<first face id>-<first 6 hex of SHA-256 of the sorted member ids>``. Enrolling or forgetting
  a group recomputes the groups and acts only if one has exactly that id, i.e. exactly the faces that were
  listed; if faces arrived, expired or were removed meanwhile (or another threshold is used) the call is
  refused and says so, and nothing changes.
* Enrol: the group's faces become templates of a new or existing person in one transaction (all or none), and
  leave ``unassigned_faces``. Forget: they are erased (with any copy the audit trail kept of their vectors);
  after ``vacuum`` no byte of them remains in the database's files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DatabaseError, InvalidInputError
from ..gallery import thumbnails
from ..gallery.settings import Settings, check_threshold
from ..gallery.store import Store, check_name, utc_time
from ..records import VisitorGroup
from . import cluster as clustering
from .audit import current_actor

if TYPE_CHECKING:
    from ..db import FaceDB
    from ..records import Person


class VisitorLog:
    """Keeps faces answered unknown, when the database's settings say so."""

    def __init__(self, store: Store, actor: str) -> None:
        self.store = store
        self.actor = actor

    def keep(self, faces: Sequence[dict[str, Any]], settings: Settings) -> int:
        """Append the faces (dicts with vector, identity, and any of image_sha256, box, det_score, similarity,
        thumbnail: a JPEG, kept if the database keeps visitors' thumbnails) whose identity is None, if visitors
        are kept; returns how many were kept."""
        if not settings.visitors.enabled:
            return 0
        actor = current_actor(self.actor)
        keep_thumbnail = thumbnails.keeps(settings.thumbnails, "visitor")
        rows = [{**f, "actor": actor, "thumbnail": f.get("thumbnail") if keep_thumbnail else None}
                for f in faces if f.get("identity") is None]
        self.store.append_unassigned(rows, settings.visitors.retention_days)
        return len(rows)


def group_id(face_ids: Sequence[int]) -> str:
    """A group's stable name: ``V<first id>-<6 hex of SHA-256 of the sorted ids>``."""
    ids = sorted(int(i) for i in face_ids)
    digest = hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:6]
    return f"V{ids[0]}-{digest}"


def groups(store: Store, settings: Settings, *, threshold: float | None = None, rule: str | None = None,
           min_size: int = 1) -> list[VisitorGroup]:
    """Every group of kept unknown faces (``min_size`` faces or more), most faces first."""
    rule = clustering.check_rule(rule or clustering.DEFAULT_RULE)
    thr = clustering.default_threshold(settings.threshold, rule) if threshold is None else check_threshold(threshold)
    rows, vectors = store.unassigned(settings.visitors.retention_days)
    if not rows:
        return []
    result = clustering.cluster(vectors, thr, rule=rule, min_size=1)
    out = []
    for members, central in zip(result.members(), result.central):
        if len(members) < min_size:
            continue
        picked = [rows[i] for i in members]
        times = [r[1] for r in picked]
        sims = [r[6] for r in picked if r[6] is not None]
        c = rows[int(central)]
        out.append(VisitorGroup(
            id=group_id([r[0] for r in picked]), faces=len(picked),
            photos=len({r[3] for r in picked if r[3] is not None}), first_seen=min(times), last_seen=max(times),
            actors=sorted({r[2] for r in picked if r[2]}), central_face=int(c[0]), central_image_sha256=c[3],
            central_box=c[4], best_similarity=max(sims) if sims else None, face_ids=[int(r[0]) for r in picked]))
    return out


def find(store: Store, settings: Settings, gid: str, *, threshold: float | None = None,
         rule: str | None = None) -> VisitorGroup:
    """The group named ``gid`` now, or InvalidInputError saying why it cannot be found (changed since listed)."""
    if not isinstance(gid, str) or not gid.startswith("V") or "-" not in gid:
        raise InvalidInputError(f"a visitor group is named like V17-3fa2c1 (see `facedb visitors`), got {gid!r}")
    current = groups(store, settings, threshold=threshold, rule=rule, min_size=1)
    for g in current:
        if g.id == gid:
            return g
    first = gid[1:].split("-", 1)[0]
    now = next((g for g in current if first.isdigit() and int(first) in g.face_ids), None)
    hint = (f"; face {first} is now in group {now.id} ({now.faces} faces)" if now is not None
            else f"; face {first} is no longer kept" if first.isdigit() else "")
    raise InvalidInputError(f"no visitor group {gid}: faces arrived, expired or were enrolled or forgotten since it "
                            f"was listed, or another threshold is in use{hint}. Nothing was changed: list the "
                            "groups again (`facedb visitors`)")


def since_filter(found: list[VisitorGroup], since: str | datetime | None) -> list[VisitorGroup]:
    """The groups last seen at or after ``since`` (anything :func:`~facedb.gallery.store.utc_time` takes): compared as
    text with the stored ``last_seen``, so only in the stored form, whatever offset ``since`` came with."""
    since = utc_time(since, "since")
    return [g for g in found if since is None or g.last_seen >= since]


def central_vectors(store: Store, settings: Settings, found: Sequence[VisitorGroup]) -> np.ndarray:
    """The central face's vector of each group (for a caller that wants to compare groups with the gallery)."""
    rows, vectors = store.unassigned(settings.visitors.retention_days)
    pos = {r[0]: i for i, r in enumerate(rows)}
    return vectors[[pos[g.central_face] for g in found if g.central_face in pos]]


# ------------------------------------------------------------------------------------- FaceDB's visitor glue
def listed(db: FaceDB, since: str | datetime | None, min_size: int, threshold: float | None,
           rule: str | None) -> list[VisitorGroup]:
    """:meth:`facedb.FaceDB.visitors`: expired faces purged, then the groups of kept unknown faces (at least
    ``min_size`` faces), most faces first, last seen at or after ``since`` (as ``FaceDB.audit`` takes it: any
    offset, naive = UTC, a ``datetime`` or an age). Each group's ``id`` is stable while its faces stay the same.
    InvalidInputError for a bad ``since`` or ``min_size``, before anything is purged."""
    min_size = clustering._check_positive(min_size, "min_size")
    since = utc_time(since, "since")  # refused before expired faces are purged: bad input changes nothing
    with db._lock:
        settings = db.settings()
        db.store.purge_unassigned(settings.visitors.retention_days)
        found = groups(db.store, settings, threshold=threshold, rule=rule, min_size=min_size)
        return since_filter(found, since)


def enroll_group(db: FaceDB, group: str, name: str, threshold: float | None, rule: str | None) -> Person:
    """:meth:`facedb.FaceDB.enroll_visitors`: the group's faces become templates of ``name`` in one transaction,
    the index brought level, recorded as ``enroll``. InvalidInputError (a bad name, a group that changed),
    DatabaseError read-only: nothing changed."""
    check_name(name)
    if db.readonly:
        raise DatabaseError(f"{db.root} is open read-only: cannot enrol")
    with db._lock:
        found = find(db.store, db.settings(), group, threshold=threshold, rule=rule)
        ids = db.store.enroll_unassigned(found.face_ids, name)
        settings = db.settings()
        db.keeper.after_write(settings)
        person = db.store.person(name)
        db.trail.record("enroll", [{"identity": person.name, "detail": {"visitors": group,
                                                                        "templates": len(ids)}}], settings)
        return person


def forget_group(db: FaceDB, group: str, threshold: float | None, rule: str | None) -> int:
    """:meth:`facedb.FaceDB.forget_visitors`: erase the group's faces (and the audit trail's copies of their
    vectors), recorded as ``forget-visitors``; returns how many. DatabaseError read-only."""
    if db.readonly:
        raise DatabaseError(f"{db.root} is open read-only: cannot forget")
    with db._lock:
        settings = db.settings()
        found = find(db.store, settings, group, threshold=threshold, rule=rule)
        n = db.store.forget_unassigned(found.face_ids)
        db.trail.record("forget-visitors", [{"detail": {"visitors": group, "faces": n}}], settings)
        return n
