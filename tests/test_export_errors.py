"""Export failures are short: the op, the module and its source line, the fix (issue 16, item 1)."""

import inspect
import logging

import pytest

import fxalign
from fixtures.models import DataDependent, TorchScriptCannotExport, UntranslatedOp
from fxalign.cli import main


def _line_of(cls, text: str) -> str:
    """``models.py:N`` of the first line of ``cls``'s forward that contains ``text``."""
    lines, first = inspect.getsourcelines(cls.forward)
    offset = next(i for i, line in enumerate(lines) if text in line)
    return f"models.py:{first + offset}"


def _failure(model, exporter) -> fxalign.ExportError:
    model = model.eval()
    with pytest.raises(fxalign.ExportError) as info:
        fxalign.align(model, model.inputs(), exporter=exporter)
    error = info.value
    assert "Instrumented" not in str(error) and " of " not in error.message
    assert error.__cause__ is not None
    return error


def test_dynamo_untranslated_op_names_module_and_line_and_suggests_a_translation_table(capfd):
    from fixtures.models import SoftClip

    error = _failure(UntranslatedOp(), "dynamo")
    assert "failed on fxalign_tests.softclip.default in module 'clip' (SoftClip, " in error.message
    assert f"{_line_of(SoftClip, '_softclip(x)')})" in error.message
    assert "No ONNX function found" in error.message
    assert "custom_translation_table" in error.hint
    assert "torch.ops.fxalign_tests.softclip.default" in error.hint
    assert "torchvision" not in capfd.readouterr().err


def test_torchscript_unsupported_custom_op_suggests_a_symbolic(capfd):
    from fixtures.models import SoftClip

    error = _failure(UntranslatedOp(), "torchscript")
    assert "failed on fxalign_tests::softclip in module 'clip' (SoftClip, " in error.message
    assert f"{_line_of(SoftClip, '_softclip(x)')})" in error.message
    assert "register_custom_op_symbolic('fxalign_tests::softclip'" in error.hint
    assert "exporter='dynamo'" in error.hint
    # the exporter's graph dump (printed from C++) is kept on the error, not on the terminal
    printed = capfd.readouterr()
    assert "Torch IR graph at exception" not in printed.out + printed.err
    assert "Torch IR graph at exception" in error.exporter_output


def test_torchscript_unsupported_aten_op_names_module_and_line():
    from fixtures.models import Differ

    error = _failure(TorchScriptCannotExport(), "torchscript")
    assert "failed on aten::diff in module 'differ' (Differ, " in error.message
    assert f"{_line_of(Differ, 'torch.diff')})" in error.message
    assert "register_custom_op_symbolic('aten::diff'" in error.hint


def test_an_op_in_a_block_that_fx_inlined_is_traced_back_to_the_block():
    from fixtures.models import DiffBlock, InlinedDiff

    error = _failure(InlinedDiff(), "torchscript")
    assert "failed on aten::diff in module 'blocks.1' (DiffBlock, " in error.message
    assert f"{_line_of(DiffBlock, 'torch.diff')})" in error.message


def test_data_dependent_guard_suggests_torchscript_or_torch_cond():
    from fixtures.models import Branchy

    error = _failure(DataDependent(), "dynamo")
    assert "failed in module 'branchy' (Branchy, " in error.message
    assert f"{_line_of(Branchy, 'x.sum()')})" in error.message
    assert "torch.cond" in error.hint and "exporter='torchscript'" in error.hint


def test_torchvision_notices_are_dropped_during_export_only():
    notices = logging.getLogger("torch.onnx._internal.exporter._registration")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    previous_level, filters = notices.level, list(notices.filters)
    notices.addHandler(handler)
    notices.setLevel(logging.WARNING)  # conftest quiets the torch.onnx loggers
    try:
        model = TorchScriptCannotExport().eval()
        fxalign.align(model, model.inputs(), exporter="dynamo")
        assert not [r for r in records if "torchvision" in r.getMessage()]
        assert notices.filters == filters  # the filter is gone again
        notices.warning("torchvision is not installed. Skipping torchvision::nms")
        assert len(records) == 1  # outside fxalign's export the logger works as before
    finally:
        notices.removeHandler(handler)
        notices.setLevel(previous_level)


def test_cli_export_failure_is_a_few_lines_and_verbose_after_the_command_shows_more(capfd):
    argv = ["align", "tests.fixtures.models:UntranslatedOp", "-i", "2x4", "--exporter"]
    assert main([*argv, "torchscript", "--no-fidelity"]) == 2
    out, err = capfd.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert lines[0].startswith("fxalign: error: the torchscript exporter failed on ")
    assert len(lines) <= 3 and "Traceback" not in err and "graph(" not in err
    assert main([*argv, "torchscript", "--no-fidelity", "--verbose"]) == 2
    err = capfd.readouterr().err
    assert "Traceback" in err and "Torch IR graph at exception" in err
