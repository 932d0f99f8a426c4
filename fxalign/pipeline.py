"""``align()``: the one place that chains the stages.

instrument -> run_torch -> export -> extract -> run_onnx -> compare -> Report
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fxalign.compare import compare, first_divergence
from fxalign.errors import InputError, UserError
from fxalign.export import Exporter, default_exporter, export
from fxalign.extract import extract
from fxalign.instrument import Granularity, instrument_model
from fxalign.markers import MarkerName
from fxalign.report import Coverage, Report
from fxalign.runtime import Renamed, Runner, onnx_feeds, run_onnx, run_torch_captured

__all__ = ["align"]

logger = logging.getLogger(__name__)

FUSION_NOTE = (
    "markers sit between ops, so exporter and runtime fusions across module boundaries "
    "(e.g. Conv+BatchNorm) do not happen in the debug model: it is not byte-for-byte the "
    "deployed model"
)


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("fxalign", "torch", "onnx", "onnxruntime", "onnxscript", "onnx-graphsurgeon"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module, keep_training: bool) -> Iterator[None]:
    """Put the model in eval mode for the run; restore every module's flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    if model.training and not keep_training:
        warnings.warn(
            f"{type(model).__name__} is in training mode; fxalign compares it in eval mode "
            "(dropout and batch statistics make training-mode comparisons meaningless). "
            "Pass train=True to keep training mode.",
            UserWarning,
            stacklevel=4,
        )
        model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def _workdir(workdir: str | os.PathLike[str] | None) -> Iterator[Path]:
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="fxalign-") as tmp:
            yield Path(tmp)
    else:
        path = Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        yield path


def _as_args(args: Any) -> tuple[Any, ...]:
    if isinstance(args, tuple):
        return args
    if isinstance(args, list):
        return tuple(args)
    return (args,)


def align(
    model: torch.nn.Module,
    args: Sequence[Any] | torch.Tensor = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    exporter: Exporter | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    providers: Sequence[str] | None = None,
    workdir: str | os.PathLike[str] | None = None,
    export_kwargs: Mapping[str, Any] | None = None,
    granularity: Granularity = "all",
    runner: Runner | None = None,
    train: bool = False,
    overwrite: bool = False,
    max_outputs_per_run: int | None = None,
) -> Report:
    """Find where the exported ONNX model starts to disagree with PyTorch.

    Instruments ``model`` (without changing it), exports it once, runs ONNX Runtime once and the
    instrumented model once, and compares every module's output.

    Args:
        model: The PyTorch model. It is left exactly as it was.
        args: Positional inputs (a single tensor is accepted).
        kwargs: Keyword inputs.
        exporter: ``"dynamo"`` or ``"torchscript"``; default: ``torch.onnx.export``'s default.
        atol: Absolute tolerance.
        rtol: Relative tolerance.
        providers: ONNX Runtime execution providers (default: CPU).
        workdir: Keep the exported (``export.onnx``) and debug (``debug.onnx``) models here;
            by default a private temporary directory is used and removed.
        export_kwargs: Extra ``torch.onnx.export`` options (``opset_version``, ``input_names``,
            ``dynamic_shapes``, ``custom_translation_table``, ...).
        granularity: ``"all"`` marks blocks and leaf modules; ``"leaf"`` leaf modules only.
        runner: A custom ONNX backend (see :class:`fxalign.runtime.Runner`).
        train: Compare in training mode instead of eval mode.
        overwrite: Allow replacing model files already in ``workdir``.
        max_outputs_per_run: Bound ONNX Runtime's memory: run the debug model for at most this
            many marked values at a time, comparing each batch before the next (the values,
            and so the report, are identical; the model runs once per batch).

    Returns:
        A :class:`Report`; truthy when everything is within tolerance.

    Raises:
        UserError: The model, its inputs or the options cannot be handled (subclasses say which).

    Example:
        >>> import fxalign
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3), torch.nn.ReLU())
        >>> report = fxalign.align(net, (torch.randn(1, 3, 8, 8),))
        >>> report.passed, [r.display_name for r in report.rows]
        (True, ['0', '1', 'output'])
    """
    args = _as_args(args)
    kwargs = dict(kwargs or {})
    exporter = exporter or default_exporter()
    if atol < 0 or rtol < 0:
        raise UserError(f"tolerances must be >= 0, got atol={atol}, rtol={rtol}")
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def lap(stage: str, since: float) -> float:
        now = time.perf_counter()
        timings[stage] = now - since
        return now

    with _eval_mode(model, train), _workdir(workdir) as wd:
        exported_path, debug_path = wd / "export.onnx", wd / "debug.onnx"
        if workdir is not None and not overwrite:
            existing = [str(p) for p in (exported_path, debug_path) if p.exists()]
            if existing:
                raise UserError(
                    f"{existing} already exist",
                    hint="pass overwrite=True (--overwrite) or another workdir",
                )
        t = time.perf_counter()
        result = instrument_model(model, args, kwargs, granularity=granularity)
        t = lap("instrument", t)
        torch_values, without_tensors = run_torch_captured(result.module, args, kwargs)
        t = lap("run_torch", t)
        exported = export(
            result.module,
            args,
            exported_path,
            kwargs=kwargs,
            exporter=exporter,
            **dict(export_kwargs or {}),
        )
        t = lap("export", t)
        extracted = extract(exported.path, exported.aliases)
        # Next to export.onnx: the debug model shares its external data file, if it has one.
        extracted.save(debug_path)
        t = lap("extract", t)
        try:
            feeds = onnx_feeds(extracted.model, args, kwargs, forward=model.forward)
        except InputError:
            raise
        # In the order compare() reads them, so that batches of outputs are computed once.
        graph_outputs = list(
            dict.fromkeys(
                [extracted.tensor_of[n] for n in torch_values if n in extracted.tensor_of]
                + [o.name for o in extracted.model.graph.output]
            )
        )
        raw = run_onnx(
            debug_path,
            feeds,
            providers,
            output_names=graph_outputs,
            runner=runner,
            workdir=str(wd),
            max_outputs_per_run=max_outputs_per_run,
        )
        t = lap("run_onnx", t)

    onnx_names = dict(extracted.tensor_of)
    notes = [FUSION_NOTE]
    torch_outputs = [n for n in torch_values if not MarkerName.parse(n).module_path]
    if len(torch_outputs) == len(extracted.output_names):
        for name, tensor in zip(torch_outputs, extracted.output_names, strict=True):
            onnx_names[name] = tensor
    else:
        notes.append(
            f"the model returns {len(torch_outputs)} tensor(s) but the ONNX graph has "
            f"{len(extracted.output_names)} output(s); final outputs were not compared"
        )
    rows = compare(
        torch_values,
        Renamed(raw, onnx_names),
        atol=atol,
        rtol=rtol,
        module_types=result.module_types,
        leaf_paths=result.leaf_paths,
        onnx_names=onnx_names,
    )
    first = first_divergence(rows)
    t = lap("compare", t)
    timings["total"] = time.perf_counter() - start
    return Report(
        model=type(model).__name__,
        exporter=exporter,
        atol=atol,
        rtol=rtol,
        rows=rows,
        first_divergence=None if first is None else first.name,
        instrumentation=result.method,
        instrumentation_note=result.fx_error,
        coverage=_coverage(
            result.module_types,
            result.leaf_paths,
            result.unmarked,
            torch_values,
            without_tensors,
            granularity,
        ),
        notes=notes,
        exporter_warnings=exported.warnings,
        timings=timings,
        versions=_versions(),
    )


def _coverage(
    module_types: Mapping[str, str],
    leaf_paths: Sequence[str],
    static_unmarked: Mapping[str, str],
    torch_values: Mapping[str, Any],
    without_tensors: Sequence[str],
    granularity: Granularity,
) -> Coverage:
    marked: list[str] = []
    seen: set[str] = set()
    for name in torch_values:
        path = MarkerName.parse(name).module_path
        if path and path not in seen:
            seen.add(path)
            marked.append(path)
    leaves = set(leaf_paths)
    no_tensor = {MarkerName.parse(n).module_path for n in without_tensors} - seen
    unmarked: dict[str, str] = {}
    for path in module_types:
        if not path or path in seen:
            continue
        if path in no_tensor:
            unmarked[path] = "output not a tensor"
        elif path in static_unmarked:
            unmarked[path] = static_unmarked[path]
        elif path not in leaves and granularity == "leaf":
            unmarked[path] = "block (granularity='leaf')"
        elif (owner := _owning_leaf(path, leaves)) is None:
            unmarked[path] = "called 0 times"
        else:
            unmarked[path] = f"inside leaf module {owner!r}"
    leaf_marked = sum(1 for p in leaf_paths if p in seen)
    leaf_ran = leaf_marked + sum(1 for p in leaf_paths if p in no_tensor)
    return Coverage(marked, unmarked, leaf_ran, leaf_marked)


def _owning_leaf(path: str, leaves: set[str]) -> str | None:
    """The leaf module ``path`` lives in, if any: its ancestors are looked up, not every leaf."""
    parts = path.split(".")
    return next(
        (p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in leaves), None
    )
