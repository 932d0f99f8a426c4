"""The default mode: the plain export first, the marker mode only when it does not align."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import fxalign
from fixtures.models import CASES, PlantedDivergence, ScaledCache, planted_export_kwargs
from fixtures.oracle import plain_export_matches
from fxalign.cli import main


def test_an_aligned_model_is_answered_by_its_plain_export(exporter, tmp_path):
    model = CASES["conv_blocks"]().eval()
    report = fxalign.align(model, model.inputs(), exporter=exporter, workdir=tmp_path)
    assert report and report.instrumentation == "attach"
    assert "checked on the plain export" in report.notes[0]
    assert not (tmp_path / "debug.onnx").exists()  # no debug model was made
    assert set(report.timings) >= {"export", "run_torch", "run_onnx", "compare", "total"}
    assert "instrument" not in report.timings


class _OwnCode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l, self.m = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.m(self.l(x) + torch.rand_like(x))  # the model's own code diverges


def test_the_plain_verdict_names_the_models_own_code():
    torch.manual_seed(0)
    report = fxalign.align(_OwnCode().eval(), (torch.randn(2, 4),), exporter="torchscript")
    assert report.notes[0].endswith("with the same culprit, output (the model's own forward)")


def test_a_divergence_brings_in_the_markers_with_the_plain_verdict(exporter):
    model = PlantedDivergence().eval()
    kwargs = planted_export_kwargs(exporter)
    report = fxalign.align(model, model.inputs(), exporter=exporter, export_kwargs=kwargs)
    assert report.instrumentation in ("fx", "fallback")
    assert report.first_divergence == "mid.clamp"
    assert report.notes[0] == (
        "the plain export (the graph you deploy) diverges too, with the same culprit, "
        "mid.clamp (BadClamp)"
    )
    assert report.timings["plain_export"] > 0 and report.timings["instrument"] > 0
    alone = fxalign.align(
        model, model.inputs(), exporter=exporter, export_kwargs=kwargs, attach=False
    )
    assert [r.name for r in report.rows] == [r.name for r in alone.rows]
    assert [r.status for r in report.rows] == [r.status for r in alone.rows]


def test_markers_that_hide_a_divergence_leave_the_plain_report():
    torch.manual_seed(0)
    model, x = ScaledCache().eval(), torch.randn(2, 4)
    assert not plain_export_matches(ScaledCache().eval(), (x,), "torchscript")
    assert fxalign.align(model, (x,), exporter="torchscript", attach=False)  # markers: aligned
    report = fxalign.align(model, (x,), exporter="torchscript")
    assert not report and report.instrumentation == "attach"
    assert report.notes[0].startswith("the instrumented export aligns where the plain export")
    assert torch.equal(model.cache, torch.ones(2, 4))


def test_samples_from_a_generator_reach_the_marker_pass(exporter):
    model, kwargs = PlantedDivergence().eval(), planted_export_kwargs(exporter)
    more = (torch.randn(4, 8) for _ in range(2))  # a generator: kept for the marker pass
    report = fxalign.align(
        model, model.inputs(), exporter=exporter, export_kwargs=kwargs, samples=more
    )
    assert report.instrumentation in ("fx", "fallback") and report.sample_count == 3
    assert report.row("mid.clamp").samples is not None
    assert report.row("mid.clamp").samples.count == 3


def test_a_plain_export_fxalign_cannot_attach_to_goes_to_the_markers(monkeypatch):
    def no_scopes(self, sample):
        raise fxalign.UserError("the ONNX file has no scope information")

    source = importlib.import_module("fxalign.sources.attach")  # imported on first use
    monkeypatch.setattr(source.AttachSource, "prepare", no_scopes)
    model = CASES["nested"]().eval()
    report = fxalign.align(model, model.inputs(), exporter="torchscript")
    assert report and report.instrumentation == "fx"
    assert report.notes[0] == (
        "the plain export could not be checked first: the ONNX file has no scope information"
    )


def test_when_both_paths_fail_the_error_says_why_the_plain_export_was_not_used():
    # Modules as ONNX functions: no scopes in the main graph, and the TorchScript exporter
    # cannot extract functions from the instrumented model either.
    model = CASES["nested"]().eval()
    with pytest.raises(fxalign.UserError) as info:
        fxalign.align(
            model,
            model.inputs(),
            exporter="torchscript",
            export_kwargs={"export_modules_as_functions": True},
        )
    assert "UserError: the ONNX file keeps modules" not in info.value.message  # not chained
    notes = getattr(info.value, "__notes__", [])
    assert any("local functions" in n for n in notes), notes


@pytest.mark.parametrize(
    ("options", "mode"),
    [({"max_outputs_per_run": 2}, "fx"), ({"fidelity": True}, "attach"), ({}, "attach")],
)
def test_marker_only_options_imply_the_marker_mode(options, mode):
    model = CASES["nested"]().eval()
    report = fxalign.align(model, model.inputs(), exporter="torchscript", **options)
    assert report.instrumentation == mode


def test_attach_takes_true_false_or_none():
    with pytest.raises(fxalign.UserError, match="attach must be True, False or None"):
        fxalign.align(CASES["nested"]().eval(), CASES["nested"].inputs(), attach="markers")


def test_cli_markers_and_attach_choose_one_path(tmp_path, capsys):
    model_file = tmp_path / "m.py"
    model_file.write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()).eval()\n"
    )
    base = ["align", f"{model_file}:build", "-i", "2x8", "--exporter", "torchscript"]
    for flag, mode in (("--markers", "fx"), ("--attach", "attach"), (None, "attach")):
        out = tmp_path / f"{flag}.json"
        argv = [*base, "--json", str(out)] + ([flag] if flag else [])
        assert main(argv) == 0
        assert fxalign.Report.from_json(out).instrumentation == mode
    with pytest.raises(SystemExit):
        main([*base, "--markers", "--attach"])
    assert "not allowed with argument" in capsys.readouterr().err


class _Patches(torch.nn.Module):
    """Returns its patches and their grid size as Python ints, as HF Swin's embedding does."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        y = self.proj(x)
        _, _, h, w = y.shape
        if w % 2 == 1:  # data-dependent on a size: torch.fx cannot trace the block
            y = y * 2
        return y.flatten(2).transpose(1, 2), (h, w)


class _GridModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch, self.head = _Patches(), torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, (h, w) = self.patch(x)
        return self.head(t).reshape(1, h, w, 4)


def test_python_ints_a_tracer_marks_as_tensors_are_compared_as_numbers(exporter):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    report = fxalign.align(_GridModel().eval(), (x,), exporter=exporter, attach=False)
    assert report.instrumentation == "fallback" and report
    assert not [r.name for r in report.rows if r.status == "missing_in_torch"]
    ints = [r for r in report.rows if r.name.startswith("patch[1]")]
    if exporter == "torchscript":  # the tracer makes y.shape's ints 0-dim tensors, marked
        names = [r.name for r in report.rows]
        assert [r.name for r in ints] == ["patch[1][0]", "patch[1][1]"]
        assert names.index("patch[1][0]") == names.index("patch[0]") + 1
        assert all(r.passed and r.metrics and r.metrics.max_abs == 0 for r in ints)
        assert all("a Python int in PyTorch" in r.notes[-1] for r in ints)
    else:
        assert not ints
