"""The measurements: each function takes a :class:`BenchCase` and returns plain data.

Times are the best (minimum) wall-clock time of ``repeats`` runs in this process: on a shared
machine other work only ever adds time, so the minimum is the steadiest estimate of what the
code itself costs (plain and instrumented are treated alike). Peak memory of ONNX Runtime
is measured in a fresh child process per measurement (``VmHWM`` from ``/proc/self/status``),
because ORT allocates natively, where ``tracemalloc`` cannot see it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from benchmarks.cases import BenchCase
from fxalign import (
    align,
    compare,
    export,
    extract,
    instrument_model,
    onnx_feeds,
    run_onnx,
    run_torch,
)
from fxalign.markers import DOMAIN, OP_TYPE
from fxalign.names import MarkerName, decode_attribute, encode_attribute
from fxalign.options import Exporter

__all__ = [
    "machine_info",
    "measure_align",
    "measure_export",
    "measure_memory",
    "measure_onnx_side",
    "measure_ort",
    "measure_scaling",
    "measure_verify",
    "onnx_stats",
]

logger = logging.getLogger(__name__)


def _best(values: Sequence[float]) -> float:
    """The estimate of a timing from its repeats: the minimum (see the module docstring)."""
    return float(min(values))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence exporter chatter (warnings and torch.onnx logs) while measuring."""
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        onnx_logger.setLevel(level)


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
    with _quiet():
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
        with _quiet():
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
    plain_s, instr_s = _best(plain_times), _best(instr_times)
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
# ONNX Runtime in a child process (time and peak RSS)
# --------------------------------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def ort_child(
    model_path: str | os.PathLike[str],
    feeds_path: str | os.PathLike[str] | None,
    *,
    repeats: int = 3,
    mode: str = "ort",
    max_outputs_per_run: int | None = None,
    exporter: str = "dynamo",
) -> dict[str, Any]:
    """Run a model in a fresh Python process; return its times and peak RSS.

    Args:
        model_path: The ONNX file, or for ``mode="align"`` a benchmark model name.
        feeds_path: An ``.npz`` of graph inputs (not used by ``mode="align"``).
        repeats: ``mode="ort"``: how many ``session.run`` calls to time (after loading).
        mode: ``"ort"`` (plain ``InferenceSession``), ``"fxalign"`` (:func:`fxalign.run_onnx`
            over every graph output, read in order and dropped, with ``max_outputs_per_run``)
            or ``"align"`` (the whole :func:`fxalign.align` on a benchmark model).
        max_outputs_per_run: Passed to :func:`fxalign.run_onnx` or :func:`fxalign.align`.
        exporter: For ``mode="align"``.

    Returns:
        ``peak_rss`` (``VmHWM``, bytes), ``rss_before`` (after imports, before loading the model),
        ``peak_delta``, ``session_s``, ``run_times``, ``outputs`` (or report rows),
        ``output_bytes``, ``digest`` (SHA-256 of the values, or of the report's rows).
    """
    spec = {
        "model": str(model_path),
        "feeds": None if feeds_path is None else str(feeds_path),
        "repeats": repeats,
        "mode": mode,
        "max_outputs_per_run": max_outputs_per_run,
        "exporter": exporter,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=_child_env(),
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child process failed ({proc.returncode}): {proc.stderr[-2000:]}")
    data: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    data["peak_delta"] = data["peak_rss"] - data["rss_before"]
    return data


def save_feeds(case: BenchCase, model_path: str | os.PathLike[str], path: Path) -> Path:
    """Save the case's inputs, mapped onto the model's graph inputs, as ``.npz``."""
    feeds = onnx_feeds(model_path, case.args, case.kwargs, forward=case.model.forward)
    np.savez(path, **feeds)  # type: ignore[arg-type]
    return path


def measure_ort(
    case: BenchCase, plain_path: Path, debug_path: Path, repeats: int, workdir: Path
) -> dict[str, Any]:
    """ORT on the plain model vs the debug model: load time, run time and peak RSS."""
    out = {}
    for label, path in (("plain", plain_path), ("debug", debug_path)):
        # per model: the exporters may name the inputs differently
        feeds = save_feeds(case, path, workdir / f"feeds_{label}.npz")
        child = ort_child(path, feeds, repeats=repeats)
        out[label] = {
            "session_s": child["session_s"],
            "run_s": _best(child["run_times"]),
            "peak_rss": child["peak_rss"],
            "peak_delta": child["peak_delta"],
            "outputs": child["outputs"],
            "output_bytes": child["output_bytes"],
        }
    return out


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
    return _best(times)


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
    return _best(times)


def quiet_align(case: BenchCase, exporter: Exporter, **options: Any) -> Any:
    """``fxalign.align`` on a case, exporter chatter silenced; returns the report."""
    with _quiet():
        return align(case.model, case.args, case.kwargs, exporter=exporter, **options)


def measure_align(
    case: BenchCase, exporter: Exporter, repeats: int, workdir: Path
) -> dict[str, Any]:
    """End-to-end :func:`fxalign.align` vs the floor: plain export + torch forward + ORT forward.

    Each repeat measures the floor (the ORT forward includes loading the session, as ``align``
    has to), then ``align``, then ``align(local=False)`` (what the local error costs), so that
    drift on a shared machine hits them alike.
    """
    plain_path = workdir / "floor.onnx"
    totals: list[float] = []
    no_local: list[float] = []
    floors: dict[str, list[float]] = {"plain_export_s": [], "torch_forward_s": [], "ort_s": []}
    stages: dict[str, list[float]] = {}
    on_file: list[float] = []
    export_attach: list[float] = []
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
        # The attach modes: the plain file just exported, and export-and-attach.
        start = time.perf_counter()
        attached = quiet_align(case, exporter, onnx=plain_path)
        on_file.append(time.perf_counter() - start)
        start = time.perf_counter()
        quiet_align(case, exporter, attach=True)
        export_attach.append(time.perf_counter() - start)
    assert report is not None and attached is not None
    floor_times = [sum(parts) for parts in zip(*floors.values(), strict=True)]
    floor, total = _best(floor_times), _best(totals)
    # A given file's floor has no export: one PyTorch and one ORT forward (session load + run).
    file_floor = _best(
        [t + o for t, o in zip(floors["torch_forward_s"], floors["ort_s"], strict=True)]
    )
    compared = [r for r in report.rows if r.metrics is not None]
    located = [r for r in attached.rows if r.metrics is not None]
    return {
        "align_s": total,
        "align_times": totals,
        "stages": {k: _best(v) for k, v in stages.items()},
        "floor_s": floor,
        "floor_times": floor_times,
        "floor": {k: _best(v) for k, v in floors.items()},
        "ratio": total / floor,
        "no_local_s": _best(no_local),
        "no_local_ratio": _best(no_local) / floor,
        "instrumentation": report.instrumentation,
        "rows": len(report.rows),
        "compared": len(compared),
        "passed": report.passed,
        "first_divergence": report.first_divergence,
        "worst_max_abs": max((r.metrics.max_abs for r in compared if r.metrics), default=None),
        "attach": {
            "onnx_s": _best(on_file),
            "onnx_floor_s": file_floor,
            "onnx_ratio": _best(on_file) / file_floor,
            "export_attach_s": _best(export_attach),
            "export_attach_ratio": _best(export_attach) / floor,
            "rows": len(attached.rows),
            "compared": len(located),
            "passed": attached.passed,
            "first_divergence": attached.first_divergence,
        },
    }


# --------------------------------------------------------------------------------------------
# Other ways to get the same report
# --------------------------------------------------------------------------------------------
def measure_verify(case: BenchCase) -> dict[str, Any]:
    """``torch.onnx.verification.verify_onnx_program(compare_intermediates=True)`` (dynamo).

    Timed as a user runs it: a plain dynamo export to an in-memory ``ONNXProgram``, then the
    verification, which interprets the ONNX graph node by node against the exported program.
    """
    from torch.onnx.verification import verify_onnx_program

    start = time.perf_counter()
    with _quiet():
        program = torch.onnx.export(
            case.model, case.args, kwargs=case.kwargs or None, dynamo=True, verbose=False
        )
    export_s = time.perf_counter() - start
    assert program is not None
    start = time.perf_counter()
    with _quiet():
        infos = verify_onnx_program(
            program, case.args, case.kwargs or None, compare_intermediates=True
        )
    verify_s = time.perf_counter() - start
    return {
        "export_s": export_s,
        "verify_s": verify_s,
        "total_s": export_s + verify_s,
        "values": len(infos),
        "worst_max_abs": max((float(i.max_abs_diff) for i in infos), default=None),
    }


def _debug_to_identity(model: onnx.ModelProto) -> dict[str, MarkerName]:
    """The seed tutorial's rewrite: every Debug node becomes an Identity; returns outputs."""
    marker_of: dict[str, MarkerName] = {}
    for node in model.graph.node:
        if node.op_type == OP_TYPE and node.domain == DOMAIN:
            name = decode_attribute(next(a.s.decode() for a in node.attribute if a.name == "name"))
            node.op_type, node.domain = "Identity", ""
            del node.attribute[:]
            marker_of[node.output[0]] = name
    kept = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return marker_of


def tutorial_onnx_side(
    instrumented_path: Path,
    feeds: Mapping[str, np.ndarray],
    workdir: Path,
    aliases: Mapping[MarkerName, MarkerName],
) -> dict[MarkerName, np.ndarray]:
    """ONNX values by marker name the seed tutorial's way.

    Debug -> Identity, ``onnx.utils.Extractor(model).extract_model(inputs, outputs)`` with the
    Identity outputs, then one ONNX Runtime run. Markers without a node of their own
    (``aliases``) take their target's value, as in fxalign.
    """
    import onnxruntime as ort

    model = onnx.load(str(instrumented_path))
    marker_of = _debug_to_identity(model)
    model = onnx.shape_inference.infer_shapes(model)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    outputs = list(dict.fromkeys([*(o.name for o in model.graph.output), *marker_of]))
    sub = onnx.utils.Extractor(model).extract_model(inputs, outputs)
    path = workdir / "tutorial.onnx"
    onnx.save_model(sub, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = list(marker_of)
    values = session.run(names, dict(feeds))
    out = {marker_of[n]: np.asarray(v) for n, v in zip(names, values, strict=True)}
    out.update({alias: out[target] for alias, target in aliases.items() if target in out})
    return out


def fxalign_onnx_side(
    instrumented_path: Path,
    feeds: Mapping[str, np.ndarray],
    aliases: Mapping[MarkerName, MarkerName],
) -> dict[MarkerName, np.ndarray]:
    """ONNX values by marker name fxalign's way: :func:`extract`, save, :func:`run_onnx`."""
    extracted = extract(instrumented_path, aliases)
    debug_path = instrumented_path.with_name("fxalign-debug.onnx")
    extracted.save(debug_path)
    raw = run_onnx(debug_path, feeds, output_names=[o.name for o in extracted.model.graph.output])
    return {marker: raw[tensor] for marker, tensor in extracted.tensor_of.items()}


def measure_onnx_side(
    case: BenchCase,
    instrumented_path: Path,
    encoded_aliases: Mapping[str, str],
    repeats: int,
    workdir: Path,
) -> dict[str, Any]:
    """Extract + run, fxalign's way and the seed tutorial's way, on one exported model.

    Both start from the same instrumented export; both reports are computed against one
    PyTorch run, and the largest difference between their ONNX values is recorded (0 means the
    same report). ``encoded_aliases`` is :func:`measure_export`'s ``"aliases"``.
    """
    aliases = {decode_attribute(a): decode_attribute(t) for a, t in encoded_aliases.items()}
    feeds = onnx_feeds(instrumented_path, case.args, case.kwargs, forward=case.model.forward)
    timings: dict[str, list[float]] = {"fxalign": [], "tutorial": []}
    ours: dict[MarkerName, np.ndarray] = {}
    theirs: dict[MarkerName, np.ndarray] = {}
    for _ in range(repeats):
        start = time.perf_counter()
        ours = fxalign_onnx_side(instrumented_path, feeds, aliases)
        timings["fxalign"].append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs = tutorial_onnx_side(instrumented_path, feeds, workdir, aliases)
        timings["tutorial"].append(time.perf_counter() - start)
    result = instrument_model(case.model, case.args, case.kwargs)
    torch_values = run_torch(result.module, case.args, case.kwargs)
    rows_ours = compare(torch_values, ours)
    rows_theirs = compare(torch_values, theirs)
    common = set(ours) & set(theirs)
    diff = max(
        (
            float(np.max(np.abs(ours[n].astype(np.float64) - theirs[n])))
            for n in common
            if ours[n].size
        ),
        default=0.0,
    )
    return {
        "fxalign_s": _best(timings["fxalign"]),
        "tutorial_s": _best(timings["tutorial"]),
        "markers_fxalign": len(ours),
        "markers_tutorial": len(theirs),
        "rows_fxalign": sum(1 for r in rows_ours if r.metrics is not None),
        "rows_tutorial": sum(1 for r in rows_theirs if r.metrics is not None),
        "max_value_difference": diff,
    }


# --------------------------------------------------------------------------------------------
# Scaling and memory
# --------------------------------------------------------------------------------------------
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
            total = _best(totals)
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
                    "plain_export_s": _best(plain),
                    "stages": {k: _best(v) for k, v in stages.items()},
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
            with _quiet():
                graph = torch.jit.trace(
                    _JitChain(n, mark), (torch.zeros(2),), check_trace=False
                ).graph
            times = []
            for _ in range(repeats):
                copy = graph.copy()
                start = time.perf_counter()
                torch._C._jit_pass_cse(copy)
                times.append(time.perf_counter() - start)
            row[label] = _best(times)
        out.append(row)
    return out


def measure_memory(
    case: BenchCase, exporter: Exporter, max_outputs_per_run: int, workdir: Path
) -> dict[str, Any]:
    """Peak RSS with and without ``max_outputs_per_run``, each run in a fresh child process.

    Two levels: :func:`fxalign.run_onnx` on the debug model (every output read in order and
    dropped, as ``align``'s comparison reads them), and the whole :func:`fxalign.align`. The
    SHA-256 of the values (of the report's rows for ``align``) tells whether they are identical.
    """
    quiet_align(case, exporter, workdir=workdir, overwrite=True)
    debug_path = workdir / "debug.onnx"
    feeds = save_feeds(case, debug_path, workdir / "feeds.npz")
    out: dict[str, Any] = {}
    for level, target, mode in (
        ("run_onnx", debug_path, "fxalign"),
        ("align", case.name, "align"),
    ):
        runs = {}
        for label, k in (("all", None), ("split", max_outputs_per_run)):
            child = ort_child(target, feeds, mode=mode, max_outputs_per_run=k, exporter=exporter)
            runs[label] = {
                "max_outputs_per_run": k,
                "peak_rss": child["peak_rss"],
                "peak_delta": child["peak_delta"],
                "seconds": child["run_times"][0],
                "outputs": child["outputs"],
                "output_bytes": child["output_bytes"],
                "digest": child["digest"],
            }
        runs["identical"] = runs["all"]["digest"] == runs["split"]["digest"]
        out[level] = runs
    return out


def digest_arrays(values: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``values`` (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(values):
        v = np.ascontiguousarray(values[name])
        h.update(f"{name}:{v.dtype}:{v.shape}".encode())
        h.update(v.tobytes())
    return h.hexdigest()


def new_workdir(prefix: str = "fxalign-bench-") -> tempfile.TemporaryDirectory[str]:
    """A private temporary directory for the model files of one measurement."""
    return tempfile.TemporaryDirectory(prefix=prefix)
