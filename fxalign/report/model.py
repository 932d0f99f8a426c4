"""The report's data model: plain typed data that serialises to JSON and loads back equal.

Everything a run finds is held here, and nothing here computes a metric or renders text for a
terminal or a page: the stages fill these records (:func:`fxalign.compare` makes the rows,
:func:`fxalign.align` the report) and the renderers beside this module lay them out. The JSON
layout is :mod:`fxalign.report.codec`'s, documented in ``docs/report-format.md``.

Equality of these records reads NaN as equal to NaN, field by field, so that a report loaded
back from its JSON equals the report written whatever its floats hold.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fxalign.report.codec import decode, encode
from fxalign.report.parts import (
    Coverage,
    Fidelity,
    Metrics,
    OpFinding,
    Record,
    Repro,
    SampleStats,
)

__all__ = [
    "ROUNDOFF_FACTOR",
    "SCHEMA_VERSION",
    "STATUS_LABELS",
    "Coverage",
    "CulpritBasis",
    "Fidelity",
    "LocalScope",
    "Metrics",
    "OpFinding",
    "Report",
    "Repro",
    "Row",
    "RowKind",
    "SampleStats",
    "Status",
    "Verdict",
]

SCHEMA_VERSION = 3
"""Version of the JSON layout written by :meth:`Report.to_json`.

3: the culprit (:attr:`Report.first_divergence` is the first *introduced* break,
:attr:`Report.first_seen` the first cumulative one, :attr:`Report.culprit_basis`), blocks' own
code error (:attr:`Row.local_scope`), the op drill-down (:attr:`Report.op`) and the repro bundle
(:attr:`Report.repro`). Files of version 2 read back with ``first_seen`` equal to their
``first_divergence``.
2: the verdict rule (:attr:`Report.verdict`, :attr:`Metrics.roundoff`); a value within float
round-off of its magnitude passes by default. Files of version 1 were judged by plain
``allclose`` and read back so."""

Verdict = Literal["roundoff", "allclose"]
"""The rule that says whether a value is within tolerance (:func:`fxalign.compare_arrays`).

``roundoff`` (default), elementwise::

    |onnx - torch| <= atol + rtol * |torch| + min(c * eps, rtol) * rms(torch)

``eps`` the machine epsilon of the value's dtype, ``rms(torch)`` the root mean square of the
PyTorch value's finite elements and ``c`` :data:`ROUNDOFF_FACTOR`: ``allclose`` plus the float
round-off that values of that typical magnitude carry, which elements that are small by
cancellation carry too. ``allclose``: plain ``numpy.allclose(onnx, torch, atol, rtol)``.
Either way NaN/Inf must match and integers and booleans are compared exactly."""

ROUNDOFF_FACTOR = 4096.0
"""``c`` of the ``roundoff`` verdict (:data:`Verdict`): float32's allowance is ``4096 * 2**-23
= 4.9e-4`` times ``rms(torch)``.

Measured with ``python -m benchmarks.roundoff`` on deep random-weight Hugging Face models with
activations of 1e6-1e8 (ResNet, BiT, RegNet, ConvNeXt, EfficientNet, Swin), both exporters:
the least ``c`` that passes every value of a faithful export is at most 50, except BiT's 1,575
(its group norms amplify upstream round-off; each module alone passes plain ``allclose``),
while every planted break (an activation translated without its negative slope, a resize one
pixel off, a sign flipped in a 2x2 patch) needs 4.1e5 or more. 4096 is 2.6 times the worst
faithful need and 100 times below the mildest break; ``docs/report-format.md`` has the table."""

Status = Literal["ok", "diverged", "shape_mismatch", "missing_in_onnx", "missing_in_torch"]
"""Row outcome. Only ``diverged`` and ``shape_mismatch`` fail; missing values are reported."""

STATUS_LABELS: dict[str, str] = {
    "ok": "ok",
    "diverged": "DIVERGED",
    "shape_mismatch": "SHAPE",
    "missing_in_onnx": "not in ONNX",
    "missing_in_torch": "not in torch",
}
"""How renderings label each :data:`Status`."""

RowKind = Literal["leaf", "block", "output"]
"""A leaf module's output, a block's (container's) output, or one of the model's final outputs."""

LocalScope = Literal["module", "own_code", "with_submodules"]
"""What a row's :attr:`Row.local` (introduced) error measures.

``module``: the module rerun on the ONNX values of its inputs (a leaf, or a block whose
submodules are all in its own code's place). ``own_code``: a block's *self* error: the block
rerun on the ONNX values of its inputs with every submodule call answering with its ONNX value,
so only the block's inline code (attention math, a mask, a division) is measured.
``with_submodules``: a block rerun whole on ONNX inputs because its submodules could not answer
(the error includes theirs)."""

CulpritBasis = Literal["introduced", "cumulative", "accumulated"]
"""Why :attr:`Report.first_divergence` names the module it names (or none).

``introduced``: its own introduced error (:attr:`Row.local`) breaks tolerance, and no earlier
row's does. ``cumulative``: no introduced error could be computed for it (its row says why), so
it is named by its cumulative error, the fallback. ``accumulated``: values break tolerance
(:attr:`Report.first_seen`) but no module's introduced error does on its own: the error grew by
accumulation and no module is named."""


@dataclass(eq=False)
class Row(Record):
    """One compared value.

    Attributes:
        name: Marker name (``layer1.0.conv1``, ``shared#1``, ``lstm[1][0]``); ``""``-rooted names
            (``""``, ``"[0]"``) are the model's final outputs.
        module_path: Module path (``""`` for the model itself).
        call_index: Which call of the module (0 for the first).
        module_type: Class name of the module.
        kind: ``leaf``, ``block`` or ``output``.
        status: See :data:`Status`.
        passed: Whether the row is within tolerance; ``None`` when a side is missing.
        atol: Absolute tolerance applied.
        rtol: Relative tolerance applied.
        onnx_name: ONNX tensor holding the value, if any.
        torch_shape: Shape on the PyTorch side.
        onnx_shape: Shape on the ONNX side.
        torch_dtype: Element type on the PyTorch side (numpy name).
        onnx_dtype: Element type on the ONNX side.
        metrics: The metrics, when both sides exist and shapes match (cumulative error: what
            reaches this point from everything before it).
        notes: Anything the reader should know about this row.
        local: Error this module introduces on its own: the PyTorch module run on the ONNX
            values of its inputs, compared with the ONNX value of its output. ``None`` when not
            computed.
        local_note: Why ``local`` is missing (inputs not observable on the ONNX side, ...),
            or a caveat about it.
        local_scope: What ``local`` measures (:data:`LocalScope`); ``None`` when not computed.
        break_at: Where, in execution order (the index of a marker in the run), this row's
            module is first seen to break: the first value its own code got wrong (an input
            it hands a submodule, or its output), or its output when it has no introduced
            error. ``None`` when it does not break, or when not computed. Orders culprits
            (:func:`fxalign.compare.name_culprit`).
        samples: Aggregates over input samples, when several were compared.
        onnx_node: Name of the ONNX node that computes the value (``None`` when unknown, or when
            the value is a graph input or constant); lets viewers such as Model Explorer
            overlay the error on the graph.
    """

    name: str
    module_path: str
    call_index: int
    module_type: str
    kind: RowKind
    status: Status
    passed: bool | None
    atol: float
    rtol: float
    onnx_name: str | None = None
    torch_shape: list[int] | None = None
    onnx_shape: list[int] | None = None
    torch_dtype: str | None = None
    onnx_dtype: str | None = None
    metrics: Metrics | None = None
    notes: list[str] = field(default_factory=list)
    local: Metrics | None = None
    local_note: str | None = None
    samples: SampleStats | None = None
    onnx_node: str | None = None
    local_scope: LocalScope | None = None
    break_at: int | None = None

    @property
    def failed(self) -> bool:
        """True when the row breaks tolerance (``passed is False``)."""
        return self.passed is False

    @property
    def display_name(self) -> str:
        """The name as shown to people: the model's outputs read ``output``, ``output[0]``."""
        return "output" + self.name if self.kind == "output" else self.name

    @property
    def introduced_failed(self) -> bool:
        """True when the error this row's module introduces on its own breaks tolerance."""
        return self.local is not None and self.local.mismatched > 0


@dataclass(eq=False)
class Report(Record):
    """Result of one :func:`fxalign.align` run.

    A report is truthy when every compared value is within tolerance. Render it with
    :func:`fxalign.render_text`, :func:`fxalign.print_report` or :func:`fxalign.write_html`.

    Attributes:
        model: Class name of the model.
        exporter: ``"dynamo"`` or ``"torchscript"``.
        atol: Absolute tolerance given (or float32's default when tolerances go by dtype).
        rtol: Relative tolerance given (or float32's default).
        rows: One row per compared value, in PyTorch execution order, final outputs last.
        first_divergence: The culprit: name of the first row, in execution order, whose
            *introduced* error breaks tolerance (see :attr:`culprit_basis`), or ``None``.
        first_seen: Name of the first row whose cumulative error breaks tolerance, or ``None``
            (a module before the culprit in execution order cannot fail cumulatively without
            failing on its own, so this is the culprit or a row after it).
        culprit_basis: Why ``first_divergence`` names what it names (:data:`CulpritBasis`);
            ``None`` when every value is within tolerance.
        op: The op and source line of the culprit's own code that breaks tolerance first, when
            drilled down (``align(drill_down=True)``, the default).
        op_note: Why there is no ``op`` though there is a culprit.
        repro: The standalone repro bundle, when written (``align(repro=...)``).
        instrumentation: ``"fx"`` or ``"fallback"``.
        instrumentation_note: Why the fallback was used, when it was.
        coverage: Which modules got markers.
        notes: Report-wide remarks (fidelity of the debug model, exporter warnings, ...).
        exporter_warnings: Warnings the exporter raised.
        fidelity: Plain export vs debug model, when measured (``align(fidelity=True)``).
        timings: Seconds per stage (``instrument``, ``export``, ``extract``, ``run_torch``,
            ``run_onnx``, ``compare``, ``local`` (the rerun for introduced errors, when it
            ran), ``drill_down`` (when it ran), ``total``).
        versions: Versions of torch, onnx, onnxruntime, onnxscript, fxalign.
        tolerances: Per-module overrides, ``glob -> {"atol": ..., "rtol": ...}``.
        dtype_tolerances: True when no global tolerance was given, so each value's tolerance
            follows its dtype (each row records the ``atol``/``rtol`` applied).
        verdict: The rule each value was judged by (:data:`Verdict`): ``roundoff`` (default)
            or plain ``allclose``.
        sample_count: Input samples compared (the export input is sample 0).
        schema_version: JSON layout version.
    """

    model: str
    exporter: str
    atol: float
    rtol: float
    rows: list[Row]
    first_divergence: str | None = None
    first_seen: str | None = None
    culprit_basis: CulpritBasis | None = None
    op: OpFinding | None = None
    op_note: str | None = None
    repro: Repro | None = None
    instrumentation: str = "fx"
    instrumentation_note: str | None = None
    coverage: Coverage = field(default_factory=Coverage)
    notes: list[str] = field(default_factory=list)
    exporter_warnings: list[str] = field(default_factory=list)
    fidelity: Fidelity | None = None
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    tolerances: dict[str, dict[str, float]] = field(default_factory=dict)
    dtype_tolerances: bool = False
    verdict: Verdict = "roundoff"
    sample_count: int = 1
    schema_version: int = SCHEMA_VERSION

    def __bool__(self) -> bool:
        return self.passed

    @property
    def passed(self) -> bool:
        """True when no row breaks tolerance."""
        return not any(r.failed for r in self.rows)

    def row(self, name: str) -> Row:
        """The row of marker ``name``.

        Raises:
            KeyError: No such row.
        """
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def divergence(self) -> Row | None:
        """The row named by :attr:`first_divergence`."""
        return None if self.first_divergence is None else self.row(self.first_divergence)

    def override_counts(self) -> dict[str, int]:
        """How many compared values each tolerance override in :attr:`tolerances` applied to.

        An override applies to a value when its glob pattern matches the row's marker name or
        module path, the rule by which the tolerances were set (:func:`fxalign.compare`).

        Returns:
            ``pattern -> number of compared rows``, in the order of :attr:`tolerances`;
            patterns that matched no compared row are left out.

        Example:
            >>> r = Row("enc.attn", "enc.attn", 0, "", "leaf", "ok", True, 1e-3, 1e-3)
            >>> report = Report("M", "dynamo", 1e-7, 1e-6, [r], tolerances={"*.attn": {}})
            >>> report.override_counts()
            {'*.attn': 1}
        """
        counts: dict[str, int] = {}
        for pattern in self.tolerances:
            n = sum(
                r.passed is not None
                and (
                    fnmatch.fnmatchcase(r.name, pattern)
                    or fnmatch.fnmatchcase(r.module_path, pattern)
                )
                for r in self.rows
            )
            if n:
                counts[pattern] = n
        return counts

    # ---- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite floats as the strings ``"inf"``, ``"-inf"``, ``"nan"``)."""
        data: dict[str, Any] = encode(self)
        return data

    def to_json(self, path: str | os.PathLike[str] | None = None, *, indent: int = 2) -> str:
        """Serialise; also write to ``path`` when given.

        Returns:
            The JSON text.
        """
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Inverse of :meth:`to_dict`: ``Report.from_dict(r.to_dict()) == r``.

        Fields this version does not know (added by a newer writer of the same schema version)
        are ignored; fields added after the data was written take their defaults, except
        :attr:`verdict`, which reads ``"allclose"`` for version-1 data (judged that way).

        Raises:
            ValueError: The data was written by a newer, incompatible schema.
            TypeError: The data is not a report: a required field is missing, or a field holds
                a value of the wrong type.
        """
        version = data.get("schema_version", SCHEMA_VERSION)
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise ValueError(
                f"report schema version {version} is newer than this fxalign reads "
                f"({SCHEMA_VERSION}); upgrade fxalign"
            )
        if isinstance(version, int) and version < 2 and "verdict" not in data:
            data = {**data, "verdict": "allclose"}
        if isinstance(version, int) and version < 3 and "first_seen" not in data:
            first = data.get("first_divergence")
            data = {**data, "first_seen": first, "culprit_basis": "cumulative" if first else None}
        report: Report = decode(cls, data)
        return report

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike[str]) -> Report:
        """Load a report from JSON text or a path to a JSON file."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))
