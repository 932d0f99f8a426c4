import torch
from torch.utils import _pytree as pytree

from fxalign.capture import capture
from fxalign.markers import debug_apply, new_forward_scope
from fxalign.names import CallId, MarkerName, decode_attribute


def _shown(values):
    return [str(name) for name in values]


def test_eager_marker_returns_the_tensor_itself_and_captures_a_copy():
    x = torch.randn(3)
    original = x.clone()
    with capture() as values:
        y = debug_apply(x, "a")
    assert y is x  # exact eager semantics, aliasing included
    y.add_(1)  # an in-place op after the marker must not reach the captured value
    assert torch.equal(values[MarkerName("a")], original)


def test_marker_keeps_aliasing_that_in_place_code_relies_on():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.same = torch.nn.Identity()
            self.act = torch.nn.ReLU(inplace=True)

        def forward(self, x):
            y = self.same(x)  # y is x
            self.act(y)  # so this also changes x
            return x + y

    import fxalign

    model = M()
    x = torch.randn(4)
    gm = fxalign.instrument(model)
    assert torch.equal(gm(x.clone()), model(x.clone()))


def test_structured_values_keep_structure_and_name_each_leaf():
    new_forward_scope()
    value = (torch.ones(1), None, [torch.zeros(2), 3], {"logits": torch.ones(4)})
    with capture() as values:
        out = debug_apply(value, "m")
    assert out[1] is None and out[2][1] == 3 and isinstance(out[3], dict)
    assert _shown(values) == ["m[0]", "m[2][0]", 'm[3]["logits"]']
    assert list(values)[2] == MarkerName(
        "m", 0, (pytree.SequenceKey(3), pytree.MappingKey("logits"))
    )


def test_call_index_counts_within_one_forward():
    new_forward_scope()
    with capture() as values:
        for _ in range(3):
            debug_apply(torch.ones(1), "shared")
    assert list(values) == [MarkerName("shared", i) for i in range(3)]
    assert _shown(values) == ["shared", "shared#1", "shared#2"]
    new_forward_scope()
    with capture() as values:
        debug_apply(torch.ones(1), "shared")
    assert list(values) == [MarkerName("shared")]


def test_non_tensor_values_are_recorded_as_such():
    new_forward_scope()
    with capture() as values:
        assert debug_apply(None, "nothing") is None
    assert not values and values.without_tensors == [CallId("nothing")]


def test_debug_op_under_torch_export_keeps_names():
    class M(torch.nn.Module):
        def forward(self, x):
            return debug_apply(x * 2, "double")

    ep = torch.export.export(M(), (torch.ones(2),))
    calls = [n for n in ep.graph.nodes if n.op == "call_function" and "debug" in str(n.target)]
    assert [decode_attribute(n.args[1]) for n in calls] == [MarkerName("double")]


def test_marking_an_unchanged_value_again_stores_one_copy():
    new_forward_scope()
    with capture() as values:
        inner = debug_apply(torch.ones(2), "block.conv")
        outer = debug_apply(inner, "block")
    assert outer is inner
    assert _shown(values) == ["block.conv", "block"]
    assert values[MarkerName("block")] is values[MarkerName("block.conv")]  # one copy, one value


def test_in_place_change_after_a_marker_is_captured_separately():
    new_forward_scope()
    with capture() as values:
        inner = debug_apply(torch.ones(2), "bn")
        inner.relu_().add_(1)  # an in-place activation after the marker
        debug_apply(inner, "relu")
    assert torch.equal(values[MarkerName("bn")], torch.ones(2))
    assert torch.equal(values[MarkerName("relu")], torch.full((2,), 2.0))


def test_aliases_are_collected_under_torch_export():
    from fxalign.markers import collect_aliases

    class M(torch.nn.Module):
        def forward(self, x):
            new_forward_scope()
            y = debug_apply(debug_apply(x * 2, "inner"), "outer")
            y.add_(1)
            return debug_apply(y, "after_inplace")

    with collect_aliases() as aliases:
        ep = torch.export.export(M(), (torch.ones(2),))
    calls = [n for n in ep.graph.nodes if n.op == "call_function" and "debug" in str(n.target)]
    assert [decode_attribute(n.args[1]) for n in calls] == [
        MarkerName("inner"),
        MarkerName("after_inplace"),
    ]
    assert aliases == {MarkerName("outer"): MarkerName("inner")}
