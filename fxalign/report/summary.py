"""The words every rendering shares: numbers, shapes, tolerances and the one-line verdict.

The terminal table (:mod:`fxalign.report.text`), the HTML page (:mod:`fxalign.report.html`)
and :func:`fxalign.testing.assert_aligned`'s message say these things the same way. Nothing
here computes a metric; it formats what the report holds.
"""

from __future__ import annotations

import math

from fxalign.report.model import ROUNDOFF_FACTOR, OpFinding, Report, Row

__all__ = [
    "culprit_text",
    "format_float",
    "op_lines",
    "overrides_text",
    "repro_line",
    "rule_text",
    "shape_text",
    "summary_line",
    "where",
    "tolerance_text",
]


def format_float(value: float | None, *, digits: int = 3) -> str:
    """Compact number for tables: ``0``, ``1.23e-05``, ``inf``, ``-`` for missing.

    Example:
        >>> [format_float(v) for v in (None, 0.0, 7.15, 2.4e-7, float("inf"))]
        ['-', '0', '7.15', '2.40e-07', 'inf']
    """
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e4:
        return f"{value:.{digits + 1}g}"
    return f"{value:.{digits - 1}e}"


def shape_text(row: Row) -> str:
    """``4x8``, ``scalar``, ``-`` when neither side has the value; both shapes when they differ."""
    if row.torch_shape is None and row.onnx_shape is None:
        return "-"
    if row.status == "shape_mismatch":
        return f"{row.torch_shape} vs {row.onnx_shape}"
    shape = row.torch_shape if row.torch_shape is not None else row.onnx_shape
    return "x".join(str(d) for d in shape or []) or "scalar"


def _values(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:g}" for k, v in values.items())


def tolerance_text(report: Report) -> str:
    """How values were judged: ``atol=1e-4 rtol=1e-3``, by dtype, every override, the verdict."""
    text = f"atol={report.atol:g} rtol={report.rtol:g}"
    if report.dtype_tolerances:
        text += " (float32; other dtypes by their defaults)"
    for pattern, values in report.tolerances.items():
        text += f"  {pattern}: " + _values(values)
    return text + f"  verdict={report.verdict}"


def rule_text(report: Report, *, dot: str = "*") -> str:
    """The verdict rule: the bound each element's ``|onnx - torch|`` must keep, and its name.

    Args:
        report: The report.
        dot: The multiplication sign (``"·"`` in HTML).

    Example:
        >>> rule_text(Report("M", "dynamo", 1e-4, 1e-3, []))
        'verdict roundoff: |onnx - torch| <= atol + rtol*|torch| + min(4096*eps, rtol)*rms(torch)'
        >>> rule_text(Report("M", "dynamo", 1e-4, 1e-3, [], verdict="allclose"))
        'verdict allclose: |onnx - torch| <= atol + rtol*|torch|'
    """
    rule = f"verdict {report.verdict}: |onnx - torch| <= atol + rtol{dot}|torch|"
    if report.verdict == "roundoff":
        rule += f" + min({ROUNDOFF_FACTOR:g}{dot}eps, rtol){dot}rms(torch)"
    return rule


def overrides_text(report: Report) -> str:
    """The tolerance overrides that applied to compared values, or ``""`` when none did.

    Example:
        >>> r = Row("enc.attn", "enc.attn", 0, "", "leaf", "ok", True, 1e-5, 1e-6)
        >>> overrides_text(Report("M", "dynamo", 1e-7, 1e-6, [r],
        ...                       tolerances={"*.attn": {"atol": 1e-5}, "dec.*": {"atol": 1}}))
        "overrides: '*.attn' atol=1e-05 on 1 value"
    """
    counts = report.override_counts()
    if not counts:
        return ""
    parts = [
        f"{pattern!r} {_values(report.tolerances[pattern])} on {n} value{'s' if n != 1 else ''}"
        for pattern, n in counts.items()
    ]
    return "overrides: " + ", ".join(parts)


def _other_tolerances(report: Report) -> str:
    """Compared values judged by another dtype's default tolerances, or ``""``.

    Float16 values of a converted file, float64 ones: ``8 values at atol=0.01, rtol=0.01``.
    """
    if report.override_counts() or not report.dtype_tolerances:
        return ""  # overrides name their own
    counts: dict[tuple[float, float], int] = {}
    for row in report.rows:
        if row.passed is not None and (row.atol, row.rtol) != (report.atol, report.rtol):
            counts[(row.atol, row.rtol)] = counts.get((row.atol, row.rtol), 0) + 1
    return ", ".join(
        f"{n} value{'s' if n != 1 else ''} at atol={a:g}, rtol={r:g}"
        for (a, r), n in sorted(counts.items())
    )


def summary_line(report: Report) -> str:
    """One sentence: aligned or not, under which tolerances, and where the divergence starts.

    ``+ round-off`` follows the tolerances under the ``roundoff`` verdict (:func:`rule_text`
    says what it adds). The tolerance overrides that applied to compared values are named
    with the number of values each one applied to.
    """
    compared = [r for r in report.rows if r.passed is not None]
    failed = [r for r in report.rows if r.failed]
    missing = len(report.rows) - len(compared)
    tail = f", {missing} not compared" if missing else ""
    overrides = ", ".join(t for t in (overrides_text(report), _other_tolerances(report)) if t)
    roundoff = " + round-off" if report.verdict == "roundoff" else ""
    tolerance = f"atol={report.atol:g}, rtol={report.rtol:g}{roundoff}" + (
        f" ({overrides})" if overrides else ""
    )
    if not failed:
        return f"ALIGNED: {len(compared)} values within {tolerance}{tail}."
    head = f"DIVERGED: {len(failed)} of {len(compared)} values break {tolerance}{tail}; "
    return head + culprit_text(report) + "."


def where(row: Row) -> str:
    """A row's module as reports name it: path and class, the model's own code said so."""
    if row.kind == "output":
        return f"{row.display_name} (the model's own forward)"
    return f"{row.display_name} ({row.module_type})" if row.module_type else row.display_name


def _how(row: Row) -> str:
    if row.status == "shape_mismatch":
        return f"shape differs (torch {row.torch_shape} vs onnx {row.onnx_shape})"
    if row.metrics is None:
        return "its output has no ONNX value"
    return f"max_abs={format_float(row.metrics.max_abs if row.metrics else None)}"


_INTRODUCED = {
    "module": ("local", "introduced here"),
    "own_code": ("self", "introduced by its own code"),
    "with_submodules": ("local", "introduced here or in its submodules"),
}


def culprit_text(report: Report) -> str:
    """Where the divergence is introduced and, when elsewhere, where it is first seen.

    Example:
        >>> from fxalign.report.model import Metrics
        >>> m = Metrics(0.5, 0.1, 0.2, 0.5, 0.9, 20.0, 3, 8)
        >>> rows = [Row("attn.out", "attn.out", 0, "Linear", "leaf", "diverged", False, 1e-4,
        ...             1e-3, metrics=m),
        ...         Row("attn", "attn", 0, "Attention", "block", "diverged", False, 1e-4, 1e-3,
        ...             metrics=m, local=m, local_scope="own_code")]
        >>> culprit_text(Report("M", "dynamo", 1e-4, 1e-3, rows, first_divergence="attn",
        ...                     first_seen="attn.out", culprit_basis="introduced"))
        'first divergence: introduced in attn (Attention), max_abs=0.5, self=0.5 (introduced by its own code); first seen at attn.out (max_abs=0.5)'
    """  # noqa: E501
    seen_row = None if report.first_seen is None else report.row(report.first_seen)
    if report.culprit_basis == "accumulated" and seen_row is not None:
        return (
            "no module breaks tolerance on its own: the error accumulates over modules; "
            f"first seen at {where(seen_row)}, {_how(seen_row)}"
        )
    row = report.divergence or seen_row
    if row is None:
        return "no value breaks tolerance"
    text = f"first divergence: {where(row)}, {_how(row)}"
    if report.culprit_basis == "introduced" and row.local is not None:
        kind, words = _INTRODUCED[row.local_scope or "module"]
        if row.kind == "output":
            words = "introduced by the model's own forward"
            if row.local_scope == "with_submodules":  # rerun with modules the file lacks
                words += f" or a submodule it reran: {row.local_note}"
        text = (
            f"first divergence: introduced in {where(row)}, {_how(row)}, "
            f"{kind}={format_float(row.local.max_abs)} ({words})"
        )
    elif report.culprit_basis == "cumulative":
        why = row.local_note or "not computed"
        text += f"; no introduced error for it ({why}), so named by its cumulative error"
    if seen_row is not None and seen_row is not row:
        text += f"; first seen at {seen_row.display_name} ({_how(seen_row)})"
    return text


def _nodes_text(op: OpFinding, shown: int = 3) -> str:
    names = ", ".join(op.onnx_nodes[:shown])
    more = ", ..." if len(op.onnx_nodes) > shown else ""
    return f" ({len(op.onnx_nodes)} nodes: {names}{more})" if op.onnx_nodes else ""


def op_lines(report: Report) -> list[str]:
    """The drill-down's lines: the op, its source line, the ONNX nodes it became, its error.

    Empty when the report holds no drill-down (no culprit, or ``drill_down=False``).

    Example:
        >>> op = OpFinding("attn", "aten.floor_divide.default", "floor_divide", "net.py", 7,
        ...                "return y // 2", ["Div_1", "Cast_2"], ["Div", "Cast"])
        >>> for line in op_lines(Report("M", "torchscript", 1e-4, 1e-3, [], op=op)):
        ...     print(line)
        op: aten.floor_divide.default in attn at net.py:7
              return y // 2
          became ONNX: Div, Cast (2 nodes: Div_1, Cast_2)
    """
    op = report.op
    if op is None:
        return [f"op: not found: {report.op_note}"] if report.op_note else []
    where = f" at {op.location}" if op.location else ""
    lines = [f"op: {op.op} in {op.module_path or '(model)'}{where}"]
    if op.source:
        lines.append(f"      {op.source}")
    became = ", ".join(op.onnx_op_types) if op.onnx_op_types else "no ONNX node of its own"
    lines.append(f"  became ONNX: {became}{_nodes_text(op)}")
    if op.local is not None:
        m = op.local
        lines.append(
            f"  local max_abs={format_float(m.max_abs)}: {m.mismatched:,} of {m.numel:,} elements "
            f"out of tolerance (the first of {op.ops_compared} ops compared to break it)"
        )
    return lines


def repro_line(report: Report) -> str | None:
    """The repro bundle's line: where it is, whether it reproduces, how to run it.

    Example:
        >>> from fxalign.report.model import Repro
        >>> r = Repro("bundle", "attn", True, float("inf"), "reproduces in isolation")
        >>> repro_line(Report("M", "dynamo", 1e-4, 1e-3, [], repro=r))
        'repro: bundle (reproduces in isolation; run python bundle/repro.py)'
    """
    repro = report.repro
    if repro is None:
        return None
    run = f"; run python {repro.path}/repro.py" if repro.reproduces is not None else ""
    return f"repro: {repro.path} ({repro.note}{run})"
