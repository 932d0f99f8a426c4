"""A model loaded from memory: its graph alone serialized, its weights handed over as arrays."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import fxalign
from fixtures.models import NestedBlocks
from fxalign.backends import OrtRunner, can_load_weightless, weightless
from fxalign.backends.memory import IN_MEMORY


def _model(tmp_path=None):
    """y = relu(x @ w + b) * s, w large enough to split, b small, s bfloat16."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b")
    s = helper.make_tensor("s", TensorProto.BFLOAT16, [512], np.full(512, 16256, np.uint16), True)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Cast", ["s"], ["s32"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMax", ["s32"], ["smax"], keepdims=0),
        helper.make_node("Mul", ["r", "smax"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])],
        [w, b, s],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _feeds():
    return {"x": np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)}


def test_only_large_plain_weights_are_split_and_the_model_is_left_as_it_was():
    model = _model()
    before = model.SerializeToString()
    split = weightless(model, name="m.onnx")
    assert model.SerializeToString() == before
    assert list(split.weights) == ["w"]  # b is under 1 KiB, s is bfloat16 (no numpy type)
    w = numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_array_equal(split.weights["w"], w)
    placeholder = {t.name: t for t in split.graph.graph.initializer}["w"]
    assert placeholder.data_location == TensorProto.EXTERNAL and not placeholder.raw_data
    assert {e.key: e.value for e in placeholder.external_data}["location"] == IN_MEMORY
    assert list(placeholder.dims) == [64, 32]
    assert model.ByteSize() - split.graph.ByteSize() > 64 * 32 * 4 - 100  # w left the graph
    assert [n.op_type for n in split.graph.graph.node] == [n.op_type for n in model.graph.node]


def test_a_session_from_memory_computes_what_the_file_does(tmp_path):
    model = _model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    runner = OrtRunner()
    assert can_load_weightless(runner)
    from_file = runner.load(str(path)).run(_feeds(), ["y"])
    from_memory = runner.load_weightless(weightless(model)).run(_feeds(), ["y"])
    np.testing.assert_array_equal(from_memory["y"], from_file["y"])


def test_external_data_is_read_from_the_models_folder(tmp_path):
    folder = tmp_path / "deployed"
    folder.mkdir()
    path = folder / "m.onnx"
    onnx.save(_model(), path, save_as_external_data=True, location="m.data", size_threshold=0)
    expected = OrtRunner().load(str(path)).run(_feeds(), ["y"])["y"]
    graph = onnx.load(path, load_external_data=False)
    split = weightless(graph, folder=str(folder))
    assert split.weights == {}  # nothing inline to split: the runtime reads m.data
    got = OrtRunner().load_weightless(split).run(_feeds(), ["y"])["y"]
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(fxalign.RuntimeBackendError, match="cannot load the model"):
        OrtRunner().load_weightless(weightless(graph, folder=str(tmp_path)))  # no m.data there


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_attached_rows_are_the_same_from_memory_and_from_a_file(exporter):
    """The in-memory session and a file-only runner's session give the same report."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8), nn.Tanh()).eval()
    x = torch.randn(4, 64)
    memory = fxalign.align(model, (x,), exporter=exporter, attach=True)

    class FileOnly:  # ONNX Runtime through the file half of the runner protocol only
        name = "file-only"

        def load(self, model_path, *, max_outputs_per_run=None):
            return OrtRunner().load(model_path)

    files = fxalign.align(model, (x,), exporter=exporter, attach=True, runner=FileOnly())
    assert [str(r.name) for r in memory.rows] == [str(r.name) for r in files.rows]
    assert len(memory.rows) == 5 and all(r.onnx_name for r in memory.rows)
    for a, b in zip(memory.rows, files.rows, strict=True):
        assert a.metrics == b.metrics, a.name
    assert memory.passed and files.passed


def test_a_plain_torchscript_export_is_kept_in_memory_unless_a_file_is_asked_for(tmp_path):
    from fxalign.export import export_plain

    model, (x,) = NestedBlocks().eval(), NestedBlocks().eval().inputs()
    kept = export_plain(model, (x,), tmp_path / "p.onnx", None, "torchscript", {}, write=False)
    assert kept.model is not None and not kept.written
    assert not (tmp_path / "p.onnx").exists()
    written = export_plain(model, (x,), tmp_path / "w.onnx", None, "torchscript", {})
    assert written.written and written.model is not None
    # Written as the exporter writes it: weights inline, nothing beside the file.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.onnx"]
    on_disk = onnx.load(tmp_path / "w.onnx")
    assert on_disk.SerializeToString() == written.model.SerializeToString()
    assert [t.name for t in kept.model.graph.initializer] == [
        t.name for t in on_disk.graph.initializer
    ]
