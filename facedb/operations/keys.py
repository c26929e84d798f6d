"""API keys for the service: making them, storing only their hash, recognising them, and their scopes.

A key reads ``fdb_<id>_<secret>``: ``id`` is 12 hex digits, public (the audit trail records ``key:<id>`` as
the actor of everything done with it), ``secret`` is 32 random bytes in URL-safe base64. The store keeps the
id, a name, the scope, the creation and revocation times and the SHA-256 of the whole key, never the key:
it is shown once, when made. SHA-256 and not a slow password hash because the secret is 256 random bits,
not something a person chose: no dictionary to try, so no need to make each guess expensive (the reasoning
behind GitHub's and Stripe's token storage).

Scopes nest: ``identify`` (identify, verify, detect) < ``enroll`` (+ people and templates) < ``admin`` (+ keys,
webhooks, settings, audit, stats, check, metrics). ``metrics`` (a scraper's key) reads ``GET /metrics`` only.

**Grants** widen what an ``identify`` key is *told*, never what it may *do*. An identify key is a door's key, and
a door's key is the one most likely to be stolen (it sits in a device on a wall), so by default it learns a
decision and nothing more: the identity or unknown, the external id and a coarse confidence band. Candidate
lists, raw similarities, k > 1 and batches of vectors let a caller rebuild enrolled templates (issue #25: one
identity-matrix query read out every template), so they are the ``candidates`` grant, off unless an admin asks
for it (``facedb keys create --scope identify --grant candidates``). Enroll and admin keys see full answers
already: a grant on them would mean nothing and is refused. No grant lets any key change the decision policy
(the threshold, the rule): that is the admin's, set in the database's settings.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from ..errors import AuthenticationError, InvalidInputError, PermissionDeniedError
from ..gallery.store import Store
from ..records import _Record

if TYPE_CHECKING:
    from ..db import FaceDB

PREFIX = "fdb"
_KEY = re.compile(rf"^{PREFIX}_([0-9a-f]{{12}})_([A-Za-z0-9_-]{{43}})$")
_KEY_ID = re.compile(rf"^{PREFIX}_([0-9a-f]{{12}})_")

#: What every refused key is told, whatever the reason (no key, unknown, revoked, malformed): nothing more
#: is revealed to a caller without a valid key.
REFUSED = "a valid API key is required (X-API-Key header)"


class Scope(str, Enum):
    """What a key may do. ``identify`` < ``enroll`` < ``admin``: each includes the ones before it. ``metrics`` is
    apart: it reads ``GET /metrics`` and nothing else, and ``admin`` includes it. A Prometheus server holds
    its key in a file on another machine; an admin key there could make keys and read the audit trail."""

    identify = "identify"
    enroll = "enroll"
    admin = "admin"
    metrics = "metrics"

    @property
    def rank(self) -> int:
        return list(Scope).index(self)

    def allows(self, needed: Scope) -> bool:
        if needed is Scope.metrics:
            return self in (Scope.metrics, Scope.admin)
        return self is not Scope.metrics and self.rank >= needed.rank


#: What a grant may name. ``candidates``: an identify key's answers are the full ones (candidate lists, raw
#: similarities, k > 1, several vectors per call), as enroll and admin keys get.
GRANTS = ("candidates",)


def check_grants(scope: Scope, grants: object) -> tuple[str, ...]:
    """``grants`` as a sorted tuple of known grant names, or InvalidInputError (an unknown name; any grant on a
    key whose scope already includes what it grants)."""
    if grants is None:
        return ()
    if isinstance(grants, str) or not all(isinstance(g, str) for g in grants):  # type: ignore[attr-defined]
        raise InvalidInputError("grants is a list of grant names")
    out = tuple(sorted({g.strip() for g in grants}))  # type: ignore[attr-defined]
    unknown = [g for g in out if g not in GRANTS]
    if unknown:
        raise InvalidInputError(f"unknown grant {unknown[0]!r}: grants are {', '.join(GRANTS)}")
    if out and scope is not Scope.identify:
        raise InvalidInputError("a metrics key reads GET /metrics only: grants are for identify keys"
                                if scope is Scope.metrics else
                                f"a {scope.value} key sees full answers already: grants are for identify keys")
    return out


def check_scope(value: object) -> Scope:
    try:
        return Scope(value)
    except ValueError:
        raise InvalidInputError(f"scope is one of {', '.join(s.value for s in Scope)}, got {value!r}") from None


@dataclass(frozen=True)
class ApiKey(_Record):
    """A stored API key (without the key itself). ``actor`` is what the audit trail records for its use."""

    id: str
    name: str | None
    scope: str
    created_at: str
    revoked_at: str | None = None
    grants: tuple[str, ...] = field(default=())

    @property
    def actor(self) -> str:
        return f"key:{self.id}"

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def full_answers(self) -> bool:
        """Whether this key is told candidates and raw similarities (enroll, admin, or granted ``candidates``),
        rather than the decision alone (a door's key: see the module's docstring)."""
        return self.scope != Scope.identify.value or "candidates" in self.grants

    @property
    def sets_policy(self) -> bool:
        """Whether this key may hold a decision to a threshold of its own for one call (enroll, admin: they can
        change the gallery anyway). An identify key never may: the decision policy is the admin's, and a door
        key that sets ``threshold: -1`` opens the door for anyone (issue #25)."""
        return self.scope != Scope.identify.value

    def to_dict(self) -> dict[str, object]:
        return {**super().to_dict(), "grants": list(self.grants)}

    @classmethod
    def from_row(cls, row: dict[str, object]) -> ApiKey:
        grants = tuple(g for g in str(row.get("grants") or "").split(",") if g)
        return cls(id=str(row["id"]), name=row["name"], scope=str(row["scope"]),  # type: ignore[arg-type]
                   created_at=str(row["created_at"]), revoked_at=row["revoked_at"],  # type: ignore[arg-type]
                   grants=grants)


def key_hash(key: str) -> str:
    """The SHA-256 (hex) of a whole key string, as stored."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _check_name(name: str | None) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str) or not name.strip() or len(name) > 100 or any(ord(c) < 32 for c in name):
        raise InvalidInputError("a key's name is 1-100 printable characters")
    return name.strip()


def create(store: Store, scope: str | Scope, name: str | None = None,
           grants: object = None) -> tuple[ApiKey, str]:
    """Make a key of ``scope`` (optionally named, e.g. ``door-3``; names are unique among live keys) with
    ``grants`` (:data:`GRANTS`; identify keys only).

    Returns the stored record and the key itself, which exists nowhere else afterwards."""
    scope = check_scope(scope)
    name = _check_name(name)
    granted = check_grants(scope, grants)
    key_id = secrets.token_hex(6)
    key = f"{PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    row = store.add_api_key(key_id, name, scope.value, key_hash(key), ",".join(granted))
    return ApiKey.from_row(row), key


def authenticate(store: Store, presented: str | None) -> ApiKey:
    """The live key ``presented`` is, or AuthenticationError (its ``key_id`` names a known key that was
    presented correctly but is revoked, for the audit trail; the caller is told only :data:`REFUSED`)."""
    match = _KEY.match(presented.strip()) if isinstance(presented, str) else None
    if match is None:
        raise AuthenticationError(REFUSED)
    row = store.api_key(match.group(1))
    if row is None or not hmac.compare_digest(str(row["key_hash"]), key_hash(presented.strip())):
        raise AuthenticationError(REFUSED)
    key = ApiKey.from_row(row)
    if key.revoked:
        exc = AuthenticationError(REFUSED)
        exc.key_id = key.id  # type: ignore[attr-defined]
        raise exc
    return key


def claimed_id(presented: str | None) -> str | None:
    """The key id a presented key names (its public part: ``fdb_<id>_...``), whether or not the key is right; None
    when it names none. For throttling and recording failed authentications by key id, never the secret."""
    match = _KEY_ID.match(presented.strip()) if isinstance(presented, str) else None
    return match.group(1) if match is not None else None


def authorise(key: ApiKey, needed: Scope) -> None:
    """PermissionDeniedError unless ``key``'s scope includes ``needed``."""
    if not Scope(key.scope).allows(needed):
        raise PermissionDeniedError(f"this key's scope ({key.scope}) does not allow this operation "
                                    f"(it needs {needed.value})")


# ------------------------------------------------------------------ FaceDB's key and console-session glue
# Called by FaceDB under its lock: the store keeps the rows, the audit trail records who changed them.

def create_recorded(db: FaceDB, scope: str, name: str | None, grants: object) -> tuple[ApiKey, str]:
    """:func:`create` on ``db``'s store, recorded as ``key-create`` (never the key itself)."""
    key, secret = create(db.store, scope, name, grants)
    db.trail.record("key-create", [{"detail": {"key": key.id, "scope": key.scope, "name": key.name,
                                                 "grants": list(key.grants)}}], db.settings())
    return key, secret


def revoke_recorded(db: FaceDB, ref: str) -> ApiKey:
    """Revoke a key by id or name (NotFoundError if none), recorded as ``key-revoke``."""
    key = ApiKey.from_row(db.store.revoke_api_key(ref))
    db.trail.record("key-revoke", [{"detail": {"key": key.id, "name": key.name}}], db.settings())
    return key


def start_session(db: FaceDB, token_hash: str, key_id: str, now: float, idle_s: float, absolute_s: float) -> None:
    """Store a console session (the SHA-256 of its token) for ``key_id``, forgetting sessions past their idle or
    absolute expiry (seconds before ``now``, Unix seconds); recorded as ``console-sign-in``."""
    db.store.add_console_session(token_hash, key_id, now, now - absolute_s, now - idle_s)
    db.trail.record("console-sign-in", [{"detail": {"key": key_id}}], db.settings())


def end_session(db: FaceDB, token_hash: str, reason: str) -> bool:
    """End a console session, recorded as ``reason`` (none when empty) if there was one; whether there was."""
    ended = db.store.remove_console_session(token_hash)
    if ended and reason:
        db.trail.record(reason, [{}], db.settings())
    return ended
