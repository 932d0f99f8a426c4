"""``align()``: the one place that chains the stages.

instrument -> run_torch -> export -> extract -> run_onnx -> compare -> Report
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import inspect
import itertools
import logging
import os
import re
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils import _pytree as pytree

from fxalign.backends import (
    OrtRunner,
    Runner,
    Session,
    check_runner,
    load_model,
    onnx_feeds,
    run_onnx,
)
from fxalign.compare import (
    DTYPE_TOLERANCES,
    SampleAggregate,
    compare,
    first_divergence,
    row_order,
)
from fxalign.errors import InputError, InstrumentationError, RuntimeBackendError, UserError
from fxalign.export import export, export_plain
from fxalign.extract import ExtractResult, extract, locate_failure
from fxalign.fidelity import measure as measure_fidelity
from fxalign.instrument import instrument_model
from fxalign.instrument.result import Granularity, InstrumentResult
from fxalign.local import fill_local_errors
from fxalign.names import CallId, MarkerName
from fxalign.options import Exporter, default_exporter
from fxalign.report.model import Coverage, Fidelity, Report, Row
from fxalign.state import ModuleState
from fxalign.torch_run import TorchRun, run_torch_captured

__all__ = ["Sample", "align"]

logger = logging.getLogger(__name__)

FUSION_NOTE = (
    "markers sit between ops, so exporter and runtime fusions across module boundaries "
    "(e.g. Conv+BatchNorm) do not happen in the debug model: it is not byte-for-byte the "
    "deployed model"
)


@dataclass(frozen=True)
class Sample:
    """One input sample: positional and keyword inputs.

    Attributes:
        args: Positional inputs.
        kwargs: Keyword inputs.
    """

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


_FX_SOURCE = re.compile(r"^<eval_with_key>.* from (.+):(\d+) in \w+$")


def _located_warnings(model: torch.nn.Module, exported: Any) -> list[str]:
    """Exporter warnings, each with the module whose ``forward`` raised it when known."""
    if not exported.warnings:
        return []
    # Source spans per class, not per module: reading source re-tokenizes the file each time.
    span_of: dict[type, tuple[str, int, int] | None] = {}
    spans = []
    for path, module in model.named_modules():
        cls = type(module)
        if cls not in span_of:
            try:
                lines, first = inspect.getsourcelines(cls.forward)
                filename = inspect.getsourcefile(cls.forward) or ""
            except (OSError, TypeError):
                span_of[cls] = None
            else:
                span_of[cls] = (os.path.realpath(filename), first, first + len(lines) - 1)
        span = span_of[cls]
        if span is not None:
            spans.append((path, *span))
    located: list[str] = []
    sources: list[tuple[str, int]] = list(exported.warning_sources)
    sources += [("", 0)] * (len(exported.warnings) - len(sources))
    for message, (filename, line) in zip(exported.warnings, sources, strict=False):
        generated = _FX_SOURCE.search(filename)
        if generated:  # code FX generated: "<eval_with_key>.1 from FILE:LINE in forward"
            filename, line = generated.group(1), int(generated.group(2))
        real = os.path.realpath(filename) if filename else ""
        owners = [p for p, f, a, b in spans if f == real and a <= line <= b]
        where = f" [{os.path.basename(filename)}:{line}"
        if owners:
            owner = max(owners, key=len)
            where += f", in module {owner or '(model)'!r}"
        located.append(message + (where + "]" if filename else ""))
    return located


def _check_signature(
    model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], sample: int = 0
) -> None:
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        which = f"sample {sample}: " if sample else ""
        raise InputError(
            f"{which}inputs do not fit {type(model).__name__}.forward{sig}: {e}",
            hint="pass positional inputs as args and keyword inputs as kwargs",
        ) from e


def _fidelity(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    exporter: Exporter,
    export_kwargs: Mapping[str, Any] | None,
    plain_path: Path,
    debug_path: Path,
    debug_outputs: list[np.ndarray],
    providers: Sequence[str] | None,
    runner: Runner | None,
) -> Fidelity:
    """Export the plain model, run it, and compare it with the debug model."""
    plain_args, plain_kwargs = _fresh(args, kwargs)
    plain = export_plain(
        model, plain_args, plain_path, plain_kwargs, exporter, dict(export_kwargs or {})
    )
    feeds = onnx_feeds(plain.path, args, kwargs, forward=model.forward)
    outputs = run_onnx(plain.path, feeds, providers, runner=runner)
    return measure_fidelity(
        plain.path,
        debug_path,
        list(outputs.values()),
        debug_outputs,
        providers=providers,
        plain_export_seconds=plain.seconds,
    )


def _located(error: RuntimeBackendError, extracted: ExtractResult) -> RuntimeBackendError:
    """The same error, naming the failing ONNX node and the module it comes from."""
    node, op_type, module = locate_failure(extracted.model, error.message, extracted.tensor_of)
    if node is None and op_type is None:
        return error
    where = f"ONNX node {node!r}" + (f" ({op_type})" if op_type else "")
    where += f" from module {module!r}" if module is not None else ""
    hint = error.hint
    if op_type and module is not None:
        hint = (
            f"{module!r} exports to {op_type}, which this runtime cannot run; check the op's "
            "domain and opset, or give that module's op a translation it supports"
        )
    return RuntimeBackendError(f"{error.message}\n  at {where}", hint=hint)


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
def _kept_state(model: torch.nn.Module) -> Iterator[ModuleState]:
    """Snapshot every module of ``model``; put them all back however the block ends."""
    state = ModuleState.snapshot(model.modules())
    try:
        yield state
    finally:
        state.restore()


@contextlib.contextmanager
def _workdir(workdir: str | os.PathLike[str] | None) -> Iterator[Path]:
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="fxalign-") as tmp:
            yield Path(tmp)
    else:
        path = Path(workdir)
        try:
            path.mkdir(parents=True, exist_ok=True)
            # Fail now, not after the export: a read-only folder, a full disk, no permission.
            with tempfile.NamedTemporaryFile(dir=path, prefix=".fxalign-probe-"):
                pass
        except FileExistsError as e:
            raise UserError(
                f"workdir {str(path)!r} is a file, not a folder",
                hint="pass a folder (it is created if missing)",
            ) from e
        except OSError as e:
            raise UserError(
                f"cannot write into workdir {str(path)!r}: {e.strerror or e}",
                hint="pass a folder you can write to",
            ) from e
        yield path


def _as_args(args: Any) -> tuple[Any, ...]:
    if isinstance(args, tuple):
        return args
    if isinstance(args, list):
        return tuple(args)
    return (args,)


_ALIGN_LOCK = threading.RLock()
"""Serialises :func:`align` calls: torch.fx patches ``nn.Module.__call__`` process-wide while it
traces and ``torch.onnx.export`` keeps global state, so two alignments cannot overlap."""

F = TypeVar("F", bound=Callable[..., Any])


def _serialised(fn: F) -> F:
    """Run ``fn`` under the process-wide alignment lock, outside any ``inference_mode``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # Inference tensors have no version counter (markers need it); fxalign's own copies of
        # the inputs, made inside, are ordinary tensors, and nothing here needs gradients.
        with _ALIGN_LOCK, torch.inference_mode(False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _fresh(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A private copy of every input tensor: a forward may write its inputs in place.

    Each run (probe, PyTorch run, export trace, later samples) gets its own copy, so no run sees
    another's writes and the user's tensors are never handed to the model at all.
    """

    def copy(t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return t.detach().clone()

    new_args, new_kwargs = pytree.tree_map_only(torch.Tensor, copy, (tuple(args), dict(kwargs)))
    return tuple(new_args), dict(new_kwargs)


@_serialised
def align(
    model: torch.nn.Module,
    args: Sequence[Any] | torch.Tensor = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    exporter: Exporter | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    providers: Sequence[str] | None = None,
    workdir: str | os.PathLike[str] | None = None,
    export_kwargs: Mapping[str, Any] | None = None,
    granularity: Granularity = "all",
    runner: Runner | None = None,
    train: bool = False,
    overwrite: bool = False,
    fidelity: bool = False,
    local: bool = True,
    tolerances: Mapping[str, Mapping[str, float]] | None = None,
    samples: Iterable[Any] | None = None,
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
        atol: Absolute tolerance for every value. ``None`` (default): by dtype, 1e-4 for
            float32, looser for float16/bfloat16 (:data:`fxalign.compare.DTYPE_TOLERANCES`);
            integers and booleans are always compared exactly.
        rtol: Relative tolerance, likewise (1e-3 for float32).
        tolerances: Per-module overrides, ``glob -> {"atol": ..., "rtol": ...}`` matched
            against module paths and marker names, e.g. ``{"*.attention.*": {"atol": 1e-3}}``.
        samples: More inputs to compare on, with the model exported once (on ``args`` and
            ``kwargs``, sample 0). Each is a :class:`Sample`, a tensor, a tuple of positional
            inputs or a dict of keyword inputs; an iterable is consumed one sample at a time.
            Rows then hold each value's worst sample and :class:`~fxalign.report.model.SampleStats`.
            Inputs that differ from the export input reveal what tracing baked in (a ``.item()``
            turned constant, a branch taken once) at the first module whose result stops
            matching; with ``dynamic_shapes``/``dynamic_axes`` in ``export_kwargs``, samples of
            other shapes check the dynamic export.
        providers: ONNX Runtime execution providers (default: CPU).
        workdir: Keep the exported (``export.onnx``) and debug (``debug.onnx``) models here;
            by default a private temporary directory is used and removed.
        export_kwargs: Extra ``torch.onnx.export`` options (``opset_version``, ``input_names``,
            ``dynamic_shapes``, ``custom_translation_table``, ...).
        granularity: ``"all"`` marks blocks and leaf modules; ``"leaf"`` leaf modules only.
        runner: The ONNX backend (default: ONNX Runtime with ``providers``): any object with a
            ``name`` and a ``load`` method (see :class:`fxalign.backends.Runner`). The debug
            model is loaded once and run on every sample.
        train: Compare in training mode instead of eval mode.
        overwrite: Allow replacing model files already in ``workdir``.
        fidelity: Also export the plain model (``plain.onnx``) and measure how far the debug
            model is from it: final outputs, and ops whose fusion the markers blocked
            (see :class:`fxalign.report.model.Fidelity`). Costs one more export and ORT run.
        local: Also compute each module's local error: the PyTorch module rerun on the ONNX
            values of its inputs, compared with the ONNX value of its output (see
            :mod:`fxalign.local`). Marks module inputs too.
        max_outputs_per_run: Bound memory: compare at most this many ONNX values at a time.
            For each batch the debug model computes just those values and PyTorch reruns the
            model keeping just those markers, so neither side holds every value; the values,
            and so the report, are identical (both models run once per batch).

    Returns:
        A :class:`Report`; truthy when everything is within tolerance.

    Raises:
        UserError: The model, its inputs or the options (``runner`` not a runner, say) cannot be
            handled (subclasses say which).

    Example:
        >>> import fxalign
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3), torch.nn.ReLU())
        >>> report = fxalign.align(net, (torch.randn(1, 3, 8, 8),))
        >>> report.passed, [r.display_name for r in report.rows]
        (True, ['0', '1', 'output'])
    """
    if not isinstance(model, torch.nn.Module):
        raise InstrumentationError(
            f"expected a torch.nn.Module, got {type(model).__name__}",
            hint="wrap a function in an nn.Module whose forward calls it",
        )
    args, kwargs = _fresh(_as_args(args), dict(kwargs or {}))
    _check_signature(model, args, kwargs)
    exporter = exporter or default_exporter()
    if runner is not None:
        check_runner(runner)
    checked = [("atol", atol), ("rtol", rtol)] + [
        (f"{pattern}: {key}", value)
        for pattern, values in (tolerances or {}).items()
        for key, value in values.items()
    ]
    bad = [
        (k, v) for k, v in checked if v is not None and (not isinstance(v, (int, float)) or v < 0)
    ]
    if bad or any(set(v) - {"atol", "rtol"} for v in (tolerances or {}).values()):
        raise UserError(
            f"tolerances must be numbers >= 0 under 'atol'/'rtol' keys, got {bad or tolerances}",
            hint='e.g. atol=1e-4, tolerances={"*.attention.*": {"atol": 1e-3}}',
        )
    if max_outputs_per_run is not None and max_outputs_per_run < 1:
        raise InputError(
            f"max_outputs_per_run must be at least 1, got {max_outputs_per_run}",
            hint="pass None to compute every value in one run",
        )
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def lap(stage: str, since: float) -> float:
        now = time.perf_counter()
        timings[stage] = now - since
        return now

    with _eval_mode(model, train), _kept_state(model) as user_state, _workdir(workdir) as wd:
        exported_path, debug_path = wd / "export.onnx", wd / "debug.onnx"
        plain_path = wd / "plain.onnx"
        if workdir is not None and not overwrite:
            existing = [str(p) for p in (exported_path, debug_path, plain_path) if p.exists()]
            if existing:
                raise UserError(
                    f"{existing} already exist",
                    hint="pass overwrite=True (--overwrite) or another workdir",
                )
        t = time.perf_counter()
        result = instrument_model(
            model, *_fresh(args, kwargs), granularity=granularity, local=local
        )
        t = lap("instrument", t)
        # Every run from here on starts from the user's state, the instrumented copies' too.
        user_state.restore()
        copies = ModuleState.snapshot(result.module.modules())

        def restore() -> None:
            user_state.restore()
            copies.restore()

        # With a memory bound, values are captured a batch at a time later: names only here.
        only = () if max_outputs_per_run is not None else None
        restore()
        torch_run = run_torch_captured(result.module, *_fresh(args, kwargs), only=only)
        t = lap("run_torch", t)
        export_args, export_kwargs_ = _fresh(args, kwargs)
        restore()
        exported = export(
            result.module,
            export_args,
            exported_path,
            kwargs=export_kwargs_,
            exporter=exporter,
            **dict(export_kwargs or {}),
        )
        t = lap("export", t)
        extracted = extract(exported.path, exported.aliases)
        # Next to export.onnx: the debug model shares its external data file, if it has one.
        extracted.save(debug_path)
        t = lap("extract", t)
        stage = _SampleStage(
            model,
            result,
            extracted,
            exported,
            str(debug_path),
            providers,
            runner,
            atol,
            rtol,
            tolerances,
            local,
            max_outputs_per_run,
            restore,
        )
        aggregate = SampleAggregate()
        first_outputs: list[np.ndarray] = []
        for index, (s_args, s_kwargs) in enumerate(
            itertools.chain([(args, kwargs)], (_fresh(*_as_sample(x)) for x in samples or ()))
        ):
            if index:
                _check_signature(model, s_args, s_kwargs, sample=index)
            run = torch_run if index == 0 else None
            rows, raw_outputs = stage.compare(index, s_args, s_kwargs, run)
            aggregate.add(index, rows)
            if index == 0:
                first_outputs = raw_outputs
        stage.release()
        t = lap("run_onnx+compare" if samples is not None else "run_onnx", t)
        measured = None
        if fidelity:
            restore()
            measured = _fidelity(
                model,
                args,
                kwargs,
                exporter,
                export_kwargs,
                plain_path,
                debug_path,
                first_outputs,
                providers,
                runner,
            )
            t = lap("fidelity", t)

    rows = aggregate.rows() if aggregate.count > 1 else _without_stats(aggregate.rows())
    first = first_divergence(rows)
    notes = [FUSION_NOTE if measured is None else measured.summary(), *stage.notes]
    timings.update(stage.timings)
    timings["total"] = time.perf_counter() - start
    return Report(
        model=type(model).__name__,
        exporter=exporter,
        atol=DTYPE_TOLERANCES["float32"][0] if atol is None else atol,
        rtol=DTYPE_TOLERANCES["float32"][1] if rtol is None else rtol,
        tolerances={k: dict(v) for k, v in (tolerances or {}).items()},
        dtype_tolerances=atol is None or rtol is None,
        rows=rows,
        first_divergence=None if first is None else first.name,
        instrumentation=result.method,
        instrumentation_note=result.fx_error,
        coverage=_coverage(result, stage.seen, stage.without_tensors),
        notes=notes,
        exporter_warnings=_located_warnings(model, exported),
        fidelity=measured,
        timings=timings,
        versions=_versions(),
        sample_count=aggregate.count,
    )


def _without_stats(rows: list[Row]) -> list[Row]:
    for row in rows:
        row.samples = None
    return rows


def _as_sample(sample: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A sample as ``(args, kwargs)``: a :class:`Sample`, a tensor, a tuple/list or a dict."""
    if isinstance(sample, Sample):
        return tuple(sample.args), dict(sample.kwargs)
    if isinstance(sample, dict):
        return (), dict(sample)
    return _as_args(sample), {}


class _SampleStage:
    """Runs and compares one input sample against the exported debug model."""

    def __init__(
        self,
        model: torch.nn.Module,
        result: InstrumentResult,
        extracted: ExtractResult,
        exported: Any,
        debug_path: str,
        providers: Sequence[str] | None,
        runner: Runner | None,
        atol: float | None,
        rtol: float | None,
        tolerances: Mapping[str, Mapping[str, float]] | None,
        local: bool,
        max_outputs_per_run: int | None = None,
        restore: Callable[[], None] = lambda: None,
    ) -> None:
        self.model, self.result, self.extracted, self.exported = model, result, extracted, exported
        self.debug_path = debug_path
        self.runner: Runner = runner or OrtRunner(providers)
        self.atol, self.rtol, self.tolerances, self.local = atol, rtol, tolerances, local
        self.max_outputs_per_run = max_outputs_per_run
        self.restore = restore
        self.graph_outputs = [o.name for o in extracted.model.graph.output]
        self.notes: list[str] = []
        self.seen: dict[MarkerName, None] = {}
        self.without_tensors: list[CallId] = []
        self.timings: dict[str, float] = {"compare": 0.0}
        self._session: Session | None = None

    def compare(
        self,
        index: int,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        run: TorchRun | None,
    ) -> tuple[list[Row], list[np.ndarray]]:
        """Rows of sample ``index`` and the debug model's original outputs on it.

        ``run`` (the sample's PyTorch run, if already made) may hold no values at all when
        ``max_outputs_per_run`` is set: values are then captured a batch at a time.
        """
        feeds = self._feeds(index, args, kwargs)
        if self.max_outputs_per_run is not None:
            if run is None:
                self.restore()
                run = run_torch_captured(self.result.module, *_fresh(args, kwargs), only=())
            return self._compare_in_batches(index, args, kwargs, run, feeds)
        if run is None:
            self.restore()
            run = run_torch_captured(self.result.module, *_fresh(args, kwargs))
        raw = self._run_onnx(feeds, self.graph_outputs)
        start = time.perf_counter()
        rows = self._rows(index, run, run.values, raw, self.extracted.tensor_of, final=True)
        self.timings["compare"] += time.perf_counter() - start
        return rows, [raw[name] for name in self.extracted.output_names]

    def _feeds(
        self, index: int, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> dict[str, np.ndarray]:
        try:
            return onnx_feeds(
                self.extracted.model,
                args,
                kwargs,
                forward=self.model.forward,
                input_names=self.exported.input_names,
            )
        except InputError as e:
            if index:
                raise InputError(f"sample {index}: {e.message}", hint=e.hint) from e
            raise

    def _run_onnx(
        self, feeds: Mapping[str, np.ndarray], names: Sequence[str]
    ) -> Mapping[str, np.ndarray]:
        try:
            if self._session is None:  # once, for every sample and batch
                self._session = load_model(
                    self.runner, self.debug_path, max_outputs_per_run=self.max_outputs_per_run
                )
            return self._session.run(feeds, names)
        except RuntimeBackendError as e:
            raise _located(e, self.extracted) from e

    def release(self) -> None:
        """Let the loaded debug model go (it is loaded again if needed)."""
        self._session = None

    def _rows(
        self,
        index: int,
        run: TorchRun,
        torch_all: Mapping[MarkerName, np.ndarray],
        raw: Mapping[str, np.ndarray],
        tensor_of: Mapping[MarkerName, str],
        *,
        final: bool,
    ) -> list[Row]:
        """Compare the markers of ``tensor_of`` (and, if ``final``, the model's outputs)."""
        extracted = self.extracted
        onnx_values = {marker: raw[tensor] for marker, tensor in tensor_of.items()}
        onnx_names = dict(tensor_of)
        torch_values = {
            n: v for n, v in torch_all.items() if not n.is_input and (final or n.module_path)
        }
        if final:
            torch_outputs = [n for n in torch_values if not n.module_path]
            if len(torch_outputs) == len(extracted.output_names):
                for name, tensor in zip(torch_outputs, extracted.output_names, strict=True):
                    onnx_values[name] = raw[tensor]
                    onnx_names[name] = tensor
            elif index == 0:
                self.notes.append(
                    f"the model returns {len(torch_outputs)} tensor(s) but the ONNX graph has "
                    f"{len(extracted.output_names)} output(s); final outputs were not compared"
                )
        onnx_outputs = {n: v for n, v in onnx_values.items() if not n.is_input}
        rows = compare(
            torch_values,
            onnx_outputs,
            atol=self.atol,
            rtol=self.rtol,
            tolerances=self.tolerances,
            torch_dtypes=run.dtypes,
            module_types=self.result.module_types,
            leaf_paths=self.result.leaf_paths,
            onnx_names=onnx_names,
            onnx_nodes=extracted.producer_of,
        )
        if self.local:
            named = list(zip(row_order(torch_values, onnx_outputs), rows, strict=True))
            fill_local_errors(named, self.result.module, run.calls, onnx_values, torch_all)
        else:
            for row in rows:
                if row.kind != "output":
                    row.local_note = "not computed (local=False)"
        self.seen.update(dict.fromkeys(torch_values))
        self.without_tensors.extend(n for n in run.without_tensors if n not in self.without_tensors)
        return rows

    def _compare_in_batches(
        self,
        index: int,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        run: TorchRun,
        feeds: Mapping[str, np.ndarray],
    ) -> tuple[list[Row], list[np.ndarray]]:
        """Compare a batch of module calls at a time, keeping one batch of values alive.

        Each batch holds whole calls (with, for the local error, their inputs' ONNX values)
        and at most ``max_outputs_per_run`` ONNX values unless one call needs more. For each
        batch the debug model computes just those values and PyTorch reruns the model keeping
        just those markers, so neither side ever holds all values. Deterministic kernels give
        the values, and so the rows, a single run gives.
        """
        limit = self.max_outputs_per_run
        assert limit is not None
        tensor_of = self.extracted.tensor_of
        batches: list[tuple[list[MarkerName], dict[MarkerName, str]]] = []
        names: list[MarkerName] = []
        needed: dict[MarkerName, str] = {}
        previous_call = None
        for name in run.names:
            if name.is_input or not name.module_path:
                continue
            wanted = {name: tensor_of[name]} if name in tensor_of else {}
            record = run.calls.get(name.call)
            if self.local and record is not None:
                wanted.update({n: tensor_of[n] for n in record.inputs if n in tensor_of})
            # Cut between calls only: a call's outputs and inputs stay in one batch.
            tensors = set(needed.values()) | set(wanted.values())
            if names and name.call != previous_call and len(tensors) > limit:
                batches.append((names, needed))
                names, needed = [], {}
            names.append(name)
            needed.update(wanted)
            previous_call = name.call
        # Values only the ONNX side has (markers PyTorch did not run) go last.
        known = set(run.names)
        onnx_only = {n: t for n, t in tensor_of.items() if n not in known and not n.is_input}
        batches.append((names, {**needed, **onnx_only}))

        rows: list[Row] = []
        outputs: list[np.ndarray] = []
        for number, (batch_names, batch_tensors) in enumerate(batches):
            final = number == len(batches) - 1
            fetch = list(dict.fromkeys(batch_tensors.values()))
            if final:
                fetch.extend(n for n in self.extracted.output_names if n not in fetch)
            raw = self._run_onnx(feeds, fetch)
            self.restore()
            torch_run = run_torch_captured(
                self.result.module, *_fresh(args, kwargs), only=batch_names
            )
            start = time.perf_counter()
            rows.extend(self._rows(index, run, torch_run.values, raw, batch_tensors, final=final))
            self.timings["compare"] += time.perf_counter() - start
            if final:
                outputs = [raw[name] for name in self.extracted.output_names]
            del raw, torch_run
        return rows, outputs


def _coverage(
    result: InstrumentResult,
    torch_values: Mapping[MarkerName, Any],
    without_tensors: Sequence[CallId],
) -> Coverage:
    """Which modules got a marker, and why the others did not."""
    module_types, leaf_paths = result.module_types, result.leaf_paths
    static_unmarked, granularity = result.unmarked, result.granularity
    marked: list[str] = []
    seen: set[str] = set()
    for name in torch_values:
        path = name.module_path
        if path and path not in seen:
            seen.add(path)
            marked.append(path)
    leaves = set(leaf_paths)
    # Ancestors of marked modules: containers such as ModuleList are never called themselves.
    has_marked_descendant = {
        ".".join(parts[:i]) for p in seen for parts in [p.split(".")] for i in range(1, len(parts))
    }
    no_tensor = {call.module_path for call in without_tensors} - seen
    unmarked: dict[str, str] = {}
    for path in module_types:
        if not path or path in seen:
            continue
        if path in no_tensor:
            unmarked[path] = "output not a tensor"
        elif path in static_unmarked:
            unmarked[path] = static_unmarked[path]
        elif path in has_marked_descendant and module_types.get(path) in (
            "ModuleList",
            "ModuleDict",
        ):
            unmarked[path] = "container, never called itself (its submodules are marked)"
        elif path not in leaves and granularity == "leaf":
            unmarked[path] = "block (granularity='leaf')"
        elif (owner := _owning_leaf(path, leaves)) is None:
            unmarked[path] = "called 0 times"
        else:
            unmarked[path] = f"inside leaf module {owner!r}"
    for path, why in static_unmarked.items():  # paths outside module_types: aliases
        if path not in seen:
            unmarked.setdefault(path, why)
    leaf_marked = sum(1 for p in leaf_paths if p in seen)
    leaf_ran = leaf_marked + sum(1 for p in leaf_paths if p in no_tensor)
    return Coverage(
        marked, unmarked, leaf_ran, leaf_marked, list(result.traced), dict(result.eager)
    )


def _owning_leaf(path: str, leaves: set[str]) -> str | None:
    """The leaf module ``path`` lives in, if any: its ancestors are looked up, not every leaf."""
    parts = path.split(".")
    return next(
        (p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in leaves), None
    )
