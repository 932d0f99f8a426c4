"""Render a :class:`~fxalign.report.Report` for people: terminal tables and plain text.

Nothing here computes a metric; everything shown comes from the report's data.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from fxalign.compare import STATUS_LABELS, Row
from fxalign.report import Report
from fxalign.tree import TreeNode, module_tree

__all__ = ["format_float", "print_report", "render_text", "renderables", "summary_line"]


def format_float(value: float | None, *, digits: int = 3) -> str:
    """Compact number for tables: ``0``, ``1.23e-05``, ``inf``, ``-`` for missing."""
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


def _shape(row: Row) -> str:
    if row.torch_shape is None and row.onnx_shape is None:
        return "-"
    if row.status == "shape_mismatch":
        return f"{row.torch_shape} vs {row.onnx_shape}"
    shape = row.torch_shape if row.torch_shape is not None else row.onnx_shape
    return "x".join(str(d) for d in shape or []) or "scalar"


_STATUS_STYLE = {
    "ok": "green",
    "diverged": "bold red",
    "shape_mismatch": "bold red",
    "missing_in_onnx": "yellow",
    "missing_in_torch": "yellow",
}
_STATUS_TEXT = {s: (STATUS_LABELS[s], style) for s, style in _STATUS_STYLE.items()}


def tolerance_text(report: Report) -> str:
    """How tolerances were set: ``atol=1e-4 rtol=1e-3``, by dtype, with overrides."""
    text = f"atol={report.atol:g} rtol={report.rtol:g}"
    if report.dtype_tolerances:
        text += " (float32; other dtypes by their defaults)"
    for pattern, values in report.tolerances.items():
        text += f"  {pattern}: " + " ".join(f"{k}={v:g}" for k, v in values.items())
    return text


def summary_line(report: Report) -> str:
    """One sentence: aligned or not, and where it starts."""
    compared = [r for r in report.rows if r.passed is not None]
    failed = [r for r in report.rows if r.failed]
    missing = len(report.rows) - len(compared)
    tail = f", {missing} not compared" if missing else ""
    if not failed:
        return (
            f"ALIGNED: {len(compared)} values within atol={report.atol:g}, rtol={report.rtol:g}"
            f"{tail}."
        )
    first = report.divergence
    assert first is not None
    where = (
        f"{first.display_name} ({first.module_type})" if first.module_type else first.display_name
    )
    worst = first.metrics.max_abs if first.metrics else None
    how = f"max_abs={format_float(worst)}"
    if first.status == "shape_mismatch":
        how = f"shape differs (torch {first.torch_shape} vs onnx {first.onnx_shape})"
    local = ""
    if first.local is not None:
        introduced = "introduced here" if first.local.mismatched else "inherited from its inputs"
        local = f", local={format_float(first.local.max_abs)} ({introduced})"
    return (
        f"DIVERGED: {len(failed)} of {len(compared)} values break atol={report.atol:g}, "
        f"rtol={report.rtol:g}{tail}; first divergence: {where}, "
        f"{how}{local}."
    )


def _select(rows: list[Row], top: int | None) -> list[Row]:
    if top is None or top >= len(rows):
        return rows

    def key(r: Row) -> float:
        return -(r.metrics.max_abs if r.metrics else -1.0)

    chosen = set(map(id, sorted(rows, key=key)[:top]))
    return [r for r in rows if id(r) in chosen]


def _table(report: Report, rows: Iterable[Row]) -> Table:
    table = Table(show_lines=False, header_style="bold", pad_edge=False, expand=False)
    for name, justify in [
        ("#", "right"),
        ("module", "left"),
        ("type", "left"),
        ("shape", "left"),
        ("dtype", "left"),
        ("max_abs", "right"),
        ("local", "right"),
        ("mean_abs", "right"),
        ("rmse", "right"),
        ("max_rel", "right"),
        ("cosine", "right"),
        ("status", "left"),
    ]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    index = {id(r): i for i, r in enumerate(report.rows)}
    for row in rows:
        m = row.metrics
        status, style = _STATUS_TEXT[row.status]
        is_first = row.name == report.first_divergence
        module_cell = Text(row.display_name)
        label = f"{status}  <- first divergence" if is_first else status
        table.add_row(
            str(index[id(row)]),
            module_cell,
            row.module_type,
            _shape(row),
            row.torch_dtype or row.onnx_dtype or "-",
            format_float(m.max_abs if m else None),
            _local_cell(row),
            format_float(m.mean_abs if m else None),
            format_float(m.rmse if m else None),
            format_float(m.max_rel if m else None),
            "-" if m is None else f"{m.cosine:.6f}",
            Text(label, style=style),
            style="on grey23" if is_first else None,
        )
    return table


def _short_warning(text: str) -> str:
    """First sentence of a warning, keeping the ``[file:line, in module ...]`` fxalign added."""
    where = ""
    if text.endswith("]") and " [" in text:
        text, _, where = text.rpartition(" [")
        where = " [" + where
    first = text.split(". ")[0]
    return (first if first.endswith(".") else first + ".") + where


def _local_cell(row: Row) -> Text:
    if row.local is None:
        return Text("-", style="dim")
    style = "bold red" if row.local.mismatched else ""
    return Text(format_float(row.local.max_abs), style=style)


def render_tree(report: Report) -> Tree:
    """The module tree, indented: worst error in each subtree, own local error, the culprit."""
    root = module_tree(
        report.rows, first_divergence=report.first_divergence, unmarked=report.coverage.unmarked
    )

    def label(node: TreeNode) -> Text:
        text = Text(node.name or f"(model) {report.model}", style="bold" if not node.name else "")
        if node.module_type and node.name:
            text.append(f" {node.module_type}", style="dim")
        if node.worst is not None:
            text.append(f"  worst {format_float(node.worst)}", style="red" if node.failed else "")
        if node.local is not None:
            text.append(f"  local {format_float(node.local)}")
        if node.is_first_divergence:
            text.append("  <- first divergence", style="bold red")
        elif node.has_first_divergence:
            text.append("  (contains the first divergence)", style="red")
        if node.unmarked and not node.rows:
            text.append(f"  [{node.unmarked}]", style="dim")
        return text

    tree = Tree(label(root))

    def add(parent: Tree, node: TreeNode) -> None:
        for child in node.children:
            add(parent.add(label(child)), child)

    add(tree, root)
    return tree


def renderables(
    report: Report, *, top: int | None = None, tree: bool = False
) -> list[RenderableType]:
    """The pieces of the terminal report, for a rich ``Console``."""
    head = Text()
    head.append("fxalign ", style="bold")
    head.append(f"{report.model}  exporter={report.exporter}  {tolerance_text(report)}")
    cov = report.coverage
    inst = Text(
        f"instrumentation: {report.instrumentation}"
        f"  markers on {len(cov.marked)} modules"
        f"  leaf coverage {cov.leaf_marked}/{cov.leaf_total} ({100 * cov.leaf_ratio:.0f}%)"
        + (
            f"  samples {report.sample_count} (rows show each value's worst sample)"
            if report.sample_count > 1
            else ""
        ),
        style="dim",
    )
    parts: list[RenderableType] = [head, inst]
    if report.instrumentation == "fallback":
        blocks = {p: why for p, why in cov.eager.items() if p}
        lines = [
            f"torch.fx could not trace the whole model ({report.instrumentation_note}); "
            f"{len(cov.traced)} blocks were traced on their own, {len(blocks)} run their own "
            "forward (eager fallback) with their submodules marked"
        ]
        shown = list(blocks.items())[:8]
        lines += [f"  eager {p}: {why}" for p, why in shown]
        if len(blocks) > len(shown):
            lines.append(f"  ... and {len(blocks) - len(shown)} more (see the JSON report)")
        parts.append(Text("\n".join(lines), style="dim"))
    rows = _select(report.rows, top)
    if top is not None and len(rows) < len(report.rows):
        parts.append(Text(f"showing the {len(rows)} worst of {len(report.rows)} rows", style="dim"))
    parts.append(_table(report, rows))
    if tree:
        parts.append(render_tree(report))
    first = report.divergence
    if first is not None and first.notes:
        parts.append(Text(f"{first.display_name}: " + "; ".join(first.notes), style="red"))
    for note in report.notes:
        parts.append(Text(f"note: {note}", style="dim"))
    for warning in report.exporter_warnings[:5]:
        parts.append(Text(f"exporter warning: {_short_warning(warning)}", style="yellow"))
    if len(report.exporter_warnings) > 5:
        more = len(report.exporter_warnings) - 5
        parts.append(Text(f"... and {more} more exporter warnings (JSON report)", style="dim"))
    if cov.unmarked:
        shown = list(cov.unmarked.items())[:8]
        more = len(cov.unmarked) - len(shown)
        lines = [f"  {p or '(model)'}: {why}" for p, why in shown]
        if more:
            lines.append(f"  ... and {more} more (see the JSON report)")
        parts.append(Text("unmarked modules:\n" + "\n".join(lines), style="dim"))
    style = "bold green" if report.passed else "bold red"
    parts.append(Text(summary_line(report), style=style))
    return parts


def render_text(
    report: Report, *, top: int | None = None, width: int = 160, tree: bool = False
) -> str:
    """The terminal report as plain text (no colour codes)."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False)
    console.print(Group(*renderables(report, top=top, tree=tree)))
    return buffer.getvalue()


def print_report(
    report: Report, *, top: int | None = None, console: Console | None = None, tree: bool = False
) -> None:
    """Print the report to the terminal with colour."""
    if console is None:
        console = Console()
        if not console.is_terminal:
            # Piped output (CI logs, files) has no width to fit; never squash module names.
            console = Console(width=160)
    console.print(Group(*renderables(report, top=top, tree=tree)))
