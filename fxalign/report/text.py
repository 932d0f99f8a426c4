"""Render a :class:`~fxalign.report.model.Report` for people: terminal tables and plain text.

Nothing here computes a metric; everything shown comes from the report's data.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from fxalign.report.model import STATUS_LABELS, Report, Row
from fxalign.report.summary import format_float, shape_text, summary_line, tolerance_text
from fxalign.report.tree import TreeNode, module_tree

__all__ = ["print_report", "render_text", "render_tree", "renderables"]


_STATUS_STYLE = {
    "ok": "green",
    "diverged": "bold red",
    "shape_mismatch": "bold red",
    "missing_in_onnx": "yellow",
    "missing_in_torch": "yellow",
}
_STATUS_TEXT = {s: (STATUS_LABELS[s], style) for s, style in _STATUS_STYLE.items()}


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
            shape_text(row),
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
    """The terminal report as plain text (no colour codes).

    Args:
        report: The report.
        top: Show only the ``top`` rows with the largest ``max_abs`` (in execution order).
        width: Line width.
        tree: Add the module tree under the table.

    Returns:
        The text, lines ending in newlines.

    Example:
        >>> from fxalign import Report
        >>> print(render_text(Report("Net", "dynamo", 1e-4, 1e-3, rows=[])).splitlines()[-1])
        ALIGNED: 0 values within atol=0.0001, rtol=0.001.
    """
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
