"""What a service worker holds for its whole life: the open database, the model, the loaded index, the webhook
dispatcher, and whether it is ready.

Loading happens during the worker's start-up, before it takes its first connection: with several workers a
restarted one (after a crash) takes no request until its model and index are in memory, so callers never see
it half-loaded; with one, connections wait until it is ready. A worker that could not load stays up answering
503 (``/ready`` says it failed; its log says why).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidInputError, ModelUnavailableError, NotReadyError
from ..operations import keys
from ..operations.audit import default_actor
from ..operations.hooks import Dispatcher, Sender
from ..operations.keys import ApiKey
from .config import ServiceSettings
from .guard import Guard

if TYPE_CHECKING:
    from ..db import FaceDB
    from ..faces.pipeline import FacePipeline
    from ..gallery.store import Store
    from .metrics import Metrics

log = logging.getLogger("facedb.service")


class ServiceState:
    """One worker's resident database, model and index. ``model``: a face pipeline to use instead of loading
    the database's (tests pass a test double); ``sender``: how webhooks are posted (default: httpx)."""

    def __init__(self, settings: ServiceSettings, *, model: FacePipeline | None = None,
                 sender: Sender | None = None) -> None:
        self.settings = settings
        self._given_model = model
        self._sender = sender
        self.db: FaceDB | None = None
        self.pipeline: FacePipeline | None = None
        self.model_id: str | None = None
        self.ready = False
        self.error: str | None = None
        self.loaded = threading.Event()
        self.dispatcher: Dispatcher | None = None
        self.key_store: Store | None = None
        self.pid = os.getpid()
        self.metrics: Metrics | None = None  # the app sets it (create_app); a bare state counts nothing
        self.guard = Guard(auth_failures=settings.auth_failures, door_rate=settings.door_rate,
                           uploads=settings.uploads_per_client)
        self._users = 0
        self._users_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Load the database, model and index (once: a second start-up of the same app, as test clients do,
        shares the first). Blocking: run it off the event loop."""
        with self._users_lock:
            self._users += 1
            if self._users > 1:
                return
        self.error = None
        if self._sender is None:
            from .delivery import http_sender

            self._sender = http_sender(self.settings.hook_timeout, allow_private=self.settings.allow_private_hooks)
        s = self.settings
        self.dispatcher = Dispatcher(self._hooks, self._sender, fold_window=s.fold_window,
                                     max_attempts=s.hook_attempts, backoff=s.hook_backoff, live=self._hook_live)
        self._load()

    def _hooks(self) -> list[Any]:
        return self.db.webhooks() if self.db is not None else []

    def _hook_live(self, hook: Any) -> bool:
        """Whether ``hook`` is still stored (asked before every delivery attempt: a webhook removed through
        another worker or the CLI gets nothing more from this one). When the store cannot say: yes."""
        if self.db is None:
            return False
        try:
            return any(h.id == hook.id and h.secret == hook.secret for h in self.db.webhooks())
        except Exception:
            return True

    def _load(self) -> None:
        from ..db import FaceDB

        try:
            db = FaceDB.open(self.settings.db, weights=self.settings.weights, actor=default_actor("service"))
            self.model_id = db.model_id
            self.pipeline = self._load_model(db)
            db.load_index()
            from ..db import STORE_FILE
            from ..gallery.store import Store

            self.key_store = Store.open(db.root / STORE_FILE, readonly=True,  # see authenticate()
                                        key=db.protection.store_key() if db.protection is not None else None)
            self.db = db
            self.ready = True
            log.info("facedb service ready: %s, model %s%s", self.settings.db, db.model_id,
                     "" if self.pipeline else " (vectors only)")
        except Exception as exc:  # stay up, not ready, and say why on /ready
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("facedb service cannot start: %s", self.error)
        finally:
            self.loaded.set()

    def _load_model(self, db: FaceDB) -> FacePipeline | None:
        """The face pipeline, loaded and warmed; None for a database of vectors from a model facedb cannot
        run (its photo routes then answer 503, its vector routes work)."""
        if self._given_model is not None:
            return db.pipeline(self._given_model)  # checks it is the database's model
        from ..faces.models import spec_for

        try:
            spec_for(db.model_id)
        except InvalidInputError:
            return None
        pipe = db.pipeline()
        pipe.detector.detect(np.zeros((64, 64, 3), dtype=np.uint8))  # load MTCNN's weights now, not on a request
        return pipe

    def stop(self) -> None:
        with self._users_lock:
            self._users -= 1
            if self._users > 0:
                return
        if self.dispatcher is not None:
            self.dispatcher.close(timeout=2.0)
        self.loaded.wait(timeout=30)
        if self.db is not None:
            self.db.close()
            self.db = None
        if self.key_store is not None:
            self.key_store.close()
            self.key_store = None
        self.ready = False

    # ------------------------------------------------------------------------------------------ for routes
    def ready_db(self) -> FaceDB:
        """The database, or NotReadyError while loading (or after a failed start)."""
        if not self.ready or self.db is None:
            raise NotReadyError("the service is starting (loading the model and the index); retry shortly"
                                if self.error is None else "the service could not start; see its log")
        return self.db

    def authenticate(self, presented: str | None) -> ApiKey:
        """The live key ``presented`` is (AuthenticationError otherwise), read through this worker's own
        read-only connection, used only by the event loop's thread: no wait on the FaceDB's lock, which a long
        call (check, an enrolment's write) may hold."""
        if self.key_store is None:
            raise NotReadyError("the service is starting; retry shortly")
        return keys.authenticate(self.key_store, presented)

    def photo_model(self) -> FacePipeline:
        db = self.db
        if db is not None and self._given_model is None:
            with db._lock:  # its connection is used under its lock
                current = db.settings().model_id
            if current != self.model_id:
                # the database was moved to another model (`facedb reembed`, by another process): load that one
                # now (once per process; two requests racing here get the same process-wide pipeline)
                self.pipeline = self._load_model(db)
                self.model_id = current
        if self.pipeline is None:
            raise ModelUnavailableError(f"facedb cannot compute {self.model_id!r} embeddings itself: this database "
                                        "takes vectors (use the /vector routes)")
        return self.pipeline

    def publish(self, event: str, data: dict[str, Any], *, key_id: str | None, subject: str | None) -> None:
        """A door event: counted in the metrics (decisions, enrolments) and queued for the webhooks."""
        if self.metrics is not None:
            self.metrics.event(event, data)
        if self.dispatcher is not None:
            self.dispatcher.publish(event, data, key_id=key_id, subject=subject)
