"""Local (introduced-here) error next to cumulative error (issue 4)."""

import pytest

import fxalign
from fixtures.models import DataDependent, NestedBlocks, PlantedDivergence, planted_export_kwargs
from fxalign.report.summary import summary_line


def test_planted_divergence_starts_where_the_local_error_is(exporter):
    model = PlantedDivergence().eval()
    report = fxalign.align(
        model, model.inputs(), exporter=exporter, export_kwargs=planted_export_kwargs(exporter)
    )
    assert report.first_divergence == "mid.clamp"
    first = report.divergence
    assert first.local is not None and first.local.max_abs > 1.0
    index = [r.name for r in report.rows].index("mid.clamp")
    later = [r for r in report.rows[index + 1 :] if r.kind != "output" and r.name != "mid"]
    assert later, "the planted model has modules after the divergence"
    for row in later:
        assert row.local is not None, (row.name, row.local_note)
        assert row.local.max_abs <= 1e-5, row.name
        assert row.metrics.max_abs > 1e-3, row.name  # cumulative error is large
    assert "local=" in summary_line(report)
    assert "introduced here" in summary_line(report)


def test_blocks_inlined_by_fx_get_a_local_error_when_their_input_is_clear():
    model = NestedBlocks().eval()
    report = fxalign.align(model, model.inputs())
    assert report.instrumentation == "fx"
    for name in ["stage", "stage.block1", "stage.block2", "head", "stem", "head.2"]:
        assert report.row(name).local is not None, name
        assert report.row(name).local.max_abs <= 1e-5


def test_eager_blocks_get_a_local_error():
    model = DataDependent().eval()
    report = fxalign.align(model, model.inputs(), exporter="torchscript")
    assert report.instrumentation == "fallback"
    assert report.row("branchy").local is not None
    assert report.row("tail").local is not None


def test_local_can_be_switched_off():
    model = NestedBlocks().eval()
    report = fxalign.align(model, model.inputs(), local=False)
    module_rows = [r for r in report.rows if r.kind != "output"]
    assert all(r.local is None for r in module_rows)
    assert all(r.local_note == "not computed (local=False)" for r in module_rows)
    assert "local" not in report.timings


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_transformers_get_local_errors(name):
    pytest.importorskip("transformers")
    from fixtures.models import tiny_transformer

    model, args, kwargs = tiny_transformer(name)
    report = fxalign.align(model, args, kwargs)
    with_local = [r for r in report.rows if r.local is not None]
    assert len(with_local) >= 0.8 * len([r for r in report.rows if r.kind != "output"])
    assert max(r.local.max_abs for r in with_local) <= 1e-4


def test_calls_fed_the_same_bits_on_both_sides_are_not_replayed(monkeypatch, exporter):
    import torch

    import fxalign.local

    torch.manual_seed(0)
    inner = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh())
    model = torch.nn.Sequential(inner, torch.nn.Linear(5, 3), torch.nn.Dropout(0.5)).eval()
    replayed, replay = [], fxalign.local._replay
    monkeypatch.setattr(
        fxalign.local,
        "_replay",
        lambda inst, record, values: (
            replayed.append(record.module_path) or replay(inst, record, values)
        ),
    )
    report = fxalign.align(model, (torch.randn(4, 6),), exporter=exporter)
    # "0" and "0.0" take the graph input itself: their replay would recompute PyTorch's output.
    assert "0" not in replayed and "0.0" not in replayed
    for name in ("0", "0.0"):
        assert report.row(name).local == report.row(name).metrics
    assert report.row("1").local is not None  # whichever way, every row has its local error

    # In training mode a replay is a fresh draw: never assume it equals the captured output.
    replayed.clear()
    report = fxalign.align(model.train(), (torch.randn(4, 6),), exporter=exporter, train=True)
    assert "0" in replayed
    model.eval()
