"""The contracts of facedb/testing/contracts.py, run for every registered index kind and for the SQLite store."""

from __future__ import annotations

import pytest

from facedb.gallery.index import IndexPlace, backend_for, index_kinds
from facedb.gallery.store import Store
from facedb.testing import contracts

KINDS = sorted(index_kinds())


def place_for(kind: str, root) -> IndexPlace:
    """Where each kind persists in a test: FAISS beside the store; Milvus in a Milvus Lite database (the client
    API in process: a test double for a Milvus server, skipped where pymilvus is not installed)."""
    if kind == "milvus":
        pytest.importorskip("pymilvus", reason="pymilvus is not installed (pip install 'facedb[milvus]')")
        return IndexPlace(root, options={"milvus_uri": str(root / "milvus.db"), "milvus_collection": "contract",
                                         "model_id": "contract", "database_id": "contract-db"})
    return IndexPlace(root)


@pytest.mark.parametrize("kind", KINDS)
def test_index_backend_contract(tmp_path, kind):
    place = place_for(kind, tmp_path)
    contracts.check_index_backend(backend_for(kind), kind, tmp_path, place=place)


@pytest.mark.parametrize("kind", KINDS)
def test_engine_contract(tmp_path, kind):
    place = place_for(kind, tmp_path)
    contracts.check_engine(backend_for(kind), kind, tmp_path, place=place)


def test_store_contract(tmp_path):
    contracts.check_store(lambda path: Store.create(path, {"model_id": "contract", "dim": "8", "threshold": "0.5"}),
                          tmp_path)


def test_contracts_can_fail(tmp_path):
    """The checks are not vacuous: a backend whose search ignores removals is caught."""
    from facedb.gallery.index.faiss_kinds import FaissBackend

    class Forgetful(FaissBackend):
        def new(self, kind, dim, params, train, place):
            index = super().new(kind, dim, params, train, place)
            index.remove = lambda ids: None  # removal silently does nothing
            return index

    with pytest.raises(AssertionError, match=r"removed|live"):
        contracts.check_index_backend(Forgetful(), "flat", tmp_path)


def test_write_through_contract_can_fail(tmp_path):
    """The write-through checks are not vacuous: a Milvus backend whose read-only handles write is caught."""
    pytest.importorskip("pymilvus", reason="pymilvus is not installed (pip install 'facedb[milvus]')")
    from dataclasses import replace

    from facedb.gallery.index.milvus import MilvusBackend

    class Leaky(MilvusBackend):
        def load(self, place, stamp, dim):
            return super().load(replace(place, readonly=False), stamp, dim)  # ignores read-only

    with pytest.raises(AssertionError, match="read-only"):
        contracts.check_index_backend(Leaky(), "milvus", tmp_path, place=place_for("milvus", tmp_path))


def test_the_cli_offers_every_registered_index_kind():
    """`facedb init --index` / `reindex --index` take their choices from IndexKind: a backend registered without
    its kind there would be usable from Python and refused by the CLI, silently."""
    from facedb.cli.admin import IndexKind

    assert {k.value for k in IndexKind} == set(index_kinds()) | {"auto"}
