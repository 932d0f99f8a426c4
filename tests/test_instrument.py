import copy
import sys

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

from fixtures.models import (
    PATCH_STYLES,
    InstancePatched,
    LstmModel,
    NestedBlocks,
    PlainMid,
    ReusedModule,
    patch_forward,
)
from fxalign import InstrumentationError, instrument, instrument_model, run_torch
from fxalign.instrument.wrappers import MarkedModule, TracedModule, WrapperState, replay_module
from fxalign.names import CallId, MarkerName


def _outputs(values):
    """Output marker names as shown (module inputs are marked too, as ``path:in[...]``)."""
    return [str(n) for n in values if not n.is_input]


def _shown(values):
    return [str(n) for n in values]


def test_fx_marks_leaves_and_blocks_in_execution_order():
    model = NestedBlocks().eval()
    result = instrument_model(model, model.inputs())
    assert result.method == "fx"
    names = _outputs(run_torch(result.module, model.inputs()))
    assert names == [
        "stem",
        "stage.block1.conv",
        "stage.block1.act",
        "stage.block1",
        "stage.block2.conv",
        "stage.block2.act",
        "stage.block2",
        "stage",
        "head.0",
        "head.1",
        "head.2",
        "head",
        "",
    ]


def test_leaf_granularity_marks_only_leaves():
    model = NestedBlocks().eval()
    names = _outputs(run_torch(instrument(model, granularity="leaf"), model.inputs()))
    assert names == [
        "stem",
        "stage.block1.conv",
        "stage.block1.act",
        "stage.block2.conv",
        "stage.block2.act",
        "head.0",
        "head.1",
        "head.2",
        "",
    ]


def test_reused_module_gets_call_indices():
    model = ReusedModule()
    names = _outputs(run_torch(instrument(model), model.inputs()))
    assert names == ["shared", "act", "shared#1", "act#1", "shared#2", "act#2", ""]


def test_structured_leaf_outputs_are_marked_per_tensor():
    model = LstmModel()
    names = _outputs(run_torch(instrument(model), model.inputs()))
    assert names[:3] == ["lstm[0]", "lstm[1][0]", "lstm[1][1]"]


def test_instrumented_module_computes_what_the_model_does():
    model = NestedBlocks().eval()
    x = model.inputs()
    gm = instrument(model, x)
    assert torch.equal(gm(*x), model(*x))


def _state(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, m.training) for n, m in model.named_modules()],
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        [(n, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()],
        [(n, type(m)) for n, m in model.named_modules()],
    )


@pytest.mark.parametrize("method", ["fx", "fallback"])
def test_user_model_is_never_modified(method):
    model = NestedBlocks().train()
    model.stem.register_forward_hook(lambda m, i, o: None)
    model.head[2].weight.requires_grad_(False)
    before = _state(model)
    before_model = copy.deepcopy(model)
    x = model.inputs()
    gm = instrument(model, x, method=method)
    gm.eval()
    run_torch(gm, x)
    after = _state(model)
    assert [(k, v.shape) for k, v in before[0].items()] == [
        (k, v.shape) for k, v in after[0].items()
    ]
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]
    model.eval()
    before_model.eval()
    assert torch.equal(model(*x), before_model(*x))


def test_optional_inputs_not_given_are_not_traced_as_tensors():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x, mask=None):
            y = self.lin(x)
            return y if mask is None else y * mask

    model = M()
    x = torch.randn(2, 3)
    result = instrument_model(model, (x,))
    assert result.method == "fx"
    assert torch.equal(result.module(x), model(x))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.branchy = Branchy()
        self.post = nn.Linear(4, 2)

    def forward(self, x):
        return self.post(self.branchy(self.pre(x)))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: FX cannot trace it
            return self.a(x)
        return self.b(x)


def test_untraceable_model_falls_back_to_eager_wrappers():
    model = DataDependent()
    x = torch.randn(3, 4)
    result = instrument_model(model, (x,))
    assert result.method == "fallback"
    assert result.fx_error and "TraceError" in result.fx_error
    with torch.no_grad():
        taken = "branchy.a" if model.pre(x).sum() > 0 else "branchy.b"
    assert _outputs(run_torch(result.module, (x,))) == ["pre", taken, "branchy", "post", ""]
    assert torch.equal(result.module(x), model(x))


def test_fx_only_raises_a_user_error_on_untraceable_models():
    with pytest.raises(InstrumentationError, match="could not trace"):
        instrument(DataDependent(), (torch.randn(3, 4),), method="fx")


def test_not_a_module_is_a_user_error():
    with pytest.raises(InstrumentationError, match=r"nn\.Module"):
        instrument(lambda x: x)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["fx", "fallback"])
def test_no_user_module_object_inside_the_result_even_when_aliased(method):
    shared = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    model = nn.Sequential(shared, nn.Tanh(), shared)  # one block under two names
    x = torch.randn(2, 3)
    result = instrument_model(model, (x,), method=method)
    user_objects = {id(m) for m in model.modules()}
    assert not [p for p, m in result.module.named_modules() if id(m) in user_objects]
    names = _outputs(run_torch(result.module, (x,)))
    assert names == ["0.0", "0.1", "0", "1", "0.0#1", "0.1#1", "0#1", ""]
    assert "same module object as '0'" in result.unmarked["2"]


def test_module_inputs_are_marked_with_the_call_name():
    model = ReusedModule()
    values = run_torch(instrument(model), model.inputs())
    names = _shown(values)
    assert names[:4] == ["shared:in[0]", "shared", "act:in[0]", "act"]
    assert "shared#2:in[0]" in names
    assert CallId("shared", 2).input((pytree.SequenceKey(0),)) in values
    assert _outputs(run_torch(instrument(model, local=False), model.inputs())) == _shown(
        run_torch(instrument(model, local=False), model.inputs())
    )


def test_keyword_inputs_are_named_by_keyword():
    class Inner(nn.Module):
        def forward(self, x, *, scale):
            return x * scale

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            return self.inner(x, scale=x.mean())

    names = list(run_torch(instrument(Outer(), method="fallback"), (torch.randn(3),)))
    assert _shown(names[:3]) == ["inner:in[0]", 'inner:in["scale"]', "inner"]
    assert names[1] == MarkerName("inner", 0, (pytree.MappingKey("scale"),), is_input=True)


def test_wrapper_state_is_a_declared_attribute_not_a_dict_entry():
    model = DataDependent()
    x = torch.randn(3, 4)
    result = instrument_model(model, (x,))
    assert result.method == "fallback"
    wrappers = dict(result.module.named_modules())
    pre, branchy = wrappers["pre"], wrappers["branchy"]
    assert isinstance(pre, MarkedModule) and isinstance(branchy, MarkedModule)
    assert pre.fxalign_state == WrapperState("pre", True, None)
    assert branchy.fxalign_state == WrapperState("branchy", True, "branchy")
    assert not [k for m in wrappers.values() for k in m.__dict__ if k.startswith("_fxalign")]
    assert result.module.state_dict().keys() == model.state_dict().keys()
    assert not isinstance(model.pre, MarkedModule)  # the user's classes are untouched
    assert MarkedModule.fxalign_state == WrapperState()  # the class default marks nothing


def test_blocks_inlined_by_fx_are_replayed_from_the_tree_fx_traced():
    model = NestedBlocks().eval()
    gm = instrument(model, model.inputs())
    assert isinstance(gm, TracedModule) and gm.replay_root is not None
    assert "replay_root" not in dict(gm.named_children())  # not a submodule: no duplicate weights
    assert gm.state_dict().keys() == model.state_dict().keys()
    block = replay_module(gm, "stage.block1")
    assert type(block).__name__ == type(model.stage.block1).__name__
    assert block is not model.stage.block1 and block.conv.weight is model.stage.block1.conv.weight
    with pytest.raises(AttributeError):
        replay_module(gm, "stage.nothing")


def test_fallback_traces_blocks_that_trace_on_their_own():
    model = DataDependent()
    x = torch.randn(3, 4)
    result = instrument_model(model, (x,))
    assert result.method == "fallback"
    assert "branchy" in result.eager and "" in result.eager
    assert result.traced == []  # Branchy branches on data; the other modules are leaves

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.branchy = Branchy()
            self.clean = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

        def forward(self, x):
            return self.clean(self.branchy(x))

    result = instrument_model(Outer(), (x,))
    assert result.method == "fallback" and result.traced == ["clean"]
    assert isinstance(dict(result.module.named_modules())["clean"], TracedModule)


class _Output(dict):
    """A dict that its block builds and its caller reads by attribute (as ModelOutput is)."""

    def __init__(self, hidden):
        super().__init__(hidden=hidden)
        self.hidden = hidden


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.stages = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))

    def forward(self, x):
        return _Output(self.stages(x))


class _ReadsByAttribute(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = _Encoder()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > -1e9:  # FX cannot trace the model whole
            x = x + 1
        return self.head(self.encoder(x).hidden)


def test_a_block_whose_trace_returns_another_container_stays_eager_and_its_children_trace():
    model, x = _ReadsByAttribute(), torch.randn(3, 4)
    result = instrument_model(model, (x,))
    assert result.method == "fallback"
    assert "output structure dict != _Output" in result.eager["encoder"]
    assert result.traced == ["encoder.stages"]
    with torch.no_grad():
        assert torch.equal(result.module(x), model(x))


def _untraceable_bump(x):
    if x.sum() > -1e9:  # a data-dependent branch: FX cannot trace the model whole
        x = x + 1
    return x


class _BranchyThenClean(nn.Module):
    def __init__(self):
        super().__init__()
        self.clean = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.encoder = _Encoder()

    def forward(self, x):
        return self.encoder(self.clean(_untraceable_bump(x))).hidden


def test_a_block_the_checking_run_finds_at_fault_is_left_eager(monkeypatch):
    fallback = sys.modules["fxalign.instrument.fallback"]
    real, runs = fallback._composed_mismatch, []

    def planted(assembled, *args):
        runs.append(list(assembled.result.traced))
        return ("clean", "planted") if len(runs) == 1 else real(assembled, *args)

    monkeypatch.setattr(fallback, "_composed_mismatch", planted)
    model, x = _BranchyThenClean(), torch.randn(3, 4)
    result = instrument_model(model, (x,))
    assert runs == [["clean", "encoder.stages"], ["encoder.stages"]]
    assert result.eager["clean"] == "traced module does not reproduce it: planted"
    assert result.traced == ["encoder.stages"]
    with torch.no_grad():
        assert torch.equal(result.module(x), model(x))


def test_a_difference_no_block_explains_checks_each_block_on_its_own(monkeypatch):
    fallback = sys.modules["fxalign.instrument.fallback"]
    monkeypatch.setattr(fallback, "_composed_mismatch", lambda *a: (None, "planted"))
    checked = []
    real = fallback.reproduces

    def counting(module, *args):
        checked.append(type(module).__name__)
        return real(module, *args)

    monkeypatch.setattr(fallback, "reproduces", counting)
    model, x = _BranchyThenClean(), torch.randn(3, 4)
    result = instrument_model(model, (x,))
    # one run per block tried (clean, encoder: refused, encoder.stages), one of the whole
    assert len(checked) == 4 and result.traced == ["clean", "encoder.stages"]
    assert "output structure" in result.eager["encoder"]
    with torch.no_grad():
        assert torch.equal(result.module(x), model(x))


class _CatchesItsBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.clean = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def forward(self, x):
        x = _untraceable_bump(x)
        try:
            return self.clean(x)
        except Exception:  # a model that recovers from a failing block
            return x


def test_a_block_at_fault_is_found_even_when_the_forward_catches_the_check(monkeypatch):
    fallback = sys.modules["fxalign.instrument.fallback"]
    real = fallback.output_differs
    planted = {"first": True}

    def differs(expected, output):  # the first check of a block output: planted difference
        if planted.pop("first", False):
            return "planted"
        return real(expected, output)

    monkeypatch.setattr(fallback, "output_differs", differs)
    model, x = _CatchesItsBlock(), torch.randn(3, 4)
    result = instrument_model(model, (x,))
    assert result.eager["clean"] == "traced module does not reproduce it: planted"
    assert result.traced == []


@pytest.mark.parametrize("method", ["fx", "fallback"])
@pytest.mark.parametrize("style", PATCH_STYLES)
def test_a_forward_set_on_the_instance_is_instrumented_like_a_class_defined_one(style, method):
    torch.manual_seed(0)
    model = InstancePatched(style).eval()
    x = model.inputs()
    with torch.no_grad():
        assert PlainMid.forward(model.mid, model.first(*x) * 100).max() > 6  # the clamp matters
    attributes = dict(model.mid.__dict__)
    result = instrument_model(model, x, method=method)
    names = _outputs(run_torch(result.module, x))
    assert names == ["first", "mid.lin", "mid.act", "mid", "out", ""]
    assert torch.equal(result.module(*x), model(*x))  # the instance's forward ran, on the copy
    # the user's module keeps its very objects, its forward still bound to it
    assert model.mid.__dict__.keys() == attributes.keys()
    assert all(model.mid.__dict__[k] is v for k, v in attributes.items())


def test_fx_traces_the_forward_set_on_the_root_instance():
    torch.manual_seed(0)
    model = PlainMid().eval()
    patch_forward(model, "method")
    own = model.forward
    x = model.inputs()
    result = instrument_model(model, x)
    assert result.method == "fx"  # FX traced the instance's forward, not the class's
    assert _outputs(run_torch(result.module, x)) == ["lin", "act", ""]
    assert torch.equal(result.module(*x), model(*x))
    assert model.__dict__["forward"] is own and type(model) is PlainMid


@pytest.mark.parametrize("style", ["partial", "closure"])
def test_a_root_forward_fx_cannot_trace_runs_eager_and_starts_each_scope(style):
    torch.manual_seed(0)
    model = PlainMid().eval()
    patch_forward(model, style)
    x = model.inputs()
    result = instrument_model(model, x)
    assert result.method == "fallback" and "set on the instance" in (result.fx_error or "")
    for _ in range(2):  # call indices start again at every forward
        assert _outputs(run_torch(result.module, x)) == ["lin", "act", ""]
    assert torch.equal(result.module(*x), model(*x))
