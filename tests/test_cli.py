"""Every CLI command through typer's CliRunner: exit codes, JSON output, one-line errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

import facedb.faces.pipeline
from facedb import FaceDB, InvalidInputError
from facedb.cli import app

from .conftest import FakeEmbedder, face_image

runner = CliRunner()

RED, GREEN, BLUE, GREY = (200, 40, 40), (40, 200, 40), (40, 40, 200), (120, 120, 120)


def run(db, *args, ok=True):
    result = runner.invoke(app, ["--db", str(db), *args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def jlines(result):
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


@pytest.fixture
def fake_cli(monkeypatch, fake_pipeline):
    """CLI wired to the test-double face pipeline (colour tiles as faces)."""
    monkeypatch.setattr(facedb.faces.pipeline, "get_pipeline", lambda *a, **k: fake_pipeline)
    return fake_pipeline


def photo(path, colours, seed=0):
    Image.fromarray(face_image(colours, seed)).save(path)
    return path


def test_help_does_not_import_torch_or_faiss():
    code = "import sys; from facedb.cli import app; import facedb; assert 'faiss' not in sys.modules; " \
           "assert 'torch' not in sys.modules; print('clean')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "clean" in out.stdout
    out = subprocess.run([sys.executable, "-m", "facedb.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "enroll" in out.stdout


def test_core_commands(tmp_path):
    db = tmp_path / "db"
    res = run(db, "--json", "init", "--model", "my-model", "--dim", "8", "--threshold", "0.7", "--no-mean-templates")
    info = jlines(res)[0]
    assert info["model_id"] == "my-model" and info["dim"] == 8 and info["threshold"] == 0.7
    assert run(db, "init", "--model", "my-model", "--dim", "8", ok=False).exit_code == 2
    run(db, "add-person", "Ann", "--meta", "team=red", "--external-id", "E1")
    run(db, "add-person", "Bob")
    with FaceDB.open(db) as d:
        v = np.eye(8, dtype=np.float32)
        d.add_templates("Ann", v[:2])
        d.add_templates("Bob", v[2:3])
    people = jlines(run(db, "--json", "people"))
    assert [(p["name"], p["templates"]) for p in people] == [("Ann", 2), ("Bob", 1)]
    assert "Ann" in run(db, "people").stdout
    shown = jlines(run(db, "--json", "show", "Ann"))[0]
    assert shown["metadata"] == {"team": "red"} and shown["external_id"] == "E1"
    assert jlines(run(db, "--json", "rename", "Bob", "Robert"))[0]["name"] == "Robert"
    stats = jlines(run(db, "--json", "stats"))[0]
    assert (stats["people"], stats["templates"], stats["model_id"]) == (2, 3, "my-model")
    assert jlines(run(db, "--json", "check"))[0]["ok"] is True
    assert "ok" in run(db, "check").stdout
    assert jlines(run(db, "--json", "rebuild-index"))[0]["indexed"] == 3
    assert jlines(run(db, "--json", "remove", "Ann"))[0] == {"removed": "Ann", "templates": 2}
    assert [p["name"] for p in jlines(run(db, "--json", "people"))] == ["Robert"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["show", "nobody"], "no person named 'nobody'"),
        (["remove", "nobody"], "no person named 'nobody'"),
        (["rename", "nobody", "x"], "no person named 'nobody'"),
        (["add-person", ""], "non-empty"),
        (["add-person", "A", "--meta", "novalue"], "key=value"),
    ],
)
def test_errors_are_one_line_with_nonzero_exit(tmp_path, args, message):
    db = tmp_path / "db"
    run(db, "init", "--model", "m", "--dim", "4")
    res = run(db, *args, ok=False)
    assert res.exit_code == 2  # errors exit 2; 1 is kept for a negative answer (verify: no)
    assert message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output


def test_missing_database_and_unknown_model(tmp_path):
    res = run(tmp_path / "nope", "stats", ok=False)
    assert res.exit_code == 2 and "no facedb database" in res.stderr
    res = run(tmp_path / "db", "init", "--model", "mystery", ok=False)
    assert res.exit_code == 2 and "unknown model" in res.stderr


def test_db_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEDB_DB", str(tmp_path / "envdb"))
    assert runner.invoke(app, ["init", "--model", "m", "--dim", "4"]).exit_code == 0
    assert (tmp_path / "envdb" / "facedb.sqlite3").exists()


def test_enroll_search_verify_remove_with_test_double(tmp_path, fake_cli):
    db = tmp_path / "db"
    run(db, "init", "--model", FakeEmbedder.model_id, "--dim", str(FakeEmbedder.dim), "--threshold", "0.8")
    folder = tmp_path / "people"
    for name, colour in (("red", RED), ("green", GREEN)):
        (folder / name).mkdir(parents=True)
        for i in range(2):
            photo(folder / name / f"{i}.png", [colour], seed=i)
    (folder / "green" / "broken.jpg").write_bytes(b"not an image")
    photo(folder / "green" / "two.png", [GREEN, RED], seed=9)
    photo(folder / "green" / "none.png", [])
    res = run(db, "--json", "enroll", "--folder", str(folder), ok=False)
    assert res.exit_code == 2  # some photos could not be enrolled; the others were
    report = jlines(res)[0]
    assert report["people"] == ["green", "red"] and report["faces_stored"] == 4 and report["photos"] == 7
    reasons = {s["image"].rsplit("/", 1)[-1]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"broken.jpg", "two.png", "none.png"}
    assert "not a readable image" in reasons["broken.jpg"] and "2 faces" in reasons["two.png"]
    assert "no face" in reasons["none.png"]
    # the same photos again: skipped as already enrolled, nothing stored twice
    again = jlines(run(db, "--json", "enroll", "red", str(folder / "red" / "0.png"), ok=False))[0]
    assert again["faces_stored"] == 0 and "already enrolled" in again["skipped"][0]["reason"]

    probe = photo(tmp_path / "probe.png", [RED, BLUE], seed=42)
    empty = photo(tmp_path / "empty.png", [])
    rows = jlines(run(db, "--json", "search", str(probe), str(empty), "-k", "2"))
    faces = [r for r in rows if r.get("faces") != 0]
    assert [r["identity"] for r in faces] == ["red", None]
    for r in faces:
        assert set(r) >= {"image", "box", "det_score", "identity", "similarity", "distance", "candidates"}
        assert len(r["candidates"]) == 2
        assert r["distance"] == pytest.approx(2 - 2 * r["similarity"], abs=1e-6)
    assert any(r.get("faces") == 0 for r in rows)
    assert "unknown" in run(db, "search", str(probe)).stdout

    redprobe = photo(tmp_path / "redprobe.png", [RED], seed=77)
    assert jlines(run(db, "--json", "verify", "red", str(redprobe)))[0]["accepted"] is True
    res = run(db, "--json", "verify", "green", str(redprobe), ok=False)
    assert res.exit_code == 1 and jlines(res)[0]["accepted"] is False  # a rejected claim exits 1

    run(db, "remove", "red")
    rows = jlines(run(db, "--json", "search", str(redprobe)))
    assert rows[0]["identity"] is None and all(c["name"] != "red" for c in rows[0]["candidates"])


def test_enroll_on_multiple_largest(tmp_path, fake_cli):
    db = tmp_path / "db"
    run(db, "init", "--model", FakeEmbedder.model_id, "--dim", str(FakeEmbedder.dim))
    two = photo(tmp_path / "two.png", [GREY, BLUE])
    out = jlines(run(db, "--json", "enroll", "x", str(two), "--on-multiple", "largest"))[0]
    assert out["faces_stored"] == 1
    res = run(db, "enroll", "y", str(two), "--on-multiple", "bogus", ok=False)
    assert res.exit_code == 2 and "on-multiple" in res.stderr


def test_enroll_with_wrong_model_is_refused(tmp_path, fake_cli):
    db = tmp_path / "db"
    run(db, "init", "--model", "other", "--dim", "32")
    res = run(db, "enroll", "x", str(photo(tmp_path / "a.png", [RED])), ok=False)
    assert res.exit_code == 2 and "fake-colour" in res.stderr


def test_audit_trail(tmp_path, fake_cli):
    db = tmp_path / "db"
    run(db, "init", "--model", FakeEmbedder.model_id, "--dim", str(FakeEmbedder.dim), "--threshold", "0.8")
    run(db, "enroll", "red", str(photo(tmp_path / "r.png", [RED])))
    probe = photo(tmp_path / "probe.png", [RED, BLUE], seed=3)
    run(db, "search", str(probe))
    run(db, "verify", "red", str(probe))
    rows = jlines(run(db, "--json", "audit"))
    ops = [r["operation"] for r in rows]
    assert ops == ["enroll", "search", "search", "verify"]
    searches = [r for r in rows if r["operation"] == "search"]
    assert [r["identity"] for r in searches] == ["red", None]  # unknown is recorded as null
    assert all(r["model_id"] == FakeEmbedder.model_id and r["threshold"] == 0.8 for r in searches)
    assert all(len(r["image_sha256"]) == 64 and r["has_embedding"] is False for r in rows)
    assert jlines(run(db, "--json", "audit", "--since", "1h"))[0]["operation"] == "enroll"
    assert jlines(run(db, "--json", "audit", "--since", "2999-01-01")) == []
    assert run(db, "audit", "--since", "yesterday-ish", ok=False).exit_code == 2

    settings = jlines(run(db, "--json", "audit-settings", "--store-embeddings", "--retention-days", "30"))[0]
    assert settings == {"enabled": True, "retention_days": 30.0, "store_probes": True, "sync": False}
    run(db, "search", str(probe))
    assert jlines(run(db, "--json", "audit"))[-1]["has_embedding"] is True
    run(db, "audit-settings", "--disable")
    before = len(jlines(run(db, "--json", "audit")))
    run(db, "search", str(probe))
    assert len(jlines(run(db, "--json", "audit"))) == before


def test_audit_retention_drops_old_records(tmp_path):
    with FaceDB.create(tmp_path / "db", model_id="m", dim=4, threshold=0.5) as d:
        d.add_templates("a", np.eye(4, dtype=np.float32)[:1], create=True)
        d.identify(np.eye(4, dtype=np.float32)[0])
        d.audit()  # reading the trail commits the records its background writer holds
        d.store.conn.execute("UPDATE audit SET time = '2000-01-01T00:00:00.000+00:00'")
        d.configure_audit(retention_days=1)
        d.identify(np.eye(4, dtype=np.float32)[1])
        # the old add-templates and identify records are gone; the retention change itself is recorded
        assert [r["operation"] for r in d.audit()] == ["audit-settings", "identify"]


def test_flip_is_a_database_setting_used_for_enrol_and_search(tmp_path, fake_cli):
    """With flip (the default) a template is the renormalised mean of the crop's and its mirror's embedding;
    with --no-flip the crop's alone. Both ways the database's own setting is applied, and stats shows it."""
    from facedb.faces.images import load_photo

    src = photo(tmp_path / "red.png", [RED], seed=3)
    face = fake_cli.detector.detect(load_photo(src).pixels)[0]
    crop = fake_cli.embedder.align(load_photo(src).pixels, face)
    plain = fake_cli.embedder.embed([crop])[0]
    mirrored = fake_cli.embedder.embed([np.ascontiguousarray(crop[:, ::-1])])[0]
    assert plain @ mirrored < 0.999  # the mirror image really embeds differently
    expected = {True: (plain + mirrored) / np.linalg.norm(plain + mirrored), False: plain}
    for flip in (True, False):
        db = tmp_path / f"db-{flip}"
        args = ["init", "--model", FakeEmbedder.model_id, "--dim", str(FakeEmbedder.dim)]
        info = jlines(run(db, "--json", *args, *([] if flip else ["--no-flip"])))[0]
        assert info["flip"] is flip
        run(db, "enroll", "red", str(src))
        with FaceDB.open(db) as d:
            assert d.stats()["flip"] is flip
            stored = d.store.person_vectors([d.person("red").id])[1][0]
        assert np.allclose(stored, expected[flip], atol=1e-6)
        hit = jlines(run(db, "--json", "search", str(src)))[0]  # the same photo finds itself exactly
        assert hit["identity"] == "red" and hit["similarity"] == pytest.approx(1.0, abs=1e-5)


def test_enrolment_workers_default_and_validation(tmp_path, monkeypatch, fake_cli):
    from facedb.faces.pipeline import auto_workers

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert auto_workers(63) == 0 and auto_workers(64) == 4 and auto_workers(500, "cuda") == 0
    assert auto_workers(500, "cpu", holds_gil=False) == 0  # torch models: their threads use the cores
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert auto_workers(1000) == 1
    db = tmp_path / "db"
    run(db, "init", "--model", FakeEmbedder.model_id, "--dim", str(FakeEmbedder.dim))
    src = photo(tmp_path / "red.png", [RED])
    assert run(db, "enroll", "red", str(src), "--workers", "-1", ok=False).exit_code == 2
    with FaceDB.open(db) as d:
        assert d.stats()["templates"] == 0  # refused before anything was stored
        with pytest.raises(InvalidInputError):
            d.enroll_many([("red", [src])], workers=-2)


class BlindDetector:
    """Test double for a detector that finds no face in a tight crop (MTCNN's failure on badge photos)."""

    def detect(self, image):
        return []


def test_cropped_photos_are_padded_and_taken_whole_when_no_face_is_found(tmp_path, monkeypatch):
    """--cropped on enroll, search, verify and detect: a face crop the detector cannot see is the face itself;
    without it, "no face". A featureless frame (uniform grey: a blank camera) is never taken for a face, even
    with --cropped (found by the newcomer check: a blank image became a person who matched every blank frame)."""
    blind = facedb.faces.pipeline.FacePipeline(FakeEmbedder(), detector=BlindDetector())
    monkeypatch.setattr(facedb.faces.pipeline, "get_pipeline", lambda *a, **k: blind)
    db = tmp_path / "db"
    run(db, "init", "--model", FakeEmbedder.model_id, "--dim", str(FakeEmbedder.dim), "--threshold", "0.8")
    crop = tmp_path / "badge.png"
    Image.fromarray(np.random.default_rng(5).integers(30, 226, (112, 92, 3), dtype=np.uint8)).save(crop)
    blank = tmp_path / "blank.png"
    Image.new("RGB", (92, 112), (128, 128, 128)).save(blank)

    res = run(db, "--json", "enroll", "ada", str(crop), ok=False)
    assert res.exit_code == 2 and "no face" in jlines(res)[0]["skipped"][0]["reason"]
    res = run(db, "--json", "enroll", "ghost", str(blank), "--cropped", ok=False)
    assert res.exit_code == 2 and "no face" in jlines(res)[0]["skipped"][0]["reason"]
    with FaceDB.open(db) as opened:
        assert opened.stats().templates == 0 and opened.stats().people == 0  # nothing stored
    assert jlines(run(db, "--json", "enroll", "ada", str(crop), "--cropped"))[0]["faces_stored"] == 1
    with FaceDB.open(db) as opened:
        assert opened.stats().templates == 1 and opened.person("ada").images == 1

    assert jlines(run(db, "--json", "detect", str(crop))) == [{"image": str(crop), "faces": 0}]
    face = [r for r in jlines(run(db, "--json", "detect", str(crop), "--cropped")) if "box" in r]
    assert len(face) == 1 and face[0]["box"] == [0.0, 0.0, 92.0, 112.0] and face[0]["det_score"] == 0.0
    assert "box" not in run(db, "--json", "detect", str(blank), "--cropped").stdout

    assert jlines(run(db, "--json", "search", str(crop)))[0]["faces"] == 0
    found = jlines(run(db, "--json", "search", str(crop), "--cropped"))
    assert [r["identity"] for r in found] == ["ada"] and found[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert jlines(run(db, "--json", "search", str(blank), "--cropped"))[0]["faces"] == 0

    res = run(db, "verify", "ada", str(crop), ok=False)
    assert res.exit_code == 2 and "no face" in res.stderr
    assert jlines(run(db, "--json", "verify", "ada", str(crop), "--cropped"))[0]["accepted"] is True
    assert run(db, "verify", "ada", str(blank), "--cropped", ok=False).exit_code == 2
    with FaceDB.open(db) as opened:
        ops = [r.operation for r in opened.audit()]
        assert ops.count("search") == 1 and ops.count("verify") == 1  # the decisions made are on the trail


def test_enrolment_reports_photos_stored_whose_face_fails_a_quality_floor(tmp_path, fake_cli):
    """Stored all the same (enrolment does not refuse on quality), but listed with the floor failed."""
    db = tmp_path / "db"
    run(db, "init", "--model", FakeEmbedder.model_id, "--dim", str(FakeEmbedder.dim))
    flat = photo(tmp_path / "flat.png", [GREY])  # a flat tile: contrast ~2, the floor is 18
    textured = tmp_path / "textured.png"
    Image.fromarray(np.random.default_rng(5).integers(30, 226, (40, 40, 3), dtype=np.uint8)).save(textured)
    out = jlines(run(db, "--json", "enroll", "ann", str(flat), str(textured)))[0]
    assert out["faces_stored"] == 2
    assert [q["image"].rsplit("/", 1)[-1] for q in out["quality"]] == ["flat.png"]
    assert "contrast" in out["quality"][0]["reason"] and "at least 18" in out["quality"][0]["reason"]
    with FaceDB.open(db) as opened:
        assert opened.person("ann").templates == 2
    text = run(db, "enroll", "bob", str(photo(tmp_path / "flat2.png", [BLUE], seed=3))).stdout
    assert "quality  " in text and "contrast" in text


def test_a_photo_stored_meanwhile_by_another_enrolment_is_already_enrolled_not_a_failure(tmp_path, fake_pipeline,
                                                                                         monkeypatch):
    """Two enrolments of one folder at once: the slower one met the photo at insert time (after its own check)
    and reported a failure, exit 2, though every photo was stored (newcomer check)."""
    path = tmp_path / "db"
    FaceDB.create(path, model_id=FakeEmbedder.model_id, dim=FakeEmbedder.dim, threshold=0.8).close()
    pic = photo(tmp_path / "a.png", [RED])
    with FaceDB.open(path, model=fake_pipeline) as first, FaceDB.open(path, model=fake_pipeline) as second:
        monkeypatch.setattr(second, "_known_photo", lambda sha256: None)  # its check ran before first's commit
        assert first.enroll("ann", [pic]).faces_stored == 1
        report = second.enroll("ann", [pic])
        assert report.faces_stored == 0 and report.skipped[0].reason.startswith("already enrolled")
        assert report.failed == [] and report.only_known
        assert second.person("ann").templates == 1


def test_a_skipped_photo_is_named_once(tmp_path, fake_cli):
    """`skipped missing.jpg: missing.jpg: cannot read` named the photo twice (newcomer check)."""
    db = tmp_path / "db"
    run(db, "init", "--model", FakeEmbedder.model_id, "--dim", str(FakeEmbedder.dim))
    res = run(db, "enroll", "bob", str(tmp_path / "missing.jpg"), ok=False)
    line = next(x for x in res.stdout.splitlines() if x.startswith("skipped"))
    assert res.exit_code == 2 and line.count("missing.jpg") == 1, line
    with FaceDB.open(db) as opened:
        assert opened.stats().people == 0


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_photo_paths_that_are_not_regular_files_are_refused_before_being_opened(tmp_path, fake_cli):
    db = tmp_path / "db"
    run(db, "init", "--model", FakeEmbedder.model_id, "--dim", str(FakeEmbedder.dim))
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)

    def unblock():  # without the check, opening the FIFO waits for a writer forever: give each reader EOF instead
        if done.wait(5):
            return
        while not done.wait(0.1):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader waiting yet
                pass

    done = threading.Event()
    watchdog = threading.Thread(target=unblock, daemon=True)
    watchdog.start()
    try:
        good = photo(tmp_path / "ok.png", [RED])
        link = tmp_path / "link.png"
        link.symlink_to(good)  # a symlink to a regular file is a photo like any other
        res = run(db, "enroll", "ann", str(fifo), str(link), ok=False)
        assert res.exit_code == 2 and "not a regular file" in res.output, res.output
        with FaceDB.open(db) as d:
            assert d.stats()["templates"] == 1
        for command in ("search", "detect"):
            res = run(db, command, str(fifo), ok=False)
            assert res.exit_code == 2 and "not a regular file" in res.output, res.output
        if os.path.exists("/dev/zero"):
            res = run(db, "search", "/dev/zero", ok=False)
            assert res.exit_code == 2 and "not a regular file" in res.output, res.output
    finally:
        done.set()
        watchdog.join()


@pytest.mark.parametrize("args", [["people"], ["--help"]])
def test_a_reader_that_stops_early_ends_facedb_quietly_with_141(tmp_path, args):
    db = tmp_path / "db"
    run(db, "init", "--model", "m", "--dim", "8")
    for i in range(3):
        run(db, "add-person", f"p{i}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "facedb.cli", "--db", str(db), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # `| head` gone before facedb writes a line
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141 and err == b""
    with FaceDB.open(db) as d:
        assert len(d.people()) == 3


def test_serve_on_a_port_in_use_is_a_one_line_error_before_the_model_loads(tmp_path, monkeypatch):
    pytest.importorskip("uvicorn")
    db = tmp_path / "db"
    run(db, "init", "--model", "m", "--dim", "8")
    loaded = []
    import facedb.cli.service as service_cli

    monkeypatch.setattr(service_cli, "open_db", lambda *a, **k: loaded.append(1))  # never reached
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = run(db, "serve", "--port", str(port), ok=False)
    assert res.exit_code == 2, res.output
    assert res.stderr.strip().count("\n") == 0 and "already in use" in res.stderr and str(port) in res.stderr
    assert loaded == []


def test_help_texts_keep_their_square_brackets():
    """Typer renders help as rich markup, where ``[word]`` is a style tag that vanishes unless escaped."""
    from rich.markup import RE_TAGS

    def texts(cmd, path):
        yield path, cmd.help or ""
        for param in cmd.params:
            yield path, getattr(param, "help", None) or ""
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from texts(sub, f"{path} {name}")

    swallowed = [(path, m.group(0)) for path, text in texts(typer.main.get_command(app), "facedb")
                 for m in RE_TAGS.finditer(text) if not m.group(2)]
    assert swallowed == []
    res = runner.invoke(app, ["serve", "--help"], terminal_width=200)
    assert res.exit_code == 0 and "facedb[service]" in res.stdout


def test_json_output_has_a_line_for_every_photo_named(tmp_path, fake_cli):
    db = tmp_path / "db"
    run(db, "init", "--model", FakeEmbedder.model_id, "--dim", str(FakeEmbedder.dim))
    run(db, "enroll", "red", str(photo(tmp_path / "red.png", [RED])))
    ok, none, missing = photo(tmp_path / "ok.png", [RED], seed=3), photo(tmp_path / "none.png", []), \
        tmp_path / "missing.jpg"
    for command in ("search", "detect"):
        res = run(db, "--json", command, str(missing), str(ok), str(none), ok=False)
        assert res.exit_code == 2 and "missing.jpg" in res.stderr  # the stderr line stays
        rows = jlines(res)
        assert [r["image"] for r in rows] == [str(missing), str(ok), str(none)], command
        assert "missing.jpg" in rows[0]["error"] and "faces" not in rows[0]
        assert "error" not in rows[1] and "box" in rows[1]
        assert rows[2]["faces"] == 0 and "error" not in rows[2]
    with FaceDB.open(db) as d:
        assert d.stats()["templates"] == 1  # search and detect changed nothing


def test_text_search_under_the_margin_rule_shows_the_score_it_decided_on(tmp_path, fake_cli):
    db = tmp_path / "db"
    run(db, "init", "--model", FakeEmbedder.model_id, "--dim", str(FakeEmbedder.dim))
    run(db, "enroll", "red", str(photo(tmp_path / "red.png", [RED])))
    run(db, "enroll", "green", str(photo(tmp_path / "green.png", [GREEN])))
    with FaceDB.open(db) as d:
        d.set_rule("margin", margin=0.3)
    probe = str(photo(tmp_path / "probe.png", [RED], seed=5))
    match = jlines(run(db, "--json", "search", probe))[0]
    assert match["rule"].startswith("margin") and match["score"] is not None
    line = run(db, "search", probe).stdout
    assert f"score={match['score']:.4f} (needs {match['score_threshold']:.4f})" in line
    with FaceDB.open(db) as d:
        d.set_rule("fixed")
    assert "score=" not in run(db, "search", probe).stdout  # the fixed rule decides on similarity alone


def test_thresholds_are_shown_without_float_noise_and_stored_exactly(tmp_path):
    db = tmp_path / "db"
    run(db, "init", "--model", "m", "--dim", "8", "--threshold", "0.9363130000000001")
    with FaceDB.open(db) as d:
        d.set_rule("margin", margin=0.1 + 0.2)  # 0.30000000000000004
    for command in ("rule", "stats"):
        text = run(db, command).stdout
        assert "0.936313\n" in text and "0.3\n" in text and "0000000" not in text, text
        shown = jlines(run(db, "--json", command))[0]
        assert shown["threshold_in_force"] == 0.936313
        assert shown.get("margin_threshold", shown.get("decision_margin")) == 0.3
    with FaceDB.open(db) as d:  # only the display is rounded
        assert d.stats()["threshold"] == 0.9363130000000001


def test_quality_limits_read_in_the_unit_of_their_value():
    from facedb.faces.quality import FLOORS, problems

    said = problems({"face_px": 24.0, "contrast": 30.0, "light_asymmetry": 0.81, "clipped": 0.452, "yaw": 0.1},
                    FLOORS)
    assert said == ["face 24 px across (at least 40)", "light 81% stronger on one side (at most 45%)",
                    "45% of the face over- or under-exposed (at most 35%)"]
    just_over = problems({"face_px": 50.0, "contrast": 30.0, "light_asymmetry": 0.4504, "clipped": 0.0,
                          "yaw": 0.0}, FLOORS)
    assert just_over == ["light 45.04% stronger on one side (at most 45%)"]  # never "45% (at most 45%)"


def test_the_default_model_note_has_its_parentheses_once(monkeypatch):
    import facedb.faces.models as models
    import facedb.faces.models.weights as weights
    from facedb.errors import ModelUnavailableError

    def unavailable(*a, **k):
        raise ModelUnavailableError("the facenet-vggface2 weights are not available (cannot download: offline).")

    monkeypatch.setattr(weights, "resolve_weights", unavailable)
    monkeypatch.setattr(models, "_dlib_available", lambda: True)
    _, note = models.choose_default_model()
    assert "(cannot download: offline))." in note and ".)." not in note


@pytest.mark.parametrize("args, fragment", [
    (["search", "-k", "0", "x.jpg"], "'--top'"),
    (["rule", "bogus"], "'bogus' is not one of"),
    (["nosuchcmd"], "No such command"),
    (["people", "--limit", "0"], "'--limit'"),
])
def test_usage_errors_are_one_line_with_exit_2_from_the_installed_command(tmp_path, args, fragment):
    """Typer printed usage errors as a boxed panel over several lines (newcomer check); the README promises one
    line on stderr. Through the real entry point (`facedb.cli:main`), as users run it."""
    db = tmp_path / "db"
    run(db, "init", "--model", "m", "--dim", "8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "facedb.cli", "--db", str(db), *args], env=env,
                          capture_output=True, text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], \
        proc.stderr
    with FaceDB.open(db) as d:
        assert d.stats().people == 0 and d.settings().rule.kind == "fixed"
    ok = subprocess.run([sys.executable, "-m", "facedb.cli", "--db", str(db), "stats"], env=env,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "model_id" in ok.stdout
