"""Half precision: dtype-aware tolerances, comparison in float64 (issue 6)."""

import pytest
import torch

import fxalign
from fixtures.models import NestedBlocks


def test_float16_model_aligns_with_float16_tolerances(exporter):
    model = NestedBlocks().eval().half()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float16)
    report = fxalign.align(model, (x,), exporter=exporter)
    assert report.passed, fxalign.render_text(report)
    stem = report.row("stem")
    assert stem.torch_dtype == stem.onnx_dtype == "float16"
    assert (stem.atol, stem.rtol) == (1e-2, 1e-2)
    assert report.dtype_tolerances


def test_bfloat16_inputs_reach_the_runtime_as_bfloat16():
    # ONNX Runtime's CPU provider has no bfloat16 Gemm: the error names the node and module.
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).eval().bfloat16()
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    with pytest.raises(fxalign.RuntimeBackendError, match="Gemm") as info:
        fxalign.align(model, (x,), exporter="dynamo")
    assert "from module '0'" in info.value.message
