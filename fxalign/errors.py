"""The two exception families of fxalign.

:class:`UserError` and its subclasses mean the input was at fault: a model that cannot be
traced or exported, inputs that do not fit the model, a runtime that cannot run the graph.
The CLI prints them as a short message with exit code 2. :class:`InternalError` means fxalign
itself is wrong; it is never expected and should be reported as a bug.

Every message says what failed, names the module path or ONNX node involved where there is one,
and ends with a hint.
"""

from __future__ import annotations

__all__ = [
    "ExportError",
    "FxalignError",
    "InputError",
    "InstrumentationError",
    "InternalError",
    "RuntimeBackendError",
    "UserError",
]


class FxalignError(Exception):
    """Base class of every exception fxalign raises on purpose."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\nHint: {hint}")


class UserError(FxalignError):
    """The model, its inputs or the options given to fxalign cannot be handled as they are."""


class InstrumentationError(UserError):
    """The model could not be instrumented (traced or wrapped) at all."""


class ExportError(UserError):
    """``torch.onnx.export`` failed on the instrumented model.

    Attributes:
        exporter_output: What the exporter printed before it failed (graph dumps and the like),
            kept off the terminal; the CLI shows it with ``--verbose``.
    """

    exporter_output: str = ""


class InputError(UserError):
    """The inputs do not match what the model or the ONNX graph takes."""


class RuntimeBackendError(UserError):
    """The ONNX runtime could not load or run the debug model."""


class InternalError(FxalignError):
    """A bug in fxalign: an invariant that should always hold did not."""
