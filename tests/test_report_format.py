"""The JSON layout documented in docs/report-format.md."""

from __future__ import annotations

import json
import math

import pytest

from fixtures.reports import planted_report
from fxalign import Report
from fxalign.report.model import SCHEMA_VERSION


def test_non_finite_floats_are_strings_and_load_back():
    report = planted_report()
    m = report.rows[2].metrics
    m.max_abs, m.cosine, m.sqnr_db = math.inf, math.nan, -math.inf
    data = json.loads(report.to_json())
    assert data["schema_version"] == SCHEMA_VERSION
    metrics = data["rows"][2]["metrics"]
    assert (metrics["max_abs"], metrics["cosine"], metrics["sqnr_db"]) == ("inf", "nan", "-inf")
    loaded = Report.from_dict(data).rows[2].metrics
    assert loaded.max_abs == math.inf and math.isnan(loaded.cosine)
    assert loaded.sqnr_db == -math.inf


def test_onnx_node_round_trips_and_older_reports_without_it_load():
    report = planted_report()
    report.rows[0].onnx_node = "/first/Gemm"
    assert Report.from_json(report.to_json()) == report
    data = report.to_dict()
    for row in data["rows"]:
        del row["onnx_node"], row["local"], row["local_note"]  # written before those fields
    old = Report.from_dict(data)
    assert all(r.onnx_node is None and r.local is None for r in old.rows)


def test_unknown_fields_of_the_same_version_are_ignored():
    data = planted_report().to_dict()
    data["future_report_field"] = 1
    data["coverage"]["future"] = []
    data["rows"][0]["future_row_field"] = "x"
    data["rows"][0]["metrics"]["future_metric"] = 0.5
    assert Report.from_dict(data) == planted_report()


def test_newer_schema_is_refused():
    data = planted_report().to_dict()
    data["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ValueError, match="newer than this fxalign reads"):
        Report.from_dict(data)
