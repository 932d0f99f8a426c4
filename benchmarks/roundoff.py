"""Float32 round-off of faithful exports against planted breaks, relative to each value's size.

The measurement behind the default verdict (``verdict="roundoff"``, ``ROUNDOFF_FACTOR`` in
``fxalign/report/model.py``): deep random-weight Hugging Face vision models, with weights
scaled so that activations reach 1e6-1e8, are aligned with both exporters, once as they are and
once with breaks planted at several depths. Every comparison fxalign makes (each row's
cumulative error and each module's local error) is recorded in units of float32's eps:
``max|onnx - torch|`` over ``max|torch|`` and over ``rms(torch)``, and the least factor ``c``
for which ``|onnx - torch| <= 1e-4 + 1e-3 |torch| + c eps rms(torch)`` holds everywhere (the
rule's bound), next to plain ``allclose``'s verdict and the run's own::

    python -m benchmarks.roundoff                 # every model, both exporters
    python -m benchmarks.roundoff resnet swin --exporter dynamo

A planted break is a leaf module that computes one thing in eager PyTorch and another while
an exporter traces it, the way a wrong ONNX translation does: an activation whose negative
slope is lost, a resize one pixel off, a sign flipped in a 2x2 patch, a NaN and an inf.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fxalign

compare_module = importlib.import_module("fxalign.compare.rows")
local_module = importlib.import_module("fxalign.local")
EPS32 = float(np.finfo(np.float32).eps)
PLANTS = ("wrong_op", "resize", "sign_flip", "nan_inf")


def _exporting() -> bool:
    return bool(
        torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting() or torch.jit.is_tracing()
    )


class Plant(nn.Module):
    """Computes ``kind``'s eager function in PyTorch and its broken one under an exporter."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        broken = _exporting()
        axis = -1 if x.dim() == 4 else 1  # image width, or the token axis of [B, L, C]
        if self.kind == "wrong_op":  # LeakyReLU translated as Relu
            return F.relu(x) if broken else F.leaky_relu(x, 0.01)
        if self.kind == "resize":  # an upsampling that samples one pixel off
            if x.dim() == 4:
                up = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
                if broken:
                    up = torch.cat([up[..., 1:], up[..., -1:]], dim=-1)
                return F.avg_pool2d(up, 2)
            if broken:
                return torch.cat([x[:, 1:], x[:, -1:]], dim=axis)
            return x * 1.0
        if self.kind == "sign_flip":  # a 2x2 patch of one channel with its sign flipped
            if not broken:
                return x * 1.0
            sign = torch.ones_like(x)
            if x.dim() == 4:
                sign[0, 0, :2, :2] = -1.0
            else:
                sign[0, :4, 0] = -1.0
            return x * sign
        if not broken:  # nan_inf
            return x * 1.0
        bad = torch.zeros_like(x).flatten()
        bad[0], bad[1] = float("nan"), float("inf")
        return x + bad.reshape(x.shape)


def _reinit(model: nn.Module, gain: float, norm_gain: float = 1.0) -> nn.Module:
    """He-normal weights times ``gain``; batch norms the identity; other norms' weight scaled."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                m.weight.mul_(gain)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.mul_(norm_gain)
    return model


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    import transformers as tf

    torch.manual_seed(0)
    widths = [16, 32, 64, 128]
    x = torch.randn(1, 3, 64, 64)
    if name == "resnet":  # ResNet-50 depth, narrow
        cfg = tf.ResNetConfig(
            embedding_size=16, hidden_sizes=widths, depths=[3, 4, 6, 3], layer_type="bottleneck"
        )
        return _reinit(tf.ResNetModel(cfg), 1.3), x
    if name == "bit":  # weight-standardised convs, group norms
        cfg = tf.BitConfig(
            embedding_size=16,
            hidden_sizes=widths,
            depths=[3, 4, 6, 3],
            layer_type="bottleneck",
            num_groups=8,
        )
        return _reinit(tf.BitModel(cfg), 1.0, norm_gain=1e6), x
    if name == "regnet":
        cfg = tf.RegNetConfig(
            embedding_size=16, hidden_sizes=widths, depths=[2, 4, 8, 2], groups_width=8
        )
        return _reinit(tf.RegNetModel(cfg), 1.5), x
    if name == "convnext":  # layer norms; residual branches scaled by layer_scale
        cfg = tf.ConvNextConfig(
            hidden_sizes=widths, depths=[3, 3, 9, 3], layer_scale_init_value=1e7, image_size=64
        )
        return tf.ConvNextModel(cfg), x
    if name == "efficientnet":
        cfg = tf.EfficientNetConfig(
            image_size=64, width_coefficient=0.5, depth_coefficient=1.0, hidden_dim=640
        )
        return _reinit(tf.EfficientNetModel(cfg), 1.6), x
    if name == "swin":
        cfg = tf.SwinConfig(
            image_size=128,
            patch_size=4,
            embed_dim=16,
            depths=[2, 2, 6, 2],
            num_heads=[1, 2, 4, 8],
            window_size=4,
        )
        return _reinit(tf.SwinModel(cfg), 1.0, norm_gain=1e5), torch.randn(1, 3, 128, 128)
    raise SystemExit(f"unknown model {name!r}")


MODELS = ("resnet", "bit", "regnet", "convnext", "efficientnet", "swin")


def plant(model: nn.Module, kinds: tuple[str, ...] = PLANTS) -> list[str]:
    """Put one :class:`Plant` after evenly spaced convolutions (or linears); return their paths.

    Only convolutions with a spatial kernel are taken: 1x1 ones include squeeze-excitation
    layers, whose 1x1 images a resize cannot shift.
    """
    layers = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) != (1, 1)
    ]
    if len(layers) < 8:
        layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    paths = []
    for i, kind in enumerate(kinds):
        path = layers[(i + 1) * len(layers) // (len(kinds) + 1)]
        parent, _, child = path.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, nn.Sequential(getattr(owner, child), Plant(kind)))
        paths.append(f"{path}.1")
    return paths


@dataclass
class Stat:
    """One comparison, in units of float32's eps times the PyTorch value's magnitude.

    Attributes:
        by_max: ``max|onnx - torch| / max|torch|``.
        by_rms: ``max|onnx - torch| / rms(torch)``.
        need_max: The least ``c`` with ``|d| <= 1e-4 + 1e-3 |torch| + c eps max|torch|``
            everywhere (0 when plain allclose already passes).
        need_rms: The same with ``rms(torch)`` as the magnitude.
        allclose: Whether plain ``allclose(atol=1e-4, rtol=1e-3)`` passes.
    """

    by_max: float
    by_rms: float
    need_max: float
    need_rms: float
    allclose: bool


def _stat(ref: np.ndarray, got: np.ndarray) -> Stat:
    r, g = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    special = ~(np.isfinite(r) & np.isfinite(g))
    if (np.isnan(r) != np.isnan(g)).any() or (
        np.where(special, r, 0) != np.where(special, g, 0)
    ).any():
        return Stat(math.inf, math.inf, math.inf, math.inf, False)
    r, g = r[~special], g[~special]
    if not r.size:
        return Stat(0.0, 0.0, 0.0, 0.0, True)
    diff = np.abs(g - r)
    excess = float(np.maximum(diff - 1e-4 - 1e-3 * np.abs(r), 0).max())
    top, rms = float(np.abs(r).max()), float(np.sqrt(np.mean(r * r)))

    def per(value: float, scale: float) -> float:
        return value / (EPS32 * scale) if scale else (0.0 if value == 0 else math.inf)

    err = float(diff.max())
    return Stat(per(err, top), per(err, rms), per(excess, top), per(excess, rms), excess == 0)


@dataclass
class Seen:
    """The comparisons of one run: cumulative by row name, local ones in the order made."""

    rows: dict[str, Stat] = field(default_factory=dict)
    local_calls: list[tuple[float, Stat]] = field(default_factory=list)

    def local(self, report: fxalign.Report) -> dict[str, Stat]:
        """``row name -> local Stat``: a replayed call's own, else (inputs bitwise equal, no
        replay) the row's cumulative one."""
        calls, out = list(self.local_calls), {}
        for row in report.rows:
            if row.local is None:
                continue
            if calls and calls[0][0] == row.local.max_abs:
                out[row.name] = calls.pop(0)[1]
            elif row.name in self.rows:
                out[row.name] = self.rows[row.name]
        return out


def _recording(seen: Seen) -> Callable[[], None]:
    """Record every comparison of the next run; returns the undo."""
    fill, local_compare = compare_module._fill_status, local_module.compare_arrays

    def fill_status(row: Any, ref: Any, got: Any, *args: Any) -> None:
        fill(row, ref, got, *args)
        floating = ref is not None and np.issubdtype(ref.dtype, np.floating)
        if floating and got is not None and ref.shape == got.shape:
            seen.rows[row.name] = _stat(ref, got)

    def compare_arrays(ref: Any, got: Any, **kwargs: Any) -> Any:
        metrics, notes = local_compare(ref, got, **kwargs)
        if np.issubdtype(ref.dtype, np.floating):
            seen.local_calls.append((metrics.max_abs, _stat(ref, got)))
        return metrics, notes

    compare_module._fill_status = fill_status
    local_module.compare_arrays = compare_arrays

    def undo() -> None:
        compare_module._fill_status = fill
        local_module.compare_arrays = local_compare

    return undo


def _n(value: float) -> str:
    return f"{value:,.1f}" if math.isfinite(value) else str(value)


def _worst(stats: dict[str, Stat], key: str) -> str:
    if not stats:
        return "-"
    name = max(stats, key=lambda n: getattr(stats[n], key))
    return f"{_n(getattr(stats[name], key))} ({name})"


def measure(name: str, exporter: str, planted: bool) -> None:
    """Align one model and print what its comparisons saw, in eps units."""
    model, x = _build(name)
    model.eval()
    paths = plant(model) if planted else []
    seen = Seen()
    undo = _recording(seen)
    start = time.perf_counter()
    try:
        report = fxalign.align(model, (x,), exporter=exporter)
    finally:
        undo()
    took = time.perf_counter() - start
    with torch.no_grad():
        final = float(model(x).last_hidden_state.abs().max())
    local = seen.local(report)
    head = f"{name} {exporter} {'planted' if planted else 'faithful'}"
    failed = sum(r.failed for r in report.rows)
    verdict = f"{report.verdict}: {failed} rows fail, first divergence {report.first_divergence}"
    if not planted:
        fails = sum(not s.allclose for s in seen.rows.values())
        print(
            f"{head}: {len(report.rows)} rows, max|output| {final:.1e}, {fails} rows fail "
            f"allclose; {verdict}; {took:.0f} s\n"
            f"  cumulative  err/max {_worst(seen.rows, 'by_max')}  err/rms "
            f"{_worst(seen.rows, 'by_rms')}\n"
            f"              c needed: by max {_worst(seen.rows, 'need_max')}  by rms "
            f"{_worst(seen.rows, 'need_rms')}\n"
            f"  local       err/max {_worst(local, 'by_max')}  err/rms {_worst(local, 'by_rms')}\n"
            f"              c needed: by max {_worst(local, 'need_max')}  by rms "
            f"{_worst(local, 'need_rms')}",
            flush=True,
        )
        return
    print(f"{head}: {verdict}; {took:.0f} s", flush=True)
    for path, kind in zip(paths, PLANTS, strict=True):
        parts = []
        for label, stat in (("cumulative", seen.rows.get(path)), ("local", local.get(path))):
            if stat is None:
                parts.append(f"{label} -")
            else:
                parts.append(
                    f"{label} err/max {_n(stat.by_max)} err/rms {_n(stat.by_rms)} "
                    f"c needed {_n(stat.need_max)} / {_n(stat.need_rms)}"
                )
        print(f"  {kind:9s} {path}: " + "; ".join(parts), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(MODELS))
    parser.add_argument("--exporter", choices=["dynamo", "torchscript"], action="append")
    parser.add_argument("--faithful-only", action="store_true")
    args = parser.parse_args(argv)
    for name in args.models:
        for exporter in args.exporter or ["dynamo", "torchscript"]:
            measure(name, exporter, planted=False)
            if not args.faithful_only:
                measure(name, exporter, planted=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
