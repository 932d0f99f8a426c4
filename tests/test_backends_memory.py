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


def _external(tensor):
    return {e.key: e.value for e in tensor.external_data}


def test_load_graph_leaves_inline_weights_in_the_file_at_their_offsets(tmp_path):
    from fxalign.modelio import load_graph

    model = _model()
    model.graph.node.append(  # a node attribute holding a tensor stays where it is
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(300, "f")))
    )
    path = tmp_path / "dir with space" / "m.onnx"
    path.parent.mkdir()
    onnx.save(model, path)
    before = path.read_bytes()
    graph = load_graph(path)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == [
        "m.onnx"
    ]
    by_name = {t.name: t for t in graph.graph.initializer}
    for name in ("w", "s"):  # every large raw-data weight, whatever its element type
        t = by_name[name]
        assert t.data_location == TensorProto.EXTERNAL and not t.HasField("raw_data")
        entry = _external(t)
        start, length = int(entry["offset"]), int(entry["length"])
        original = {u.name: u for u in model.graph.initializer}[name]
        assert entry["location"] == "m.onnx" and before[start : start + length] == original.raw_data
        assert list(t.dims) == list(original.dims) and t.data_type == original.data_type
    assert by_name["b"].HasField("raw_data")  # under 1 KiB: inline
    # Everything but the weights is the file's, field for field.
    plain = onnx.load(path)
    for t in plain.graph.initializer:
        if t.name != "b":
            t.ClearField("raw_data")
    for t in graph.graph.initializer:
        if t.name != "b":
            t.ClearField("external_data")
            t.ClearField("data_location")
    assert graph.SerializeToString() == plain.SerializeToString()
    # ONNX Runtime, given the graph and the file's folder, reads the weights from the file.
    split = weightless(load_graph(path), folder=str(path.parent))
    assert split.weights == {}
    got = OrtRunner().load_weightless(split).run(_feeds(), ["y"])["y"]
    np.testing.assert_array_equal(got, OrtRunner().load(str(path)).run(_feeds(), ["y"])["y"])


def test_load_graph_reads_other_layouts_as_onnx_does(tmp_path):
    from fxalign.modelio import load_graph

    external = tmp_path / "e.onnx"
    onnx.save(_model(), external, save_as_external_data=True, location="e.data", size_threshold=0)
    expected = onnx.load(external, load_external_data=False).SerializeToString()
    assert load_graph(external).SerializeToString() == expected  # external data stays as it was
    doubled = tmp_path / "d.onnx"  # two graph fields: protobuf merges them, onnx.load reads it
    graph_field = onnx.ModelProto(graph=_model().graph).SerializeToString()
    doubled.write_bytes(_model().SerializeToString() + graph_field)
    assert load_graph(doubled).SerializeToString() == onnx.load(doubled).SerializeToString()
    garbage = tmp_path / "g.onnx"
    garbage.write_bytes(b"\xff" * 64)
    for bad in (garbage, tmp_path / "missing.onnx", tmp_path):
        with pytest.raises(Exception) as fast:
            load_graph(bad)
        with pytest.raises(Exception) as slow:
            onnx.load(bad, load_external_data=False)
        assert type(fast.value) is type(slow.value)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_an_attached_file_is_read_without_its_weights_and_rows_are_unchanged(
    exporter, tmp_path, monkeypatch
):
    """onnx=file reads the graph alone; its report equals the one from a whole read."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8), nn.Tanh()).eval()
    x = torch.randn(4, 64)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), path, dynamo=exporter == "dynamo")
    before = sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir())
    source = __import__("sys").modules["fxalign.sources.attach"]
    reads = []
    original = source.load_graph
    monkeypatch.setattr(source, "load_graph", lambda p: reads.append(p) or original(p))
    fast = fxalign.align(model, (x,), onnx=path)
    assert reads == [path]
    whole = fxalign.align(model, (x,), onnx=path, workdir=tmp_path / "work")
    assert reads == [path]  # with a work folder the file is read whole
    assert [r.name for r in fast.rows] == [r.name for r in whole.rows] and len(fast.rows) == 5
    for a, b in zip(fast.rows, whole.rows, strict=True):
        assert (a.onnx_name, a.metrics) == (b.onnx_name, b.metrics), a.name
    assert (
        fast.passed
        and sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir() if p.name != "work")
        == before
    )
