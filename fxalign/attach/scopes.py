"""Read the module scopes both ``torch.onnx`` exporters write into a plain export.

Neither exporter needs markers to say which module a node comes from:

- **dynamo exporter** (``torch/onnx/_internal/exporter/_core.py``, ``_set_node_metadata``): every
  node's ``metadata_props`` hold ``pkg.torch.onnx.name_scopes``, the qualified paths of the
  modules on the call stack followed by the FX node's name, and ``pkg.torch.onnx.stack_trace``::

      Relu  node_relu  name_scopes=['', 'blocks.0', 'blocks.0.act', 'relu']

  The paths are ``named_modules()`` names; repeated calls of a module carry the same paths (the
  exported program's ``nn_module_stack`` keys, which tell calls apart, are not copied).
  Value names are the exported program's FX node names (``linear_3``): no scope.
- **TorchScript exporter** (``torch/onnx/utils.py`` ``_setup_trace_module_map``,
  ``torch/csrc/jit/passes/onnx/naming.cpp``): a node is named ``<scope>/<OpType>`` where the
  scope joins, from the model down, each called module's *unqualified* name (its path from the
  last non-numeric part: ``blocks.0`` for ``blocks.0``, ``act`` for ``blocks.0.act``), and an
  output value ``<node name>_output_<i>`` (graph outputs keep their own names)::

      Relu  /blocks.0/act/Relu  ->  /blocks.0/act/Relu_output_0

  A scope string used by an earlier call gets ``_<k>`` appended to its *last* level for the
  k-th later call that has nodes: the second call of ``block.lin`` is ``/block/lin_1``, a
  direct node of the second call of ``block`` is ``/block_1/Mul``. ``add_node_names=False``
  leaves nodes unnamed but values still named, which is enough for the values.

This module only reads the file (:func:`read_scopes`); :mod:`fxalign.attach.pairing` maps its
scopes onto the eager model's calls.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx

from fxalign.errors import UserError
from fxalign.modelio import itemsize

__all__ = [
    "FileScopes",
    "NodeInfo",
    "ValueType",
    "hooks_in_scope",
    "read_scopes",
    "ts_scope_of_value",
]

logger = logging.getLogger(__name__)

ExporterName = Literal["dynamo", "torchscript"]
"""Which ``torch.onnx`` exporter wrote a file."""

NAME_SCOPES = "pkg.torch.onnx.name_scopes"
STACK_TRACE = "pkg.torch.onnx.stack_trace"

_TS_NODE = re.compile(r"^(?P<scope>(?:/[^/]+)*)/[^/]+$")
_TS_VALUE = re.compile(r"^(?P<scope>(?:/[^/]+)*)/[^/]+_output_\d+$")
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+)')
_TS_OP_LEVEL = re.compile(r"^(?P<op>[A-Z][A-Za-z0-9]*)(?:_\d+)?$")

_EXPORT_HINT = (
    "attach to the file as torch.onnx.export wrote it: with the dynamo exporter (the default) "
    "its node metadata carries module paths, with dynamo=False (TorchScript) its node names do "
    "(keep add_node_names=True and export_modules_as_functions=False)"
)


@dataclass(frozen=True)
class ValueType:
    """Element type and shape of an ONNX value, as the file declares or shape inference gives.

    Attributes:
        elem_type: ``onnx.TensorProto`` data type; ``None`` when unknown.
        shape: One entry per dimension, an ``int`` or ``None`` for a dynamic one; ``None``
            when even the rank is unknown.
    """

    elem_type: int | None
    shape: tuple[int | None, ...] | None


@dataclass(frozen=True)
class NodeInfo:
    """One node of the main graph and the scope it was exported in.

    Attributes:
        index: Position in ``graph.node``.
        name: The node's name (may be empty).
        op_type: The node's operator.
        inputs: Names it reads, those its subgraphs read from the main graph included.
        outputs: Names it writes (empty optional outputs left out).
        paths: dynamo: qualified paths of the modules on its call stack, outermost first
            (``("", "blocks.0", "blocks.0.act")``); ``None`` without scope metadata.
        ts_scope: TorchScript: the scope string of its name (``"/blocks.0/act"``, ``""`` for
            the model's own nodes); ``None`` when the name carries no scope.
        source: ``file:line`` of the innermost frame of the dynamo stack trace outside torch.
    """

    index: int
    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    paths: tuple[str, ...] | None = None
    ts_scope: str | None = None
    source: str | None = None

    @property
    def scoped(self) -> bool:
        """Whether the node carries scope information at all."""
        return self.paths is not None or self.ts_scope is not None


@dataclass(frozen=True)
class FileScopes:
    """What :func:`read_scopes` found in a file.

    Attributes:
        exporter: Which exporter wrote it (judged from its scope information).
        producer: ``producer_name producer_version`` as the file says.
        nodes: Every node of the main graph, in graph order.
        types: ``value name -> ValueType`` for every value with type information.
        graph_inputs: Graph inputs that are not initializers, in order.
        graph_outputs: Graph outputs, in order.
        constants: Initializers, outputs of ``Constant`` nodes, and what ``Identity`` nodes
            copy from them (the TorchScript exporter's shared weights of equal values).
        scoped_nodes: How many nodes carry scope information.
        constant_tensors: ``name -> TensorProto`` of the constants whose data can be read
            (inline initializers, ``Constant`` nodes' ``value``, and external data when
            :attr:`folder` is known; an ``Identity`` copy under its source's data); read with
            :meth:`constant_value`.
        folder: The folder external data is read from (the file's), if known.
    """

    exporter: ExporterName
    producer: str
    nodes: tuple[NodeInfo, ...]
    types: Mapping[str, ValueType] = field(repr=False)
    graph_inputs: tuple[str, ...]
    graph_outputs: tuple[str, ...]
    constants: frozenset[str] = field(repr=False)
    scoped_nodes: int = 0
    constant_tensors: Mapping[str, onnx.TensorProto] = field(
        default_factory=dict, repr=False, compare=False
    )
    folder: str | None = field(default=None, repr=False)

    def constant_value(self, name: str) -> np.ndarray | None:
        """The value of constant ``name`` if its data can be read, else ``None``.

        Held in the loaded file, or external data in :attr:`folder`.
        """
        tensor = self.constant_tensors.get(name)
        if tensor is None:
            return None
        try:
            return onnx.numpy_helper.to_array(tensor, base_dir=self.folder or "")
        except (OSError, ValueError) as e:  # data the proto does not hold after all
            logger.debug("cannot read constant %s: %s", name, e)
            return None


def ts_scope_of_value(name: str) -> str | None:
    """The TorchScript scope a value name carries (``/a/b/Relu_output_0`` -> ``/a/b``).

    Example:
        >>> ts_scope_of_value("/blocks.0/act/Relu_output_0"), ts_scope_of_value("15")
        ('/blocks.0/act', None)
    """
    match = _TS_VALUE.match(name)
    return None if match is None else match.group("scope")


def _ts_scope_of_node(node: onnx.NodeProto) -> str | None:
    """The scope of a TorchScript node name (``/a/b/Relu``, ``/a/b/Relu_3`` -> ``/a/b``).

    A tool that rewrites a node may name the new one after it: ONNX Runtime's
    ``MatMulAddFusion`` turns ``/fc2/MatMul`` into ``/fc2/MatMul/MatMulAddFusion``. Levels
    naming an ONNX operator (``MatMul``, ``Add_2``) are the exporter's op names, not modules.

    Example:
        >>> node = onnx.helper.make_node("Gemm", [], [], name="/fc2/MatMul/MatMulAddFusion")
        >>> _ts_scope_of_node(node)
        '/fc2'
    """
    match = _TS_NODE.match(node.name) if node.name.startswith("/") else None
    if match is not None:
        scope: str = match.group("scope")
        while scope and _is_op_level(scope.rsplit("/", 1)[1]):
            scope = scope.rsplit("/", 1)[0]
        return scope
    # add_node_names=False: the outputs are still named after the scope.
    for out in node.output:
        named = ts_scope_of_value(out)
        if named is not None:
            return named
    return None


_LAYOUT_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})


def _adopt_layout_nodes(nodes: list[NodeInfo]) -> list[NodeInfo]:
    """TorchScript nodes: an unnamed layout node takes the scope of what it serves.

    A tool rewriting a module's nodes may add nodes without a name of the exporter's
    (ONNX Runtime's ``MatMulAddFusion`` flattens a ``Gemm``'s input with a ``Reshape`` named
    ``gemm_input_reshape`` and restores the shape after it): such a node is part of the
    rewritten module. An unscoped ``Reshape``, ``Flatten``, ``Squeeze``, ``Unsqueeze`` or
    ``Identity`` whose readers all lie in one scope takes it, else the scope of the node
    computing its input. Nodes that compute are left unscoped: their owner cannot be told.
    """
    scope_of_value: dict[str, str] = {}
    readers: dict[str, list[int]] = {}
    for node in nodes:
        for name in node.inputs:
            readers.setdefault(name, []).append(node.index)
        if node.ts_scope is not None:
            scope_of_value.update((o, node.ts_scope) for o in node.outputs)
    adopted = list(nodes)
    for _ in range(2):  # a chain of two such nodes (ONNX Runtime's merged reshapes)
        for node in adopted:
            if node.ts_scope is not None or node.op_type not in _LAYOUT_OPS or not node.inputs:
                continue
            served = {adopted[j].ts_scope for o in node.outputs for j in readers.get(o, [])}
            scope = served.pop() if len(served) == 1 else None
            if scope is None and not served:
                scope = scope_of_value.get(node.inputs[0])
            if scope is not None:
                adopted[node.index] = dataclasses.replace(node, ts_scope=scope)
                scope_of_value.update((o, scope) for o in node.outputs)
    return adopted


def _is_op_level(level: str) -> bool:
    match = _TS_OP_LEVEL.match(level)
    return match is not None and onnx.defs.has(match.group("op"))


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    names = [n for n in node.input if n]
    for attr in node.attribute:
        for sub in [attr.g, *attr.graphs] if attr.type in (5, 10) else []:
            produced = {o for inner in sub.node for o in inner.output}
            produced |= {i.name for i in sub.input} | {i.name for i in sub.initializer}
            names.extend(n for inner in sub.node for n in _node_inputs(inner) if n not in produced)
    return names


def _string_list(value: str) -> Any:
    r"""The list of strings a ``repr`` wrote, as ``ast.literal_eval`` reads it.

    Without a backslash or a double quote in it, every item of ``['', 'blocks', 'relu']`` is
    quoted with ``'`` and holds none: split directly (``literal_eval`` compiles each of the
    thousands of such strings of a large file). Anything else goes to ``literal_eval``.

    Example:
        >>> _string_list("['', 'blocks', 'blocks.0', 'relu']"), _string_list("[]")
        (['', 'blocks', 'blocks.0', 'relu'], [])
        >>> _string_list(repr(["", "it's", "a\\b"]))  # quotes and backslashes: literal_eval
        ['', "it's", 'a\\b']
    """
    if value == "[]":
        return []
    if value.startswith("['") and value.endswith("']") and "\\" not in value and '"' not in value:
        return value[2:-2].split("', '")
    return ast.literal_eval(value)


def _paths(value: str) -> tuple[str, ...] | None:
    try:
        scopes = _string_list(value)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(scopes, list) or len(scopes) < 2 or scopes[0] != "":
        return None  # no nn_module_stack: only the FX node's name
    return tuple(str(s) for s in scopes[:-1])


_TORCH_DIR = None


def _source(trace: str) -> str | None:
    """``file:line`` of the innermost frame outside torch's own package."""
    global _TORCH_DIR
    if _TORCH_DIR is None:
        import torch

        _TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
    frames = [(m.group("file"), m.group("line")) for m in _FRAME.finditer(trace)]
    if not frames:
        return None
    outside = [f for f in frames if not f[0].startswith(_TORCH_DIR)]
    file, line = (outside or frames)[-1]
    return f"{file}:{line}"


def _value_type(info: onnx.ValueInfoProto) -> ValueType | None:
    if not info.type.HasField("tensor_type"):
        return None
    tensor = info.type.tensor_type
    elem = tensor.elem_type or None
    if not tensor.HasField("shape"):
        return ValueType(elem, None)
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
    return ValueType(elem, dims)


def _types(model: onnx.ModelProto) -> dict[str, ValueType]:
    graph = model.graph
    types: dict[str, ValueType] = {}
    for t in graph.initializer:
        types[t.name] = ValueType(t.data_type, tuple(int(d) for d in t.dims))
    for info in [*graph.input, *graph.value_info, *graph.output]:
        vt = _value_type(info)
        if vt is not None and (vt.shape is not None or info.name not in types):
            types[info.name] = vt
    produced = [o for n in graph.node for o in n.output if o]
    if all(name in types and types[name].shape is not None for name in produced):
        return types
    # TorchScript exports and post-processed files often lack value_info: infer it on a copy.
    try:
        inferred = onnx.shape_inference.infer_shapes(_without_weights(model), strict_mode=False)
    except Exception as e:  # custom ops, models over 2 GB: keep what the file declares
        logger.debug("shape inference failed: %s", e)
        return types
    for info in [*inferred.graph.value_info, *inferred.graph.output]:
        vt = _value_type(info)
        if vt is not None and (info.name not in types or types[info.name].shape is None):
            types[info.name] = vt
    return types


_SMALL = 1024
"""Initializers up to this many bytes keep their values for shape inference (shapes, axes)."""


def _nbytes(tensor: onnx.TensorProto) -> int:
    """The size of ``tensor``'s values from its type and dims (reading raw_data copies them)."""
    size = itemsize(tensor)
    return tensor.ByteSize() if size is None else size * math.prod(tensor.dims)


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` for shape inference: large initializers become typed graph inputs.

    Shape inference needs the values of shape-like constants only; a TorchScript export keeps
    its weights inline, and serialising them for the inference would copy every byte.
    """
    graph = model.graph
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g = light.graph
    g.name = graph.name
    g.node.extend(graph.node)
    g.input.extend(graph.input)
    g.output.extend(graph.output)
    g.value_info.extend(graph.value_info)
    declared = {i.name for i in graph.input}
    for t in graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL and _nbytes(t) <= _SMALL:
            g.initializer.append(t)
        elif t.name not in declared:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def _read_node(index: int, node: onnx.NodeProto) -> NodeInfo:
    meta = {p.key: p.value for p in node.metadata_props}
    paths = _paths(meta[NAME_SCOPES]) if NAME_SCOPES in meta else None
    source = _source(meta.get(STACK_TRACE, "")) if paths is not None else None
    return NodeInfo(
        index,
        node.name,
        node.op_type,
        tuple(_node_inputs(node)),
        tuple(o for o in node.output if o),
        paths,
        None,
        source,
    )


def hooks_in_scope(model: onnx.ModelProto) -> bool:
    """Whether the file puts the ops of a module's forward hooks in the module's scope.

    The dynamo exporter does (its scopes are the exported program's module stack, hooks
    included); the TorchScript exporter scopes ``forward`` alone, so a hook's ops are the
    caller's. Judged as :func:`read_scopes` judges the exporter: by the dynamo metadata.

    Example:
        >>> node = onnx.helper.make_node("Relu", ["x"], ["y"], name="/act/Relu")
        >>> graph = onnx.helper.make_graph([node], "g", [], [])
        >>> hooks_in_scope(onnx.helper.make_model(graph))
        False
    """
    return any(_read_node(i, n).paths is not None for i, n in enumerate(model.graph.node))


def read_scopes(model: onnx.ModelProto, folder: str | None = None) -> FileScopes:
    """Read every node's module scope, and every value's type, from an exported file.

    Args:
        model: The file, loaded with or without its external data
            (``onnx.load(path, load_external_data=False)`` is enough).
        folder: The file's folder, where its external data lies (none is read here).

    Returns:
        A :class:`FileScopes`.

    Raises:
        UserError: The file has no scope information: exported with
            ``export_modules_as_functions``, written by another tool, or post-processed by
            one that drops node metadata (onnx-simplifier and ONNX Runtime's offline
            optimisation drop the dynamo exporter's).
    """
    graph = model.graph
    if model.functions:
        raise UserError(
            f"the ONNX file keeps modules as {len(model.functions)} local functions "
            f"({', '.join(f.name for f in model.functions[:3])}...): fxalign attaches to "
            "module scopes in the main graph",
            hint="export with export_modules_as_functions=False; " + _EXPORT_HINT,
        )
    nodes = [_read_node(i, n) for i, n in enumerate(graph.node)]
    exporter: ExporterName = "dynamo"
    scoped = sum(n.paths is not None for n in nodes)
    if scoped == 0:
        nodes = [
            NodeInfo(n.index, n.name, n.op_type, n.inputs, n.outputs, None, _ts_scope_of_node(p))
            for n, p in zip(nodes, graph.node, strict=True)
        ]
        exporter = "torchscript"
        nodes = _adopt_layout_nodes(nodes)
        scoped = sum(n.ts_scope is not None for n in nodes)
    if scoped == 0:
        raise UserError(_no_scope_message(model), hint=_EXPORT_HINT)
    producer = f"{model.producer_name} {model.producer_version}".strip()
    initializers = {t.name for t in graph.initializer}
    held: dict[str, onnx.TensorProto] = {
        t.name: t
        for t in graph.initializer
        if (folder is not None and t.data_location == onnx.TensorProto.EXTERNAL)
        or (t.data_location != onnx.TensorProto.EXTERNAL and not _no_data(t))
    }
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.output:
            value = next((a.t for a in n.attribute if a.name == "value"), None)
            if value is not None and not _no_data(value):
                held[n.output[0]] = value
    constants = _constants(graph, initializers, held)
    logger.debug("%s export by %r: %d of %d nodes scoped", exporter, producer, scoped, len(nodes))
    return FileScopes(
        exporter,
        producer,
        tuple(nodes),
        _types(model),
        tuple(i.name for i in graph.input if i.name not in initializers),
        tuple(o.name for o in graph.output),
        frozenset(constants),
        scoped,
        held,
        folder,
    )


def _constants(
    graph: onnx.GraphProto, initializers: set[str], held: dict[str, onnx.TensorProto]
) -> set[str]:
    """Initializers, ``Constant`` outputs, and the ``Identity`` copies made of them.

    The TorchScript exporter keeps one initializer for weights of equal values (the zero
    biases and the LayerNorm ones and zeros of a model at its initial weights) and gives the
    others their names back with ``Identity`` nodes outside every scope::

        Identity_3  a.bias -> blk.fc2.bias

    Such a copy is a weight, not a value computed in the graph: it is a constant as its
    source is (never a tensor entering a module's scope), and ``held`` gets the source's data
    under its name too.
    """
    constants = initializers | {
        o
        for n in graph.node
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx")
        for o in n.output
    }
    copies: dict[str, list[str]] = {}
    for n in graph.node:
        if n.op_type == "Identity" and n.domain in ("", "ai.onnx") and n.input and n.output:
            copies.setdefault(n.input[0], []).extend(o for o in n.output if o)
    todo = [name for name in constants if name in copies]
    while todo:  # in any graph order, chains of copies included
        source = todo.pop()
        for name in copies.get(source, []):
            if name in constants:
                continue
            constants.add(name)
            if source in held:
                held[name] = held[source]
            todo.append(name)
    return constants


def _no_data(tensor: onnx.TensorProto) -> bool:
    """Whether a tensor proto's data is absent (external data not loaded), not just empty."""
    if math.prod(tensor.dims) == 0:
        return False
    return not (
        tensor.HasField("raw_data")  # not read: reading a bytes field copies it
        or tensor.float_data
        or tensor.int32_data
        or tensor.int64_data
        or tensor.double_data
        or tensor.uint64_data
        or tensor.string_data
    )


def _no_scope_message(model: onnx.ModelProto) -> str:
    nodes = model.graph.node
    producer = model.producer_name or "an unnamed tool"
    if nodes and sum(n.name.startswith("node_") for n in nodes) > len(nodes) // 2:
        return (
            f"the ONNX file (producer {producer!r}) looks like a dynamo export whose node "
            f"metadata was removed: none of its {len(nodes)} nodes has {NAME_SCOPES!r}, the "
            "module paths fxalign reads; onnx-simplifier and ONNX Runtime's offline "
            "optimisation (optimized_model_filepath) drop node metadata"
        )
    return (
        f"the ONNX file (producer {producer!r}) has no module scopes: none of its "
        f"{len(nodes)} nodes has {NAME_SCOPES!r} metadata (dynamo exporter) or a scoped name "
        "like '/layer1/conv/Conv' (TorchScript exporter)"
    )
