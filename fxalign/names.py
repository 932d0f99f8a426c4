"""Marker names: which value of which module call a marker holds.

A :class:`MarkerName` is made where the marker is made (the instrumented forward, the capture of
the model's outputs) and travels as that object: through the capture buffer, the call records,
the aliases, the ONNX Debug node, the ``marker -> tensor`` map of the debug model and the
comparison. Nothing reads a name back from its display text, which is ambiguous as soon as a
module name contains ``#``, ``:in`` or brackets (any ``nn.ModuleDict`` key is a valid module
name).

Two spellings exist, each made by one function here:

* the display text, ``str(name)``: ``<module path>[#<call index>][:in]<leaf path>``, for example
  ``layer1.0.conv1``, ``shared#2`` (third call of ``shared``), ``lstm[1][0]`` (first tensor of the
  second element of the output) or ``block:in[0]`` (its first positional input). Reports show
  it; it is never parsed.
* the ONNX attribute, :func:`encode_attribute`: JSON of the fields, which the Debug node carries
  in its ``name`` attribute and :func:`decode_attribute` turns back into the same object.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias

from torch.utils import _pytree as pytree

__all__ = [
    "CallId",
    "LeafKey",
    "LeafPath",
    "MarkerName",
    "OpaqueKey",
    "decode_attribute",
    "encode_attribute",
    "leaf_path",
    "leaf_suffix",
]


@dataclass(frozen=True)
class OpaqueKey:
    """A leaf key kept as its text: a dict key that is no JSON scalar, or an unknown key kind.

    Both sides of a comparison make it the same way (:func:`leaf_path`), so it identifies the
    value as well as the original key did; it is shown as ``[<text>]``.

    Attributes:
        text: ``repr()`` of the dict key, or ``str()`` of the key object.
    """

    text: str


LeafKey: TypeAlias = pytree.SequenceKey | pytree.MappingKey | pytree.GetAttrKey | OpaqueKey
"""One step into a structured value: an index, a dict key, an attribute (``ModelOutput``)."""
LeafPath: TypeAlias = tuple[LeafKey, ...]
"""Where a tensor sits inside a structured value; ``()`` for the value itself."""


def _is_json_key(key: object) -> bool:
    if isinstance(key, float):
        return math.isfinite(key)
    return key is None or isinstance(key, (str, int))


def leaf_path(key_path: Iterable[Any]) -> LeafPath:
    """A pytree key path (``tree_flatten_with_path``) as a marker name's leaf path.

    Index, attribute and JSON-scalar dict keys are kept as they are; any other dict key, and any
    key kind pytree may add, becomes an :class:`OpaqueKey` of its text.

    Example:
        >>> leaf_path([pytree.SequenceKey(1), pytree.MappingKey((2, 3))])
        (SequenceKey(idx=1), OpaqueKey(text='(2, 3)'))
    """
    out: list[LeafKey] = []
    for key in key_path:
        if isinstance(key, pytree.MappingKey) and not _is_json_key(key.key):
            out.append(OpaqueKey(repr(key.key)))
        elif isinstance(key, (pytree.SequenceKey, pytree.MappingKey, pytree.GetAttrKey)):
            out.append(key)
        else:
            out.append(OpaqueKey(str(key)))
    return tuple(out)


def leaf_suffix(leaf: LeafPath) -> str:
    """Display text of a leaf path: ``[0]``, ``["logits"]``, ``[1][0]``.

    Example:
        >>> leaf_suffix((pytree.SequenceKey(1), pytree.MappingKey("a")))
        '[1]["a"]'
    """
    parts = []
    for key in leaf:
        if isinstance(key, pytree.SequenceKey):
            parts.append(f"[{key.idx}]")
        elif isinstance(key, pytree.MappingKey):
            k = key.key
            parts.append(f'["{k}"]' if isinstance(k, str) else f"[{k!r}]")
        elif isinstance(key, pytree.GetAttrKey):
            parts.append(f'["{key.name}"]')
        else:
            parts.append(f"[{key.text}]")
    return "".join(parts)


@dataclass(frozen=True)
class CallId:
    """One call of a module within one forward.

    Attributes:
        module_path: Qualified module path as in ``named_modules()`` (``""`` for the root).
        call_index: 0 for the first call of the module in one forward, 1 for the second, ...
    """

    module_path: str
    call_index: int = 0

    def output(self, leaf: LeafPath = ()) -> MarkerName:
        """The name of this call's output (or of the tensor at ``leaf`` inside it)."""
        return MarkerName(self.module_path, self.call_index, leaf)

    def input(self, leaf: LeafPath) -> MarkerName:
        """The name of this call's input at ``leaf`` (``[i]`` positional, ``["k"]`` keyword)."""
        return MarkerName(self.module_path, self.call_index, leaf, is_input=True)

    def __str__(self) -> str:
        return self.module_path if self.call_index == 0 else f"{self.module_path}#{self.call_index}"


@dataclass(frozen=True)
class MarkerName:
    """Which value a marker holds: module path, call index, leaf path, input or output.

    Attributes:
        module_path: Qualified module path as in ``named_modules()``; ``""`` for the model
            itself, whose outputs are the final outputs.
        call_index: 0 for the first call of the module in one forward, 1 for the second, ...
        leaf: Position inside a structured value (see :func:`leaf_path`); ``()`` for the value.
        is_input: True for a module input marker, False for an output.

    Example:
        >>> name = MarkerName("enc.layer", 2, (pytree.MappingKey("logits"),))
        >>> str(name), name.call
        ('enc.layer#2["logits"]', CallId(module_path='enc.layer', call_index=2))
    """

    module_path: str
    call_index: int = 0
    leaf: LeafPath = ()
    is_input: bool = False

    @property
    def call(self) -> CallId:
        """The module call this value belongs to."""
        return CallId(self.module_path, self.call_index)

    @property
    def is_model_output(self) -> bool:
        """Whether this is one of the model's final outputs (the root module's output)."""
        return not self.module_path and not self.is_input

    def __str__(self) -> str:
        return str(self.call) + (":in" if self.is_input else "") + leaf_suffix(self.leaf)


_KINDS = {"idx": pytree.SequenceKey, "key": pytree.MappingKey, "attr": pytree.GetAttrKey}


def _encode_key(key: LeafKey) -> list[Any]:
    if isinstance(key, pytree.SequenceKey):
        return ["idx", key.idx]
    if isinstance(key, pytree.MappingKey):
        return ["key", key.key]
    if isinstance(key, pytree.GetAttrKey):
        return ["attr", key.name]
    return ["text", key.text]


def encode_attribute(name: MarkerName) -> str:
    """The Debug node's ``name`` attribute for ``name``: JSON of its fields, defaults left out.

    Example:
        >>> encode_attribute(MarkerName("b:in", 1, (pytree.SequenceKey(0),), is_input=True))
        '{"path":"b:in","call":1,"leaf":[["idx",0]],"input":true}'
    """
    fields: dict[str, Any] = {"path": name.module_path}
    if name.call_index:
        fields["call"] = name.call_index
    if name.leaf:
        fields["leaf"] = [_encode_key(k) for k in name.leaf]
    if name.is_input:
        fields["input"] = True
    return json.dumps(fields, separators=(",", ":"))


def decode_attribute(text: str) -> MarkerName:
    """The :class:`MarkerName` that :func:`encode_attribute` wrote as ``text``.

    Raises:
        ValueError: ``text`` is not such an encoding (a model exported by something else).

    Example:
        >>> decode_attribute('{"path":"lstm","leaf":[["idx",1],["idx",0]]}') == MarkerName(
        ...     "lstm", 0, (pytree.SequenceKey(1), pytree.SequenceKey(0)))
        True
    """
    try:
        fields = json.loads(text)
        path, call = fields["path"], fields.get("call", 0)
        is_input = fields.get("input", False)
        leaf: list[LeafKey] = []
        for kind, value in fields.get("leaf", []):
            leaf.append(OpaqueKey(value) if kind == "text" else _KINDS[kind](value))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"not an fxalign marker name: {text!r}") from e
    if not isinstance(path, str) or type(call) is not int or not isinstance(is_input, bool):
        raise ValueError(f"not an fxalign marker name: {text!r}")
    return MarkerName(path, call, tuple(leaf), is_input)
