"""Stage 4, PyTorch side: run the instrumented module and return ``name -> numpy array``.

:func:`run_torch` runs the instrumented module eagerly once and returns every marker's value
(copies taken as the marker executed) plus the model's final outputs under the root's marker
names: ``""`` for a single tensor, ``"[0]"``, ``'["logits"]'``, ... for structured outputs.
The ONNX side is :mod:`fxalign.backends`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from fxalign.errors import InputError, InternalError
from fxalign.markers import CallRecord, capture, leaf_suffix

__all__ = [
    "TorchRun",
    "flatten_outputs",
    "run_torch",
    "run_torch_captured",
    "to_numpy",
]


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0] if len(text) < 2000 else text[:2000]


def to_numpy(value: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array on the CPU (bfloat16 widened to float32, which is exact)."""
    value = value.detach()
    if value.dtype == torch.bfloat16:
        value = value.float()
    return value.cpu().resolve_conj().resolve_neg().numpy()


def flatten_outputs(value: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensor leaves of a model output, named the way markers are (``""``, ``"[0]"``, ...)."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    leaves, _ = pytree.tree_flatten_with_path(value)
    return {
        prefix + leaf_suffix(path): leaf for path, leaf in leaves if isinstance(leaf, torch.Tensor)
    }


def run_torch(
    instrumented: torch.nn.Module,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Run the instrumented module once and capture every marker.

    Args:
        instrumented: A module from :func:`fxalign.instrument`.
        args: Positional inputs.
        kwargs: Keyword inputs.

    Returns:
        ``marker name -> value`` in execution order (module inputs as ``path:in[0]``, outputs
        as ``path``), then the final outputs under the root's names (``""``, ``"[0]"``, ...).

    Example:
        >>> from fxalign import instrument
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> list(run_torch(instrument(net), (torch.ones(1, 2),)))
        ['0:in[0]', '0', '']
    """
    return run_torch_captured(instrumented, args, kwargs).values


@dataclass
class TorchRun:
    """Everything one captured PyTorch run saw.

    Attributes:
        values: What :func:`run_torch` returns.
        without_tensors: Markers whose value held no tensor.
        calls: ``call name -> CallRecord`` of every call whose inputs were marked.
        dtypes: ``name -> PyTorch dtype name`` for values whose numpy array has another dtype
            (``bfloat16``, widened to float32 exactly).
        names: Every marker executed and every final output, in order; ``values`` may hold
            only some of them (see ``only`` in :func:`run_torch_captured`).
    """

    values: dict[str, np.ndarray]
    without_tensors: list[str]
    calls: dict[str, CallRecord]
    dtypes: dict[str, str]
    names: list[str] = field(default_factory=list)


def run_torch_captured(
    instrumented: torch.nn.Module,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    only: Collection[str] | None = None,
) -> TorchRun:
    """:func:`run_torch`, also returning what else the capture recorded.

    Args:
        instrumented: A module from :func:`fxalign.instrument`.
        args: Positional inputs.
        kwargs: Keyword inputs.
        only: Keep the values of these marker names only (all when ``None``); the model's
            final outputs are always kept. :attr:`TorchRun.names` lists every marker.
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
    dtypes = {
        name: str(v.dtype).removeprefix("torch.")
        for name, v in tensors.items()
        if v.dtype == torch.bfloat16
    }
    dtypes.update(
        (name, "bfloat16") for name, dtype in values.dtypes.items() if dtype == torch.bfloat16
    )
    names = [*values.names, *(n for n in result if n not in values.dtypes)]
    return TorchRun(result, list(values.without_tensors), dict(values.calls), dtypes, names)
