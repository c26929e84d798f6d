"""Names as people read them: every list of people (Python API, CLI, HTTP, console) is in one order and
searched one way: case-insensitive, accent-insensitive, in a collation that is no locale's
(``facedb.gallery.store.name_sort_key``: base letters first, then accents, then case). Exact-name lookups stay exact."""

from __future__ import annotations

import re
import sqlite3
import warnings
from urllib.parse import quote

import pytest
from typer.testing import CliRunner

import facedb.faces.pipeline
from facedb import FaceDB, PersonNotFoundError
from facedb.cli import app
from facedb.db import STORE_FILE
from facedb.gallery.store import name_search_key, name_sort_key

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from facedb.service.app import create_app
from facedb.service.config import ServiceSettings

from .servicekit import console_login, make_db, wait_ready

# lower case, upper case, accented, and names alike but for case or an accent; enrolled in this (no) order
NAMES = ["zoe", "Émile", "Bob", "anna", "Zoë", "Straße", "Ángel", "bea", "José", "emma", "Anna", "Łukasz", "angel"]
# base letters case- and accent-insensitively first, then accents (none first), then case (upper first)
ORDER = ["angel", "Ángel", "Anna", "anna", "bea", "Bob", "Émile", "emma", "José", "Łukasz", "Straße", "zoe", "Zoë"]
SEARCHES = {
    "jose": ["José"],
    "JOSÉ": ["José"],
    "Jose\u0301": ["José"],  # typed decomposed (NFD), as a macOS file name has it
    "ÉMILE": ["Émile"],
    "émile": ["Émile"],
    "emile": ["Émile"],
    "ANGEL": ["angel", "Ángel"],
    "ángel": ["angel", "Ángel"],
    "an": ["angel", "Ángel", "Anna", "anna"],
    "zoë": ["zoe", "Zoë"],
    "strasse": ["Straße"],
    "STRASSE": ["Straße"],
    "lukasz": ["Łukasz"],
    "b": ["bea", "Bob"],
    "équipe": ["Bob"],  # his external id
    "%": [],  # the query is text, not a pattern
    "_": [],
    "nobody": [],
}


def fill(db: FaceDB) -> None:
    for name in NAMES:
        db.add_person(name, external_id="EQUIPE-7" if name == "Bob" else None)


@pytest.fixture
def api(tmp_path):
    with FaceDB.create(tmp_path / "db", model_id="m", dim=4, threshold=0.5) as db:
        fill(db)
        yield db


# ----------------------------------------------------------------------------------------------- the key
def test_the_key_is_case_then_accent_insensitive_first():
    assert sorted(["zoe", "Émile", "bea", "Bob", "anna", "Ángel"], key=name_sort_key) == \
        ["Ángel", "anna", "bea", "Bob", "Émile", "zoe"]
    assert name_search_key("ÉMILE") == name_search_key("emile") == "emile"
    assert name_search_key("Straße") == "strasse" and name_search_key("Łódź") == "lodz"
    assert name_search_key("Ｊｏｓé") == "jose"  # full-width letters are letters
    # marks that spell another letter in their script are not accents
    assert name_search_key("が") != name_search_key("か")
    assert name_sort_key("José") == name_sort_key("Jose\u0301")  # NFC first: one name, one key


# --------------------------------------------------------------------------------------------- Python API
def test_api_lists_in_the_one_order(api):
    assert [p.name for p in api.people()] == ORDER
    assert [p.name for p in api.people(limit=4, offset=1)] == ORDER[1:5]
    pages = [p.name for off in range(0, len(ORDER), 5) for p in api.people(limit=5, offset=off)]
    assert pages == ORDER


@pytest.mark.parametrize("query", list(SEARCHES))
def test_api_search_is_case_and_accent_insensitive(api, query):
    assert [p.name for p in api.people(query)] == SEARCHES[query]
    assert api.count_people(query) == len(SEARCHES[query])


def test_exact_name_lookups_stay_exact(api):
    assert api.person("anna").name == "anna" and api.person("Anna").name == "Anna"
    assert api.person("Jose\u0301").name == "José"  # the NFC form of the same name, as before
    for other in ("ANNA", "jose", "Emile", "Angel"):
        with pytest.raises(PersonNotFoundError):
            api.person(other)
        with pytest.raises(PersonNotFoundError):
            api.remove_person(other)
    api.add_person("ANNA")  # another person, not a duplicate of "anna"
    assert [p.name for p in api.people("anna")] == ["ANNA", "Anna", "anna"]


def test_rename_and_external_id_changes_move_and_find_the_person(api):
    api.rename_person("zoe", "Ãda")
    assert [p.name for p in api.people()][:2] == ["Ãda", "angel"]
    assert [p.name for p in api.people("ada")] == ["Ãda"] and api.people("zoe") == api.people("Zoë")
    api.update_person("Ãda", external_id="Ñ-42")
    assert [p.name for p in api.people("n-4")] == ["Ãda"]
    api.update_person("Bob", clear_external_id=True)
    assert api.people("equipe") == []
    api.merge_people("Zoë", "Émile")
    assert "Zoë" not in [p.name for p in api.people()] and [p.name for p in api.people("EMILE")] == ["Émile"]


def test_a_database_from_before_the_keys_lists_alike_read_only_and_is_migrated(tmp_path):
    root = tmp_path / "db"
    with FaceDB.create(root, model_id="m", dim=4, threshold=0.5) as db:
        fill(db)
    conn = sqlite3.connect(root / STORE_FILE)  # back to schema 10: no stored keys
    conn.executescript("DROP INDEX people_sort; ALTER TABLE people DROP COLUMN sort_key; "
                       "ALTER TABLE people DROP COLUMN search_key; PRAGMA user_version = 10;")
    conn.close()
    with FaceDB.open(root, readonly=True) as db:  # (`facedb people` opens read-only: nothing migrates)
        assert [p.name for p in db.people()] == ORDER
        assert [p.name for p in db.people(limit=3, offset=2)] == ORDER[2:5]
        for query, want in SEARCHES.items():
            assert [p.name for p in db.people(query)] == want and db.count_people(query) == len(want), query
    with FaceDB.open(root) as db:
        assert [p.name for p in db.people()] == ORDER and [p.name for p in db.people("jose")] == ["José"]
    conn = sqlite3.connect(root / STORE_FILE)
    stored = conn.execute("SELECT name, sort_key FROM people").fetchall()
    conn.close()
    assert all(key == name_sort_key(name) for name, key in stored) and len(stored) == len(NAMES)


def test_an_encrypted_database_lists_and_searches_alike(tmp_path, monkeypatch):
    pytest.importorskip("sqlcipher3", reason="the crypto extra is not installed")
    from facedb.protection.keyring import generate_key

    monkeypatch.delenv("FACEDB_KEY", raising=False)
    key = generate_key()
    with FaceDB.create(tmp_path / "enc", model_id="m", dim=4, threshold=0.5, encrypt=True, key=key) as db:
        fill(db)
    with FaceDB.open(tmp_path / "enc", readonly=True, key=key) as db:
        assert [p.name for p in db.people()] == ORDER and [p.name for p in db.people("ÉMILE")] == ["Émile"]


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_people_lists_and_searches_alike(tmp_path, monkeypatch, fake_pipeline):
    import json

    monkeypatch.setattr(facedb.faces.pipeline, "get_pipeline", lambda *a, **k: fake_pipeline)
    root = tmp_path / "db"
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(app, ["--db", str(root), *args])
        assert result.exit_code == 0, result.output
        return result

    run("init", "--model", "m", "--dim", "4")
    for name in NAMES:
        run("add-person", name, *(["--external-id", "EQUIPE-7"] if name == "Bob" else []))

    def names(*args):
        return [json.loads(line)["name"] for line in run("--json", "people", *args).stdout.splitlines()
                if line.strip()]

    assert names() == ORDER
    assert names("--limit", "4", "--offset", "1") == ORDER[1:5]
    for query, want in SEARCHES.items():
        assert names("--query", query) == want, query
    table = run("people").stdout
    assert [table.index(n) for n in ORDER] == sorted(table.index(n) for n in ORDER)  # the table too


# --------------------------------------------------------------------------------------- HTTP and console
@pytest.fixture
def svc(tmp_path, fake_pipeline):
    path = tmp_path / "db"
    keys = make_db(path)
    with FaceDB.open(path) as db:
        fill(db)
    app_ = create_app(ServiceSettings(db=path, fold_window=0.0), model=fake_pipeline,
                      sender=lambda url, body, headers: 200)
    with TestClient(app_, raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client, keys


def test_http_lists_and_searches_alike(svc):
    client, keys = svc
    headers = {"X-API-Key": keys["enroll"]}

    def names(**params):
        r = client.get("/v1/people", params=params, headers=headers)
        assert r.status_code == 200, r.text
        return [p["name"] for p in r.json()["people"]], r.json()["total"]

    assert names() == (ORDER, len(ORDER))
    assert names(limit=4, offset=1) == (ORDER[1:5], len(ORDER))
    for query, want in SEARCHES.items():
        assert names(query=query) == (want, len(want)), query
    # exact-name routes stay exact
    assert client.get("/v1/people/anna", headers=headers).json()["name"] == "anna"
    assert client.get(f"/v1/people/{quote('JOSÉ')}", headers=headers).status_code == 404


def test_console_people_page_lists_and_searches_alike(svc):
    client, keys = svc
    r = console_login(client, keys["enroll"], follow_redirects=True)
    assert r.status_code == 200

    def names(q=""):
        page = client.get("/console/people", params={"q": q} if q else None)
        assert page.status_code == 200
        return re.findall(r'<td><a href="/console/people/[^"]*">([^<]*)</a></td>', page.text)

    assert names() == ORDER
    for query, want in SEARCHES.items():
        assert names(query) == want, query
