"""The docs site (#29): `mkdocs build --strict` is the link checker, run here because CI runs exactly the README's
test command. Every page of docs/ is in the nav (the README's docs map, same order), every relative link and
anchor between pages resolves, and the README's own links (which MkDocs does not build) point at files and
headings that exist."""

from __future__ import annotations

import re
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest

from .conftest import REPO

DOCS = REPO / "docs"


def nav_pages() -> list[str]:
    """The pages mkdocs.yml's nav lists, in order (paths relative to docs/)."""
    text = (REPO / "mkdocs.yml").read_text(encoding="utf-8").split("\nnav:\n", 1)[1]
    return re.findall(r"^  - .+: (\S+\.md)$", text, flags=re.MULTILINE)


def readme_links() -> list[tuple[str, str]]:
    """(target file, anchor or "") of every relative Markdown link in the README."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    out = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        out.append((path, anchor))
    return out


def heading_anchors(page: Path) -> set[str]:
    """The anchors MkDocs gives a page's headings (Python-Markdown's toc slugify; code blocks skipped)."""
    from markdown.extensions.toc import slugify

    anchors, fence = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"#{1,6} (.+)", line)):
            anchors.add(slugify(m.group(1).strip(), "-"))
    return anchors


def test_mkdocs_build_strict_passes(tmp_path):
    """A broken link, a missing anchor or a page left out of the nav is a warning, and --strict fails on it."""
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (the dev extra pins mkdocs==1.6.1)")
    site = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    # it built what the nav promises, not nothing
    pages = nav_pages()
    assert len(pages) >= 15, pages
    for page in pages:
        html = site / ("index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html")
        assert html.is_file(), html


def test_strict_build_fails_on_a_broken_link(tmp_path):
    """The checker is live: a copy of docs/ with one link to a missing page and one to a missing anchor fails."""
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (the dev extra pins mkdocs==1.6.1)")
    import shutil

    docs = tmp_path / "docs"
    shutil.copytree(DOCS, docs)
    with open(docs / "limits.md", "a", encoding="utf-8") as f:
        f.write("\n[gone](no-such-page.md) [lost](cli.md#no-such-heading)\n")
    config = (REPO / "mkdocs.yml").read_text(encoding="utf-8").replace("docs_dir: docs", f"docs_dir: {docs}")
    (tmp_path / "mkdocs.yml").write_text(config, encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(tmp_path / "mkdocs.yml"),
                          "--site-dir", str(tmp_path / "site")], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "no-such-page.md" in out.stderr and "no-such-heading" in out.stderr, out.stderr


def test_every_docs_page_is_in_the_nav_and_in_the_readme_map():
    pages = nav_pages()
    on_disk = sorted(p.name for p in DOCS.glob("*.md"))
    assert sorted(pages) == on_disk
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    the_map = readme[readme.index("| page | what is in it |"):]
    mapped = re.findall(r"^\| \[[^]]+\]\(docs/([^)#]+)\)", the_map, flags=re.MULTILINE)
    assert mapped == [p for p in pages if p != "index.md"], "the README's docs map lists the nav's pages, in order"
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    assert re.findall(r"^\| \[[^]]+\]\(([^)#]+)\)", index, flags=re.MULTILINE) == mapped


def test_readme_links_resolve():
    links = readme_links()
    assert len(links) >= 15, links
    for path, anchor in links:
        target = REPO / path if path else REPO / "README.md"
        assert target.exists(), f"README links to {path}, which does not exist"
        if anchor:
            assert target.suffix == ".md" and anchor in heading_anchors(target), f"README: {path}#{anchor}"


# ------------------------------------------------------------------------------------------ the architecture page
ARCHITECTURE = DOCS / "architecture.md"


def test_the_folder_map_is_the_layering_tests_order():
    """The page's map of the folders lists the layers tests/test_layers.py enforces, in its order."""
    from .test_layers import ORDER

    text = ARCHITECTURE.read_text(encoding="utf-8")
    section = text.split("## The folders\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    layers = [row.split("|")[1].strip() for row in rows[1:]]  # after the header
    assert layers == ORDER


def test_the_architecture_page_names_only_files_and_names_that_exist():
    """Every path (facedb/, tests/, scripts/, with an optional ::name) and every dotted facedb.* name the page
    gives in backticks exists: code moves (db.py into operations/, store.py into gallery/store/), and "where to
    change what" must move with it."""
    import importlib

    text = ARCHITECTURE.read_text(encoding="utf-8")
    spans = set(re.findall(r"`([^`\n]+)`", text))
    paths = [s for s in spans if re.fullmatch(r"(facedb|tests|scripts)/[\w/.-]+(::\w+)?", s)]
    dotted = [s for s in spans if re.fullmatch(r"facedb(\.\w+)+", s)]
    assert len(paths) >= 30 and dotted, (paths, dotted)
    for span in paths:
        path, _, name = span.partition("::")
        assert (REPO / path).exists(), f"architecture.md names {path}, which does not exist"
        if name:
            source = (REPO / path).read_text(encoding="utf-8")
            assert re.search(rf"^(def |class )?{name}\b", source, flags=re.MULTILINE), f"{span}: no {name} there"
    for name in dotted:  # walked from the package: a submodule, else an attribute of what came before
        parts = name.split(".")
        obj = importlib.import_module(parts[0])
        for i, part in enumerate(parts[1:], 1):
            if isinstance(obj, types.ModuleType):
                try:
                    with warnings.catch_warnings():  # the page names old import paths too (facedb.store ...)
                        warnings.simplefilter("ignore", DeprecationWarning)
                        obj = importlib.import_module(".".join(parts[: i + 1]))
                    continue
                except ModuleNotFoundError:
                    pass
            assert hasattr(obj, part), f"architecture.md names {name}, which does not exist"
            obj = getattr(obj, part)


def test_code_cites_only_sections_that_are_where_it_says():
    """The README's reference sections moved to docs/ (#29): a docstring, comment, help text or message in
    facedb/, scripts/ or tests/ that cites `README "<section>"` must name a section the README still has, and
    every `docs/<page>.md` it names must exist."""
    readme_sections = {m.group(1).strip() for m in re.finditer(r"^#+ (.+)$", (REPO / "README.md").read_text(
        encoding="utf-8"), flags=re.MULTILINE)}
    wrong, cited = [], 0
    for folder in ("facedb", "scripts", "tests"):
        for path in sorted((REPO / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            where = path.relative_to(REPO)
            for m in re.finditer(r"README\s*\\?[\"']([A-Z][^\"'\\\n]*)\\?[\"']", text):
                cited += 1
                if m.group(1) not in readme_sections:
                    wrong.append(f"{where}: README {m.group(1)!r}")
            for page in re.findall(r"\bdocs/([\w-]+\.md)\b", text):
                cited += 1
                if not (DOCS / page).is_file():
                    wrong.append(f"{where}: docs/{page}")
    assert cited > 20 and wrong == [], wrong
