"""The ``repro.py`` of a repro bundle: PyTorch vs ONNX Runtime on one module, standalone.

:mod:`fxalign.drill.bundle` copies this file into the bundle with :data:`SETTINGS` filled in.
It needs only torch, onnx and onnxruntime (and numpy, which they bring), neither fxalign nor the
model's code::

    python repro.py            # in the bundle folder, or: python path/to/bundle/repro.py

It loads ``module.pt2`` (the module as a ``torch.export`` program) and ``inputs.pt`` (the exact
inputs), runs the program and ``module.onnx`` (the module exported alone) with ONNX Runtime,
and prints each output's ``max_abs`` and whether it is within tolerance, by the rule fxalign
used. When ``module.pt2`` cannot be loaded here (it calls custom ops this process has not
registered), the PyTorch outputs fxalign recorded (``expected.pt``) stand in, and it says so.
Exit code: 1 when an output diverges, 0 when all are within tolerance, 2 when it cannot run.
The last line is ``fxalign-repro: {json}`` for programs to read.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch.utils import _pytree as pytree

__all__ = ["SETTINGS", "check", "main"]

# --- settings (written by fxalign) ---
SETTINGS: dict[str, Any] = {
    "module_path": "",
    "exporter": "dynamo",
    "atol": 1e-4,
    "rtol": 1e-3,
    "verdict": "roundoff",
    "roundoff_factor": 4096.0,
    "feeds": [],
}
# --- end of settings ---


def check(
    reference: torch.Tensor, got: np.ndarray, atol: float, rtol: float, unit: float
) -> tuple[float, int]:
    """``(max_abs, elements out of tolerance)`` of ``got`` (ONNX) against ``reference``.

    An element passes within ``atol + rtol * |torch| + min(unit * eps, rtol) * rms(torch)``
    (``unit`` 0: plain allclose; ``rms`` over the finite elements); NaN and infinities must
    match; integers and booleans must be equal.
    """
    exact = not (reference.is_floating_point() or reference.is_complex())
    if exact:
        ref = reference.detach().cpu().numpy()
        value = np.asarray(got)
    else:
        wide = torch.complex128 if reference.is_complex() else torch.float64
        ref = reference.detach().cpu().to(wide).numpy()
        value = np.asarray(got).astype(ref.dtype)
    if value.shape != ref.shape:
        return math.inf, max(ref.size, 1)
    if exact:
        bad = int(np.count_nonzero(ref != value))
        return (float(np.abs(ref.astype(np.float64) - value).max()) if bad else 0.0), bad
    eps = torch.finfo(reference.real.dtype).eps
    same_special = (np.isnan(ref) & np.isnan(value)) | (np.isinf(ref) & (ref == value))
    special = ~np.isfinite(ref) | ~np.isfinite(value)
    special_bad = int(np.count_nonzero(special & ~same_special))
    finite = ~special
    r, g = ref[finite], value[finite]
    rms = math.sqrt(float(np.mean(np.abs(r) ** 2))) if r.size else 0.0
    allowed = atol + rtol * np.abs(r) + min(unit * eps, rtol) * rms
    diff = np.abs(g - r)
    bad = int(np.count_nonzero(diff > allowed)) + special_bad
    max_abs = math.inf if special_bad else (float(diff.max()) if diff.size else 0.0)
    return max_abs, bad


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def _torch_outputs(here: Path, args: Any, kwargs: Any) -> tuple[list[torch.Tensor], str]:
    """The program's outputs on the inputs, or the recorded ones when it cannot be loaded."""
    try:
        program = torch.export.load(str(here / "module.pt2"))
    except Exception as e:
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
        recorded = torch.load(str(here / "expected.pt"), weights_only=True)
        return list(recorded), f"module.pt2 cannot be loaded here ({reason}); recorded outputs"
    with torch.no_grad():
        return _tensors(program.module()(*args, **kwargs)), "module.pt2"


def main(settings: dict[str, Any], here: Path) -> int:
    """Run the bundle in folder ``here``; print the comparison; return the exit code."""
    inputs = torch.load(str(here / "inputs.pt"), weights_only=True)
    args, kwargs = tuple(inputs["args"]), dict(inputs["kwargs"])
    leaves = _tensors((args, kwargs))
    # Feeds first: a module that writes its inputs must not change what ONNX Runtime gets.
    feeds = {name: leaves[i].detach().cpu().numpy().copy() for name, i in settings["feeds"]}
    expected, source = _torch_outputs(here, args, kwargs)
    model = onnx.load(str(here / "module.onnx"))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, feeds)
    atol, rtol = float(settings["atol"]), float(settings["rtol"])
    unit = float(settings["roundoff_factor"]) if settings["verdict"] == "roundoff" else 0.0
    print(
        f"{settings['module_path'] or '(model)'}: PyTorch ({source}) vs ONNX Runtime "
        f"(module.onnx, {settings['exporter']} exporter); atol={atol:g} rtol={rtol:g} "
        f"verdict={settings['verdict']}"
    )
    if len(got) != len(expected):
        print(f"PyTorch gives {len(expected)} output(s), ONNX {len(got)}: cannot pair them")
        return 2
    worst, diverges = 0.0, False
    for i, (ref, value) in enumerate(zip(expected, got, strict=True)):
        max_abs, bad = check(ref, value, atol, rtol, unit)
        worst = max(worst, max_abs) if not math.isnan(max_abs) else math.inf
        diverges = diverges or bad > 0
        verdict = "DIVERGES" if bad else "ok"
        print(
            f"  output[{i}] {list(ref.shape)} {str(ref.dtype).removeprefix('torch.')}: "
            f"max_abs={max_abs:.3g} out of tolerance {bad}/{ref.numel()}  {verdict}"
        )
    print(
        "DIVERGES: the divergence reproduces in isolation"
        if diverges
        else "within tolerance: the divergence does not reproduce in isolation"
    )
    print("fxalign-repro: " + json.dumps({"diverges": diverges, "max_abs": worst}))
    return 1 if diverges else 0


if __name__ == "__main__":
    try:
        code = main(SETTINGS, Path(__file__).resolve().parent)
    except Exception as error:
        print(f"repro.py failed: {type(error).__name__}: {error}", file=sys.stderr)
        code = 2
    sys.exit(code)
