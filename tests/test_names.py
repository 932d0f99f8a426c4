"""Structured marker names (issue 12) and module names that look like marker syntax (issue 13)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils import _pytree as pytree

import fxalign
from fxalign.names import (
    CallId,
    MarkerName,
    OpaqueKey,
    decode_attribute,
    encode_attribute,
    leaf_path,
    leaf_suffix,
)

S, M, A = pytree.SequenceKey, pytree.MappingKey, pytree.GetAttrKey


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        (MarkerName("layer1.0.conv1"), "layer1.0.conv1"),
        (MarkerName("shared", 2), "shared#2"),
        (MarkerName("enc", 1, (M("logits"),)), 'enc#1["logits"]'),
        (MarkerName("lstm", 0, (S(1), S(0))), "lstm[1][0]"),
        (MarkerName("out", 0, (A("last_hidden_state"),)), 'out["last_hidden_state"]'),
        (MarkerName("", 0, (S(0),)), "[0]"),
        (MarkerName(""), ""),
        (CallId("block", 1).input((M("mask"),)), 'block#1:in["mask"]'),
        (MarkerName("d", 0, (M(3), M(None))), "d[3][None]"),
    ],
)
def test_display_text_is_the_one_reports_always_showed(name, shown):
    assert str(name) == shown
    assert decode_attribute(encode_attribute(name)) == name


def test_names_that_look_alike_stay_apart():
    second_call = MarkerName("d.a", 1)
    module_named_a1 = MarkerName("d.a#1")
    assert str(second_call) == str(module_named_a1)
    assert second_call != module_named_a1
    assert encode_attribute(second_call) != encode_attribute(module_named_a1)
    assert MarkerName("d.b:in") != CallId("d.b").input(())
    assert MarkerName("d.c[0]") != MarkerName("d.c", 0, (S(0),))


def test_leaf_path_keeps_keys_that_json_cannot_spell_as_their_text():
    assert leaf_path([S(1), M("a"), A("x")]) == (S(1), M("a"), A("x"))
    path = leaf_path([M((1, 2)), M(1.5)])
    assert path == (OpaqueKey("(1, 2)"), M(1.5))
    assert leaf_suffix(path) == "[(1, 2)][1.5]"
    assert decode_attribute(encode_attribute(MarkerName("m", 0, path))).leaf == path


@pytest.mark.parametrize("text", ["layer1", "{}", '{"path": 3}', '{"path":"a","leaf":[["?",1]]}'])
def test_decoding_rejects_what_fxalign_did_not_encode(text):
    with pytest.raises(ValueError, match="not an fxalign marker name"):
        decode_attribute(text)


_keys = st.one_of(
    st.integers(0, 9).map(S),
    st.one_of(st.text(), st.integers(), st.booleans(), st.none()).map(M),
    st.text().map(A),
    st.text().map(OpaqueKey),
)


@given(st.text(), st.integers(0, 5), st.lists(_keys, max_size=3), st.booleans())
def test_every_name_survives_the_onnx_attribute(path, call, leaf, is_input):
    name = MarkerName(path, call, tuple(leaf), is_input)
    assert decode_attribute(encode_attribute(name)) == name


KEYS = ["a#1", "b:in", "c[0]", "q'"]


class HostileKeys(torch.nn.Module):
    """Each ModuleDict key reads like marker syntax; ``a#1`` runs twice."""

    def __init__(self, data_dependent: bool = False):
        super().__init__()
        self.d = torch.nn.ModuleDict({k: torch.nn.Linear(4, 4) for k in KEYS})
        self.data_dependent = data_dependent

    def forward(self, x):
        if self.data_dependent and x.sum() > 1e9:  # FX cannot trace this: the fallback runs
            x = -x
        for key in KEYS:
            x = self.d[key](x)
        return self.d["a#1"](x)


def _check_hostile(report):
    assert report.passed
    rows = {(r.module_path, r.call_index): r for r in report.rows}
    expected = [(f"d.{k}", 0) for k in KEYS] + [("d.a#1", 1)]
    assert [k for k in rows if k[0]] == expected
    for key in expected:
        row = rows[key]
        assert row.local is not None, (key, row.local_note)
        assert row.local.max_abs <= 1e-6, key
    assert [r.name for r in report.rows if r.module_path] == [*(f"d.{k}" for k in KEYS), "d.a#1#1"]
    assert "called 0 times" not in report.coverage.unmarked.values()
    assert set(report.coverage.marked) == {f"d.{k}" for k in KEYS}


def test_module_dict_keys_that_look_like_marker_syntax(exporter):
    torch.manual_seed(0)
    report = fxalign.align(
        HostileKeys().eval(), (torch.randn(2, 4),), exporter=exporter, local="all", attach=False
    )
    assert report.instrumentation == "fx"
    _check_hostile(report)


def test_module_dict_keys_that_look_like_marker_syntax_in_the_fallback():
    torch.manual_seed(0)
    model = HostileKeys(data_dependent=True).eval()
    report = fxalign.align(
        model, (torch.randn(2, 4),), exporter="torchscript", local="all", attach=False
    )
    assert report.instrumentation == "fallback"
    _check_hostile(report)
