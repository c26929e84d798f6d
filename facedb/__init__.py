"""facedb: a face-recognition identity database (FaceNet method; SQLite store + FAISS index).

Scores are cosine similarities of unit vectors everywhere (higher is more similar); see facedb.scores.
"""

from typing import TYPE_CHECKING, Any

from .errors import (
    DatabaseError,
    DatabaseExistsError,
    DuplicatePersonError,
    FaceDBError,
    ImageError,
    InvalidInputError,
    InvalidVectorError,
    ModelMismatchError,
    ModelUnavailableError,
    MultipleFacesError,
    NoFaceError,
    PersonNotFoundError,
)
from .records import Candidate, CheckReport, Identification, Person, Verification

if TYPE_CHECKING:
    from .db import FaceDB

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # FaceDB pulls in faiss; import it on first use so that `facedb --help` stays instant.
    if name == "FaceDB":
        from .db import FaceDB

        return FaceDB
    raise AttributeError(name)


__all__ = [
    "Candidate",
    "CheckReport",
    "DatabaseError",
    "DatabaseExistsError",
    "DuplicatePersonError",
    "FaceDB",
    "FaceDBError",
    "Identification",
    "ImageError",
    "InvalidInputError",
    "InvalidVectorError",
    "ModelMismatchError",
    "ModelUnavailableError",
    "MultipleFacesError",
    "NoFaceError",
    "Person",
    "PersonNotFoundError",
    "Verification",
]
