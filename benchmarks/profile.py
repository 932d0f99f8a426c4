"""Where export time goes: a cProfile breakdown of plain vs instrumented export by phase."""

from __future__ import annotations

import cProfile
import pstats
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.cases import BenchCase
from fxalign.export import export
from fxalign.instrument import instrument_model
from fxalign.options import Exporter

__all__ = ["PHASES", "profile_export"]

PHASES: dict[Exporter, dict[str, str]] = {
    "dynamo": {
        "torch.export (trace)": "_trace.py:*(_export_to_aten_ir)",
        "decompositions": "exported_program.py:*(run_decompositions)",
        "type promotion pass": "_fx_passes.py:*(insert_type_promotion_nodes)",
        "translate to ONNX": "_core.py:*(_translate_fx_graph)",
        "onnxscript optimizer": "_optimizer.py:*(optimize_ir)",
        "save": "_onnx_program.py:*(save)",
        "marker calls (_mark)": "markers.py:*(_mark)",
    },
    "torchscript": {
        "jit trace": "utils.py:*(_create_jit_graph)",
        "jit trace + ONNX passes and symbolics": "utils.py:*(_model_to_graph)",
        "serialize": "~:0(<built-in method torch._C._export_onnx>)",
        "marker calls (_mark)": "markers.py:*(_mark)",
    },
}
"""Per exporter: phase label -> ``file:line(function)`` pattern (``*`` matches the line)."""


def _cumulative(stats: pstats.Stats, pattern: str) -> float:
    file_part, _, func_part = pattern.partition(":")
    best = 0.0
    for (path, line, name), entry in stats.stats.items():  # type: ignore[attr-defined]
        key = f"{line}({name})"
        if not (path.endswith(file_part) or path == file_part):
            continue
        if func_part.startswith("*"):
            if not key.endswith(func_part[1:]):
                continue
        elif key != func_part:
            continue
        best = max(best, float(entry[3]))
    return best


def profile_export(
    case: BenchCase, exporter: Exporter, repeats: int, workdir: Path
) -> dict[str, Any]:
    """Export plainly and instrumented under cProfile; time per phase (median of ``repeats``).

    cProfile slows Python-heavy phases more than native ones, so compare the two columns with
    each other, not with the unprofiled times.

    Returns:
        ``{"phases": {phase: {"plain": s, "instrumented": s}}, "total": {...}}``.
    """
    result = instrument_model(case.model, case.args, case.kwargs)
    modules = {"plain": case.model, "instrumented": result.module}
    samples: dict[str, dict[str, list[float]]] = {"plain": {}, "instrumented": {}}
    for _ in range(repeats):
        for label, module in modules.items():
            profiler = cProfile.Profile()
            start = time.perf_counter()
            profiler.enable()
            export(
                module,
                case.args,
                workdir / f"profile-{label}.onnx",
                kwargs=case.kwargs,
                exporter=exporter,
            )
            profiler.disable()
            total = time.perf_counter() - start
            stats = pstats.Stats(profiler)
            samples[label].setdefault("total", []).append(total)
            for phase, pattern in PHASES[exporter].items():
                samples[label].setdefault(phase, []).append(_cumulative(stats, pattern))
    phases = {
        phase: {label: statistics.median(samples[label][phase]) for label in samples}
        for phase in [*PHASES[exporter], "total"]
    }
    return {"exporter": exporter, "model": case.name, "phases": phases}
