"""Databases written by the previous release open in this one (the folder move, cdbc5f2, must not have changed
anything on disk). ``tests/data/v14-encrypted`` was made by the code just before that move (``cdbc5f2^``):
``FaceDB.create(..., model_id="vec-test", dim=8, threshold=0.5, encrypt=True, index="flat")`` and three templates
(numpy's default_rng(3), normal, unit length: Ada Lovelace x2, Alan Turing x1); its key is beside it. The move's
search-and-replace of module paths had also renamed the keyring file (``facedb.keys`` ->
``facedb.operations.keys``), so this database would not open: found by a newcomer trying the release."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from facedb import FaceDB
from facedb.cli import app
from facedb.errors import WrongKeyError
from facedb.protection.keyring import KEYRING_FILE, MISNAMED_KEYRING_FILE, generate_key

DATA = Path(__file__).parent / "data"
KEY = (DATA / "v14-encrypted.key").read_text().strip()


def _probes() -> np.ndarray:
    x = np.random.default_rng(3).standard_normal((3, 8)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def old_db(tmp_path) -> Path:
    root = tmp_path / "v14-encrypted"
    shutil.copytree(DATA / "v14-encrypted", root)
    return root


def test_the_keyring_keeps_its_name_on_disk():
    assert KEYRING_FILE == "facedb.keys"  # a file format: it does not follow module renames


def test_an_encrypted_database_of_the_previous_release_opens_and_answers(old_db):
    x = _probes()
    with FaceDB.open(old_db, key=KEY) as db:
        assert [p.name for p in db.people()] == ["Ada Lovelace", "Alan Turing"]
        assert [a.identity for a in db.identify(x)] == ["Ada Lovelace", "Ada Lovelace", "Alan Turing"]
        assert db.check().ok
    res = CliRunner().invoke(app, ["--db", str(old_db), "check"], env={"FACEDB_KEY": KEY})
    assert res.exit_code == 0, res.output
    with pytest.raises(WrongKeyError, match=r"facedb\.keys"):
        FaceDB.open(old_db, key=generate_key())


def test_a_keyring_misnamed_by_a_development_build_is_renamed_back(old_db):
    (old_db / KEYRING_FILE).rename(old_db / MISNAMED_KEYRING_FILE)
    with FaceDB.open(old_db, key=KEY) as db:
        assert db.person("Alan Turing").templates == 1
    assert (old_db / KEYRING_FILE).is_file() and not (old_db / MISNAMED_KEYRING_FILE).exists()
    with FaceDB.open(old_db, key=KEY) as db:  # and it stays found
        assert db.check().ok
