"""The decision path's glue: from unit probe vectors to decisions, over the gallery as it is now.

A query reads the settings once (at 1M templates the whole query takes ~1 ms, and each SQLite round trip
~10-20 us), brings the in-memory index level with the store (:class:`facedb.gallery.upkeep.IndexKeeper`), asks
the engine (:mod:`facedb.gallery.engine`: candidates, exact re-scoring) under the policy in force
(:mod:`facedb.gallery.decision`), and names the people from memory (:class:`facedb.gallery.settings_cache.NameCache`).
The 1:1 path (verify) scores a probe against one person's photo templates. Embedding photos, the audit record and
the unknown-visitor log are the caller's (``facedb/operations/recognition.py``); this room sees vectors only, as
the database stores them (projected when it is cancellable).

Moved out of ``FaceDB`` (``db.py``) as it was: the same calls in the same order, under the facade's lock.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from ..errors import IndexCredentialsError, IndexUnavailableError, ModelChangedError, NoTemplatesError
from ..records import Identification, Verification
from . import engine, standin
from .decision import Policy
from .settings import Settings, check_k, check_threshold, threads_setting
from .settings_cache import NameCache, SettingsMemo
from .store import Store
from .upkeep import IndexKeeper
from .vectors import budget_bytes


def verify_rule(threshold: float | None) -> str:
    """Which policy held a 1:1 decision, for its audit record and door event: the stored 1:1 threshold (``fixed``:
    the 1:N rules do not apply to one claimed person) or one ``given`` with the call."""
    return "fixed" if threshold is None else "given"


def check_made_by(made_by: str | None, model_id: str) -> None:
    """ModelChangedError when a probe embedded by the model ``made_by`` would be scored against a gallery of
    ``model_id`` (the database was moved to another model meanwhile: ``reembed``). None: not a photo's probe."""
    if made_by is not None and made_by != model_id:
        raise ModelChangedError(f"the database was moved to {model_id!r} while this photo was embedded by "
                                f"{made_by!r}; ask again")


def policy_for(s: Settings, counts: dict[str, int]) -> tuple[Policy, int]:
    """(the policy a query without a given threshold is held to, the templates it is held to it for: every
    template searched, mean templates included) under settings ``s`` and the store's ``counts``."""
    templates = counts["templates"] + counts["mean_templates"]  # as the query engine counts its gallery
    return s.rule.policy(s.threshold, templates), templates


def check_query_environment(rescore_memory_mb: float | None = None) -> None:
    """The query settings a process takes from its environment (``FACEDB_RESCORE_MEMORY_MB`` or the
    ``rescore_memory_mb`` given, ``FACEDB_CLOSE_CALLS``, ``FACEDB_STAND_IN_AFTER_S``, ``FACEDB_THREADS``; and
    ``FACEDB_MAX_PIXELS`` where set, by ``operations/lifecycle.py``), checked when a database
    is opened or created, before anything is read: InvalidInputError for a value they do not accept, rather
    than a typo quietly meaning the default (or a failure at the first close call)."""
    budget_bytes(rescore_memory_mb)
    engine.close_calls_on()
    standin.after_s()
    threads_setting()  # FAISS's threads, set at a query's first search


class Query:
    """Answers over one open store: identify (1:N, open set) and verify (1:1). ``lock`` is the facade's: one
    connection is used by one thread at a time."""

    def __init__(self, store: Store, keeper: IndexKeeper, memo: SettingsMemo, names: NameCache,
                 lock: threading.RLock) -> None:
        self.store = store
        self.keeper = keeper
        self.memo = memo
        self.names = names
        self.lock = lock

    def fetch(self, gallery: engine.Gallery) -> engine.VectorFetch:
        """Candidates' exact vectors: from the index where it keeps them bit for bit, else from the store."""
        def fetch(person_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
            return gallery.person_vectors(person_ids) or self.store.person_vectors(person_ids)

        return fetch

    def templates(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Templates' exact vectors from the store (a close call's shortlist where memory does not hold it): (the
        ids still stored, in id order; their vectors)."""
        held, _, vectors = self.store.templates(ids)
        return held, vectors

    def identify(self, x: np.ndarray, k: int, threshold: float | None, made_by: str | None = None
                 ) -> tuple[list[Identification], Settings]:
        """Answers for the probes ``x`` ``(n, dim)`` (unit rows, as stored), and the settings they were made under
        (read once per query). ``threshold``: a cosine similarity given with the call, else the rule in force.
        ``made_by``: the model that embedded ``x``; ModelChangedError when the database is (or, by the time the
        answer is made, was moved to) another one, so that a probe of the old model is never scored against a
        gallery moved to a new one (``reembed``). IndexUnavailableError: a remote engine failed (it is reopened
        at the next query)."""
        k = check_k(k)
        threshold = None if threshold is None else check_threshold(threshold)
        with self.lock:
            settings = self.memo.current()
            check_made_by(made_by, settings.model_id)
            try:
                return self._identify_once(x, k, threshold, made_by, settings)
            except IndexUnavailableError as exc:
                self.keeper.forget()  # a remote engine failed (or its collection was dropped): reopen next time
                if isinstance(exc, IndexCredentialsError) or not self.keeper.stands_in_for(settings):
                    raise  # a refused token is not an engine that cannot answer yet: never stood in for
            # Once more, for the query that was in flight when the engine failed (a server killed mid-search):
            # the keeper now reopens the engine for at most FACEDB_STAND_IN_AFTER_S, then answers from the
            # store (standin.py), so this door gets its answer instead of an error. A second failure is raised.
            try:
                return self._identify_once(x, k, threshold, made_by, settings)
            except IndexUnavailableError:
                self.keeper.forget()
                raise

    def _identify_once(self, x: np.ndarray, k: int, threshold: float | None, made_by: str | None,
                       settings: Settings) -> tuple[list[Identification], Settings]:
        gallery = self.keeper.current(settings)
        policy = Policy("given", threshold, explanation="given") if threshold is not None else \
            settings.rule.policy(settings.threshold, len(gallery))
        answers = engine.identify(gallery, x, k, policy, self.fetch(gallery), self.lookup_names, self.templates)
        if made_by is not None:  # one small read: a move that committed while the answer was made
            check_made_by(made_by, self.store.get_meta("model_id") or "")
        return answers, settings

    def lookup_names(self, person_ids: Sequence[int]) -> dict[int, tuple[str, str | None]]:
        """Names of people, from memory while no one was renamed or removed (the query just read the people
        version with its settings)."""
        return self.names.lookup(person_ids, self.memo.people_version)

    def verify(self, x: np.ndarray, name: str, threshold: float | None, made_by: str | None = None
               ) -> tuple[Verification, Settings, float]:
        """1:1: the probe ``x`` ``(dim,)`` (as stored) against ``name``'s photo templates: (the result, the settings,
        the threshold applied: ``threshold`` or the stored one). PersonNotFoundError, NoTemplatesError,
        ModelChangedError (``made_by``: see :meth:`identify`). The caller holds the lock until it has recorded."""
        settings = self.memo.current()
        check_made_by(made_by, settings.model_id)
        thr = settings.threshold if threshold is None else threshold
        person = self.store.person(name)
        # Photo templates only: the 1:1 threshold is calibrated photo against photo, and a mean template sits
        # nearer to everyone (a stranger's best score against it is higher), so it would raise the FAR.
        _, templates = self.store.person_vectors([person.id], photos_only=True)
        if not len(templates):
            raise NoTemplatesError(f"{person.name!r} has no templates to verify against")
        return engine.verify_scores(x, templates, person.name, thr, person.external_id), settings, thr

    def policy_in_force(self) -> tuple[Policy, int]:
        """See :func:`policy_for`, for the settings and counts now."""
        with self.lock:
            return policy_for(self.memo.current(), self.store.counts())
