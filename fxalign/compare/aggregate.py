"""Rows of several input samples folded into one row per value, and the first divergence."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

from fxalign.names import MarkerName
from fxalign.report.model import CulpritBasis, Metrics, Row, SampleStats

__all__ = ["SampleAggregate", "first_divergence", "name_culprit"]


class SampleAggregate:
    """Folds the rows of one sample after another into one row per value.

    Rows are matched across samples by their structured marker name (:class:`MarkerName`),
    never by the text shown: two markers that display alike stay two rows. Only the current
    worst row of each value and running sums are kept, so memory does not grow with the
    number of samples. Each value's row is the one from its worst sample (failures first, then
    the largest ``max_abs``), with :class:`SampleStats` attached; its local error is the worst
    local error seen over the samples.

    Example:
        >>> from fxalign.names import MarkerName
        >>> def row(error):
        ...     return Row("fc", "fc", 0, "Linear", "leaf", "ok", True, 1e-4, 1e-3,
        ...                metrics=Metrics(error, 0, 0, 0, 1, 99, 0, 4))
        >>> agg = SampleAggregate()
        >>> agg.add(0, [row(1e-6)], [MarkerName("fc")])
        >>> agg.add(1, [row(3e-6)], [MarkerName("fc")])
        >>> [(r.name, r.samples.count, r.samples.worst_sample) for r in agg.rows()]
        [('fc', 2, 1)]
    """

    def __init__(self) -> None:
        self._rows: dict[Hashable, Row] = {}
        self._sums: dict[Hashable, tuple[int, int, float, float]] = {}
        self.count = 0

    @staticmethod
    def _badness(row: Row) -> tuple[int, float]:
        error = row.metrics.max_abs if row.metrics is not None else -1.0
        return (1 if row.failed else 0, error if not math.isnan(error) else math.inf)

    def add(
        self, index: int, rows: Sequence[Row], names: Sequence[MarkerName] | None = None
    ) -> None:
        """Fold in the rows of sample ``index``.

        Args:
            index: The sample's index (0 is the export input).
            rows: Its rows, from :func:`fxalign.compare.compare`.
            names: The structured name of each row, in the same order (what
                :func:`fxalign.compare.row_order` returns for the same values). ``None``:
                rows are matched by the structured fields they hold (module path, call
                index) and their shown name.

        Raises:
            ValueError: ``names`` and ``rows`` differ in length.
        """
        if names is not None and len(names) != len(rows):
            raise ValueError(f"{len(names)} names for {len(rows)} rows")
        self.count += 1
        keys: Sequence[Hashable] = (
            names if names is not None else [(r.module_path, r.call_index, r.name) for r in rows]
        )
        for key, row in zip(keys, rows, strict=True):
            error = row.metrics.max_abs if row.metrics is not None else None
            n, failed, total, worst = self._sums.get(key, (0, 0, 0.0, -math.inf))
            failed += bool(row.failed)
            if error is not None:
                n, total = n + 1, total + error
                worst = max(worst, error)
            self._sums[key] = (n, failed, total, worst)
            best = self._rows.get(key)
            local = _worse_local(best.local if best else None, row.local)
            if best is None or self._badness(row) > self._badness(best):
                row.samples = SampleStats(0, 0, 0.0, 0.0, index)
                self._rows[key] = row
                best = row
            best.local = local

    def rows(self) -> list[Row]:
        """The aggregated rows, in first-seen order, final outputs last."""
        out = []
        for key, row in self._rows.items():
            n, failed, total, worst = self._sums[key]
            index = row.samples.worst_sample if row.samples else 0
            row.samples = SampleStats(
                n, failed, worst if n else 0.0, total / n if n else 0.0, index
            )
            out.append(row)
        return [r for r in out if r.kind != "output"] + [r for r in out if r.kind == "output"]


def _worse_local(a: Metrics | None, b: Metrics | None) -> Metrics | None:
    if a is None or b is None:
        return a or b
    return b if b.max_abs > a.max_abs else a


def first_divergence(rows: Sequence[Row]) -> Row | None:
    """The first row, in execution order, that breaks tolerance (its cumulative error)."""
    return next((r for r in rows if r.failed), None)


def name_culprit(rows: Sequence[Row]) -> tuple[Row | None, CulpritBasis | None]:
    """The culprit: the breaking row whose own code breaks first, in execution order.

    Rows that break tolerance only through what reaches them (their introduced error within
    tolerance) inherited the error and are passed over. The others are ordered by
    :attr:`Row.break_at`, where their own code first got a value wrong (a block's inline code
    breaks before the submodule it feeds, whose row comes first), then by row order. A breaking
    row without an introduced error (its module could not be replayed: ``Row.local_note`` says
    why) is named on its cumulative error, the visible fallback, unless a row whose introduced
    error breaks at the same point explains it (a block whose code fed it a value the ONNX
    side does not hold). A block whose output has no ONNX value counts when the values its
    code hands its submodules break tolerance. When every breaking row
    inherited, the error grew by accumulation and no row is named.

    Returns:
        ``(row, basis)``; ``(None, None)`` when every value is within tolerance, ``(None,
        "accumulated")`` when no module introduces the break on its own.

    Example:
        >>> def row(name, failed, local_failed):
        ...     local = Metrics(1, 1, 1, 1, 1, 0, int(local_failed), 4)
        ...     return Row(name, name, 0, "M", "leaf", "diverged" if failed else "ok",
        ...                not failed, 1e-4, 1e-3, local=local)
        >>> culprit, basis = name_culprit([row("a", True, False), row("b", True, True)])
        >>> culprit.name, basis
        ('b', 'introduced')
        >>> name_culprit([row("a", True, False)])
        (None, 'accumulated')
    """
    if not any(r.failed for r in rows):
        return None, None
    # a block whose output the ONNX side lacks still breaks where its code's values do
    breaking = [r for r in rows if r.failed or (r.metrics is None and r.introduced_failed)]
    candidates = [
        (r.break_at is None, r.break_at or 0, r.local is None, i, r)
        for i, r in enumerate(breaking)
        if r.local is None or r.introduced_failed
    ]
    if not candidates:
        return None, "accumulated"
    row = min(candidates, key=lambda c: c[:4])[4]
    return row, "cumulative" if row.local is None else "introduced"
