"""Running a model for a few of its outputs at a time, and mappings that read outputs lazily.

* :class:`ChunkRunner` is the :class:`~fxalign.backends.Session` ``OrtRunner.load`` returns
  under a memory bound: the model is optimized once, and each run runs that optimized graph
  cut down to the outputs asked for.
* :class:`ChunkedOutputs` is what :func:`~fxalign.backends.run_onnx` returns under a memory
  bound: outputs computed a chunk at a time, when one of them is first read.
* :class:`Renamed` reads such a mapping through other names without running anything.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx

from fxalign.backends.base import Session
from fxalign.modelio import copy_fields

__all__ = ["ChunkRunner", "ChunkedOutputs", "OptimizingBackend", "Renamed"]


class OptimizingBackend(Protocol):
    """What :class:`ChunkRunner` needs from a backend (:class:`~fxalign.backends.OrtRunner`)."""

    def save_optimized(self, model_path: str, optimized_path: str) -> None:
        """Save the graph the backend runs for ``model_path``, optimized as it optimizes it."""
        ...

    def load_optimized(self, model_path: str, *, shown_as: str | None = None) -> Session:
        """Load a graph :meth:`save_optimized` wrote (or a cut of it) without optimizing it."""
        ...


class ChunkRunner:
    """Runs a model for a few of its outputs at a time, keeping only those values alive.

    ONNX Runtime keeps every graph output alive until a run ends, whichever outputs are
    fetched, so fetching fewer outputs from one session saves no memory. Instead the model is
    optimized once, when the ``ChunkRunner`` is made (the one session of the whole model), and
    saved; each :meth:`run` then loads that optimized graph cut down to what its outputs need,
    with graph optimizations off, runs it and lets it go. The kernels are the ones a single
    run uses, so every value is identical.

    Args:
        backend: The backend, with its providers and options.
        model_path: The ONNX file; only read while constructing.
    """

    def __init__(self, backend: OptimizingBackend, model_path: str) -> None:
        self._backend = backend
        self._model_path = model_path
        self._tmp = tempfile.TemporaryDirectory(prefix="fxalign-chunks-")
        optimized = str(Path(self._tmp.name) / "optimized.onnx")
        backend.save_optimized(model_path, optimized)
        self._graph = onnx.load(optimized, load_external_data=False)
        self._producer = {out: i for i, n in enumerate(self._graph.graph.node) for out in n.output}

    def run(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """Compute ``output_names`` (graph outputs) only; the arrays are numpy's own.

        Raises:
            InputError: ``feeds`` are not the graph's inputs.
            RuntimeBackendError: The backend failed to load or run the cut graph.
        """
        path = str(Path(self._tmp.name) / "chunk.onnx")
        onnx.save_model(_cut(self._graph, self._producer, output_names), path)
        session = self._backend.load_optimized(path, shown_as=self._model_path)
        values = session.run(feeds, output_names)
        del session
        return {n: np.array(v, copy=True) for n, v in values.items()}


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
    """Graph outputs computed a chunk at a time, when first read; returned by ``run_onnx``.

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
