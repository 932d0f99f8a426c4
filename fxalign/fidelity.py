"""How far the debug model is from the model you deploy.

Markers sit between ops, so the debug model's marked tensors must be materialised: fusions across
module boundaries that ONNX Runtime performs on the plain export (Conv+BatchNorm, MatMul+Add, ...)
cannot happen in it. This module measures that instead of assuming it: it exports the plain
model, lets ONNX Runtime optimise both models, counts the nodes of each optimised graph by op type
and compares the two models' final outputs.
"""

from __future__ import annotations

import collections
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from fxalign.backends import OrtRunner
from fxalign.report.model import Fidelity

__all__ = ["measure", "optimized_op_counts"]


def optimized_op_counts(
    model_path: str | os.PathLike[str], providers: Sequence[str] | None = None
) -> dict[str, int]:
    """Node count by op type of ``model_path`` after ONNX Runtime's graph optimisations.

    Args:
        model_path: An ONNX file.
        providers: Execution providers (default: CPU); fusions depend on them.

    Returns:
        ``op type -> count``; ops of non-standard domains are named ``domain:op``.

    Raises:
        RuntimeBackendError: ONNX Runtime cannot load the model, or a provider is missing.
    """
    with tempfile.TemporaryDirectory(prefix="fxalign-opt-") as tmp:
        out = str(Path(tmp) / "optimized.onnx")
        OrtRunner(providers).save_optimized(str(model_path), out)
        optimized = onnx.load(out, load_external_data=False)
    counts = collections.Counter(
        (f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type)
        for n in optimized.graph.node
    )
    return dict(sorted(counts.items()))


def measure(
    plain_path: str | os.PathLike[str],
    debug_path: str | os.PathLike[str],
    plain_outputs: Sequence[np.ndarray],
    debug_outputs: Sequence[np.ndarray],
    *,
    providers: Sequence[str] | None = None,
    plain_export_seconds: float = 0.0,
) -> Fidelity:
    """Compare the plain export with the debug model.

    Args:
        plain_path: The plain export.
        debug_path: The debug model (markers promoted to outputs).
        plain_outputs: The plain export's outputs, in order.
        debug_outputs: The debug model's original outputs (its first outputs), in order.
        providers: Execution providers used for both.
        plain_export_seconds: Time the plain export took.

    Returns:
        A :class:`~fxalign.report.model.Fidelity`.
    """
    max_abs: float | None = None
    if len(plain_outputs) == len(debug_outputs) and all(
        a.shape == b.shape for a, b in zip(plain_outputs, debug_outputs, strict=True)
    ):
        max_abs = 0.0
        for a, b in zip(plain_outputs, debug_outputs, strict=True):
            if a.size:
                diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                max_abs = max(max_abs, float(np.nanmax(diff)) if diff.size else 0.0)
    plain_ops = optimized_op_counts(plain_path, providers)
    debug_ops = optimized_op_counts(debug_path, providers)
    unfused = {
        op: debug_ops[op] - plain_ops.get(op, 0)
        for op in debug_ops
        if debug_ops[op] > plain_ops.get(op, 0)
    }
    return Fidelity(max_abs, plain_ops, debug_ops, unfused, plain_export_seconds)
