"""A reader of TensorFlow's frozen ``GraphDef`` files that needs neither TensorFlow nor a protobuf library.

A ``.pb`` graph is a protobuf message; this module decodes its wire format directly (varints and
length-delimited fields, https://protobuf.dev/programming-guides/encoding/) for the few fields facedb needs
to read a frozen network's constants and wiring:

* ``GraphDef.node`` (1) -> ``NodeDef``: ``name`` (1), ``op`` (2), ``input`` (3), ``attr`` (5, a map of
  string to ``AttrValue``);
* ``AttrValue``: ``s`` (2), ``i`` (3), ``f`` (4), ``b`` (5), ``type`` (6), ``tensor`` (8), ``list`` (1; its
  ``i`` (3) values only, for strides and kernel sizes);
* ``TensorProto``: ``dtype`` (1), ``tensor_shape`` (2: ``dim`` (2) -> ``size`` (1)), ``tensor_content`` (4),
  ``float_val`` (5), ``int_val`` (7).

Field numbers are those of tensorflow/core/framework/{graph,node_def,attr_value,tensor,tensor_shape}.proto.
Any other field is skipped by its wire type. Tensors come back as numpy arrays that share no memory with the
file. A file that is not a GraphDef raises :class:`~facedb.errors.InvalidInputError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import InvalidInputError

#: TensorFlow ``DataType`` enum values facedb reads (tensorflow/core/framework/types.proto) -> numpy dtypes.
DTYPES: dict[int, np.dtype] = {1: np.dtype("<f4"), 2: np.dtype("<f8"), 3: np.dtype("<i4"), 9: np.dtype("<i8"),
                               10: np.dtype("bool")}


@dataclass
class Node:
    """One ``NodeDef``: its name, op type, inputs (``name``, ``name:1`` or ``^control``) and attributes
    (a value per attribute: bytes, int, float, bool, a dtype number, a numpy array for a tensor, or a list of
    ints)."""

    name: str
    op: str
    inputs: list[str] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise InvalidInputError("truncated varint: not a TensorFlow GraphDef")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise InvalidInputError("varint longer than 64 bits: not a TensorFlow GraphDef")


def _fields(buf: memoryview) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value) for each field of one message: ints for varints, memoryviews for
    length-delimited fields, raw 4/8-byte memoryviews for fixed-width ones."""
    out = []
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise InvalidInputError("a field runs past the end of its message: not a TensorFlow GraphDef")
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        else:  # groups (3, 4) are not used by GraphDef; 6, 7 do not exist
            raise InvalidInputError(f"wire type {wire} at byte {pos}: not a TensorFlow GraphDef")
        if num == 0 or pos > end:
            raise InvalidInputError("malformed protobuf field: not a TensorFlow GraphDef")
        out.append((num, wire, value))
    return out


def _packed_varints(value: Any, wire: int) -> list[int]:
    if wire == 0:
        return [value]
    out, pos = [], 0
    while pos < len(value):
        v, pos = _varint(value, pos)
        out.append(v)
    return out


def _signed32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def _shape(buf: memoryview) -> tuple[int, ...]:
    dims = []
    for num, _, value in _fields(buf):
        if num == 2:  # TensorShapeProto.dim
            size = next((v for n, w, v in _fields(value) if n == 1 and w == 0), 0)
            dims.append(size - (1 << 64) if size >= 1 << 63 else size)  # -1: unknown
    return tuple(dims)


def tensor(buf: memoryview) -> np.ndarray:
    """A ``TensorProto`` as a numpy array of its dtype and shape. Values come from ``tensor_content`` (raw
    little-endian bytes) or from ``float_val`` / ``int_val`` (a single value fills the whole shape, as
    TensorFlow does for constants written in short form). InvalidInputError for a dtype facedb does not read
    or a size that does not match the shape."""
    dtype_num, shape, content = 0, (), None
    floats: list[float] = []
    ints: list[int] = []
    for num, wire, value in _fields(buf):
        if num == 1:
            dtype_num = value
        elif num == 2:
            shape = _shape(value)
        elif num == 4:
            content = bytes(value)
        elif num == 5:
            floats.extend(np.frombuffer(value, "<f4").tolist())  # packed (wire 2) or one fixed32 (wire 5)
        elif num == 7:
            ints.extend(_signed32(v) for v in _packed_varints(value, wire))
    if dtype_num not in DTYPES:
        raise InvalidInputError(f"tensor of TensorFlow dtype {dtype_num}: facedb reads only {sorted(DTYPES)}")
    dtype = DTYPES[dtype_num]
    count = int(np.prod(shape)) if shape else 1
    if content is not None:
        arr = np.frombuffer(content, dtype).copy()
    elif floats or ints:
        arr = np.asarray(floats if floats else ints, dtype=dtype)
        if arr.size == 1 and count != 1:
            arr = np.full(count, arr[0], dtype=dtype)
    else:
        arr = np.zeros(count, dtype=dtype)
    if arr.size != count:
        raise InvalidInputError(f"tensor of shape {shape} holds {arr.size} values")
    return arr.reshape(shape)


def _attr(buf: memoryview) -> Any:
    for num, _, value in _fields(buf):
        if num == 2:
            return bytes(value)
        if num == 3:
            return value - (1 << 64) if value >= 1 << 63 else value
        if num == 4:
            return float(np.frombuffer(value, "<f4")[0])
        if num == 5:
            return bool(value)
        if num == 6:
            return value
        if num == 8:
            return tensor(value)
        if num == 1:  # ListValue: the ints (strides, ksize) are what facedb reads
            ints: list[int] = []
            for n, w, v in _fields(value):
                if n == 3:
                    ints.extend(_packed_varints(v, w))
            return ints
    return None


def _node(buf: memoryview) -> Node:
    node = Node("", "")
    for num, _, value in _fields(buf):
        if num == 1:
            node.name = bytes(value).decode()
        elif num == 2:
            node.op = bytes(value).decode()
        elif num == 3:
            node.inputs.append(bytes(value).decode())
        elif num == 5:  # map entry: key (1), value (2)
            key, val = "", None
            for n, _, v in _fields(value):
                if n == 1:
                    key = bytes(v).decode()
                elif n == 2:
                    val = _attr(v)
            node.attrs[key] = val
    if not node.name or not node.op:
        raise InvalidInputError("a node without a name or op: not a TensorFlow GraphDef")
    return node


def read_graph(path: Path) -> list[Node]:
    """The nodes of the frozen TensorFlow graph at ``path``, in file order (a ``.pb`` ``GraphDef``).

    InvalidInputError if the file is not a GraphDef (or holds no node); OSError if it cannot be read."""
    data = memoryview(Path(path).read_bytes())
    try:
        nodes = [_node(value) for num, wire, value in _fields(data) if num == 1 and wire == 2]
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInputError(f"{path} is not a TensorFlow GraphDef ({exc})") from None
    if not nodes:
        raise InvalidInputError(f"{path} holds no graph nodes: not a TensorFlow GraphDef")
    return nodes


def constants(nodes: list[Node]) -> dict[str, np.ndarray]:
    """Every ``Const`` node's value by node name."""
    return {n.name: n.attrs["value"] for n in nodes if n.op == "Const" and isinstance(n.attrs.get("value"),
                                                                                      np.ndarray)}


def _varint_bytes(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def without_control_inputs(path: Path) -> bytes:
    """The GraphDef at ``path`` re-encoded without its control-dependency inputs (``^name``), every other
    field byte for byte. Control edges only order execution in TensorFlow and carry no value, so the graph
    computes the same function; OpenCV's dnn importer (4.14) cannot place them (the frozen FaceNet graph has two,
    on folded shape constants) and reads the graph once they are gone."""
    def field(num: int, data: bytes | memoryview) -> bytes:
        return _varint_bytes(num << 3 | 2) + _varint_bytes(len(data)) + bytes(data)

    out = bytearray()
    for num, wire, value in _fields(memoryview(Path(path).read_bytes())):
        if wire != 2:
            raise InvalidInputError("GraphDef with a top-level field that is not length-delimited")
        if num != 1:
            out += field(num, value)
            continue
        node = bytearray()
        for n, w, v in _fields(value):
            if w != 2:
                raise InvalidInputError("NodeDef with a field that is not length-delimited")
            if not (n == 3 and bytes(v).startswith(b"^")):
                node += field(n, v)
        out += field(1, node)
    return bytes(out)
