"""Introduced errors on an attached file: the eager model rerun, its modules answering from ONNX.

The user's model runs once more on the sample, with a forward pre-hook and a forward hook on
every module: each tensor a module receives and each tensor it returns is replaced by the file's
value of it, where the file holds one (:class:`fxalign.markers.Answering`, as markers do in the
debug model). Each module's own code then runs on ONNX values: a leaf's output against its ONNX
value is its local error, a block's inline code against its submodules' ONNX inputs and its own
ONNX output is its self error (:func:`fxalign.local.fill_local_errors` does the bookkeeping).

The model's state is put back before and after the rerun (:class:`fxalign.state.ModuleState`);
a call whose input the file does not hold (fused, folded) says which and why. After a rerun
that left the recorded path, calls are replayed one by one on the file's values of their inputs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from fxalign.attach import CallCapture, ModuleCall
from fxalign.attach.hooks import eager_only, every_module_hooked
from fxalign.instrument.result import first_line
from fxalign.local import Rerun
from fxalign.markers import current_answering, tensor_leaves
from fxalign.names import CallId, LeafPath, MarkerName, leaf_path
from fxalign.samples import Sample
from fxalign.state import ModuleState

__all__ = ["CallKey", "Plans", "ValuePlan", "hooked_rerun"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValuePlan:
    """Where sample 0's location put one module value: its ONNX tensor, or why there is none.

    Attributes:
        tensor: The ONNX tensor holding it (a graph output of the promoted copy), or ``None``.
        reason: Why ``tensor`` is ``None`` (``"fused into blocks.0.bn"``).
        node: The ONNX node computing ``tensor``, if known.
        candidate: The tensor that holds it if the values say so
            (:attr:`fxalign.attach.LocatedValue.candidate`); settled for each sample.
        as_is: :attr:`fxalign.attach.LocatedValue.as_is`; settled for each sample.
        fused_into: :attr:`fxalign.attach.LocatedValue.fused_into`.
    """

    tensor: str | None
    reason: str | None = None
    node: str | None = None
    candidate: str | None = None
    as_is: int | None = None
    fused_into: tuple[str, int] | None = None


CallKey = tuple[str, int]
"""``(module path, call index)``: one module call, the same in every sample."""
Plans = dict[CallKey, list[ValuePlan]]
"""``call -> one plan per tensor leaf`` (of its output, or of its ``(args, kwargs)``)."""


def hooked_rerun(
    model: torch.nn.Module,
    state: ModuleState,
    capture: CallCapture,
    sample: Sample,
    plans: tuple[Plans, Plans],
    raw: Mapping[str, np.ndarray],
    gone: Mapping[str, str],
) -> tuple[Rerun, Callable[[MarkerName], np.ndarray | None]]:
    """The rerun of ``model`` on ``sample`` with every module call answering from the file.

    Args:
        model: The user's model.
        state: Its state, put back before and after the rerun.
        capture: The calls of this sample's eager run.
        sample: The sample.
        plans: ``(output plans, input plans)`` of the location.
        raw: The file's values of this sample, by tensor name.
        gone: ``value id -> "conv's output: fused into bn"`` for values the file does not hold.

    Returns:
        The :class:`fxalign.local.Rerun` and ``marker name -> ONNX value``.
    """
    events = _Events(capture, plans, raw, gone)
    paths = {id(m): p for p, m in model.named_modules()}

    def run() -> Any:
        fresh = sample.fresh()
        answers = current_answering()
        if answers is not None:  # the graph's inputs: what a module reads of them is exact
            answers.given(tensor_leaves((fresh.args, fresh.kwargs)))
        state.restore()
        try:
            with eager_only(), _answering_hooks(model, paths, capture.hooks_in_scope):
                return model(*fresh.args, **fresh.kwargs)
        finally:
            state.restore()

    def replay(call: CallId) -> dict[LeafPath, torch.Tensor] | str:
        return _replay(model, state, events.calls[call], events.values, capture.hooks_in_scope)

    rerun = Rerun(
        run, events.names, events.inputs, events.parents, replay, events.reasons, events.fused
    )
    return rerun, events.values.get


class _Events:
    """The recorded run as markers would have seen it: names in hook order, values, parents."""

    def __init__(
        self,
        capture: CallCapture,
        plans: tuple[Plans, Plans],
        raw: Mapping[str, np.ndarray],
        gone: Mapping[str, str],
    ) -> None:
        self.capture, (self.output_plans, self.input_plans) = capture, plans
        self.raw, self.gone = raw, gone
        self.names: list[MarkerName] = []
        self.values: dict[MarkerName, np.ndarray] = {}
        self.reasons: dict[MarkerName, str] = {}
        self.fused: dict[MarkerName, CallId] = {}
        self.inputs: dict[CallId, list[MarkerName]] = {}
        self.parents: dict[CallId, CallId | None] = {}
        self.calls: dict[CallId, ModuleCall] = {}
        self.children: dict[int | None, list[ModuleCall]] = {}
        for call in capture.calls:
            self.children.setdefault(call.parent, []).append(call)
        stack = [(capture.calls[0], False)]
        while stack:  # depth first, as the hooks fire: inputs, calls inside, outputs
            call, done = stack.pop()
            if done:
                self._leaves(call, call.outputs, self.output_plans, is_input=False)
                continue
            self._open(call)
            stack.append((call, True))
            stack.extend((c, False) for c in reversed(self.children.get(call.index, [])))

    def _open(self, call: ModuleCall) -> None:
        if not call.path:
            return  # the model's own inputs are the graph's
        cid = CallId(call.path, call.call_index)
        parent = None if call.parent is None else self.capture.calls[call.parent]
        self.parents[cid] = None if parent is None or not parent.path else _cid(parent)
        self.calls[cid] = call
        self.inputs[cid] = self._leaves(call, call.inputs, self.input_plans, is_input=True)

    def _leaves(
        self,
        call: ModuleCall,
        leaves: Sequence[Any],
        plans: Plans,
        is_input: bool,
    ) -> list[MarkerName]:
        located = plans.get((call.path, call.call_index), [])
        names = []
        for position, leaf in enumerate(leaves):
            name = MarkerName(call.path, call.call_index, leaf.path, is_input=is_input)
            names.append(name)
            plan = located[position] if position < len(located) else None
            if plan is not None and plan.tensor is not None:
                self.values[name] = self.raw[plan.tensor]
            else:
                why = self.gone.get(leaf.value_id) or (plan.reason if plan else None)
                self.reasons[name] = why or "not located"
                if plan is not None and plan.fused_into is not None:
                    self.fused[name] = CallId(*plan.fused_into)
        if call.path:
            self.names.extend(names)
        return names


def _cid(call: ModuleCall) -> CallId:
    return CallId(call.path, call.call_index)


@dataclass
class _Handed:
    """A tensor input of a module call, as the caller holds it and as it was handed over.

    ``handed`` is the caller's tensor or the file's value in its place; ``version``, its version
    counter before the call (a module writing it in place moves it).
    """

    caller: torch.Tensor
    handed: torch.Tensor
    version: int


@contextlib.contextmanager
def _answering_hooks(
    model: torch.nn.Module, paths: Mapping[int, str], hooks_in_scope: bool
) -> Iterator[None]:
    """Hooks that hand each module call's inputs and outputs to the active answering.

    Placed among the user's own hooks as the capture's were (``hooks_in_scope``).

    An input answered with the file's value is a new tensor, not the caller's. A module that
    writes its input in place (an in-place ReLU) then writes the new one: the caller's tensor
    gets what was written (as in the eager run, where the module wrote the caller's tensor
    itself), and an output that is that tensor is answered into it, so that a caller reading
    its own reference afterwards (``self.act(h)``, then ``self.c(h)``) sees the file's value.
    Only tensors the module itself wrote are written: nothing else of the user's is touched.
    """
    counts: dict[int, int] = {}
    open_calls: list[tuple[int, int, list[_Handed]]] = []

    def pre(module: torch.nn.Module, args: Any, kwargs: Any) -> Any:
        k = counts.get(id(module), 0)
        counts[id(module)] = k + 1
        handed: list[_Handed] = []
        open_calls.append((id(module), k, handed))
        path = paths.get(id(module), "")
        if not path:
            return None
        answers = current_answering()
        leaves, spec = pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))
        new = []
        for key, v in leaves:
            if answers is None or not isinstance(v, torch.Tensor):
                new.append(v)
                continue
            taken = answers.take(MarkerName(path, k, leaf_path(key[1:]), is_input=True), v)
            handed.append(_Handed(v, taken, _version(taken)))  # ``taken`` may be ``v`` itself
            new.append(taken)
        return pytree.tree_unflatten(new, spec)

    def post(module: torch.nn.Module, args: Any, kwargs: Any, out: Any) -> Any:
        while open_calls and open_calls[-1][0] != id(module):
            open_calls.pop()  # a call that raised inside a caller's try block
        k, handed = open_calls.pop()[1:] if open_calls else (0, [])
        written = {id(h.handed): h.caller for h in handed if _version(h.handed) != h.version}
        for h in handed:
            if id(h.handed) in written:
                _write(h.caller, h.handed)  # what the module wrote, where the eager one did
        path = paths.get(id(module), "")
        answers = current_answering()
        if not path or answers is None:
            return None
        leaves, spec = pytree.tree_flatten_with_path(out)
        new = []
        for key, v in leaves:
            if not isinstance(v, torch.Tensor):
                new.append(v)
                continue
            taken = answers.take(MarkerName(path, k, leaf_path(key)), v)
            caller = written.get(id(v))
            # the output is the input the module wrote: the caller's tensor holds the answer
            new.append(caller if caller is not None and _write(caller, taken) else taken)
        return pytree.tree_unflatten(new, spec)

    with every_module_hooked(model, pre, post, hooks_in_scope=hooks_in_scope):
        yield


def _version(t: torch.Tensor) -> int:
    try:
        return int(t._version)
    except RuntimeError:  # an inference tensor keeps no version counter
        return -1


def _write(target: torch.Tensor, value: torch.Tensor) -> bool:
    """``target`` given ``value``'s elements in place; ``False`` where that cannot be done."""
    if target is value:
        return True
    if target.shape != value.shape or target.dtype != value.dtype:
        return False
    try:
        with torch.no_grad():
            target.copy_(value)
    except RuntimeError:  # overlapping memory (an expand), an inference tensor
        return False
    return True


def _replay(
    model: torch.nn.Module,
    state: ModuleState,
    call: ModuleCall,
    values: Mapping[MarkerName, np.ndarray],
    hooks_in_scope: bool,
) -> dict[LeafPath, torch.Tensor] | str:
    """The call's module run alone on the file's values of its inputs: its outputs by leaf.

    Its ``forward`` alone where the user's hooks are not part of the call
    (``hooks_in_scope=False``): the inputs were recorded after them, the output before.
    """
    leaves, spec = pytree.tree_flatten((call.args, dict(call.kwargs)))
    tensors = iter(call.inputs)
    fed = []
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            fed.append(leaf)
            continue
        captured = next(tensors)
        value = values.get(MarkerName(call.path, call.call_index, captured.path, is_input=True))
        if value is None:
            return f"no ONNX value of this call's input {captured.name or '[0]'}"
        tensor = torch.from_numpy(np.array(value, copy=True))
        fed.append(tensor.to(dtype=captured.value.dtype, device=captured.value.device))
    args, kwargs = pytree.tree_unflatten(fed, spec)
    module = model.get_submodule(call.path)
    hooked = module._forward_hooks or module._forward_pre_hooks
    call_it = module.forward if hooked and not hooks_in_scope else module
    state.restore()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = call_it(*args, **kwargs)
    except Exception as e:
        logger.debug("replaying %s failed: %s", call.name, e)
        return f"replay on ONNX inputs failed: {first_line(e, 120)}"
    finally:
        state.restore()
    return tensor_leaves(out)
