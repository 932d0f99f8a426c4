"""Which op of the culprit's own code breaks tolerance first: the module exported alone.

::

    module + its captured inputs
      -> torch.export (ATen ops, source lines)        program.py
      -> a marker after every op -> the run's exporter and options -> extract -> ONNX Runtime
      -> PyTorch value of every op (fx Interpreter), its ONNX value, and its *local* error:
         the op rerun on the ONNX values of its inputs vs its ONNX value
      -> the first op whose local error breaks tolerance (ops of the module's own code first)

An op's input that has no ONNX value of its own (a Python number, an op the exporter folded
away) is recomputed from the nearest values that have one, so the replay of the op that uses
it measures both. A ``getitem`` of a multi-output op (``max(dim)``) is reported as that op.
"""

from __future__ import annotations

import contextlib
import logging
import operator
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.export import ExportedProgram
from torch.fx import Node
from torch.fx._pytree import tree_flatten_spec

from fxalign.backends import onnx_feeds, run_onnx
from fxalign.compare import compare_arrays, dtype_eps, paired
from fxalign.drill.graph import nodes_between
from fxalign.drill.program import MarkedProgram, mark_ops
from fxalign.drill.source import user_frame
from fxalign.errors import UserError
from fxalign.export import export
from fxalign.extract import ExtractResult, extract
from fxalign.options import AlignOptions
from fxalign.report.model import Metrics, OpFinding
from fxalign.samples import Sample
from fxalign.state import ModuleState
from fxalign.torch_run import to_numpy

__all__ = ["OpValues", "drill_ops", "module_export_options"]

logger = logging.getLogger(__name__)

_NOT_FOR_A_MODULE = (
    "input_names",
    "output_names",
    "dynamic_shapes",
    "dynamic_axes",
    "report",
    "verify",
    "profile",
    "dump_exported_program",
    "artifacts_dir",
)
"""Export options that describe the whole model's interface or write files of their own."""


def module_export_options(export_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The run's export options that apply to one module exported alone.

    Example:
        >>> module_export_options({"opset_version": 18, "input_names": ["ids"]})
        {'opset_version': 18}
    """
    return {k: v for k, v in export_kwargs.items() if k not in _NOT_FOR_A_MODULE}


@dataclass
class OpValues:
    """Every marked op's values in the standalone export.

    Attributes:
        eager: ``op node -> PyTorch value``.
        onnx: ``op node -> ONNX value`` (ops the exporter folded away have none).
        onnx_names: ``op node -> graph output`` holding its ONNX value.
        extracted: The op-level debug model.
    """

    eager: dict[Node, torch.Tensor] = field(default_factory=dict)
    onnx: dict[Node, np.ndarray] = field(default_factory=dict)
    onnx_names: dict[Node, str] = field(default_factory=dict)
    extracted: ExtractResult | None = None


def drill_ops(
    program: ExportedProgram,
    inputs: Sample,
    *,
    module_path: str,
    atol: float,
    rtol: float,
    options: AlignOptions,
    workdir: Path,
) -> OpFinding:
    """The first op of a module whose local error breaks ``atol``/``rtol`` on ``inputs``.

    Args:
        program: The module as a program (:func:`fxalign.drill.program.export_program`); its
            module's state is put back after every run.
        inputs: The culprit call's inputs.
        module_path: Its path in the model (for the finding).
        atol: Absolute tolerance (the culprit row's).
        rtol: Relative tolerance (the culprit row's).
        options: The run's options: exporter, export options, verdict, runner.
        workdir: Where the op-level models are written.

    Returns:
        The finding.

    Raises:
        UserError: The marked module cannot be exported or run, or no op breaks tolerance
            in the standalone export; the message says which.
    """
    marked = mark_ops(program)
    state = ModuleState.snapshot(marked.module.modules())
    values = OpValues()
    with _put_back(state):
        values = _onnx_values(marked, inputs, options, workdir)
        values.eager = _torch_values(marked, inputs)
    scored = []
    for node in marked.ops:
        with _put_back(state):
            local = _local(marked, node, values, inputs, atol, rtol, options)
        if local is not None:
            scored.append((node, local))
    breaking = [(n, m) for n, m in scored if m.mismatched > 0]
    if not breaking:
        raise UserError(
            f"no op of {module_path or '(model)'} breaks tolerance when it is exported alone "
            f"on its captured inputs ({len(scored)} ops compared)"
        )
    own = [(n, m) for n, m in breaking if _own_code(n)]
    node, local = (own or breaking)[0]
    return _finding(node, local, values, module_path, len(scored), atol, rtol, options)


@contextlib.contextmanager
def _put_back(state: ModuleState) -> Iterator[None]:
    try:
        yield
    finally:
        state.restore()


def _onnx_values(
    marked: MarkedProgram, inputs: Sample, options: AlignOptions, workdir: Path
) -> OpValues:
    """Export the marked module with the run's exporter and options; run the debug model."""
    workdir.mkdir(parents=True, exist_ok=True)
    fresh = inputs.fresh()
    exported = export(
        marked.module,
        fresh.args,
        workdir / "ops.onnx",
        kwargs=fresh.kwargs,
        exporter=options.exporter,
        **module_export_options(options.export_kwargs),
    )
    extracted = extract(exported.path, exported.aliases)
    debug_path = workdir / "ops-debug.onnx"
    extracted.save(debug_path)
    fresh = inputs.fresh()
    feeds = onnx_feeds(
        extracted.model,
        fresh.args,
        fresh.kwargs,
        forward=marked.module.forward,
        input_names=exported.input_names,
    )
    raw = run_onnx(debug_path, feeds, options.providers, runner=options.runner, workdir=workdir)
    values = OpValues(extracted=extracted)
    for node in marked.ops:
        name = extracted.tensor_of.get(marked.marker(node))
        if name is not None:
            values.onnx[node] = raw[name]
            values.onnx_names[node] = name
    return values


def _flat_inputs(module: torch.fx.GraphModule, inputs: Sample) -> list[Any]:
    """The program's placeholders' values: the inputs flattened by its input spec."""
    fresh = inputs.fresh()
    return list(tree_flatten_spec((fresh.args, fresh.kwargs), module._in_spec))


def _torch_values(marked: MarkedProgram, inputs: Sample) -> dict[Node, torch.Tensor]:
    """Every op's PyTorch value, from one run of the program's graph."""
    interpreter = torch.fx.Interpreter(marked.module, garbage_collect_values=False)
    with torch.no_grad():
        interpreter.run(*_flat_inputs(marked.module, inputs), enable_io_processing=False)
    return {n: interpreter.env[n] for n in marked.ops if n in interpreter.env}


def _as_torch(value: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    if value.dtype.name == "bfloat16":
        value = value.astype(np.float32)
    return torch.from_numpy(np.array(value, copy=True)).to(like.dtype)


def _replay(marked: MarkedProgram, node: Node, values: OpValues, inputs: Sample) -> torch.Tensor:
    """Rerun ``node`` on the ONNX values of its inputs (recomputing those without one)."""
    interpreter = torch.fx.Interpreter(marked.module, garbage_collect_values=False)
    env = interpreter.env
    placeholders = [n for n in marked.module.graph.nodes if n.op == "placeholder"]
    env.update(zip(placeholders, _flat_inputs(marked.module, inputs), strict=True))
    known = {marker: values.onnx[op] for op in values.onnx for marker in op.users}

    def ensure(n: Node) -> None:
        if n in env:
            return
        if n in known and n.args[0] in values.eager:
            env[n] = _as_torch(known[n], values.eager[n.args[0]])  # type: ignore[index]
            return
        for arg in n.all_input_nodes:
            ensure(arg)
        env[n] = interpreter.run_node(n)

    with torch.no_grad():
        for arg in node.all_input_nodes:
            ensure(arg)
        result = interpreter.run_node(node)
    if not isinstance(result, torch.Tensor):
        raise TypeError(f"{node.name} returned {type(result).__name__}")
    return result


def _local(
    marked: MarkedProgram,
    node: Node,
    values: OpValues,
    inputs: Sample,
    atol: float,
    rtol: float,
    options: AlignOptions,
) -> Metrics | None:
    """The op's local error, or ``None`` when it has no ONNX value or cannot be replayed."""
    got, reference = values.onnx.get(node), values.eager.get(node)
    if got is None or reference is None:
        return None
    try:
        replayed = _replay(marked, node, values, inputs)
    except Exception as e:
        logger.debug("replaying op %s failed: %s", node.name, e)
        return None
    return _metrics(replayed, got, atol, rtol, options)


def _metrics(
    reference: torch.Tensor, got: np.ndarray, atol: float, rtol: float, options: AlignOptions
) -> Metrics | None:
    ref = to_numpy(reference)
    value, _ = paired(ref, got)
    if value.shape != ref.shape:
        return None
    dtype = str(reference.dtype).removeprefix("torch.")
    metrics, _ = compare_arrays(
        ref, value, atol=atol, rtol=rtol, verdict=options.verdict, eps=dtype_eps(dtype)
    )
    return metrics


def _source_node(node: Node) -> Node:
    """The op a ``getitem`` takes its value from (``max.dim`` for ``max(...).values``)."""
    if node.target is operator.getitem and isinstance(node.args[0], Node):
        return node.args[0]
    return node


def _scope(node: Node) -> str:
    """Path, relative to the exported module, of the innermost module the op ran in."""
    stack = _source_node(node).meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return str(path)


def _own_code(node: Node) -> bool:
    return _scope(node) == ""


def _finding(
    node: Node,
    local: Metrics,
    values: OpValues,
    module_path: str,
    compared: int,
    atol: float,
    rtol: float,
    options: AlignOptions,
) -> OpFinding:
    source = _source_node(node)
    frame = user_frame(source.meta.get("stack_trace"))
    scope = _scope(node)
    path = ".".join(p for p in (module_path, scope) if p)
    onnx_nodes: list[str] = []
    op_types: list[str] = []
    if values.extracted is not None and node in values.onnx_names:
        stop = {name for n, name in values.onnx_names.items() if n is not node}
        found = nodes_between(values.extracted.model.graph, values.onnx_names[node], stop)
        onnx_nodes = [n.name for n in found]
        op_types = list(dict.fromkeys(n.op_type for n in found if n.op_type != "Constant"))
    cumulative = _metrics(values.eager[node], values.onnx[node], atol, rtol, options)
    return OpFinding(
        module_path=path,
        op=str(source.target),
        node=source.name,
        file=frame.file if frame else "",
        line=frame.line if frame else 0,
        source=frame.text if frame else "",
        onnx_nodes=onnx_nodes,
        onnx_op_types=op_types,
        metrics=cumulative,
        local=local,
        ops_compared=compared,
    )
