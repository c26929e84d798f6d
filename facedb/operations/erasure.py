"""Erasure: when a removal returns, no file of the database directory holds a byte of what it removed.

Every removal (a person, a template, a merge, thumbnails no longer kept, a move to another model) runs inside
:func:`erasing`: its transaction is marked ``erase_pending`` in the same commit, then the index's persisted copy is
rewritten if it held the removed templates (:meth:`facedb.gallery.upkeep.IndexKeeper.erase`) and the WAL is
checkpointed and truncated. A process killed between the two leaves the mark; the next writable open pays the
debt (:func:`erase`) before it answers, and ``check`` tells a debt from an erasure still under way
(:func:`under_way`). Moved out of ``db.py`` as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..errors import ErasureWarning, warn_caller
from ..protection import encryption

if TYPE_CHECKING:
    from ..db import FaceDB


@contextlib.contextmanager
def erasing(db: FaceDB) -> Iterator[None]:
    """A removal's transaction, marked ``erase_pending`` in it; once committed, its erasure from every file.
    Decision records still waiting for the background writer are committed first, so that what the removal
    erases (a removed person's probe thumbnails, thumbnails no longer kept) cannot be written after it."""
    db.trail.flush()
    # The index lock is held from the transaction to the erasure (lock order: index lock, then SQLite's
    # write lock, as every index save takes them), so `check` in another process can tell an erasure under
    # way (it waits for the lock) from one a killed writer left behind (the mark outlives the lock).
    with db.keeper.locked():
        with db.store.write():
            yield
            db.store.set_meta({"erase_pending": "1"})
        encryption.failpoint("removal-committed")
        db.keeper.after_write(db.settings())
        erase(db)


def under_way(db: FaceDB) -> bool:
    """Whether the ``erase_pending`` mark belongs to a removal still under way in another process: once that
    process releases the index lock (held from its transaction to its erasure) the mark is gone."""
    if db.store.readonly:
        return False  # a read-only process takes no index lock: it reports the mark as it finds it
    with db.keeper.locked():
        return not db.store.erasure_pending()


def erase(db: FaceDB) -> None:
    """Rewrite the index file if it holds removed templates, then checkpoint and truncate the WAL (an
    ErasureWarning when other processes' readers kept it from being truncated)."""
    db.keeper.erase(db.settings())
    if not db.store.truncate_wal():
        warn_caller(ErasureWarning(
            f"{db.root}: other processes kept reading old snapshots, so the write-ahead log still holds the "
            "removed rows (encrypted if the database is); the next removal or `facedb vacuum` truncates it"))
