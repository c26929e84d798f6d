"""The change log and the version counters: the ``changes`` table (generation, template id, add/remove) and the
``meta`` counters a query reads to know what it holds is stale (``generation``, ``settings_version``,
``people_version``).

Its own family because every process's index and caches are kept level through it: a write that adds or removes
templates bumps the generation and logs the ids in the same transaction, and an index at generation g catches up
by replaying the log instead of a rebuild (``gallery/upkeep.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .connection import StoreBase

#: How many generations of the change log to keep behind the saved index, so that processes holding a
#: slightly older index in memory can still catch up without a rebuild.
CHANGES_KEPT = 1000


class ChangeLog(StoreBase):
    """The change log and version counters of a :class:`~facedb.gallery.store.Store`."""

    #: The counters :meth:`versions` reads: templates (the change log's), settings, people's names.
    VERSION_KEYS = ("generation", "settings_version", "people_version")

    def versions(self) -> tuple[int, int, int]:
        """(generation, settings version, people version) in one read: what a query checks its cached
        settings, index and names against (a store from before the counters reads 0 for them)."""
        got = dict(self.conn.execute("SELECT key, value FROM meta WHERE key IN (?, ?, ?, ?)", (*self.VERSION_KEYS,
                                                                                                "dim")))
        if got.get("dim") and int(got["dim"]) != self.dim:
            self.dim = int(got["dim"])  # another process moved it to another model (operations/reembed.py)
        return int(got.get("generation") or 0), int(got.get("settings_version") or 0), \
            int(got.get("people_version") or 0)

    def generation(self) -> int:
        return int(self.get_meta("generation", "0") or 0)

    def _bump_generation(self, added: Sequence[int], removed: Sequence[int]) -> int:
        gen = self.generation() + 1
        self.conn.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(gen),))
        rows = [(gen, int(i), "add") for i in added] + [(gen, int(i), "remove") for i in removed]
        self.conn.executemany("INSERT INTO changes (generation, embedding_id, op) VALUES (?, ?, ?)", rows)
        return gen

    def changes_since(self, generation: int) -> tuple[int, list[int], list[int]] | None:
        """(current generation, template ids added, ids removed) since ``generation``, net of each other.

        None when the log no longer reaches back that far (the caller must rebuild).
        """
        with self.read():
            current = self.generation()
            if generation < int(self.get_meta("changes_floor", "0") or 0) or generation > current:
                return None
            added: set[int] = set()
            removed: set[int] = set()
            for tid, op in self.conn.execute(
                "SELECT embedding_id, op FROM changes WHERE generation > ? ORDER BY generation, rowid", (generation,)
            ):
                if op == "add":
                    added.add(tid)  # a re-add after a remove (a merge) leaves the id in both: remove, then add
                elif tid in added:
                    added.discard(tid)  # added and removed since: never seen by the caller
                else:
                    removed.add(tid)
        return current, sorted(added), sorted(removed)

    def removed_template_ids(self) -> np.ndarray:
        """Ids (int64, sorted) of templates the change log records as removed and the store no longer holds: for
        ``check`` to ask a remote index engine whether it still returns any. Covers the log as kept (the last
        ``CHANGES_KEPT`` generations); older removals are covered by ``check``'s full listing of the engine."""
        with self.read():
            rows = self.conn.execute(
                "SELECT DISTINCT embedding_id FROM changes WHERE op = 'remove' "
                "AND embedding_id NOT IN (SELECT id FROM embeddings)").fetchall()
        return np.array(sorted(r[0] for r in rows), dtype=np.int64)

    def prune_changes(self, upto_generation: int) -> None:
        """Forget the change log up to ``upto_generation - CHANGES_KEPT``."""
        floor = upto_generation - CHANGES_KEPT
        if floor <= int(self.get_meta("changes_floor", "0") or 0):
            return
        with self.write():
            self.conn.execute("DELETE FROM changes WHERE generation <= ?", (floor,))
            self.conn.execute("UPDATE meta SET value = ? WHERE key = 'changes_floor'", (str(floor),))

    def erasure_pending(self) -> bool:
        """Whether a removal committed but its index file rewrite did not finish (a crash in between)."""
        return self.get_meta("erase_pending", "0") == "1"

