"""ONNX model files: saving with or without external data, and the protobuf helpers around it.

Below every stage that writes or rebuilds a model (``export``, ``extract``, the backends), and
depending on ``onnx`` only, so any of them can import it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import onnx

__all__ = ["TWO_GB", "copy_fields", "itemsize", "save_model", "surely_small"]

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
