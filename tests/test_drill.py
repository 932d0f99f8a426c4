"""Drill-down to the op and source line, and the standalone repro bundle (issue 14, items 3-4).

Every fault sits inline in a module's own ``forward`` (``tests/fixtures/drill_models.py`` says
which exporter each one diverges with); the expected line is found in the fixture's source.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fxalign
from fixtures.drill_models import (
    AttentionBlock,
    AttentionNet,
    DownsampleNet,
    FloorNet,
    GatedFloorNet,
    HalfFloor,
    InplaceHalfFloor,
    MaskedAttention,
    NormedHalfFloor,
    attention_inputs,
    fault_line,
)
from fxalign import demo
from fxalign.cli import main
from fxalign.drill.inputs import call_inputs
from fxalign.drill.ops import drill_ops
from fxalign.drill.program import export_program
from fxalign.errors import UserError
from fxalign.options import AlignOptions
from fxalign.report.text import render_text
from fxalign.samples import Sample

SDPA = "aten.scaled_dot_product_attention.default"


def _fresh_run(folder, cwd):
    """``python repro.py`` of a bundle in a fresh process: no PYTHONPATH, another folder."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, str(folder / "repro.py")],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(
        torch.equal(after[k], v) for k, v in before.items()
    )


# ---- the stages, on a block with submodules ----------------------------------------------------
def test_call_inputs_copies_the_wanted_call_and_leaves_the_model_as_it_was():
    lin = torch.nn.Linear(2, 2)
    net = torch.nn.Sequential(lin, torch.nn.ReLU(), lin).eval()
    before = _state(net)
    x = torch.randn(1, 2)
    second = call_inputs(net, "0", 1, Sample((x,)))
    expected = torch.relu(lin(x))
    assert torch.allclose(second.args[0], expected)
    assert not net[0]._forward_pre_hooks and _same_state(net, before)
    with pytest.raises(UserError, match="2 call"):
        call_inputs(net, "0", 2, Sample((x,)))


def test_the_attention_op_of_a_blocks_own_code_is_named_with_its_line(exporter, tmp_path):
    block = AttentionBlock().eval()
    inputs = Sample(attention_inputs("additive"))
    finding = drill_ops(
        export_program(block, inputs),
        inputs,
        module_path="blocks.0.attn",
        atol=1e-4,
        rtol=1e-3,
        options=AlignOptions.build(exporter=exporter),
        workdir=tmp_path,
    )
    file, line = fault_line(AttentionBlock, "scaled_dot_product_attention")
    assert (finding.op, finding.file, finding.line) == (SDPA, file, line)
    assert finding.module_path == "blocks.0.attn"  # its own code, not qkv or proj
    assert finding.source == "out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)"
    assert {"MatMul", "Softmax"} <= set(finding.onnx_op_types) and finding.onnx_nodes
    assert finding.local is not None and finding.local.mismatched == 4 * 2  # row 2, both heads
    assert finding.ops_compared > 5


def test_no_op_breaks_where_the_exporter_translates_the_block_faithfully(tmp_path):
    # A boolean mask with a fully masked row: the TorchScript translation gives PyTorch's zeros.
    block = AttentionBlock().eval()
    inputs = Sample(attention_inputs("boolean"))
    with pytest.raises(UserError, match="no op of attn breaks tolerance"):
        drill_ops(
            export_program(block, inputs),
            inputs,
            module_path="attn",
            atol=1e-4,
            rtol=1e-3,
            options=AlignOptions.build(exporter="torchscript"),
            workdir=tmp_path,
        )


# ---- align, end to end -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "exporter", ["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)]
)  # about 20 s each on a 2-core machine
def test_align_names_the_op_and_line_and_the_bundle_reproduces_in_a_fresh_process(
    exporter, tmp_path
):
    model = AttentionNet().eval()
    x, mask = attention_inputs("additive")
    before, x0 = _state(model), x.clone()
    bundle = tmp_path / "bundle"
    report = fxalign.align(model, (x, mask), exporter=exporter, repro=bundle)
    assert report.first_divergence == "attn"
    file, line = fault_line(MaskedAttention, "scaled_dot_product_attention")
    assert report.op is not None and (report.op.op, report.op.file, report.op.line) == (
        SDPA,
        file,
        line,
    )
    assert report.repro is not None and report.repro.reproduces is True
    assert report.repro.note.startswith("reproduces in isolation")
    assert report.timings["drill_down"] > 0
    assert _same_state(model, before) and torch.equal(x, x0) and model.training is False
    text = render_text(report)
    assert f"op: {SDPA} in attn at {file}:{line}" in text
    assert "F.scaled_dot_product_attention(q, k, v, attn_mask=mask)" in text
    assert f"repro: {bundle} (reproduces in isolation" in text
    done = _fresh_run(bundle, tmp_path)  # neither fxalign nor the test's code on the path
    assert done.returncode == 1, done.stderr
    assert "DIVERGES" in done.stdout and "module.pt2" in done.stdout
    assert fxalign.Report.from_json(report.to_json()) == report


@pytest.mark.slow
def test_a_boolean_mask_diverges_with_the_dynamo_exporter_only(tmp_path):
    args = attention_inputs("boolean")
    aligned = fxalign.align(AttentionNet().eval(), args, exporter="torchscript")
    assert aligned.passed and aligned.op is None and aligned.op_note is None
    report = fxalign.align(AttentionNet().eval(), args, exporter="dynamo", repro=tmp_path / "b")
    assert report.op is not None and report.op.op == SDPA and "Where" in report.op.onnx_op_types
    assert report.repro is not None and report.repro.reproduces is True


def test_float_floor_division_with_the_torchscript_exporter(tmp_path):
    args = (torch.randn(3, 6) * 3,)
    bundle = tmp_path / "b"
    report = fxalign.align(FloorNet().eval(), args, exporter="torchscript", repro=bundle)
    assert report.first_divergence == "halve"
    assert report.op is not None and report.op.op == "aten.floor_divide.default"
    assert (report.op.file, report.op.line) == fault_line(HalfFloor, "y // 2")
    assert report.op.source == "return y // 2"
    assert {"Div", "Cast"} <= set(report.op.onnx_op_types)  # truncation, not floor
    assert report.repro is not None and report.repro.reproduces is True
    assert _fresh_run(bundle, tmp_path).returncode == 1


def test_a_culprit_that_writes_its_input_in_place_is_drilled_into(tmp_path):
    # torch cannot unlift a functionalized program whose result is also its input's new
    # value: the culprit is exported on copies of its inputs
    args = (torch.randn(3, 6) * 3,)
    model, bundle = FloorNet(InplaceHalfFloor()).eval(), tmp_path / "b"
    before = args[0].clone()
    report = fxalign.align(model, args, exporter="torchscript", repro=bundle)
    assert torch.equal(args[0], before)
    assert report.first_divergence == "halve"
    assert report.op is not None, report.op_note
    assert report.op.op == "aten.floor_divide.default"
    assert (report.op.file, report.op.line) == fault_line(InplaceHalfFloor, "x // 2")
    assert report.repro is not None and report.repro.reproduces is True
    program = export_program(torch.nn.ReLU(inplace=True), Sample((torch.randn(2, 3),)))
    assert not program.graph_signature.user_inputs_to_mutate


def test_a_culprit_with_batch_norm_and_an_in_place_op_is_drilled_into_with_torchscript():
    # functionalization lowers batch_norm to a core op the TorchScript exporter cannot export
    args = (torch.randn(3, 6) * 3,)
    report = fxalign.align(FloorNet(NormedHalfFloor()).eval(), args, exporter="torchscript")
    assert report.first_divergence == "halve"
    assert report.op is not None, report.op_note
    assert report.op.op == "aten.floor_divide.default"
    assert (report.op.file, report.op.line) == fault_line(NormedHalfFloor, "h // 2")


class _BakedScale(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x) * (4.0 / x.abs().max().item())  # tracing bakes the scale


def test_a_divergence_only_another_sample_shows_says_so_in_the_op_note():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), _BakedScale(), torch.nn.Linear(8, 3)).eval()
    x = torch.randn(2, 4)
    report = fxalign.align(net, (x,), samples=[(3 * x,)], exporter="torchscript")
    assert report.first_divergence == "1" and report.op is None
    assert "breaks tolerance most on sample 1 (in 1 of 2 samples)" in (report.op_note or "")


def test_an_aligned_model_gets_no_drill_down_and_no_bundle(tmp_path):
    # The dynamo exporter floors float divisions as PyTorch does.
    bundle = tmp_path / "b"
    report = fxalign.align(FloorNet().eval(), (torch.randn(3, 6) * 3,), repro=bundle)
    assert report.passed and report.exporter == "dynamo"
    assert report.op is None and report.op_note is None and report.repro is None
    assert "drill_down" not in report.timings and not bundle.exists()


def test_drill_down_false_turns_it_off():
    args = (torch.randn(3, 6) * 3,)
    report = fxalign.align(FloorNet().eval(), args, exporter="torchscript", drill_down=False)
    assert not report.passed and report.first_divergence == "halve"
    assert report.op is None and report.op_note is None and "drill_down" not in report.timings
    assert "op:" not in render_text(report)


def test_an_antialiased_resize_with_the_dynamo_exporter(tmp_path):
    # The TorchScript exporter has no translation for it (the export fails).
    report = fxalign.align(DownsampleNet().eval(), (torch.randn(1, 2, 10, 12),), exporter="dynamo")
    assert report.first_divergence == "down" and report.op is not None
    assert report.op.op == "aten._upsample_bilinear2d_aa.vec"
    assert report.op.onnx_op_types == ["Resize"]
    assert report.op.source.startswith("return F.interpolate(")


@pytest.mark.slow
def test_a_custom_op_with_a_wrong_translation_and_its_bundle(exporter, tmp_path):
    bundle = tmp_path / "b"
    report = fxalign.align(
        demo.SoftClipNet().eval(),
        demo.softclip_inputs(),
        exporter=exporter,
        export_kwargs=demo.softclip_export_kwargs(exporter),
        repro=bundle,
    )
    assert report.op is not None and report.op.op == "fxalign_demo.softclip.default"
    assert (report.op.file, report.op.line) == fault_line(demo.SoftClip, "return softclip(x)")
    assert report.op.onnx_op_types == ["Clip"]
    assert report.repro is not None and report.repro.reproduces is True
    assert "custom op(s) fxalign_demo::softclip" in report.repro.note
    done = _fresh_run(bundle, tmp_path)  # the op is not registered there: expected.pt stands in
    assert done.returncode == 1 and "recorded outputs" in done.stdout


def test_attach_mode_drills_down_too():
    report = fxalign.align(AttentionNet().eval(), attention_inputs("additive"), attach=True)
    assert report.first_divergence == "attn" and report.op is not None and report.op.op == SDPA


def test_a_culprit_torch_export_cannot_trace_gets_a_note(capfd):
    report = fxalign.align(GatedFloorNet().eval(), (torch.randn(3, 6) * 3,), exporter="torchscript")
    assert report.first_divergence == "gate" and report.op is None
    assert report.op_note is not None and report.op_note.startswith("torch.export could not trace")
    assert "op: not found: torch.export could not trace" in render_text(report)
    # torch.export's graph dumps of the failed trace go to fxalign's debug log, not the terminal
    assert "def forward(" not in capfd.readouterr().err


# ---- options and the command line --------------------------------------------------------------
def test_a_repro_folder_holding_a_bundle_is_refused_before_any_work(tmp_path):
    (tmp_path / "repro.py").write_text("")
    with pytest.raises(UserError, match="already exists"):
        AlignOptions.build(repro=tmp_path)
    assert AlignOptions.build(repro=tmp_path, overwrite=True).repro == tmp_path
    with pytest.raises(UserError, match="is a file"):
        AlignOptions.build(repro=tmp_path / "repro.py")
    assert AlignOptions.build().drill_down is True


def test_cli_repro_and_no_drill_down(tmp_path, capsys):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "module.pt2").write_text("")
    model = "tests/fixtures/drill_models.py:FloorNet"
    argv = ["align", model, "--input", "3x6", "--exporter", "torchscript"]
    assert main([*argv, "--repro", str(tmp_path / "old")]) == 2  # before any export
    assert "already exists" in capsys.readouterr().err
    assert main([*argv, "--no-drill-down"]) == 1
    assert "op:" not in capsys.readouterr().out
    assert main([*argv, "--repro", str(tmp_path / "new")]) == 1
    out = capsys.readouterr().out
    assert "op: aten.floor_divide.default in halve at " in out
    assert f"repro: {tmp_path / 'new'} (reproduces in isolation" in out


def test_a_users_file_is_drilled_into_with_the_exporter_that_wrote_it(tmp_path):
    from fixtures.models import PlantedDivergence

    torch.manual_seed(0)
    model, (x,) = PlantedDivergence().eval(), PlantedDivergence.inputs()
    path = tmp_path / "deployed.onnx"
    torch.onnx.export(model, (x,), path, dynamo=False)  # the user's TorchScript export
    report = fxalign.align(model, (x,), onnx=path, exporter="dynamo")
    assert report.exporter == "torchscript"
    assert report.first_divergence == "mid.clamp" and report.op is not None, report.op_note
    assert report.op.op == "fxalign_tests.relu6.default" and report.op.onnx_op_types == ["Relu"]
