"""Photo -> faces -> aligned crops -> embeddings, and the scheduling of that work for many photos.

One path serves enrolment, evaluation and training: :func:`prepare` decodes a photo, detects faces, picks one
by a :class:`FaceChoice` rule and aligns it; :meth:`FacePipeline.embed_crops` embeds the crops in a batch.
:func:`prepared_chunks` runs ``prepare`` beside the embedder: in a thread, or in spawned worker processes
(dlib's embedder holds Python's GIL, so a thread cannot overlap with it).

Models load lazily, once per process. After a fork torch (and faiss) can deadlock in the child, so any
parallelism around this module uses the ``spawn`` start method or threads.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from .. import timings
from ..errors import FaceDBError, InvalidInputError
from ..fsio import sha256_file
from ..records import Skipped
from . import quality
from .detect import DETECTORS, Detector, Face, MTCNNDetector, in_frame
from .images import (
    MAX_FILE_BYTES,
    PHOTO_SUFFIXES,
    Photo,
    PhotoSource,
    display_name,
    is_photo_name,
    is_regular_file,
    load_photo,
)
from .models import Embedder, configure_threads, load_embedder, single_threaded


def _default_device() -> str:
    return os.environ.get("FACEDB_DEVICE", "cpu")


#: Each detector's default ``min_score``: its scores are on different scales. MTCNN's 0.90 is facedb's long-standing
#: floor; YuNet scores a clear frontal face 0.92-0.95 and at 0.90 missed 5.3% of ORL's faces and 1.1% of 1,000
#: LFW photos, at 0.70 none (scripts/bench_detect.py; docs/models.md, "Detectors").
DEFAULT_MIN_SCORE = {"mtcnn": 0.90, "yunet": 0.70}


def check_detector(name: object) -> str:
    """``name`` as a detector's name (``mtcnn`` or ``yunet``), or InvalidInputError listing them."""
    if name not in DETECTORS:
        raise InvalidInputError(f"the detector is one of {', '.join(DETECTORS)}, got {name!r}")
    return str(name)


@dataclass(frozen=True)
class DetectorSettings:
    """Detection settings; ``device`` (``cpu`` or ``cuda``, default ``$FACEDB_DEVICE`` or cpu) also places the
    embedder. ``detector``: ``mtcnn`` (facenet-pytorch's, the default and every older database's) or ``yunet``
    (OpenCV's FaceDetectorYN, facedb/faces/yunet.py); a database keeps its choice in its settings. ``min_score``: the
    detector's own score a face must reach; None: the detector's default (:data:`DEFAULT_MIN_SCORE`)."""

    min_face_size: int = 20
    min_score: float | None = None
    max_side: int = 1280
    device: str = field(default_factory=_default_device)
    detector: str = "mtcnn"

    def __post_init__(self) -> None:
        check_detector(self.detector)


class FaceChoice(str, Enum):
    """Which face of a photo to use when a photo must give exactly one."""

    ERROR = "error"  # several faces: skip the photo and say so (enrolment's default)
    LARGEST = "largest"  # the largest face
    SKIP = "skip"  # several faces: skip the photo quietly
    CENTRAL = "central"  # the face nearest the centre (evaluation sets centre the labelled person)
    ALL = "all"  # every face (clustering): prepare gives one PreparedFaces per photo


#: The choices ``enroll --on-multiple`` offers (kept for callers of the older tuple).
ON_MULTIPLE = (FaceChoice.ERROR.value, FaceChoice.LARGEST.value, FaceChoice.SKIP.value)


def face_choice(value: str | FaceChoice) -> FaceChoice:
    """``value`` as a FaceChoice, or InvalidInputError listing the choices."""
    try:
        return FaceChoice(value)
    except ValueError:
        raise InvalidInputError(f"the face choice is one of {', '.join(c.value for c in FaceChoice)}") from None


def choose_face(faces: list[Face], rule: FaceChoice, width: int, height: int) -> Face | str:
    """The face to use from a photo's detections, or the reason to skip the photo."""
    if not faces:
        return "no face found"
    if rule is FaceChoice.CENTRAL:
        cx, cy = width / 2, height / 2
        return min(faces, key=lambda f: ((f.box[0] + f.box[2]) / 2 - cx) ** 2 + ((f.box[1] + f.box[3]) / 2 - cy) ** 2)
    if len(faces) == 1:
        return faces[0]
    if rule is FaceChoice.LARGEST:
        return max(faces, key=lambda f: f.area)
    if rule is FaceChoice.SKIP:
        return f"{len(faces)} faces found (skipped by --on-multiple skip)"
    return f"{len(faces)} faces found; enrolment needs one (use --on-multiple largest)"


@dataclass
class Analysed:
    """A decoded photo and the faces found in it; ``frame`` is the pixels the faces' raw boxes refer to (the
    photo, or its padded copy in crop mode): what alignment reads."""

    photo: Photo
    faces: list[Face]
    frame: np.ndarray | None = None

    def crops(self, align: Callable[[np.ndarray, Face], np.ndarray], faces: list[Face] | None = None
              ) -> list[np.ndarray]:
        frame = self.photo.pixels if self.frame is None else self.frame
        return [align(frame, f) for f in (self.faces if faces is None else faces)]


@dataclass
class Prepared:
    """A photo ready to embed: its caller's ``key`` (the person it enrols, or an index), the store's image row
    (no pixels: this crosses process boundaries), the chosen face and its aligned crop."""

    key: Any
    image: dict[str, object]
    face: Face
    crop: np.ndarray

    @property
    def name(self) -> str:
        return str(self.key)

    @property
    def sha256(self) -> str:
        return str(self.image["sha256"])

    @property
    def label(self) -> str:
        return str(self.image["path"])


@dataclass
class Unprepared:
    """A photo that gave no face to embed, with its caller's ``key`` and why."""

    key: Any
    skipped: Skipped
    sha256: str | None = None


@dataclass
class PreparedFaces:
    """Every face of a photo, ready to embed (``FaceChoice.ALL``): the caller's ``key``, the store's image row,
    the faces and their aligned crops, in the detector's order."""

    key: Any
    image: dict[str, object]
    faces: list[Face]
    crops: list[np.ndarray]

    @property
    def sha256(self) -> str:
        return str(self.image["sha256"])

    @property
    def label(self) -> str:
        return str(self.image["path"])


Outcome = Prepared | PreparedFaces | Unprepared


class FacePipeline:
    """A detector and an embedder used together. Build once, reuse (both are thread-safe).

    ``weights`` is remembered so that worker processes can load the same model (see :func:`prepared_chunks`).
    """

    def __init__(self, embedder: Embedder, settings: DetectorSettings | None = None,
                 detector: Detector | None = None, *, weights: Path | None = None) -> None:
        self.embedder = embedder
        self.settings = settings or DetectorSettings()
        self._detector = detector
        self.weights = weights
        self.spawnable = False  # True when built by get_pipeline: a worker process can rebuild it by id

    @property
    def model_id(self) -> str:
        return self.embedder.model_id

    @property
    def detector(self) -> Detector:
        if self._detector is None:
            self._detector = get_detector(self.settings)
        return self._detector

    def analyse(self, source: PhotoSource, name: str | None = None, cropped: bool = False) -> Analysed:
        """Decode and detect (ImageError for a bad photo). ``cropped``: the photo is a face crop
        (see :func:`find_faces`)."""
        photo = load_photo(source, name=name)
        with timings.stage("detect"):  # a query's photo (enrolment detects in batches: prepare())
            faces, frame = find_faces(self.detector, photo.pixels, cropped)
        return Analysed(photo, faces, frame)

    def embed_faces(self, analysed: Analysed, faces: list[Face] | None = None, flip: bool = False) -> np.ndarray:
        """Align the photo's faces (all, or ``faces``) and embed them in one batched call: (n, dim) unit rows."""
        return self.embed_crops(analysed.crops(self.embedder.align, faces), flip)

    def embed(self, items: list[tuple[Photo, Face]], flip: bool = False) -> np.ndarray:
        """Align each (photo, face) and embed all of them in one batched call: (n, dim) unit rows."""
        return self.embed_crops([self.embedder.align(photo.pixels, face) for photo, face in items], flip)

    def embed_crops(self, crops: list[np.ndarray], flip: bool = False, jitter: int = 0) -> np.ndarray:
        """(n, dim) unit rows for aligned crops. With ``flip`` (test-time augmentation), each row is the
        renormalised mean of the crop's and its mirror image's embedding: one batch of 2n crops. With
        ``jitter`` (enrolment only, where time is cheap and the result is kept), ``jitter`` randomly shifted,
        scaled and rotated copies of each crop join the mean (:func:`jittered`; the same crop always gets the
        same copies)."""
        if (not flip and not jitter) or not crops:
            return self.embedder.embed(crops)
        views = [[c] + ([np.ascontiguousarray(c[:, ::-1])] if flip else []) + jittered(c, jitter) for c in crops]
        per = len(views[0])
        emb = self.embedder.embed([v for group in views for v in group]).reshape(len(crops), per, -1)
        vecs = emb.sum(1)
        return (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)

    def prepare(self, items: Sequence[tuple[Any, PhotoSource]], choice: FaceChoice = FaceChoice.ERROR,
                cropped: bool = False, stop: threading.Event | None = None) -> list[Outcome]:
        return prepare(self.detector, self.embedder.align, items, choice, cropped, stop)


def jittered(crop: np.ndarray, n: int) -> list[np.ndarray]:
    """``n`` randomly perturbed copies of an aligned crop: rotated by up to 6 degrees, scaled by 0.95-1.05,
    shifted by up to 4% of its side, and mirrored half the time (what dlib's ``jitter_image`` does, for any
    model). Seeded by the crop's bytes, so a photo always gives the same template."""
    if n <= 0:
        return []
    from PIL import Image

    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(crop.tobytes()).digest()[:8], "little"))
    h, w = crop.shape[:2]
    im = Image.fromarray(crop)
    out = []
    for _ in range(n):
        angle = np.radians(rng.uniform(-6, 6))
        scale = rng.uniform(0.95, 1.05)
        dx, dy = rng.uniform(-0.04, 0.04, 2) * [w, h]
        # PIL's affine maps output to input pixels: the inverse of rotate-and-scale about the centre, shifted
        cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
        cx, cy = w / 2, h / 2
        coeffs = (cos, sin, cx - cos * cx - sin * cy + dx, -sin, cos, cy + sin * cx - cos * cy + dy)
        view = np.asarray(im.transform((w, h), Image.AFFINE, coeffs, resample=Image.BILINEAR))
        if rng.random() < 0.5:
            view = view[:, ::-1]
        out.append(np.ascontiguousarray(view))
    return out


_LOCK = threading.Lock()
_EMBEDDERS: dict[tuple[str, str, str], Embedder] = {}
_DETECTORS: dict[DetectorSettings, Detector] = {}


def get_detector(settings: DetectorSettings | None = None) -> Detector:
    """The process-wide detector (``settings.detector``: MTCNN or YuNet) for ``settings``, loaded on first use;
    torch's (and OpenCV's) thread count set from ``FACEDB_THREADS`` first (see
    :func:`facedb.faces.models.configure_threads`). ModelUnavailableError when the detector's engine or weights are
    missing (the message says how to get them)."""
    settings = settings or DetectorSettings()
    configure_threads()
    score = DEFAULT_MIN_SCORE[settings.detector] if settings.min_score is None else settings.min_score
    with _LOCK:
        if settings not in _DETECTORS:
            if settings.detector == "yunet":
                from .yunet import YuNetDetector

                _DETECTORS[settings] = YuNetDetector(settings.min_face_size, score, settings.max_side,
                                                     settings.device)
            else:
                _DETECTORS[settings] = MTCNNDetector(settings.min_face_size, score, settings.max_side,
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
    pipe = FacePipeline(embedder, settings, weights=weights)
    pipe.spawnable = True
    return pipe


def _label(src: PhotoSource) -> str | None:
    """A photo's name for reports: its path, or a file object's ``name`` (an upload's file name)."""
    if isinstance(src, (str, os.PathLike)):
        return display_name(src)
    own = getattr(src, "name", None) if hasattr(src, "read") else None
    return display_name(own) if isinstance(own, str) and own else None


#: Crop mode pads a photo by this share of its longer side on every side before detection: a tight face crop
#: leaves the detector no margin to find the face in (docs/thresholds-and-accuracy.md: faces that are already cropped).
CROP_PAD = 0.35

#: How crop mode fills the padding: ``constant`` (the photo's median grey) or ``reflect`` (the photo mirrored
#: at its edges). Constant, by measurement (docs/thresholds-and-accuracy.md, bench-results/crop-landmarks-*.json).
CROP_PAD_MODE = "constant"

#: In crop mode the photo is known to hold one face: when none reaches the detector's ``min_score`` in the
#: padded frame, the best candidate down to this score gives the landmarks, before any layout is assumed.
CROP_RELAXED_SCORE = 0.5


def _padded(pixels: np.ndarray, mode: str | None = None) -> tuple[np.ndarray, int]:
    pad = int(round(CROP_PAD * max(pixels.shape[:2])))
    if (mode or CROP_PAD_MODE) == "reflect":
        return np.pad(pixels, ((pad, pad), (pad, pad), (0, 0)), mode="symmetric"), pad
    fill = int(np.median(pixels))  # a neutral border
    return np.pad(pixels, ((pad, pad), (pad, pad), (0, 0)), constant_values=fill), pad


def whole_face(width: int, height: int) -> Face:
    """The photo itself as the face, with the landmarks of an average frontal face placed in it (crop mode's
    last resort, when even the padded photo shows no face to the detector); ``assumed`` is True."""
    template = np.array([[0.32, 0.40], [0.68, 0.40], [0.50, 0.58], [0.36, 0.76], [0.64, 0.76]])
    return Face((0.0, 0.0, float(width), float(height)), 0.0, template * [width, height], assumed=True)


def _relaxed(detector: Any, frame: np.ndarray) -> list[Face]:
    """The best face the detector sees in ``frame`` down to :data:`CROP_RELAXED_SCORE` (one at most), for a
    detector that can report below its own ``min_score`` (``detect(image, min_score=...)``); else []."""
    try:
        found = detector.detect(frame, min_score=CROP_RELAXED_SCORE)
    except TypeError:  # a detector without the keyword (a test's fake)
        return []
    return found[:1]


def find_faces(detector: Any, pixels: np.ndarray, cropped: bool = False) -> tuple[list[Face], np.ndarray]:
    """(faces, the pixels their raw boxes refer to). Boxes and landmarks of the faces are always in the photo's
    own frame; ``raw_box`` may refer to a padded copy, which is then what is returned for alignment.

    ``cropped``: the photo already is a face crop (a badge photo, a camera's own detection): it is padded before
    detection, and if still no face is found the whole photo is taken as the face, unless it is featureless (a
    blank or mostly clipped frame: :func:`facedb.faces.quality.featureless`), which has no face."""
    if not cropped:
        return detector.detect(pixels), pixels
    padded, pad = _padded(pixels)
    return _crop_faces(detector.detect(padded), padded, pad, pixels, detector)


def _crop_faces(found: list[Face], padded: np.ndarray, pad: int, pixels: np.ndarray,
                detector: Any = None) -> tuple[list[Face], np.ndarray]:
    """Crop mode: faces found in the padded photo, in the photo's own frame. None found: the detector's best
    candidate down to :data:`CROP_RELAXED_SCORE`; still none, the whole photo with an assumed landmark layout
    (``Face.assumed``), unless it is featureless."""
    h, w = pixels.shape[:2]
    if not found and detector is not None:
        found = _relaxed(detector, padded)
    faces = []
    for f in found:
        shifted = in_frame(tuple(c - pad for c in f.align_box), f.score, f.landmarks - pad, w, h)
        faces.append(Face(shifted.box, f.score, shifted.landmarks, f.align_box, f.align_landmarks))  # the padded frame
    if not faces and quality.featureless(pixels) is None:  # a blank frame is not taken for a face
        whole = whole_face(w, h)
        faces = [Face(whole.box, 0.0, whole.landmarks, tuple(c + pad for c in whole.box), whole.landmarks + pad,
                      assumed=True)]
    return faces, padded


#: Photos up to this many values (H x W x 3: 4 MP) are decoded and held together to be detected in one batch;
#: larger ones are detected alone (memory; MTCNN downscales them anyway).
BATCH_PIXELS = 12_000_000


def find_faces_many(detector: Any, pixels: list[np.ndarray], cropped: bool = False,
                    stop: threading.Event | None = None) -> list[tuple[list[Face], np.ndarray]]:
    """:func:`find_faces` for several photos, detected together where the detector can (``detect_many``:
    photos of one size in one batch); the same faces as one at a time. A detector without ``detect_many``
    takes them one at a time, and once ``stop`` is set no further photo is started: the result then covers
    the first photos only."""
    many = getattr(detector, "detect_many", None)
    if many is None or len(pixels) < 2:
        out = []
        for p in pixels:
            if stop is not None and stop.is_set():
                break
            out.append(find_faces(detector, p, cropped))
        return out
    if not cropped:
        return list(zip(many(pixels), pixels))
    padded = [_padded(p) for p in pixels]
    found = many([frame for frame, _ in padded])
    return [_crop_faces(faces, frame, pad, p, detector) for faces, (frame, pad), p in zip(found, padded, pixels)]


def prepare(detector: Any, align: Callable[[np.ndarray, Face], np.ndarray],
            items: Sequence[tuple[Any, PhotoSource]], choice: FaceChoice = FaceChoice.ERROR,
            cropped: bool = False, stop: threading.Event | None = None) -> list[Outcome]:
    """Decode, detect, choose the face (``choice``) and align, for each (key, photo), in order; no database
    access. A photo that fails gives an :class:`Unprepared` with its reason and never stops the others. With
    ``FaceChoice.ALL`` a photo gives a :class:`PreparedFaces` holding every face. The photos are decoded first
    and detected together (:func:`find_faces_many`). ``cropped``: the photos are face crops (see
    :func:`find_faces`). When ``stop`` is set (the consumer was interrupted) it returns at once, with the photos
    done so far: it is checked before each photo is decoded, before each detection batch, and between photos
    detected one at a time (a batch of MTCNN runs to its end: 16 LFW photos, well under a second)."""
    out: list[Outcome | None] = []
    photos: list[tuple[int, Any, Photo]] = []

    def stopped() -> bool:
        return stop is not None and stop.is_set()

    def finish(batch: list[tuple[int, Any, Photo]]) -> None:
        if not batch or stopped():
            return
        found = find_faces_many(detector, [photo.pixels for _, _, photo in batch], cropped, stop)
        for (slot, key, photo), (faces, frame) in zip(batch, found):
            if choice is FaceChoice.ALL:
                out[slot] = (Unprepared(key, Skipped(photo.name, "no face found"), photo.sha256) if not faces else
                             PreparedFaces(key, photo.record(), list(faces), [align(frame, f) for f in faces]))
                continue
            chosen = choose_face(faces, choice, photo.width, photo.height)
            if isinstance(chosen, str):
                out[slot] = Unprepared(key, Skipped(photo.name, chosen), photo.sha256)
            else:
                out[slot] = Prepared(key, photo.record(), chosen, align(frame, chosen))

    for key, src in items:
        if stop is not None and stop.is_set():
            break
        label = _label(src)
        try:
            photo = load_photo(src, name=label)
        except FaceDBError as exc:
            reason = str(exc)  # the report names the photo already: "x.jpg: x.jpg: cannot read" said it twice
            reason = reason[len(label) + 2:] if label and reason.startswith(f"{label}: ") else reason
            out.append(Unprepared(key, Skipped(label or "<photo>", reason)))
            continue
        out.append(None)
        if photo.pixels.size > BATCH_PIXELS:  # a large photo is not held beside others: done at once
            finish([(len(out) - 1, key, photo)])
        else:
            photos.append((len(out) - 1, key, photo))
    finish(photos)
    if stopped():  # what was done, up to the first photo not done (the consumer reads them in order)
        done = []
        for o in out:
            if o is None:
                break
            done.append(o)
        return done
    return [o for o in out if o is not None]


def source_sha256(src: PhotoSource) -> str | None:
    """The SHA-256 that :func:`images.load_photo` will give ``src``, computed without decoding it (files and
    bytes only; None where it cannot be known before decoding, or the file cannot be read)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return hashlib.sha256(bytes(src)).hexdigest()
    if isinstance(src, (str, os.PathLike)):
        if not is_regular_file(src):  # a FIFO or device would block or never end; load_photo refuses it
            return None
        try:
            if os.path.getsize(src) > MAX_FILE_BYTES:
                return None
            return sha256_file(src)
        except OSError:
            return None
    return None


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
    # Ctrl-C reaches the whole process group: the parent stops the job and terminates the workers, so a
    # worker must not die on it by itself (with a traceback of its own on the terminal).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    single_threaded()  # one core per worker process: the parallelism is across processes
    global _WORKER_PIPELINE
    _WORKER_PIPELINE = get_pipeline(model_id, weights=Path(weights) if weights else None, settings=settings)


def _worker_prepare(items: list[tuple[Any, PhotoSource]], choice: FaceChoice, cropped: bool) -> list[Outcome]:
    """``prepare`` in a worker process, with the pipeline its initializer loaded."""
    assert _WORKER_PIPELINE is not None, "worker not started"
    return _WORKER_PIPELINE.prepare(items, choice, cropped)


def _process_pool(workers: int, pipe: FacePipeline) -> ProcessPoolExecutor:
    import multiprocessing

    return ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_start,
        initargs=(pipe.model_id, str(pipe.weights) if pipe.weights else None, pipe.settings),
    )


#: One chunk in flight: its slots in order (None = being prepared) and the future preparing the rest.
_Pending = tuple[list["Outcome | None"], "Future[list[Outcome]] | None"]
_Run = Callable[[list[tuple[Any, PhotoSource]]], "Future[list[Outcome]]"]


def _resolve_workers(pipe: FacePipeline, workers: int | None, n_photos: int) -> int:
    """The detection processes to start: checked, ``None`` resolved by :func:`auto_workers`, and 0 for a
    pipeline that cannot be rebuilt in a spawned process."""
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 0):
        raise InvalidInputError("workers must be an integer >= 0")
    if workers is None:
        workers = auto_workers(n_photos, pipe.settings.device, getattr(pipe.embedder, "holds_gil", False))
    return workers if pipe.spawnable else 0


def _detection_pool(pipe: FacePipeline, workers: int, choice: FaceChoice, cropped: bool,
                    stop: threading.Event) -> tuple[Executor, _Run, int]:
    """The executor that prepares chunks, how to submit one, and how many chunks to keep in flight."""
    if workers:
        pool: Executor = _process_pool(workers, pipe)
        # 2 chunks a worker keeps every worker busy and bounds memory
        return pool, lambda items: pool.submit(_worker_prepare, items, choice, cropped), 2 * workers
    # A thread decodes and detects the next chunk while this one embeds and stores (torch and numpy
    # release the GIL; dlib does not, hence the processes above).
    thread = ThreadPoolExecutor(max_workers=1)
    return thread, lambda items: thread.submit(pipe.prepare, items, choice, cropped, stop), 1


def _submit_chunk(chunk: list[tuple[Any, PhotoSource]], known: Callable[[str], str | None] | None,
                  run: _Run) -> _Pending:
    """Skip known photos now (from the file's hash, before any detection); send the rest to ``run``."""
    slots: list[Outcome | None] = []
    todo = []
    for key, src in chunk:
        sha = source_sha256(src) if known is not None else None
        reason = known(sha) if known is not None and sha is not None else None
        if reason is not None:
            slots.append(Unprepared(key, Skipped(_label(src) or "<photo>", reason), sha))
        else:
            slots.append(None)
            todo.append((key, src))
    return slots, (run(todo) if todo else None)


def prepared_chunks(
    pipe: FacePipeline,
    work: Sequence[tuple[Any, PhotoSource]],
    choice: FaceChoice = FaceChoice.ERROR,
    *,
    workers: int | None = 0,
    batch_size: int = 16,
    known: Callable[[str], str | None] | None = None,
    cropped: bool = False,
) -> Iterator[list[Outcome]]:
    """``prepare`` over ``work`` in chunks of ``batch_size``, in order, running ahead of the consumer (who
    embeds and stores one chunk while the next is detected).

    ``workers``: 0 = one thread; N = N spawned processes (each loads the models once; worth it from ~64
    photos with an embedder that holds the GIL; a script using them must guard its entry point with
    ``if __name__ == "__main__":``); None = :func:`auto_workers`. Processes need a pipeline that
    :func:`get_pipeline` built (``spawnable``); otherwise the thread is used.

    ``known(sha256)``: a reason to skip a photo already enrolled, checked from the file's hash *before*
    detection, so re-running a folder costs a read and a hash per photo, not a detection. ``cropped``: the
    photos are face crops (see :func:`find_faces`).

    Interrupting the consumer (KeyboardInterrupt) cancels the work not started and does not wait for the
    work running: processes are terminated, and the detection thread stops after the photo it is on.
    """
    workers = _resolve_workers(pipe, workers, len(work))
    chunks = [list(work[i:i + batch_size]) for i in range(0, len(work), batch_size)]
    stop = threading.Event()
    pool, run, ahead = _detection_pool(pipe, workers, choice, cropped, stop)

    def submit(chunk: list[tuple[Any, PhotoSource]]) -> _Pending:
        return _submit_chunk(chunk, known, run)

    pending: list[_Pending] = []
    try:
        pending = [submit(c) for c in chunks[:ahead]]
        for i in range(len(chunks)):
            slots, future = pending.pop(0)
            try:
                results = iter(future.result()) if future is not None else iter(())
            except BrokenProcessPool as exc:  # a worker was killed (out of memory?): stop, keep what is stored
                raise FaceDBError(f"a detection worker process died ({exc}); photos enrolled so far are kept "
                                  f"(enrol again to finish: enrolled photos are skipped)") from None
            if i + ahead < len(chunks):
                pending.append(submit(chunks[i + ahead]))
            yield [slot if slot is not None else next(results) for slot in slots]
    finally:
        stop.set()
        for _, future in pending:
            if future is not None:
                future.cancel()
        if isinstance(pool, ProcessPoolExecutor):
            for proc in list(getattr(pool, "_processes", {}).values()):  # do not wait for running chunks
                proc.terminate()
        pool.shutdown(wait=not isinstance(pool, ProcessPoolExecutor), cancel_futures=True)


@dataclass
class FolderLayout:
    """What :func:`list_folder` found: the people (sub-folder name, its photos), and every entry that does not
    fit the layout, with why (photos directly in the folder, nested folders, empty person folders, ...)."""

    people: list[tuple[str, list[Path]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def photos(self) -> int:
        return sum(len(files) for _, files in self.people)


def list_folder(folder: Path) -> FolderLayout:
    """The people in a folder laid out as ``folder/<person name>/<photos>``: one level, sorted; person names are
    the sub-folder names (NFC-normalised by the store). Symbolic links to folders are not followed (no loops);
    links to files are. In a person's folder, files that are not photos by name (:func:`images.is_photo_name`:
    notes.txt, Thumbs.db, .DS_Store) are left out and named in one note among ``problems``, so that a re-run
    does not fail on them forever.

    Raises InvalidInputError when ``folder`` is not a folder, or when nothing in it fits the layout (e.g.
    photos placed directly in it, the layout face_recognition uses), saying what was found instead.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInputError(f"{display_name(folder)} is not a folder")
    layout = FolderLayout()
    loose = 0
    not_photos: list[str] = []
    for sub in sorted(folder.iterdir()):
        if sub.name.startswith("."):
            continue
        shown = display_name(sub.name)
        if sub.is_symlink() and sub.is_dir():
            layout.problems.append(f"{shown}/: a link to a folder, not followed")
            continue
        if not sub.is_dir():
            loose += 1
            continue
        files, nested = [], []
        for p in sorted(sub.iterdir()):
            if p.name.startswith("."):  # .DS_Store, macOS's ._IMG.jpg: the system's, not the user's, every run
                continue
            if p.is_file() and not is_photo_name(p.name):
                not_photos.append(f"{shown}/{display_name(p.name)}")
            else:
                (files if p.is_file() else nested).append(p)
        for n in nested:
            layout.problems.append(f"{shown}/{display_name(n.name)}/: a folder inside a person's folder, ignored "
                                   "(one level only)")
        if files:
            layout.people.append((sub.name, files))
        else:
            layout.problems.append(f"{shown}/: no photos")
    if not_photos:
        n, more = len(not_photos), f" and {len(not_photos) - 5} more" if len(not_photos) > 5 else ""
        what = "1 file that is not a photo was" if n == 1 else f"{n} files that are not photos were"
        layout.problems.append(f"{what} ignored (photos end in {', '.join(PHOTO_SUFFIXES)}): "
                               f"{', '.join(not_photos[:5])}{more}")
    if loose:
        layout.problems.append(f"{loose} file(s) directly in {display_name(folder)}: ignored (photos go in one "
                               "sub-folder per person, named after them)")
    if not layout.people:
        found = "; ".join(layout.problems) or "it is empty"
        raise InvalidInputError(f"{display_name(folder)} has no person folders with photos ({found}); expected "
                                f"{display_name(folder)}/<person name>/<photo files>")
    return layout


__all__ = [
    "ON_MULTIPLE", "Analysed", "DetectorSettings", "FaceChoice", "FacePipeline", "FolderLayout", "Outcome",
    "Prepared", "PreparedFaces", "Unprepared", "auto_workers", "check_detector", "choose_face", "face_choice",
    "get_detector", "get_pipeline", "list_folder", "prepare", "prepared_chunks", "source_sha256",
]

