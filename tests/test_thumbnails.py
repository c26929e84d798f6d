"""Face thumbnails (facedb/gallery/thumbnails.py): what each setting keeps, that they go with what they belong to
(removal, template removal, audit retention, forgotten visitors, enrolled visitors), that narrowing the setting
erases them from every file, and that older databases keep none until told. The test-double model: colour
tiles as faces."""

from __future__ import annotations

import io
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facedb import FaceDB
from facedb.errors import InvalidInputError
from facedb.gallery.thumbnails import SIZE, check_mode, dropped, encode, keeps

from .conftest import face_image

RED, GREEN, BLUE = (200, 40, 40), (40, 200, 40), (40, 40, 200)


def photo(colours, seed=0, name=None):
    buf = io.BytesIO()
    Image.fromarray(face_image(colours, seed)).save(buf, "PNG")
    buf.seek(0)
    buf.name = name or f"p{seed}.png"
    return buf


def new_db(tmp_path, **kw):
    return FaceDB.create(tmp_path / "db", model_id="fake-colour", dim=32, threshold=0.7, **kw)


def files_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def test_encode_is_a_small_square_jpeg_of_the_crop():
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 255, (150, 120, 3), dtype=np.uint8)
    jpeg = encode(crop)
    img = Image.open(io.BytesIO(jpeg))
    assert img.format == "JPEG" and img.size == (SIZE, SIZE) and len(jpeg) < 12_000
    assert not img.info.get("exif")
    with pytest.raises(InvalidInputError):
        encode(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(InvalidInputError):
        encode(crop, size=4)


def test_modes():
    assert [check_mode(m) for m in ("off", "enrolled", "all")] == ["off", "enrolled", "all"]
    with pytest.raises(InvalidInputError):
        check_mode("some")
    assert keeps("enrolled", "template") and not keeps("enrolled", "probe") and not keeps("off", "template")
    assert all(keeps("all", k) for k in ("template", "probe", "visitor"))
    assert dropped("all", "enrolled") == ["probe", "visitor"] and dropped("enrolled", "all") == []


def test_new_databases_keep_enrolled_faces_only(tmp_path, fake_pipeline):
    with new_db(tmp_path) as db:
        assert db.settings().thumbnails == "enrolled"
        report = db.enroll("Ann", [photo([RED], 1), photo([RED], 2)], model=fake_pipeline)
        for tid in report.template_ids:
            jpeg = db.thumbnail("template", tid)
            assert jpeg is not None and Image.open(io.BytesIO(jpeg)).size == (SIZE, SIZE)
        db.search(photo([RED, BLUE], 3), model=fake_pipeline)
        assert db.count_thumbnails() == {"template": 2, "probe": 0, "visitor": 0}
        assert not any(r.has_thumbnail for r in db.audit(operation="search"))
        db.add_templates("Vec", np.eye(32, dtype=np.float32)[:1], create=True)  # vectors given: no picture
        assert db.count_thumbnails()["template"] == 2
        assert db.cover_templates(["Ann", "Vec"]) == {"Ann": report.template_ids[0]}


def test_off_keeps_nothing_and_all_keeps_probes_and_visitors(tmp_path, fake_pipeline):
    with new_db(tmp_path, thumbnails="off") as db:
        db.enroll("Ann", [photo([RED], 1)], model=fake_pipeline)
        db.search(photo([RED], 2), model=fake_pipeline)
        assert db.count_thumbnails() == {"template": 0, "probe": 0, "visitor": 0}
        db.configure_thumbnails("all")
        db.configure_visitors(enabled=True)
        db.search(photo([RED, BLUE], 3), model=fake_pipeline)
        assert db.count_thumbnails() == {"template": 0, "probe": 2, "visitor": 1}
        records = db.audit(operation="search", newest_first=True)
        assert [r.has_thumbnail for r in records] == [True, True, False]
        assert db.thumbnail("probe", records[0].id) is not None


def test_thumbnails_go_with_their_owner(tmp_path, fake_pipeline):
    with new_db(tmp_path, thumbnails="all") as db:
        db.configure_visitors(enabled=True)
        ann = db.enroll("Ann", [photo([RED], 1), photo([RED], 2)], model=fake_pipeline).template_ids
        db.enroll("Bob", [photo([GREEN], 1)], model=fake_pipeline)
        db.search(photo([RED, GREEN], 3), model=fake_pipeline)  # one decision naming Ann, one Bob
        db.search(photo([BLUE], 4), model=fake_pipeline)
        db.search(photo([BLUE], 5), model=fake_pipeline)  # two unknown faces of one stranger
        assert db.count_thumbnails() == {"template": 3, "probe": 4, "visitor": 2}
        db.remove_template(ann[1])
        assert db.thumbnail("template", ann[1]) is None and db.count_thumbnails()["template"] == 2
        db.remove_person("Ann")  # her template's face, and the face of the decision that named her
        assert db.count_thumbnails() == {"template": 1, "probe": 3, "visitor": 2}
        named = {r.identity: r.has_thumbnail for r in db.audit(operation="search")}
        assert named["Ann"] is False and named["Bob"] is True
        group = db.visitors(min_size=2)[0]
        db.enroll_visitors(group.id, "Stranger")  # the faces become templates, their thumbnails move with them
        assert db.count_thumbnails() == {"template": 3, "probe": 3, "visitor": 0}
        assert db.cover_templates(["Stranger"])
        db.search(photo([BLUE, RED], 6), model=fake_pipeline)  # RED is unknown now (Ann removed)
        group = db.visitors(min_size=1)[0]
        db.forget_visitors(group.id)
        assert db.count_thumbnails()["visitor"] == 0
        assert db.check().ok


def test_audit_retention_takes_probe_thumbnails(tmp_path, fake_pipeline):
    with new_db(tmp_path, thumbnails="all") as db:
        db.search(photo([BLUE], 1), model=fake_pipeline)
        assert db.count_thumbnails()["probe"] == 1
        db.store.conn.execute("UPDATE audit SET time = '2000-01-01T00:00:00.000+00:00'")  # long ago
        db.search(photo([GREEN], 2), model=fake_pipeline)  # the append purges past the retention
        assert db.count_thumbnails()["probe"] == 1
        assert [r.has_thumbnail for r in db.audit()] == [True]


def test_narrowing_the_setting_erases_them_from_every_file(tmp_path, fake_pipeline):
    with new_db(tmp_path, thumbnails="all") as db:
        db.enroll("Ann", [photo([RED], 1)], model=fake_pipeline)
        db.search(photo([RED], 2), model=fake_pipeline)
        probe = db.audit(operation="search")[0].id
        probe_jpeg = db.thumbnail("probe", probe)
        template_jpeg = db.thumbnail("template", 1)
        assert probe_jpeg[200:264] in files_bytes(tmp_path / "db")
        db.configure_thumbnails("enrolled")
        assert db.count_thumbnails() == {"template": 1, "probe": 0, "visitor": 0}
        assert probe_jpeg[200:264] not in files_bytes(tmp_path / "db")
        assert template_jpeg[200:264] in files_bytes(tmp_path / "db")
        db.configure_thumbnails("off")
        assert template_jpeg[200:264] not in files_bytes(tmp_path / "db")
        assert [r.detail for r in db.audit(operation="thumbnails-settings")] == [
            {"from": "all", "to": "enrolled", "erased": 1}, {"from": "enrolled", "to": "off", "erased": 1}]
        with pytest.raises(InvalidInputError):
            db.configure_thumbnails("faces")
        assert db.settings().thumbnails == "off"


def test_removing_a_person_leaves_no_byte_of_their_thumbnails(tmp_path, fake_pipeline):
    with new_db(tmp_path) as db:
        tids = db.enroll("Ann", [photo([RED], 1), photo([RED], 2)], model=fake_pipeline).template_ids
        jpegs = [db.thumbnail("template", t) for t in tids]
        assert all(j[200:264] in files_bytes(tmp_path / "db") for j in jpegs)
        db.remove_person("Ann")
        data = files_bytes(tmp_path / "db")
        assert not any(j[200:264] in data for j in jpegs)


def test_an_older_database_keeps_none_until_told(tmp_path):
    root = tmp_path / "db"
    shutil.copytree(Path(__file__).parent / "data" / "v2-db", root)
    root.chmod(0o700)
    with FaceDB.open(root, readonly=True) as db:  # not migrated: no thumbnails table, nothing breaks
        assert db.settings().thumbnails == "off" and db.thumbnail("template", 1) is None
        assert db.cover_templates(["Ann"]) == {} and db.count_thumbnails()["template"] == 0
    with FaceDB.open(root) as db:
        assert db.settings().thumbnails == "off"
        db.configure_thumbnails("enrolled")
        assert db.settings().thumbnails == "enrolled"


def test_a_read_only_open_of_a_schema_5_database_lists_no_keys(tmp_path):
    """A database made before the service existed (schema 5: keys and webhooks came with 6), opened read-only,
    has no key table: it has no keys and no webhooks (found while adding thumbnails: the check said 5)."""
    with new_db(tmp_path):
        pass
    conn = sqlite3.connect(tmp_path / "db" / "facedb.sqlite3")
    conn.executescript("DROP TABLE thumbnails; DROP TABLE unassigned_faces; DROP TABLE webhooks; "
                       "DROP TABLE api_keys; PRAGMA user_version = 5;")
    conn.close()
    with FaceDB.open(tmp_path / "db", readonly=True) as db:
        assert db.store.version == 5
        assert db.api_keys() == [] and db.webhooks() == []


def test_cli_init_and_thumbnails_command(tmp_path, fake_pipeline):
    import json

    from typer.testing import CliRunner

    from facedb.cli import app

    runner = CliRunner()
    db = tmp_path / "db"
    r = runner.invoke(app, ["--db", str(db), "--json", "init", "--model", "myvec", "--dim", "32", "--thumbnails",
                            "all"])
    assert r.exit_code == 0, r.output and json.loads(r.stdout)["thumbnails"] == "all"
    with FaceDB.open(db) as d:
        d.search(photo([RED], 1), model=fake_pipeline.__class__(_Renamed(fake_pipeline.embedder, "myvec"),
                                                                 detector=fake_pipeline.detector))
        assert d.count_thumbnails()["probe"] == 1
    r = runner.invoke(app, ["--db", str(db), "--json", "thumbnails"])
    assert json.loads(r.stdout) == {"thumbnails": "all", "template": 0, "probe": 1, "visitor": 0}
    r = runner.invoke(app, ["--db", str(db), "--json", "thumbnails", "enrolled"])
    assert r.exit_code == 0 and json.loads(r.stdout)["probe"] == 0
    with FaceDB.open(db, readonly=True) as d:
        assert d.settings().thumbnails == "enrolled" and d.count_thumbnails()["probe"] == 0
    r = runner.invoke(app, ["--db", str(db), "thumbnails", "some"])
    assert r.exit_code == 2


class _Renamed:
    """The test-double embedder under another model id (the database's)."""

    def __init__(self, inner, model_id):
        self._inner, self.model_id = inner, model_id

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.fixture
def slow_writer(monkeypatch):
    """The background audit writer waits long enough that a test acts while decision records still wait."""
    from facedb.operations import audit

    monkeypatch.setattr(audit, "FLUSH_DELAY_S", 30.0)


def first_decision(db, fake_pipeline):
    """A trail's first decision is written before its answer (a trail that cannot be written refuses at once);
    the ones after it wait for the background writer."""
    db.search(photo([(120, 120, 120)], 99), model=fake_pipeline)
    assert not db.trail._pending


def test_a_waiting_decision_keeps_its_probe_thumbnail(tmp_path, fake_pipeline, slow_writer):
    # The background audit writer (branch speed) carries the thumbnail with the record it writes later.
    with new_db(tmp_path, thumbnails="all") as db:
        assert db.audit_settings().sync is False
        first_decision(db, fake_pipeline)
        db.search(photo([BLUE], 1), model=fake_pipeline)
        assert db.trail._pending  # not written yet
        assert db.count_thumbnails()["probe"] == 2
        assert [r.has_thumbnail for r in db.audit(operation="search")] == [True, True]


def test_removal_erases_the_thumbnails_of_decisions_still_waiting(tmp_path, fake_pipeline, slow_writer):
    # A decision naming Ann waits for the background writer when she is removed: its probe thumbnail must not
    # be written after the removal erased hers.
    with new_db(tmp_path, thumbnails="all") as db:
        db.enroll("Ann", [photo([RED], 1)], model=fake_pipeline)
        db.search(photo([RED], 2), model=fake_pipeline)
        assert db.trail._pending
        db.remove_person("Ann")
        assert db.count_thumbnails() == {"template": 0, "probe": 0, "visitor": 0}
        assert [(r.identity, r.has_thumbnail) for r in db.audit(operation="search")] == [("Ann", False)]


def test_narrowing_erases_the_thumbnails_of_decisions_still_waiting(tmp_path, fake_pipeline, slow_writer):
    with new_db(tmp_path, thumbnails="all") as db:
        first_decision(db, fake_pipeline)
        db.search(photo([BLUE], 1), model=fake_pipeline)
        assert db.trail._pending
        db.configure_thumbnails("enrolled")
        assert db.count_thumbnails()["probe"] == 0


def test_unknown_faces_are_kept_under_the_audit_writers_lock(tmp_path):
    """The audit trail's background writer and the unknown-visitor log share one connection: a visitor's face
    written inside the writer's open transaction took the audit row's id for its own, and its thumbnail failed
    its FOREIGN KEY (seen once in CI at a load of ~3). The log now waits for the writer's lock."""
    import threading

    with new_db(tmp_path) as db:
        db.configure_visitors(enabled=True)
        store = db.store
        v = np.zeros(32, dtype=np.float32)
        v[0] = 1.0
        row = {"vector": v, "similarity": 0.1, "thumbnail": _jpeg()}
        store._audit_lock.acquire()
        try:
            t = threading.Thread(target=store.append_unassigned, args=([row], 30.0))
            t.start()
            t.join(0.5)
            assert t.is_alive(), "the face was written while the audit writer held its transaction"
        finally:
            store._audit_lock.release()
        t.join(30)
        assert not t.is_alive()
        assert db.count_thumbnails()["visitor"] == 1


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()
