"""Models torch.fx cannot trace: tiny random-config Hugging Face transformers (issue 3)."""

import pytest
import torch

import fxalign
from fixtures.models import DataDependent, tiny_transformer

pytest.importorskip("transformers")

# The TorchScript exporter cannot export GPT-2 or Llama at all (aten::diff in their mask code):
# only models whose plain export works with an exporter are checked with it.
# The dynamo exports take the longest: they run in the slow group (make test-slow).
CASES = [
    pytest.param("bert", "dynamo", marks=pytest.mark.slow),
    ("bert", "torchscript"),
    pytest.param("gpt2", "dynamo", marks=pytest.mark.slow),
    pytest.param("vit", "dynamo", marks=pytest.mark.slow),
    ("vit", "torchscript"),
    pytest.param("llama", "dynamo", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("attach", [None, False], ids=["default", "markers"])
@pytest.mark.parametrize(("name", "exporter"), CASES)
def test_transformer_aligns_with_module_paths(name, exporter, attach):
    model, args, kwargs = tiny_transformer(name)
    report = fxalign.align(model, args, kwargs, exporter=exporter, attach=attach)
    # aligned: the default mode answers from the plain export, no markers
    assert report.instrumentation == ("attach" if attach is None else "fallback")
    compared = [r for r in report.rows if r.metrics is not None]
    assert max(r.metrics.max_abs for r in compared) <= 1e-4, fxalign.render_text(report)
    assert report.passed
    paths = set(dict(model.named_modules()))
    assert {r.module_path for r in report.rows} - {""} <= paths
    leaves_with_params = {
        p
        for p, m in model.named_modules()
        if p and next(m.children(), None) is None and any(True for _ in m.parameters(False))
    }
    coverage = report.coverage
    if attach is False:  # every leaf module that has parameters ran and is marked
        assert coverage.leaf_ratio >= 0.95
        assert leaves_with_params <= set(coverage.marked)
    else:  # located in the plain export, or said where its value went (fused, folded)
        assert leaves_with_params <= set(coverage.marked) | set(coverage.unmarked)
        assert all(coverage.unmarked[p] for p in leaves_with_params - set(coverage.marked))
        assert len(set(coverage.marked) & leaves_with_params) >= 0.5 * len(leaves_with_params)


def test_positional_inputs_with_the_torchscript_exporter():
    # The TorchScript exporter fills in the default of every parameter a call leaves out, which
    # collides with the keyword options Hugging Face's decorators pass ("got multiple values
    # for argument 'use_cache'"): plain torch.onnx.export (torch 2.13, transformers 5) fails on
    # this call; fxalign makes the call the way eager code does.
    model, args, _ = tiny_transformer("bert")
    report = fxalign.align(model, args, exporter="torchscript", attach=False)
    assert report.passed
    assert report.coverage.leaf_ratio == 1.0
    assert fxalign.align(model, args, exporter="torchscript")  # the plain export, attached to


@pytest.mark.slow
def test_bert_rows_follow_the_module_tree():
    model, args, kwargs = tiny_transformer("bert")
    report = fxalign.align(model, args, kwargs, attach=False)
    names = [r.name for r in report.rows]
    for expected in ["embeddings", "encoder.layer.0.attention.self.query", "pooler"]:
        assert expected in names
    assert names.index("embeddings") < names.index("encoder.layer.0.attention.self.query")
    assert names.index("encoder.layer.0.attention.self.query") < names.index("pooler")
    coverage = report.coverage
    assert "pooler" in coverage.traced  # traced on its own although the model is not
    assert "" in coverage.eager and "embeddings" in coverage.eager
    assert coverage.unmarked["encoder.layer"].startswith("container")
    text = fxalign.render_text(report, width=400)
    assert "run their own forward" in text and "eager embeddings:" in text


def test_data_dependent_block_is_eager_and_the_rest_is_traced():
    # torch.export rejects the data-dependent `if` (plain model too); TorchScript bakes it in.
    model = DataDependent()
    with pytest.raises(fxalign.ExportError, match="dynamo exporter failed") as info:
        fxalign.align(model.eval(), model.inputs(), exporter="dynamo")
    assert "torchscript" in (info.value.hint or "")
    report = fxalign.align(model.eval(), model.inputs(), exporter="torchscript", attach=False)
    assert report.passed
    assert "TraceError" in report.coverage.eager["branchy"]
    assert report.coverage.traced == ["tail"]
    names = [r.name for r in report.rows]
    with torch.no_grad():
        taken = "branchy.a" if model.pre(model.inputs()[0]).sum() > 0 else "branchy.b"
    assert names[:3] == ["pre", taken, "branchy"]
    assert names[3:] == ["tail.0", "tail.1", "tail.2", "tail", ""]


def test_instrumented_transformer_leaves_model_untouched():
    model, args, kwargs = tiny_transformer("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    with torch.no_grad():
        expected = model(*args, **kwargs).last_hidden_state
    gm = fxalign.instrument(model, args, kwargs)
    gm.train()
    assert [type(m) for m in model.modules()] == classes
    assert not any(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(*args, **kwargs).last_hidden_state, expected)
