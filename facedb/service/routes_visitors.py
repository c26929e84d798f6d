"""Unknown visitors (docs/clustering.md): the groups of faces answered *unknown* that the database keeps when
told to, each enrolled as a new or existing person, or forgotten. Scope ``enroll`` (what the people routes need:
enrolling a group makes or changes a person). Switching the keeping on or off is a setting (``PATCH
/v1/settings``, admin)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from .auth import ENROLL, Caller

router = APIRouter(prefix="/v1", tags=["visitors"])

GroupId = Annotated[str, Path(max_length=40, description="A group's id as listed, e.g. V17-3fa2c1.")]


class EnrollGroup(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="The person the group's faces become templates of (created if new).")


@router.get("/visitors", summary="Groups of kept unknown faces (most faces first): count, photos, first and last "
                                 "seen, doors (actors), face ids.")
def list_visitors(caller: Annotated[Caller, Depends(ENROLL)],
                  since: Annotated[str | None, Query(description="Groups last seen at or after this time (ISO "
                                                                 "8601 with any offset, UTC if no zone, or an "
                                                                 "age: 24h, 7d).")] = None,
                  min_size: Annotated[int, Query(ge=1, le=1_000_000)] = 2) -> dict[str, Any]:
    from ..gallery.store import utc_time

    start = utc_time(since, "since")
    with caller as db:
        groups = db.visitors(start, min_size=min_size)
        settings = db.settings()
        faces = [i for g in groups for i in g.face_ids]
        with_thumbnail = db.store.thumbnail_owners("visitor", faces)
        db.note("read-visitors", detail={"since": start, "min_size": min_size, "groups": len(groups)})
    return {"enabled": settings.visitors.enabled, "retention_days": settings.visitors.retention_days,
            "groups": [{**g.to_dict(), "thumbnails": [i for i in g.face_ids if i in with_thumbnail]}
                       for g in groups]}


@router.post("/visitors/{group}/enroll", summary="Enrol a group as a new or existing person (one transaction); "
                                                 "refused if the group changed since it was listed.")
def enroll_visitors(group: GroupId, body: EnrollGroup, caller: Annotated[Caller, Depends(ENROLL)]
                    ) -> dict[str, Any]:
    with caller as db:
        person = db.enroll_visitors(group, body.name)
    caller.publish("person.enrolled", {"person": person.name, "from_visitors": group}, subject=person.name)
    return {"group": group, "person": person.to_dict()}


@router.delete("/visitors/{group}", summary="Forget a group: its faces (and their thumbnails) are erased.")
def forget_visitors(group: GroupId, caller: Annotated[Caller, Depends(ENROLL)]) -> dict[str, Any]:
    with caller as db:
        n = db.forget_visitors(group)
    return {"group": group, "forgotten": n}


@router.get("/visitors/faces/{face_id}/thumbnail", summary="A kept unknown face's thumbnail (JPEG), where the "
                                                           "database keeps them (thumbnails: all).",
            response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
def visitor_thumbnail(face_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
                      caller: Annotated[Caller, Depends(ENROLL)]) -> Response:
    from .routes_people import thumbnail_response

    return thumbnail_response(caller, "visitor", face_id)
