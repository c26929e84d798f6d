"""Photo -> faces -> aligned crops -> embeddings. Models load lazily, once per process.

After a fork, torch (and faiss) can deadlock in the child, so any parallelism around this module must use
the ``spawn`` start method or threads. ``prepare`` (decode, detect, choose, align) is what enrolment runs in
worker processes beside the embedder: dlib's embedder holds the GIL, so a thread cannot overlap with it.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .detect import Face, MTCNNDetector
from .errors import FaceDBError
from .images import Photo, PhotoSource, display_name, load_photo
from .models import Embedder, load_embedder, single_threaded
from .records import Skipped

ON_MULTIPLE = ("error", "largest", "skip")


def _default_device() -> str:
    return os.environ.get("FACEDB_DEVICE", "cpu")


@dataclass(frozen=True)
class DetectorSettings:
    """Detection settings; ``device`` (``cpu`` or ``cuda``, default ``$FACEDB_DEVICE`` or cpu) also places the
    embedder."""

    min_face_size: int = 20
    min_score: float = 0.90
    max_side: int = 1280
    device: str = field(default_factory=_default_device)


@dataclass
class Analysed:
    photo: Photo
    faces: list[Face]


class FacePipeline:
    """A detector and an embedder used together. Build once, reuse (both are thread-safe)."""

    def __init__(self, embedder: Embedder, settings: DetectorSettings | None = None,
                 detector: MTCNNDetector | None = None) -> None:
        self.embedder = embedder
        self.settings = settings or DetectorSettings()
        self._detector = detector

    @property
    def model_id(self) -> str:
        return self.embedder.model_id

    @property
    def detector(self) -> MTCNNDetector:
        if self._detector is None:
            s = self.settings
            self._detector = _detector(s)
        return self._detector

    def analyse(self, source: PhotoSource, name: str | None = None) -> Analysed:
        """Decode and detect (ImageError for a bad photo)."""
        photo = load_photo(source, name=name)
        return Analysed(photo, self.detector.detect(photo.pixels))

    def embed(self, items: list[tuple[Photo, Face]], flip: bool = False) -> np.ndarray:
        """Align each (photo, face) and embed all of them in one batched call: (n, dim) unit rows."""
        return self.embed_crops([self.embedder.align(photo.pixels, face) for photo, face in items], flip)

    def embed_crops(self, crops: list[np.ndarray], flip: bool = False) -> np.ndarray:
        """(n, dim) unit rows for aligned crops. With ``flip`` (test-time augmentation), each row is the
        renormalised mean of the crop's and its mirror image's embedding: one batch of 2n crops."""
        if not flip or not crops:
            return self.embedder.embed(crops)
        both = self.embedder.embed(crops + [np.ascontiguousarray(c[:, ::-1]) for c in crops])
        vecs = both[: len(crops)] + both[len(crops):]
        return (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)


_LOCK = threading.Lock()
_EMBEDDERS: dict[tuple[str, str, str], Embedder] = {}
_DETECTORS: dict[DetectorSettings, MTCNNDetector] = {}


def _detector(settings: DetectorSettings) -> MTCNNDetector:
    with _LOCK:
        if settings not in _DETECTORS:
            _DETECTORS[settings] = MTCNNDetector(settings.min_face_size, settings.min_score, settings.max_side,
                                                 settings.device)
        return _DETECTORS[settings]


def get_pipeline(
    model_id: str, *, weights: Path | None = None, settings: DetectorSettings | None = None
) -> FacePipeline:
    """The process-wide pipeline for ``model_id`` (loaded on first use, then reused)."""
    settings = settings or DetectorSettings()
    weights = weights or (Path(os.environ["FACEDB_WEIGHTS"]) if os.environ.get("FACEDB_WEIGHTS") else None)
    key = (model_id, str(weights or ""), settings.device)
    with _LOCK:
        if key not in _EMBEDDERS:
            _EMBEDDERS[key] = load_embedder(model_id, weights=weights, device=settings.device)
        embedder = _EMBEDDERS[key]
    return FacePipeline(embedder, settings)


def choose_enrol_face(faces: list[Face], on_multiple: str) -> Face | str:
    """The face to enrol from a photo, or the reason to skip it."""
    if not faces:
        return "no face found"
    if len(faces) == 1:
        return faces[0]
    if on_multiple == "largest":
        return max(faces, key=lambda f: f.area)
    if on_multiple == "skip":
        return f"{len(faces)} faces found (skipped by --on-multiple skip)"
    return f"{len(faces)} faces found; enrolment needs one (use --on-multiple largest)"


@dataclass
class Prepared:
    """A photo ready to embed: the person it enrols, the store's image row (no pixels: this crosses process
    boundaries), the chosen face and its aligned crop."""

    name: str
    image: dict[str, object]
    face: Face
    crop: np.ndarray

    @property
    def sha256(self) -> str:
        return str(self.image["sha256"])

    @property
    def label(self) -> str:
        return str(self.image["path"])


def prepare(pipe: FacePipeline, items: list[tuple[str, PhotoSource]], on_multiple: str
            ) -> tuple[list[Prepared], list[Skipped]]:
    """Decode, detect, choose the face and align, for each (person, photo); no database access. A photo that
    fails is skipped with its reason."""
    ready, skipped = [], []
    for name, src in items:
        label = display_name(src) if isinstance(src, (str, os.PathLike)) else None
        try:
            analysed = pipe.analyse(src, name=label)
        except FaceDBError as exc:
            skipped.append(Skipped(label or "<photo>", str(exc)))
            continue
        chosen = choose_enrol_face(analysed.faces, on_multiple)
        if isinstance(chosen, str):
            skipped.append(Skipped(analysed.photo.name, chosen))
            continue
        crop = pipe.embedder.align(analysed.photo.pixels, chosen)
        ready.append(Prepared(name, analysed.photo.record(), chosen, crop))
    return ready, skipped


def auto_workers(photos: int, device: str = "cpu", holds_gil: bool = True) -> int:
    """Detection processes ``enroll`` starts by default: none for small jobs (starting one costs ~2-4 s,
    loading torch and the models), on a GPU, or for an embedder that releases the GIL (FaceNet: torch's
    threads already use every core, and a detection process only competes with them: measured 36% of the
    raw embedder with one against 54% with the thread); else one fewer than the CPU cores, at most 4."""
    if device != "cpu" or photos < 64 or not holds_gil:
        return 0
    return max(1, min(4, (os.cpu_count() or 1) - 1))


_WORKER_PIPELINE: FacePipeline | None = None


def _worker_start(model_id: str, weights: str | None, settings: DetectorSettings) -> None:
    single_threaded()  # one core per worker process: the parallelism is across processes
    global _WORKER_PIPELINE
    _WORKER_PIPELINE = get_pipeline(model_id, weights=Path(weights) if weights else None, settings=settings)


def worker_prepare(items: list[tuple[str, PhotoSource]], on_multiple: str) -> tuple[list[Prepared], list[Skipped]]:
    """``prepare`` in a worker process, with the pipeline its initializer loaded."""
    assert _WORKER_PIPELINE is not None, "worker not started"
    return prepare(_WORKER_PIPELINE, items, on_multiple)


def preparer_pool(workers: int, model_id: str, weights: Path | None, settings: DetectorSettings
                  ) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes running ``worker_prepare`` (each loads the models once).

    Spawned, not forked (see the module docstring); so, as with any spawned multiprocessing, a script using
    it must guard its entry point with ``if __name__ == "__main__":``."""
    import multiprocessing

    return ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_start,
        initargs=(model_id, str(weights) if weights else None, settings),
    )


def list_folder(folder: Path) -> list[tuple[str, list[Path]]]:
    """(person, photos) for each sub-folder of ``folder``: one level, sorted, hidden files skipped.

    Symbolic links to folders are not followed (no loops); links to files are.
    """
    if not folder.is_dir():
        raise FaceDBError(f"{folder} is not a folder")
    out = []
    for sub in sorted(folder.iterdir()):
        if sub.name.startswith(".") or sub.is_symlink() or not sub.is_dir():
            continue
        files = sorted(p for p in sub.iterdir() if not p.name.startswith(".") and p.is_file())
        if files:
            out.append((sub.name, files))
    return out
