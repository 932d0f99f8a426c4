import pytest

from fixtures.models import NestedBlocks, PlantedDivergence, planted_export_kwargs
from fxalign.testing import assert_aligned


def test_assert_aligned_returns_the_report_when_aligned():
    model = NestedBlocks().eval()
    report = assert_aligned(model, model.inputs(), exporter="torchscript")
    assert report.passed


def test_assert_aligned_names_the_first_divergent_module_and_its_local_error():
    model = PlantedDivergence().eval()
    with pytest.raises(AssertionError) as info:
        assert_aligned(
            model,
            model.inputs(),
            exporter="torchscript",
            export_kwargs=planted_export_kwargs("torchscript"),
        )
    message = str(info.value)
    assert "First divergence: mid.clamp (BadClamp)" in message
    assert "max_abs=" in message and "elements outside atol=0.0001" in message
    assert "the error starts in this module" in message
    assert message.splitlines()[-1].startswith("DIVERGED:")


def test_import_fxalign_is_enough_for_fxalign_testing():
    import subprocess
    import sys

    code = "import fxalign; print(fxalign.testing.assert_aligned.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "assert_aligned"
