"""``run_onnx``: load an ONNX model through a runner and return the outputs asked for."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from fxalign.backends.base import Runner, check_runner, load_model
from fxalign.backends.chunks import ChunkedOutputs
from fxalign.backends.ort import OrtRunner
from fxalign.errors import InputError
from fxalign.modelio import save_model

__all__ = ["run_onnx"]


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

    The model is loaded once (``runner.load``), then run once, or once per chunk of outputs.

    Args:
        model: A ``ModelProto`` or a path. A proto is saved to ``workdir`` first (with external
            data when it is over 2 GB).
        inputs: Graph input name -> value (see :func:`~fxalign.backends.onnx_feeds`).
        providers: ONNX Runtime execution providers; ignored when ``runner`` is given.
        output_names: Outputs to return (default: all graph outputs).
        runner: The backend (default: :class:`~fxalign.backends.OrtRunner`); any object with
            what :class:`~fxalign.backends.Runner` has.
        workdir: Where to save a proto; a temporary directory by default.
        max_outputs_per_run: Bound memory: compute at most this many outputs per run. The
            result is then a :class:`~fxalign.backends.ChunkedOutputs` that runs the loaded
            model for a chunk of outputs when one of them is first read (read them in
            ``output_names`` order to run each chunk once); with ONNX Runtime the values are
            identical to a single run's.

    Returns:
        ``output name -> numpy array`` (a dict, or :class:`~fxalign.backends.ChunkedOutputs`).

    Raises:
        InputError: ``max_outputs_per_run`` is below 1, or ``inputs`` are not the graph's.
        UserError: ``runner`` is not a runner.
        RuntimeBackendError: The backend cannot load or run the model.
    """
    if max_outputs_per_run is not None and max_outputs_per_run < 1:
        raise InputError(
            f"max_outputs_per_run must be at least 1, got {max_outputs_per_run}",
            hint="pass None to compute every output in one run",
        )
    backend = OrtRunner(providers) if runner is None else check_runner(runner)
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
            return load_model(backend, path).run(inputs, names)
        session = load_model(backend, path, max_outputs_per_run=k)  # reads the file now
    chunks = [names[i : i + k] for i in range(0, len(names), k)]
    return ChunkedOutputs(lambda chunk: session.run(inputs, chunk), chunks)
