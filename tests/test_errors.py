"""Every bad input gets the right error type, and the message names the culprit (issue 7)."""

import os

import numpy as np
import pytest
import torch

import fxalign
from fixtures.models import (
    DataDependent,
    OrtCannotRun,
    ReusedModule,
    SpecialValues,
    TorchScriptCannotExport,
)


def test_untraceable_model_with_fx_only():
    with pytest.raises(fxalign.InstrumentationError, match="could not trace DataDependent") as e:
        fxalign.instrument(DataDependent(), DataDependent.inputs(), method="fx")
    assert "method='auto'" in e.value.hint


def test_not_a_module():
    with pytest.raises(fxalign.InstrumentationError, match="got function"):
        fxalign.align(lambda x: x, (torch.ones(1),))  # type: ignore[arg-type]


def test_dynamo_export_failure_names_the_module_and_suggests_torchscript():
    model = DataDependent().eval()
    with pytest.raises(fxalign.ExportError) as e:
        fxalign.align(model, model.inputs(), exporter="dynamo")
    assert "in module 'branchy'" in e.value.message
    assert "data-dependent" in e.value.message
    assert "torchscript" in e.value.hint
    assert e.value.__cause__ is not None


def test_torchscript_export_failure_names_the_op_and_suggests_dynamo():
    model = TorchScriptCannotExport().eval()
    with pytest.raises(fxalign.ExportError, match="aten::diff") as e:
        fxalign.align(model, model.inputs(), exporter="torchscript")
    assert "dynamo" in e.value.hint
    assert fxalign.align(model, model.inputs(), exporter="dynamo").passed


def test_runtime_failure_names_onnx_node_and_module_path():
    model = OrtCannotRun().eval()
    with pytest.raises(fxalign.RuntimeBackendError) as e:
        fxalign.align(model, model.inputs(), exporter="torchscript")
    message = e.value.message
    assert "Doubler" in message and "from module 'body.1'" in message
    assert "body.1" in e.value.hint


def test_unknown_execution_provider_lists_available_ones():
    model = ReusedModule().eval()
    with pytest.raises(fxalign.RuntimeBackendError, match="TensorrtExecutionProvider") as e:
        fxalign.align(model, model.inputs(), providers=["TensorrtExecutionProvider"])
    assert "CPUExecutionProvider" in e.value.hint


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((torch.randn(2, 5),), {}, "mat1 and mat2 shapes cannot be multiplied"),
        ((torch.randn(2, 6), torch.randn(2, 6)), {}, "too many positional arguments"),
        ((), {"x": torch.randn(2, 6), "y": torch.randn(2, 6)}, "unexpected keyword argument .y."),
        ((), {}, "missing a required argument: .x."),
        ((torch.randn(2, 6, dtype=torch.float64),), {}, "dtype"),
    ],
)
def test_inputs_that_do_not_fit(args, kwargs, message):
    with pytest.raises(fxalign.InputError, match=message):
        fxalign.align(ReusedModule().eval(), args, kwargs)


def test_negative_tolerance():
    with pytest.raises(fxalign.UserError, match=r"atol must be a finite number >= 0, got -1"):
        fxalign.align(ReusedModule().eval(), ReusedModule.inputs(), atol=-1)


def test_nan_and_empty_values_are_reported_rows(exporter):
    model = SpecialValues().eval()
    report = fxalign.align(model, model.inputs(), exporter=exporter)
    log = report.row("log")
    values = fxalign.run_torch(fxalign.instrument(model), model.inputs())
    assert np.isnan(values[fxalign.MarkerName("log")]).any()
    assert log.passed and log.metrics.nan_matched > 0
    assert any("NaN at the same positions" in n for n in log.notes)
    empty = report.row("empty")
    assert empty.passed and empty.torch_shape == [3, 0] and "empty tensor" in empty.notes


def test_align_writes_nothing_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = ReusedModule().eval()
    before = set(os.listdir(tmp_path))
    fxalign.align(model, model.inputs(), fidelity=True)
    assert set(os.listdir(tmp_path)) == before
