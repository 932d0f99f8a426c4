import json
import textwrap

import pytest

from fxalign.cli import main

USER_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()

    def make_with_inputs():
        return make(), (torch.randn(2, 8),)

    def broken():
        raise RuntimeError("no weights here")

    def four():
        return make(), (torch.randn(2, 8),), {}, "extra"
    """
)


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "user_model.py"
    path.write_text(USER_FILE)
    return path


def test_demo_shows_the_conv_blocks_aligned_and_a_divergence_explained(capsys):
    assert main(["demo"]) == 0  # everything behaved as the demo expects
    out = capsys.readouterr().out
    conv, softclip = out.split("== SoftClipNet")
    for exporter in ("dynamo", "torchscript"):
        assert f"fxalign ConvBlocks  exporter={exporter}" in conv
        assert f"fxalign SoftClipNet  exporter={exporter}" in softclip
    for name in ["convs1.0", "convs1.2", "convs2.1", "convs3.1", "convs4.0", "convs4.2", "output"]:
        assert f" {name} " in conv
    assert conv.count("ALIGNED") == 2 and "DIVERGED" not in conv
    words = " ".join(softclip.split())  # the explanation is wrapped at 100 columns
    assert words.count("first divergence: introduced in act (SoftClip)") == 2
    assert words.count("the error starts there") == 2
    assert words.count("they only inherit it") == 2
    assert words.count("`fxalign align` would exit 1 (diverged)") == 2
    assert words.count("op: fxalign_demo.softclip.default in act at") == 2


def test_demo_says_when_it_did_not_go_as_expected():
    from fixtures.reports import planted_report
    from fxalign.demo import unexpected

    diverged_elsewhere = planted_report()  # diverges at mid.clamp, not at act
    problems = unexpected(diverged_elsewhere, diverged_elsewhere)
    assert any("ConvBlocks" in p for p in problems)
    assert any("expected at act" in p for p in problems)


def test_align_on_a_user_file_writes_json(user_file, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code = main(["align", f"{user_file}:make", "--input", "2x8", "--json", str(out_json)])
    assert code == 0
    data = json.loads(out_json.read_text())
    assert [r["name"] for r in data["rows"]] == ["0", "1", "2", ""]
    assert "ALIGNED" in capsys.readouterr().out


def test_factory_may_return_inputs(user_file):
    assert main(["align", f"{user_file}:make_with_inputs", "--exporter", "torchscript"]) == 0


def test_divergence_exits_1():
    assert (
        main(
            [
                "align",
                "tests.fixtures.models:PlantedDivergence",
                "-i",
                "4x8",
                "--exporter",
                "torchscript",
            ]
        )
        == 1
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["align", "nonexistent_pkg_xyz:make", "-i", "1x1"], "cannot import module"),
        (["align", "{file}:nope", "-i", "2x8"], "has no attribute 'nope'"),
        (["align", ":make", "-i", "2x8"], "names no module or file"),
        (["align", "{file}:", "-i", "2x8"], "names no factory"),
        (["align", "{file}:broken", "-i", "2x8"], "no weights here"),
        (["align", "{file}:four"], "got a tuple of 4: (Sequential, tuple, dict, str)"),
        (["align", "{file}:make", "-i", "2x9"], "shapes cannot be multiplied"),
        (["align", "{file}:make", "-i", "2xq"], "cannot parse input spec"),
        (["align", "{file}:make"], "no inputs"),
    ],
)
def test_user_errors_exit_2_without_traceback(user_file, capsys, argv, message):
    argv = [a.replace("{file}", str(user_file)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_json_is_not_overwritten_without_flag(user_file, tmp_path):
    out_json = tmp_path / "r.json"
    out_json.write_text("keep me")
    assert main(["align", f"{user_file}:make", "-i", "2x8", "--json", str(out_json)]) == 2
    assert out_json.read_text() == "keep me"


def test_tolerance_override_on_the_command_line(user_file, tmp_path):
    out_json = tmp_path / "r.json"
    argv = ["align", f"{user_file}:make", "-i", "2x8", "--tol", "1:0.5:0", "--json", str(out_json)]
    assert main(argv) == 0
    data = json.loads(out_json.read_text())
    assert data["tolerances"] == {"1": {"atol": 0.5, "rtol": 0.0}}
    assert [r["atol"] for r in data["rows"]] == [1e-4, 0.5, 1e-4, 1e-4]
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage error
        main(["align", f"{user_file}:make", "-i", "2x8", "--tol", "oops"])
    assert exit_info.value.code == 2


def test_memory_bound_and_no_local_on_the_command_line(user_file, tmp_path):
    paths = {}
    for label, extra in [
        ("whole", []),
        ("batched", ["--max-outputs-per-run", "1"]),
        ("nolocal", ["--no-local"]),
    ]:
        paths[label] = tmp_path / f"{label}.json"
        argv = ["align", f"{user_file}:make", "-i", "2x8", "--exporter", "torchscript"]
        assert main([*argv, "--no-fidelity", "--json", str(paths[label]), *extra]) == 0
    rows = {k: json.loads(p.read_text())["rows"] for k, p in paths.items()}
    assert [r["metrics"] for r in rows["batched"]] == [r["metrics"] for r in rows["whole"]]
    assert [r["local"] for r in rows["batched"]] == [r["local"] for r in rows["whole"]]
    modules = [r for r in rows["nolocal"] if r["kind"] != "output"]
    assert all(r["local"] is None and "local=False" in r["local_note"] for r in modules)


def test_max_outputs_per_run_must_be_positive_on_the_command_line(user_file, capsys):
    with pytest.raises(SystemExit):
        main(["align", f"{user_file}:make", "-i", "2x8", "--max-outputs-per-run", "0"])
    assert "whole number >= 1" in capsys.readouterr().err


def test_python_dash_m_fxalign_runs_the_command():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "fxalign", "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: fxalign")
