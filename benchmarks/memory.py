"""ONNX Runtime and align in a fresh child process per measurement: times and peak RSS.

Peak memory is ``VmHWM`` from ``/proc/self/status`` in the child, because ORT allocates natively,
where ``tracemalloc`` cannot see it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.cases import BenchCase
from benchmarks.measure import best, quiet_align
from fxalign import (
    onnx_feeds,
)
from fxalign.options import Exporter

__all__ = [
    "digest_arrays",
    "measure_cold",
    "measure_memory",
    "measure_ort",
    "ort_child",
    "save_feeds",
]


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
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run a model in a fresh Python process; return its times and peak RSS.

    Args:
        model_path: The ONNX file, or for ``mode="align"`` a benchmark model name.
        feeds_path: An ``.npz`` of graph inputs (not used by ``mode="align"``).
        repeats: ``mode="ort"``: how many ``session.run`` calls to time (after loading).
        mode: ``"ort"`` (plain ``InferenceSession``), ``"fxalign"`` (:func:`fxalign.run_onnx`
            over every graph output, read in order and dropped, with ``max_outputs_per_run``)
            or ``"align"`` (the whole :func:`fxalign.align` on a benchmark model), or
            ``"floor"`` (what :func:`measure_cold` compares ``align`` with).
        max_outputs_per_run: Passed to :func:`fxalign.run_onnx` or :func:`fxalign.align`.
        exporter: For ``mode="align"``.
        extra: More fields of the child's spec (``options`` of ``align``; ``onnx``,
            ``export`` and ``out`` of the floor).

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
        **(extra or {}),
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
            "run_s": best(child["run_times"]),
            "peak_rss": child["peak_rss"],
            "peak_delta": child["peak_delta"],
            "outputs": child["outputs"],
            "output_bytes": child["output_bytes"],
        }
    return out


def measure_memory(
    case: BenchCase, exporter: Exporter, max_outputs_per_run: int, workdir: Path
) -> dict[str, Any]:
    """Peak RSS with and without ``max_outputs_per_run``, each run in a fresh child process.

    Two levels: :func:`fxalign.run_onnx` on the debug model (every output read in order and
    dropped, as ``align``'s comparison reads them), and the whole :func:`fxalign.align`. The
    SHA-256 of the values (of the report's rows for ``align``) tells whether they are identical.
    Both are the marker mode's (``attach=False``): ``max_outputs_per_run`` bounds its runs.
    """
    quiet_align(case, exporter, workdir=workdir, overwrite=True, attach=False)
    debug_path = workdir / "debug.onnx"
    feeds = save_feeds(case, debug_path, workdir / "feeds.npz")
    out: dict[str, Any] = {}
    for level, target, mode in (
        ("run_onnx", debug_path, "fxalign"),
        ("align", case.name, "align"),
    ):
        runs = {}
        for label, k in (("all", None), ("split", max_outputs_per_run)):
            child = ort_child(
                target,
                feeds,
                mode=mode,
                max_outputs_per_run=k,
                exporter=exporter,
                extra={"options": {"attach": False}},
            )
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


def measure_cold(
    case: BenchCase, exporter: Exporter, plain_path: Path, workdir: Path
) -> dict[str, Any]:
    """Each mode's first ``align`` in a fresh process, and its floor measured the same way.

    The default mode, markers (``attach=False``) and export-and-attach against a cold floor
    with a plain export; ``onnx=`` (the plain file ``plain_path``) against a cold floor without
    one. One child process each.

    Returns:
        ``{"default" | "markers" | "onnx" | "attach": {"align_s", "floor_s", "ratio"},
        "floors": ...}``.
    """
    floors = {}
    for label, extra in (
        ("export", {"export": True, "out": str(workdir / "cold-floor.onnx")}),
        ("file", {"onnx": str(plain_path)}),
    ):
        child = ort_child(case.name, None, mode="floor", exporter=exporter, extra=extra)
        floors[label] = {"floor_s": child["run_times"][0], **child["parts"]}
    out: dict[str, Any] = {"floors": floors}
    for mode, options, floor in (
        ("default", {}, "export"),
        ("markers", {"attach": False}, "export"),
        ("onnx", {"onnx": str(plain_path)}, "file"),
        ("attach", {"attach": True}, "export"),
    ):
        child = ort_child(
            case.name, None, mode="align", exporter=exporter, extra={"options": options}
        )
        seconds, floor_s = child["run_times"][0], floors[floor]["floor_s"]
        out[mode] = {"align_s": seconds, "floor_s": floor_s, "ratio": seconds / floor_s}
    return out


def digest_arrays(values: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``values`` (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(values):
        v = np.ascontiguousarray(values[name])
        h.update(f"{name}:{v.dtype}:{v.shape}".encode())
        h.update(v.tobytes())
    return h.hexdigest()
