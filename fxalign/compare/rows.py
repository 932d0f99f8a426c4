"""Values aligned by marker name in, one :class:`Row` per value out.

Each row gets the tolerance of its dtype (or the global one, then glob overrides), its status,
and the metrics of :func:`fxalign.compare.compare_arrays` under the run's verdict rule. Shape
or dtype mismatches and values missing on one side are reported rows, never exceptions. A
complex PyTorch value that ONNX holds as ``(real, imag)`` pairs in a trailing dimension of 2
(the dynamo exporter's layout for complex tensors) is compared as complex, with a note.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from fxalign.compare.metrics import check_verdict, compare_arrays, dtype_eps
from fxalign.names import MarkerName
from fxalign.report.model import Metrics, Row, RowKind, Verdict
from fxalign.threads import free_cpus

__all__ = ["DTYPE_TOLERANCES", "compare", "paired", "row_order", "tolerance_for"]

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


def paired(reference: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, str | None]:
    """``value`` in ``reference``'s layout where ONNX holds a complex value as real pairs.

    The dynamo exporter stores a complex tensor as a real one with a trailing dimension of 2,
    ``(real, imag)``: ``torch.fft.rfft(x)`` of shape ``[2, 5]`` (complex64) is ``[2, 5, 2]``
    (float32) in ONNX. Such a value is returned as the complex array it stands for, with a
    note saying so; any other ``value`` is returned unchanged with ``None``.

    Example:
        >>> pairs = np.array([[1.0, 2.0], [3.0, -1.0]], np.float32)
        >>> z, note = paired(np.array([1 + 2j, 3 - 1j], np.complex64), pairs)
        >>> z.tolist(), note is not None
        ([(1+2j), (3-1j)], True)
    """
    if not (
        np.iscomplexobj(reference)
        and not np.iscomplexobj(value)
        and np.issubdtype(value.dtype, np.floating)
        and value.shape == (*reference.shape, 2)
    ):
        return value, None
    complex_type = np.complex64 if value.dtype.itemsize <= 4 else np.complex128
    as_complex = value[..., 0].astype(complex_type)
    as_complex.imag = value[..., 1]
    note = (
        f"ONNX holds this {reference.dtype} value as (real, imag) pairs in a trailing "
        f"dimension of 2 (torch {list(reference.shape)} vs onnx {list(value.shape)} "
        f"{value.dtype}); compared as complex"
    )
    return as_complex, note


def _buffer_key(a: np.ndarray) -> tuple[Any, ...]:
    """Identifies an array's contents by its memory: equal keys, equal values."""
    return (a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str)


def _dtype_name(a: np.ndarray | None) -> str | None:
    return None if a is None else str(a.dtype)


def compare(
    torch_values: Mapping[MarkerName, np.ndarray],
    onnx_values: Mapping[MarkerName, np.ndarray],
    *,
    atol: float | None = None,
    rtol: float | None = None,
    tolerances: Mapping[str, Mapping[str, float]] | None = None,
    verdict: Verdict = "roundoff",
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
        verdict: The rule (:func:`fxalign.compare_arrays`): ``"roundoff"`` (default) adds
            the round-off allowance of each value's dtype and magnitude to ``atol``;
            ``"allclose"`` is plain elementwise ``allclose``.
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

    Raises:
        UserError: ``verdict`` names no rule.

    Example:
        >>> a = np.ones(2, np.float32)
        >>> rows = compare({MarkerName("fc"): a}, {MarkerName("fc"): a + 1e-6})
        >>> [(r.name, r.status, r.kind) for r in rows]
        [('fc', 'ok', 'block')]
    """
    check_verdict(verdict)
    module_types, onnx_names = module_types or {}, onnx_names or {}
    onnx_nodes, torch_dtypes = onnx_nodes or {}, torch_dtypes or {}
    leaves = set(leaf_paths)
    rows: list[Row] = []
    # One value marked under several names (a block's output is its last layer's output) is
    # one PyTorch buffer and one ONNX array: compare it once.
    jobs: dict[tuple[Any, ...], _Job] = {}
    waiting: list[tuple[Row, tuple[Any, ...]]] = []
    for name in row_order(torch_values, onnx_values):
        path, shown = name.module_path, str(name)
        kind: RowKind = "output" if not path else ("leaf" if path in leaves else "block")
        ref, got = torch_values.get(name), onnx_values.get(name)
        dtype = (
            (tolerance_dtypes or {}).get(name)
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
        key = _pair_status(row, ref, got, jobs, verdict, dtype_eps(torch_dtypes.get(name)))
        if key is not None:
            waiting.append((row, key))
        rows.append(row)
    results = _run_jobs(jobs)
    for row, key in waiting:
        metrics, notes = results[key]
        row.metrics = dataclasses.replace(metrics)
        row.notes.extend(notes)
        row.passed = row.metrics.mismatched == 0
        row.status = "ok" if row.passed else "diverged"
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


@dataclasses.dataclass(frozen=True)
class _Job:
    """One :func:`compare_arrays` call."""

    ref: np.ndarray
    got: np.ndarray
    atol: float
    rtol: float
    verdict: Verdict
    eps: float | None

    def __call__(self) -> tuple[Metrics, list[str]]:
        return compare_arrays(
            self.ref, self.got, atol=self.atol, rtol=self.rtol, verdict=self.verdict, eps=self.eps
        )


_PARALLEL_ELEMENTS = 1 << 20
"""Below this many elements in all, the values are compared on the calling thread."""


def _run_jobs(
    jobs: Mapping[tuple[Any, ...], _Job],
) -> dict[tuple[Any, ...], tuple[Metrics, list[str]]]:
    """Every job's result, on as many threads as CPUs are free now (numpy releases the GIL).

    Under contention :func:`~fxalign.threads.free_cpus` is 1 and the values are compared one
    after another on this thread, as on a one-CPU machine: no pool to oversubscribe.
    """
    keys = list(jobs)
    elements = sum(jobs[k].ref.size for k in keys)
    workers = min(len(keys), free_cpus()) if elements >= _PARALLEL_ELEMENTS else 1
    if workers <= 1:
        return {k: jobs[k]() for k in keys}
    # Largest first, so that one big value does not finish last on its own.
    order = sorted(keys, key=lambda k: -jobs[k].ref.size)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fxalign-compare") as pool:
        done = dict(zip(order, pool.map(lambda k: jobs[k](), order), strict=True))
    return {k: done[k] for k in keys}


def _pair_status(
    row: Row,
    ref: np.ndarray | None,
    got: np.ndarray | None,
    jobs: dict[tuple[Any, ...], _Job],
    verdict: Verdict,
    eps: float | None,
) -> tuple[Any, ...] | None:
    """Set what the row's two values say without comparing them; the comparison still due.

    Missing values and shape mismatches are final here (``None``). Otherwise the row waits for
    the job under the returned key (added to ``jobs`` unless an equal one is there already).
    ``eps`` is the machine epsilon of the PyTorch dtype when the array's differs from it
    (bfloat16 arrives as float32); ``None``: the arrays'.
    """
    if got is None:
        row.status = "missing_in_onnx"
        row.notes.append(
            "not in ONNX graph: the exporter removed this value (unused or folded away)"
        )
        return None
    if ref is None:
        row.status = "missing_in_torch"
        row.notes.append("in the ONNX graph but not produced by the PyTorch run")
        return None
    key = (_buffer_key(ref), id(got), row.atol, row.rtol, verdict, eps)
    got, pair_note = paired(ref, got)
    if pair_note:
        row.notes.append(pair_note)
    if ref.shape != got.shape:
        row.status = "shape_mismatch"
        row.passed = False
        row.notes.append(f"shape differs: torch {list(ref.shape)} vs onnx {list(got.shape)}")
        return None
    if ref.dtype != got.dtype:
        row.notes.append(
            f"dtype differs: torch {ref.dtype} vs onnx {got.dtype}; compared as float64"
        )
    if key not in jobs:
        jobs[key] = _Job(ref, got, row.atol, row.rtol, verdict, eps)
    return key
