"""ONNX Runtime as a backend, loader apart from runner.

* :func:`session_from_onnx` and :func:`session_from_memory` are the loaders: the only places an
  ``InferenceSession`` is built (from a file; from a graph in memory and its weights' arrays).
* :class:`OrtSession` runs one loaded session, as many times as asked.
* :class:`OrtRunner` is the :class:`~fxalign.backends.Runner`: providers and options, and
  ``load(model_path)`` building one session per model. With ``max_outputs_per_run`` it returns
  a :class:`~fxalign.backends.ChunkRunner` instead, which optimizes the model once and runs
  its graph cut down to each chunk of outputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from fxalign.backends.base import Runner, Session, first_line
from fxalign.backends.chunks import ChunkRunner
from fxalign.backends.memory import EXTERNAL_DATA_FOLDER, WeightlessModel
from fxalign.errors import InputError, RuntimeBackendError
from fxalign.threads import free_cpus, usable_cpus

__all__ = [
    "OrtRunner",
    "OrtSession",
    "builtin_runners",
    "fetching_options",
    "session_from_memory",
    "session_from_onnx",
    "threading_options",
]

OPTIMIZATION_LEVELS = (
    "ORT_DISABLE_ALL",
    "ORT_ENABLE_BASIC",
    "ORT_ENABLE_EXTENDED",
    "ORT_ENABLE_ALL",
)
"""Names of ``onnxruntime.GraphOptimizationLevel`` values (``--graph-optimization``)."""

NO_SPINNING = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")
"""Session config keys set to ``"0"``: idle workers block instead of spinning."""

SPINNING_STOP = "session.force_spinning_stop"
"""Session config key set to ``"1"``: the workers stop spinning as soon as a run returns."""


def fetching_options(options: ort.SessionOptions) -> ort.SessionOptions:
    """``options`` for a session whose run returns many intermediate values: no CPU arena.

    fxalign fetches hundreds of values a plain run would free at once. ONNX Runtime's CPU
    arena cannot give their memory back to the plan while they are outputs, so it grows by
    each of them, fresh memory for every value, in every new session; without the arena each
    is one allocation of its own (a ResNet-50 run with 167 values fetched: 34 ms instead of
    53-110 ms here, the plain run taking 22 ms; BERT-base, 446 values: 90-108 ms instead of
    136-141 ms, plain 80 ms).
    """
    options.enable_cpu_mem_arena = False
    return options


def threading_options(
    options: ort.SessionOptions, *, spin: bool | None = None
) -> ort.SessionOptions:
    """``options`` with a thread pool that holds up on a machine shared with other work.

    ONNX Runtime's defaults (one pinned worker per physical core, workers that keep spinning
    after a run) cost much on a busy machine: a pinned worker cannot leave a core another
    process holds, so every operator waits for it, and a worker spinning after the run takes
    CPU from the main thread and from PyTorch's threads. Here the intra-op pool has
    :func:`~fxalign.threads.usable_cpus` threads (an explicit count: no pinning), and its
    workers stop spinning the moment a run returns. During a run they spin between operators
    (which shortens a run of many small operators) only where no other work waits for the CPUs
    (``spin``; default: whether :func:`~fxalign.threads.free_cpus` finds every usable CPU
    free now); on a busy machine they block instead. The inter-op pool never spins.
    """
    threads = usable_cpus()
    options.intra_op_num_threads = threads
    if spin is None:
        spin = free_cpus() >= threads
    options.add_session_config_entry(NO_SPINNING[0], "1" if spin else "0")
    options.add_session_config_entry(NO_SPINNING[1], "0")
    options.add_session_config_entry(SPINNING_STOP, "1")
    return options


def session_from_onnx(
    model_path: str, options: ort.SessionOptions, providers: Sequence[str]
) -> ort.InferenceSession:
    """Build an ONNX Runtime session for ``model_path``.

    Args:
        model_path: The ONNX file (external data beside it).
        options: Session options.
        providers: Execution providers in order of preference.

    Raises:
        RuntimeBackendError: ONNX Runtime cannot load the model; the message names the node.
    """
    return _session(model_path, model_path, options, providers)


def _session(
    model: str | bytes, shown_as: str, options: ort.SessionOptions, providers: Sequence[str]
) -> ort.InferenceSession:
    """``ort.InferenceSession`` of a path or serialized model; a load failure named by model."""
    try:
        return ort.InferenceSession(model, options, providers=list(providers))
    except Exception as e:
        raise RuntimeBackendError(
            f"ONNX Runtime cannot load {shown_as}: {first_line(e)}", hint=_load_hint(str(e))
        ) from e


def _load_hint(message: str) -> str:
    """What to check for ONNX Runtime's load failure ``message``.

    Example:
        >>> _load_hint("GetExtDataFromTensorProto External initializer: w ... out of bounds")[:40]
        "a weight's external data file is missing"
    """
    if "External" in message or "external data" in message.lower():
        return (
            "a weight's external data file is missing or shorter than the model says: copy the "
            ".onnx file together with its data file(s), as the exporter wrote them"
        )
    return "the message names the failing node; check its op and opset version"


def session_from_memory(
    model: WeightlessModel, options: ort.SessionOptions, providers: Sequence[str]
) -> tuple[ort.InferenceSession, list[ort.OrtValue]]:
    """Build an ONNX Runtime session for a model in memory, its weights taken as they are.

    Returns:
        The session, and the values it reads its weights from: they must outlive it.

    Raises:
        RuntimeBackendError: ONNX Runtime cannot load the model; the message names the node.
    """
    if model.folder is not None:
        options.add_session_config_entry(EXTERNAL_DATA_FOLDER, model.folder)
    names = list(model.weights)
    values = [ort.OrtValue.ortvalue_from_numpy(model.weights[n]) for n in names]
    if names:
        options.add_external_initializers(names, values)
    return _session(model.graph.SerializeToString(), model.name, options, providers), values


class OrtSession:
    """One loaded ``InferenceSession``; :meth:`run` runs it on any feeds.

    Args:
        session: The session.
        model_path: The model, as error messages name it.
        keep: What the session reads without owning it (its weights' values), kept alive.
    """

    def __init__(self, session: ort.InferenceSession, model_path: str, keep: object = None) -> None:
        self._session = session
        self._model_path = model_path
        self._keep = keep
        self._inputs = {i.name for i in session.get_inputs()}

    def run(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """Run the model once; see :class:`~fxalign.backends.Session`."""
        if set(feeds) != self._inputs:
            raise InputError(
                f"inputs {sorted(feeds)} do not match the ONNX graph inputs {sorted(self._inputs)}",
                hint="pass the same inputs the model was exported with",
            )
        try:
            values = self._session.run(list(output_names), dict(feeds))
        except Exception as e:
            raise RuntimeBackendError(
                f"ONNX Runtime failed to run {self._model_path}: {first_line(e)}",
                hint="the message names the failing node; look up its module path in the report",
            ) from e
        return dict(zip(output_names, (np.asarray(v) for v in values), strict=True))


class OrtRunner:
    """ONNX Runtime: one ``InferenceSession`` per loaded model, reused for every run.

    Args:
        providers: Execution providers in order of preference (default: CPU).
        graph_optimization_level: An ``onnxruntime.GraphOptimizationLevel`` or its name
            (``"ORT_DISABLE_ALL"``, ``"ORT_ENABLE_BASIC"``, ``"ORT_ENABLE_EXTENDED"``,
            ``"ORT_ENABLE_ALL"``); ``None`` keeps ONNX Runtime's default.

    Raises:
        RuntimeBackendError: A provider is not available (the message lists those that are),
            or the level is unknown.

    Example:
        >>> runner = OrtRunner(graph_optimization_level="ORT_DISABLE_ALL")
        >>> runner.name, runner.providers
        ('onnxruntime', ['CPUExecutionProvider'])
    """

    def __init__(
        self,
        providers: Sequence[str] | None = None,
        graph_optimization_level: Any = None,
    ) -> None:
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
                    hint=f"use {', '.join(OPTIMIZATION_LEVELS[:-1])} or {OPTIMIZATION_LEVELS[-1]}",
                ) from e
        self.graph_optimization_level = graph_optimization_level
        self.name = "onnxruntime"

    def session_options(self) -> ort.SessionOptions:
        """Fresh options: this runner's optimization level, the threading and fetching ones.

        See :func:`threading_options` and :func:`fetching_options`.
        """
        options = fetching_options(threading_options(ort.SessionOptions()))
        if self.graph_optimization_level is not None:
            options.graph_optimization_level = self.graph_optimization_level
        return options

    def load(self, model_path: str, *, max_outputs_per_run: int | None = None) -> Session:
        """Build the session once; see :class:`~fxalign.backends.Runner`.

        ONNX Runtime keeps every graph output of a run alive whichever are fetched, so with
        ``max_outputs_per_run`` the model is optimized once and each run computes its outputs
        from the optimized graph cut down to them (:class:`~fxalign.backends.ChunkRunner`).
        """
        if max_outputs_per_run is not None:
            return ChunkRunner(self, model_path)
        return OrtSession(
            session_from_onnx(model_path, self.session_options(), self.providers), model_path
        )

    def load_weightless(self, model: WeightlessModel) -> OrtSession:
        """Build the session once from a model in memory (:func:`~fxalign.backends.weightless`).

        Nothing is written, and no weight is serialized or parsed again: only the graph is,
        and the weights are read from their arrays, which the session keeps alive.
        """
        session, values = session_from_memory(model, self.session_options(), self.providers)
        return OrtSession(session, model.name, keep=(values, model.weights))

    def save_optimized(self, model_path: str, optimized_path: str) -> None:
        """Save the graph ONNX Runtime runs for ``model_path`` after this runner's optimizations.

        Weights of 1 KiB and more go to ``<optimized_path>.data`` beside it.

        Raises:
            RuntimeBackendError: ONNX Runtime cannot load the model.
        """
        options = self.session_options()
        options.optimized_model_filepath = optimized_path
        options.log_severity_level = 3  # not the "hardware specific optimizations" warning
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name",
            Path(optimized_path).name + ".data",
        )
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
        session_from_onnx(model_path, options, self.providers)

    def load_optimized(self, model_path: str, *, shown_as: str | None = None) -> OrtSession:
        """Load a graph :meth:`save_optimized` wrote, with graph optimizations off.

        Args:
            model_path: The optimized graph (or a cut of it).
            shown_as: The model as run errors name it (default: ``model_path``).
        """
        options = fetching_options(threading_options(ort.SessionOptions()))
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return OrtSession(
            session_from_onnx(model_path, options, self.providers), shown_as or model_path
        )


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
