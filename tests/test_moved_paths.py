"""Old import paths (before issue #29's folders-by-layer move) keep working for one release, each with a
DeprecationWarning that names the new path (facedb/moved.py)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

import facedb
from facedb import moved

REPO = facedb.__file__.rsplit("/facedb/", 1)[0]


@pytest.fixture
def forget_old_names():
    """An old name imported by an earlier test is in sys.modules and would not warn again: forget the aliases
    (never the modules at the new paths) before and after."""
    def forget() -> None:
        for name in [n for n in sys.modules if moved.new_name(n) is not None]:
            del sys.modules[name]
            parent, _, child = name.rpartition(".")
            if parent in sys.modules and getattr(sys.modules[parent], child, None) is not None \
                    and moved.new_name(parent) is None:
                delattr(sys.modules[parent], child)

    forget()
    yield
    forget()


@pytest.mark.parametrize("old", sorted(moved.MOVED))
def test_every_old_module_path_is_the_new_module_with_a_warning_naming_it(old, forget_old_names):
    new = moved.MOVED[old]
    with pytest.warns(DeprecationWarning, match=f"{old} has moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)  # the same object: one module state, isinstance agrees


def test_from_old_path_import_name_and_submodules_of_a_moved_package(forget_old_names):
    with pytest.warns(DeprecationWarning, match="facedb.store has moved to facedb.gallery.store"):
        from facedb.store import Store
    from facedb.gallery.store import Store as Now
    assert Store is Now
    with pytest.warns(DeprecationWarning) as caught:
        import facedb.index.saved_map as old_saved_map
    said = [str(w.message) for w in caught]
    assert any("facedb.index has moved to facedb.gallery.index;" in m for m in said), said  # its package first
    assert any("facedb.index.saved_map has moved to facedb.gallery.index.saved_map" in m for m in said), said
    import facedb.gallery.index.saved_map as saved_map
    assert old_saved_map is saved_map  # not a second copy loaded from the new folder under the old name
    with pytest.warns(DeprecationWarning, match="facedb.models has moved to facedb.faces.models"):
        from facedb.models import DEFAULT_THREADS  # moved beside threads_setting; still found at its old home
    from facedb.gallery.settings import DEFAULT_THREADS as now
    assert DEFAULT_THREADS == now


def test_the_old_gallery_modules_names_resolve_from_the_gallery_package():
    import facedb.gallery
    from facedb.gallery.indexed import Gallery

    vars(facedb.gallery).pop("Gallery", None)  # a use earlier in this process has warned already
    with pytest.warns(DeprecationWarning, match="facedb.gallery.Gallery has moved to facedb.gallery.indexed.Gallery"
                      ) as caught:
        assert facedb.gallery.Gallery is Gallery
    assert len(caught) == 1 and "from facedb.gallery.indexed import Gallery" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert facedb.gallery.Gallery is Gallery  # warned once, not at every use
    with pytest.raises(AttributeError):
        facedb.gallery.NoSuchName  # noqa: B018


def test_new_paths_and_unmoved_names_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        importlib.import_module("facedb.gallery.store")
        importlib.import_module("facedb.errors")
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module("facedb.no_such_module")


def test_the_warning_is_shown_by_default_at_the_importing_line():
    """Python shows a DeprecationWarning by default only when it is attributed to __main__: the warning must point
    at the line that imported, not at the import system's frames."""
    code = "import facedb.store\nfrom facedb.pipeline import find_faces\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "<string>:1: DeprecationWarning: facedb.store has moved to facedb.gallery.store" in res.stderr
    assert "<string>:2: DeprecationWarning: facedb.pipeline has moved to facedb.faces.pipeline" in res.stderr
