"""The HTML report: structure, escaping, self-containment, and a real headless browser."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch

import fxalign
from fixtures.models import PlantedDivergence, planted_export_kwargs
from fixtures.reports import inline_report, overridden_report, planted_report
from fxalign import Metrics, Report, Row
from fxalign.report.html import render_html, write_html

EVIL = 'a<b>"&'


class _Dom(HTMLParser):
    """Flat list of elements (tag, attributes, text directly inside) of a page."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[dict] = []
        self._open: list[dict] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self._separate()
        element = {"tag": tag, "attrs": dict(attrs), "text": ""}
        self.elements.append(element)
        if tag not in {"meta", "input", "br", "line", "circle", "rect", "path"}:
            self._open.append(element)

    def handle_endtag(self, tag):
        while self._open:
            if self._open.pop()["tag"] == tag:
                break
        self._separate()

    def _separate(self):
        # text of neighbouring elements reads as separate words; tests normalise spaces
        for element in self._open:
            if element["text"] and not element["text"].endswith(" "):
                element["text"] += " "

    def handle_data(self, data):
        for element in self._open:
            element["text"] += data

    def find(self, tag=None, **attrs):
        return [
            e
            for e in self.elements
            if (tag is None or e["tag"] == tag)
            and all(e["attrs"].get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]

    def by_id(self, id_):
        (element,) = self.find(id=id_)
        return element


def _table_rows(dom: _Dom) -> list[dict]:
    return [e for e in dom.find("tr") if e["attrs"].get("id", "").startswith("row-")]


def _tree_nodes(dom: _Dom) -> list[dict]:
    return [e for e in dom.find("li") if "tree-node" in e["attrs"].get("class", "").split()]


@pytest.fixture(scope="module")
def real_report() -> Report:
    torch.manual_seed(0)  # module scope: conftest's per-test seeding has not run yet
    model = PlantedDivergence().eval()
    return fxalign.align(
        model,
        model.inputs(),
        exporter="torchscript",
        export_kwargs=planted_export_kwargs("torchscript"),
    )


def _without_local(report):
    for row in report.rows:
        row.local = row.local_scope = None
    return report


def test_banner_names_the_block_that_introduced_it_and_where_it_was_first_seen():
    dom = _Dom(render_html(inline_report()))
    headline = " ".join(dom.by_id("headline")["text"].split())
    assert headline.startswith("Introduced in mid (Mid)")
    assert "first seen at mid.clamp" in headline
    banner = " ".join(dom.by_id("banner")["text"].split())
    assert "self max_abs 7.15 introduced by this block's own code" in banner


def test_banner_says_which_module_breaks_and_by_how_much():
    dom = _Dom(render_html(planted_report()))
    banner = dom.by_id("banner")
    assert "diverged" in banner["attrs"]["class"]
    assert dom.by_id("verdict")["text"] == "DIVERGED"
    headline = " ".join(dom.by_id("headline")["text"].split())
    assert headline.startswith("Introduced in mid.clamp (BadClamp)")
    assert "first seen" not in headline
    text = " ".join(banner["text"].split())
    for expected in [
        "7.15",  # max_abs of the first divergence
        "71,500 \N{MULTIPLICATION SIGN} atol",
        "5 of 32",  # elements out of tolerance
        "local max_abs 7.15 introduced by this module alone",
        "atol 0.0001 · rtol 0.001",
        "model Planted",
        "exporter dynamo",
        "instrumentation fx",
        "leaf coverage 4/4 (100%)",
        "1 module without a marker",
        "a report-wide note",
    ]:
        assert expected in text, expected


def test_banner_states_the_tolerance_overrides_that_applied():
    dom = _Dom(render_html(overridden_report()))
    summary = " ".join(dom.find("p", **{"class": "summary"})[0]["text"].split())
    assert "(overrides: 'mid.*' atol=10 on 2 values)" in summary
    banner = " ".join(dom.by_id("banner")["text"].split())
    assert "atol + rtol·|torch|; overrides: 'mid.*' atol=10 on 2 values" in banner
    assert "overrides" not in " ".join(
        _Dom(render_html(planted_report())).by_id("banner")["text"].split()
    )


def test_aligned_banner():
    report = planted_report()
    for row in report.rows:
        if row.passed is False:
            row.passed, row.status = True, "ok"
    report.first_divergence = None
    dom = _Dom(render_html(report))
    assert dom.by_id("verdict")["text"] == "ALIGNED"
    assert "aligned" in dom.by_id("banner")["attrs"]["class"]
    text = " ".join(dom.by_id("banner")["text"].split())
    assert "worst max_abs 7.15 at mid.clamp (BadClamp)" in text
    assert not dom.find(id="first-marker")


def test_table_has_one_row_per_report_row_and_marks_the_first_divergence():
    report = planted_report()
    dom = _Dom(render_html(report))
    rows = _table_rows(dom)
    assert len(rows) == len(report.rows)
    assert [r["attrs"]["data-path"] for r in rows] == [r.module_path for r in report.rows]
    first = [r for r in rows if "first" in r["attrs"]["class"].split()]
    assert [r["attrs"]["id"] for r in first] == ["row-2"]
    assert "DIVERGED ← first divergence" in first[0]["text"]
    assert [r["attrs"]["data-failed"] for r in rows] == ["0", "0", "1", "1", "0", "1"]
    headers = [" ".join(th["text"].split()) for th in dom.find("th")]
    for column in ["#", "module", "max_abs", "local max_abs", "cosine", "sqnr_db", "status"]:
        assert column in headers
    # the missing row renders with dashes and its note
    missing = dom.by_id("row-4")
    assert "not in ONNX" in missing["text"] and "exporter removed this value" in missing["text"]
    assert "missing" in missing["attrs"]["class"]


def test_local_error_is_shown_when_present_and_its_note_otherwise():
    report = _without_local(planted_report())
    report.rows[2].local = Metrics(0.125, 0.01, 0.02, 0.5, 0.99, 30.0, 2, 32)
    report.rows[3].local_note = "inputs not observable on the ONNX side"
    page = render_html(report)
    dom = _Dom(page)
    banner = " ".join(dom.by_id("banner")["text"].split())
    assert "local max_abs 0.125 introduced by this module alone" in banner
    cells = [e for e in dom.find("td") if e["text"] == "0.125"]
    assert len(cells) == 1 and cells[0]["attrs"]["data-v"] == "0.125"
    assert "local: inputs not observable on the ONNX side" in dom.by_id("row-3")["text"]
    # the plot draws the local point of row 2 as a diamond
    assert len(dom.find("rect", **{"class": "point local"})) == 1
    tree_badges = [e["text"] for e in dom.find("span", **{"class": "badge local"})]
    assert tree_badges == ["local 0.125"]


def test_tree_contains_the_divergent_path():
    dom = _Dom(render_html(planted_report()))
    tree = dom.by_id("module-tree")
    assert "★ first divergence" in tree["text"]
    nodes = {e["attrs"]["data-path"]: e for e in _tree_nodes(dom)}
    assert set(nodes) == {"", "first", "mid", "mid.lin", "mid.clamp", "unused", "x", "x.y"}
    assert "★ first divergence" in nodes["mid.clamp"]["text"]
    for path in ("", "mid", "mid.clamp"):
        assert "has-first" in nodes[path]["attrs"]["class"], path
    assert "has-first" not in nodes["first"]["attrs"]["class"]
    assert "worst 7.15" in nodes["mid"]["text"]
    assert "no marker: called 0 times" in nodes["x.y"]["text"]
    # the way to the first divergence is open, the rest below the top level closed
    details = [e for e in dom.find("details") if "open" in e["attrs"]]
    assert len(details) == 2  # root and mid
    assert "Planted (model)" in nodes[""]["text"]


def test_user_strings_are_escaped():
    report = planted_report()
    bad = Row(
        EVIL,
        EVIL,
        0,
        "T<x>",
        "leaf",
        "diverged",
        False,
        1e-4,
        1e-3,
        onnx_name="</td><script>",
        metrics=Metrics(1.0, 1, 1, 1, 0.5, 3.0, 1, 4),
        notes=["<script>alert(1)</script>"],
    )
    report.rows.insert(0, bad)
    report.first_divergence = EVIL
    report.model = "M<&>"
    report.notes.append("</ul><b>bold</b>")
    report.exporter_warnings = ["<img src=x>"]
    page = render_html(report)
    assert EVIL not in page
    assert "<script>alert" not in page and "<img" not in page and "<b>bold" not in page
    assert "a&lt;b&gt;&quot;&amp;" in page
    dom = _Dom(page)
    assert [e["tag"] for e in dom.elements].count("script") == 1
    # the parsed page gives back exactly the user's strings
    assert dom.by_id("row-0")["attrs"]["data-path"] == EVIL
    assert EVIL in dom.by_id("headline")["text"]
    assert any(e["attrs"]["data-path"] == EVIL for e in _tree_nodes(dom))
    assert "first divergence: " + EVIL in dom.find("text", **{"class": "first-label"})[0]["text"]


def _assert_self_contained(page: str) -> None:
    assert "http://" not in page and "https://" not in page
    lowered = page.lower()
    for reference in ("<link", " src=", "@import", "url(", "<iframe", "<object", "<embed"):
        assert reference not in lowered, reference
    hrefs = re.findall(r'href="([^"]*)"', page)
    assert hrefs and all(h.startswith("#") for h in hrefs), hrefs


def test_page_is_self_contained(real_report):
    _assert_self_contained(render_html(planted_report()))
    _assert_self_contained(render_html(real_report))


def test_plot_clamps_zero_inf_nan_and_missing_values():
    report = _without_local(planted_report())
    report.rows[1].metrics.max_abs = math.nan
    report.rows[3].metrics.max_abs = math.inf
    report.rows[1].local = Metrics(0.0, 0, 0, 0, 1, math.inf, 0, 32)
    dom = _Dom(render_html(report))
    svg = dom.by_id("plot")
    assert svg["attrs"]["data-rows"] == str(len(report.rows))
    titles = [e["text"] for e in dom.find("title")]
    assert "#0 first (Linear): cumulative max_abs 0 (drawn on the 0 line)" in titles
    assert "#1 mid.lin (Linear): cumulative max_abs nan (drawn on the nan line)" in titles
    assert "#1 mid.lin (Linear): local max_abs 0 (drawn on the 0 line)" in titles
    assert "#3 mid (Mid): cumulative max_abs inf (drawn on the inf line)" in titles
    assert "#4 unused: not compared (not in ONNX)" in titles
    clamped = [e for e in dom.elements if "clamped" in e["attrs"].get("class", "").split()]
    assert len(clamped) == 4
    # every coordinate is a finite number
    for element in dom.elements:
        for key in ("x", "y", "cx", "cy", "x1", "x2", "y1", "y2"):
            if key in element["attrs"]:
                assert math.isfinite(float(element["attrs"][key])), element
    # lines join points on the log scale only; clamped points stand alone
    band_ys = {e["attrs"]["cy"] for e in clamped if e["tag"] == "circle"}
    for path in dom.find("path"):
        points = re.findall(r"[ML](-?[\d.]+),(-?[\d.]+)", path["attrs"]["d"])
        assert points and not {y for _, y in points} & band_ys
    marker = dom.by_id("first-marker")
    (point,) = [e for e in dom.find("circle") if "fail" in e["attrs"]["class"].split()][:1]
    assert marker["attrs"]["x1"] == point["attrs"]["cx"]  # the line goes through row 2


def test_empty_report_renders():
    page = render_html(Report("Empty", "dynamo", 1e-4, 1e-3, rows=[]))
    assert "No rows to plot." in page and "ALIGNED" in page


def test_write_html_of_a_real_run(real_report, tmp_path):
    path = write_html(real_report, tmp_path / "report.html")
    dom = _Dom(path.read_text(encoding="utf-8"))
    assert len(_table_rows(dom)) == len(real_report.rows) == 16
    assert dom.by_id("verdict")["text"] == "DIVERGED"
    assert "mid.clamp" in dom.by_id("headline")["text"]
    paths = {e["attrs"]["data-path"] for e in _tree_nodes(dom)}
    assert {"mid", "mid.clamp", "after.2.1"} <= paths


# ---- a real browser ------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium")


def _dump_dom(url: str, tmp_path) -> str:
    assert CHROMIUM is not None
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (apt-get install chromium); .ci/run does"
)
def test_page_works_in_a_headless_browser(real_report, tmp_path):
    path = write_html(real_report, tmp_path / "report.html")
    dom = _Dom(_dump_dom(path.as_uri(), tmp_path))
    (body,) = dom.find("body")
    assert "data-error" not in body["attrs"], body["attrs"]["data-error"]
    assert body["attrs"].get("data-ready") == "1"  # the script ran to its end
    rows = _table_rows(dom)
    assert len(rows) == 16 and not any("hidden" in r["attrs"] for r in rows)
    assert dom.by_id("verdict")["text"] == "DIVERGED"
    assert dom.by_id("row-count")["text"] == "showing 16 of 16 rows"  # written by the script
    assert "asc" in dom.find("th")[0]["attrs"]["class"]
    assert len(dom.find("circle")) == 16  # one cumulative point per compared row
    assert dom.find(id="first-marker")
    assert "★ first divergence" in dom.by_id("module-tree")["text"]

    # the script applies a filter and the failing-only toggle from the address ...
    dom = _Dom(_dump_dom(path.as_uri() + "#filter=mid&failing=1", tmp_path))
    assert _visible(dom) == ["mid.clamp", "mid"]  # mid.lin matches but passes
    assert dom.by_id("row-count")["text"] == "showing 2 of 16 rows"

    # ... and sorts, worst first, keeping rows without values last
    dom = _Dom(_dump_dom(path.as_uri() + "#sort=5&dir=desc", tmp_path))
    order = [int(r["attrs"]["data-i"]) for r in _table_rows(dom)]
    expected = sorted(range(16), key=lambda i: (-real_report.rows[i].metrics.max_abs, i))
    assert order == expected and order != list(range(16))
    assert "desc" in dom.find("th")[5]["attrs"]["class"]


def _visible(dom: _Dom) -> list[str]:
    (body,) = dom.find("body")
    assert body["attrs"].get("data-ready") == "1" and "data-error" not in body["attrs"]
    return [r["attrs"]["data-path"] for r in _table_rows(dom) if "hidden" not in r["attrs"]]
