"""The marker source: instrument, export, extract, then compare each sample on the debug model.

::

    prepare:  instrument -> run_torch (sample 0) -> export -> extract -> debug.onnx
    sample:   run_torch (a copy of the inputs) + run the debug model (loaded once) -> compare
              -> local errors; with ``max_outputs_per_run``, one batch of whole calls at a time
    finish:   fidelity (optional: plain export vs debug model), coverage, located warnings

Every run starts from the user's model state (see :mod:`fxalign.state`) and gets its own copy of
the inputs (:meth:`fxalign.samples.Sample.fresh`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from fxalign.backends import OrtRunner, Runner, Session, load_model, onnx_feeds, run_onnx
from fxalign.compare import compare, row_order
from fxalign.errors import InputError, RuntimeBackendError
from fxalign.export import ExportResult, export, export_plain
from fxalign.extract import ExtractResult, extract
from fxalign.fidelity import measure as measure_fidelity
from fxalign.instrument import instrument_model
from fxalign.instrument.result import InstrumentResult
from fxalign.instrument.wrappers import instrument_eager
from fxalign.local import Rerun, call_replay, fill_local_errors
from fxalign.markers import cut_markers
from fxalign.names import CallId, MarkerName
from fxalign.options import AlignOptions
from fxalign.report.model import Fidelity, Row
from fxalign.samples import Sample
from fxalign.sources.base import SourceFacts
from fxalign.sources.facts import coverage, located_failure, located_warnings
from fxalign.state import ModuleState
from fxalign.torch_run import TorchRun, run_torch_captured

__all__ = ["FUSION_NOTE", "MarkerSource"]

FUSION_NOTE = (
    "markers sit between ops, so exporter and runtime fusions across module boundaries "
    "(e.g. Conv+BatchNorm) do not happen in the debug model: it is not byte-for-byte the "
    "deployed model"
)

_Batch = tuple[list[MarkerName], dict[MarkerName, str]]


def _with_numbers(
    values: Mapping[MarkerName, np.ndarray], numbers: Mapping[MarkerName, int | float | bool]
) -> dict[MarkerName, np.ndarray]:
    """``values`` with each number as an array, right after its call's other output leaves.

    Example:
        >>> from torch.utils._pytree import SequenceKey
        >>> a, leaf = np.zeros(1), lambda i: (SequenceKey(i),)
        >>> h = MarkerName("p", 0, leaf(1))
        >>> out = _with_numbers({MarkerName("p", 0, leaf(0)): a, MarkerName("q"): a}, {h: 4})
        >>> [str(n) for n in out], int(out[h])
        (['p[0]', 'p[1]', 'q'], 4)
    """
    order = list(values)
    for name in numbers:
        same = [i for i, n in enumerate(order) if n.call == name.call and not n.is_input]
        order.insert(same[-1] + 1 if same else len(order), name)
    return {n: values[n] if n in values else np.asarray(numbers[n]) for n in order}


def _same(constants: list[Any], first: Sample) -> bool:
    try:
        return bool(constants == _constants(first))
    except Exception:  # values whose == is not a bool (arrays): not provably the same
        return False


def _constants(sample: Sample) -> list[Any]:
    """The non-tensor inputs of a sample, in order (what torch.fx fixes when it traces)."""
    leaves = pytree.tree_leaves((sample.args, sample.kwargs))
    return [leaf for leaf in leaves if not isinstance(leaf, torch.Tensor)]


class _Prefetch:
    """ONNX values asked for in execution order, fetched ``limit`` tensors at a time.

    The rerun of :func:`fxalign.local.fill_local_errors` asks for each marker's value in the
    order the markers ran; with ``max_outputs_per_run`` the debug model computes the next batch
    when the rerun reaches it, so one batch of values is held at a time, as when comparing.
    """

    def __init__(
        self,
        order: Sequence[MarkerName],
        tensors: Mapping[MarkerName, str],
        feeds: Mapping[str, np.ndarray],
        run: Callable[[Mapping[str, np.ndarray], Sequence[str]], Mapping[str, np.ndarray]],
        limit: int | None,
    ) -> None:
        self.order = [n for n in order if n in tensors]
        self.position = {n: i for i, n in enumerate(self.order)}
        self.tensors, self.feeds, self.run = tensors, feeds, run
        self.limit = max(1, limit or len(self.order))
        self.cache: dict[MarkerName, np.ndarray] = {}

    def __call__(self, name: MarkerName) -> np.ndarray | None:
        if name not in self.position:
            return None
        if name not in self.cache:
            start = self.position[name]
            batch = self.order[start : start + self.limit]
            fetch = list(dict.fromkeys(self.tensors[n] for n in batch))
            raw = self.run(self.feeds, fetch)
            self.cache = {n: raw[self.tensors[n]] for n in batch}
        return self.cache[name]


class MarkerSource:
    """ONNX values from a debug model: the model re-exported with a marker after every module.

    Args:
        model: The user's model (left as it was: runs start from ``state``).
        options: The run's options.
        workdir: Where ``export.onnx``, ``debug.onnx`` (and ``plain.onnx``) are written.
        state: The user's model state, put back before every run.
    """

    def __init__(
        self, model: torch.nn.Module, options: AlignOptions, workdir: Path, state: ModuleState
    ) -> None:
        self.model, self.options, self.workdir = model, options, workdir
        self._user_state = state
        self._copies: ModuleState | None = None
        self.runner: Runner = options.runner or OrtRunner(options.providers)
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []
        self.seen: dict[MarkerName, None] = {}
        self.without_tensors: list[CallId] = []
        self._session: Session | None = None
        self._first_run: TorchRun | None = None
        self._first_sample: Sample | None = None
        self._first_outputs: list[np.ndarray] = []
        self.cut: dict[MarkerName, str] = {}
        self._eager: torch.nn.Module | None = None
        self._copies_eager = ModuleState.snapshot([])

    # ---- preparing -------------------------------------------------------------------------
    @property
    def paths(self) -> tuple[Path, Path, Path]:
        """``export.onnx``, ``debug.onnx`` and ``plain.onnx`` in the work folder."""
        wd = self.workdir
        return wd / "export.onnx", wd / "debug.onnx", wd / "plain.onnx"

    def _lap(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - since
        return now

    def _restore(self) -> None:
        """Put the user's model and the instrumented copies back as they were."""
        self._user_state.restore()
        if self._copies is not None:
            self._copies.restore()

    def prepare(self, sample: Sample) -> None:
        """Instrument, run PyTorch on sample 0, export, extract and save the debug model."""
        opts = self.options
        exported_path, debug_path, _ = self.paths
        t = time.perf_counter()
        fresh = sample.fresh()
        self.result: InstrumentResult = instrument_model(
            self.model, fresh.args, fresh.kwargs, granularity=opts.granularity, local=opts.local
        )
        t = self._lap("instrument", t)
        # Every run from here on starts from the user's state, the instrumented copies' too.
        self._user_state.restore()
        self._copies = ModuleState.snapshot(self.result.module.modules())
        # With a memory bound, values are captured a batch at a time later: names only here.
        self._first_run = self._run_torch(
            sample, only=None if opts.max_outputs_per_run is None else ()
        )
        self._first_sample = sample
        t = self._lap("run_torch", t)
        fresh = sample.fresh()
        self._restore()
        self.cut = dict(self._first_run.cut)
        with cut_markers(self.cut):
            self.exported: ExportResult = export(
                self.result.module,
                fresh.args,
                exported_path,
                kwargs=fresh.kwargs,
                exporter=opts.exporter,
                **dict(opts.export_kwargs),
            )
        t = self._lap("export", t)
        self.extracted: ExtractResult = extract(self.exported.path, self.exported.aliases)
        # Next to export.onnx: the debug model shares its external data file, if it has one.
        self.extracted.save(debug_path)
        self.graph_outputs = [o.name for o in self.extracted.model.graph.output]
        self._lap("extract", t)

    def _run_torch(self, sample: Sample, only: Sequence[MarkerName] | None) -> TorchRun:
        fresh = sample.fresh()
        self._restore()
        module = self._module_for(sample)
        return run_torch_captured(module, fresh.args, fresh.kwargs, only=only)

    def _module_for(self, sample: Sample) -> torch.nn.Module:
        """The instrumented module that can run ``sample`` as the model would.

        torch.fx fixes non-tensor inputs (a Python float, a flag) to sample 0's values; a
        sample with other ones runs on eager wrappers (same marker names), so that PyTorch
        computes what the model computes and the comparison shows what the export baked in.
        """
        first = self._first_sample
        if first is None or self.result.method == "eager" or _same(_constants(sample), first):
            return self.result.module
        if self._eager is None:
            opts = self.options
            self._eager = instrument_eager(self.model, opts.granularity, opts.local)
            self._copies_eager = ModuleState.snapshot(self._eager.modules())
        self._copies_eager.restore()
        return self._eager

    # ---- one sample ------------------------------------------------------------------------
    def compare_sample(self, index: int, sample: Sample) -> list[Row]:
        """Rows of sample ``index`` (sample 0 reuses the PyTorch run made by :meth:`prepare`)."""
        start = time.perf_counter()
        run = self._first_run if index == 0 else None
        self._first_run = None
        feeds = self._feeds(index, sample)
        limit = self.options.max_outputs_per_run
        batched = limit is not None
        if run is None:
            run = self._run_torch(sample, only=() if batched else None)
        value_of: Callable[[MarkerName], np.ndarray | None]
        if batched:
            named, outputs = self._compare_in_batches(index, sample, run, feeds)
            value_of = _Prefetch(
                run.names, self._onnx_tensors(run.names), feeds, self._run_onnx, limit
            )
        else:
            raw = self._run_onnx(feeds, self.graph_outputs)
            named, values = self._rows(index, run, run.values, raw, self.extracted.tensor_of, True)
            outputs = [raw[name] for name in self.extracted.output_names]
            value_of = values.get
        rows = [row for _, row in named]
        if self.options.local:
            start_local = time.perf_counter()
            self._introduced(sample, run, named, value_of)
            self._lap("local", start_local)
        else:
            for row in rows:
                if row.kind != "output":
                    row.local_note = "not computed (local=False)"
        self._explain_cuts(named, run)
        if index == 0:
            self._first_outputs = outputs
        self._lap("run_onnx", start)  # the whole per-sample stage; "compare" is its part
        return rows

    def _feeds(self, index: int, sample: Sample) -> dict[str, np.ndarray]:
        try:
            return onnx_feeds(
                self.extracted.model,
                sample.args,
                sample.kwargs,
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
                    self.runner,
                    str(self.paths[1]),
                    max_outputs_per_run=self.options.max_outputs_per_run,
                )
            return self._session.run(feeds, names)
        except RuntimeBackendError as e:
            raise located_failure(e, self.extracted) from e

    def _rows(
        self,
        index: int,
        run: TorchRun,
        torch_all: Mapping[MarkerName, np.ndarray],
        raw: Mapping[str, np.ndarray],
        tensor_of: Mapping[MarkerName, str],
        final: bool,
    ) -> tuple[list[tuple[MarkerName, Row]], dict[MarkerName, np.ndarray]]:
        """Compare the markers of ``tensor_of`` (and, if ``final``, the model's outputs).

        Returns:
            The rows by marker name, and the ONNX values compared (input markers included).
        """
        opts = self.options
        start = time.perf_counter()
        onnx_values = {marker: raw[tensor] for marker, tensor in tensor_of.items()}
        onnx_names = dict(tensor_of)
        torch_values = {
            n: v for n, v in torch_all.items() if not n.is_input and (final or n.module_path)
        }
        if final:
            self._pair_final_outputs(index, torch_values, raw, onnx_values, onnx_names)
        onnx_outputs = {n: v for n, v in onnx_values.items() if not n.is_input}
        numbers = {
            n: run.numbers[n] for n in onnx_outputs if n not in torch_values and n in run.numbers
        }
        if numbers:  # a tracer's tensor where PyTorch returned a number: compare the number
            torch_values = _with_numbers(torch_values, numbers)
        rows = compare(
            torch_values,
            onnx_outputs,
            atol=opts.atol,
            rtol=opts.rtol,
            tolerances=opts.tolerances,
            verdict=opts.verdict,
            torch_dtypes=run.dtypes,
            module_types=self.result.module_types,
            leaf_paths=self.result.leaf_paths,
            onnx_names=onnx_names,
            onnx_nodes=self.extracted.producer_of,
        )
        named = list(zip(row_order(torch_values, onnx_outputs), rows, strict=True))
        for name, row in named:
            if name in numbers:
                row.notes.append(
                    f"a Python {type(numbers[name]).__name__} in PyTorch, a tensor under the "
                    "exporter's tracer: compared as that number"
                )
        self.seen.update(dict.fromkeys(torch_values))
        self.without_tensors.extend(n for n in run.without_tensors if n not in self.without_tensors)
        self._lap("compare", start)
        return named, onnx_values

    def _introduced(
        self,
        sample: Sample,
        run: TorchRun,
        named: list[tuple[MarkerName, Row]],
        value_of: Callable[[MarkerName], np.ndarray | None],
    ) -> None:
        """Every row's introduced error: one rerun with every marker answering from ONNX."""
        module = self._module_for(sample)

        def rerun() -> Any:
            fresh = sample.fresh()
            self._restore()
            try:
                return module(*fresh.args, **fresh.kwargs)
            finally:
                self._restore()

        names = [n for n in run.names if n.module_path or n.is_input]
        inputs = {call: record.inputs for call, record in run.calls.items()}
        replay = call_replay(module, run.calls, value_of)
        plan = Rerun(rerun, names, inputs, run.parents, replay)
        fill_local_errors(
            named, plan, value_of, self.options.verdict, which=self.options.local_rows
        )

    def _onnx_tensors(self, run_names: Sequence[MarkerName]) -> dict[MarkerName, str]:
        """``marker name -> ONNX tensor`` of every marker and final output the ONNX side has."""
        tensors = dict(self.extracted.tensor_of)
        finals = [n for n in run_names if not n.module_path and not n.is_input]
        if len(finals) == len(self.extracted.output_names):
            tensors.update(zip(finals, self.extracted.output_names, strict=True))
        return tensors

    def _explain_cuts(self, named: list[tuple[MarkerName, Row]], run: TorchRun) -> None:
        """Say on each row why a marker the export left out has no ONNX value."""
        if not self.cut:
            return
        for name, row in named:
            why = self.cut.get(name)
            if why is not None and row.status == "missing_in_onnx":
                row.notes = [f"no marker in the export: {why}"]  # not a value the export lost
            elif why is not None:
                row.notes.append(f"no marker in the export: {why}")
            record = run.calls.get(name.call)
            if record is None or row.local is not None:
                continue
            cut_inputs = [self.cut[i] for i in record.inputs if i in self.cut]
            if cut_inputs:
                row.local_note = f"no ONNX value of this call's input: {cut_inputs[0]}"

    def _pair_final_outputs(
        self,
        index: int,
        torch_values: Mapping[MarkerName, np.ndarray],
        raw: Mapping[str, np.ndarray],
        onnx_values: dict[MarkerName, np.ndarray],
        onnx_names: dict[MarkerName, str],
    ) -> None:
        """Pair the model's final outputs with the debug model's original graph outputs."""
        output_names = self.extracted.output_names
        torch_outputs = [n for n in torch_values if not n.module_path]
        if len(torch_outputs) == len(output_names):
            for name, tensor in zip(torch_outputs, output_names, strict=True):
                onnx_values[name] = raw[tensor]
                onnx_names[name] = tensor
        elif index == 0:
            self.notes.append(
                f"the model returns {len(torch_outputs)} tensor(s) but the ONNX graph has "
                f"{len(output_names)} output(s); final outputs were not compared"
            )

    def _batches(self, run: TorchRun) -> list[_Batch]:
        """Whole calls (with their inputs' values) cut into batches of about K ONNX values."""
        limit = self.options.max_outputs_per_run
        assert limit is not None
        tensor_of = self.extracted.tensor_of
        batches: list[_Batch] = []
        names: list[MarkerName] = []
        needed: dict[MarkerName, str] = {}
        previous_call = None
        for name in run.names:
            if name.is_input or not name.module_path:
                continue
            wanted = {name: tensor_of[name]} if name in tensor_of else {}
            record = run.calls.get(name.call)
            if self.options.local and record is not None:
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
        return batches

    def _compare_in_batches(
        self, index: int, sample: Sample, run: TorchRun, feeds: Mapping[str, np.ndarray]
    ) -> tuple[list[tuple[MarkerName, Row]], list[np.ndarray]]:
        """Compare a batch of module calls at a time, keeping one batch of values alive.

        Each batch holds whole calls (with, for the local error, their inputs' ONNX values)
        and at most ``max_outputs_per_run`` ONNX values unless one call needs more. For each
        batch the debug model computes just those values and PyTorch reruns the model keeping
        just those markers, so neither side ever holds all values. Deterministic kernels give
        the values, and so the rows, a single run gives.
        """
        batches = self._batches(run)
        named: list[tuple[MarkerName, Row]] = []
        outputs: list[np.ndarray] = []
        for number, (batch_names, batch_tensors) in enumerate(batches):
            final = number == len(batches) - 1
            fetch = list(dict.fromkeys(batch_tensors.values()))
            if final:
                fetch.extend(n for n in self.extracted.output_names if n not in fetch)
            raw = self._run_onnx(feeds, fetch)
            torch_run = self._run_torch(sample, only=batch_names)
            named.extend(self._rows(index, run, torch_run.values, raw, batch_tensors, final)[0])
            if final:
                outputs = [raw[name] for name in self.extracted.output_names]
            del raw, torch_run
        return named, outputs

    # ---- the end ---------------------------------------------------------------------------
    def finish(self) -> SourceFacts:
        """Release the debug model; measure fidelity if asked; gather the report's facts."""
        self._session = None
        fidelity = None
        if self.options.fidelity and self._first_sample is not None:
            start = time.perf_counter()
            fidelity = self._fidelity(self._first_sample)
            self._lap("fidelity", start)
        notes = [FUSION_NOTE if fidelity is None else fidelity.summary(), *self.notes]
        return SourceFacts(
            method=self.result.method,
            method_note=self.result.fx_error,
            coverage=coverage(self.result, self.seen, self.without_tensors),
            notes=notes,
            exporter_warnings=located_warnings(self.model, self.exported),
            fidelity=fidelity,
            timings=dict(self.timings),
        )

    def _fidelity(self, sample: Sample) -> Fidelity:
        """Export the plain model, run it, and compare it with the debug model."""
        opts = self.options
        _, debug_path, plain_path = self.paths
        fresh = sample.fresh()
        self._restore()
        plain = export_plain(
            self.model,
            fresh.args,
            plain_path,
            fresh.kwargs,
            opts.exporter,
            dict(opts.export_kwargs),
        )
        feeds = onnx_feeds(plain.path, sample.args, sample.kwargs, forward=self.model.forward)
        outputs = run_onnx(plain.path, feeds, opts.providers, runner=opts.runner)
        return measure_fidelity(
            plain.path,
            debug_path,
            list(outputs.values()),
            self._first_outputs,
            providers=opts.providers,
            plain_export_seconds=plain.seconds,
        )
