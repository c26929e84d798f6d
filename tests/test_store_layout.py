"""The package's shape (#29): the store split by table family, one module holding the SQLite drivers, no class
over 600 lines and no function over 80 anywhere in the package, db.py a facade of at most 600 lines, and every
name the single store.py had still importable from ``facedb.gallery.store``.
Read from the source with ``ast``, as tests/test_layers.py does."""

from __future__ import annotations

import ast
from pathlib import Path

import facedb
import facedb.gallery.store as store

ROOT = Path(facedb.__file__).resolve().parent
STORE = ROOT / "gallery" / "store"
#: The SQLite engines: the drivers and the sqlite-utils layer over them.
DRIVERS = {"sqlite3", "sqlcipher3", "sqlite_utils"}


def _imports(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, lazy imports included."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_only_the_connection_module_imports_a_sqlite_engine():
    """One module per foreign engine: the table families talk to SQLite through connection.py. The keyring's
    ``available()`` imports sqlcipher3 only to say whether the crypto extra is installed, and runs no SQL."""
    users = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.py") if _imports(p) & DRIVERS)
    assert users == ["gallery/store/connection.py", "protection/keyring.py"], users
    keyring = (ROOT / "protection" / "keyring.py").read_text(encoding="utf-8")
    assert "sqlite3" not in keyring.replace("sqlcipher3", "") and "execute(" not in keyring


def _too_long(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        size = (node.end_lineno or node.lineno) - node.lineno + 1
        if size > (600 if isinstance(node, ast.ClassDef) else 80):
            out.append(f"{'class ' if isinstance(node, ast.ClassDef) else ''}{node.name}: {size} lines")
    return [f"{path.relative_to(ROOT).as_posix()}: {x}" for x in out]


def test_no_class_over_600_lines_nor_function_over_80_anywhere_in_the_package():
    """#29's sizes, for every module of the package (tests and scripts are not held to them)."""
    paths = sorted(ROOT.rglob("*.py"))
    assert len(list(STORE.glob("*.py"))) > 5, "the store is a package of one module per table family"
    long = [x for p in paths for x in _too_long(p)]
    assert not long, long


def test_the_facade_stays_a_facade():
    """db.py holds FaceDB's public methods, each calling the room that owns the job: at most 600 lines."""
    lines = len((ROOT / "db.py").read_text(encoding="utf-8").splitlines())
    assert lines <= 600, f"facedb/db.py is {lines} lines: move the job that grew there into its room"


def test_every_family_module_says_what_it_owns():
    for path in STORE.glob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert doc and len(doc) > 100, f"{path.name} opens with a docstring saying what it owns and why"


def test_the_names_of_the_single_module_still_import_from_the_package():
    """What callers, tests and scripts imported from gallery/store.py before it was split."""
    for name in ("Store", "ExclusiveCopy", "SCHEMA_VERSION", "MIGRATIONS", "_apply", "SQLITE_HEADER",
                 "is_plain_sqlite", "opens_with", "utc_time", "utcnow", "time_before", "normalise_name", "check_name",
                 "_check_metadata", "name_sort_key", "name_search_key", "MAX_NAME_LENGTH", "CHANGES_KEPT",
                 "THUMBNAILS_VERSION", "KEYS_VERSION", "NAME_KEYS_VERSION"):
        assert hasattr(store, name), name
    # one Store with every family's public methods (a few from each)
    for method in ("open", "create", "write", "read", "set_meta", "versions", "changes_since", "person", "people",
                   "add_templates", "remove_template", "template_map", "check", "append_audit", "audit",
                   "append_unassigned", "enroll_unassigned", "thumbnail", "add_api_key", "add_webhook",
                   "console_session", "backup_to", "truncate_wal", "erasure_pending"):
        assert callable(getattr(store.Store, method, None)), method
