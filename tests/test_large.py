"""A model over 2 GB goes through the whole pipeline with external data (issue 6).

About 20 s and 5.5 GB of memory per exporter on the CI machine.
"""

import pytest
import torch

import fxalign


@pytest.mark.slow
@pytest.mark.parametrize("attach", [None, False], ids=["default", "markers"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_model_over_2gb(tmp_path, exporter, attach):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16384, 16384), torch.nn.ReLU(), torch.nn.Linear(16384, 16384)
    ).eval()
    assert sum(p.numel() for p in model.parameters()) * 4 > 2**31
    x = torch.randn(2, 16384)
    report = fxalign.align(model, (x,), exporter=exporter, workdir=tmp_path, attach=attach)
    assert report.passed and [r.name for r in report.rows] == ["0", "1", "2", ""]
    if attach is None:  # the plain export, attached to: its promoted copy shares its data
        assert report.instrumentation == "attach"
        assert (tmp_path / "plain.onnx").stat().st_size < 2**20
    else:  # the weights live in external data, shared by the exported and the debug model
        assert (tmp_path / "export.onnx").stat().st_size < 2**20
        assert (tmp_path / "debug.onnx").stat().st_size < 2**20
    data = [p for p in tmp_path.iterdir() if p.suffix not in (".onnx",)]
    assert sum(p.stat().st_size for p in data) > 2**31


def _weights(count: int):
    from onnx import TensorProto, helper

    # Only the shape and the field in use are read: the data itself can stay short.
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[count], raw_data=b"\0" * 4)
    node = helper.make_node("Identity", ["w"], ["y"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [count])
    graph = helper.make_graph([node], "g", [], [y], initializer=[weight])
    return helper.make_model(graph)


def test_size_judged_from_shapes_is_a_bound_not_a_guess():
    from fxalign.modelio import surely_small

    # float32 weights: 4 bytes each in raw_data, so 200 M of them (800 MB) are surely small
    # and 300 M (1.2 GB, past half the protobuf limit) get their exact size measured.
    assert surely_small(_weights(200_000_000))
    assert not surely_small(_weights(300_000_000))
