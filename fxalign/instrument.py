"""Stage 1: put a marker after every module call, without touching the user's model.

Two strategies, tried in this order:

**FX** (``method="fx"``): ``torch.fx`` traces the whole model. Every ``call_module`` node (a leaf
module in FX's sense: ``torch.nn`` built-ins such as Conv2d, Linear, LSTM) gets a marker, and, with
``granularity="all"``, so does the one value that leaves each user-defined block::

    prev -> node -> debug_apply(node, "layer1.0.conv1") -> users of node

Block scopes come from the ``nn_module_stack`` FX records on every node. A block whose inlined
code hands more than one value to the rest of the graph (a tuple) or none at all cannot be marked
there; the coverage says so.

**Eager fallback** (``method="fallback"``): when tracing fails (Hugging Face transformers,
detection models, data-dependent Python control flow) or the traced module does not compute what
the model does, fxalign keeps every module's own Python ``forward`` and marks its output instead.
Each module is replaced by a shallow copy (same parameters, buffers and attributes) whose class is
a subclass of the original with a ``forward`` that calls the original one and marks the result;
its children are copied the same way, recursively. Nothing is traced, so nothing can be
mis-traced, and every module that runs (leaves and blocks) gets a marker, structured outputs
included.

Either way the result shares parameters with the user's model, and the user's model objects are
never modified.
"""

from __future__ import annotations

import contextvars
import copy
import inspect
import logging
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from torch import fx
from torch.utils import _pytree as pytree

from fxalign.errors import InputError, InstrumentationError
from fxalign.markers import (
    begin_call,
    debug_apply,
    mark_inputs,
    mark_output,
    new_forward_scope,
)

__all__ = ["Granularity", "InstrumentResult", "instrument", "instrument_model", "is_leaf_module"]

logger = logging.getLogger(__name__)

Granularity = Literal["all", "leaf"]
"""``"all"`` marks leaf modules and blocks (containers); ``"leaf"`` marks leaf modules only."""

REPLAY_ROOT = "_fxalign_replay_root"
"""Attribute of a traced module holding the module tree it was traced from (for replays)."""


@dataclass
class InstrumentResult:
    """What :func:`instrument_model` produced.

    Attributes:
        module: The instrumented module; call it like the model. A ``torch.fx.GraphModule``
            when FX traced the model, otherwise a copy of the model's module tree whose modules
            mark their outputs.
        method: ``"fx"`` when the whole model was traced, ``"fallback"`` when eager wrappers were
            used.
        granularity: Which modules were marked.
        module_types: ``module path -> class name`` for every module of the model.
        leaf_paths: Paths of the leaf modules (no children, or ``torch.nn`` built-ins).
        fx_error: Why FX could not be used for the whole model (first line), when
            ``method == "fallback"``.
        unmarked: ``module path -> reason`` for modules known not to get a marker before running.
        traced: Module paths whose subtree FX traced (``""`` when the whole model was traced).
        eager: ``module path -> reason`` for blocks that run their own Python ``forward`` (the
            eager fallback) because FX could not trace them; their submodules are still marked.
    """

    module: torch.nn.Module
    method: Literal["fx", "fallback"]
    granularity: Granularity
    module_types: dict[str, str]
    leaf_paths: list[str]
    fx_error: str | None = None
    unmarked: dict[str, str] = field(default_factory=dict)
    traced: list[str] = field(default_factory=list)
    eager: dict[str, str] = field(default_factory=dict)


def replay_module(instrumented: torch.nn.Module, path: str) -> torch.nn.Module:
    """The module to rerun for ``path``: blocks inlined by FX are found in the traced copy.

    Raises:
        AttributeError: No module at ``path``.
    """
    module = instrumented
    for part in path.split(".") if path else []:
        module = module.__dict__.get(REPLAY_ROOT, module)
        module = getattr(module, part)
    return module.__dict__.get(REPLAY_ROOT, module) if path == "" else module


def is_leaf_module(module: torch.nn.Module) -> bool:
    """Whether fxalign treats ``module`` as a leaf: FX's rule, or a module without children.

    ``torch.nn`` built-ins (except ``Sequential``, ``ModuleList`` and ``ModuleDict``) are leaves
    even when they own children, like ``MultiheadAttention`` and its ``out_proj``.
    """
    mod = type(module).__module__
    if mod.startswith(("torch.nn", "torch.ao.nn")) and not isinstance(
        module, (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)
    ):
        return True
    return next(iter(module.children()), None) is None


def instrument(
    model: torch.nn.Module,
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    *,
    granularity: Granularity = "all",
    method: Literal["auto", "fx", "fallback"] = "auto",
    local: bool = True,
) -> torch.nn.Module:
    """Return a copy of ``model`` with a marker after every module call.

    Args:
        model: The model. It is not modified; the result shares its parameters.
        args: Example positional inputs. When given (with ``kwargs``), parameters of ``forward``
            that they leave out are fixed to their defaults and non-tensor arguments to the
            values given, so that FX does not trace optional inputs as tensors, and the traced
            module is checked to compute what the model does on these inputs.
        kwargs: Example keyword inputs.
        granularity: ``"all"`` (default) marks blocks too; ``"leaf"`` marks leaf modules only.
        method: ``"auto"`` tries FX and falls back to eager wrappers; ``"fx"`` or ``"fallback"``
            force one strategy.
        local: Also mark each marked module call's inputs (``path:in[0]``, ...), which the
            local-error replay needs.

    Returns:
        A module that computes what ``model`` computes: a ``torch.fx.GraphModule`` when FX
        traced the model, else (the fallback) a shallow copy of the model whose modules mark
        their outputs. Either shares the model's parameters.

    Raises:
        InstrumentationError: ``method="fx"`` and the model cannot be traced, or nothing works.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> gm = instrument(net)
        >>> "debug_apply" in gm.code
        True
    """
    return instrument_model(
        model, args, kwargs, granularity=granularity, method=method, local=local
    ).module


def instrument_model(
    model: torch.nn.Module,
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    *,
    granularity: Granularity = "all",
    method: Literal["auto", "fx", "fallback"] = "auto",
    local: bool = True,
) -> InstrumentResult:
    """Like :func:`instrument`, returning the module together with what was done.

    Args:
        model: The model; not modified.
        args: Example positional inputs (see :func:`instrument`).
        kwargs: Example keyword inputs.
        granularity: ``"all"`` or ``"leaf"``.
        method: ``"auto"``, ``"fx"`` or ``"fallback"``.
        local: Also mark module inputs (see :func:`instrument`).

    Returns:
        An :class:`InstrumentResult`.

    Raises:
        InstrumentationError: The model cannot be instrumented with the requested method.
    """
    if not isinstance(model, torch.nn.Module):
        raise InstrumentationError(
            f"expected a torch.nn.Module, got {type(model).__name__}",
            hint="wrap a function in an nn.Module whose forward calls it",
        )
    if granularity not in ("all", "leaf"):
        raise InstrumentationError(
            f"unknown granularity {granularity!r}", hint="use 'all' or 'leaf'"
        )
    modules = dict(model.named_modules())  # one path per module object: the canonical one
    module_types = {path: type(m).__name__ for path, m in modules.items()}
    leaf_paths = [
        p for p, m in modules.items() if p and is_leaf_module(m) and _is_own_leaf(p, modules)
    ]
    aliases = {
        path: canonical for path, canonical in _canonical_paths(model).items() if path != canonical
    }

    fx_error: str | None = None
    if method in ("auto", "fx"):
        try:
            gm, unmarked = _instrument_fx(model, args, kwargs, granularity, local=local)
        except InputError:
            raise
        except Exception as e:
            fx_error = _first_line(e)
            if method == "fx":
                raise InstrumentationError(
                    f"torch.fx could not trace {type(model).__name__}: {fx_error}",
                    hint="use method='auto' to fall back to eager wrappers",
                ) from e
            logger.info("FX tracing failed (%s); using eager wrappers", fx_error)
        else:
            mismatch = _check_equivalent(model, gm, args, kwargs)
            if mismatch is None:
                return InstrumentResult(
                    gm,
                    "fx",
                    granularity,
                    module_types,
                    leaf_paths,
                    None,
                    {**_alias_notes(aliases), **unmarked},
                    [""],
                )
            fx_error = f"traced module does not reproduce the model: {mismatch}"
            if method == "fx":
                raise InstrumentationError(
                    f"torch.fx traced {type(model).__name__} incorrectly: {mismatch}",
                    hint="the model has data-dependent control flow; use method='auto'",
                )
            logger.info("%s; using eager wrappers", fx_error)
    if method == "fallback" and fx_error is None:
        fx_error = "eager wrappers requested (method='fallback')"
    wrapped, traced, eager, unmarked = _instrument_fallback(model, args, kwargs, granularity, local)
    unmarked = {**_alias_notes(aliases), **unmarked}
    eager = {"": fx_error or "", **eager}
    return InstrumentResult(
        wrapped,
        "fallback",
        granularity,
        module_types,
        leaf_paths,
        fx_error,
        unmarked,
        traced,
        eager,
    )


def _canonical_paths(model: torch.nn.Module) -> dict[str, str]:
    """Every path of every module -> the module's first path in ``named_modules()``."""
    first: dict[int, str] = {}
    canonical: dict[str, str] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        canonical[path] = first.setdefault(id(module), path)
    return canonical


def _alias_notes(aliases: Mapping[str, str]) -> dict[str, str]:
    return {p: f"same module object as {c!r}, reported under that path" for p, c in aliases.items()}


def _is_own_leaf(path: str, modules: Mapping[str, torch.nn.Module]) -> bool:
    """A leaf owned by a leaf (``attn.out_proj`` in MultiheadAttention) is not a leaf of its own."""
    parts = path.split(".")
    for i in range(1, len(parts)):
        parent = modules.get(".".join(parts[:i]))
        if parent is not None and is_leaf_module(parent):
            return False
    return True


def _first_line(e: BaseException, limit: int = 110) -> str:
    """``Type: first sentence of the message``, at most ``limit`` characters."""
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    if len(text) > limit:
        cut = text.find(". ")
        text = text[: cut + 1] if 0 < cut < limit else text[: limit - 3].rstrip() + "..."
    return f"{type(e).__name__}: {text}"


# --------------------------------------------------------------------------------------------
# FX
# --------------------------------------------------------------------------------------------
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
    from torch.utils import _pytree as pytree

    return any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(value))


def _instrument_fx(
    model: torch.nn.Module,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    granularity: Granularity,
    prefix: str = "",
    local: bool = True,
) -> tuple[fx.GraphModule, dict[str, str]]:
    """Trace ``model`` and insert markers; names are ``prefix``-qualified for subtrees."""
    tracer = _Tracer()
    # Trace a copy of the module tree (parameters shared) so that nothing done to the result,
    # such as gm.eval(), reaches the user's module objects.
    root = _copy_tree(model, "", None, {})
    graph = tracer.trace(root, concrete_args=_concrete_args(model, args, kwargs))
    _restore_parameter_names(graph, model)
    gm = fx.GraphModule(root, graph, f"Instrumented{type(model).__name__}")
    leaf_modules = {
        name
        for name, m in model.named_modules(remove_duplicate=False)
        if name and tracer.is_leaf_module(m, name)
    }
    unmarked = _insert_fx_markers(
        gm.graph,
        granularity,
        leaf_modules,
        prefix,
        _canonical_paths(model),
        local,
        dict(root.named_modules(remove_duplicate=False)),
    )
    gm.recompile()
    # Blocks inlined by FX are no submodules of gm; local-error replays call them in this copy.
    gm.__dict__[REPLAY_ROOT] = root
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


def _insert_fx_markers(
    graph: fx.Graph,
    granularity: Granularity,
    leaf_modules: set[str],
    prefix: str = "",
    canonical: Mapping[str, str] | None = None,
    local: bool = True,
    blocks: Mapping[str, torch.nn.Module] | None = None,
) -> dict[str, str]:
    """Insert markers into ``graph`` in place; return blocks that could not be marked.

    ``prefix`` is the module path of the traced module inside the model (``""`` for the model
    itself, which also gets the ``new_forward_scope()`` call that starts each forward).
    """

    def qualify(path: str) -> str:
        path = (canonical or {}).get(path, path)  # FX may name a shared module by an alias
        return f"{prefix}.{path}" if prefix and path else (prefix or path)

    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    # node -> marker names to chain after it, innermost first
    plan: dict[fx.Node, list[str]] = {}
    for n in nodes:
        if n.op == "call_module":
            plan.setdefault(n, []).append(qualify(str(n.target)))

    unmarked: dict[str, str] = {}
    # (escaping node, block name) -> (the block's one input from outside, the block's nodes)
    block_inputs: dict[tuple[fx.Node, str], tuple[fx.Node, list[fx.Node]]] = {}
    if granularity == "all":
        scopes: dict[str, tuple[str, list[fx.Node]]] = {}
        for n in nodes:
            for key, value in (n.meta.get("nn_module_stack") or {}).items():
                path = _scope_path(key, value)
                if path in leaf_modules:
                    continue
                scopes.setdefault(key, (path, []))[1].append(n)
        for path, members in scopes.values():
            inside = set(members)
            escaping = [m for m in members if any(u not in inside for u in m.users)]
            if len(escaping) == 1:
                plan.setdefault(escaping[0], []).append(qualify(path))
                single = _single_input(members, inside, (blocks or {}).get(path))
                if local and single is not None:
                    block_inputs[(escaping[0], qualify(path))] = (single, members)
            else:
                why = "no value" if not escaping else f"{len(escaping)} separate values"
                unmarked.setdefault(
                    qualify(path), f"block hands {why} to the rest of the traced graph"
                )
        # A value can leave several nested scopes at once: inner scope first.
        for n, names in plan.items():
            leaf_name = qualify(str(n.target)) if n.op == "call_module" else None
            names.sort(key=_marker_order(leaf_name))

    # Block inputs first: marking a leaf call rewires its node's inputs.
    # Outer blocks first: an inner block's input is then the outer block's marked input.
    block_calls: dict[tuple[fx.Node, str], fx.Node] = {}
    for key in sorted(block_inputs, key=lambda k: k[1].count(".")):
        call = _mark_block_input(graph, key[1], block_inputs[key][1])
        if call is not None:
            block_calls[key] = call
    for n in sorted(plan, key=position.__getitem__):
        current = n
        names = plan[n]
        if n.op == "call_module" and names and names[0] == qualify(str(n.target)):
            # prev -> begin_call -> mark_inputs -> node -> mark_output -> (block markers) -> users
            current = _mark_module_call(graph, n, names[0], local)
            names = names[1:]
        for name in names:
            if (n, name) in block_calls:
                call = block_calls[(n, name)]
                with graph.inserting_after(current):
                    marker = graph.call_function(mark_output, (current, call))
            else:
                with graph.inserting_after(current):
                    marker = graph.call_function(debug_apply, (current, name))
            current.replace_all_uses_with(marker, delete_user_cb=_not(marker))
            current = marker

    first = next((n for n in graph.nodes if n.op != "placeholder"), None)
    if first is not None and not prefix:
        with graph.inserting_before(first):
            graph.call_function(new_forward_scope, ())
    graph.lint()
    return unmarked


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


def _check_equivalent(
    model: torch.nn.Module,
    gm: torch.nn.Module,
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
            return f"the model itself fails on these inputs: {_first_line(e)}"
    return _reproduces(gm, args or (), kwargs or {}, expected)


def _reproduces(
    module: torch.nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any], expected: Any
) -> str | None:
    """Whether ``module(*args, **kwargs)`` gives ``expected``; describe the difference if not."""
    from fxalign.runtime import flatten_outputs

    with torch.no_grad():
        try:
            got = flatten_outputs(module(*args, **kwargs))
        except Exception as e:
            return _first_line(e)
    want = flatten_outputs(expected)
    if list(want) != list(got):
        return f"outputs {list(want)} != {list(got)}"
    for name, value in want.items():
        other = got[name]
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


# --------------------------------------------------------------------------------------------
# Eager fallback
# --------------------------------------------------------------------------------------------
_WRAPPED_CLASSES: dict[type, type] = {}


def _marked_class(cls: type[torch.nn.Module]) -> type:
    """A subclass of ``cls`` whose forward marks the original forward's output."""
    wrapped = _WRAPPED_CLASSES.get(cls)
    if wrapped is not None:
        return wrapped

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = self.__dict__
        path = state.get("_fxalign_path")
        call = None
        if path is not None:
            call = begin_call(path)
            if state.get("_fxalign_local", True):
                args, kwargs = mark_inputs(args, kwargs, call)
        out = cls.forward(self, *args, **kwargs)
        probe = _PROBE.get()
        if probe is not None and "_fxalign_block" in state:
            _record(probe, state["_fxalign_block"], args, kwargs, out)
        return out if call is None else mark_output(out, call)

    forward.__signature__ = inspect.signature(cls.forward)  # type: ignore[attr-defined]

    wrapped = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    wrapped.__qualname__ = cls.__qualname__
    _WRAPPED_CLASSES[cls] = wrapped
    return wrapped


def _shallow_copy(module: torch.nn.Module) -> torch.nn.Module:
    new = copy.copy(module)
    # copy.copy shares the container dicts; give the copy its own so edits never reach the user.
    for attr in ("_modules", "_forward_hooks", "_forward_pre_hooks"):
        if attr in module.__dict__:
            new.__dict__[attr] = type(module.__dict__[attr])(module.__dict__[attr])
    return new


def _copy_tree(
    module: torch.nn.Module,
    path: str,
    granularity: Granularity | None,
    memo: dict[int, torch.nn.Module],
    local: bool = True,
) -> torch.nn.Module:
    """Shallow-copy every module of the tree (parameters shared).

    With a granularity, the copies of leaf modules (and of blocks, for ``"all"``) also mark
    their outputs; modules owned by a leaf (``attn.out_proj``) are copied but not marked.
    """
    if id(module) in memo:  # a module registered under two names stays one object
        return memo[id(module)]
    new = _shallow_copy(module)
    memo[id(module)] = new
    leaf = is_leaf_module(module)
    # _modules, not named_children(): the latter skips a module registered twice, which would
    # leave the user's own object inside the copy.
    for name, child in module._modules.items():
        if child is None:
            continue
        child_path = f"{path}.{name}" if path else name
        marking = None if leaf else granularity
        new._modules[name] = _copy_tree(child, child_path, marking, memo, local)
    if granularity is not None and path:
        new.__class__ = _marked_class(type(module))
        if leaf or granularity == "all":
            new.__dict__["_fxalign_path"] = path
            new.__dict__["_fxalign_local"] = local
        if not leaf:
            new.__dict__["_fxalign_block"] = path
    return new


@dataclass
class _Calls:
    """What a probe run saw of one block: its first call, and whether later calls agree."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any
    constants: list[Any]
    count: int = 1
    consistent: bool = True


_PROBE: contextvars.ContextVar[dict[str, _Calls] | None] = contextvars.ContextVar(
    "fxalign_probe", default=None
)


def _detached(value: Any) -> Any:
    return pytree.tree_map(
        lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, value
    )


def _constants(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    leaves, _ = pytree.tree_flatten_with_path((args, kwargs))
    return [(path, leaf) for path, leaf in leaves if not isinstance(leaf, torch.Tensor)]


def _record(
    probe: dict[str, _Calls], path: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    calls = probe.get(path)
    if calls is None:
        probe[path] = _Calls(
            _detached(args), _detached(dict(kwargs)), _detached(out), _constants(args, kwargs)
        )
        return
    calls.count += 1
    try:
        same = bool(calls.constants == _constants(args, kwargs))
    except Exception:
        same = False
    calls.consistent = calls.consistent and same


def _instrument_fallback(
    model: torch.nn.Module,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    granularity: Granularity,
    local: bool = True,
) -> tuple[torch.nn.Module, list[str], dict[str, str], dict[str, str]]:
    """Eager wrappers where needed, FX-traced subtrees where possible.

    1. Every module is wrapped (always valid: nothing is traced).
    2. Given example inputs, one probe run records each block's first call.
    3. Top-down, each block is traced with FX on its recorded arguments; a trace that reproduces
       the recorded output replaces the block's wrapper (its subtree is then marked by FX),
       otherwise the block keeps running its own ``forward`` and its children are tried.
    4. The assembled module must reproduce the model's output, else step 1 is used as is.

    Returns:
        The module, the traced subtree paths, ``path -> reason`` for blocks left eager, and
        blocks known to stay unmarked inside traced subtrees.
    """
    eager_tree = _instrument_eager(model, granularity, local)
    if args is None and kwargs is None:
        return eager_tree, [], {}, {}
    args, kwargs = tuple(args or ()), dict(kwargs or {})
    probe: dict[str, _Calls] = {}
    token = _PROBE.set(probe)
    try:
        with torch.no_grad():
            expected = _detached(eager_tree(*args, **kwargs))
    except Exception:  # the model fails on its inputs: run_torch reports it with context
        return eager_tree, [], {}, {}
    finally:
        _PROBE.reset(token)

    root = _instrument_eager(model, granularity, local)
    traced: list[str] = []
    eager: dict[str, str] = {}
    unmarked: dict[str, str] = {}

    replaced: dict[int, torch.nn.Module] = {}
    visited: set[int] = set()

    def visit(original: torch.nn.Module, copy_: torch.nn.Module, path: str) -> None:
        for name, child in original._modules.items():
            if child is None or is_leaf_module(child) or name not in copy_._modules:
                continue
            if id(child) in visited:  # the same block under a second name
                if id(child) in replaced:
                    copy_._modules[name] = replaced[id(child)]
                continue
            visited.add(id(child))
            child_path = f"{path}.{name}" if path else name
            calls = probe.get(child_path)
            reason = None
            if calls is None:
                pass  # never called itself (a ModuleList, say): look at its children
            elif not calls.consistent:
                reason = "called with different non-tensor arguments"
            else:
                try:
                    gm, inner_unmarked = _instrument_fx(
                        child, calls.args, calls.kwargs, granularity, child_path, local
                    )
                except Exception as e:
                    reason = _first_line(e)
                else:
                    mismatch = _reproduces(gm, calls.args, calls.kwargs, calls.output)
                    if mismatch is None:
                        block = _as_block(gm, child, child_path, granularity, local)
                        copy_._modules[name] = replaced[id(child)] = block
                        traced.append(child_path)
                        unmarked.update(inner_unmarked)
                        continue
                    reason = f"traced module does not reproduce it: {mismatch}"
            if reason is not None:
                eager[child_path] = reason
            visit(child, cast(torch.nn.Module, copy_._modules[name]), child_path)

    visit(model, root, "")
    if traced:
        mismatch = _reproduces(root, args, kwargs, expected)
        if mismatch is not None:
            logger.info("traced subtrees do not compose (%s); eager wrappers only", mismatch)
            return eager_tree, [], {}, {}
    return root, traced, eager, unmarked


def _as_block(
    gm: fx.GraphModule,
    original: torch.nn.Module,
    path: str,
    granularity: Granularity,
    local: bool = True,
) -> torch.nn.Module:
    """Put a traced subtree in its block's place: marked output, the block's plain attributes."""
    for key, value in original.__dict__.items():
        if key.startswith("_") or key in gm.__dict__ or isinstance(value, torch.nn.Module):
            continue
        gm.__dict__[key] = value  # config, head counts, ... read by the parent's forward
    gm.__class__ = _marked_class(type(gm))
    if granularity == "all":
        gm.__dict__["_fxalign_path"] = path
        gm.__dict__["_fxalign_local"] = local
    return gm


def _instrument_eager(
    model: torch.nn.Module, granularity: Granularity, local: bool = True
) -> torch.nn.Module:
    """Wrap the whole module tree; the root resets call indices at every forward."""
    root = _copy_tree(model, "", granularity, {}, local)
    root.__class__ = _root_class(type(model))
    return root


_ROOT_CLASSES: dict[type, type] = {}


def _root_class(cls: type[torch.nn.Module]) -> type:
    """A subclass of ``cls`` whose forward starts a new marker scope, with ``cls``'s signature.

    The signature matters: ``torch.export`` binds keyword inputs through it.
    """
    wrapped = _ROOT_CLASSES.get(cls)
    if wrapped is not None:
        return wrapped

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        new_forward_scope()
        return cls.forward(self, *args, **kwargs)

    forward.__signature__ = inspect.signature(cls.forward)  # type: ignore[attr-defined]
    forward.__doc__ = cls.forward.__doc__
    wrapped = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    wrapped.__qualname__ = cls.__qualname__
    _ROOT_CLASSES[cls] = wrapped
    return wrapped
