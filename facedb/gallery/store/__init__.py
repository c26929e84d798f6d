"""The SQLite store: the source of truth for people, images, templates and settings.

:class:`Store` is one database file. It is composed of one class per table family, each in its own module with
the SQL of its tables, all on the connection and transactions of :mod:`.connection` (the only module here that
imports a SQLite driver: ``sqlite3``, ``sqlcipher3``, sqlite-utils):

=================  =====================================================================================
``connection``     opening, creating, migrating; transactions; ``meta`` rows; vacuum, WAL truncation,
                   online backup, the exclusive copy for re-encryption (:class:`ExclusiveCopy`)
``migrations``     the schema's numbered history (``PRAGMA user_version``) and the version of each family
``changes``        the change log and the version counters (generation, settings, people)
``people``         ``people``: names, external ids, metadata, order and search keys
``templates``      ``embeddings`` and ``images``: templates, mean templates, bulk reads, the integrity check
``audit``          ``audit``: the decision records, on a connection of their own
``visitors``       ``unassigned_faces``: unknown visitors kept for grouping
``thumbnails``     ``thumbnails``: the face JPEGs of templates, audit records and visitors
``keys``           ``api_keys``, ``console_sessions``, ``webhooks``: the service's
``names``          the rules for names, metadata and external ids; the one order and search of people
``times``          the one stored form of a time, and the one parser of times given to facedb
=================  =====================================================================================

Why a class per family rather than one object holding per-family objects: the families share one connection
and one write transaction, and a write in one often touches another in that same transaction (enrolling an
unknown visitor creates a person, templates and moves a thumbnail; removing a person drops their audit
records' thumbnails), so they call each other's helpers on the same ``self``. Each is still read alone.

Choices that hold across families:

* sqlite-utils is used where it is the clearer code: inserting rows from dicts (``insert``, ``insert_all``),
  upserting settings (``upsert_all``), reading rows as dicts (``rows_where``). Hot paths (the vectors the query
  engine re-scores, the change log, bulk snapshots) use plain SQL on the same connection, because they need
  one statement and raw blobs, not dicts.
* Names are NFC where they enter, and every list of people is ordered and searched by keys stored beside each
  name (:mod:`.names`); exact-name lookups (enrol into, show, rename, remove) stay exact NFC matches.
* ``AUTOINCREMENT`` ids: a template id is never reused, so a stale index can never point at someone else.
* A ``generation`` counter, bumped by every write that adds or removes templates, plus a ``changes`` log of
  (generation, template id, op): an index at generation g catches up by replaying the log instead of a rebuild.

``from facedb.gallery.store import X`` keeps working for every name this module had before it was split.
"""

from __future__ import annotations

from .audit import AuditRows
from .changes import CHANGES_KEPT, ChangeLog
from .connection import (
    CIPHER_PAGE_SIZE,
    FORMAT,
    SQLITE_HEADER,
    ExclusiveCopy,
    StoreBase,
    is_plain_sqlite,
    opens_with,
)
from .keys import KeyRows
from .migrations import (
    GRANTS_VERSION,
    KEYS_VERSION,
    METRICS_SCOPE_VERSION,
    MIGRATIONS,
    NAME_KEYS_VERSION,
    SCHEMA_VERSION,
    SESSIONS_VERSION,
    THUMBNAILS_VERSION,
    _apply,
)
from .names import (
    MAX_EXTERNAL_ID_LENGTH,
    MAX_METADATA_BYTES,
    MAX_NAME_LENGTH,
    NAME_ROUTE_WORDS,
    _check_external_id,
    _check_metadata,
    check_name,
    name_search_key,
    name_search_text,
    name_sort_key,
    normalise_name,
)
from .people import PeopleRows
from .templates import TemplateRows
from .thumbnails import ThumbnailRows
from .times import AGE_UNITS, time_before, utc_time, utcnow
from .visitors import VisitorRows

__all__ = [
    "AGE_UNITS", "CHANGES_KEPT", "CIPHER_PAGE_SIZE", "FORMAT", "GRANTS_VERSION", "KEYS_VERSION",
    "MAX_EXTERNAL_ID_LENGTH", "MAX_METADATA_BYTES", "MAX_NAME_LENGTH", "METRICS_SCOPE_VERSION", "MIGRATIONS",
    "NAME_KEYS_VERSION", "NAME_ROUTE_WORDS", "SCHEMA_VERSION", "SESSIONS_VERSION", "SQLITE_HEADER",
    "THUMBNAILS_VERSION", "ExclusiveCopy", "Store", "StoreBase", "_apply", "_check_external_id", "_check_metadata",
    "check_name", "is_plain_sqlite", "name_search_key", "name_search_text", "name_sort_key", "normalise_name",
    "opens_with", "time_before", "utc_time", "utcnow",
]


class Store(PeopleRows, TemplateRows, ChangeLog, AuditRows, VisitorRows, ThumbnailRows, KeyRows):
    """One SQLite database file with every table family. Use :meth:`create` or :meth:`open`; close with
    :meth:`close`. Each method is documented where its family's module defines it (see the module's table)."""
