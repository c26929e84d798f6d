"""Moving a database to another embedding model (``facedb reembed``, facedb/operations/reembed.py): its effect on the
database, bad input changing nothing, SIGKILL at each step, readers and writers during the move, encryption.

Two test-double models stand in for the old and the new model (colour tiles as faces, ``conftest.py``): the old
``fake-colour`` (32-d) and a new ``fake-colour-b`` (16-d, with its own thresholds and margin rule registered
for the test). The same move on real photos (dlib-resnet to sface, LFW) is the ``realdata`` test at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import facedb.faces.pipeline
from facedb import FaceDB
from facedb.cli import app
from facedb.errors import DatabaseError, InvalidInputError, ModelUnavailableError
from facedb.faces.models import MODELS, ModelSpec
from facedb.faces.pipeline import FacePipeline
from facedb.operations.reembed import UnembeddableError

from .conftest import REPO, FakeDetector, FakeEmbedder, face_image, unit_rows
from .test_livefiles import guard  # noqa: F401  (the fixture that fails on any other open of a live file)

RED, GREEN, BLUE, GREY = (208, 48, 48), (48, 208, 48), (48, 48, 208), (144, 144, 144)
PEOPLE = {"red": RED, "green": GREEN, "blue": BLUE}


class FakeEmbedderB(FakeEmbedder):
    """The "new model" test double: another id, another dimension, other directions for the same colours."""

    model_id = "fake-colour-b"
    dim = 16

    def _identity(self, colour: np.ndarray) -> np.ndarray:
        key = b"model b" + (colour // 32).astype(np.int64).tobytes()
        return np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "little")).standard_normal(
            self.dim)


#: The new model as facedb would know it: its own thresholds (with and without flip) and margin rule.
SPEC_B = ModelSpec("fake-colour-b", 16, 0.61, "test double b", 0.62, "test double b, flip", margins=(0.11, 0.12))


@pytest.fixture
def pipes(monkeypatch):
    """Both test-double pipelines, found by model id the way facedb loads models (get_pipeline), and the new
    model registered (removed again after the test)."""
    found = {FakeEmbedder.model_id: FacePipeline(FakeEmbedder(), detector=FakeDetector()),  # type: ignore[arg-type]
             FakeEmbedderB.model_id: FacePipeline(FakeEmbedderB(), detector=FakeDetector())}  # type: ignore[arg-type]
    monkeypatch.setitem(MODELS, SPEC_B.id, SPEC_B)
    monkeypatch.setattr(facedb.faces.pipeline, "get_pipeline", lambda model_id, **k: found[model_id])
    return found


def photo(path: Path, colours, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(face_image(list(colours), seed)).save(path)
    return path


def make_db(root: Path, photos: Path, **kw) -> Path:
    """A fake-colour database (flip, mean templates, thumbnails of enrolled faces) with two photos of each of
    red, green and blue, enrolled from ``photos/<name>/<i>.png``."""
    with FaceDB.create(root, model_id=FakeEmbedder.model_id, dim=FakeEmbedder.dim, threshold=0.8,
                       mean_templates=True, **kw) as db:
        for name, colour in PEOPLE.items():
            files = [photo(photos / name / f"{i}.png", [colour], seed=i) for i in range(2)]
            assert db.enroll(name, files).faces_stored == 2
    return root


def content(root: Path, **open_kw) -> dict:
    """Everything the database holds, row by row (read through a read-only FaceDB), and its index file's bytes."""
    with FaceDB.open(root, readonly=True, **open_kw) as db:
        conn = db.store.conn
        out = {t: sorted(map(tuple, conn.execute(f"SELECT * FROM {t}").fetchall()), key=repr)
               for t in ("meta", "people", "images", "embeddings", "thumbnails", "changes", "unassigned_faces",
                         "audit")}
    index = root / "index.faiss"
    out["index.faiss"] = hashlib.sha256(index.read_bytes()).hexdigest() if index.exists() else None
    return out


def names_found(db: FaceDB, tmp_path: Path) -> dict[str, str | None]:
    """Each person's identity as answered for a new photo of their colour (unseen texture), through the database's
    own pipeline; and a grey stranger."""
    out = {}
    for name, colour in {**PEOPLE, "stranger": GREY}.items():
        faces = db.search(photo(tmp_path / "probes" / f"{name}.png", [colour], seed=77))
        out[name] = faces[0].identity
    return out


# ------------------------------------------------------------------------------------------------ the effect
def test_reembed_from_kept_crops_moves_every_template_and_answers_under_the_new_model(tmp_path, pipes):
    root = make_db(tmp_path / "db", tmp_path / "photos")
    with FaceDB.open(root) as db:
        before = {t.id: t for t in db.templates()}
        assert names_found(db, tmp_path) == {**{n: n for n in PEOPLE}, "stranger": None}
        db.set_threshold(0.7, "calibrated on the old model", target="far", target_rate=1e-3)
        report = db.reembed("fake-colour-b")
        assert report.moved and report.templates == 6 and report.from_crops == 6 and report.from_photos == 0
        assert report.unembeddable == [] and report.dropped == 0 and report.mean_templates == 3
        s = db.settings()
        assert (s.model_id, s.dim, db.dim) == ("fake-colour-b", 16, 16)
        # the new model's threshold and rule as `facedb init` sets them; the old calibration is gone
        assert s.threshold == 0.62 and s.threshold_source == "test double b, flip" and s.calibration is None
        assert s.rule.kind == "margin" and s.rule.margin == 0.12
        after = {t.id: t for t in db.templates()}
        assert set(after) == set(before)  # the same templates (ids, people, photos), new vectors
        assert all(after[i].person == before[i].person and after[i].image_sha256 == before[i].image_sha256
                   for i in after)
        assert all(t.vector.shape == (16,) and abs(np.linalg.norm(t.vector) - 1) < 1e-5 for t in after.values())
        stats = db.stats()
        assert (stats.templates, stats.mean_templates, stats.people) == (6, 3, 3)
        assert db.count_thumbnails()["template"] == 6  # each template keeps a face crop (the new model's)
        assert names_found(db, tmp_path) == {**{n: n for n in PEOPLE}, "stranger": None}
        assert db.check().ok
        moves = db.audit(operation="reembed")
        assert len(moves) == 1 and moves[0].detail["from"] == "fake-colour" and moves[0].detail["to"] == \
            "fake-colour-b" and moves[0].detail["templates"] == 6 and moves[0].model_id == "fake-colour-b"
    with FaceDB.open(root) as db:  # a fresh process's view: the new model, the index rebuilt from the store
        assert db.model_id == "fake-colour-b" and db.index_state().entries == 9
        assert names_found(db, tmp_path) == {**{n: n for n in PEOPLE}, "stranger": None}


def test_reembed_uses_the_photos_given_first_and_the_crops_for_the_rest(tmp_path, pipes):
    root = make_db(tmp_path / "db", tmp_path / "photos")
    given = tmp_path / "given"
    for i in range(2):  # red's two enrolled photos, byte for byte, and one red photo that was never enrolled
        (given / "red").mkdir(parents=True, exist_ok=True)
        (given / "red" / f"{i}.png").write_bytes((tmp_path / "photos" / "red" / f"{i}.png").read_bytes())
    photo(given / "red" / "new.png", [RED], seed=5)
    with FaceDB.open(root) as db:
        report = db.reembed("fake-colour-b", photos=given)
        assert (report.from_photos, report.from_crops, report.templates) == (2, 4, 6)
        assert any("new.png: not enrolled here" in note for note in report.photos_ignored)
        # a template made from its photo is exactly what enrolling that photo under the new model gives
        pipe = pipes["fake-colour-b"]
        files = {hashlib.sha256(f.read_bytes()).hexdigest(): f for f in (given / "red").iterdir()}
        for t in db.templates("red"):
            analysed = pipe.analyse(files[t.image_sha256])
            expected = pipe.embed_faces(analysed, flip=True)[0]
            assert np.allclose(t.vector, expected, atol=1e-6)
        assert names_found(db, tmp_path) == {**{n: n for n in PEOPLE}, "stranger": None}


def test_photos_only_without_crops_refuses_people_whose_photos_are_missing(tmp_path, pipes):
    root = make_db(tmp_path / "db", tmp_path / "photos")
    given = tmp_path / "given"
    (given / "red").mkdir(parents=True)
    (given / "red" / "0.png").write_bytes((tmp_path / "photos" / "red" / "0.png").read_bytes())
    before = content(root)
    with FaceDB.open(root) as db:
        with pytest.raises(UnembeddableError) as err:
            db.reembed("fake-colour-b", photos=given, crops=False)
    assert {u.person for u in err.value.unembeddable} == {"red", "green", "blue"}
    assert len(err.value.unembeddable) == 5 and all(u.reason == "no photo given" for u in err.value.unembeddable)
    assert content(root) == before


def test_unembeddable_templates_refuse_the_move_unless_dropped(tmp_path, pipes):
    root = make_db(tmp_path / "db", tmp_path / "photos")
    with FaceDB.open(root) as db:
        rng = np.random.default_rng(0)
        db.add_templates("imported", unit_rows(rng, 2, 32), create=True)
    before = content(root)
    with FaceDB.open(root) as db:
        with pytest.raises(UnembeddableError) as err:
            db.reembed("fake-colour-b")
        assert {u.person for u in err.value.unembeddable} == {"imported"} and len(err.value.unembeddable) == 2
        assert "vector added without a photo" in str(err.value) and "--drop-unembeddable" in str(err.value)
    assert content(root) == before  # refused: nothing changed
    with FaceDB.open(root) as db:
        dry = db.reembed("fake-colour-b", drop_unembeddable=True, dry_run=True)
        assert dry.dry_run and not dry.moved and len(dry.unembeddable) == 2
    assert content(root) == before  # a dry run changes nothing
    with FaceDB.open(root) as db:
        report = db.reembed("fake-colour-b", drop_unembeddable=True)
        assert report.moved and report.dropped == 2 and report.templates == 6
        assert report.people_without_templates == ["imported"]
        assert db.person("imported").templates == 0  # the person stays, to be enrolled again
        assert db.stats().templates == 6 and db.check().ok


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("FACEDB_WEIGHTS_URL", "http://127.0.0.1:9/")
    monkeypatch.delenv("FACEDB_WEIGHTS", raising=False)


@pytest.mark.parametrize("case", ["unknown model", "missing weights", "unknown people", "read-only", "same model",
                                  "not a folder"])
def test_bad_input_leaves_the_database_exactly_as_it_was(tmp_path, pipes, no_weights, case):
    root = make_db(tmp_path / "db", tmp_path / "photos")
    strangers = tmp_path / "strangers"
    photo(strangers / "red" / "0.png", [RED], seed=0)
    photo(strangers / "Nobody Here" / "0.png", [GREY], seed=0)
    before = content(root)
    call, error = {
        "unknown model": (dict(model_id="no-such-model"), InvalidInputError),
        "missing weights": (dict(model_id="facenet-vggface2"), ModelUnavailableError),
        "unknown people": (dict(model_id="fake-colour-b", photos=strangers), InvalidInputError),
        "read-only": (dict(model_id="fake-colour-b"), DatabaseError),
        "same model": (dict(model_id="fake-colour"), InvalidInputError),
        "not a folder": (dict(model_id="fake-colour-b", photos=tmp_path / "nowhere"), InvalidInputError),
    }[case]
    with FaceDB.open(root, readonly=case == "read-only") as db:
        with pytest.raises(error) as err:
            db.reembed(**call)
    if case == "unknown people":
        assert "'Nobody Here'" in str(err.value) and "nothing was changed" in str(err.value)
    assert content(root) == before
    args = ["--model", call["model_id"]] + (["--photos", str(call["photos"])] if "photos" in call else [])
    res = CliRunner().invoke(app, ["--db", str(root), *(["--read-only"] if case == "read-only" else []),
                                   "reembed", *args])
    assert res.exit_code == 2 and res.stderr.startswith("error: ")
    if case != "missing weights":  # (that message says where to put the file, on a few lines, as `init`'s does)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert content(root) == before


def test_a_read_only_database_file_is_refused_and_left_as_it_was(tmp_path, pipes):
    if os.geteuid() == 0:
        pytest.skip("root writes to read-only files")
    root = make_db(tmp_path / "db", tmp_path / "photos")
    before = content(root)
    for f in root.iterdir():
        f.chmod(0o400)
    try:
        res = CliRunner().invoke(app, ["--db", str(root), "reembed", "--model", "fake-colour-b"])
        assert res.exit_code == 2, res.stderr
    finally:
        for f in root.iterdir():
            f.chmod(0o600)
    assert content(root) == before


# ---------------------------------------------------------------------------------------------------- kills
KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {repo!r})
import numpy as np
import facedb.faces.pipeline
from facedb import FaceDB
from facedb.faces.models import MODELS
from facedb.faces.pipeline import FacePipeline
from tests.conftest import FakeDetector, FakeEmbedder
from tests.test_reembed import SPEC_B, FakeEmbedderB

class Slow(FakeEmbedderB):
    def embed(self, crops):
        print("computing", flush=True)
        time.sleep(0.3)
        return super().embed(crops)

MODELS[SPEC_B.id] = SPEC_B
found = {{"fake-colour": FacePipeline(FakeEmbedder(), detector=FakeDetector()),
          "fake-colour-b": FacePipeline(Slow(), detector=FakeDetector())}}
facedb.faces.pipeline.get_pipeline = lambda model_id, **k: found[model_id]
import facedb.operations.reembed
facedb.operations.reembed.BATCH = 1  # one embedding call per template: the kill lands between two
with FaceDB.open({root!r}) as db:
    db.reembed("fake-colour-b")
print("moved", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("step", ["computing", "reembed-written", "removal-committed"])
def test_sigkill_during_a_move_leaves_the_old_database_or_the_whole_new_one(tmp_path, pipes, step):
    """Killed while the new templates are computed, or with every row written but not committed: the old database,
    row for row, answering as before. Killed just after the commit (before the index file is rewritten): the
    whole new database, and the next writable open finishes the index's erasure."""
    root = make_db(tmp_path / "db", tmp_path / "photos")
    with FaceDB.open(root) as db:
        db.rebuild_index()
    before = content(root)
    script = tmp_path / "move.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT.format(repo=str(REPO), root=str(root))))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if step != "computing":
        env["FACEDB_FAILPOINT"] = step
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
    if step == "computing":
        lines = []
        while len(lines) < 3:  # the third template's embedding has started: kill it there
            line = proc.stdout.readline()
            assert line, "the move ended before it could be killed"
            lines.append(line)
        proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL and "moved" not in out
    if step == "removal-committed":
        with FaceDB.open(root, readonly=True) as db:
            assert db.store.erasure_pending()  # the index file still holds the old model's vectors
        with FaceDB.open(root) as db:  # a writable open pays that debt first
            assert not db.store.erasure_pending()
            assert db.model_id == "fake-colour-b" and db.stats().templates == 6 and db.check().ok
            assert names_found(db, tmp_path) == {**{n: n for n in PEOPLE}, "stranger": None}
        stamp = json.loads(content(root)["meta"][[r[0] for r in content(root)["meta"]].index("index_stamp")][1])
        assert stamp["model_id"] == "fake-colour-b" and stamp["dim"] == 16
        return
    assert content(root) == before
    with FaceDB.open(root) as db:
        assert db.model_id == "fake-colour" and db.check().ok
        assert names_found(db, tmp_path) == {**{n: n for n in PEOPLE}, "stranger": None}


# ------------------------------------------------------------------------------------- readers and writers
def test_a_reader_open_before_the_move_answers_under_the_new_model_after_it(tmp_path, pipes):
    root = make_db(tmp_path / "db", tmp_path / "photos")
    with FaceDB.open(root) as reader, FaceDB.open(root) as mover:
        assert names_found(reader, tmp_path)["red"] == "red"  # its index and settings are in memory
        mover.reembed("fake-colour-b")
        assert names_found(reader, tmp_path) == {**{n: n for n in PEOPLE}, "stranger": None}
        assert reader.dim == 16 and reader.audit(operation="search")[-1].model_id == "fake-colour-b"


def test_a_search_whose_photo_was_embedded_by_the_old_model_is_asked_again(tmp_path, pipes, monkeypatch):
    """The move commits while a search's photo is being embedded by the old model: that probe is never scored
    against the new gallery; the search embeds it again with the new model."""
    root = make_db(tmp_path / "db", tmp_path / "photos")
    old = pipes["fake-colour"]
    with FaceDB.open(root) as reader, FaceDB.open(root) as mover:
        reader.search(photo(tmp_path / "warm.png", [RED], seed=3))  # index loaded, old model
        real = old.embed_crops
        moved = []

        def embed_then_move(crops, flip=False, jitter=0):
            out = real(crops, flip=flip, jitter=jitter)
            if not moved:
                moved.append(mover.reembed("fake-colour-b"))
            return out

        monkeypatch.setattr(old, "embed_crops", embed_then_move)
        faces = reader.search(photo(tmp_path / "probe.png", [GREEN], seed=9))
        assert moved and faces[0].identity == "green"
        last = reader.audit(operation="search")[-1]
        assert last.model_id == "fake-colour-b" and last.identity == "green"


def test_an_enrolment_embedded_by_the_old_model_is_not_stored_after_the_move(tmp_path, pipes, monkeypatch):
    root = make_db(tmp_path / "db", tmp_path / "photos")
    old = pipes["fake-colour"]
    with FaceDB.open(root) as writer, FaceDB.open(root) as mover:
        real = old.embed_crops

        def embed_then_move(crops, flip=False, jitter=0):
            out = real(crops, flip=flip, jitter=jitter)
            mover.reembed("fake-colour-b")
            return out

        monkeypatch.setattr(old, "embed_crops", embed_then_move)
        report = writer.enroll("red", [photo(tmp_path / "late.png", [RED], seed=8)])
        assert report.faces_stored == 0 and "moved to 'fake-colour-b'" in report.skipped[0].reason
        assert writer.stats().templates == 6 and writer.check().ok


def test_templates_enrolled_while_the_move_computes_are_moved_too(tmp_path, pipes, monkeypatch):
    root = make_db(tmp_path / "db", tmp_path / "photos")
    new = pipes["fake-colour-b"]
    real = new.embed_crops
    with FaceDB.open(root) as writer, FaceDB.open(root) as mover:
        def enrol_meanwhile(crops, flip=False, jitter=0):
            if "late" not in {p.name for p in writer.people()}:
                writer.enroll("late", [photo(tmp_path / "late" / "0.png", [(208, 208, 48)], seed=1)])
            return real(crops, flip=flip, jitter=jitter)

        monkeypatch.setattr(new, "embed_crops", enrol_meanwhile)
        report = mover.reembed("fake-colour-b")
        assert report.templates == 7 and mover.person("late").templates == 1
        assert all(t.vector.shape == (16,) for t in mover.templates()) and mover.check().ok


# ------------------------------------------------------------------------------------------------ encryption
def test_an_encrypted_database_stays_encrypted(tmp_path, pipes):
    pytest.importorskip("sqlcipher3")
    from facedb.protection.keyring import generate_key

    key = generate_key()
    root = make_db(tmp_path / "db", tmp_path / "photos", key=key)
    with FaceDB.open(root, key=key) as db:
        report = db.reembed("fake-colour-b")
        assert report.moved and db.encrypted
        vectors = [t.vector for t in db.templates()]
        stats = db.stats()
        assert stats.encrypted and stats.plaintext_files == [] and db.check().ok
    raw = b"".join(f.read_bytes() for f in root.iterdir() if f.is_file())
    assert not any(v.astype("<f4").tobytes()[:16] in raw for v in vectors)  # no new template in plain text
    with pytest.raises(DatabaseError):
        FaceDB.open(root)  # still needs its key


# ----------------------------------------------------------------------------------------------------- CLI
def test_cli_reembed_moves_the_database_and_reports(tmp_path, pipes):
    root = tmp_path / "db"
    runner = CliRunner()

    def cli(*args, code=0):
        res = runner.invoke(app, ["--db", str(root), *[str(a) for a in args]])
        assert res.exit_code == code, f"{res.exit_code}\n{res.stdout}\n{res.stderr}"
        return res

    cli("init", "--model", "fake-colour", "--dim", "32", "--threshold", "0.8")
    folder = tmp_path / "people"
    for name, colour in PEOPLE.items():
        photo(folder / name / "0.png", [colour], seed=0)
    cli("enroll", "--folder", folder)
    dry = json.loads(cli("--json", "reembed", "--model", "fake-colour-b", "--dry-run").stdout)
    assert dry["dry_run"] and dry["templates"] == 3 and not dry["moved"]
    assert json.loads(cli("--json", "stats").stdout)["model_id"] == "fake-colour"
    out = json.loads(cli("--json", "reembed", "--model", "fake-colour-b", "--photos", folder).stdout)
    assert out["moved"] and out["from_photos"] == 3 and out["to_model"] == "fake-colour-b" and out["unembeddable"] == []
    stats = json.loads(cli("--json", "stats").stdout)
    assert (stats["model_id"], stats["dim"], stats["templates"], stats["threshold"]) == ("fake-colour-b", 16, 3, 0.62)
    probe = photo(tmp_path / "probe.png", [BLUE], seed=4)
    rows = [json.loads(line) for line in cli("--json", "search", probe).stdout.splitlines()]
    assert rows[0]["identity"] == "blue"
    audit = [json.loads(line) for line in cli("--json", "audit", "--operation", "reembed").stdout.splitlines()]
    assert len(audit) == 1 and audit[0]["detail"]["from_photos"] == 3
    res = cli("reembed", "--model", "no-such-model", code=2)
    assert res.stderr.startswith("error: unknown model") and len(res.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------------- real faces
@pytest.mark.realdata
@pytest.mark.slow
def test_real_faces_dlib_to_sface_from_kept_crops_and_from_photos(tmp_path, facedata):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("dlib")
    from facedb.faces.models import resolve_model

    try:
        resolve_model("sface")
    except ModelUnavailableError as exc:
        pytest.skip(f"sface weights not installed: {exc}")
    lfw = facedata / "lfw_deepfunneled"
    people = ["Colin_Powell", "Tony_Blair", "Serena_Williams", "Jennifer_Aniston", "Gerhard_Schroeder"]
    enrol = tmp_path / "enrol"
    for p in people:
        (enrol / p).mkdir(parents=True)
        (enrol / p / f"{p}_0001.jpg").write_bytes((lfw / p / f"{p}_0001.jpg").read_bytes())
    probes = [(p, lfw / p / f"{p}_000{i}.jpg") for p in people for i in (2, 3)]
    for source in ("crops", "photos"):
        root = tmp_path / source
        with FaceDB.create(root, model_id="dlib-resnet", dim=128, threshold=0.929, flip=False) as db:
            db.enroll_many([(p, list((enrol / p).iterdir())) for p in people], workers=1)
            report = db.reembed("sface", photos=enrol if source == "photos" else None)
            assert report.moved and report.templates == 5
            assert (report.from_photos, report.from_crops) == ((5, 0) if source == "photos" else (0, 5))
            assert db.model_id == "sface" and db.settings().threshold == 0.378
            named = [db.search(path)[0].identity for _, path in probes]
            assert sum(n == p for n, (p, _) in zip(named, probes)) >= 9, named
            assert db.check().ok


# ------------------------------------------------------------------------------------------------- service
def test_a_running_service_answers_under_the_new_model_after_a_move(tmp_path, pipes, monkeypatch):
    """A service started on the old model loads the new one at its first photo request after another process
    moved the database (without it, every photo request would be refused as another model's)."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from facedb.service.app import create_app
    from facedb.service.state import ServiceSettings

    from .servicekit import make_db as make_service_db
    from .servicekit import png, wait_ready

    monkeypatch.setitem(MODELS, "fake-colour", ModelSpec("fake-colour", 32, 0.8, "test double"))
    path = tmp_path / "db"
    keys = make_service_db(path)
    app = create_app(ServiceSettings(db=path), sender=lambda *a: 200)
    with TestClient(app) as client:
        wait_ready(client)
        enrol = client.post("/v1/people/Ann/templates", files=[("photos", ("a.png", png([RED], 1), "image/png"))],
                            headers={"X-API-Key": keys["enroll"]})
        assert enrol.status_code == 201, enrol.text

        def who() -> str | None:
            r = client.post("/v1/identify", files={"photo": ("p.png", png([RED], 7))},
                            headers={"X-API-Key": keys["identify"]})
            assert r.status_code == 200, r.text
            return r.json()["faces"][0]["identity"]

        assert who() == "Ann"
        with FaceDB.open(path) as db:
            assert db.reembed("fake-colour-b").moved
        assert who() == "Ann"
        stats = client.get("/v1/stats", headers={"X-API-Key": keys["admin"]}).json()
        assert (stats["model_id"], stats["templates"]) == ("fake-colour-b", 1)


@pytest.mark.parametrize("index", ["hnsw", "ivf", "flat16", "auto"])
def test_every_faiss_index_kind_is_rebuilt_for_the_new_model(tmp_path, pipes, index):
    root = make_db(tmp_path / "db", tmp_path / "photos", index=index)
    with FaceDB.open(root) as db:
        assert names_found(db, tmp_path)["red"] == "red"
        db.reembed("fake-colour-b")
        assert db.check().ok and db.index_state().entries == 9
    with FaceDB.open(root) as db:
        assert names_found(db, tmp_path) == {**{n: n for n in PEOPLE}, "stranger": None}


def test_a_move_opens_no_live_file_outside_livefiles(tmp_path, pipes, guard):  # noqa: F811 (the imported fixture)
    """The move on a database another connection holds open: no file of the live database is opened other than
    through its SQLite connection (docs/guarantees.md: POSIX would drop that connection's locks)."""
    root = make_db(tmp_path / "db", tmp_path / "photos")
    other = FaceDB.open(root, readonly=True)
    try:
        assert other.stats().templates == 6
        with FaceDB.open(root) as db:
            db.reembed("fake-colour-b", photos=tmp_path / "photos")
            assert db.check().ok
        assert other.stats().templates == 6 and other.model_id == "fake-colour-b"
    finally:
        other.close()
    assert guard == []
