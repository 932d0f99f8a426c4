"""Render a :class:`~fxalign.report.model.Report` for people: terminal tables and plain text.

The table fits the width it is given. Its columns, in order of importance::

    always:             #   ▶   module   max_abs   local   status
    while they fit:     type, shape, dtype, cosine, mean_abs, max_rel, rmse

The columns of the second line are left out from the end of that list until the table fits,
and a line under the table names the ones left out; a number or a status word is never cut.
The first divergence is marked ``▶`` in a column of its own. Nothing here computes a metric;
everything shown comes from the report's data.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from fxalign.report.model import STATUS_LABELS, Report, Row
from fxalign.report.summary import (
    format_float,
    op_lines,
    repro_line,
    rule_text,
    shape_text,
    summary_line,
    tolerance_text,
)
from fxalign.report.tree import TreeNode, module_tree

__all__ = ["FIRST_MARK", "print_report", "render_text", "render_tree", "renderables"]

FIRST_MARK = "▶"
"""The mark of the first divergence's row in the table."""

_STATUS_STYLE = {
    "ok": "green",
    "diverged": "bold red",
    "shape_mismatch": "bold red",
    "missing_in_onnx": "yellow",
    "missing_in_torch": "yellow",
}
_STATUS_TEXT = {s: (STATUS_LABELS[s], style) for s, style in _STATUS_STYLE.items()}

_Cell = Callable[[Row], "str | Text"]


def _metric(name: str) -> _Cell:
    return lambda row: format_float(getattr(row.metrics, name) if row.metrics else None)


def _local_cell(row: Row) -> Text:
    if row.local is None:
        return Text("-", style="dim")
    style = "bold red" if row.local.mismatched else ""
    return Text(format_float(row.local.max_abs), style=style)


def _status_cell(row: Row) -> Text:
    label, style = _STATUS_TEXT[row.status]
    return Text(label, style=style)


_COLUMNS: dict[str, tuple[str, _Cell]] = {
    # header -> (justify, cell); "#" and the first-divergence mark are filled in by _table
    "type": ("left", lambda row: row.module_type),
    "shape": ("left", shape_text),
    "dtype": ("left", lambda row: row.torch_dtype or row.onnx_dtype or "-"),
    "max_abs": ("right", _metric("max_abs")),
    "local": ("right", _local_cell),
    "mean_abs": ("right", _metric("mean_abs")),
    "rmse": ("right", _metric("rmse")),
    "max_rel": ("right", _metric("max_rel")),
    "cosine": ("right", lambda row: "-" if row.metrics is None else f"{row.metrics.cosine:.6f}"),
    "status": ("left", _status_cell),
}
_ORDER = (
    *("#", FIRST_MARK, "module", "type", "shape", "dtype", "max_abs", "local"),
    *("mean_abs", "rmse", "max_rel", "cosine", "status"),
)
"""Every column, in the order shown."""
_OPTIONAL = ("type", "shape", "dtype", "cosine", "mean_abs", "max_rel", "rmse")
"""Columns shown while the table fits, most important first (left out from the end)."""


def _table(report: Report, rows: Sequence[Row], columns: Sequence[str]) -> Table:
    table = Table(show_lines=False, header_style="bold", pad_edge=False, expand=False)
    for name in columns:
        justify = _COLUMNS[name][0] if name in _COLUMNS else ("right" if name == "#" else "left")
        module = name == "module"
        table.add_column(
            "" if name == FIRST_MARK else name,
            justify=justify,  # type: ignore[arg-type]
            no_wrap=not module,  # only module paths fold; numbers and words stay whole
            overflow="fold" if module else "ellipsis",
        )
    index = {id(r): i for i, r in enumerate(report.rows)}
    for row in rows:
        is_first = row.name == report.first_divergence
        cells: list[str | Text] = []
        for name in columns:
            if name == "#":
                cells.append(str(index[id(row)]))
            elif name == FIRST_MARK:
                cells.append(Text(FIRST_MARK if is_first else "", style="bold red"))
            elif name == "module":
                cells.append(Text(row.display_name))
            else:
                cells.append(_COLUMNS[name][1](row))
        table.add_row(*cells, style="on grey23" if is_first else None)
    return table


def _fitted_table(report: Report, rows: Sequence[Row], width: int) -> tuple[Table, list[str]]:
    """The table with as many optional columns as fit in ``width``, and those left out."""
    console = Console(width=width, color_system=None, force_terminal=False)
    wide = console.options.update(max_width=1 << 20)
    has_first = any(r.name == report.first_divergence for r in rows)
    left_out: list[str] = []
    while True:
        columns = [c for c in _ORDER if c not in left_out and (c != FIRST_MARK or has_first)]
        table = _table(report, rows, columns)
        fits = Measurement.get(console, wide, table).maximum <= width
        optional = [c for c in _OPTIONAL if c not in left_out]
        if fits or not optional:
            return table, list(reversed(left_out))
        left_out.append(optional[-1])


def _select(rows: list[Row], top: int | None) -> list[Row]:
    if top is None or top >= len(rows):
        return rows

    def key(r: Row) -> float:
        return -(r.metrics.max_abs if r.metrics else -1.0)

    chosen = set(map(id, sorted(rows, key=key)[:top]))
    return [r for r in rows if id(r) in chosen]


def _short_warning(text: str) -> str:
    """First sentence of a warning, keeping the ``[file:line, in module ...]`` fxalign added."""
    where = ""
    if text.endswith("]") and " [" in text:
        text, _, where = text.rpartition(" [")
        where = " [" + where
    first = text.split(". ")[0]
    return (first if first.endswith(".") else first + ".") + where


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


def _head(report: Report) -> list[RenderableType]:
    """The lines above the table: model, tolerances, instrumentation, fallback details."""
    head = Text()
    head.append("fxalign ", style="bold")
    head.append(f"{report.model}  exporter={report.exporter}  {tolerance_text(report)}")
    cov = report.coverage
    inst = Text(
        f"instrumentation: {report.instrumentation}"
        f"  {'located' if report.instrumentation == 'attach' else 'markers on'} "
        f"{len(cov.marked)} modules"
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
    return parts


def _tail(report: Report) -> list[RenderableType]:
    """The lines under the table: notes, warnings, unmarked modules, the verdict."""
    parts: list[RenderableType] = []
    first = report.divergence
    if first is not None and first.notes:
        parts.append(Text(f"{first.display_name}: " + "; ".join(first.notes), style="red"))
    parts.extend(_drill_parts(report))
    for note in report.notes:
        parts.append(Text(f"note: {note}", style="dim"))
    for warning in report.exporter_warnings[:5]:
        parts.append(Text(f"exporter warning: {_short_warning(warning)}", style="yellow"))
    if len(report.exporter_warnings) > 5:
        more = len(report.exporter_warnings) - 5
        parts.append(Text(f"... and {more} more exporter warnings (JSON report)", style="dim"))
    cov = report.coverage
    if cov.unmarked:
        shown = list(cov.unmarked.items())[:8]
        more = len(cov.unmarked) - len(shown)
        lines = [f"  {p or '(model)'}: {why}" for p, why in shown]
        if more:
            lines.append(f"  ... and {more} more (see the JSON report)")
        parts.append(Text("unmarked modules:\n" + "\n".join(lines), style="dim"))
    parts.append(Text(_rule_line(report), style="dim"))
    style = "bold green" if report.passed else "bold red"
    parts.append(Text(summary_line(report), style=style))
    return parts


def _drill_parts(report: Report) -> list[RenderableType]:
    """The culprit's op and source line, and the repro bundle, when the report has them."""
    parts: list[RenderableType] = [
        Text(line, style="red" if report.op is not None else "dim") for line in op_lines(report)
    ]
    repro = repro_line(report)
    if repro is not None:
        parts.append(Text(repro, style="red" if report.repro and report.repro.reproduces else ""))
    return parts


def _rule_line(report: Report) -> str:
    """The verdict rule, with how to switch to the other one."""
    if report.verdict == "roundoff":
        return f"{rule_text(report)}  (verdict='allclose': without the last term)"
    return f"{rule_text(report)}  (no allowance for float round-off)"


def renderables(
    report: Report, *, top: int | None = None, tree: bool = False, width: int = 160
) -> list[RenderableType]:
    """The pieces of the terminal report, for a rich ``Console``.

    Args:
        report: The report.
        top: Show only the ``top`` rows with the largest ``max_abs`` (in execution order).
        tree: Add the module tree under the table.
        width: Columns the table must fit in (see the module docstring for what is left out).

    Returns:
        Renderables to print in order.
    """
    parts = _head(report)
    rows = _select(report.rows, top)
    if top is not None and len(rows) < len(report.rows):
        parts.append(Text(f"showing the {len(rows)} worst of {len(report.rows)} rows", style="dim"))
    table, left_out = _fitted_table(report, rows, width)
    parts.append(table)
    if left_out:
        parts.append(
            Text(
                f"left out to fit {width} columns: {', '.join(left_out)} "
                "(a wider terminal, --html or --json show them)",
                style="dim",
            )
        )
    if tree:
        parts.append(render_tree(report))
    return parts + _tail(report)


def render_text(
    report: Report, *, top: int | None = None, width: int = 160, tree: bool = False
) -> str:
    """The terminal report as plain text (no colour codes).

    Args:
        report: The report.
        top: Show only the ``top`` rows with the largest ``max_abs`` (in execution order).
        width: Line width; the table drops its less important columns to fit it.
        tree: Add the module tree under the table.

    Returns:
        The text, lines ending in newlines.

    Example:
        >>> from fxalign import Report
        >>> print(render_text(Report("Net", "dynamo", 1e-4, 1e-3, rows=[])).splitlines()[-1])
        ALIGNED: 0 values within atol=0.0001, rtol=0.001 + round-off.
    """
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False)
    console.print(Group(*renderables(report, top=top, tree=tree, width=width)))
    return buffer.getvalue()


def print_report(
    report: Report, *, top: int | None = None, console: Console | None = None, tree: bool = False
) -> None:
    """Print the report to the terminal with colour, fitted to the console's width.

    Args:
        report: The report.
        top: Show only the ``top`` rows with the largest ``max_abs`` (in execution order).
        console: Where to print; default: the terminal, or 160 columns when output is piped.
        tree: Add the module tree under the table.
    """
    if console is None:
        console = Console()
        if not console.is_terminal:
            # Piped output (CI logs, files) has no width to fit; never squash module names.
            console = Console(width=160)
    console.print(Group(*renderables(report, top=top, tree=tree, width=console.width)))
