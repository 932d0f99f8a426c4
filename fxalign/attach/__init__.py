"""Attach to a plain ONNX export: find every eager module output in the user's own file.

No markers, no re-export: the eager model runs once with forward hooks on every module
(:mod:`fxalign.attach.hooks`), the file's module scopes are read from what either exporter
writes (:mod:`fxalign.attach.scopes`), nodes are mapped onto eager calls
(:mod:`fxalign.attach.mapping`) and each output is paired with the one tensor that holds it, or
given the reason it has none (:mod:`fxalign.attach.pairing`)::

    location = locate(model, (x,), None, "model.onnx")
    names = location.tensor_names()
    promote("model.onnx", names, "work/model.promoted.onnx")  # the file itself is untouched
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import onnx
import torch

from fxalign.attach.hooks import CallCapture, ModuleCall, TensorLeaf, capture_calls
from fxalign.attach.mapping import UNSCOPED, CallMap, is_noop, map_calls
from fxalign.attach.pairing import pair_calls
from fxalign.attach.promote import EXTERNAL_DATA_FOLDER, promote, promoted
from fxalign.attach.result import LocatedCall, LocatedInput, LocatedValue, Location, NodeOrigin
from fxalign.attach.scopes import FileScopes, hooks_in_scope, read_scopes
from fxalign.errors import UserError
from fxalign.modelio import load_graph

__all__ = [
    "EXTERNAL_DATA_FOLDER",
    "CallCapture",
    "FileScopes",
    "LocatedCall",
    "LocatedInput",
    "LocatedValue",
    "Location",
    "NodeOrigin",
    "ModuleCall",
    "ModuleParameters",
    "TensorLeaf",
    "capture_calls",
    "hooks_in_scope",
    "locate",
    "locate_captured",
    "module_parameters",
    "promote",
    "promoted",
    "read_scopes",
]

logger = logging.getLogger(__name__)


class ModuleParameters(Mapping[str, frozenset[str]]):
    """``module path -> qualified names of its parameters and buffers``, submodules' included.

    Each module's names are listed when first asked for: locating asks for those of the
    modules that left no node in the file, usually a few leaves, and walking every subtree of a
    deep model up front costs more than the rest of a lookup.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> sorted(ModuleParameters(net)["1"])
        ['1.bias', '1.num_batches_tracked', '1.running_mean', '1.running_var', '1.weight']
        >>> len(ModuleParameters(net)[""]), "2" in ModuleParameters(net)
        (7, False)
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._modules = dict(model.named_modules())
        self._names: dict[str, frozenset[str]] = {}

    def __getitem__(self, path: str) -> frozenset[str]:
        found = self._names.get(path)
        if found is None:
            module = self._modules[path]
            prefix = f"{path}." if path else ""
            names = [prefix + n for n, _ in module.named_parameters()]
            names += [prefix + n for n, _ in module.named_buffers()]
            found = self._names[path] = frozenset(names)
        return found

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


def module_parameters(model: torch.nn.Module) -> ModuleParameters:
    """``module path -> qualified names of its parameters and buffers``, submodules' included.

    A :class:`ModuleParameters`: each module's names are listed when first asked for.
    """
    return ModuleParameters(model)


def _origins(scopes: FileScopes, capture: CallCapture, cmap: CallMap) -> dict[str, NodeOrigin]:
    out = {}
    for node in scopes.nodes:
        call = cmap.node_call[node.index]
        if node.name and call != UNSCOPED:
            out[node.name] = NodeOrigin(capture.calls[call].name, node.source)
    return out


def _nodeless(capture: CallCapture, cmap: CallMap) -> tuple[str, ...]:
    """Paths of the outermost called modules the file has no node of (see :class:`Location`).

    None when some node has no scope information: a module's nodes may be among those (an
    optimizer fused them, or the exporter was told not to name nodes).
    """
    if UNSCOPED in cmap.node_call:
        return ()
    inside = cmap.in_file | {0}
    out = [
        c.path
        for c in capture.calls
        if c.index not in inside and c.parent is not None and c.parent in inside
    ]
    return tuple(dict.fromkeys(out))


def _dead(capture: CallCapture, paths: Sequence[str]) -> frozenset[int]:
    """Calls of ``paths`` (and the calls inside them) whose results the model does not use.

    A call's output is used when the model returns it, or when a call that is not itself
    unused receives it (through any caller that returns it up unchanged: it is one value).
    The calls of ``paths`` whose every output is unused by that rule, found until nothing
    changes (a dropped ``head(out["b"])`` leaves ``out["b"]`` unused too). What the callers'
    own code does with a value between module calls the hooks cannot see: such a read counts
    as no use here.
    """
    wanted = set(paths)
    top: dict[int, int] = {}  # call index -> the call of ``paths`` it runs in
    for call in capture.calls[1:]:  # calls in the order they start: a parent before its child
        if call.path in wanted and not is_noop(call):  # a no-op is removed, used or not
            top[call.index] = call.index
        elif call.parent is not None and call.parent in top:
            top[call.index] = top[call.parent]
    returned = {leaf.value_id for leaf in capture.outputs}
    readers: dict[str, list[int]] = {}
    for call in capture.calls[1:]:
        for leaf in call.inputs:
            readers.setdefault(leaf.value_id, []).append(call.index)
    dead = {i for i, t in top.items() if i == t}

    def used(value: str) -> bool:
        return value in returned or any(top.get(r) not in dead for r in readers.get(value, ()))

    changed = True
    while changed:
        changed = False
        for index in sorted(dead):
            outputs = capture.calls[index].outputs
            if not outputs or any(used(leaf.value_id) for leaf in outputs):
                dead.discard(index)
                changed = True
    return frozenset(i for i, t in top.items() if t in dead)


def _dropped(calls: Sequence[LocatedCall], paths: Sequence[str]) -> tuple[str, ...]:
    """Those of ``paths`` whose every call's outputs are unused (:attr:`Location.unused`)."""
    by_path: dict[str, list[LocatedCall]] = {}
    for call in calls[1:]:
        by_path.setdefault(call.path, []).append(call)
    return tuple(
        p
        for p in paths
        if p in by_path and all(c.outputs and all(v.unused for v in c.outputs) for c in by_path[p])
    )


def locate_captured(
    capture: CallCapture,
    onnx_model: onnx.ModelProto,
    parameters: Mapping[str, frozenset[str]],
    onnx_path: str = "",
) -> Location:
    """:func:`locate` for a forward already captured and a file already loaded."""
    scopes = read_scopes(onnx_model, os.path.dirname(onnx_path) if onnx_path else None)
    cmap = map_calls(scopes, capture)
    nodeless = _nodeless(capture, cmap)
    dead = _dead(capture, nodeless)
    calls = pair_calls(scopes, capture, cmap, parameters, dead)
    location = Location(
        onnx_path,
        scopes.exporter,
        scopes.producer,
        calls,
        tuple(path for path, _ in capture.never_called),
        _origins(scopes, capture, cmap),
        dict(cmap.foreign),
        nodeless,
        _dropped(calls, nodeless),
        scopes.graph_outputs,
    )
    logger.info(
        "%s (%s export): %d of %d modules located",
        onnx_path or "model",
        scopes.exporter,
        location.located_modules,
        location.called_modules,
    )
    return location


def locate(
    model: torch.nn.Module,
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None,
    onnx_path: str | os.PathLike[str],
) -> Location:
    """Run ``model`` once and find, for every module call, the ONNX tensor holding its output.

    Args:
        model: The eager model the file was exported from (left unchanged).
        args: Positional inputs (not modified).
        kwargs: Keyword inputs, or ``None``.
        onnx_path: The plain export, by either exporter, possibly post-processed (optimised,
            simplified, converted to float16) as long as node names or metadata survive.
            Read without its external data; never written.

    Returns:
        A :class:`Location`: per call, each output leaf's eager value with its ONNX tensor
        name or the reason it has none, and the ONNX tensors entering its scope.

    Raises:
        UserError: The file cannot be read or has no module scopes.
        InputError: The model raised on the inputs.

    Example:
        >>> location = locate(model, (x,), None, "model.onnx")  # doctest: +SKIP
        >>> location.find("blocks.0.conv").outputs[0].reason  # doctest: +SKIP
        'fused into blocks.0.bn'
    """
    path = os.fspath(onnx_path)
    try:
        onnx_model = load_graph(path)  # the weights are not needed: they stay in the file
    except Exception as e:  # missing, a folder, not protobuf: onnx raises many kinds
        raise UserError(
            f"cannot read the ONNX file {path!r}: {type(e).__name__}: {str(e)[:200]}",
            hint="pass the .onnx file torch.onnx.export wrote",
        ) from e
    capture = capture_calls(model, args, kwargs, hooks_in_scope=hooks_in_scope(onnx_model))
    return locate_captured(capture, onnx_model, module_parameters(model), path)
