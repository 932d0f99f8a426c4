"""One contract every ONNX runner passes (issue 6): same shape of result, same values."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import fxalign
from fxalign.runtime import Runner, builtin_runners


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    # y = relu(x @ w + b); z = y * 2  (MatMul+Add is what ORT likes to fuse)
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 2], [1.0, -1.0, 0.5, 2.0, -2.0, 0.25])
    b = helper.make_tensor("b", TensorProto.FLOAT, [2], [0.1, -0.2])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["a"]),
            helper.make_node("Relu", ["a"], ["y"]),
            helper.make_node("Mul", ["y", "two"], ["z"]),
        ],
        "contract",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])],
        [
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 2]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2]),
        ],
        initializer=[w, b, two],
    )
    path = tmp_path_factory.mktemp("runner") / "contract.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(model, path)
    return str(path)


RUNNERS = builtin_runners()


@pytest.mark.parametrize("name", sorted(RUNNERS))
def test_runner_contract(name, model_path):
    runner = RUNNERS[name]
    assert isinstance(runner, Runner) and isinstance(runner.name, str)
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    w = np.array([[1.0, -1.0], [0.5, 2.0], [-2.0, 0.25]], np.float32)
    y = np.maximum(x @ w + np.array([0.1, -0.2], np.float32), 0)

    out = runner.run(model_path, {"x": x}, ["y", "z"])
    assert list(out) == ["y", "z"]  # exactly the names asked for, in that order
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in out.values())
    np.testing.assert_allclose(out["y"], y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["z"], 2 * y, rtol=1e-6, atol=1e-6)
    assert list(runner.run(model_path, {"x": x}, ["z"])) == ["z"]
    with pytest.raises(fxalign.InputError):
        runner.run(model_path, {"wrong": x}, ["z"])


@pytest.mark.parametrize("name", sorted(RUNNERS))
def test_runner_through_align(name):
    from fixtures.models import NestedBlocks

    model = NestedBlocks().eval()
    report = fxalign.align(model, model.inputs(), runner=RUNNERS[name], exporter="torchscript")
    assert report.passed


def test_unknown_optimization_level():
    with pytest.raises(fxalign.RuntimeBackendError, match="ORT_DISABLE_ALL"):
        fxalign.OrtRunner(graph_optimization_level="FAST")
