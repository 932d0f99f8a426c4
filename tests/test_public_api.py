"""The public API is curated (onnx-ir style): each module says what it exports in ``__all__``,
everything else it defines is underscored, and ``fxalign.__all__`` changes only on purpose."""

import importlib
import inspect
import pkgutil

import pytest

import fxalign

PUBLIC = {
    "Coverage",
    "ExportError",
    "ExportResult",
    "ExtractResult",
    "FxalignError",
    "InputError",
    "InstrumentResult",
    "InstrumentationError",
    "InternalError",
    "MarkerName",
    "Metrics",
    "OrtRunner",
    "Report",
    "Row",
    "Runner",
    "RuntimeBackendError",
    "Sample",
    "UserError",
    "__version__",
    "align",
    "capture",
    "compare",
    "compare_arrays",
    "debug_apply",
    "export",
    "extract",
    "first_divergence",
    "instrument",
    "instrument_model",
    "onnx_feeds",
    "print_report",
    "render_html",
    "render_text",
    "run_onnx",
    "run_torch",
    "write_html",
}

MODULES = sorted(info.name for info in pkgutil.walk_packages(fxalign.__path__, "fxalign."))


def test_top_level_names_are_exactly_the_curated_ones():
    assert len(set(fxalign.__all__)) == len(fxalign.__all__)
    assert set(fxalign.__all__) >= PUBLIC, set(PUBLIC) - set(fxalign.__all__)
    extra = set(fxalign.__all__) - PUBLIC - {"testing"}
    assert not extra, f"new public names {extra}: add them to PUBLIC on purpose"


def test_all_names_exist_and_are_documented():
    for name in fxalign.__all__:
        obj = getattr(fxalign, name)
        if callable(obj):
            assert inspect.getdoc(obj), f"{name} has no docstring"


@pytest.mark.parametrize("name", MODULES)
def test_every_module_curates_its_names(name):
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    for item in exported:
        assert hasattr(module, item), f"{name}.__all__ names {item!r}, which does not exist"
    undeclared = [
        attr
        for attr, obj in vars(module).items()
        if not attr.startswith("_")
        and attr not in exported
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", None) == name
    ]
    assert not undeclared, f"{name} defines {undeclared}: add to __all__ or underscore"


def test_stage_functions_and_error_families_are_public():
    for stage in ("instrument", "export", "extract", "run_onnx", "run_torch", "compare", "align"):
        assert stage in fxalign.__all__
    assert issubclass(fxalign.InputError, fxalign.UserError)
    assert not issubclass(fxalign.InternalError, fxalign.UserError)
