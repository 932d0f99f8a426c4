"""align() on the file you deploy (issue 15): ``onnx=`` (the user's file) and ``attach=True``."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import fxalign
from fixtures import attach_models as am
from fixtures.alias_models import PATTERNS
from fixtures.models import (
    ConvBnReluInplace,
    IdentityTranslated,
    LoopedPlanted,
    NestedBlocks,
    OrtCannotRun,
    PlantedDivergence,
    ReusedModule,
    _Clip01,
    identity_export_kwargs,
    planted_export_kwargs,
)
from fixtures.oracle import plain_export_matches
from fxalign.cli import main
from fxalign.compare import DTYPE_TOLERANCES
from fxalign.errors import RuntimeBackendError, UserError

pytestmark = pytest.mark.slow  # make test-slow (and CI): ~2 minutes of exports


def _export(model: nn.Module, args: tuple, path: Path, exporter: str, **options) -> Path:
    """The user's own export script."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            options.setdefault("verbose", False)
        torch.onnx.export(model, args, str(path), dynamo=exporter == "dynamo", **options)
    return path


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _rows(report: fxalign.Report) -> dict[str, fxalign.Row]:
    return {r.display_name: r for r in report.rows}


@pytest.mark.parametrize("mode", ["file", "export"])
def test_planted_divergence_is_found_in_both_attach_modes(exporter, mode, tmp_path):
    model, x = PlantedDivergence().eval(), PlantedDivergence.inputs()
    kwargs = planted_export_kwargs(exporter)
    if mode == "file":
        path = _export(model, x, tmp_path / "user" / "model.onnx", exporter, **kwargs)
        report = fxalign.align(model, x, onnx=path)
    else:
        report = fxalign.align(model, x, exporter=exporter, attach=True, export_kwargs=kwargs)
    assert report.instrumentation == "attach" and report.exporter == exporter
    assert not report and report.first_divergence == "mid.clamp"
    clamp = _rows(report)["mid.clamp"]
    assert clamp.local is not None and clamp.local.max_abs > 1.0  # introduced here
    after = _rows(report)["after.0.0"]
    assert after.failed and after.local is not None and after.local.max_abs < 1e-4
    assert "15 of 15 modules located" in report.notes[0] and not _differences(report)
    markers = fxalign.align(model, x, exporter=exporter, export_kwargs=kwargs)
    assert [r.name for r in report.rows] == [r.name for r in markers.rows]


def test_a_block_applied_back_to_back_keeps_its_rows_and_local_errors(exporter, tmp_path):
    """The dynamo file has one run of nodes for the three calls: their values tell them."""
    model, x = LoopedPlanted().eval(), LoopedPlanted.inputs()
    path = _export(model, x, tmp_path / "m.onnx", exporter, **planted_export_kwargs(exporter))
    report = fxalign.align(model, x, onnx=path, drill_down=False)
    assert report.first_divergence == "block.clamp"
    rows = _rows(report)
    for name in ["block", "block#1", "block#2"]:
        assert rows[name].metrics is not None, (name, rows[name].notes)
        assert rows[name].local is not None, (name, rows[name].local_note)
    assert rows["block#1"].local.max_abs < 1e-4  # its clamp's error, not its own
    assert rows["block.clamp#1"].local.max_abs > 1.0
    root = rows["output"]
    assert root.local is not None and root.local.max_abs < 1e-4, root.local_note


@pytest.mark.parametrize("cls", [NestedBlocks, ReusedModule])
def test_names_and_order_are_the_marker_paths(cls, exporter):
    model, x = cls().eval(), cls.inputs()
    attached = fxalign.align(model, x, exporter=exporter, attach=True)
    markers = fxalign.align(model, x, exporter=exporter)
    assert attached
    located = [r.name for r in attached.rows if r.onnx_name is not None]
    assert located == [r.name for r in markers.rows if r.name in located]
    assert len(located) >= len(markers.rows) - 2


def test_conv_bn_reports_the_fused_module(exporter, tmp_path):
    model, x = ConvBnReluInplace().eval(), ConvBnReluInplace.inputs()
    path = _export(model, x, tmp_path / "m.onnx", exporter)
    report = fxalign.align(model, x, onnx=path, local="all")
    conv = _rows(report)["conv"]
    assert conv.status == "missing_in_onnx" and conv.notes[0] == "fused into bn"
    if exporter == "torchscript":  # the tensor leaving conv's scope: bn's values, not conv's
        assert conv.notes[1].endswith("the module reading this one's, differ from this output")
    assert report.coverage.unmarked["conv"] == "fused into bn"
    bn = _rows(report)["bn"]
    # bn reads conv's output, computed from the file's input: its check measures the two
    assert bn.passed and bn.local is not None and bn.local_scope == "with_submodules"
    assert bn.local_note.startswith(
        "includes the error of conv (its input bn:in[0] has no ONNX value (conv's output: "
        "fused into bn);"
    )
    assert report


@pytest.mark.parametrize("cls", PATTERNS, ids=lambda c: c.__name__)
def test_models_the_markers_change_get_the_plain_exports_verdict(cls, exporter):
    torch.manual_seed(0)
    model, x = cls().eval(), torch.randn(4, 8)
    kwargs = planted_export_kwargs(exporter)
    expected = plain_export_matches(model, (x,), exporter, export_kwargs=kwargs)
    report = fxalign.align(model, (x,), exporter=exporter, attach=True, export_kwargs=kwargs)
    assert bool(report) == expected, [(r.name, r.status) for r in report.rows]


def _onnxsim(path: Path, out: Path) -> Path:
    onnxsim = pytest.importorskip("onnxsim")
    simplified, ok = onnxsim.simplify(onnx.load(path))
    assert ok
    onnx.save(simplified, out)
    return out


def _float16(path: Path, out: Path) -> Path:
    float16 = pytest.importorskip("onnxconverter_common.float16")
    onnx.save(float16.convert_float_to_float16(onnx.load(path), keep_io_types=True), out)
    return out


def _onnxscript_optimized(path: Path, out: Path) -> Path:
    import onnxscript.optimizer

    onnx.save(onnxscript.optimizer.optimize(onnx.load(path)), out)
    return out


def _ort_basic(path: Path, out: Path) -> Path:
    """ONNX Runtime's offline-optimised model (basic level), as ``optimized_model_filepath``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return out


@pytest.mark.parametrize("tool", ["onnxscript", "ort-basic"])
def test_optimised_copies_still_find_the_planted_divergence(exporter, tool, tmp_path):
    model, x = am.PlantedConvBn().eval(), am.PlantedConvBn.inputs()
    kwargs = planted_export_kwargs(exporter)
    path = _export(model, x, tmp_path / "m.onnx", exporter, **kwargs, external_data=False)
    optimise = _onnxscript_optimized if tool == "onnxscript" else _ort_basic
    processed = optimise(path, tmp_path / f"{tool}.onnx")
    before = _digest(tmp_path)
    # (ONNX Runtime keeps the metadata of the nodes it leaves alone: here every one, as the
    # exporters folded the batch norm already; a BERT's fused attention loses it, see
    # tests/test_attach_scopes.py.)
    report = fxalign.align(model, x, onnx=processed)
    rows = _rows(report)
    assert list(rows) == ["conv", "bn", "act", "pool", "flat", "head", "output"]
    assert not report and report.first_divergence == "act"
    assert rows["act"].local is not None and rows["act"].local.max_abs > 1.0  # introduced here
    assert rows["head"].failed and rows["head"].local.max_abs < 1e-4  # only inherited
    assert rows["conv"].status == "missing_in_onnx" and rows["conv"].notes[0] == "fused into bn"
    assert report.coverage.unmarked["conv"] == "fused into bn"
    assert _digest(tmp_path) == before


def test_onnxsim_copy_of_a_torchscript_file(tmp_path):
    model, x = am.TwoHeads().eval(), am.TwoHeads.inputs()
    path = _onnxsim(_export(model, x, tmp_path / "m.onnx", "torchscript"), tmp_path / "sim.onnx")
    before = _digest(tmp_path)
    report = fxalign.align(model, x, onnx=path)
    assert report, [(r.name, r.status, r.notes) for r in report.rows if r.failed]
    assert _rows(report)["conv"].notes[0] == "fused into bn"
    assert "7 of 8 modules located" in report.notes[0]
    assert _digest(tmp_path) == before


def test_float16_copy_is_compared_with_float16_tolerances(exporter, tmp_path):
    model, x = am.TwoHeads().eval(), am.TwoHeads.inputs()
    path = _float16(_export(model, x, tmp_path / "m.onnx", exporter), tmp_path / "f16.onnx")
    report = fxalign.align(model, x, onnx=path)
    act = _rows(report)["act"]
    assert act.onnx_dtype == "float16" and act.torch_dtype == "float32"
    assert (act.atol, act.rtol) == DTYPE_TOLERANCES["float16"]
    assert act.passed and act.metrics.max_abs > 1e-6  # rounded, within float16 tolerance
    output = _rows(report)["output[0]"]
    assert output.onnx_dtype == "float32" and output.atol == 1e-4
    halves = sum(1 for r in report.rows if r.passed is not None and r.onnx_dtype == "float16")
    assert f"({halves} values at atol=0.01, rtol=0.01)" in fxalign.render_text(report)
    strict = fxalign.align(model, x, onnx=path, atol=1e-6, rtol=0.0)
    assert not _rows(strict)["act"].passed  # a global tolerance still applies to every value


@pytest.mark.parametrize("external", [True, False], ids=["external-data", "inline"])
def test_the_file_and_its_external_data_are_never_written(exporter, external, tmp_path):
    model, x = ReusedModule().eval(), ReusedModule.inputs()
    folder = tmp_path / "deploy"
    folder.mkdir()
    path = _export(model, x, folder / "m.onnx", exporter)
    onnx.save(
        onnx.load(path), path, save_as_external_data=external, location="m.data", size_threshold=0
    )
    assert (folder / "m.data").exists() == external
    before = _digest(folder)
    work = tmp_path / "work"
    report = fxalign.align(model, x, onnx=path, samples=[torch.randn_like(x[0])], workdir=work)
    assert report and report.sample_count == 2
    assert _digest(folder) == before  # nothing written, nothing left beside it
    # The promoted copy is kept in a given work folder only when it needs no external data.
    assert sorted(p.name for p in work.iterdir()) == ([] if external else ["attach.onnx"])


def test_further_samples_run_the_same_session(tmp_path, monkeypatch):
    from fxalign.backends import OrtRunner

    loads = []
    original = OrtRunner.load_weightless
    monkeypatch.setattr(
        OrtRunner, "load_weightless", lambda s, m: loads.append(m) or original(s, m)
    )
    model, x = PlantedDivergence().eval(), PlantedDivergence.inputs()
    kwargs = planted_export_kwargs("torchscript")
    path = _export(model, x, tmp_path / "m.onnx", "torchscript", **kwargs)
    samples = [torch.randn(4, 8) * 0.001, torch.randn(4, 8)]
    report = fxalign.align(model, x, onnx=path, samples=samples)
    assert len(loads) == 1 and report.sample_count == 3
    assert _rows(report)["mid.clamp"].samples.failed == 3


def test_a_file_without_scopes_is_a_user_error(tmp_path):
    model, x = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval(), (torch.randn(2, 4),)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"], "r")],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
    )
    onnx.save(onnx.helper.make_model(graph, producer_name="handmade"), tmp_path / "h.onnx")
    with pytest.raises(UserError, match="has no module scopes"):
        fxalign.align(model, x, onnx=tmp_path / "h.onnx")
    with pytest.raises(UserError, match="does not exist"):
        fxalign.align(model, x, onnx=tmp_path / "missing.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(UserError, match="is not an ONNX model: it holds no graph"):
        fxalign.align(model, x, onnx=tmp_path / "empty.onnx")
    with pytest.raises(UserError, match="max_outputs_per_run"):
        fxalign.align(model, x, attach=True, max_outputs_per_run=4)


def test_a_runtime_failure_names_the_module(tmp_path):
    model, x = OrtCannotRun().eval(), OrtCannotRun.inputs()
    path = _export(model, x, tmp_path / "m.onnx", "torchscript")
    with pytest.raises(RuntimeBackendError) as info:
        fxalign.align(model, x, onnx=path)
    assert "from module 'body.1'" in str(info.value)
    assert "Doubler" in str(info.value)


def test_tiny_bert_in_attach_mode(exporter):
    model, args = am.bert_tiny()
    report = fxalign.align(model, args, exporter=exporter, attach=True, local="all")
    assert report, [(r.name, r.status) for r in report.rows if r.failed]
    located = [r for r in report.rows if r.onnx_name is not None]
    assert len(located) >= 37
    query = _rows(report)["bert.encoder.layer.1.attention.self.query"]
    assert query.local is not None and not query.introduced_failed
    blocks = [r for r in report.rows if r.kind == "block" and r.local is not None]
    assert any(r.local_scope == "own_code" for r in blocks)
    # a block around a module the file has no value of (a Dropout the exporter removed, a
    # constant-folded embedding) recomputes it, and says which and why
    around = [r for r in blocks if r.local_scope == "with_submodules"]
    assert all("has no ONNX value (" in (r.local_note or "") for r in around)
    assert not any(r.introduced_failed for r in report.rows)
    dropout = _rows(report)["bert.encoder.layer.0.output.dropout"]
    assert dropout.notes == ["removed by the exporter (Dropout: returns its input)"]
    assert not _differences(report)


def test_model_state_is_put_back(tmp_path):
    model, x = ConvBnReluInplace().train(), ConvBnReluInplace.inputs()
    path = _export(model.eval(), x, tmp_path / "m.onnx", "torchscript")
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="training mode"):
        fxalign.align(model, x, onnx=path)
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_cli_onnx_and_attach(tmp_path, capsys):
    script = tmp_path / "net.py"
    script.write_text(
        "import torch\nfrom fixtures.models import PlantedDivergence\n"
        "def make():\n    torch.manual_seed(0)\n    return PlantedDivergence().eval()\n"
    )
    torch.manual_seed(0)
    model = PlantedDivergence().eval()
    path = _export(model, (torch.randn(4, 8),), tmp_path / "m.onnx", "torchscript")
    code = main(["align", f"{script}:make", "-i", "4x8", "--onnx", str(path)])
    out = capsys.readouterr().out
    assert code == 1 and "introduced in mid.clamp" in out and "attached to the file" in out
    argv = ["align", f"{script}:make", "-i", "4x8", "--attach", "--exporter", "torchscript"]
    code = main([*argv, "--workdir", str(tmp_path / "wd")])
    out = capsys.readouterr().out
    assert code == 1 and "introduced in mid.clamp" in out and "plain export" in out
    assert (tmp_path / "wd" / "plain.onnx").exists()


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_containers_and_parametrizations_are_covered_as_in_the_marker_mode(exporter, tmp_path):
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
            self.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(8, 8, 1))

        def forward(self, x):
            for layer in self.layers:
                x = torch.relu(layer(x))
            return self.conv(x.unsqueeze(-1))

    torch.manual_seed(0)
    model, x = Stack().eval(), torch.randn(2, 8)
    path = _export(model, (x,), tmp_path / "m.onnx", exporter)
    attached = fxalign.align(model, (x,), onnx=path)
    marked = fxalign.align(model, (x,), exporter=exporter, attach=False)
    for report in (attached, marked):
        assert report.coverage.unmarked["layers"] == (
            "container, never called itself (its submodules are marked)"
        )
        inside = [p for p in report.coverage.unmarked if p.startswith("conv.parametrizations")]
        assert inside and not set(inside) & set(report.coverage.marked)
    assert set(attached.coverage.marked) == {"layers.0", "layers.1", "conv"}
    assert "3 of 3 modules located" in attached.notes[0]


class _Attention(nn.Module):
    """Inline attention math (the scale) between ``qkv`` and ``out``."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (
            z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for z in self.qkv(x).chunk(3, -1)
        )
        a = ((q @ k.transpose(-1, -2)) / (d // self.heads) ** 0.5).softmax(-1)
        return x + self.out((a @ v).transpose(1, 2).reshape(b, t, d))


class _TwoAttentions(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.attn1, self.attn2 = nn.Linear(4, 16), _Attention(), _Attention()
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.attn2(self.attn1(self.embed(x))))


def test_a_self_error_whose_inline_code_the_file_hides_is_measured_through_the_submodule(tmp_path):
    """onnxslim leaves attn2's output but not the input its inline code hands to attn2.out."""
    onnxslim = pytest.importorskip("onnxslim")
    torch.manual_seed(0)
    model, x = _TwoAttentions().eval(), torch.randn(2, 6, 4)
    graph = onnx.load(_export(model, (x,), tmp_path / "m.onnx", "torchscript"))
    constants = {n.output[0]: n for n in graph.graph.node if n.op_type == "Constant"}
    (scale,) = [
        constants[n.input[1]]
        for n in graph.graph.node
        if n.op_type == "Pow" and n.name.startswith("/attn2/") and n.input[1] in constants
    ]
    value = onnx.numpy_helper.to_array(scale.attribute[0].t)
    scale.attribute[0].t.CopyFrom(onnx.numpy_helper.from_array(value * 0.5))  # sqrt -> 4th root
    onnx.save(onnxslim.slim(graph), tmp_path / "slim.onnx")
    report = fxalign.align(model, (x,), onnx=tmp_path / "slim.onnx")
    rows = {r.name: r for r in report.rows}
    assert not report.passed and rows["attn2"].status == "diverged"
    # attn2's own code is named: where the tool hid the value it hands attn2.out, attn2.out's
    # output, compared in the rerun, holds that code's error, and counts in attn2's
    assert (report.first_divergence, report.culprit_basis) == ("attn2", "introduced")
    if rows["attn2.out"].local is None:
        assert "includes the error of attn2.out" in rows["attn2"].local_note
        assert "may come in with that input" in rows["attn2.out"].local_note


class _ClampedBetween(nn.Module):
    """A planted fault in the block's own code, between two Linears with zero biases."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.fc2(torch.ops.fxalign_tests.relu6(self.fc1(x) * 100))


class _AtInitialWeights(nn.Module):
    """Zero biases, as Hugging Face initialises them: equal weights a TorchScript file shares."""

    def __init__(self):
        super().__init__()
        self.a, self.blk, self.head = nn.Linear(4, 8), _ClampedBetween(), nn.Linear(8, 3)
        for lin in (self.a, self.blk.fc1, self.blk.fc2, self.head):
            nn.init.zeros_(lin.bias)

    def forward(self, x):
        return self.head(self.blk(self.a(x)))


@pytest.mark.parametrize("mode", ["file", "export"])
def test_a_fault_in_a_blocks_code_between_layers_sharing_weights_is_the_blocks(
    exporter, mode, tmp_path
):
    """``blk.fc2`` reads ``blk``'s clamp and a zero bias the TorchScript file holds once."""
    torch.manual_seed(0)
    model, x = _AtInitialWeights().eval(), (torch.randn(4, 4),)
    kwargs = planted_export_kwargs(exporter)
    if mode == "file":
        path = _export(model, x, tmp_path / "m.onnx", exporter, **kwargs)
        report = fxalign.align(model, x, onnx=path, local="all")
    else:
        report = fxalign.align(
            model, x, exporter=exporter, attach=True, export_kwargs=kwargs, local="all"
        )
    assert (report.first_divergence, report.culprit_basis) == ("blk", "introduced")
    rows = _rows(report)
    for name in ["a", "blk.fc1", "blk.fc2", "head"]:
        assert rows[name].local is not None, (name, rows[name].local_note)
        assert rows[name].local.max_abs < 1e-4, name
    assert rows["blk"].local is not None and rows["blk"].local.max_abs > 1.0


def test_a_file_copied_without_its_external_data_is_a_user_error(tmp_path):
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(64, 64), nn.ReLU()).eval(), torch.randn(2, 64)
    path = tmp_path / "m.onnx"
    onnx.save(
        onnx.load(_export(model, (x,), tmp_path / "e.onnx", "torchscript")),
        path,
        save_as_external_data=True,
        location="m.onnx.data",
    )
    alone = tmp_path / "copied" / "m.onnx"
    alone.parent.mkdir()
    alone.write_bytes(path.read_bytes())
    with pytest.raises(UserError, match=r"kept in 'm\.onnx\.data' \(external data\)") as e:
        fxalign.align(model, (x,), onnx=alone)
    assert "copy the data file" in e.value.hint
    assert fxalign.align(model, (x,), onnx=path).passed
    truncated = tmp_path / "m.onnx.data"
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(RuntimeBackendError, match="out of bounds") as e:
        fxalign.align(model, (x,), onnx=path)
    assert "external data file is missing or shorter" in e.value.hint


class _Stack(nn.Module):
    """``blocks`` Linear+ReLU blocks and a head: another version has another count."""

    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(blocks)
        )
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _differences(report: fxalign.Report) -> list[str]:
    return [
        n
        for n in report.notes
        if n.startswith(("the file and the model differ", "the file may not"))
    ]


@pytest.mark.parametrize(("in_file", "in_model"), [(3, 2), (2, 3), (2, 2)])
def test_a_file_of_another_version_of_the_model_is_said_to_differ(
    exporter, in_file, in_model, tmp_path
):
    torch.manual_seed(0)
    old, x = _Stack(in_file).eval(), (torch.randn(2, 8),)
    path = _export(old, x, tmp_path / "m.onnx", exporter)
    model = _Stack(in_model).eval()
    model.load_state_dict(old.state_dict(), strict=False)  # the weights both versions have
    report = fxalign.align(model, x, onnx=path)
    notes = _differences(report)
    if in_file == in_model:
        assert report and not notes
    elif in_file > in_model:  # the file computes in a scope the model has not
        scope = "'blocks.2'" if exporter == "dynamo" else "'/blocks.2'"
        assert not report and len(notes) == 1
        assert notes[0].startswith("the file and the model differ: 2 nodes") and scope in notes[0]
    else:  # a block of the model that owns weights left no node in the file
        assert not report and len(notes) == 1
        assert (
            notes[0].startswith("the file may not be this model's") and "('blocks.2')" in notes[0]
        )


class _Head(nn.Module):
    """``lin1 -> act -> lin2``, with ``extra`` after them when ``extra`` is set."""

    def __init__(self, width: int = 8, extra: bool = False) -> None:
        super().__init__()
        self.lin1, self.act, self.lin2 = nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3)
        self.extra = nn.Linear(3, 3) if extra else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin2(self.act(self.lin1(x)))
        return y if self.extra is None else self.extra(y)


def test_a_module_of_the_model_the_file_lacks_is_said_to_be_missing(exporter, tmp_path):
    torch.manual_seed(0)
    old, x = _Head().eval(), (torch.randn(2, 4),)
    path = _export(old, x, tmp_path / "m.onnx", exporter)
    model = _Head(extra=True).eval()
    model.load_state_dict(old.state_dict(), strict=False)
    report = fxalign.align(model, x, onnx=path)
    assert report.first_divergence == "extra"
    rows = _rows(report)
    lacks = [n for n in rows["extra"].notes if n.startswith("the file may lack this module")]
    assert len(lacks) == 1 and "('extra.weight', 'extra.bias')" in lacks[0]
    assert not [n for r in report.rows if r.name != "extra" for n in r.notes if "lack" in n]
    # the same leaf with weights the file holds (the file of this very model) is not missing
    same = _export(model, x, tmp_path / "same.onnx", exporter)
    assert fxalign.align(model, x, onnx=same)


def test_a_file_of_a_model_of_other_sizes_says_which_weights_have_other_shapes(exporter, tmp_path):
    torch.manual_seed(0)
    x = (torch.randn(2, 4),)
    path = _export(_Head(width=8).eval(), x, tmp_path / "m.onnx", exporter)
    report = fxalign.align(_Head(width=16).eval(), x, onnx=path)
    notes = _differences(report)
    assert not report and len(notes) == 1
    assert "'lin1.weight' has shape [8, 4] (this model's: [16, 4])" in notes[0]
    assert "'lin2.bias'" not in notes[0]  # same shape in both
    assert _rows(report)["lin1"].status == "missing_in_onnx"


class _DropoutHead(nn.Module):
    """A Dropout whose output has the shape of the next Linear's weight ([2, 4])."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.drop, self.head = nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.pre(x).relu()))


def test_a_weight_of_the_same_shape_is_not_taken_for_a_folded_value(exporter, tmp_path):
    torch.manual_seed(0)
    model, x = _DropoutHead().eval(), (torch.randn(2, 4),)
    path = _export(model, x, tmp_path / "m.onnx", exporter)  # eval: no Dropout in the file
    model.train()
    report = fxalign.align(model, x, onnx=path, train=True)
    assert model.training  # left as the user set it
    drop = _rows(report)["drop"]
    assert drop.status == "missing_in_onnx"
    assert not [n for n in drop.notes if "constant-folded" in n or "head.weight" in n]


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), self.b(x)


def test_a_file_with_its_outputs_in_another_order_says_so(exporter, tmp_path):
    torch.manual_seed(0)
    model, x = _TwoHeads().eval(), (torch.randn(4, 8),)
    proto = onnx.load(_export(model, x, tmp_path / "m.onnx", exporter))
    outputs = list(proto.graph.output)
    del proto.graph.output[:]
    proto.graph.output.extend(outputs[::-1])
    swapped = tmp_path / "swapped.onnx"
    onnx.save(proto, swapped)
    report = fxalign.align(model, x, onnx=swapped)
    rows = _rows(report)
    assert not report and rows["output[0]"].failed and rows["output[1]"].failed
    assert (
        "is the file's output [1], but this model's output [1] is another value"
        in (rows["a"].notes[0])
    )
    assert "the file's outputs are not this model's" in rows["b"].notes[0]


@pytest.mark.parametrize("change", ["dropped", "added"])
def test_a_file_with_other_outputs_than_the_model_is_a_user_error(exporter, change, tmp_path):
    torch.manual_seed(0)
    model, x = _TwoHeads().eval(), (torch.randn(4, 8),)
    proto = onnx.load(_export(model, x, tmp_path / "m.onnx", exporter))
    if change == "dropped":
        del proto.graph.output[1]
    else:
        proto.graph.output.insert(0, proto.graph.output[0])
    changed = tmp_path / "changed.onnx"
    onnx.save(proto, changed)
    count = 1 if change == "dropped" else 3
    with pytest.raises(UserError, match=f"has {count} outputs .* for the model's 2 tensor outputs"):
        fxalign.align(model, x, onnx=changed)


def test_a_file_of_another_model_with_an_output_of_another_shape_diverges(exporter, tmp_path):
    torch.manual_seed(0)
    x = (torch.randn(2, 4),)
    other = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    path = _export(other, x, tmp_path / "other.onnx", exporter)
    report = fxalign.align(nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval(), x, onnx=path)
    assert not report  # nothing else of the model is in the file: its output decides
    assert _rows(report)["output"].status == "shape_mismatch"


class _Encoder(nn.Module):
    """Returns its last hidden state and every hidden state, all of one shape."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.norm = nn.Linear(8, 8), nn.Linear(8, 8), nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> dict[str, object]:
        h1 = self.l1(x)
        h2 = self.l2(h1)
        return {"last": self.norm(h2), "hidden": (x, h1)}


class _LastOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = _Encoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)["last"]


def test_outputs_of_a_module_the_model_does_not_return_say_nothing_of_the_files_outputs(
    exporter, tmp_path
):
    torch.manual_seed(0)
    model, x = _LastOnly().eval(), (torch.randn(2, 8),)
    report = fxalign.align(model, x, onnx=_export(model, x, tmp_path / "m.onnx", exporter))
    assert report
    assert not [n for r in report.rows for n in r.notes if "outputs are not this model's" in n]


def test_a_module_whose_translation_left_no_node_is_the_culprit_by_its_values(exporter, tmp_path):
    torch.manual_seed(0)
    model, x = IdentityTranslated().eval(), IdentityTranslated.inputs()
    kwargs = identity_export_kwargs(exporter)
    path = _export(model, x, tmp_path / "m.onnx", exporter, **kwargs)
    report = fxalign.align(model, x, onnx=path, export_kwargs=kwargs)
    rows = _rows(report)
    # act left no node: the tensor leaving lin1's scope is act's output in the file, and its
    # values say it is lin1's output too (act computes nothing there)
    assert rows["lin1"].passed and rows["lin1"].notes[-1].startswith("paired by its values")
    assert rows["act"].failed and rows["act"].onnx_name == rows["lin1"].onnx_name
    assert report.first_divergence == "act" and report.culprit_basis == "introduced"
    assert rows["act"].local is not None and rows["act"].local.max_abs > 0.5
    assert "3 of 3 modules located" in report.notes[0] and not report.coverage.unmarked


@pytest.mark.parametrize("copy", ["inline", "external-data", "float16"])
def test_a_file_with_other_weights_says_which_weights_differ(exporter, copy, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    x = (torch.randn(2, 8),)
    path = _export(model, x, tmp_path / "m.onnx", exporter)
    proto = onnx.load(path)
    weight = next(t for t in proto.graph.initializer if t.name == "2.weight")
    scaled = onnx.numpy_helper.to_array(weight) * 1.5  # an older checkpoint's weights
    weight.CopyFrom(onnx.numpy_helper.from_array(scaled, "2.weight"))
    old = tmp_path / "old" / "m.onnx"
    old.parent.mkdir()
    onnx.save(proto, old, save_as_external_data=copy == "external-data", size_threshold=0)
    if copy == "float16":  # the other weights rounded: only the scaled ones differ
        old = _float16(old, tmp_path / "old" / "m16.onnx")
    report = fxalign.align(model, x, onnx=old)
    assert report.first_divergence == "2" and report.culprit_basis == "introduced"
    notes = [n for n in _rows(report)["2"].notes if "differs from this model's weights" in n]
    assert len(notes) == 1 and "'2.weight' (max |diff|" in notes[0] and "'2.bias'" not in notes[0]
    others = [n for r in report.rows if r.name != "2" for n in r.notes if "weights" in n]
    assert not others  # asked only of the module whose own code breaks tolerance


class _TracerOnly(nn.Module):
    """Runs ``extra`` only under the TorchScript tracer: the export computes what eager does not."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.extra = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lin(x)
        if torch.jit.is_tracing():
            x = self.extra(x)
        return x


def test_an_export_tracing_other_code_than_the_eager_forward_says_so():
    torch.manual_seed(0)
    model, x = _TracerOnly().eval(), (torch.randn(2, 8),)
    report = fxalign.align(model, x, exporter="torchscript", attach=True)
    notes = _differences(report)
    assert not report and len(notes) == 1
    assert "('/extra')" in notes[0] and "the exporter traced code this eager forward" in notes[0]


class _ClampedBlock(nn.Module):
    """``clamp(relu(bn(conv(x))), 0.1, 2)``, the clamp inline in the block."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x):
        return torch.clamp(self.act(self.bn(self.conv(x))), 0.1, 2.0)


class _ClampedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blk, self.head = _ClampedBlock(), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.blk(x))


def _relu_merged_into_clip(path: Path, out: Path, clip_max: float) -> Path:
    """An optimizer's rewrite: the Relu dropped, the Clip after it (min 0.1) reading its input.

    The dynamo exporter's optimizer makes this rewrite itself; the TorchScript file gets it here.

    ``Clip(Relu(x), 0.1, hi)`` is ``Clip(x, 0.1, hi)``: nothing changes but the Relu's node
    is gone. ``clip_max`` replaces the Clip's upper bound (2.0: the same graph; another
    value plants a divergence in the block's inline code).
    """
    # on the proto itself: onnx-graphsurgeon 0.6 drops the nodes' metadata (the dynamo scopes)
    proto = onnx.load(path)
    nodes = proto.graph.node
    (clip,) = [n for n in nodes if n.op_type == "Clip"]
    relus = [n for n in nodes if n.op_type == "Relu"]
    if relus:  # the dynamo exporter's own optimizer merges them already
        (relu,) = relus
        assert clip.input[0] == relu.output[0]
        clip.input[0] = relu.input[0]
        nodes.remove(relu)
    bound = onnx.numpy_helper.from_array(np.array(clip_max, np.float32), "clip_max_rewritten")
    proto.graph.initializer.append(bound)
    clip.input[2] = bound.name
    onnx.save(proto, out)
    return out


@pytest.mark.parametrize("planted", [False, True])
def test_a_module_an_optimizer_merged_into_its_reader_is_not_blamed(exporter, planted, tmp_path):
    torch.manual_seed(0)
    model = _ClampedNet().eval()
    model.blk.bn.running_mean.uniform_(-1, 1)
    x = (torch.randn(1, 3, 8, 8) * 3,)
    path = _export(model, x, tmp_path / "m.onnx", exporter)
    merged = _relu_merged_into_clip(path, tmp_path / "merged.onnx", 1.5 if planted else 2.0)
    report = fxalign.align(model, x, onnx=merged)
    rows = _rows(report)
    # the Relu left no node: the tensor the Clip reads holds bn's output, and act is no
    # value of the file (never paired with bn's, which would blame it)
    assert rows["blk.bn"].passed
    assert rows["blk.act"].status == "missing_in_onnx"
    assert "blk.act" in report.coverage.unmarked and "blk.act" not in report.coverage.marked
    if exporter == "dynamo":
        # the fused Conv is in bn's scope, so the tensor leaving it may be act's output (a
        # Conv+Relu fusion) or bn's: the values say bn's, and replaying the Clip on bn's
        # output and on act's says act's computation is the Clip's
        assert rows["blk.act"].notes[0].startswith("taken up by the nodes reading")
    else:  # the fused Conv is conv's: act's output is no value the hooks saw any module read
        assert "an optimizer merged it into the nodes reading its input" in rows["blk.act"].notes[0]
    if planted:
        assert report.first_divergence == "blk" and report.culprit_basis == "introduced"
    else:
        assert report and report.first_divergence is None


def test_an_optimizer_merging_a_relu_into_a_wrong_clip_blames_the_block(tmp_path):
    """The dynamo exporter's optimizer merges ``Relu -> Clip``; the Clip is the planted bug."""
    from fxalign.demo import softclip, softclip_export_kwargs

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.bn, self.r = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()

        def forward(self, x):
            return softclip(self.r(self.bn(self.c(x))))

    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.Conv2d(4, 2, 1)).eval()
    model[0].bn.running_mean.uniform_(-1, 1)
    x = (torch.randn(1, 3, 8, 8) * 3,)
    kwargs = softclip_export_kwargs("dynamo")
    report = fxalign.align(model, x, exporter="dynamo", attach=True, export_kwargs=kwargs)
    rows = _rows(report)
    assert report.first_divergence == "0" and report.culprit_basis == "introduced"
    assert rows["0.r"].notes[0].startswith("taken up by the nodes reading")
    assert report.op is not None and "softclip" in report.op.op


def test_an_exporter_asked_that_did_not_write_the_file_is_said(exporter, tmp_path):
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 8), nn.ReLU()).eval(), (torch.randn(2, 4),)
    path = _export(model, x, tmp_path / "m.onnx", exporter)
    other = "torchscript" if exporter == "dynamo" else "dynamo"
    asked = fxalign.align(model, x, onnx=path, exporter=other)
    assert asked and asked.exporter == exporter
    said = [n for n in asked.notes if n.startswith(f"exporter={other!r} was asked")]
    assert len(said) == 1 and f"the {exporter} exporter wrote this file" in said[0]
    for same in (exporter, None):  # the file's own exporter, or none named: nothing to say
        report = fxalign.align(model, x, onnx=path, exporter=same)
        assert not [n for n in report.notes if "was asked" in n]


def test_an_error_before_a_merged_relu_is_not_blamed_on_it(exporter, tmp_path):
    """The block's fused Conv weights scaled in the file: an error before bn and act both."""
    torch.manual_seed(0)
    model = _ClampedNet().eval()
    model.blk.bn.running_mean.uniform_(-1, 1)
    x = (torch.randn(1, 3, 8, 8) * 3,)
    path = _export(model, x, tmp_path / "m.onnx", exporter)
    merged = onnx.load(_relu_merged_into_clip(path, tmp_path / "merged.onnx", 2.0))
    (conv,) = [n for n in merged.graph.node if n.op_type == "Conv" and "head" not in n.input[1]]
    weight = next(t for t in merged.graph.initializer if t.name == conv.input[1])
    scaled = onnx.numpy_helper.to_array(weight) * 1.5
    weight.CopyFrom(onnx.numpy_helper.from_array(scaled, weight.name))
    onnx.save(merged, tmp_path / "scaled.onnx")
    report = fxalign.align(model, x, onnx=tmp_path / "scaled.onnx")
    rows = _rows(report)
    # the tensor the Clip reads is bn's output (nearer it than act's), wrong from the weights
    assert report.first_divergence == "blk.bn", [(r.display_name, r.notes) for r in report.rows]
    assert rows["blk.act"].status == "missing_in_onnx"


class _InlineRead(nn.Module):
    """``lin1 -> act`` (translated to nothing), ``act``'s output read by the block's own code."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.lin1, self.act = how, nn.Linear(8, 16), _Clip01()

    def forward(self, x):
        h = self.lin1(x)
        if self.how == "clamp":
            return torch.clamp(self.act(h), -1.0, 1.0)
        if self.how == "scale":
            return self.act(h) * 3.0
        return self.act(h) + (1.0 if self.how == "residual" else 2.0) * h


@pytest.mark.parametrize("how", ["clamp", "scale", "residual", "residual2"])
def test_a_module_translated_to_nothing_is_blamed_when_its_caller_reads_it(exporter, how, tmp_path):
    torch.manual_seed(0)
    model, x = nn.Sequential(_InlineRead(how), nn.Linear(16, 4)).eval(), (torch.randn(2, 8),)
    kwargs = identity_export_kwargs(exporter)
    path = _export(model, x, tmp_path / "m.onnx", exporter, **kwargs)
    report = fxalign.align(model, x, onnx=path, export_kwargs=kwargs)
    rows = _rows(report)
    # the residual branch reads lin1's output too: replayed read by read, act's read is the one
    # that gives PyTorch's values when fed act's output
    assert rows["0.lin1"].passed and rows["0.lin1"].notes[-1].startswith("paired by its values")
    assert report.first_divergence == "0.act" and report.culprit_basis == "introduced"


class _FirstReadInline(nn.Module):
    """``head(tanh(act(x)))`` (or ``+ x``, or ``act``'s output dropped): ``act`` on the input."""

    def __init__(self, how: str, act: nn.Module) -> None:
        super().__init__()
        self.how, self.act, self.head = how, act, nn.Linear(8, 3)

    def forward(self, x):
        a = self.act(x)
        if self.how == "dropped":
            return self.head(torch.tanh(x))  # act's output unused: the exporter removes it
        return self.head(torch.tanh(a) + (x if self.how == "residual" else 0.0))


@pytest.mark.parametrize("how", ["tanh", "residual"])
def test_a_first_module_read_by_its_callers_code_is_blamed(exporter, how, tmp_path):
    """``act`` translated to nothing on the graph input, read by the model's own ``tanh``."""
    torch.manual_seed(0)
    model, x = _FirstReadInline(how, _Clip01()).eval(), (torch.randn(2, 8),)
    kwargs = identity_export_kwargs(exporter)
    path = _export(model, x, tmp_path / "m.onnx", exporter, **kwargs)
    report = fxalign.align(model, x, onnx=path, export_kwargs=kwargs, drill_down=False)
    # the file's Tanh reads the graph input where PyTorch's tanh reads act's output
    assert report.first_divergence == "act" and report.culprit_basis == "introduced"
    assert _rows(report)["head"].local.max_abs < 1e-5


def test_a_module_whose_output_the_model_drops_may_be_unused(exporter, tmp_path):
    torch.manual_seed(0)
    model, x = _FirstReadInline("dropped", nn.ReLU()).eval(), (torch.randn(2, 8),)
    report = fxalign.align(model, x, onnx=_export(model, x, tmp_path / "m.onnx", exporter))
    assert report and report.first_divergence is None
    act = _rows(report)["act"]
    assert act.status == "missing_in_onnx" and act.notes[0].startswith("taken up by the nodes")
    assert "or its output is unused" in act.notes[0]


class _Half(nn.Module):
    def forward(self, x):
        return x * 0.5


def test_a_first_module_translated_to_nothing_is_blamed(exporter, tmp_path):
    """``head(act(x))``: the file's Gemm reads the graph input, head's weights untouched."""
    torch.manual_seed(0)
    model, x = nn.Sequential(_Clip01(), nn.Linear(8, 4)).eval(), (torch.randn(2, 8),)
    kwargs = identity_export_kwargs(exporter)
    path = _export(model, x, tmp_path / "m.onnx", exporter, **kwargs)
    report = fxalign.align(model, x, onnx=path, export_kwargs=kwargs)
    assert report.first_divergence == "0" and report.culprit_basis == "introduced"
    assert _rows(report)["1"].local.max_abs < 1e-5  # head computes what it should


def test_a_scale_a_fusion_moved_into_its_readers_node_is_not_blamed(tmp_path):
    """``head(x * 0.5)`` with the Mul folded into the Gemm's ``alpha``, the weights untouched."""
    torch.manual_seed(0)
    model, x = nn.Sequential(_Half(), nn.Linear(8, 4)).eval(), (torch.randn(2, 8),)
    proto = onnx.load(_export(model, x, tmp_path / "m.onnx", "torchscript"))
    nodes = proto.graph.node
    (mul,) = [n for n in nodes if n.op_type == "Mul"]
    (gemm,) = [n for n in nodes if n.op_type == "Gemm"]
    gemm.input[0] = mul.input[0]
    for node in [n for n in nodes if n.output and n.output[0] == mul.input[1]] + [mul]:
        nodes.remove(node)  # the Mul and its constant, as an optimizer leaves it
    (alpha,) = [a for a in gemm.attribute if a.name == "alpha"]
    alpha.f *= 0.5
    onnx.save(proto, tmp_path / "fused.onnx")
    report = fxalign.align(model, x, onnx=tmp_path / "fused.onnx")
    assert report and report.first_divergence is None
    assert _rows(report)["0"].notes[0].startswith("taken up by the nodes reading")
