"""ONNX model files: read without their weights, saved with or without external data.

The protobuf helpers around both.

Below every stage that reads, writes or rebuilds a model (``export``, ``extract``, the
backends, attaching to a file), and depending on ``onnx`` only, so any of them can import it.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx

__all__ = ["TWO_GB", "copy_fields", "itemsize", "load_graph", "save_model", "surely_small"]

logger = logging.getLogger(__name__)

TWO_GB = 2**31
"""The protobuf limit on one serialized message: larger models need external data."""


def copy_fields(dst: Any, src: Any, skip: tuple[str, ...] = ()) -> None:
    """Copy every set field of protobuf message ``src`` into ``dst``, except ``skip``."""
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        target = getattr(dst, fd.name)
        if hasattr(target, "extend"):
            target.extend(value)
        elif fd.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def itemsize(tensor: onnx.TensorProto) -> int | None:
    """Bytes per element of ``tensor``'s type; ``None`` for strings and unknown types."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    try:
        size = int(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize)
    except (KeyError, TypeError, ValueError):
        return None
    return size or None


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Save ``model``, with its weights as external data beside it when it is over 2 GB.

    Args:
        model: The model; weights it already keeps as external data stay where they are.
        path: The ``.onnx`` file; large weights go to ``<path>.data`` beside it.
    """
    if surely_small(model) or model.ByteSize() < TWO_GB - 2**24:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=Path(path).name + ".data",
        )


def surely_small(model: onnx.ModelProto) -> bool:
    """Whether the weights are far below 2 GB, judged from their shapes and types.

    ``ModelProto.ByteSize()`` walks every byte of a large model (over a second for BERT-base);
    shapes and types bound the same for all but models near the limit, which still get the
    exact size.
    """
    if any(a.type in (5, 10) for n in model.graph.node for a in n.attribute):
        return False  # subgraphs: judge by the exact size
    tensors = [*model.graph.initializer]
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute]
    total = 0
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        if t.data_type == onnx.TensorProto.STRING or model.graph.sparse_initializer:
            return False
        total += math.prod(t.dims) * _bytes_per_element(t) + 64
    return total + 512 * len(model.graph.node) < TWO_GB // 2 and not model.functions


def _bytes_per_element(tensor: onnx.TensorProto) -> int:
    """Serialized bytes per element: exact in ``raw_data``, at most a varint's 10 otherwise."""
    if tensor.HasField("raw_data"):
        return itemsize(tensor) or 16
    return 10


# ---- reading a file's graph without its inline weights -------------------------------------
_MODEL_GRAPH = 7  # ModelProto.graph
_GRAPH_INITIALIZER = 5  # GraphProto.initializer
_TENSOR_RAW_DATA = 9  # TensorProto.raw_data
_TENSOR_EXTERNAL = (3, 13, 14)  # TensorProto.segment, .external_data, .data_location
_LENGTH_DELIMITED = 2


class _Unexpected(Exception):
    """The bytes are not laid out as :func:`load_graph` reads them: read them with onnx."""


def load_graph(path: str | os.PathLike[str], *, min_bytes: int = 1024) -> onnx.ModelProto:
    """The model of an ONNX file without copying its inline weights: they stay in the file.

    Each initializer of the main graph whose ``raw_data`` holds ``min_bytes`` or more becomes
    external data pointing at those very bytes of the file (``location`` the file's name,
    ``offset`` and ``length`` where its raw data lies), so that a runtime told to read external
    data from the file's folder reads the weights from the file itself, as ONNX Runtime does
    for a model given as bytes with
    ``session.model_external_initializers_file_folder_path``. Only the graph is parsed:
    ``onnx.load`` copies every weight into the message (half a second for BERT-base's 437 MB),
    this reads the file's protobuf fields in place and parses the rest. Weights already kept as
    external data stay as they are. Any layout it does not expect (a repeated graph field, a
    tensor with its data in segments) is read with ``onnx.load(path, load_external_data=False)``.

    Args:
        path: The ``.onnx`` file.
        min_bytes: Smaller weights stay inline.

    Raises:
        Whatever ``onnx.load`` raises on a file it cannot read.

    Example:
        >>> import tempfile, numpy as np
        >>> from onnx import helper, numpy_helper, TensorProto
        >>> w = numpy_helper.from_array(np.arange(512, dtype=np.float32), "w")
        >>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [512])
        >>> y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [512])
        >>> add = helper.make_node("Add", ["x", "w"], ["y"])
        >>> graph = helper.make_graph([add], "g", [x], [y], [w])
        >>> path = tempfile.mkdtemp() + "/m.onnx"
        >>> onnx.save_model(helper.make_model(graph), path)
        >>> (t,) = load_graph(path).graph.initializer
        >>> {e.key: e.value for e in t.external_data}["location"], t.HasField("raw_data")
        ('m.onnx', False)
    """
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise _Unexpected("empty file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                return _graph_of(memoryview(mapped), os.path.basename(path), min_bytes)
    except (_Unexpected, OSError, ValueError, IndexError) as e:
        logger.debug("%s read with onnx.load: %s", path, e)
    except Exception as e:  # protobuf's DecodeError: not a model laid out as expected
        logger.debug("%s read with onnx.load: %s: %s", path, type(e).__name__, e)
    return onnx.load(str(path), load_external_data=False)


def _graph_of(data: memoryview, location: str, min_bytes: int) -> onnx.ModelProto:
    """The model in ``data`` with its large inline weights as external data at ``location``."""
    parts: list[bytes] = []
    graphs = 0
    try:
        for number, wire, start, span, end in _fields(data, 0, len(data)):
            if number == _MODEL_GRAPH and wire == _LENGTH_DELIMITED:
                graphs += 1
                graph = _graph_without_weights(data, span, location, min_bytes)
                parts.append(_length_delimited(_MODEL_GRAPH, graph))
            else:
                parts.append(bytes(data[start:end]))
        if graphs != 1:
            raise _Unexpected(f"{graphs} graph fields")
        return onnx.ModelProto.FromString(b"".join(parts))
    finally:
        data.release()


def _graph_without_weights(
    data: memoryview, span: tuple[int, int], location: str, min_bytes: int
) -> bytes:
    parts: list[bytes] = []
    for number, wire, start, inner, end in _fields(data, *span):
        if number == _GRAPH_INITIALIZER and wire == _LENGTH_DELIMITED:
            placeholder = _placeholder(data, inner, location, min_bytes)
            if placeholder is not None:
                parts.append(_length_delimited(_GRAPH_INITIALIZER, placeholder))
                continue
        parts.append(bytes(data[start:end]))
    return b"".join(parts)


def _placeholder(
    data: memoryview, span: tuple[int, int], location: str, min_bytes: int
) -> bytes | None:
    """A tensor's fields with its raw data replaced by a reference into the file.

    ``None``: the tensor stays as it is (small, already external, or without raw data).
    """
    others: list[bytes] = []
    raw: tuple[int, int] | None = None
    for number, wire, start, inner, end in _fields(data, *span):
        if number == _TENSOR_RAW_DATA and wire == _LENGTH_DELIMITED:
            if raw is not None:
                raise _Unexpected("raw_data twice in one tensor")
            raw = inner
        elif number in _TENSOR_EXTERNAL:
            return None
        else:
            others.append(bytes(data[start:end]))
    if raw is None or raw[1] - raw[0] < min_bytes:
        return None
    tensor = onnx.TensorProto.FromString(b"".join(others))
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", raw[0]), ("length", raw[1] - raw[0])):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
    return bytes(tensor.SerializeToString())


def _fields(
    data: memoryview, start: int, end: int
) -> Iterator[tuple[int, int, int, tuple[int, int], int]]:
    """``(field number, wire type, start, payload span, end)`` of each field in a message."""
    i = start
    while i < end:
        first = i
        tag, i = _varint(data, i)
        number, wire = tag >> 3, tag & 7
        span = (i, i)
        if wire == 0:
            _, i = _varint(data, i)
        elif wire == 1:
            i += 8
        elif wire == _LENGTH_DELIMITED:
            size, i = _varint(data, i)
            span = (i, i + size)
            i += size
        elif wire == 5:
            i += 4
        else:
            raise _Unexpected(f"wire type {wire}")
        if number == 0 or i > end:
            raise _Unexpected("not a protobuf message")
        yield number, wire, first, span, i


def _varint(data: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise _Unexpected("varint over 10 bytes")


def _encoded_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return (
        _encoded_varint(number << 3 | _LENGTH_DELIMITED) + _encoded_varint(len(payload)) + payload
    )
