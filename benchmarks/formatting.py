"""Formatting shared by the sections of the benchmark page: numbers, tables, result rows."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["STAGES", "each_row", "fmt_mb", "fmt_s", "fmt_x", "table"]


STAGES = ("instrument", "run_torch", "export", "extract", "run_onnx", "compare")


def fmt_s(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def fmt_x(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}x"


def fmt_mb(x: float | None) -> str:
    return "—" if x is None else f"{x / 2**20:.0f}"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*out, ""]


def each_row(results: dict[str, Any]) -> Iterable[tuple[dict[str, Any], str, dict[str, Any]]]:
    for model in results.get("models", []):
        for exporter, row in model.get("exporters", {}).items():
            yield model, exporter, row
