"""Facts about a marker run for the report: coverage, located warnings, located failures."""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from fxalign.errors import RuntimeBackendError
from fxalign.extract import ExtractResult, locate_failure
from fxalign.instrument.result import InstrumentResult
from fxalign.names import CallId, MarkerName
from fxalign.report.model import Coverage

__all__ = [
    "CONTAINER_NOTE",
    "ancestors",
    "coverage",
    "failure_at",
    "is_container",
    "located_failure",
    "located_warnings",
    "owning_leaf",
]

_FX_SOURCE = re.compile(r"^<eval_with_key>.* from (.+):(\d+) in \w+$")


def located_warnings(model: torch.nn.Module, exported: Any) -> list[str]:
    """Exporter warnings, each with the module whose ``forward`` raised it when known."""
    if not exported.warnings:
        return []
    # Source spans per class, not per module: reading source re-tokenizes the file each time.
    span_of: dict[type, tuple[str, int, int] | None] = {}
    spans = []
    for path, module in model.named_modules():
        cls = type(module)
        if cls not in span_of:
            try:
                lines, first = inspect.getsourcelines(cls.forward)
                filename = inspect.getsourcefile(cls.forward) or ""
            except (OSError, TypeError):
                span_of[cls] = None
            else:
                span_of[cls] = (os.path.realpath(filename), first, first + len(lines) - 1)
        span = span_of[cls]
        if span is not None:
            spans.append((path, *span))
    located: list[str] = []
    sources: list[tuple[str, int]] = list(exported.warning_sources)
    sources += [("", 0)] * (len(exported.warnings) - len(sources))
    for message, (filename, line) in zip(exported.warnings, sources, strict=False):
        generated = _FX_SOURCE.search(filename)
        if generated:  # code FX generated: "<eval_with_key>.1 from FILE:LINE in forward"
            filename, line = generated.group(1), int(generated.group(2))
        real = os.path.realpath(filename) if filename else ""
        owners = [p for p, f, a, b in spans if f == real and a <= line <= b]
        where = f" [{os.path.basename(filename)}:{line}"
        if owners:
            owner = max(owners, key=len)
            where += f", in module {owner or '(model)'!r}"
        located.append(message + (where + "]" if filename else ""))
    return located


def located_failure(error: RuntimeBackendError, extracted: ExtractResult) -> RuntimeBackendError:
    """The same error, naming the failing ONNX node and the module it comes from."""
    node, op_type, module = locate_failure(extracted.model, error.message, extracted.tensor_of)
    if node is None and op_type is None:
        return error
    return failure_at(error, node, op_type, module)


def failure_at(
    error: RuntimeBackendError,
    node: str | None,
    op_type: str | None,
    module: str | None,
    source: str | None = None,
) -> RuntimeBackendError:
    """The runtime's error, naming the ONNX node, the module it comes from and its source line.

    Example:
        >>> e = failure_at(RuntimeBackendError("no kernel"), "n1", "Foo", "body.1", "net.py:3")
        >>> print(e.message)
        no kernel
          at ONNX node 'n1' (Foo) from module 'body.1' at net.py:3
    """
    where = f"ONNX node {node!r}" + (f" ({op_type})" if op_type else "")
    if module is not None:
        where += f" from module {module or '(model)'!r}"
        where += f" at {source}" if source else ""
    hint = error.hint
    if op_type and module is not None:
        hint = (
            f"{module or 'the model'!r} exports to {op_type}, which this runtime cannot run; "
            "check the op's domain and opset, or give that module's op a translation it supports"
        )
    return RuntimeBackendError(f"{error.message}\n  at {where}", hint=hint)


def coverage(
    result: InstrumentResult,
    torch_values: Mapping[MarkerName, Any],
    without_tensors: Sequence[CallId],
) -> Coverage:
    """Which modules got a marker, and why the others did not."""
    module_types, leaf_paths = result.module_types, result.leaf_paths
    static_unmarked, granularity = result.unmarked, result.granularity
    marked: list[str] = []
    seen: set[str] = set()
    for name in torch_values:
        path = name.module_path
        if path and path not in seen:
            seen.add(path)
            marked.append(path)
    leaves = set(leaf_paths)
    has_marked_descendant = ancestors(seen)
    no_tensor = {call.module_path for call in without_tensors} - seen
    unmarked: dict[str, str] = {}
    for path in module_types:
        if not path or path in seen:
            continue
        if path in no_tensor:
            unmarked[path] = "output not a tensor"
        elif path in static_unmarked:
            unmarked[path] = static_unmarked[path]
        elif is_container(path, module_types, has_marked_descendant):
            unmarked[path] = CONTAINER_NOTE
        elif path not in leaves and granularity == "leaf":
            unmarked[path] = "block (granularity='leaf')"
        elif (owner := owning_leaf(path, leaves)) is None:
            unmarked[path] = "called 0 times"
        else:
            unmarked[path] = f"inside leaf module {owner!r}"
    for path, why in static_unmarked.items():  # paths outside module_types: aliases
        if path not in seen:
            unmarked.setdefault(path, why)
    leaf_marked = sum(1 for p in leaf_paths if p in seen)
    leaf_ran = leaf_marked + sum(1 for p in leaf_paths if p in no_tensor)
    return Coverage(
        marked, unmarked, leaf_ran, leaf_marked, list(result.traced), dict(result.eager)
    )


CONTAINER_NOTE = "container, never called itself (its submodules are marked)"
"""Why a ``ModuleList`` or ``ModuleDict`` has no row: it has no forward of its own."""


def ancestors(paths: Iterable[str]) -> set[str]:
    """Every proper ancestor path of ``paths`` (``""``, the model, left out).

    Example:
        >>> sorted(ancestors(["layers.0.fc", "head"]))
        ['layers', 'layers.0']
    """
    return {
        ".".join(parts[:i]) for p in paths for parts in [p.split(".")] for i in range(1, len(parts))
    }


def is_container(path: str, module_types: Mapping[str, str], marked_ancestors: set[str]) -> bool:
    """Whether ``path`` is a ``ModuleList``/``ModuleDict`` some of whose submodules are marked.

    Such containers are never called themselves: their submodules are.
    """
    return path in marked_ancestors and module_types.get(path) in ("ModuleList", "ModuleDict")


def owning_leaf(path: str, leaves: set[str]) -> str | None:
    """The (outermost) leaf module ``path`` lives in, if any: its ancestors are looked up.

    Example:
        >>> leaves = {"conv", "act"}
        >>> owning_leaf("conv.parametrizations.weight", leaves), owning_leaf("act", leaves)
        ('conv', None)
    """
    parts = path.split(".")
    return next(
        (p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in leaves), None
    )
