"""The operator console in a real browser: headless Chromium (Debian's ``chromium`` package; never a browser
downloaded by Playwright) driven by Playwright, against a real ``facedb serve`` on a loopback port, with a
dlib-resnet database (offline model) and LFW photos.

One walk through what an operator does: a wrong key is refused; an admin signs in, makes the database keep
decision and visitor thumbnails, enrols a person from two photos (each showing its face box before saving
and its result after), finds them in the list and on their page, checks a probe and sees the decision, sees
it in the decisions table (and a door's decision arriving live, without reloading), sees an unknown visitor
group and enrols it, removes the person (typing their name) and sees them gone; an identify key sees only
"Check a photo"; a key revoked while signed in is sent back to sign in. The database is checked after each
step that changes it. A screenshot of every page is saved (``FACEDB_SCREENSHOTS`` or the test's tmp dir).

Skipped, with the reason, where Chromium, Playwright, dlib or the LFW photos are absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from facedb import FaceDB

from .conftest import REPO
from .servicekit import real_server

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def chromium_path() -> str | None:
    """Debian's Chromium (``FACEDB_CHROMIUM`` to point elsewhere)."""
    given = os.environ.get("FACEDB_CHROMIUM")
    if given:
        return given if Path(given).exists() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install 'facedb[browser]'; make install does)")
    exe = chromium_path()
    if exe is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run does) or FACEDB_CHROMIUM is wrong")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def cli(db: Path, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "facedb.cli", "--db", str(db), *args], capture_output=True,
                         text=True, cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def key_of(output: str) -> str:
    import json

    return str(json.loads(output)["key"])


def test_operator_walk_through_in_chromium(tmp_path, facedata, browser):
    pytest.importorskip("dlib")
    pytest.importorskip("facenet_pytorch")
    from playwright.sync_api import expect

    lfw = facedata / "lfw_deepfunneled"
    shots = Path(os.environ.get("FACEDB_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)

    def photo(person: str, n: int) -> Path:
        return lfw / person / f"{person}_{n:04d}.jpg"

    db = tmp_path / "gate"
    cli(db, "init", "--model", "dlib-resnet")
    admin = key_of(cli(db, "--json", "keys", "create", "--scope", "admin", "--name", "reception"))
    door = key_of(cli(db, "--json", "keys", "create", "--scope", "identify", "--name", "front-door"))

    with real_server(db, workers=1, timeout=300) as (base, _):
        context = browser.new_context(viewport={"width": 1180, "height": 820}, base_url=base)
        context.set_default_timeout(90_000)
        page = context.new_page()
        script_errors: list[str] = []
        page.on("pageerror", lambda exc: script_errors.append(str(exc)))
        outside: list[str] = []
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((base, "blob:", "data:"))
                else None)

        def snap(name: str) -> None:
            page.screenshot(path=str(shots / f"console-{name}.png"), full_page=True)

        # --- a wrong key is refused, and nothing is remembered
        page.goto("/console/")
        expect(page).to_have_url(f"{base}/console/login")
        page.fill("#key", "fdb_0123456789ab_" + "x" * 43)
        page.click("button[type=submit]")
        expect(page.get_by_role("alert")).to_contain_text("This key was refused")
        assert not [c for c in context.cookies() if c["name"] == "facedb_console"]
        snap("signin")

        # --- sign in as the admin: the key lives in an HttpOnly session cookie, never in a URL
        page.fill("#key", admin)
        page.click("button[type=submit]")
        expect(page).to_have_url(f"{base}/console/people")
        cookie = next(c for c in context.cookies() if c["name"] == "facedb_console")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["expires"] == -1
        assert page.evaluate("document.cookie") == ""  # no script can read it
        expect(page.locator("main")).to_contain_text("Nobody is enrolled yet")

        # --- settings: keep decisions' and visitors' thumbnails, keep unknown visitors
        page.click("nav >> text=Settings")
        page.check("input[name=thumbnails][value=all]")
        page.check("input[name=visitors_enabled]")
        page.click("form[action='/console/settings/keeping'] button[type=submit]")
        expect(page.get_by_role("status").first).to_contain_text("Saved what the database keeps")
        with FaceDB.open(db, readonly=True) as d:
            assert d.settings().thumbnails == "all" and d.settings().visitors.enabled

        # --- enrol Colin Powell from two photos: boxes and verdicts before saving, results after
        page.click("nav >> text=Enrol")
        page.fill("#name", "Colin Powell")
        page.set_input_files("#photos", [str(photo("Colin_Powell", 1)), str(photo("Colin_Powell", 2))])
        cards = page.locator("#shots li.shot")
        expect(cards).to_have_count(2)
        for i in range(2):
            expect(cards.nth(i).locator(".status")).to_contain_text("1 face: ready to save")
            expect(cards.nth(i).locator(".box")).to_have_count(1)
        page.click("#enrol-save")
        for i in range(2):
            expect(cards.nth(i).locator(".status")).to_contain_text("stored as template")
        expect(page.locator("#enrol-summary")).to_contain_text("2 stored, 0 not stored")
        snap("enrol")
        with FaceDB.open(db, readonly=True) as d:
            assert d.person("Colin Powell").templates == 2
            assert d.store.count_thumbnails()["template"] == 2

        # --- the same photo again is refused (already enrolled); a file that is not a photo is shown with why
        # (the newcomer's try found it silently left out)
        notes = tmp_path / "notes.txt"
        notes.write_text("not a photo")
        page.set_input_files("#photos", [str(photo("Colin_Powell", 1)), str(notes)])
        expect(cards.nth(2).locator(".status")).to_contain_text("already enrolled")
        expect(cards.nth(3).locator(".status")).to_contain_text("not a readable image")

        # --- the list, with the thumbnail, and the person page with their faces
        page.click("nav >> text=People")
        row = page.locator("table.people tbody tr", has_text="Colin Powell")
        expect(row).to_have_count(1)
        expect(row.locator("td.num").first).to_have_text("2")
        assert row.locator("img").evaluate("img => img.complete && img.naturalWidth") == 96
        snap("people")
        row.locator("a").click()
        expect(page.locator("h1")).to_have_text("Colin Powell")
        expect(page.locator("ul.faces img")).to_have_count(2)
        snap("person")

        # --- check a probe: a held-back photo of him, and two of a stranger (who becomes a visitor group)
        page.click("nav >> text=Check a photo")
        page.set_input_files("#probe", str(photo("Colin_Powell", 3)))
        expect(page.locator("#probe-faces li")).to_contain_text("Colin Powell")
        expect(page.locator("#probe-frame .box")).to_have_count(1)
        snap("identify")
        for n in (1, 2):
            page.set_input_files("#probe", str(photo("Tony_Blair", n)))
            expect(page.locator("#probe-faces li").first).to_contain_text("unknown")

        # --- the decisions table: the match with its face crop; a door's decision arrives without reloading
        page.click("nav >> text=Decisions")
        rows = page.locator("#decisions tbody tr")
        match = rows.filter(has_text="Colin Powell")
        expect(match).to_have_count(1)
        expect(match.locator(".tag")).to_have_text("match")
        expect(match.locator("img")).to_have_count(1)
        expect(rows.filter(has_text="unknown")).to_have_count(2)
        before = rows.count()
        r = httpx.post(f"{base}/v1/identify", headers={"X-API-Key": door}, timeout=120,
                       files={"photo": ("door.jpg", photo("Colin_Powell", 4).read_bytes(), "image/jpeg")})
        assert r.status_code == 200 and r.json()["faces"][0]["identity"] == "Colin Powell", r.text
        expect(rows).to_have_count(before + 1)
        expect(rows.first).to_contain_text("front-door")
        snap("decisions")
        page.select_option("select[name=decision]", "unknown")
        page.click("#decision-filters button[type=submit]")
        expect(rows).to_have_count(2)

        # --- unknown visitors: the stranger's two faces as one group; enrol it as a new person
        page.click("nav >> text=Unknown visitors")
        group = page.locator("li.group").first
        expect(group.locator("h2")).to_contain_text("2 face(s)")
        expect(group.locator(".strip img")).to_have_count(2)
        snap("visitors")
        group.locator("input[name=name]").fill("Tony Blair")
        group.locator("button", has_text="Enrol").click()
        expect(page.locator("h1")).to_have_text("Tony Blair")
        with FaceDB.open(db, readonly=True) as d:
            assert d.person("Tony Blair").templates == 2 and d.visitors(min_size=1) == []

        # --- settings page as an administrator sees it
        page.click("nav >> text=Settings")
        expect(page.locator("#keys-h")).to_be_visible()
        expect(page.locator("table").first).to_contain_text("front-door")
        snap("settings")

        # --- remove Colin Powell: the button waits for his name; then he is gone from the list and the store
        page.goto(f"/console/people/{'Colin%20Powell'}")
        remove = page.locator("form[data-confirm-name] button[type=submit]")
        expect(remove).to_be_disabled()
        page.fill("#confirm", "Colin Powell")
        expect(remove).to_be_enabled()
        remove.click()
        expect(page).to_have_url(f"{base}/console/people")
        expect(page.get_by_role("status").first).to_contain_text("Removed Colin Powell")
        expect(page.locator("table.people")).not_to_contain_text("Colin Powell")
        with FaceDB.open(db, readonly=True) as d:
            assert [p.name for p in d.people()] == ["Tony Blair"]
            assert d.store.count_thumbnails()["template"] == 2  # Tony Blair's, moved from the visitors

        # --- an identify key sees only "Check a photo"; people are refused
        page.click("text=Sign out")
        page.fill("#key", door)
        page.click("button[type=submit]")
        expect(page).to_have_url(f"{base}/console/identify")
        expect(page.locator("nav a")).to_have_count(1)
        page.goto("/console/people")
        expect(page.locator("h1")).to_have_text("Not with this key")
        snap("identify-key-denied")

        # --- a key revoked while signed in is sent back to sign in at the next click
        cli(db, "keys", "revoke", "front-door")
        page.goto("/console/identify")
        expect(page).to_have_url(f"{base}/console/login?refused=1")
        expect(page.get_by_role("alert")).to_contain_text("no longer accepted")

        assert outside == [], f"the console fetched from elsewhere: {outside}"
        assert script_errors == [], script_errors
        context.close()
    with FaceDB.open(db, readonly=True) as d:
        assert d.check().ok
        actors = {r.actor for r in d.audit(operation="remove")}
        assert len(actors) == 1 and actors.pop().startswith("key:")  # the admin key, as for the API
