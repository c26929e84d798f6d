"""Face embedding models behind one small protocol, and the registry of known models.

Importing this module is cheap: torch and dlib are imported only when a model is loaded.
Each model's default threshold lives here, in one unit (cosine similarity of unit vectors), with where it
came from. ``facedb calibrate`` replaces it per database with one measured for your target error rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import InvalidInputError, ModelUnavailableError


@dataclass(frozen=True)
class ModelSpec:
    id: str
    dim: int
    threshold: float  # cosine similarity; accept iff similarity >= threshold
    threshold_source: str
    flip_threshold: float | None = None  # the same, for embeddings with flip test-time augmentation
    flip_threshold_source: str = ""

    def default_threshold(self, flip: bool) -> tuple[float, str]:
        """(threshold, where it came from) for embeddings made with or without flip augmentation."""
        if flip and self.flip_threshold is not None:
            return self.flip_threshold, self.flip_threshold_source
        return self.threshold, self.threshold_source


MODELS: dict[str, ModelSpec] = {
    # Calibrated here for FAR 1e-3 (1:1) on 1.99M impostor pairs of LFW's peopleDevTrain.txt people, through
    # facedb's own pipeline (MTCNN, dlib 5-point chip); on the disjoint peopleDevTest people it gave FAR 9.0e-4
    # and TAR 93.0% (`python scripts/accuracy_report.py`). With flip augmentation, as new databases embed:
    # 0.929, FAR 8.6e-4 and TAR 94.7% there (`... --flip`). See README "Accuracy".
    "dlib-resnet": ModelSpec(
        "dlib-resnet", 128, 0.926, "calibrated: FAR 1e-3 (1:1) on LFW peopleDevTrain, MTCNN + dlib chip",
        0.929, "calibrated: FAR 1e-3 (1:1) on LFW peopleDevTrain, MTCNN + dlib chip, flip",
    ),
    # The FaceNet weights cannot be downloaded where facedb's numbers were measured, so these two are not
    # measured by us: 0.40 = squared L2 1.20, near the best LFW threshold reported for Sandberg's 20180402
    # model in his validate_on_lfw runs. Calibrate (`facedb calibrate`) before relying on it.
    "facenet-vggface2": ModelSpec(
        "facenet-vggface2", 512, 0.40, "provisional: squared-L2 1.2 from Sandberg's LFW validation; not calibrated"
    ),
    "facenet-casia": ModelSpec(
        "facenet-casia", 512, 0.40, "provisional: squared-L2 1.2 from Sandberg's LFW validation; not calibrated"
    ),
}

DEFAULT_MODEL = "facenet-vggface2"
OFFLINE_MODEL = "dlib-resnet"


class Embedder(Protocol):
    """A face embedding model: aligned crops in, unit float32 rows out.

    ``align`` turns a detected face (box and 5 landmarks, in the image's pixel coordinates) into the crop
    the model expects; ``embed`` maps a list of crops to ``float32[n, dim]`` rows of unit length.
    """

    model_id: str
    dim: int
    #: True when ``embed`` keeps Python's GIL (dlib): detection can then only overlap with it in another
    #: process. False for torch models, whose threads already use every core.
    holds_gil: bool

    def align(self, image: np.ndarray, face: object) -> np.ndarray: ...

    def embed(self, crops: list[np.ndarray]) -> np.ndarray: ...


def spec_for(model_id: str, dim: int | None = None) -> ModelSpec:
    """The spec of a known model, or of your own model id when ``dim`` is given (threshold 0.5, uncalibrated)."""
    if model_id in MODELS:
        spec = MODELS[model_id]
        if dim is not None and dim != spec.dim:
            raise InvalidInputError(f"{model_id} gives {spec.dim}-d vectors, not {dim}-d")
        return spec
    if model_id.startswith("facenet-custom-"):
        return ModelSpec(model_id, dim or 512, 0.40, "provisional: FaceNet default; calibrate")
    if dim is None:
        raise InvalidInputError(
            f"unknown model {model_id!r}: use one of {', '.join(MODELS)}, or give --dim for your own vectors"
        )
    return ModelSpec(model_id, int(dim), 0.5, "uncalibrated: your own model; run `facedb calibrate`")


def single_threaded() -> None:
    """Limit this process's torch to one thread (for worker processes that share the cores with others)."""
    import torch

    torch.set_num_threads(1)


def choose_default_model(weights: Path | None = None) -> tuple[str, str | None]:
    """FaceNet-VGGFace2 when its weights can be had (file, cache or download), else dlib-resnet.

    Returns (model id, a note for the user or None).
    """
    from .weights import resolve_weights

    try:
        resolve_weights("facenet-vggface2", explicit=weights)
        return DEFAULT_MODEL, None
    except ModelUnavailableError as exc:
        reason = str(exc).splitlines()[0]
    if not _dlib_available():
        raise ModelUnavailableError(
            f"no model can be loaded: {reason}; and dlib is not installed (pip install 'facedb[dlib]')"
        )
    return OFFLINE_MODEL, (
        f"note: using {OFFLINE_MODEL} (128-d dlib ResNet, works offline) because the FaceNet weights could not "
        f"be had ({reason}). For FaceNet: `facedb init --model facenet-vggface2 --weights FILE.pt`."
    )


def _dlib_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("dlib", "face_recognition_models"))


def load_embedder(model_id: str, *, weights: Path | None = None, device: str = "cpu") -> Embedder:
    """Load a model by id. ``weights`` (FaceNet only) is an explicit weights file."""
    if model_id == "dlib-resnet":
        from .dlib_resnet import DlibResNet

        return DlibResNet()
    if model_id in ("facenet-vggface2", "facenet-casia") or model_id.startswith("facenet-custom-"):
        from .facenet import FaceNet

        return FaceNet.load(model_id, weights=weights, device=device)
    raise ModelUnavailableError(f"facedb cannot compute {model_id!r} embeddings itself; add vectors through the API")
