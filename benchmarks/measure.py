"""The measurements: each function takes a :class:`BenchCase` and returns plain data.

Times are the best (minimum) wall-clock time of ``repeats`` runs in this process: on a shared
machine other work only ever adds time, so the minimum is the steadiest estimate of what the
code itself costs (plain and instrumented are treated alike). Peak memory is measured in a
fresh child process per measurement, in :mod:`benchmarks.memory`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import subprocess
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from benchmarks.cases import BenchCase
from fxalign import (
    align,
    export,
    extract,
    instrument_model,
    onnx_feeds,
)
from fxalign.names import MarkerName, encode_attribute
from fxalign.options import Exporter

__all__ = [
    "best",
    "machine_info",
    "measure_align",
    "measure_export",
    "new_workdir",
    "onnx_stats",
    "plain_export",
    "quiet",
    "quiet_align",
]

logger = logging.getLogger(__name__)


def best(values: Sequence[float]) -> float:
    """The estimate of a timing from its repeats: the minimum (see the module docstring)."""
    return float(min(values))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence exporter chatter (warnings, torch.onnx and onnxscript logs) while measuring.

    As ``fxalign align`` does: onnxscript's optimizer logs the constant folds it skips
    (``Evaluation failed: ...``), which change nothing.
    """
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# --------------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, OS, Python and package versions, fxalign's git commit."""
    import importlib.metadata

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = {}
    for dist in (
        "torch",
        "onnx",
        "onnxruntime",
        "onnxscript",
        "onnx-graphsurgeon",
        "transformers",
        "numpy",
    ):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode == 0:
            commit = out.stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": mem_gib,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "fxalign_commit": commit,
    }


# --------------------------------------------------------------------------------------------
# Model files
# --------------------------------------------------------------------------------------------
def onnx_stats(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Node count by op type and size on disk (external data included) of an ONNX file."""
    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
        for n in model.graph.node
    )
    size = Path(path).stat().st_size
    locations = set()
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    for location in locations:
        data = Path(path).parent / location
        if data.exists():
            size += data.stat().st_size
    return {"nodes": len(model.graph.node), "ops": dict(ops.most_common()), "bytes": size}


def plain_export(case: BenchCase, exporter: Exporter, path: Path) -> float:
    """``torch.onnx.export`` of the model itself, as a user would run it; returns seconds."""
    options: dict[str, Any] = {"verbose": False} if exporter == "dynamo" else {}
    start = time.perf_counter()
    with quiet():
        torch.onnx.export(
            case.model,
            case.args,
            str(path),
            kwargs=case.kwargs or None,
            dynamo=exporter == "dynamo",
            **options,
        )
    return time.perf_counter() - start


def measure_export(
    case: BenchCase, exporter: Exporter, repeats: int, workdir: Path
) -> dict[str, Any]:
    """Plain export vs instrumented export: best time, node counts by op type, file size.

    The two exports alternate (and swap order every repeat) so that drift on a shared machine
    hits both alike. Leaves ``plain.onnx`` and ``instrumented.onnx`` in ``workdir``.
    """
    start = time.perf_counter()
    result = instrument_model(case.model, case.args, case.kwargs)
    instrument_s = time.perf_counter() - start
    plain_path, instr_path = workdir / "plain.onnx", workdir / "instrumented.onnx"
    plain_times: list[float] = []
    instr_times: list[float] = []

    aliases: dict[MarkerName, MarkerName] = {}

    def run_instrumented() -> None:
        with quiet():
            out = export(
                result.module, case.args, instr_path, kwargs=case.kwargs, exporter=exporter
            )
        instr_times.append(out.seconds)
        aliases.update(out.aliases)

    for i in range(repeats):
        if i % 2 == 0:
            plain_times.append(plain_export(case, exporter, plain_path))
            run_instrumented()
        else:
            run_instrumented()
            plain_times.append(plain_export(case, exporter, plain_path))
    start = time.perf_counter()
    extracted = extract(instr_path, aliases)
    debug_path = workdir / "debug.onnx"
    extracted.save(debug_path)
    extract_s = time.perf_counter() - start
    plain_s, instr_s = best(plain_times), best(instr_times)
    return {
        "instrumentation": result.method,
        "instrument_s": instrument_s,
        "plain_s": plain_s,
        "instrumented_s": instr_s,
        "ratio": instr_s / plain_s,
        "plain_times": plain_times,
        "instrumented_times": instr_times,
        "plain": onnx_stats(plain_path),
        "instrumented": onnx_stats(instr_path),
        "debug": onnx_stats(debug_path),
        "markers": len(extracted.tensor_of),
        "marked_tensors": len(set(extracted.tensor_of.values())),
        "aliases": {encode_attribute(a): encode_attribute(t) for a, t in aliases.items()},
        "extract_s": extract_s,
    }


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------
def _torch_forward_s(case: BenchCase, repeats: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            case.model(*case.args, **case.kwargs)
            times.append(time.perf_counter() - start)
    return best(times)


def _ort_forward_s(model_path: Path, feeds: Mapping[str, np.ndarray], repeats: int) -> float:
    """Load a session and run once, in this process (what a plain check costs)."""
    import onnxruntime as ort

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        session.run(None, dict(feeds))
        times.append(time.perf_counter() - start)
        del session
    return best(times)


def quiet_align(case: BenchCase, exporter: Exporter, **options: Any) -> Any:
    """``fxalign.align`` on a case, exporter chatter silenced; returns the report."""
    with quiet():
        return align(case.model, case.args, case.kwargs, exporter=exporter, **options)


def measure_align(
    case: BenchCase, exporter: Exporter, repeats: int, workdir: Path
) -> dict[str, Any]:
    """End-to-end :func:`fxalign.align` vs the floor: plain export + torch forward + ORT forward.

    Each repeat measures the floor (the ORT forward includes loading the session, as ``align``
    has to), then ``align`` (default options: the plain export first, markers only when it
    does not align), then ``align(local=False)`` (what the local error costs), the marker mode
    (``attach=False``) and the two attach modes, so that drift on a shared machine hits them
    alike.
    """
    plain_path = workdir / "floor.onnx"
    totals: list[float] = []
    no_local: list[float] = []
    floors: dict[str, list[float]] = {"plain_export_s": [], "torch_forward_s": [], "ort_s": []}
    stages: dict[str, list[float]] = {}
    on_file: list[float] = []
    on_file_stages: dict[str, list[float]] = {}
    export_attach: list[float] = []
    markers: list[float] = []
    report = attached = None
    for _ in range(repeats):
        floors["plain_export_s"].append(plain_export(case, exporter, plain_path))
        floors["torch_forward_s"].append(_torch_forward_s(case, 1))
        feeds = onnx_feeds(plain_path, case.args, case.kwargs, forward=case.model.forward)
        floors["ort_s"].append(_ort_forward_s(plain_path, feeds, 1))
        start = time.perf_counter()
        report = quiet_align(case, exporter)
        totals.append(time.perf_counter() - start)
        for stage, seconds in (report.timings or {}).items():
            stages.setdefault(stage, []).append(seconds)
        start = time.perf_counter()
        quiet_align(case, exporter, local=False)
        no_local.append(time.perf_counter() - start)
        start = time.perf_counter()
        quiet_align(case, exporter, attach=False)
        markers.append(time.perf_counter() - start)
        # The attach modes: the plain file just exported, and export-and-attach.
        start = time.perf_counter()
        attached = quiet_align(case, exporter, onnx=plain_path)
        on_file.append(time.perf_counter() - start)
        for stage, seconds in (attached.timings or {}).items():
            on_file_stages.setdefault(stage, []).append(seconds)
        start = time.perf_counter()
        quiet_align(case, exporter, attach=True)
        export_attach.append(time.perf_counter() - start)
    assert report is not None and attached is not None
    floor_times = [sum(parts) for parts in zip(*floors.values(), strict=True)]
    floor, total = best(floor_times), best(totals)
    # A given file's floor has no export: one PyTorch and one ORT forward (session load + run).
    file_floor = best(
        [t + o for t, o in zip(floors["torch_forward_s"], floors["ort_s"], strict=True)]
    )
    compared = [r for r in report.rows if r.metrics is not None]
    located = [r for r in attached.rows if r.metrics is not None]
    return {
        "align_s": total,
        "align_times": totals,
        "stages": {k: best(v) for k, v in stages.items()},
        "floor_s": floor,
        "floor_times": floor_times,
        "floor": {k: best(v) for k, v in floors.items()},
        "ratio": total / floor,
        "no_local_s": best(no_local),
        "no_local_ratio": best(no_local) / floor,
        "markers_s": best(markers),
        "markers_ratio": best(markers) / floor,
        "instrumentation": report.instrumentation,
        "rows": len(report.rows),
        "compared": len(compared),
        "passed": report.passed,
        "first_divergence": report.first_divergence,
        "worst_max_abs": max((r.metrics.max_abs for r in compared if r.metrics), default=None),
        "attach": {
            "onnx_s": best(on_file),
            "onnx_floor_s": file_floor,
            "onnx_ratio": best(on_file) / file_floor,
            "onnx_stages": {k: best(v) for k, v in on_file_stages.items()},
            "onnx_floor": {
                "torch_forward_s": best(floors["torch_forward_s"]),
                "ort_s": best(floors["ort_s"]),
            },
            "elements_compared": sum(r.metrics.numel for r in located if r.metrics),
            "export_attach_s": best(export_attach),
            "export_attach_ratio": best(export_attach) / floor,
            "rows": len(attached.rows),
            "compared": len(located),
            "passed": attached.passed,
            "first_divergence": attached.first_divergence,
        },
    }


def new_workdir(prefix: str = "fxalign-bench-") -> tempfile.TemporaryDirectory[str]:
    """A private temporary directory for the model files of one measurement."""
    return tempfile.TemporaryDirectory(prefix=prefix)
