"""facedb: a face-recognition identity database (FaceNet method; SQLite store + FAISS index).

Scores are cosine similarities of unit vectors everywhere (higher is more similar); see facedb.gallery.scores.
"""

from typing import TYPE_CHECKING, Any

from .errors import (
    DatabaseError,
    DatabaseExistsError,
    DuplicatePersonError,
    FaceDBError,
    ImageError,
    IndexCredentialsError,
    IndexLoadingError,
    IndexUnavailableError,
    IndexUnreachableError,
    InvalidInputError,
    InvalidVectorError,
    ModelMismatchError,
    ModelUnavailableError,
    NoFaceError,
    PersonNotFoundError,
)
from .moved import install as _install_old_paths
from .records import (
    AuditRecord,
    Candidate,
    CheckReport,
    Cluster,
    ClusterFace,
    ClusterReport,
    DuplicatePair,
    DuplicatesReport,
    EnrollReport,
    FaceMatch,
    Identification,
    IndexState,
    Person,
    Skipped,
    SplitPerson,
    Stats,
    Template,
    Verification,
    VisitorGroup,
)

if TYPE_CHECKING:
    from .db import FaceDB

_install_old_paths()  # `import facedb.store` and the other paths before the folders-by-layer move, for one release

__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    # FaceDB pulls in faiss; import it on first use so that `facedb --help` stays instant.
    if name == "FaceDB":
        from .db import FaceDB

        return FaceDB
    raise AttributeError(name)


__all__ = [
    "AuditRecord",
    "Candidate",
    "CheckReport",
    "Cluster",
    "ClusterFace",
    "ClusterReport",
    "DatabaseError",
    "DatabaseExistsError",
    "DuplicatePair",
    "DuplicatePersonError",
    "DuplicatesReport",
    "EnrollReport",
    "FaceDB",
    "FaceDBError",
    "FaceMatch",
    "Identification",
    "ImageError",
    "IndexCredentialsError",
    "IndexLoadingError",
    "IndexState",
    "IndexUnavailableError",
    "IndexUnreachableError",
    "InvalidInputError",
    "InvalidVectorError",
    "ModelMismatchError",
    "ModelUnavailableError",
    "NoFaceError",
    "Person",
    "PersonNotFoundError",
    "Skipped",
    "SplitPerson",
    "Stats",
    "Template",
    "Verification",
    "VisitorGroup",
]
