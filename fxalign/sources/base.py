"""The interface between :func:`fxalign.align` and a way of obtaining ONNX values.

A *source* pairs every PyTorch module value with its ONNX counterpart and compares them; the
pipeline only runs it once per input sample and folds the rows into a report::

    source.prepare(sample 0)            # e.g. instrument, export, extract; or load the user's file
    for each sample: rows = source.compare_sample(index, sample)
    facts = source.finish()             # coverage, notes, warnings, fidelity, timings
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from fxalign.report.model import Coverage, Fidelity, Row
from fxalign.samples import Sample

__all__ = ["SourceFacts", "ValueSource"]


@dataclass
class SourceFacts:
    """What a source learnt beyond the rows, for the report.

    Attributes:
        method: How values were obtained (``"fx"``, ``"fallback"``, ``"eager"``; ``"attach"``).
        method_note: Why the method is not the first choice (torch.fx's error), if it is not.
        coverage: Which modules have a row, and why the others have none.
        notes: Notes for the whole report, in order.
        exporter_warnings: The exporter's warnings, located at the module that raised them.
        fidelity: How far the compared ONNX model is from the plain export, if measured.
        timings: Seconds per stage.
        exporter: The exporter that wrote the compared file, when the source read it from the
            file (attach); ``None``: the one the options name.
    """

    method: str
    method_note: str | None
    coverage: Coverage
    notes: list[str] = field(default_factory=list)
    exporter_warnings: list[str] = field(default_factory=list)
    fidelity: Fidelity | None = None
    timings: dict[str, float] = field(default_factory=dict)
    exporter: str | None = None


class ValueSource(Protocol):
    """How ONNX values are obtained and paired with PyTorch's (see the module docstring)."""

    def prepare(self, sample: Sample) -> None:
        """Get ready to compare samples; ``sample`` is sample 0 (the export input)."""
        ...

    def compare_sample(self, index: int, sample: Sample) -> list[Row]:
        """Rows of one sample, in PyTorch execution order, with local errors where computed."""
        ...

    def finish(self) -> SourceFacts:
        """Release what the samples needed and say what the report needs to know."""
        ...
