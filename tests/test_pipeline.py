import numpy as np
import pytest
import torch

import fxalign
from fixtures.models import (
    CASES,
    ConvBnReluInplace,
    KwargsModel,
    PlantedDivergence,
    planted_export_kwargs,
)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fp32_models_align_within_1e_5(case, exporter):
    model = CASES[case]().eval()
    report = fxalign.align(model, model.inputs(), exporter=exporter)
    compared = [r for r in report.rows if r.metrics is not None]
    assert compared, fxalign.render_text(report)
    worst = max(r.metrics.max_abs for r in compared)
    assert worst <= 1e-5, fxalign.render_text(report)
    assert report.passed and report.first_divergence is None
    assert report.rows[-1].kind == "output"
    if case == "unused":
        assert report.row("unused").status == "missing_in_onnx"
        assert "removed by the exporter as unused code" in report.row("unused").notes[0]
        marked = fxalign.align(model, model.inputs(), exporter=exporter, attach=False)
        assert "not in ONNX graph" in marked.row("unused").notes[0]


def test_kwargs_inputs(exporter):
    model = KwargsModel().eval()
    report = fxalign.align(model, model.inputs(), model.kwargs(), exporter=exporter)
    assert [r.name for r in report.rows] == ["a", "b", ""]
    assert report.passed


def test_inplace_relu_does_not_corrupt_the_captured_bn_output(exporter):
    model = ConvBnReluInplace().eval()
    (x,) = model.inputs()
    report = fxalign.align(model, (x,), exporter=exporter)
    with torch.no_grad():
        bn = model.bn(model.conv(x))
    assert (bn < 0).any(), "the test needs negative BN outputs"
    values = fxalign.run_torch(fxalign.instrument(model, (x,)), (x,))
    np.testing.assert_array_equal(values[fxalign.MarkerName("bn")], bn.numpy())
    assert report.passed and report.row("bn").metrics.max_abs <= 1e-5


def test_planted_divergence_is_localised(exporter):
    model = PlantedDivergence().eval()
    report = fxalign.align(
        model, model.inputs(), exporter=exporter, export_kwargs=planted_export_kwargs(exporter)
    )
    assert not report.passed
    assert report.first_divergence == "mid.clamp"
    assert report.divergence.module_type == "BadClamp"
    assert report.row("mid.lin").passed
    assert report.row("first").passed
    assert report.divergence.metrics.max_abs > 1.0


def test_align_leaves_the_model_untouched():
    model = PlantedDivergence().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    with pytest.warns(UserWarning, match="training mode"):
        fxalign.align(model, model.inputs(), export_kwargs=planted_export_kwargs("dynamo"))
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_report_round_trips_through_json(tmp_path):
    model = CASES["mha"]().eval()
    report = fxalign.align(model, model.inputs())
    path = tmp_path / "r.json"
    report.to_json(path)
    assert fxalign.Report.from_json(path) == report
    assert fxalign.Report.from_json(report.to_json()) == report


def test_workdir_keeps_models_and_refuses_to_overwrite(tmp_path):
    model = CASES["reused"]()
    fxalign.align(model.eval(), model.inputs(), workdir=tmp_path)
    # aligned: the plain export and its promoted copy, no debug model
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == ["attach.onnx", "plain.onnx"]
    with pytest.raises(fxalign.UserError, match="already exist"):
        fxalign.align(model, model.inputs(), workdir=tmp_path)
    fxalign.align(model, model.inputs(), workdir=tmp_path, overwrite=True, attach=False)
    assert (tmp_path / "export.onnx").exists() and (tmp_path / "debug.onnx").exists()


def test_wrong_inputs_are_a_user_error():
    model = CASES["reused"]().eval()
    with pytest.raises(fxalign.InputError, match="shapes"):
        fxalign.align(model, (torch.randn(2, 7),))


def test_coverage_names_the_leaf_a_module_lives_in():
    model = CASES["mha"]().eval()
    report = fxalign.align(model, model.inputs())
    assert report.coverage.unmarked["attn.out_proj"] == "inside leaf module 'attn'"


def test_export_keeps_every_module_mode(tmp_path, exporter):
    # The TorchScript exporter restores the mode of what it is handed, recursively; a wrapper
    # fxalign adds (GraphModule, kwargs) must not flip the instrumented model to training mode,
    # or dropout would corrupt every eager rerun (local error, batched comparison).
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2)
    ).eval()
    model[1].train()  # mixed modes come back as they were
    instrumented = fxalign.instrument(model)
    before = [m.training for m in instrumented.modules()]
    fxalign.export(instrumented, (torch.randn(2, 4),), tmp_path / "m.onnx", exporter=exporter)
    assert [m.training for m in instrumented.modules()] == before


def test_local_errors_stay_at_noise_with_dropout_in_eval_mode(exporter):
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 8), torch.nn.Dropout(0.5)
    ).eval()
    report = fxalign.align(
        model, (torch.randn(4, 8),), exporter=exporter, fidelity=False, local="all", attach=False
    )
    rows = [r for r in report.rows if r.kind != "output"]
    assert rows and all(r.local is not None and r.local.max_abs <= 1e-5 for r in rows)


def test_plain_export_for_fidelity_declares_no_unused_opset(capfd):
    # The TorchScript exporter warns (from C++, on stderr) about a custom opset domain declared
    # but not used: the plain model has no markers, so fxalign's domain is left out for it.
    model = CASES["conv_blocks"]().eval()
    report = fxalign.align(
        model, model.inputs(), exporter="torchscript", fidelity=True, attach=False
    )
    assert report.fidelity is not None
    err = capfd.readouterr().err
    assert "Custom opset domain" not in err
    assert "Serializing optimized model" not in err


def test_the_cycle_collector_is_left_as_the_caller_had_it(monkeypatch):
    import gc

    from fxalign.pipeline import _old_objects_frozen

    # the collector's state is the process's: start from an enabled, unfrozen one whatever an
    # earlier test (or a library it ran) left, and put that back after
    was_enabled = gc.isenabled()
    gc.enable()
    gc.unfreeze()
    calls: list[str] = []
    freeze, unfreeze = gc.freeze, gc.unfreeze

    def spied(name, fn):
        def call():
            calls.append(name)
            fn()

        return call

    try:
        with _old_objects_frozen():
            assert gc.get_freeze_count() > 0  # the objects alive before the call, set aside
        assert gc.get_freeze_count() == 0
        gc.freeze()  # a caller (a forking server, say) froze its own objects: left alone
        monkeypatch.setattr(gc, "freeze", spied("freeze", freeze))
        monkeypatch.setattr(gc, "unfreeze", spied("unfreeze", unfreeze))
        with _old_objects_frozen():
            pass
        gc.disable()  # a caller that disabled the collector: nothing frozen either
        unfreeze()
        with _old_objects_frozen():
            assert not gc.isenabled()
        # (frozen objects may die meanwhile: their count is no measure of being left alone)
        assert calls == []
    finally:
        monkeypatch.undo()
        gc.unfreeze()
        if was_enabled:
            gc.enable()
        else:
            gc.disable()
