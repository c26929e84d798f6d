"""Old import paths of the modules that the folders-by-layer move renamed (issue #29), kept for one release.

``import facedb.store`` or ``from facedb.pipeline import get_pipeline`` still work: an import finder on
``sys.meta_path`` (a real module of that name, should one come back, wins) answers an old name with the module
at its new path (the very same module object, not a copy) and emits a DeprecationWarning naming the new path.
Submodules of a moved package follow it (``facedb.models.facenet`` is ``facedb.faces.models.facenet``). Names of the old
``facedb/gallery.py`` module, whose name is now the ``facedb.gallery`` package's, are answered by that package's
``__getattr__`` (:data:`OLD_GALLERY_NAMES`). Nothing here imports a facedb module until an old name is used.

Remove this module, its ``install()`` in ``facedb/__init__.py`` and :data:`OLD_GALLERY_NAMES` in the release after.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

#: Old module path -> new module path (``git show cdbc5f2 --stat``). A package's submodules move with it.
MOVED: dict[str, str] = {
    "facedb.detect": "facedb.faces.detect",
    "facedb.images": "facedb.faces.images",
    "facedb.models": "facedb.faces.models",
    "facedb.pipeline": "facedb.faces.pipeline",
    "facedb.precheck": "facedb.faces.precheck",
    "facedb.quality": "facedb.faces.quality",
    "facedb.yunet": "facedb.faces.yunet",
    "facedb.decision": "facedb.gallery.decision",
    "facedb.engine": "facedb.gallery.engine",
    "facedb.index": "facedb.gallery.index",
    "facedb.livefiles": "facedb.gallery.livefiles",
    "facedb.scores": "facedb.gallery.scores",
    "facedb.settings": "facedb.gallery.settings",
    "facedb.memo": "facedb.gallery.settings_cache",
    "facedb.store": "facedb.gallery.store",
    "facedb.thumbnails": "facedb.gallery.thumbnails",
    "facedb.keeper": "facedb.gallery.upkeep",
    "facedb.vectors": "facedb.gallery.vectors",
    "facedb.audit": "facedb.operations.audit",
    "facedb.backup": "facedb.operations.backup",
    "facedb.cluster": "facedb.operations.cluster",
    "facedb.sheet": "facedb.operations.contact_sheet",
    "facedb.duplicates": "facedb.operations.duplicates",
    "facedb.hooks": "facedb.operations.hooks",
    "facedb.keys": "facedb.operations.keys",
    "facedb.photo_clusters": "facedb.operations.photo_clusters",
    "facedb.reembed": "facedb.operations.reembed",
    "facedb.visitors": "facedb.operations.visitors",
    "facedb.encryption": "facedb.protection.encryption",
    "facedb.protect": "facedb.protection.keyring",
    "facedb.projection": "facedb.protection.projection",
    "facedb.contracts": "facedb.testing.contracts",
    "facedb.soak": "facedb.testing.soak",
}

#: The public names of the old ``facedb/gallery.py`` module, now in ``facedb.gallery.indexed``.
OLD_GALLERY_NAMES = ("Gallery", "DENSE_SLACK")


def new_name(old: str) -> str | None:
    """The module path that ``old`` (a full dotted name) moved to, or None when it did not move."""
    for before, after in MOVED.items():
        if old == before or old.startswith(before + "."):
            return after + old[len(before):]
    return None


def warn_moved(old: str, new: str, stacklevel: int) -> None:
    """The DeprecationWarning for a use of an old path (``stacklevel`` as :func:`warnings.warn` counts it); ``new``
    a module path, or ``module:name`` for a name that moved to another module."""
    module, _, name = new.partition(":")
    where, how = (f"{module}.{name}", f"from {module} import {name}") if name else (module, f"import {module}")
    warnings.warn(f"{old} has moved to {where}; the old path works until the next release: {how}",
                  DeprecationWarning, stacklevel=stacklevel + 1)


class _Alias(importlib.abc.Loader):
    """Loads an old name as the module at its new path (the same object, so state and isinstance agree)."""

    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        # 2: the line that imported. Python's warnings skip the import system's own frames
        # (<frozen importlib._bootstrap>) when counting, and show a DeprecationWarning by default only when it is
        # attributed to __main__: pointing at the importing line is what makes a script's author see it.
        warn_moved(self.old, self.new, stacklevel=2)
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module at the new path was executed when it was imported."""


class _MovedFinder(importlib.abc.MetaPathFinder):
    """Finds old module names only; every other name is left to the finders before it."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        new = new_name(fullname)
        if new is None:
            return None
        parent = fullname.rpartition(".")[0]
        if new_name(parent) is None and importlib.machinery.PathFinder.find_spec(fullname, path) is not None:
            return None  # a real module has that name again: it wins
        return importlib.util.spec_from_loader(fullname, _Alias(fullname, new))


FINDER = _MovedFinder()


def install() -> None:
    """Put the old-path finder first on ``sys.meta_path`` (once): first, because a moved package's submodule
    (``facedb.models.facenet``) would otherwise be found by the path finder in the new folder and loaded a second
    time under its old name; it answers old names only, and steps aside for a real module of that name."""
    if FINDER not in sys.meta_path:
        sys.meta_path.insert(0, FINDER)
