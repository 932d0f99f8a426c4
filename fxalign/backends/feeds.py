"""PyTorch inputs as ONNX graph feeds: names, order, dtypes, and the checks against the graph.

Exporters flatten ``(args, kwargs)`` into tensor leaves; :func:`input_leaf_names` names them
the way ``export`` asks the exporter to, and :func:`onnx_feeds` maps them back onto a graph's
inputs for a backend to run.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from torch.utils import _pytree as pytree

from fxalign.errors import InputError

__all__ = ["feed_array", "input_leaf_names", "onnx_feeds"]


def feed_array(value: torch.Tensor) -> np.ndarray:
    """A tensor as a runtime input, on the CPU; bfloat16 stays bfloat16 (``ml_dtypes``)."""
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
        import ml_dtypes

        return value.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return value.resolve_conj().resolve_neg().numpy()


def _onnx_input_names(model: onnx.ModelProto | str | os.PathLike[str]) -> list[str]:
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def input_leaf_names(
    forward: Any, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
) -> list[str]:
    """A name per tensor input, in the order exporters flatten ``(args, kwargs)``.

    The name is the ``forward`` parameter the tensor is passed as, with its position inside a
    structure appended (``x``, ``pair_1``, ``mask``); ``input_<i>`` where there is no
    signature.
    """
    kwargs = dict(kwargs or {})
    leaves, _ = pytree.tree_flatten_with_path((tuple(args), kwargs))
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names: list[str] = []
    for i, (path, leaf) in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            continue
        keys = [getattr(k, "idx", getattr(k, "key", k)) for k in path]
        if keys[0] == 0:  # positional: (args)[j]
            j = int(str(keys[1]))
            base = positional[j] if j < len(positional) else f"input_{i}"
        else:
            base = str(keys[1])
        parts = [base] + [str(k) for k in keys[2:]]
        names.append(re.sub(r"\W", "_", "_".join(parts)))
    seen: dict[str, int] = {}
    unique = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        unique.append(n if seen[n] == 1 else f"{n}_{seen[n] - 1}")
    return unique


def onnx_feeds(
    model: onnx.ModelProto | str | os.PathLike[str],
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    forward: Any = None,
    input_names: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Map PyTorch inputs onto the ONNX graph's inputs.

    Inputs are matched by name where the graph's input names are the ``forward`` parameter
    names (the dynamo exporter's default), else by position among the tensor leaves of
    ``(args, kwargs)`` (how both exporters flatten inputs).

    Args:
        model: The ONNX model or its path.
        args: Positional inputs as given to the model.
        kwargs: Keyword inputs.
        forward: The model's ``forward`` (for parameter names); optional.
        input_names: The name each tensor input was exported under, in flattening order
            (:attr:`fxalign.ExportResult.input_names`); inputs the exporter dropped are skipped.

    Returns:
        ``graph input name -> numpy array``.

    Raises:
        InputError: The inputs cannot be matched to the graph's inputs.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)  # the graph only, read once
    names = _onnx_input_names(model)
    kwargs = dict(kwargs or {})
    leaves = [v for v in pytree.tree_leaves((tuple(args), kwargs)) if isinstance(v, torch.Tensor)]
    if input_names is not None and len(input_names) == len(leaves):
        named = dict(zip(input_names, leaves, strict=True))
        if all(n in named for n in names):
            return _checked(model, {n: feed_array(named[n]) for n in names})
    by_name: dict[str, Any] = dict(kwargs)
    if forward is not None:
        try:
            bound = inspect.signature(forward).bind(*args, **kwargs)
            by_name = {}
            for k, v in bound.arguments.items():
                if isinstance(v, dict) and inspect.signature(forward).parameters[k].kind == (
                    inspect.Parameter.VAR_KEYWORD
                ):
                    by_name.update(v)
                else:
                    by_name[k] = v
        except (TypeError, ValueError):
            pass
    if names and all(isinstance(by_name.get(n), torch.Tensor) for n in names):
        return _checked(model, {n: feed_array(by_name[n]) for n in names})
    if len(leaves) < len(names) and forward is not None:
        with_numbers = _with_numbers(model, names, forward, args, kwargs)
        if with_numbers is not None:
            return _checked(model, with_numbers)
    if len(leaves) != len(names):
        hint = (
            "an input the model never uses is dropped by the exporter; pass the inputs "
            "by keyword with the graph's input names"
            if len(leaves) > len(names)
            else "the exporter may have made a Python number (an argument, or a default the "
            "TorchScript exporter filled in after keyword arguments) a graph input: pass it "
            "as a tensor of that input's dtype, or pass the inputs by keyword with the "
            "graph's input names"
        )
        raise InputError(
            f"the ONNX graph takes {len(names)} input(s) {names}, but {len(leaves)} tensor(s) "
            "were given",
            hint=hint,
        )
    return _checked(model, {n: feed_array(v) for n, v in zip(names, leaves, strict=True)})


def _with_numbers(
    model: onnx.ModelProto,
    names: Sequence[str],
    forward: Any,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
) -> dict[str, np.ndarray] | None:
    """Feeds where the graph also takes the forward's Python numbers as scalar inputs.

    The TorchScript exporter makes a number passed to ``forward``, or a default it fills in
    for the parameters after the keyword arguments it was given, a 0-dim graph input. The
    arguments with their defaults, in signature order, are tried as the graph's inputs: the
    tensors, and the numbers where the graph takes a scalar. ``None`` unless that accounts
    for every graph input.
    """
    try:
        bound = inspect.signature(forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    values = [
        v
        for v in pytree.tree_leaves(list(bound.arguments.values()))
        if isinstance(v, (torch.Tensor, int, float))
    ]
    if len(values) != len(names):
        return None
    types = {i.name: i.type.tensor_type for i in model.graph.input}
    feeds = {}
    for name, value in zip(names, values, strict=True):
        if isinstance(value, torch.Tensor):
            feeds[name] = feed_array(value)
            continue
        tensor_type = types.get(name)
        scalar = (
            tensor_type is not None
            and tensor_type.elem_type
            and tensor_type.HasField("shape")
            and len(tensor_type.shape.dim) == 0
        )
        if not scalar:
            return None
        assert tensor_type is not None
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        feeds[name] = np.asarray(value, dtype=dtype)
    return feeds


def _checked(
    model: onnx.ModelProto | str | os.PathLike[str], feeds: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Check feeds against the graph's input types: static dims and element types."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    for graph_input in model.graph.input:
        value = feeds.get(graph_input.name)
        if value is None or not graph_input.type.HasField("tensor_type"):
            continue
        tensor_type = graph_input.type.tensor_type
        if tensor_type.HasField("shape"):
            dims = [
                d.dim_value if d.HasField("dim_value") else d.dim_param or "?"
                for d in tensor_type.shape.dim
            ]
            static_ok = len(dims) == value.ndim and all(
                not isinstance(d, int) or d == n for d, n in zip(dims, value.shape, strict=True)
            )
            if not static_ok:
                raise InputError(
                    f"input {graph_input.name!r} has shape {list(value.shape)}, but the model "
                    f"was exported for {dims} (numbers are fixed sizes)",
                    hint="a graph exported with fixed sizes takes only those: export it with "
                    "dynamic shapes (torch.onnx.export's dynamic_shapes= with dynamo, "
                    "dynamic_axes= with torchscript; for fxalign's own export, export_kwargs= "
                    "or --dynamic on the CLI)",
                )
        expected = (
            onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
            if (tensor_type.elem_type)
            else None
        )
        if expected is not None and np.dtype(expected) != value.dtype and value.dtype != object:
            raise InputError(
                f"input {graph_input.name!r} is {value.dtype}, but the model was exported "
                f"for {np.dtype(expected)}",
                hint="pass inputs of the dtype the model was exported with",
            )
    return feeds
