"""Local (introduced-here) error: what each module's exported version adds on its own.

Once one module diverges, every later module's output diverges too; the cumulative error cannot
say where the error *starts*. For every marked module call whose inputs are observable on the ONNX
side (marked as ``path:in[...]``), fxalign runs the PyTorch module again, eagerly, on the *ONNX*
values of its inputs and compares the result with the ONNX value of its output::

    local(m) = compare(torch_m(onnx_inputs), onnx_output)

A module that exports faithfully has a local error at round-off level even deep inside a
diverged region; the module that breaks has a large one. Calls that cannot be replayed (blocks
that ``torch.fx`` inlined, inputs the exporter folded away) say why in ``Row.local_note``.

A call whose ONNX inputs are bitwise the PyTorch ones (the model itself, an embedding fed token
ids, anything before the first rounding difference) is not replayed: in eval mode the replay
would recompute PyTorch's own output, so its local error is its cumulative one.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.utils import _pytree as pytree

from fxalign.capture import CallRecord, InputRef
from fxalign.compare.metrics import compare_arrays, dtype_eps
from fxalign.instrument.wrappers import replay_module
from fxalign.markers import new_forward_scope, tensor_leaves
from fxalign.names import CallId, LeafPath, MarkerName, leaf_suffix
from fxalign.report.model import Row, Verdict
from fxalign.torch_run import to_numpy

__all__ = ["fill_local_errors", "set_local_error"]

logger = logging.getLogger(__name__)


def fill_local_errors(
    rows: Sequence[tuple[MarkerName, Row]],
    instrumented: torch.nn.Module,
    calls: Mapping[CallId, CallRecord],
    onnx_values: Mapping[MarkerName, np.ndarray],
    torch_values: Mapping[MarkerName, np.ndarray] | None = None,
    verdict: Verdict = "roundoff",
) -> None:
    """Set ``row.local`` (or ``row.local_note``) on every module row, in place.

    Args:
        rows: ``(marker name, row)`` pairs from :func:`fxalign.compare.compare_named`; output
            rows of the model are skipped.
        instrumented: The instrumented module (modules are looked up by path in it).
        calls: ``call -> CallRecord`` captured in the PyTorch run.
        onnx_values: ``marker name -> ONNX value``, input markers included.
        torch_values: ``marker name -> PyTorch value``, input markers included. Where a call's
            inputs are bitwise equal on both sides and its module is in eval mode, the row's
            cumulative metrics are its local error and the call is not replayed.
        verdict: The rule the local error is judged by (see :func:`fxalign.compare_arrays`).
    """
    # Rows of one call are adjacent: keep one call's replayed outputs alive, not every call's.
    replayed: tuple[CallId, dict[LeafPath, torch.Tensor] | str] | None = None
    same_inputs: dict[CallId, bool] = {}
    for name, row in rows:
        if row.kind == "output":
            continue
        record = calls.get(name.call)
        if record is None:
            row.local_note = (
                "block inlined by torch.fx: no module call to replay"
                if row.kind == "block"
                else "inputs were not marked (instrumented with local=False)"
            )
            continue
        if row.metrics is not None and torch_values is not None:
            if name.call not in same_inputs:
                same_inputs[name.call] = _inputs_identical(
                    instrumented, record, onnx_values, torch_values
                )
            if same_inputs[name.call]:
                row.local = dataclasses.replace(row.metrics)
                continue
        if replayed is None or replayed[0] != name.call:
            replayed = None  # let the previous call's outputs go first
            replayed = (name.call, _replay(instrumented, record, onnx_values))
        outcome = replayed[1]
        if isinstance(outcome, str):
            row.local_note = outcome
            continue
        got = onnx_values.get(name)
        ref = outcome.get(name.leaf)
        if got is None or ref is None:
            row.local_note = "output not in the ONNX graph" if got is None else "no such output"
            continue
        set_local_error(row, to_numpy(ref), got, verdict)


def set_local_error(row: Row, reference: np.ndarray, got: np.ndarray, verdict: Verdict) -> None:
    """Set ``row.local`` from a replayed value and the ONNX one (or say why their shapes differ)."""
    if reference.shape != got.shape:
        row.local_note = (
            f"replayed shape {list(reference.shape)} differs from ONNX {list(got.shape)}"
        )
        return
    row.local, _ = compare_arrays(
        reference,
        got,
        atol=row.atol,
        rtol=row.rtol,
        verdict=verdict,
        eps=dtype_eps(row.torch_dtype),
    )


def _inputs_identical(
    instrumented: torch.nn.Module,
    record: CallRecord,
    onnx_values: Mapping[MarkerName, np.ndarray],
    torch_values: Mapping[MarkerName, np.ndarray],
) -> bool:
    """Whether replaying ``record`` would recompute PyTorch's own output, bit for bit."""
    try:
        module = replay_module(instrumented, record.module_path)
    except AttributeError:
        return False
    if any(m.training for m in module.modules()):
        return False  # dropout and batch statistics: a replay is a fresh draw
    for name in record.inputs:
        got, ref = onnx_values.get(name), torch_values.get(name)
        if got is None or ref is None or got.dtype != ref.dtype or got.shape != ref.shape:
            return False
        if not np.array_equal(got, ref):
            return False
    return True


def _replay(
    instrumented: torch.nn.Module,
    record: CallRecord,
    onnx_values: Mapping[MarkerName, np.ndarray],
) -> dict[LeafPath, torch.Tensor] | str:
    """Run the module of ``record`` on ONNX input values; return outputs by leaf, or why not."""
    leaves = []
    for leaf in record.leaves:
        if not isinstance(leaf, InputRef):
            leaves.append(leaf)
            continue
        value = onnx_values.get(leaf.name)
        if value is None:
            label = leaf_suffix(leaf.name.leaf) or "input"
            return f"input {label} is not in the ONNX graph (folded away by the exporter)"
        tensor = torch.from_numpy(np.array(value, copy=True))
        leaves.append(tensor.to(record.dtypes[leaf.name]))
    args, kwargs = pytree.tree_unflatten(leaves, record.spec)
    try:
        module = replay_module(instrumented, record.module_path)
    except AttributeError:
        return f"module {record.module_path!r} not found in the instrumented model"
    # A fresh context: the replay's own markers must not advance the run's call counters.
    try:
        out = contextvars.copy_context().run(_call, module, args, kwargs)
    except Exception as e:
        logger.debug("replaying %s failed: %s", record.module_path, e)
        return f"replay on ONNX inputs failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return tensor_leaves(out)


def _call(module: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> object:
    new_forward_scope()
    with torch.no_grad():
        return module(*args, **kwargs)
