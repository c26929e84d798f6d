"""The service on real photos: a dlib-resnet database (the model loads offline) started the way `facedb serve`
starts it (the worker loads the database's own model and warms the detector), LFW photos uploaded over HTTP.
Skipped where the photos or dlib are absent."""

from __future__ import annotations

import warnings

import pytest

from facedb import FaceDB

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from facedb.service.app import create_app
from facedb.service.config import ServiceSettings

from .servicekit import make_db, wait_ready

pytestmark = pytest.mark.realdata


def test_enrol_identify_verify_detect_real_lfw_photos(tmp_path, facedata):
    pytest.importorskip("dlib")
    pytest.importorskip("facenet_pytorch")
    lfw = facedata / "lfw_deepfunneled"

    def photo(person, n):
        path = lfw / person / f"{person}_{n:04d}.jpg"
        return (path.name, path.read_bytes(), "image/jpeg")

    db = tmp_path / "db"
    keys = make_db(db, model_id="dlib-resnet", dim=128, threshold=0.929)
    with FaceDB.open(db) as d:  # a door key told candidates (docs/service.md, "Threat model"); the plain one below
        granted = d.create_api_key("identify", "door-full", ["candidates"])[1]
    app = create_app(ServiceSettings(db=db), sender=lambda *a: 200)
    with TestClient(app) as client:
        wait_ready(client, timeout=120)
        assert client.get("/ready").json()["model_loaded"] is True
        enroll, ident = {"X-API-Key": keys["enroll"]}, {"X-API-Key": granted}
        for person in ("George_W_Bush", "Colin_Powell"):
            r = client.post(f"/v1/people/{person}/templates", headers=enroll,
                            files=[("photos", photo(person, 1)), ("photos", photo(person, 2))])
            assert r.status_code == 201 and r.json()["faces_stored"] == 2, r.text
        r = client.post("/v1/identify", files={"photo": photo("George_W_Bush", 3)}, headers=ident)
        faces = r.json()["faces"]
        assert len(faces) == 1 and faces[0]["identity"] == "George_W_Bush"
        assert faces[0]["similarity"] >= 0.929 and faces[0]["candidates"][1]["name"] == "Colin_Powell"
        door = client.post("/v1/identify", files={"photo": photo("George_W_Bush", 3)},
                           headers={"X-API-Key": keys["identify"]}).json()["faces"]
        assert [(f["identity"], f["confidence"] in ("low", "medium", "high"), "candidates" in f) for f in door] == [
            ("George_W_Bush", True, False)]
        stranger = client.post("/v1/identify", files={"photo": photo("Tony_Blair", 1)}, headers=ident).json()
        assert stranger["faces"][0]["identity"] is None
        no = client.post("/v1/verify", files={"photo": photo("Colin_Powell", 3)}, data={"person": "George_W_Bush"},
                         headers=ident).json()
        yes = client.post("/v1/verify", files={"photo": photo("Colin_Powell", 3)}, data={"person": "Colin_Powell"},
                          headers=ident).json()
        assert no["accepted"] is False and yes["accepted"] is True and yes["similarity"] > no["similarity"]
        found = client.post("/v1/detect", files={"photo": photo("Tony_Blair", 1)}, headers=ident).json()["faces"]
        assert len(found) == 1 and found[0]["det_score"] > 0.95 and len(found[0]["landmarks"]) == 5
    with FaceDB.open(db, readonly=True) as d:
        assert {p.name: p.templates for p in d.people()} == {"George_W_Bush": 2, "Colin_Powell": 2}
        assert d.check().ok
