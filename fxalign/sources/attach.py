"""The attach source: compare the user's own ONNX file, unchanged, with the eager model.

No markers and no re-export: the eager model runs with forward hooks on every module, the
file's module scopes say which tensor holds each module's output (:mod:`fxalign.attach`), and a
copy of the file with those tensors promoted to graph outputs is loaded once::

    prepare:  [export-and-attach: export_plain -> workdir/plain.onnx, or kept in memory]
              capture_calls (sample 0) -> locate in the file -> promoted copy -> load once
    sample:   capture_calls (a copy of the inputs) + run the loaded copy -> compare
              -> local errors: each call whose inputs are located is rerun eagerly on them
    finish:   coverage from the location, the file, its exporter, "N of M modules located"

The copy is the file's graph with more outputs; its weights are the file's own. ONNX Runtime
gets the copy's graph in memory and reads every weight from the file: its external data from
the file's folder, its inline weights from the file itself at their offsets in it
(:func:`~fxalign.modelio.load_graph`: they are neither parsed nor copied here), so nothing is
written. With a work folder given the file is read whole and its inline weights reach the
runtime as arrays (:func:`~fxalign.backends.weightless`).
A runner that only loads files gets the copy on disk: beside the file when they share external
data (ONNX Runtime reads it only from the folder of the model it loads), for as long as the
runner takes to load it, and in the work folder otherwise. The file itself is never written.
A module without nodes paired with the tensor its input is in (the values said so) and breaking
tolerance there is the culprit unless the file's nodes reading that tensor took its computation
up: they are replayed on its input and on its output in a copy whose reads of the tensor take
inputs (:func:`~fxalign.attach.promote.fed_readers`), loaded as the promoted copy is.
Rows are named as the marker path names them (:class:`~fxalign.names.MarkerName`) and come in
the same order (calls in the order they return); a module whose output is no distinct
value of the file has a row saying where it went (``fused into blocks.0.bn``), never a guess.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import operator
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import torch

from fxalign.attach import (
    CallCapture,
    Location,
    ModuleCall,
    capture_calls,
    hooks_in_scope,
    locate_captured,
    module_parameters,
    promoted,
)
from fxalign.attach.promote import external_data_files, fed_readers
from fxalign.backends import (
    OrtRunner,
    Runner,
    Session,
    can_load_weightless,
    load_model,
    load_weightless,
    onnx_feeds,
    weightless,
)
from fxalign.compare import compare, dtype_eps, row_order
from fxalign.errors import InputError, InternalError, RuntimeBackendError, UserError
from fxalign.export import export_plain
from fxalign.extract import locate_failure
from fxalign.instrument.result import module_facts
from fxalign.instrument.wrappers import is_opaque
from fxalign.local import fill_local_errors
from fxalign.modelio import load_graph, save_model
from fxalign.names import MarkerName
from fxalign.options import AlignOptions
from fxalign.report.model import Coverage, Row
from fxalign.samples import Sample
from fxalign.sources.attach_local import CallKey, Plans, ValuePlan, hooked_rerun
from fxalign.sources.base import SourceFacts
from fxalign.sources.facts import CONTAINER_NOTE, ancestors, failure_at, is_container, owning_leaf
from fxalign.state import ModuleState
from fxalign.torch_run import to_numpy

__all__ = ["ATTACHED_COPY", "PLAIN_EXPORT", "AttachSource", "completion_order"]

logger = logging.getLogger(__name__)

ATTACHED_COPY = "attach.onnx"
"""The promoted copy in the work folder (a file without external data)."""

REPLAY_COPY = "replay.onnx"
"""A copy whose reads of one tensor take inputs (:func:`~fxalign.attach.promote.fed_readers`),
for a runner that loads only files: those nodes replayed on values of fxalign's choosing."""

_READS = 8
"""At most this many nodes reading one tensor are replayed read by read (:meth:`_taken_up`)."""

PLAIN_EXPORT = "plain.onnx"
"""The default mode's plain export in the work folder (``export.onnx`` is the marker mode's)."""

SCRIPTED_NOTE = "scripted (torch.jit): its calls take no forward hooks; compared within its caller"
"""Coverage note of a ``torch.jit.script`` submodule: the hooks cannot see its calls."""


def _plans(location: Location) -> tuple[Plans, Plans]:
    """Per call, its outputs' and its inputs' plans, in the order the capture lists leaves."""
    outputs: Plans = {}
    inputs: Plans = {}
    for call in location.calls:
        key = (call.path, call.call_index)
        outputs[key] = [
            ValuePlan(v.tensor, v.reason, v.node or None, v.candidate, v.as_is, v.fused_into)
            for v in call.outputs
        ]
        inputs[key] = [ValuePlan(i.tensor, i.reason, None, i.candidate) for i in call.inputs]
    return outputs, inputs


def completion_order(capture: CallCapture) -> list[ModuleCall]:
    """The calls in the order they returned (the order the marker path records outputs)."""
    children: dict[int | None, list[ModuleCall]] = {}
    for call in capture.calls:
        children.setdefault(call.parent, []).append(call)
    out: list[ModuleCall] = []
    stack: list[tuple[ModuleCall, bool]] = [(c, False) for c in reversed(children.get(None, []))]
    while stack:
        call, expanded = stack.pop()
        if expanded:
            out.append(call)
            continue
        stack.append((call, True))
        stack.extend((c, False) for c in reversed(children.get(call.index, [])))
    return out


class AttachSource:
    """ONNX values from the user's own file (or fxalign's plain export of the model).

    Args:
        model: The user's model (left as it was: every run starts from ``state``).
        options: The run's options; ``options.onnx`` is the file, or ``None`` to export the
            model plainly into ``workdir`` first (export-and-attach).
        workdir: The work folder.
        state: The user's model state, put back before and after every run and replay.
    """

    def __init__(
        self, model: torch.nn.Module, options: AlignOptions, workdir: Path, state: ModuleState
    ) -> None:
        self.model, self.options, self.workdir = model, options, workdir
        self._state = state
        self.runner: Runner = options.runner or OrtRunner(options.providers)
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []
        self.seen: dict[str, None] = {}
        self._session: Session | None = None
        self._first_capture: CallCapture | None = None
        self._hooks_in_scope = True  # the file's scoping of hooks, read in prepare()
        self._input_names: list[str] | None = None
        self._paired_by_value: set[str] = set()  # modules whose candidate a sample settled
        self._taken_up_paths: dict[str, str] = {}  # modules their readers took up -> why
        facts = module_facts(model)
        self.module_types, self.leaf_paths = facts.module_types, facts.leaf_paths
        # Modules a leaf calls (a parametrization computing a conv's weight) get no row, as in
        # the marker mode: their values are weights, not the leaf's computation.
        leaves = set(self.leaf_paths)
        self._inside_leaf = {
            p: owner
            for p in self.module_types
            if p and (owner := owning_leaf(p, leaves)) is not None
        }

    @functools.cached_property
    def _modules(self) -> dict[str, torch.nn.Module]:
        """``path -> module`` of the user's model, listed once when first needed."""
        return dict(self.model.named_modules())

    @functools.cached_property
    def _initializers(self) -> dict[str, onnx.TensorProto]:
        """``name -> initializer`` of the file, listed once when first needed."""
        return {t.name: t for t in self.graph.graph.initializer}

    def _lap(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - since
        return now

    # ---- preparing -------------------------------------------------------------------------
    def prepare(self, sample: Sample) -> None:
        """Export (export-and-attach only), capture sample 0, locate, promote and load."""
        t = time.perf_counter()
        path, exported = self.options.onnx, None
        if path is None:
            path, exported = self._export_plain(sample)
            t = self._lap("export", t)
        self.path = Path(path)
        if exported is not None:
            self.graph = exported
        else:  # weights the runtime will read from the file itself are not parsed here
            self.graph = _read(self.path, weights=not self._from_memory())
            _check_external_data(self.graph, self.path)
        self._hooks_in_scope = hooks_in_scope(self.graph)
        self._first_capture = self._capture(sample)
        t = self._lap("run_torch", t)
        self.location = locate_captured(
            self._first_capture, self.graph, module_parameters(self.model), str(self.path)
        )
        unpaired = self.location.outputs_unpaired
        if unpaired is not None:
            if self.options.onnx is None:
                raise InternalError(f"fxalign's plain export: {unpaired}")
            raise UserError(
                f"{self._shown()}: {unpaired}",
                hint="align the model the file was exported from, called as it was exported "
                "(or a wrapper of it that returns what the file returns)",
            )
        self.output_plans, self.input_plans = _plans(self.location)
        self.fetch = list(
            dict.fromkeys([o.name for o in self.graph.graph.output] + self.location.tensor_names())
        )
        t = self._lap("locate", t)
        self._session = self._load()
        self._lap("load", t)

    def _export_plain(self, sample: Sample) -> tuple[Path, onnx.ModelProto | None]:
        """export-and-attach: the model exported as deployed, with the user's export options.

        Returns the file and, when the exporter made it in memory, the model itself (not
        written at all into a temporary work folder: nobody would read it).
        """
        opts = self.options
        fresh = sample.fresh()
        self._state.restore()
        try:
            result = export_plain(
                self.model,
                fresh.args,
                self.workdir / PLAIN_EXPORT,
                fresh.kwargs,
                opts.exporter,
                dict(opts.export_kwargs),
                write=opts.workdir is not None,
            )
        finally:
            self._state.restore()
        self._input_names = list(result.input_names)
        return Path(result.path), result.model

    def _capture(self, sample: Sample) -> CallCapture:
        fresh = sample.fresh()
        self._state.restore()
        return capture_calls(  # puts the state back
            self.model, fresh.args, fresh.kwargs, self._state, hooks_in_scope=self._hooks_in_scope
        )

    def _load(self) -> Session:
        """Load a copy of the file with the located tensors promoted to outputs, once.

        A runner that loads models from memory gets the copy's graph, and reads the file's
        weights from the file itself, inline ones at their offsets in it (nothing written: no
        copy of the weights, no file beside the user's). With a work folder given, the file
        is read whole instead, and a copy without external data is also kept there
        (``attach.onnx``); runners that load only files, and a memory bound, load a copy on
        disk.
        """
        names = self.location.tensor_names()
        return self._load_copy(lambda graph: promoted(graph, names), ATTACHED_COPY, kept=True)

    def _load_copy(
        self, edit: Callable[[onnx.ModelProto], onnx.ModelProto], file_name: str, *, kept: bool
    ) -> Session:
        """Load ``edit``'s copy of the file's graph, its weights the file's own (see _load).

        ``kept``: with a work folder given, the copy is also written there as ``file_name``.
        """
        opts = self.options
        try:
            if self._loads_from_memory():
                if kept and opts.workdir is not None and not external_data_files(self.graph):
                    save_model(edit(self.graph), self.workdir / file_name)
                model = weightless(self.graph, folder=str(self.path.parent), name=self._shown())
                model = dataclasses.replace(model, graph=edit(model.graph))
                return load_weightless(self.runner, model)
            with self._copy_on_disk(edit(self.graph), file_name) as copy_path:
                return load_model(
                    self.runner, copy_path, max_outputs_per_run=opts.max_outputs_per_run
                )
        except RuntimeBackendError as e:
            raise self._located_failure(e) from e

    def _loads_from_memory(self) -> bool:
        """Whether the runner gets the promoted copy from memory (no memory bound asked)."""
        return self.options.max_outputs_per_run is None and can_load_weightless(self.runner)

    def _from_memory(self) -> bool:
        """Whether the runner gets the promoted copy from memory, and nothing is kept on disk.

        Then an inline weight of the user's file is read by the runtime from the file itself
        (:func:`~fxalign.modelio.load_graph`), never parsed nor copied here.
        """
        return self.options.workdir is None and self._loads_from_memory()

    def _shown(self) -> str:
        """The file as messages name it."""
        if self.options.onnx is not None or self.options.workdir is not None:
            return str(self.path)
        return "fxalign's plain export"

    @contextlib.contextmanager
    def _copy_on_disk(self, copy: onnx.ModelProto, file_name: str) -> Iterator[str]:
        """Where the runner can load ``copy``: beside the file if it shares its external data.

        Else ``file_name`` in the work folder.
        """
        if not external_data_files(copy):
            target = self.workdir / file_name
            onnx.save_model(copy, str(target))
            yield str(target)
            return
        folder = self.path.parent
        try:
            fd, name = tempfile.mkstemp(
                prefix=f".{self.path.stem}.fxalign-", suffix=".onnx", dir=folder
            )
        except OSError as e:
            raise UserError(
                f"cannot write the promoted copy of {str(self.path)!r} beside it in "
                f"{str(folder)!r}: {e.strerror or e}",
                hint="ONNX Runtime reads external data only from the folder of the model it "
                "loads; copy the model and its data into a folder you can write to",
            ) from e
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(copy.SerializeToString())
            yield name
        finally:
            with contextlib.suppress(OSError):
                os.unlink(name)

    def _located_failure(self, error: RuntimeBackendError) -> RuntimeBackendError:
        """The runtime's error, naming the node of the file, its module call and source line."""
        node, op_type, _ = locate_failure(self.graph, error.message, {})
        if node is None:
            return error
        origin = self.location.nodes.get(node)
        if origin is None:
            return failure_at(error, node, op_type, None)
        return failure_at(error, node, op_type, origin.call, origin.source)

    # ---- one sample ------------------------------------------------------------------------
    def compare_sample(self, index: int, sample: Sample) -> list[Row]:
        """Rows of sample ``index`` (sample 0 reuses the capture :meth:`prepare` made)."""
        start = time.perf_counter()
        capture = self._first_capture if index == 0 else None
        self._first_capture = None
        if capture is None:
            capture = self._capture(sample)
        start = self._lap("run_torch", start)
        raw = self._run_onnx(index, sample)
        start = self._lap("run_onnx", start)
        rows = self._rows(index, sample, capture, raw)
        self._lap("compare", start)
        return rows

    def _run_onnx(self, index: int, sample: Sample) -> Mapping[str, np.ndarray]:
        assert self._session is not None, "prepare() loads the session"
        try:
            feeds = self._feeds(sample)
        except InputError as e:
            if index:
                raise InputError(f"sample {index}: {e.message}", hint=e.hint) from e
            raise
        try:
            return self._session.run(feeds, self.fetch)
        except RuntimeBackendError as e:
            raise self._located_failure(e) from e

    def _feeds(self, sample: Sample) -> dict[str, np.ndarray]:
        """The file's graph inputs fed from ``sample``.

        Raises:
            InputError: The sample does not fit the file's inputs.
        """
        return onnx_feeds(
            self.graph,
            sample.args,
            sample.kwargs,
            forward=self.model.forward,
            input_names=self._input_names,
        )

    def _rows(
        self, index: int, sample: Sample, capture: CallCapture, raw: Mapping[str, np.ndarray]
    ) -> list[Row]:
        """Compare every captured module output with its ONNX value, calls in return order."""
        torch_values: dict[MarkerName, np.ndarray] = {}
        onnx_values: dict[MarkerName, np.ndarray] = {}
        onnx_names: dict[MarkerName, str] = {}
        onnx_nodes: dict[MarkerName, str] = {}
        reasons: dict[MarkerName, str] = {}
        gone: dict[str, str] = {}
        tentative: dict[MarkerName, tuple[ValuePlan, str, tuple[CallKey, int]]] = {}
        places: dict[MarkerName, tuple[str, tuple[CallKey, int]]] = {}
        as_is: dict[MarkerName, np.ndarray] = {}  # the PyTorch input its tensor holds
        for call in completion_order(capture):
            if call.path in self._inside_leaf:
                continue
            key = (call.path, call.call_index)
            plans = self.output_plans.get(key, [])
            for position, leaf in enumerate(call.outputs):
                name = MarkerName(call.path, call.call_index, leaf.path)
                torch_values[name] = to_numpy(leaf.value)
                places[name] = (leaf.value_id, (key, position))
                plan = plans[position] if position < len(plans) else None
                tensor = None if plan is None else plan.tensor
                if plan is not None and tensor is None and plan.candidate in raw:
                    tensor = plan.candidate  # kept if the row passes (_settle)
                    tentative[name] = (plan, leaf.value_id, (key, position))
                if plan is not None and plan.as_is is not None and tensor is not None:
                    as_is[name] = to_numpy(call.inputs[plan.as_is].value)
                if plan is not None and tensor is not None:
                    onnx_values[name] = raw[tensor]
                    onnx_names[name] = tensor
                    if plan.node:
                        onnx_nodes[name] = plan.node
                else:
                    reasons[name] = _no_value(plan, index)
                    gone.setdefault(leaf.value_id, f"{name}'s output: {reasons[name]}")
        if self.options.granularity == "leaf":
            leaves = set(self.leaf_paths)
            torch_values = {
                n: v
                for n, v in torch_values.items()
                if n.module_path in leaves or not n.module_path
            }
        rows = self._compared(torch_values, onnx_values, onnx_names, onnx_nodes)
        named = list(zip(row_order(torch_values, onnx_values), rows, strict=True))
        for name, row in named:
            if name in reasons:
                row.notes = [reasons[name]]
        output_plans, input_plans = self.output_plans, self.input_plans
        if tentative or as_is:
            named, output_plans, input_plans = self._settle(
                (index, sample, capture),
                named,
                tentative,
                _Values(torch_values, onnx_names, places, raw, as_is),
                gone,
            )
            rows = [row for _, row in named]
        if self.options.local:
            start = time.perf_counter()
            rerun, value_of = hooked_rerun(
                self.model,
                self._state,
                capture,
                sample,
                (output_plans, input_plans),
                raw,
                gone,
            )
            opts = self.options
            fill_local_errors(named, rerun, value_of, opts.verdict, which=opts.local_rows)
            for _, row in named:
                if row.introduced_failed and row.module_path:
                    row.notes.extend(self._weights_differ(row.module_path))
            self._lap("local", start)
        else:
            for row in rows:
                if row.kind != "output":
                    row.local_note = "not computed (local=False)"
        self.seen.update(dict.fromkeys(n.module_path for n in torch_values if n.module_path))
        return rows

    def _weights_differ(self, path: str, shown: int = 3) -> list[str]:
        """The module's own weights that the user's file holds with other values, or lacks.

        Asked only of a module whose own code breaks tolerance: a file exported from another
        checkpoint, or from another version of the model, is the first thing to rule out. A
        file's initializer named as the parameter (or buffer) is compared with it: exactly
        when the dtypes agree, within half an ulp of the file's dtype in a converted file.
        When a module left no node in the file and none of its weights is there, by name or
        by value (transposed too), the file most likely lacks the module. Weights the
        exporter rewrote (a BatchNorm folded into a Conv by the TorchScript exporter) are not
        found, so not compared; the note on a missing module says that they may have been.
        """
        if self.options.onnx is None:
            return []  # fxalign exported this model itself: its weights are the model's
        module = self._modules.get(path)
        if module is None:
            return []
        differ, unnamed = [], []
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        own = [(n, w) for n, w in own if w is not None and w.numel()]
        for local_name, weight in own:
            tensor = self._initializers.get(f"{path}.{local_name}")
            mine = to_numpy(weight.detach())
            if tensor is None:
                unnamed.append((f"{path}.{local_name}", mine))
                continue
            value = self._initializer_value(tensor)
            if value is None:
                continue
            if value.shape != mine.shape:
                differ.append(
                    f"{tensor.name!r} (shape {list(value.shape)}, the model's {list(mine.shape)})"
                )
                continue
            gap = _weight_gap(value, mine)
            if gap is not None:
                by = (
                    " (NaN on one side only)"
                    if math.isnan(gap)
                    else ""
                    if math.isinf(gap)
                    else f" (max |diff| {gap:.3g})"
                )
                differ.append(f"{tensor.name!r}{by}")
        notes = []
        if differ:
            verb = "differs" if len(differ) == 1 else "differ"
            notes.append(
                f"the file's {_joined(differ, shown)} {verb} from this model's weights: "
                "the file was exported from another checkpoint, or a tool rewrote them"
            )
        if (
            own
            and len(unnamed) == len(own)
            and path in self.location.nodeless
            and not any(self._held_by_value(mine) for _, mine in unnamed)
        ):
            weights = _listed([n for n, _ in unnamed], shown)
            notes.append(
                f"the file may lack this module: no node of the file is in its scope and "
                f"none of its weights ({weights}) is in the file, by "
                "name or by value: the file was exported from a model without it (another "
                "version of the model), or a tool folded its weights into another node's"
            )
        return notes

    def _initializer_value(self, tensor: onnx.TensorProto) -> np.ndarray | None:
        """An initializer of the user's file as an array (external data read beside it)."""
        try:
            return onnx.numpy_helper.to_array(tensor, base_dir=str(self.path.parent))
        except (OSError, ValueError) as e:
            logger.debug("cannot read %s from the file: %s", tensor.name, e)
            return None

    def _held_by_value(self, mine: np.ndarray) -> bool:
        """Whether an initializer of the file holds ``mine`` (or its transpose), any name."""
        for tensor in self._initializers.values():
            if math.prod(tensor.dims) != mine.size:
                continue
            value = self._initializer_value(tensor)
            if value is None:
                continue
            if value.shape == mine.shape and _weight_gap(value, mine) is None:
                return True
            transposed = mine.ndim == 2 and value.shape == mine.shape[::-1]
            if transposed and _weight_gap(value.T, mine) is None:
                return True
        return False

    def _settle(
        self,
        run: tuple[int, Sample, CallCapture],
        named: list[tuple[MarkerName, Row]],
        tentative: Mapping[MarkerName, tuple[ValuePlan, str, tuple[CallKey, int]]],
        values: _Values,
        gone: dict[str, str],
    ) -> tuple[list[tuple[MarkerName, Row]], Plans, Plans]:
        """Keep each candidate pairing whose row passed; the others become rows without value.

        A module's output whose reader left no node of its own is the tensor leaving its scope
        only if that reader computes nothing in the file (see
        :attr:`~fxalign.attach.LocatedValue.candidate`): compared with it, it is that tensor
        when the row is within tolerance, and the reader's input is then that tensor too.
        The reader's own row, on that tensor, then breaks tolerance: the reader computes
        nothing in the file, or the nodes reading the tensor took its computation up (an
        optimizer merged a ReLU into the Clip after it); :meth:`_taken_up` replays them.
        Returns the rows and this sample's output and input plans, candidates settled.
        """
        index, sample, capture = run
        torch_values = values.torch
        outputs = {key: list(plans) for key, plans in self.output_plans.items()}
        held: dict[str, MarkerName] = {}  # tensor -> the candidate its values settled
        nearer = {
            n: said
            for n, row in named
            if n in tentative
            and not row.passed
            and (said := self._nearer_than_its_reader(n, str(tentative[n][0].candidate), values))
        }
        failed = [n for n, row in named if n in tentative and not row.passed and n not in nearer]
        # the failed ones as rows without value, made in one comparison (nothing to compare)
        without = dict(
            zip(
                failed,
                self._compared({n: torch_values[n] for n in failed}, {}, {}, {}),
                strict=True,
            )
        )
        out = []
        for name, row in named:
            found = tentative.get(name)
            if found is None:
                out.append((name, row))
                continue
            plan, value_id, (key, position) = found
            tensor = plan.candidate
            if name not in without:
                agree = nearer.get(name, "agree with this output within tolerance")
                row.notes.append(
                    "paired by its values: the module reading it left no node of its own, so "
                    f"the tensor leaving its scope ({tensor!r}) is that module's output in the "
                    f"file, and its values {agree}: that module computes nothing there beyond it"
                )
                outputs[key][position] = ValuePlan(tensor)
                held.setdefault(str(tensor), name)
                self._paired_by_value.add(name.module_path)
                out.append((name, row))
                continue
            reason = _no_value(plan, index)
            gone.setdefault(value_id, f"{name}'s output: {reason}")
            without[name].notes = [
                reason,
                f"the values of {tensor!r}, the output in the file of the module reading this "
                "one's, differ from this output",
            ]
            out.append((name, without[name]))
        taken: dict[str, tuple[str, str]] = {}  # value id -> (tensor, why it is not there)
        received = _received(capture)
        decided: dict[tuple[str, str], str | None] = {}  # (tensor, value id) -> why
        for i, (name, row) in enumerate(out):
            read = values.onnx_names.get(name, "")
            if name in tentative or row.passed or row.metrics is None:
                continue
            if read in held:  # its input is the candidate's output
                given = torch_values[held[read]]
            elif name in values.as_is:  # its reader reads its input (LocatedValue.as_is)
                given = values.as_is[name]
            else:
                continue
            value_id, (key, position) = values.places[name]
            if (read, value_id) not in decided:  # a block returning it has the same answer
                fed = (given, torch_values[name])
                tolerance = (row.atol, row.rtol)
                unread = value_id not in received
                decided[read, value_id] = self._taken_up(
                    sample, read, fed, values, tolerance, unread=unread
                )
            why = decided[read, value_id]
            if why is None:
                continue
            (bare,) = self._compared({name: torch_values[name]}, {}, {}, {})
            bare.notes = [why]
            out[i] = (name, bare)
            outputs[key][position] = ValuePlan(None, why)
            gone[value_id] = f"{name}'s output: {why}"
            taken[value_id] = (read, why)
            self._taken_up_paths.setdefault(name.module_path, why)
        inputs = {
            key: [ValuePlan(p.candidate) if p.candidate in held else p for p in plans]
            for key, plans in self.input_plans.items()
        }
        if taken:  # a call reading a taken-up output does not read the tensor in its place
            for call in capture.calls:
                plans = inputs.get((call.path, call.call_index), [])
                for position, leaf in enumerate(call.inputs[: len(plans)]):
                    tensor, reason = taken.get(leaf.value_id, (None, ""))
                    if tensor is not None and plans[position].tensor == tensor:
                        plans[position] = ValuePlan(None, reason)
        return out, outputs, inputs

    def _nearer_than_its_reader(self, name: MarkerName, tensor: str, values: _Values) -> str:
        """Why ``tensor`` is ``name``'s output though its row breaks tolerance, or ``""``.

        The tensor is the output of the module reading ``name``'s (paired with it), and
        ``name``'s too if that module computes nothing in the file. An error that comes in
        before both breaks tolerance for either: the tensor is then ``name``'s when its values
        are nearer ``name``'s output than the reader's (root mean square of the differences).
        """
        value = values.raw.get(tensor)
        own = values.torch[name]
        if value is None or value.shape != own.shape or value.dtype.kind not in "fc":
            return ""
        mine = values.places[name][0]
        rivals = [
            n
            for n, t in values.onnx_names.items()
            if t == tensor and values.places[n][0] != mine and values.torch[n].shape == own.shape
        ]
        if not rivals:
            return ""
        gap = _rms(value, own)
        rival, rival_gap = min(
            ((n, _rms(value, values.torch[n])) for n in rivals), key=operator.itemgetter(1)
        )
        if not gap < rival_gap:
            return ""
        return (
            f"are nearer this output than {rival}'s (root mean square of the differences "
            f"{gap:.3g} vs {rival_gap:.3g}; an error from before breaks tolerance for both)"
        )

    def _taken_up(
        self,
        sample: Sample,
        tensor: str,
        fed: tuple[np.ndarray, np.ndarray],
        values: _Values,
        tolerance: tuple[float, float],
        *,
        unread: bool = False,
    ) -> str | None:
        """Why a module left no node and is not the culprit: its readers took it up, or ``None``.

        ``tensor`` holds the module's input (its values said so); ``fed`` is that input and
        the module's output in PyTorch. The file's nodes reading ``tensor`` are replayed
        (:func:`~fxalign.attach.promote.fed_readers`) up to the nearest tensors paired with a
        module output: once with the input on every read, and once per read with the output
        there (a residual branch reads the input too). If the module computes nothing in the
        file, one of its reads is its output's: fed the output there, they give PyTorch's
        values, nearer than with the input everywhere (the module is then the culprit:
        ``None``). If those nodes took its computation up, the input is what they expect: it
        brings them no further from PyTorch's values than the output on any read, or the
        output changes nothing (within ``tolerance``, ``(atol, rtol)``, the module row's).
        With no paired tensor downstream, only the latter tells. ``unread``: no module
        receives the module's output and the model does not return it, so the nodes may also
        be the caller's code reading the input itself (the output unused): the reason says
        both.
        """
        raw = values.raw
        located = {
            t: values.torch[n]
            for n, t in values.onnx_names.items()
            if t != tensor and raw[t].shape == values.torch[n].shape
        }
        nearest, direct = self._downstream(tensor, located)
        fetch = nearest or direct
        dtype = raw[tensor].dtype
        given, taken = (np.ascontiguousarray(v, dtype=dtype) for v in fed)
        if (
            not fetch
            or given.dtype.kind not in "fc"
            or len(self._consumers.get(tensor, ())) > _READS
        ):
            return None
        try:
            copy: list[str] = []

            def edit(graph: onnx.ModelProto) -> onnx.ModelProto:
                model, reads = fed_readers(graph, tensor, given, fetch)
                copy[:] = reads
                return model

            session = self._load_copy(edit, REPLAY_COPY, kept=False)
            feeds = self._feeds(sample)
            reads = list(copy)
            base = session.run({**feeds, **dict.fromkeys(reads, given)}, fetch)
            each = [
                session.run({**feeds, **dict.fromkeys(reads, given), read: taken}, fetch)
                for read in reads[:_READS]
            ]
        except (RuntimeBackendError, InputError, UserError) as e:
            logger.debug("replaying the readers of %r failed: %s", tensor, e)
            return None
        atol, rtol = tolerance
        unchanged = all(
            np.allclose(base[t], run[t], atol=atol, rtol=rtol, equal_nan=True)
            for run in each
            for t in fetch
        )
        readers = self._reader_names(tensor)
        if unchanged:
            told = "fed this module's output in place of its input, they compute the same values"
        elif nearest:
            gi = max(_gap(base[t], located[t]) for t in nearest)
            go = min(max(_gap(run[t], located[t]) for t in nearest) for run in each)
            if not gi <= go:
                return None
            told = (
                f"fed this module's input rather than its output, the file's nodes from there "
                f"to {_joined([repr(t) for t in nearest], 3)} come no further from PyTorch's "
                f"values (max |diff| {gi:.3g} vs {go:.3g})"
            )
        else:
            return None
        why = (
            f"taken up by the nodes reading {tensor!r} ({readers}): no node of its scope is in "
            f"the file, and {told}: "
        )
        if unread:  # the hooks saw no module read it: code may, or nothing does
            return why + (
                "the exporter's optimizer merged its computation into them, or its output is "
                "unused (no module receives it, the model does not return it, and the "
                "exporter removed the module as dead code)"
            )
        return why + "the exporter's optimizer merged its computation into them"

    def _downstream(
        self, tensor: str, located: Mapping[str, np.ndarray], budget: int = 512
    ) -> tuple[list[str], list[str]]:
        """The nearest ``located`` tensors computed from ``tensor``, and its readers' outputs.

        Breadth first through the main graph's nodes (at most ``budget``); a located tensor
        ends its path.
        """
        consumers = self._consumers
        direct = list(dict.fromkeys(o for n in consumers.get(tensor, ()) for o in n.output if o))
        nearest: list[str] = []
        seen, todo = {tensor}, deque([tensor])
        while todo and budget > 0:
            for node in consumers.get(todo.popleft(), ()):
                budget -= 1
                for o in node.output:
                    if not o or o in seen:
                        continue
                    seen.add(o)
                    if o in located:
                        nearest.append(o)
                    else:
                        todo.append(o)
        return nearest, direct

    def _reader_names(self, tensor: str) -> str:
        """The nodes reading ``tensor``, each with the module call whose scope holds it."""
        named = []
        for node in self._consumers.get(tensor, ())[:3]:
            origin = self.location.nodes.get(node.name)
            scope = f" of {origin.call}" if origin is not None and origin.call else ""
            named.append(f"{node.name or node.op_type}{scope}")
        return ", ".join(named)

    @functools.cached_property
    def _consumers(self) -> dict[str, list[onnx.NodeProto]]:
        """``tensor -> the main graph's nodes reading it``, listed once when first needed."""
        found: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.graph.node:
            for name in dict.fromkeys(node.input):
                if name:
                    found.setdefault(name, []).append(node)
        return found

    def _compared(
        self,
        torch_values: Mapping[MarkerName, np.ndarray],
        onnx_values: Mapping[MarkerName, np.ndarray],
        onnx_names: Mapping[MarkerName, str],
        onnx_nodes: Mapping[MarkerName, str],
    ) -> list[Row]:
        opts = self.options
        # A float16 file's values are float16: the tolerance follows the ONNX value's dtype.
        tolerance_dtypes = {
            n: str(v.dtype)
            for n, v in onnx_values.items()
            if v.dtype in (np.float16,) and n in torch_values
        }
        return compare(
            torch_values,
            {n: v for n, v in onnx_values.items() if n in torch_values},
            atol=opts.atol,
            rtol=opts.rtol,
            tolerances=opts.tolerances,
            verdict=opts.verdict,
            module_types=self.module_types,
            leaf_paths=self.leaf_paths,
            onnx_names=onnx_names,
            onnx_nodes=onnx_nodes,
            tolerance_dtypes=tolerance_dtypes,
        )

    # ---- the end ---------------------------------------------------------------------------
    def finish(self) -> SourceFacts:
        """Release the session; say which file, which exporter, how many modules located."""
        self._session = None
        location = self.location
        if self.options.onnx is not None:
            written = f"the file {str(self.path)!r}"
        elif self.options.workdir is not None:
            written = f"fxalign's plain export {str(self.path)!r}"
        else:  # kept in memory, or in a temporary folder gone when the report is read
            written = "fxalign's plain export"
        coverage = self._coverage()
        # Modules a leaf calls (a parametrization of its weight) count as they get rows: not.
        called = {c.path for c in location.calls if c.path and c.path not in self._inside_leaf}
        note = (
            f"attached to {written} (written by the {location.exporter} "
            f"exporter, {location.producer or 'unknown producer'}): "
            f"{len(coverage.marked)} of {len(called)} modules located, no "
            "markers: the values are those of the deployed graph"
        )
        opts = self.options
        if opts.onnx is not None and opts.exporter_given and opts.exporter != location.exporter:
            self.notes.append(
                f"exporter={opts.exporter!r} was asked, but the {location.exporter} exporter "
                "wrote this file (told by its scope information): its scopes are read as that "
                "exporter writes them, and the culprit's drill-down exports with it"
            )
        return SourceFacts(
            method="attach",
            method_note=None,
            coverage=coverage,
            notes=[note, *self._differences(), *self.notes],
            exporter=location.exporter,
            timings=dict(self.timings),
        )

    def _differences(self, shown: int = 5) -> list[str]:
        """Where the file and the model differ: scopes of one that the other lacks.

        The file's nodes in module scopes the forward never entered; blocks the forward called
        that own weights and left no node in the file (a leaf can: a BatchNorm folded into
        the convolution before it, a fused activation).
        """
        notes = []
        foreign = self.location.foreign_scopes
        if foreign:
            scopes = sorted(foreign, key=lambda k: (-foreign[k], k))
            # a dynamo scope is a module path; a TorchScript one names no module by itself
            dynamo = self.location.exporter == "dynamo"
            absent = [k for k in scopes if dynamo and k not in self.module_types]
            why = (
                "the exporter traced code this eager forward does not run (a branch on "
                "torch.jit.is_tracing() or torch.compiler.is_compiling(), or on a value the "
                "trace fixed)"
                if self.options.onnx is None  # fxalign exported this very model
                else "the file was exported from another version of the model"
                if absent
                else "the file was exported from another version of the model, or its export "
                "took a branch this input does not take"
            )
            has = (
                "; this model has none of them"
                if len(absent) == len(scopes)
                else f"; this model has no {_listed(absent, shown)}"
                if absent
                else ""
            )
            notes.append(
                f"the file and the model differ: {sum(foreign.values())} nodes of the file are "
                f"in the scopes of modules this forward did not call ({_listed(scopes, shown)})"
                f"{has}: {why}; the values there are compared only through the modules around "
                "them"
            )
        reshaped = self._reshaped_weights() if self.options.onnx is not None else []
        if reshaped:
            notes.append(
                f"the file and the model differ: the file's {_joined(reshaped, shown)}: "
                "the file was exported from another version of the model (other sizes), so "
                "modules around these weights cannot be paired by shape"
            )
        leaves = set(self.leaf_paths)
        unused = set(self.location.unused)
        if unused:
            notes.append(
                "modules this forward ran whose outputs no module receives (but such unused "
                "ones) and the model does not return, however far up their callers return them, "
                f"left no node in the file ({_listed(list(self.location.unused), shown)}): the "
                "exporter removes code whose result is unused; if the model's own code reads "
                "them, an optimizer merged them into the nodes reading their inputs, or the "
                "file was exported from another version of the model"
            )
        gone = [
            p
            for p in self.location.nodeless
            if p not in leaves
            and p not in unused
            and p in self._modules
            and p not in self._inside_leaf
            and next(self._modules[p].parameters(), None) is not None
        ]
        if gone and self.options.onnx is None:
            notes.append(
                "blocks that own weights and ran in this forward left no node in the plain "
                f"export ({_listed(gone, shown)}): the exporter folded them away (all their "
                "inputs constant), or traced other code there"
            )
        elif gone:
            notes.append(
                "the file may not be this model's: these blocks own weights and ran in this "
                "forward, yet no node of the file is in their scopes nor their submodules' "
                f"({_listed(gone, shown)}): the file was exported from another version of the "
                "model, or the exporter folded them away (all their inputs constant)"
            )
        return notes

    def _reshaped_weights(self) -> list[str]:
        """The file's initializers named as a weight of the model, holding another shape.

        Read from the initializers' dims (no weight data is read). A 2-D weight stored
        transposed (an exporter's rewrite) is not counted.
        """
        found = []
        named = [*self.model.named_parameters(), *self.model.named_buffers()]
        for name, weight in named:
            tensor = self._initializers.get(name)
            if tensor is None or weight is None:
                continue
            shape, mine = list(tensor.dims), list(weight.shape)
            if shape != mine and not (len(mine) == 2 and shape == mine[::-1]):
                found.append(f"{name!r} has shape {shape} (this model's: {mine})")
        return found

    def _coverage(self) -> Coverage:
        """Located modules as marked; every other module with where its value went."""
        location = self.location
        inside = self._inside_leaf  # a parametrization of a leaf's weight: no row, as marked
        marked = [
            c.path
            for c in location.calls
            if c.path
            and (c.located or c.path in self._paired_by_value)
            and c.path not in inside
            and c.path not in self._taken_up_paths
        ]
        marked = list(dict.fromkeys(marked))
        located = set(marked)
        unmarked = {p: f"inside leaf module {leaf!r}" for p, leaf in inside.items()}
        unmarked.update(self._taken_up_paths)
        for path, module in self._modules.items():
            if is_opaque(module) and path not in inside:
                unmarked[path] = SCRIPTED_NOTE
        for call in location.calls:
            if not call.path or call.path in located or call.path in unmarked:
                continue
            if call.reason is not None:
                unmarked[call.path] = "output not a tensor"
            else:
                unmarked[call.path] = call.outputs[0].reason or "not located"
        containers = ancestors(located)
        for path in location.never_called:
            if path and is_container(path, self.module_types, containers):
                unmarked.setdefault(path, CONTAINER_NOTE)
            elif path:
                unmarked.setdefault(path, "called 0 times")
        ran = {c.path for c in location.calls}
        leaves_ran = [p for p in self.leaf_paths if p in ran]
        return Coverage(
            marked,
            unmarked,
            len(leaves_ran),
            sum(1 for p in leaves_ran if p in located),
        )


@dataclasses.dataclass(frozen=True)
class _Values:
    """One sample's module values: PyTorch's, their tensors in the file, and their places.

    Attributes:
        torch: ``name -> the PyTorch value``.
        onnx_names: ``name -> the file's tensor compared with it``.
        places: ``name -> (value id, (call, position among its outputs))``.
        raw: ``tensor -> its value``, as the promoted copy returned them.
        as_is: ``name -> the PyTorch input its tensor holds``, for outputs paired
            :attr:`~fxalign.attach.LocatedValue.as_is`.
    """

    torch: Mapping[MarkerName, np.ndarray]
    onnx_names: Mapping[MarkerName, str]
    places: Mapping[MarkerName, tuple[str, tuple[CallKey, int]]]
    raw: Mapping[str, np.ndarray]
    as_is: Mapping[MarkerName, np.ndarray]


def _received(capture: CallCapture) -> set[str]:
    """Value ids of the tensors a module call receives or the model returns."""
    found = {x.value_id for call in capture.calls for x in call.inputs}
    if capture.calls:
        found.update(x.value_id for x in capture.calls[0].outputs)
    return found


def _rms(value: np.ndarray, reference: np.ndarray) -> float:
    """The root mean square of ``value - reference``, in float64 (NaN where either has one)."""
    diff = value.astype(np.float64) - reference.astype(np.float64)
    return math.sqrt(float(np.mean(diff * diff))) if diff.size else 0.0


def _gap(value: np.ndarray, reference: np.ndarray) -> float:
    """``max |value - reference|`` in float64, NaN where either side has a NaN."""
    diff = np.abs(value.astype(np.float64) - reference.astype(np.float64))
    return float(diff.max()) if diff.size else 0.0


def _weight_gap(value: np.ndarray, mine: np.ndarray) -> float | None:
    """The largest difference of a file's weight from the model's, ``None`` when they agree.

    Exact when the dtypes are the same; within half an ulp of the file's dtype (a converted
    file's weights are the model's rounded to it) otherwise. Integer weights: exact. A NaN on
    one side only is a difference of size NaN.

    Example:
        >>> one = np.ones(3, np.float32)
        >>> half = one.astype(np.float16)  # converted: within half an ulp of float16
        >>> _weight_gap(one, one), _weight_gap(one * 2, one), _weight_gap(half, one)
        (None, 1.0, None)
    """
    eps = dtype_eps(str(value.dtype))  # a float dtype (bfloat16 included), or None
    if eps is None or mine.dtype.kind != "f":
        if np.array_equal(value, mine):
            return None
        if value.dtype.kind in "iub" and mine.dtype.kind in "iub":
            return float(np.abs(value.astype(np.float64) - mine.astype(np.float64)).max())
        return math.inf
    wide, ours = value.astype(np.float64), mine.astype(np.float64)
    with np.errstate(invalid="ignore"):
        gap = np.abs(wide - ours)
        slack = 0.0 if value.dtype == mine.dtype else eps / 2 * np.abs(ours) + 1e-6
        # NaN at one position on both sides agrees; a NaN on one side only does not
        bad = ~(gap <= slack) & ~(np.isnan(wide) & np.isnan(ours))
    if not bool(bad.any()):
        return None
    return float(np.max(np.where(bad, gap, 0.0)))  # NaN when a NaN is on one side only


def _listed(names: list[str], shown: int) -> str:
    """The first ``shown`` names, quoted, and how many more.

    Example:
        >>> _listed(["a", "b", "c"], 2)
        "'a', 'b' and 1 more"
    """
    return _joined([repr(n) for n in names], shown)


def _joined(items: list[str], shown: int) -> str:
    """The first ``shown`` items as they are, and how many more.

    Example:
        >>> _joined(["'w' (shape [2])", "'b'"], 1)
        "'w' (shape [2]) and 1 more"
    """
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _no_value(plan: ValuePlan | None, index: int) -> str:
    if plan is None:
        return (
            f"this call did not run on sample 0, where the file was located (sample {index})"
            if index
            else "not located"
        )
    return plan.reason or "not located"


def _check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """A :class:`UserError` when a file of the model's external data is not beside it."""
    missing = [f for f in external_data_files(model) if not (path.parent / f).is_file()]
    if missing:
        raise UserError(
            f"the weights of {str(path)!r} are kept in {missing[0]!r} (external data), which is "
            f"not in {str(path.parent)!r}",
            hint="copy the data file along with the .onnx: torch.onnx.export writes it beside "
            "the model, and ONNX Runtime reads it from there",
        )


def _read(path: Path, *, weights: bool) -> onnx.ModelProto:
    """The file's graph, its external data never read.

    With its inline weights (``weights``), or with them left in the file as external data
    pointing at their bytes (:func:`~fxalign.modelio.load_graph`).
    """
    try:
        model = onnx.load(str(path), load_external_data=False) if weights else load_graph(path)
    except Exception as e:  # missing, a folder, not protobuf: onnx raises many kinds
        raise UserError(
            f"cannot read the ONNX file {str(path)!r}: {type(e).__name__}: {str(e)[:200]}",
            hint="pass the .onnx file torch.onnx.export wrote",
        ) from e
    if not model.graph.node and not model.graph.output:  # protobuf reads any bytes, none too
        size = path.stat().st_size
        raise UserError(
            f"{str(path)!r} is not an ONNX model: it holds no graph ({size} bytes)",
            hint="pass the .onnx file torch.onnx.export wrote",
        )
    return model
