"""Clustering through the database and the CLI: `facedb cluster` on a folder, unknown visitors (kept only when
enabled, expiring, enrolled or forgotten atomically, erased after vacuum, SIGKILL during enrol), and
`facedb check --duplicates`. Photos are synthetic colour tiles read by the test-double detector and embedder
(tests/conftest.py); the real-face test uses LFW."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facedb import FaceDB, InvalidInputError, ModelMismatchError
from facedb.gallery import livefiles
from facedb.testing.soak import run_visitor_enroll_drill

from . import conftest
from .conftest import FakeEmbedder, face_image, unit_rows
from .test_cli import jlines, photo, run

RED, GREEN, BLUE = (200, 40, 40), (40, 200, 40), (40, 40, 200)


@pytest.fixture
def fake_cli(monkeypatch, fake_pipeline):
    """CLI wired to the test-double face pipeline (colour tiles as faces)."""
    import facedb.faces.pipeline

    monkeypatch.setattr(facedb.faces.pipeline, "get_pipeline", lambda *a, **k: fake_pipeline)
    return fake_pipeline


def init(db: Path, threshold: float = 0.8) -> None:
    run(db, "init", "--model", FakeEmbedder.model_id, "--dim", str(FakeEmbedder.dim), "--threshold", str(threshold))


def counts(db: Path) -> tuple[int, int, int]:
    with FaceDB.open(db, readonly=True) as d:
        s = d.stats()
        return s.people, s.templates, s.generation


def event_folder(root: Path) -> Path:
    """Event photos: red in 4 photos, green in 3, blue once; one group photo; one broken file; one without faces."""
    folder = root / "event"
    (folder / "day2").mkdir(parents=True)
    photo(folder / "a.png", [RED], seed=1)
    photo(folder / "b.png", [RED, GREEN], seed=2)  # a group photo: two faces
    photo(folder / "c.png", [GREEN], seed=3)
    photo(folder / "day2" / "d.png", [RED], seed=4)
    photo(folder / "day2" / "e.png", [GREEN, BLUE], seed=5)
    photo(folder / "day2" / "f.jpg", [RED], seed=6)
    photo(folder / "empty.png", [])
    (folder / "broken.jpg").write_bytes(b"not a photo")
    (folder / "notes.txt").write_text("not a photo either")
    return folder


def test_cluster_a_folder_writes_json_and_sheets_and_leaves_the_gallery_alone(tmp_path, fake_cli):
    db = tmp_path / "db"
    init(db)
    before = counts(db)
    folder = event_folder(tmp_path)
    out, html, png = tmp_path / "clusters.json", tmp_path / "sheet.html", tmp_path / "sheet.png"
    rows = jlines(run(db, "--json", "cluster", "--folder", str(folder), "--out", str(out), "--sheet", str(html)))
    summary = rows[-1]
    assert summary["photos"] == 8 and summary["faces"] == 8 and summary["clusters"] == 2
    assert summary["unclustered"] == 1 and summary["rule"] == "average"
    assert summary["threshold"] == pytest.approx(0.806)  # derived from the database's threshold, and stated
    assert "0.8000" in summary["threshold_source"]
    assert {Path(s["image"]).name for s in summary["skipped"]} == {"empty.png", "broken.jpg"}
    assert [r["size"] for r in rows[:-1]] == [4, 3]

    report = json.loads(out.read_text())
    by_colour = {}
    for c in report["clusters"]:
        assert c["central"] == c["faces"][0] and c["size"] == len(c["faces"])
        for f in c["faces"]:
            assert f["cluster"] == c["id"] and len(f["box"]) == 4 and f["image_sha256"]
            by_colour.setdefault(c["id"], set()).add(Path(f["photo"]).name)
    assert by_colour == {0: {"a.png", "b.png", "d.png", "f.jpg"}, 1: {"b.png", "c.png", "e.png"}}
    assert [Path(f["photo"]).name for f in report["unclustered"]] == ["e.png"]  # blue, seen once

    text = html.read_text()
    assert len(re.findall(r'<img[^>]+src="data:image/jpeg;base64,', text)) == 8  # 4 + 3 + 1 unclustered
    assert not re.search(r'(src|href)="(?!data:)', text)  # nothing to fetch: every image is embedded
    first = re.search(r'src="data:image/jpeg;base64,([^"]+)"', text).group(1)
    assert Image.open(io.BytesIO(base64.b64decode(first))).size == (96, 96)

    run(db, "cluster", "--folder", str(folder), "--sheet", str(png), "--rule", "chinese-whispers")
    assert Image.open(png).format == "PNG"
    assert counts(db) == before  # no --enroll-as-new: nothing stored


def test_cluster_enroll_as_new_creates_numbered_people_in_one_go(tmp_path, fake_cli):
    db = tmp_path / "db"
    init(db)
    folder = event_folder(tmp_path)
    lines = run(db, "cluster", "--folder", str(folder), "--enroll-as-new").stdout
    assert "enrolled as cluster-0001" in lines and "enrolled as cluster-0002" in lines
    with FaceDB.open(db) as d:
        people = {p.name: p.templates for p in d.people()}
        assert people == {"cluster-0001": 4, "cluster-0002": 3}
        # the group photo b.png holds a face of each: its image row belongs to the first cluster only
        owners = {t.person: t.image_sha256 for t in d.templates() if t.box and t.image_sha256}
        assert len(d.store.conn.execute("SELECT * FROM images").fetchall()) == 6
        assert owners and d.check().ok
        d.rename_person("cluster-0001", "Ruby")
        probe = face_image([RED], seed=99)
        assert d.search(probe)[0].identity == "Ruby"
    # a second run numbers on after the highest cluster-N
    run(db, "cluster", str(folder / "c.png"), str(folder / "b.png"), "--enroll-as-new")
    with FaceDB.open(db, readonly=True) as d:
        assert "cluster-0003" in {p.name for p in d.people()}


@pytest.mark.parametrize("args, message", [
    (["--sheet", "x.pdf"], ".html or .png"),
    (["--threshold", "1.5"], "[-1, 1]"),
    (["--out", "no/such/dir/x.json"], "does not exist"),
    (["--out", "."], "is a folder"),
    (["--sheet", "/proc/version.png"], "cannot write"),
])
def test_cluster_bad_input_is_one_line_and_changes_nothing(tmp_path, fake_cli, args, message):
    db = tmp_path / "db"
    init(db)
    folder = event_folder(tmp_path)
    before = counts(db)
    res = run(db, "--quiet", "cluster", "--folder", str(folder), "--enroll-as-new", *args, ok=False)
    assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1
    assert counts(db) == before
    res = run(db, "cluster", "--folder", str(tmp_path / "missing"), ok=False)
    assert res.exit_code == 2 and "not a folder" in res.output


def test_cluster_api_accepts_arrays(tmp_path, fake_pipeline):
    with FaceDB.create(tmp_path / "db", model_id=FakeEmbedder.model_id, dim=FakeEmbedder.dim, threshold=0.8,
                       flip=False) as db:
        photos = [face_image([RED], seed=i) for i in range(3)] + [face_image([GREEN, BLUE], seed=9)]
        report = db.cluster(photos, model=fake_pipeline, min_size=1)
        assert [c.size for c in report.clusters] == [3, 1, 1] and report.faces == 5
        assert report.to_dict()["clusters"][0]["size"] == 3 and "vectors" not in report.to_dict()
        with pytest.raises(InvalidInputError):
            db.cluster(photos, model=fake_pipeline, rule="kmeans")
    with FaceDB.create(tmp_path / "other", model_id="other", dim=16, threshold=0.8) as other:
        with pytest.raises(ModelMismatchError):  # a report made with another model is not stored
            other.enroll_clusters(report)
        assert other.stats().people == 0


# ------------------------------------------------------------------------------------------------ visitors
def visitor_db(tmp_path: Path, fake_cli) -> Path:
    db = tmp_path / "db"
    init(db)
    folder = tmp_path / "staff" / "red"
    folder.mkdir(parents=True)
    photo(folder / "0.png", [RED], seed=0)
    run(db, "enroll", "--folder", str(tmp_path / "staff"))
    return db


def door(tmp_path: Path, db: Path, colours: list, seed: int) -> Path:
    return photo(tmp_path / f"door-{seed}.png", colours, seed=seed)


def test_unknown_faces_are_kept_only_when_enabled(tmp_path, fake_cli):
    db = visitor_db(tmp_path, fake_cli)
    run(db, "search", str(door(tmp_path, db, [GREEN], 1)))
    with FaceDB.open(db) as d:
        assert d.visitors(min_size=1) == [] and not d.settings().visitors.enabled
    assert jlines(run(db, "--json", "visitors", "settings", "--enable", "--retention-days", "7"))[0] == {
        "enabled": True, "retention_days": 7.0}
    for seed in range(2, 6):
        run(db, "search", str(door(tmp_path, db, [GREEN, RED], seed)))  # green unknown, red known
    run(db, "search", str(door(tmp_path, db, [BLUE], 9)))
    groups = jlines(run(db, "--json", "visitors", "--since", "1h"))
    assert len(groups) == 1 and groups[0]["faces"] == 4 and groups[0]["photos"] == 4
    assert groups[0]["actors"] and groups[0]["first_seen"] <= groups[0]["last_seen"]
    assert groups[0]["best_similarity"] < 0.8 and re.fullmatch(r"V\d+-[0-9a-f]{6}", groups[0]["id"])
    assert len(jlines(run(db, "--json", "visitors", "list", "--min-size", "1"))) == 2  # blue, seen once
    with FaceDB.open(db) as d:  # only unknown faces, with photo hash and box
        rows, vectors = d.store.unassigned(30)
        assert len(rows) == 5 and all(r[3] and r[4] for r in rows) and vectors.shape == (5, FakeEmbedder.dim)
    run(db, "visitors", "settings", "--disable")
    run(db, "search", str(door(tmp_path, db, [GREEN], 20)))
    with FaceDB.open(db) as d:
        assert len(d.store.unassigned(30)[0]) == 5
    # a door reader opens read-only: its unknown faces are kept too
    run(db, "visitors", "settings", "--enable")
    with FaceDB.open(db, readonly=True) as d:
        d.identify(unit_rows(np.random.default_rng(0), 1, FakeEmbedder.dim)[0])
    with FaceDB.open(db) as d:
        assert len(d.store.unassigned(30)[0]) == 6
    res = run(db, "visitors", "settings", "--retention-days", "0", ok=False)
    assert res.exit_code == 2


def test_enroll_a_visitor_group_then_they_are_recognised(tmp_path, fake_cli):
    db = visitor_db(tmp_path, fake_cli)
    run(db, "visitors", "settings", "--enable")
    for seed in range(3):
        run(db, "search", str(door(tmp_path, db, [GREEN], seed)))
    group = jlines(run(db, "--json", "visitors"))[0]["id"]
    before = counts(db)
    out = jlines(run(db, "--json", "visitors", "enroll", group, "--name", "Gwen"))[0]
    assert out == {"enrolled": "Gwen", "group": group, "templates": 3}
    people, templates, generation = counts(db)
    assert (people, templates) == (before[0] + 1, before[1] + 3) and generation > before[2]
    with FaceDB.open(db) as d:
        assert d.visitors(min_size=1) == [] and d.check().ok
        assert {t.image_sha256 for t in d.templates("Gwen")} == {
            hashlib.sha256((tmp_path / f"door-{s}.png").read_bytes()).hexdigest() for s in range(3)}
    assert jlines(run(db, "--json", "search", str(door(tmp_path, db, [GREEN], 50))))[0]["identity"] == "Gwen"
    # the group is gone: enrolling it again is refused and changes nothing
    res = run(db, "visitors", "enroll", group, "--name", "Gwen", ok=False)
    assert res.exit_code == 2 and "list the groups again" in res.output
    assert counts(db)[:2] == (before[0] + 1, before[1] + 3)
    # an existing person can receive a group too
    run(db, "search", str(door(tmp_path, db, [BLUE], 60)))
    run(db, "search", str(door(tmp_path, db, [BLUE], 61)))
    blue = jlines(run(db, "--json", "visitors"))[0]["id"]
    run(db, "visitors", "enroll", blue, "--name", "red")
    with FaceDB.open(db, readonly=True) as d:
        assert d.person("red").templates == 3


def test_a_group_that_changed_since_listing_is_refused(tmp_path, fake_cli):
    db = visitor_db(tmp_path, fake_cli)
    run(db, "visitors", "settings", "--enable")
    for seed in range(2):
        run(db, "search", str(door(tmp_path, db, [GREEN], seed)))
    listed = jlines(run(db, "--json", "visitors"))[0]["id"]
    run(db, "search", str(door(tmp_path, db, [GREEN], 7)))  # the same visitor again, after the listing
    before = counts(db)
    res = run(db, "visitors", "enroll", listed, "--name", "Gwen", ok=False)
    assert res.exit_code == 2 and "is now in group" in res.output
    assert counts(db) == before
    res = run(db, "visitors", "forget", "nonsense", ok=False)
    assert res.exit_code == 2 and "V17-3fa2c1" in res.output
    now = jlines(run(db, "--json", "visitors"))[0]
    assert now["faces"] == 3 and now["id"] != listed and now["id"].split("-")[0] == listed.split("-")[0]


def test_visitors_expire_and_forget_leaves_no_bytes_after_vacuum(tmp_path, fake_cli):
    db = visitor_db(tmp_path, fake_cli)
    run(db, "visitors", "settings", "--enable")
    run(db, "audit-settings", "--store-probes")  # the audit trail keeps probe vectors too: forget scrubs them
    for seed in range(3):
        run(db, "search", str(door(tmp_path, db, [GREEN], seed)))
    for seed in range(3, 5):
        run(db, "search", str(door(tmp_path, db, [BLUE], seed)))
    with FaceDB.open(db) as d:
        rows, vectors = d.store.unassigned(30)
        blobs = {r[0]: np.asarray(v, dtype="<f4").tobytes() for r, v in zip(rows, vectors)}
        old = [r[0] for r in rows[3:]]  # the blue ones: make them 40 days old
        d.store.conn.execute(f"UPDATE unassigned_faces SET time = '2000-01-01T00:00:00.000+00:00' WHERE id IN "
                             f"({','.join(map(str, old))})")
        assert [g.faces for g in d.visitors(min_size=1)] == [3]  # expired: not listed (and purged)

    def files_hold(blob: bytes) -> bool:
        return any(blob in livefiles.read_all(f) for f in db.iterdir() if f.is_file())

    green = jlines(run(db, "--json", "visitors"))[0]["id"]
    assert all(files_hold(blobs[i]) for i in blobs if i not in old)  # the scan finds what is there
    out = jlines(run(db, "--json", "visitors", "forget", green))[0]
    assert out == {"forgotten": green, "faces": 3}
    run(db, "vacuum")
    assert not any(files_hold(b) for i, b in blobs.items() if i not in old)
    with FaceDB.open(db) as d:
        # the expired faces left unassigned_faces; the audit trail, told to store probes, keeps its own copy of
        # every probe for its own retention (docs/clustering.md)
        assert d.store.conn.execute("SELECT COUNT(*) FROM unassigned_faces").fetchone()[0] == 0
        assert d.visitors(min_size=1) == [] and d.check().ok and d.person("red").templates == 1
        assert [r.operation for r in d.audit(operation="forget-visitors")] == ["forget-visitors"]


@pytest.mark.slow
def test_sigkill_during_visitors_enroll_leaves_the_old_or_the_new_state():
    r = run_visitor_enroll_drill(kills=8, seed=2)
    assert r["failures"] == 0, r["failure_samples"]
    assert r["old_state"] + r["new_state"] == 8 and r["new_state"] >= 1 and r["old_state"] >= 1, r


# --------------------------------------------------------------------------------------------- duplicates
def test_check_duplicates_reports_and_changes_nothing(tmp_path):
    rng = np.random.default_rng(3)
    dim = 32
    db = tmp_path / "db"

    def person(centre: np.ndarray, n: int) -> np.ndarray:
        x = centre + 0.06 * rng.standard_normal((n, dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    centres = unit_rows(rng, 6, dim)
    with FaceDB.create(db, model_id="m", dim=dim, threshold=0.8) as d:
        d.add_templates("Ada King", person(centres[0], 3), create=True)
        d.add_templates("Ada Lovelace", person(centres[0], 2), create=True)  # the same person, twice
        d.add_templates("Bob", np.concatenate([person(centres[1], 3), person(centres[2], 2)]), create=True)
        d.add_templates("Cy", np.concatenate([person(centres[3], 3), person(centres[4], 1)]), create=True)
        d.add_templates("Dee", person(centres[5], 4), create=True)
    before = counts(db)
    res = run(db, "--json", "check", "--duplicates", ok=False)
    assert res.exit_code == 1
    report = jlines(res)[0]
    assert [(p["a"], p["b"]) for p in report["same_person"]] == [("Ada King", "Ada Lovelace")]
    assert report["same_person"][0]["mean_similarity"] >= 0.8
    assert [(s["name"], s["groups"]) for s in report["split"]] == [("Bob", [3, 2])]
    assert [o["name"] for o in report["outliers"]] == ["Cy"]
    assert "Nothing was changed" in run(db, "check", "--duplicates", ok=False).stdout
    assert counts(db) == before
    run(db, "merge", "Ada Lovelace", "Ada King")
    with FaceDB.open(db) as d:
        d.remove_person("Bob")
        d.remove_person("Cy")
    assert run(db, "check", "--duplicates").exit_code == 0
    assert run(db, "check", "--threshold", "0.9", ok=False).exit_code == 2


# -------------------------------------------------------------------------------------------- real faces
@pytest.mark.realdata
@pytest.mark.slow
def test_a_small_lfw_subset_through_facedb_cluster(tmp_path):
    """12 people x 4 photos + 12 people seen once, through `facedb cluster` with dlib: pairwise F >= 0.85 (the
    floor stated in docs/clustering.md; all of LFW is in scripts/bench_cluster.py)."""
    pytest.importorskip("dlib")
    lfw = conftest.test_data_dir() / "lfw_deepfunneled"
    if not lfw.is_dir():
        pytest.skip(f"LFW not found at {lfw} (set FACEDB_TEST_DATA)")
    from facedb.evaluate.clustering import pairwise_prf

    people = sorted(p for p in lfw.iterdir() if p.is_dir())
    many = [p for p in people if len(list(p.iterdir())) >= 4][:12]
    once = [p for p in people if len(list(p.iterdir())) == 1][:12]
    folder = tmp_path / "photos"
    folder.mkdir()
    truth = {}
    for p in many + once:
        for f in sorted(p.iterdir())[:4]:
            (folder / f.name).symlink_to(f)
            truth[f.name] = p.name
    db = tmp_path / "db"
    run(db, "init", "--model", "dlib-resnet")
    out = tmp_path / "c.json"
    run(db, "--quiet", "cluster", "--folder", str(folder), "--out", str(out), "--workers", "0")
    report = json.loads(out.read_text())
    # LFW photos can show other people too: score the face nearest each photo's centre (the labelled one)
    central: dict[str, tuple[float, int]] = {}
    faces = [(f, c["id"]) for c in report["clusters"] for f in c["faces"]] + [(f, -1) for f in report["unclustered"]]
    for f, cid in faces:
        x1, y1, x2, y2 = f["box"]
        off = ((x1 + x2) / 2 - 125) ** 2 + ((y1 + y2) / 2 - 125) ** 2
        name = Path(f["photo"]).name
        if name not in central or off < central[name][0]:
            central[name] = (off, cid)
    names = sorted(central)
    assert len(names) >= len(truth) - 1
    score = pairwise_prf([truth[n] for n in names], [central[n][1] for n in names])
    assert score["f"] >= 0.85, score


def test_a_database_from_the_previous_release_gains_the_visitors_table(tmp_path, rng):
    import os
    import shutil

    root = tmp_path / "db"
    shutil.copytree(Path(__file__).parent / "data" / "v2-db", root)
    os.chmod(root, 0o700)
    with FaceDB.open(root, readonly=True) as d:  # not migrated: nothing to keep faces in, and no error
        assert d.visitors(min_size=1) == []
    with FaceDB.open(root) as d:
        assert not d.settings().visitors.enabled
        d.configure_visitors(enabled=True)
        far = np.zeros(8, dtype=np.float32)
        far[7] = 1.0
        assert d.identify(far, threshold=0.99).identity is None
        assert [g.faces for g in d.visitors(min_size=1)] == [1] and d.check().ok
