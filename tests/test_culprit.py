"""The culprit is where the error is introduced, inline code included (issue 14.1, 14.2)."""

import inspect

import numpy as np
import onnxruntime as ort
import pytest
import torch

import fxalign
from fixtures.inline_models import (
    CULPRITS,
    FAULTS,
    Accumulating,
    InlinePlanted,
    RootInline,
    export_kwargs,
)
from fixtures.models import PATCH_STYLES, InstancePatched, NestedBlocks
from fxalign.report.summary import summary_line

CASES = [
    pytest.param(case, exporter, id=f"{case}-{exporter}")
    for case, (_, _, exporters) in FAULTS.items()
    for exporter in exporters
]
ATTACH_CASES = [  # the attach path is the slow group's (it exports twice here)
    pytest.param(case, exporter, id=f"{case}-{exporter}", marks=pytest.mark.slow)
    for case, (_, _, exporters) in FAULTS.items()
    for exporter in exporters
]


def _plain_export_error(model, inputs, exporter, tmp_path) -> float:
    """Largest |ONNX - PyTorch| of the plain export's outputs (inf where NaN appears)."""
    path = tmp_path / "plain.onnx"
    torch.onnx.export(model, inputs, path, dynamo=exporter == "dynamo", **export_kwargs(exporter))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    got = session.run(None, feeds)[0]
    ref = model(*inputs).detach().numpy()
    diff = np.abs(got.astype(np.float64) - ref)
    return float(np.where(np.isnan(diff), np.inf, diff).max())


@pytest.mark.parametrize(("case", "exporter"), CASES)
def test_inline_fault_is_blamed_on_its_block(case, exporter, tmp_path):
    cls, kwargs, _ = FAULTS[case]
    torch.manual_seed(0)
    model = cls(**kwargs).eval()
    inputs = model.inputs()
    assert _plain_export_error(model, inputs, exporter, tmp_path) > 1e-2  # a real divergence

    report = fxalign.align(model, inputs, exporter=exporter, export_kwargs=export_kwargs(exporter))
    culprit = CULPRITS[case]
    assert report.first_divergence == culprit, [
        (r.name, r.status, r.local_scope, r.local and r.local.mismatched) for r in report.rows
    ]
    assert report.culprit_basis == "introduced"
    row = report.divergence
    assert row.kind == "block" and row.local_scope == "own_code" and row.introduced_failed
    # Every module inside the block exports faithfully: its own error is at round-off.
    for inner in report.rows:
        if inner.module_path.startswith(culprit + "."):
            assert inner.local is not None and not inner.introduced_failed, inner.name
    assert report.first_seen is not None
    index = [r.name for r in report.rows]
    assert index.index(report.first_seen) <= index.index(culprit)
    # the drill-down names the faulty line of the block's own code, where torch.export can
    # trace the block alone (not the eager block: its branch depends on the data)
    if case == "floor_division_eager_block":
        assert report.op is None and "torch.export could not trace" in report.op_note
    else:
        assert report.op is not None, report.op_note
        assert report.op.module_path == culprit and "faulty" in report.op.source, report.op
    line = summary_line(report)
    assert f"introduced in {culprit}" in line
    if report.first_seen != culprit:
        assert f"first seen at {report.first_seen}" in line


@pytest.mark.parametrize(("case", "exporter"), ATTACH_CASES)
def test_inline_fault_is_blamed_on_its_block_in_the_plain_export(case, exporter):
    cls, kwargs, _ = FAULTS[case]
    torch.manual_seed(0)
    model = cls(**kwargs).eval()
    report = fxalign.align(
        model, model.inputs(), exporter=exporter, export_kwargs=export_kwargs(exporter), attach=True
    )
    assert (report.first_divergence, report.culprit_basis) == (CULPRITS[case], "introduced")
    assert report.divergence.local_scope == "own_code"
    assert report.first_seen != CULPRITS[case]  # a submodule fed by the faulty line saw it first


def test_a_fault_in_the_models_own_forward_is_blamed_on_the_model(tmp_path):
    torch.manual_seed(0)
    model = RootInline().eval()
    report = fxalign.align(model, model.inputs(), exporter="torchscript")
    assert report.first_divergence == "" and report.culprit_basis == "introduced"
    assert report.divergence.kind == "output"
    assert report.row("a").local is not None and not report.row("b").introduced_failed
    # the drill-down names the op and the line of the model's own forward
    assert report.op is not None and report.op.op == "aten.floor_divide.default"
    assert report.op.module_path == "" and "// 0.3" in report.op.source
    assert report.op.line == inspect.getsourcelines(RootInline.forward)[1] + 1


@pytest.mark.parametrize("style", PATCH_STYLES)
def test_a_fault_in_a_forward_set_on_the_instance_is_blamed_on_its_module(style):
    torch.manual_seed(0)
    model = InstancePatched(style).eval()
    report = fxalign.align(model, model.inputs(), exporter="torchscript", attach=False)
    assert report.first_divergence == "mid" and report.culprit_basis == "introduced"
    assert report.coverage is not None and not report.coverage.unmarked
    assert report.divergence.local is not None and report.divergence.local.mismatched


def test_accumulated_error_names_no_module(exporter):
    torch.manual_seed(0)
    model = Accumulating().eval()
    report = fxalign.align(
        model, model.inputs(), exporter=exporter, export_kwargs=export_kwargs(exporter)
    )
    assert not report.passed
    assert report.first_divergence is None and report.culprit_basis == "accumulated"
    assert report.first_seen is not None and report.first_seen.startswith("layers.")
    assert all(r.local is not None and not r.introduced_failed for r in report.rows)
    assert "accumulat" in summary_line(report)


def test_without_introduced_errors_the_first_break_is_named_as_a_fallback(exporter):
    model = InlinePlanted().eval()
    report = fxalign.align(
        model,
        model.inputs(),
        exporter=exporter,
        export_kwargs=export_kwargs(exporter),
        local=False,
    )
    assert report.culprit_basis == "cumulative"
    assert report.first_divergence == report.first_seen
    assert "no introduced error" in summary_line(report)


def test_aligned_models_have_no_culprit(exporter):
    model = NestedBlocks().eval()
    report = fxalign.align(model, model.inputs(), exporter=exporter)
    assert report.passed
    assert (report.first_divergence, report.first_seen, report.culprit_basis) == (None,) * 3


def test_self_errors_in_batches_equal_one_run(exporter):
    model = InlinePlanted().eval()
    inputs = model.inputs()
    kw = {"exporter": exporter, "export_kwargs": export_kwargs(exporter)}
    whole = fxalign.align(model, inputs, **kw)
    batched = fxalign.align(model, inputs, max_outputs_per_run=2, **kw)
    assert batched.first_divergence == whole.first_divergence == "block"
    assert [(r.local, r.local_scope, r.local_note) for r in batched.rows] == [
        (r.local, r.local_scope, r.local_note) for r in whole.rows
    ]


def test_report_with_culprit_fields_round_trips(exporter):
    model = InlinePlanted().eval()
    report = fxalign.align(
        model, model.inputs(), exporter=exporter, export_kwargs=export_kwargs(exporter)
    )
    back = fxalign.Report.from_json(report.to_json())
    assert back == report and back.culprit_basis == "introduced"
