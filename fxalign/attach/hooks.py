"""Run the eager model once and record every module call: inputs, outputs, path, call index.

Forward pre-hooks (``with_kwargs=True``) and forward hooks on every module of ``named_modules()``
see each call as the caller makes it and as the caller receives it: after the user's own hooks,
which are registered first. Each call is recorded in the order calls *start*::

    model(x)                                 calls[0]  ""            (the model itself)
      -> blocks.0(x)                         calls[1]  "blocks.0"
           -> blocks.0.conv(x) -> y          calls[2]  "blocks.0.conv"
           -> blocks.0.act(y)                calls[3]  "blocks.0.act"
      -> shared(h), shared(h2)               calls[4], calls[5]  "shared" #0, #1

Every tensor is recorded as it is when the hook fires, once per value: the output of one
module handed unchanged to the next is one value with one id (the same object at the same
version counter), while an in-place write makes a new one. A value is not copied unless
something is about to write its memory: a dispatch mode (:class:`_WriteGuard`) sees every
operator of the forward and clones the values an operator writes (an in-place ReLU, ``h += x``
in the caller, a write through a view, or through another storage on the same memory) just
before the write: the arguments an ATen schema marks written, every argument of an operator
from elsewhere (a custom operator's kernel may write what its schema does not say). After the
forward, values that share memory with tensors held elsewhere (a buffer or parameter a module
returned, a cache) are cloned too, as later runs may write those. A value written where the
guard did not see it (from another thread, in code that turns dispatch modes off), or whose
storage was freed, is found then by its version counter or its memory: the model is run
again with every value cloned when recorded, as it is when the forward raises under the guard
(a higher-order operator such as ``torch.cond`` compiling itself); state the model changes
that :class:`~fxalign.state.ModuleState` does not put back (parameters, globals) then sees
a second forward. Only a write that passes no operator and moves no version counter (through
``.numpy()``) would go unnoticed. Nothing of the user's is changed: the model runs
on clones of the inputs, under ``torch.no_grad()``, with the random number generators forked;
every hook is removed and the modules' state (buffers, attributes) is put back in ``finally``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from fxalign.errors import InputError, InternalError, UserError
from fxalign.names import LeafPath, leaf_path
from fxalign.samples import aliased_copies
from fxalign.state import ModuleState

__all__ = [
    "CallCapture",
    "ModuleCall",
    "TensorLeaf",
    "capture_calls",
    "eager_only",
    "every_module_hooked",
    "leaf_name",
]

logger = logging.getLogger(__name__)

Key = str | int
"""One step of a pytree key path: a sequence index or a mapping key / attribute name."""


@dataclass(frozen=True)
class TensorLeaf:
    """One tensor inside a (possibly structured) value.

    Attributes:
        key: Position inside the value as plain keys (``()`` for a bare tensor, ``(1, 0)``,
            ``("logits",)``); for call inputs the first key is 0 (positional) or 1 (keyword).
        name: ``key`` as fxalign spells leaf positions: ``""``, ``"[1][0]"``, ``'["logits"]'``;
            for inputs without the first key (``"[0]"`` is the first positional argument).
        value: The tensor as it was when the hook fired (detached; a clone where it was
            written afterwards).
        value_id: Which value it is: two leaves with one id are one tensor object that
            nothing wrote to in between (a module's output and the next module's input).
        path: The position as a marker name's leaf path (:func:`fxalign.names.leaf_path`, for
            inputs without the first key), so that rows are named as the marker path names
            them.
    """

    key: tuple[Key, ...]
    name: str
    value: torch.Tensor = field(compare=False, repr=False)
    value_id: str = field(repr=False)
    path: LeafPath = field(default=(), repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor's shape."""
        return tuple(self.value.shape)

    @property
    def dtype(self) -> torch.dtype:
        """The tensor's dtype."""
        return self.value.dtype


@dataclass(frozen=True)
class ModuleCall:
    """One call of one module during the captured forward.

    Attributes:
        index: Position in :attr:`CallCapture.calls` (calls in the order they start).
        path: Qualified name from ``named_modules()`` (``""`` for the model itself).
        call_index: 0 for the module's first call in the forward, 1 for the second, ...
        class_name: The module's class name (``"Conv2d"``).
        parent: :attr:`index` of the call this one runs inside; ``None`` for the model.
        inputs: Tensor leaves of ``(args, kwargs)`` (key ``(0, i, ...)`` or ``(1, name, ...)``).
        outputs: Tensor leaves of the returned value, in pytree order.
        output_type: Type name of the returned value (``"Tensor"``, ``"tuple"``,
            ``"BaseModelOutput"``, ``"NoneType"``).
        args: The positional arguments as the module received them (tensors as recorded).
        kwargs: The keyword arguments as the module received them (tensors as recorded).
    """

    index: int
    path: str
    call_index: int
    class_name: str
    parent: int | None
    inputs: tuple[TensorLeaf, ...]
    outputs: tuple[TensorLeaf, ...]
    output_type: str
    args: tuple[Any, ...] = field(compare=False, repr=False)
    kwargs: Mapping[str, Any] = field(compare=False, repr=False)

    @property
    def name(self) -> str:
        """``path`` for a first call, ``path#k`` for the k-th repeated call."""
        return self.path if self.call_index == 0 else f"{self.path}#{self.call_index}"


@dataclass(frozen=True)
class CallCapture:
    """Everything the hooked forward recorded.

    Attributes:
        calls: Every module call, in the order calls start; ``calls[0]`` is the model's own.
        never_called: ``(path, class name)`` of modules the forward did not call (scripted
            modules, which take no hooks, and the modules inside them are not listed).
        aliases: ``other path -> path`` for a module reachable under more than one path
            (``ModuleList([lin, other, lin])``: ``"2" -> "0"``); calls are recorded under the
            path ``named_modules()`` gives it, the first.
        hooks_in_scope: How the user's own forward hooks were counted (see
            :func:`every_module_hooked`).
    """

    calls: tuple[ModuleCall, ...]
    never_called: tuple[tuple[str, str], ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)
    hooks_in_scope: bool = True

    @property
    def outputs(self) -> tuple[TensorLeaf, ...]:
        """The model's final outputs (the tensor leaves of what the forward returned)."""
        return self.calls[0].outputs

    @property
    def inputs(self) -> tuple[TensorLeaf, ...]:
        """The model's tensor inputs, in the order the exporters flatten ``(args, kwargs)``."""
        return self.calls[0].inputs

    def children(self, call: ModuleCall) -> list[ModuleCall]:
        """Calls made directly inside ``call``, in order."""
        return [c for c in self.calls if c.parent == call.index]

    def chain(self, call: ModuleCall) -> list[ModuleCall]:
        """The calls from the model's own down to ``call``, ``call`` included."""
        out = [call]
        while out[-1].parent is not None:
            out.append(self.calls[out[-1].parent])
        return out[::-1]


def leaf_name(key: Sequence[Key]) -> str:
    """Format a key path as fxalign spells leaf positions: ``[0]``, ``["logits"]``.

    Example:
        >>> leaf_name((1, "logits"))
        '[1]["logits"]'
    """
    return "".join(f'["{k}"]' if isinstance(k, str) else f"[{k}]" for k in key)


def _plain_key(entry: Any) -> Key:
    if isinstance(entry, pytree.SequenceKey):
        return int(entry.idx)
    if isinstance(entry, pytree.MappingKey):
        k = entry.key
        return k if isinstance(k, (str, int)) else repr(k)
    if isinstance(entry, pytree.GetAttrKey):
        return str(entry.name)
    return str(entry)  # pragma: no cover - future key kinds


def _version(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors keep no version counter
        return None


class _Slot:
    """One recorded value: the tensor itself while nothing writes to it, else a clone.

    ``tensor`` is a detached alias of the module's tensor (same memory, same version counter)
    until an operator is about to write that memory; then it becomes a clone taken just
    before the write (:class:`_WriteGuard`). ``id`` is the value id, ``version`` the version
    counter when recorded, ``source`` the ``id()`` of the tensor object it was recorded from.
    """

    __slots__ = ("id", "source", "tensor", "version")

    def __init__(self, tensor: torch.Tensor, value_id: str, version: int | None, source: int):
        self.tensor, self.id, self.version, self.source = tensor, value_id, version, source


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    """``t``'s storage, or ``None`` for tensor subclasses and other layouts (sparse, nested)."""
    if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        return None
    if t.layout is not torch.strided:
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _where(t: torch.Tensor) -> Any:
    """Which memory a tensor object shows now (``.data =`` and ``swap_tensors`` change it)."""
    try:
        return (t.data_ptr(), t.shape, t.stride())
    except (RuntimeError, NotImplementedError, TypeError):  # no plain memory (a subclass)
        return None


def _memory(storage: torch.UntypedStorage) -> tuple[int, int]:
    """Where a storage's memory is: ``(address, bytes)``."""
    return int(storage.data_ptr()), int(storage.nbytes())


@functools.cache
def _storage_refs() -> int:
    """The references a storage with one tensor has (the tensor, and its Python object)."""
    probe = torch.empty(1)
    return int(torch._C._storage_Use_Count(probe.untyped_storage()._cdata))


class _Values:
    """One slot and one id per distinct value: a tensor object at one version.

    The tensor a module returns is usually the very object the next module receives: it gets
    the same id (and the same slot) as long as nothing wrote to it in between. Objects are
    held until the forward ends, so no new tensor can reuse a recorded one's ``id()`` (and
    none gets a weak reference, which ``torch.utils.swap_tensors`` refuses).

    ``lazy``: slots hold the module's tensor itself, and :class:`_WriteGuard` clones them just
    before an operator writes their memory (most values are never written: no copy at all);
    otherwise every value is cloned when recorded.
    """

    def __init__(self, lazy: bool = False) -> None:
        self.lazy = lazy
        # id(t) -> t, its version and memory when recorded, slot
        self.memo: dict[int, tuple[torch.Tensor, int, Any, _Slot]] = {}
        self.unsaved: dict[int, list[_Slot]] = {}  # storage key -> slots still in it
        self.memory: dict[int, tuple[int, int]] = {}  # storage key -> its memory when recorded
        self.lost = False  # a slot's memory was written before the guard could save it
        self.foreign: dict[int, tuple[int, int]] = {}  # id(tensor) -> memory torch did not allocate
        self.count = 0

    def slot(self, t: torch.Tensor) -> _Slot:
        """The slot recorded for ``t``'s current value, made now if there is none.

        Only a value in memory torch allocated for a storage of its own is kept uncopied:
        memory from ``torch.from_numpy`` or DLPack may be another storage's as well.
        """
        version = _version(t)
        known = self.memo.get(id(t))
        if known is not None and known[0] is t and known[1] == version and known[2] == _where(t):
            return known[3]  # the same object, unwritten, on the same memory (not ``.data =``)
        storage = _storage(t) if self.lazy else None
        key = int(storage._cdata) if storage is not None and storage.resizable() else None
        value = t.detach() if key is not None else t.detach().clone()
        slot = _Slot(value, f"v{self.count}", version, id(t))
        self.count += 1
        if key is not None and storage is not None:
            if key not in self.unsaved:  # a storage freed since may have had this address
                self.memory[key] = _memory(storage)
            self.unsaved.setdefault(key, []).append(slot)
        elif storage is not None:
            self.foreign[id(t)] = _memory(storage)
        if version is not None:
            self.memo[id(t)] = (t, version, _where(t), slot)
        return slot

    def tree(self, value: Any) -> Any:
        """``value`` with every tensor replaced by its slot."""
        if type(value) is torch.Tensor:  # most calls return one plain tensor: no tree to walk
            return self.slot(value)
        return pytree.tree_map_only(torch.Tensor, self.slot, value)

    def before_write(self, t: torch.Tensor) -> None:
        """An operator is about to write ``t``: clone the values recorded in its memory.

        A storage torch did not allocate (a slice of another storage, DLPack, ``from_numpy``)
        may lie over the memory of recorded values: every one it overlaps is cloned.
        """
        storage = _storage(t)
        if storage is None:
            return  # a subclass writes through plain tensors, which pass here themselves
        keys = [int(storage._cdata)]
        if not storage.resizable():
            low, high = _memory(storage)
            high += low
            keys += [k for k, (at, n) in self.memory.items() if at < high and low < at + n]
            for source, (at, n) in list(self.foreign.items()):
                if at < high and low < at + n:  # its clone stays; the object is a new value
                    self.memo.pop(source, None)
                    del self.foreign[source]
        for key in keys:
            for slot in self.unsaved.pop(key, ()):
                self._save(slot)
            self.memory.pop(key, None)

    def _save(self, slot: _Slot) -> None:
        if slot.version is not None and _version(slot.tensor) != slot.version:
            self.lost = True  # written already, unseen (another thread): too late to clone
            return
        slot.tensor = slot.tensor.clone()
        known = self.memo.get(slot.source)
        if known is not None and known[3] is slot:
            del self.memo[slot.source]  # a write the version counter misses (batch_norm)

    def settle(self) -> bool:
        """After the forward: clone the values held elsewhere too; whether all are intact.

        A slot still sharing memory with a tensor someone else holds (a buffer or parameter
        the module returned or a view of one, a cache, a global) is cloned now: a later run
        could write it. A value written without the guard seeing it (its version counter
        moved: from another thread, in code that turns dispatch modes off, by an operator
        whose schema says it writes nothing) or whose memory was freed or moved (its
        storage resized) is lost: ``False`` then.
        """
        self.memo.clear()  # the tensor objects it holds count as references to their memory
        intact = not self.lost
        base = _storage_refs()
        for key, slots in self.unsaved.items():
            refs = torch._C._storage_Use_Count(key)
            moved = _memory(slots[0].tensor.untyped_storage()) != self.memory[key]
            if moved or any(
                s.version is not None and _version(s.tensor) != s.version for s in slots
            ):
                intact = False
            elif refs > len(slots) + base - 1:
                for slot in slots:
                    slot.tensor = slot.tensor.clone()
        self.unsaved.clear()
        return intact


def _copied(inputs: Any) -> Any:
    """``inputs`` with every tensor cloned, those sharing memory sharing it in the clones."""
    copies = aliased_copies(pytree.tree_leaves(inputs))
    return pytree.tree_map_only(torch.Tensor, lambda t: copies[id(t)], inputs)


def _tensor_of(slot: _Slot) -> torch.Tensor:
    return slot.tensor


def _written(func: Any) -> tuple[tuple[int, str], ...] | None:
    """``(position, name)`` of the arguments ``func`` writes, from its schema, cached.

    ``None``: every tensor argument may be written. So it is for operators outside ATen (a
    custom operator's schema is its author's word; its kernel's own writes pass no guard).
    """
    if func in _WRITES:
        return _WRITES[func]
    schema = getattr(func, "_schema", None)  # higher-order operators have none
    known: tuple[tuple[int, str], ...] | None
    if schema is None or getattr(func, "namespace", None) not in _TRUSTED:
        known = None
    else:
        known = tuple(
            (i, a.name)
            for i, a in enumerate(schema.arguments)
            if (a.alias_info is not None and a.alias_info.is_write) or a.name in _UNDECLARED
        )
    _WRITES[func] = known
    return known


_WRITES: dict[Any, tuple[tuple[int, str], ...] | None] = {}
_TRUSTED = frozenset({"aten", "prims"})
"""Operator namespaces whose schemas say every argument their kernels write."""
_UNDECLARED = frozenset({"running_mean", "running_var"})
"""Arguments some kernels write without their schema saying so (``native_batch_norm``)."""


class _WriteGuard(TorchDispatchMode):
    """Before an operator writes a tensor, the values recorded in its memory are cloned.

    Every operator the forward runs passes here; those that write an argument (``relu_``,
    ``add_``, ``copy_``, an ``out=``; any operator outside ATen) first have
    :meth:`_Values.before_write` clone the recorded values in the argument's memory, views
    included.
    """

    def __init__(self, values: _Values) -> None:
        super().__init__()
        self.values = values

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # The guard runs in eager code only (``eager_only``): its dispatch needs no wrapper
        # that keeps dynamo out, whose first call would import dynamo (a second, cold).
        return False

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if self.values.unsaved:
            written = _written(func)
            if written is None:
                targets: list[Any] = [*args, *kwargs.values()]
            else:
                targets = [args[i] if i < len(args) else kwargs.get(name) for i, name in written]
            for target in targets:
                for t in target if isinstance(target, (list, tuple)) else (target,):
                    if isinstance(t, torch.Tensor):
                        self.values.before_write(t)
        return func(*args, **kwargs)


def _plain_leaves(
    value: Any, skip_first: bool
) -> list[tuple[tuple[Key, ...], _Slot, LeafPath]] | None:
    """``(key, slot, leaf path)`` of the common shapes without a pytree walk, else ``None``.

    A bare slot (most outputs), and ``(args, {})`` with only slots among ``args`` (most
    inputs); the keys and leaf paths are those ``tree_flatten_with_path`` gives.
    """
    if type(value) is _Slot:
        return [((), value, ())]
    if not skip_first or type(value) is not tuple or len(value) != 2:
        return None
    args, kwargs = value
    if type(args) is not tuple or kwargs or not all(type(a) is _Slot for a in args):
        return None
    return [((0, i), a, (pytree.SequenceKey(i),)) for i, a in enumerate(args)]


def _leaves(value: Any, skip_first: bool = False) -> tuple[TensorLeaf, ...]:
    """Tensor leaves of a value made by :meth:`_Values.tree`, once the slots are settled."""
    plain = _plain_leaves(value, skip_first)
    if plain is not None:
        return tuple(
            TensorLeaf(k, leaf_name(k[1:] if skip_first else k), s.tensor, s.id, p)
            for k, s, p in plain
        )
    found, _ = pytree.tree_flatten_with_path(value)
    leaves = []
    for path, leaf in found:
        if isinstance(leaf, _Slot):
            key = tuple(_plain_key(k) for k in path)
            shown = key[1:] if skip_first else key
            structured = leaf_path(path[1:] if skip_first else path)
            leaves.append(TensorLeaf(key, leaf_name(shown), leaf.tensor, leaf.id, structured))
    return tuple(leaves)


def _plain_args(args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
    """Whether a call passes only plain tensors, positionally (most module calls)."""
    return not kwargs and all(type(a) is torch.Tensor for a in args)


@dataclass
class _Open:
    """A call whose forward has started and not yet returned (its values as slots)."""

    index: int
    path: str
    call_index: int
    class_name: str
    parent: int | None
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any = None
    output_type: str = ""


class _Recorder:
    """The hooks' shared state: open calls (a stack), finished calls, call counters."""

    def __init__(self, paths: Mapping[int, str], lazy: bool) -> None:
        self.paths = paths
        self.stack: list[_Open] = []
        self.started = 0
        self.finished: dict[int, _Open] = {}
        self.counts: dict[int, int] = {}
        self.values = _Values(lazy)

    def pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook: open a call, record its inputs."""
        k = self.counts.get(id(module), 0)
        self.counts[id(module)] = k + 1
        parent = self.stack[-1].index if self.stack else None
        if _plain_args(args, kwargs):
            cargs, ckwargs = tuple(self.values.slot(a) for a in args), {}
        else:
            cargs, ckwargs = self.values.tree((tuple(args), dict(kwargs)))
        self.stack.append(
            _Open(
                self.started,
                self.paths[id(module)],
                k,
                type(module).__name__,
                parent,
                cargs,
                ckwargs,
            )
        )
        self.started += 1

    def post(self, module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        """Forward hook: close the innermost open call of ``module`` with its output."""
        path = self.paths[id(module)]
        while self.stack and self.stack[-1].path != path:
            # A forward that raised inside a try block of its caller never reached its hook.
            dropped = self.stack.pop()
            logger.debug("call of %r did not return normally; not recorded", dropped.path)
        if not self.stack:
            raise InternalError(f"forward hook of {path!r} fired without its pre-hook")
        call = self.stack.pop()
        call.output, call.output_type = self.values.tree(output), type(output).__name__
        self.finished[call.index] = call

    def calls(self) -> list[ModuleCall]:
        """The finished calls, in the order they started, their slots settled."""
        out = []
        for index in sorted(self.finished):
            call = self.finished[index]
            if not call.kwargs and all(type(a) is _Slot for a in call.args):
                args, kwargs = tuple(a.tensor for a in call.args), {}
            else:
                args, kwargs = pytree.tree_map_only(_Slot, _tensor_of, (call.args, call.kwargs))
            out.append(
                ModuleCall(
                    call.index,
                    call.path,
                    call.call_index,
                    call.class_name,
                    call.parent,
                    _leaves((call.args, call.kwargs), skip_first=True),
                    _leaves(call.output),
                    call.output_type,
                    args,
                    kwargs,
                )
            )
        return out


@contextlib.contextmanager
def every_module_hooked(
    model: torch.nn.Module,
    pre: Callable[[torch.nn.Module, tuple[Any, ...], dict[str, Any]], Any],
    post: Callable[[torch.nn.Module, Any, Any, Any], Any],
    *,
    hooks_in_scope: bool = True,
) -> Iterator[None]:
    """Every module (once each) hooked by ``pre`` and ``post`` (with kwargs) inside the block.

    ``hooks_in_scope``: whether the forward (pre-)hooks the user registered on a module count
    as part of its call, as the dynamo exporter scopes their ops: ``pre`` then runs before
    them and ``post`` after them. ``False`` (the TorchScript exporter, whose scope covers
    ``forward`` alone): ``pre`` sees the inputs ``forward`` receives and ``post`` the output
    it returns, the user's hooks being the caller's code. Global hooks
    (``register_module_forward_hook``) always run outside ``pre`` and ``post``.

    Scripted modules (``torch.jit.script``) take no hooks: their calls, and the calls inside
    them, are not seen. The hooks are removed on leaving, however the block ends.
    """
    handles = []
    try:
        for module in {id(m): m for m in model.modules()}.values():
            if isinstance(module, torch.jit.ScriptModule):
                continue
            handles.append(
                module.register_forward_pre_hook(pre, with_kwargs=True, prepend=hooks_in_scope)
            )
            handles.append(
                module.register_forward_hook(post, with_kwargs=True, prepend=not hooks_in_scope)
            )
        yield
    finally:
        for handle in handles:
            handle.remove()


def eager_only() -> contextlib.AbstractContextManager[Any]:
    """``torch.compile``-d code run as plain Python inside the block.

    The eager model is the reference, and hooks inside a compiled module would otherwise fire
    while dynamo traces it, on values of the trace. Nothing is compiled in a process that has
    not imported dynamo, which ``set_stance`` would import (a second on a cold start).
    """
    if "torch._dynamo" not in sys.modules:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")


def capture_calls(
    model: torch.nn.Module,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    state: ModuleState | None = None,
    *,
    hooks_in_scope: bool = True,
) -> CallCapture:
    """Run ``model`` once with hooks on every module and record every call.

    Args:
        model: Any module that runs in eager mode.
        args: Positional inputs (not modified: the model runs on clones).
        kwargs: Keyword inputs.
        state: A snapshot of every module of ``model`` to put back afterwards (one is taken
            when not given).
        hooks_in_scope: Whether the user's forward hooks on a module are part of its call
            (the dynamo exporter's scopes) or of its caller's (TorchScript's); see
            :func:`every_module_hooked`.

    Returns:
        A :class:`CallCapture`.

    Raises:
        InputError: The model raised on the inputs.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> [c.name for c in capture_calls(net, (torch.ones(1, 2),)).calls]
        ['', '0', '1']
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise UserError(
            f"{type(model).__name__} is a torch.jit.script module: its calls take no hooks",
            hint="pass the nn.Module from before torch.jit.script (scripted submodules are "
            "fine: they are compared as part of their caller)",
        )
    named = list(model.named_modules())
    paths = {id(m): p for p, m in named}
    if state is None:
        state = ModuleState.snapshot(m for _, m in named)
    recorder = _record(model, paths, args, kwargs or {}, state, True, hooks_in_scope)
    if recorder is None:
        logger.debug("a value was written where the guard could not save it: recorded again")
        recorder = _record(model, paths, args, kwargs or {}, state, False, hooks_in_scope)
    assert recorder is not None, "an eager recording is never lost"
    calls = tuple(recorder.calls())
    if not calls or calls[0].path != "" or calls[0].index != 0:
        raise InternalError("the model's own call was not recorded")
    called = {c.path for c in calls}
    never = tuple(  # a scripted module's submodules are scripted too: none takes hooks
        (p, type(m).__name__)
        for p, m in named
        if p not in called and not isinstance(m, torch.jit.ScriptModule)
    )
    # Calls that did not return normally leave gaps in the numbering: renumber densely.
    if any(c.index != i for i, c in enumerate(calls)):
        calls = _renumber(calls)
    logger.debug("captured %d module calls, %d modules not called", len(calls), len(never))
    return CallCapture(calls, never, _aliases(model, paths), hooks_in_scope)


def _record(
    model: torch.nn.Module,
    paths: Mapping[int, str],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    state: ModuleState,
    lazy: bool,
    hooks_in_scope: bool,
) -> _Recorder | None:
    """One hooked forward on clones of the inputs.

    ``None`` when a lazy recording lost a value or raised: the caller records eagerly then.
    """
    recorder = _Recorder(paths, lazy)
    cargs, ckwargs = _copied((tuple(args), dict(kwargs)))
    devices = sorted({t.device.index or 0 for t in _tensors(model) if t.device.type == "cuda"})
    guard = _WriteGuard(recorder.values) if lazy else contextlib.nullcontext()
    try:
        try:
            with (
                torch.no_grad(),
                torch.random.fork_rng(devices=devices),
                eager_only(),
                every_module_hooked(
                    model, recorder.pre, recorder.post, hooks_in_scope=hooks_in_scope
                ),
                guard,
            ):
                returned = model(*cargs, **ckwargs)
                if 0 in recorder.finished:
                    # The model's outputs are what its call returns, as the exporters trace it:
                    # after its own forward hooks, and a class's __call__ override.
                    root = recorder.finished[0]
                    root.output = recorder.values.tree(returned)
                    root.output_type = type(returned).__name__
        except InternalError:
            raise
        except Exception as e:
            if lazy:  # the guard may be what it raised on (a higher-order operator compiling)
                logger.debug("recording with the write guard raised %s: recorded again", e)
                return None
            raise InputError(
                f"the model raised {type(e).__name__} on the given inputs: {str(e).strip()[:300]}",
                hint="check the number, shapes and dtypes of the inputs",
            ) from e
        # the inputs' clones and the outputs are recorded values now, held by nobody else
        del cargs, ckwargs, returned
        intact = recorder.values.settle()  # before the state is put back into the buffers
    finally:
        state.restore()
    return recorder if intact else None


def _aliases(model: torch.nn.Module, paths: Mapping[int, str]) -> dict[str, str]:
    """``other path -> named_modules() path`` of the modules reachable under several paths."""
    return {
        p: paths[id(m)]
        for p, m in model.named_modules(remove_duplicate=False)
        if paths.get(id(m), p) != p
    }


def _tensors(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()


def _renumber(calls: tuple[ModuleCall, ...]) -> tuple[ModuleCall, ...]:
    new = {c.index: i for i, c in enumerate(calls)}
    out = []
    for i, c in enumerate(calls):
        parent = c.parent
        while parent is not None and parent not in new:
            parent = None  # the enclosing call did not return: attach to nothing
        out.append(
            ModuleCall(
                i,
                c.path,
                c.call_index,
                c.class_name,
                None if parent is None else new[parent],
                c.inputs,
                c.outputs,
                c.output_type,
                c.args,
                c.kwargs,
            )
        )
    return tuple(out)
