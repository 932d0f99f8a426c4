"""``fxalign report`` and the --html / --node-data outputs of the CLI."""

from __future__ import annotations

import json

import pytest

from fixtures.reports import planted_report
from fxalign import Report
from fxalign.cli import main


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "run.json"
    planted_report().to_json(path)
    return path


def test_report_rerenders_a_saved_run(saved, tmp_path, capsys):
    html, again = tmp_path / "run.html", tmp_path / "again.json"
    code = main(["report", str(saved), "--html", str(html), "--json", str(again), "--top", "2"])
    assert code == 1  # the saved run diverged
    out = capsys.readouterr().out
    assert "showing the 2 worst of 6 rows" in out and "introduced in mid.clamp" in out
    assert f"wrote {html}" in out
    assert "DIVERGED" in html.read_text() and 'id="row-5"' in html.read_text()
    assert Report.from_json(again) == Report.from_json(saved)


def test_report_exits_0_for_an_aligned_run(tmp_path, capsys):
    report = planted_report()
    for row in report.rows:
        if row.passed is False:
            row.passed, row.status = True, "ok"
    report.first_divergence = None
    path = tmp_path / "ok.json"
    report.to_json(path)
    assert main(["report", str(path)]) == 0
    assert "ALIGNED" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read report"),
        ("not json", "is not a JSON file"),
        ("[1, 2]", "is not an fxalign report"),
        ('{"rows": []}', "is not an fxalign report"),
        ('{"schema_version": 99, "model": "M"}', "newer than this fxalign reads"),
    ],
)
def test_report_rejects_bad_files_with_exit_2(content, message, tmp_path, capsys):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_outputs_are_not_overwritten_without_flag(saved, tmp_path, capsys):
    html = tmp_path / "run.html"
    html.write_text("mine")
    nodes = tmp_path / "nodes.json"
    assert main(["report", str(saved), "--html", str(html), "--node-data", str(nodes)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert html.read_text() == "mine" and not nodes.exists()  # nothing written
    assert main(["report", str(saved), "--html", str(html), "--overwrite"]) == 1
    assert html.read_text().startswith("<!DOCTYPE html>")


def test_align_writes_html_and_node_data(tmp_path, capsys):
    html, nodes, saved = tmp_path / "r.html", tmp_path / "nd.json", tmp_path / "r.json"
    argv = ["align", "tests.fixtures.models:PlantedDivergence", "-i", "4x8"]
    argv += ["--exporter", "torchscript", "--json", str(saved)]
    argv += ["--html", str(html), "--node-data", str(nodes)]
    assert main(argv) == 1
    report = Report.from_json(saved)
    page = html.read_text()
    assert page.count('<tr id="row-') == len(report.rows)
    first = report.divergence
    assert first is not None and first.onnx_node
    results = json.loads(nodes.read_text())["main_graph"]["results"]
    assert results[first.onnx_node]["bgColor"] == "#7f0000"
