"""When a process's gallery, level with the store, should be rebuilt (``IndexKeeper.rebuild_reason``: ``auto`` now
picks another kind, an IVF outgrew its training, tombstones): take the copy a writer saved, keep answering, or
rebuild. A query keeps answering from the gallery it has while another process is still writing (the store's
generation moved since the rebuild was last put off) or holds the index lock (a writer building or saving the
copy it will leave): a rebuild inside a door's query takes seconds at 50k templates and minutes at 1M (found by
a newcomer: 5.6-9.9 s stalls of every door while an import took an ``auto`` gallery past 50,000 templates).
Once writes have stopped and no better copy was left, it rebuilds. Writes, saves and checks rebuild at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fsio import held_elsewhere
from .settings import Settings

if TYPE_CHECKING:
    from .upkeep import IndexKeeper


def stamp_key(stamp: dict[str, Any] | None) -> tuple[Any, ...] | None:
    """What tells one saved copy from another: its kind, generation and content's identity (hash, file id)."""
    if not stamp:
        return None
    return (stamp.get("kind"), stamp.get("generation"), stamp.get("sha256"), stamp.get("file_id"), stamp.get("count"))


def improve(keeper: IndexKeeper, settings: Settings, wait_s: float, query: bool, lock: Path) -> None:
    """``keeper``'s gallery should be rebuilt: a saved copy that would not be (the one a writer saved at its
    close, after the writes that caused this) is taken instead, once; a ``query`` then puts the rebuild off as
    the module says (``lock``: the index lock's file); otherwise the gallery is rebuilt."""
    stamp = settings.index_stamp
    key = stamp_key(stamp)
    held = keeper.gallery
    assert held is not None
    if key is not None and key != keeper._tried_stamp and saved_copy_fits(keeper, stamp, settings):
        keeper._tried_stamp = key
        keeper.gallery = None  # not two indexes in memory at once; kept if the copy cannot be used
        loaded = keeper._load_noted(settings, wait_s)
        if loaded is None:
            keeper.gallery = held
        else:
            held.close()
            keeper.gallery = loaded
            if not keeper.rebuild_reason(loaded, settings):
                return
    if query and (keeper._put_off_at != settings.generation or held_elsewhere(lock)):
        keeper._put_off_at = settings.generation
        return
    keeper._put_off_at = None
    keeper._replace(keeper._build(settings))


def saved_copy_fits(keeper: IndexKeeper, stamp: dict[str, Any] | None, settings: Settings) -> bool:
    """Whether the saved copy is at least as new as ``keeper``'s gallery and of the kind (and training)
    ``rebuild_reason`` wants now, judged from its stamp alone (nothing is read)."""
    if not stamp or not keeper._stamp_matches(stamp, settings) or keeper.gallery is None:
        return False
    if int(stamp.get("generation", -1)) < keeper.gallery.generation:
        return False
    n = int(stamp.get("live", len(keeper.gallery)))
    kind, wanted = str(stamp.get("kind")), keeper.kind_for(settings, n)
    if kind != wanted and {kind, wanted} != {"ivf", "ivfpq"}:
        return False
    trained = (stamp.get("params") or {}).get("trained_on")
    return trained is None or n <= 4 * max(int(trained), 256)
