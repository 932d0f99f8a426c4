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
    report = fxalign.align(model, model.inputs(), local="all", attach=False)
    assert report.instrumentation == "fx"
    for name in ["stage", "stage.block1", "stage.block2", "head", "stem", "head.2"]:
        assert report.row(name).local is not None, name
        assert report.row(name).local.max_abs <= 1e-5
    assert report.row("stage").local_scope == "own_code"
    assert report.row("stem").local_scope == "module"


def test_eager_blocks_get_a_local_error():
    model = DataDependent().eval()
    report = fxalign.align(model, model.inputs(), exporter="torchscript", local="all", attach=False)
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
    report = fxalign.align(model, args, kwargs, local="all")
    with_local = [r for r in report.rows if r.local is not None]
    assert len(with_local) >= 0.8 * len([r for r in report.rows if r.kind != "output"])
    assert max(r.local.max_abs for r in with_local) <= 1e-4


def test_aligned_models_are_not_rerun_and_diverged_ones_once(monkeypatch, exporter):
    import fxalign.local

    reruns, rerun = [], fxalign.local._rerun
    monkeypatch.setattr(
        fxalign.local, "_rerun", lambda run, answers: reruns.append(1) or rerun(run, answers)
    )
    model = NestedBlocks().eval()
    report = fxalign.align(model, model.inputs(), exporter=exporter)
    assert report.passed and not reruns
    assert all(r.local is None for r in report.rows)
    assert report.row("stem").local_note == fxalign.local.NOT_REPLAYED
    report = fxalign.align(model, model.inputs(), exporter=exporter, local="all")
    assert len(reruns) == 1 and report.row("stem").local is not None

    reruns.clear()
    planted = PlantedDivergence().eval()
    kwargs = planted_export_kwargs(exporter)
    report = fxalign.align(
        planted, planted.inputs(), exporter=exporter, export_kwargs=kwargs, attach=False
    )
    assert len(reruns) == 1  # every row's introduced error from one rerun
    assert all(r.local is not None for r in report.rows), [
        (r.name, r.local_note) for r in report.rows if r.local is None
    ]


def test_local_must_be_a_known_mode():
    with pytest.raises(fxalign.UserError, match="local must be"):
        fxalign.align(NestedBlocks().eval(), NestedBlocks.inputs(), local="some")
