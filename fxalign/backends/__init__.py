"""ONNX backends: a runner loads a model once into a session, which runs it many times.

=================  ===============================================================
``base``           the :class:`Runner` / :class:`Session` protocol every backend follows
``ort``            ONNX Runtime: the session loader and :class:`OrtRunner`
``chunks``         :class:`ChunkRunner` (a memory bound) and lazy output mappings
``feeds``          PyTorch inputs as graph feeds (:func:`onnx_feeds`)
``memory``         a model in memory: its graph apart from its weights (:func:`weightless`)
``run``            :func:`run_onnx`: load, run, return outputs by name
=================  ===============================================================

A custom backend is any object with a ``name`` and a ``load`` method (see :class:`Runner`);
pass it as ``runner=`` to :func:`fxalign.align` or :func:`run_onnx`. A runner that also has
``load_weightless(model)`` (as :class:`OrtRunner` has) is given models fxalign holds in memory
that way (:class:`WeightlessModel`), without a file written for it.
"""

from fxalign.backends.base import (
    Runner,
    Session,
    can_load_weightless,
    check_runner,
    load_model,
    load_weightless,
)
from fxalign.backends.chunks import ChunkedOutputs, ChunkRunner, Renamed
from fxalign.backends.feeds import onnx_feeds
from fxalign.backends.memory import WeightlessModel, weightless
from fxalign.backends.ort import OrtRunner, OrtSession, builtin_runners
from fxalign.backends.run import run_onnx

__all__ = [
    "ChunkRunner",
    "ChunkedOutputs",
    "OrtRunner",
    "OrtSession",
    "Renamed",
    "Runner",
    "Session",
    "WeightlessModel",
    "builtin_runners",
    "can_load_weightless",
    "check_runner",
    "load_model",
    "load_weightless",
    "onnx_feeds",
    "run_onnx",
    "weightless",
]
