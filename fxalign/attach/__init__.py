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
from fxalign.attach.mapping import UNSCOPED, CallMap, map_calls
from fxalign.attach.pairing import pair_calls
from fxalign.attach.promote import EXTERNAL_DATA_FOLDER, promote, promoted
from fxalign.attach.result import LocatedCall, LocatedInput, LocatedValue, Location, NodeOrigin
from fxalign.attach.scopes import FileScopes, read_scopes
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


def _dropped(capture: CallCapture, paths: Sequence[str]) -> tuple[str, ...]:
    """Those of ``paths`` whose every call's output the model drops (:attr:`Location.unused`).

    An output leaf is dropped when its caller returns it unchanged (the same value), and so on
    up, until a caller that neither returns it nor passes it to any module, and the model
    does not return it. A value a caller's own code uses at once (``self.proj(x).mean()``) is
    not returned up: it counts as used.
    """
    read = {leaf.value_id for call in capture.calls[1:] for leaf in call.inputs}
    returned = {leaf.value_id for leaf in capture.calls[0].outputs}
    outputs = [{leaf.value_id for leaf in call.outputs} for call in capture.calls]

    def dropped(call: ModuleCall) -> bool:
        for leaf in call.outputs:
            value, at, lifted = leaf.value_id, call, False
            while True:
                if value in read or value in returned:
                    return False
                parent = at.parent
                if parent is None or value not in outputs[parent]:
                    break
                at, lifted = capture.calls[parent], True
            if not lifted:
                return False
        return bool(call.outputs)

    wanted = set(paths)
    calls: dict[str, list[ModuleCall]] = {}
    for call in capture.calls[1:]:
        if call.path in wanted:
            calls.setdefault(call.path, []).append(call)
    return tuple(p for p in paths if p in calls and all(dropped(c) for c in calls[p]))


def locate_captured(
    capture: CallCapture,
    onnx_model: onnx.ModelProto,
    parameters: Mapping[str, frozenset[str]],
    onnx_path: str = "",
) -> Location:
    """:func:`locate` for a forward already captured and a file already loaded."""
    scopes = read_scopes(onnx_model, os.path.dirname(onnx_path) if onnx_path else None)
    cmap = map_calls(scopes, capture)
    calls = pair_calls(scopes, capture, cmap, parameters)
    location = Location(
        onnx_path,
        scopes.exporter,
        scopes.producer,
        calls,
        tuple(path for path, _ in capture.never_called),
        _origins(scopes, capture, cmap),
        dict(cmap.foreign),
        (nodeless := _nodeless(capture, cmap)),
        _dropped(capture, nodeless),
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
    capture = capture_calls(model, args, kwargs)
    return locate_captured(capture, onnx_model, module_parameters(model), path)
