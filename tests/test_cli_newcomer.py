"""A new user's first hour with the command line (issue 16): flags, file names, checks, noise."""

import json
import textwrap

import pytest

from fxalign.cli import main

USER_FILE = textwrap.dedent(
    """
    from pathlib import Path

    import torch
    from torch import nn

    class Net(nn.Module):  # built in training mode, as every module is
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 3)

        def forward(self, x):
            return self.lin(x)

    def counted():
        Path(__file__).with_name("built").touch()
        return Net()
    """
)


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "user_model.py"
    path.write_text(USER_FILE)
    return path


def test_verbose_is_accepted_after_the_command(user_file, tmp_path):
    missing = str(tmp_path / "missing.json")
    assert main(["report", missing, "--verbose"]) == 2
    assert main(["report", missing, "-v"]) == 2
    assert main(["-v", "report", missing]) == 2
    from fxalign.cli_parser import build_parser

    parser = build_parser()
    assert parser.parse_args(["-v", "align", "m:f"]).verbose  # not reset by the subcommand
    assert parser.parse_args(["align", "m:f", "--verbose"]).verbose
    assert not parser.parse_args(["align", "m:f"]).verbose


def test_a_model_class_in_training_mode_is_compared_without_a_warning(user_file, capfd):
    out_json = user_file.with_name("r.json")
    argv = ["align", f"{user_file}:Net", "-i", "2x8", "--exporter", "torchscript"]
    assert main([*argv, "--no-fidelity", "--json", str(out_json)]) == 0
    err = capfd.readouterr().err
    assert "training mode" not in err and "Warning" not in err
    assert json.loads(out_json.read_text())["rows"]


def test_dynamic_torchscript_export_gives_no_warning_about_its_own_axes(user_file, capsys):
    argv = ["align", f"{user_file}:Net", "-i", "2x8", "--sample", "4x8", "--dynamic"]
    assert main([*argv, "--exporter", "torchscript", "--no-fidelity"]) == 0
    out = capsys.readouterr().out
    assert "samples 2" in out and "dynamic axes" not in out and "exporter warning" not in out


def test_both_exporters_name_every_output_and_report_points_at_them(user_file, tmp_path, capsys):
    out_json, html = tmp_path / "r.json", tmp_path / "r.html"
    argv = ["align", f"{user_file}:Net", "-i", "2x8", "--exporter", "both", "--no-fidelity"]
    assert main([*argv, "--json", str(out_json), "--html", str(html)]) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"r-dynamo.json", "r-torchscript.json", "r-dynamo.html", "r-torchscript.html"} <= names
    assert not out_json.exists()
    capsys.readouterr()
    assert main(["report", str(out_json)]) == 2
    err = capsys.readouterr().err
    assert "r-dynamo.json and" in err and "r-torchscript.json" in err
    assert main(["report", str(tmp_path / "r-dynamo.json")]) == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--json", "{d}/taken.json"], "taken.json already exists"),
        (["--exporter", "both", "--html", "{d}/taken.html"], "taken-torchscript.html already"),
        (["--workdir", "{d}/work"], "export.onnx already exists"),
        (["--exporter", "both", "--workdir", "{d}/work"], "dynamo/debug.onnx already exists"),
        (["--node-data", "{d}/no/such/folder/n.json"], "does not exist"),
        (["--json", "{d}/a.json", "--html", "{d}/a.json"], "both write"),
    ],
)
def test_every_output_path_is_checked_before_any_work(user_file, tmp_path, capsys, extra, message):
    (tmp_path / "taken.json").write_text("keep me")
    (tmp_path / "taken-torchscript.html").write_text("keep me")
    for folder in (tmp_path / "work", tmp_path / "work" / "dynamo"):
        folder.mkdir(exist_ok=True)
    (tmp_path / "work" / "export.onnx").write_text("keep me")
    (tmp_path / "work" / "dynamo" / "debug.onnx").write_text("keep me")
    argv = ["align", f"{user_file}:counted", "-i", "2x8", *[a.format(d=tmp_path) for a in extra]]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "built").exists()  # failed before the model was even built
    assert (tmp_path / "taken.json").read_text() == "keep me"


def test_both_exporters_keep_their_model_files_apart(user_file, tmp_path):
    work = tmp_path / "work"
    argv = ["align", f"{user_file}:Net", "-i", "2x8", "--exporter", "both", "--workdir", str(work)]
    assert main([*argv, "--no-fidelity"]) == 0
    for exporter in ("dynamo", "torchscript"):  # aligned: the plain exports, attached to
        assert (work / exporter / "plain.onnx").is_file()
        assert (work / exporter / "attach.onnx").is_file()


def test_help_names_the_per_exporter_files(capsys):
    with pytest.raises(SystemExit):
        main(["align", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "r-dynamo.json and r-torchscript.json" in text
    assert "DIR/dynamo" in text


def test_verbose_shows_fxalign_debug_lines_not_the_libraries(monkeypatch):
    import logging

    from fxalign.cli import _configure_logging

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # basicConfig configures an unconfigured root
    monkeypatch.setattr(root, "level", root.level)
    for name in ("fxalign", "onnxscript", "torch.onnx"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    _configure_logging(True)
    assert logging.getLogger("fxalign.cli").isEnabledFor(logging.DEBUG)
    assert logging.getLogger("fxalign.cli").isEnabledFor(logging.INFO)  # "... in eval mode"
    # onnxscript's optimizer logs thousands of DEBUG lines per export
    assert not logging.getLogger("onnxscript.optimizer").isEnabledFor(logging.DEBUG)
