"""Field report (issue #12): each item's fault as a test that failed on the release before the fix (951977a),
with the sibling cases of the same kind. Test names carry the item number (``fr01`` = item 1).

These run on the deterministic test-double pipeline (colour tiles as faces, ``conftest.py``) or on vectors;
the same faults on real photos with MTCNN and dlib-resnet are in ``test_field_realfaces.py``, the README's
code blocks in ``test_readme.py``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

import facedb.pipeline
from facedb import FaceDB
from facedb.cli import app
from facedb.errors import ImageError, InvalidInputError

from .conftest import REPO, FakeDetector, FakeEmbedder, face_image, unit_rows

runner = CliRunner()

# Colours whose test-double identities differ (FakeEmbedder keys identity on colour // 32).
PALETTE = [(16 + 32 * (i % 8), 16 + 32 * ((i * 3) % 8), 16 + 32 * ((i * 5 + 2) % 8)) for i in range(16)]
RED, GREEN, BLUE = (208, 48, 48), (48, 208, 48), (48, 48, 208)


def cli(db, *args, code: int | None = 0):
    """Run ``facedb --db DB ARGS``; check the exit status unless ``code`` is None."""
    res = runner.invoke(app, ["--db", str(db), *[str(a) for a in args]])
    if code is not None:
        assert res.exit_code == code, f"exit {res.exit_code}\nstdout: {res.stdout}\nstderr: {res.stderr}"
    return res


def jlines(res):
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


def photo(path: Path, colours, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(face_image(list(colours), seed)).save(path)
    return path


def labelled(root: Path, people: int, photos: int, ext: str = "png", start: int = 0) -> Path:
    """root/<person i>/<j>.<ext>: ``people`` people (distinct colours) x ``photos`` photos each."""
    for i in range(start, start + people):
        for j in range(photos):
            photo(root / f"person{i:02d}" / f"{j}.{ext}", [PALETTE[i]], seed=100 * i + j)
    return root


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own evaluation cache (never the user's)."""
    monkeypatch.setenv("FACEDB_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def fake(monkeypatch, fake_pipeline):
    """The CLI and FaceDB wired to the test-double pipeline (colour tiles as faces)."""
    monkeypatch.setattr(facedb.pipeline, "get_pipeline", lambda *a, **k: fake_pipeline)
    return fake_pipeline


def fake_db(path: Path, threshold: float = 0.8, *extra) -> Path:
    cli(path, "init", "--model", FakeEmbedder.model_id, "--dim", FakeEmbedder.dim, "--threshold", threshold, *extra)
    return path


def audit_rows(db: Path) -> list[dict]:
    with FaceDB.open(db, readonly=True) as d:
        return [r.to_dict() for r in d.audit()]


def templates_of(db: Path, name: str | None = None) -> list[dict]:
    with FaceDB.open(db, readonly=True) as d:
        return [t.to_dict() for t in d.templates(name)]


# ------------------------------------------------------------------------------------------------ item 1
def test_fr01_calibrate_far_folder_stores_the_threshold(tmp_path, fake):
    """`facedb calibrate --far R --folder F` ran into a TypeError and stored nothing."""
    db = fake_db(tmp_path / "db")
    folder = labelled(tmp_path / "calib", 12, 3)
    before = audit_rows(db)
    rec = jlines(cli(db, "--json", "calibrate", "--far", "0.01", "--folder", folder))[0]
    assert rec["stored"] is True and rec["impostor_pairs"] == 594  # C(36,2) - 12 * C(3,2)
    with FaceDB.open(db) as d:
        s = d.stats()
        assert s.threshold == pytest.approx(rec["threshold"]) and s.threshold != 0.8
        assert s.threshold_source.startswith("calibrated: far 0.01")
        assert s.calibration["target"] == "far" and s.calibration["impostor_pairs"] == 594
        assert s.calibration["target_rate"] == 0.01
    after = audit_rows(db)
    assert [r["operation"] for r in after[len(before):]] == ["calibrate"]
    assert after[-1]["threshold"] == pytest.approx(rec["threshold"])
    # --dry-run measures and changes nothing
    dry = jlines(cli(db, "--json", "calibrate", "--far", "0.05", "--folder", folder, "--dry-run"))[0]
    assert dry["stored"] is False
    with FaceDB.open(db) as d:
        assert d.threshold == pytest.approx(rec["threshold"])


def test_fr01_calibrate_fpir_folder_stores_the_threshold(tmp_path, fake):
    db = fake_db(tmp_path / "db")
    folder = labelled(tmp_path / "calib", 12, 3)
    rec = jlines(cli(db, "--json", "calibrate", "--fpir", "0.1", "--folder", folder, "--gallery-size", 3))[0]
    assert rec["gallery_size"] == 3 and rec["impostor_probes"] == 27 and rec["strangers"] == 9
    with FaceDB.open(db) as d:
        s = d.stats()
        assert s.threshold == pytest.approx(rec["threshold"])
        assert s.calibration["target"] == "fpir" and s.calibration["gallery_size"] == 3
        assert s.threshold_source.startswith("calibrated: fpir 0.1")


def test_fr01_calibrate_far_pairs_stores_the_threshold(tmp_path, fake):
    db = fake_db(tmp_path / "db")
    lfw = tmp_path / "lfw"
    names = [f"P{i}" for i in range(8)]
    for i, name in enumerate(names):
        for j in (1, 2):
            photo(lfw / name / f"{name}_{j:04d}.jpg", [PALETTE[i]], seed=10 * i + j)
    same = [f"{n}\t1\t2" for n in names]
    diff = [f"{a}\t1\t{b}\t2" for x, a in enumerate(names) for b in names[x + 1:]][:25]
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(f"{len(diff)}\n" + "\n".join(same + diff) + "\n")
    rec = jlines(cli(db, "--json", "calibrate", "--far", "0.05", "--pairs", pairs, "--lfw", lfw))[0]
    assert rec["impostor_pairs"] == 25 and rec["genuine_pairs"] == 8 and rec["stored"] is True
    with FaceDB.open(db) as d:
        assert d.threshold == pytest.approx(rec["threshold"])
        assert d.settings().calibration.source == "LFW pairs.txt"


# ------------------------------------------------------------------------------------------------ item 2
def test_fr02_impostor_pairs_are_distinct_and_counted():
    from facedb.evaluate import impostor_pairs

    labels = np.repeat(np.arange(4), 3)  # 4 people x 3 photos
    a, b, total = impostor_pairs(labels, 2_000_000, np.random.default_rng(0))
    assert total == 54 and len(a) == 54
    pairs = {(int(x), int(y)) for x, y in zip(a, b)}
    assert len(pairs) == 54 and all(x < y and labels[x] != labels[y] for x, y in pairs)
    a, b, total = impostor_pairs(labels, 20, np.random.default_rng(0))  # fewer than exist: a sample
    assert total == 54 and len({(int(x), int(y)) for x, y in zip(a, b)}) == 20 == len(a)
    big = np.repeat(np.arange(100), 5)
    a, b, total = impostor_pairs(big, 1000, np.random.default_rng(1))
    assert total == 500 * 499 // 2 - 100 * 10 and len({(int(x), int(y)) for x, y in zip(a, b)}) == 1000
    assert np.all(big[a] != big[b])
    lopsided = np.array([0] * 10 + [1] * 3000)  # few, large groups: enumerated group by group
    a, b, total = impostor_pairs(lopsided, 100_000, np.random.default_rng(2))
    assert total == 30_000 and len({(int(x), int(y)) for x, y in zip(a, b)}) == 30_000


def test_fr02_calibrate_on_a_tiny_folder_refuses_what_it_cannot_resolve(tmp_path, fake):
    db = fake_db(tmp_path / "db")
    tiny = labelled(tmp_path / "tiny", 4, 3)
    res = cli(db, "calibrate", "--far", "1e-4", "--folder", tiny, "--dry-run", code=2)
    assert "54 distinct impostor pairs cannot resolve" in res.stderr and "Traceback" not in res.output
    ok = jlines(cli(db, "--json", "calibrate", "--far", "0.05", "--folder", tiny, "--dry-run"))[0]
    assert ok["impostor_pairs"] == 54 and ok["impostor_pairs_available"] == 54 and ok["genuine_pairs"] == 12
    # a folder with no more people than the gallery: a clear error, not an IndexError
    cli(db, "add-person", "a")
    for n in range(4):
        cli(db, "add-person", f"x{n}")
    res = cli(db, "calibrate", "--fpir", "0.01", "--folder", tiny, "--dry-run", code=2)
    assert "too few to simulate a gallery of 5" in res.stderr and "Traceback" not in res.output
    res = cli(db, "calibrate", "--fpir", "0.01", "--folder", tiny, "--gallery-size", "4", code=2)
    assert "no strangers" in res.stderr
    res = cli(db, "calibrate", "--fpir", "0.01", "--folder", tiny, "--gallery-size", "2", code=2)
    assert "6 distinct impostor probes" in res.stderr and "cannot resolve" in res.stderr
    with FaceDB.open(db) as d:
        assert d.threshold == 0.8 and d.settings().calibration is None  # nothing stored by any of them


def test_fr02_duplicate_pairs_in_a_pairs_file_count_once(tmp_path, fake):
    db = fake_db(tmp_path / "db")
    lfw = tmp_path / "lfw"
    for i, name in enumerate(["A", "B", "C"]):
        for j in (1, 2):
            photo(lfw / name / f"{name}_{j:04d}.jpg", [PALETTE[i]], seed=j)
    rows = ["A\t1\t2", "A\t1\tB\t1", "B\t1\tA\t1", "A\t1\tB\t1", "A\t1\tC\t1"] + ["C\t1\tB\t2"] * 30
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("3\n" + "\n".join(rows) + "\n")
    res = cli(db, "calibrate", "--far", "0.05", "--pairs", pairs, "--lfw", lfw, "--dry-run", code=2)
    assert "3 distinct impostor pairs cannot resolve" in res.stderr


def test_fr02_target_rates_are_checked_by_the_api_too(tmp_path, fake):
    from facedb.evaluate import calibrate_far_folder, calibrate_fpir_folder

    folder = labelled(tmp_path / "f", 12, 3)
    for bad in (0, 1, 5, -0.1, float("nan")):
        with pytest.raises(InvalidInputError, match="rate"):
            calibrate_far_folder(folder, fake, bad)
        with pytest.raises(InvalidInputError, match="rate"):
            calibrate_fpir_folder(folder, fake, bad, 3, tmp_path / "w")


# ------------------------------------------------------------------------------------------------ item 3
def test_fr03_a_readonly_facedb_writes_its_decisions_to_the_audit_trail(tmp_path, fake):
    root = tmp_path / "db"
    red = photo(tmp_path / "red.png", [RED])
    with FaceDB.create(root, model_id=FakeEmbedder.model_id, dim=FakeEmbedder.dim, threshold=0.8) as d:
        d.enroll("red", [red])
    probe = photo(tmp_path / "probe.png", [RED], seed=5)
    n = len(audit_rows(root))
    with FaceDB.open(root, readonly=True, actor="door:3") as d:
        assert d.search(probe)[0].identity == "red"
        assert d.verify(probe, "red").accepted
        d.identify(d.store.person_vectors([d.person("red").id])[1][0])
        with pytest.raises(Exception, match="read-only"):
            d.add_person("x")
    rows = audit_rows(root)[n:]
    assert [(r["operation"], r["identity"], r["actor"]) for r in rows] == [
        ("search", "red", "door:3"), ("verify", "red", "door:3"), ("identify", "red", "door:3")]


def test_fr03_every_change_to_the_gallery_is_audited(tmp_path):
    """The same guarantee on the other paths that change the gallery or the trail itself."""
    v = np.eye(8, dtype=np.float32)
    with FaceDB.create(tmp_path / "db", model_id="m", dim=8, threshold=0.5, actor="op") as d:
        d.add_templates("Ann", v[:2], create=True)
        d.add_templates_many([("Bob", v[2:3]), ("Cy", v[3:5])])
        d.reindex("flat16")
        d.configure_audit(retention_days=30)
        d.configure_audit(enabled=False)
        d.identify(v[0])  # not recorded: the trail is off
        d.configure_audit(enabled=True)
        ops = [(r.operation, r.identity, (r.detail or {}).get("templates")) for r in d.audit()]
    assert ops == [
        ("add-templates", "Ann", 2), ("add-templates", "Bob", 1), ("add-templates", "Cy", 2),
        ("reindex", None, None), ("audit-settings", None, None), ("audit-settings", None, None),
        ("audit-settings", None, None)]
    with FaceDB.open(tmp_path / "db") as d:
        details = [r.detail for r in d.audit(operation="audit-settings")]
    assert details[1] == {"enabled": False} and details[2] == {"enabled": True}


# ------------------------------------------------------------------------------------------------ item 4
NFC = "José Martí"
NFD = unicodedata.normalize("NFD", NFC)


def test_fr04_names_are_compared_as_people_read_them_api(tmp_path, fake):
    assert NFC != NFD
    red = photo(tmp_path / "red1.png", [RED], seed=1)
    with FaceDB.create(tmp_path / "db", model_id=FakeEmbedder.model_id, dim=FakeEmbedder.dim, threshold=0.8) as d:
        d.enroll(NFD, [red])
        d.enroll(NFC, [photo(tmp_path / "red2.png", [RED], seed=2)])
        assert [(p.name, p.templates) for p in d.people()] == [(NFC, 2)]
        assert d.person(NFD).name == NFC and d.count_people(NFD) == 1
        assert [p.name for p in d.people(unicodedata.normalize("NFD", "José"))] == [NFC]
        assert d.verify(photo(tmp_path / "p.png", [RED], seed=3), NFD).accepted
        assert len(list(d.templates(NFD))) == 2
        d.update_person(NFD, metadata={"badge": "1"})
        assert d.rename_person(NFD, NFC).name == NFC  # the same name in the other form: not a duplicate
        d.add_person("Zoë")
        d.merge_people(unicodedata.normalize("NFD", "Zoë"), NFD)
        assert d.remove_person(NFD) == 2
        assert d.people() == []
        assert d.search(photo(tmp_path / "q.png", [RED], seed=4))[0].identity is None
        records = {r.operation: r for r in d.audit()}
    # the trail holds one spelling of a name, whichever was typed
    assert records["remove"].identity == NFC and records["rename"].detail == {"from": NFC}
    assert records["merge"].identity == NFC and records["merge"].detail["from"] == "Zoë"


def test_fr04_erasure_by_name_from_the_cli_reaches_a_folder_enrolled_from_a_mac(tmp_path, fake):
    db = fake_db(tmp_path / "db")
    folder = tmp_path / "staff"
    photo(folder / NFD / "1.png", [RED], seed=1)  # a macOS folder name: decomposed
    photo(folder / "Ann" / "1.png", [BLUE], seed=1)
    meta = tmp_path / "staff.csv"
    meta.write_text(f"name,badge\n{NFC},117\nAnn,118\n", encoding="utf-8")
    cli(db, "enroll", "--folder", folder, "--people-meta", meta)
    assert jlines(cli(db, "--json", "show", NFC))[0]["metadata"] == {"badge": "117"}
    probe = photo(tmp_path / "probe.png", [RED], seed=9)
    assert jlines(cli(db, "--json", "search", probe))[0]["identity"] == NFC
    assert jlines(cli(db, "--json", "remove", NFC))[0] == {"removed": NFC, "templates": 1}
    assert [p["name"] for p in jlines(cli(db, "--json", "people"))] == ["Ann"]
    assert jlines(cli(db, "--json", "search", probe))[0]["identity"] is None


def test_fr04_labelled_folders_and_people_files_agree_on_names(tmp_path):
    from facedb.evaluate import labelled_folder, read_people

    photo(tmp_path / "f" / NFD / "1.png", [RED])
    photo(tmp_path / "f" / "Ann" / "1.png", [BLUE])
    people_file = tmp_path / "people.txt"
    people_file.write_text(f"1\n{NFC.replace(' ', '_')}\t1\n", encoding="utf-8")
    wanted = {n.replace("_", " ") for n in read_people(people_file)}
    paths, labels = labelled_folder(tmp_path / "f", wanted)
    assert labels == [NFC] and len(paths) == 1


def test_fr04_names_already_stored_in_two_forms_are_reported(tmp_path):
    with FaceDB.create(tmp_path / "db", model_id="m", dim=4, threshold=0.5) as d:
        d.add_person(NFC)
        # a database written by an older release could hold both spellings
        d.store.conn.execute("INSERT INTO people (name, metadata, created_at, updated_at) VALUES (?, '{}', '', '')",
                             (NFD,))
        report = d.check()
    assert not report.ok and any("different Unicode forms" in p for p in report.problems)


# ------------------------------------------------------------------------------------------------ item 5
# What ImageOps.exif_transpose does for each EXIF Orientation, and its inverse (to store a picture "sideways").
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}
STORED = {**UPRIGHT, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def oriented_png(upright: np.ndarray, orientation: int) -> bytes:
    """A lossless file whose stored pixels, turned by its EXIF Orientation, are ``upright``."""
    im = Image.fromarray(upright)
    if orientation != 1:
        im = im.transpose(STORED[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "PNG", exif=exif)
    return buf.getvalue()


def every_form(data: bytes, path: Path) -> dict[str, object]:
    path.write_bytes(data)
    return {"path": path, "str path": str(path), "bytes": data, "bytearray": bytearray(data),
            "memoryview": memoryview(data), "file object": open(path, "rb"), "BytesIO": io.BytesIO(data),
            "PIL from path": Image.open(path), "PIL from bytes": Image.open(io.BytesIO(data)),
            "PIL loaded": _loaded(data), "PIL copy": _loaded(data).copy()}


def _loaded(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


@pytest.mark.parametrize("orientation", range(1, 9))
def test_fr05_every_photo_form_gives_the_same_pixels_for_every_orientation(tmp_path, orientation):
    from facedb.images import load_photo

    rng = np.random.default_rng(orientation)
    upright = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)  # not square: a turn changes the shape
    forms = every_form(oriented_png(upright, orientation), tmp_path / "p.png")
    forms["array (already upright)"] = upright
    for form, src in forms.items():
        got = load_photo(src).pixels
        assert got.shape == upright.shape and np.array_equal(got, upright), f"{form}, orientation {orientation}"
        if hasattr(src, "close"):
            src.close()


@pytest.mark.parametrize("orientation", [6, 8])
def test_fr05_search_by_pil_image_honours_exif(tmp_path, fake, orientation):
    """The reported instance on the test double: a photo stored sideways, searched as a PIL image."""
    upright = np.zeros((40, 120, 3), dtype=np.uint8)
    upright[:, :40] = face_image([RED], 1)
    upright[:, 80:] = face_image([BLUE], 2)  # turned sideways the tiles would no longer sit on the 40 px grid
    with FaceDB.create(tmp_path / "db", model_id=FakeEmbedder.model_id, dim=FakeEmbedder.dim, threshold=0.8) as d:
        d.enroll("red", [photo(tmp_path / "red.png", [RED], seed=5)])
        d.enroll("blue", [photo(tmp_path / "blue.png", [BLUE], seed=6)])
        forms = every_form(oriented_png(upright, orientation), tmp_path / "sideways.png")
        answers = {form: sorted(str(m.identity) for m in d.search(src)) for form, src in forms.items()}
    assert all(a == ["blue", "red"] for a in answers.values()), answers


# ------------------------------------------------------------------------------------------------ item 6
def _reference() -> np.ndarray:
    h, w = 32, 48
    ref = np.zeros((h, w, 3), np.uint8)
    ref[..., 0] = np.linspace(10, 245, w)[None, :].astype(np.uint8)
    ref[..., 1] = np.linspace(200, 30, h)[:, None].astype(np.uint8)
    ref[..., 2] = 120
    return ref


def _in_mode(mode: str) -> tuple[Image.Image, np.ndarray]:
    """The reference picture in ``mode``, and the RGB pixels it stands for."""
    ref = _reference()
    rgb = Image.fromarray(ref)
    grey = np.asarray(rgb.convert("L")).astype(np.float64)
    as_rgb = np.repeat(grey[..., None], 3, axis=2)
    h, w = grey.shape
    if mode == "F":
        return Image.fromarray((grey / 255).astype(np.float32), "F"), as_rgb  # [0, 1], the usual float convention
    if mode in ("I;16", "I;16L", "I;16N", "I;16B"):
        order = ">u2" if mode == "I;16B" else "<u2"
        return Image.frombytes(mode, (w, h), (grey * 257).astype(order).tobytes()), as_rgb
    if mode == "I":
        return Image.fromarray((grey * 257).astype(np.int32), "I"), as_rgb
    if mode in ("L", "LA"):
        return rgb.convert(mode), as_rgb
    if mode == "La":
        return rgb.convert("LA").convert("La"), as_rgb
    im = rgb.convert(mode)
    if mode in ("1", "P", "PA"):  # dithered / quantised: the picture is what the palette or bits hold
        return im, np.asarray(im.convert("RGB")).astype(np.float64)
    return im, ref.astype(np.float64)


@pytest.mark.parametrize("mode", sorted(getattr(Image, "MODES", ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr",
                                                                  "LAB", "HSV", "I", "F", "I;16"])))
def test_fr06_every_pillow_mode_is_converted_faithfully_or_refused(tmp_path, mode):
    from facedb.images import load_photo

    im, expected = _in_mode(mode)
    sources = {"PIL image": im}
    for fmt in ("TIFF", "PNG"):
        buf = io.BytesIO()
        try:
            im.save(buf, fmt)
        except (OSError, ValueError, KeyError):
            continue  # that format cannot hold this mode
        sources[fmt] = buf.getvalue()
    for form, src in sources.items():
        try:
            got = load_photo(src).pixels.astype(np.float64)
        except ImageError as exc:
            assert mode == "LAB" and "colour profile" in str(exc), f"{mode} {form} refused: {exc}"
            continue
        assert mode != "LAB", "CIELAB has no faithful RGB conversion without a profile: refuse it"
        err = float(np.abs(got - expected).mean())
        assert err < 3.0, f"{mode} {form}: mean error {err:.1f} levels"


def test_fr06_float_greyscale_tiff_in_0_1_is_not_black(tmp_path, fake):
    """The reported instance: a 32-bit float TIFF with values in [0, 1] answered 'no face'."""
    from facedb.images import load_photo

    grey = np.asarray(Image.fromarray(face_image([RED, BLUE], 3)).convert("L")).astype(np.float32) / 255
    path = tmp_path / "float.tif"
    Image.fromarray(grey, "F").save(path)
    px = load_photo(path).pixels
    assert abs(float(px.mean()) - float(grey.mean()) * 255) < 1.0
    with FaceDB.create(tmp_path / "db", model_id=FakeEmbedder.model_id, dim=FakeEmbedder.dim, threshold=0.8) as d:
        assert len(d.search(path)) == 2


@pytest.mark.parametrize("values, why", [
    (np.array([[0.0, 300.0], [2.0, 1.0]], np.float32), "outside"),
    (np.array([[-1.0, 0.5], [0.2, 0.1]], np.float32), "outside"),
    (np.array([[np.nan, 0.5], [0.2, 0.1]], np.float32), "NaN"),
])
def test_fr06_float_pixels_without_a_known_scale_are_refused(tmp_path, values, why):
    from facedb.images import load_photo

    path = tmp_path / "f.tif"
    Image.fromarray(np.tile(values, (20, 20)), "F").save(path)
    with pytest.raises(ImageError, match=why):
        load_photo(path)


# ------------------------------------------------------------------------------------------------ item 7
def test_fr07_in_frame_clips_boxes_and_landmarks_keeping_the_raw_box():
    from facedb.detect import in_frame

    lm = np.array([[-5.0, 10], [30, -2], [20, 20], [160, 40], [10, 300]])
    face = in_frame((-44.9, 53.4, 173.0, 291.1), 0.99, lm, 150, 250)
    assert face.box == (0.0, 53.4, 150.0, 250.0) and face.raw_box == (-44.9, 53.4, 173.0, 291.1)
    assert face.landmarks.min() >= 0 and face.landmarks[:, 0].max() <= 150 and face.landmarks[:, 1].max() <= 250
    assert face.align_box == face.raw_box


# ------------------------------------------------------------------------------------------------ item 8
BAD_THRESHOLDS = [60, -5, 1.0001, float("nan"), float("inf"), "0.5x", None]


@pytest.mark.parametrize("bad", BAD_THRESHOLDS[:-1])
def test_fr08_per_call_thresholds_are_validated_by_the_api(tmp_path, fake, bad):
    red = photo(tmp_path / "red.png", [RED])
    with FaceDB.create(tmp_path / "db", model_id=FakeEmbedder.model_id, dim=FakeEmbedder.dim, threshold=0.8) as d:
        d.enroll("red", [red])
        vec = d.store.person_vectors([d.person("red").id])[1][0]
        n = len(d.audit())
        for call in (lambda: d.identify(vec, threshold=bad), lambda: d.identify(vec[None], threshold=bad),
                     lambda: d.search(red, threshold=bad), lambda: d.verify(red, "red", bad),
                     lambda: d.verify(vec, "red", threshold=bad), lambda: d.set_threshold(bad, "x")):
            with pytest.raises(InvalidInputError, match="threshold"):
                call()
        assert len(d.audit()) == n and d.threshold == 0.8  # nothing answered, nothing recorded, nothing changed


@pytest.mark.parametrize("command", ["search", "verify"])
@pytest.mark.parametrize("bad", ["60", "-5", "nan", "inf"])
def test_fr08_per_call_thresholds_are_validated_by_the_cli(tmp_path, fake, command, bad):
    db = fake_db(tmp_path / "db")
    red = photo(tmp_path / "red.png", [RED])
    cli(db, "enroll", "red", red)
    n = len(audit_rows(db))
    args = [red] if command == "search" else ["red", red]
    res = cli(db, command, *args, "--threshold", bad, code=2)
    assert "threshold is a cosine similarity in [-1, 1]" in res.stderr
    assert len(audit_rows(db)) == n


def test_fr08_init_create_and_set_threshold_share_the_one_validation(tmp_path):
    res = cli(tmp_path / "a", "init", "--model", "m", "--dim", "4", "--threshold", "60", code=2)
    assert "threshold is a cosine similarity in [-1, 1]" in res.stderr
    assert not (tmp_path / "a" / "facedb.sqlite3").exists()
    with pytest.raises(InvalidInputError, match=r"threshold is a cosine similarity in \[-1, 1\]"):
        FaceDB.create(tmp_path / "b", model_id="m", dim=4, threshold=-5)


@pytest.mark.parametrize("call, match", [
    (lambda d, v: d.identify(v, k=0), "k must"),
    (lambda d, v: d.identify(v, k=True), "k must"),
    (lambda d, v: d.people(limit=-1), "limit"),
    (lambda d, v: d.people(offset=-1), "offset"),
    (lambda d, v: d.audit(limit=0), "limit"),
    (lambda d, v: d.audit(offset=-3), "offset"),
    (lambda d, v: d.configure_audit(retention_days=float("inf")), "retention"),
    (lambda d, v: d.configure_audit(retention_days=float("nan")), "retention"),
    (lambda d, v: d.configure_audit(retention_days=-1), "retention"),
    (lambda d, v: d.reindex("ivf", {"nprobe": 0}), "nprobe"),
    (lambda d, v: d.reindex("ivf", {"nlist": -4}), "nlist"),
    (lambda d, v: d.reindex("hnsw", {"M": 1}), "M"),
    (lambda d, v: d.reindex("ivf", {"nprobe": "lots"}), "nprobe"),
    (lambda d, v: d.reindex("ivf", {"bogus": 3}), "bogus"),
    (lambda d, v: d.enroll_many([("a", [])], batch_size=0), "batch_size"),
])
def test_fr08_other_parameters_are_validated_by_the_api_as_the_cli_does(tmp_path, call, match):
    v = np.eye(4, dtype=np.float32)
    with FaceDB.create(tmp_path / "db", model_id="m", dim=4, threshold=0.5) as d:
        d.add_templates("a", v[:2], create=True)
        before = d.settings()
        with pytest.raises(InvalidInputError, match=match):
            call(d, v[0])
        after = d.settings()
        assert (after.index_kind, after.index_params, after.audit) == (before.index_kind, before.index_params,
                                                                       before.audit)
        d.identify(v[0])  # the database still answers


def test_fr08_cli_refuses_an_infinite_retention(tmp_path):
    db = tmp_path / "db"
    cli(db, "init", "--model", "m", "--dim", "4")
    res = cli(db, "audit-settings", "--retention-days", "inf", code=2)
    assert "retention" in res.stderr
    assert jlines(cli(db, "--json", "audit-settings"))[0]["retention_days"] == 90.0
