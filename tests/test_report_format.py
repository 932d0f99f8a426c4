"""The JSON layout documented in docs/report-format.md."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.reports import planted_report
from fxalign import Coverage, Metrics, Report, Row
from fxalign.report.model import SCHEMA_VERSION, STATUS_LABELS, Fidelity, SampleStats


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


NON_FINITE = (math.inf, -math.inf, math.nan)


def _non_finite_everywhere(value: float) -> Report:
    """The planted report with ``value`` in every float field of every record."""
    report = planted_report()
    report.atol = report.rtol = value
    report.timings = {"total": value, "export": 1.5}
    report.tolerances = {"mid.*": {"atol": value, "rtol": value}}
    for row in report.rows:
        row.atol = row.rtol = value
        row.local = Metrics(value, value, value, value, value, value, 1, 32)
        row.samples = SampleStats(3, 1, value, value, 2)
        if row.metrics is not None:
            for name in ("max_abs", "mean_abs", "rmse", "max_rel", "cosine", "sqnr_db"):
                setattr(row.metrics, name, value)
    report.fidelity = Fidelity(value, {"Conv": 2}, {"Conv": 3}, {"Conv": 1}, value)
    return report


@pytest.mark.parametrize("value", NON_FINITE, ids=["inf", "-inf", "nan"])
def test_round_trip_is_equal_with_non_finite_floats_in_every_float_field(value):
    report = _non_finite_everywhere(value)
    text = report.to_json()
    json.loads(text, parse_constant=pytest.fail)  # strict JSON: no NaN or Infinity literals
    loaded = Report.from_json(text)
    assert loaded == report
    assert loaded.rows[0].samples is not None
    assert isinstance(loaded.rows[0].samples.max_abs_max, float)
    assert loaded.fidelity is not None and isinstance(loaded.fidelity.output_max_abs, float)
    assert isinstance(loaded.timings["total"], float)
    assert isinstance(loaded.tolerances["mid.*"]["atol"], float)


def test_strings_that_spell_non_finite_floats_stay_strings():
    report = planted_report()
    report.notes = ["nan", "inf"]
    report.rows[0].module_type = "-inf"
    report.versions = {"torch": "nan"}
    loaded = Report.from_json(report.to_json())
    assert loaded == report and loaded.notes == ["nan", "inf"]
    assert loaded.rows[0].module_type == "-inf" and loaded.versions == {"torch": "nan"}


def test_nan_reads_equal_to_nan_and_nothing_else():
    a, b = planted_report(), planted_report()
    a.rows[1].metrics.cosine = float("nan")
    b.rows[1].metrics.cosine = float("nan")  # another NaN object
    assert a == b
    b.rows[1].metrics.cosine = 0.5
    assert a != b and a.rows[1] != b.rows[1]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["rows"][0]["metrics"].update(max_abs="big"), r"rows\[0\]\.metrics\.max_abs"),
        (lambda d: d["rows"][1].update(status="fine"), r"rows\[1\]\.status"),
        (lambda d: d.update(rows={}), r"report\.rows: expected a list"),
        (lambda d: d["rows"][2].pop("kind"), r"rows\[2\]: .*kind"),
        (lambda d: d.update(sample_count=True), r"report\.sample_count: expected an integer"),
    ],
)
def test_values_of_the_wrong_type_are_refused_with_where_they_are(mutate, message):
    data = planted_report().to_dict()
    mutate(data)
    with pytest.raises(TypeError, match=message):
        Report.from_dict(data)


_floats = st.floats(allow_nan=True, allow_infinity=True)
_text = st.text(max_size=8) | st.sampled_from(["nan", "inf", "-inf", ""])
_counts = st.dictionaries(_text, st.integers(0, 99), max_size=2)
_metrics = st.builds(
    Metrics, *[_floats] * 6, st.integers(0, 99), st.integers(0, 99), st.integers(0, 9)
)
_rows = st.builds(
    Row,
    name=_text,
    module_path=_text,
    call_index=st.integers(0, 3),
    module_type=_text,
    kind=st.sampled_from(["leaf", "block", "output"]),
    status=st.sampled_from(sorted(STATUS_LABELS)),
    passed=st.none() | st.booleans(),
    atol=_floats,
    rtol=_floats,
    onnx_name=st.none() | _text,
    torch_shape=st.none() | st.lists(st.integers(0, 9), max_size=3),
    onnx_shape=st.none() | st.lists(st.integers(0, 9), max_size=3),
    torch_dtype=st.none() | _text,
    onnx_dtype=st.none() | _text,
    metrics=st.none() | _metrics,
    notes=st.lists(_text, max_size=2),
    local=st.none() | _metrics,
    local_note=st.none() | _text,
    samples=st.none()
    | st.builds(
        SampleStats, st.integers(0, 9), st.integers(0, 9), *[_floats] * 2, st.integers(0, 9)
    ),
    onnx_node=st.none() | _text,
)
_reports = st.builds(
    Report,
    model=_text,
    exporter=_text,
    atol=_floats,
    rtol=_floats,
    rows=st.lists(_rows, max_size=3),
    first_divergence=st.none() | _text,
    instrumentation=_text,
    instrumentation_note=st.none() | _text,
    coverage=st.builds(
        Coverage,
        st.lists(_text, max_size=2),
        st.dictionaries(_text, _text, max_size=2),
        st.integers(0, 9),
        st.integers(0, 9),
        st.lists(_text, max_size=2),
        st.dictionaries(_text, _text, max_size=2),
    ),
    notes=st.lists(_text, max_size=2),
    exporter_warnings=st.lists(_text, max_size=2),
    fidelity=st.none()
    | st.builds(Fidelity, st.none() | _floats, _counts, _counts, _counts, _floats),
    timings=st.dictionaries(_text, _floats, max_size=3),
    versions=st.dictionaries(_text, _text, max_size=2),
    tolerances=st.dictionaries(
        _text, st.dictionaries(st.sampled_from(["atol", "rtol"]), _floats), max_size=2
    ),
    dtype_tolerances=st.booleans(),
    sample_count=st.integers(1, 9),
)


@settings(max_examples=60, deadline=None)
@given(report=_reports)
def test_every_report_loads_back_equal(report):
    text = report.to_json()
    json.loads(text, parse_constant=pytest.fail)
    assert Report.from_json(text) == report
