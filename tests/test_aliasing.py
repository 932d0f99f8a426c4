"""Markers keep the model's aliasing and in-place semantics (issue 13, item 1).

Under a tracer a marker's output is a new tensor. Where a module writes its input in place, or
the caller writes through a view a module returned, the write must still reach every alias, as
it does in eager PyTorch and in the plain export. Each model below is checked against the plain
export's own verdict, with both exporters: a model whose plain export matches PyTorch must be
reported aligned, and one whose plain export does not must be reported diverged.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxalign
from fixtures.models import BadClamp, planted_export_kwargs
from fixtures.oracle import plain_export_matches


class InplaceActOnKeptValue(nn.Module):
    """``self.act(h)`` changes ``h`` in place; the caller goes on with ``h``."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = x * 2
        self.act(h)
        return self.fc(h)


class Pick(nn.Module):
    def forward(self, x):
        return x[:, :2]


class WriteThroughReturnedView(nn.Module):
    """A child returns a view; the caller writes through it and uses the base."""

    def __init__(self) -> None:
        super().__init__()
        self.pick = Pick()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = x + 1
        v = self.pick(h)
        v.mul_(3)
        return self.fc(h)


class WriteThroughIdentity(nn.Module):
    """Dropout in eval mode hands its input on; the caller writes the result in place."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = x * 1.5
        y = self.drop(h)
        y.add_(1)
        return self.fc(h)


class BlockWritesItsInput(nn.Module):
    """A block whose own code writes its input in place (FX inlines it)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        x.clamp_(min=0)
        return self.lin(x)


class CallerKeepsBlockInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = BlockWritesItsInput()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = x - 0.5
        a = self.block(h)
        return self.fc(h) + a


class ResNetStyleInplaceRelu(nn.Module):
    """The common case: an in-place ReLU on a fresh value; every marker must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.bn(self.conv(x))
        out = self.relu(out)
        return out


class PlantedFaultThroughView(nn.Module):
    """A real divergence (a custom op whose ONNX translation forgets a clamp) written in place
    through a returned view: it reaches ``fc`` only through the alias."""

    def __init__(self) -> None:
        super().__init__()
        self.pick = Pick()
        self.clamp = BadClamp()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = x * 100
        v = self.pick(h)
        v.copy_(self.clamp(v))
        return self.fc(h)


PATTERNS = [
    InplaceActOnKeptValue,
    WriteThroughReturnedView,
    WriteThroughIdentity,
    CallerKeepsBlockInput,
    PlantedFaultThroughView,
]


@pytest.mark.parametrize("cls", PATTERNS, ids=lambda c: c.__name__)
def test_verdict_equals_the_plain_exports(cls, exporter):
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(4, 8)
    kwargs = planted_export_kwargs(exporter)
    expected = plain_export_matches(model, (x,), exporter, export_kwargs=kwargs)
    report = fxalign.align(model, (x,), exporter=exporter, export_kwargs=kwargs)
    assert bool(report) == expected, (
        f"plain export {'matches' if expected else 'diverges'}, fxalign says "
        f"{'aligned' if report else 'diverged at ' + str(report.divergence)}"
    )


def test_inplace_relu_on_a_fresh_value_keeps_every_marker(exporter):
    model = ResNetStyleInplaceRelu().eval()
    report = fxalign.align(model, (torch.randn(1, 3, 8, 8),), exporter=exporter)
    assert report
    rows = {r.display_name: r for r in report.rows}
    for name in ("conv", "bn", "relu", "output"):
        assert rows[name].status == "ok", (name, rows[name].status)
