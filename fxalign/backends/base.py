"""The runner protocol: a backend loads a model once, then runs it many times.

A :class:`Runner` is the loader: ``runner.load(model_path)`` reads the model and returns a
:class:`Session`; ``session.run(feeds, output_names)`` runs it, once per input sample and
once per chunk of outputs, without loading the model again. fxalign talks to every backend,
built-in or custom, through these two calls only::

    session = runner.load("debug.onnx")
    for feeds in samples:
        values = session.run(feeds, ["y", "z"])  # {"y": ..., "z": ...}
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from fxalign.errors import UserError

if TYPE_CHECKING:
    from fxalign.backends.memory import WeightlessModel

__all__ = [
    "Runner",
    "Session",
    "can_load_weightless",
    "check_runner",
    "first_line",
    "load_model",
    "load_weightless",
]

_SHAPE = (
    "a runner has a `name` (str) and `load(model_path, *, max_outputs_per_run=None)`, which "
    "returns a session with `run(feeds, output_names) -> dict`; see fxalign.backends.Runner"
)


@runtime_checkable
class Session(Protocol):
    """A model loaded by a :class:`Runner`, ready to run on any number of inputs."""

    def run(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """Run the model once.

        Args:
            feeds: Graph input name -> value.
            output_names: Graph outputs to return, in this order.

        Returns:
            ``output name -> numpy array`` for exactly ``output_names``, in that order.

        Raises:
            InputError: ``feeds`` are not the graph's inputs.
            RuntimeBackendError: The backend failed to run the model.
        """
        ...


@runtime_checkable
class Runner(Protocol):
    """An ONNX backend: loads a model file into a :class:`Session`.

    Attributes:
        name: The backend's name, for messages.
    """

    name: str

    def load(self, model_path: str, *, max_outputs_per_run: int | None = None) -> Session:
        """Load the model once, for any number of runs.

        Args:
            model_path: Path of the ONNX model (external data beside it). The file may be
                removed once ``load`` returns.
            max_outputs_per_run: When set, the session will be asked for about this many
                outputs per run (more when one batch of values needs them), to bound memory;
                a backend with nothing better to do than fetching fewer outputs can ignore it.

        Returns:
            The loaded model.

        Raises:
            RuntimeBackendError: The backend cannot load the model.
        """
        ...


def check_runner(runner: Any) -> Runner:
    """``runner`` itself, once it is known to have what a :class:`Runner` has.

    Raises:
        UserError: ``runner`` is not a runner; the message says what one must have.
    """
    name = getattr(runner, "name", None)
    load = getattr(runner, "load", None)
    problem = None
    if not callable(load):
        problem = "has no load() method"
        if callable(getattr(runner, "run", None)):
            problem += " (runners no longer have run(model_path, feeds, output_names))"
    elif not isinstance(name, str):
        problem = "has no `name` string"
    elif not _takes_max_outputs_per_run(load):
        problem = "has a load() that takes no `max_outputs_per_run` keyword"
    if problem is not None:
        raise UserError(f"runner={_short_repr(runner)} is not a runner: it {problem}", hint=_SHAPE)
    return runner


def load_model(
    runner: Runner, model_path: str, *, max_outputs_per_run: int | None = None
) -> Session:
    """``runner.load(...)``, checking that what it returns can run.

    Raises:
        UserError: The runner's ``load`` returned something without ``run``.
        RuntimeBackendError: The backend cannot load the model.
    """
    if max_outputs_per_run is None:
        session = runner.load(model_path)
    else:
        session = runner.load(model_path, max_outputs_per_run=max_outputs_per_run)
    return _runnable(runner, model_path, session)


def can_load_weightless(runner: Runner) -> bool:
    """Whether ``runner`` also loads models held in memory (a ``load_weightless`` method).

    The optional half of the protocol: ``runner.load_weightless(model)`` takes a
    :class:`~fxalign.backends.WeightlessModel` (the graph, its inline weights as arrays, the
    folder of its external data) and returns a :class:`Session`, as ``load`` does for a file.
    """
    return callable(getattr(runner, "load_weightless", None))


def load_weightless(runner: Runner, model: WeightlessModel) -> Session:
    """``runner.load_weightless(model)``, checking that what it returns can run.

    Raises:
        UserError: The runner returned something without ``run``.
        RuntimeBackendError: The backend cannot load the model.
    """
    return _runnable(runner, model.name, runner.load_weightless(model))  # type: ignore[attr-defined]


def _runnable(runner: Runner, model: str, session: Any) -> Session:
    """``session`` if it has ``run``, else the :class:`UserError` saying what a runner returns."""
    if not callable(getattr(session, "run", None)):
        raise UserError(
            f"runner {runner.name!r} loaded {model} as {_short_repr(session)}, which has no "
            "run(feeds, output_names)",
            hint=_SHAPE,
        )
    return session


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (at most 2,000 characters of one-line ones)."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0] if len(text) < 2000 else text[:2000]


def _takes_max_outputs_per_run(load: Any) -> bool:
    try:
        params = inspect.signature(load).parameters.values()
    except (TypeError, ValueError):  # no signature to read: let the call decide
        return True
    return any(
        p.kind == p.VAR_KEYWORD
        or (p.name == "max_outputs_per_run" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        for p in params
    )


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
