import math
import sys

import numpy as np
import pytest

from fxalign import MarkerName, compare, compare_arrays, first_divergence


def _named(values):
    """``module path -> value`` as compare takes it: ``MarkerName -> value``."""
    return {MarkerName(path): v for path, v in values.items()}


def test_allclose_semantics_with_torch_as_reference():
    ref = np.array([1.0, 100.0], dtype=np.float32)
    got = ref + np.array([1e-4, 0.09], dtype=np.float32)
    m, _ = compare_arrays(ref, got, atol=1e-4, rtol=1e-3, verdict="allclose")
    assert m.mismatched == int(not np.allclose(got, ref, atol=1e-4, rtol=1e-3))
    assert m.roundoff == 0.0


def test_float64_metrics():
    ref = np.array([1.0, 2.0, 3.0])
    got = np.array([1.0, 2.5, 2.0])
    m, _ = compare_arrays(ref, got, atol=0, rtol=0)
    assert m.max_abs == 1.0
    assert m.mean_abs == pytest.approx(0.5)
    assert m.rmse == pytest.approx(math.sqrt((0.25 + 1) / 3))
    assert m.max_rel == pytest.approx(1 / 3)
    assert m.cosine == pytest.approx(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got))
    assert m.sqnr_db == pytest.approx(10 * math.log10(14 / 1.25))
    assert m.mismatched == 2 and m.numel == 3


def test_nan_at_same_positions_counts_equal_and_is_reported():
    ref = np.array([np.nan, 1.0, np.inf])
    m, notes = compare_arrays(ref, ref.copy(), atol=0, rtol=0)
    assert m.mismatched == 0 and m.nan_matched == 1
    assert any("NaN" in n for n in notes)


def test_nan_on_one_side_fails():
    m, _ = compare_arrays(np.array([1.0, 2.0]), np.array([1.0, np.nan]), atol=1, rtol=1)
    assert m.mismatched == 1 and math.isinf(m.max_abs)


def test_integers_compare_exactly():
    m, _ = compare_arrays(np.array([1, 2, 3]), np.array([1, 2, 4]), atol=10, rtol=10)
    assert m.mismatched == 1


def test_empty_tensors():
    m, notes = compare_arrays(np.zeros((0, 3)), np.zeros((0, 3)), atol=0, rtol=0)
    assert m.mismatched == 0 and notes == ["empty tensor"]


def test_rows_report_shape_dtype_and_missing_values():
    torch_values = {
        "a": np.ones(3, np.float32),
        "b": np.ones(3, np.float32),
        "c": np.ones(2, np.float32),
        "d": np.ones(2, np.float32),
        "": np.ones(1, np.float32),
    }
    onnx_values = {
        "a": np.ones(3, np.float64),
        "b": np.ones(4, np.float32),
        "": np.ones(1, np.float32) * 2,
        "e": np.ones(1),
    }
    rows = compare(_named(torch_values), _named(onnx_values), atol=0, rtol=0, leaf_paths=["a", "b"])
    by = {r.name: r for r in rows}
    assert by["a"].passed and "dtype differs" in by["a"].notes[0]
    assert by["b"].status == "shape_mismatch" and by["b"].failed
    assert by["c"].status == "missing_in_onnx" and by["c"].passed is None
    assert by["e"].status == "missing_in_torch"
    assert by[""].kind == "output" and by[""].display_name == "output"
    assert [r.name for r in rows][-1] == ""
    assert first_divergence(rows).name == "b"


def test_dtype_aware_default_tolerances():
    from fxalign.compare import tolerance_for

    assert tolerance_for("a", "a", "float32") == (1e-4, 1e-3)
    assert tolerance_for("a", "a", "float16") == (1e-2, 1e-2)
    assert tolerance_for("a", "a", "bfloat16") == (5e-2, 5e-2)
    assert tolerance_for("a", "a", "float16", atol=1e-5, rtol=0) == (1e-5, 0)


def test_glob_overrides_match_paths_and_later_ones_win():
    from fxalign.compare import tolerance_for

    overrides = {"*.attention.*": {"atol": 1e-3}, "enc.attention.q": {"rtol": 0.5}}
    assert tolerance_for("enc.attention.q", "enc.attention.q", "float32", overrides=overrides) == (
        1e-3,
        0.5,
    )
    assert tolerance_for("enc.ffn", "enc.ffn", "float32", overrides=overrides) == (1e-4, 1e-3)


def test_rows_use_the_tolerance_of_their_dtype_and_overrides():
    half = np.array([1.0], np.float16)
    torch_values = {"a": half, "b.attention.q": np.ones(1, np.float32), "c": np.ones(1)}
    onnx_values = {
        "a": half + np.float16(5e-3),  # within fp16 defaults, not fp32's
        "b.attention.q": np.ones(1, np.float32) + 5e-4,  # within the override only
        "c": np.ones(1) + 5e-4,  # fails the float64 default
    }
    rows = compare(
        _named(torch_values), _named(onnx_values), tolerances={"*.attention.*": {"atol": 1e-3}}
    )
    by = {r.name: r for r in rows}
    assert by["a"].passed and by["a"].atol == 1e-2
    assert by["b.attention.q"].passed and by["b.attention.q"].atol == 1e-3
    assert not by["c"].passed and by["c"].atol == 1e-7


def test_complex_values_are_compared_by_magnitude_of_difference():
    a = np.array([1 + 1j, 2 - 1j, -3j], dtype=np.complex64)
    m, notes = compare_arrays(a, a + 1e-3, atol=1e-4, rtol=1e-3)
    assert notes == []
    assert m.max_abs == pytest.approx(1e-3, rel=1e-4)
    assert m.cosine == pytest.approx(1.0, abs=1e-6)
    assert m.mismatched == 0


def test_float32_metrics_match_a_float64_computation():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(100_000).astype(np.float32)
    got = (ref * (1 + 1e-3 * rng.standard_normal(ref.size))).astype(np.float32)
    fast, _ = compare_arrays(ref, got, atol=1e-4, rtol=1e-3, verdict="allclose")
    r, g = ref.astype(np.float64), got.astype(np.float64)
    diff = np.abs(g - r)
    assert fast.max_abs == diff.max()  # close float32 values: the difference is exact
    assert fast.mean_abs == pytest.approx(diff.mean(), rel=1e-6)
    assert fast.rmse == pytest.approx(np.sqrt((diff**2).mean()), rel=1e-6)
    assert fast.max_rel == pytest.approx((diff / (np.abs(r) + 1e-12)).max(), rel=1e-6)
    cosine = (r @ g) / np.sqrt((r @ r) * (g @ g))
    assert fast.cosine == pytest.approx(cosine, abs=1e-12)
    assert fast.mismatched == np.count_nonzero(~np.isclose(got, ref, atol=1e-4, rtol=1e-3))


def test_samples_are_matched_by_structured_name_not_by_the_text_shown():
    from fxalign.compare import SampleAggregate, row_order

    alike = {MarkerName("a#1"): np.ones(2), MarkerName("a", 1): np.zeros(2)}
    assert len({str(n) for n in alike}) == 1  # both display as "a#1"
    aggregate = SampleAggregate()
    for index, shift in enumerate([0.0, 1.0]):
        onnx = {n: v + shift for n, v in alike.items()}
        rows = compare(alike, onnx, atol=0, rtol=0)
        aggregate.add(index, rows, row_order(alike, onnx))
    rows = aggregate.rows()
    assert [(r.module_path, r.call_index) for r in rows] == [("a#1", 0), ("a", 1)]
    assert [(r.samples.count, r.samples.failed, r.samples.worst_sample) for r in rows] == [
        (2, 1, 1),
        (2, 1, 1),
    ]
    with pytest.raises(ValueError, match="1 names for 2 rows"):
        aggregate.add(2, rows, [MarkerName("a")])


def test_complex_values_held_as_real_pairs_are_compared_as_complex():
    ref = np.array([[1 + 2j, 3 - 1j, 0.5j]], np.complex64)
    pairs = np.stack([ref.real, ref.imag], axis=-1).astype(np.float32)
    name = MarkerName("spec")
    (row,) = compare({name: ref}, {name: pairs})
    assert row.status == "ok" and row.passed
    assert (row.torch_shape, row.onnx_shape) == ([1, 3], [1, 3, 2])
    assert any("(real, imag) pairs" in note for note in row.notes)
    wrong = pairs.copy()
    wrong[0, 1, 1] = 1.0  # imaginary part of one element flipped
    (row,) = compare({name: ref}, {name: wrong})
    assert row.status == "diverged" and row.metrics.mismatched == 1
    assert row.metrics.max_abs == pytest.approx(2.0)
    (row,) = compare({name: ref}, {name: pairs[..., :1]})  # any other layout is a shape row
    assert row.status == "shape_mismatch"


def test_dynamo_exports_a_complex_output_as_real_pairs_and_it_compares_ok():
    ort = pytest.importorskip("onnxruntime")
    import torch

    class Spectrum(torch.nn.Module):
        def forward(self, x):
            return torch.fft.rfft(x)

    x = torch.randn(2, 8)
    program = torch.onnx.export(Spectrum().eval(), (x,), dynamo=True)
    session = ort.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    ref = Spectrum()(x).numpy()
    assert (ref.dtype, ref.shape, got.dtype, got.shape) == (
        "complex64",
        (2, 5),
        "float32",
        (2, 5, 2),
    )
    (row,) = compare({MarkerName(""): ref}, {MarkerName(""): got})
    assert row.status == "ok", row.notes
    # The TorchScript exporter cannot export aten::fft_rfft at all (UnsupportedOperatorError).


def test_a_difference_that_overflows_float32_still_gives_metrics():
    big = np.array([3e38, -3e38, 1.0], np.float32)
    m, notes = compare_arrays(big, -big, atol=1e-4, rtol=1e-3)
    assert m.mismatched == 2 and m.max_abs == pytest.approx(6e38, rel=1e-6)
    assert math.isfinite(m.sqnr_db) and m.cosine == pytest.approx(-1.0)
    assert notes == []


def test_cosine_near_one_keeps_float64_resolution():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(100_000).astype(np.float32)
    got = (ref.astype(np.float64) * (1 + 1e-7)).astype(np.float32)
    r, g = ref.astype(np.float64), got.astype(np.float64)
    exact = math.fsum((r * g).tolist()) / math.sqrt(
        math.fsum((r * r).tolist()) * math.fsum((g * g).tolist())
    )
    m, _ = compare_arrays(ref, got, atol=0, rtol=0)
    assert abs((1 - m.cosine) - (1 - exact)) < 1e-15


def test_rows_compared_on_several_threads_equal_one_by_one_comparisons(monkeypatch):
    monkeypatch.setattr(sys.modules["fxalign.compare.rows"], "free_cpus", lambda: 3)
    rng = np.random.default_rng(3)
    names = [MarkerName(f"m{i}") for i in range(6)]
    torch_values = {n: rng.standard_normal(400_000).astype(np.float32) for n in names}
    onnx_values = {
        n: v + np.float32(1e-3) * (i % 2) for i, (n, v) in enumerate(torch_values.items())
    }
    onnx_values[names[4]][7] = np.nan
    rows = compare(torch_values, onnx_values)
    for row, name in zip(rows, names, strict=True):
        alone, notes = compare_arrays(
            torch_values[name], onnx_values[name], atol=row.atol, rtol=row.rtol
        )
        assert row.metrics == alone and row.notes == notes
    assert [r.status for r in rows] == ["ok", "diverged", "ok", "diverged", "diverged", "diverged"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("verdict", ["roundoff", "allclose"])
def test_blockwise_metrics_equal_the_whole_array_computation(monkeypatch, dtype, verdict):
    metrics = sys.modules["fxalign.compare.metrics"]
    # Small blocks and rows, so that a small array spans many of both, with a partial last one.
    monkeypatch.setattr(metrics, "_BLOCK", 1000)
    monkeypatch.setattr(metrics, "_ROW", 64)
    rng = np.random.default_rng(7)
    ref = (rng.standard_normal(10_500) * 3).astype(dtype)
    got = (ref + rng.standard_normal(ref.size) * 1e-5).astype(dtype)
    ref[5] = 0.0  # the largest relative error sits on a zero
    got[2500] += 1.0  # mismatches in two blocks, one of them the last (partial) block
    got[10_400] -= 0.5
    edge = np.abs(ref[7000:7010]) * dtype(1e-3)  # exactly at the allclose tolerance
    edge += dtype(1e-4)
    got[7000:7010] = ref[7000:7010] + edge
    unit = metrics.roundoff_unit(verdict, metrics.machine_eps(ref), 1e-3)
    blocks = metrics._real_metrics(ref, got, 1e-4, 1e-3, unit)
    with np.errstate(over="ignore"):
        whole = metrics._float_metrics(
            ref, got, metrics._abs_difference(got, ref), 1e-4, 1e-3, unit
        )
    assert blocks is not None and blocks.mismatched == whole.mismatched >= 2
    assert (blocks.max_abs, blocks.max_rel, blocks.numel) == (
        whole.max_abs,
        whole.max_rel,
        whole.numel,
    )
    for field in ("mean_abs", "rmse", "cosine", "sqnr_db", "roundoff"):
        assert getattr(blocks, field) == pytest.approx(getattr(whole, field), rel=1e-12)
    got[9000] = np.nan  # anything not finite: the whole-array path takes over
    assert metrics._real_metrics(ref, got, 1e-4, 1e-3, unit) is None
    again, _ = compare_arrays(ref, got, atol=1e-4, rtol=1e-3, verdict=verdict)
    assert again.mismatched == whole.mismatched + 1
