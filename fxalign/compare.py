"""Stage 5: compare PyTorch and ONNX values marker by marker, with numpy only.

Every metric is computed in float64 so that fxalign does not measure its own rounding. PyTorch
is the reference: ``passed`` follows ``numpy.allclose(onnx, torch, atol, rtol)``, that is
``|onnx - torch| <= atol + rtol * |torch|`` everywhere. NaN on both sides at one position counts
as equal (and is counted), as do infinities of the same sign; any other NaN or Inf mismatch fails
the row. Integer and boolean tensors are compared exactly. Shape or dtype mismatches and values
missing on one side are reported rows, never exceptions.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fxalign.names import MarkerName
from fxalign.report.model import Metrics, Row, RowKind, SampleStats

__all__ = [
    "DTYPE_TOLERANCES",
    "SampleAggregate",
    "compare",
    "compare_arrays",
    "row_order",
    "first_divergence",
    "tolerance_for",
]

DTYPE_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-7, 1e-6),
    "float32": (1e-4, 1e-3),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
"""Default ``(atol, rtol)`` by PyTorch dtype name, used where no global tolerance is given;
other float types use the float32 pair, integers and booleans are compared exactly."""


def tolerance_for(
    name: str,
    module_path: str,
    dtype: str | None,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    overrides: Mapping[str, Mapping[str, float]] | None = None,
) -> tuple[float, float]:
    """The ``(atol, rtol)`` that apply to one value.

    The global ``atol``/``rtol`` when given, else the dtype default (:data:`DTYPE_TOLERANCES`);
    then every override whose glob pattern matches the marker name or the module path, in the
    order given (later ones win), e.g. ``{"*.attention.*": {"atol": 1e-3}}``.

    Example:
        >>> tolerance_for("enc.attention.q", "enc.attention.q", "float16",
        ...               overrides={"*.attention.*": {"atol": 0.1}})
        (0.1, 0.01)
    """
    default = DTYPE_TOLERANCES.get(dtype or "float32", DTYPE_TOLERANCES["float32"])
    result = [default[0] if atol is None else atol, default[1] if rtol is None else rtol]
    for pattern, values in (overrides or {}).items():
        if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(module_path, pattern):
            result = [values.get("atol", result[0]), values.get("rtol", result[1])]
    return result[0], result[1]


def _buffer_key(a: np.ndarray) -> tuple[Any, ...]:
    """Identifies an array's contents by its memory: equal keys, equal values."""
    return (a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str)


_BLOCK = 1 << 17
"""Elements per float64 block in :func:`_dot`: two blocks stay in cache."""


def _dot(a: np.ndarray, b: np.ndarray) -> Any:
    """``sum(a * b)`` of two 1-D arrays without a full-size temporary and without BLAS.

    float32 operands are multiplied and summed in float64, one cache-sized block at a time
    (faster than einsum's own casting).
    """
    if a.dtype == np.float32 and b.dtype == np.float32:
        total = 0.0
        for i in range(0, a.size, _BLOCK):
            x, y = a[i : i + _BLOCK].astype(np.float64), b[i : i + _BLOCK].astype(np.float64)
            total += float(np.einsum("i,i->", x, y))
        return total
    return np.einsum("i,i->", a, b)


def _is_exact(dtype: np.dtype) -> bool:
    return bool(np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.bool_))


def compare_arrays(
    reference: np.ndarray, value: np.ndarray, *, atol: float, rtol: float
) -> tuple[Metrics, list[str]]:
    """Compare ``value`` (ONNX) against ``reference`` (PyTorch) of the same shape.

    Args:
        reference: The PyTorch value.
        value: The ONNX value.
        atol: Absolute tolerance (ignored for integer and boolean tensors, compared exactly).
        rtol: Relative tolerance (ignored for integer and boolean tensors).

    Returns:
        The metrics and notes about NaN/Inf or dtype handling.

    Example:
        >>> m, _ = compare_arrays(np.ones(3), np.ones(3) + 1e-3, atol=1e-4, rtol=0)
        >>> m.mismatched, round(m.max_abs, 6)
        (3, 0.001)
    """
    notes: list[str] = []
    if _is_exact(reference.dtype) and _is_exact(value.dtype):
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
    # Common case first: no NaN or Inf anywhere (checked in the inputs' own, narrower dtype)
    # needs no masks and no masked copies; the arithmetic below is the same either way.
    all_finite = bool(np.isfinite(reference).all() and np.isfinite(value).all())
    ref: np.ndarray = np.asarray(reference, dtype=wide).ravel()
    got: np.ndarray = np.asarray(value, dtype=wide).ravel()

    special_bad_count = nan_matched = 0
    if all_finite:
        r, g = ref, got
    else:
        ref_nan, got_nan = np.isnan(ref), np.isnan(got)
        both_nan = ref_nan & got_nan
        same_inf = np.isinf(ref) & np.isinf(got) & (ref == got)
        special_ok = both_nan | same_inf
        special_bad = (ref_nan | got_nan | np.isinf(ref) | np.isinf(got)) & ~special_ok
        finite = ~(special_ok | special_bad)
        special_bad_count = int(special_bad.sum())

        nan_matched = int(both_nan.sum())
        if nan_matched:
            notes.append(f"{nan_matched} NaN at the same positions on both sides (counted equal)")
        if special_bad_count:
            notes.append(f"{special_bad_count} NaN/Inf positions differ between the sides")
        if int(same_inf.sum()):
            notes.append(f"{int(same_inf.sum())} matching infinities")
        r, g = ref[finite], got[finite]

    # Few passes, few float64 temporaries, and no BLAS call (np.linalg.norm, np.vdot): BLAS
    # thread pools left spinning after a call starve PyTorch's own threads on small machines.
    diff = np.subtract(g, r)
    if np.iscomplexobj(diff):
        diff = np.abs(diff)  # magnitudes are real: no complex array past this point
    else:
        np.abs(diff, out=diff)
    abs_ref = np.abs(r)
    tolerance = np.multiply(abs_ref, rtol)
    tolerance += atol
    mismatched = int(np.count_nonzero(~(diff <= tolerance))) + special_bad_count
    del tolerance

    if diff.size:
        max_abs = float(diff.max())
        mean_abs = float(diff.mean(dtype=np.float64))
        noise = float(_dot(diff, diff))
        rmse = math.sqrt(noise / diff.size)
        signal = float(_dot(abs_ref, abs_ref))
        abs_ref += 1e-12
        np.divide(diff, abs_ref, out=abs_ref)
        max_rel = float(abs_ref.max())
        del diff, abs_ref
        magnitude = np.abs(g) if np.iscomplexobj(g) else g
        nr, ng = math.sqrt(signal), math.sqrt(float(_dot(magnitude, magnitude)))
        if nr == 0 and ng == 0:
            cosine = 1.0
        elif nr == 0 or ng == 0:
            cosine = 0.0
        else:
            cosine = float(np.real(_dot(np.conj(r) if np.iscomplexobj(r) else r, g))) / (nr * ng)
        if noise == 0:
            sqnr = math.inf
        elif signal == 0:
            sqnr = -math.inf
        else:
            sqnr = 10.0 * math.log10(signal / noise)
    else:
        max_abs = mean_abs = rmse = max_rel = 0.0
        cosine, sqnr = 1.0, math.inf
    if special_bad_count:
        max_abs = max_rel = math.inf
    return (
        Metrics(max_abs, mean_abs, rmse, max_rel, cosine, sqnr, mismatched, numel, nan_matched),
        notes,
    )


def _exact_metrics(reference: np.ndarray, value: np.ndarray) -> Metrics:
    """Metrics of two integer or boolean arrays, exact at any magnitude.

    Positions are compared in the arrays' own integer types (float64 would merge int64 values
    above 2**53); the differences at the positions that differ are taken as Python integers, so
    neither rounding nor int64 overflow can hide a difference.
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
    signal = float(np.einsum("i,i->", ref.astype(np.float64), ref.astype(np.float64)))
    noise = float(sum(d * d for d in deltas))
    if not deltas:
        return Metrics(0.0, 0.0, 0.0, 0.0, 1.0, math.inf, 0, numel)
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


def _dtype_name(a: np.ndarray | None) -> str | None:
    return None if a is None else str(a.dtype)


def compare(
    torch_values: Mapping[MarkerName, np.ndarray],
    onnx_values: Mapping[MarkerName, np.ndarray],
    *,
    atol: float | None = None,
    rtol: float | None = None,
    tolerances: Mapping[str, Mapping[str, float]] | None = None,
    module_types: Mapping[str, str] | None = None,
    leaf_paths: Sequence[str] = (),
    onnx_names: Mapping[MarkerName, str] | None = None,
    onnx_nodes: Mapping[MarkerName, str] | None = None,
    torch_dtypes: Mapping[MarkerName, str] | None = None,
    tolerance_dtypes: Mapping[MarkerName, str] | None = None,
) -> list[Row]:
    """Compare values aligned by marker name, in PyTorch execution order.

    Args:
        torch_values: ``marker name -> PyTorch value`` in execution order (from
            :func:`fxalign.run_torch`), final outputs under the root's names (module path
            ``""``).
        onnx_values: ``marker name -> ONNX value``; markers absent here are reported as
            ``missing_in_onnx``.
        atol: Absolute tolerance for every value; ``None``: by dtype (:data:`DTYPE_TOLERANCES`).
        rtol: Relative tolerance for every value; ``None``: by dtype.
        tolerances: Per-module overrides, ``glob pattern -> {"atol": ..., "rtol": ...}``,
            matched against marker names as shown and module paths (see :func:`tolerance_for`).
        module_types: ``module path -> class name`` for the ``module_type`` column.
        leaf_paths: Paths of leaf modules (others are blocks).
        onnx_names: ``marker name -> ONNX tensor name`` for the ``onnx_name`` column.
        onnx_nodes: ``marker name -> name of the ONNX node producing the value`` (from
            :attr:`fxalign.ExtractResult.producer_of`); empty names are stored as ``None``.
        torch_dtypes: ``marker name -> PyTorch dtype name`` where it differs from the numpy
            array's (``bfloat16`` values arrive widened to float32).
        tolerance_dtypes: ``marker name -> dtype name`` whose default tolerance applies instead
            of the PyTorch dtype's (the ONNX value's ``float16`` in a converted file).

    Returns:
        One :class:`Row` per marker, then values present only on the ONNX side; the model's
        final outputs last. Each row's ``name`` is the marker name as shown (``str(name)``),
        ``module_path`` and ``call_index`` its fields.

    Example:
        >>> a = np.ones(2, np.float32)
        >>> rows = compare({MarkerName("fc"): a}, {MarkerName("fc"): a + 1e-6})
        >>> [(r.name, r.status, r.kind) for r in rows]
        [('fc', 'ok', 'block')]
    """
    module_types, onnx_names = module_types or {}, onnx_names or {}
    onnx_nodes, torch_dtypes = onnx_nodes or {}, torch_dtypes or {}
    tolerance_dtypes = tolerance_dtypes or {}
    leaves = set(leaf_paths)
    rows: list[Row] = []
    # One value marked under several names (a block's output is its last layer's output) is
    # one PyTorch buffer and one ONNX array: compare it once.
    known: dict[tuple[Any, ...], tuple[Metrics, list[str]]] = {}
    for name in row_order(torch_values, onnx_values):
        path, shown = name.module_path, str(name)
        kind: RowKind = "output" if not path else ("leaf" if path in leaves else "block")
        ref, got = torch_values.get(name), onnx_values.get(name)
        dtype = (
            tolerance_dtypes.get(name)
            or torch_dtypes.get(name)
            or _dtype_name(ref)
            or _dtype_name(got)
        )
        row_atol, row_rtol = tolerance_for(
            shown, path, dtype, atol=atol, rtol=rtol, overrides=tolerances
        )
        row = Row(
            name=shown,
            module_path=path,
            call_index=name.call_index,
            module_type=module_types.get(path, ""),
            kind=kind,
            status="ok",
            passed=None,
            atol=row_atol,
            rtol=row_rtol,
            onnx_name=onnx_names.get(name),
            torch_shape=None if ref is None else list(ref.shape),
            onnx_shape=None if got is None else list(got.shape),
            torch_dtype=torch_dtypes.get(name) or _dtype_name(ref),
            onnx_dtype=_dtype_name(got),
            onnx_node=onnx_nodes.get(name) or None,
        )
        _fill_status(row, ref, got, known)
        rows.append(row)
    return rows


def row_order(
    torch_values: Mapping[MarkerName, Any], onnx_values: Mapping[MarkerName, Any]
) -> list[MarkerName]:
    """The marker names :func:`compare` makes its rows for, in the order of the rows.

    PyTorch's names in execution order, then those only the ONNX side has; the model's final
    outputs last, in their own order. Rows show their name only (``Row.name``); pair them with
    these to keep the structured name.
    """
    names = list(torch_values) + [n for n in onnx_values if n not in torch_values]
    return [n for n in names if n.module_path] + [n for n in names if not n.module_path]


def _fill_status(
    row: Row,
    ref: np.ndarray | None,
    got: np.ndarray | None,
    known: dict[tuple[Any, ...], tuple[Metrics, list[str]]],
) -> None:
    """Set the row's status, metrics and notes from its two values."""
    if got is None:
        row.status = "missing_in_onnx"
        row.notes.append(
            "not in ONNX graph: the exporter removed this value (unused or folded away)"
        )
    elif ref is None:
        row.status = "missing_in_torch"
        row.notes.append("in the ONNX graph but not produced by the PyTorch run")
    elif ref.shape != got.shape:
        row.status = "shape_mismatch"
        row.passed = False
        row.notes.append(f"shape differs: torch {list(ref.shape)} vs onnx {list(got.shape)}")
    else:
        if ref.dtype != got.dtype:
            row.notes.append(
                f"dtype differs: torch {ref.dtype} vs onnx {got.dtype}; compared as float64"
            )
        key = (_buffer_key(ref), id(got), row.atol, row.rtol)
        if key not in known:
            known[key] = compare_arrays(ref, got, atol=row.atol, rtol=row.rtol)
        metrics, notes = known[key]
        row.metrics = dataclasses.replace(metrics)
        row.notes.extend(notes)
        row.passed = row.metrics.mismatched == 0
        row.status = "ok" if row.passed else "diverged"


class SampleAggregate:
    """Folds the rows of one sample after another into one row per value.

    Only the current worst row of each value and running sums are kept, so memory does not
    grow with the number of samples. Each value's row is the one from its worst sample
    (failures first, then the largest ``max_abs``), with :class:`SampleStats` attached; its
    local error is the worst local error seen over the samples.
    """

    def __init__(self) -> None:
        self._rows: dict[str, Row] = {}
        self._sums: dict[str, tuple[int, int, float, float]] = {}
        self.count = 0

    @staticmethod
    def _badness(row: Row) -> tuple[int, float]:
        error = row.metrics.max_abs if row.metrics is not None else -1.0
        return (1 if row.failed else 0, error if not math.isnan(error) else math.inf)

    def add(self, index: int, rows: Sequence[Row]) -> None:
        """Fold in the rows of sample ``index``."""
        self.count += 1
        for row in rows:
            error = row.metrics.max_abs if row.metrics is not None else None
            n, failed, total, worst = self._sums.get(row.name, (0, 0, 0.0, -math.inf))
            failed += bool(row.failed)
            if error is not None:
                n, total = n + 1, total + error
                worst = max(worst, error)
            self._sums[row.name] = (n, failed, total, worst)
            best = self._rows.get(row.name)
            local = _worse_local(best.local if best else None, row.local)
            if best is None or self._badness(row) > self._badness(best):
                row.samples = SampleStats(0, 0, 0.0, 0.0, index)
                self._rows[row.name] = row
                best = row
            best.local = local

    def rows(self) -> list[Row]:
        """The aggregated rows, in first-seen order, final outputs last."""
        out = list(self._rows.values())
        for row in out:
            n, failed, total, worst = self._sums[row.name]
            index = row.samples.worst_sample if row.samples else 0
            row.samples = SampleStats(
                n, failed, worst if n else 0.0, total / n if n else 0.0, index
            )
        return [r for r in out if r.kind != "output"] + [r for r in out if r.kind == "output"]


def _worse_local(a: Metrics | None, b: Metrics | None) -> Metrics | None:
    if a is None or b is None:
        return a or b
    return b if b.max_abs > a.max_abs else a


def first_divergence(rows: Sequence[Row]) -> Row | None:
    """The first row, in execution order, that breaks tolerance."""
    return next((r for r in rows if r.failed), None)
