"""Promote ONNX tensors to graph outputs in a copy of a file, sharing its external data.

The user's file is never written. The copy is the same graph with more outputs and refers to
the same external data file, so its weights are neither copied nor loaded. ONNX Runtime reads
external data only from the folder of the model it loads (symbolic links are resolved before the
check) and onnx refuses hard-linked data files, so a copy on disk belongs beside the original;
elsewhere, build the session from :func:`promoted` in memory with the session option
:data:`EXTERNAL_DATA_FOLDER` set to the original's folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from fxalign.backends.memory import EXTERNAL_DATA_FOLDER
from fxalign.errors import UserError

__all__ = ["EXTERNAL_DATA_FOLDER", "external_data_files", "fed_readers", "promote", "promoted"]

logger = logging.getLogger(__name__)


def external_data_files(model: onnx.ModelProto) -> list[str]:
    """The external data locations ``model``'s tensors refer to (relative paths), once each."""
    found: dict[str, None] = {}
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node for a in n.attribute if a.type == 4]
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for entry in t.external_data:
                if entry.key == "location":
                    found.setdefault(entry.value)
    return list(found)


def _main_graph_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.output)
    names.discard("")
    return names


def promoted(
    model: str | os.PathLike[str] | onnx.ModelProto, tensor_names: Sequence[str]
) -> onnx.ModelProto:
    """The graph of ``model`` with ``tensor_names`` added to its outputs, in memory.

    ``model`` is a file's path (read without its external data) or a model already read (not
    modified: the result is a copy). The existing outputs stay first, in order; names already
    among them are not repeated. The new outputs carry no type: the runtime infers it (a
    post-processed file's ``value_info`` may be stale, a float16 conversion's often is, and a
    wrong type fails to load). External data is not loaded: the tensors still refer to the
    files beside the model's path.

    Raises:
        UserError: A name is not a tensor of the main graph.

    Example:
        >>> from onnx import helper, TensorProto
        >>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        >>> y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
        >>> nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Neg", ["h"], ["y"])]
        >>> m = helper.make_model(helper.make_graph(nodes, "g", [x], [y]))
        >>> [o.name for o in promoted(m, ["h", "y"]).graph.output], len(m.graph.output)
        (['y', 'h'], 1)
    """
    if isinstance(model, onnx.ModelProto):
        where, out = "the model", onnx.ModelProto()
        out.CopyFrom(model)
    else:
        where, out = repr(str(model)), onnx.load(str(model), load_external_data=False)
    known = _main_graph_names(out.graph)
    missing = [n for n in tensor_names if n not in known]
    if missing:
        raise UserError(
            f"{len(missing)} tensors to promote are not in {where}: {missing[:5]}",
            hint="promote names from the same file that was located",
        )
    present = {v.name for v in out.graph.output}
    for name in dict.fromkeys(tensor_names):
        if name not in present:
            out.graph.output.add(name=name)
    return out


def fed_readers(
    model: onnx.ModelProto, tensor: str, like: np.ndarray, outputs: Sequence[str]
) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` where each read of ``tensor`` takes a graph input of its own.

    Every input slot of a main-graph node that reads ``tensor`` reads a new graph input
    instead (one per slot, in node order), so the file's nodes after ``tensor`` can be
    replayed with a value of one's choosing on each read; ``tensor`` itself is still
    computed. ``like`` gives the new inputs' element type and shape; ``outputs`` become the
    graph's outputs. ``model`` is not modified; its weights are not loaded (the copy refers to
    the same data).

    Returns:
        The copy and the names of the new inputs.

    Raises:
        UserError: No main-graph node reads ``tensor``, or an output is no tensor.

    Example:
        >>> from onnx import helper, TensorProto
        >>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
        >>> y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
        >>> relu = helper.make_node("Relu", ["x"], ["h"])
        >>> nodes = [relu, helper.make_node("Add", ["h", "h"], ["y"])]
        >>> m = helper.make_model(helper.make_graph(nodes, "g", [x], [y]))
        >>> copy, reads = fed_readers(m, "h", np.zeros(2, np.float32), ["y"])
        >>> reads, list(copy.graph.node[1].input)
        (['h.fxalign_read0', 'h.fxalign_read1'], ['h.fxalign_read0', 'h.fxalign_read1'])
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    known = _main_graph_names(graph)
    missing = [n for n in outputs if n not in known]
    elem = onnx.helper.np_dtype_to_tensor_dtype(like.dtype)
    reads: list[str] = []
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name != tensor:
                continue
            read = f"{tensor}.fxalign_read{len(reads)}"
            while read in known:
                read += "_"
            node.input[slot] = read
            reads.append(read)
            graph.input.append(onnx.helper.make_tensor_value_info(read, elem, list(like.shape)))
    if not reads or missing:
        raise UserError(
            f"cannot feed the readers of {tensor!r}"
            + (f": {missing[:3]} are not its tensors" if missing else ": no node reads it"),
            hint="name a tensor that nodes of the main graph read",
        )
    del graph.output[:]
    for name in dict.fromkeys(outputs):
        graph.output.add(name=name)
    return out, reads


def promote(
    model_path: str | os.PathLike[str],
    tensor_names: Sequence[str],
    out_path: str | os.PathLike[str],
) -> str:
    """Write a copy of ``model_path`` with ``tensor_names`` added to its graph outputs.

    See :func:`promoted`. The copy shares the original's external data, so it must be written
    into the original's folder when there is external data; with inline weights it may go
    anywhere (it then holds its own copy of the weights).

    Args:
        model_path: The ONNX file; never modified.
        tensor_names: Tensors of the main graph to promote.
        out_path: Where to write the copy (not ``model_path`` itself).

    Returns:
        ``out_path`` as a string.

    Raises:
        UserError: A name is not a tensor of the main graph, ``out_path`` is the model itself
            or one of its data files, or is outside the folder of the model's external data.
    """
    src, dst = Path(model_path), Path(out_path)
    model = promoted(src, tensor_names)
    data = external_data_files(model)
    taken = [src, *(src.parent / d for d in data)]
    if any(dst.exists() and os.path.samefile(t, dst) for t in taken if t.exists()):
        raise UserError(
            f"the promoted copy would overwrite the model or its data: {str(dst)!r}",
            hint="give another out_path, beside the model",
        )
    if data and dst.parent.resolve() != src.parent.resolve():
        raise UserError(
            f"the promoted copy of {str(src)!r} must be written beside it, not in "
            f"{str(dst.parent)!r}: it shares the model's external data ({data[0]!r}), and "
            "ONNX Runtime reads external data only from the folder of the model it loads",
            hint=f"write it into {str(src.parent)!r}, or load fxalign.attach.promoted(...) "
            f"from memory with the session option {EXTERNAL_DATA_FOLDER!r} set to that folder",
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(dst))
    logger.debug("promoted %d tensors into %s", len(tensor_names), dst)
    return str(dst)
