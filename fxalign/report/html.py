"""Render a :class:`~fxalign.report.model.Report` as one self-contained HTML page.

The page has no external resources (no network, fonts or CDNs): the CSS and the small script in
``fxalign/report/templates`` are inlined, and the error plot is an inline SVG
(:mod:`fxalign.report.svg`). Everything is
rendered server side, so the page reads fine with scripts off; the script adds sorting,
filtering, the "failing only" toggle and tree-to-table navigation. Layout::

    banner   ALIGNED / DIVERGED, first divergence (path, type, max_abs, local error),
             tolerance and the overrides that applied, the verdict rule, model, exporter,
             instrumentation and coverage, notes
    plot     cumulative and local max_abs per row, log scale, first divergence marked
    table    every row; sortable, filterable, first divergence highlighted
    tree     module tree with the worst error in each subtree

Nothing here computes a metric; the tree comes from :func:`fxalign.report.tree.module_tree`.
"""

from __future__ import annotations

import html
import math
import os
from importlib import resources
from pathlib import Path

from fxalign.report.model import STATUS_LABELS, Report, Row
from fxalign.report.summary import (
    format_float,
    op_lines,
    overrides_text,
    repro_line,
    rule_text,
    shape_text,
    summary_line,
)
from fxalign.report.svg import plot_svg
from fxalign.report.tree import TreeNode, module_tree

__all__ = ["render_html", "write_html"]

_STATUS_CLASS = {
    "ok": "ok",
    "diverged": "bad",
    "shape_mismatch": "bad",
    "missing_in_onnx": "missing",
    "missing_in_torch": "missing",
}
_STATUS = {s: (STATUS_LABELS[s], css) for s, css in _STATUS_CLASS.items()}


def _e(value: object) -> str:
    """Escape text for HTML content and attribute values."""
    return html.escape(str(value), quote=True)


def _num_attr(value: float | None) -> str:
    """A sort key for the script: ``""`` for missing, JavaScript spellings for non-finite."""
    if value is None:
        return ""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(float(value))


def _template(name: str) -> str:
    templates = resources.files("fxalign.report").joinpath("templates")
    return templates.joinpath(name).read_text(encoding="utf-8")


def _where(row: Row) -> str:
    """``mid.clamp`` with its type, as shown in headings."""
    name = _e(row.display_name or "(model)")
    kind = f' <span class="type">({_e(row.module_type)})</span>' if row.module_type else ""
    return f"<code>{name}</code>{kind}"


# ---- banner --------------------------------------------------------------------------------
def _fact(label: str, value: str, note: str = "", cls: str = "") -> str:
    note_html = f'<div class="fact-note">{note}</div>' if note else ""
    return (
        f'<div class="fact {cls}"><div class="fact-label">{label}</div>'
        f'<div class="fact-value">{value}</div>{note_html}</div>'
    )


def _tolerance_facts(report: Report) -> list[str]:
    """The tolerance and the verdict rule that judged every value."""
    note = "allowed per element: atol + rtol·|torch|"
    overrides = overrides_text(report)
    if overrides:
        note += f"; {_e(overrides)}"
    tolerance = _fact(
        "tolerance", f"atol {_e(f'{report.atol:g}')} · rtol {_e(f'{report.rtol:g}')}", note
    )
    rule = _e(rule_text(report, dot="·").partition(": ")[2])
    rule = rule.replace("&lt;=", "&le;").replace("onnx - torch", "onnx &minus; torch")
    if report.verdict == "roundoff":
        why = (
            "plus the float round-off of the value's typical magnitude (eps of its dtype, "
            "rms of the PyTorch value); verdict='allclose' drops it"
        )
    else:
        why = "plain allclose: no allowance for float round-off"
    return [tolerance, _fact("verdict", _e(report.verdict), f"{rule}<br>{why}")]


_INTRODUCED_FACT = {
    "module": (
        "local max_abs",
        "introduced by this module alone (PyTorch module on the ONNX inputs)",
    ),
    "own_code": (
        "self max_abs",
        "introduced by this block's own code (its submodules answering with their ONNX values)",
    ),
    "with_submodules": (
        "local max_abs",
        "introduced by this block or its submodules (rerun whole on the ONNX inputs)",
    ),
}


def _divergence_facts(report: Report, first: Row) -> list[str]:
    m = first.metrics
    facts: list[str] = []
    if m is not None:
        note = "what reaches this module from everything before it"
        if report.atol > 0 and math.isfinite(m.max_abs):
            note = f"{_times(m.max_abs / report.atol)} &times; atol · {note}"
        facts.append(_fact("max_abs (cumulative)", _e(format_float(m.max_abs)), note, "big"))
        share = f"{m.mismatched:,} of {m.numel:,}"
        facts.append(
            _fact("elements out of tolerance", _e(share), f"max_rel {format_float(m.max_rel)}")
        )
    elif first.status == "shape_mismatch":
        facts.append(
            _fact(
                "mismatch",
                _e(f"shape torch {first.torch_shape} vs onnx {first.onnx_shape}"),
                "the values could not be compared element by element",
                "big",
            )
        )
    else:  # a block whose output the file lacks, named by what its code hands its submodules
        facts.append(_fact("output", "no ONNX value", _e(first.local_note or ""), "big"))
    label, what = _INTRODUCED_FACT.get(first.local_scope or "module", _INTRODUCED_FACT["module"])
    if first.local is not None:
        if first.kind == "output":
            what = "introduced by the model's own forward (its code on the ONNX values)"
            if first.local_scope == "with_submodules":
                what = (
                    "introduced by the model's own forward or a submodule it reran on the "
                    f"ONNX values: {_e(first.local_note or '')}"
                )
        facts.append(_fact(label, _e(format_float(first.local.max_abs)), what, "big"))
    else:
        facts.append(_fact(label, "-", _e(first.local_note or "introduced error not computed")))
    facts.extend(_tolerance_facts(report))
    return facts


def _times(ratio: float) -> str:
    """``71,500``; large or small ratios in scientific notation."""
    return f"{ratio:,.0f}" if 1 <= ratio < 1e7 else format_float(ratio)


def _aligned_facts(report: Report) -> list[str]:
    compared = [r for r in report.rows if r.metrics is not None]
    facts: list[str] = []
    if compared:
        worst = max(compared, key=lambda r: _sort_value(r.metrics.max_abs if r.metrics else None))
        assert worst.metrics is not None
        facts.append(
            _fact(
                "worst max_abs",
                _e(format_float(worst.metrics.max_abs)),
                f"at {_where(worst)}",
                "big",
            )
        )
    facts.extend(_tolerance_facts(report))
    return facts


def _sort_value(value: float | None) -> float:
    if value is None:
        return -math.inf
    return math.inf if math.isnan(value) else value


def _drill_html(report: Report) -> str:
    """The culprit's op, source line and ONNX nodes, and the repro bundle, under the facts."""
    op, lines, repro = report.op, op_lines(report), repro_line(report)
    if not lines and repro is None:
        return ""
    parts = []
    if op is not None:
        where = f" at <code>{_e(op.location)}</code>" if op.location else ""
        parts.append(
            f'<p class="op-head">op <code>{_e(op.op)}</code> in '
            f"<code>{_e(op.module_path or '(model)')}</code>{where}</p>"
        )
        if op.source:
            parts.append(f'<pre class="op-source">{_e(op.source)}</pre>')
        parts.extend(f"<p>{_e(line.strip())}</p>" for line in lines[2 if op.source else 1 :])
    else:
        parts.extend(f"<p>{_e(line)}</p>" for line in lines)
    if repro is not None:
        parts.append(f'<p class="op-repro">{_e(repro)}</p>')
    return f'\n  <div id="op" class="op">{"".join(parts)}</div>'


def _banner(report: Report) -> str:
    first = report.divergence
    failed = [r for r in report.rows if r.failed]
    if report.passed:
        verdict, cls = "ALIGNED", "aligned"
        headline = "ONNX agrees with PyTorch on every compared module"
        facts = _aligned_facts(report)
    else:
        verdict, cls = "DIVERGED", "diverged"
        facts = []
        seen = None if report.first_seen is None else report.row(report.first_seen)
        accumulated = first is None and report.culprit_basis == "accumulated"
        if first is None:  # no culprit: the first failing row is where it is seen
            first = seen or failed[0]
        index = report.rows.index(first)
        lead = {
            "introduced": "Introduced in",
            "cumulative": "First divergence (no introduced error computed):",
        }.get(report.culprit_basis or "", "First divergence:")
        if accumulated:
            lead = "No module breaks on its own; the error accumulates. First seen at"
        headline = (
            f"{lead} {_where(first)}"
            f'<span class="where"> — row #{index} of {len(report.rows)} in execution order, '
            f'<a href="#row-{index}">see the table</a></span>'
        )
        if seen is not None and seen is not first:
            at = report.rows.index(seen)
            headline += (
                f'<span class="where seen"> · first seen at '
                f'<a href="#row-{at}">{_e(seen.display_name)}</a></span>'
            )
        facts = _divergence_facts(report, first)
    cov = report.coverage
    meta = [
        f"model <b>{_e(report.model)}</b>",
        f"exporter <b>{_e(report.exporter)}</b>",
        f"instrumentation <b>{_e(report.instrumentation)}</b>",
        f"{'located' if report.instrumentation == 'attach' else 'markers on'} "
        f"{len(cov.marked)} modules",
        f"leaf coverage {cov.leaf_marked}/{cov.leaf_total} ({100 * cov.leaf_ratio:.0f}%)",
    ]
    if cov.unmarked:
        n = len(cov.unmarked)
        meta.append(f'<a href="#tree">{n} module{"s" if n != 1 else ""} without a marker</a>')
    notes = []
    if report.instrumentation_note:
        notes.append(f"fallback reason: {_e(report.instrumentation_note)}")
    if first is not None and first.notes:
        notes.append(f"{_e(first.display_name)}: " + _e("; ".join(first.notes)))
    notes.extend(_e(n) for n in report.notes)
    warnings = ""
    if report.exporter_warnings:
        items = "".join(f"<li>{_e(w)}</li>" for w in report.exporter_warnings)
        warnings = (
            f"<details><summary>{len(report.exporter_warnings)} exporter warning(s)</summary>"
            f"<ul>{items}</ul></details>"
        )
    notes_html = "".join(f"<li>{n}</li>" for n in notes)
    return f"""
<header id="banner" class="banner {cls}">
  <div class="verdict-line"><span id="verdict" class="verdict">{verdict}</span>
    <h1 id="headline">{headline}</h1></div>
  <p class="summary">{_e(summary_line(report).partition(": ")[2])}</p>
  <div class="facts">{"".join(facts)}</div>{_drill_html(report)}
  <p class="meta">{" · ".join(meta)}</p>
  <ul class="notes">{notes_html}</ul>{warnings}
  <nav class="jump">jump to: <a href="#plot-section">error plot</a> ·
    <a href="#table-section">all values</a> · <a href="#tree">module tree</a></nav>
</header>"""


# ---- table ---------------------------------------------------------------------------------
_COLUMNS = [
    # (header, numeric, title)
    ("#", True, "PyTorch execution order"),
    ("module", False, "qualified module path"),
    ("type", False, "module class"),
    ("shape", False, "shape of the PyTorch value"),
    ("dtype", False, "element type"),
    ("max_abs", True, "largest |onnx - torch| (cumulative)"),
    ("local max_abs", True, "error this module introduces on its own"),
    ("mean_abs", True, "mean |onnx - torch|"),
    ("rmse", True, "root mean square difference"),
    ("max_rel", True, "largest |onnx - torch| / (|torch| + 1e-12)"),
    ("cosine", True, "cosine similarity"),
    ("sqnr_db", True, "signal to quantisation noise ratio, dB"),
    ("status", False, "ok / DIVERGED / SHAPE / not in ONNX"),
    ("notes", False, "remarks on the row"),
]


def _num_cell(value: float | None, text: str | None = None) -> str:
    shown = format_float(value) if text is None else text
    return f'<td class="num" data-v="{_num_attr(value)}">{_e(shown)}</td>'


def _onnx_origin(row: Row) -> str:
    """Tooltip of the module cell: where the value lives in the ONNX graph."""
    if row.onnx_name is None:
        return "no ONNX value"
    node = f", computed by node {row.onnx_node}" if row.onnx_node else ""
    return f"ONNX tensor {row.onnx_name}{node}"


def _table_row(report: Report, i: int, row: Row) -> str:
    m, local = row.metrics, row.local
    label, cls = _STATUS[row.status]
    first = row.name == report.first_divergence
    classes = [cls] + (["first"] if first else [])
    notes = list(row.notes)
    if local is None and row.local_note:
        notes.append(f"local: {row.local_note}")
    local_cell = (
        _num_cell(local.max_abs)
        if local is not None
        else f'<td class="num" data-v="" title="{_e(row.local_note or "not computed")}">-</td>'
    )
    search = " ".join([row.display_name, row.module_type, label]).lower()
    status = f"{label} ← first divergence" if first else label
    return (
        f'<tr id="row-{i}" class="{" ".join(classes)}" data-i="{i}" '
        f'data-failed="{int(row.failed)}" data-path="{_e(row.module_path)}" '
        f'data-search="{_e(search)}">'
        f'<td class="num" data-v="{i}">{i}</td>'
        f'<td class="module" title="{_e(_onnx_origin(row))}">{_e(row.display_name)}</td>'
        f"<td>{_e(row.module_type)}</td>"
        f"<td>{_e(shape_text(row))}</td>"
        f"<td>{_e(row.torch_dtype or row.onnx_dtype or '-')}</td>"
        + _num_cell(m.max_abs if m else None)
        + local_cell
        + _num_cell(m.mean_abs if m else None)
        + _num_cell(m.rmse if m else None)
        + _num_cell(m.max_rel if m else None)
        + _num_cell(m.cosine if m else None, "-" if m is None else f"{m.cosine:.6f}")
        + _num_cell(m.sqnr_db if m else None, "-" if m is None else _db(m.sqnr_db))
        + f'<td class="status">{_e(status)}</td>'
        f'<td class="notes">{_e("; ".join(notes))}</td></tr>'
    )


def _db(value: float) -> str:
    return format_float(value) if not math.isfinite(value) else f"{value:.1f}"


def _table(report: Report) -> str:
    head = "".join(
        f'<th data-col="{c}" data-num="{int(num)}" title="{_e(title)}">'
        f'{_e(name)}<span class="arrow"></span></th>'
        for c, (name, num, title) in enumerate(_COLUMNS)
    )
    body = "".join(_table_row(report, i, r) for i, r in enumerate(report.rows))
    failing = sum(r.failed for r in report.rows)
    return f"""
<div class="controls">
  <input id="filter" type="search" placeholder="filter by module, type or status" size="40">
  <label><input id="failing-only" type="checkbox"> failing only ({failing})</label>
  <span id="row-count" class="count"></span>
</div>
<div class="table-wrap"><table id="rows">
<thead><tr>{head}</tr></thead>
<tbody>{body}</tbody>
</table></div>"""


# ---- tree ----------------------------------------------------------------------------------
def _tree_label(report: Report, node: TreeNode) -> str:
    name = _e(node.name) if node.path else f"{_e(report.model)} (model)"
    bits = [
        f'<button type="button" class="node-name" data-path="{_e(node.path)}" '
        f'title="{_e(node.path or "show all rows")}">{name}</button>'
    ]
    if node.module_type and node.path:
        bits.append(f'<span class="type">{_e(node.module_type)}</span>')
    if node.worst is not None:
        cls = "bad" if node.failed else "ok"
        bits.append(f'<span class="badge {cls}">worst {_e(format_float(node.worst))}</span>')
    if node.local is not None:
        bits.append(f'<span class="badge local">local {_e(format_float(node.local))}</span>')
    if node.failed:
        bits.append(f'<span class="failed">{node.failed} failing</span>')
    if node.is_first_divergence:
        bits.append('<span class="first-mark">★ first divergence</span>')
    elif node.has_first_divergence:
        bits.append('<span class="first-mark dim">▸ contains the first divergence</span>')
    if node.unmarked:
        bits.append(f'<span class="unmarked">no marker: {_e(node.unmarked)}</span>')
    return " ".join(bits)


def _tree_html(report: Report, node: TreeNode, depth: int = 0) -> str:
    classes = ["tree-node"]
    if node.has_first_divergence:
        classes.append("has-first")
    attrs = f'class="{" ".join(classes)}" data-path="{_e(node.path)}"'
    label = _tree_label(report, node)
    if not node.children:
        return f'<li {attrs}><span class="leaf">{label}</span></li>'
    is_open = depth < 1 or node.has_first_divergence  # the way to the first divergence
    children = "".join(_tree_html(report, c, depth + 1) for c in node.children)
    return (
        f"<li {attrs}><details{' open' if is_open else ''}><summary>{label}</summary>"
        f"<ul>{children}</ul></details></li>"
    )


# ---- page ----------------------------------------------------------------------------------
def _section(anchor: str, title: str, intro: str, content: str) -> str:
    return f'<section id="{anchor}"><h2>{title}</h2><p class="intro">{intro}</p>{content}</section>'


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page (inline CSS, script and SVG; no network).

    Args:
        report: The report to show.

    Returns:
        The HTML text.

    Example:
        >>> from fxalign import Report
        >>> page = render_html(Report(model="Net", exporter="dynamo", atol=1e-4, rtol=1e-3,
        ...                           rows=[]))
        >>> "ALIGNED" in page and "<script>" in page
        True
    """
    tree = module_tree(
        report.rows, first_divergence=report.first_divergence, unmarked=report.coverage.unmarked
    )
    verdict = "ALIGNED" if report.passed else "DIVERGED"
    title = f"fxalign: {verdict} · {report.model} · {report.exporter}"
    sections = [
        _section(
            "plot-section",
            "Error per module",
            "Cumulative max_abs is what reaches each module from everything before it; local "
            "max_abs is what the module adds on its own. A jump in the cumulative line marks "
            "the module that breaks. Click a point to find its row.",
            plot_svg(report),
        ),
        _section(
            "table-section",
            "All compared values",
            "One row per marked value, in PyTorch execution order (a block follows the modules "
            "inside it; model outputs last). Click a header to sort.",
            _table(report),
        ),
        _section(
            "tree",
            "Module tree",
            "Worst cumulative max_abs in each subtree. Click a module to filter the table.",
            '<p class="tree-buttons"><button type="button" id="expand-all">expand all</button> '
            '<button type="button" id="collapse-all">collapse all</button></p>'
            f'<ul class="tree" id="module-tree">{_tree_html(report, tree)}</ul>',
        ),
    ]
    versions = ", ".join(f"{_e(k)} {_e(v)}" for k, v in report.versions.items())
    footer = f"fxalign report, schema version {report.schema_version}" + (
        f" · {versions}" if versions else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>
{_template("report.css")}
</style>
</head>
<body>
{_banner(report)}
<main>
{"".join(sections)}
</main>
<footer>{footer}</footer>
<script>
{_template("report.js")}
</script>
</body>
</html>
"""


def write_html(report: Report, path: str | os.PathLike[str]) -> Path:
    """Write :func:`render_html` of ``report`` to ``path`` (UTF-8), replacing any file there.

    Returns:
        The path written.
    """
    out = Path(path)
    out.write_text(render_html(report), encoding="utf-8")
    return out
