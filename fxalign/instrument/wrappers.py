"""The module classes instrumentation makes, and the state they carry.

* An *eager wrapper* is a shallow copy of a user module (same parameters, buffers and
  attributes) whose class is swapped for a generated subclass (:func:`marked_class`) with a
  ``forward`` that calls the original one and marks the call::

      c = begin_call(path) -> mark_inputs(args, kwargs, c) -> forward -> mark_output(out, c)

* The root of an eager tree gets :func:`root_class`, whose ``forward`` starts a new marker scope.
* A ``forward`` set on the instance (``blk.forward = types.MethodType(f, blk)``, accelerate's
  ``functools.partial(new_forward, module)``) would shadow the wrapper class's ``forward``, and,
  copied as it is, call the user's module instead of the copy. :func:`copy_tree` rebinds it (and
  every other method, partial and closure in the copies' ``__dict__`` that holds a module of the
  tree) to the copies, and wraps it on the instance as the class wraps a class-defined one.
* A module traced by FX is a :class:`TracedModule`, which remembers the module tree it was
  traced from, since blocks that FX inlined are no submodules of it.

Where the state lives: a generated wrapper class cannot add slots (``__class__`` assignment
needs the original layout), so :class:`MarkedModule` and :class:`TracedModule` *declare* their
attribute on the class, with a default, and :func:`set_state` / :func:`set_replay_root` set the
instance's own value with ``object.__setattr__``. That goes past ``nn.Module.__setattr__``: the
value is no submodule, parameter or buffer (a replay root's parameters are counted once), stays
out of ``state_dict()``, and travels with ``copy.copy`` like any attribute.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from fxalign.instrument.rebind import rebind_to_copies
from fxalign.instrument.result import Granularity, is_leaf_module
from fxalign.markers import begin_call, mark_inputs, mark_output, new_forward_scope

__all__ = [
    "BlockCalls",
    "MarkedModule",
    "OpaqueCall",
    "TracedModule",
    "Uncompiled",
    "WrapperState",
    "copy_tree",
    "detached",
    "instrument_eager",
    "is_opaque",
    "marked_class",
    "probing",
    "replay_module",
    "root_class",
    "set_replay_root",
    "set_state",
    "trace_own_forward",
]


@dataclass(frozen=True)
class WrapperState:
    """What an eager wrapper does around its original ``forward``.

    Attributes:
        path: Module path its calls are marked under; ``None``: no marker (a module owned by a
            leaf module, or a module kept only for its ``forward`` signature).
        local: Also mark each call's inputs (the local-error replay needs them).
        block: Path under which a probe run (:func:`probing`) records the calls; set for
            blocks, ``None`` for leaf modules.
    """

    path: str | None = None
    local: bool = True
    block: str | None = None


class MarkedModule:
    """Mixin of every eager wrapper class; declares the wrapper's :class:`WrapperState`."""

    __slots__ = ()
    fxalign_state: WrapperState = WrapperState()


def set_state(module: torch.nn.Module, state: WrapperState) -> None:
    """Give the wrapper ``module`` its own state (see the module docstring for where)."""
    if not isinstance(module, MarkedModule):
        raise TypeError(f"{type(module).__name__} is no eager wrapper")
    object.__setattr__(module, "fxalign_state", state)


class TracedModule(fx.GraphModule):
    """A graph module with markers, made by tracing a copy of a module tree.

    Attributes:
        replay_root: The module tree it was traced from (parameters shared): blocks that FX
            inlined are found there for local-error replays. ``None`` until set.
    """

    replay_root: torch.nn.Module | None = None


def set_replay_root(module: TracedModule, root: torch.nn.Module) -> None:
    """Remember the tree ``module`` was traced from, without registering it as a submodule."""
    object.__setattr__(module, "replay_root", root)


def _replay_root(module: torch.nn.Module) -> torch.nn.Module:
    root = module.replay_root if isinstance(module, TracedModule) else None
    return module if root is None else root


def replay_module(instrumented: torch.nn.Module, path: str) -> torch.nn.Module:
    """The module to rerun for ``path``: blocks inlined by FX are found in the traced copy.

    Raises:
        AttributeError: No module at ``path``.
    """
    module = instrumented
    for part in path.split(".") if path else []:
        module = getattr(_replay_root(module), part)
    return _replay_root(module) if path == "" else module


# --------------------------------------------------------------------------------------------
# The probe: what each block was called with, for tracing it on its own.
# --------------------------------------------------------------------------------------------
@dataclass
class BlockCalls:
    """What a probe run saw of one block: its first call, and whether later calls agree.

    Attributes:
        args: Copies of the first call's positional arguments.
        kwargs: Copies of its keyword arguments.
        output: A copy of its output.
        constants: ``(key path, value)`` of its non-tensor arguments.
        count: How many times the block was called.
        consistent: Whether every call passed the same non-tensor arguments.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any
    constants: list[Any]
    count: int = 1
    consistent: bool = True


_PROBE: contextvars.ContextVar[dict[str, BlockCalls] | None] = contextvars.ContextVar(
    "fxalign_probe", default=None
)


@contextlib.contextmanager
def probing() -> Iterator[dict[str, BlockCalls]]:
    """Record the calls of every eager block run inside the block, by block path."""
    probe: dict[str, BlockCalls] = {}
    token = _PROBE.set(probe)
    try:
        yield probe
    finally:
        _PROBE.reset(token)


def detached(value: Any) -> Any:
    """``value`` with every tensor replaced by a detached copy."""
    return pytree.tree_map(
        lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, value
    )


def _constants(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    leaves, _ = pytree.tree_flatten_with_path((args, kwargs))
    return [(path, leaf) for path, leaf in leaves if not isinstance(leaf, torch.Tensor)]


def _record_call(path: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    probe = _PROBE.get()
    if probe is None:
        return
    calls = probe.get(path)
    if calls is None:
        probe[path] = BlockCalls(
            detached(args), detached(dict(kwargs)), detached(out), _constants(args, kwargs)
        )
        return
    calls.count += 1
    try:
        same = bool(calls.constants == _constants(args, kwargs))
    except Exception:
        same = False
    calls.consistent = calls.consistent and same


# --------------------------------------------------------------------------------------------
# Wrapper classes and the copied tree.
# --------------------------------------------------------------------------------------------
_WRAPPED_CLASSES: dict[type, type] = {}


def marked_class(cls: type[torch.nn.Module]) -> type:
    """A subclass of ``cls`` whose forward marks the original forward's call (see above)."""
    wrapped = _WRAPPED_CLASSES.get(cls)
    if wrapped is not None:
        return wrapped

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _run_marked(self, cls.forward.__get__(self), args, kwargs)

    forward.__signature__ = inspect.signature(cls.forward)  # type: ignore[attr-defined]

    namespace = {"forward": forward, "__module__": cls.__module__}
    wrapped = type(cls.__name__, (_QuietSubclass, cls, MarkedModule), namespace)
    wrapped.__qualname__ = cls.__qualname__
    _WRAPPED_CLASSES[cls] = wrapped
    return wrapped


def _run_marked(
    module: torch.nn.Module,
    forward: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """``forward(*args, **kwargs)`` as a call of the wrapper ``module``, marked per its state."""
    state: WrapperState = module.fxalign_state  # type: ignore[assignment]
    call = None
    if state.path is not None:
        call = begin_call(state.path)
        if state.local:
            args, kwargs = mark_inputs(args, kwargs, call)
    out = forward(*args, **kwargs)
    if state.block is not None:
        _record_call(state.block, args, kwargs, out)
    return out if call is None else mark_output(out, call)


_ROOT_CLASSES: dict[type, type] = {}


def root_class(cls: type[torch.nn.Module]) -> type:
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
    namespace = {"forward": forward, "__module__": cls.__module__}
    wrapped = type(cls.__name__, (_QuietSubclass, cls), namespace)
    wrapped.__qualname__ = cls.__qualname__
    _ROOT_CLASSES[cls] = wrapped
    return wrapped


class _QuietSubclass(torch.nn.Module):
    """First base of every wrapper class: the user's ``__init_subclass__`` hooks never fire.

    Making the wrapper class ``type(name, (cls, ...))`` would call ``cls.__init_subclass__``,
    and a registry kept by the user's base class would end up holding fxalign's wrapper. This
    base comes first in the MRO, so its no-op hook is the one found. It is a ``Module`` (adding
    nothing) so that the wrapper keeps the instance layout ``__class__`` assignment needs.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        pass


def is_opaque(module: torch.nn.Module) -> bool:
    """Whether fxalign runs ``module`` as it is, marking only its calls (a scripted module)."""
    return isinstance(module, torch.jit.ScriptModule)


def _shallow_copy(module: torch.nn.Module) -> torch.nn.Module:
    # Not copy.copy: modules may refuse the pickle protocol it goes through (parametrized
    # modules such as weight_norm raise "only supported through state_dict()").
    new = object.__new__(type(module))
    new.__dict__.update(module.__dict__)
    # The container dicts are shared so far; give the copy its own so edits never reach the user.
    for attr in ("_modules", "_forward_hooks", "_forward_pre_hooks"):
        if attr in module.__dict__:
            new.__dict__[attr] = type(module.__dict__[attr])(module.__dict__[attr])
    return new


def copy_tree(
    module: torch.nn.Module,
    path: str,
    granularity: Granularity | None,
    local: bool = True,
) -> torch.nn.Module:
    """Shallow-copy every module of the tree (parameters shared).

    With a granularity, the copies of leaf modules (and of blocks, for ``"all"``) also mark
    their calls; modules owned by a leaf (``attn.out_proj``) are copied but not marked.

    A ``forward`` set on an instance is kept, made to run on the copies
    (:func:`~fxalign.instrument.rebind.rebind_to_copies`) and, on a marked copy, wrapped in the
    marking: the class :func:`marked_class` makes wraps a class-defined ``forward``, which an
    instance's own shadows.
    """
    copies: dict[int, torch.nn.Module] = {}
    new = _copy_modules(module, path, granularity, {}, copies, local)
    rebind_to_copies(copies)
    for copy in copies.values():
        own = copy.__dict__.get("forward")
        if own is not None and isinstance(copy, MarkedModule):
            copy.__dict__["forward"] = _marked_own_forward(copy, own)
    return new


def _copy_modules(
    module: torch.nn.Module,
    path: str,
    granularity: Granularity | None,
    memo: dict[int, torch.nn.Module],
    copies: dict[int, torch.nn.Module],
    local: bool,
) -> torch.nn.Module:
    """:func:`copy_tree`'s walk; ``copies`` gets ``id(module) -> shallow copy`` of each."""
    if id(module) in memo:  # a module registered under two names stays one object
        return memo[id(module)]
    if is_opaque(module):
        new = module if granularity is None or not path else OpaqueCall(module, path, local)
        memo[id(module)] = new
        return new
    if _is_compiled(module):
        new = Uncompiled()
    else:
        new = copies[id(module)] = _shallow_copy(module)
    memo[id(module)] = new
    leaf = is_leaf_module(module)
    # _modules, not named_children(): the latter skips a module registered twice, which would
    # leave the user's own object inside the copy.
    for name, child in module._modules.items():
        if child is None:
            continue
        child_path = f"{path}.{name}" if path else name
        marking = None if leaf else granularity
        new._modules[name] = _copy_modules(child, child_path, marking, memo, copies, local)
    if granularity is not None and path:
        new.__class__ = marked_class(type(module))
        marked = path if leaf or granularity == "all" else None
        set_state(new, WrapperState(marked, local, None if leaf else path))
    return new


def _marked_own_forward(module: torch.nn.Module, own: Callable[..., Any]) -> Callable[..., Any]:
    """The instance ``forward`` of the wrapper ``module``: ``own``, marked as its state says."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        return _run_marked(module, own, args, kwargs)

    return _with_signature_of(forward, own)


def _scoped_own_forward(own: Callable[..., Any]) -> Callable[..., Any]:
    """The instance ``forward`` of an eager root: a new marker scope, then ``own``."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        new_forward_scope()
        return own(*args, **kwargs)

    return _with_signature_of(forward, own)


def _with_signature_of(forward: Callable[..., Any], own: Callable[..., Any]) -> Callable[..., Any]:
    """``forward``, showing ``own``'s signature (``torch.export`` binds keyword inputs by it)."""
    # No signature to show (a builtin): the wrapper's own, *args and **kwargs.
    with contextlib.suppress(TypeError, ValueError):
        forward.__signature__ = inspect.signature(own)  # type: ignore[attr-defined]
    forward.__doc__ = getattr(own, "__doc__", None)
    return forward


def trace_own_forward(module: torch.nn.Module) -> None:
    """Make ``torch.fx`` trace the ``forward`` set on the instance of the copy ``module``.

    FX traces the root's class ``forward`` (``type(root).forward``), whatever its instance
    holds. A method bound to ``module`` becomes the ``forward`` of a subclass made for it; the
    instance's entry is removed. A module without one is left as it is.

    Raises:
        TypeError: The instance's ``forward`` is no method bound to ``module`` (a partial, a
            closure): FX could only trace the class's, which the model does not run.
    """
    own = module.__dict__.get("forward")
    if own is None:
        return
    if not isinstance(own, types.MethodType) or own.__self__ is not module:
        raise TypeError(
            f"{type(module).__name__}.forward is set on the instance as a "
            f"{type(own).__name__}: torch.fx traces a forward method only"
        )
    cls = type(module)
    namespace = {"forward": own.__func__, "__module__": cls.__module__}
    subclass = type(cls.__name__, (_QuietSubclass, cls), namespace)
    subclass.__qualname__ = cls.__qualname__
    del module.__dict__["forward"]
    module.__class__ = subclass


def _is_compiled(module: torch.nn.Module) -> bool:
    """A ``torch.compile``-d module (``OptimizedModule``): its ``_orig_mod`` is the model."""
    return type(module).__name__ == "OptimizedModule" and "_orig_mod" in module._modules


class Uncompiled(torch.nn.Module):
    """Stands for a ``torch.compile``-d module: calls its original module, uncompiled.

    Compilation changes how a module runs, not what it computes; the markers (and the export)
    need the Python module. The path keeps its place: ``inner`` and ``inner._orig_mod``.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the original (uncompiled) module."""
        original: torch.nn.Module = self._modules["_orig_mod"]  # type: ignore[assignment]
        return original(*args, **kwargs)


class OpaqueCall(torch.nn.Module):
    """Stands in the instrumented tree for a module fxalign cannot copy or look inside.

    A ``torch.jit.script`` module runs as it is; only its call is marked, like a leaf's.
    """

    def __init__(self, module: torch.nn.Module, path: str, local: bool) -> None:
        super().__init__()
        self.inner = module
        self.path, self.local = path, local

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped module and mark its inputs and output under its own path."""
        call = begin_call(self.path)
        if self.local:
            args, kwargs = mark_inputs(args, kwargs, call)
        return mark_output(self.inner(*args, **kwargs), call)


def instrument_eager(
    model: torch.nn.Module, granularity: Granularity, local: bool = True
) -> torch.nn.Module:
    """Wrap the whole module tree; the root resets call indices at every forward."""
    root = copy_tree(model, "", granularity, local)
    root.__class__ = root_class(type(root))
    own = root.__dict__.get("forward")  # a forward set on the instance shadows the class's
    if own is not None:
        root.__dict__["forward"] = _scoped_own_forward(own)
    return root
