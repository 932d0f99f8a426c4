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

import fxalign
from fixtures.alias_models import PATTERNS, ResNetStyleInplaceRelu
from fixtures.models import planted_export_kwargs
from fixtures.oracle import plain_export_matches


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
    report = fxalign.align(model, (torch.randn(1, 3, 8, 8),), exporter=exporter, attach=False)
    assert report
    rows = {r.display_name: r for r in report.rows}
    for name in ("conv", "bn", "relu", "output"):
        assert rows[name].status == "ok", (name, rows[name].status)
