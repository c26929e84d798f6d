"""FaceNet: facenet-pytorch's InceptionResnetV1 (ports of David Sandberg's 20180402 VGGFace2 and 20180408
CASIA-WebFace models), 512-d, L2-normalised.

Alignment and pixel handling follow what these weights were trained and validated with:
* crop: the MTCNN box grown by a margin of 32 pixels of the 160x160 output (Sandberg aligned LFW with
  ``--image_size 160 --margin 32``; facenet-pytorch expresses the margin in output pixels the same way),
  resized bilinearly to 160x160, no rotation (neither repo rotates);
* pixels: fixed image standardisation ``(x - 127.5) / 128`` (the 2018 models were trained with
  ``--use_fixed_image_standardization``; facenet-pytorch's ``fixed_image_standardization``).

Runs in eval mode, batched, under ``torch.inference_mode``, channels_last on CPU (2-3x faster at batch 8-32).
The weights are loaded with ``torch.load(weights_only=True)``: no pickle code runs.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from PIL import Image

from ...errors import ModelMismatchError, ModelUnavailableError
from ...fsio import sha256_file
from .weights import WEIGHTS, resolve_weights

IMAGE_SIZE = 160
MARGIN = 32
BATCH = 32


def crop_face(image: np.ndarray, box: tuple[float, float, float, float], size: int = IMAGE_SIZE,
              margin: int = MARGIN) -> np.ndarray:
    """The (size, size, 3) uint8 crop FaceNet expects: box + margin (in output pixels), clipped, resized."""
    x1, y1, x2, y2 = box
    mx = margin * (x2 - x1) / (size - margin)
    my = margin * (y2 - y1) / (size - margin)
    h, w = image.shape[:2]
    left, top = int(max(x1 - mx / 2, 0)), int(max(y1 - my / 2, 0))
    right, bottom = int(min(x2 + mx / 2, w)), int(min(y2 + my / 2, h))
    if right <= left or bottom <= top:
        left, top, right, bottom = 0, 0, w, h
    crop = Image.fromarray(image[top:bottom, left:right]).resize((size, size), Image.BILINEAR)
    return np.asarray(crop, dtype=np.uint8)


def model_id_for(weights: Path, requested: str) -> str:
    """The published id if ``weights`` are the published file, else ``facenet-custom-<sha256[:12]>``.

    So two different fine-tunes never share an id, and never mix in one database.
    """
    digest = sha256_file(weights)
    for mid, spec in WEIGHTS.items():
        if digest == spec.sha256:
            return mid
    return f"facenet-custom-{digest[:12]}"


def embedding_dim(weights: Path) -> int:
    """The embedding size of an InceptionResnetV1 state dict (512 for the published weights)."""

    state = read_state_dict(weights)
    if "last_bn.weight" not in state:
        raise ModelUnavailableError(f"{weights} is not a FaceNet (InceptionResnetV1) state dict")
    return int(state["last_bn.weight"].shape[0])


def read_state_dict(path: Path) -> dict[str, object]:
    """The tensors of a FaceNet weights file, read without running any code from it (``weights_only``).

    Anything else (a pickled model object, a checkpoint with code, not a torch file at all) is refused with
    ModelUnavailableError; torch's own message is not passed on, because it suggests loading unsafely."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelUnavailableError(
            f"{path} is not a FaceNet state dict that can be read safely ({type(exc).__name__}): give the "
            "weights as a state dict (a mapping of parameter names to tensors, as published)") from None
    if isinstance(state, dict) and "state_dict" in state:  # facedb training checkpoints
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ModelUnavailableError(f"{path} is not a FaceNet state dict (a mapping of parameter names to tensors)")
    return state


class FaceNet:
    dim = 512
    holds_gil = False

    def __init__(self, model_id: str, module: object, device: str) -> None:
        import torch

        self.model_id = model_id
        self.device = device
        self._torch = torch
        self._net = module
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model_id: str, *, weights: Path | None = None, device: str = "cpu") -> FaceNet:
        try:
            import torch
            from facenet_pytorch import InceptionResnetV1
        except ImportError as exc:
            msg = f"FaceNet needs torch and facenet-pytorch ({exc}); see docs/install.md"
            raise ModelUnavailableError(msg) from None
        requested = "facenet-vggface2" if model_id.startswith("facenet-custom-") else model_id
        if model_id.startswith("facenet-custom-") and weights is None:
            raise ModelUnavailableError(f"{model_id} is a custom FaceNet: give its weights file with --weights")
        path = resolve_weights(requested, explicit=weights)
        actual = model_id_for(path, requested) if weights is not None else model_id
        if model_id.startswith("facenet-custom-") and actual != model_id:
            raise ModelMismatchError(f"{path} is {actual}, not {model_id}")
        state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("logits.")}
        net = InceptionResnetV1(pretrained=None, classify=False)
        embedding_size = state.get("last_linear.weight")
        if embedding_size is not None and embedding_size.shape[0] != 512:
            net.last_linear = torch.nn.Linear(1792, embedding_size.shape[0], bias=False)
            net.last_bn = torch.nn.BatchNorm1d(embedding_size.shape[0], eps=0.001, momentum=0.1, affine=True)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelUnavailableError(f"{path} is not a FaceNet (InceptionResnetV1) state dict: "
                                        f"{str(exc).splitlines()[0][:200]}") from None
        net.eval().to(device)
        if device == "cpu":
            net = net.to(memory_format=torch.channels_last)
        emb = cls(actual, net, device)
        emb.dim = int(net.last_bn.num_features)
        return emb

    def align(self, image: np.ndarray, face: object) -> np.ndarray:
        return crop_face(image, face.align_box)  # type: ignore[attr-defined]

    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        """(n, 160, 160, 3) uint8 crops -> (n, dim) float32 unit rows."""
        torch = self._torch
        out = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(crops), BATCH):
                batch = np.stack(crops[start:start + BATCH]).astype(np.float32)
                x = torch.from_numpy((batch - 127.5) / 128.0).permute(0, 3, 1, 2)
                x = x.to(self.device)
                if self.device == "cpu":
                    x = x.contiguous(memory_format=torch.channels_last)
                out.append(self._net(x).float().cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        emb = np.concatenate(out)
        return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
