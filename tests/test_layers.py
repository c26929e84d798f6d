"""The package's layers (docs/architecture.md, "The folders"): a module imports only from layers below its own, or
from its own folder. Read from the source with ``ast`` (module-level and lazy imports alike), so a new upward
import fails here before it becomes an import circle."""

from __future__ import annotations

import ast
from pathlib import Path

import facedb

ROOT = Path(facedb.__file__).resolve().parent

#: (path prefix inside facedb/, layer name), most specific first; a module's layer is the first that matches.
LAYERS: list[tuple[str, str]] = [
    ("errors.py", "foundation"), ("fsio.py", "foundation"), ("timings.py", "foundation"),
    ("choices.py", "foundation"), ("records.py", "foundation"),
    ("environment.py", "foundation"),  # FACEDB_* numbers, one strict parser
    ("moved.py", "foundation"),  # old import paths, for one release: it imports the new ones by name, lazily
    ("protection/keyring.py", "ciphers"), ("protection/projection.py", "ciphers"),
    ("gallery/", "gallery"),
    ("faces/", "faces"),
    ("protection/", "database encryption"),
    ("operations/", "operations"),
    ("db.py", "facade"),
    ("__init__.py", "package"),
    ("evaluate/", "evaluate"),
    ("train/", "train"),
    ("service/", "service"),
    ("cli/", "cli"),
    ("testing/", "testing"),
]
#: Lowest first: each layer may import the layers before it in this list.
ORDER = ["foundation", "ciphers", "gallery", "faces", "database encryption", "operations", "facade", "package",
         "evaluate", "train", "service", "cli", "testing"]


def layer_of(rel: str) -> str:
    for prefix, name in LAYERS:
        if rel == prefix or (prefix.endswith("/") and rel.startswith(prefix)):
            return name
    raise AssertionError(f"facedb/{rel} is in no layer: add it to LAYERS")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def _nodes(tree: ast.AST):
    """Every node, leaving out ``if TYPE_CHECKING:`` blocks (annotations only: never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        yield node
        yield from _nodes(node)


def imported(path: Path, known: dict[str, Path]) -> set[str]:
    """facedb modules ``path`` imports, at any depth of the file (lazy imports inside functions too)."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in _nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            out.update(names if names else [target])
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in known and m != mod}


def test_every_module_imports_only_from_below_or_its_own_folder():
    known = modules()
    wrong = []
    for path in sorted(known.values()):
        rel = path.relative_to(ROOT).as_posix()
        mine = layer_of(rel)
        for target in sorted(imported(path, known)):
            trel = known[target].relative_to(ROOT).as_posix()
            theirs = layer_of(trel)
            same_folder = Path(rel).parent == Path(trel).parent and mine == theirs
            if not (ORDER.index(theirs) < ORDER.index(mine) or same_folder or mine == theirs):
                wrong.append(f"facedb/{rel} ({mine}) imports facedb/{trel} ({theirs})")
    assert not wrong, "imports that run up the layers:\n" + "\n".join(wrong)


def test_no_module_is_left_at_the_top_but_the_facade_and_the_foundation():
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert {layer_of(n) for n in top} <= {"foundation", "facade", "package"}, top


def test_no_import_circles():
    """Lazy imports count: a circle broken only by importing inside a function is still two modules that need
    each other."""
    known = modules()
    # A package's __init__ that imports its own submodules so they register (the CLI's commands) is how the
    # registry works: the submodules' import of their package is not counted as a circle.
    graph = {m: {n for n in imported(p, known) if not m.startswith(n + ".")} for m, p in known.items()}
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                circles.append([*path[path.index(n):], n])
            elif n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, "modules that import each other when loaded:\n" + "\n".join(" -> ".join(c) for c in circles)
