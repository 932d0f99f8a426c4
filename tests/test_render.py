"""Golden-file tests of the renderings. Regenerate with ``pytest --update-golden``."""

import json
import math
from pathlib import Path

from fxalign import Coverage, Metrics, Report, Row
from fxalign.render import format_float, render_text, summary_line

GOLDEN = Path(__file__).parent / "golden"


def _report() -> Report:
    def row(name, path, kind, status, passed, max_abs, notes=(), call=0, typ="Linear"):
        metrics = None
        if max_abs is not None:
            metrics = Metrics(
                max_abs,
                max_abs / 4,
                max_abs / 3,
                max_abs * 10,
                1 - max_abs / 10,
                math.inf if max_abs == 0 else 60.0,
                0 if passed else 5,
                32,
            )
        return Row(
            name,
            path,
            call,
            typ,
            kind,
            status,
            passed,
            1e-4,
            1e-3,
            f"t_{name}",
            [4, 8],
            [4, 8],
            "float32",
            "float32",
            metrics,
            list(notes),
        )

    rows = [
        row("first", "first", "leaf", "ok", True, 0.0),
        row("mid.lin", "mid.lin", "leaf", "ok", True, 2.4e-7),
        row("mid.clamp", "mid.clamp", "leaf", "diverged", False, 7.15, typ="BadClamp"),
        row("mid", "mid", "block", "diverged", False, 7.15, typ="Mid"),
        row(
            "unused",
            "unused",
            "leaf",
            "missing_in_onnx",
            None,
            None,
            ["not in ONNX graph: the exporter removed this value (unused or folded away)"],
        ),
        row("", "", "output", "diverged", False, 0.0357, typ="Planted"),
    ]
    return Report(
        model="Planted",
        exporter="dynamo",
        atol=1e-4,
        rtol=1e-3,
        rows=rows,
        first_divergence="mid.clamp",
        instrumentation="fx",
        coverage=Coverage(
            ["first", "mid.lin", "mid.clamp", "mid", "unused"], {"x.y": "called 0 times"}, 4, 4
        ),
        notes=["a report-wide note"],
        timings={"total": 1.0},
        versions={"torch": "x"},
    )


def _check(name: str, text: str, update: bool) -> None:
    path = GOLDEN / name
    if update:
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"missing golden file {path}; run pytest --update-golden"
    assert text == path.read_text(encoding="utf-8")


def test_text_rendering_matches_golden(update_golden):
    _check("report.txt", render_text(_report(), width=150), update_golden)


def test_top_k_rendering_matches_golden(update_golden):
    _check("report_top2.txt", render_text(_report(), top=2, width=150), update_golden)


def test_json_matches_golden_and_round_trips(update_golden):
    report = _report()
    text = json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n"
    _check("report.json", text, update_golden)
    assert Report.from_json(report.to_json()) == report
    assert json.loads(report.to_json())["rows"][0]["metrics"]["sqnr_db"] == "inf"


def test_summary_names_the_first_divergence():
    line = summary_line(_report())
    assert line.startswith("DIVERGED: 3 of 5 values")
    assert "first divergence: mid.clamp (BadClamp), max_abs=7.15" in line


def test_format_float():
    assert [format_float(v) for v in (None, 0.0, 1.5, 1e-7, math.inf)] == [
        "-",
        "0",
        "1.5",
        "1.00e-07",
        "inf",
    ]
