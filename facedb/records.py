"""Typed results. Every record has ``to_dict()`` giving JSON-ready values (what ``--json`` prints)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class _Record:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def __getitem__(self, key: str) -> Any:
        """``record["field"]``, for code written when these were dicts."""
        try:
            return self.to_dict()[key]
        except KeyError:
            raise KeyError(key) from None


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
    external_id: str | None = None


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
    external_id: str | None = None  # the decided person's id in your system, if they have one
    rule: str | None = None  # how it was decided: "fixed", "given", "gallery: ...", "margin: ..." (decision.py)
    score: float | None = None  # the margin rule's normalised score s1 - 0.5 s2 (None under other rules)
    score_threshold: float | None = None  # what ``score`` had to reach

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
    external_id: str | None = None  # the claimed person's id in your system, if they have one


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
    external_id: str | None = None
    rule: str | None = None
    score: float | None = None
    score_threshold: float | None = None


@dataclass(frozen=True)
class Skipped(_Record):
    image: str
    reason: str


@dataclass(frozen=True)
class FaceCheck(_Record):
    """One face found in a photo looked at before enrolment: box (x1, y1, x2, y2) and 5 landmarks in the photo's
    pixels, the detector's score, and the quality floors it fails (:mod:`facedb.faces.quality`), as sentences."""

    box: list[float]
    det_score: float
    landmarks: list[list[float]]
    problems: list[str]


@dataclass(frozen=True)
class PhotoCheck(_Record):
    """What enrolling a photo would meet (:mod:`facedb.faces.precheck`): its faces, the ``verdict`` (``ok``, ``no
    face``, ``several faces``, ``duplicate``) and why, the face enrolment would use (``chosen``, an index into
    ``faces``), who the photo is enrolled as already, and the chosen face's quality warnings."""

    image: str
    sha256: str
    width: int
    height: int
    faces: list[FaceCheck]
    verdict: str
    reason: str
    chosen: int | None
    enrolled_as: str | None
    warnings: list[str]


@dataclass
class EnrollReport(_Record):
    """What an enrolment did: the people touched, photos tried, faces stored, each photo skipped with why,
    warnings about photos stored (a face that also matches another enrolled person), and ``quality``: photos
    stored whose face fails a quality floor (:mod:`facedb.faces.quality`: tiny, low contrast, lit from one side,
    over-exposed, turned away) and will likely match badly; enrol a better one beside it."""

    people: list[str] = field(default_factory=list)
    photos: int = 0
    faces_stored: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    template_ids: list[int] = field(default_factory=list)
    warnings: list[Skipped] = field(default_factory=list)
    quality: list[Skipped] = field(default_factory=list)

    @property
    def only_known(self) -> bool:
        """Nothing was stored because every photo was already enrolled (re-running a folder): not a failure."""
        return self.faces_stored == 0 and bool(self.skipped) and not self.failed

    @property
    def failed(self) -> list[Skipped]:
        """The photos that could not be enrolled (skipped for a reason other than being enrolled already)."""
        return [s for s in self.skipped if not s.reason.startswith("already enrolled")]


@dataclass(frozen=True)
class Template(_Record):
    """One stored template: a unit vector of the database's model (``(dim,)`` float32, cosine-comparable),
    the person it belongs to, and where it came from (image SHA-256 and face box, when enrolled from a photo)."""

    id: int
    person: str
    person_id: int
    vector: Any  # numpy float32 (dim,)
    image_sha256: str | None = None
    box: list[float] | None = None
    det_score: float | None = None
    created_at: str | None = None
    derived: bool = False  # the person's mean template, kept beside their photo templates (no photo of its own)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["vector"] = [float(v) for v in self.vector]
        return out


@dataclass(frozen=True)
class IndexState(_Record):
    """What the vector index holds now: the kind asked for and the kind built, its parameters, the store
    generation it reflects, live entries and tombstones, and its persisted copy (file or remote)."""

    kind: str
    built: str | None
    params: dict[str, Any] | None
    generation: int | None
    entries: int
    live: int
    tombstones: int
    loaded: bool
    from_file: bool
    persisted_generation: int | None
    persisted_bytes: int
    backend: str
    # where candidates' exact vectors come from for re-scoring: "index" (it keeps them), "memory" (vectors.py),
    # "loading" (memory, being filled: the store until then), "store" (SQLite: over the memory budget), or
    # None (exact kind: no re-scoring, or not loaded)
    rescore_from: str | None = None
    rescore_bytes: int = 0  # memory the in-memory vectors take
    # while a remote engine cannot answer (loading after a restart, unreachable): why, and queries are answered
    # by an exact search of the store's templates (facedb/gallery/standin.py); None when the index answers
    stand_in: str | None = None


@dataclass(frozen=True)
class Stats(_Record):
    path: str
    model_id: str
    dim: int
    metric: str
    flip: bool
    threshold: float
    threshold_source: str
    calibration: dict[str, Any] | None
    decision_rule: str  # "fixed", or "gallery" (the 1:N threshold follows the gallery size; facedb/gallery/decision.py)
    decision_target: float  # the FPIR the gallery rule holds
    decision_margin: float | None  # the margin rule's threshold for s1 - 0.5 s2
    threshold_in_force: float  # the 1:N threshold a search is held to now, at today's gallery size
    index_kind: str
    index_built: str | None
    index_params: dict[str, Any] | None
    people: int
    images: int
    templates: int  # photo (or given-vector) templates
    mean_templates: int  # derived: one per person with two templates or more, when enabled
    mean_templates_enabled: bool
    people_with_one_template: int
    generation: int
    index_file_bytes: int
    index_file_generation: int | None
    schema_version: int
    created_at: str | None
    audit: dict[str, Any]
    warnings: list[str]
    encrypted: bool = False
    key_version: int | None = None  # bumped by every key rotation
    data_key_version: int | None = None  # bumped by every re-encryption (a new data key)
    plaintext_files: list[str] = field(default_factory=list)  # files readable without the key, and why
    cancellable: bool = False  # templates stored under the database's keyed orthogonal projection
    detector: str = "mtcnn"  # the face detector photos go through (facedb init --detector)


@dataclass(frozen=True)
class ReindexReport(_Record):
    index_kind: str
    built: str
    params: dict[str, Any]
    indexed: int


@dataclass(frozen=True)
class AuditRecord(_Record):
    """One entry of the audit trail: when, what operation, who asked (``actor``: a CLI user, an API key id),
    the photo's SHA-256, the decided identity (None = unknown), the score and threshold, and details."""

    id: int
    time: str
    operation: str
    actor: str | None
    image_sha256: str | None
    identity: str | None
    similarity: float | None
    threshold: float | None
    model_id: str
    detail: dict[str, Any] | None
    has_embedding: bool
    has_thumbnail: bool = False  # the probe's face thumbnail is kept (facedb/gallery/thumbnails.py)


# --------------------------------------------------------------------------------------------- clustering
@dataclass(frozen=True)
class ClusterFace(_Record):
    """One face found while clustering photos: the photo (its position in the list given, its name and SHA-256),
    the face box (x1, y1, x2, y2 in the photo's pixels), the detector's score, its cluster (None =
    unclustered) and its similarity to the cluster's central face."""

    photo_index: int
    photo: str
    image_sha256: str
    box: list[float]
    det_score: float
    cluster: int | None
    similarity_to_central: float | None = None


@dataclass(frozen=True)
class Cluster(_Record):
    """A group of faces taken to be one person: ``id`` (0 = the largest), its ``size``, its most central face
    (highest mean similarity to the other members) and every member face."""

    id: int
    size: int
    central: ClusterFace
    faces: list[ClusterFace]


@dataclass
class ClusterReport(_Record):
    """What ``FaceDB.cluster`` found: the clusters (largest first), the faces left unclustered, the photos that
    gave no face (with why), and the parameters: rule, threshold (cosine similarity) and where it came from,
    neighbours per face ``k``, ``min_size``, ``seed``. ``vectors`` (one row per face, clusters' faces first in
    cluster order, then the unclustered; not in ``to_dict``) and ``images`` (the store's row of each photo)
    are what ``FaceDB.enroll_clusters`` stores."""

    clusters: list[Cluster]
    unclustered: list[ClusterFace]
    skipped: list[Skipped]
    photos: int
    faces: int
    rule: str
    threshold: float
    threshold_source: str
    k: int
    min_size: int
    seed: int
    vectors: Any = None
    images: dict[int, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("vectors",
                                                                                                 "images")}
        out["clusters"] = [c.to_dict() for c in self.clusters]
        out["unclustered"] = [f.to_dict() for f in self.unclustered]
        out["skipped"] = [s.to_dict() for s in self.skipped]
        return out


@dataclass(frozen=True)
class VisitorGroup(_Record):
    """Faces answered *unknown* that look like one person. ``id`` names the group stably: ``V<first face id>-<6
    hex of a hash of its member ids>``, so enrolling or forgetting it acts on exactly the faces listed, or is
    refused when the group has changed since. ``best_similarity``: the closest any of its faces came to an
    enrolled person when searched (cosine; below the threshold, or it would not be unknown)."""

    id: str
    faces: int
    photos: int
    first_seen: str
    last_seen: str
    actors: list[str]
    central_face: int
    central_image_sha256: str | None
    central_box: list[float] | None
    best_similarity: float | None
    face_ids: list[int]


@dataclass(frozen=True)
class DuplicatePair(_Record):
    """Two people whose templates look like one person: the mean similarity over all pairs of their templates
    (what average linkage merges on), the best pair, and how many template pairs reach the threshold."""

    a: str
    b: str
    mean_similarity: float
    best_similarity: float
    matching_pairs: int
    templates_a: int
    templates_b: int


@dataclass(frozen=True)
class SplitPerson(_Record):
    """A person whose own templates fall into several groups that do not merge at the threshold (two people
    under one name, or very different photos): group sizes (largest first), the template ids of each group,
    and the mean similarity between the two largest."""

    name: str
    templates: int
    groups: list[int]
    template_ids: list[list[int]]
    mean_similarity_between: float


@dataclass(frozen=True)
class DuplicatesReport(_Record):
    """``check --duplicates``: people who match across names, people split in two, and templates that join
    no group of their own person (a wrong photo?). A report: nothing is changed."""

    threshold: float
    threshold_source: str
    people: int
    templates: int
    same_person: list[DuplicatePair]
    split: list[SplitPerson]
    outliers: list[dict[str, Any]]

    @property
    def found(self) -> bool:
        return bool(self.same_person or self.split)
