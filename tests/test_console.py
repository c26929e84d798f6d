"""The operator console's pages and actions through FastAPI's test client (the test-double model: colour tiles
as faces), and the API routes it added (photo check, unknown visitors, thumbnails, audit filters, settings).
Every page's route and scope, and the database after each action; the browser itself is
tests/test_console_browser.py."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from urllib.parse import quote, unquote

import pytest

from facedb import FaceDB

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from facedb.service.app import create_app
from facedb.service.config import ServiceSettings

from .servicekit import BLUE, GREEN, RED, blank_png, console_login, make_db, png, snapshot, wait_ready

CONSOLE = Path(__file__).resolve().parents[1] / "facedb" / "service" / "console"


@pytest.fixture
def svc(tmp_path, fake_pipeline):
    """(client, keys, db path): a service with the console, on a fresh database with the test-double model."""
    path = tmp_path / "db"
    keys = make_db(path)
    # allow_private_hooks: the settings page registers a webhook on 127.0.0.1 (refused by default)
    app = create_app(ServiceSettings(db=path, fold_window=0.0, allow_private_hooks=True), model=fake_pipeline,
                     sender=lambda url, body, headers: 200)
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client, keys, path


def sign_in(client, key: str) -> str:
    """Sign in with ``key``; returns the page's anti-forgery token."""
    r = console_login(client, key, follow_redirects=True)
    assert r.status_code in (200, 403), r.text
    return re.search(r'name="csrf-token" content="([^"]*)"', r.text).group(1)


def enrol(client, key, name, *photos):
    files = [("photos", (f"{name}-{i}.png", data, "image/png")) for i, data in enumerate(photos)]
    r = client.post(f"/v1/people/{quote(name, safe='')}/templates", files=files, headers={"X-API-Key": key})
    assert r.status_code == 201, r.text
    return r.json()


def audit(path: Path, **filters):
    with FaceDB.open(path, readonly=True) as db:
        return db.audit(**filters)


# ------------------------------------------------------------------------------------------- signing in
def test_pages_need_a_signed_in_key(svc):
    client, _, _ = svc
    for page in ("/console/", "/console/people", "/console/people/Ann", "/console/enrol", "/console/identify",
                 "/console/decisions", "/console/visitors", "/console/settings", "/console/thumbs/template/1"):
        r = client.get(page, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/console/login", page
    r = client.post("/console/api/enrol", data={"name": "Ann"}, files={"photos": ("a.png", png([RED]))},
                    follow_redirects=False)
    assert r.status_code == 303


def test_sign_in_sets_an_http_only_session_cookie_and_never_puts_the_key_in_a_url(svc):
    client, keys, path = svc
    r = console_login(client, keys["enroll"], follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/console/"
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("facedb_console="))
    assert keys["enroll"] not in cookie and keys["enroll"].rsplit("_", 1)[1] not in cookie  # a session, not the key
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    assert "Max-Age" not in cookie and "expires" not in cookie.lower()  # a session cookie
    r = client.get("/console/", follow_redirects=False)
    assert r.headers["location"] == "/console/people"
    page = client.get("/console/people")
    assert page.status_code == 200 and keys["enroll"] not in page.text
    assert all(keys["enroll"] not in h.url.query.decode() for h in [page])
    assert [r.operation for r in audit(path, operation="console-sign-in")] == ["console-sign-in"]


def test_over_https_the_cookie_is_secure(svc):
    client, keys, _ = svc
    r = console_login(client, keys["admin"], headers={"X-Forwarded-Proto": "https"},
                    follow_redirects=False)
    assert "Secure" in r.headers["set-cookie"]


@pytest.mark.parametrize("bad", ["", "nonsense", "fdb_0123456789ab_" + "x" * 43])
def test_a_wrong_key_is_refused(svc, bad):
    client, _, _ = svc
    r = console_login(client, bad, follow_redirects=False)
    assert r.status_code == 401 and "This key was refused" in r.text
    assert "set-cookie" not in r.headers
    assert client.get("/console/people", follow_redirects=False).status_code == 303


def test_a_revoked_key_is_refused_at_sign_in_and_at_the_next_click(svc):
    client, keys, path = svc
    sign_in(client, keys["enroll"])
    assert client.get("/console/people").status_code == 200
    with FaceDB.open(path) as db:
        db.revoke_api_key("enroll-key")
    r = client.get("/console/people", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/console/login?refused=1"
    assert 'facedb_console=""' in r.headers["set-cookie"] or "Max-Age=0" in r.headers["set-cookie"]
    assert "no longer accepted" in client.get("/console/login?refused=1").text
    r = console_login(client, keys["enroll"], follow_redirects=False)
    assert r.status_code == 401
    denied = audit(path, operation="denied")
    assert denied and all(d.detail["reason"] == "revoked key" for d in denied)


def test_sign_out_forgets_the_key(svc):
    client, keys, _ = svc
    csrf = sign_in(client, keys["admin"])
    r = client.post("/console/logout", data={"csrf": csrf}, follow_redirects=False)
    assert r.headers["location"] == "/console/login?out=1" and "facedb_console" in r.headers["set-cookie"]
    assert client.get("/console/people", follow_redirects=False).status_code == 303


def test_pages_are_not_cached_framed_or_allowed_foreign_scripts(svc):
    client, keys, _ = svc
    sign_in(client, keys["admin"])
    for page in ("/console/login", "/console/people", "/console/settings"):
        h = client.get(page).headers
        assert h["cache-control"] == "no-store" and h["x-frame-options"] == "DENY"
        assert "script-src 'self'" in h["content-security-policy"] and "frame-ancestors 'none'" in \
            h["content-security-policy"]


def test_every_asset_is_served_by_facedb_and_nothing_points_elsewhere(svc):
    client, _, _ = svc
    for name, kind in (("console.css", "text/css"), ("console.js", "javascript"), ("favicon.svg", "image/svg")):
        r = client.get(f"/console/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
    # no template or asset loads anything from another origin (no CDN, no web font)
    for f in list((CONSOLE / "templates").glob("*.html")) + list((CONSOLE / "static").glob("*")):
        text = f.read_text(encoding="utf-8")
        assert not re.search(r"""(src|href)=["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import""", text), f
        urls = set(re.findall(r"https?://[^\s\"'<>)]+", text))
        assert urls <= {"http://www.w3.org/2000/svg", "https://doors.example/facedb"}, (f, urls)  # a namespace, a
        # placeholder


def test_no_console_turns_it_off(tmp_path, fake_pipeline):
    path = tmp_path / "db"
    make_db(path)
    app = create_app(ServiceSettings(db=path, console=False), model=fake_pipeline, sender=lambda *a: 200)
    with TestClient(app) as client:
        wait_ready(client)
        assert client.get("/console/login").status_code == 404
        assert client.get("/console/static/console.js").status_code == 404
    assert ServiceSettings.from_env({"FACEDB_CONSOLE": "0"}).console is False
    assert ServiceSettings.from_env({}).console is True
    assert ServiceSettings.from_env(ServiceSettings(console=False).to_env()).console is False


# -------------------------------------------------------------------------------------------- scopes
def test_an_identify_key_sees_only_check_a_photo(svc):
    client, keys, path = svc
    enrol(client, keys["enroll"], "Ann", png([RED]))
    before = snapshot(path)
    csrf = sign_in(client, keys["identify"])
    assert client.get("/console/", follow_redirects=False).headers["location"] == "/console/identify"
    page = client.get("/console/identify")
    assert page.status_code == 200 and 'href="/console/people"' not in page.text
    for url in ("/console/people", "/console/people/Ann", "/console/enrol", "/console/visitors",
                "/console/decisions", "/console/settings", "/console/api/decisions", "/console/thumbs/template/1"):
        r = client.get(url)
        assert r.status_code == 403 and "Not with this key" in r.text, url
    hdr = {"X-CSRF-Token": csrf}
    attempts = [
        client.post("/console/api/enrol", data={"name": "Eve"}, files={"photos": ("e.png", png([BLUE]))},
                    headers=hdr),
        client.post("/console/enrol", data={"name": "Eve", "csrf": csrf}, files={"photos": ("e.png", png([BLUE]))}),
        client.post("/console/api/check", files={"photo": ("e.png", png([BLUE]))}, headers=hdr),
        client.post("/console/people/Ann/remove", data={"confirm": "Ann", "csrf": csrf}),
        client.post("/console/people/Ann/rename", data={"new_name": "Eve", "csrf": csrf}),
        client.post("/console/templates/1/remove", data={"csrf": csrf}),
        client.post("/console/settings/threshold", data={"threshold": "0.1", "csrf": csrf}),
        client.post("/console/settings/keys", data={"scope": "admin", "csrf": csrf}),
    ]
    assert [r.status_code for r in attempts] == [403] * len(attempts)
    assert snapshot(path) == before
    denied = audit(path, operation="denied")
    # refusals are recorded once per (address, key, reason) a minute (issue #25, second pass): both reasons
    assert sorted(r.detail["reason"] for r in denied) == ["scope identify, needs admin",
                                                          "scope identify, needs enroll"]


def test_an_enroll_key_cannot_reach_decisions_or_settings(svc):
    client, keys, path = svc
    csrf = sign_in(client, keys["enroll"])
    before = snapshot(path)
    assert client.get("/console/decisions").status_code == 403
    assert client.get("/console/settings").status_code == 403
    assert client.get("/console/thumbs/probe/1").status_code == 403
    r = client.post("/console/settings/keeping", data={"thumbnails": "all", "csrf": csrf})
    assert r.status_code == 403
    assert client.post("/console/settings/keys/admin-key/revoke", data={"csrf": csrf}).status_code == 403
    assert snapshot(path) == before
    nav = client.get("/console/people").text
    assert 'href="/console/people"' in nav and 'href="/console/settings"' not in nav


def test_actions_without_the_form_token_change_nothing(svc):
    client, keys, path = svc
    enrol(client, keys["enroll"], "Ann", png([RED]))
    sign_in(client, keys["admin"])
    before = snapshot(path)
    for r in (client.post("/console/people/Ann/remove", data={"confirm": "Ann"}, follow_redirects=False),
              client.post("/console/people/Ann/remove", data={"confirm": "Ann", "csrf": "0" * 40},
                          follow_redirects=False),
              client.post("/console/api/enrol", data={"name": "Ann"}, files={"photos": ("x.png", png([RED], 9))}),
              client.post("/console/settings/threshold", data={"threshold": "0.2"}, follow_redirects=False)):
        assert r.status_code in (303, 400), r.text
        assert "form token" in r.text + unquote(r.headers.get("set-cookie", ""))
    assert snapshot(path) == before


# -------------------------------------------------------------------------------------------- people
def test_people_list_search_paging_and_thumbnails(svc):
    client, keys, path = svc
    for i in range(30):
        enrol(client, keys["enroll"], f"Person {i:02d}", png([(40 + i * 7, 200 - i * 5, 90)], seed=i))
    sign_in(client, keys["enroll"])
    page1 = client.get("/console/people").text
    assert "30 people" in page1 and "Person 00" in page1 and "Person 23" in page1 and "Person 24" not in page1
    assert "Page 1 of 2" in page1
    page2 = client.get("/console/people?page=2").text
    assert "Person 24" in page2 and "Person 29" in page2 and "Person 00" not in page2
    found = client.get("/console/people?q=Person 1").text
    assert "10 people" in found and "Person 19" in found and "Person 20" not in found
    thumbs = re.findall(r'src="/console/thumbs/template/(\d+)"', page1)
    assert len(thumbs) == 24
    r = client.get(f"/console/thumbs/template/{thumbs[0]}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content[:2] == b"\xff\xd8"
    assert r.headers["cache-control"] == "private, no-store"
    assert client.get("/console/thumbs/template/999").status_code == 404
    assert client.get("/console/thumbs/bogus/1").status_code == 400
    reads = audit(path, operation="read-people")
    # signing in lands on the list (a read), then page 1, page 2, the search
    assert [r.detail["offset"] for r in reads] == [0, 0, 24, 0] and reads[-1].detail["query"] == "Person 1"
    assert not audit(path, operation="read-thumbnail")  # the page's own read was recorded


def test_person_page_rename_metadata_and_remove_with_confirmation(svc):
    client, keys, path = svc
    enrol(client, keys["enroll"], "Ann Lee", png([RED], 1), png([RED], 2))
    with FaceDB.open(path) as db:
        db.update_person("Ann Lee", metadata={"badge": 117, "team": "front desk"})
    csrf = sign_in(client, keys["enroll"])
    page = client.get("/console/people/Ann%20Lee").text
    assert "2 template(s) from 2 photo(s)" in page and page.count('src="/console/thumbs/template/') == 2
    assert "Type <strong>Ann Lee</strong> to confirm" in page and "Remove Ann Lee" in page
    assert client.get("/console/people/Nobody").status_code == 404

    form = {"csrf": csrf, "external_id": "E-1", "meta_key_0": "badge", "meta_value_0": "118",
            "meta_key_1": "team", "meta_value_1": "x", "meta_drop_1": "1", "meta_key_new": "floor",
            "meta_value_new": "3"}
    r = client.post("/console/people/Ann%20Lee/update", data=form, follow_redirects=True)
    assert "Saved Ann Lee" in r.text
    with FaceDB.open(path, readonly=True) as db:
        ann = db.person("Ann Lee")
        assert ann.metadata == {"badge": 118, "floor": "3"} and ann.external_id == "E-1"

    r = client.post("/console/people/Ann%20Lee/rename", data={"csrf": csrf, "new_name": "Ann Smith"},
                    follow_redirects=False)
    assert r.headers["location"] == "/console/people/Ann%20Smith"
    r = client.post("/console/people/Ann%20Smith/rename", data={"csrf": csrf, "new_name": ""}, follow_redirects=True)
    assert 'class="flash error"' in r.text

    before = snapshot(path)
    r = client.post("/console/people/Ann%20Smith/remove", data={"csrf": csrf, "confirm": "Ann"},
                    follow_redirects=True)
    assert "type their name exactly" in r.text and snapshot(path) == before
    r = client.post("/console/people/Ann%20Smith/remove", data={"csrf": csrf, "confirm": "Ann Smith"},
                    follow_redirects=True)
    assert "Removed Ann Smith: 2 template(s)" in r.text and "Ann Smith</a>" not in r.text
    with FaceDB.open(path, readonly=True) as db:
        assert db.people() == [] and db.count_thumbnails()["template"] == 0
        assert db.audit(operation="remove")[-1].actor.startswith("key:")


def test_remove_one_template_from_the_person_page(svc):
    client, keys, path = svc
    ids = enrol(client, keys["enroll"], "Ann", png([RED], 1), png([RED], 2))["template_ids"]
    csrf = sign_in(client, keys["enroll"])
    r = client.post(f"/console/templates/{ids[0]}/remove", data={"csrf": csrf}, follow_redirects=False)
    assert r.headers["location"] == "/console/people/Ann"
    with FaceDB.open(path, readonly=True) as db:
        assert [t.id for t in db.templates("Ann")] == [ids[1]]


# --------------------------------------------------------------------------------------------- enrol
def test_photo_check_gives_each_verdict_and_stores_nothing(svc):
    client, keys, path = svc
    enrol(client, keys["enroll"], "Ann", png([RED], 1))
    csrf = sign_in(client, keys["enroll"])
    before = snapshot(path)

    def check(data):
        r = client.post("/console/api/check", files={"photo": ("p.png", data, "image/png")},
                        headers={"X-CSRF-Token": csrf})
        return r.status_code, r.json()

    status, ok = check(png([GREEN], 5))
    assert status == 200 and ok["verdict"] == "ok" and ok["chosen"] == 0 and len(ok["faces"]) == 1
    assert ok["faces"][0]["box"] == [0.0, 0.0, 40.0, 40.0] and len(ok["faces"][0]["landmarks"]) == 5
    assert ok["warnings"] == ok["faces"][0]["problems"] and ok["warnings"]  # flat tiles: low contrast
    assert check(png([GREEN, BLUE], 5))[1]["verdict"] == "several faces"
    assert check(blank_png())[1]["verdict"] == "no face"
    dup = check(png([RED], 1))[1]
    assert dup["verdict"] == "duplicate" and dup["enrolled_as"] == "Ann"
    status, bad = check(b"not an image")
    assert status == 400 and bad["error"] == "ImageError"
    after = snapshot(path)
    assert after["counts"] == before["counts"] and after["people"] == before["people"]


def test_enrol_through_the_page_script_and_without_it(svc):
    client, keys, path = svc
    csrf = sign_in(client, keys["enroll"])
    hdr = {"X-CSRF-Token": csrf}
    r = client.post("/console/api/enrol", data={"name": "Bo"}, files={"photos": ("a.png", png([BLUE], 1))},
                    headers=hdr)
    assert r.status_code == 201 and r.json()["faces_stored"] == 1
    r = client.post("/console/api/enrol", data={"name": "Bo"}, files={"photos": ("b.png", blank_png())},
                    headers=hdr)
    assert r.status_code == 422 and r.json()["report"]["skipped"][0]["reason"] == "no face found"
    r = client.post("/console/api/enrol", data={"name": "Bo"}, files={"photos": ("a.png", png([BLUE], 1))},
                    headers=hdr)
    assert r.status_code == 200 and "already enrolled" in r.json()["skipped"][0]["reason"]
    # the plain form (no script): several photos, a per-photo table
    r = client.post("/console/enrol", data={"name": "Cy", "csrf": csrf},
                    files=[("photos", ("c1.png", png([GREEN], 1))), ("photos", ("c2.png", png([GREEN, RED], 2)))])
    assert r.status_code == 200 and "1 of 2 photo(s) stored" in r.text and "c2.png" in r.text
    assert "2 faces found" in r.text
    r = client.post("/console/enrol", data={"name": "", "csrf": csrf}, files={"photos": ("z.png", png([RED]))})
    assert r.status_code == 400 and "give the person" in r.text
    with FaceDB.open(path, readonly=True) as db:
        assert {p.name: p.templates for p in db.people()} == {"Bo": 1, "Cy": 1}
        actors = {r.actor for r in db.audit(operation="enroll")}
        assert actors == {next(k.actor for k in db.api_keys() if k.name == "enroll-key")}


# ------------------------------------------------------------------------------------ check a photo
def test_check_a_photo_with_an_identify_key(svc):
    client, keys, path = svc
    enrol(client, keys["enroll"], "Ann", png([RED], 1))
    csrf = sign_in(client, keys["identify"])
    r = client.post("/console/api/identify", files={"photo": ("p.png", png([RED, BLUE], 3))},
                    headers={"X-CSRF-Token": csrf})
    faces = r.json()["faces"]
    assert [f["identity"] for f in faces] == ["Ann", None] and faces[0]["box"] == [0.0, 0.0, 40.0, 40.0]
    r = client.post("/console/identify", data={"csrf": csrf}, files={"photo": ("p.png", png([RED], 4))})
    assert r.status_code == 200 and "<strong>Ann</strong>" in r.text
    r = client.post("/console/identify", data={"csrf": csrf}, files={"photo": ("p.png", blank_png())})
    assert "No face found" in r.text
    searches = audit(path, operation="search")
    key = next(k for k in FaceDB.open(path, readonly=True).api_keys() if k.name == "identify-key")
    assert len(searches) == 4 and {s.actor for s in searches} == {key.actor}


# -------------------------------------------------------------------------------------------- decisions
def test_decisions_table_filters_and_live_updates(svc):
    client, keys, path = svc
    enrol(client, keys["enroll"], "Ann", png([RED], 1))
    with FaceDB.open(path) as db:
        db.configure_thumbnails("all")
    door = {"X-API-Key": keys["identify"]}
    client.post("/v1/identify", files={"photo": ("d.png", png([RED, BLUE], 2))}, headers=door)
    sign_in(client, keys["admin"])
    page = client.get("/console/decisions").text
    assert page.count('<tr class="match">') == 1 and page.count('<tr class="unknown">') == 1
    assert "identify-key" in page and page.count('src="/console/thumbs/probe/') == 2
    last = int(re.search(r'data-last-id="(\d+)"', page).group(1))
    probe = re.search(r'src="/console/thumbs/probe/(\d+)"', page).group(1)
    assert client.get(f"/console/thumbs/probe/{probe}").headers["content-type"] == "image/jpeg"

    reads = len(audit(path, operation="read-audit"))
    assert client.get(f"/console/api/decisions?after_id={last}").json() == {"records": []}
    assert len(audit(path, operation="read-audit")) == reads  # an empty poll is not recorded
    client.post("/v1/identify", files={"photo": ("d.png", png([RED], 3))}, headers=door)
    new = client.get(f"/console/api/decisions?after_id={last}").json()["records"]
    assert [(r["identity"], r["decision"], r["key_name"]) for r in new] == [("Ann", "match", "identify-key")]
    assert len(audit(path, operation="read-audit")) == reads + 1

    only_unknown = client.get("/console/decisions?decision=unknown").text
    assert only_unknown.count('<tr class="unknown">') == 1 and '<tr class="match">' not in only_unknown
    ann = client.get("/console/decisions?person=Ann").text
    assert ann.count('<tr class="match">') == 2
    admin_id = next(k.id for k in FaceDB.open(path, readonly=True).api_keys() if k.name == "admin-key")
    assert "No decision matches" in client.get(f"/console/decisions?key={admin_id}").text
    assert "flash error" in client.get("/console/decisions?since=yesterday").text


# ------------------------------------------------------------------------------------- unknown visitors
def test_visitors_page_enrol_and_forget(svc):
    client, keys, path = svc
    with FaceDB.open(path) as db:
        db.configure_visitors(enabled=True)
        db.configure_thumbnails("all")
    door = {"X-API-Key": keys["identify"]}
    for seed in (1, 2):
        client.post("/v1/identify", files={"photo": ("d.png", png([BLUE], seed))}, headers=door)
        client.post("/v1/identify", files={"photo": ("d.png", png([GREEN], seed))}, headers=door)
    csrf = sign_in(client, keys["enroll"])
    page = client.get("/console/visitors").text
    groups = re.findall(r'action="/console/visitors/(V[\w-]+)/enroll"', page)
    assert len(groups) == 2 and page.count('src="/console/thumbs/visitor/') == 4 and "identify-key" in page
    r = client.post(f"/console/visitors/{groups[0]}/enroll", data={"csrf": csrf, "name": "Zed"}, follow_redirects=False)
    assert r.headers["location"] == "/console/people/Zed"
    r = client.post(f"/console/visitors/{groups[1]}/forget", data={"csrf": csrf}, follow_redirects=True)
    assert "2 face(s) erased" in r.text
    r = client.post(f"/console/visitors/{groups[1]}/forget", data={"csrf": csrf}, follow_redirects=True)
    assert "flash error" in r.text and "Nothing was changed" in r.text
    with FaceDB.open(path, readonly=True) as db:
        assert db.person("Zed").templates == 2 and db.visitors(min_size=1) == []
        assert db.count_thumbnails() == {"template": 2, "probe": 4, "visitor": 0}
    off = client.get("/console/visitors?min_size=1").text
    assert "No group of unknown faces" in off


def test_visitors_page_says_when_they_are_not_kept(svc):
    client, keys, _ = svc
    sign_in(client, keys["enroll"])
    page = client.get("/console/visitors").text
    assert "are not being kept" in page and "shown without pictures" in page


# ---------------------------------------------------------------------------------------------- settings
def test_settings_threshold_rule_and_keeping(svc):
    client, keys, path = svc
    csrf = sign_in(client, keys["admin"])
    page = client.get("/console/settings").text
    assert "Threshold in force" in page and "admin-key" in page and "fake-colour" in page
    r = client.post("/console/settings/threshold", data={"csrf": csrf, "threshold": "0.8", "source": "our staff"},
                    follow_redirects=True)
    assert "Threshold set to 0.8 (our staff)" in r.text
    r = client.post("/console/settings/threshold", data={"csrf": csrf, "threshold": "7"}, follow_redirects=True)
    assert "flash error" in r.text
    r = client.post("/console/settings/rule", data={"csrf": csrf, "rule": "gallery"}, follow_redirects=True)
    assert "needs an impostor model" in r.text
    r = client.post("/console/settings/keeping", data={"csrf": csrf, "thumbnails": "all", "visitors_enabled": "1",
                                                       "visitors_retention_days": "7", "audit_retention_days": "30"},
                    follow_redirects=True)
    assert "Saved what the database keeps" in r.text
    with FaceDB.open(path, readonly=True) as db:
        s = db.settings()
        assert s.threshold == 0.8 and s.threshold_source == "our staff" and s.rule.kind == "fixed"
        assert s.thumbnails == "all" and s.visitors.enabled and s.visitors.retention_days == 7
        assert s.audit.retention_days == 30 and not s.audit.store_probes
    r = client.post("/console/settings/keeping", data={"csrf": csrf, "thumbnails": "most"}, follow_redirects=True)
    assert "flash error" in r.text


def test_settings_keys_and_webhooks(svc):
    client, keys, path = svc
    csrf = sign_in(client, keys["admin"])
    r = client.post("/console/settings/keys", data={"csrf": csrf, "scope": "identify", "name": "door-3"})
    assert r.status_code == 201
    new = re.search(r'value="(fdb_[0-9a-f]{12}_[\w-]{43})"', r.text).group(1)
    assert client.post("/v1/detect", files={"photo": ("p.png", png([RED]))},
                       headers={"X-API-Key": new}).status_code == 200
    assert new not in client.get("/console/settings").text  # shown once
    r = client.post("/console/settings/keys", data={"csrf": csrf, "scope": "root"})
    assert r.status_code == 400 and "scope is identify" in r.text
    r = client.post("/console/settings/keys/door-3/revoke", data={"csrf": csrf}, follow_redirects=True)
    assert "Revoked key door-3" in r.text
    assert client.post("/v1/detect", files={"photo": ("p.png", png([RED]))},
                       headers={"X-API-Key": new}).status_code == 401

    r = client.post("/console/settings/hooks", data={"csrf": csrf, "url": "http://127.0.0.1:9/hook",
                                                     "events": ["identify.unknown", "person.removed"]})
    assert r.status_code == 201 and "signing secret" in r.text
    r = client.post("/console/settings/hooks", data={"csrf": csrf, "url": "ftp://x"})
    assert r.status_code == 400
    with FaceDB.open(path, readonly=True) as db:
        hooks = db.webhooks()
        assert [(h.url, h.events) for h in hooks] == [("http://127.0.0.1:9/hook", ["identify.unknown",
                                                                                 "person.removed"])]
    r = client.post(f"/console/settings/hooks/{hooks[0].id}/remove", data={"csrf": csrf}, follow_redirects=True)
    assert "Removed the webhook" in r.text
    with FaceDB.open(path, readonly=True) as db:
        assert db.webhooks() == []


def test_revoking_your_own_key_signs_you_out(svc):
    client, keys, _ = svc
    csrf = sign_in(client, keys["admin"])
    r = client.post("/console/settings/keys/admin-key/revoke", data={"csrf": csrf}, follow_redirects=True)
    assert r.url.path == "/console/login" and "no longer accepted" in r.text


# ------------------------------------------------------------------------------ the API routes it added
def test_api_photo_check_visitors_and_thumbnails_need_enroll(svc):
    client, keys, path = svc
    ident, enr = {"X-API-Key": keys["identify"]}, {"X-API-Key": keys["enroll"]}
    ids = enrol(client, keys["enroll"], "Ann", png([RED]))["template_ids"]
    for method, url, kw in (("post", "/v1/photos/check", {"files": {"photo": ("p.png", png([RED]))}}),
                            ("get", "/v1/visitors", {}), ("post", "/v1/visitors/V1-abcdef/enroll",
                                                          {"json": {"name": "X"}}),
                            ("delete", "/v1/visitors/V1-abcdef", {}),
                            ("get", f"/v1/templates/{ids[0]}/thumbnail", {}),
                            ("get", "/v1/visitors/faces/1/thumbnail", {})):
        r = getattr(client, method)(url, headers=ident, **kw)
        assert r.status_code == 403, (url, r.text)
    r = client.get(f"/v1/templates/{ids[0]}/thumbnail", headers=enr)
    assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"
    assert audit(path, operation="read-thumbnail")[0].detail == {"template": ids[0]}
    people = client.get("/v1/people", headers=enr).json()["people"]
    assert people[0]["thumbnail_template"] == ids[0]
    rows = client.get("/v1/people/Ann/templates", headers=enr).json()["templates"]
    assert rows[0]["has_thumbnail"] is True
    check = client.post("/v1/photos/check", files={"photo": ("p.png", png([RED]))}, headers=enr).json()
    assert check["verdict"] == "duplicate" and check["enrolled_as"] == "Ann"


def test_api_visitors_round_trip(svc):
    client, keys, _ = svc
    enr = {"X-API-Key": keys["enroll"]}
    r = client.get("/v1/visitors", headers=enr).json()
    assert r == {"enabled": False, "retention_days": 30.0, "groups": []}
    r = client.patch("/v1/settings", json={"visitors_enabled": True, "thumbnails": "all"},
                     headers={"X-API-Key": keys["admin"]})
    assert r.status_code == 200 and r.json()["thumbnails"] == "all" and r.json()["visitors"]["enabled"]
    for seed in (1, 2):
        client.post("/v1/identify", files={"photo": ("d.png", png([BLUE], seed))}, headers=enr)
    groups = client.get("/v1/visitors", headers=enr).json()["groups"]
    assert len(groups) == 1 and groups[0]["faces"] == 2 and len(groups[0]["thumbnails"]) == 2
    face = groups[0]["thumbnails"][0]
    assert client.get(f"/v1/visitors/faces/{face}/thumbnail", headers=enr).status_code == 200
    r = client.post(f"/v1/visitors/{groups[0]['id']}/enroll", json={"name": "Blue"}, headers=enr)
    assert r.status_code == 200 and r.json()["person"]["templates"] == 2
    assert client.post(f"/v1/visitors/{groups[0]['id']}/enroll", json={"name": "Blue"},
                       headers=enr).status_code == 400
    assert client.delete("/v1/visitors/nonsense", headers=enr).status_code == 400


def test_api_settings_refuses_before_changing_anything(svc):
    client, keys, path = svc
    adm = {"X-API-Key": keys["admin"]}
    before = snapshot(path)
    for body in ({"thumbnails": "most"}, {"thumbnails": "all", "visitors_retention_days": 0},
                 {"decision_rule": "gallery"}, {"thumbnails": "all", "decision_target": 2.0}, {}):
        r = client.patch("/v1/settings", json=body, headers=adm)
        assert r.status_code == 400, (body, r.text)
    assert snapshot(path) == before
    with FaceDB.open(path, readonly=True) as db:
        assert db.settings().thumbnails == "enrolled" and not db.settings().visitors.enabled
    got = client.get("/v1/settings", headers=adm).json()
    assert got["decision_rule"] == "fixed" and got["thumbnails"] == "enrolled" and got["warnings"] == []


def test_api_audit_filters(svc):
    client, keys, _ = svc
    enrol(client, keys["enroll"], "Ann", png([RED], 1))
    door = {"X-API-Key": keys["identify"]}
    client.post("/v1/identify", files={"photo": ("d.png", png([RED, BLUE], 2))}, headers=door)
    adm = {"X-API-Key": keys["admin"]}

    def records(**q):
        r = client.get("/v1/audit", params=q, headers=adm)
        assert r.status_code == 200, r.text
        return [(x["operation"], x["identity"]) for x in r.json()["records"]]

    assert records(operation="decisions") == [("search", "Ann"), ("search", None)]
    assert records(operation="decisions", order="desc") == [("search", None), ("search", "Ann")]
    assert records(operation="decisions", decision="unknown") == [("search", None)]
    assert records(operation="search,enroll", identity="Ann") == [("enroll", "Ann"), ("search", "Ann")]
    last = client.get("/v1/audit", params={"operation": "decisions"}, headers=adm).json()["records"][-1]["id"]
    assert records(operation="decisions", after_id=last) == []
    assert client.get("/v1/audit", params={"decision": "maybe"}, headers=adm).status_code == 400


def test_json_settings_body_names_thumbnails(svc):
    client, keys, _ = svc
    body = client.get("/v1/settings", headers={"X-API-Key": keys["admin"]}).json()
    assert {"thumbnails", "visitors", "decision_rule", "threshold_in_force", "warnings"} <= set(body)
    json.dumps(body)


# ------------------------------------------------------------------- found by the newcomer's try
def test_a_page_past_the_end_says_so_and_odd_numbers_are_taken_in_stride(svc):
    """A page past the last one said "Nobody is enrolled yet" with people enrolled; page=0 or min_size=0 in
    the address bar answered the API's JSON error instead of a page."""
    client, keys, _ = svc
    enrol(client, keys["enroll"], "Ann", png([RED]))
    sign_in(client, keys["enroll"])
    r = client.get("/console/people?page=9")
    assert r.status_code == 200 and "Nobody is enrolled yet" not in r.text and "No one on page 9" in r.text
    assert 'href="/console/people?q=&amp;page=1"' in r.text
    r = client.get("/console/people?page=0")
    assert r.status_code == 200 and "Ann</a>" in r.text
    r = client.get("/console/visitors?min_size=0")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]


def test_serve_no_console_flag_reaches_the_workers(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import facedb.service.server as server
    from facedb.cli import app

    path = tmp_path / "db"
    make_db(path)
    seen = []
    monkeypatch.setattr(server, "run", lambda settings, log_level="info": seen.append(settings))
    for args, console in ((["serve"], True), (["serve", "--no-console"], False)):
        r = CliRunner().invoke(app, ["--db", str(path), *args])
        assert r.exit_code == 0, r.output
        assert seen[-1].console is console
        assert ServiceSettings.from_env(seen[-1].to_env()).console is console  # what each worker reads


def test_the_margin_rule_can_be_chosen_over_http_and_in_the_console(svc):
    """PATCH /v1/settings and the console offered fixed and gallery only: a database switched away from the
    margin rule (the default) could come back only through the CLI (found by the newcomer check)."""
    client, keys, path = svc
    adm = {"X-API-Key": keys["admin"]}
    before = snapshot(path)
    r = client.patch("/v1/settings", json={"decision_rule": "margin"}, headers=adm)
    assert r.status_code == 400 and "margin threshold" in r.json()["message"]  # the test model ships none
    assert snapshot(path) == before
    got = client.patch("/v1/settings", json={"decision_rule": "margin", "decision_margin": 0.3}, headers=adm).json()
    assert (got["decision_rule"], got["decision_margin"]) == ("margin", 0.3)
    with FaceDB.open(path, readonly=True) as db:
        assert (db.settings().rule.kind, db.settings().rule.margin) == ("margin", 0.3)
    before = snapshot(path)
    assert client.patch("/v1/settings", json={"decision_target": 0.02}, headers=adm).status_code == 400
    assert client.patch("/v1/settings", json={"decision_rule": "fixed", "decision_margin": 0.2},
                        headers=adm).status_code == 400
    assert snapshot(path) == before
    assert client.patch("/v1/settings", json={"decision_margin": 0.35}, headers=adm).json()["decision_margin"] == 0.35
    csrf = sign_in(client, keys["admin"])
    page = client.get("/console/settings").text
    assert 'value="margin" checked' in page and "lead over the runner-up" in page
    r = client.post("/console/settings/rule", data={"rule": "fixed", "target": "0.01", "csrf": csrf},
                    follow_redirects=True)
    assert r.status_code == 200
    r = client.post("/console/settings/rule", data={"rule": "margin", "target": "0.01", "csrf": csrf},
                    follow_redirects=True)
    assert r.status_code == 200, r.text
    with FaceDB.open(path, readonly=True) as db:
        assert (db.settings().rule.kind, db.settings().rule.margin) == ("margin", 0.35)
