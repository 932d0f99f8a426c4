"""Two arrays in, :class:`Metrics` out: the error statistics and the verdict rule.

PyTorch is the reference. Under the default rule (``verdict="roundoff"``) an element passes
when::

    |onnx - torch| <= atol + rtol * |torch| + min(ROUNDOFF_FACTOR * eps, rtol) * rms(torch)

``eps`` being the machine epsilon of the value's dtype and ``rms(torch)`` the root mean square
of the PyTorch value's finite elements: plain ``allclose`` plus the round-off that float values
of that typical magnitude carry, which an element small by cancellation carries too (see
:data:`~fxalign.report.model.ROUNDOFF_FACTOR`). ``verdict="allclose"`` drops the last term.
NaN on both sides at one position counts as equal (and is counted), as do infinities of the
same sign; any other NaN or Inf mismatch fails. Integer and boolean tensors are compared
exactly under either rule.

How the numbers are computed: two float32 arrays elementwise in float32 (as ``numpy.allclose``
does; the difference of two close float32 values is exact) with every sum accumulated in
float64; integers and booleans exactly (their differences as Python integers, only the sums
behind ``cosine`` and ``sqnr_db`` in float64); any other pair widened to float64 (complex128
for complex values) first. Real values are worked through in cache-sized blocks, every
statistic of a block taken while it is in cache; a value with a NaN or an infinity anywhere
takes a whole-array path that masks them.
"""

from __future__ import annotations

import math
from typing import Any, get_args

import numpy as np

from fxalign.errors import UserError
from fxalign.report.model import ROUNDOFF_FACTOR, Metrics, Verdict

__all__ = [
    "ROUNDOFF_FACTOR",
    "check_verdict",
    "compare_arrays",
    "dtype_eps",
    "is_exact",
    "machine_eps",
    "roundoff_unit",
]

_EPS: dict[str, float] = {
    "float64": 2.0**-52,
    "float32": 2.0**-23,
    "float16": 2.0**-10,
    "bfloat16": 2.0**-7,
    "complex128": 2.0**-52,
    "complex64": 2.0**-23,
}


def dtype_eps(dtype: str | None) -> float | None:
    """Machine epsilon of a PyTorch/numpy float dtype name (``None`` for other dtypes).

    Example:
        >>> dtype_eps("bfloat16"), dtype_eps("int64")
        (0.0078125, None)
    """
    return _EPS.get(dtype or "")


def machine_eps(*arrays: np.ndarray) -> float:
    """The coarsest machine epsilon among the float (or complex) arrays; float64's if none is."""
    found = [
        float(np.finfo(a.dtype).eps)
        for a in arrays
        if np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.complexfloating)
    ]
    return max(found, default=2.0**-52)


_BLOCK = 1 << 17
"""Elements per float64 block in :func:`_dot`: two blocks stay in cache."""


def _dot(a: np.ndarray, b: np.ndarray) -> Any:
    """``sum(a * b)`` of two 1-D arrays without a full-size temporary and without BLAS.

    float32 operands are multiplied and summed in float64, one cache-sized block at a time
    (faster than einsum's own casting); ``a is b`` (a sum of squares) casts each block once.
    """
    if a.dtype == np.float32 and b.dtype == np.float32:
        total = 0.0
        for i in range(0, a.size, _BLOCK):
            x = a[i : i + _BLOCK].astype(np.float64)
            y = x if b is a else b[i : i + _BLOCK].astype(np.float64)
            total += float(np.einsum("i,i->", x, y))
        return total
    return np.einsum("i,i->", a, b)


def roundoff_unit(verdict: Verdict, eps: float, rtol: float) -> float:
    """The round-off allowance per unit of ``rms(torch)``: ``min(ROUNDOFF_FACTOR * eps, rtol)``.

    0 under ``allclose``. Capped by ``rtol`` so that no element is given more slack than an
    element of the tensor's typical magnitude gets from ``rtol`` (which matters for float16
    and bfloat16, whose ``ROUNDOFF_FACTOR * eps`` exceeds 1), and ``rtol=0`` turns it off.

    Example:
        >>> roundoff_unit("roundoff", 2.0**-23, 1e-3), roundoff_unit("roundoff", 2.0**-10, 1e-2)
        (0.00048828125, 0.01)
    """
    return min(ROUNDOFF_FACTOR * eps, rtol) if verdict == "roundoff" else 0.0


def is_exact(dtype: np.dtype) -> bool:
    """Integers and booleans: compared exactly."""
    return bool(np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.bool_))


def check_verdict(verdict: str) -> Verdict:
    """``verdict`` if it names a rule, else a :class:`~fxalign.errors.UserError` listing them."""
    if verdict not in get_args(Verdict):
        raise UserError(
            f"unknown verdict {verdict!r}",
            hint=f"use one of {', '.join(get_args(Verdict))} (default roundoff)",
        )
    return verdict  # type: ignore[return-value]


def compare_arrays(
    reference: np.ndarray,
    value: np.ndarray,
    *,
    atol: float,
    rtol: float,
    verdict: Verdict = "roundoff",
    eps: float | None = None,
) -> tuple[Metrics, list[str]]:
    """Compare ``value`` (ONNX) against ``reference`` (PyTorch) of the same shape.

    Args:
        reference: The PyTorch value.
        value: The ONNX value.
        atol: Absolute tolerance (ignored for integer and boolean tensors, compared exactly).
        rtol: Relative tolerance (ignored for integer and boolean tensors).
        verdict: ``"roundoff"``: an element passes within ``atol + rtol * |torch|`` plus the
            round-off allowance ``min(ROUNDOFF_FACTOR * eps, rtol) * rms(torch)``;
            ``"allclose"``: within ``atol + rtol * |torch|`` only.
        eps: Machine epsilon of the value's dtype; ``None``: the coarser of the two arrays'
            (pass it when the arrays were widened, as bfloat16 values are).

    Returns:
        The metrics and notes about NaN/Inf or dtype handling.

    Raises:
        UserError: ``verdict`` names no rule.

    Example:
        >>> m, _ = compare_arrays(np.ones(3), np.ones(3) + 1e-3, atol=1e-4, rtol=0)
        >>> m.mismatched, round(m.max_abs, 6)
        (3, 0.001)
        >>> big = np.array([1e8, 3.0], np.float32)
        >>> off = np.array([1e8, 3.5], np.float32)  # an error of 0.5 next to a value of 1e8
        >>> [compare_arrays(big, off, atol=1e-4, rtol=1e-3, verdict=v)[0].mismatched
        ...  for v in ("allclose", "roundoff")]
        [1, 0]
    """
    check_verdict(verdict)
    notes: list[str] = []
    if is_exact(reference.dtype) and is_exact(value.dtype):
        return _exact_metrics(reference, value), notes
    if np.iscomplexobj(reference) or np.iscomplexobj(value):
        wide: Any = np.complex128
    elif reference.dtype == np.float32 and value.dtype == np.float32:
        # Elementwise work in float32, as np.allclose does for float32 arrays (a difference of
        # two close float32 values is exact); every sum is accumulated in float64 (``_dot``,
        # ``mean``). Half the memory traffic of widening both arrays first.
        wide = np.float32
    else:
        wide = np.float64
    numel = reference.size
    if numel == 0 or value.size == 0:
        return Metrics(0.0, 0.0, 0.0, 0.0, 1.0, math.inf, 0, 0), ["empty tensor"]
    ref: np.ndarray = np.asarray(reference, dtype=wide).ravel()
    got: np.ndarray = np.asarray(value, dtype=wide).ravel()
    if eps is None:
        eps = machine_eps(reference, value)
    unit = roundoff_unit(verdict, eps, rtol)
    # Common case first: no NaN or Inf anywhere needs no masks and no masked copies. A NaN or
    # an infinity on either side (or a difference that overflows) makes the largest difference
    # NaN or infinite, so the difference itself tells, without a pass of its own.
    if wide is not np.complex128:
        with np.errstate(invalid="ignore", over="ignore"):
            found = _real_metrics(ref, got, atol, rtol, unit)
        if found is not None:
            found.numel = numel
            return found, notes
    else:
        with np.errstate(invalid="ignore", over="ignore"):
            diff = _abs_difference(got, ref)
        if math.isfinite(float(diff.max())):
            metrics = _float_metrics(ref, got, diff, atol, rtol, unit)
            metrics.numel = numel
            return metrics, notes
        del diff
    r, g, special_bad_count, nan_matched = _finite_part(ref, got, notes)
    if not np.iscomplexobj(r):  # rare path: in float64, no float32 difference overflows
        r, g = r.astype(np.float64), g.astype(np.float64)
    with np.errstate(over="ignore"):
        metrics = _float_metrics(r, g, _abs_difference(g, r), atol, rtol, unit)
    metrics.numel, metrics.nan_matched = numel, nan_matched
    if special_bad_count:
        metrics.mismatched += special_bad_count
        metrics.max_abs = metrics.max_rel = math.inf
    return metrics, notes


_ROW = 8192
"""Elements per dot product in :func:`_square_sum`: below the length (10000) from which
OpenBLAS splits one dot product across its thread pool, so no BLAS thread is woken (threads
left spinning after a call starve PyTorch's own on small machines)."""

_vecdot = getattr(np, "vecdot", None)  # numpy >= 2.0


def _square_sum(x: np.ndarray) -> float:
    """``sum(x * x)`` of a 1-D float64 array.

    One BLAS dot per row of :data:`_ROW` elements with numpy 2 (``vecdot``), else ``einsum``.
    """
    if _vecdot is None or x.size < _ROW:
        return float(np.einsum("i,i->", x, x))
    full = x.size - x.size % _ROW
    rows = x[:full].reshape(-1, _ROW)
    total = float(_vecdot(rows, rows).sum())
    if full < x.size:
        tail = x[full:]
        total += float(np.einsum("i,i->", tail, tail))
    return total


def _real_metrics(
    r: np.ndarray, g: np.ndarray, atol: float, rtol: float, unit: float
) -> Metrics | None:
    """Metrics of two 1-D real float arrays of one dtype, or ``None`` if any is NaN or Inf.

    The same numbers as :func:`_float_metrics` (``numel`` is filled by the caller), computed
    one cache-sized block at a time: every elementwise step of a block works on scratch
    arrays that stay in cache, so each input is read from memory once (the whole-array
    version makes a dozen passes over arrays larger than the cache). The sums are taken in
    float64, as there (the square of a float32 value is exact in float64); only their order
    of summation differs.

    Whether an element is beyond ``atol + rtol * |r| + roundoff`` needs ``roundoff``, which
    needs the sum of squares of all of ``r``. The first pass counts against ``atol`` alone, a
    tolerance no larger (rounding is monotonic); only blocks with an element beyond it are
    counted again once ``roundoff`` is known, which a passing value never needs.
    """
    n = r.size
    size = min(_BLOCK, n)
    dtype = r.dtype
    d, a, s = np.empty(size, dtype), np.empty(size, dtype), np.empty(size, dtype)
    wide = np.empty(size, np.float64) if dtype != np.float64 else None
    over = np.empty(size, np.bool_)
    max_abs = max_rel = 0.0
    sum_abs = signal = other = noise = 0.0
    suspect: list[int] = []

    def square_sum(x: np.ndarray, w: np.ndarray | None) -> float:
        if w is None:
            return _square_sum(x)
        np.copyto(w, x)
        return _square_sum(w)

    for i in range(0, n, size):
        rb, gb = r[i : i + size], g[i : i + size]
        m = rb.size
        db, ab, sb, ob = d[:m], a[:m], s[:m], over[:m]
        wb = None if wide is None else wide[:m]
        np.subtract(gb, rb, out=db)
        np.abs(db, out=db)
        top = float(db.max())
        if not math.isfinite(top):
            return None
        max_abs = max(max_abs, top)
        np.abs(rb, out=ab)
        np.add(ab, 1e-12, out=sb)
        np.divide(db, sb, out=sb)
        max_rel = max(max_rel, float(sb.max()))
        if top > atol:  # else every element is within atol, the smallest tolerance
            np.multiply(ab, rtol, out=ab)
            ab += atol
            if np.greater(db, ab, out=ob).any():
                suspect.append(i)
        signal += square_sum(rb, wb)
        other += square_sum(gb, wb)
        if wb is None:
            noise += _square_sum(db)
            sum_abs += float(db.sum())
        else:
            np.copyto(wb, db)
            noise += _square_sum(wb)
            sum_abs += float(wb.sum())
    roundoff = unit * math.sqrt(signal / n)
    mismatched = 0
    for i in suspect:
        rb, gb = r[i : i + size], g[i : i + size]
        m = rb.size
        db, ab = d[:m], a[:m]
        np.subtract(gb, rb, out=db)
        np.abs(db, out=db)
        np.abs(rb, out=ab)
        np.multiply(ab, rtol, out=ab)
        ab += atol + roundoff
        mismatched += int(np.count_nonzero(np.greater(db, ab, out=over[:m])))
    return _summary(max_abs, sum_abs / n, max_rel, signal, other, noise, mismatched, n, roundoff)


def _summary(
    max_abs: float,
    mean_abs: float,
    max_rel: float,
    signal: float,
    other: float,
    noise: float,
    mismatched: int,
    size: int,
    roundoff: float,
) -> Metrics:
    """:class:`Metrics` from the sums of squares of the reference, the value and the error.

    The cosine comes from the three sums of squares (``|r|^2 + |g|^2 - |g - r|^2 = 2 r.g``),
    each taken in float64, so no product pass is needed and ``1 - cosine`` stays exact to
    float64's resolution.
    """
    rmse = math.sqrt(noise / size)
    nr, ng = math.sqrt(signal), math.sqrt(other)
    if nr == 0 and ng == 0:
        cosine = 1.0
    elif nr == 0 or ng == 0:
        cosine = 0.0
    else:
        cosine = max(-1.0, min(1.0, (signal + other - noise) / (2.0 * nr * ng)))
    ratio = math.inf if noise == 0 else signal / noise
    sqnr = -math.inf if ratio == 0 else 10.0 * math.log10(ratio)
    return Metrics(
        max_abs, mean_abs, rmse, max_rel, cosine, sqnr, mismatched, size, roundoff=roundoff
    )


def _abs_difference(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``|got - ref|`` as a new real array (magnitudes of complex differences)."""
    diff = np.subtract(got, ref)
    if np.iscomplexobj(diff):
        return np.abs(diff)
    return np.abs(diff, out=diff)


def _finite_part(
    ref: np.ndarray, got: np.ndarray, notes: list[str]
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The positions finite on both sides, and the NaN/Inf bookkeeping of the others.

    Returns:
        ``(ref, got)`` at the finite positions, positions whose NaN/Inf differ, positions NaN
        on both sides; ``notes`` gets a sentence about each kind found.
    """
    ref_nan, got_nan = np.isnan(ref), np.isnan(got)
    both_nan = ref_nan & got_nan
    same_inf = np.isinf(ref) & np.isinf(got) & (ref == got)
    special_ok = both_nan | same_inf
    special_bad = (ref_nan | got_nan | np.isinf(ref) | np.isinf(got)) & ~special_ok
    finite = ~(special_ok | special_bad)
    bad, nan_matched, inf_matched = int(special_bad.sum()), int(both_nan.sum()), int(same_inf.sum())
    if nan_matched:
        notes.append(f"{nan_matched} NaN at the same positions on both sides (counted equal)")
    if bad:
        notes.append(f"{bad} NaN/Inf positions differ between the sides")
    if inf_matched:
        notes.append(f"{inf_matched} matching infinities")
    return ref[finite], got[finite], bad, nan_matched


def _float_metrics(
    r: np.ndarray, g: np.ndarray, diff: np.ndarray, atol: float, rtol: float, unit: float
) -> Metrics:
    """Metrics of two finite 1-D float (or complex) arrays; ``numel`` is filled by the caller.

    ``diff`` is ``|g - r|`` (real; overwritten); ``unit * rms(r)`` is the round-off allowance
    added to ``atol``.
    """
    if not r.size:
        return Metrics(0.0, 0.0, 0.0, 0.0, 1.0, math.inf, 0, 0)
    # Few passes, few temporaries, and no BLAS call (np.linalg.norm, np.vdot): BLAS thread
    # pools left spinning after a call starve PyTorch's own threads on small machines. The
    # cosine comes from the three sums of squares (|r|^2 + |g|^2 - |g - r|^2 = 2 r.g), each
    # taken in float64, so no fourth product pass is needed and 1 - cosine stays exact to
    # float64's resolution.
    mag_r = np.abs(r) if np.iscomplexobj(r) else r
    mag_g = np.abs(g) if np.iscomplexobj(g) else g
    signal = float(_dot(mag_r, mag_r))
    other = float(_dot(mag_g, mag_g))
    noise = float(_dot(diff, diff))
    max_abs = float(diff.max())
    mean_abs = float(diff.mean(dtype=np.float64))
    roundoff = unit * math.sqrt(signal / r.size)
    abs_ref = np.abs(r)
    scratch = np.add(abs_ref, 1e-12, dtype=abs_ref.dtype)
    np.divide(diff, scratch, out=scratch)
    max_rel = float(scratch.max())
    tolerance = np.multiply(abs_ref, rtol, out=abs_ref)
    tolerance += atol + roundoff
    mismatched = int(np.count_nonzero(diff > tolerance))
    del tolerance, scratch, abs_ref
    return _summary(max_abs, mean_abs, max_rel, signal, other, noise, mismatched, r.size, roundoff)


def _exact_metrics(reference: np.ndarray, value: np.ndarray) -> Metrics:
    """Metrics of two integer or boolean arrays, exact at any magnitude.

    Positions are compared in the arrays' own integer types (float64 would merge int64 values
    above 2**53); the differences at the positions that differ are taken as Python integers, so
    neither rounding nor int64 overflow can hide a difference. The sums behind ``cosine`` and
    ``sqnr_db`` are taken in float64.
    """
    ref, got = reference.ravel(), value.ravel()
    if ref.dtype == np.bool_:
        ref = ref.astype(np.int8)
    if got.dtype == np.bool_:
        got = got.astype(np.int8)
    if ref.dtype.kind != got.dtype.kind and (ref.dtype.kind == "u" or got.dtype.kind == "u"):
        # int64 against uint64 would go through float64: compare as Python integers.
        differs = np.fromiter(
            (int(a) != int(b) for a, b in zip(ref.tolist(), got.tolist(), strict=True)),
            dtype=bool,
            count=ref.size,
        )
    else:
        differs = ref != got
    positions = np.flatnonzero(differs)
    numel = ref.size
    torch_ints = ref[positions].tolist()
    deltas = [
        abs(int(b) - int(a)) for a, b in zip(torch_ints, got[positions].tolist(), strict=True)
    ]
    if not deltas:
        return Metrics(0.0, 0.0, 0.0, 0.0, 1.0, math.inf, 0, numel)
    signal = float(np.einsum("i,i->", ref.astype(np.float64), ref.astype(np.float64)))
    noise = float(sum(d * d for d in deltas))
    norm_got = math.sqrt(float(np.einsum("i,i->", got.astype(np.float64), got.astype(np.float64))))
    dot = float(np.einsum("i,i->", ref.astype(np.float64), got.astype(np.float64)))
    norm_ref = math.sqrt(signal)
    cosine = 0.0 if norm_ref == 0 or norm_got == 0 else dot / (norm_ref * norm_got)
    return Metrics(
        max_abs=float(max(deltas)),
        mean_abs=float(sum(deltas)) / numel,
        rmse=math.sqrt(noise / numel),
        max_rel=max(d / (abs(a) + 1e-12) for d, a in zip(deltas, torch_ints, strict=True)),
        cosine=cosine,
        sqnr_db=-math.inf if signal == 0 else 10.0 * math.log10(signal / noise),
        mismatched=len(deltas),
        numel=numel,
    )
