"""The culprit as a program of ATen ops, and a copy of it with a marker after every op.

``torch.export`` turns the module, called on its captured inputs, into an ``ExportedProgram``
whose graph holds one node per op, each with the source line that called it
(``meta["stack_trace"]``) and the module it ran in (``meta["nn_module_stack"]``). A program
with in-place ops is functionalized first (``run_decompositions({})``: no op is decomposed),
so that a copy taken after an op cannot change what later ops compute.

:func:`mark_ops` puts a marker after every op whose result is a tensor, named by the op's node,
the way the FX pass marks modules::

    prev -> op -> fxalign::debug(op, "scaled_dot_product_attention") -> users of op

Example:
    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()).eval()
    >>> program = export_program(m, Sample((torch.ones(1, 2),)))
    >>> marked = mark_ops(program)
    >>> [n.name for n in marked.ops]
    ['linear', 'relu']
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from fxalign.errors import UserError
from fxalign.export_errors import captured_output
from fxalign.instrument.result import first_line
from fxalign.markers import DEBUG_OP
from fxalign.names import MarkerName, encode_attribute
from fxalign.samples import Sample

__all__ = ["MarkedProgram", "export_program", "is_mutating", "mark_ops", "plain_module"]

logger = logging.getLogger(__name__)


def is_mutating(node: torch.fx.Node) -> bool:
    """Whether ``node`` calls an op that writes one of its inputs (``add_``, ``copy_``)."""
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def export_program(module: torch.nn.Module, inputs: Sample) -> ExportedProgram:
    """``torch.export.export`` of ``module`` on ``inputs``, functionalized if it writes in place.

    ``module`` is exported as it is (its mode included) and left unchanged: the export traces
    with fake tensors. A module that writes its inputs in place (``ReLU(inplace=True)``) is
    exported on copies of them (a ``clone`` op per tensor input, first in the program).

    Raises:
        UserError: ``torch.export`` cannot trace the module (data-dependent control flow, an
            untraceable call); the message is its first line.
    """
    program = _export(module, module, inputs)
    if any(is_mutating(n) for n in program.graph.nodes if n.op == "call_function"):
        program = program.run_decompositions({})
        if program.graph_signature.user_inputs_to_mutate:
            # torch cannot make a module again of a program one of whose results is also an
            # input's new value (an in-place ReLU on its input): export it on copies of its
            # inputs, whose writes functionalization then drops.
            program = _export(_OnCopies(module), module, inputs).run_decompositions({})
        _batch_norm_again(program.graph_module)
    return program


def _batch_norm_again(module: torch.fx.GraphModule) -> None:
    """Functionalization's ``_native_batch_norm_legit_no_training`` back to ``batch_norm``.

    ``run_decompositions`` lowers an eval-mode ``aten.batch_norm`` to the core op, which the
    TorchScript exporter has no symbolic for (the dynamo exporter takes either). Where only
    its first result (the normalised tensor) is read, the node becomes ``batch_norm`` again,
    with the same arguments, source line and module.
    """
    graph = module.graph
    legit = torch.ops.aten._native_batch_norm_legit_no_training.default
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != legit:
            continue
        users = list(node.users)
        if not all(u.target is operator.getitem and u.args[1] == 0 for u in users):
            continue
        x, weight, bias, mean, var, momentum, eps = node.args
        with graph.inserting_before(node):
            plain = graph.call_function(
                torch.ops.aten.batch_norm.default,
                (x, weight, bias, mean, var, False, momentum, eps, False),
            )
        plain.meta = {k: v for k, v in node.meta.items() if k != "val"}
        if "val" in node.meta:
            plain.meta["val"] = node.meta["val"][0]
        for user in users:
            user.replace_all_uses_with(plain)
            graph.erase_node(user)
        graph.erase_node(node)
        changed = True
    if changed:
        module.recompile()


def _export(module: torch.nn.Module, shown: torch.nn.Module, inputs: Sample) -> ExportedProgram:
    """``torch.export`` of ``module``; what it prints (graph dumps of a failed trace) is logged."""
    fresh = inputs.fresh()
    failure: Exception | None = None
    with captured_output() as printed:
        try:
            program = torch.export.export(module, fresh.args, fresh.kwargs, strict=False)
        except Exception as e:
            failure = e
    output = "".join(printed).strip()
    if output:
        logger.debug("torch.export printed, tracing %s:\n%s", type(shown).__name__, output)
    if failure is not None:
        raise UserError(
            f"torch.export could not trace {type(shown).__name__}: {first_line(failure, 200)}"
        ) from failure
    return program


class _OnCopies(torch.nn.Module):
    """Calls ``inner`` on copies of its tensor inputs: what it writes into them stays inside."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = pytree.tree_map_only(torch.Tensor, torch.clone, (args, kwargs))
        return self.inner(*args, **kwargs)


def plain_module(program: ExportedProgram) -> torch.fx.GraphModule:
    """``program.module()`` as a plain ``GraphModule`` that any exporter can take.

    ``ExportedProgram.module()`` refuses ``train()``/``eval()`` calls, which the TorchScript
    exporter makes; the new module takes over its graph and weights and is called like it
    (same input and output structure).
    """
    unlifted = program.module()  # a new module and graph at every call
    module = torch.fx.GraphModule(unlifted, unlifted.graph)
    for spec in ("_in_spec", "_out_spec"):
        setattr(module, spec, getattr(unlifted, spec, None))
    module.eval()
    return module


@dataclass
class MarkedProgram:
    """A program's module with a marker after every op that yields a tensor.

    Attributes:
        module: The marked ``GraphModule`` (call it as the original module).
        ops: The marked op nodes, in graph order; node ``n``'s marker is
            ``MarkerName(n.name)``.
    """

    module: torch.fx.GraphModule
    ops: list[torch.fx.Node]

    def marker(self, node: torch.fx.Node) -> MarkerName:
        """The marker name of an op node."""
        return MarkerName(node.name)


def _yields_tensor(node: torch.fx.Node) -> bool:
    return (
        node.op == "call_function"
        and node.target is not DEBUG_OP
        and isinstance(node.meta.get("val"), torch.Tensor)
        and not is_mutating(node)
    )


def mark_ops(program: ExportedProgram) -> MarkedProgram:
    """A copy of ``program``'s module with ``fxalign::debug`` after every tensor op.

    Ops that write their inputs in place (left only where the program mutates a buffer or an
    input, after functionalization) are not marked.

    Raises:
        UserError: The program has no op to mark.
    """
    module = plain_module(program)
    graph = module.graph
    ops: list[torch.fx.Node] = []
    for node in list(graph.nodes):
        if not _yields_tensor(node):
            continue
        with graph.inserting_after(node):
            marker = graph.call_function(DEBUG_OP, (node, encode_attribute(MarkerName(node.name))))
        marker.meta = {k: v for k, v in node.meta.items() if k != "stack_trace"}
        node.replace_all_uses_with(marker, delete_user_cb=lambda user, m=marker: user is not m)
        ops.append(node)
    if not ops:
        raise UserError("the module's program has no op that computes a tensor")
    module.recompile()
    return MarkedProgram(module, ops)
