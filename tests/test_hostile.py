"""Hostile models and inputs: no false verdict, no changed model, no raw crash (issue 13)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn

import fxalign
from fixtures.models import ScaledCache
from fixtures.oracle import plain_export_matches
from fxalign import compare_arrays


# ---- integers are compared exactly at any magnitude -----------------------------------------
@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_large_integers_that_differ_by_one_are_a_mismatch(dtype):
    ref = np.array([10**18, 2**62 + 3, 7], dtype=dtype)
    got = ref.copy()
    got[0] += 1
    m, _ = compare_arrays(ref, got, atol=1e-4, rtol=1e-3)
    assert m.mismatched == 1 and m.max_abs == 1.0
    same, _ = compare_arrays(ref, ref.copy(), atol=1e-4, rtol=1e-3)
    assert same.mismatched == 0 and same.max_abs == 0.0


def test_int64_extremes_do_not_overflow():
    ref = np.array([2**63 - 1], dtype=np.int64)
    got = np.array([-(2**63)], dtype=np.int64)
    m, _ = compare_arrays(ref, got, atol=0, rtol=0)
    assert m.mismatched == 1 and m.max_abs == float(2**64 - 1)


def test_signed_against_unsigned_is_exact():
    ref = np.array([2**63 + 1], dtype=np.uint64)
    got = np.array([2**62], dtype=np.int64)
    m, _ = compare_arrays(ref, got, atol=0, rtol=0)
    assert m.mismatched == 1
    assert compare_arrays(ref, ref.copy(), atol=0, rtol=0)[0].mismatched == 0


@torch.library.custom_op("fxalign_hostile::ids_identity", mutates_args=())
def _ids_identity(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_ids_identity.register_fake
def _ids_identity_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _ids_plus_one_onnx(x):
    from onnxscript import opset18 as op

    return op.Add(x, op.CastLike(op.Constant(value_int=1), x))  # the planted bug: ids + 1


def _register_ids_symbolic() -> None:
    from torch.onnx import register_custom_op_symbolic
    from torch.onnx.symbolic_helper import parse_args

    @parse_args("v")
    def symbolic(g, x):
        one = g.op("Constant", value_t=torch.tensor(1, dtype=torch.int64))
        return g.op("Add", x, one)

    register_custom_op_symbolic("fxalign_hostile::ids_identity", symbolic, 9)


_register_ids_symbolic()


class IdsThroughCustomOp(nn.Module):
    def forward(self, ids):
        return torch.ops.fxalign_hostile.ids_identity(ids) * 1


def test_int64_ids_near_1e18_off_by_one_are_diverged(exporter):
    export_kwargs = {}
    if exporter == "dynamo":
        table = {torch.ops.fxalign_hostile.ids_identity.default: _ids_plus_one_onnx}
        export_kwargs = {"custom_translation_table": table}
    ids = torch.tensor([[10**18, 10**18 + 256, 2**60]], dtype=torch.int64)
    report = fxalign.align(
        IdsThroughCustomOp().eval(), (ids,), exporter=exporter, export_kwargs=export_kwargs
    )
    assert not report
    assert report.divergence is not None
    assert report.divergence.metrics.max_abs == 1.0


# ---- the user's inputs are never written ----------------------------------------------------
class WritesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, *, bias):
        x.mul_(2)
        bias.add_(1)
        return self.lin(x) + bias


def test_a_forward_that_writes_its_inputs_leaves_the_users_tensors_alone(exporter):
    x, bias = torch.ones(2, 4), torch.zeros(4)
    before = (x.clone(), bias.clone())
    model = WritesItsInput().eval()
    sample = fxalign.Sample((x,), {"bias": bias})
    report = fxalign.align(model, (x,), {"bias": bias}, exporter=exporter, samples=[sample])
    assert report, report.divergence
    assert torch.equal(x, before[0]) and torch.equal(bias, before[1])


class _Uncopyable:
    def __deepcopy__(self, memo):
        raise TypeError("holds a lock")


def test_an_input_object_that_refuses_a_copy_is_shared_with_a_warning(caplog):
    thing = _Uncopyable()
    with caplog.at_level("WARNING", logger="fxalign.samples"):
        copied = fxalign.Sample((torch.ones(1), thing), {}).fresh()
    assert copied.args[1] is thing
    assert "cannot be copied (TypeError: holds a lock)" in caplog.text


class WritesOneOfTwoNames(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, a, b):
        b.mul_(2)  # reaches a too when the caller passes one tensor twice
        return self.lin(a) + b


@pytest.mark.parametrize("attach", [None, True, False])
@pytest.mark.parametrize("second", ["same", "view"])
def test_inputs_that_are_one_tensor_stay_one_tensor(attach, second):
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    before = x.clone()
    other = x if second == "same" else x[:, :4]  # a view of all of x: another object
    report = fxalign.align(
        WritesOneOfTwoNames().eval(), (x, other), exporter="torchscript", attach=attach
    )
    # eager: lin(2x) + 2x; the file has two inputs and computes lin(x) + 2x
    assert not report and report.divergence is not None
    assert torch.equal(x, before)


def test_a_copy_keeps_views_on_one_storage():
    x = torch.arange(6.0)
    sample = fxalign.Sample((x, x[2:].view(2, 2)), {"same": x}).fresh()
    a, b = sample.args
    assert (
        sample.kwargs["same"] is a
        and b.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
    )
    b.zero_()
    assert a.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0] and x.tolist() == list(range(6))


class Counter:
    """An input object a forward changes: not a container the pytree utilities know."""

    def __init__(self) -> None:
        self.calls = 0
        self.scale = torch.ones(4)


class WritesAnInputObject(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, counter):
        counter.calls += 1
        return self.lin(x) * counter.scale.add_(1)  # scale 2 on a fresh Counter


def test_a_forward_that_changes_an_input_object_gets_a_copy_each_run():
    counter = Counter()
    x = torch.ones(2, 4)
    report = fxalign.align(
        WritesAnInputObject().eval(), (x,), {"counter": counter}, exporter="torchscript"
    )
    assert counter.calls == 0 and torch.equal(counter.scale, torch.ones(4))
    # The trace bakes the object's tensor as a constant and replays add_ on it: 3, not 2.
    assert not report and report.divergence is not None
    assert report.divergence.module_path == ""  # the model's own code (the inline multiply)
    assert report.divergence.metrics.max_abs > 0.1


class WritesItsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.other = nn.Linear(4, 4)

    def forward(self, x):
        with torch.no_grad():
            self.lin.weight.mul_(2)
        return self.other(self.lin(x))


def test_a_forward_that_writes_its_parameters_is_said_so():
    report = fxalign.align(WritesItsWeight().eval(), (torch.ones(2, 4),), exporter="torchscript")
    (note,) = [n for n in report.notes if "writes parameters in place" in n]
    assert "(lin.weight)" in note
    clean = fxalign.align(nn.Linear(4, 4).eval(), (torch.ones(2, 4),), exporter="torchscript")
    assert not [n for n in clean.notes if "writes parameters" in n]


def test_a_model_with_uninitialised_lazy_modules_is_a_user_error_and_left_lazy():
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU()).eval()
    with pytest.raises(fxalign.UserError, match=r"lazy module\(s\) .* \('0'\)"):
        fxalign.align(model, (torch.randn(2, 4),))
    assert type(model[0]) is nn.LazyLinear and model[0].has_uninitialized_params()


class _Rotate(nn.Module):
    def forward(self, x):
        return torch.view_as_complex(x.reshape(2, 2, 2)) * (1 + 2j)


class ComplexInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.rot, self.out = nn.Linear(4, 4), _Rotate(), nn.Linear(4, 4)

    def forward(self, x):
        return self.out(torch.view_as_real(self.rot(self.lin(x))).reshape(2, 4))


def test_a_complex_module_value_is_left_unmarked_and_said_so():
    report = fxalign.align(ComplexInside().eval(), (torch.randn(2, 4),), attach=False)
    assert report, report.divergence
    rot = report.row("rot")
    assert rot.status == "missing_in_onnx"
    assert rot.notes == [
        "no marker in the export: a complex value: the exporters represent complex tensors as "
        "real ones with a last dimension of 2, which fxalign's marker op has no translation for"
    ]
    assert report.row("out").metrics is not None


@pytest.mark.parametrize("attach", [None, True, False])
def test_a_hook_on_the_model_itself_is_part_of_its_output(exporter, attach):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    model.register_forward_hook(lambda module, args, out: out * 3 + 1)
    report = fxalign.align(model, (torch.randn(2, 4),), exporter=exporter, attach=attach)
    assert report, report.divergence
    assert report.rows[-1].kind == "output" and report.rows[-1].metrics is not None


class DoublingCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)

    def __call__(self, x):  # what the exporters trace: model(x)
        return super().__call__(x) * 2


@pytest.mark.parametrize("attach", [None, True, False])
def test_a_model_overriding_call_is_compared_as_exported(exporter, attach):
    report = fxalign.align(
        DoublingCall().eval(), (torch.randn(2, 4),), exporter=exporter, attach=attach
    )
    assert report, report.divergence
    assert report.rows[-1].kind == "output" and report.rows[-1].metrics is not None


# ---- the user's model comes back exactly as it was ------------------------------------------
class Stateful(nn.Module):
    """Every kind of state a forward can change."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.register_buffer("n", torch.zeros(()))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("cache", torch.zeros(2, 4))
        self.calls = 0
        self.seen: list[int] = []

    def forward(self, x):
        self.n += 1  # in-place write to a buffer
        self.count = self.count + 1  # a new buffer object
        self.cache = self.cache + x  # a KV-cache-like buffer written in forward
        self.calls += 1  # a plain attribute
        self.seen.append(self.calls)  # a container attribute changed in place
        self.new_attribute = True
        return self.bn(self.lin(x + self.cache))


def _state(model: nn.Module):
    return {
        "buffers": {k: (v, v.clone()) for k, v in model.named_buffers()},
        "params": {k: (v, v.detach().clone()) for k, v in model.named_parameters()},
        "dict": {id(m): (m, dict(m.__dict__)) for m in model.modules()},
        "seen": list(model.seen),
        "training": [m.training for m in model.modules()],
    }


def _assert_same_state(model: nn.Module, before) -> None:
    for name, buffer in model.named_buffers():
        obj, value = before["buffers"][name]
        assert buffer is obj, f"buffer {name} replaced"
        assert torch.equal(buffer, value), f"buffer {name} changed: {buffer} vs {value}"
    assert set(dict(model.named_buffers())) == set(before["buffers"])
    for name, p in model.named_parameters():
        obj, value = before["params"][name]
        assert p is obj and torch.equal(p, value), name
    for module in model.modules():
        _, attributes = before["dict"][id(module)]
        assert module.__dict__.keys() == attributes.keys(), type(module).__name__
        for key, value in attributes.items():
            assert module.__dict__[key] is value, f"{type(module).__name__}.{key}"
    assert model.seen == before["seen"]
    assert [m.training for m in model.modules()] == before["training"]


@pytest.mark.parametrize("train", [False, True])
def test_model_state_comes_back_by_value_and_identity(exporter, train):
    torch.manual_seed(0)
    model = Stateful().train(train)
    before = _state(model)
    x = torch.randn(2, 4)
    report = fxalign.align(model, (x,), exporter=exporter, train=train)
    torch.manual_seed(0)
    _assert_same_state(model, before)
    if not train:  # every run starts from the same state: the plain export's verdict
        assert bool(report) == plain_export_matches(Stateful().eval(), (x,), exporter)


def test_every_run_starts_from_the_users_state(exporter):
    """A KV-cache model: the PyTorch run and the export trace must see the same cache."""
    model = ScaledCache().eval()
    x = torch.randn(2, 4)
    report = fxalign.align(model, (x,), exporter=exporter, samples=[torch.randn(2, 4)])
    # The TorchScript exporter writes the cache as the trace left it (times 3): its plain
    # export is off by 3x, and the report is that graph's, however the markers would fare.
    assert bool(report) == plain_export_matches(ScaledCache().eval(), (x,), exporter)
    assert report.instrumentation == "attach"
    assert torch.equal(model.cache, torch.ones(2, 4))


# ---- fxalign's own limits are not blamed on the user ----------------------------------------
def test_align_under_inference_mode(exporter):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    with torch.inference_mode():
        x = torch.randn(2, 4)
        report = fxalign.align(model, (x,), exporter=exporter)
    assert report and [r.display_name for r in report.rows] == ["0", "1", "output"]


@pytest.mark.parametrize("attach", [None, True, False])
def test_a_model_built_under_inference_mode(exporter, attach):
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
        x = torch.randn(2, 4)
        if exporter == "dynamo" and attach is False:
            # torch.export.export(model) itself fails on inference weights; the markers need it
            with pytest.raises(fxalign.ExportError, match=r"torch\.export cannot trace") as caught:
                fxalign.align(model, (x,), exporter=exporter, attach=attach)
            assert "outside torch.inference_mode" in caught.value.hint
            return
        report = fxalign.align(model, (x,), exporter=exporter, attach=attach)
    assert report, report.divergence
    assert torch.is_grad_enabled()  # the caller's grad mode is back


# ---- concurrent calls ------------------------------------------------------------------------
class DataDependentBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.ReLU()

    def forward(self, x):
        if x.sum() > -1e9:  # Python control flow on a value: FX cannot trace the whole model
            return self.b(self.a(x))
        return x


@pytest.mark.slow
def test_concurrent_aligns_are_correct_and_complete():
    import threading

    def build():
        torch.manual_seed(0)
        return nn.Sequential(*(DataDependentBlock() for _ in range(5))).eval()

    x = torch.randn(2, 8)
    expected = [r.display_name for r in fxalign.align(build(), (x,), exporter="torchscript").rows]
    results: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            results[i] = fxalign.align(build(), (x,), exporter="torchscript")
        except Exception as e:  # recorded, asserted below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(3):
        report = results[i]
        assert isinstance(report, fxalign.Report), report
        assert report and [r.display_name for r in report.rows] == expected


# ---- no raw crash: the CLI and the inputs ---------------------------------------------------
def _cli(*argv, cwd=None, env=None, timeout=600):
    import os
    import subprocess
    import sys

    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "fxalign.cli", *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=timeout,
        check=False,
    )


def test_a_model_file_calling_sys_exit_is_a_user_error(tmp_path):
    from fxalign.cli import main

    model_file = tmp_path / "exits.py"
    model_file.write_text("import sys\nsys.exit(5)\n")
    assert main(["align", f"{model_file}:build", "-i", "2x4"]) == 2


def test_corrupt_npz_and_impossible_inputs_are_input_errors(tmp_path):
    from fxalign.inputs import load_inputs, make_inputs

    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(fxalign.InputError, match="cannot read"):
        load_inputs(bad)
    with pytest.raises(fxalign.InputError, match="GiB"):
        make_inputs(["100000x100000x1000"])


def test_workdir_that_is_a_file_is_a_user_error(tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    model = nn.Linear(2, 2).eval()
    for workdir in (file, file / "below"):
        with pytest.raises(fxalign.UserError, match="workdir"):
            fxalign.align(model, (torch.randn(1, 2),), workdir=workdir)


@pytest.mark.slow  # a CLI process of its own each, waiting for it to start
@pytest.mark.parametrize(
    ("sig", "code", "word"), [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")]
)
def test_signals_leave_no_temporary_folder_and_no_traceback(tmp_path, sig, code, word):
    import os
    import signal
    import subprocess
    import sys
    import time

    model_file = tmp_path / "slow.py"
    model_file.write_text(
        "import pathlib, time, torch\n"
        "class Slow(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        f"        pathlib.Path({str(tmp_path / 'started')!r}).touch()\n"
        "        time.sleep(60)\n"
        "        return x + 1\n"
    )
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fxalign.cli", "align", f"{model_file}:Slow", "-i", "2x2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp)},
        # A shell's background job inherits SIGINT ignored, and Python then never raises
        # KeyboardInterrupt: give the child the default disposition a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "started").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert list(tmp.glob("fxalign-*")), "align runs in a temporary folder"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"fxalign: {word}" in err and "Traceback" not in err
    assert not list(tmp.glob("fxalign-*"))


# ---- options are checked before any work, and name what is wrong ---------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"atol": float("nan")}, "atol must be a finite number"),
        ({"rtol": float("inf")}, "rtol must be a finite number"),
        ({"atol": "1e-3"}, "atol must be a number"),
        ({"tolerances": {"*": 1e-3}}, r"tolerances\['\*'\] must be a dict"),
        ({"tolerances": {"*": {"atol": -1}}}, "must be a finite number >= 0"),
        ({"tolerances": {"*": {"abs": 1}}}, "unknown keys"),
        ({"tolerances": [("*", 1)]}, "tolerances must map a glob"),
        ({"runner": object()}, "runner"),
        ({"exporter": "onnx"}, "unknown exporter"),
        ({"granularity": "blocks"}, "unknown granularity"),
        ({"max_outputs_per_run": 0}, "max_outputs_per_run"),
        ({"onnx": __file__, "attach": False}, "attach=False asks for the marker mode"),
    ],
)
def test_bad_options_are_user_errors(options, message):
    model = nn.Linear(2, 2).eval()
    with pytest.raises(fxalign.UserError, match=message):
        fxalign.align(model, (torch.randn(1, 2),), **options)


# ---- modules fxalign must copy, wrap or run as they are -------------------------------------
class WeightNormed(nn.Module):
    """Every Hugging Face Wav2Vec2 has one: a parametrized conv (copy.copy refuses it)."""

    def __init__(self) -> None:
        super().__init__()
        from torch.nn.utils.parametrizations import weight_norm

        self.conv = weight_norm(nn.Conv1d(4, 4, 3, padding=1), name="weight", dim=2)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.conv(x))


def test_weight_norm_parametrizations(exporter):
    report = fxalign.align(WeightNormed().eval(), (torch.randn(1, 4, 8),), exporter=exporter)
    assert report and [r.display_name for r in report.rows] == ["conv", "act", "output"]


def test_scripted_modules_are_user_errors(exporter):
    scripted = torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval())
    with pytest.raises(fxalign.UserError, match=r"torch\.jit\.script"):
        fxalign.align(scripted, (torch.randn(2, 4),), exporter=exporter)

    class HoldsScripted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))

        def forward(self, x):
            return self.inner(x) * 2

    # neither exporter exports a scripted submodule; the error names it
    with pytest.raises(fxalign.ExportError, match="'inner'"):
        fxalign.align(HoldsScripted().eval(), (torch.randn(2, 4),), exporter=exporter)


def test_a_compiled_submodule_gets_its_rows():
    class HoldsCompiled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = torch.compile(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.inner(x))

    report = fxalign.align(HoldsCompiled().eval(), (torch.randn(2, 4),), exporter="dynamo")
    names = [r.display_name for r in report.rows]
    assert report and {"inner._orig_mod.0", "inner._orig_mod.1", "inner", "out"} <= set(names)
    assert "inner" not in report.coverage.unmarked


class Registered(nn.Module):
    registry: ClassVar[list[type]] = []

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Registered.registry.append(cls)


class RegisteredLeaf(Registered):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)


class RegisteredDataDependent(Registered):
    def __init__(self) -> None:
        super().__init__()
        self.leaf = RegisteredLeaf()

    def forward(self, x):
        if x.sum() > -1e9:  # FX cannot trace this: eager wrappers for every module
            return self.leaf(x)
        return x


@pytest.mark.parametrize("cls", [RegisteredLeaf, RegisteredDataDependent])
def test_init_subclass_registries_never_see_fxaligns_classes(cls):
    before = list(Registered.registry)
    report = fxalign.align(cls().eval(), (torch.randn(2, 4),), exporter="torchscript")
    assert report
    assert Registered.registry == before


def test_forward_hooks_fire_once_per_run_fxalign_makes(exporter):
    """Documented in the README: the PyTorch run, the export trace, and the probes."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    fired = []
    model[0].register_forward_hook(lambda *a: fired.append(1))
    report = fxalign.align(model, (torch.randn(2, 4),), exporter=exporter, local=False)
    assert report
    assert 2 <= len(fired) <= 5


@pytest.mark.parametrize("attach", [None, True, False])
def test_hooks_that_change_outputs_and_inputs_keep_a_faithful_export_aligned(exporter, attach):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    model[0].register_forward_hook(lambda module, args, out: out * 3)
    model[2].register_forward_pre_hook(lambda module, args: (args[0] - 1,))
    x = torch.randn(2, 4)
    report = fxalign.align(model, (x,), exporter=exporter, attach=attach, local="all")
    assert report, report.divergence
    compared = {r.module_path: r for r in report.rows if r.metrics is not None}
    assert compared.keys() >= {"0", "2"}
    # each module's replay on the file's inputs runs its hooks once, as the capture counted them
    assert all(compared[p].local is not None and compared[p].local.max_abs < 1e-5 for p in "02")


# ---- what the plain export accepts, the instrumented path accepts ---------------------------
class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, scale: float):
        return self.lin(x) * scale


def test_a_sample_with_another_python_float_shows_what_tracing_baked_in():
    x = torch.randn(2, 4)
    model = Scaled().eval()
    same = fxalign.align(model, (x, 2.0), samples=[(x.clone(), 2.0)], exporter="torchscript")
    assert same
    other = fxalign.align(model, (x, 2.0), samples=[(x.clone(), 3.0)], exporter="torchscript")
    assert not other  # the export baked scale=2.0 in; PyTorch ran with 3.0
    assert other.divergence.samples.worst_sample == 1


class Conditional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.branch = nn.Linear(4, 4)

    def forward(self, x):
        h = self.first(x)
        return torch.cond(h.sum() > 0, lambda t: self.branch(t), lambda t: -self.branch(t), (h,))


def test_torch_cond_runs_eagerly_with_markers():
    """torch.cond compiles its branches when run eagerly: markers there must not break it."""
    model = Conditional().eval()
    x = torch.randn(2, 4)
    instrumented = fxalign.instrument(model, (x,))
    values = fxalign.run_torch(instrumented, (x,))
    assert fxalign.MarkerName("first") in values
    assert torch.allclose(torch.from_numpy(values[fxalign.MarkerName("")]), model(x))


def test_torch_cond_under_the_dynamo_exporter_is_named_fxalign_s_limit():
    model, x = Conditional().eval(), torch.randn(2, 4)
    with pytest.raises(fxalign.ExportError, match="limit of fxalign, not of your model") as info:
        fxalign.align(model, (x,), exporter="dynamo", attach=False)
    assert "torchscript" in info.value.hint
    # the plain export has no markers in the branches: the default mode answers from it
    report = fxalign.align(model, (x,), exporter="dynamo")
    assert report.instrumentation == "attach"
    assert bool(report) == plain_export_matches(model, (x,), "dynamo")


def test_a_python_valued_keyword_with_the_dynamo_exporter():
    class Flip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, flip: bool = False):
            y = self.lin(x)
            return -y if flip else y

    report = fxalign.align(Flip().eval(), (torch.randn(2, 4),), {"flip": True}, exporter="dynamo")
    assert report and [r.display_name for r in report.rows] == ["lin", "output"]
