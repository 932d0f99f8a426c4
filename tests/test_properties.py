"""Property-based tests: random module trees through ``align`` (issue 7).

Every executed leaf-module call must have a row, and fp32 error must stay at round-off level.
CI runs a few derandomized examples per exporter; explore more with, for example::

    FXALIGN_HYPOTHESIS_EXAMPLES=200 FXALIGN_HYPOTHESIS_RANDOM=1 pytest tests/test_properties.py
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxalign

EXAMPLES = int(os.environ.get("FXALIGN_HYPOTHESIS_EXAMPLES", "5"))
RANDOM = os.environ.get("FXALIGN_HYPOTHESIS_RANDOM") == "1"
C, W = 4, 5  # tensors are N x C x H x W throughout; Linear and LayerNorm act on W


class Pair(nn.Module):
    """Returns a tuple: (a(x), b(x))."""

    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.a(x), self.b(x)


class SumPair(nn.Module):
    """Consumes a tuple-returning child."""

    def __init__(self, inner: Pair) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        first, second = self.inner(x)
        return first + second


class ListBlock(nn.Module):
    def __init__(self, children: list[nn.Module]) -> None:
        super().__init__()
        self.items = nn.ModuleList(children)

    def forward(self, x):
        for item in self.items:
            x = item(x)
        return x


class DictBlock(nn.Module):
    def __init__(self, children: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict({f"p{i}": c for i, c in enumerate(children)})

    def forward(self, x):
        for key in self.parts:
            x = self.parts[key](x)
        return x


def _leaf(kind: str, inplace: bool) -> nn.Module:
    if kind == "conv":
        return nn.Conv2d(C, C, 3, padding=1)
    if kind == "linear":
        return nn.Linear(W, W)
    if kind == "bn":
        bn = nn.BatchNorm2d(C)
        with torch.no_grad():
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        return bn
    if kind == "ln":
        return nn.LayerNorm(W)
    if kind == "gn":
        return nn.GroupNorm(2, C)
    if kind == "relu":
        return nn.ReLU(inplace=inplace)
    if kind == "hardtanh":
        return nn.Hardtanh(inplace=inplace)
    return {"gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}[kind]()


LEAVES = ["conv", "linear", "bn", "ln", "gn", "relu", "hardtanh", "gelu", "tanh", "sigmoid"]
leaf_specs = st.tuples(st.just("leaf"), st.sampled_from(LEAVES), st.booleans())


def _containers(children):
    several = st.lists(children, min_size=1, max_size=3)
    return st.one_of(
        st.tuples(st.just("seq"), several),
        st.tuples(st.just("list"), several),
        st.tuples(st.just("dict"), several),
        st.tuples(st.just("pair"), children, children),
        st.tuples(st.just("reuse"), children),
    )


tree_specs = st.recursive(leaf_specs, _containers, max_leaves=8)


def build(spec) -> nn.Module:
    kind = spec[0]
    if kind == "leaf":
        return _leaf(spec[1], spec[2])
    if kind == "seq":
        return nn.Sequential(*(build(s) for s in spec[1]))
    if kind == "list":
        return ListBlock([build(s) for s in spec[1]])
    if kind == "dict":
        return DictBlock([build(s) for s in spec[1]])
    if kind == "pair":
        # the in-place activations of one branch must not see the other's input
        return SumPair(Pair(nn.Sequential(nn.Identity(), build(spec[1])), build(spec[2])))
    shared = build(spec[1])
    return nn.Sequential(shared, nn.Tanh(), shared)


def _executed_leaf_calls(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Marker names every leaf call should get: ``path``, ``path#1``, ... in call order."""
    calls: list[str] = []
    counts: Counter[str] = Counter()
    handles = []
    for path, module in model.named_modules():
        if path and next(module.children(), None) is None:

            def hook(mod, inputs, output, path=path):
                calls.append(path if counts[path] == 0 else f"{path}#{counts[path]}")
                counts[path] += 1

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x.clone())
    finally:
        for h in handles:
            h.remove()
    return calls


@pytest.mark.parametrize(  # the dynamo exports are the long ones: in the slow group
    "exporter", [pytest.param("dynamo", marks=pytest.mark.slow), "torchscript"]
)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not RANDOM,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(spec=tree_specs, seed=st.integers(0, 2**16))
def test_random_module_trees_align(exporter, spec, seed):
    torch.manual_seed(seed)
    model = build(spec).eval()
    x = torch.randn(2, C, 3, W)
    expected = _executed_leaf_calls(model, x)
    report = fxalign.align(model, (x,), exporter=exporter)
    names = [r.name for r in report.rows]
    missing = [n for n in expected if n not in names]
    assert not missing, f"no row for executed leaf calls {missing}\n{fxalign.render_text(report)}"
    worst = max(r.metrics.max_abs for r in report.rows if r.metrics is not None)
    assert worst <= 1e-5, fxalign.render_text(report)
    assert report.passed


# ---- aliasing, in-place writes and state: the plain export's own verdict --------------------
class KeepsInputWhileChildWritesIt(nn.Module):
    """``self.child(h)`` may write ``h`` in place; the caller goes on with ``h``."""

    def __init__(self, child: nn.Module) -> None:
        super().__init__()
        self.child = child

    def forward(self, x):
        h = x * 1.0
        y = self.child(h)
        return h + y


class Narrow(nn.Module):
    def forward(self, x):
        return x[..., :2]


class WritesThroughView(nn.Module):
    """A child returns a view; the caller writes through it and returns the base."""

    def __init__(self, child: nn.Module) -> None:
        super().__init__()
        self.child = child
        self.narrow = Narrow()

    def forward(self, x):
        h = self.child(x) + 0.0
        v = self.narrow(h)
        v.mul_(0.5)
        return h


class CountsCalls(nn.Module):
    """Writes a buffer in forward (a call counter), without changing the value."""

    def __init__(self, child: nn.Module) -> None:
        super().__init__()
        self.child = child
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.child(x)


_ALIAS_WRAPPERS = {
    "keeps": KeepsInputWhileChildWritesIt,
    "view": WritesThroughView,
    "counts": CountsCalls,
}


def _alias_trees(children):
    return st.tuples(st.sampled_from(sorted(_ALIAS_WRAPPERS)), children)


alias_specs = st.recursive(leaf_specs, _alias_trees, max_leaves=4)


def build_alias(spec) -> nn.Module:
    if spec[0] == "leaf":
        return _leaf(spec[1], spec[2])
    return _ALIAS_WRAPPERS[spec[0]](build_alias(spec[1]))


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@settings(
    max_examples=max(3, EXAMPLES // 2),
    deadline=None,
    derandomize=not RANDOM,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(spec=alias_specs, seed=st.integers(0, 2**16))
def test_alias_and_inplace_trees_get_the_plain_exports_verdict(exporter, spec, seed):
    from fixtures.oracle import plain_export_matches

    torch.manual_seed(seed)
    model = build_alias(spec).eval()
    x = torch.randn(2, C, 3, W)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = plain_export_matches(model, (x,), exporter)
    report = fxalign.align(model, (x,), exporter=exporter)
    assert bool(report) == expected, fxalign.render_text(report)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
