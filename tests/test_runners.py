"""One contract every ONNX runner passes: loaded once, same outputs for same feeds, typed errors.

The runners: ONNX Runtime with its default optimizations and without any, ONNX Runtime under a
memory bound (a ChunkRunner), and a minimal custom runner written here (onnx's reference
evaluator), which is what a user passing ``runner=`` writes.
"""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import fxalign
from fixtures.models import NestedBlocks
from fxalign.backends import (
    ChunkRunner,
    OrtRunner,
    Runner,
    Session,
    builtin_runners,
    check_runner,
    load_model,
    run_onnx,
)
from fxalign.cli import main


class ReferenceRunner:
    """A minimal custom runner: onnx's reference evaluator, built once per loaded model."""

    name = "onnx-reference"

    def load(self, model_path, *, max_outputs_per_run=None):
        try:
            return ReferenceSession(ReferenceEvaluator(model_path))
        except Exception as e:
            raise fxalign.RuntimeBackendError(f"cannot load {model_path}: {e}") from e


class ReferenceSession:
    def __init__(self, evaluator):
        self.evaluator = evaluator

    def run(self, feeds, output_names):
        if set(feeds) != set(self.evaluator.input_names):
            raise fxalign.InputError(f"inputs {sorted(feeds)} are not {self.evaluator.input_names}")
        try:
            values = self.evaluator.run(list(output_names), dict(feeds))
        except Exception as e:
            raise fxalign.RuntimeBackendError(f"the reference evaluator failed: {e}") from e
        return dict(zip(output_names, values, strict=True))


# name -> (make the runner, max_outputs_per_run to load it with)
RUNNERS = {
    "onnxruntime": (lambda: builtin_runners()["onnxruntime"], None),
    "onnxruntime-noopt": (lambda: builtin_runners()["onnxruntime-noopt"], None),
    "onnxruntime-chunked": (OrtRunner, 1),
    "custom": (ReferenceRunner, None),
}


@pytest.fixture(params=sorted(RUNNERS))
def runner_case(request):
    make, max_outputs_per_run = RUNNERS[request.param]
    return make(), max_outputs_per_run


def _save(tmp_path_factory, name, nodes, inputs, outputs, initializer=()):
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(initializer))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    path = tmp_path_factory.mktemp("runner") / f"{name}.onnx"
    onnx.save(model, path)
    return str(path)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    # y = relu(x @ w + b); z = y * 2  (MatMul+Add is what ORT likes to fuse)
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 2], [1.0, -1.0, 0.5, 2.0, -2.0, 0.25])
    b = helper.make_tensor("b", TensorProto.FLOAT, [2], [0.1, -0.2])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["a"]),
        helper.make_node("Relu", ["a"], ["y"]),
        helper.make_node("Mul", ["y", "two"], ["z"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])]
    outputs = [
        helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 2]),
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2]),
    ]
    return _save(tmp_path_factory, "contract", nodes, inputs, outputs, [w, b, two])


@pytest.fixture(scope="module")
def failing_paths(tmp_path_factory):
    """A model no backend can load (an op nobody implements) and one that fails when run."""
    unknown = _save(
        tmp_path_factory,
        "unknown_op",
        [helper.make_node("NoSuchOp", ["x"], ["y"], domain="nowhere")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    reshape = _save(
        tmp_path_factory,
        "bad_reshape",
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [None]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
    )
    return unknown, reshape


def _expected(x):
    w = np.array([[1.0, -1.0], [0.5, 2.0], [-2.0, 0.25]], np.float32)
    return np.maximum(x @ w + np.array([0.1, -0.2], np.float32), 0)


def test_same_outputs_for_the_same_feeds_from_one_load(runner_case, model_path):
    runner, max_outputs_per_run = runner_case
    assert isinstance(runner, Runner) and isinstance(runner.name, str)
    assert check_runner(runner) is runner
    session = load_model(runner, model_path, max_outputs_per_run=max_outputs_per_run)
    assert isinstance(session, Session)
    rng = np.random.default_rng(0)
    for _ in range(2):  # two samples, one load
        x = rng.standard_normal((4, 3)).astype(np.float32)
        out = session.run({"x": x}, ["y", "z"])
        assert list(out) == ["y", "z"]  # exactly the names asked for, in that order
        assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in out.values())
        np.testing.assert_allclose(out["y"], _expected(x), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out["z"], 2 * _expected(x), rtol=1e-6, atol=1e-6)
        assert list(session.run({"x": x}, ["z"])) == ["z"]


def test_errors_are_typed(runner_case, model_path, failing_paths):
    runner, max_outputs_per_run = runner_case
    session = load_model(runner, model_path, max_outputs_per_run=max_outputs_per_run)
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(fxalign.InputError):
        session.run({"wrong": x}, ["z"])
    unknown, reshape = failing_paths
    with pytest.raises(fxalign.RuntimeBackendError):
        load_model(runner, unknown, max_outputs_per_run=max_outputs_per_run).run(
            {"x": np.zeros(2, np.float32)}, ["y"]
        )
    bad = load_model(runner, reshape, max_outputs_per_run=max_outputs_per_run)
    with pytest.raises(fxalign.RuntimeBackendError):
        bad.run({"x": np.zeros(4, np.float32), "shape": np.array([3])}, ["y"])


@pytest.fixture
def ort_sessions(monkeypatch):
    """File names of the ONNX Runtime sessions built, in order."""
    built = []
    real = onnxruntime.InferenceSession

    def counting(path, *args, **kwargs):
        built.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", counting)
    return built


def test_align_loads_the_debug_model_once_for_every_sample_and_chunk(
    runner_case, ort_sessions, monkeypatch
):
    runner, max_outputs_per_run = runner_case
    loads, chunk_runs = [], []
    real_load, real_chunk_run = runner.load, ChunkRunner.run

    def load(model_path, *, max_outputs_per_run=None):
        loads.append(Path(model_path).name)
        return real_load(model_path, max_outputs_per_run=max_outputs_per_run)

    def chunk_run(self, feeds, output_names):
        chunk_runs.append(len(output_names))
        return real_chunk_run(self, feeds, output_names)

    monkeypatch.setattr(runner, "load", load)
    monkeypatch.setattr(ChunkRunner, "run", chunk_run)
    model = NestedBlocks().eval()
    bound = None if max_outputs_per_run is None else 2
    report = fxalign.align(
        model,
        model.inputs(),
        exporter="torchscript",
        runner=runner,
        samples=[torch.randn(2, 3, 8, 8)],
        max_outputs_per_run=bound,
        attach=False,
    )
    assert report.passed and report.sample_count == 2
    assert loads == ["debug.onnx"]
    if isinstance(runner, OrtRunner):
        # one session of the whole model; under a bound, one small one per chunk run
        assert ort_sessions.count("debug.onnx") == 1
        assert ort_sessions[1:] == ["chunk.onnx"] * len(chunk_runs)
        assert (len(chunk_runs) > 2) == (bound is not None)  # both samples, a few chunks each
    else:
        assert ort_sessions == []


def test_run_onnx_loads_once_and_runs_every_runner_per_chunk(runner_case, model_path):
    runner, _ = runner_case
    x = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    whole = run_onnx(model_path, {"x": x}, runner=runner)
    chunked = run_onnx(model_path, {"x": x}, runner=runner, max_outputs_per_run=1)
    assert list(chunked) == list(whole) == ["z", "y"]
    for name in whole:
        np.testing.assert_array_equal(chunked[name], whole[name])
    assert chunked.runs == 2


@pytest.mark.parametrize(
    ("runner", "message"),
    [
        (object(), "has no load"),
        (type("Old", (), {"name": "old", "run": lambda self, p, f, o: {}})(), "no longer"),
        (type("Nameless", (), {"load": lambda self, p, *, max_outputs_per_run=None: 0})(), "name"),
        (type("Rigid", (), {"name": "rigid", "load": lambda self, p: 0})(), "max_outputs_per_run"),
    ],
)
def test_a_non_runner_is_a_user_error_saying_what_a_runner_has(runner, message, model_path):
    model = NestedBlocks().eval()
    with pytest.raises(fxalign.UserError, match=message) as caught:
        fxalign.align(model, model.inputs(), runner=runner)
    assert "load(model_path" in str(caught.value)
    with pytest.raises(fxalign.UserError, match=message):
        run_onnx(model_path, {"x": np.zeros((4, 3), np.float32)}, runner=runner)


def test_a_load_that_returns_no_session_is_a_user_error(model_path):
    class Broken:
        name = "broken"

        def load(self, model_path, *, max_outputs_per_run=None):
            return object()

    with pytest.raises(fxalign.UserError, match="no run"):
        run_onnx(model_path, {"x": np.zeros((4, 3), np.float32)}, runner=Broken())


def test_unknown_optimization_level():
    with pytest.raises(fxalign.RuntimeBackendError, match="ORT_DISABLE_ALL"):
        fxalign.OrtRunner(graph_optimization_level="FAST")


def test_unavailable_provider_lists_the_available_ones(capsys):
    with pytest.raises(fxalign.RuntimeBackendError, match="CPUExecutionProvider") as caught:
        fxalign.OrtRunner(["NoSuchExecutionProvider"])
    assert "NoSuchExecutionProvider" in caught.value.message
    argv = ["align", "tests.fixtures.models:NestedBlocks", "-i", "1x3x8x8", "--no-fidelity"]
    assert main([*argv, "--provider", "NoSuchExecutionProvider"]) == 2
    assert "CPUExecutionProvider" in capsys.readouterr().err


def test_graph_optimization_level_on_the_command_line(monkeypatch):
    levels = []
    real = OrtRunner.session_options

    def spy(self):
        levels.append(self.graph_optimization_level)
        return real(self)

    monkeypatch.setattr(OrtRunner, "session_options", spy)
    argv = ["align", "tests.fixtures.models:NestedBlocks", "-i", "1x3x8x8", "--no-fidelity"]
    argv += ["--exporter", "torchscript"]
    assert main([*argv, "--graph-optimization", "ORT_ENABLE_BASIC"]) == 0
    assert levels == [onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC]
