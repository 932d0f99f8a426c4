import numpy as np
import pytest
import torch

import fxalign
from fixtures.models import NestedBlocks
from fxalign.cli import main
from fxalign.inputs import dynamic_export_kwargs, input_files, load_inputs, make_inputs


def test_specs_make_seeded_inputs():
    args, kwargs = make_inputs(["2x3", "ids=1x4:int64:0..10", "m=1x4:bool"], seed=1)
    again, _ = make_inputs(["2x3"], seed=1)
    assert args[0].shape == (2, 3) and torch.equal(args[0], again[0])
    assert kwargs["ids"].dtype == torch.int64 and int(kwargs["ids"].max()) < 10
    assert kwargs["m"].dtype == torch.bool


@pytest.mark.parametrize("spec", ["2xq", "x=1x2:float99", "ids=1x2:int64:5..1"])
def test_bad_specs(spec):
    with pytest.raises(fxalign.InputError):
        make_inputs([spec])


def test_npz_positional_and_keyword(tmp_path):
    path = tmp_path / "s.npz"
    np.savez(path, arg1=np.ones(2), arg0=np.zeros(3), mask=np.ones(1, bool))
    args, kwargs = load_inputs(path)
    assert [a.shape for a in args] == [(3,), (2,)] and kwargs["mask"].dtype == torch.bool


def test_pt_forms(tmp_path):
    torch.save({"args": [torch.ones(1)], "kwargs": {"y": torch.zeros(2)}}, tmp_path / "a.pt")
    torch.save((torch.ones(1), torch.ones(2)), tmp_path / "b.pt")
    torch.save(torch.ones(3), tmp_path / "c.pt")
    assert load_inputs(tmp_path / "a.pt")[1]["y"].shape == (2,)
    assert len(load_inputs(tmp_path / "b.pt")[0]) == 2
    assert load_inputs(tmp_path / "c.pt")[0][0].shape == (3,)
    assert [p.name for p in input_files(tmp_path)] == ["a.pt", "b.pt", "c.pt"]


def test_bad_files(tmp_path):
    (tmp_path / "x.txt").write_text("nope")
    with pytest.raises(fxalign.InputError, match="unsupported"):
        load_inputs(tmp_path / "x.txt")
    with pytest.raises(fxalign.InputError, match="no input files"):
        input_files(tmp_path)
    with pytest.raises(fxalign.InputError, match="not found"):
        load_inputs(tmp_path / "missing.npz")


def test_dynamic_export_kwargs_mark_only_varying_dims():
    model = NestedBlocks()
    example = ((torch.randn(2, 3, 8, 8),), {})
    samples = [((torch.randn(4, 3, 8, 8),), {})]
    assert dynamic_export_kwargs("torchscript", model.forward, example, samples) == {
        "input_names": ["x"],
        "dynamic_axes": {"x": {0: "x_dim0"}},
    }
    dynamo = dynamic_export_kwargs("dynamo", model.forward, example, samples)
    assert list(dynamo["dynamic_shapes"]["x"]) == [0]
    assert dynamic_export_kwargs("dynamo", model.forward, example, []) == {}


def test_cli_checks_a_folder_of_npz_samples_at_two_shapes(tmp_path, capsys):
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, batch in enumerate([1, 2, 4]):
        np.savez(folder / f"s{i}.npz", x=np.random.randn(batch, 3, 8, 8).astype(np.float32))
    argv = ["align", "tests.fixtures.models:NestedBlocks", "--inputs", str(folder), "--dynamic"]
    assert main([*argv, "--exporter", "both", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert out.count("samples 3") == 2
    assert main(["align", "tests.fixtures.models:NestedBlocks", "--inputs", str(folder)]) == 2
    assert "sample 1" in capsys.readouterr().err


def test_cli_samples_from_specs_and_the_unoptimised_runner(capsys):
    argv = ["align", "tests.fixtures.models:NestedBlocks", "-i", "1x3x8x8", "--sample", "3x3x8x8"]
    assert (
        main([*argv, "--dynamic", "--runner", "onnxruntime-noopt", "--exporter", "torchscript"])
        == 0
    )
    assert "samples 2" in capsys.readouterr().out
