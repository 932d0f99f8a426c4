"""Promote ONNX tensors to graph outputs in a copy of a file, sharing its external data.

The user's file is never written. The copy is the same graph with more outputs; its weights are
not copied: beside the original it refers to the same external data file, elsewhere the data
files are hard-linked into its folder (ONNX Runtime reads external data only from the model's
own folder, and resolves symbolic links before checking).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnx_ir as ir

from fxalign.errors import UserError

__all__ = ["external_data_files", "promote"]

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


def _share_data(model: onnx.ModelProto, source_dir: Path, target_dir: Path) -> None:
    """Make every external data file of ``model`` readable from ``target_dir`` without a copy."""
    if source_dir.resolve() == target_dir.resolve():
        return
    for location in external_data_files(model):
        src, dst = source_dir / location, target_dir / location
        if dst.exists():
            if os.path.samefile(src, dst):
                continue
            raise UserError(
                f"cannot write the promoted copy to {str(target_dir)!r}: {str(dst)!r} exists "
                f"and is not the model's external data {str(src)!r}",
                hint="write the copy beside the model or into an empty folder",
            )
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError as e:
            raise UserError(
                f"cannot share the external data {str(src)!r} with a copy in "
                f"{str(target_dir)!r} (hard link failed: {e.strerror or e})",
                hint="write the promoted copy into the model's own folder, or a folder on the "
                "same file system",
            ) from e


def _values(graph: ir.Graph) -> dict[str, ir.Value]:
    values: dict[str, ir.Value] = {}
    for v in [*graph.inputs, *graph.initializers.values()]:
        if v.name:
            values[v.name] = v
    for node in graph:
        for v in node.outputs:
            if v.name:
                values[v.name] = v
    return values


def promote(
    model_path: str | os.PathLike[str],
    tensor_names: Sequence[str],
    out_path: str | os.PathLike[str],
) -> str:
    """Write a copy of ``model_path`` with ``tensor_names`` added to its graph outputs.

    The existing outputs stay first, in order; names already among them are not repeated.
    The new outputs carry no type: the runtime infers it (a post-processed file's
    ``value_info`` may be stale, a float16 conversion's often is, and a wrong type fails to load).

    Args:
        model_path: The ONNX file; never modified.
        tensor_names: Tensors of the main graph to promote.
        out_path: Where to write the copy (not ``model_path`` itself).

    Returns:
        ``out_path`` as a string.

    Raises:
        UserError: A name is not a tensor of the main graph, ``out_path`` is the model itself,
            or the external data cannot be shared with ``out_path``'s folder.
    """
    src, dst = Path(model_path), Path(out_path)
    if dst.exists() and os.path.samefile(src, dst):
        raise UserError(
            f"the promoted copy would overwrite the model {str(src)!r}",
            hint="give another out_path",
        )
    proto = onnx.load(str(src), load_external_data=False)
    model = ir.serde.deserialize_model(proto)
    values = _values(model.graph)
    missing = [n for n in tensor_names if n not in values]
    if missing:
        raise UserError(
            f"{len(missing)} tensors to promote are not in {str(src)!r}: {missing[:5]}",
            hint="promote names from the same file that was located",
        )
    present = {v.name for v in model.graph.outputs}
    wanted = [values[n] for n in dict.fromkeys(tensor_names) if n not in present]
    model.graph.outputs.extend(wanted)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _share_data(proto, src.parent, dst.parent)
    out = ir.serde.serialize_model(model)
    typed = {v.name for v in proto.graph.output}
    for info in out.graph.output:
        if info.name not in typed:
            info.ClearField("type")
    onnx.save_model(out, str(dst))
    logger.debug("promoted %d tensors into %s", len(wanted), dst)
    return str(dst)
