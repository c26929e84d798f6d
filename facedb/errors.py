"""The exception hierarchy. Every error facedb raises on purpose is a FaceDBError.

The CLI turns any of these into one line on stderr and exit status 2; the service into a JSON error with the
HTTP status of its class. Anything else escaping is a bug.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parent)
#: Frames passed over as well: a facedb ``with`` block's exit runs inside contextlib.
_PASSED_OVER = (_PACKAGE, str(Path(contextlib.__file__).resolve()))


def warn_caller(message: str | Warning, category: type[Warning] | None = None) -> None:
    """``warnings.warn`` attributed to the first frame outside facedb: the user's line that called the API.

    A fixed ``stacklevel`` is right for one call path only, and the same warning is raised from several (a removal,
    or the open that finishes a removal a crash interrupted), so the depth is counted here instead (Python 3.12's
    ``skip_file_prefixes`` does the same; facedb supports 3.10).
    """
    level, frame = 2, sys._getframe(1)  # stacklevel 1 is this function, 2 its caller
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(_PASSED_OVER):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)


class FaceDBError(Exception):
    """Base class of every error facedb raises on purpose."""

    exit_code = 1


class DatabaseError(FaceDBError):
    """The database is missing, is not a facedb database, or cannot be written."""


class DatabaseExistsError(DatabaseError):
    """`init` was asked to create a database where one already exists."""


class NotFoundError(FaceDBError):
    """What was named does not exist (a person, a template, an API key, a webhook)."""


class DuplicateError(FaceDBError):
    """A name that must be unique is already taken."""


class PersonNotFoundError(NotFoundError, KeyError):
    """No person of that name is enrolled."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else "person not found"


class DuplicatePersonError(DuplicateError):
    """A person of that name (or external id) already exists."""


class ModelMismatchError(FaceDBError):
    """Vectors or a model that differ from the model (or dimension) the database was created with."""


class ModelChangedError(ModelMismatchError):
    """The database moved to another model (``facedb reembed``) while a probe was being embedded by the old one:
    the probe is not compared with the new gallery. Ask again (``FaceDB.search`` does, once)."""


class InvalidVectorError(FaceDBError, ValueError):
    """A vector of the wrong shape, with NaN/inf, or not of unit length."""


class InvalidInputError(FaceDBError, ValueError):
    """An argument that is not acceptable: an empty name, bad metadata, k < 1, ..."""


class NoTemplatesError(InvalidInputError):
    """A 1:1 claim for a person who has no photo templates to compare with (the service answers a door's key
    as for a refused claim, so that it cannot tell this person apart from a name that is not enrolled)."""


class TemplateNotFoundError(NotFoundError, InvalidInputError):
    """No template has that id (an InvalidInputError too, which is what older releases raised)."""


class ImageError(FaceDBError):
    """A file or buffer that cannot be used as a photo. The message names the file."""


class NoFaceError(FaceDBError):
    """No face was found in a photo that needed one."""


class IndexUnavailableError(FaceDBError):
    """The vector index's engine cannot be used: a Milvus server that cannot be reached or refuses the
    credentials, an optional client library that is not installed, or a collection that belongs to something
    else (another facedb database, or not facedb at all). The message names the engine and what to do."""


class IndexCredentialsError(IndexUnavailableError):
    """The vector index's engine (a Milvus server) refused facedb's credentials: a wrong or missing token. An
    IndexUnavailableError too, so callers that handle an engine that cannot be used handle this one."""


class IndexLoadingError(IndexUnavailableError):
    """The vector index's engine is up but still loading facedb's collection (a Milvus server restarted moments
    ago): retry shortly. An IndexUnavailableError too; the message gives the server's progress."""


class IndexUnreachableError(IndexUnavailableError):
    """The vector index's engine could not be reached (connection refused, timed out, server unavailable): it may
    be down or restarting. An IndexUnavailableError too. Queries are answered meanwhile by an exact search of
    the store's templates where they fit memory (``facedb/gallery/standin.py``); other calls fail with this."""


class IndexBehindWarning(UserWarning):
    """A write reached the store (the truth) but not the shared index engine; the engine records the
    generation it reflects, so the next process that opens it replays the store's change log."""


class ModelUnavailableError(FaceDBError):
    """A model or its weights cannot be loaded; the message says how to get them."""


class WeightsHashError(ModelUnavailableError):
    """A weights file whose SHA-256 is not the one pinned for its model (a model that accepts no other file,
    such as sface): refused, never loaded. The message names the file and both hashes."""


class AuthenticationError(FaceDBError):
    """No API key, an unknown one or a revoked one (the message never says which)."""


class PermissionDeniedError(FaceDBError):
    """A valid API key whose scope does not allow the operation."""


class RequestTooLargeError(InvalidInputError):
    """A request body (an upload) over the configured size limit."""


class TooManyRequestsError(FaceDBError):
    """Too many failed authentications (from one client address or for one key id), too many requests from one
    door key, or too many uploads at once from one client: retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeoutError(InvalidInputError):
    """A request body that did not arrive within the service's body timeout (a stalled or very slow upload)."""


class NotReadyError(FaceDBError):
    """The service has not finished loading its model and index yet; retry shortly."""


class ProtectionError(DatabaseError):
    """Template protection (encryption at rest) refused an operation: see the subclasses."""


class KeyMissingError(ProtectionError):
    """The database is encrypted and no key was given (FACEDB_KEY, --key-file, --key-command)."""


class WrongKeyError(ProtectionError):
    """The key given does not open this database (or its keyring, facedb.keys, was altered)."""


class TamperedError(ProtectionError):
    """Ciphertext failed authentication (GCM tag, SQLCipher page HMAC): altered, truncated or damaged."""


class EncryptionUnavailableError(ProtectionError):
    """Encryption needs the ``crypto`` extra (cryptography, sqlcipher3-binary), which is not installed."""


class ErasureWarning(UserWarning):
    """A removal committed, but a copy of what it removed could not be erased from a file at once (the
    message says which and what finishes the job)."""


class TamperedFileWarning(UserWarning):
    """An encrypted derived file (the index) failed authentication and was not used: it is rebuilt from the
    store, which is authenticated itself. Altered or damaged files in an encrypted database are worth a look."""
