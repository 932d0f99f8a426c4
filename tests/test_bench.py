"""Smoke test of the benchmark: structure and contents, never timings."""

import json

import pytest

from benchmarks.cases import build_case, count_modules, synthetic_case
from benchmarks.contention import CONDITIONS
from benchmarks.harness import invocation, main
from benchmarks.markdown import render
from benchmarks.profile import PHASES, profile_export
from benchmarks.sections import attach_section, in_the_way_section, onnx_in_the_way_section
from benchmarks.studies import contention_section
from benchmarks.targets import targets


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "--quick",
        "--models",
        "convblocks",
        "--sizes",
        "10",
        "20",
        "40",
        "--memory-model",
        "convblocks",
        "--max-outputs-per-run",
        "4",
        "--profile-models",
        "--out",
        str(out / "benchmarks.md"),
        "--json",
        str(out / "benchmarks.json"),
    ]
    assert main(argv) == 0
    return json.loads((out / "benchmarks.json").read_text()), (out / "benchmarks.md").read_text()


@pytest.mark.slow  # the smoke run: a few minutes on 2 cores
def test_every_measurement_is_there(smoke):
    results, _ = smoke
    assert results["errors"] == []
    assert results["machine"]["cores"] >= 1 and results["machine"]["versions"]["torch"]
    (model,) = results["models"]
    assert model["name"] == "convblocks" and model["modules"] == 15
    assert set(model["exporters"]) == {"dynamo", "torchscript"}
    for exporter, row in model["exporters"].items():
        exp = row["export"]
        assert exp["instrumentation"] == "fx"
        debug_nodes = exp["instrumented"]["ops"]["fxalign::Debug"]
        assert debug_nodes + len(exp["aliases"]) == exp["markers"]
        assert "fxalign::Debug" not in exp["debug"]["ops"]
        assert exp["plain"]["bytes"] > 0 and exp["plain_s"] > 0 and exp["ratio"] > 0
        assert row["ort"]["debug"]["outputs"] > row["ort"]["plain"]["outputs"]
        assert row["ort"]["plain"]["peak_rss"] > 0
        al = row["align"]
        assert al["passed"] and al["floor_s"] > 0 and set(al["stages"]) >= {"export", "compare"}
        side = row["onnx_side"]
        assert side["max_value_difference"] == 0.0
        assert side["rows_fxalign"] == side["rows_tutorial"] == exp["markers"]
        assert ("verify" in row) == (exporter == "dynamo")
        cold = row["cold"]
        assert set(cold) == {"floors", "default", "markers", "onnx", "attach"}
        assert cold["floors"]["file"].keys() == {"floor_s", "torch_forward_s", "ort_s"}
        modes = ("default", "markers", "onnx", "attach")
        assert all(cold[m]["align_s"] > 0 and cold[m]["ratio"] > 0 for m in modes)
        assert al["markers_s"] > 0 and al["markers_ratio"] > 0
        at = al["attach"]
        assert {"run_torch", "locate", "load", "run_onnx", "compare"} <= set(at["onnx_stages"])
        assert at["elements_compared"] > 0 and at["onnx_floor"]["ort_s"] > 0
    assert model["exporters"]["dynamo"]["verify"]["values"] > 0


@pytest.mark.slow  # the smoke run: a few minutes on 2 cores
def test_the_loaded_machine_case_is_measured(smoke):
    results, text = smoke
    c = results["contention"]
    assert c["model"] == "convblocks" and c["burners"] == c["usable_cpus"] >= 1
    assert list(c["conditions"]) == list(CONDITIONS)
    for times in c["conditions"].values():
        assert {"plain export", "torch forward", "align", "run_onnx", "compare"} <= set(times)
    assert c["relative"]["plain export"] == 1.0
    assert "## On a loaded machine" in text


@pytest.mark.slow  # the smoke run: a few minutes on 2 cores
def test_scaling_memory_and_profiles(smoke):
    results, _ = smoke
    sizes = sorted({p["modules"] for p in results["scaling"]})
    assert sizes == [count_modules(synthetic_case(n).model) for n in (10, 20, 40)]
    # the default mode: aligned synthetic models are answered from their plain export
    assert all(p["instrumentation"] == "attach" and p["unmarked"] > 0 for p in results["scaling"])
    memory = results["memory"]
    for level in ("run_onnx", "align"):
        assert memory[level]["identical"]
        assert memory[level]["split"]["max_outputs_per_run"] == 4


def test_export_profile_splits_time_by_phase(tmp_path):
    profile = profile_export(build_case("convblocks"), "torchscript", 1, tmp_path)
    phases = profile["phases"]
    assert set(phases) == {*PHASES["torchscript"], "total"}
    assert phases["marker calls (_mark)"]["plain"] == 0
    assert phases["marker calls (_mark)"]["instrumented"] > 0
    assert phases["total"]["instrumented"] >= phases["jit trace"]["instrumented"] > 0


@pytest.mark.slow  # the smoke run: a few minutes on 2 cores
def test_markdown_is_written_from_the_results(smoke):
    results, text = smoke
    assert text == render(results)
    for heading in (
        "## Machine",
        "## Export: plain vs instrumented",
        "## ONNX Runtime: plain vs debug model",
        "## End to end: `align` vs the floor",
        "## What stands in the way of `align` <= 1.3x the floor",
        "## The same report, other ways",
        "## Scaling with the number of modules",
        "## Memory: `max_outputs_per_run`",
    ):
        assert heading in text
    assert results["machine"]["cpu"] in text


def test_targets_are_judged_on_the_named_models():
    def model(name, export_ratio, align_ratio):
        return {
            "name": name,
            "exporters": {
                "dynamo": {
                    "export": {"ratio": export_ratio},
                    "align": {"ratio": align_ratio, "align_s": 2.0},
                    "verify": {"total_s": 50.0},
                }
            },
        }

    results = {
        "settings": {"exporters": ["dynamo"]},
        "models": [model("resnet50", 1.1, 1.5), model("gpt2", 9.0, 9.0)],
        "scaling": [
            {"exporter": "dynamo", "modules": m, "align_s": t, "stages": {}}
            for m, t in ((100, 1.0), (1000, 2.0), (5000, 6.5))
        ],
    }
    got = {(t["target"].split()[0], t["model"]): t["met"] for t in targets(results)}
    assert got == {
        ("instrumented", "resnet50"): True,
        ("align", "resnet50"): False,
        (">=", "resnet50"): True,
        ("flat", "synthetic"): True,
    }


def _contention(relative_compare: float) -> dict:
    quiet = {"plain export": 2.0, "torch forward": 0.5, "align": 10.0, "compare": 1.0}
    loaded = {
        "plain export": 3.0,
        "torch forward": 2.0,
        "align": 20.0,
        "compare": 1.5 * relative_compare,
    }
    slowdown = {k: loaded[k] / quiet[k] for k in quiet}
    return {
        "model": "resnet50",
        "exporter": "dynamo",
        "burners": 2,
        "usable_cpus": 2,
        "conditions": dict(zip(CONDITIONS, (quiet, loaded, quiet), strict=True)),
        "slowdown": slowdown,
        "relative": {k: v / 1.5 for k, v in slowdown.items()},
        "bounded_slowdown": {k: 1.0 for k in quiet},
    }


@pytest.mark.parametrize(("relative", "met"), [(1.0, True), (7.0, False)])
def test_loaded_machine_targets_and_table(relative, met):
    results = {"contention": _contention(relative)}
    judged = {t["target"].split(" of ")[1].split()[0]: t for t in targets(results)}
    assert set(judged) == {"compare", "align"}  # run_onnx was not measured here
    assert judged["compare"]["met"] is met and judged["align"]["met"] is True
    assert judged["align"]["value"] == "2.00x / 1.50x = 1.33"
    text = "\n".join(contention_section(results))
    row = next(line for line in text.splitlines() if line.startswith("| compare |"))
    assert f"| {relative:.2f}x |" in row
    assert "2 CPU-burning helper processes" in text


def test_attach_modes_are_judged_warm_and_cold():
    at = {"onnx_ratio": 1.1, "export_attach_ratio": 1.3, "onnx_s": 1.1, "onnx_floor_s": 1.0}
    at |= {"export_attach_s": 2.6, "rows": 5, "compared": 4, "passed": True}
    cold = {m: {"align_s": 3.0, "floor_s": 2.0, "ratio": 1.5} for m in ("markers", "onnx")}
    cold["attach"] = {"align_s": 2.2, "floor_s": 2.0, "ratio": 1.1}
    al = {"align_s": 2.4, "ratio": 1.2, "floor_s": 2.0, "attach": at}
    results = {"models": [{"name": "gpt2", "exporters": {"dynamo": {"align": al, "cold": cold}}}]}
    got = {t["target"]: t["met"] for t in targets(results)}
    assert got == {
        "align(onnx=file) <= 1.15x its floor (warm)": True,
        "align(attach=True) <= 1.2x its floor (warm)": False,
        "align(onnx=file) <= 1.15x its floor (cold)": False,
        "align(attach=True) <= 1.2x its floor (cold)": True,
    }
    row = attach_section(results)[-2]
    assert "| 3.000 (1.50x of 2.000) | 2.200 (1.10x of 2.000) |" in row


def test_time_over_the_floor_is_split_by_stage():
    align = {
        "align_s": 10.0,
        "floor_s": 4.0,
        "floor": {"plain_export_s": 3.0, "torch_forward_s": 0.5, "ort_s": 0.5},
        "stages": {
            "instrument": 0.5,
            "run_torch": 0.75,
            "export": 5.0,
            "extract": 0.25,
            "run_onnx": 3.0,
            "compare": 2.0,
        },
        "no_local_s": 8.5,
        "ratio": 2.5,
    }
    results = {"models": [{"name": "resnet50", "exporters": {"dynamo": {"align": align}}}]}
    text = "\n".join(in_the_way_section(results))
    row = next(line for line in text.splitlines() if line.startswith("| resnet50 | dynamo | 4.000"))
    # over the floor 6 s, target allows 1.2 s; export +2, compare +2, ONNX side +0.5,
    # instrument +0.5, extract +0.25, PyTorch side +0.25, rest +0.5; local errors +1.5
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3:] == [
        "6.000", "1.200", "+2.000", "+2.000", "+0.500", "+0.500", "+0.250", "+0.250", "+0.500",
        "+1.500",
    ]  # fmt: skip
    assert "largest parts: export overhead 2.00 s, compare 2.00 s, ONNX side 0.50 s" in text


def test_time_over_the_onnx_floor_is_split_by_stage():
    attach = {
        "onnx_s": 0.5,
        "onnx_floor_s": 0.2,
        "onnx_ratio": 2.5,
        "onnx_floor": {"torch_forward_s": 0.05, "ort_s": 0.15},
        "onnx_stages": {
            "run_torch": 0.1,
            "locate": 0.02,
            "load": 0.1,
            "run_onnx": 0.07,
            "local": 0.01,
            "compare": 0.14,
        },
        "elements_compared": 30_000_000,
    }
    results = {
        "models": [
            {"name": "resnet50", "exporters": {"torchscript": {"align": {"attach": attach}}}}
        ]
    }
    text = "\n".join(onnx_in_the_way_section(results))
    row = next(line for line in text.splitlines() if line.startswith("| resnet50 | torchscript"))
    # over 0.3 s, 1.15x allows 0.03 s; capture +0.05, locate +0.02, ONNX side +0.02,
    # compare +0.15, rest +0.06; 0.15 s over 30 M elements is 5 ns each
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:] == [
        "0.200", "0.300", "0.030", "+0.050", "+0.020", "+0.020", "+0.150", "+0.060", "30.0 M",
        "5.0",
    ]  # fmt: skip
    assert "each of capture, compare alone takes more than that" in text
    one = {**attach, "onnx_stages": {**attach["onnx_stages"], "run_torch": 0.06}}
    one_text = "\n".join(
        onnx_in_the_way_section(
            {
                "models": [
                    {"name": "resnet50", "exporters": {"torchscript": {"align": {"attach": one}}}}
                ]
            }
        )
    )
    assert "; compare alone takes more than that" in one_text


def test_cases_are_built_from_configs():
    case = build_case("bert-tiny")
    assert case.args[0].shape == (1, 16) and case.modules > 10
    with pytest.raises(ValueError, match="known"):
        build_case("nope")


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["/usr/lib/python3/pytest", "-q"], "pytest -q"),
        (["/repo/benchmarks/run.py", "--out", "x.md"], "python -m benchmarks.run --out x.md"),
    ],
)
def test_the_page_names_the_command_that_was_run(monkeypatch, argv, command):
    monkeypatch.setattr("sys.argv", argv)
    assert invocation() == command
