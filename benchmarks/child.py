"""Child process of :func:`benchmarks.memory.ort_child`: one measurement, JSON on stdout.

    python -m benchmarks.child '{"mode": "ort" | "fxalign" | "align" | "floor", ...}'

Runs in a fresh interpreter so that its peak RSS (``VmHWM``) is the measurement's own, and so
that ``align`` and ``floor`` are *cold*: the first call in a process, as the CLI makes it (the
modules are imported, nothing has run yet: no exporter, no ONNX Runtime session).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def _status(key: str) -> int | None:
    """A ``/proc/self/status`` field in bytes (``VmRSS:``, ``VmHWM:``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return None


def _align(spec: dict[str, Any], digest: Any) -> dict[str, Any]:
    from benchmarks.cases import build_case
    from benchmarks.measure import quiet_align

    case = build_case(spec["model"])
    options = dict(spec.get("options") or {})
    before = _status("VmRSS:")
    start = time.perf_counter()
    report = quiet_align(
        case, spec["exporter"], max_outputs_per_run=spec["max_outputs_per_run"], **options
    )
    elapsed = time.perf_counter() - start
    for row in report.rows:
        digest.update(repr((row.name, row.status, row.metrics)).encode())
    return {"rss_before": before, "run_times": [elapsed], "outputs": len(report.rows)}


def _floor(spec: dict[str, Any]) -> dict[str, Any]:
    """The floor, cold: [plain export +] one PyTorch forward + one ORT session load and run."""
    import onnxruntime as ort
    import torch

    from benchmarks.cases import build_case
    from benchmarks.measure import plain_export
    from fxalign import onnx_feeds

    case = build_case(spec["model"])
    before = _status("VmRSS:")
    parts: dict[str, float] = {}
    path: str = spec.get("onnx") or ""
    if spec.get("export"):
        parts["plain_export_s"] = plain_export(case, spec["exporter"], Path(spec["out"]))
        path = spec["out"]
    start = time.perf_counter()
    with torch.no_grad():
        case.model(*case.args, **case.kwargs)
    parts["torch_forward_s"] = time.perf_counter() - start
    feeds = onnx_feeds(path, case.args, case.kwargs, forward=case.model.forward)
    start = time.perf_counter()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    parts["ort_s"] = time.perf_counter() - start
    return {"rss_before": before, "run_times": [sum(parts.values())], "parts": parts}


def _fxalign_run(spec: dict[str, Any], feeds: dict[str, np.ndarray], digest: Any) -> dict[str, Any]:
    import onnx

    from fxalign import run_onnx

    proto = onnx.load(spec["model"], load_external_data=False)
    names = [o.name for o in proto.graph.output]
    del proto
    before = _status("VmRSS:")
    start = time.perf_counter()
    values = run_onnx(
        spec["model"],
        feeds,
        output_names=names,
        max_outputs_per_run=spec.get("max_outputs_per_run"),
    )
    nbytes = 0
    for name in names:  # read in order, keep nothing: how align's comparison reads them
        v = np.ascontiguousarray(values[name])
        digest.update(f"{name}:{v.dtype}:{v.shape}".encode())
        digest.update(v.tobytes())
        nbytes += v.nbytes
        del v
    del values
    elapsed = time.perf_counter() - start
    return {
        "rss_before": before,
        "run_times": [elapsed],
        "outputs": len(names),
        "output_bytes": nbytes,
    }


def _ort_run(spec: dict[str, Any], feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    import onnxruntime as ort

    before = _status("VmRSS:")
    start = time.perf_counter()
    session = ort.InferenceSession(spec["model"], providers=["CPUExecutionProvider"])
    session_s = time.perf_counter() - start
    names = [o.name for o in session.get_outputs()]
    run_times, outs = [], []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        outs = session.run(names, feeds)
        run_times.append(time.perf_counter() - start)
    nbytes = int(sum(np.asarray(v).nbytes for v in outs))
    return {
        "rss_before": before,
        "session_s": session_s,
        "run_times": run_times,
        "outputs": len(names),
        "output_bytes": nbytes,
    }


def main(argv: list[str]) -> int:
    """Run the measurement ``argv[0]`` (JSON) describes; print its result as one JSON line."""
    spec = json.loads(argv[0])
    digest = hashlib.sha256()
    if spec["mode"] == "align":
        result = _align(spec, digest)
    elif spec["mode"] == "floor":
        result = _floor(spec)
    else:
        feeds = dict(np.load(spec["feeds"]))
        if spec["mode"] == "fxalign":
            result = _fxalign_run(spec, feeds, digest)
        else:
            result = _ort_run(spec, feeds)
    result = {"session_s": None, "output_bytes": 0, **result}
    result.update(peak_rss=_status("VmHWM:"), digest=digest.hexdigest())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
