"""The service's tables: ``api_keys`` (only a hash of each key, its scope and grants), ``console_sessions`` (the
hash of each sign-in token) and ``webhooks`` (URL, events, signing secret, owner key).

Their own family because only the service and its management commands (``facedb keys``, ``facedb hooks``:
facedb/operations/keys.py, hooks.py) use them, and they arrived in their own migrations (6, 12, 13, 14): every
method checks the schema has them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...errors import DatabaseError, DuplicateError, NotFoundError
from .connection import StoreBase
from .migrations import GRANTS_VERSION, KEYS_VERSION, METRICS_SCOPE_VERSION, SESSIONS_VERSION
from .times import utcnow


class KeyRows(StoreBase):
    """The API keys, console sessions and webhooks of a :class:`~facedb.gallery.store.Store`."""

    _KEY_COLUMNS_V6 = "id, name, scope, key_hash, created_at, revoked_at"

    @property
    def _key_columns(self) -> str:
        """The key table's columns this store's schema has (a read-only store may predate the grants)."""
        return self._KEY_COLUMNS_V6 + (", grants" if self.version >= GRANTS_VERSION else "")

    _HOOK_COLUMNS = "id, url, events, secret, key_id, created_at"

    def _need_version(self, version: int, what: str) -> None:
        if self.version < version:
            raise DatabaseError(f"{self.path} predates {what}: open it once writable to upgrade it")

    def add_api_key(self, key_id: str, name: str | None, scope: str, key_hash: str,
                    grants: str = "") -> dict[str, Any]:
        """Store a new API key (its hash only) with ``grants`` (comma-separated); DuplicateError when a live key
        already has ``name``."""
        self._need_version(GRANTS_VERSION if grants else KEYS_VERSION, "API keys' grants" if grants else "API keys")
        if scope == "metrics":
            self._need_version(METRICS_SCOPE_VERSION, "the metrics scope")
        row = {"id": key_id, "name": name, "scope": scope, "key_hash": key_hash, "created_at": utcnow(),
               "revoked_at": None}
        with self.write():
            if name is not None and self.conn.execute(
                    "SELECT 1 FROM api_keys WHERE name = ? AND revoked_at IS NULL", (name,)).fetchone():
                raise DuplicateError(f"a key named {name!r} already exists (revoke it first)")
            self.conn.execute("INSERT INTO api_keys (id, name, scope, key_hash, created_at, revoked_at) "
                              "VALUES (:id, :name, :scope, :key_hash, :created_at, :revoked_at)", row)
            if grants:
                self.conn.execute("UPDATE api_keys SET grants = ? WHERE id = ?", (grants, key_id))
        return {**row, "grants": grants}

    def api_key(self, key_id: str) -> dict[str, Any] | None:
        """The key row with id ``key_id`` (revoked or not), or None."""
        if self.version < KEYS_VERSION:
            return None
        row = self.conn.execute(f"SELECT {self._key_columns} FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return dict(zip(self._key_columns.split(", "), row)) if row else None

    def api_keys(self) -> list[dict[str, Any]]:
        """Every key row, oldest first (revoked ones too: they stay, so the audit trail's actors resolve)."""
        if self.version < KEYS_VERSION:
            return []
        rows = self.conn.execute(f"SELECT {self._key_columns} FROM api_keys ORDER BY created_at, id").fetchall()
        return [dict(zip(self._key_columns.split(", "), r)) for r in rows]

    def revoke_api_key(self, ref: str) -> dict[str, Any]:
        """Revoke the key whose id is ``ref``, or the live key named ``ref``; returns its row. NotFoundError if
        there is none; revoking a revoked key changes nothing."""
        self._need_version(KEYS_VERSION, "API keys")
        with self.write():
            row = self.conn.execute(f"SELECT {self._key_columns} FROM api_keys WHERE id = ?", (ref,)).fetchone()
            if row is None:
                row = self.conn.execute(f"SELECT {self._key_columns} FROM api_keys WHERE name = ? "
                                        "AND revoked_at IS NULL", (ref,)).fetchone()
            if row is None:
                raise NotFoundError(f"no API key with id or name {ref!r}")
            key = dict(zip(self._key_columns.split(", "), row))
            if key["revoked_at"] is None:
                key["revoked_at"] = utcnow()
                self.conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (key["revoked_at"], key["id"]))
            if self.version >= SESSIONS_VERSION:  # its console sessions end with it
                self.conn.execute("DELETE FROM console_sessions WHERE key_id = ?", (key["id"],))
        return key

    # --------------------------------------------------------------------- console sessions (the service's)
    def add_console_session(self, token_hash: str, key_id: str, now: float, expired_before: float,
                            idle_before: float) -> None:
        """Store a console session (the token's hash, never the token) and forget the sessions that began
        before ``expired_before`` or were last used before ``idle_before`` (Unix seconds)."""
        self._need_version(SESSIONS_VERSION, "console sessions")
        with self.write():
            self.conn.execute("DELETE FROM console_sessions WHERE created_at < ? OR seen_at < ?",
                              (expired_before, idle_before))
            self.conn.execute("INSERT INTO console_sessions (token_hash, key_id, created_at, seen_at) "
                              "VALUES (?, ?, ?, ?)", (token_hash, key_id, now, now))

    def console_session(self, token_hash: str) -> dict[str, Any] | None:
        """The session row for a token's hash (``key_id``, ``created_at``, ``seen_at``), or None."""
        if self.version < SESSIONS_VERSION:
            return None
        row = self.conn.execute("SELECT key_id, created_at, seen_at FROM console_sessions WHERE token_hash = ?",
                                (token_hash,)).fetchone()
        return {"key_id": row[0], "created_at": float(row[1]), "seen_at": float(row[2])} if row else None

    def touch_console_session(self, token_hash: str, now: float) -> None:
        """Mark a session used at ``now`` (its idle expiry starts again)."""
        self._need_version(SESSIONS_VERSION, "console sessions")
        with self.write():
            self.conn.execute("UPDATE console_sessions SET seen_at = ? WHERE token_hash = ?", (now, token_hash))

    def remove_console_session(self, token_hash: str) -> bool:
        """End a session (sign-out, or found expired); whether there was one."""
        self._need_version(SESSIONS_VERSION, "console sessions")
        with self.write():
            cur = self.conn.execute("DELETE FROM console_sessions WHERE token_hash = ?", (token_hash,))
        return cur.rowcount > 0

    def add_webhook(self, url: str, events: Sequence[str], secret: str, key_id: str | None) -> dict[str, Any]:
        """Store a webhook (for one key's requests, or database-wide when ``key_id`` is None)."""
        self._need_version(KEYS_VERSION, "webhooks")
        row = {"url": url, "events": ",".join(events), "secret": secret, "key_id": key_id, "created_at": utcnow()}
        with self.write():
            if key_id is not None and not self.conn.execute(
                    "SELECT 1 FROM api_keys WHERE id = ? AND revoked_at IS NULL", (key_id,)).fetchone():
                raise NotFoundError(f"no live API key with id {key_id!r}")
            cur = self.conn.execute("INSERT INTO webhooks (url, events, secret, key_id, created_at) "
                                    "VALUES (:url, :events, :secret, :key_id, :created_at)", row)
            row["id"] = int(cur.lastrowid)
        return row

    def webhooks(self) -> list[dict[str, Any]]:
        """Every webhook row (with its secret), oldest first."""
        if self.version < KEYS_VERSION:
            return []
        rows = self.conn.execute(f"SELECT {self._HOOK_COLUMNS} FROM webhooks ORDER BY id").fetchall()
        return [dict(zip(self._HOOK_COLUMNS.split(", "), r)) for r in rows]

    def remove_webhook(self, hook_id: int) -> dict[str, Any]:
        """Delete a webhook; returns its row. NotFoundError if there is none."""
        self._need_version(KEYS_VERSION, "webhooks")
        with self.write():
            row = self.conn.execute(f"SELECT {self._HOOK_COLUMNS} FROM webhooks WHERE id = ?",
                                    (int(hook_id),)).fetchone()
            if row is None:
                raise NotFoundError(f"no webhook with id {hook_id}")
            self.conn.execute("DELETE FROM webhooks WHERE id = ?", (int(hook_id),))
        return dict(zip(self._HOOK_COLUMNS.split(", "), row))
