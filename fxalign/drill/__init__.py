"""Drill down into the culprit: the op and source line, and a standalone repro bundle.

Runs after the report is built, only when it names a culprit (the model itself for its own
``forward``, named on the final outputs' rows)::

    call_inputs      the culprit call's inputs, from one eager forward of the model   inputs.py
    export_program   the module alone as a torch.export program (ATen ops, lines)     program.py
    drill_ops        a marker after every op, the run's exporter, ONNX Runtime; the
                     first op whose local error breaks tolerance -> Report.op          ops.py
    write_bundle     module.pt2, inputs.pt, module.onnx, repro.py                     bundle.py
    run_bundle       repro.py once in a fresh process -> Report.repro

The culprit is exported from a copy of its module; the user's model runs once (for the inputs)
in the mode it was compared in, and comes back as it was. A failure of any step becomes
:attr:`Report.op_note` (or the bundle's note): the report itself stands.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from fxalign.drill.bundle import BundleSettings, run_bundle, write_bundle
from fxalign.drill.inputs import call_inputs
from fxalign.drill.ops import drill_ops
from fxalign.drill.program import export_program
from fxalign.errors import ExportError, UserError
from fxalign.instrument.result import first_line
from fxalign.options import AlignOptions
from fxalign.report.model import Report, Repro, Row
from fxalign.samples import Sample

__all__ = ["drill_into"]

logger = logging.getLogger(__name__)


def drill_into(
    report: Report, model: torch.nn.Module, sample: Sample, options: AlignOptions
) -> None:
    """Fill ``report.op`` / ``op_note`` (``options.drill_down``) and ``report.repro``.

    Does nothing when the report names no culprit module, or when neither the drill-down nor
    a bundle (``options.repro``) is asked for. The time taken is ``report.timings["drill_down"]``
    (and part of ``"total"``).

    Args:
        report: The run's report (changed in place).
        model: The user's model (left as it was).
        sample: Sample 0, the input the model was exported with.
        options: The run's options.
    """
    row = report.divergence
    if row is None or not (options.drill_down or options.repro):
        return
    start = time.perf_counter()
    try:
        with (
            _compared_mode(model, options.train),
            tempfile.TemporaryDirectory(prefix="fxalign-drill-") as tmp,
        ):
            _drill(report, row, model, sample, options, Path(tmp))
    except UserError as e:
        report.op_note = e.message
    except Exception as e:  # an fxalign bug: the report without a drill-down still stands
        logger.warning("drill-down into %s failed (a bug?): %s", row.module_path, e, exc_info=True)
        report.op_note = f"drill-down failed: {first_line(e, 200)}"
    seconds = time.perf_counter() - start
    report.timings["drill_down"] = seconds
    if "total" in report.timings:
        report.timings["total"] += seconds


def _drill(
    report: Report,
    row: Row,
    model: torch.nn.Module,
    sample: Sample,
    options: AlignOptions,
    workdir: Path,
) -> None:
    inputs = call_inputs(model, row.module_path, row.call_index, sample)
    module = _copy_of(model.get_submodule(row.module_path), options.train)
    program = export_program(module, inputs)
    if options.drill_down:
        try:
            report.op = drill_ops(
                program,
                inputs,
                module_path=row.module_path,
                atol=row.atol,
                rtol=row.rtol,
                options=options,
                workdir=workdir,
            )
        except ExportError as e:  # its root is the culprit, not the user's model
            report.op_note = f"{row.display_name} exported on its own: {e.message}"
        except UserError as e:
            report.op_note = e.message + _other_sample(row)
    if options.repro is not None:
        report.repro = _repro(options.repro, row, module, program, inputs, options)


def _other_sample(row: Row) -> str:
    """Why drilling on the export input may find nothing: the row breaks on another sample."""
    stats = row.samples
    if stats is None or stats.worst_sample == 0:
        return ""
    return (
        f"; {row.display_name} breaks tolerance most on sample {stats.worst_sample} (in "
        f"{stats.failed} of {stats.count} samples), and it was drilled on sample 0, the input "
        "it was exported with: what the export fixed at that input (a traced .item(), a "
        "shape; see the exporter's warnings) diverges only on other inputs"
    )


def _repro(
    folder: Path,
    row: Row,
    module: torch.nn.Module,
    program: torch.export.ExportedProgram,
    inputs: Sample,
    options: AlignOptions,
) -> Repro:
    settings = BundleSettings(row.module_path, row.atol, row.rtol)
    try:
        notes = write_bundle(folder, module, program, inputs, settings, options)
    except UserError as e:
        return Repro(str(folder), row.module_path, None, None, f"no bundle: {e.message}")
    repro = run_bundle(folder, row.module_path)
    if notes:
        repro.note = "; ".join([repro.note, *notes])
    return repro


def _copy_of(module: torch.nn.Module, train: bool) -> torch.nn.Module:
    """A deep copy of the culprit in the mode it was compared in (the module itself if none)."""
    try:
        copied = copy.deepcopy(module)
    except Exception as e:  # modules holding locks, generators, C++ handles
        logger.debug("cannot copy %s (%s): exporting the module itself", type(module), e)
        return module
    copied.train(train)
    return copied


@contextlib.contextmanager
def _compared_mode(model: torch.nn.Module, train: bool) -> Iterator[None]:
    """The model in the mode ``align`` compared it in; every module's flag back afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    if not train:
        model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag
