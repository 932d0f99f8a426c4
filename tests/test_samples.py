"""Many samples, trace-specialisation checks and dynamic shapes (issue 6)."""

import numpy as np
import pytest
import torch

import fxalign
from fixtures.models import DataDependent, NestedBlocks, SuperResolution
from fxalign.report.summary import summary_line


def test_samples_aggregate_per_value_and_keep_the_worst():
    model = NestedBlocks().eval()
    x = model.inputs()[0]
    samples = [(x * 2,), fxalign.Sample((x * 3,)), x * 4]
    report = fxalign.align(model, (x,), samples=samples, exporter="torchscript")
    assert report.sample_count == 4 and report.passed
    stem = report.row("stem")
    assert stem.samples.count == 4 and stem.samples.failed == 0
    assert stem.samples.max_abs_max == stem.metrics.max_abs
    assert stem.samples.max_abs_mean <= stem.samples.max_abs_max
    assert 0 <= stem.samples.worst_sample < 4
    assert fxalign.Report.from_json(report.to_json()) == report


def test_samples_are_consumed_lazily_one_at_a_time():
    model = NestedBlocks().eval()
    x = model.inputs()[0]
    seen = []

    def generate():
        for i in range(3):
            seen.append(i)
            yield (x + i,)

    report = fxalign.align(model, (x,), samples=generate(), exporter="torchscript")
    assert seen == [0, 1, 2] and report.sample_count == 4


def test_upscale_factor_through_item_is_caught_at_the_first_module_after_it():
    # exported with factor 3, checked with 4: TorchScript baked 3 into the Resize node
    model = SuperResolution().eval()
    report = fxalign.align(
        model, model.inputs(3), samples=[model.inputs(4)], exporter="torchscript"
    )
    assert not report.passed
    # The model's own code (the Resize before conv1) hands conv1 a value of another shape.
    assert report.first_divergence == "" and report.first_seen == "conv1"
    assert "its code hands conv1:in[0]" in report.divergence.local_note
    first = report.row("conv1")
    assert first.status == "shape_mismatch" and first.samples.worst_sample == 1
    assert first.torch_shape == [1, 8, 32, 32] and first.onnx_shape == [1, 8, 24, 24]
    # conv1 itself exports faithfully: rerun on the ONNX value of its input, it agrees
    assert first.local is not None and first.local.mismatched == 0
    assert any(
        "Python number" in w and "in module '(model)'" in w for w in report.exporter_warnings
    )
    assert "shape differs" in summary_line(report)


def test_upscale_factor_through_item_cannot_be_exported_by_dynamo():
    model = SuperResolution().eval()
    with pytest.raises(fxalign.ExportError, match="dynamo exporter failed"):
        fxalign.align(model, model.inputs(3), exporter="dynamo")


def test_a_branch_baked_by_tracing_is_named():
    torch.manual_seed(0)
    model = DataDependent().eval()
    x = DataDependent.inputs()[0] * 100
    with torch.no_grad():
        assert (model.pre(x).sum() > 0) != (model.pre(-x).sum() > 0), "the samples must flip it"
    report = fxalign.align(model, (x,), samples=[(-x,)], exporter="torchscript")
    assert report.first_divergence == "branchy"
    assert report.divergence.local.mismatched > 0  # introduced by this block
    assert report.divergence.samples.worst_sample == 1
    assert any(
        "Python boolean" in w and "in module 'branchy'" in w for w in report.exporter_warnings
    )


@pytest.mark.parametrize(
    ("exporter", "option"),
    [
        ("dynamo", {"dynamic_shapes": ({0: torch.export.Dim("batch")},)}),
        ("torchscript", {"input_names": ["x"], "dynamic_axes": {"x": {0: "batch"}}}),
    ],
)
def test_dynamic_batch_checked_at_other_shapes(exporter, option):
    model = NestedBlocks().eval()
    x = torch.randn(2, 3, 8, 8)
    report = fxalign.align(
        model,
        (x,),
        samples=[(torch.randn(5, 3, 8, 8),), (torch.randn(1, 3, 8, 8),)],
        exporter=exporter,
        export_kwargs=option,
    )
    assert report.passed, fxalign.render_text(report)
    assert report.row("head").samples.count == 3


def test_static_export_at_other_shapes_is_a_clear_error():
    model = NestedBlocks().eval()
    with pytest.raises(fxalign.InputError, match="sample 1"):
        fxalign.align(
            model,
            (torch.randn(2, 3, 8, 8),),
            samples=[(torch.randn(5, 3, 8, 8),)],
            exporter="torchscript",
        )


def test_wrong_sample_signature_names_the_sample():
    model = NestedBlocks().eval()
    with pytest.raises(fxalign.InputError, match="sample 1: inputs do not fit"):
        fxalign.align(model, model.inputs(), samples=[(np.zeros(1), np.zeros(1))])
