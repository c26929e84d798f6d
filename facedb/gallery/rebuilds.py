"""When a process's gallery, level with the store, should be rebuilt (``IndexKeeper.rebuild_reason``: ``auto`` now
picks another kind, an IVF outgrew its training, tombstones): take the copy a writer saved, keep answering, or
rebuild. A query keeps answering from the gallery it has while another process is still writing (the query
found writes this process did not make) or holds the index lock (a writer building or saving the copy it will
leave): a rebuild inside a door's query takes seconds at 50k templates and minutes at 1M (found by
a newcomer: 5.6-9.9 s stalls of every door while an import took an ``auto`` gallery past 50,000 templates).
Once writes have stopped and no better copy was left, it rebuilds. Writes, saves and checks rebuild at once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .settings import Settings

if TYPE_CHECKING:
    from .upkeep import IndexKeeper

log = logging.getLogger(__name__)


def stamp_key(stamp: dict[str, Any] | None) -> tuple[Any, ...] | None:
    """What tells one saved copy from another: its kind, generation and content's identity (hash, file id)."""
    if not stamp:
        return None
    return (stamp.get("kind"), stamp.get("generation"), stamp.get("sha256"), stamp.get("file_id"), stamp.get("count"))


def outgrown(kind: str, trained: object, n: int, wanted: str) -> str | None:
    """Why an index of ``kind`` (trained on ``trained`` templates, or None) no longer suits a gallery of ``n``
    for which ``wanted`` is the kind to build: ``retrain`` (an IVF past 4x its training), ``kind``, or None.
    The one rule for the index in memory (``IndexKeeper.rebuild_reason``) and a saved copy's stamp."""
    if trained is not None and n > 4 * max(int(trained), 256):  # type: ignore[call-overload]
        return "retrain"
    # auto's ivf (its choice in earlier releases) and ivfpq are equally good: no rebuild for that alone
    if wanted != kind and {wanted, kind} != {"ivf", "ivfpq"}:
        return "kind"
    return None


def improve(keeper: IndexKeeper, settings: Settings, wait_s: float, reason: str, put_off: bool) -> None:
    """``keeper``'s gallery should be rebuilt (``reason``: ``rebuild_reason``'s): a saved copy that would not be
    (the one a writer saved at its close, after the writes that caused this) is taken instead, once; else, with
    ``put_off`` (a query that found another process's writes, or the index lock held elsewhere), the rebuild
    waits; else it is made."""
    stamp = settings.index_stamp
    key = stamp_key(stamp)
    held = keeper.gallery
    assert held is not None
    # a stamp tells a copy's kind and training, not its tombstones: for those, a rebuild
    wants_other = reason in ("kind", "retrain")
    if wants_other and key is not None and key != keeper._tried_stamp and saved_copy_fits(keeper, stamp, settings):
        keeper._tried_stamp = key
        # The gallery held answers on if the copy cannot be used (both are in memory while it loads), with the
        # keeper's record of where its gallery came from as it was.
        before = (keeper._backend, keeper.from_file, keeper._holds_removed)
        try:
            loaded = keeper._load_noted(settings, wait_s)
        except Exception:
            log.warning("the saved index copy could not be loaded; answering from the index in memory", exc_info=True)
            loaded = None
        if loaded is None:
            keeper._backend, keeper.from_file, keeper._holds_removed = before
            keeper.gallery = held
        else:
            held.close()
            keeper.gallery = loaded
            if not keeper.rebuild_reason(loaded, settings):
                return
    if not put_off:
        keeper._replace(keeper._build(settings))


def saved_copy_fits(keeper: IndexKeeper, stamp: dict[str, Any] | None, settings: Settings) -> bool:
    """Whether the saved copy is of the kind (and training) ``rebuild_reason`` wants now, judged from its stamp
    alone (nothing is read); however old, loading levels it with the store (the change log, else a diff)."""
    if not stamp or not keeper._stamp_matches(stamp, settings) or keeper.gallery is None:
        return False
    n = int(stamp.get("live", len(keeper.gallery)))
    trained = (stamp.get("params") or {}).get("trained_on")
    return outgrown(str(stamp.get("kind")), trained, n, keeper.kind_for(settings, n)) is None
