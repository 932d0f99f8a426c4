"""``align()``: the one place that chains the stages, as a short sequence of calls.

::

    options  = AlignOptions.build(**keywords)           # checked once
    source   = MarkerSource(model, options, ...)        # how ONNX values are obtained, or
               AttachSource(...)                         # onnx= / attach=True: a plain file
    source.prepare(sample 0)                             # instrument, export, extract
    rows     = source.compare_sample(i, sample i)  ...   # per sample, folded by SampleAggregate
    facts    = source.finish()                           # coverage, notes, fidelity
    Report(rows, facts, options)

By default (``attach=None``) that runs with the AttachSource on fxalign's plain export first,
and again with the MarkerSource only when the plain export breaks tolerance or cannot be
attached to (:func:`_plain_first`).

Around it: a process-wide lock (torch.fx and torch.onnx keep global state), eval mode, the
user's model state put back however the run ends, and a work folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import importlib.metadata
import itertools
import logging
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args

import torch
from torch.nn.parameter import UninitializedParameter

from fxalign.backends import Runner
from fxalign.compare import DTYPE_TOLERANCES, SampleAggregate, first_divergence, name_culprit
from fxalign.drill import drill_into
from fxalign.errors import (
    FxalignError,
    InstrumentationError,
    InternalError,
    RuntimeBackendError,
    UserError,
)
from fxalign.export_errors import has_inference_weights
from fxalign.instrument.result import Granularity
from fxalign.options import AlignOptions, Exporter
from fxalign.report.model import Report, Row, Verdict
from fxalign.report.summary import where
from fxalign.samples import Sample, as_sample
from fxalign.sources import AttachSource, MarkerSource, SourceFacts, ValueSource
from fxalign.state import ModuleState
from fxalign.threads import torch_threads

__all__ = ["Sample", "align"]

logger = logging.getLogger(__name__)

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
        with _ALIGN_LOCK, torch.inference_mode(False), _old_objects_frozen():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def _old_objects_frozen() -> Iterator[None]:
    """Keep the objects alive before the call out of the cycle collector's passes during it.

    A full collection walks every tracked object of the process (the user's model, loaded
    libraries: a few hundred thousand) and an alignment creates enough objects to trigger
    several, each a pause of a few tenths of a second that finds no garbage among the old
    objects. ``gc.freeze`` moves them aside for the call, ``gc.unfreeze`` puts them back;
    objects made during the call are collected as usual. Left alone when the caller froze
    objects itself or disabled the collector.
    """
    if gc.get_freeze_count() or not gc.isenabled():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


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
    local: bool | Literal["failing", "all"] = True,
    tolerances: Mapping[str, Mapping[str, float]] | None = None,
    samples: Iterable[Any] | None = None,
    max_outputs_per_run: int | None = None,
    verdict: Verdict = "roundoff",
    onnx: str | os.PathLike[str] | None = None,
    attach: bool | None = None,
    drill_down: bool = True,
    repro: str | os.PathLike[str] | None = None,
) -> Report:
    """Find where the exported ONNX model starts to disagree with PyTorch.

    Exports ``model`` plainly, runs it and ONNX Runtime once and compares every module's output
    found in the exported graph (from the module scopes the exporters record); when that breaks
    tolerance, also instruments the model (without changing it) with a marker after every
    module call and compares the debug model, so that the fused modules' values are compared
    too. ``attach`` chooses one path only.

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
            Rows then hold each value's worst sample and
            :class:`~fxalign.report.model.SampleStats`.
            Inputs that differ from the export input reveal what tracing baked in (a ``.item()``
            turned constant, a branch taken once) at the first module whose result stops
            matching; with ``dynamic_shapes``/``dynamic_axes`` in ``export_kwargs``, samples of
            other shapes check the dynamic export.
        providers: ONNX Runtime execution providers (default: CPU).
        workdir: Keep the model files here: the plain export (``plain.onnx``) and its copy
            with module values as outputs (``attach.onnx``), the instrumented export
            (``export.onnx``) and debug model (``debug.onnx``) when markers run; by default a
            private temporary directory is used and removed.
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
        local: Compute the error each module introduces on its own, which names the culprit: a
            leaf rerun on the ONNX values of its inputs, a block rerun with its submodules
            answering with their ONNX values so that only its own code is measured (see
            :mod:`fxalign.local`). ``True`` or ``"failing"`` (default): for the rows whose value
            breaks tolerance (no replay at all on an aligned model); ``"all"``: every row;
            ``False``: none (module inputs are then not marked either).
        max_outputs_per_run: Bound memory: compare at most this many ONNX values at a time.
            For each batch the debug model computes just those values and PyTorch reruns the
            model keeping just those markers, so neither side holds every value; the values,
            and so the report, are identical (both models run once per batch).
        verdict: How a value passes: ``"roundoff"`` (default) within ``atol + rtol * |torch|``
            plus the round-off its dtype allows at the tensor's magnitude
            (``min(4096 * eps, rtol) * rms(torch)``), or ``"allclose"``, plain
            ``numpy.allclose``; integers and booleans are always exact.
        onnx: Compare this ONNX file, the one you deploy, instead of a debug model: it is left
            unchanged on disk, its module outputs are found from the scope information either
            exporter writes (no markers, no re-export, no torch.fx), and a module whose value
            is not in the file (fused, folded, removed) gets a row saying where it went.
            ``exporter``, ``export_kwargs`` and ``fidelity`` do not apply.
        attach: ``None`` (default): the plain export first, exported with ``exporter`` and
            ``export_kwargs`` into ``workdir/plain.onnx`` and attached to as with ``onnx``;
            when it aligns, that is the report (no markers: an aligned model costs about what
            checking its final output costs). When it breaks tolerance, the marker mode runs
            as well and its report is returned, with the plain export's verdict in
            :attr:`Report.notes`, unless the markers hide the divergence (then the plain
            export's report: the deployed graph's). A plain export fxalign cannot attach to
            (the export fails, no module scopes) goes to the marker mode. ``samples`` are kept
            for the second pass. ``max_outputs_per_run`` implies ``False``; ``fidelity``
            applies to the marker pass.
            ``True``: export-and-attach only, into ``workdir/export.onnx``: the exact
            deployed graph, no markers. ``False``: the marker mode only.
        drill_down: When a module is the culprit, find the op of its own code that breaks
            tolerance first, and its source line (:attr:`Report.op`): the module is exported
            alone on the inputs it received, with the same exporter and options, with a
            marker after every op, and each op is rerun on the ONNX values of its inputs.
            Costs one export of that module, only when there is a culprit.
        repro: Write the culprit's standalone repro bundle into this folder (created if
            missing): ``module.pt2`` (its ``torch.export`` program), ``inputs.pt``,
            ``module.onnx`` (exported alone) and ``repro.py``, which needs only torch, onnx and
            onnxruntime; fxalign runs it once in a fresh process and says whether the
            divergence reproduces in isolation (:attr:`Report.repro`).

    Returns:
        A :class:`Report`; truthy when everything is within tolerance.

    Raises:
        UserError: The model, its inputs or the options (``runner`` not a runner, say) cannot be
            handled (subclasses say which).

    Example:
        >>> import fxalign
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3), torch.nn.ReLU()).eval()
        >>> report = fxalign.align(net, (torch.randn(1, 3, 8, 8),))
        >>> report.passed, [r.display_name for r in report.rows]
        (True, ['0', '1', 'output'])
    """
    if not isinstance(model, torch.nn.Module):
        raise InstrumentationError(
            f"expected a torch.nn.Module, got {type(model).__name__}",
            hint="wrap a function in an nn.Module whose forward calls it",
        )
    options = AlignOptions.build(
        exporter=exporter,
        atol=atol,
        rtol=rtol,
        tolerances=tolerances,
        providers=providers,
        workdir=workdir,
        export_kwargs=export_kwargs,
        granularity=granularity,
        runner=runner,
        train=train,
        overwrite=overwrite,
        fidelity=fidelity,
        local=local,
        max_outputs_per_run=max_outputs_per_run,
        verdict=verdict,
        onnx=onnx,
        attach=attach,
        drill_down=drill_down,
        repro=repro,
    )
    _check_initialised(model)
    first = Sample.of(args, kwargs)
    first.check(model)
    return _align(model, first, samples or (), options)


def _check_initialised(model: torch.nn.Module) -> None:
    """A :class:`UserError` for lazy modules not yet run: their first call would change them.

    A lazy module (``nn.LazyLinear``) creates its parameters and changes its class on its
    first forward, which fxalign's runs would do to the user's model for good.
    """
    lazy = [path or type(model).__name__ for path, m in model.named_modules() if _uninitialised(m)]
    if lazy:
        shown = ", ".join(repr(p) for p in lazy[:3]) + (", ..." if len(lazy) > 3 else "")
        raise UserError(
            f"{len(lazy)} lazy module(s) of the model are not initialised yet ({shown}): their "
            "first forward creates their parameters",
            hint="run the model once on an input first (model(x)), then align it",
        )


def _uninitialised(module: torch.nn.Module) -> bool:
    lazy = isinstance(module, torch.nn.modules.lazy.LazyModuleMixin)
    return lazy and any(isinstance(p, UninitializedParameter) for p in module._parameters.values())


def _align(
    model: torch.nn.Module, first: Sample, samples: Iterable[Any], options: AlignOptions
) -> Report:
    """:func:`align` once its options are built: the stage sequence."""
    start = time.perf_counter()
    with (
        torch_threads(),  # bounded by the CPUs other work leaves free (fxalign.threads)
        _without_grad_for_inference_weights(model),
        _eval_mode(model, options.train),
        _kept_state(model) as state,
        _workdir(options) as wd,
    ):
        if options.plain_first and not isinstance(samples, Sequence):
            samples = list(samples)  # a second pass may need them
        kept = samples

        def compared(kind: _SourceKind, opts: AlignOptions) -> Report:
            return _compared(kind, model, first, kept, opts, wd, state)

        if options.plain_first:
            report = _plain_first(compared, options)
        else:
            report = compared(AttachSource if options.attaches else MarkerSource, options)
    report.timings["total"] = time.perf_counter() - start
    drill_into(report, model, first, _drill_options(report, options))  # only with a culprit
    written = _parameter_names(model, state.changed_parameters())
    if written:
        report.notes.append(
            f"the forward writes parameters in place ({', '.join(written)}): fxalign does not "
            "copy parameter values, so each of its runs started from the weights the run "
            "before had left: the values compared may come from different weights (a "
            "divergence can come from that), and the model keeps what the last run wrote"
        )
    return report


def _parameter_names(model: torch.nn.Module, parameters: list[torch.nn.Parameter]) -> list[str]:
    """Qualified names of ``parameters`` in ``model`` (the first name of a shared one)."""
    wanted = {id(p) for p in parameters}
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in wanted:
            names.setdefault(id(p), name)
    return list(names.values())


def _drill_options(report: Report, options: AlignOptions) -> AlignOptions:
    """The options the drill-down re-exports the culprit with.

    The run's, except for a file of the user's: its culprit is exported by the exporter that
    wrote the file (told by its scope information), not by the default one.
    """
    if options.onnx is not None and report.exporter in get_args(Exporter):
        return dataclasses.replace(options, exporter=cast(Exporter, report.exporter))
    return options


_SourceKind = type[AttachSource] | type[MarkerSource]


def _compared(
    kind: _SourceKind,
    model: torch.nn.Module,
    first: Sample,
    samples: Iterable[Any],
    options: AlignOptions,
    workdir: Path,
    state: ModuleState,
) -> Report:
    """Every sample compared through one value source, folded into a report."""
    source: ValueSource = kind(model, options, workdir, state)
    source.prepare(first)
    aggregate = SampleAggregate()
    for index, sample in enumerate(itertools.chain([first], map(as_sample, samples))):
        if index:
            sample.check(model, index)
        aggregate.add(index, source.compare_sample(index, sample))
    facts = source.finish()
    rows = aggregate.rows() if aggregate.count > 1 else _without_stats(aggregate.rows())
    return _report(model, options, rows, facts, aggregate.count)


def _plain_first(
    compared: Callable[[_SourceKind, AlignOptions], Report], options: AlignOptions
) -> Report:
    """The default mode: the plain export attached to first, markers only when it fails.

    An aligned plain export is the answer (the graph the user deploys agrees, module by
    module where its values exist), at about the cost of checking its final output. When it
    breaks tolerance, the marker mode runs for every module's value (those the exporter fused
    too); its report is returned with the plain export's verdict in its notes. Should the
    markers hide the divergence (they change the graph: no fusion, no aliasing through a
    marked value), the plain export's report is returned: it is the deployed graph's. A plain
    export that cannot be attached to (the export fails, the file keeps no module scopes) is
    left to the marker mode, which attributes an export failure to its module.
    """
    unusable: FxalignError | None = None
    try:
        plain = compared(AttachSource, options)
    except RuntimeBackendError:
        raise  # the runtime failed on the deployed graph: its node and module are named
    except (UserError, InternalError) as e:
        # The marker mode says why in its own terms (an export failure at its module, inputs
        # the model cannot take, a scripted module), or answers where this path could not;
        # InternalError is fxalign's own failure on this path.
        logger.info("the plain export was not attached to (%s); using markers", e, exc_info=True)
        unusable = e
    if unusable is not None:  # outside the handler: the marker mode's errors chain no cause
        why = f"the plain export could not be checked first: {unusable.message}"
        try:
            marked = compared(MarkerSource, options.with_markers())
        except FxalignError as e:
            e.add_note(why)
            raise
        marked.notes.insert(0, why)
        return marked
    if plain.passed:
        plain.notes.insert(
            0,
            "checked on the plain export (the graph you deploy): it aligns, so no markers "
            "were needed; attach=False compares every module's value, fused ones included",
        )
        return plain
    try:
        marked = compared(MarkerSource, options.with_markers())
    except (UserError, InternalError) as e:
        logger.info("the marker mode failed (%s); the plain export's report", e, exc_info=True)
        plain.notes.insert(0, f"the marker mode, run for every module's value, failed: {e.message}")
        return plain
    marked.timings.update({f"plain_{k}": v for k, v in plain.timings.items()})
    if marked.passed:
        plain.notes.insert(
            0,
            "the instrumented export aligns where the plain export does not: the markers "
            "change the graph (they block fusions and aliasing through marked values), so "
            "this is the plain export's report",
        )
        return plain
    marked.notes.insert(0, _plain_verdict(plain, marked))
    return marked


def _plain_verdict(plain: Report, marked: Report) -> str:
    """The plain export's verdict, as a note of the marker report."""
    said = "the plain export (the graph you deploy) diverges too"
    row = plain.divergence
    if row is None:
        return f"{said}; no module is named the culprit there"
    culprit = where(row)
    if plain.first_divergence == marked.first_divergence:
        return f"{said}, with the same culprit, {culprit}"
    theirs = "none" if marked.divergence is None else where(marked.divergence)
    return f"{said}; its culprit is {culprit} (markers: {theirs})"


def _report(
    model: torch.nn.Module,
    options: AlignOptions,
    rows: list[Row],
    facts: SourceFacts,
    sample_count: int,
) -> Report:
    first = first_divergence(rows)
    culprit, basis = name_culprit(rows)
    atol, rtol = options.atol, options.rtol
    return Report(
        verdict=options.verdict,
        model=type(model).__name__,
        exporter=facts.exporter or options.exporter,
        atol=DTYPE_TOLERANCES["float32"][0] if atol is None else atol,
        rtol=DTYPE_TOLERANCES["float32"][1] if rtol is None else rtol,
        tolerances={k: dict(v) for k, v in options.tolerances.items()},
        dtype_tolerances=atol is None or rtol is None,
        rows=rows,
        first_divergence=None if culprit is None else culprit.name,
        first_seen=None if first is None else first.name,
        culprit_basis=basis,
        instrumentation=facts.method,
        instrumentation_note=facts.method_note,
        coverage=facts.coverage,
        notes=facts.notes,
        exporter_warnings=facts.exporter_warnings,
        fidelity=facts.fidelity,
        timings=facts.timings,
        versions=_versions(),
        sample_count=sample_count,
    )


def _without_stats(rows: list[Row]) -> list[Row]:
    for row in rows:
        row.samples = None
    return rows


def _versions() -> dict[str, str]:
    return dict(_installed_versions())


@functools.cache
def _installed_versions() -> tuple[tuple[str, str], ...]:
    """The versions a report records, looked up once a process (a scan of site-packages)."""
    out = []
    for dist in ("fxalign", "torch", "onnx", "onnxruntime", "onnxscript", "onnx-graphsurgeon"):
        try:
            out.append((dist, importlib.metadata.version(dist)))
        except importlib.metadata.PackageNotFoundError:
            out.append((dist, "unknown"))
    return tuple(out)


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
            stacklevel=6,
        )
        model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _without_grad_for_inference_weights(
    model: torch.nn.Module,
) -> contextlib.AbstractContextManager[Any]:
    """``no_grad`` for a model whose weights were made under ``inference_mode``.

    :func:`align` runs outside ``inference_mode`` (markers need version counters); with grad
    mode on, an inference tensor that requires grad cannot take part in an operator autograd
    records (the TorchScript exporter's trace raised on the first Linear). Other models keep
    the caller's grad mode.
    """
    if has_inference_weights(model):
        return torch.no_grad()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _kept_state(model: torch.nn.Module) -> Iterator[ModuleState]:
    """Snapshot every module of ``model``; put them all back however the block ends."""
    state = ModuleState.snapshot(model.modules())
    try:
        yield state
    finally:
        state.restore()


@contextlib.contextmanager
def _workdir(options: AlignOptions) -> Iterator[Path]:
    """The work folder: a private temporary one, or ``options.workdir`` checked up front."""
    if options.workdir is None:
        with tempfile.TemporaryDirectory(prefix="fxalign-") as tmp:
            yield Path(tmp)
        return
    path = options.workdir
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
    if not options.overwrite:
        names = ("export.onnx", "debug.onnx", "plain.onnx", "attach.onnx")
        existing = [str(path / n) for n in names if (path / n).exists()]
        if existing:
            raise UserError(
                f"{existing} already exist",
                hint="pass overwrite=True (--overwrite) or another workdir",
            )
    yield path
