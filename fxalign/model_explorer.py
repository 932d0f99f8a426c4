"""Overlay fxalign's errors on the ONNX graph in Google's Model Explorer.

Model Explorer (``pip install ai-edge-model-explorer``, with the ONNX adapter
``model-explorer-onnx``) colours graph nodes from a *node data* JSON file. Its layout, the
``ModelNodeData`` of ``model_explorer/node_data_builder.py``, is keyed by graph id, then by node
id::

    {"main_graph": {
        "results": {"/clamp/Relu": {"value": 1.414, "bgColor": "#b71c1c", "textColor": "#fff"},
                    "/first/Gemm": {"value": 0.0}},
        "thresholds": [{"value": 1e-06, "bgColor": "#388e3c"}, ...]}}

With the ONNX adapter the graph id is the ONNX graph's name (``main_graph`` for
``torch.onnx.export``) and node ids are ONNX node names, so each value sits on the node that
computes the marked tensor (``Row.onnx_node``, from :attr:`fxalign.ExtractResult.producer_of`).
Thresholds colour by the value relative to ``atol``; rows that break tolerance (which also
depends on ``rtol``) are red whatever their value, and the first divergence is dark red.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fxalign.compare import Row
from fxalign.extract import ExtractResult
from fxalign.report import Report
from fxalign.tree import worse

__all__ = ["DEFAULT_GRAPH_ID", "to_node_data", "write_node_data"]

DEFAULT_GRAPH_ID = "main_graph"
"""Graph name ``torch.onnx.export`` gives the main graph (both exporters)."""

_FAIL = {"bgColor": "#e53935", "textColor": "#ffffff"}
_FIRST = {"bgColor": "#7f0000", "textColor": "#ffffff"}
_LARGEST = sys.float_info.max  # JSON has no inf/nan; Model Explorer needs a number
_METRICS = ("max_abs", "mean_abs", "rmse", "max_rel")  # errors: larger is worse


def _thresholds(atol: float) -> list[dict[str, Any]]:
    """Colour bands by multiples of ``atol`` (a value ``<=`` a band's value gets its colour)."""
    if atol <= 0:
        return [{"value": 0.0, "bgColor": "#388e3c"}, {"value": _LARGEST, "bgColor": "#ff5722"}]
    return [
        {"value": atol / 100, "bgColor": "#388e3c"},
        {"value": atol, "bgColor": "#8bc34a"},
        {"value": atol * 10, "bgColor": "#ffa000"},
        {"value": atol * 1000, "bgColor": "#ff5722"},
        {"value": _LARGEST, "bgColor": "#d32f2f"},
    ]


def _nodes_from(source: ExtractResult | Mapping[str, str] | None) -> dict[str, str]:
    if source is None:
        return {}
    if isinstance(source, ExtractResult):
        return {str(name): node for name, node in source.producer_of.items()}
    return dict(source)


def _producer_by_tensor(source: ExtractResult | Mapping[str, str] | None) -> dict[str, str]:
    """``tensor name -> node name`` of the extracted model (finds the final outputs' nodes)."""
    if not isinstance(source, ExtractResult):
        return {}
    return {out: node.name for node in source.model.graph.node for out in node.output if out}


def _node_of(row: Row, nodes: Mapping[str, str], by_tensor: Mapping[str, str]) -> str | None:
    node = nodes.get(row.name) or row.onnx_node
    if not node and row.onnx_name:
        node = by_tensor.get(row.onnx_name)
    return node or None


def _finite(value: float) -> float:
    return _LARGEST if math.isnan(value) or value == math.inf else value


def to_node_data(
    report: Report,
    source: ExtractResult | Mapping[str, str] | None = None,
    *,
    metric: str = "max_abs",
    local: bool = False,
    graph_id: str | None = None,
) -> dict[str, Any]:
    """Model Explorer node data: one value per ONNX node that computes a marked tensor.

    Args:
        report: The report.
        source: Where to find each row's ONNX node: the :class:`~fxalign.ExtractResult` of the
            run (its ``producer_of``, and its graph for the final outputs), a ``marker name ->
            node name`` mapping, or ``None`` to use ``Row.onnx_node`` only.
        metric: Which error to show: ``max_abs``, ``mean_abs``, ``rmse`` or ``max_rel``.
        local: Show the local error (``Row.local``) instead of the cumulative one.
        graph_id: Graph id in Model Explorer; default: the extracted model's graph name, else
            :data:`DEFAULT_GRAPH_ID`.

    Returns:
        ``{graph_id: {"results": {node: {"value": ...}}, "thresholds": [...]}}``. Rows without
        a value or without a known node are left out; when several markers share a node (a
        block whose output is its last module's), the worst value is kept. Infinite and NaN
        values are written as the largest float, since JSON has neither.

    Raises:
        ValueError: ``metric`` is not one of those errors.

    Example:
        >>> from fxalign import Report
        >>> to_node_data(Report("Net", "dynamo", 1e-4, 1e-3, rows=[]))["main_graph"]["results"]
        {}
    """
    if metric not in _METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(_METRICS)}")
    if graph_id is None:
        graph_id = (
            source.model.graph.name
            if isinstance(source, ExtractResult) and source.model.graph.name
            else DEFAULT_GRAPH_ID
        )
    nodes, by_tensor = _nodes_from(source), _producer_by_tensor(source)
    values: dict[str, float | None] = {}
    style: dict[str, dict[str, str]] = {}
    for row in report.rows:
        m = row.local if local else row.metrics
        node = _node_of(row, nodes, by_tensor)
        if m is None or node is None:
            continue
        values[node] = worse(values.get(node), getattr(m, metric))
        if row.name == report.first_divergence:
            style[node] = _FIRST
        elif row.failed and not local:
            style.setdefault(node, _FAIL)
    results = {
        node: {"value": _finite(value), **style.get(node, {})}
        for node, value in values.items()
        if value is not None
    }
    return {graph_id: {"results": results, "thresholds": _thresholds(report.atol)}}


def write_node_data(
    report: Report,
    path: str | os.PathLike[str],
    source: ExtractResult | Mapping[str, str] | None = None,
    **options: Any,
) -> Path:
    """Write :func:`to_node_data` as JSON to ``path``, replacing any file there.

    Args:
        report: The report.
        path: The JSON file to write.
        source: As for :func:`to_node_data`.
        **options: ``metric``, ``local``, ``graph_id``, as for :func:`to_node_data`.

    Returns:
        The path written. Load it with ``model-explorer MODEL.onnx
        --extensions=model_explorer_onnx --node_data_paths=PATH``.
    """
    out = Path(path)
    data = to_node_data(report, source, **options)
    out.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return out
