"""The default verdict: float round-off at a value's magnitude is not a divergence (issue 14).

A deep net with large activations exported faithfully is aligned under the default rule and
diverged under plain ``allclose``; breaks planted in the same net (a wrong translation, NaN and
inf, a resize one pixel off, an off-by-one integer, a sign flipped in a 2x2 patch) are still
the first divergence under the default rule, with either exporter.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxalign
from fixtures.models import BadClamp, planted_export_kwargs
from fxalign import MarkerName, compare, compare_arrays
from fxalign.report.model import ROUNDOFF_FACTOR, Report
from fxalign.report.summary import rule_text, summary_line

EPS32 = 2.0**-23


# ---- the rule on arrays -----------------------------------------------------------------------
def test_cancellation_round_off_passes_and_allclose_fails():
    rng = np.random.default_rng(0)
    ref = (rng.standard_normal(1000) * 1e6).astype(np.float32)
    ref[:10] = 0.5  # small outputs next to large ones
    got = ref.copy()
    got[:10] += 2.0  # the float32 round-off of values of 1e6 (a few eps * 1e6)
    allclose, _ = compare_arrays(ref, got, atol=1e-4, rtol=1e-3, verdict="allclose")
    roundoff, _ = compare_arrays(ref, got, atol=1e-4, rtol=1e-3)
    assert allclose.mismatched == 10 and allclose.roundoff == 0.0
    assert roundoff.mismatched == 0
    rms = math.sqrt(float(np.mean(ref.astype(np.float64) ** 2)))
    assert roundoff.roundoff == pytest.approx(ROUNDOFF_FACTOR * EPS32 * rms, rel=1e-6)


def test_errors_beyond_round_off_still_fail():
    rng = np.random.default_rng(1)
    ref = (rng.standard_normal(1000) * 1e6).astype(np.float32)
    flipped = ref.copy()
    flipped[:4] *= -1  # a sign flip in a small region
    assert compare_arrays(ref, flipped, atol=1e-4, rtol=1e-3)[0].mismatched == 4
    shifted = np.concatenate([ref[1:], ref[-1:]])  # one position off
    assert compare_arrays(ref, shifted, atol=1e-4, rtol=1e-3)[0].mismatched > 900
    special = ref.copy()
    special[0], special[1] = np.nan, np.inf
    m, _ = compare_arrays(ref, special, atol=1e-4, rtol=1e-3)
    assert m.mismatched == 2 and math.isinf(m.max_abs)
    ids = np.arange(10**6, 10**6 + 8)
    m, _ = compare_arrays(ids, ids + (np.arange(8) == 3), atol=1e-4, rtol=1e-3)
    assert m.mismatched == 1 and m.roundoff == 0.0  # integers stay exact


def test_rtol_zero_turns_the_allowance_off():
    ref = np.array([1e6, 1.0], np.float32)
    got = np.array([1e6, 1.5], np.float32)
    m, _ = compare_arrays(ref, got, atol=0.1, rtol=0)
    assert m.roundoff == 0.0 and m.mismatched == 1


def test_half_precision_allowance_is_capped_by_rtol():
    ref = np.full(16, 4.0, np.float16)
    m, _ = compare_arrays(ref, ref.copy(), atol=1e-2, rtol=1e-2)
    assert ROUNDOFF_FACTOR * 2.0**-10 > 1e-2  # uncapped it would exceed the value itself
    assert m.roundoff == pytest.approx(1e-2 * 4.0)
    wide = {MarkerName("a"): np.full(4, 2.0, np.float32)}  # bfloat16 arrives widened
    (row,) = compare(wide, wide, torch_dtypes={MarkerName("a"): "bfloat16"})
    assert (row.atol, row.rtol) == (5e-2, 5e-2) and row.metrics.roundoff == pytest.approx(0.1)


def test_unknown_verdict_is_a_user_error():
    with pytest.raises(fxalign.UserError, match="unknown verdict 'close'"):
        compare_arrays(np.ones(2), np.ones(2), atol=0, rtol=0, verdict="close")
    with pytest.raises(fxalign.UserError, match="roundoff, allclose"):
        compare({}, {}, verdict="nearly")


# ---- the rule named in every rendering and in the JSON ---------------------------------------
def test_reports_say_which_rule_judged_them():
    report = Report("M", "dynamo", 1e-4, 1e-3, [])
    assert report.verdict == "roundoff"
    assert "+ round-off" in summary_line(report)
    assert f"min({ROUNDOFF_FACTOR:g}*eps, rtol)*rms(torch)" in rule_text(report)
    text = fxalign.render_text(report)
    assert "verdict=roundoff" in text and rule_text(report) in text
    html = fxalign.render_html(report)
    assert "min(4096·eps, rtol)·rms(torch)" in html
    plain = Report("M", "dynamo", 1e-4, 1e-3, [], verdict="allclose")
    assert "round-off" not in summary_line(plain)
    assert "verdict=allclose" in fxalign.render_text(plain)
    assert Report.from_json(plain.to_json()) == plain


def test_version_1_reports_read_back_as_allclose():
    data = Report("M", "dynamo", 1e-4, 1e-3, []).to_dict()
    del data["verdict"]
    data["schema_version"] = 1
    assert Report.from_dict(data).verdict == "allclose"
    data["schema_version"] = 2
    assert Report.from_dict(data).verdict == "roundoff"


def test_verdict_is_an_align_option():
    from fxalign.options import AlignOptions

    assert AlignOptions.build().verdict == "roundoff"
    assert AlignOptions.build(verdict="allclose").verdict == "allclose"
    with pytest.raises(fxalign.UserError, match="unknown verdict"):
        AlignOptions.build(verdict="exact")


# ---- a deep net with large activations ------------------------------------------------------
class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x):
        return x + self.act(self.bn(self.conv(x)))


class DeepLarge(nn.Module):
    """16 residual conv blocks whose He-normal weights are scaled up: outputs reach ~2e6."""

    def __init__(self, depth: int = 16, c: int = 16, gain: float = 1.6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*(Block(c) for _ in range(depth)))
        self.head = nn.Conv2d(c, 8, 1)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    m.weight.mul_(gain)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def _deep() -> tuple[DeepLarge, torch.Tensor]:
    torch.manual_seed(0)
    return DeepLarge().eval(), torch.randn(1, 3, 16, 16)


def _stage_values(model, args, exporter, workdir: Path):
    """Both sides' marker values, through the public stages (no verdict involved yet)."""
    instrumented = fxalign.instrument(model, args)
    exported = fxalign.export(instrumented, args, workdir / "export.onnx", exporter=exporter)
    extracted = fxalign.extract(exported.path, exported.aliases)
    extracted.save(workdir / "debug.onnx")
    feeds = fxalign.onnx_feeds(extracted.model, args, input_names=exported.input_names)
    raw = fxalign.run_onnx(workdir / "debug.onnx", feeds)
    torch_values = {
        name: value
        for name, value in fxalign.run_torch(instrumented, args).items()
        if name in extracted.tensor_of and not name.is_input
    }
    return torch_values, {name: raw[extracted.tensor_of[name]] for name in torch_values}


def test_faithful_deep_net_with_large_activations_is_aligned(exporter, tmp_path):
    model, x = _deep()
    with torch.no_grad():
        assert model(x).abs().max() > 1e6
    torch_values, onnx_values = _stage_values(model, (x,), exporter, tmp_path)
    plain = compare(torch_values, onnx_values, verdict="allclose")
    assert sum(r.failed for r in plain) >= 5, "allclose must cry wolf here, or this proves nothing"
    rows = compare(torch_values, onnx_values)
    assert not any(r.failed for r in rows), [r.name for r in rows if r.failed]
    report = fxalign.align(model, (x,), exporter=exporter, local="all")
    assert report.passed and report.verdict == "roundoff", summary_line(report)
    assert report.first_divergence is None
    leaves = [r for r in report.rows if r.local is not None]
    assert leaves and all(r.local.mismatched == 0 for r in leaves)
    strict = fxalign.align(model, (x,), exporter=exporter, verdict="allclose")
    assert strict.verdict == "allclose" and not strict.passed, summary_line(strict)


def _exporting() -> bool:
    return bool(
        torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting() or torch.jit.is_tracing()
    )


class Planted(nn.Module):
    """A leaf that computes one function eagerly and a broken one while an exporter traces it."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x):
        broken = _exporting()
        if self.kind == "wrong_op":  # LeakyReLU translated as Relu
            return F.relu(x) if broken else F.leaky_relu(x, 0.01)
        if self.kind == "resize":  # an upsampling that samples one pixel off
            up = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            if broken:
                up = torch.cat([up[..., 1:], up[..., -1:]], dim=-1)
            return F.avg_pool2d(up, 2)
        if not broken:
            return x * 1.0
        if self.kind == "sign_flip":  # one 2x2 patch of one channel
            sign = torch.ones_like(x)
            sign[0, 0, 4:6, 4:6] = -1.0
            return x * sign
        bad = torch.zeros_like(x).flatten()
        if self.kind == "nan":
            bad[7] = float("nan")
        else:
            bad[7] = float("inf")
        return x + bad.reshape(x.shape)


class Indices(nn.Module):
    """Index of the largest value per channel; the export adds 1 to one of them."""

    def forward(self, x):
        idx = x.flatten(2).argmax(dim=-1)
        if _exporting():
            idx = idx + (torch.arange(idx.numel()).reshape(idx.shape) == 3).to(idx.dtype)
        return idx


class WithIndices(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.pick = Indices()

    def forward(self, x):
        y = self.body(x)
        return y, self.pick(y)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind", ["wrong_op", "wrong_translation", "nan", "inf", "resize", "sign_flip"]
)
def test_planted_breaks_are_the_first_divergence(kind, exporter):
    model, x = _deep()
    block = model.blocks[10]
    if kind == "wrong_translation":  # a custom op whose ONNX translation forgets the clamp
        block.act = BadClamp()
        where, kwargs = "blocks.10.act", planted_export_kwargs(exporter)
    else:
        block.conv = nn.Sequential(block.conv, Planted(kind))
        where, kwargs = "blocks.10.conv.1", {}
    report = fxalign.align(model, (x,), exporter=exporter, export_kwargs=kwargs)
    assert report.verdict == "roundoff"
    assert report.first_divergence == where, summary_line(report)
    row = report.row(where)
    assert row.status == "diverged" and row.local is not None and row.local.mismatched > 0
    assert all(r.passed for r in report.rows[: report.rows.index(row)] if r.passed is not None)


def test_off_by_one_integer_is_caught(exporter):
    body, x = _deep()
    report = fxalign.align(WithIndices(body).eval(), (x,), exporter=exporter)
    assert report.first_divergence == "pick", summary_line(report)
    pick = report.row("pick")
    assert pick.torch_dtype == "int64" and pick.metrics.mismatched == 1
    assert pick.metrics.roundoff == 0.0
    assert all(r.passed for r in report.rows if r.module_path.startswith("body"))
