"""The speed targets and how the results measure up to them."""

from __future__ import annotations

import itertools
from typing import Any

from benchmarks.formatting import each_row, fmt_x

__all__ = ["CONTENTION_STAGES", "TARGET_MODELS", "TARGETS", "flatness", "targets"]


TARGET_MODELS = ("resnet50", "bert-base")
"""The models the speed targets are stated for."""


TARGETS = {
    "export": 1.25,
    "align": 1.3,
    "verify": 20.0,
    "flat": 1.25,
    "contention": 2.0,
    "onnx": 1.15,
    "attach": 1.2,
}
"""Instrumented/plain export ratio, align/floor ratio, speedup over verify_onnx_program, the
largest ratio of marginal per-module time (last size step over the first) still "flat", the
largest loaded-machine slowdown of an ``align`` stage relative to the plain export's, and the
attach modes' ratios to their floors (``onnx=``: one PyTorch and one ORT forward with session
load; ``attach=True``: the marker mode's floor), warm and cold."""

CONTENTION_STAGES = ("run_onnx", "compare", "align")
"""The stages whose loaded-machine slowdown is held to ``TARGETS["contention"]``."""


def flatness(
    scaling: list[dict[str, Any]], exporter: str, own: bool = False
) -> dict[str, Any] | None:
    """Marginal ms/module over the last step against the one over the first steps.

    With ``own``, the export stage (the exporter's own scaling) is left out: fxalign's stages.
    """
    points = sorted((p for p in scaling if p["exporter"] == exporter), key=lambda p: p["modules"])
    if len(points) < 3:
        return None

    def seconds(p: dict[str, Any]) -> float:
        if not own:
            return float(p["align_s"])
        return float(p["align_s"]) - float(p["stages"].get("export", 0.0))

    def slope(a: dict[str, Any], b: dict[str, Any]) -> float:
        return 1000 * (seconds(b) - seconds(a)) / (b["modules"] - a["modules"])

    first = slope(points[0], points[-2])
    last = slope(points[-2], points[-1])
    return {
        "first": first,
        "last": last,
        "ratio": last / first if first > 0 else None,
        "range": (points[0]["modules"], points[-2]["modules"], points[-1]["modules"]),
    }


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value and whether it is met."""
    out: list[dict[str, Any]] = []
    for model, exporter, row in each_row(results):
        if model["name"] not in TARGET_MODELS:
            continue
        exp, al = row.get("export"), row.get("align")
        if exp:
            out.append(
                {
                    "target": f"instrumented export <= {TARGETS['export']}x plain",
                    "model": model["name"],
                    "exporter": exporter,
                    "value": fmt_x(exp["ratio"]),
                    "met": exp["ratio"] <= TARGETS["export"],
                }
            )
        if al:
            name = model["name"]
            cold = (row.get("cold") or {}).get("default")
            for what, ratio in (
                (f"align <= {TARGETS['align']}x floor", al["ratio"]),
                (f"align <= {TARGETS['align']}x floor (cold)", cold and cold["ratio"]),
                (f"align(local=False) <= {TARGETS['align']}x floor", al.get("no_local_ratio")),
            ):
                if ratio is not None:
                    out.append(
                        {
                            "target": what,
                            "model": name,
                            "exporter": exporter,
                            "value": fmt_x(ratio),
                            "met": ratio <= TARGETS["align"],
                        }
                    )
        ver = row.get("verify")
        if ver and al and model["name"] == "resnet50":
            speedup = ver["total_s"] / al["align_s"]
            out.append(
                {
                    "target": f">= {TARGETS['verify']:.0f}x faster than verify_onnx_program",
                    "model": model["name"],
                    "exporter": exporter,
                    "value": f"{speedup:.1f}x",
                    "met": speedup >= TARGETS["verify"],
                }
            )
    out += _attach_targets(results)
    out += _contention_targets(results)
    for exporter, own in itertools.product(
        results.get("settings", {}).get("exporters", []), (False, True)
    ):
        flat = flatness(results.get("scaling") or [], exporter, own)
        if flat and flat["ratio"] is not None:
            a, b, c = flat["range"]
            what = "align without the export stage" if own else "align"
            out.append(
                {
                    "target": f"flat time per module, {what} (marginal ms/module {b}->{c} over "
                    f"{a}->{b} <= {TARGETS['flat']})",
                    "model": "synthetic",
                    "exporter": exporter,
                    "value": f"{flat['last']:.2f} / {flat['first']:.2f} ms = {flat['ratio']:.2f}",
                    "met": flat["ratio"] <= TARGETS["flat"],
                }
            )
    return out


def _contention_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    c = results.get("contention")
    if not c:
        return []
    limit = TARGETS["contention"]
    return [
        {
            "target": f"loaded-machine slowdown of {stage} <= {limit}x the plain export's",
            "model": c["model"],
            "exporter": c["exporter"],
            "value": f"{fmt_x(c['slowdown'][stage])} / {fmt_x(c['slowdown']['plain export'])}"
            f" = {c['relative'][stage]:.2f}",
            "met": c["relative"][stage] <= limit,
        }
        for stage in CONTENTION_STAGES
        if stage in c["relative"]
    ]


def _attach_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """``onnx=`` and ``attach=True`` against their floors, warm and cold, on every model."""
    out: list[dict[str, Any]] = []
    for model, exporter, row in each_row(results):
        at, cold = (row.get("align") or {}).get("attach"), row.get("cold") or {}
        measured = {
            ("onnx", "warm"): at and at["onnx_ratio"],
            ("attach", "warm"): at and at["export_attach_ratio"],
            ("onnx", "cold"): (cold.get("onnx") or {}).get("ratio"),
            ("attach", "cold"): (cold.get("attach") or {}).get("ratio"),
        }
        for (mode, start), ratio in measured.items():
            if ratio is None:
                continue
            what = "align(onnx=file)" if mode == "onnx" else "align(attach=True)"
            out.append(
                {
                    "target": f"{what} <= {TARGETS[mode]}x its floor ({start})",
                    "model": model["name"],
                    "exporter": exporter,
                    "value": fmt_x(ratio),
                    "met": ratio <= TARGETS[mode],
                }
            )
    return out
