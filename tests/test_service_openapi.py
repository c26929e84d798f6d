"""Property-based requests generated from the service's own OpenAPI document (schemathesis): whatever the
inputs, no answer is a 500, and every refusal is the one JSON error body."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from facedb.faces.pipeline import FacePipeline  # noqa: E402
from facedb.service.app import create_app  # noqa: E402
from facedb.service.config import ServiceSettings  # noqa: E402

from .conftest import FakeDetector, FakeEmbedder  # noqa: E402
from .servicekit import RED, make_db, png, wait_ready  # noqa: E402

# The app and its database exist at import time: schemathesis reads the OpenAPI document while collecting.
_DB = Path(tempfile.mkdtemp(prefix="facedb-openapi-")) / "db"
KEYS = make_db(_DB)
APP = create_app(ServiceSettings(db=_DB, max_upload_mb=1, fold_window=0),
                 model=FacePipeline(FakeEmbedder(), detector=FakeDetector()), sender=lambda *a: 200)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module")
def api():
    keys = KEYS
    with TestClient(APP) as client:
        wait_ready(client)
        h = {"X-API-Key": keys["admin"]}
        client.post("/v1/people/Ann/templates", files={"photos": ("a.png", png([RED], 1))}, headers=h)
        yield APP, keys
    shutil.rmtree(_DB.parent, ignore_errors=True)


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case, api):
    _, keys = api
    key = keys["admin"]
    if case.path.startswith("/v1/keys/") and case.method == "DELETE":
        key = keys["enroll"]  # never let a generated request revoke the key the run uses (403 instead)
    response = case.call(headers={"X-API-Key": key})
    case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                             response_schema_conformance])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) >= {"error", "message", "status"} and body["status"] == response.status_code
