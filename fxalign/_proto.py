"""Small protobuf helpers shared by the stages that build ONNX models."""

from __future__ import annotations

from typing import Any

import onnx

__all__ = ["copy_fields", "itemsize"]


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
