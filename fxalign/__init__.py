"""fxalign: find the first PyTorch module whose exported ONNX version disagrees with PyTorch.

One call instruments the model with torch.fx markers, exports it with either ``torch.onnx``
exporter, turns the markers into graph outputs with onnx-graphsurgeon, runs ONNX Runtime and
PyTorch once each and compares every module's output::

    import fxalign
    report = fxalign.align(model, (x,))
    print(fxalign.render_text(report))
    assert report, f"first divergence: {report.first_divergence}"
"""

from fxalign.backends import OrtRunner, Runner, onnx_feeds, run_onnx
from fxalign.capture import capture
from fxalign.compare import compare, compare_arrays, first_divergence
from fxalign.errors import (
    ExportError,
    FxalignError,
    InputError,
    InstrumentationError,
    InternalError,
    RuntimeBackendError,
    UserError,
)
from fxalign.export import ExportResult, export
from fxalign.extract import ExtractResult, extract
from fxalign.instrument import instrument, instrument_model
from fxalign.instrument.result import InstrumentResult
from fxalign.markers import debug_apply
from fxalign.names import MarkerName
from fxalign.pipeline import align
from fxalign.report.html import render_html, write_html
from fxalign.report.model import Coverage, Metrics, Report, Row
from fxalign.report.text import print_report, render_text
from fxalign.samples import Sample
from fxalign.torch_run import run_torch

__version__ = "0.1.0"

__all__ = [
    "Coverage",
    "ExportError",
    "ExportResult",
    "ExtractResult",
    "FxalignError",
    "InputError",
    "InstrumentResult",
    "InstrumentationError",
    "InternalError",
    "MarkerName",
    "Metrics",
    "OrtRunner",
    "Report",
    "Row",
    "Runner",
    "RuntimeBackendError",
    "Sample",
    "UserError",
    "__version__",
    "align",
    "capture",
    "compare",
    "compare_arrays",
    "debug_apply",
    "export",
    "extract",
    "first_divergence",
    "instrument",
    "instrument_model",
    "onnx_feeds",
    "print_report",
    "render_html",
    "render_text",
    "run_onnx",
    "run_torch",
    "write_html",
]
