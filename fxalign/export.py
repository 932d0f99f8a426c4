"""Stage 2: export the instrumented module with either ``torch.onnx`` exporter.

The markers become ``fxalign::Debug`` nodes through fxalign's entries in
``custom_translation_table`` (dynamo exporter) or its registered custom symbolic (TorchScript
exporter). The user's own export options are passed through unchanged; a user
``custom_translation_table`` or ``custom_opsets`` is merged with fxalign's, not replaced.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import types
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from torch.utils import _pytree as pytree

from fxalign.backends.feeds import input_leaf_names
from fxalign.errors import ExportError
from fxalign.export_errors import (
    captured_output,
    export_error,
    module_in_traceback,
    quiet_exporter,
)
from fxalign.markers import DOMAIN, OPSET_VERSION, TRANSLATION_TABLE, collect_aliases
from fxalign.names import MarkerName
from fxalign.options import Exporter, default_exporter

__all__ = [
    "ExportResult",
    "export",
    "export_plain",
    "module_in_traceback",
]

logger = logging.getLogger(__name__)


@dataclass
class ExportResult:
    """What :func:`export` wrote.

    Attributes:
        path: The ONNX file (external data, if any, beside it).
        exporter: Which exporter produced it.
        seconds: Wall time of ``torch.onnx.export``.
        warnings: Warnings the exporter raised (``TracerWarning`` and friends), as
            ``"Category: message"`` strings, in order.
        input_names: The name each tensor input was exported under, in the order the
            exporters flatten ``(args, kwargs)``; the graph may lack some (unused inputs).
        warning_sources: ``(filename, line)`` where each warning was raised, in order.
        aliases: ``marker name -> marker name`` for markers that got no Debug node because
            their value is another marker's (see :func:`fxalign.debug_apply`); pass it to
            :func:`fxalign.extract`.
        model: The exported model, weights inline, when the export was made in memory and
            kept (:func:`export_plain` with the TorchScript exporter); else ``None``.
        written: Whether ``path`` was written (``False``: ``export_plain(write=False)`` kept
            the model in memory only, and ``path`` is where it would have gone).
    """

    path: str
    exporter: Exporter
    seconds: float
    warnings: list[str] = field(default_factory=list)
    input_names: list[str] = field(default_factory=list)
    warning_sources: list[tuple[str, int]] = field(default_factory=list)
    aliases: dict[MarkerName, MarkerName] = field(default_factory=dict)
    model: onnx.ModelProto | None = None
    written: bool = True


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
        path: Output ``.onnx`` path. With either exporter the weights go to external data,
            ``<path>.data`` beside it (the TorchScript exporter's inline output is converted,
            every initializer over 1 KiB); pass ``external_data=False`` to keep them inline.
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
    return _export(instrumented, args, path, kwargs, exporter, export_kwargs, markers=True)


def export_plain(
    model: torch.nn.Module,
    args: Sequence[Any],
    path: str | os.PathLike[str],
    kwargs: Mapping[str, Any] | None,
    exporter: Exporter | None,
    export_kwargs: Mapping[str, Any],
    *,
    write: bool = True,
) -> ExportResult:
    """:func:`export` of a model without markers (the plain model, as the user deploys it).

    The TorchScript exporter is not told about fxalign's opset domain, which it would warn about
    as declared but unused. A TorchScript export whose weights fit in memory is made in memory
    and kept (``result.model``) and written as that exporter writes it, weights inline; with
    ``write=False`` it is not written at all (nobody is to read the file). Other exports are
    written to ``path`` whatever ``write`` says.
    """
    return _export(model, args, path, kwargs, exporter, export_kwargs, markers=False, write=write)


def _export(
    instrumented: torch.nn.Module,
    args: Sequence[Any],
    path: str | os.PathLike[str],
    kwargs: Mapping[str, Any] | None,
    exporter: Exporter | None,
    export_kwargs: Mapping[str, Any],
    *,
    markers: bool,
    write: bool = True,
) -> ExportResult:
    """:func:`export`, or :func:`export_plain` with ``markers=False``."""
    exporter = _check_exporter(exporter or default_exporter())
    # Exporters switch modes while they trace; every module gets its own flag back.
    modes = [(m, m.training) for m in instrumented.modules()]
    options = dict(export_kwargs)
    target: str | io.BytesIO = str(path)
    if exporter == "dynamo":
        table = dict(options.pop("custom_translation_table", None) or {})
        table.update(TRANSLATION_TABLE)
        options["custom_translation_table"] = table
        options.setdefault("verbose", False)
    else:
        instrumented, args, in_memory, external = _torchscript_options(
            instrumented, args, kwargs, options, markers=markers
        )
        kwargs = None
        if in_memory:
            target = io.BytesIO()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (
        _restore_modes(modes),
        warnings.catch_warnings(record=True) as caught,
        collect_aliases() as aliases,
        quiet_exporter(),
    ):
        warnings.simplefilter("always")
        failure: BaseException | None = None
        # The exporters print graph dumps (from C++ too) when they fail: kept for the debug log.
        with captured_output() as printed:
            try:
                torch.onnx.export(
                    instrumented,
                    tuple(args),
                    target,  # type: ignore[arg-type]  # TorchScript exporter takes file objects
                    kwargs=dict(kwargs) if kwargs else None,
                    dynamo=exporter == "dynamo",
                    **options,
                )
            except Exception as e:
                failure = e
        output = "".join(printed).strip()
        if failure is not None:
            raise export_error(failure, exporter, instrumented, output) from failure
        if output:
            logger.debug("%s exporter output:\n%s", exporter, output)
    kept: onnx.ModelProto | None = None
    written = True
    if isinstance(target, io.BytesIO):
        serialized = target.getvalue()
        if external:
            _save_with_external_data(serialized, Path(path))
        else:  # a plain export: kept, and written as the exporter writes it
            kept = onnx.load_model_from_string(serialized)
            if write:
                Path(path).write_bytes(serialized)
            written = write
    seconds = time.perf_counter() - start
    messages, sources = _exporter_warnings(caught)
    input_names = list(options.get("input_names") or [])
    return ExportResult(
        str(path), exporter, seconds, messages, input_names, sources, dict(aliases), kept, written
    )


def _torchscript_options(
    instrumented: torch.nn.Module,
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None,
    options: dict[str, Any],
    *,
    markers: bool,
) -> tuple[torch.nn.Module, Sequence[Any], bool, bool]:
    """Check and complete ``options`` for the TorchScript exporter (in place).

    Returns the module and positional inputs to export (keyword inputs are baked in),
    whether to export to memory first, and whether to write the weights as external data.
    """
    for key in ("custom_translation_table", "dynamic_shapes", "optimize", "report", "verify"):
        if key in options:
            raise ExportError(
                f"option {key!r} is only understood by the dynamo exporter",
                hint="drop it or use exporter='dynamo'",
            )
    opsets = dict(options.pop("custom_opsets", None) or {})
    if markers:
        opsets.setdefault(DOMAIN, OPSET_VERSION)
    options["custom_opsets"] = opsets
    # The TorchScript exporter drops inputs the trace does not use (a factor read with
    # .item(), say): name the inputs so that the remaining ones can be fed by name.
    options.setdefault("input_names", input_leaf_names(_forward_of(instrumented), args, kwargs))
    # The TorchScript exporter turns Python numbers among the inputs into graph inputs,
    # passes keyword inputs positionally and fills in the defaults of every parameter the
    # call leaves out (both break forwards with keyword-only options, like Hugging Face's:
    # "got multiple values for argument 'use_cache'"), and takes any module with a
    # ``graph`` (an FX GraphModule) for a ScriptModule when checking dynamic_axes: it is
    # given a wrapper that makes the call the way eager code does instead.
    if markers:
        baked = _BakeNonTensors(instrumented, args, kwargs or {})
        instrumented, args = baked, baked.tensor_args
    else:  # the module tree (and so every scope and weight name) as the user's own export
        instrumented, args = _baked_copy(instrumented, args, kwargs or {})
    # The TorchScript exporter writes weights inline (external data only past 2 GB):
    # exported to memory, an instrumented model's are written once as external data, like
    # the dynamo exporter's, so that extraction and the debug model never copy them again;
    # a plain model's only when asked, else it is kept in memory for the runtime (and
    # written inline, as the exporter writes it).
    asked = options.pop("external_data", None)
    external = bool(markers if asked is None else asked) and options.get("export_params", True)
    in_memory = (external or not markers) and _weight_bytes(instrumented) < _IN_MEMORY_LIMIT
    return instrumented, args, in_memory, bool(external)


def _exporter_warnings(
    caught: Sequence[warnings.WarningMessage],
) -> tuple[list[str], list[tuple[str, int]]]:
    """The exporter's warnings (deprecations left out), logged: messages and their sources."""
    messages = []
    sources = []
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, FutureWarning)):
            continue
        messages.append(f"{w.category.__name__}: {w.message}")
        sources.append((str(w.filename), int(w.lineno)))
    for m in messages:
        logger.debug("exporter warning: %s", m)
    return messages, sources


_IN_MEMORY_LIMIT = 1_500_000_000
"""Weights (bytes) up to which a TorchScript export is made in memory: far from protobuf's 2 GB."""


def _weight_bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _save_with_external_data(serialized: bytes, path: Path) -> None:
    """Save a serialized model to ``path`` with its weights in ``<path>.data`` beside it."""
    model = onnx.load_model_from_string(serialized)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing file
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
        convert_attribute=False,
    )


@contextlib.contextmanager
def _restore_modes(modes: Sequence[tuple[torch.nn.Module, bool]]) -> Iterator[None]:
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class _BakeNonTensors(torch.nn.Module):
    """Calls ``module`` with the non-tensor inputs fixed; takes the tensor inputs positionally."""

    def __init__(
        self, module: torch.nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> None:
        super().__init__()
        self.module = module
        # The TorchScript exporter restores the mode of the module it is given, recursively:
        # a wrapper in the default training mode would leave ``module`` in training mode.
        self.training = module.training
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


def _baked_copy(
    module: torch.nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """:class:`_BakeNonTensors` without a wrapper: a shallow copy of ``module`` itself.

    The copy is of the module's own class (no subclass: a registry kept by
    ``__init_subclass__`` sees nothing) with an instance ``forward`` that takes the tensor
    inputs positionally and rebuilds the original call; it shares every submodule, parameter
    and buffer, so the exported file has the module paths and weight names of the user's own
    ``torch.onnx.export(model, ...)`` (a wrapper would prefix them all with ``module.``).
    """
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    is_tensor = [isinstance(v, torch.Tensor) for v in leaves]
    constants = [None if t else v for t, v in zip(is_tensor, leaves, strict=True)]
    copy: torch.nn.Module = torch.nn.Module.__new__(type(module))
    copy.__dict__.update(module.__dict__)
    own = module.__dict__.get("forward")  # a forward set on the instance: called as it is
    original = own if own is not None else types.MethodType(type(module).forward, copy)

    def forward(*tensors: torch.Tensor) -> Any:
        it = iter(tensors)
        rebuilt = [next(it) if t else c for t, c in zip(is_tensor, constants, strict=True)]
        call_args, call_kwargs = pytree.tree_unflatten(rebuilt, spec)
        return original(*call_args, **call_kwargs)

    copy.__dict__["forward"] = forward
    return copy, tuple(v for v in leaves if isinstance(v, torch.Tensor))


def _forward_of(module: torch.nn.Module) -> Any:
    inner = module.module if isinstance(module, _BakeNonTensors) else module
    return inner.forward
