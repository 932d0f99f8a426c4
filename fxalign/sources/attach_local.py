"""Local error on an attached file: each module rerun eagerly on the file's values of its inputs.

For every call whose tensor inputs were all located in the file, the user's own module runs
again, under ``torch.no_grad()`` with the random number generators forked, on the ONNX values of
those inputs (cast to the dtypes the module received), and each output is compared with its
ONNX value::

    local(m) = compare(m(onnx values of m's inputs), onnx value of m's output)

The model's state is put back after every replay (:class:`fxalign.state.ModuleState`). A call
whose ONNX inputs are bitwise its eager ones, in eval mode, is not replayed: its local error is
its cumulative one. A call with an input the file does not hold says which and why.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils import _pytree as pytree

from fxalign.attach import ModuleCall
from fxalign.local import set_local_error
from fxalign.names import MarkerName
from fxalign.report.model import Row, Verdict
from fxalign.state import ModuleState
from fxalign.torch_run import to_numpy

__all__ = ["CallKey", "Plans", "Replayer", "ValuePlan"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValuePlan:
    """Where sample 0's location put one module value: its ONNX tensor, or why there is none.

    Attributes:
        tensor: The ONNX tensor holding it (a graph output of the promoted copy), or ``None``.
        reason: Why ``tensor`` is ``None`` (``"fused into blocks.0.bn"``).
        node: The ONNX node computing ``tensor``, if known.
    """

    tensor: str | None
    reason: str | None = None
    node: str | None = None


CallKey = tuple[str, int]
"""``(module path, call index)``: one module call, the same in every sample."""
Plans = dict[CallKey, list[ValuePlan]]
"""``call -> one plan per tensor leaf`` (of its output, or of its ``(args, kwargs)``)."""


class Replayer:
    """Fills ``row.local`` (or ``row.local_note``) for the module rows of one sample.

    Args:
        model: The user's model (submodules are looked up by path in it).
        state: The model's state, put back after each replay.
        input_plans: Per call, where the file holds each tensor input.
        raw: The file's values of this sample, by tensor name.
        gone: ``value id -> "conv's output: fused into bn"`` for the module outputs of this
            sample that the file does not hold, to say why a reader of one cannot be replayed.
        verdict: The rule local errors are judged by.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        state: ModuleState,
        input_plans: Plans,
        raw: Mapping[str, np.ndarray],
        gone: Mapping[str, str],
        verdict: Verdict = "roundoff",
    ) -> None:
        self.model, self.state, self.plans, self.raw = model, state, input_plans, raw
        self.gone, self.verdict = gone, verdict

    def fill(
        self, named: Sequence[tuple[MarkerName, Row]], calls: Mapping[MarkerName, ModuleCall]
    ) -> None:
        """Set each module row's local error; rows of one call share one replay."""
        replayed: tuple[int, list[torch.Tensor] | str] | None = None
        same: dict[int, bool] = {}
        for name, row in named:
            call = calls.get(name)
            if row.kind == "output" or call is None:
                continue
            if row.onnx_name is None:
                row.local_note = "no ONNX value of this output"
                continue
            missing = self._missing_input(call)
            if missing is not None:
                row.local_note = missing
                continue
            if call.index not in same:
                same[call.index] = self._inputs_identical(call)
            if same[call.index] and row.metrics is not None:
                row.local = dataclasses.replace(row.metrics)
                continue
            if replayed is None or replayed[0] != call.index:
                replayed = None  # let the previous call's outputs go first
                replayed = (call.index, self._replay(call))
            self._compare(name, row, call, replayed[1])

    def _compare(
        self, name: MarkerName, row: Row, call: ModuleCall, outcome: list[torch.Tensor] | str
    ) -> None:
        if isinstance(outcome, str):
            row.local_note = outcome
            return
        position = next(i for i, leaf in enumerate(call.outputs) if leaf.path == name.leaf)
        if len(outcome) != len(call.outputs):
            row.local_note = (
                f"the replay returned {len(outcome)} tensors, the call {len(call.outputs)}"
            )
            return
        assert row.onnx_name is not None
        set_local_error(row, to_numpy(outcome[position]), self.raw[row.onnx_name], self.verdict)

    def _plans_of(self, call: ModuleCall) -> list[ValuePlan]:
        return self.plans.get((call.path, call.call_index), [])

    def _missing_input(self, call: ModuleCall) -> str | None:
        """Why the call cannot be replayed on the file's values, or ``None`` when it can."""
        plans = self._plans_of(call)
        if len(plans) != len(call.inputs):
            return "this call's inputs differ from those located on sample 0"
        for leaf, plan in zip(call.inputs, plans, strict=True):
            if plan.tensor is None:
                label = f"no ONNX value of this call's input {leaf.name or '[0]'}"
                if leaf.value_id in self.gone:
                    return f"{label} ({self.gone[leaf.value_id]})"
                return f"{label}: {plan.reason or 'not located'}"
        return None

    def _inputs_identical(self, call: ModuleCall) -> bool:
        """Whether a replay would recompute the eager output, bit for bit."""
        module = self.model.get_submodule(call.path)
        if any(m.training for m in module.modules()):
            return False  # dropout and batch statistics: a replay is a fresh draw
        for leaf, plan in zip(call.inputs, self._plans_of(call), strict=True):
            assert plan.tensor is not None
            got, ref = self.raw[plan.tensor], to_numpy(leaf.value)
            if got.dtype != ref.dtype or got.shape != ref.shape or not np.array_equal(got, ref):
                return False
        return True

    def _replay(self, call: ModuleCall) -> list[torch.Tensor] | str:
        """The call's module run on the file's values of its inputs: its output leaves."""
        leaves, spec = pytree.tree_flatten((call.args, dict(call.kwargs)))
        tensors = iter(zip(call.inputs, self._plans_of(call), strict=True))
        fed = []
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                fed.append(leaf)
                continue
            captured, plan = next(tensors)
            assert plan.tensor is not None
            value = torch.from_numpy(np.array(self.raw[plan.tensor], copy=True))
            fed.append(value.to(dtype=captured.value.dtype, device=captured.value.device))
        args, kwargs = pytree.tree_unflatten(fed, spec)
        module = self.model.get_submodule(call.path)
        self.state.restore()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                out = module(*args, **kwargs)
        except Exception as e:
            logger.debug("replaying %s failed: %s", call.name, e)
            first = (str(e).strip().splitlines() or [""])[0][:120]
            return f"replay on ONNX inputs failed: {type(e).__name__}: {first}"
        finally:
            self.state.restore()
        return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
