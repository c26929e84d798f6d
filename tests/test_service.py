"""The HTTP service through FastAPI's test client: every route, every scope, every error mapping, and the
database's state after each (the test-double model: colour tiles as faces)."""

from __future__ import annotations

import io
import threading
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from facedb import FaceDB
from facedb.faces.pipeline import FacePipeline

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from facedb.service.app import create_app
from facedb.service.config import ServiceSettings
from facedb.service.errors import STATUS
from facedb.service.state import ServiceState

from .conftest import FakeEmbedder
from .servicekit import BLUE, GREEN, GREY, RED, blank_png, make_db, png, snapshot, wait_ready


@pytest.fixture
def svc(tmp_path, fake_pipeline):
    """(client, keys, db path) for a service on a fresh database with the test-double model."""
    path = tmp_path / "db"
    keys = make_db(path)
    # allow_private_hooks: the tests register webhooks on 127.0.0.1 (the default refuses them: test_security.py)
    app = create_app(ServiceSettings(db=path, max_upload_mb=0.25, fold_window=0.0, allow_private_hooks=True),
                     model=fake_pipeline, sender=lambda url, body, headers: 200)
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client, keys, path


def hdr(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def enrol(client, key, name, *photos, **form):
    files = [("photos", (f"{name}-{i}.png", data, "image/png")) for i, data in enumerate(photos)]
    return client.post(f"/v1/people/{name}/templates", files=files, data=form, headers=hdr(key))


def assert_error(resp, status, error=None):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) >= {"error", "message", "status"} and body["status"] == status
    if error:
        assert body["error"] == error, body
    return body


# ------------------------------------------------------------------------------------------- health, ready
def test_health_ready_and_openapi(svc):
    client, _, _ = svc
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["ready"] is True
    spec = client.get("/openapi.json").json()
    paths = set(spec["paths"])
    assert {"/v1/identify", "/v1/identify/vector", "/v1/verify", "/v1/verify/vector", "/v1/detect", "/v1/people",
            "/v1/people/{name}", "/v1/people/{name}/templates", "/v1/templates/{template_id}", "/v1/keys",
            "/v1/hooks", "/v1/audit", "/v1/stats", "/v1/check", "/v1/settings"} <= paths
    assert "ApiKey" in spec["components"]["securitySchemes"]
    assert "liveness" in spec["info"]["description"]
    assert client.get("/docs").status_code == 404  # off unless FACEDB_DOCS=1 (it loads from a CDN: test_security)


def test_start_up_takes_no_request_before_the_model_and_index_are_loaded(tmp_path, fake_pipeline, monkeypatch):
    """Found by the real-photo server test: a worker restarted after kill -9 answered 503 while it loaded its
    model. Loading now happens before the worker takes any connection."""
    path = tmp_path / "db"
    keys = make_db(path)
    real = ServiceState._load_model

    def slow(self, db):
        time.sleep(0.5)
        return real(self, db)

    monkeypatch.setattr(ServiceState, "_load_model", slow)
    app = create_app(ServiceSettings(db=path), model=fake_pipeline, sender=lambda *a: 200)
    start = time.monotonic()
    with TestClient(app) as client:
        assert time.monotonic() - start >= 0.5
        assert client.get("/ready").json() == {"ready": True, "model_loaded": True, "vectors_only": False}
        assert client.get("/v1/people", headers=hdr(keys["admin"])).status_code == 200


def test_failed_start_is_not_ready_and_says_little(tmp_path, fake_pipeline):
    app = create_app(ServiceSettings(db=tmp_path / "missing"), model=fake_pipeline, sender=lambda *a: 200)
    with TestClient(app) as client:
        app.state.facedb.loaded.wait(10)
        r = client.get("/ready")
        assert r.status_code == 503 and "failed" in r.json()["reason"] and "missing" not in r.text
        assert_error(client.post("/v1/identify/vector", json={"vector": [1.0]}), 503, "NotReadyError")


# --------------------------------------------------------------------------------------------------- keys
ROUTES = [  # (method, path, scope needed, json body)
    ("post", "/v1/identify/vector", "identify", {"vector": [1.0] + [0.0] * 31}),
    ("post", "/v1/verify/vector", "identify", {"person": "Nobody", "vector": [1.0] + [0.0] * 31}),
    ("get", "/v1/people", "enroll", None),
    ("post", "/v1/people", "enroll", {"name": "Zed"}),
    ("get", "/v1/people/Zed", "enroll", None),
    ("patch", "/v1/people/Zed", "enroll", {"metadata": {"a": 1}}),
    ("post", "/v1/people/Zed/rename", "enroll", {"new_name": "Zed2"}),
    ("get", "/v1/people/Zed/templates", "enroll", None),
    ("post", "/v1/people/Zed/vectors", "enroll", {"vectors": [[1.0] + [0.0] * 31]}),
    ("delete", "/v1/people/Zed", "enroll", None),
    ("delete", "/v1/templates/1", "enroll", None),
    ("get", "/v1/stats", "admin", None),
    ("get", "/v1/check", "admin", None),
    ("get", "/v1/audit", "admin", None),
    ("get", "/v1/settings", "admin", None),
    ("patch", "/v1/settings", "admin", {"threshold": 0.71}),
    ("get", "/v1/keys", "admin", None),
    ("post", "/v1/keys", "admin", {"scope": "identify"}),
    ("delete", "/v1/keys/nobody", "admin", None),
    ("get", "/v1/hooks", "admin", None),
    ("post", "/v1/hooks", "admin", {"url": "http://127.0.0.1:9/x", "events": ["identify.match"]}),
    ("delete", "/v1/hooks/99", "admin", None),
]
RANK = {"identify": 0, "enroll": 1, "admin": 2}


def call(client, method, path, body, headers):
    kwargs = {"headers": headers}
    if body is not None:
        kwargs["json"] = body
    return getattr(client, method)(path, **kwargs) if method != "delete" else client.delete(path, headers=headers)


@pytest.mark.parametrize(("method", "path", "needed", "body"), ROUTES, ids=[f"{m} {p}" for m, p, _, _ in ROUTES])
def test_every_route_refuses_missing_bad_and_narrow_keys_without_changing_anything(svc, method, path, needed, body):
    client, keys, db = svc
    before = snapshot(db)
    for headers in ({}, hdr("nope"), hdr("fdb_000000000000_" + "A" * 43), {"Authorization": "Bearer junk"}):
        err = assert_error(call(client, method, path, body, headers), 401, "AuthenticationError")
        assert err["message"] == "a valid API key is required (X-API-Key header)"  # nothing else revealed
    for scope, key in keys.items():
        resp = call(client, method, path, body, hdr(key))
        if RANK[scope] < RANK[needed]:
            err = assert_error(resp, 403, "PermissionDeniedError")
            assert needed in err["message"]
        else:
            assert resp.status_code not in (401, 403), resp.text
        if RANK[scope] < RANK[needed]:
            assert snapshot(db)["counts"] == before["counts"]
    with FaceDB.open(db, readonly=True) as d:
        denied = d.audit(operation="denied")
        ids = {k.name: k.id for k in d.api_keys()}
    narrower = [s for s in keys if RANK[s] < RANK[needed]]
    assert {r.actor for r in denied} == {f"key:{ids[f'{s}-key']}" for s in narrower}
    assert all(r.detail["path"] == path for r in denied)


def test_bearer_token_is_accepted_and_every_request_is_audited_with_the_key_id(svc):
    client, keys, db = svc
    resp = client.post("/v1/people", json={"name": "Ann"}, headers={"Authorization": f"Bearer {keys['enroll']}"})
    assert resp.status_code == 201
    assert client.get("/v1/people/Ann", headers=hdr(keys["enroll"])).status_code == 200
    assert client.get("/v1/people", headers=hdr(keys["enroll"])).status_code == 200
    with FaceDB.open(db, readonly=True) as d:
        enroll_id = next(k.id for k in d.api_keys() if k.name == "enroll-key")
        ops = [(r.operation, r.actor) for r in d.audit()]
    assert ("add-person", f"key:{enroll_id}") in ops
    assert ("read-person", f"key:{enroll_id}") in ops and ("read-people", f"key:{enroll_id}") in ops


def test_keys_over_http_create_list_revoke_take_effect_at_once(svc):
    client, keys, db = svc
    admin = hdr(keys["admin"])
    made = client.post("/v1/keys", json={"scope": "identify", "name": "door-3"}, headers=admin)
    assert made.status_code == 201
    new = made.json()
    assert new["key"].startswith("fdb_") and new["scope"] == "identify"
    with FaceDB.open(db, readonly=True) as d:
        stored = {k.id: k for k in d.api_keys()}
        assert new["id"] in stored
        raw = d.store.conn.execute("SELECT * FROM api_keys").fetchall()
    assert not any(new["key"] in str(row) for row in raw)  # only its hash is stored
    vec = {"vector": [1.0] + [0.0] * 31}
    assert client.post("/v1/identify/vector", json=vec, headers=hdr(new["key"])).status_code == 200
    assert_error(client.post("/v1/keys", json={"scope": "identify", "name": "door-3"}, headers=admin), 409,
                 "DuplicateError")
    listed = client.get("/v1/keys", headers=admin).json()["keys"]
    assert "door-3" in [k["name"] for k in listed] and not any("key" in k for k in listed)
    assert client.delete("/v1/keys/door-3", headers=admin).json()["revoked_at"]
    assert_error(client.post("/v1/identify/vector", json=vec, headers=hdr(new["key"])), 401)
    with FaceDB.open(db, readonly=True) as d:
        assert [r.detail["reason"] for r in d.audit(operation="denied")] == ["revoked key"]
        assert d.audit(operation="key-revoke")[0].actor.startswith("key:")
    assert_error(client.delete("/v1/keys/nobody", headers=admin), 404, "NotFoundError")
    assert_error(client.post("/v1/keys", json={"scope": "root"}, headers=admin), 400, "InvalidInputError")


# ------------------------------------------------------------------------------------------------- people
def test_people_create_list_show_update_rename_remove(svc):
    client, keys, db = svc
    h = hdr(keys["enroll"])
    r = client.post("/v1/people", json={"name": "Ann", "external_id": "E1", "metadata": {"badge": 117}}, headers=h)
    assert r.status_code == 201 and r.json()["name"] == "Ann"
    for i in range(5):
        client.post("/v1/people", json={"name": f"P{i}"}, headers=h)
    before = snapshot(db)
    assert_error(client.post("/v1/people", json={"name": "Ann"}, headers=h), 409, "DuplicatePersonError")
    assert_error(client.post("/v1/people", json={"name": " bad "}, headers=h), 400, "InvalidInputError")
    assert_error(client.post("/v1/people", json={"name": "X", "colour": 1}, headers=h), 400)  # unknown field
    assert_error(client.post("/v1/people", content=b"{not json", headers={**h, "content-type": "application/json"}),
                 400, "InvalidInputError")
    assert snapshot(db)["people"] == before["people"]
    page = client.get("/v1/people", params={"limit": 2, "offset": 1}, headers=h).json()
    assert page["total"] == 6 and [p["name"] for p in page["people"]] == ["P0", "P1"]
    assert client.get("/v1/people", params={"query": "E1"}, headers=h).json()["people"][0]["name"] == "Ann"
    assert_error(client.get("/v1/people", params={"limit": 0}, headers=h), 400)
    shown = client.get("/v1/people/Ann", headers=h).json()
    assert shown["metadata"] == {"badge": 117} and shown["external_id"] == "E1"
    upd = client.patch("/v1/people/Ann", json={"metadata": {"team": "red", "badge": None}, "external_id": "E2"},
                       headers=h)
    assert upd.status_code == 200
    assert_error(client.patch("/v1/people/Ann", json={}, headers=h), 400)
    client.patch("/v1/people/P0", json={"metadata": {"x": 1}}, headers=h)
    cleared = client.patch("/v1/people/P0", json={"replace_metadata": True}, headers=h)  # replace with nothing
    assert cleared.status_code == 200 and cleared.json()["metadata"] == {}
    assert client.post("/v1/people/Ann/rename", json={"new_name": "Ann B"}, headers=h).json()["name"] == "Ann B"
    assert_error(client.post("/v1/people/Ann B/rename", json={"new_name": "P0"}, headers=h), 409)
    with FaceDB.open(db, readonly=True) as d:
        p = d.person("Ann B")
        assert p.metadata == {"team": "red"} and p.external_id == "E2"
        assert [x.name for x in d.people()].count("Ann") == 0
    client.post("/v1/people/Ann B/vectors", json={"vectors": np.eye(32)[:2].tolist()}, headers=h)
    assert client.delete("/v1/people/Ann B", headers=h).json() == {"removed": "Ann B", "templates": 2}
    assert_error(client.get("/v1/people/Ann B", headers=h), 404, "PersonNotFoundError")
    assert_error(client.delete("/v1/people/Ann B", headers=h), 404, "PersonNotFoundError")
    with FaceDB.open(db, readonly=True) as d:
        assert "Ann B" not in [x.name for x in d.people()] and d.store.counts()["templates"] == 0
        assert d.identify(np.eye(32, dtype=np.float32)[0]).identity is None


def test_names_with_slashes_and_unicode_work_as_path_segments(svc):
    client, keys, db = svc
    h = hdr(keys["enroll"])
    for name in ("A/B", "José"):
        assert client.post("/v1/people", json={"name": name}, headers=h).status_code == 201
        assert client.get(f"/v1/people/{name.replace('/', '%2F')}", headers=h).json()["name"] == name
        assert client.post(f"/v1/people/{name}/vectors", json={"vectors": [[0.0] * 31 + [1.0]]},
                           headers=h).status_code == 201
        assert len(client.get(f"/v1/people/{name}/templates", headers=h).json()["templates"]) == 1
        assert client.delete(f"/v1/people/{name}/templates".rsplit("/", 1)[0], headers=h).status_code == 200
    with FaceDB.open(db, readonly=True) as d:
        assert d.people() == []


# ---------------------------------------------------------------------------------------------- templates
def test_enrol_photos_report_per_photo_and_store_each(svc):
    client, keys, db = svc
    good1, good2 = png([RED], 1), png([RED], 2)
    r = enrol(client, keys["enroll"], "Ann", good1, blank_png(), b"not an image", png([RED, BLUE], 3), good2)
    assert r.status_code == 201, r.text
    report = r.json()
    assert report["faces_stored"] == 2 and report["photos"] == 5 and report["people"] == ["Ann"]
    reasons = {s["image"]: s["reason"] for s in report["skipped"]}
    assert reasons["Ann-1.png"] == "no face found" and "not a readable image" in reasons["Ann-2.png"]
    assert "2 faces found" in reasons["Ann-3.png"]
    with FaceDB.open(db, readonly=True) as d:
        assert d.person("Ann").templates == 2
        assert sorted(t.id for t in d.templates("Ann")) == sorted(report["template_ids"])
    again = enrol(client, keys["enroll"], "Ann", good1)
    assert again.status_code == 200 and again.json()["skipped"][0]["reason"].startswith("already enrolled")
    largest = enrol(client, keys["enroll"], "Bob", png([GREEN, BLUE], 4), on_multiple="largest")
    assert largest.status_code == 201 and largest.json()["faces_stored"] == 1


def test_enrol_with_nothing_usable_is_422_with_the_report_and_changes_nothing(svc):
    client, keys, db = svc
    before = snapshot(db)
    r = enrol(client, keys["enroll"], "Cat", blank_png(), b"junk")
    body = assert_error(r, 422, "NothingEnrolled")
    assert [s["image"] for s in body["report"]["skipped"]] == ["Cat-0.png", "Cat-1.png"]
    junk = assert_error(enrol(client, keys["enroll"], "Cat", b"hello, a text file"), 422)
    # found by the newcomer check: the name was said twice and Pillow's message showed a memory address
    assert junk["message"].count("Cat-0.png") == 1 and " at 0x" not in str(junk)
    with FaceDB.open(db, readonly=True) as d:
        assert d.audit(operation="enroll-skipped")[0].identity == "Cat"
    before = snapshot(db)
    assert_error(enrol(client, keys["enroll"], "Cat", png([GREY]), create="false"), 404, "PersonNotFoundError")
    assert_error(enrol(client, keys["enroll"], "Cat", png([GREY]), metadata="[1]"), 400)
    assert_error(enrol(client, keys["enroll"], "Cat", png([GREY]), on_multiple="all"), 400)
    assert_error(client.post("/v1/people/Cat/templates", headers=hdr(keys["enroll"])), 400)  # no photos
    after = snapshot(db)
    assert after["counts"] == before["counts"] and after["people"] == before["people"]


def test_templates_list_and_remove(svc):
    client, keys, db = svc
    h = hdr(keys["enroll"])
    ids = enrol(client, keys["enroll"], "Ann", png([RED], 1), png([RED], 2)).json()["template_ids"]
    listed = client.get("/v1/people/Ann/templates", headers=h).json()["templates"]
    assert [t["id"] for t in listed] == ids and "vector" not in listed[0] and len(listed[0]["image_sha256"]) == 64
    with_vectors = client.get("/v1/people/Ann/templates", params={"vectors": True}, headers=h).json()["templates"]
    assert len(with_vectors[0]["vector"]) == 32
    assert client.delete(f"/v1/templates/{ids[0]}", headers=h).json() == {"removed_template": ids[0],
                                                                         "person": "Ann"}
    assert_error(client.delete(f"/v1/templates/{ids[0]}", headers=h), 404, "TemplateNotFoundError")
    assert_error(client.delete("/v1/templates/0", headers=h), 400)
    assert_error(client.delete(f"/v1/templates/{2**70}", headers=h), 400)
    with FaceDB.open(db, readonly=True) as d:
        assert [t.id for t in d.templates("Ann")] == ids[1:]


def test_vector_enrol_is_all_or_nothing(svc):
    client, keys, db = svc
    h = hdr(keys["enroll"])
    before = snapshot(db)
    bad = np.eye(32)[:2].tolist()
    bad[1][0] = float("nan")
    assert_error(client.post("/v1/people/Ann/vectors", content=f'{{"vectors": {bad}}}'.replace("nan", "NaN"),
                             headers={**h, "content-type": "application/json"}), 400)
    assert_error(client.post("/v1/people/Ann/vectors", json={"vectors": [[1.0, 0.0]]}, headers=h), 409,
                 "ModelMismatchError")
    assert_error(client.post("/v1/people/Ann/vectors", json={"vectors": [[2.0] + [0.0] * 31]}, headers=h), 400,
                 "InvalidVectorError")
    assert_error(client.post("/v1/people/Ann/vectors", json={"vectors": [[1.0] + [0.0] * 31], "create": False},
                             headers=h), 404)
    assert_error(client.post("/v1/people/Ann/vectors", json={"vectors": [[1.0], [1.0, 0.0]]}, headers=h), 400)
    assert_error(client.post("/v1/people/Ann/vectors", json={"vectors": []}, headers=h), 400)
    assert snapshot(db)["counts"] == before["counts"]
    ok = client.post("/v1/people/Ann/vectors", json={"vectors": np.eye(32)[:3].tolist()}, headers=h)
    assert ok.status_code == 201 and len(ok.json()["template_ids"]) == 3
    with FaceDB.open(db, readonly=True) as d:
        assert d.person("Ann").templates == 3 and d.audit(operation="add-templates")[0].identity == "Ann"


# ---------------------------------------------------------------------------------------------- decisions
def test_identify_photo_one_answer_per_face_and_audited(svc):
    client, keys, db = svc
    enrol(client, keys["enroll"], "Ann", png([RED], 1), png([RED], 2))
    with FaceDB.open(db) as d:  # a door key granted candidates: today's full answers (tests/test_security.py: without)
        granted = d.create_api_key("identify", "door-full", ["candidates"])[1]
    r = client.post("/v1/identify", files={"photo": ("door.png", png([RED, BLUE], 7))}, data={"k": "3"},
                    headers=hdr(granted))
    assert r.status_code == 200
    faces = r.json()["faces"]
    assert [f["identity"] for f in faces] == ["Ann", None]
    assert faces[0]["box"] == [0.0, 0.0, 40.0, 40.0] and faces[0]["similarity"] >= faces[0]["threshold"] == 0.7
    assert faces[0]["candidates"][0]["name"] == "Ann" and faces[0]["rule"] == "fixed"
    door = client.post("/v1/identify", files={"photo": ("door.png", png([RED, BLUE], 7))},
                       headers=hdr(keys["identify"])).json()["faces"]  # the decision only
    assert [(f["identity"], f["box"], f["confidence"] is not None) for f in door] == [
        ("Ann", [0.0, 0.0, 40.0, 40.0], True), (None, faces[1]["box"], False)]
    assert not {"similarity", "threshold", "candidates", "distance"} & {k for f in door for k in f}
    strict = client.post("/v1/identify", files={"photo": ("door.png", png([RED], 8))}, data={"threshold": "0.999"},
                         headers=hdr(keys["enroll"])).json()["faces"]  # a per-call threshold: enroll and admin only
    assert strict[0]["identity"] is None and strict[0]["threshold"] == 0.999 and strict[0]["rule"] == "given"
    assert client.post("/v1/identify", files={"photo": ("e.png", blank_png())},
                       headers=hdr(keys["identify"])).json() == {"faces": []}
    with FaceDB.open(db, readonly=True) as d:
        ids = {k.name: k.id for k in d.api_keys()}
        searches = d.audit(operation="search")
    assert [(s.identity, s.actor) for s in searches[:4]] == [
        ("Ann", f"key:{ids['door-full']}"), (None, f"key:{ids['door-full']}"),
        ("Ann", f"key:{ids['identify-key']}"), (None, f"key:{ids['identify-key']}")]
    assert [s.detail["rule"] for s in searches[:5]] == ["fixed"] * 4 + ["given"]  # which policy decided
    assert searches[-1].detail == {"faces": 0} and len(searches) == 6  # a photo with no face is recorded too
    for bad in ({"k": "0"}, {"k": "x"}, {"k": str(10**9)}, {"threshold": "2"}, {"threshold": "nan"}):
        assert_error(client.post("/v1/identify", files={"photo": ("d.png", png([RED], 9))}, data=bad,
                                 headers=hdr(keys["enroll"])), 400)
    assert_error(client.post("/v1/identify", files={"photo": ("d.png", b"GIF89a broken")},
                             headers=hdr(keys["identify"])), 400, "ImageError")
    assert_error(client.post("/v1/identify", files={"photo": ("d.png", b"")}, headers=hdr(keys["identify"])), 400)
    assert_error(client.post("/v1/identify", headers=hdr(keys["identify"])), 400)


def test_identify_vector_single_and_batch(svc):
    client, keys, _ = svc
    E0 = np.eye(32)[0].tolist()
    h = hdr(keys["enroll"])
    client.post("/v1/people/Ann/vectors", json={"vectors": [np.eye(32)[0].tolist()]}, headers=h)
    one = client.post("/v1/identify/vector", json={"vector": np.eye(32)[0].tolist(), "k": 1}, headers=h).json()
    assert one["results"][0]["identity"] == "Ann" and one["results"][0]["similarity"] == pytest.approx(1.0)
    many = client.post("/v1/identify/vector", json={"vectors": np.eye(32)[:2].tolist()}, headers=h).json()
    assert [a["identity"] for a in many["results"]] == ["Ann", None]
    assert_error(client.post("/v1/identify/vector", json={}, headers=h), 400)
    assert_error(client.post("/v1/identify/vector", json={"vector": E0, "k": 10**9}, headers=h), 400)
    assert_error(client.post("/v1/identify/vector", json={"vector": [1.0] + [0.0] * 31, "vectors": [[1.0]]},
                             headers=h), 400)
    assert_error(client.post("/v1/identify/vector", json={"vectors": [[1.0], [1.0, 0.0]]}, headers=h), 400)
    assert_error(client.post("/v1/identify/vector", json={"vector": [0.0] * 32}, headers=h), 400,
                 "InvalidVectorError")


def test_verify_photo_and_vector(svc):
    client, keys, db = svc
    enrol(client, keys["enroll"], "Ann", png([RED], 1))
    enrol(client, keys["enroll"], "Bob", png([GREEN], 1))
    h = hdr(keys["identify"])
    yes = client.post("/v1/verify", files={"photo": ("p.png", png([RED], 5))}, data={"person": "Ann"}, headers=h)
    assert yes.status_code == 200 and yes.json()["accepted"] is True and yes.json()["name"] == "Ann"
    no = client.post("/v1/verify", files={"photo": ("p.png", png([RED], 6))}, data={"person": "Bob"}, headers=h)
    assert no.json()["accepted"] is False
    assert_error(client.post("/v1/verify", files={"photo": ("p.png", blank_png())}, data={"person": "Ann"},
                             headers=h), 422, "NoFaceError")
    assert_error(client.post("/v1/verify", files={"photo": ("p.png", png([RED], 5))}, data={"person": "Zed"},
                             headers=hdr(keys["enroll"])), 404)  # a door key: as a refused claim (test_security)
    assert_error(client.post("/v1/verify", files={"photo": ("p.png", png([RED], 5))}, headers=h), 400)
    with FaceDB.open(db) as d:
        vec = next(d.templates("Ann")).vector.tolist()
    assert client.post("/v1/verify/vector", json={"person": "Ann", "vector": vec}, headers=h).json()["accepted"]
    assert not client.post("/v1/verify/vector", json={"person": "Bob", "vector": vec}, headers=h).json()["accepted"]
    with FaceDB.open(db, readonly=True) as d:
        verdicts = [(r.detail["claimed"], r.identity) for r in d.audit(operation="verify")]
    assert verdicts == [("Ann", "Ann"), ("Bob", None), ("Ann", "Ann"), ("Bob", None)]
    with FaceDB.open(db, readonly=True) as d:
        assert {r.detail["rule"] for r in d.audit(operation="verify")} == {"fixed"}  # the stored policy decided


def test_detect(svc):
    client, keys, db = svc
    r = client.post("/v1/detect", files={"photo": ("p.png", png([RED, GREEN]))}, headers=hdr(keys["identify"]))
    faces = r.json()["faces"]
    assert [f["box"] for f in faces] == [[0.0, 0.0, 40.0, 40.0], [40.0, 0.0, 80.0, 40.0]]
    assert len(faces[0]["landmarks"]) == 5 and faces[0]["det_score"] == 0.99
    with FaceDB.open(db, readonly=True) as d:
        assert d.audit(operation="detect")[0].detail == {"faces": 2}
        assert d.store.counts()["templates"] == 0


def test_photo_routes_on_a_vectors_only_database_are_503(tmp_path):
    path = tmp_path / "db"
    keys = make_db(path, model_id="my-vectors", dim=4)
    app = create_app(ServiceSettings(db=path), sender=lambda *a: 200)
    with TestClient(app) as client:
        wait_ready(client)
        assert client.get("/ready").json()["vectors_only"] is True
        body = assert_error(client.post("/v1/identify", files={"photo": ("p.png", png([RED]))},
                                        headers=hdr(keys["identify"])), 503, "ModelUnavailableError")
        assert "/vector" in body["message"]
        r = client.post("/v1/identify/vector", json={"vector": [1, 0, 0, 0]}, headers=hdr(keys["identify"]))
        assert r.status_code == 200 and r.json()["results"][0]["identity"] is None


# -------------------------------------------------------------------------------------------------- admin
def test_stats_check_audit_and_settings(svc):
    client, keys, db = svc
    h = hdr(keys["admin"])
    enrol(client, keys["enroll"], "Ann", png([RED], 1))
    stats = client.get("/v1/stats", headers=h).json()
    assert (stats["people"], stats["templates"], stats["model_id"]) == (1, 1, "fake-colour")
    assert stats["worker_pid"] > 0 and stats["webhooks"]["dropped"] == 0
    held = stats["worker_index"]  # the index this worker answers from: loaded by the enrolment, level with the store
    assert held["loaded"] is True and held["generation"] == stats["generation"] and held["stand_in"] is None
    assert set(held) == {"loaded", "built", "generation", "from_file", "rescore_from", "stand_in"}
    assert client.get("/v1/check", headers=h).json()["ok"] is True
    audit = client.get("/v1/audit", params={"operation": "enroll"}, headers=h).json()["records"]
    assert [r["identity"] for r in audit] == ["Ann"] and audit[0]["actor"].startswith("key:")
    actor = audit[0]["actor"]
    mine = client.get("/v1/audit", params={"actor": actor, "since": "1h"}, headers=h).json()["records"]
    assert mine and all(r["actor"] == actor for r in mine)
    assert client.get("/v1/audit", params={"since": "2999-01-01"}, headers=h).json()["records"] == []
    paged = client.get("/v1/audit", params={"limit": 1, "offset": 1}, headers=h).json()["records"]
    assert len(paged) == 1
    assert_error(client.get("/v1/audit", params={"since": "yesterday"}, headers=h), 400)
    assert client.get("/v1/settings", headers=h).json()["threshold"] == 0.7
    before = snapshot(db)
    assert_error(client.patch("/v1/settings", json={"threshold": 1.5}, headers=h), 400)
    assert_error(client.patch("/v1/settings", json={"threshold": 0.8, "audit_retention_days": -1}, headers=h), 400)
    assert_error(client.patch("/v1/settings", json={}, headers=h), 400)
    assert snapshot(db)["threshold"] == before["threshold"] == 0.7
    new = client.patch("/v1/settings", json={"threshold": 0.8, "audit_retention_days": 30}, headers=h).json()
    assert new["threshold"] == 0.8 and new["audit"]["retention_days"] == 30
    with FaceDB.open(db, readonly=True) as d:
        s = d.settings()
        assert s.threshold == 0.8 and s.threshold_source == "set over HTTP" and s.audit.retention_days == 30


def test_a_retention_past_the_calendar_is_refused_and_the_trail_writes_on(svc):
    # Found by the schemathesis run in CI: 3.3e16 days was stored, then every audit write overflowed (500s).
    client, keys, db = svc
    h = hdr(keys["admin"])
    before = snapshot(db)
    for days in (3.3124633176273664e16, 36501):
        assert_error(client.patch("/v1/settings", json={"audit_retention_days": days}, headers=h), 400)
    assert_error(client.patch("/v1/settings", json={"visitors_retention_days": 3651}, headers=h), 400)
    assert snapshot(db) == before
    assert client.get("/v1/keys", headers=h).status_code == 200
    assert client.get("/v1/audit", params={"since": "99999999999d"}, headers=h).status_code == 200
    assert_error(client.get("/v1/audit", params={"since": "0001-01-01T00:00+14:00"}, headers=h), 400)
    assert client.patch("/v1/settings", json={"audit_retention_days": 36500}, headers=h).status_code == 200
    with FaceDB.open(db, readonly=True) as d:
        assert d.settings().audit.retention_days == 36500
        assert "read-keys" in [r.operation for r in d.audit()]


def test_hooks_crud(svc):
    client, keys, db = svc
    h = hdr(keys["admin"])
    with FaceDB.open(db, readonly=True) as d:
        enroll_id = next(k.id for k in d.api_keys() if k.name == "enroll-key")
    made = client.post("/v1/hooks", json={"url": "http://127.0.0.1:9/a", "events": ["identify.unknown"],
                                          "key_id": enroll_id}, headers=h)
    assert made.status_code == 201 and made.json()["secret"].startswith("whsec_")
    assert client.get("/v1/hooks", headers=h).json()["hooks"] == [
        {k: v for k, v in made.json().items() if k != "secret"}]
    before = snapshot(db)
    assert_error(client.post("/v1/hooks", json={"url": "file:///etc/passwd", "events": ["*"]}, headers=h), 400)
    assert_error(client.post("/v1/hooks", json={"url": "http://x", "events": ["door.open"]}, headers=h), 400)
    assert_error(client.post("/v1/hooks", json={"url": "http://x", "events": ["*"], "key_id": "nope"},
                             headers=h), 404)
    assert snapshot(db)["hooks"] == before["hooks"]
    assert client.delete(f"/v1/hooks/{made.json()['id']}", headers=h).status_code == 200
    assert_error(client.delete(f"/v1/hooks/{made.json()['id']}", headers=h), 404)
    with FaceDB.open(db, readonly=True) as d:
        assert d.webhooks() == []


# ------------------------------------------------------------------------------------------------- errors
def test_error_table_covers_every_facedb_error():
    import facedb.errors as errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.FaceDBError)]
    from facedb.service.errors import status_of

    codes = {c.__name__: status_of(c("x")) for c in classes}
    assert codes["InvalidInputError"] == codes["InvalidVectorError"] == codes["ImageError"] == 400
    assert codes["AuthenticationError"] == 401 and codes["PermissionDeniedError"] == 403
    assert codes["PersonNotFoundError"] == codes["TemplateNotFoundError"] == codes["NotFoundError"] == 404
    assert codes["DuplicatePersonError"] == codes["ModelMismatchError"] == codes["DatabaseExistsError"] == 409
    assert codes["RequestTooLargeError"] == 413 and codes["NoFaceError"] == 422
    assert codes["NotReadyError"] == codes["ModelUnavailableError"] == codes["DatabaseError"] == 503
    assert codes["FaceDBError"] == 500 and STATUS[-1][0] is errors.FaceDBError
    # every error class has its own status: a new one must be placed in the table, not fall to 500
    assert [name for name, code in codes.items() if code == 500] == ["FaceDBError"]


def test_upload_over_the_limit_is_413_before_parsing_and_changes_nothing(svc):
    client, keys, db = svc
    before = snapshot(db)
    big = b"\xff" * (300 * 1024)  # the fixture's limit is 0.25 MiB
    body = assert_error(client.post("/v1/people/Ann/templates", files={"photos": ("big.jpg", big)},
                                    headers=hdr(keys["enroll"])), 413, "RequestTooLargeError")
    assert "limit" in body["message"]

    def chunks():  # no Content-Length: counted while read
        for _ in range(40):
            yield b"x" * 8192

    assert_error(client.post("/v1/identify/vector", content=chunks(),
                             headers={**hdr(keys["enroll"]), "content-type": "application/json"}), 413)
    assert snapshot(db)["counts"] == before["counts"]
    assert client.post("/v1/people/Ann/templates", files={"photos": ("a.png", png([RED]))},
                       headers=hdr(keys["enroll"])).status_code == 201


def test_decompression_bomb_is_refused_like_in_the_cli(svc, monkeypatch):
    client, keys, db = svc
    monkeypatch.setenv("FACEDB_MAX_PIXELS", "1000")
    body = assert_error(client.post("/v1/people/Ann/templates", files={"photos": ("a.png", png([RED, RED]))},
                                    headers=hdr(keys["enroll"])), 422, "NothingEnrolled")
    assert "over the limit" in body["report"]["skipped"][0]["reason"]
    assert_error(client.post("/v1/identify", files={"photo": ("a.png", png([RED, RED]))},
                             headers=hdr(keys["identify"])), 400, "ImageError")
    assert snapshot(db)["counts"]["templates"] == 0


def test_unknown_routes_methods_and_unexpected_errors_are_json_and_reveal_nothing(svc, monkeypatch):
    client, keys, _ = svc
    assert_error(client.get("/v1/nowhere"), 404, "NotFound")
    assert_error(client.put("/v1/people", headers=hdr(keys["admin"])), 405, "MethodNotAllowed")

    def boom(self):
        raise RuntimeError("secret internals /etc/shadow")

    monkeypatch.setattr(FaceDB, "stats", boom)
    body = assert_error(client.get("/v1/stats", headers=hdr(keys["admin"])), 500, "InternalError")
    assert "secret" not in str(body) and "shadow" not in str(body)


def test_cors_is_off_by_default_and_on_when_configured(tmp_path, fake_pipeline):
    path = tmp_path / "db"
    make_db(path)
    preflight = {"Origin": "https://gate.example", "Access-Control-Request-Method": "POST"}
    for origins, allowed in (((), False), (("https://gate.example",), True)):
        app = create_app(ServiceSettings(db=path, cors_origins=origins), model=fake_pipeline, sender=lambda *a: 200)
        with TestClient(app) as client:
            r = client.options("/v1/identify", headers=preflight)
            assert (r.headers.get("access-control-allow-origin") == "https://gate.example") is allowed


def test_settings_from_environment_round_trip(tmp_path):
    s = ServiceSettings(db=tmp_path, port=8123, workers=3, max_upload_mb=5, cors_origins=("https://a", "https://b"),
                        fold_window=2.5)
    back = ServiceSettings.from_env(s.to_env())
    assert back == ServiceSettings(db=tmp_path.resolve(), port=8123, workers=3, max_upload_mb=5,
                                   cors_origins=("https://a", "https://b"), fold_window=2.5)
    from facedb import InvalidInputError

    with pytest.raises(InvalidInputError):
        ServiceSettings.from_env({"FACEDB_PORT": "eighty"})
    with pytest.raises(InvalidInputError):
        ServiceSettings(workers=0)


def test_one_facedb_shared_by_many_threads_writes_every_audit_record(tmp_path):
    """Found by the two-worker test: identify records its decision outside the FaceDB's lock, so threads of one
    service worker shared the audit connection and one failed with "cannot start a transaction within a
    transaction". Every concurrent decision must be answered and recorded."""
    rng = np.random.default_rng(0)
    with FaceDB.create(tmp_path / "db", model_id="m", dim=8, threshold=0.5) as db:
        db.add_templates("Ann", np.eye(8, dtype=np.float32)[:1], create=True)
        errors = []

        def work(seed):
            local = np.random.default_rng(seed)
            for _ in range(150):
                try:
                    v = local.standard_normal(8).astype(np.float32)
                    db.identify(v / np.linalg.norm(v))
                    db.note("read-people")
                except Exception as exc:  # every error counts
                    errors.append(repr(exc))

        threads = [threading.Thread(target=work, args=(int(rng.integers(1 << 30)),)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len(db.audit(operation="identify")) == len(db.audit(operation="read-people")) == 900


def test_a_migration_done_meanwhile_by_another_process_is_not_run_twice(tmp_path):
    """Found while writing `serve`: two workers opening a database of the previous release at once both read
    its old version, and the second to take the write lock re-ran the migrations the first had just applied
    ("table api_keys already exists"). A store that read version 0 and migrates now must do nothing."""
    from facedb.gallery.store import SCHEMA_VERSION, Store

    path = tmp_path / "db"
    FaceDB.create(path, model_id="m", dim=4, threshold=0.5).close()
    store = Store.open(path / "facedb.sqlite3")
    store._migrate(0)  # what a process that looked before another migrated does
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.api_keys() == [] and store.counts()["people"] == 0
    store.close()


def test_cropped_photos_on_every_photo_route(tmp_path):
    """cropped=true: a face crop the detector cannot see is taken whole by enrol, identify, verify and detect;
    without it the same photo has no face; a featureless (blank) frame has none either way."""
    class Blind:
        def detect(self, image):
            return []

    path = tmp_path / "db"
    keys = make_db(path)
    blind = FacePipeline(FakeEmbedder(), detector=Blind())  # type: ignore[arg-type]
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(30, 226, (112, 92, 3), dtype=np.uint8)).save(buf, "PNG")
    crop = buf.getvalue()
    app = create_app(ServiceSettings(db=path, fold_window=0.0), model=blind, sender=lambda url, body, headers: 200)
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        assert_error(enrol(client, keys["enroll"], "Ann", crop), 422, "NothingEnrolled")
        assert_error(enrol(client, keys["enroll"], "Ann", blank_png(), cropped="true"), 422, "NothingEnrolled")
        r = enrol(client, keys["enroll"], "Ann", crop, cropped="true")
        assert r.status_code == 201 and r.json()["faces_stored"] == 1, r.text
        with FaceDB.open(path, readonly=True) as d:
            assert d.person("Ann").templates == 1
        h = hdr(keys["identify"])
        assert client.post("/v1/identify", files={"photo": ("p.png", crop)}, headers=h).json()["faces"] == []
        faces = client.post("/v1/identify", files={"photo": ("p.png", crop)}, data={"cropped": "true"},
                            headers=h).json()["faces"]
        assert [f["identity"] for f in faces] == ["Ann"] and faces[0]["det_score"] == 0.0
        assert_error(client.post("/v1/verify", files={"photo": ("p.png", crop)}, data={"person": "Ann"},
                                 headers=h), 422)
        verdict = client.post("/v1/verify", files={"photo": ("p.png", crop)},
                              data={"person": "Ann", "cropped": "true"}, headers=h).json()
        assert verdict["accepted"] is True
        boxes = client.post("/v1/detect", files={"photo": ("p.png", crop)}, data={"cropped": "true"}, headers=h)
        assert [f["box"] for f in boxes.json()["faces"]] == [[0.0, 0.0, 92.0, 112.0]]  # the whole photo
        with FaceDB.open(path, readonly=True) as d:
            assert [r.identity for r in d.audit(operation="verify")] == ["Ann"]
