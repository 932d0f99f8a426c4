"""Hostile models and inputs: no false verdict, no changed model, no raw crash (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fxalign
from fxalign import compare_arrays


# ---- integers are compared exactly at any magnitude -----------------------------------------
@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_large_integers_that_differ_by_one_are_a_mismatch(dtype):
    ref = np.array([10**18, 2**62 + 3, 7], dtype=dtype)
    got = ref.copy()
    got[0] += 1
    m, _ = compare_arrays(ref, got, atol=1e-4, rtol=1e-3)
    assert m.mismatched == 1 and m.max_abs == 1.0
    same, _ = compare_arrays(ref, ref.copy(), atol=1e-4, rtol=1e-3)
    assert same.mismatched == 0 and same.max_abs == 0.0


def test_int64_extremes_do_not_overflow():
    ref = np.array([2**63 - 1], dtype=np.int64)
    got = np.array([-(2**63)], dtype=np.int64)
    m, _ = compare_arrays(ref, got, atol=0, rtol=0)
    assert m.mismatched == 1 and m.max_abs == float(2**64 - 1)


def test_signed_against_unsigned_is_exact():
    ref = np.array([2**63 + 1], dtype=np.uint64)
    got = np.array([2**62], dtype=np.int64)
    m, _ = compare_arrays(ref, got, atol=0, rtol=0)
    assert m.mismatched == 1
    assert compare_arrays(ref, ref.copy(), atol=0, rtol=0)[0].mismatched == 0


@torch.library.custom_op("fxalign_hostile::ids_identity", mutates_args=())
def _ids_identity(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_ids_identity.register_fake
def _ids_identity_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _ids_plus_one_onnx(x):
    from onnxscript import opset18 as op

    return op.Add(x, op.CastLike(op.Constant(value_int=1), x))  # the planted bug: ids + 1


def _register_ids_symbolic() -> None:
    from torch.onnx import register_custom_op_symbolic
    from torch.onnx.symbolic_helper import parse_args

    @parse_args("v")
    def symbolic(g, x):
        one = g.op("Constant", value_t=torch.tensor(1, dtype=torch.int64))
        return g.op("Add", x, one)

    register_custom_op_symbolic("fxalign_hostile::ids_identity", symbolic, 9)


_register_ids_symbolic()


class IdsThroughCustomOp(nn.Module):
    def forward(self, ids):
        return torch.ops.fxalign_hostile.ids_identity(ids) * 1


def test_int64_ids_near_1e18_off_by_one_are_diverged(exporter):
    export_kwargs = {}
    if exporter == "dynamo":
        table = {torch.ops.fxalign_hostile.ids_identity.default: _ids_plus_one_onnx}
        export_kwargs = {"custom_translation_table": table}
    ids = torch.tensor([[10**18, 10**18 + 256, 2**60]], dtype=torch.int64)
    report = fxalign.align(
        IdsThroughCustomOp().eval(), (ids,), exporter=exporter, export_kwargs=export_kwargs
    )
    assert not report
    assert report.divergence is not None
    assert report.divergence.metrics.max_abs == 1.0
