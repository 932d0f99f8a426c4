"""A model over 2 GB goes through the whole pipeline with external data (issue 6).

About 20 s and 5.5 GB of memory per exporter on the CI machine.
"""

import pytest
import torch

import fxalign


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_model_over_2gb(tmp_path, exporter):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16384, 16384), torch.nn.ReLU(), torch.nn.Linear(16384, 16384)
    ).eval()
    assert sum(p.numel() for p in model.parameters()) * 4 > 2**31
    report = fxalign.align(model, (torch.randn(2, 16384),), exporter=exporter, workdir=tmp_path)
    assert report.passed and [r.name for r in report.rows] == ["0", "1", "2", ""]
    # the weights live in external data, shared by the exported and the debug model
    assert (tmp_path / "export.onnx").stat().st_size < 2**20
    assert (tmp_path / "debug.onnx").stat().st_size < 2**20
    data = [p for p in tmp_path.iterdir() if p.suffix not in (".onnx",)]
    assert sum(p.stat().st_size for p in data) > 2**31
