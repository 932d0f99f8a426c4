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
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from fxalign.markers import MarkerName

__all__ = ["Metrics", "Row", "RowKind", "Status", "compare", "compare_arrays", "first_divergence"]

Status = Literal["ok", "diverged", "shape_mismatch", "missing_in_onnx", "missing_in_torch"]
"""Row outcome. Only ``diverged`` and ``shape_mismatch`` fail; missing values are reported."""

RowKind = Literal["leaf", "block", "output"]
"""A leaf module's output, a block's (container's) output, or one of the model's final outputs."""


@dataclass
class Metrics:
    """How far the ONNX value is from the PyTorch value (all computed in float64).

    Attributes:
        max_abs: Largest absolute difference.
        mean_abs: Mean absolute difference.
        rmse: Root mean square difference.
        max_rel: Largest ``|onnx - torch| / (|torch| + 1e-12)``.
        cosine: Cosine similarity of the flattened values (1.0 when both are all zero).
        sqnr_db: Signal-to-quantisation-noise ratio in dB; ``inf`` when identical.
        mismatched: Elements outside tolerance (NaN/Inf mismatches included).
        numel: Number of elements.
        nan_matched: Positions where both sides are NaN (counted as equal).
    """

    max_abs: float
    mean_abs: float
    rmse: float
    max_rel: float
    cosine: float
    sqnr_db: float
    mismatched: int
    numel: int
    nan_matched: int = 0


@dataclass
class Row:
    """One compared value.

    Attributes:
        name: Marker name (``layer1.0.conv1``, ``shared#1``, ``lstm[1][0]``); ``""``-rooted names
            (``""``, ``"[0]"``) are the model's final outputs.
        module_path: Module path (``""`` for the model itself).
        call_index: Which call of the module (0 for the first).
        module_type: Class name of the module.
        kind: ``leaf``, ``block`` or ``output``.
        status: See :data:`Status`.
        passed: Whether the row is within tolerance; ``None`` when a side is missing.
        atol: Absolute tolerance applied.
        rtol: Relative tolerance applied.
        onnx_name: ONNX tensor holding the value, if any.
        torch_shape: Shape on the PyTorch side.
        onnx_shape: Shape on the ONNX side.
        torch_dtype: Element type on the PyTorch side (numpy name).
        onnx_dtype: Element type on the ONNX side.
        metrics: The metrics, when both sides exist and shapes match (cumulative error: what
            reaches this point from everything before it).
        notes: Anything the reader should know about this row.
        local: Error this module introduces on its own: the PyTorch module run on the ONNX
            values of its inputs, compared with the ONNX value of its output. ``None`` when not
            computed.
        local_note: Why ``local`` is missing (inputs not observable on the ONNX side, ...).
    """

    name: str
    module_path: str
    call_index: int
    module_type: str
    kind: RowKind
    status: Status
    passed: bool | None
    atol: float
    rtol: float
    onnx_name: str | None = None
    torch_shape: list[int] | None = None
    onnx_shape: list[int] | None = None
    torch_dtype: str | None = None
    onnx_dtype: str | None = None
    metrics: Metrics | None = None
    notes: list[str] = field(default_factory=list)
    local: Metrics | None = None
    local_note: str | None = None

    @property
    def failed(self) -> bool:
        """True when the row breaks tolerance (``passed is False``)."""
        return self.passed is False

    @property
    def display_name(self) -> str:
        """The name as shown to people: the model's outputs read ``output``, ``output[0]``."""
        return "output" + self.name if self.kind == "output" else self.name


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
    exact = _is_exact(reference.dtype) and _is_exact(value.dtype)
    wide = np.complex128 if np.iscomplexobj(reference) or np.iscomplexobj(value) else np.float64
    numel = reference.size
    if numel == 0 or value.size == 0:
        return Metrics(0.0, 0.0, 0.0, 0.0, 1.0, math.inf, 0, 0), ["empty tensor"]
    # Common case first: no NaN or Inf anywhere (checked in the inputs' own, narrower dtype)
    # needs no masks and no masked copies; the arithmetic below is the same either way.
    all_finite = exact or bool(np.isfinite(reference).all() and np.isfinite(value).all())
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

    diff = np.abs(g - r)
    abs_ref = np.abs(r)
    tolerance = 0.0 if exact else atol + rtol * abs_ref
    within = diff <= tolerance
    mismatched = int(within.size - np.count_nonzero(within)) + special_bad_count

    if diff.size:
        max_abs = float(diff.max())
        mean_abs = float(diff.mean())
        squared = diff**2
        rmse = float(np.sqrt(np.mean(squared)))
        max_rel = float((diff / (abs_ref + 1e-12)).max())
        nr, ng = float(np.linalg.norm(r)), float(np.linalg.norm(g))
        if nr == 0 and ng == 0:
            cosine = 1.0
        elif nr == 0 or ng == 0:
            cosine = 0.0
        else:
            cosine = float(np.real(np.vdot(r, g)) / (nr * ng))
        noise = float(np.sum(squared))
        signal = float(np.sum(abs_ref**2))
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


def _buffer(a: np.ndarray) -> tuple[Any, ...]:
    """Identifies an array's contents while it is alive: memory address, layout and type."""
    return (a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str)


def _dtype_name(a: np.ndarray | None) -> str | None:
    return None if a is None else str(a.dtype)


def compare(
    torch_values: Mapping[str, np.ndarray],
    onnx_values: Mapping[str, np.ndarray],
    *,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    module_types: Mapping[str, str] | None = None,
    leaf_paths: Sequence[str] = (),
    onnx_names: Mapping[str, str] | None = None,
) -> list[Row]:
    """Compare values aligned by marker name, in PyTorch execution order.

    Args:
        torch_values: ``marker name -> PyTorch value`` in execution order (from
            :func:`fxalign.run_torch`), final outputs under ``""``-rooted names.
        onnx_values: ``marker name -> ONNX value``; markers absent here are reported as
            ``missing_in_onnx``.
        atol: Absolute tolerance.
        rtol: Relative tolerance.
        module_types: ``module path -> class name`` for the ``module_type`` column.
        leaf_paths: Paths of leaf modules (others are blocks).
        onnx_names: ``marker name -> ONNX tensor name`` for the ``onnx_name`` column.

    Returns:
        One :class:`Row` per marker, then values present only on the ONNX side.
    """
    module_types = module_types or {}
    onnx_names = onnx_names or {}
    leaves = set(leaf_paths)
    rows: list[Row] = []
    # Markers that share a value (a block and its last layer: one PyTorch array, one ONNX
    # tensor) are measured once. numpy releases the GIL on large arrays, so pairs are measured
    # on a few threads; values are read in order and few are in flight, so memory stays bounded.
    measured: dict[tuple[Any, ...], Future[tuple[Metrics, list[str]]]] = {}
    pending: list[tuple[Row, Future[tuple[Metrics, list[str]]]]] = []
    in_flight: list[Future[tuple[Metrics, list[str]]]] = []
    workers = min(4, os.cpu_count() or 1)
    names = list(torch_values) + [n for n in onnx_values if n not in torch_values]
    # final outputs last, in their own order
    names = [n for n in names if MarkerName.parse(n).module_path] + [
        n for n in names if not MarkerName.parse(n).module_path
    ]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fxalign-compare") as pool:
        for name in names:
            row, pair = _row(name, torch_values, onnx_values, atol, rtol, module_types, leaves)
            row.onnx_name = onnx_names.get(name)
            rows.append(row)
            if pair is None:
                continue
            key = (_buffer(pair[0]), row.onnx_name) if row.onnx_name else (name,)
            if key not in measured:
                while len(in_flight) >= 2 * workers:
                    wait(in_flight, return_when=FIRST_COMPLETED)
                    in_flight = [f for f in in_flight if not f.done()]
                measured[key] = pool.submit(compare_arrays, *pair, atol=atol, rtol=rtol)
                in_flight.append(measured[key])
            pending.append((row, measured[key]))
            del pair
        for row, future in pending:
            metrics, notes = future.result()
            row.metrics = dataclasses.replace(metrics)
            row.notes.extend(notes)
            row.passed = row.metrics.mismatched == 0
            row.status = "ok" if row.passed else "diverged"
    return rows


def _row(
    name: str,
    torch_values: Mapping[str, np.ndarray],
    onnx_values: Mapping[str, np.ndarray],
    atol: float,
    rtol: float,
    module_types: Mapping[str, str],
    leaves: set[str],
) -> tuple[Row, tuple[np.ndarray, np.ndarray] | None]:
    """The row for ``name`` (metrics not yet filled in), and the arrays still to measure."""
    parsed = MarkerName.parse(name)
    path = parsed.module_path
    kind: RowKind = "output" if not path else ("leaf" if path in leaves else "block")
    ref = torch_values.get(name)
    got = onnx_values.get(name)
    row = Row(
        name=name,
        module_path=path,
        call_index=parsed.call_index,
        module_type=module_types.get(path, ""),
        kind=kind,
        status="ok",
        passed=None,
        atol=atol,
        rtol=rtol,
        torch_shape=None if ref is None else list(ref.shape),
        onnx_shape=None if got is None else list(got.shape),
        torch_dtype=_dtype_name(ref),
        onnx_dtype=_dtype_name(got),
    )
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
        return row, (ref, got)
    return row, None


def first_divergence(rows: Sequence[Row]) -> Row | None:
    """The first row, in execution order, that breaks tolerance."""
    return next((r for r in rows if r.failed), None)
