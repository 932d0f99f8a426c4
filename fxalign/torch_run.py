"""Stage 4, PyTorch side: run the instrumented module once and keep every marker's value.

:func:`run_torch` runs the instrumented module eagerly inside :func:`fxalign.capture` and returns
``MarkerName -> numpy array``: every marker's value (a copy taken as the marker executed), then
the model's final outputs under the root's names (module path ``""``: a single tensor, or one
name per tensor leaf of a structured output). The ONNX side is :mod:`fxalign.backends`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fxalign.capture import CallRecord, capture
from fxalign.errors import InputError, InternalError
from fxalign.markers import tensor_leaves
from fxalign.names import CallId, MarkerName

__all__ = ["TorchRun", "flatten_outputs", "run_torch", "run_torch_captured", "to_numpy"]


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0] if len(text) < 2000 else text[:2000]


def to_numpy(value: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array on the CPU (bfloat16 widened to float32, which is exact)."""
    value = value.detach()
    if value.dtype == torch.bfloat16:
        value = value.float()
    return value.cpu().resolve_conj().resolve_neg().numpy()


def flatten_outputs(value: Any) -> dict[MarkerName, torch.Tensor]:
    """Tensor leaves of a model output, under the names of the model's final outputs.

    Example:
        >>> [str(name) for name in flatten_outputs((torch.ones(1), {"a": torch.ones(1)}))]
        ['[0]', '[1]["a"]']
    """
    root = CallId("")
    return {root.output(leaf): tensor for leaf, tensor in tensor_leaves(value).items()}


def run_torch(
    instrumented: torch.nn.Module,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
) -> dict[MarkerName, np.ndarray]:
    """Run the instrumented module once and capture every marker.

    Args:
        instrumented: A module from :func:`fxalign.instrument`.
        args: Positional inputs.
        kwargs: Keyword inputs.

    Returns:
        ``marker name -> value`` in execution order (module inputs, shown ``path:in[0]``, and
        outputs, shown ``path``), then the final outputs under the root's names (shown ``""``,
        ``"[0]"``, ...).

    Example:
        >>> from fxalign import instrument
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> [str(name) for name in run_torch(instrument(net), (torch.ones(1, 2),))]
        ['0:in[0]', '0', '']
    """
    return run_torch_captured(instrumented, args, kwargs).values


@dataclass
class TorchRun:
    """Everything one captured PyTorch run saw.

    Attributes:
        values: What :func:`run_torch` returns.
        without_tensors: Module calls whose marked value held no tensor.
        calls: ``call -> CallRecord`` of every call whose inputs were marked.
        dtypes: ``name -> PyTorch dtype name`` for values whose numpy array has another dtype
            (``bfloat16``, widened to float32 exactly).
        names: Every marker executed and every final output, in order; ``values`` may hold
            only some of them (see ``only`` in :func:`run_torch_captured`).
        cut: Markers an export must leave out, and why (see
            :meth:`fxalign.capture.Captured.watch`).
        parents: ``call -> the call whose code made it`` (see
            :attr:`fxalign.capture.Captured.parents`).
        numbers: Python numbers among marked calls' outputs (see
            :attr:`fxalign.capture.Captured.numbers`).
    """

    values: dict[MarkerName, np.ndarray]
    without_tensors: list[CallId]
    calls: dict[CallId, CallRecord]
    dtypes: dict[MarkerName, str]
    names: list[MarkerName] = field(default_factory=list)
    cut: dict[MarkerName, str] = field(default_factory=dict)
    parents: dict[CallId, CallId | None] = field(default_factory=dict)
    numbers: dict[MarkerName, int | float | bool] = field(default_factory=dict)


def run_torch_captured(
    instrumented: torch.nn.Module,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    only: Collection[MarkerName] | None = None,
) -> TorchRun:
    """:func:`run_torch`, also returning what else the capture recorded.

    Args:
        instrumented: A module from :func:`fxalign.instrument`.
        args: Positional inputs.
        kwargs: Keyword inputs.
        only: Keep the values of these marker names only (all when ``None``); the model's
            final outputs are always kept. :attr:`TorchRun.names` lists every marker.

    Returns:
        A :class:`TorchRun`.

    Raises:
        InputError: The model raised on the inputs.
    """
    with torch.no_grad(), capture(only) as values:
        try:
            out = instrumented(*args, **(kwargs or {}))
        except InternalError:
            raise
        except Exception as e:
            raise InputError(
                f"the model raised {type(e).__name__} on the given inputs: {_first_line(e)}",
                hint="check the number, shapes and dtypes of the inputs",
            ) from e
    tensors = {**values, **flatten_outputs(out)}
    result = {name: to_numpy(v) for name, v in tensors.items()}
    dtypes = {name: "bfloat16" for name, v in tensors.items() if v.dtype == torch.bfloat16}
    dtypes.update(
        (name, "bfloat16") for name, dtype in values.dtypes.items() if dtype == torch.bfloat16
    )
    names = [*values.names, *(n for n in result if n not in values.dtypes)]
    return TorchRun(
        result,
        list(values.without_tensors),
        dict(values.calls),
        dtypes,
        names,
        dict(values.cut),
        dict(values.parents),
        dict(values.numbers),
    )
