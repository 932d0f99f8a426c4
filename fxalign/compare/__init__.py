"""Stage 5: compare PyTorch and ONNX values marker by marker, with numpy only.

PyTorch is the reference. By default (``verdict="roundoff"``) a value passes when every
element is within ``atol + rtol * |torch|`` plus the round-off its dtype and magnitude allow,
``ROUNDOFF_FACTOR * eps * max|torch|``; ``verdict="allclose"`` is plain
``numpy.allclose(onnx, torch, atol, rtol)``. NaN on both sides at one position counts as equal
(and is counted), as do infinities of the same sign; any other NaN or Inf mismatch fails the
row. Integer and boolean tensors are compared exactly. Shape or dtype mismatches and values
missing on one side are reported rows, never exceptions.

Precision of the numbers themselves: two float32 values are compared elementwise in float32
(the difference of two close float32 values is exact) and every sum is accumulated in float64;
integers and booleans are compared exactly; any other pair is widened to float64 (complex128
for complex values) first.

=================  ===================================================================
``metrics``        two arrays -> :class:`~fxalign.report.model.Metrics`; the verdict rule
``rows``           two ``marker name -> array`` maps -> rows with tolerances and status
``aggregate``      rows of several samples -> one row per value; the first divergence
=================  ===================================================================
"""

from fxalign.compare.aggregate import SampleAggregate, first_divergence, name_culprit
from fxalign.compare.metrics import ROUNDOFF_FACTOR, compare_arrays, dtype_eps, machine_eps
from fxalign.compare.rows import DTYPE_TOLERANCES, compare, paired, row_order, tolerance_for

__all__ = [
    "DTYPE_TOLERANCES",
    "ROUNDOFF_FACTOR",
    "SampleAggregate",
    "compare",
    "compare_arrays",
    "dtype_eps",
    "first_divergence",
    "name_culprit",
    "machine_eps",
    "paired",
    "row_order",
    "tolerance_for",
]
