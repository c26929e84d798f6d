"""What a query needs that rarely changes, kept parsed in memory and checked with one small read per query.

Settings (model, threshold, decision rule with its 2,000-score impostor model, index stamp, audit settings) and
people's names change seldom; queries come thousands of times a second. So a process keeps them, and before
each answer reads three counters from the store's ``meta`` table in one statement (``Store.versions``):

* ``generation``: bumped by every write that adds or removes templates (the index keeper's catch-up check);
* ``settings_version``: bumped in the same transaction as every settings write (``Store.set_meta``);
* ``people_version``: bumped in the same transaction as every rename, external-id change, removal and merge.

A counter that moved since the last query means: re-read and re-parse the settings, or forget the names. Other
processes' writes are seen the same way, at their next query, because the counters travel in the writer's
transaction. Inside a write transaction nothing is cached (what it reads may yet be rolled back).

Processes of a facedb older than these counters do not bump them: do not mix versions on one database.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from .settings import Settings
from .store import Store

#: Names kept at most (then forgotten all at once and re-read as asked for): ~200 B each.
MAX_NAMES = 1_000_000


class SettingsMemo:
    """The parsed settings of one store, re-parsed only when its ``settings_version`` moves."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._parsed: tuple[int, Settings] | None = None  # (settings version, settings at some generation)
        self.people_version = -1  # as of the last read (for NameCache)

    def current(self) -> Settings:
        """The settings now: one read of the three counters, a parse only when the settings changed."""
        generation, version, people = self.store.versions()
        self.people_version = people
        if self.store.in_transaction:  # uncommitted rows may be rolled back: never cached
            return Settings.parse(self.store.all_meta())
        parsed = self._parsed
        if parsed is None or parsed[0] != version:
            meta = self.store.all_meta()
            settings = Settings.parse(meta)
            # keyed by the version read with these very rows (one statement), whatever moved since versions()
            with self._lock:
                self._parsed = (int(meta.get("settings_version") or 0), settings)
            return settings
        settings = parsed[1]
        if settings.generation != generation:
            settings = replace(settings, generation=generation)
            with self._lock:
                if self._parsed is parsed:
                    self._parsed = (version, settings)
        return settings

    def forget(self) -> None:
        with self._lock:
            self._parsed = None


class NameCache:
    """Person id -> (name, external id), read from the store on a miss, all forgotten when people change.

    Person ids are never reused (AUTOINCREMENT), so an id's name can only change by a rename or an external id
    change, and an id can only disappear by a removal or a merge: each bumps ``people_version``, which the
    query reads with its settings (:class:`SettingsMemo`) and passes here.

    With ``preload`` (an iterator of every (id, name, external id)), each version's names are also read in the
    background, so that queries about people not asked about before do not go to the store (a door's gallery
    of 200,000 people: ~30 MB, ~0.3 s); skipped above MAX_NAMES people."""

    def __init__(self, fetch: Callable[[Sequence[int]], dict[int, tuple[str, str | None]]],
                 preload: Callable[[], Iterable[tuple[int, str, str | None]]] | None = None) -> None:
        self._fetch = fetch
        self._preload = preload
        self._names: dict[int, tuple[str, str | None]] = {}
        self._version: int | None = None
        self._lock = threading.Lock()
        self.loading: threading.Thread | None = None

    def _start_preload(self, version: int) -> None:
        if self._preload is None:
            return
        thread = threading.Thread(target=self._load_all, args=(version,), name="facedb-names", daemon=True)
        self.loading = thread
        thread.start()

    def _load_all(self, version: int) -> None:
        loaded: dict[int, tuple[str, str | None]] = {}
        try:
            assert self._preload is not None
            for pid, name, external in self._preload():
                loaded[int(pid)] = (name, external)
                if len(loaded) > MAX_NAMES or self._version != version:
                    return  # too many to keep, or already stale: queries read the store themselves
        except Exception:  # the store could not be read here: queries read it themselves
            return
        with self._lock:
            if self._version == version:
                loaded.update(self._names)  # what queries read meanwhile is as fresh
                self._names = loaded

    def lookup(self, person_ids: Sequence[int], version: int) -> dict[int, tuple[str, str | None]]:
        """{person id: (name, external id)} for the people among ``person_ids`` that exist."""
        with self._lock:
            if version != self._version or len(self._names) > MAX_NAMES:
                self._names = {}
                self._version = version
                self._start_preload(version)
            names = self._names
            missing = [int(p) for p in person_ids if int(p) not in names]
            if missing:
                found = self._fetch(missing)
                names.update(found)
            return {int(p): names[int(p)] for p in person_ids if int(p) in names}
