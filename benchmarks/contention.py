"""The loaded-machine case: ``align`` while CPU-burning helper processes hold every core.

A shared CI runner has other CPU-bound work on it. Thread pools sized for an idle machine can
then collapse (a stage 10x slower) where single-threaded Python only slows down (the plain
export, mostly Python, 1.4x). :func:`measure_contention` times the plain export, one PyTorch
forward and every ``align`` stage on a quiet machine and again with ``burners`` helper
processes (one per usable core by default) spinning, and relates each stage's slowdown to the
plain export's: a ratio near 1 is a stage that slows down like Python does, a large one a
thread pool that collapses. A third condition runs ``align`` inside
:func:`fxalign.threads.torch_threads` (PyTorch's threads bounded by the free CPUs), what
bounding them inside the pipeline would give.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.cases import BenchCase
from benchmarks.measure import best, plain_export, quiet_align
from fxalign.options import Exporter
from fxalign.threads import torch_threads, usable_cpus

__all__ = ["CONDITIONS", "burning", "measure_contention"]

CONDITIONS = ("quiet", "loaded", "loaded, torch threads bounded")
"""The three conditions, in the order they are measured."""

_BURN = "while True:\n    pass\n"


@contextlib.contextmanager
def burning(processes: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``processes`` helper processes that each keep one CPU busy until the block ends."""
    procs = [subprocess.Popen([sys.executable, "-c", _BURN]) for _ in range(processes)]
    try:
        time.sleep(0.5)  # let the scheduler spread them
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def _torch_forward(case: BenchCase) -> float:
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        case.model(*case.args, **case.kwargs)
    return time.perf_counter() - start


def _one_condition(
    case: BenchCase, exporter: Exporter, repeats: int, workdir: Path, bounded: bool
) -> dict[str, Any]:
    """Best plain export, PyTorch forward and ``align`` stage times over ``repeats``."""
    times: dict[str, list[float]] = {}

    def add(key: str, seconds: float) -> None:
        times.setdefault(key, []).append(seconds)

    wrap: Callable[[], contextlib.AbstractContextManager[Any]] = (
        torch_threads if bounded else contextlib.nullcontext
    )
    for _ in range(repeats):
        add("plain export", plain_export(case, exporter, workdir / "contention.onnx"))
        add("torch forward", _torch_forward(case))
        start = time.perf_counter()
        with wrap():
            report = quiet_align(case, exporter)
        add("align", time.perf_counter() - start)
        for stage, seconds in (report.timings or {}).items():
            if stage != "total":
                add(stage, seconds)
    return {key: best(values) for key, values in times.items()}


def measure_contention(
    case: BenchCase,
    exporter: Exporter,
    repeats: int,
    workdir: Path,
    burners: int | None = None,
) -> dict[str, Any]:
    """Stage times quiet, loaded, and loaded with PyTorch's threads bounded.

    Args:
        case: The model.
        exporter: The exporter.
        repeats: Runs per condition (the best is kept).
        workdir: Where the plain export is written.
        burners: Helper processes (default: one per usable core).

    Returns:
        ``{"burners", "conditions": {condition: {stage: s}}, "slowdown": {stage: loaded /
        quiet}, "relative": {stage: slowdown / the plain export's}, "bounded_slowdown": ...}``.
    """
    burners = usable_cpus() if burners is None else burners
    quiet_align(case, exporter)  # warm: one-time costs are not measured
    conditions: dict[str, dict[str, float]] = {}
    conditions[CONDITIONS[0]] = _one_condition(case, exporter, repeats, workdir, False)
    with burning(burners):
        conditions[CONDITIONS[1]] = _one_condition(case, exporter, repeats, workdir, False)
        conditions[CONDITIONS[2]] = _one_condition(case, exporter, repeats, workdir, True)
    quiet = conditions[CONDITIONS[0]]

    def slowdowns(condition: str) -> dict[str, float]:
        got = conditions[condition]
        return {k: got[k] / quiet[k] for k in quiet if k in got and quiet[k] > 0}

    slowdown = slowdowns(CONDITIONS[1])
    export_slowdown = slowdown.get("plain export") or 1.0
    return {
        "model": case.name,
        "exporter": exporter,
        "burners": burners,
        "usable_cpus": usable_cpus(),
        "conditions": conditions,
        "slowdown": slowdown,
        "relative": {k: v / export_slowdown for k, v in slowdown.items()},
        "bounded_slowdown": slowdowns(CONDITIONS[2]),
    }
