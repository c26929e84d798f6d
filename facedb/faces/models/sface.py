"""SFace (OpenCV Zoo, ``face_recognition_sface_2021dec.onnx``, Apache-2.0): 128-d, L2-normalised, run with
onnxruntime. The one module of facedb that imports onnxruntime, and only when the model is loaded.

Alignment is what OpenCV's ``FaceRecognizerSF.alignCrop`` does: the similarity transform (rotation, uniform
scale, translation; least squares, Umeyama) that takes the detector's five landmarks (eyes, nose tip, mouth
corners: MTCNN's, in the frame the pipeline aligns in) onto the ArcFace 112x112 template, then a bilinear warp
with a black border.

Pixels: the graph itself subtracts 127.5 and multiplies by 1/128 (its first two nodes), so it is fed raw 0-255
values, float32, NCHW, 1x3x112x112 (the batch dimension is fixed at 1 in the published graph). Channel order:
OpenCV's ``FaceRecognizerSF.feature`` calls ``blobFromImage(crop, 1, (112, 112), 0, swapRB=True)`` on a BGR
image, i.e. it feeds RGB; facedb's photos are RGB already, so crops go in as they are. Checked against
``cv2.FaceRecognizerSF`` (opencv-python-headless 4.13) on LFW photos: see ``tests/test_sface.py``.

Providers: onnxruntime's CUDA provider when the device is ``cuda`` and onnxruntime offers it
(``onnxruntime-gpu``), else the CPU with ``FACEDB_THREADS`` threads (default 1, as for torch).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from ...errors import InvalidInputError, ModelUnavailableError
from ...gallery.settings import threads_setting
from .weights import resolve_weights

MODEL_ID = "sface"
SIZE = 112
DIM = 128

#: The ArcFace / InsightFace five-point template for 112x112 crops (x, y in pixels): left eye, right eye, nose
#: tip, left and right mouth corner, as seen in the image. OpenCV's alignCrop uses the same points.
TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                     [70.7299, 92.2041]], dtype=np.float64)


def similarity_transform(src: np.ndarray, dst: np.ndarray = TEMPLATE) -> np.ndarray:
    """The 2x3 matrix of the similarity transform (rotation, uniform scale, translation) that best maps the
    (n, 2) points ``src`` onto ``dst`` in the least-squares sense (Umeyama 1991), in pixel-index coordinates.
    InvalidInputError for points that do not define one (fewer than 2, NaN, all in one place)."""
    src = np.asarray(src, dtype=np.float64)
    if src.ndim != 2 or src.shape != dst.shape or not np.isfinite(src).all():
        raise InvalidInputError(f"alignment needs {len(dst)} finite (x, y) landmarks, got shape {src.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    var_s = float((sc ** 2).sum()) / len(src)
    if var_s < 1e-9:
        raise InvalidInputError("the landmarks are all in one place: no alignment is defined")
    cov = dc.T @ sc / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[-1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = float((s * d).sum()) / var_s
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]])


def warp(image: np.ndarray, matrix: np.ndarray, size: int = SIZE) -> np.ndarray:
    """``image`` (H, W, 3) uint8 warped by the 2x3 ``matrix`` (source pixel -> output pixel, pixel-index
    coordinates, as ``cv2.warpAffine`` takes it): a (size, size, 3) uint8 crop, bilinear, black outside the
    image, rounded to nearest (as OpenCV's warp is; within 1-2 levels of it per pixel)."""
    inv = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    h, w = image.shape[:2]

    def at(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """The pixels at integer (xs, ys), black where outside the image (no copy of the image is made)."""
        inside = ((xs >= 0) & (xs < w) & (ys >= 0) & (ys < h))[..., None]
        return image[np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)].astype(np.float32) * inside

    top = at(x0, y0) * (1 - fx) + at(x0 + 1, y0) * fx
    bottom = at(x0, y0 + 1) * (1 - fx) + at(x0 + 1, y0 + 1) * fx
    out = top * (1 - fy) + bottom * fy
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def align_crop(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The (112, 112, 3) uint8 crop SFace expects from an (H, W, 3) uint8 image and the face's (5, 2) landmarks
    (x, y in that image's pixels)."""
    return warp(image, similarity_transform(landmarks))


def _session(path: Path, device: str) -> object:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelUnavailableError("sface needs onnxruntime: pip install 'facedb[sface]' (docs/install.md)"
                                    ) from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the published graph lists its weights as inputs: one warning per tensor
    threads = threads_setting()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for a file it cannot read
        raise ModelUnavailableError(f"{path} cannot be loaded by onnxruntime: {str(exc).splitlines()[0][:200]}"
                                    ) from None


class SFace:
    """The SFace embedder: :meth:`align` to 112x112 crops by five landmarks, :meth:`embed` to unit rows."""

    model_id = MODEL_ID
    dim = DIM
    holds_gil = False  # onnxruntime releases the GIL while it runs

    def __init__(self, session: object, path: Path) -> None:
        self._session = session
        self.path = path
        self._input = session.get_inputs()[0].name  # type: ignore[attr-defined]
        self._lock = threading.Lock()

    @classmethod
    def load(cls, *, weights: Path | None = None, device: str = "cpu") -> SFace:
        """Find the weights (explicit file, cache, carrier package, download: each checked against the pinned
        SHA-256; see weights.py) and start an onnxruntime session."""
        path = resolve_weights(MODEL_ID, explicit=weights)
        return cls(_session(path, device), path)

    def align(self, image: np.ndarray, face: object) -> np.ndarray:
        """(H, W, 3) uint8 RGB image + a detected face -> (112, 112, 3) uint8 RGB crop."""
        return align_crop(image, face.align_landmarks)  # type: ignore[attr-defined]

    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        """(n, 112, 112, 3) uint8 RGB crops -> (n, 128) float32 unit rows (cosine similarity, higher is more
        similar). One crop per run: the published graph's batch dimension is fixed at 1."""
        if not crops:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = np.empty((len(crops), self.dim), dtype=np.float32)
        with self._lock:
            for i, crop in enumerate(crops):
                if crop.shape != (SIZE, SIZE, 3):
                    raise InvalidInputError(f"sface embeds {SIZE}x{SIZE} RGB crops, not {crop.shape}")
                x = np.ascontiguousarray(crop.transpose(2, 0, 1)[None], dtype=np.float32)
                out[i] = self._session.run(None, {self._input: x})[0][0]  # type: ignore[attr-defined]
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.maximum(norms, 1e-12)).astype(np.float32)
