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

import copy
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx

from fxalign.errors import InstrumentationError
from fxalign.markers import debug_apply, new_forward_scope

__all__ = ["Granularity", "InstrumentResult", "instrument", "instrument_model", "is_leaf_module"]

logger = logging.getLogger(__name__)

Granularity = Literal["all", "leaf"]
"""``"all"`` marks leaf modules and blocks (containers); ``"leaf"`` marks leaf modules only."""

_INFO_KEY = "fxalign"


@dataclass
class InstrumentResult:
    """What :func:`instrument_model` produced.

    Attributes:
        module: The instrumented module (a ``torch.fx.GraphModule``); call it like the model.
        method: ``"fx"`` when the whole model was traced, ``"fallback"`` when eager wrappers were
            used.
        granularity: Which modules were marked.
        module_types: ``module path -> class name`` for every module of the model.
        leaf_paths: Paths of the leaf modules (no children, or ``torch.nn`` built-ins).
        fx_error: Why FX tracing was not used (first line), when ``method == "fallback"``.
        unmarked: ``module path -> reason`` for modules known not to get a marker before running.
    """

    module: fx.GraphModule
    method: Literal["fx", "fallback"]
    granularity: Granularity
    module_types: dict[str, str]
    leaf_paths: list[str]
    fx_error: str | None = None
    unmarked: dict[str, str] = field(default_factory=dict)


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
) -> fx.GraphModule:
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

    Returns:
        A ``torch.fx.GraphModule`` that computes what ``model`` computes.

    Raises:
        InstrumentationError: ``method="fx"`` and the model cannot be traced, or nothing works.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> gm = instrument(net)
        >>> "debug_apply" in gm.code
        True
    """
    return instrument_model(model, args, kwargs, granularity=granularity, method=method).module


def instrument_model(
    model: torch.nn.Module,
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    *,
    granularity: Granularity = "all",
    method: Literal["auto", "fx", "fallback"] = "auto",
) -> InstrumentResult:
    """Like :func:`instrument`, returning the module together with what was done.

    Args:
        model: The model; not modified.
        args: Example positional inputs (see :func:`instrument`).
        kwargs: Example keyword inputs.
        granularity: ``"all"`` or ``"leaf"``.
        method: ``"auto"``, ``"fx"`` or ``"fallback"``.

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
    modules = dict(model.named_modules(remove_duplicate=False))
    module_types = {path: type(m).__name__ for path, m in modules.items()}
    leaf_paths = [
        p for p, m in modules.items() if p and is_leaf_module(m) and _is_own_leaf(p, modules)
    ]

    fx_error: str | None = None
    if method in ("auto", "fx"):
        try:
            gm, unmarked = _instrument_fx(model, args, kwargs, granularity)
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
                    gm, "fx", granularity, module_types, leaf_paths, None, unmarked
                )
            fx_error = f"traced module does not reproduce the model: {mismatch}"
            if method == "fx":
                raise InstrumentationError(
                    f"torch.fx traced {type(model).__name__} incorrectly: {mismatch}",
                    hint="the model has data-dependent control flow; use method='auto'",
                )
            logger.info("%s; using eager wrappers", fx_error)
    gm = _instrument_eager(model, granularity)
    return InstrumentResult(gm, "fallback", granularity, module_types, leaf_paths, fx_error, {})


def _is_own_leaf(path: str, modules: Mapping[str, torch.nn.Module]) -> bool:
    """A leaf owned by a leaf (``attn.out_proj`` in MultiheadAttention) is not a leaf of its own."""
    parts = path.split(".")
    for i in range(1, len(parts)):
        parent = modules.get(".".join(parts[:i]))
        if parent is not None and is_leaf_module(parent):
            return False
    return True


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return f"{type(e).__name__}: {text.splitlines()[0]}"


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
        from fxalign.errors import InputError

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
) -> tuple[fx.GraphModule, dict[str, str]]:
    tracer = _Tracer()
    # Trace a copy of the module tree (parameters shared) so that nothing done to the result,
    # such as gm.eval(), reaches the user's module objects.
    root = _copy_tree(model, "", None, {})
    graph = tracer.trace(root, concrete_args=_concrete_args(model, args, kwargs))
    _restore_parameter_names(graph, model)
    gm = fx.GraphModule(root, graph, f"Instrumented{type(model).__name__}")
    leaf_modules = {
        name for name, m in model.named_modules() if name and tracer.is_leaf_module(m, name)
    }
    unmarked = _insert_fx_markers(gm.graph, granularity, leaf_modules)
    gm.recompile()
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
    graph: fx.Graph, granularity: Granularity, leaf_modules: set[str]
) -> dict[str, str]:
    """Insert markers into ``graph`` in place; return blocks that could not be marked."""
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    # node -> marker names to chain after it, innermost first
    plan: dict[fx.Node, list[str]] = {}
    for n in nodes:
        if n.op == "call_module":
            plan.setdefault(n, []).append(str(n.target))

    unmarked: dict[str, str] = {}
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
                plan.setdefault(escaping[0], []).append(path)
            else:
                why = "no value" if not escaping else f"{len(escaping)} separate values"
                unmarked.setdefault(
                    path, f"block hands {why} to the rest of the traced graph; not marked"
                )
        # A value can leave several nested scopes at once: inner scope first.
        for n, names in plan.items():
            depth = {p: p.count(".") for p in names}
            names.sort(
                key=lambda p: (0 if p == str(n.target) and n.op == "call_module" else 1, -depth[p])
            )

    for n in sorted(plan, key=position.__getitem__):
        current = n
        for name in plan[n]:
            with graph.inserting_after(current):
                marker = graph.call_function(debug_apply, (current, name))
            current.replace_all_uses_with(marker, delete_user_cb=_not(marker))
            current = marker

    first = next((n for n in graph.nodes if n.op != "placeholder"), None)
    if first is not None:
        with graph.inserting_before(first):
            graph.call_function(new_forward_scope, ())
    graph.lint()
    return unmarked


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
    from fxalign.runtime import flatten_outputs

    with torch.no_grad():
        try:
            expected = flatten_outputs(model(*(args or ()), **(kwargs or {})))
            got = flatten_outputs(gm(*(args or ()), **(kwargs or {})))
        except Exception as e:
            return _first_line(e)
    if list(expected) != list(got):
        return f"outputs {list(expected)} != {list(got)}"
    for name, value in expected.items():
        other = got[name]
        if value.shape != other.shape or value.dtype != other.dtype:
            return (
                f"{name}: {tuple(value.shape)} {value.dtype} != {tuple(other.shape)} {other.dtype}"
            )
        if not torch.equal(value, other) and not torch.allclose(
            value.double(), other.double(), rtol=1e-6, atol=1e-7, equal_nan=True
        ):
            return f"{name} differs"
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
        out = cls.forward(self, *args, **kwargs)
        path = self.__dict__.get("_fxalign_path")
        return out if path is None else debug_apply(out, path)

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
    for name, child in module.named_children():
        child_path = f"{path}.{name}" if path else name
        marking = None if leaf else granularity
        new._modules[name] = _copy_tree(child, child_path, marking, memo)
    if granularity is not None and path and (leaf or granularity == "all"):
        new.__class__ = _marked_class(type(module))
        new.__dict__["_fxalign_path"] = path
    return new


def _instrument_eager(model: torch.nn.Module, granularity: Granularity) -> fx.GraphModule:
    """Wrap the model's module tree; the root is a small GraphModule with the model's signature."""
    wrapped = _copy_tree(model, "", granularity, {})
    graph = fx.Graph()
    sig = inspect.signature(model.forward)
    call_args: list[Any] = []
    call_kwargs: dict[str, Any] = {}
    varargs: Any = ()
    varkw: Any = None
    for name, p in sig.parameters.items():
        if p.kind is p.VAR_POSITIONAL:
            varargs = graph.placeholder("*" + name)
        elif p.kind is p.VAR_KEYWORD:
            varkw = graph.placeholder("**" + name)
        else:
            default = inspect.Parameter.empty if p.default is p.empty else p.default
            node = graph.placeholder(name, default_value=default)
            if p.kind is p.KEYWORD_ONLY:
                call_kwargs[name] = node
            else:
                call_args.append(node)
    graph.call_function(new_forward_scope, ())
    out = graph.call_function(
        _call_wrapped, (graph.get_attr("model"), tuple(call_args), varargs, call_kwargs, varkw)
    )
    graph.output(out)
    return fx.GraphModule({"model": wrapped}, graph, f"Instrumented{type(model).__name__}")


def _call_wrapped(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    varargs: tuple[Any, ...],
    kwargs: dict[str, Any],
    varkw: dict[str, Any] | None,
) -> Any:
    """Call the wrapped model with the root's arguments, ``*args`` and ``**kwargs`` expanded."""
    return module(*args, *varargs, **kwargs, **(varkw or {}))


torch.fx.wrap("_call_wrapped")
