"""The FX pass: trace a copy of a module tree and put a marker after every module call.

``torch.fx`` traces a shallow copy of the tree (parameters shared, module objects not). Every
``call_module`` node (a leaf module in FX's sense: ``torch.nn`` built-ins such as Conv2d,
Linear, LSTM) becomes a marked call, and, with ``granularity="all"``, so does the one value that
leaves each user-defined block::

    prev -> begin_call -> mark_inputs -> node -> mark_output -> users of node
    prev -> (block's nodes) -> debug_apply(value, "layer1.0") -> users of the value

Block scopes come from the ``nn_module_stack`` FX records on every node. A block whose inlined
code hands more than one value to the rest of the graph (a tuple) or none at all cannot be marked
there; :func:`insert_fx_markers` says so.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from fxalign.errors import InputError
from fxalign.instrument.result import Granularity, canonical_paths, first_line, is_leaf_module
from fxalign.instrument.wrappers import (
    TracedModule,
    copy_tree,
    set_replay_root,
    trace_own_forward,
)
from fxalign.markers import (
    begin_call,
    debug_apply,
    mark_inputs,
    mark_output,
    new_forward_scope,
    tensor_leaves,
)
from fxalign.names import leaf_suffix

__all__ = [
    "check_equivalent",
    "insert_fx_markers",
    "instrument_fx",
    "output_differs",
    "reproduces",
]


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return is_leaf_module(m) and not isinstance(m, fx.GraphModule)


def _concrete_args(
    model: torch.nn.Module, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """Fix what the example call leaves out, and every non-tensor value it passes."""
    if args is None and kwargs is None:
        return None
    sig = inspect.signature(model.forward)
    try:
        bound = sig.bind(*(args or ()), **(kwargs or {}))
    except TypeError as e:
        raise InputError(
            f"inputs do not fit {type(model).__name__}.forward{sig}: {e}",
            hint="pass positional inputs as args and keyword inputs as kwargs",
        ) from e
    concrete: dict[str, Any] = {}
    for name, param in sig.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name not in bound.arguments:
            if param.default is not inspect.Parameter.empty:
                concrete[name] = param.default
        elif not _has_tensor(bound.arguments[name]):
            concrete[name] = bound.arguments[name]
    return concrete


def _has_tensor(value: Any) -> bool:
    return any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(value))


def instrument_fx(
    model: torch.nn.Module,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    granularity: Granularity,
    prefix: str = "",
    local: bool = True,
) -> tuple[TracedModule, dict[str, str]]:
    """Trace ``model`` and insert markers; names are ``prefix``-qualified for subtrees.

    Args:
        model: The module to trace (the model, or one of its blocks); not modified.
        args: Example positional inputs (see :func:`fxalign.instrument`), or ``None``.
        kwargs: Example keyword inputs.
        granularity: ``"all"`` or ``"leaf"``.
        prefix: The module path of ``model`` inside the model (``""`` for the model itself).
        local: Also mark each marked call's inputs.

    Returns:
        The traced module and ``block path -> reason`` for blocks that could not be marked.
    """
    tracer = _Tracer()
    # Trace a copy of the module tree (parameters shared) so that nothing done to the result,
    # such as gm.eval(), reaches the user's module objects.
    root = copy_tree(model, "", None)
    trace_own_forward(root)  # a forward set on the instance is the one the model runs
    graph = tracer.trace(root, concrete_args=_concrete_args(model, args, kwargs))
    _restore_parameter_names(graph, model)
    gm = TracedModule(root, graph, f"Instrumented{type(model).__name__}")
    leaf_modules = {
        name
        for name, m in model.named_modules(remove_duplicate=False)
        if name and tracer.is_leaf_module(m, name)
    }
    blocks = dict(root.named_modules(remove_duplicate=False))
    unmarked = insert_fx_markers(
        gm.graph, granularity, leaf_modules, prefix, canonical_paths(model), local, blocks
    )
    gm.recompile()
    # Blocks inlined by FX are no submodules of gm; local-error replays call them in this copy.
    set_replay_root(gm, root)
    return gm, unmarked


def _restore_parameter_names(graph: fx.Graph, model: torch.nn.Module) -> None:
    """FX renames specialised parameters (``scale`` -> ``scale_1``); keep the model's names."""
    params = list(inspect.signature(model.forward).parameters.values())
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node, param in zip(placeholders, params, strict=False):
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            break
        if node.target != param.name:
            node.target = param.name


def _scope_path(key: str, value: Any) -> str:
    """Module path of an ``nn_module_stack`` entry (``"shared@1"`` -> ``"shared"``)."""
    if isinstance(value, tuple) and value and isinstance(value[0], str):
        return value[0]
    return key.split("@", 1)[0]


_Qualify = Callable[[str], str]


def insert_fx_markers(
    graph: fx.Graph,
    granularity: Granularity,
    leaf_modules: set[str],
    prefix: str = "",
    canonical: Mapping[str, str] | None = None,
    local: bool = True,
    blocks: Mapping[str, torch.nn.Module] | None = None,
) -> dict[str, str]:
    """Insert markers into ``graph`` in place; return blocks that could not be marked.

    Args:
        graph: The traced graph.
        granularity: ``"all"`` also marks blocks; ``"leaf"`` only ``call_module`` nodes.
        leaf_modules: Paths FX kept as ``call_module`` nodes.
        prefix: The module path of the traced module inside the model (``""`` for the model
            itself, which also gets the ``new_forward_scope()`` call that starts each forward).
        canonical: ``path -> canonical path`` of modules registered under several names.
        local: Also mark each marked call's inputs.
        blocks: ``path -> module`` of the traced tree (to find blocks taking one input).

    Returns:
        ``block path -> reason`` for blocks that cannot be marked in this graph.
    """

    def qualify(path: str) -> str:
        path = (canonical or {}).get(path, path)  # FX may name a shared module by an alias
        return f"{prefix}.{path}" if prefix and path else (prefix or path)

    nodes = list(graph.nodes)
    # node -> module paths to mark after it, innermost first
    plan: dict[fx.Node, list[str]] = {}
    for n in nodes:
        if n.op == "call_module":
            plan.setdefault(n, []).append(qualify(str(n.target)))
    unmarked: dict[str, str] = {}
    block_inputs: dict[tuple[fx.Node, str], list[fx.Node]] = {}
    if granularity == "all":
        unmarked = _plan_blocks(nodes, plan, leaf_modules, qualify, blocks or {}, block_inputs)
    # Block inputs first: marking a leaf call rewires its node's inputs.
    # Outer blocks first: an inner block's input is then the outer block's marked input.
    block_calls: dict[tuple[fx.Node, str], fx.Node] = {}
    for key in sorted(block_inputs if local else (), key=lambda k: k[1].count(".")):
        call = _mark_block_input(graph, key[1], block_inputs[key])
        if call is not None:
            block_calls[key] = call
    position = {n: i for i, n in enumerate(nodes)}
    for n in sorted(plan, key=position.__getitem__):
        _mark_node(graph, n, plan[n], block_calls, qualify, local)
    first = next((n for n in graph.nodes if n.op != "placeholder"), None)
    if first is not None and not prefix:
        with graph.inserting_before(first):
            graph.call_function(new_forward_scope, ())
    graph.lint()
    return unmarked


def _plan_blocks(
    nodes: list[fx.Node],
    plan: dict[fx.Node, list[str]],
    leaf_modules: set[str],
    qualify: _Qualify,
    blocks: Mapping[str, torch.nn.Module],
    block_inputs: dict[tuple[fx.Node, str], list[fx.Node]],
) -> dict[str, str]:
    """Add each block's marker to ``plan`` at the one value leaving its scope.

    Fills ``block_inputs`` with ``(escaping node, block path) -> the block's nodes`` for blocks
    whose one input from outside can be marked, and returns the blocks that cannot be marked.
    """
    scopes: dict[str, tuple[str, list[fx.Node]]] = {}
    for n in nodes:
        for key, value in (n.meta.get("nn_module_stack") or {}).items():
            path = _scope_path(key, value)
            if path in leaf_modules:
                continue
            scopes.setdefault(key, (path, []))[1].append(n)
    unmarked: dict[str, str] = {}
    for path, members in scopes.values():
        inside = set(members)
        escaping = [m for m in members if any(u not in inside for u in m.users)]
        if len(escaping) == 1:
            plan.setdefault(escaping[0], []).append(qualify(path))
            if _single_input(members, inside, blocks.get(path)) is not None:
                block_inputs[(escaping[0], qualify(path))] = members
        else:
            why = "no value" if not escaping else f"{len(escaping)} separate values"
            unmarked.setdefault(qualify(path), f"block hands {why} to the rest of the traced graph")
    # A value can leave several nested scopes at once: inner scope first.
    for n, names in plan.items():
        leaf_name = qualify(str(n.target)) if n.op == "call_module" else None
        names.sort(key=_marker_order(leaf_name))
    return unmarked


def _mark_node(
    graph: fx.Graph,
    n: fx.Node,
    paths: list[str],
    block_calls: Mapping[tuple[fx.Node, str], fx.Node],
    qualify: _Qualify,
    local: bool,
) -> None:
    """Chain the markers of ``paths`` after node ``n``, innermost first."""
    current = n
    if n.op == "call_module" and paths and paths[0] == qualify(str(n.target)):
        # prev -> begin_call -> mark_inputs -> node -> mark_output -> (block markers) -> users
        current = _mark_module_call(graph, n, paths[0], local)
        paths = paths[1:]
    for path in paths:
        with graph.inserting_after(current):
            if (n, path) in block_calls:
                marker = graph.call_function(mark_output, (current, block_calls[(n, path)]))
            else:
                marker = graph.call_function(debug_apply, (current, path))
        current.replace_all_uses_with(marker, delete_user_cb=_not(marker))
        current = marker


def _single_input(
    members: list[fx.Node], inside: set[fx.Node], block: torch.nn.Module | None
) -> fx.Node | None:
    """The one value an inlined block takes from outside, when its forward takes just that."""
    if block is None:
        return None
    outside = {
        a for m in members for a in m.all_input_nodes if a not in inside and a.op != "get_attr"
    }
    if len(outside) != 1:
        return None
    try:
        params = list(inspect.signature(block.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [
        p
        for p in params
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if len(required) != 1 or not positional or positional[0] is not required[0]:
        return None
    return next(iter(outside))


def _mark_block_input(graph: fx.Graph, name: str, members: list[fx.Node]) -> fx.Node | None:
    """Mark the one outside input of block ``name`` for the block's nodes; return the call."""
    inside = set(members)
    outside = {
        a for m in members for a in m.all_input_nodes if a not in inside and a.op != "get_attr"
    }
    if len(outside) != 1:
        return None
    value = next(iter(outside))
    users = [m for m in members if value in m.all_input_nodes]
    with graph.inserting_before(users[0]):
        call = graph.call_function(begin_call, (name,))
        marked = graph.call_function(mark_inputs, ((value,), {}, call))
        args = graph.call_function(operator.getitem, (marked, 0))
        new_value = graph.call_function(operator.getitem, (args, 0))
    for m in users:
        m.replace_input_with(value, new_value)
    return call


def _mark_module_call(graph: fx.Graph, node: fx.Node, name: str, local: bool) -> fx.Node:
    """Surround a ``call_module`` node with call-level markers; return the output marker."""
    with graph.inserting_before(node):
        call = graph.call_function(begin_call, (name,))
        if local:
            marked = graph.call_function(mark_inputs, (tuple(node.args), dict(node.kwargs), call))
            args = graph.call_function(operator.getitem, (marked, 0))
            kwargs = graph.call_function(operator.getitem, (marked, 1))
            node.args = tuple(
                graph.call_function(operator.getitem, (args, i)) for i in range(len(node.args))
            )
            node.kwargs = {
                key: graph.call_function(operator.getitem, (kwargs, key)) for key in node.kwargs
            }
    with graph.inserting_after(node):
        marker = graph.call_function(mark_output, (node, call))
    node.replace_all_uses_with(marker, delete_user_cb=_not(marker))
    return marker


def _marker_order(leaf_name: str | None) -> Callable[[str], tuple[bool, int]]:
    """Sort key for markers chained on one value: the leaf's own first, then inner blocks."""
    return lambda path: (path != leaf_name, -path.count("."))


def _not(node: fx.Node) -> Callable[[fx.Node], bool]:
    """``delete_user_cb`` that rewires every user except ``node`` itself."""
    return lambda user: user is not node


def check_equivalent(
    model: torch.nn.Module,
    instrumented: torch.nn.Module,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
) -> str | None:
    """Run both on the example inputs; describe the first difference, or return None."""
    if args is None and kwargs is None:
        return None
    with torch.no_grad():
        try:
            expected = model(*(args or ()), **(kwargs or {}))
        except Exception as e:
            return f"the model itself fails on these inputs: {first_line(e)}"
    return reproduces(instrumented, args or (), kwargs or {}, expected)


def reproduces(
    module: torch.nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any], expected: Any
) -> str | None:
    """Whether ``module(*args, **kwargs)`` gives ``expected``; describe the difference if not."""
    with torch.no_grad():
        try:
            output = module(*args, **kwargs)
        except Exception as e:
            return first_line(e)
    return output_differs(expected, output)


def output_differs(expected: Any, output: Any) -> str | None:
    """How ``output`` differs from ``expected`` (structure, shapes, dtypes, values), or None.

    Values agree when equal or within ``rtol=1e-6, atol=1e-7`` (NaN equal to NaN): the same
    computation, up to the order in which a traced graph sums.
    """
    if pytree.tree_structure(output) != pytree.tree_structure(expected):
        # A traced block that returns a dict where its forward returns a ModelOutput (or a list
        # for a tuple) has the same tensors and breaks its caller's ``outputs[0]``.
        return (
            f"output structure {type(output).__name__} != {type(expected).__name__}"
            if type(output) is not type(expected)
            else "output structure differs"
        )
    got, want = tensor_leaves(output), tensor_leaves(expected)
    if list(want) != list(got):
        shown = [leaf_suffix(k) for k in want], [leaf_suffix(k) for k in got]
        return f"outputs {shown[0]} != {shown[1]}"
    for leaf, value in want.items():
        other, name = got[leaf], leaf_suffix(leaf)
        if value.shape != other.shape or value.dtype != other.dtype:
            return (
                f"output{name}: {tuple(value.shape)} {value.dtype} != "
                f"{tuple(other.shape)} {other.dtype}"
            )
        if not torch.equal(value, other) and not torch.allclose(
            value.double(), other.double(), rtol=1e-6, atol=1e-7, equal_nan=True
        ):
            return f"output{name} differs"
    return None
