import inspect

import fxalign


def test_all_names_exist_and_are_documented():
    for name in fxalign.__all__:
        obj = getattr(fxalign, name)
        if callable(obj):
            assert inspect.getdoc(obj), f"{name} has no docstring"


def test_stage_functions_and_error_families_are_public():
    assert len(set(fxalign.__all__)) == len(fxalign.__all__)
    for stage in ("instrument", "export", "extract", "run_onnx", "run_torch", "compare", "align"):
        assert stage in fxalign.__all__
    assert issubclass(fxalign.InputError, fxalign.UserError)
    assert not issubclass(fxalign.InternalError, fxalign.UserError)
