"""Resolving FaceNet weights: explicit file, cache, and a checked download from a local HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import threading

import pytest

from facedb.errors import ModelUnavailableError
from facedb.faces.models import weights as W

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB of test bytes standing in for a weights file


class Handler(http.server.BaseHTTPRequestHandler):
    mode = "good"

    def do_GET(self):
        body = PAYLOAD
        if self.mode == "wrong":
            body = PAYLOAD[::-1]
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        if self.mode == "broken":
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.connection.shutdown(2)  # drop the connection half-way
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def spec(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    fake = W.WeightsFile("test-weights.pt", hashlib.sha256(PAYLOAD).hexdigest(), len(PAYLOAD))
    monkeypatch.setitem(W.WEIGHTS, "facenet-test", fake)
    return fake


def url(server):
    return f"http://127.0.0.1:{server.server_address[1]}/releases/"


def leftovers(tmp_path):
    d = tmp_path / "torch" / "checkpoints"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_good_download_lands_in_cache_and_is_reused(server, spec, tmp_path):
    Handler.mode = "good"
    path = W.resolve_weights("facenet-test", base_url=url(server))
    assert path == W.cache_dir() / spec.filename and path.read_bytes() == PAYLOAD
    Handler.mode = "wrong"  # a second resolve must not download again
    assert W.resolve_weights("facenet-test", base_url=url(server)) == path
    assert leftovers(tmp_path) == [spec.filename]


def test_checksum_mismatch_is_refused_and_leaves_nothing(server, spec, tmp_path):
    Handler.mode = "wrong"
    with pytest.raises(ModelUnavailableError, match="SHA-256") as err:
        W.resolve_weights("facenet-test", base_url=url(server))
    assert "dlib-resnet" in str(err.value) and "--weights" in str(err.value)
    assert leftovers(tmp_path) == []


def test_broken_connection_leaves_no_partial_file(server, spec, tmp_path):
    Handler.mode = "broken"
    with pytest.raises(ModelUnavailableError):
        W.resolve_weights("facenet-test", base_url=url(server))
    assert leftovers(tmp_path) == []


def test_corrupt_cached_file_is_replaced(server, spec, tmp_path):
    Handler.mode = "good"
    cached = W.cache_dir() / spec.filename
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"half a file")
    assert W.resolve_weights("facenet-test", base_url=url(server)).read_bytes() == PAYLOAD


def test_unreachable_server_gives_actionable_error(spec, monkeypatch):
    monkeypatch.setenv("FACEDB_WEIGHTS_URL", "http://127.0.0.1:9/")  # discard port: connection refused
    with pytest.raises(ModelUnavailableError) as err:
        W.resolve_weights("facenet-test")
    msg = str(err.value)
    assert "test-weights.pt" in msg and "FACEDB_WEIGHTS" in msg and "dlib-resnet" in msg


def test_explicit_file_wins_and_must_exist(tmp_path, spec):
    f = tmp_path / "mine.pt"
    f.write_bytes(b"x")
    assert W.resolve_weights("facenet-test", explicit=f) == f
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        W.resolve_weights("facenet-test", explicit=tmp_path / "missing.pt")
