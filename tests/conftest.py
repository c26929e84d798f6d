"""Shared fixtures. The fakes here are test doubles, named as such: they never stand in for a real model
outside the tests. Real-face tests use the photos under FACEDB_TEST_DATA (default ../shared/facedata)."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from facedb.faces.detect import Face
from facedb.faces.pipeline import FacePipeline

# A suite started in the background by a non-interactive shell (`make test &`, a CI step without job control)
# inherits SIGINT *ignored* (POSIX), and so would every facedb process the tests start: the Ctrl-C tests would
# see their signal dropped (exit 0 instead of 130). The tests need the terminal's default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _sigint_handler_unchanged():
    """A test that leaves this process's Ctrl-C handler changed (an in-process server, a library installing its
    own) makes later Ctrl-C tests lose their signal: fail the test that did it, and put the handler back."""
    before = signal.getsignal(signal.SIGINT)
    yield
    after = signal.getsignal(signal.SIGINT)
    if after is not before:
        signal.signal(signal.SIGINT, before)
        pytest.fail(f"the test left the SIGINT handler changed: {before!r} -> {after!r}")

REPO = Path(__file__).resolve().parent.parent


def test_data_dir() -> Path:
    return Path(os.environ.get("FACEDB_TEST_DATA", REPO.parent / "shared" / "facedata"))


@pytest.fixture(scope="session")
def facedata() -> Path:
    root = test_data_dir()
    if not (root / "lfw_deepfunneled").is_dir():
        pytest.skip(f"labelled face photos not found at {root} (set FACEDB_TEST_DATA)")
    return root


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class FakeEmbedder:
    """Deterministic test double for a face model: a crop's mean colour picks a direction (the "identity"),
    its exact pixels add a little seeded noise. Same crop -> same vector; same colour -> same person."""

    model_id = "fake-colour"
    dim = 32
    holds_gil = False

    def __init__(self, noise: float = 0.05) -> None:
        self.noise = noise

    def align(self, image: np.ndarray, face: Face) -> np.ndarray:
        x1, y1, x2, y2 = (int(round(c)) for c in face.box)
        return image[y1:y2, x1:x2]

    def _identity(self, colour: np.ndarray) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256((colour // 32).astype(np.int64).tobytes()).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal(self.dim)

    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        out = []
        for crop in crops:
            base = self._identity(crop.reshape(-1, 3).mean(axis=0))
            seed = int.from_bytes(hashlib.sha256(crop.tobytes()).digest()[:8], "little")
            v = base + self.noise * np.random.default_rng(seed).standard_normal(self.dim) * np.sqrt(self.dim)
            out.append(v / np.linalg.norm(v))
        return np.array(out, dtype=np.float32).reshape(-1, self.dim)


class FakeDetector:
    """Test double for MTCNN: every non-black 40x40 tile (on a black background) is a "face"."""

    def detect(self, image: np.ndarray) -> list[Face]:
        faces = []
        h, w = image.shape[:2]
        for y in range(0, h - 39, 40):
            for x in range(0, w - 39, 40):
                tile = image[y:y + 40, x:x + 40]
                if tile.max() > 0:
                    lm = np.array([[x + 12, y + 15], [x + 28, y + 15], [x + 20, y + 22], [x + 14, y + 30],
                                   [x + 26, y + 30]], dtype=np.float64)
                    faces.append(Face((float(x), float(y), float(x + 40), float(y + 40)), 0.99, lm))
        return faces


def face_image(colours: list[tuple[int, int, int]], seed: int = 0) -> np.ndarray:
    """A synthetic photo: one 40x40 "face" tile per colour, on black, with a little seeded texture."""
    rng = np.random.default_rng(seed)
    img = np.zeros((40, 40 * max(1, len(colours)), 3), dtype=np.uint8)
    for i, c in enumerate(colours):
        tile = np.clip(np.array(c, dtype=np.int16) + rng.integers(-3, 4, (40, 40, 3)), 1, 255)
        img[:, 40 * i:40 * (i + 1)] = tile.astype(np.uint8)
    return img


@pytest.fixture
def fake_pipeline() -> FacePipeline:
    return FacePipeline(FakeEmbedder(), detector=FakeDetector())  # type: ignore[arg-type]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
