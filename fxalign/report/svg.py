"""The HTML report's error plot: one inline SVG of max_abs per row, log scale.

Rows run left to right in execution order. Each row has a circle for its cumulative
``max_abs`` and, when computed, a diamond for its local one; each series is joined by a line.
A dashed line marks ``atol`` and a vertical line the first divergence. Values off the log
scale are drawn on a band and not joined: zeros on the bottom band (where rows that were not
compared get a cross), inf and NaN on the top band, values below the lowest decade shown
(16 decades at most) on the lowest grid line. Nothing here computes a metric.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

from fxalign.report.model import STATUS_LABELS, Report, Row
from fxalign.report.summary import format_float

__all__ = ["plot_svg"]

_W, _H = 1000, 280
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 20, 30, 40
_Y_INF, _Y_HI, _Y_LO, _Y_ZERO = _TOP, _TOP + 18, _H - _BOTTOM - 18, _H - _BOTTOM


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _log_range(report: Report) -> tuple[int, int]:
    values = [report.atol] if report.atol > 0 else []
    for row in report.rows:
        for m in (row.metrics, row.local):
            if m is not None and math.isfinite(m.max_abs) and m.max_abs > 0:
                values.append(m.max_abs)
    if not values:
        return -8, 0
    lo = math.floor(math.log10(min(values)))
    hi = math.ceil(math.log10(max(values)))
    if hi <= lo:
        hi = lo + 1
    return max(lo, hi - 16), hi


@dataclass(frozen=True)
class _Scale:
    """Row index and error to plot coordinates."""

    n: int
    lo: int
    hi: int

    def x(self, i: int) -> float:
        step = (_W - _LEFT - _RIGHT) / self.n
        return _LEFT + (i + 0.5) * step

    def y(self, value: float) -> tuple[float, str]:
        """Vertical position and how the value was drawn (``""`` when not clamped)."""
        if math.isnan(value) or value == math.inf:
            return _Y_INF, "inf" if value == math.inf else "nan"
        if value <= 0:
            return _Y_ZERO, "0"
        exponent = math.log10(value)
        if exponent < self.lo:
            return _Y_LO, f"below 1e{self.lo}"
        return _Y_LO - (exponent - self.lo) / (self.hi - self.lo) * (_Y_LO - _Y_HI), ""


def _axes(report: Report, s: _Scale) -> list[str]:
    """Decade grid, the 0 and inf/nan bands, the atol line, row ticks, axis labels."""
    parts: list[str] = []
    every = max(1, math.ceil((s.hi - s.lo) / 8))
    for k in range(s.lo, s.hi + 1, every):
        y, _ = s.y(10.0**k)
        parts.append(
            f'<line class="grid" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="tick" x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">1e{k}</text>'
        )
    for y, label in ((_Y_ZERO, "0"), (_Y_INF, "inf/nan")):
        parts.append(
            f'<line class="band" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y}" y2="{y}"/>'
            f'<text class="tick" x="{_LEFT - 6}" y="{y + 4}" text-anchor="end">{label}</text>'
        )
    if report.atol > 0:
        y, how = s.y(report.atol)
        if not how:
            parts.append(
                f'<line class="atol" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
                f'<text class="atol-label" x="{_W - _RIGHT - 4}" y="{y - 4:.1f}" '
                f'text-anchor="end">atol {_e(f"{report.atol:g}")}</text>'
            )
    for i in range(0, s.n, max(1, math.ceil(s.n / 20))):
        parts.append(
            f'<text class="tick" x="{s.x(i):.1f}" y="{_H - _BOTTOM + 16}" '
            f'text-anchor="middle">{i}</text>'
        )
    parts.append(
        f'<text class="axis-label" x="{(_LEFT + _W - _RIGHT) / 2:.0f}" y="{_H - 6}" '
        f'text-anchor="middle">row # (PyTorch execution order)</text>'
        f'<text class="axis-label" x="14" y="{(_TOP + _H - _BOTTOM) / 2:.0f}" '
        f'text-anchor="middle" transform="rotate(-90 14 {(_TOP + _H - _BOTTOM) / 2:.0f})">'
        f"max_abs (log)</text>"
    )
    return parts


def _first_marker(report: Report, s: _Scale) -> list[str]:
    first_index = next(
        (i for i, r in enumerate(report.rows) if r.name == report.first_divergence), None
    )
    if first_index is None:
        return []
    x = s.x(first_index)
    anchor, dx = ("end", -6) if x > _W / 2 else ("start", 6)
    label = report.rows[first_index].display_name
    return [
        f'<line id="first-marker" class="first" x1="{x:.1f}" x2="{x:.1f}" '
        f'y1="{_TOP - 12}" y2="{_Y_ZERO}"/>'
        f'<text class="first-label" x="{x + dx:.1f}" y="{_TOP - 16}" '
        f'text-anchor="{anchor}">first divergence: {_e(label)}</text>'
    ]


def _lines(report: Report, s: _Scale) -> list[str]:
    """The cumulative and local series, joined on the log scale only."""
    parts: list[str] = []
    for series, cls in (("metrics", "cum"), ("local", "local")):
        path: list[str] = []
        pen_down = False
        for i, row in enumerate(report.rows):
            m = row.metrics if series == "metrics" else row.local
            if m is None:
                pen_down = False
                continue
            y, how = s.y(m.max_abs)
            if how:  # off the log scale: mark the point, draw no slope to it
                pen_down = False
                continue
            path.append(f"{'L' if pen_down else 'M'}{s.x(i):.1f},{y:.1f}")
            pen_down = True
        if path:
            parts.append(f'<path class="line {cls}" d="{" ".join(path)}"/>')
    return parts


def _points(i: int, row: Row, s: _Scale) -> list[str]:
    """Row ``i``'s points, each a link to its table row with a tooltip."""
    x, name = s.x(i), row.display_name
    if row.metrics is None and row.local is None:
        fail = " fail" if row.failed else ""
        return [
            f'<a href="#row-{i}" data-row="{i}"><text class="point missing{fail}" '
            f'x="{x:.1f}" y="{_Y_ZERO + 4}" text-anchor="middle">&times;<title>#{i} '
            f"{_e(name)}: not compared ({_e(STATUS_LABELS[row.status])})</title></text></a>"
        ]
    parts: list[str] = []
    for m, cls in ((row.metrics, "cum"), (row.local, "local")):
        if m is None:
            continue
        y, how = s.y(m.max_abs)
        state = " fail" if (cls == "cum" and row.failed) else ""
        clamp = " clamped" if how else ""
        what = "cumulative" if cls == "cum" else "local"
        tip = f"#{i} {name} ({row.module_type}): {what} max_abs {format_float(m.max_abs)}"
        if how:
            tip += f" (drawn on the {how} line)"
        if cls == "cum":
            tag, geometry = "circle", f'cx="{x:.1f}" cy="{y:.1f}" r="3.5"'
        else:  # a diamond
            tag, geometry = (
                "rect",
                f'x="{x - 3:.1f}" y="{y - 3:.1f}" width="6" height="6" '
                f'transform="rotate(45 {x:.1f} {y:.1f})"',
            )
        parts.append(
            f'<a href="#row-{i}" data-row="{i}"><{tag} {geometry} '
            f'class="point {cls}{state}{clamp}"><title>{_e(tip)}</title></{tag}></a>'
        )
    return parts


_LEGEND = (
    '<div class="legend"><span class="key cum">●</span> cumulative max_abs '
    '<span class="key fail">●</span> outside tolerance '
    '<span class="key local">◆</span> local max_abs (this module alone) '
    '<span class="key atol">- -</span> atol '
    '<span class="key missing">&times;</span> not compared · '
    "zeros sit on the 0 line, inf/NaN on the top line</div>"
)


def plot_svg(report: Report) -> str:
    """The plot as an inline ``<svg>`` element followed by its legend.

    Args:
        report: The report.

    Returns:
        HTML text; a short paragraph instead when the report has no rows.
    """
    n = len(report.rows)
    if n == 0:
        return '<p class="empty">No rows to plot.</p>'
    s = _Scale(n, *_log_range(report))
    parts = _axes(report, s) + _first_marker(report, s) + _lines(report, s)
    for i, row in enumerate(report.rows):
        parts.extend(_points(i, row, s))
    return (
        f'<svg id="plot" class="plot" viewBox="0 0 {_W} {_H}" role="img" '
        f'aria-label="max_abs per row, log scale" data-rows="{n}">'
        + "".join(parts)
        + "</svg>"
        + _LEGEND
    )
