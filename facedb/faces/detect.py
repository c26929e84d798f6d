"""Face detection: the :class:`Detector` protocol every detector meets, and facenet-pytorch's MTCNN (its wheel
ships the weights, so this runs offline). The other detector, YuNet (OpenCV), is in facedb/faces/yunet.py; which one
a database uses is its ``detector`` setting (``facedb init --detector``; docs/models.md).

Returns every face with its box, score and 5 landmarks (left eye, right eye, nose, left and right mouth
corner), all in the original image's pixel coordinates. Large photos are downscaled before detection
(``max_side``) for speed; the boxes are mapped back.

Photos of the same size are detected together (:meth:`MTCNNDetector.detect_many`): MTCNN's three networks run
once per pyramid scale for the whole batch instead of once per photo, which on a CPU removes most of torch's
per-call overhead on these small networks (an LFW photo, 250 x 250, is a few dozen tiny convolutions per
scale). The algorithm is the same, photo by photo (non-maximum suppression stays within each photo): the
faces found are the same as one photo at a time (checked in scripts/detect_agreement.py and the tests).

The three networks run on ``channels_last`` tensors: PyTorch's CPU max-pooling, most of P-net's time, is ~4x
faster in that layout; detection went from 22 to 36 LFW photos/s one at a time on one thread (43 in batches).
The arithmetic is the same up to float summation order: on 200 random LFW photos (``scripts/detect_agreement.py``,
``bench-results/detect-agreement.json``) the same 226 faces, scores within 6e-5, boxes within 3e-5 px for 225 of
them and 1.5 px for one (batching alone moves one by 5 px), and identical LFW verification decisions.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from ..errors import ModelUnavailableError


@dataclass(frozen=True)
class Face:
    """One detected face. ``box`` (x1, y1, x2, y2) and ``landmarks`` ((5, 2) x, y) are in the photo's pixel
    frame, clipped to it (what is reported and stored); ``raw_box`` is the detector's own box, which can reach
    past the edges for a face at the border (what aligners use, padding the crop), and ``raw_landmarks`` the
    detector's own landmarks in that same frame, unclipped (what landmark aligners such as sface's use)."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels, within the photo
    score: float  # MTCNN's output-stage probability, 0..1
    landmarks: np.ndarray  # (5, 2) x, y, within the photo
    raw_box: tuple[float, float, float, float] | None = None  # the detector's box, possibly past the edges
    raw_landmarks: np.ndarray | None = None  # (5, 2) x, y in raw_box's frame, unclipped
    #: True when no detector found this face and its landmarks are an assumed layout (crop mode's last resort:
    #: the photo taken as the face); such a face has score 0.0.
    assumed: bool = False

    @property
    def align_box(self) -> tuple[float, float, float, float]:
        return self.raw_box if self.raw_box is not None else self.box

    @property
    def align_landmarks(self) -> np.ndarray:
        """(5, 2) x, y landmarks in the frame ``align_box`` refers to (the pixels an aligner is given)."""
        return self.raw_landmarks if self.raw_landmarks is not None else self.landmarks

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)


DETECTORS = ("mtcnn", "yunet")


@runtime_checkable
class Detector(Protocol):
    """What the pipeline needs of a face detector (MTCNN and YuNet both meet it; tests/test_detectors.py is the
    contract both pass).

    ``detect(image)``: every face of an (H, W, 3) uint8 RGB image as :class:`Face` objects, highest score first:
    box (x1, y1, x2, y2) and five landmarks (the image's left eye, right eye, nose tip, left and right mouth
    corner; x, y in pixels, clipped to the image), the detector's own score in 0..1 (at least its
    ``min_score``), and the unclipped raw box and landmarks for alignment. An image too small to hold a face
    gives []. ``detect_many(images)``: the same for each image, in order (batched where the detector can).
    ``min_score`` (both): report faces down to this score instead of the detector's ``min_score`` (crop mode's
    second look; a detector may keep a floor of its own below which it reports nothing).
    """

    name: str
    min_face_size: int
    min_score: float
    max_side: int

    def detect(self, image: np.ndarray, min_score: float | None = None) -> list[Face]: ...

    def detect_many(self, images: list[np.ndarray], min_score: float | None = None) -> list[list[Face]]: ...


class MTCNNDetector:
    """MTCNN with facedb's settings.

    * ``min_face_size``: smallest face searched for, in pixels of the (downscaled) image (MTCNN's minsize).
    * ``min_score``: faces below this output-stage probability are dropped.
    * ``max_side``: photos whose longer side exceeds it are downscaled before detection.
    """

    name = "mtcnn"

    def __init__(self, min_face_size: int = 20, min_score: float = 0.90, max_side: int = 1280,
                 device: str = "cpu", channels_last: bool = True) -> None:
        try:
            import torch
            from facenet_pytorch import MTCNN
        except ImportError as exc:
            raise ModelUnavailableError(
                f"face detection needs torch, torchvision and facenet-pytorch ({exc}); see docs/install.md"
            ) from None
        self.min_face_size = min_face_size
        self.min_score = min_score
        self.max_side = max_side
        self.device = device
        self._torch = torch
        self._mtcnn = MTCNN(min_face_size=min_face_size, keep_all=True, select_largest=False, device=device)
        if device == "cpu" and channels_last:
            for name in ("pnet", "rnet", "onet"):
                setattr(self._mtcnn, name, _channels_last(getattr(self._mtcnn, name), torch))
        self._lock = threading.Lock()

    #: Photos detected in one batch at most (memory: the pyramid of every photo in the batch at once).
    MAX_BATCH = 32

    def detect(self, image: np.ndarray, min_score: float | None = None) -> list[Face]:
        """Every face in an (H, W, 3) uint8 RGB image, highest score first; ``min_score`` instead of the
        detector's own (MTCNN's last stage reports nothing below 0.7 anyway)."""
        return self._detect([image], min_score)[0]

    def detect_many(self, images: list[np.ndarray], min_score: float | None = None) -> list[list[Face]]:
        """:meth:`detect` for each image; images of the same size (after the ``max_side`` downscale) go through
        MTCNN together, up to MAX_BATCH at a time."""
        return self._detect(images, min_score)

    def _detect(self, images: list[np.ndarray], min_score: float | None = None) -> list[list[Face]]:
        out: list[list[Face]] = [[] for _ in images]
        groups: dict[tuple[int, ...], list[tuple[int, np.ndarray, float]]] = {}
        for i, image in enumerate(images):
            h, w = image.shape[:2]
            scale = 1.0
            if max(h, w) > self.max_side:
                scale = self.max_side / max(h, w)
                small = Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                      Image.BILINEAR)
                image = np.asarray(small)
            if min(image.shape[:2]) < 12:  # smaller than MTCNN's 12-pixel input window: nothing to find
                continue
            groups.setdefault(image.shape, []).append((i, image, scale))
        for group in groups.values():
            for start in range(0, len(group), self.MAX_BATCH):
                part = group[start:start + self.MAX_BATCH]
                batch = np.stack([image for _, image, _ in part])
                with self._lock, self._torch.inference_mode():
                    boxes, probs, points = self._mtcnn.detect(batch, landmarks=True)
                for (i, _, scale), b, p, pts in zip(part, boxes, probs, points):
                    h, w = images[i].shape[:2]
                    out[i] = self._faces(b, p, pts, scale, w, h, min_score)
        return out

    def _faces(self, boxes: np.ndarray | None, probs: np.ndarray, points: np.ndarray, scale: float, w: int,
               h: int, min_score: float | None = None) -> list[Face]:
        if boxes is None:
            return []
        floor = self.min_score if min_score is None else min_score
        faces = [
            in_frame(tuple(float(c) / scale for c in box), float(p), np.asarray(pts, dtype=np.float64) / scale, w, h)
            for box, p, pts in zip(boxes, probs, points)
            if p is not None and p >= floor
        ]
        return sorted(faces, key=lambda f: -f.score)


def _channels_last(net: Any, torch: Any) -> Any:
    """``net`` with its weights, and every input it is given, in the channels_last memory layout."""
    net = net.to(memory_format=torch.channels_last)
    forward = net.forward
    net.forward = lambda x: forward(x.contiguous(memory_format=torch.channels_last))
    return net


def in_frame(box: tuple[float, ...], score: float, landmarks: np.ndarray, width: int, height: int) -> Face:
    """A Face whose box and landmarks are clipped to a ``width`` x ``height`` photo (keeping the raw box)."""
    x1, y1, x2, y2 = box
    clipped = (min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width),
               min(max(y2, 0.0), height))
    pts = np.column_stack([np.clip(landmarks[:, 0], 0, width), np.clip(landmarks[:, 1], 0, height)])
    return Face(clipped, score, pts, (x1, y1, x2, y2), np.asarray(landmarks, dtype=np.float64))
