"""Attach to a plain export: hooks capture, scope recovery, pairing, promoted copies."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import fxalign
from fixtures import attach_models as am
from fixtures.models import ConvBnReluInplace, ReusedModule
from fxalign.attach import (
    EXTERNAL_DATA_FOLDER,
    Location,
    capture_calls,
    locate,
    promote,
    promoted,
    read_scopes,
)
from fxalign.attach.mapping import unqualified
from fxalign.errors import UserError

_CACHE: dict[tuple[str, str], tuple[nn.Module, tuple, str]] = {}
_RUNS: list[Path] = []


def _export(model: nn.Module, args: tuple, path: Path, exporter: str, **options) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            options.setdefault("verbose", False)
        torch.onnx.export(model, args, str(path), dynamo=exporter == "dynamo", **options)
    return str(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``(name, exporter) -> (model, args, path)``, each model exported once per module."""
    folder = tmp_path_factory.mktemp("attach")

    def get(name: str, exporter: str):
        key = (name, exporter)
        if key not in _CACHE:
            torch.manual_seed(0)
            if name == "bert":
                model, args = am.bert_tiny()
            else:
                cls = getattr(am, name)
                model, args = cls().eval(), cls.inputs()
            _CACHE[key] = (
                model,
                args,
                _export(model, args, folder / f"{name}_{exporter}.onnx", exporter),
            )
        return _CACHE[key]

    return get


def _run(path: str, names: list[str], args: tuple) -> dict[str, np.ndarray]:
    """Run a promoted copy (written beside ``path``, whose external data it shares)."""
    out = Path(path).with_name(f"{Path(path).stem}.{len(_RUNS)}.promoted.onnx")
    _RUNS.append(out)
    promoted = promote(path, names, out)
    session = ort.InferenceSession(promoted, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=False)}
    names_out = [o.name for o in session.get_outputs()]
    return dict(zip(names_out, session.run(None, feeds), strict=True))


def _check_values(location: Location, values: dict[str, np.ndarray], rtol: float) -> int:
    """Every located output and input equals its eager value; returns how many were checked."""
    checked = 0
    for call in location.calls:
        pairs = [(v.tensor, v.eager, f"{call.name}{v.leaf}") for v in call.outputs]
        pairs += [(i.tensor, i.eager, f"{call.name}:in{i.leaf}") for i in call.inputs]
        for tensor, eager, label in pairs:
            if tensor is None:
                continue
            got = values[tensor].astype(np.float64)
            want = eager.double().numpy()
            scale = max(float(np.abs(want).max(initial=0.0)), 1e-6)
            err = float(np.abs(got - want).max(initial=0.0)) / scale
            assert err <= rtol, f"{label} paired with {tensor!r}: relative error {err:.2e}"
            checked += 1
    return checked


def _reasons(location: Location) -> dict[str, str | None]:
    return {c.name + v.leaf: v.reason for c in location.calls for v in c.outputs}


def _tensors(location: Location) -> dict[str, str | None]:
    return {c.name + v.leaf: v.tensor for c in location.calls for v in c.outputs}


# ---- hooks --------------------------------------------------------------------------------
def test_capture_orders_calls_and_names_leaves():
    model = am.RepeatedBlocks().eval()
    capture = capture_calls(model, am.RepeatedBlocks.inputs())
    names = [c.name for c in capture.calls]
    assert names[:8] == [
        "",
        "shared",
        "act",
        "shared#1",
        "act#1",
        "shared#2",
        "shared#3",
        "blocks.0",
    ]
    assert names[-5:] == ["seq", "seq.0", "seq.0.0", "drop", "skip"]
    assert capture.never_called == (("blocks", "ModuleList"), ("unused", "Linear"))
    assert [leaf.name for leaf in capture.outputs] == ["[0]", '[1]["twice"]']
    lin = next(c for c in capture.calls if c.path == "blocks.1.lin")
    assert capture.calls[lin.parent].path == "blocks.1"
    assert [c.path for c in capture.chain(lin)] == ["", "blocks.1", "blocks.1.lin"]
    assert lin.class_name == "Linear" and lin.inputs[0].name == "[0]"
    # the shared module's inner back-to-back call starts first and feeds the outer one
    inner, outer = capture.calls[5], capture.calls[6]
    assert outer.inputs[0].value_id == inner.outputs[0].value_id


def test_capture_structured_and_non_tensor_outputs():
    model = am.PairOutputs().eval()
    capture = capture_calls(model, am.PairOutputs.inputs())
    split = next(c for c in capture.calls if c.path == "split")
    assert [leaf.name for leaf in split.outputs] == ["[0]", '[1]["neg"]', '[1]["sq"]']
    assert [leaf.key for leaf in split.outputs] == [(0,), (1, "neg"), (1, "sq")]
    describe = next(c for c in capture.calls if c.path == "describe")
    assert describe.outputs == () and describe.output_type == "str"


def test_capture_sees_values_before_in_place_changes():
    model = ConvBnReluInplace().eval()
    calls = {c.path: c for c in capture_calls(model, ConvBnReluInplace.inputs()).calls}
    assert calls["relu"].inputs[0].value_id == calls["bn"].outputs[0].value_id
    assert calls["relu"].outputs[0].value_id != calls["relu"].inputs[0].value_id
    assert torch.equal(calls["relu"].outputs[0].value, calls["bn"].outputs[0].value.relu())


class _Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("n", torch.zeros(2))

    def forward(self, x):
        self.n += 1
        return self.n  # its own buffer, written again by the next call


class _RowOfWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 2))

    def forward(self, x):
        return self.weight[0]  # a view of a parameter


class _RunningMean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x):
        self.bn(x)  # in training mode: writes its running mean, the version counter unmoved
        return self.bn.running_mean


class _FromNumpy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.buf = np.ones(2, np.float32)

    def forward(self, x):
        return torch.from_numpy(self.buf)  # memory another tensor may share unseen


class _WritesAfterReturn(nn.Module):
    """Inline code writing what its children returned: in place, through views, buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(2, 2), nn.Identity(), nn.Linear(2, 2)
        self.counter, self.row = _Counter(), _RowOfWeight()
        self.stats = _RunningMean()
        self.shared = _FromNumpy()

    def forward(self, x):
        h = self.a(x)
        h += 1  # a's output, written after a returned
        self.b(h)[:, :1].mul_(3)  # b's output written through a view of it
        n = self.counter(x) + self.counter(x)
        mean = self.stats(h) + self.stats(h)
        ones = self.shared(x)
        torch.from_numpy(self.shared.buf).add_(1)  # another tensor on the same memory
        return self.c(h) + n + self.row(x) + mean + ones


def test_capture_keeps_every_value_as_it_was_returned():
    torch.manual_seed(0)
    model, x = _WritesAfterReturn().train(), torch.randn(4, 2)
    shared = torch.from_numpy(model.shared.buf.copy())
    calls = {c.name: c for c in capture_calls(model, (x,)).calls}
    with torch.no_grad():
        a = model.a(x)
        b = a + 1
        c_in = b.clone()
        c_in[:, :1] *= 3
        stats = nn.BatchNorm1d(2).train()
        stats(c_in)
        first_mean = stats.running_mean.clone()
        stats(c_in)
    out = {name: call.outputs[0].value for name, call in calls.items() if call.outputs}
    assert torch.equal(out["a"], a)
    assert torch.equal(out["b"], b) and torch.equal(calls["b"].inputs[0].value, b)
    assert torch.equal(calls["c"].inputs[0].value, c_in)
    assert torch.equal(out["counter"], torch.ones(2)) and torch.equal(
        out["counter#1"], 2 * torch.ones(2)
    )
    assert model.counter.n.sum().item() == 0  # the model is put back; the values stay
    assert torch.equal(out["stats"], first_mean)
    assert torch.equal(out["stats#1"], stats.running_mean)
    assert torch.equal(out["shared"], shared)
    row = out["row"].clone()
    with torch.no_grad():
        model.row.weight.fill_(7.0)  # written after the capture: the recorded value stays
    assert torch.equal(out["row"], row) and not torch.equal(row, model.row.weight[0])


class _WritesFromAThread(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Identity()

    def forward(self, x):
        import threading

        h = self.a(x)
        writer = threading.Thread(target=h.add_, args=(1,))  # no operator hook sees this write
        writer.start()
        writer.join()
        return self.b(h)


def test_capture_records_again_when_a_write_went_unseen():
    model, x = _WritesFromAThread(), torch.randn(3, 2)
    calls = {c.name: c for c in capture_calls(model, (x,)).calls}
    with torch.no_grad():
        a = model.a(x)
    assert torch.equal(calls["a"].outputs[0].value, a)
    assert torch.equal(calls["b"].inputs[0].value, a + 1)


@torch.library.custom_op("fxalign_test::scale_unsaid", mutates_args=())
def _scale_unsaid(x: torch.Tensor) -> torch.Tensor:
    x.mul_(7)  # a write its schema does not declare
    return x.clone()


def _thread_then_seen(h):
    import threading

    writer = threading.Thread(target=h.add_, args=(100,))  # unseen: another thread
    writer.start()
    writer.join()
    h.mul_(1)  # seen, after the unseen one


def _through_storage_slice(h):
    alias = torch.empty(0).set_(h.untyped_storage()[0:8])  # another storage, same memory
    alias.zero_()


def _through_dlpack(h):
    torch.from_dlpack(h).mul_(10)


_UNSEEN_WRITES = {
    "custom op writing an argument it does not declare": lambda h: _scale_unsaid(h),
    "a thread, then an operator": _thread_then_seen,
    "a slice of the storage": _through_storage_slice,
    "DLPack": _through_dlpack,
    "the storage freed": lambda h: h.untyped_storage().resize_(0),
}


class _WritesBehindTheGuard(nn.Module):
    def __init__(self, write) -> None:
        super().__init__()
        self.a, self.b, self.write = nn.Linear(3, 3), nn.Identity(), write

    def forward(self, x):
        h = self.a(x)
        y = self.b(h * 1)
        self.write(h)
        return y


@pytest.mark.parametrize("how", list(_UNSEEN_WRITES))
def test_capture_keeps_values_written_behind_the_guard(how):
    model, x = _WritesBehindTheGuard(_UNSEEN_WRITES[how]), torch.randn(2, 3)
    with torch.no_grad():
        a = model.a(x)
    calls = {c.name: c for c in capture_calls(model, (x,)).calls}
    assert torch.equal(calls["a"].outputs[0].value, a)
    assert torch.equal(calls["b"].outputs[0].value, a)


class _Swaps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Identity(), nn.Identity()

    def forward(self, x):
        h = self.a(x * 1)
        torch.utils.swap_tensors(h, torch.zeros(3))  # refuses tensors with a weak reference
        return self.b(h)


def test_capture_of_a_forward_that_swaps_tensors():
    calls = {c.name: c for c in capture_calls(_Swaps(), (torch.ones(3),)).calls}
    assert torch.equal(calls["a"].outputs[0].value, torch.ones(3))
    assert torch.equal(calls["b"].inputs[0].value, torch.zeros(3))
    assert calls["a"].outputs[0].value_id != calls["b"].inputs[0].value_id


class _Stateful(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.drop = nn.Dropout(0.5)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x, *, scale):
        self.calls += 1
        self.note = "ran"
        x.mul_(scale)  # writes its input in place
        return self.drop(self.lin(x))


def test_capture_leaves_model_inputs_rng_and_hooks_as_they_were():
    model = _Stateful().train()  # dropout draws random numbers
    fired = []
    model.lin.register_forward_hook(lambda m, a, o: fired.append(1))
    x = torch.randn(2, 3)
    x_before = x.clone()
    rng = torch.get_rng_state()
    capture = capture_calls(model, (x,), {"scale": 2.0})
    assert fired == [1]
    assert torch.equal(x, x_before)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.calls.item() == 0 and not hasattr(model, "note") and model.training
    assert all(len(m._forward_hooks) == (m is model.lin) for m in model.modules())
    assert all(not m._forward_pre_hooks for m in model.modules())
    root = capture.calls[0]
    assert [leaf.name for leaf in root.inputs] == ["[0]"]
    assert root.kwargs == {"scale": 2.0}
    assert torch.equal(capture.calls[1].inputs[0].value, x_before * 2)


def test_capture_without_a_tree_walk_records_what_the_walk_records(monkeypatch):
    import sys

    hooks = sys.modules["fxalign.attach.hooks"]
    model, inputs = am.PairOutputs().eval(), am.PairOutputs.inputs()
    fast = capture_calls(model, inputs)
    monkeypatch.setattr(hooks, "_plain_leaves", lambda value, skip_first: None)
    slow = capture_calls(model, inputs)
    assert fast.calls == slow.calls  # index, path, leaves' keys, names and ids, ...
    for a, b in zip(fast.calls, slow.calls, strict=True):
        assert [x.path for x in a.inputs + a.outputs] == [x.path for x in b.inputs + b.outputs]
        assert all(torch.equal(x.value, y.value) for x, y in zip(a.outputs, b.outputs, strict=True))
    assert any(not c.outputs or len(c.outputs) > 1 for c in fast.calls)  # both paths taken
    assert any(len(c.outputs) == 1 and not c.outputs[0].key for c in fast.calls)


# ---- scopes ---------------------------------------------------------------------------------
def test_unqualified_names_follow_the_torchscript_exporter():
    assert [unqualified(p) for p in ["", "act", "blocks.0", "blocks.0.act", "layers.0.0"]] == [
        "",
        "act",
        "blocks.0",
        "act",
        "layers.0.0",
    ]


def test_repeated_calls_and_removed_modules(exported, exporter, tmp_path):
    model, args, path = exported("RepeatedBlocks", exporter)
    location = locate(model, args, None, path)
    assert location.exporter == exporter
    assert location.producer.startswith("pytorch")
    tensors, reasons = _tensors(location), _reasons(location)
    for name in ["shared", "act", "shared#1", "act#1", "blocks.0.lin", "blocks.1", "seq.0.0"]:
        assert tensors[name] is not None, (name, reasons[name])
    assert tensors["seq"] == tensors["seq.0"] == tensors["seq.0.0"] == tensors["[0]"]
    assert tensors["act"] != tensors["act#1"]
    if exporter == "torchscript":  # scopes /shared_2, /shared_3: every call has its own
        assert tensors["shared#2"] == "/shared_2/Gemm_output_0"
        assert tensors["shared#3"] == "/shared_3/Gemm_output_0"
    else:  # one run of nodes for two back-to-back calls: neither is told by its nodes
        assert tensors["shared#2"] is None
        assert "back to back" in str(reasons["shared#2"])
        # but what shared#3 returns is what blocks.0 received: the tensor entering its scope
        assert tensors["shared#3"] == "linear_3"
        assert location.find("shared#3").inputs[0].tensor is None  # shared#2's output
    assert reasons["drop"] == "removed by the exporter (Dropout: returns its input)"
    assert reasons["skip"] == "removed by the exporter (Identity: returns its input)"
    # blocks.0 reads shared#3's output, located or not: the one tensor entering its scope
    entering = location.find("blocks.0").inputs[0].tensor
    assert entering is not None
    assert entering == (tensors["shared#3"] if exporter == "torchscript" else "linear_3")
    assert location.never_called == ("blocks", "unused")
    assert location.called_modules == 13
    assert location.located_modules == 11  # shared: three of its four calls with dynamo
    values = _run(path, location.tensor_names(), args)
    assert _check_values(location, values, 1e-5) > 25


def test_weights_the_exporter_shares_are_not_inputs_entering_a_scope(exported, exporter):
    """``fc2`` reads the model's ``* 4.0`` and a zero bias the file holds once for all four."""
    model, args, path = exported("SharedWeights", exporter)
    location = locate(model, args, None, path)
    scopes = read_scopes(onnx.load(path))
    tensors = _tensors(location)
    for name in ["fc2", "norm2"]:
        entering = location.find(name).inputs[0]
        assert entering.tensor is not None, (name, entering.reason)
        assert entering.tensor not in scopes.constants and entering.tensor not in tensors.values()
    assert _check_values(location, _run(path, location.tensor_names(), args), 1e-5) == 10
    if exporter == "torchscript":  # Identity(fc1.bias) -> fc2.bias, ...: constants as well
        copies = {o for n in scopes.nodes if n.op_type == "Identity" for o in n.outputs}
        assert {"fc2.bias", "norm2.weight", "norm2.bias"} <= copies <= scopes.constants
        assert np.array_equal(scopes.constant_value("fc2.bias"), np.zeros(8, np.float32))


def test_a_value_read_through_a_copy_the_export_dropped_is_located(exported, exporter):
    model, args, path = exported("OneTensorConcat", exporter)
    location = locate(model, args, None, path)
    pool = location.find("pool").outputs[0]
    assert pool.tensor is not None, pool.reason
    assert _check_values(location, _run(path, location.tensor_names(), args), 1e-5) >= 4


def test_a_call_folded_away_does_not_shift_the_others(exported, exporter, tmp_path):
    model, args, path = exported("FoldedCall", exporter)
    location = locate(model, args, None, path)
    second = location.find("lin#1")
    assert second is not None and second.outputs[0].tensor is not None
    first = location.find("lin")
    if first.outputs[0].tensor is None:
        assert first.outputs[0].reason.startswith("constant-folded by the exporter")
    _check_values(location, _run(path, location.tensor_names(), args), 1e-5)


def test_each_folded_call_names_the_constant_holding_its_value(exported, exporter):
    model, args, path = exported("TwoTables", exporter)
    location = locate(model, args, None, path)
    file = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    with torch.no_grad():
        eager = {"pos": model.pos(model.pos_ids), "kind": model.kind(model.kind_ids)}
    for name, value in eager.items():
        out = location.find(name).outputs[0]
        if out.tensor is not None:  # TorchScript keeps the lookups
            continue
        folded = out.reason.removeprefix("constant-folded by the exporter (the file has it as ")
        assert folded != out.reason, out.reason
        np.testing.assert_array_equal(file[folded.strip("')")], value.numpy())


def test_a_folded_call_is_named_in_a_float16_copy_too(exported, exporter, tmp_path):
    """The converted constant holds the value rounded to float16: found by its values."""
    model, args, path = exported("TwoTables", exporter)
    half = _float16(path, tmp_path / "half.onnx")
    plain, converted = locate(model, args, None, path), locate(model, args, None, half)
    file = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(half).graph.initializer}
    checked = 0
    for name in ["pos", "kind"]:
        if plain.find(name).outputs[0].tensor is not None:  # TorchScript keeps the lookups
            continue
        reason = converted.find(name).outputs[0].reason
        prefix = "constant-folded by the exporter (the file has it as "
        assert reason.startswith(prefix) and reason.endswith(", converted to float16)"), reason
        constant = reason.removeprefix(prefix).split("'")[1]
        assert file[constant].dtype == np.float16
        with torch.no_grad():
            eager = getattr(model, name)(getattr(model, f"{name}_ids")).numpy()
        np.testing.assert_allclose(file[constant], eager, rtol=1e-3)
        checked += 1
    assert checked or exporter == "torchscript"


def test_a_folded_call_of_other_weights_is_not_said_to_be_unused(exported):
    """The file's constant holds the old table: neither named as the value nor called dead."""
    model, args, path = exported("TwoTables", "dynamo")
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.pos.weight += 0.5
    out = locate(changed, args, None, path).find("pos").outputs[0]
    assert out.tensor is None and not out.unused
    assert "hold other values" in out.reason and "another checkpoint" in out.reason, out.reason


def test_a_layer_applied_back_to_back_is_located_through_the_values_it_shares(exported, exporter):
    """Each call returns its last child's output and receives the previous call's."""
    model, args, path = exported("SharedLayerLoop", exporter)
    location = locate(model, args, None, path)
    calls = ["layer", "layer#1", "layer#2"]
    tensors = _tensors(location)
    for index, name in enumerate(calls):
        norm = "layer.norm" if not index else f"layer.norm#{index}"
        assert tensors[name] is not None and tensors[name] == tensors[norm]
        inputs = location.find(name).inputs
        assert all(i.tensor is not None for i in inputs), (name, [i.reason for i in inputs])
    assert location.find("layer#1").inputs[0].tensor == tensors["layer"]
    assert location.find("layer").inputs[1].tensor == onnx.load(path).graph.input[1].name
    values = _run(path, location.tensor_names(), args)
    assert _check_values(location, values, 1e-5) >= 2 * len(location.calls)


def test_an_output_that_is_the_calls_input_is_paired_with_the_input_tensor(exported, exporter):
    """``return self.lin(x), x``: ``[1]`` is not the Gemm output leaving the scope."""
    model, args, path = exported("PassThroughLoop", exporter)
    location = locate(model, args, None, path)
    tensors = _tensors(location)
    graph_input = onnx.load(path).graph.input[0].name
    assert tensors["layer[1]"] == graph_input
    assert tensors["layer[0]"] == tensors["layer.lin"] != graph_input
    second = location.find("layer#1")
    assert tensors["layer#1[1]"] == second.inputs[0].tensor is not None
    assert tensors["layer#1[1]"] not in (tensors["layer#1[0]"], tensors["layer[0]"])
    values = _run(path, location.tensor_names(), args)
    assert _check_values(location, values, 1e-5) >= 2 * len(location.calls)


def test_a_module_reached_under_several_paths_is_one_module(exported, exporter):
    """``blocks[2]`` is ``blocks[0]``: its nodes are calls of ``blocks.0``, not another model's."""
    model, args, path = exported("AliasedList", exporter)
    location = locate(model, args, None, path)
    assert not location.foreign_scopes
    tensors = _tensors(location)
    calls = ["blocks.0", "blocks.1", "blocks.0#1", "blocks.0#2"]
    assert all(tensors[c] is not None for c in calls), _reasons(location)
    assert len({tensors[c] for c in calls}) == 4
    values = _run(path, location.tensor_names(), args)
    assert _check_values(location, values, 1e-5) >= 2 * len(calls)


def test_modules_in_a_bare_module_namespace_get_rows_and_the_blame(exported, exporter):
    """``enc = nn.Module(); enc.layer = ...``: ``enc`` is no leaf hiding its submodules."""
    model, args, path = exported("Namespaced", exporter)
    rows = ["enc.layer.0", "enc.layer.1", "enc.layer.2", "enc.layer", "mid", ""]
    marked = fxalign.align(model, args, exporter=exporter, attach=False)
    assert [r.name for r in marked.rows] == rows and marked.passed
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.enc.layer[2].weight[0, 0] += 0.5  # the file keeps the old weight
    report = fxalign.align(changed, args, onnx=path, drill_down=False)
    assert [r.name for r in report.rows] == rows
    assert report.first_divergence == "enc.layer.2" and report.culprit_basis == "introduced"


def test_a_tensor_written_in_place_by_a_child_is_answered_in_place(exported, exporter):
    """``self.act(h)`` (in-place ReLU), then ``self.c(h)``: the replay writes the file's value
    into ``h`` too, so the block's own code is faithful and ``c`` is the culprit."""
    model, args, path = exported("HeldInPlace", exporter)
    report = fxalign.align(model, args, onnx=path, local="all", drill_down=False)
    assert report.row("blk").local is not None and report.row("blk").local.max_abs < 1e-5
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.blk.c.weight[0, 0] += 0.5
    before = [p.detach().clone() for p in changed.parameters()]
    report = fxalign.align(changed, args, onnx=path, drill_down=False)
    assert report.first_divergence == "blk.c" and report.culprit_basis == "introduced"
    assert all(torch.equal(a, b) for a, b in zip(before, changed.parameters(), strict=True))


def test_the_replay_writes_only_what_the_model_itself_writes(exported, exporter):
    """A global tensor handed to a module is answered, never written; ``h``, which the
    in-place ReLU writes, is: every local error stays at round-off."""
    model, args, path = exported("UsesGlobal", exporter)
    table, version = am.TABLE.clone(), am.TABLE._version
    given = [a.clone() for a in args]
    report = fxalign.align(model, args, onnx=path, local="all", drill_down=False)
    assert am.TABLE._version == version and torch.equal(am.TABLE, table)
    assert all(torch.equal(a, b) for a, b in zip(args, given, strict=True))
    assert report.passed
    computed = [r.local.max_abs for r in report.rows if r.local is not None]
    assert computed and max(computed) < 1e-5


def test_a_module_whose_output_the_model_drops_is_said_to_be_unused(exported, exporter):
    """The exporter removes ``inner.extra`` as dead code: no note that the file is another's."""
    model, args, path = exported("DropsField", exporter)
    location = locate(model, args, None, path)
    assert location.nodeless == location.unused == ("inner.extra",)
    report = fxalign.align(model, args, onnx=path)
    assert report and not [n for n in report.notes if "not be this model" in n]
    (note,) = [n for n in report.notes if "outputs no module receives" in n]
    assert "('inner.extra')" in note and "result is unused" in note
    assert "if the model's own code reads them" in note  # which the hooks cannot see


def test_code_whose_result_the_model_drops_is_unused_and_blames_no_neighbour(exported, exporter):
    """``two.keep`` is located although ``aux`` (no node) reads it: ``aux`` is dead, not fused."""
    model, args, path = exported("DeadChains", exporter)
    location = locate(model, args, None, path)
    dead = ["two.extra", "head", "aux", "leaf"]
    assert location.unused == tuple(dead)
    tensors = _tensors(location)
    assert tensors["two.keep"] is not None and tensors['two["keep"]'] == tensors["two.keep"]
    for name in [*dead, 'two["extra"]', "head.0", "aux.0", "two.extra.0"]:
        (value,) = [v for c in location.calls for v in c.outputs if c.name + v.leaf == name]
        assert value.unused and value.tensor is None, (name, value.reason)
    assert not location.find("two.keep").outputs[0].unused
    report = fxalign.align(model, args, onnx=path)
    assert not [n for n in report.notes if "not be this model" in n]
    (note,) = [n for n in report.notes if "outputs no module receives" in n]
    assert "('two.extra', 'head', 'aux', 'leaf')" in note


def test_torchscript_scope_names_that_clash_are_not_matched(exported, tmp_path):
    model, args, path = exported("Collide", "torchscript")
    location = locate(model, args, None, path)
    reasons = _reasons(location)
    for name in ["a", "a#1"]:
        assert "clash" in str(reasons[name]), (name, reasons[name])
    # a_1's scope names clash too, but what it returns is the model's output: that value is
    # the file's graph output whatever the scope names say
    graph_output = onnx.load(path).graph.output[0].name
    assert location.find("a_1").outputs[0].tensor == graph_output


def test_structured_outputs_pair_by_their_consumers(exported, exporter, tmp_path):
    model, args, path = exported("PairOutputs", exporter)
    location = locate(model, args, None, path)
    tensors, reasons = _tensors(location), _reasons(location)
    # three leaves of one shape: told apart by who reads them (post, a graph output, the sum)
    for leaf in ["split[0]", 'split[1]["neg"]', 'split[1]["sq"]']:
        assert tensors[leaf] is not None, (leaf, reasons[leaf])
    assert len({tensors["split[0]"], tensors['split[1]["neg"]'], tensors['split[1]["sq"]']}) == 3
    assert tensors['split[1]["neg"]'] == tensors["[1]"]
    # two leaves that only the caller's own code reads: not guessed
    assert tensors["pm[0]"] is None and "cannot be told" in str(reasons["pm[1]"])
    assert location.find("describe").reason == "returns no tensor (str)"
    _check_values(location, _run(path, location.tensor_names(), args), 1e-5)


def test_conv_bn_fusion_is_reported_as_fused(exported, exporter, tmp_path):
    model, args, path = exported("TwoHeads", exporter)
    location = locate(model, args, None, path)
    assert _reasons(location)["conv"] == "fused into bn"
    bn = location.find("bn").outputs[0]
    assert bn.tensor is not None and bn.op_type == "Conv"
    # the one Conv node: dynamo's optimizer gives it bn's scope, TorchScript's fusion conv's
    assert location.nodes[bn.node].call == ("bn" if exporter == "dynamo" else "conv")
    if exporter == "dynamo":
        assert bn.source is not None and bn.source.split(":")[-1].isdigit()
        assert "attach_models.py" in bn.source
        assert location.nodes[bn.node].source == bn.source
    values = _run(path, location.tensor_names(), args)
    conv_out = location.find("conv").outputs[0].eager.numpy()
    assert not np.allclose(values[bn.tensor], conv_out, atol=1e-3)  # bn's value, not conv's
    assert _check_values(location, values, 1e-5) >= 8


def test_hugging_face_bert(exported, exporter, tmp_path):
    model, args, path = exported("bert", exporter)
    location = locate(model, args, None, path)
    assert location.called_modules == 45
    assert location.located_modules >= 37
    query = location.find("bert.encoder.layer.1.attention.self.query")
    assert query.outputs[0].tensor is not None and query.replayable
    root = location.calls[0]
    assert [v.leaf for v in root.outputs] == ["[0]", "[1]"]
    bert = location.find("bert")
    assert [v.leaf for v in bert.outputs] == ['["last_hidden_state"]', '["pooler_output"]']
    assert bert.outputs[0].tensor == root.outputs[0].tensor
    dropout = location.find("bert.encoder.layer.0.output.dropout").outputs[0]
    assert dropout.reason == "removed by the exporter (Dropout: returns its input)"
    values = _run(path, location.tensor_names(), args)
    assert _check_values(location, values, 1e-5) > 60


# ---- files without scopes -------------------------------------------------------------------
def test_a_file_from_another_tool_is_a_user_error(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 2])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"], "r")], "g", [x], [y]
    )
    model = onnx.helper.make_model(graph, producer_name="handmade")
    with pytest.raises(UserError, match="has no module scopes") as info:
        read_scopes(model)
    assert "dynamo=False" in str(info.value)


def test_export_modules_as_functions_is_a_user_error(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    path = _export(
        model,
        (torch.randn(2, 4),),
        tmp_path / "f.onnx",
        "torchscript",
        export_modules_as_functions=True,
    )
    with pytest.raises(UserError, match="local functions") as info:
        locate(model, (torch.randn(2, 4),), None, path)
    assert "export_modules_as_functions=False" in str(info.value)


def test_dynamo_file_without_metadata_is_a_user_error(exported, tmp_path):
    model, args, path = exported("RepeatedBlocks", "dynamo")
    stripped = onnx.load(path)
    for node in stripped.graph.node:
        del node.metadata_props[:]
    onnx.save(stripped, tmp_path / "stripped.onnx")
    with pytest.raises(UserError, match="node metadata was removed"):
        locate(model, args, None, tmp_path / "stripped.onnx")


def test_torchscript_without_node_names_still_has_value_names(tmp_path):
    from torch.onnx._internal.torchscript_exporter import utils

    model, args = am.RepeatedBlocks().eval(), am.RepeatedBlocks.inputs()
    path = tmp_path / "unnamed.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        utils._export(model, args, str(path), add_node_names=False)
    assert not any(n.name for n in onnx.load(path).graph.node)
    location = locate(model, args, None, path)
    assert _tensors(location)["blocks.0.lin"] == "/blocks.0/lin/Gemm_output_0"
    _check_values(location, _run(str(path), location.tensor_names(), args), 1e-5)
    # unnamed nodes are in no scope: which blocks left no node cannot be told, nor claimed
    assert location.nodeless == () and not location.foreign_scopes


# ---- post-processed files -------------------------------------------------------------------
def _onnxscript(path: str, out: Path) -> str:
    import onnxscript.optimizer

    onnx.save(onnxscript.optimizer.optimize(onnx.load(path)), out)  # weights inline
    return str(out)


def _onnxsim(path: str, out: Path) -> str:
    onnxsim = pytest.importorskip("onnxsim")
    simplified, ok = onnxsim.simplify(onnx.load(path))
    assert ok
    onnx.save(simplified, out)
    return str(out)


def _ort_basic(path: str, out: Path) -> str:
    inline = out.with_name("inline.onnx")  # ORT writes external data beside its input
    onnx.save(onnx.load(path), inline)
    path = str(inline)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return str(out)


def _float16(path: str, out: Path) -> str:
    float16 = pytest.importorskip("onnxconverter_common.float16")
    onnx.save(float16.convert_float_to_float16(onnx.load(path), keep_io_types=True), out)
    return str(out)


_TOOLS = {"onnxscript": _onnxscript, "onnxsim": _onnxsim, "ort": _ort_basic, "float16": _float16}


@pytest.mark.parametrize("tool", list(_TOOLS))
def test_post_processed_files(exported, exporter, tool, tmp_path):
    model, args, path = exported("TwoHeads", exporter)
    processed = _TOOLS[tool](path, tmp_path / f"{tool}.onnx")
    before = hashlib.sha256(Path(processed).read_bytes()).hexdigest()
    if tool == "onnxsim" and exporter == "dynamo":  # onnxsim drops node metadata
        with pytest.raises(UserError, match="node metadata was removed"):
            locate(model, args, None, processed)
        return
    location = locate(model, args, None, processed)
    assert location.located_modules == 7, _reasons(location)
    assert _reasons(location)["conv"] == "fused into bn"
    values = _run(processed, location.tensor_names(), args)
    assert _check_values(location, values, 3e-3 if tool == "float16" else 1e-5) >= 8
    if tool == "float16":
        assert location.find("act").outputs[0].onnx_dtype == "FLOAT16"
        assert location.calls[0].outputs[0].onnx_dtype is None  # float32 outputs kept
    assert hashlib.sha256(Path(processed).read_bytes()).hexdigest() == before


def test_ort_offline_optimisation_of_a_dynamo_export_drops_its_scopes(exported, tmp_path):
    model, args, path = exported("bert", "dynamo")
    processed = _ort_basic(path, tmp_path / "ort.onnx")
    with pytest.raises(UserError, match="node metadata was removed"):
        locate(model, args, None, processed)


def test_post_processed_bert_torchscript(exported, tmp_path):
    model, args, path = exported("bert", "torchscript")
    for tool in ("onnxscript", "ort", "onnxsim"):
        processed = _TOOLS[tool](path, tmp_path / f"{tool}.onnx")
        location = locate(model, args, None, processed)
        assert location.located_modules >= 25, tool
        values = _run(processed, location.tensor_names(), args)
        _check_values(location, values, 1e-5)


# ---- the entry point and the promoted copy --------------------------------------------------
def test_location_is_plain_frozen_data(exported):
    model, args, path = exported("TwoHeads", "torchscript")
    location = locate(model, args, None, path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        location.exporter = "dynamo"  # type: ignore[misc]
    assert location == locate(model, args, None, path)
    assert location.find("nope") is None
    names = location.tensor_names()
    assert len(names) == len(set(names)) and "/conv/Conv_output_0" in names
    bn = location.find("bn")
    assert bn.replayable is False and bn.inputs[0].reason  # its input was fused away
    assert location.find("cls").replayable


def test_promote_shares_external_data_and_never_writes_the_file(tmp_path):
    model, args = ReusedModule().eval(), ReusedModule.inputs()
    folder = tmp_path / "model"
    folder.mkdir()
    path = _export(model, args, folder / "m.onnx", "torchscript")
    onnx.save(
        onnx.load(path), path, save_as_external_data=True, location="m.data", size_threshold=0
    )
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    location = locate(model, args, None, path)
    names = location.tensor_names()
    copy = promote(path, names, folder / "m.promoted.onnx")
    assert {p.name for p in folder.iterdir()} == {*files, "m.promoted.onnx"}
    assert {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in files} == files
    assert os.stat(folder / "m.data").st_nlink == 1
    weights = onnx.load(copy, load_external_data=False).graph.initializer
    assert weights and all(w.data_location == onnx.TensorProto.EXTERNAL for w in weights)
    feeds = {"onnx::Gemm_0": args[0].numpy()}
    options = ort.SessionOptions()
    options.add_session_config_entry(EXTERNAL_DATA_FOLDER, str(folder))
    in_memory = promoted(path, names).SerializeToString()
    for source, opts in ((copy, None), (in_memory, options)):
        session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        outputs = [o.name for o in session.get_outputs()]
        assert outputs[0] == onnx.load(path, load_external_data=False).graph.output[0].name
        assert set(names) <= set(outputs)
        values = dict(zip(outputs, session.run(None, feeds), strict=True))
        assert _check_values(location, values, 1e-5) >= 6
    with pytest.raises(UserError, match="must be written beside it"):
        promote(path, names, tmp_path / "work" / "m.promoted.onnx")
    with pytest.raises(UserError, match="not in"):
        promote(path, ["no_such_tensor"], folder / "x.onnx")
    for target in (path, folder / "m.data"):
        with pytest.raises(UserError, match="overwrite the model"):
            promote(path, names, target)


def test_unreadable_file_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    model = nn.Linear(2, 2)
    with pytest.raises(UserError, match="cannot read the ONNX file"):
        locate(model, (torch.randn(1, 2),), None, bad)


def test_module_parameters_lists_each_subtree_as_named_parameters_does():
    from fxalign.attach import module_parameters

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 4)
            self.head = nn.Linear(4, 5, bias=False)
            self.head.weight = self.embed.weight  # one parameter under two names
            self.shared = nn.Sequential(nn.BatchNorm1d(4))
            self.again = self.shared  # one module under two paths

    model = Tied()
    found = module_parameters(model)
    expected = {}
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        names = [prefix + n for n, _ in module.named_parameters()]
        expected[path] = frozenset(names + [prefix + n for n, _ in module.named_buffers()])
    assert dict(found) == expected
    assert found["head"] == {"head.weight"} and "again" not in found
    assert "head.weight" not in found[""]  # the model lists the tied weight once, as embed's


class _Doubled(nn.Module):
    def forward(self, x):
        return torch.relu(x) * 2


class _WithScripted(nn.Module):
    def __init__(self, scripted: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)
        self.j = torch.jit.script(_Doubled()) if scripted else _Doubled()

    def forward(self, x):
        return self.b(self.j(self.a(x)))


def test_a_scripted_submodule_is_run_as_it_is_and_said_so(tmp_path):
    torch.manual_seed(0)
    plain, scripted = _WithScripted(False).eval(), _WithScripted(True).eval()
    scripted.load_state_dict(plain.state_dict())
    x = torch.randn(3, 2)
    path = _export(plain, (x,), tmp_path / "plain.onnx", "torchscript")
    report = fxalign.align(scripted, (x,), onnx=path)
    assert report.passed and [r.name for r in report.rows] == ["a", "b", ""]
    assert "scripted (torch.jit)" in report.coverage.unmarked["j"]
    with pytest.raises(UserError, match=r"torch\.jit\.script module"):
        capture_calls(torch.jit.script(_Doubled()), (x,))


class _InlineBetween(nn.Module):
    """``blk`` scales between its two Linears (on a 3-D input: a ``MatMul`` and an ``Add``)."""

    class Blk(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            return self.fc2(self.fc1(x) * 0.5)

    def __init__(self) -> None:
        super().__init__()
        self.blk, self.head = self.Blk(), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.blk(x)))


def _scale_constant(path: str, old: float, new: float, out: Path) -> str:
    """The file with its one scalar constant ``old`` set to ``new`` (a wrong translation)."""
    model = onnx.load(path)
    tensors = [*model.graph.initializer]
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute]
    hits = [t for t in tensors if t.dims in ([], [1]) and np.isclose(_scalar(t), old)]
    assert len(hits) == 1, len(hits)
    value = onnx.numpy_helper.to_array(hits[0])
    hits[0].CopyFrom(onnx.numpy_helper.from_array(np.full_like(value, new), hits[0].name))
    onnx.save(model, out)
    return str(out)


def _scale_weight(path: str, weight: np.ndarray, factor: float, out: Path) -> str:
    """The file with the one initializer equal to ``weight`` times ``factor``."""
    model = onnx.load(path)
    (init,) = [
        t
        for t in model.graph.initializer
        if tuple(t.dims) == weight.shape and np.array_equal(onnx.numpy_helper.to_array(t), weight)
    ]
    init.CopyFrom(onnx.numpy_helper.from_array(weight * factor, init.name))
    onnx.save(model, out)
    return str(out)


def _scalar(tensor: onnx.TensorProto) -> float:
    value = onnx.numpy_helper.to_array(tensor)
    return float(value.reshape(-1)[0]) if value.dtype.kind == "f" else np.nan


def test_ort_fused_linears_keep_their_scopes(tmp_path):
    """``MatMulAddFusion`` names a ``Gemm`` ``/blk/fc2/MatMul/MatMulAddFusion`` and adds
    unnamed ``Reshape`` nodes around it: the ``Gemm`` is ``blk.fc2``'s, so are the reshapes."""
    torch.manual_seed(0)
    model, x = _InlineBetween().eval(), (torch.randn(1, 8, 16),)
    path = _ort_basic(_export(model, x, tmp_path / "m.onnx", "torchscript"), tmp_path / "o.onnx")
    graph = onnx.load(path).graph
    assert "/blk/fc2/MatMul/MatMulAddFusion" in [n.name for n in graph.node]
    scopes = read_scopes(onnx.load(path))
    by_name = {n.name: n.ts_scope for n in scopes.nodes}
    assert by_name["/blk/fc2/MatMul/MatMulAddFusion"] == "/blk/fc2"
    reshapes = [n for n in graph.node if n.op_type == "Reshape" and not n.name.startswith("/")]
    assert reshapes and all(by_name[n.name] is not None for n in reshapes)
    report = fxalign.align(model, x, onnx=path)
    assert report, [(r.display_name, r.status, r.notes) for r in report.rows if r.failed]
    assert not [n for n in report.notes if "differ" in n]  # no op name read as a module
    assert all(r.status == "ok" for r in report.rows), [
        (r.display_name, r.notes) for r in report.rows
    ]


def test_inline_fault_before_a_submodule_whose_input_the_file_lost(tmp_path):
    """ONNX Runtime flattens ``fc2``'s input into its ``Gemm``; the block's wrong scale is the
    block's, even where ``fc2``'s input cannot be compared on its own."""
    torch.manual_seed(0)
    model, x = _InlineBetween().eval(), (torch.randn(1, 8, 16),)
    path = _export(model, x, tmp_path / "m.onnx", "torchscript")
    faulty = _scale_constant(path, 0.5, 0.6, tmp_path / "faulty.onnx")
    for file in (faulty, _ort_basic(faulty, tmp_path / "o.onnx")):
        report = fxalign.align(model, x, onnx=file, drill_down=False)
        rows = {r.display_name: r for r in report.rows}
        assert report.first_divergence == "blk" and report.culprit_basis == "introduced"
        assert rows["blk.fc2"].failed and rows["head"].local.max_abs < 1e-5


class _FlatProjection(nn.Module):
    """GPT-2's ``Conv1D``: ``addmm`` on its input viewed as a matrix."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features, features) * 0.3)
        self.bias = nn.Parameter(torch.randn(features) * 0.1)

    def forward(self, x):
        flat = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return flat.view(x.shape)


class _HeadsBetween(nn.Module):
    """Split into heads, scale, merge (``blk``'s own code) between two projections."""

    class Blk(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn, self.c_proj = _FlatProjection(16), _FlatProjection(16)

        def forward(self, x):
            heads = self.c_attn(x).view(1, 8, 2, 8).transpose(1, 2) * 0.5
            return self.c_proj(heads.transpose(1, 2).reshape(1, 8, 16))

    def __init__(self) -> None:
        super().__init__()
        self.blk, self.head = self.Blk(), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.blk(x)))


def test_a_blocks_code_feeding_a_submodule_whose_input_is_gone_is_blamed(tmp_path):
    """ONNX Runtime merges the block's last ``Reshape`` with ``c_proj``'s own: ``c_proj``'s
    input is no tensor of the file, so ``c_proj``'s output, compared, holds the error of the
    block's code computing it, and that error is the block's."""
    torch.manual_seed(0)
    model, x = _HeadsBetween().eval(), (torch.randn(1, 8, 16),)
    path = _export(model, x, tmp_path / "m.onnx", "torchscript")
    faulty = _ort_basic(_scale_constant(path, 0.5, 0.6, tmp_path / "f.onnx"), tmp_path / "o.onnx")
    report = fxalign.align(model, x, onnx=faulty, drill_down=False)
    rows = {r.display_name: r for r in report.rows}
    assert rows["blk.c_proj"].failed and rows["blk.c_proj"].local is None  # its input is gone
    assert report.first_divergence == "blk" and report.culprit_basis == "introduced"
    assert "includes the error of blk.c_proj" in rows["blk"].local_note
    assert rows["head"].local.max_abs < 1e-5


class _ScaledBetween(nn.Module):
    """``blk``'s own ``* 0.25`` between two projections, a ``Linear`` after it."""

    class Blk(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.proj = _FlatProjection(16), _FlatProjection(16)

        def forward(self, x):
            return self.proj(self.fc(x) * 0.25)

    def __init__(self) -> None:
        super().__init__()
        self.blk, self.head = self.Blk(), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.blk(x))


def test_a_block_whose_output_the_file_lost_is_blamed_by_its_codes_values(tmp_path):
    """ONNX Runtime merges ``proj``'s last reshape with ``head``'s: neither ``proj``'s nor
    ``blk``'s output is a tensor of the file, but what ``blk``'s code hands ``proj`` is."""
    torch.manual_seed(0)
    model, x = _ScaledBetween().eval(), (torch.randn(1, 8, 16),)
    path = _export(model, x, tmp_path / "m.onnx", "torchscript")
    faulty = _ort_basic(_scale_constant(path, 0.25, 0.3, tmp_path / "f.onnx"), tmp_path / "o.onnx")
    report = fxalign.align(model, x, onnx=faulty, drill_down=False)
    rows = {r.display_name: r for r in report.rows}
    assert rows["blk"].status == "missing_in_onnx" and rows["blk"].introduced_failed
    assert report.first_divergence == "blk" and report.culprit_basis == "introduced"
    assert report.first_seen == "head"
    text = " ".join(fxalign.render_text(report).split())
    assert "first divergence: introduced in blk (Blk), its output has no ONNX value" in text
    assert "no ONNX value" in fxalign.render_html(report)  # the banner's facts, not a shape
    clean = fxalign.align(model, x, onnx=_ort_basic(path, tmp_path / "c.onnx"))
    assert clean and clean.first_divergence is None


class _ThreeLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act = nn.Linear(16, 16), nn.ReLU()
        self.fc2, self.head = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.fc2(self.act(self.fc1(x))))


def test_a_module_whose_output_the_file_reshaped_away_is_not_blamed_on_its_reader(tmp_path):
    """ONNX Runtime merges ``fc2``'s output reshape with ``head``'s input one: ``fc2``'s output
    is no tensor of the file, but ``fc2`` was not fused into ``head``, so ``head``'s check
    (``fc2`` and ``head`` together) is not ``head``'s own error."""
    torch.manual_seed(0)
    model, x = _ThreeLinears().eval(), (torch.randn(1, 8, 16),)
    path = _export(model, x, tmp_path / "m.onnx", "torchscript")
    weight = model.fc2.weight.detach().numpy().T  # a 3-D Linear's MatMul: the weight transposed
    faulty = _ort_basic(_scale_weight(path, weight, 1.5, tmp_path / "f.onnx"), tmp_path / "o.onnx")
    report = fxalign.align(model, x, onnx=faulty)
    rows = {r.display_name: r for r in report.rows}
    assert rows["fc2"].status == "missing_in_onnx" and rows["head"].local is None
    assert report.first_divergence == "" and report.culprit_basis == "introduced"
    assert "includes the error of fc2" in rows["output"].local_note


class _DropoutOnInlineCode(nn.Module):
    """A classifier head as torchvision writes it: ``Dropout`` then ``Linear``, fed by code."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(8, 10))

    def forward(self, x):
        return self.classifier(self.fc(x) * 2.0)


def test_a_leaf_reading_a_file_value_through_a_removed_dropout_keeps_its_local_error(tmp_path):
    """The exporter removes the Dropout; what the Linear reads is the file's value, handed on
    unchanged (by tensor identity), so its check is its own local error."""
    torch.manual_seed(0)
    model, x = _DropoutOnInlineCode().eval(), (torch.randn(1, 8),)
    path = _export(model, x, tmp_path / "m.onnx", "torchscript")
    weight = model.classifier[1].weight.detach().numpy()
    faulty = _scale_weight(path, weight, 1.5, tmp_path / "f.onnx")
    report = fxalign.align(model, x, onnx=faulty, drill_down=False)
    linear = {r.display_name: r for r in report.rows}["classifier.1"]
    assert linear.local is not None and linear.local_scope == "module"
    assert report.first_divergence == "classifier.1" and report.culprit_basis == "introduced"
