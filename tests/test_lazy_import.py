"""``import fxalign`` and ``fxalign --help`` load no torch; the public API resolves on use."""

import inspect
import subprocess
import sys

import pytest

import fxalign


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_import_and_help_load_no_heavy_module():
    code = (
        "import sys, fxalign, fxalign.cli\n"
        "fxalign.cli.build_parser().format_help()\n"
        "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))"
    )
    assert _run(code).strip() == "[]"


def test_help_prints_through_main_without_torch():
    code = (
        "import sys\nfrom fxalign.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    out = _run(code)
    assert "usage: fxalign" in out and out.strip().endswith("False")


def test_stage_functions_stay_functions_once_their_modules_are_imported():
    import fxalign.compare
    import fxalign.export
    import fxalign.extract
    import fxalign.instrument

    for name in ("compare", "export", "extract", "instrument"):
        assert inspect.isfunction(getattr(fxalign, name)), name
        assert getattr(fxalign, name) is getattr(sys.modules[f"fxalign.{name}"], name)


def test_every_public_name_is_listed_and_resolves():
    assert set(fxalign.__all__) <= set(dir(fxalign)) and "testing" in dir(fxalign)
    assert fxalign.Report.__module__ == "fxalign.report.model"
    with pytest.raises(AttributeError, match="no_such_name"):
        fxalign.no_such_name  # noqa: B018


def test_an_aligned_torchscript_run_does_not_load_dynamo():
    # torch._dynamo is some 300 modules, a second of a cold start: the default mode on a
    # TorchScript export has no use for it (nothing is compiled in such a process).
    code = (
        "import sys, warnings, torch, fxalign\n"
        "warnings.simplefilter('ignore')\n"
        "net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()\n"
        "report = fxalign.align(net, (torch.randn(2, 4),), exporter='torchscript')\n"
        "print(report.instrumentation, 'torch._dynamo' in sys.modules)"
    )
    assert _run(code).strip().splitlines()[-1] == "attach False"


def test_attaching_to_a_file_does_not_load_onnxscript(tmp_path):
    # onnxscript (a third of a second of a cold start) serves the dynamo exporter only.
    import torch

    path = tmp_path / "net.onnx"
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    torch.save(net, tmp_path / "net.pt")
    torch.onnx.export(net, (torch.randn(2, 4),), path, dynamo=False)
    code = (
        "import sys, warnings, torch, fxalign\n"
        "warnings.simplefilter('ignore')\n"
        f"net = torch.load({str(tmp_path / 'net.pt')!r}, weights_only=False)\n"
        f"report = fxalign.align(net, (torch.randn(2, 4),), onnx={str(path)!r})\n"
        "print(report.passed, report.instrumentation, 'onnxscript' in sys.modules)"
    )
    assert _run(code).strip().splitlines()[-1] == "True attach False"
