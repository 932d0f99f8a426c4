"""Stage 2: export the instrumented module with either ``torch.onnx`` exporter.

The markers become ``fxalign::Debug`` nodes through fxalign's entries in
``custom_translation_table`` (dynamo exporter) or its registered custom symbolic (TorchScript
exporter). The user's own export options are passed through unchanged; a user
``custom_translation_table`` or ``custom_opsets`` is merged with fxalign's, not replaced.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils import _pytree as pytree

from fxalign.errors import ExportError
from fxalign.markers import DOMAIN, OPSET_VERSION, TRANSLATION_TABLE, collect_aliases

__all__ = ["ExportResult", "Exporter", "default_exporter", "export"]

logger = logging.getLogger(__name__)

Exporter = Literal["dynamo", "torchscript"]
"""The two ``torch.onnx.export`` code paths: ``dynamo=True`` and ``dynamo=False``."""


@dataclass
class ExportResult:
    """What :func:`export` wrote.

    Attributes:
        path: The ONNX file (external data, if any, beside it).
        exporter: Which exporter produced it.
        seconds: Wall time of ``torch.onnx.export``.
        warnings: Warnings the exporter raised (``TracerWarning`` and friends), as
            ``"Category: message"`` strings, in order.
        aliases: ``marker name -> marker name`` for markers that got no Debug node because
            their value is another marker's (see :func:`fxalign.debug_apply`); pass it to
            :func:`fxalign.extract`.
    """

    path: str
    exporter: Exporter
    seconds: float
    warnings: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)


def default_exporter() -> Exporter:
    """The exporter ``torch.onnx.export`` uses when ``dynamo`` is not given."""
    default = inspect.signature(torch.onnx.export).parameters.get("dynamo")
    if default is not None and default.default is False:
        return "torchscript"
    return "dynamo"


def _check_exporter(exporter: str) -> Exporter:
    if exporter not in ("dynamo", "torchscript"):
        raise ExportError(f"unknown exporter {exporter!r}", hint="use 'dynamo' or 'torchscript'")
    return exporter  # type: ignore[return-value]


def export(
    instrumented: torch.nn.Module,
    args: Sequence[Any],
    path: str | os.PathLike[str],
    *,
    kwargs: Mapping[str, Any] | None = None,
    exporter: Exporter | None = None,
    **export_kwargs: Any,
) -> ExportResult:
    """Export ``instrumented`` to ``path`` with its markers as Debug nodes.

    Args:
        instrumented: A module from :func:`fxalign.instrument` (any module works; one without
            markers exports as a plain model).
        args: Positional example inputs.
        path: Output ``.onnx`` path.
        kwargs: Keyword example inputs.
        exporter: ``"dynamo"`` or ``"torchscript"``; default: ``torch.onnx.export``'s default.
        **export_kwargs: Passed to ``torch.onnx.export`` (``opset_version``, ``input_names``,
            ``output_names``, ``dynamic_axes``, ``dynamic_shapes``, ...). A
            ``custom_translation_table`` (dynamo) or ``custom_opsets`` (TorchScript) is merged
            with fxalign's entries.

    Returns:
        An :class:`ExportResult`.

    Raises:
        ExportError: The exporter failed; its message is kept and the cause chained.
    """
    exporter = _check_exporter(exporter or default_exporter())
    options = dict(export_kwargs)
    if exporter == "dynamo":
        table = dict(options.pop("custom_translation_table", None) or {})
        table.update(TRANSLATION_TABLE)
        options["custom_translation_table"] = table
        options.setdefault("verbose", False)
    else:
        for key in ("custom_translation_table", "dynamic_shapes", "optimize", "report", "verify"):
            if key in options:
                raise ExportError(
                    f"option {key!r} is only understood by the dynamo exporter",
                    hint="drop it or use exporter='dynamo'",
                )
        opsets = dict(options.pop("custom_opsets", None) or {})
        opsets.setdefault(DOMAIN, OPSET_VERSION)
        options["custom_opsets"] = opsets
        if _has_non_tensor_leaf(args, kwargs):
            # The TorchScript exporter turns Python numbers among the inputs into graph inputs;
            # bake them into the module the way the dynamo exporter does.
            instrumented = _BakeNonTensors(instrumented, args, kwargs or {})
            args, kwargs = instrumented.tensor_args, None
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, collect_aliases() as aliases:
        warnings.simplefilter("always")
        try:
            torch.onnx.export(
                instrumented,
                tuple(args),
                str(path),
                kwargs=dict(kwargs) if kwargs else None,
                dynamo=exporter == "dynamo",
                **options,
            )
        except Exception as e:
            other = "torchscript" if exporter == "dynamo" else "dynamo"
            raise ExportError(
                f"the {exporter} exporter failed on {type(instrumented).__name__}: {_summary(e)}",
                hint=f"try exporter={other!r}; the exporter's own message is chained below",
            ) from e
    seconds = time.perf_counter() - start
    messages = []
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, FutureWarning)):
            continue
        messages.append(f"{w.category.__name__}: {w.message}")
    for m in messages:
        logger.debug("exporter warning: %s", m)
    return ExportResult(str(path), exporter, seconds, messages, dict(aliases))


def _has_non_tensor_leaf(args: Sequence[Any], kwargs: Mapping[str, Any] | None) -> bool:
    return any(
        not isinstance(v, torch.Tensor)
        for v in pytree.tree_leaves((tuple(args), dict(kwargs or {})))
    )


class _BakeNonTensors(torch.nn.Module):
    """Calls ``module`` with the non-tensor inputs fixed; takes the tensor inputs positionally."""

    def __init__(
        self, module: torch.nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> None:
        super().__init__()
        self.module = module
        leaves, self._spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        self._constants = [None if isinstance(v, torch.Tensor) else v for v in leaves]
        self._is_tensor = [isinstance(v, torch.Tensor) for v in leaves]
        self.tensor_args = tuple(v for v in leaves if isinstance(v, torch.Tensor))

    def forward(self, *tensors: torch.Tensor) -> Any:
        """Rebuild the original call and run it."""
        it = iter(tensors)
        leaves = [
            next(it) if t else c for t, c in zip(self._is_tensor, self._constants, strict=True)
        ]
        args, kwargs = pytree.tree_unflatten(leaves, self._spec)
        return self.module(*args, **kwargs)


def _summary(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else text}"
