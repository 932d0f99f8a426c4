import warnings

import numpy as np
import onnx
import pytest
import torch

import fxalign
from fixtures.models import CASES, ConvBnReluInplace, PlantedDivergence, planted_export_kwargs
from fxalign.backends import ChunkedOutputs, run_onnx


def _debug_model(tmp_path, exporter):
    model = ConvBnReluInplace().eval()
    (x,) = model.inputs()
    fxalign.align(model, (x,), exporter=exporter, workdir=tmp_path, attach=False)
    path = tmp_path / "debug.onnx"
    feeds = fxalign.onnx_feeds(path, (x,))
    return path, feeds


def test_outputs_in_chunks_are_identical_to_one_run(tmp_path, exporter):
    path, feeds = _debug_model(tmp_path, exporter)
    whole = run_onnx(path, feeds)
    chunked = run_onnx(path, feeds, max_outputs_per_run=1)
    assert isinstance(chunked, ChunkedOutputs) and list(chunked) == list(whole)
    for name in whole:  # in order: one run per output
        assert chunked[name].dtype == whole[name].dtype
        np.testing.assert_array_equal(chunked[name], whole[name])
    assert chunked.runs == len(whole)
    first = next(iter(whole))
    np.testing.assert_array_equal(chunked[first], whole[first])  # out of order: runs again
    assert chunked.runs == len(whole) + 1


def test_max_outputs_per_run_must_be_positive(tmp_path):
    path, feeds = _debug_model(tmp_path, "dynamo")
    with pytest.raises(fxalign.InputError, match="at least 1"):
        run_onnx(path, feeds, max_outputs_per_run=0)


@pytest.mark.parametrize("case", ["nested", "mha", "reused"])
@pytest.mark.parametrize(  # the dynamo exports are the long ones: in the slow group
    "exporter", [pytest.param("dynamo", marks=pytest.mark.slow), "torchscript"]
)
def test_report_is_identical_with_and_without_chunks(case, exporter):
    model = CASES[case]().eval()
    inputs = model.inputs()
    whole = fxalign.align(model, inputs, exporter=exporter, attach=False)
    chunked = fxalign.align(model, inputs, exporter=exporter, max_outputs_per_run=2)
    assert [r.name for r in chunked.rows] == [r.name for r in whole.rows]
    assert [r.metrics for r in chunked.rows] == [r.metrics for r in whole.rows]
    assert [r.status for r in chunked.rows] == [r.status for r in whole.rows]
    assert [(r.local, r.local_note) for r in chunked.rows] == [
        (r.local, r.local_note) for r in whole.rows
    ]
    assert chunked.coverage == whole.coverage


def test_align_in_batches_holds_one_batch_of_values_on_each_side(monkeypatch, exporter):
    import fxalign.sources.markers as markers

    fetched, kept = [], []
    real_run_onnx = markers.MarkerSource._run_onnx
    real_run_torch = markers.run_torch_captured

    def run_onnx_spy(self, feeds, names):
        fetched.append(len(names))
        return real_run_onnx(self, feeds, names)

    def run_torch_spy(*args, **kwargs):
        run = real_run_torch(*args, **kwargs)
        kept.append(len(run.values))
        return run

    monkeypatch.setattr(markers.MarkerSource, "_run_onnx", run_onnx_spy)
    monkeypatch.setattr(markers, "run_torch_captured", run_torch_spy)
    model = CASES["nested"]().eval()
    report = fxalign.align(model, model.inputs(), exporter=exporter, max_outputs_per_run=3)
    outputs = sum(r.kind == "output" for r in report.rows)
    assert len(fetched) > 2 and max(fetched) <= 3 + outputs
    # the first run keeps no values (names only); later ones one batch each
    assert kept[0] == outputs and len(kept) == len(fetched) + 1
    assert max(kept) < len(report.rows) // 2


def test_planted_divergence_is_found_in_chunks(exporter):
    model = PlantedDivergence().eval()
    report = fxalign.align(
        model,
        model.inputs(),
        exporter=exporter,
        export_kwargs=planted_export_kwargs(exporter),
        max_outputs_per_run=1,
    )
    assert report.first_divergence == "mid.clamp"


def test_other_runners_are_loaded_once_and_run_per_chunk(tmp_path):
    path, feeds = _debug_model(tmp_path, "dynamo")
    loads, calls = [], []

    class Recording:
        def __init__(self, session):
            self.session = session

        def run(self, feeds, output_names):
            calls.append(list(output_names))
            return self.session.run(feeds, output_names)

    class Plain:
        name = "plain"

        def load(self, model_path, *, max_outputs_per_run=None):
            loads.append(max_outputs_per_run)
            return Recording(fxalign.OrtRunner().load(model_path))

    values = run_onnx(path, feeds, runner=Plain(), max_outputs_per_run=2)
    assert isinstance(values, ChunkedOutputs) and loads == [2] and calls == []  # lazy
    merged = dict(values)
    assert all(len(c) <= 2 for c in calls) and len(calls) == values.runs
    assert sorted(merged) == sorted(n for c in calls for n in c)
    assert torch.is_tensor(torch.from_numpy(next(iter(merged.values()))))


class _Scaled(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.gate = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x, gate=None, scale=1.0):
        y = self.lin(x)
        if gate is not None:
            y = y * torch.sigmoid(self.gate(gate))
        return y * scale


def test_a_default_number_the_torchscript_exporter_made_an_input_is_fed(tmp_path):
    # with keyword arguments, the TorchScript exporter fills in the later parameters'
    # defaults: ``scale=1.0`` becomes a 0-dim double graph input
    torch.manual_seed(0)
    model, x, g = _Scaled().eval(), torch.randn(4, 8), torch.randn(4, 8)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x, {"gate": g}), str(path), dynamo=False)
    assert len(onnx.load(str(path)).graph.input) == 3
    feeds = fxalign.onnx_feeds(path, (x,), {"gate": g}, forward=model.forward)
    assert [v.shape for v in feeds.values()] == [(4, 8), (4, 8), ()]
    assert list(feeds.values())[2] == 1.0 and list(feeds.values())[2].dtype == np.float64
    assert fxalign.align(model, (x,), {"gate": g}, onnx=path)
    with pytest.raises(fxalign.InputError) as e:  # fewer tensors, no signature to fill from
        fxalign.onnx_feeds(path, (x, g))
    assert "Python number" in (e.value.hint or "")
