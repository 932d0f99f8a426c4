"""Model Explorer node data, and the ONNX node of each row it is keyed by."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import onnx
import pytest
import torch

import fxalign
from fixtures.models import PlantedDivergence, planted_export_kwargs
from fixtures.reports import planted_report
from fxalign import Report
from fxalign.extract import extract
from fxalign.report.model_explorer import to_node_data, write_node_data


def _with_nodes() -> Report:
    report = planted_report()
    for row in report.rows:
        row.onnx_node = f"node_{row.name or 'out'}"
        row.local = None
    report.rows[3].onnx_node = "node_mid.clamp"  # the block's output is its last module's
    return report


def test_node_data_is_keyed_by_onnx_node_with_max_abs():
    data = to_node_data(_with_nodes())
    assert list(data) == ["main_graph"]
    results = data["main_graph"]["results"]
    # the missing row has no value and is left out; mid shares mid.clamp's node
    assert {k: v["value"] for k, v in results.items()} == {
        "node_first": 0.0,
        "node_mid.lin": 2.4e-7,
        "node_mid.clamp": 7.15,
        "node_out": 0.0357,
    }
    assert results["node_mid.clamp"]["bgColor"] == "#7f0000"  # the first divergence
    assert results["node_out"]["bgColor"] == "#e53935"  # failing
    assert "bgColor" not in results["node_first"]
    thresholds = data["main_graph"]["thresholds"]
    values = [t["value"] for t in thresholds]
    assert values == sorted(values) and values[1] == pytest.approx(1e-4)  # bands of atol
    assert values[-1] == sys.float_info.max


def test_node_data_options_and_json(tmp_path):
    report = _with_nodes()
    report.rows[0].metrics.max_abs = math.inf
    report.rows[1].local = fxalign.Metrics(0.5, 0, 0, 0, 1, 0, 0, 4)
    mapping = {"mid.lin": "other"}
    data = to_node_data(report, mapping, metric="max_rel", graph_id="g")
    results = data["g"]["results"]
    assert results["other"]["value"] == pytest.approx(2.4e-6)  # the mapping wins
    assert results["node_first"]["value"] == 0.0  # max_rel, not the (inf) max_abs
    local = to_node_data(report, local=True)["main_graph"]["results"]
    assert local == {"node_mid.lin": {"value": 0.5}}
    path = write_node_data(report, tmp_path / "nd.json")
    loaded = json.loads(path.read_text())  # strict JSON: inf is written as the largest float
    assert loaded["main_graph"]["results"]["node_first"]["value"] == sys.float_info.max
    with pytest.raises(ValueError, match="unknown metric 'cosine'"):
        to_node_data(report, metric="cosine")


def test_compare_stores_producer_nodes():
    a, b = fxalign.MarkerName("a"), fxalign.MarkerName("b")
    rows = fxalign.compare(
        {a: np.ones(2), b: np.ones(2)},
        {a: np.ones(2), b: np.ones(2)},
        onnx_nodes={a: "/a/Gemm", b: ""},
    )
    assert [r.onnx_node for r in rows] == ["/a/Gemm", None]


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_real_run_keys_node_data_by_nodes_of_the_graph(exporter, tmp_path):
    torch.manual_seed(0)
    model = PlantedDivergence().eval()
    report = fxalign.align(
        model,
        model.inputs(),
        exporter=exporter,
        export_kwargs=planted_export_kwargs(exporter),
        workdir=tmp_path,
    )
    debug = onnx.load(tmp_path / "debug.onnx")
    producers = {out: n.name for n in debug.graph.node for out in n.output}
    marked = [r for r in report.rows if r.kind != "output"]
    assert all(r.onnx_node for r in marked)
    for row in marked:  # each row names the node that computes its tensor
        assert producers[row.onnx_name] == row.onnx_node, row.name

    from_rows = to_node_data(report)["main_graph"]["results"]
    extracted = extract(tmp_path / "export.onnx")
    graph = extracted.model.graph
    from_extract = to_node_data(
        report,
        extracted.producer_of,
        tensor_nodes={out: n.name for n in graph.node for out in n.output if out},
        graph_id=graph.name,
    )[debug.graph.name]["results"]
    assert set(from_rows) <= set(from_extract) <= set(producers.values())
    first = report.divergence
    assert first is not None and first.onnx_node is not None
    assert from_extract[first.onnx_node]["bgColor"] == "#7f0000"
    assert from_extract[first.onnx_node]["value"] == pytest.approx(first.metrics.max_abs)
    # the final output's node is found through the graph when the row has none
    output = report.rows[-1]
    assert output.onnx_node is None and producers[output.onnx_name] in from_extract
