"""The report's records: metrics, sample statistics, coverage, fidelity, the op and the repro.

Plain typed data held by :class:`fxalign.report.model.Report` and its rows (see that module for
the whole data model); :class:`Record` is their base: equality field by field, NaN equal to NaN,
so that a report loaded back from its JSON equals the report written whatever its floats hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["Coverage", "Fidelity", "Metrics", "OpFinding", "Record", "Repro", "SampleStats", "same"]


def same(a: Any, b: Any) -> bool:
    """``a == b``, reading NaN as equal to NaN, also inside lists and dicts."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    return bool(a == b)


@dataclass(eq=False)
class Record:
    """Base of the report's records: equality field by field, NaN equal to NaN.

    Defining ``__eq__`` leaves the records unhashable, as mutable dataclasses are.
    """

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(same(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))


@dataclass(eq=False)
class Metrics(Record):
    """How far the ONNX value is from the PyTorch value.

    Two float32 values are compared elementwise in float32 (as ``numpy.allclose`` does; the
    difference of two close float32 values is exact) and every sum is accumulated in float64;
    integers and booleans are compared exactly; other dtypes are widened to float64 (complex128
    for complex values) first.

    Attributes:
        max_abs: Largest absolute difference.
        mean_abs: Mean absolute difference.
        rmse: Root mean square difference.
        max_rel: Largest ``|onnx - torch| / (|torch| + 1e-12)``.
        cosine: Cosine similarity of the flattened values (1.0 when both are all zero).
        sqnr_db: Signal-to-quantisation-noise ratio in dB; ``inf`` when identical.
        mismatched: Elements outside tolerance, ``|onnx - torch| > atol + rtol * |torch| +
            roundoff`` (NaN/Inf mismatches included).
        numel: Number of elements.
        nan_matched: Positions where both sides are NaN (counted as equal).
        roundoff: Round-off allowance added to ``atol`` for this value: ``min(c * eps, rtol)
            * rms(torch)`` under the ``roundoff`` verdict, 0 under ``allclose`` and for
            integers and booleans (see :data:`Verdict`).
    """

    max_abs: float
    mean_abs: float
    rmse: float
    max_rel: float
    cosine: float
    sqnr_db: float
    mismatched: int
    numel: int
    nan_matched: int = 0
    roundoff: float = 0.0


@dataclass(eq=False)
class SampleStats(Record):
    """How one value fared over several input samples (``align(samples=...)``).

    Attributes:
        count: Samples in which the value was compared (same shape on both sides).
        failed: Samples in which it broke tolerance.
        max_abs_max: Largest ``max_abs`` over the samples.
        max_abs_mean: Mean of ``max_abs`` over the samples.
        worst_sample: Index of the sample with the largest error (0 is the export input); the
            row's metrics are that sample's.
    """

    count: int
    failed: int
    max_abs_max: float
    max_abs_mean: float
    worst_sample: int


@dataclass(eq=False)
class Coverage(Record):
    """Which modules got a marker.

    Attributes:
        marked: Module paths with at least one executed marker, in first-execution order.
        unmarked: ``module path -> reason`` for every other module of the model.
        leaf_total: Leaf modules that ran.
        leaf_marked: Of those, how many have a marker.
        traced: Module paths whose subtree torch.fx traced (``""``: the whole model).
        eager: ``module path -> reason`` for blocks that FX could not trace and that run their
            own Python ``forward`` (their submodules are still marked); ``""`` is the model.
    """

    marked: list[str] = field(default_factory=list)
    unmarked: dict[str, str] = field(default_factory=dict)
    leaf_total: int = 0
    leaf_marked: int = 0
    traced: list[str] = field(default_factory=list)
    eager: dict[str, str] = field(default_factory=dict)

    @property
    def leaf_ratio(self) -> float:
        """Fraction of leaf modules that ran and got a marker (1.0 when none ran)."""
        return 1.0 if self.leaf_total == 0 else self.leaf_marked / self.leaf_total


@dataclass(eq=False)
class Fidelity(Record):
    """Plain export vs debug model (measured by :func:`fxalign.fidelity.measure`).

    Attributes:
        output_max_abs: Largest absolute difference between the final outputs of the debug model
            and of the plain export, run by ONNX Runtime on the same inputs (``None`` when the
            outputs could not be paired).
        plain_ops: Node count by op type of the plain export after ONNX Runtime's optimisations.
        debug_ops: The same for the debug model.
        unfused: Op types with more nodes in the optimised debug model than in the optimised
            plain one, with the difference: work the markers kept from being fused away.
        plain_export_seconds: Time of the plain export.
    """

    output_max_abs: float | None
    plain_ops: dict[str, int] = field(default_factory=dict)
    debug_ops: dict[str, int] = field(default_factory=dict)
    unfused: dict[str, int] = field(default_factory=dict)
    plain_export_seconds: float = 0.0

    def summary(self) -> str:
        """The one-line statement the report shows."""
        if self.output_max_abs is None:
            outputs = "final outputs could not be paired with the plain export's"
        elif self.output_max_abs == 0:
            outputs = "final outputs identical to the plain export's"
        else:
            outputs = (
                f"final outputs differ from the plain export's by max_abs={self.output_max_abs:.3g}"
            )
        plain, debug = sum(self.plain_ops.values()), sum(self.debug_ops.values())
        if self.unfused:
            kept = ", ".join(f"{op} x{n}" for op, n in sorted(self.unfused.items()))
            fusion = (
                f"markers kept ONNX Runtime from fusing {kept} "
                f"(optimised graphs: plain {plain} nodes, debug {debug})"
            )
        else:
            fusion = f"no fusion was blocked (optimised graphs: plain {plain} nodes, debug {debug})"
        return f"debug model fidelity: {outputs}; {fusion}"


@dataclass(eq=False)
class OpFinding(Record):
    """The op of the culprit's own code that breaks tolerance first (the drill-down).

    The culprit module is exported alone on its captured inputs, with the same exporter and
    options, with a marker after every op of its own code; each op is rerun on the ONNX values
    of its inputs, as modules are.

    Attributes:
        module_path: The culprit module, or its submodule whose op it is (a submodule's op is
            named only when no op of the culprit's own code breaks tolerance).
        op: The op, as ``torch.export`` names it (``aten.scaled_dot_product_attention.default``).
        node: Its node in the module's exported program (``scaled_dot_product_attention``).
        file: Source file of the line that called it (``""`` when unknown).
        line: Line number in ``file`` (0 when unknown).
        source: That source line, stripped.
        onnx_nodes: Names of the ONNX nodes the op became in the standalone export.
        onnx_op_types: Their op types, in graph order, each once.
        metrics: Cumulative error of the op's output in the standalone export.
        local: The op rerun on the ONNX values of its inputs vs its ONNX output.
        ops_compared: Ops of the module's own code that were compared.
    """

    module_path: str
    op: str
    node: str
    file: str = ""
    line: int = 0
    source: str = ""
    onnx_nodes: list[str] = field(default_factory=list)
    onnx_op_types: list[str] = field(default_factory=list)
    metrics: Metrics | None = None
    local: Metrics | None = None
    ops_compared: int = 0

    @property
    def location(self) -> str:
        """``file:line``, or ``""`` when unknown."""
        return f"{self.file}:{self.line}" if self.file else ""


@dataclass(eq=False)
class Repro(Record):
    """A standalone repro bundle of the culprit (``align(repro=...)``).

    Attributes:
        path: Folder holding ``module.pt2``, ``inputs.pt``, ``module.onnx`` and ``repro.py``.
        module_path: The module it reproduces.
        reproduces: Whether ``repro.py``, run once in a fresh process, showed the divergence
            (``None`` when it could not be run; see ``note``).
        max_abs: Largest absolute difference ``repro.py`` printed (``None`` when not run).
        note: What the run showed, in words.
    """

    path: str
    module_path: str
    reproduces: bool | None = None
    max_abs: float | None = None
    note: str = ""
