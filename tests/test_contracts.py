"""The contracts of facedb/contracts.py, run for every registered index kind and for the SQLite store."""

from __future__ import annotations

import pytest

from facedb import contracts
from facedb.index import backend_for, index_kinds
from facedb.store import Store

KINDS = sorted(index_kinds())


@pytest.mark.parametrize("kind", KINDS)
def test_index_backend_contract(tmp_path, kind):
    contracts.check_index_backend(backend_for(kind), kind, tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_engine_contract(tmp_path, kind):
    contracts.check_engine(backend_for(kind), kind, tmp_path)


def test_store_contract(tmp_path):
    contracts.check_store(lambda path: Store.create(path, {"model_id": "contract", "dim": "8", "threshold": "0.5"}),
                          tmp_path)


def test_contracts_can_fail(tmp_path):
    """The checks are not vacuous: a backend whose search ignores removals is caught."""
    from facedb.index.faiss_kinds import FaissBackend

    class Forgetful(FaissBackend):
        def new(self, kind, dim, params, train, place):
            index = super().new(kind, dim, params, train, place)
            index.remove = lambda ids: None  # removal silently does nothing
            return index

    with pytest.raises(AssertionError, match=r"removed|live"):
        contracts.check_index_backend(Forgetful(), "flat", tmp_path)
