"""Stage 4: run both sides once and return ``name -> numpy array``.

* :func:`fxalign.torch_run.run_torch` (the PyTorch side, in its own module) runs the
  instrumented module eagerly once and returns every marker's value.
* :func:`run_onnx` runs an ONNX model once through a :class:`Runner` (ONNX Runtime by default)
  and returns the requested graph outputs by ONNX tensor name.

A runner is anything with ``name`` and ``run(model_path, feeds, output_names)``; every built-in
runner passes the same contract test.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import onnx
import torch
from torch.utils import _pytree as pytree

from fxalign._proto import copy_fields, itemsize
from fxalign.errors import InputError, RuntimeBackendError
from fxalign.torch_run import to_numpy

__all__ = [
    "ChunkRunner",
    "ChunkedOutputs",
    "OrtRunner",
    "Renamed",
    "Runner",
    "builtin_runners",
    "onnx_feeds",
    "run_onnx",
]

logger = logging.getLogger(__name__)


@runtime_checkable
class Runner(Protocol):
    """An ONNX backend: runs a model file once and returns the outputs asked for."""

    name: str

    def run(
        self, model_path: str, feeds: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """Run the model once.

        Args:
            model_path: Path of the ONNX model (external data beside it).
            feeds: Graph input name -> value.
            output_names: Graph outputs to return, in this order.

        Returns:
            ``output name -> numpy array`` for exactly ``output_names``.
        """
        ...


class OrtRunner:
    """ONNX Runtime, one ``InferenceSession`` per call.

    Args:
        providers: Execution providers in order of preference (default: CPU).
        graph_optimization_level: An ``onnxruntime.GraphOptimizationLevel`` or its name
            (``"ORT_DISABLE_ALL"``, ``"ORT_ENABLE_BASIC"``, ``"ORT_ENABLE_EXTENDED"``,
            ``"ORT_ENABLE_ALL"``); ``None`` keeps ONNX Runtime's default.
    """

    def __init__(
        self,
        providers: Sequence[str] | None = None,
        graph_optimization_level: Any = None,
    ) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        missing = [p for p in self.providers if p not in available]
        if missing:
            raise RuntimeBackendError(
                f"execution provider(s) {missing} not available in this onnxruntime build",
                hint=f"available providers: {available}",
            )
        if isinstance(graph_optimization_level, str):
            try:
                graph_optimization_level = getattr(
                    ort.GraphOptimizationLevel, graph_optimization_level
                )
            except AttributeError as e:
                raise RuntimeBackendError(
                    f"unknown graph optimization level {graph_optimization_level!r}",
                    hint="use ORT_DISABLE_ALL, ORT_ENABLE_BASIC, ORT_ENABLE_EXTENDED or "
                    "ORT_ENABLE_ALL",
                ) from e
        self.graph_optimization_level = graph_optimization_level
        self.name = "onnxruntime"

    def _session(self, model_path: str, options: Any = None) -> Any:
        import onnxruntime as ort

        if options is None:
            options = ort.SessionOptions()
            if self.graph_optimization_level is not None:
                options.graph_optimization_level = self.graph_optimization_level
        try:
            return ort.InferenceSession(model_path, options, providers=self.providers)
        except Exception as e:
            raise RuntimeBackendError(
                f"ONNX Runtime cannot load {model_path}: {_first_line(e)}",
                hint="the message names the failing node; check its op and opset version",
            ) from e

    @staticmethod
    def _run(
        session: Any, model_path: str, feeds: Mapping[str, np.ndarray], names: Sequence[str]
    ) -> list[Any]:
        expected = {i.name for i in session.get_inputs()}
        if set(feeds) != expected:
            raise InputError(
                f"inputs {sorted(feeds)} do not match the ONNX graph inputs {sorted(expected)}",
                hint="pass the same inputs the model was exported with",
            )
        try:
            return list(session.run(list(names), dict(feeds)))
        except Exception as e:
            raise RuntimeBackendError(
                f"ONNX Runtime failed to run {model_path}: {_first_line(e)}",
                hint="the message names the failing node; look up its module path in the report",
            ) from e

    def run(
        self, model_path: str, feeds: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """Run the model once; see :class:`Runner`."""
        session = self._session(model_path)
        values = self._run(session, model_path, feeds, output_names)
        return dict(zip(output_names, (np.asarray(v) for v in values), strict=True))

    def prepare_chunks(self, model_path: str) -> ChunkRunner:
        """Get ready to run the model on one chunk of its outputs at a time (see ChunkRunner)."""
        return ChunkRunner(self, model_path)


class ChunkRunner:
    """Runs a model for a few of its outputs at a time, keeping only those values alive.

    ONNX Runtime keeps every graph output alive until a run ends, whichever outputs are
    fetched, so fetching fewer outputs from one session saves no memory. Instead the model is
    optimized once, by a session with the runner's options, and saved; each :meth:`run` then
    runs that optimized graph cut down to what its outputs need, with graph optimizations off.
    The kernels are the ones a single run uses, so every value is identical.

    Args:
        runner: Providers and options.
        model_path: The ONNX file; only needed while constructing.
    """

    def __init__(self, runner: OrtRunner, model_path: str) -> None:
        import onnxruntime as ort

        self._runner = runner
        self._model_path = model_path
        self._tmp = tempfile.TemporaryDirectory(prefix="fxalign-chunks-")
        optimized = str(Path(self._tmp.name) / "optimized.onnx")
        options = ort.SessionOptions()
        if runner.graph_optimization_level is not None:
            options.graph_optimization_level = runner.graph_optimization_level
        options.optimized_model_filepath = optimized
        options.log_severity_level = 3  # not the "hardware specific optimizations" warning
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "optimized.onnx.data"
        )
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
        runner._session(model_path, options)
        self._graph = onnx.load(optimized, load_external_data=False)
        self._producer = {out: i for i, n in enumerate(self._graph.graph.node) for out in n.output}
        self._options = ort.SessionOptions()
        self._options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    def run(self, feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        """Compute ``names`` (graph outputs) only; the arrays are numpy's own."""
        path = str(Path(self._tmp.name) / "chunk.onnx")
        onnx.save_model(_cut(self._graph, self._producer, names), path)
        session = self._runner._session(path, self._options)
        values = self._runner._run(session, self._model_path, feeds, names)
        del session
        return {n: np.array(v, copy=True) for n, v in zip(names, values, strict=True)}


def _cut(
    model: onnx.ModelProto, producer: Mapping[str, int], outputs: Sequence[str]
) -> onnx.ModelProto:
    """``model`` with only ``outputs`` and the nodes and initializers they depend on."""
    nodes = model.graph.node
    needed: set[int] = set()
    stack = list(outputs)
    while stack:
        index = producer.get(stack.pop())
        if index is None or index in needed:
            continue
        needed.add(index)
        stack.extend(_node_inputs(nodes[index]))
    kept = [nodes[i] for i in sorted(needed)]
    used = {name for node in kept for name in _node_inputs(node)} | set(outputs)
    out = onnx.ModelProto()
    copy_fields(out, model, skip=("graph",))
    graph = out.graph
    graph.name = model.graph.name
    graph.node.extend(kept)
    graph.input.extend(model.graph.input)
    graph.value_info.extend(model.graph.value_info)
    graph.initializer.extend(t for t in model.graph.initializer if t.name in used)
    info = {v.name: v for v in [*model.graph.output, *model.graph.value_info]}
    graph.output.extend(info[n] if n in info else onnx.ValueInfoProto(name=n) for n in outputs)
    return out


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    """Names a node reads, those its subgraphs read from outer scopes included."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        for sub in [attr.g, *attr.graphs] if attr.type in (5, 10) else []:
            names.extend(n for inner in sub.node for n in _node_inputs(inner))
    return names


class ChunkedOutputs(Mapping[str, np.ndarray]):
    """Graph outputs computed a chunk at a time, when first read; returned by :func:`run_onnx`.

    Reading the outputs in the order they were requested runs the model once per chunk and
    keeps one chunk in memory (reading an earlier chunk again runs it again). ``dict(outputs)``
    merges them all.

    Args:
        run_chunk: Computes the outputs of one chunk.
        chunks: Output names per run.
    """

    def __init__(
        self,
        run_chunk: Callable[[Sequence[str]], dict[str, np.ndarray]],
        chunks: Sequence[Sequence[str]],
    ) -> None:
        self._run_chunk = run_chunk
        self._chunks = [list(c) for c in chunks]
        self._chunk_of = {name: i for i, chunk in enumerate(self._chunks) for name in chunk}
        self._index = -1
        self._values: dict[str, np.ndarray] = {}
        self.runs = 0
        """How many runs were made so far."""

    def __getitem__(self, name: str) -> np.ndarray:
        index = self._chunk_of[name]
        if index != self._index:
            self._values = {}  # let the previous chunk go first
            self._values = self._run_chunk(self._chunks[index])
            self._index = index
            self.runs += 1
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._chunk_of)

    def __len__(self) -> int:
        return len(self._chunk_of)


class Renamed(Mapping[str, np.ndarray]):
    """``new name -> outputs[old name]``, read through (a :class:`ChunkedOutputs` stays lazy).

    Args:
        outputs: Values by graph output name.
        names: ``new name -> graph output name``.
    """

    def __init__(self, outputs: Mapping[str, np.ndarray], names: Mapping[str, str]) -> None:
        self._outputs = outputs
        self._names = dict(names)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._outputs[self._names[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def builtin_runners(providers: Sequence[str] | None = None) -> dict[str, Runner]:
    """The runners fxalign ships, by name (``--runner`` on the CLI).

    ``onnxruntime`` is ONNX Runtime with its default optimizations; ``onnxruntime-noopt`` turns
    them all off, which tells whether a divergence comes from the model or from a runtime
    optimization (a fusion) applied to it.
    """
    return {
        "onnxruntime": OrtRunner(providers),
        "onnxruntime-noopt": OrtRunner(providers, graph_optimization_level="ORT_DISABLE_ALL"),
    }


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0] if len(text) < 2000 else text[:2000]


def feed_array(value: torch.Tensor) -> np.ndarray:
    """A tensor as a runtime input: like :func:`to_numpy`, but bfloat16 stays bfloat16."""
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
        import ml_dtypes

        return value.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return to_numpy(value)


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
    if len(leaves) != len(names):
        raise InputError(
            f"the ONNX graph takes {len(names)} input(s) {names}, but {len(leaves)} tensor(s) "
            "were given",
            hint="an input the model never uses is dropped by the exporter; pass the inputs "
            "by keyword with the graph's input names",
        )
    return _checked(model, {n: feed_array(v) for n, v in zip(names, leaves, strict=True)})


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
                    hint="export with dynamic shapes: export_kwargs={'dynamic_shapes': ...} "
                    "(dynamo) or {'dynamic_axes': ...} (torchscript); on the CLI, --dynamic",
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


def run_onnx(
    model: onnx.ModelProto | str | os.PathLike[str],
    inputs: Mapping[str, np.ndarray],
    providers: Sequence[str] | None = None,
    *,
    output_names: Sequence[str] | None = None,
    runner: Runner | None = None,
    workdir: str | os.PathLike[str] | None = None,
    max_outputs_per_run: int | None = None,
) -> Mapping[str, np.ndarray]:
    """Run an ONNX model once and return its outputs by name.

    Args:
        model: A ``ModelProto`` or a path. A proto is saved to ``workdir`` first (with external
            data when it is over 2 GB).
        inputs: Graph input name -> value (see :func:`onnx_feeds`).
        providers: ONNX Runtime execution providers; ignored when ``runner`` is given.
        output_names: Outputs to return (default: all graph outputs).
        runner: The backend (default: :class:`OrtRunner`).
        workdir: Where to save a proto; a temporary directory by default.
        max_outputs_per_run: Bound memory: compute at most this many outputs per run. With ONNX
            Runtime the result is a :class:`ChunkedOutputs` that runs the model for a chunk
            of outputs when one of them is first read (read them in ``output_names`` order to
            run each chunk once); the values are identical to a single run's. Other runners
            are run once per chunk and the results merged.

    Returns:
        ``output name -> numpy array`` (a dict, or :class:`ChunkedOutputs`).

    Raises:
        InputError: ``max_outputs_per_run`` is below 1.
    """
    if max_outputs_per_run is not None and max_outputs_per_run < 1:
        raise InputError(
            f"max_outputs_per_run must be at least 1, got {max_outputs_per_run}",
            hint="pass None to compute every output in one run",
        )
    runner = runner or OrtRunner(providers)
    with tempfile.TemporaryDirectory(prefix="fxalign-run-", dir=workdir) as tmp:
        if isinstance(model, onnx.ModelProto):
            path = str(Path(tmp) / "model.onnx")
            save_model(model, path)
            proto = model
        else:
            path = str(model)
            proto = onnx.load(path, load_external_data=False)
        names = (
            list(output_names) if output_names is not None else [o.name for o in proto.graph.output]
        )
        k = max_outputs_per_run
        if k is None or len(names) <= k:
            return runner.run(path, inputs, names)
        chunks = [names[i : i + k] for i in range(0, len(names), k)]
        if isinstance(runner, OrtRunner):
            prepared = runner.prepare_chunks(path)  # uses the file now, not later
            return ChunkedOutputs(lambda chunk: prepared.run(inputs, chunk), chunks)
        merged: dict[str, np.ndarray] = {}
        for chunk in chunks:
            merged.update(runner.run(path, inputs, chunk))
        return merged


_TWO_GB = 2**31


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Save ``model``, with its weights as external data beside it when it is over 2 GB."""
    if _surely_small(model) or model.ByteSize() < _TWO_GB - 2**24:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=Path(path).name + ".data",
        )


def _surely_small(model: onnx.ModelProto) -> bool:
    """Whether the weights are far below 2 GB, judged from their shapes and types.

    ``ModelProto.ByteSize()`` walks every byte of a large model (over a second for BERT-base);
    shapes and types bound the same for all but models near the limit, which still get the
    exact size.
    """
    if any(a.type in (5, 10) for n in model.graph.node for a in n.attribute):
        return False  # subgraphs: judge by the exact size
    tensors = [*model.graph.initializer]
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute]
    total = 0
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        if t.data_type == onnx.TensorProto.STRING or model.graph.sparse_initializer:
            return False
        total += math.prod(t.dims) * _bytes_per_element(t) + 64
    return total + 512 * len(model.graph.node) < _TWO_GB // 2 and not model.functions


def _bytes_per_element(tensor: onnx.TensorProto) -> int:
    """Serialized bytes per element: exact in ``raw_data``, at most a varint's 10 otherwise."""
    if tensor.HasField("raw_data"):
        return itemsize(tensor) or 16
    return 10
