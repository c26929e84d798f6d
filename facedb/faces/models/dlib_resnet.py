"""dlib's ResNet face descriptor (128-d; 99.38% on LFW per dlib), from ``dlib-bin`` + ``face_recognition_models``.

The model that needs no download at run time: for air-gapped sites, and for facedb's own real-face tests.
Alignment: dlib's 5-point shape predictor run in the MTCNN box, then ``get_face_chip`` to a 150x150 chip
with padding 0.25 (what ``compute_face_descriptor`` does internally). The descriptor is L2-normalised so
that scores are cosine similarities like every other model's.

``face_recognition_models`` imports ``pkg_resources``, which current setuptools no longer ships, so its
files are located with ``importlib.util.find_spec`` without importing it.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np

from ...errors import ModelUnavailableError

CHIP_SIZE = 150
CHIP_PADDING = 0.25


def model_file(name: str) -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError("dlib-resnet needs face_recognition_models: pip install 'facedb[dlib]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / name
    if not path.is_file():
        raise ModelUnavailableError(f"{path} is missing: reinstall face_recognition_models")
    return path


class DlibResNet:
    model_id = "dlib-resnet"
    dim = 128
    holds_gil = True

    def __init__(self) -> None:
        try:
            import dlib
        except ImportError:
            raise ModelUnavailableError("dlib-resnet needs dlib: pip install 'facedb[dlib]'") from None
        self._dlib = dlib
        self._shape = dlib.shape_predictor(str(model_file("shape_predictor_5_face_landmarks.dat")))
        self._net = dlib.face_recognition_model_v1(str(model_file("dlib_face_recognition_resnet_model_v1.dat")))
        self._lock = threading.Lock()

    def align(self, image: np.ndarray, face: object) -> np.ndarray:
        x1, y1, x2, y2 = face.align_box  # type: ignore[attr-defined]
        rect = self._dlib.rectangle(int(round(x1)), int(round(y1)), int(round(x2)), int(round(y2)))
        shape = self._shape(image, rect)
        return np.asarray(self._dlib.get_face_chip(image, shape, size=CHIP_SIZE, padding=CHIP_PADDING))

    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        """(n, 150, 150, 3) uint8 aligned chips -> (n, 128) float32 unit rows."""
        if not crops:
            return np.zeros((0, self.dim), dtype=np.float32)
        # One crop per call: dlib holds Python's GIL for a whole call, so a batch of 32 crops (16 photos with
        # flip) kept Ctrl-C and the detection thread waiting for 3-10 s on a busy machine; batching gained
        # nothing measurable here (6.5 s for 32 crops in one call, 3.6-6.3 s in 32 calls).
        desc = []
        for c in crops:
            with self._lock:
                desc.append(self._net.compute_face_descriptor(np.ascontiguousarray(c)))
        emb = np.array([np.asarray(d) for d in desc], dtype=np.float32)
        return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
