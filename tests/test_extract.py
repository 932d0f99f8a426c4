import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from fixtures.models import ConvBlocks, UnusedOutput
from fxalign import InternalError, export, extract, instrument
from fxalign.extract import locate_failure
from fxalign.markers import DOMAIN
from fxalign.names import MarkerName, decode_attribute, encode_attribute

R, N = MarkerName("r"), MarkerName("n")


def _debug(inp, out, marker, node_name=None):
    """A Debug node for ``marker`` (a module path, or a MarkerName)."""
    if isinstance(marker, str):
        marker = MarkerName(marker)
    node = helper.make_node("Debug", [inp], [out], domain=DOMAIN, name=node_name)
    node.attribute.append(helper.make_attribute("name", encode_attribute(marker)))
    return node


def _model_with(nodes, outputs, inputs=("x",)):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(i, TensorProto.FLOAT, [2]) for i in inputs],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [2]) for o in outputs],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)]
    )


def test_debug_and_identity_nodes_are_removed_and_outputs_keep_names():
    model = _model_with(
        [
            helper.make_node("Relu", ["x"], ["a"], name="relu"),
            _debug("a", "a_dbg", "r", "d0"),
            helper.make_node("Identity", ["a_dbg"], ["a_id"]),
            helper.make_node("Neg", ["a_id"], ["b"], name="neg"),
            _debug("b", "y", "n", "d1"),
        ],
        ["y"],
    )
    result = extract(model)
    graph = gs.import_onnx(result.model)
    assert {n.op for n in graph.nodes} == {"Relu", "Neg"}
    assert [o.name for o in result.model.graph.output] == ["y", "a"]
    assert result.tensor_of == {R: "a", N: "y"}
    assert result.producer_of == {R: "relu", N: "neg"}
    assert result.debug_node_count == 2 and result.removed_identity_count == 1
    assert all(o.domain != DOMAIN for o in result.model.opset_import)
    onnx.checker.check_model(result.model, full_check=True)


def test_marker_on_graph_input_is_exposed_through_identity():
    model = _model_with(
        [
            _debug("x", "x_dbg", "inp"),
            helper.make_node("Relu", ["x_dbg"], ["y"]),
        ],
        ["y"],
    )
    result = extract(model)
    assert result.tensor_of[MarkerName("inp")] == "fxalign::inp"
    onnx.checker.check_model(result.model)


def test_markers_that_look_alike_get_their_own_tensors():
    second_call, named_a1 = MarkerName("a", 1), MarkerName("a#1")  # both shown as "a#1"
    model = _model_with(
        [
            _debug("x", "x1", second_call),
            _debug("z", "z1", named_a1),
            helper.make_node("Add", ["x1", "z1"], ["y"]),
        ],
        ["y"],
        inputs=("x", "z"),
    )
    result = extract(model)
    assert result.tensor_of == {second_call: "fxalign::a#1", named_a1: "fxalign::a#1_1"}
    onnx.checker.check_model(result.model)


def test_a_debug_node_without_an_encoded_name_is_an_internal_error():
    model = _model_with([_debug("x", "y", "a")], ["y"])
    model.graph.node[0].attribute[0].s = b"a"  # a plain string: not written by fxalign
    with pytest.raises(InternalError, match="not an fxalign marker name"):
        extract(model)


def test_locate_failure_names_the_innermost_module_by_its_structured_name():
    model = _model_with(
        [
            helper.make_node("Relu", ["x"], ["a"], name="relu"),
            _debug("a", "a_dbg", MarkerName("d.b:in", 1)),
            helper.make_node("Neg", ["a_dbg"], ["y"], name="neg"),
        ],
        ["y"],
    )
    result = extract(model)
    message = "[ONNXRuntimeError] : Non-zero status code while running Relu node. Name:'relu'"
    assert locate_failure(result.model, message, result.tensor_of) == ("relu", "Relu", "d.b:in")


@pytest.mark.parametrize("exp", ["dynamo", "torchscript"])
def test_exported_debug_nodes_carry_names(tmp_path, exp):
    model = ConvBlocks().eval()
    path = tmp_path / "m.onnx"
    exported = export(instrument(model), model.inputs(), path, exporter=exp)
    proto = onnx.load(path)
    names = [
        decode_attribute(a.s.decode())
        for n in proto.graph.node
        if n.domain == DOMAIN
        for a in n.attribute
    ]
    shown = [str(n) for n in names]
    # one Debug node per distinct value: the block's input is the graph input (first node);
    # convs1.0's input is the same tensor and a block's output is its last layer's: aliases
    assert shown[0] == "convs1:in[0]" and "convs1.0" in shown and "convs4.2" in shown
    aliases = {str(a): str(t) for a, t in exported.aliases.items()}
    assert aliases["convs1.0:in[0]"] == "convs1:in[0]"
    assert "convs4" not in shown and aliases["convs4"] == "convs4.2"
    result = extract(proto, exported.aliases)
    assert list(result.tensor_of) == names + list(exported.aliases)
    assert result.tensor_of[MarkerName("convs4")] == result.tensor_of[MarkerName("convs4.2")]
    assert result.output_names == [o.name for o in proto.graph.output]
    assert [o.name for o in result.model.graph.output][
        : len(result.output_names)
    ] == result.output_names


def test_pruned_marker_is_absent_not_an_error(tmp_path, exporter):
    model = UnusedOutput().eval()
    export(instrument(model), model.inputs(), tmp_path / "m.onnx", exporter=exporter)
    result = extract(str(tmp_path / "m.onnx"))
    assert MarkerName("used") in result.tensor_of and MarkerName("unused") not in result.tensor_of


def test_extract_does_not_modify_a_loaded_proto_in_surprising_ways():
    model = _model_with([_debug("x", "y", "a")], ["y"])
    before = model.SerializeToString()
    extract(model)
    assert model.SerializeToString() == before


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


def test_weights_are_set_aside_and_put_back(tmp_path, exporter):
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    model.eval()
    x = torch.randn(2, 32)
    exported = export(instrument(model), (x,), tmp_path / "m.onnx", exporter=exporter)
    result = extract(exported.path, exported.aliases)
    original = onnx.load(exported.path, load_external_data=False)
    assert {i.name for i in result.model.graph.initializer} == {
        i.name for i in original.graph.initializer
    }
    assert [i.name for i in result.model.graph.input] == [i.name for i in original.graph.input]
    data_file = tmp_path / "m.onnx.data"
    # Both exporters' weights are external data: the debug model refers to the same file.
    assert data_file.exists()
    assert result.external_data_dir == str(tmp_path.resolve())
    assert result.model.ByteSize() < 4096
    result.save(tmp_path / "debug.onnx")
    next_to_export = _run(tmp_path / "debug.onnx", x)
    (tmp_path / "elsewhere").mkdir()
    result.save(tmp_path / "elsewhere" / "debug.onnx")  # a self-contained copy
    data_file.rename(tmp_path / "moved.data")
    elsewhere = _run(tmp_path / "elsewhere" / "debug.onnx", x)
    with torch.no_grad():
        expected = model(x).numpy()
    for values in (next_to_export, elsewhere):
        np.testing.assert_allclose(values[0], expected, rtol=1e-5, atol=1e-6)


def test_torchscript_weights_go_to_one_data_file_unless_asked_inline(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    model.eval()
    x = torch.randn(2, 32)
    path, data = tmp_path / "m.onnx", tmp_path / "m.onnx.data"
    export(instrument(model), (x,), path, exporter="torchscript")
    size = data.stat().st_size
    assert size >= 32 * 32 * 4
    export(instrument(model), (x,), path, exporter="torchscript")
    assert data.stat().st_size == size  # replaced, not appended to
    data.unlink()
    export(instrument(model), (x,), path, exporter="torchscript", external_data=False)
    assert not data.exists()
    inline = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location != TensorProto.EXTERNAL for t in inline.graph.initializer)
    result = extract(path)
    assert result.external_data_dir is None
    result.save(tmp_path / "debug.onnx")
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(_run(tmp_path / "debug.onnx", x)[0], expected, rtol=1e-5, atol=1e-6)
