"""fxalign: find the first PyTorch module whose exported ONNX version disagrees with PyTorch.

One call instruments the model with torch.fx markers, exports it with either ``torch.onnx``
exporter, turns the markers into graph outputs with onnx-graphsurgeon, runs ONNX Runtime and
PyTorch once each and compares every module's output::

    import fxalign
    report = fxalign.align(model, (x,))
    print(fxalign.render_text(report))
    assert report, f"first divergence: {report.first_divergence}"
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# Public names are imported on first use (PEP 562), so that ``import fxalign`` (and the CLI's
# ``--help``) does not pay for torch, onnx and ONNX Runtime up front.
_LAZY = {
    "Coverage": "fxalign.report.model",
    "ExportError": "fxalign.errors",
    "ExportResult": "fxalign.export",
    "ExtractResult": "fxalign.extract",
    "FxalignError": "fxalign.errors",
    "InputError": "fxalign.errors",
    "InstrumentResult": "fxalign.instrument.result",
    "InstrumentationError": "fxalign.errors",
    "InternalError": "fxalign.errors",
    "MarkerName": "fxalign.names",
    "Metrics": "fxalign.report.model",
    "OrtRunner": "fxalign.backends",
    "Report": "fxalign.report.model",
    "Row": "fxalign.report.model",
    "Runner": "fxalign.backends",
    "RuntimeBackendError": "fxalign.errors",
    "Sample": "fxalign.samples",
    "UserError": "fxalign.errors",
    "align": "fxalign.pipeline",
    "capture": "fxalign.capture",
    "compare": "fxalign.compare",
    "compare_arrays": "fxalign.compare",
    "debug_apply": "fxalign.markers",
    "export": "fxalign.export",
    "extract": "fxalign.extract",
    "first_divergence": "fxalign.compare",
    "instrument": "fxalign.instrument",
    "instrument_model": "fxalign.instrument",
    "onnx_feeds": "fxalign.backends",
    "print_report": "fxalign.report.text",
    "render_html": "fxalign.report.html",
    "render_text": "fxalign.report.text",
    "run_onnx": "fxalign.backends",
    "run_torch": "fxalign.torch_run",
    "write_html": "fxalign.report.html",
}
_SUBMODULES = frozenset({"testing"})
"""Submodules available as attributes without an import of their own (``fxalign.testing``)."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"fxalign.{name}")
    else:
        raise AttributeError(f"module 'fxalign' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})


class _Package(types.ModuleType):
    """Keeps ``fxalign.export`` (``compare``, ``extract``, ``instrument``) the stage functions.

    Importing a submodule binds it on its package under its own name, which would hide the
    function of that name; the binding is skipped, and the function is looked up as any other.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
