"""How align's cost grows with the model, and the TorchScript CSE pass with marker names."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.cases import BenchCase
from benchmarks.measure import best, plain_export, quiet, quiet_align
from fxalign.options import Exporter

__all__ = ["measure_jit_cse", "measure_scaling"]


def measure_scaling(
    build: Callable[[int], BenchCase],
    sizes: Sequence[int],
    exporters: Sequence[Exporter],
    repeats: int = 1,
) -> list[dict[str, Any]]:
    """``align`` on synthetic models of growing size: total and per-stage time per module.

    The plain export of each model is timed too, so that a cost growing faster than the
    model can be told apart: the exporter's own, or fxalign's.
    """
    out = []
    for size in sizes:
        case = build(size)
        modules = case.modules
        for exporter in exporters:
            totals: list[float] = []
            plain: list[float] = []
            stages: dict[str, list[float]] = {}
            report = None
            for _ in range(repeats):
                with tempfile.TemporaryDirectory(prefix="fxalign-scaling-") as tmp:
                    plain.append(plain_export(case, exporter, Path(tmp) / "plain.onnx"))
                start = time.perf_counter()
                report = quiet_align(case, exporter)
                totals.append(time.perf_counter() - start)
                for stage, seconds in (report.timings or {}).items():
                    stages.setdefault(stage, []).append(seconds)
            assert report is not None
            total = best(totals)
            out.append(
                {
                    "model": case.name,
                    "exporter": exporter,
                    "modules": modules,
                    "rows": len(report.rows),
                    "unmarked": len(report.coverage.unmarked) if report.coverage else None,
                    "instrumentation": report.instrumentation,
                    "align_s": total,
                    "per_module_ms": 1000 * total / modules,
                    "plain_export_s": best(plain),
                    "stages": {k: best(v) for k, v in stages.items()},
                }
            )
    return out


class _JitChain(torch.nn.Module):
    """``n`` additions, each followed by ``mark(x, i)`` (or nothing)."""

    def __init__(self, n: int, mark: Callable[[torch.Tensor, int], torch.Tensor] | None) -> None:
        super().__init__()
        self.n, self.mark = n, mark

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.n):
            x = x + 1
            if self.mark is not None:
                x = self.mark(x, i)
        return x


def measure_jit_cse(sizes: Sequence[int], repeats: int = 1) -> list[dict[str, Any]]:
    """Time the TorchScript exporter's CSE pass on traced chains with and without markers.

    The TorchScript exporter runs ``torch._C._jit_pass_cse`` on the traced graph. Each marker
    call leaves a string constant (its name) in that graph; this measures the pass alone on a
    copy of the graph, with ``n`` markers of distinct names (what ``instrument`` produces), of
    one shared name, and with no markers.
    """
    from fxalign.markers import DEBUG_OP

    variants: dict[str, Callable[[torch.Tensor, int], torch.Tensor] | None] = {
        "distinct names": lambda x, i: DEBUG_OP(x, f"m{i}"),
        "one name": lambda x, i: DEBUG_OP(x, "m"),
        "no markers": None,
    }
    out = []
    for n in sizes:
        row: dict[str, Any] = {"markers": n}
        for label, mark in variants.items():
            with quiet():
                graph = torch.jit.trace(
                    _JitChain(n, mark), (torch.zeros(2),), check_trace=False
                ).graph
            times = []
            for _ in range(repeats):
                copy = graph.copy()
                start = time.perf_counter()
                torch._C._jit_pass_cse(copy)
                times.append(time.perf_counter() - start)
            row[label] = best(times)
        out.append(row)
    return out
