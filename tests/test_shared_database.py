"""What a newcomer found running the service, the CLI and the console on one database at once (issue #23's
clean-clone check): lists of people that failed with 404 while someone was removed, `check` that reported an
erasure under way in another process as a problem, and names no URL can reach."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from facedb import FaceDB, InvalidInputError

from .test_livefiles import cli

DIM = 32


def vec(i: int) -> np.ndarray:
    v = np.random.default_rng(900 + i).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture()
def root(tmp_path):
    path = tmp_path / "db"
    with FaceDB.create(path, model_id="fake-colour", dim=DIM, threshold=0.9) as db:  # the test-double model
        for i, name in enumerate(("Ann", "Bob", "Cy")):
            db.add_templates(name, vec(i)[None], create=True)
    return path


def test_cover_templates_leave_out_a_person_removed_meanwhile(root):
    with FaceDB.open(root) as db, FaceDB.open(root) as other:
        names = [p.name for p in db.people()]
        other.remove_person("Bob")
        covers = db.cover_templates(names)
        assert "Bob" not in covers


def test_a_list_of_people_survives_a_removal_between_its_reads(root, monkeypatch, fake_pipeline):
    """GET /v1/people and the console's People page read the list, the count and the thumbnails one after the
    other; a removal by another process in between (here: exactly there) must not turn the answer into a 404."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from facedb.service.app import create_app
    from facedb.service.config import ServiceSettings

    from .servicekit import console_login, wait_ready

    with FaceDB.open(root) as db:
        key = db.create_api_key("admin", "a")[1]
    real_count = FaceDB.count_people
    victims = ["Bob", "Cy"]

    def count_after_a_removal(self, *a, **kw):
        if victims:
            with FaceDB.open(root) as other:  # another process's removal, between the list and the covers
                other.remove_person(victims.pop(0))
        return real_count(self, *a, **kw)

    monkeypatch.setattr(FaceDB, "count_people", count_after_a_removal)
    app = create_app(ServiceSettings(db=root, fold_window=0.0), model=fake_pipeline, sender=lambda *a: 200)
    with TestClient(app) as client:
        wait_ready(client)
        r = client.get("/v1/people", headers={"X-API-Key": key})
        assert r.status_code == 200, r.text
        assert "Ann" in [p["name"] for p in r.json()["people"]]
        assert console_login(client, key).status_code == 200
        page = client.get("/console/people")
        assert page.status_code == 200 and "Ann" in page.text
    assert victims == []


def test_check_waits_for_an_erasure_under_way_in_another_process(root):
    """A removal holds the index lock from its transaction to its erasure: `check` elsewhere waits for it
    instead of reporting its mark as a problem."""
    with FaceDB.open(root) as writer, FaceDB.open(root) as checker:
        result = {}
        with writer.keeper.locked():
            writer.store.set_meta({"erase_pending": "1"})  # the removal has committed, its erasure is running
            t = threading.Thread(target=lambda: result.setdefault("report", checker.check()))
            t.start()
            t.join(0.5)
            writer.store.set_meta({"erase_pending": "0"})  # the erasure finished
        t.join(120)
        assert result["report"].ok, result["report"].problems


def test_check_reports_an_erasure_a_killed_writer_left_behind(root):
    with FaceDB.open(root) as checker:
        with FaceDB.open(root) as writer:
            writer.store.set_meta({"erase_pending": "1"})  # and no process holds the lock: left behind
        report = checker.check()
        assert not report.ok and any("did not finish" in p for p in report.problems)
    with FaceDB.open(root) as healed:  # the next writable open finishes it
        assert healed.check().ok


@pytest.mark.parametrize("name", [".", ".."])
def test_names_no_url_can_reach_are_refused(root, name):
    with FaceDB.open(root) as db:
        with pytest.raises(InvalidInputError, match="may not be"):
            db.add_person(name)
        with pytest.raises(InvalidInputError, match="may not be"):
            db.rename_person("Ann", name)
        with pytest.raises(InvalidInputError, match="may not be"):
            db.add_templates(name, vec(7)[None], create=True)
    res = cli(root, "add-person", name)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    with FaceDB.open(root, readonly=True) as db:
        assert sorted(p.name for p in db.people()) == ["Ann", "Bob", "Cy"]
