"""Golden-file tests of the renderings. Regenerate with ``pytest --update-golden``."""

import json
import math
from pathlib import Path

from fixtures.reports import planted_report
from fxalign import Report, render_text
from fxalign.report.summary import format_float, summary_line

GOLDEN = Path(__file__).parent / "golden"


def _check(name: str, text: str, update: bool) -> None:
    path = GOLDEN / name
    if update:
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"missing golden file {path}; run pytest --update-golden"
    assert text == path.read_text(encoding="utf-8")


def test_text_rendering_matches_golden(update_golden):
    _check("report.txt", render_text(planted_report(), width=150), update_golden)


def test_top_k_rendering_matches_golden(update_golden):
    _check("report_top2.txt", render_text(planted_report(), top=2, width=150), update_golden)


def test_json_matches_golden_and_round_trips(update_golden):
    report = planted_report()
    text = json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n"
    _check("report.json", text, update_golden)
    assert Report.from_json(report.to_json()) == report
    assert json.loads(report.to_json())["rows"][0]["metrics"]["sqnr_db"] == "inf"


def test_summary_names_the_first_divergence():
    line = summary_line(planted_report())
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
