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
