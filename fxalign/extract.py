"""Stage 3: turn the exported model into a runnable debug model with onnx-graphsurgeon.

Every ``fxalign::Debug`` node and every pass-through ``Identity`` node is removed by wiring its
consumers (and any graph output) to its input::

    producer -> t -> Debug(name="layer1.0.conv1") -> t' -> consumers
    producer -> t -------------------------------------> consumers,  t promoted to graph output

The original graph outputs stay first and keep their names; the marked tensors follow. The
result passes ``onnx.checker`` and needs nothing but standard ONNX ops.

Weights never take part in the surgery: initializers over 1 KiB are set aside (the surgery sees
them as typed graph inputs) and put back at the end, and weights stored as external data (what
:func:`fxalign.export` writes with either exporter) are not even loaded: the debug model refers
to the same external data file, so it belongs next to the exported model
(:attr:`ExtractResult.external_data_dir`). That keeps extraction time and memory independent of
the model's size.
"""

from __future__ import annotations

import ast
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from fxalign.errors import InternalError
from fxalign.markers import DOMAIN, OP_TYPE
from fxalign.modelio import copy_fields, itemsize, save_model
from fxalign.names import MarkerName, decode_attribute

__all__ = ["ExtractResult", "extract", "locate_failure"]

logger = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    """The debug model and how its outputs map back to markers.

    Attributes:
        model: The debug model: no Debug nodes, marked tensors promoted to graph outputs.
        tensor_of: ``marker name -> graph output name`` holding that marker's value, in the order
            the markers appear in the exported graph (each Debug node's ``name`` attribute
            decoded by :func:`fxalign.names.decode_attribute`), then the aliases.
        producer_of: ``marker name -> name of the ONNX node that computes the value`` (empty
            string where the value is a graph input or a constant).
        output_names: The original graph outputs, first in ``model.graph.output``.
        debug_node_count: How many Debug nodes the exported model had.
        removed_identity_count: How many pass-through Identity nodes were removed.
        external_data_dir: Where the debug model's external data is (the exported model's
            directory), when its weights are external data; save the model there (see
            :meth:`save`). ``None`` when the weights are inline.
    """

    model: onnx.ModelProto
    tensor_of: dict[MarkerName, str]
    producer_of: dict[MarkerName, str] = field(default_factory=dict)
    output_names: list[str] = field(default_factory=list)
    debug_node_count: int = 0
    removed_identity_count: int = 0
    external_data_dir: str | None = None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save the debug model to ``path``.

        Next to the exported model (or with inline weights) only the graph is written and the
        external data file is shared; elsewhere the weights are loaded and saved with it.
        """
        here = self.external_data_dir is None or (
            Path(path).resolve().parent == Path(self.external_data_dir).resolve()
        )
        if here:
            save_model(self.model, path)
            return
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        onnx.external_data_helper.load_external_data_for_model(model, str(self.external_data_dir))
        save_model(model, path)


def _is_debug(node: gs.Node) -> bool:
    return bool(node.op == OP_TYPE and node.domain == DOMAIN)


def _bypass(graph: gs.Graph, node: gs.Node) -> gs.Tensor:
    """Wire the consumers of ``node``'s output to its input and detach the node."""
    source, target = node.inputs[0], node.outputs[0]
    if source.dtype is None and target.dtype is not None:
        source.dtype = target.dtype
    if source.shape is None and target.shape is not None:
        source.shape = target.shape
    for consumer in list(target.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is target:
                consumer.inputs[i] = source
    graph.outputs[:] = [source if t is target else t for t in graph.outputs]
    node.inputs.clear()
    node.outputs.clear()
    return source


def extract(
    model: onnx.ModelProto | str | os.PathLike[str],
    aliases: Mapping[MarkerName, MarkerName] | None = None,
) -> ExtractResult:
    """Strip markers from an exported model and promote the marked tensors to outputs.

    Args:
        model: The exported model with Debug nodes, or its path.
        aliases: ``marker name -> marker name`` from :attr:`fxalign.ExportResult.aliases`:
            markers without a Debug node of their own, whose value is the other marker's. They
            are mapped to that marker's tensor.

    Returns:
        An :class:`ExtractResult`.

    Raises:
        InternalError: A Debug node is malformed (its ``name`` is no encoded marker name), or
            the surgery produced a graph ``onnx.checker`` rejects.

    Example:
        >>> result = extract("export.onnx")  # doctest: +SKIP
        >>> result.tensor_of[MarkerName("layer1.0.conv1")]  # doctest: +SKIP
        'conv2d_3'
    """
    external_dir = None
    if not isinstance(model, onnx.ModelProto):
        external_dir = str(Path(model).resolve().parent)
        model = onnx.load(str(model), load_external_data=False)
    light, heavy, stand_ins = _set_weights_aside(model)
    graph = gs.import_onnx(light)
    output_names = [t.name for t in graph.outputs]
    # Remember how the outputs were typed before rewiring can point them at untyped tensors.
    output_info = {t.name: (t.dtype, t.shape) for t in graph.outputs}

    graph.toposort()
    marked: dict[MarkerName, gs.Tensor] = {}
    debug_count = identity_count = 0
    for node in list(graph.nodes):
        if _is_debug(node):
            name = _marker_name(node)  # before the bypass detaches the node
            marked[name] = _bypass(graph, node)
            debug_count += 1
        elif node.op == "Identity" and not node.domain and len(node.inputs) == 1:
            _bypass(graph, node)
            identity_count += 1

    _restore_output_names(graph, output_names, output_info)
    tensor_of, producer_of = _promote(graph, marked)
    for alias, target in (aliases or {}).items():
        if alias not in tensor_of and target in tensor_of:
            tensor_of[alias] = tensor_of[target]
            producer_of[alias] = producer_of[target]
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    unused = {t.name for t in graph.inputs if t.name in stand_ins and not t.outputs} - {
        t.name for t in graph.outputs
    }

    debug_model = gs.export_onnx(graph, do_type_check=False)
    _copy_model_metadata(model, debug_model)
    debug_model = _type_outputs(debug_model)
    try:
        onnx.checker.check_model(debug_model)
    except onnx.checker.ValidationError as e:  # pragma: no cover - our bug if it happens
        raise InternalError(f"the extracted debug model is invalid: {e}") from e
    _put_weights_back(debug_model, heavy, stand_ins, unused)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in heavy.values())
    return ExtractResult(
        debug_model,
        tensor_of,
        producer_of,
        output_names,
        debug_count,
        identity_count,
        external_dir if external else None,
    )


def _marker_name(node: gs.Node) -> MarkerName:
    """The marker name a Debug node carries in its ``name`` attribute."""
    text = node.attrs.get("name")
    if isinstance(text, bytes):
        text = text.decode()
    if not isinstance(text, str) or len(node.inputs) != 1 or len(node.outputs) != 1:
        raise InternalError(f"malformed Debug node {node.name!r}: {node}")
    try:
        return decode_attribute(text)
    except ValueError as e:
        raise InternalError(f"malformed Debug node {node.name!r}: {e}") from e


_INLINE_LIMIT = 1024
"""Initializers up to this many bytes (shapes, scalars) stay in the graph during the surgery."""


def _set_weights_aside(
    model: onnx.ModelProto,
) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto], set[str]]:
    """A copy of ``model`` whose large initializers are typed graph inputs instead.

    Returns the light copy, ``name -> initializer`` of the large ones (the original, uncopied
    protos: ``model`` is not changed) and the names of the graph inputs standing in for them.
    """
    light = onnx.ModelProto()
    copy_fields(light, model, skip=("graph",))
    copy_fields(light.graph, model.graph, skip=("initializer",))
    declared = {i.name for i in model.graph.input}
    heavy: dict[str, onnx.TensorProto] = {}
    stand_ins: set[str] = set()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL or _nbytes(init) > _INLINE_LIMIT:
            heavy[init.name] = init
            if init.name not in declared:
                stand_ins.add(init.name)
                light.graph.input.append(
                    onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
                )
        else:
            light.graph.initializer.append(init)
    return light, heavy, stand_ins


def _nbytes(tensor: onnx.TensorProto) -> int:
    """Size of a tensor's data, from its shape where that is cheaper than ``ByteSize()``."""
    size = itemsize(tensor)
    if size is None:
        return int(tensor.ByteSize())
    return int(math.prod(tensor.dims)) * size


def _put_weights_back(
    model: onnx.ModelProto,
    heavy: Mapping[str, onnx.TensorProto],
    stand_ins: set[str],
    unused: set[str],
) -> None:
    """Turn the stand-in graph inputs back into initializers (dropping unused stand-ins)."""
    kept = [i for i in model.graph.input if i.name not in stand_ins]
    if len(kept) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(kept)
    model.graph.initializer.extend(t for name, t in heavy.items() if name not in unused)


def _new_identity(graph: gs.Graph, source: gs.Tensor, name: str) -> gs.Variable:
    out = gs.Variable(name, dtype=source.dtype, shape=source.shape)
    graph.nodes.append(gs.Node("Identity", name=f"{name}_identity", inputs=[source], outputs=[out]))
    return out


def _restore_output_names(
    graph: gs.Graph, names: list[str], info: dict[str, tuple[Any, Any]]
) -> None:
    """Give every original output its original name back after rewiring."""
    taken = {t.name for t in graph.inputs}
    seen: set[int] = set()
    for i, (tensor, name) in enumerate(zip(list(graph.outputs), names, strict=True)):
        if tensor.name == name and id(tensor) not in seen:
            seen.add(id(tensor))
            continue
        needs_copy = (
            id(tensor) in seen
            or tensor.name in taken
            or isinstance(tensor, gs.Constant)
            or tensor.name in names
        )
        if needs_copy:
            tensor = _new_identity(graph, tensor, name)
        else:
            tensor.name = name
        dtype, shape = info.get(name, (None, None))
        if tensor.dtype is None:
            tensor.dtype = dtype
        if tensor.shape is None:
            tensor.shape = shape
        graph.outputs[i] = tensor
        seen.add(id(tensor))


def _promote(
    graph: gs.Graph, marked: dict[MarkerName, gs.Tensor]
) -> tuple[dict[MarkerName, str], dict[MarkerName, str]]:
    outputs = {id(t): t for t in graph.outputs}
    inputs = {id(t) for t in graph.inputs}
    tensor_of: dict[MarkerName, str] = {}
    producer_of: dict[MarkerName, str] = {}
    exposed: dict[int, gs.Tensor] = {}
    taken: set[str] | None = None
    for name, tensor in marked.items():
        producer_of[name] = tensor.inputs[0].name if tensor.inputs else ""
        key = id(tensor)
        if key not in exposed:
            if key in outputs:
                exposed[key] = tensor
            elif isinstance(tensor, gs.Constant) or key in inputs:
                taken = set(graph.tensors()) if taken is None else taken
                out = _new_identity(graph, tensor, _unique(f"fxalign::{name}", taken))
                graph.outputs.append(out)
                exposed[key] = out
            else:
                graph.outputs.append(tensor)
                exposed[key] = tensor
        tensor_of[name] = exposed[key].name
    return tensor_of, producer_of


def _unique(name: str, taken: set[str]) -> str:
    """``name``, or ``name_<n>`` when taken (two markers may look alike); marks it taken."""
    unique, n = name, 0
    while unique in taken:
        n += 1
        unique = f"{name}_{n}"
    taken.add(unique)
    return unique


def _copy_model_metadata(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    dst.ir_version = src.ir_version
    dst.producer_name = src.producer_name
    dst.producer_version = src.producer_version
    del dst.opset_import[:]
    dst.opset_import.extend(o for o in src.opset_import if o.domain != DOMAIN)
    dst.functions.extend(f for f in src.functions if f not in dst.functions)


def _type_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fill in the element type of graph outputs the exporter left untyped."""
    untyped = [
        o
        for o in model.graph.output
        if not o.type.HasField("tensor_type")
        or o.type.tensor_type.elem_type == onnx.TensorProto.UNDEFINED
    ]
    if not untyped:
        return model
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as e:
        logger.debug("shape inference failed: %s", e)
        return model
    known = {v.name: v for v in inferred.graph.value_info}
    known.update({v.name: v for v in inferred.graph.output})
    for out in untyped:
        info = known.get(out.name)
        if info is not None and info.type.tensor_type.elem_type != onnx.TensorProto.UNDEFINED:
            out.type.CopyFrom(info.type)
    return model


_NODE_NAME_RE = re.compile(r"[Nn]ame:?\s*'([^']*)'")
_UNKNOWN_OP_RE = re.compile(r"(?:(\w[\w.]*):)?(\w+)\(-?\d+\) is not a registered function/op")


def locate_failure(
    model: onnx.ModelProto, message: str, tensor_of: Mapping[MarkerName, str]
) -> tuple[str | None, str | None, str | None]:
    """Find the node an ONNX Runtime error message is about, and the module it belongs to.

    The node comes from the message (``Name:'...'``, or the unknown op it names). Its module is
    the one the dynamo exporter recorded in the node's metadata when present, else the first
    marker (in graph order) whose value depends on the node's outputs: the innermost module
    whose computation contains it.

    Args:
        model: The debug model (as run).
        message: The runtime's error message.
        tensor_of: ``marker name -> graph output name`` from :func:`extract`.

    Returns:
        ``(node name, op type, module path)``, each ``None`` when unknown.
    """
    nodes = list(model.graph.node)
    node = None
    match = _NODE_NAME_RE.search(message)
    if match:
        node = next((n for n in nodes if n.name == match.group(1)), None)
    if node is None:
        op = _UNKNOWN_OP_RE.search(message)
        if op:
            domain, op_type = op.group(1) or "", op.group(2)
            node = next(
                (n for n in nodes if n.op_type == op_type and n.domain in (domain, "")), None
            )
    if node is None:
        return (match.group(1) if match else None), None, None
    return node.name, node.op_type, _module_of(model, node, tensor_of)


def _module_of(
    model: onnx.ModelProto, node: onnx.NodeProto, tensor_of: Mapping[MarkerName, str]
) -> str | None:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                break
            modules = [s for s in scopes[:-1] if isinstance(s, str) and s]
            if modules:
                return str(modules[-1])
    marker_of: dict[str, MarkerName] = {}
    for marker, tensor in tensor_of.items():
        marker_of.setdefault(tensor, marker)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    order = {marker: i for i, marker in enumerate(tensor_of)}
    seen: set[str] = set()
    frontier = list(node.output)
    found: list[MarkerName] = []
    while frontier:
        tensor = frontier.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        if tensor in marker_of:
            found.append(marker_of[tensor])
            continue
        for consumer in consumers.get(tensor, []):
            frontier.extend(consumer.output)
    if not found:
        return None
    return min(found, key=order.__getitem__).module_path
