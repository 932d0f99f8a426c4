"""Small protobuf helpers shared by the stages that build ONNX models."""

from __future__ import annotations

from typing import Any

__all__ = ["copy_fields"]


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
