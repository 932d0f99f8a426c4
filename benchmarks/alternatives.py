"""Other ways to get the same report: verify_onnx_program, and the seed tutorial's ONNX side."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from benchmarks.cases import BenchCase
from benchmarks.measure import best, quiet
from fxalign import (
    compare,
    extract,
    instrument_model,
    onnx_feeds,
    run_onnx,
    run_torch,
)
from fxalign.markers import DOMAIN, OP_TYPE
from fxalign.names import MarkerName, decode_attribute

__all__ = ["fxalign_onnx_side", "measure_onnx_side", "measure_verify", "tutorial_onnx_side"]


def measure_verify(case: BenchCase) -> dict[str, Any]:
    """``torch.onnx.verification.verify_onnx_program(compare_intermediates=True)`` (dynamo).

    Timed as a user runs it: a plain dynamo export to an in-memory ``ONNXProgram``, then the
    verification, which interprets the ONNX graph node by node against the exported program.
    """
    from torch.onnx.verification import verify_onnx_program

    start = time.perf_counter()
    with quiet():
        program = torch.onnx.export(
            case.model, case.args, kwargs=case.kwargs or None, dynamo=True, verbose=False
        )
    export_s = time.perf_counter() - start
    assert program is not None
    start = time.perf_counter()
    with quiet():
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
        "fxalign_s": best(timings["fxalign"]),
        "tutorial_s": best(timings["tutorial"]),
        "markers_fxalign": len(ours),
        "markers_tutorial": len(theirs),
        "rows_fxalign": sum(1 for r in rows_ours if r.metrics is not None),
        "rows_tutorial": sum(1 for r in rows_theirs if r.metrics is not None),
        "max_value_difference": diff,
    }
