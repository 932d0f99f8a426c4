"""A model held in memory for a runtime: its graph without its weights, the weights as arrays.

Serializing a model with inline weights and having the runtime parse it again copies every
weight twice more; writing a copy to disk for the runtime to read adds a file write of the
weights' size. :func:`weightless` instead copies the graph alone, each inline weight of
``min_bytes`` and more turned into an external-data placeholder, and returns the weights as
arrays over the model's bytes, for the runtime to take as they are (ONNX Runtime's
``SessionOptions.add_external_initializers``). Weights the model already keeps as external
data stay there: the runtime reads them from ``folder``.

Example:
    >>> import numpy as np
    >>> from onnx import helper, numpy_helper, TensorProto
    >>> w = numpy_helper.from_array(np.arange(512, dtype=np.float32), "w")
    >>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [512])
    >>> y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [512])
    >>> graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [w])
    >>> model = weightless(helper.make_model(graph))
    >>> sorted(model.weights), model.weights["w"][:3].tolist(), model.graph.ByteSize() < 256
    (['w'], [0.0, 1.0, 2.0], True)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import onnx

from fxalign.modelio import copy_fields

__all__ = ["EXTERNAL_DATA_FOLDER", "IN_MEMORY", "WeightlessModel", "weightless"]

EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"
"""ONNX Runtime session config key: where a model loaded from bytes finds its external data."""

IN_MEMORY = "fxalign-in-memory"
"""The external-data location of a weight handed to the runtime as an array."""

_PLAIN_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.INT8,
    onnx.TensorProto.INT16,
    onnx.TensorProto.INT32,
    onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.UINT16,
    onnx.TensorProto.UINT32,
    onnx.TensorProto.UINT64,
    onnx.TensorProto.BOOL,
}
"""Element types numpy holds natively: their raw bytes are the array's (little-endian) bytes."""


@dataclass(frozen=True)
class WeightlessModel:
    """A model as :func:`weightless` splits it.

    Attributes:
        graph: The model without those weights: each weight in ``weights`` is an
            external-data placeholder at :data:`IN_MEMORY` (small: cheap to copy, to extend,
            to serialize).
        weights: Initializer name -> its value (read-only arrays over the model's bytes).
        folder: Where the external data the model already had lives (``None``: it had none,
            or it is found relative to the working directory).
        name: The model as messages name it.
    """

    graph: onnx.ModelProto
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    folder: str | None = None
    name: str = "the model"


def weightless(
    model: onnx.ModelProto,
    *,
    folder: str | None = None,
    name: str = "the model",
    min_bytes: int = 1024,
) -> WeightlessModel:
    """Split ``model`` (not modified) into a copy of its graph and its inline weights.

    Only initializers of the main graph with raw data of ``min_bytes`` or more, of an element
    type numpy holds natively, are split off (on a little-endian machine, where raw data is the
    array's bytes); everything else stays in the graph as it was.

    Args:
        model: The model; its external data, if any, is left where it is.
        folder: The folder of the model's external data, for the runtime.
        name: The model as messages name it.
        min_bytes: Smaller weights stay inline.
    """
    out = onnx.ModelProto()
    copy_fields(out, model, skip=("graph",))
    copy_fields(out.graph, model.graph, skip=("initializer",))
    weights: dict[str, np.ndarray] = {}
    split = sys.byteorder == "little"
    for tensor in model.graph.initializer:
        if (
            split
            and tensor.data_type in _PLAIN_TYPES
            and tensor.data_location != onnx.TensorProto.EXTERNAL
            and tensor.HasField("raw_data")
            and tensor.name not in weights
        ):
            raw = tensor.raw_data
            if len(raw) >= min_bytes:
                dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
                weights[tensor.name] = np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.dims))
                placeholder = out.graph.initializer.add()
                copy_fields(placeholder, tensor, skip=("raw_data",))
                placeholder.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", IN_MEMORY), ("length", str(len(raw)))):
                    entry = placeholder.external_data.add()
                    entry.key, entry.value = key, value
                continue
        out.graph.initializer.add().CopyFrom(tensor)
    return WeightlessModel(out, weights, folder, name)
