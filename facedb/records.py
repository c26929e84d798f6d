"""Typed results. Every record has ``to_dict()`` giving JSON-ready values (what ``--json`` prints)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class _Record:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class Person(_Record):
    id: int
    name: str
    external_id: str | None
    metadata: dict[str, Any]
    created_at: str
    updated_at: str
    templates: int = 0
    images: int = 0


@dataclass(frozen=True)
class Candidate(_Record):
    """One person proposed for a probe.

    ``similarity`` is the cosine similarity of unit vectors (higher is more similar, 1 = identical);
    ``distance`` is the squared L2 distance, ``2 - 2 * similarity`` (lower is more similar).
    """

    name: str
    person_id: int
    similarity: float
    distance: float


@dataclass(frozen=True)
class Identification(_Record):
    """A 1:N answer. ``identity`` is the best candidate's name if their similarity reaches ``threshold``,
    else None, meaning *unknown* (an answer, not an error). ``candidates`` are the top-k people, best first.
    """

    identity: str | None
    similarity: float | None
    distance: float | None
    threshold: float
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def is_unknown(self) -> bool:
        return self.identity is None


@dataclass(frozen=True)
class Verification(_Record):
    """A 1:1 answer: is the probe ``name``? ``accepted`` iff ``similarity >= threshold``."""

    name: str
    accepted: bool
    similarity: float
    distance: float
    threshold: float


@dataclass(frozen=True)
class CheckReport(_Record):
    """What ``FaceDB.check`` verified. ``ok`` is False if any problem was found."""

    ok: bool
    checks: list[str]
    problems: list[str]


@dataclass(frozen=True)
class FaceMatch(_Record):
    """One face found in a searched photo, and who it is (``identity`` None = unknown)."""

    image: str
    box: list[float]
    det_score: float
    identity: str | None
    similarity: float | None
    distance: float | None
    threshold: float
    candidates: list[Candidate]


@dataclass(frozen=True)
class Skipped(_Record):
    image: str
    reason: str


@dataclass
class EnrollReport(_Record):
    """What an enrolment did: the people touched, photos tried, faces stored, and each photo skipped with why."""

    people: list[str] = field(default_factory=list)
    photos: int = 0
    faces_stored: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    template_ids: list[int] = field(default_factory=list)
