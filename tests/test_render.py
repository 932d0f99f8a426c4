"""Golden-file tests of the renderings. Regenerate with ``pytest --update-golden``."""

import json
import math
from pathlib import Path

import pytest

from fixtures.reports import inline_report, overridden_report, planted_report
from fxalign import Report, render_text
from fxalign.report.model import STATUS_LABELS
from fxalign.report.summary import format_float, summary_line
from fxalign.testing import divergence_message

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
    assert "first divergence: introduced in mid.clamp (BadClamp), max_abs=7.15, local=7.15" in line
    assert "first seen" not in line


def test_summary_names_the_block_that_introduced_it_and_where_it_was_first_seen(update_golden):
    report = inline_report()
    line = summary_line(report)
    assert "introduced in mid (Mid), max_abs=7.15, self=7.15 (introduced by its own code)" in line
    assert line.endswith("; first seen at mid.clamp (max_abs=7.15).")
    text = render_text(report, width=120)
    _check("report_inline.txt", text, update_golden)
    marked = [line for line in _table_lines(text) if "▶" in line]
    assert len(marked) == 1 and " mid " in marked[0]


def test_summary_says_when_the_culprit_is_named_by_its_cumulative_error():
    line = summary_line(overridden_report())
    assert "first divergence: mid (Mid), max_abs=7.15; no introduced error for it" in line
    assert "rerun on ONNX values failed" in line


def test_summary_says_when_the_error_accumulates():
    report = inline_report()
    report.row("mid").local = report.row("mid.clamp").local
    report.first_divergence, report.culprit_basis = None, "accumulated"
    line = summary_line(report)
    assert "no module breaks tolerance on its own: the error accumulates" in line
    assert "first seen at mid.clamp (BadClamp), max_abs=7.15" in line


def test_format_float():
    assert [format_float(v) for v in (None, 0.0, 1.5, 1e-7, math.inf)] == [
        "-",
        "0",
        "1.5",
        "1.00e-07",
        "inf",
    ]


@pytest.mark.parametrize("width", [80, 120])
def test_table_fitted_to_the_terminal_matches_golden(width, update_golden):
    _check(f"report_{width}.txt", render_text(planted_report(), width=width), update_golden)


def _table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line[:1] in "┏┃┡│└"]


@pytest.mark.parametrize("width", [56, 64, 80, 100, 120, 150, 200])
def test_table_fits_and_never_cuts_a_number_or_a_status(width):
    report = planted_report()
    report.rows[3].module_path = report.rows[3].name = "encoder.layer.11.attention.output"
    text = render_text(report, width=width)
    table = _table_lines(text)
    assert table and all(len(line) <= width for line in text.splitlines())
    cells = [[c.strip() for c in line.strip("│").split("│")] for line in table if "│" in line]
    for row in report.rows:
        shown = next(c for c in cells if c[0] == str(report.rows.index(row)))
        assert format_float(row.metrics.max_abs if row.metrics else None) in shown
        assert STATUS_LABELS[row.status] in shown
    assert "…" not in "".join(table)
    header = next(line for line in table if line.startswith("┃"))
    priority = ("type", "shape", "dtype", "cosine", "mean_abs", "max_rel", "rmse")
    left_out = [c for c in priority if f" {c} " not in header]
    words = " ".join(text.split())
    if left_out:  # the columns left out are the least important ones, and they are named
        assert f"left out to fit {width} columns: {', '.join(left_out)} " in words
        assert list(priority[-len(left_out) :]) == left_out
    else:
        assert "left out" not in words


def test_first_divergence_is_marked_outside_the_status_cell():
    table = _table_lines(render_text(planted_report(), width=150))
    marked = [line for line in table if "▶" in line]
    assert len(marked) == 1 and " mid.clamp " in marked[0]
    assert "│ DIVERGED   │" in marked[0] and "first divergence" not in "".join(table)
    aligned = planted_report()
    aligned.rows = aligned.rows[:2]
    aligned.first_divergence = None
    assert "▶" not in render_text(aligned)  # no mark column without a divergence


def test_summary_states_the_overrides_that_applied():
    report = overridden_report()
    line = summary_line(report)
    # mid.lin and mid.clamp match mid.*; unused (not compared) and none.* apply to no value
    assert line.startswith(
        "DIVERGED: 2 of 5 values break atol=0.0001, rtol=0.001 + round-off "
        "(overrides: 'mid.*' atol=10 on 2 values), 1 not compared; first divergence: mid (Mid), "
    )
    for row in report.rows:
        row.passed, row.status = (True, "ok") if row.passed is not None else (None, row.status)
    report.first_divergence = None
    assert summary_line(report) == (
        "ALIGNED: 5 values within atol=0.0001, rtol=0.001 + round-off "
        "(overrides: 'mid.*' atol=10 on 2 values), 1 not compared."
    )
    assert summary_line(planted_report()).count("overrides") == 0


def test_assert_aligned_message_states_the_overrides():
    message = divergence_message(overridden_report())
    assert "(overrides: 'mid.*' atol=10 on 2 values)" in message.splitlines()[-1]
