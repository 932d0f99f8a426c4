"""The PyTorch side's record of one eager forward: marker values, calls, aliases to cut.

:func:`capture` makes a :class:`Captured` current for the block; the marker functions of
:mod:`fxalign.markers` fill it (:func:`current_capture`) as the instrumented model runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from fxalign.errors import InternalError
from fxalign.names import CallId, MarkerName

__all__ = ["CallRecord", "Captured", "InputRef", "capture", "current_capture"]


@dataclass(frozen=True)
class InputRef:
    """Stands for a tensor input in :attr:`CallRecord.leaves`.

    Attributes:
        name: The input's marker name.
    """

    name: MarkerName


@dataclass(frozen=True)
class CallRecord:
    """How one module call was made, so that it can be replayed on other input values.

    Attributes:
        call: The module call.
        spec: Pytree spec of ``(args, kwargs)``.
        leaves: The flattened leaves; tensors are replaced by :class:`InputRef` objects.
        dtypes: ``input marker name -> torch dtype`` of each tensor leaf, in leaf order.
    """

    call: CallId
    spec: Any
    leaves: list[Any]
    dtypes: dict[MarkerName, torch.dtype]

    @property
    def module_path(self) -> str:
        """The path of the called module."""
        return self.call.module_path

    @property
    def inputs(self) -> list[MarkerName]:
        """The marker names of the tensor inputs, in leaf order."""
        return list(self.dtypes)


class Captured(dict[MarkerName, torch.Tensor]):
    """``marker name -> value`` in execution order, plus what else a capture saw.

    Attributes:
        without_tensors: Module calls whose marked value held no tensor (``None``, an int, an
            empty tuple), in execution order.
        calls: ``call -> CallRecord`` for every call whose inputs were marked.
        names: Every marker name executed, in order, whether its value was kept or not.
        parents: ``call -> the call whose code made it`` (``None``: the model's own code), for
            every call started with :func:`fxalign.markers.begin_call`.
        cut: Markers an export must leave out to keep the model's aliasing (see
            :meth:`watch`), and why.
        dtypes: ``name -> dtype`` of every marked tensor, kept or not.
        numbers: ``name -> value`` of the Python numbers (``int``, ``float``, ``bool``) among
            the output leaves of marked calls: a tracer may see a tensor there (TorchScript
            traces ``x.shape[2]`` as a 0-dim tensor) and mark it.

    Args:
        only: Keep the values of these names only (all when ``None``); the others are listed
            in :attr:`names` without a copy, to bound memory.
    """

    def __init__(self, only: Collection[MarkerName] | None = None) -> None:
        super().__init__()
        self.without_tensors: list[CallId] = []
        self.calls: dict[CallId, CallRecord] = {}
        self.names: list[MarkerName] = []
        self.dtypes: dict[MarkerName, torch.dtype] = {}
        self.cut: dict[MarkerName, str] = {}
        self.numbers: dict[MarkerName, int | float | bool] = {}
        self.parents: dict[CallId, CallId | None] = {}
        self._open: list[CallId] = []
        self._only = None if only is None else frozenset(only)
        # id(tensor) -> (weak reference, version, stored copy): a tensor marked twice unchanged
        # (a module's output that is the next module's input) is stored once.
        self._stored: dict[int, tuple[Any, int, torch.Tensor]] = {}
        # id(tensor) -> (weak reference, version, first marker) of every tensor marked so far.
        self._marked: dict[int, tuple[Any, int, MarkerName]] = {}
        # (marker, earlier marker it is an unchanged alias of), in execution order.
        self._follows: list[tuple[MarkerName, MarkerName]] = []
        # Markers that would be copies under a tracer while an alias of the value lives on.
        self._watched: list[tuple[MarkerName, torch.Tensor, int, str]] = []

    def watch(self, name: MarkerName, x: torch.Tensor) -> None:
        """Note a marker that a tracer would turn into a copy while the value has aliases.

        Under a tracer a marker's output is a new tensor. An in-place write that reaches the
        value through another alias afterwards (the module writing its input, the caller
        writing through a returned view) then no longer reaches the marked copy, or the other
        way round, and the export would compute something the model does not. Such markers are
        found here, in the eager run, by the value's version counter (shared by views), and
        :attr:`cut` lists them when the capture ends.
        """
        known = self._marked.get(id(x))
        if known is not None and known[0]() is x and known[1] == x._version:
            # An alias of the earlier marker under a tracer (no copy), unless that one is cut:
            # then this one would be the first copy, and is cut with it (see settle).
            self._follows.append((name, known[2]))
            return
        with contextlib.suppress(TypeError):
            self._marked[id(x)] = (weakref.ref(x), x._version, name)
        if x.is_complex():
            self.cut[name] = (
                "a complex value: the exporters represent complex tensors as real ones with a "
                "last dimension of 2, which fxalign's marker op has no translation for"
            )
            return
        if name.is_input:
            why = (
                "an in-place write reaches this input through an alias (the module writes its "
                "input, or the caller writes its output): a marker would cut that alias"
            )
        elif x._base is not None:
            why = "a view written in place later: a marker would cut it from its base"
        else:
            return  # a fresh value: only the marked copy reaches it, in place or not
        self._watched.append((name, x, x._version, why))

    def settle(self) -> None:
        """At the end of the forward: which watched markers saw their value written later."""
        for name, x, version, why in self._watched:
            if x._version != version:
                self.cut[name] = why
        for name, earlier in self._follows:
            if earlier in self.cut:
                self.cut[name] = self.cut[earlier]
        self._watched.clear()
        self._follows.clear()

    def begin(self, call: CallId) -> None:
        """A marked call starts, made by the innermost call still open (or the model)."""
        self.parents[call] = self._open[-1] if self._open else None
        self._open.append(call)

    def end(self, call: CallId) -> None:
        """A marked call returns (before its own output is marked)."""
        if call in self._open:
            del self._open[len(self._open) - 1 - self._open[::-1].index(call)]

    def store(self, name: MarkerName, x: torch.Tensor) -> None:
        """Record a copy of ``x`` under ``name``, sharing the copy of an unchanged tensor."""
        if name in self.dtypes:
            # Two markers with one name would make the comparison ambiguous.
            raise InternalError(f"marker {str(name)!r} was executed twice in one forward")
        self.names.append(name)
        self.dtypes[name] = x.dtype
        if self._only is not None and name not in self._only:
            return
        known = self._stored.get(id(x))
        if known is not None and known[0]() is x and known[1] == x._version:
            self[name] = known[2]
            return
        copy = x.detach().clone()
        self[name] = copy
        with contextlib.suppress(TypeError):  # not weak-referenceable: just do not share
            self._stored[id(x)] = (weakref.ref(x), x._version, copy)


_CAPTURE: contextvars.ContextVar[Captured | None] = contextvars.ContextVar(
    "fxalign_capture", default=None
)


def current_capture() -> Captured | None:
    """The :class:`Captured` of the innermost active :func:`capture`, if any."""
    return _CAPTURE.get()


@contextlib.contextmanager
def capture(only: Collection[MarkerName] | None = None) -> Iterator[Captured]:
    """Record the value of every marker executed eagerly inside the block.

    Args:
        only: Keep copies of these marker names only (see :class:`Captured`).

    Yields:
        A :class:`Captured` dict filled in execution order with ``marker name -> detached
        copy``.

    Example:
        >>> from fxalign.markers import debug_apply
        >>> with capture() as values:
        ...     _ = debug_apply(torch.ones(2), "x")
        >>> [str(name) for name in values]
        ['x']
    """
    values = Captured(only)
    token = _CAPTURE.set(values)
    try:
        yield values
    finally:
        _CAPTURE.reset(token)
        values.settle()
