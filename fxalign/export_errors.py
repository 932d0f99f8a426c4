"""Why an export failed, in a few lines: the op, the module and source line, and a fix that fits.

The exporters report a failure from deep inside their own passes, wrapped in generic errors,
after printing graph dumps of their own. :func:`captured_output` keeps those dumps off the
terminal (they go to the ``fxalign.export`` debug log and ``ExportError.exporter_output``);
:func:`export_error` turns the exception into an :class:`~fxalign.errors.ExportError` that names
the failing op, the module whose ``forward`` called it (its path, class and source line), and
the fix for that kind of failure::

    the torchscript exporter failed on aten::diff in module 'down' (Down, models.py:27):
    UnsupportedOperatorError: Exporting the operator 'aten::diff' to ONNX opset version 20 ...
      hint: register a TorchScript symbolic for it: torch.onnx.register_custom_op_symbolic(...)

Where the op sits comes from what the exporter was working on when it failed, read from the
frames of the traceback: the dynamo exporter's ``torch.fx.Node`` (its ``nn_module_stack`` and
``stack_trace`` metadata) and the TorchScript exporter's traced graph (each node's scope and
source range). Frames of the model's own modules name the module otherwise (an error while
``torch.export`` traces the Python code).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from fxalign.errors import ExportError

__all__ = ["Culprit", "captured_output", "export_error", "module_in_traceback", "quiet_exporter"]

logger = logging.getLogger("fxalign.export")


@dataclass(frozen=True)
class Culprit:
    """Where an export failed, as far as it can be told.

    Attributes:
        op: The operator the exporter could not convert (``aten::diff``,
            ``mylib.softclip.default``), if one was named.
        module: Path of the module whose ``forward`` called it (``""``: the model itself).
        module_type: That module's class name.
        source: ``file:line`` of the call in the model's code.
    """

    op: str | None = None
    module: str | None = None
    module_type: str | None = None
    source: str | None = None

    def describe(self) -> str:
        """`` on aten::diff in module 'down' (Down, models.py:27)``, or less when less is known."""
        text = f" on {self.op}" if self.op else ""
        details = ", ".join(d for d in (self.module_type, self.source) if d)
        if self.module == "":
            text += " in the model's own forward"
        elif self.module is not None:
            text += f" in module {self.module!r}"
        if details and self.module is not None:
            text += f" ({details})"
        elif self.source:
            text += f" at {self.source}"
        return text


def export_error(
    error: BaseException, exporter: str, model: torch.nn.Module, exporter_output: str = ""
) -> ExportError:
    """The :class:`ExportError` to raise (``from error``) for a failed ``torch.onnx.export``.

    Args:
        error: What the exporter raised.
        exporter: ``"dynamo"`` or ``"torchscript"``.
        model: The module given to the exporter (fxalign's TorchScript wrapper is seen through).
        exporter_output: What the exporter printed meanwhile (kept on the error).
    """
    culprit = find_culprit(error, exporter, model)
    summary = _summary(error)
    failure = ExportError(
        f"the {exporter} exporter failed{culprit.describe()}: {summary}",
        hint=_hint(summary, exporter, culprit),
    )
    failure.exporter_output = exporter_output
    return failure


def find_culprit(error: BaseException, exporter: str, model: torch.nn.Module) -> Culprit:
    """The op, module and source line of a failed export (see :class:`Culprit`)."""
    model = _inner(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    found = _dynamo_node(error) if exporter == "dynamo" else _torchscript_node(error, model)
    if found is None or found.module not in modules:
        path, source = _module_frame(error, model)
        op, op_source = (found.op, found.source) if found else (None, None)
        found = Culprit(op, path, None, source or op_source)
    if found.module is None:
        return found
    module_type = type(modules[found.module]).__name__ if found.module else None
    return Culprit(found.op, found.module, module_type, found.source)


def module_in_traceback(error: BaseException, model: torch.nn.Module) -> str | None:
    """Path of the innermost module of ``model`` whose ``forward`` is in the error's traceback.

    Follows chained causes. Returns ``None`` when no module frame is found (errors raised after
    tracing, inside the exporter's own passes).
    """
    return _module_frame(error, _inner(model))[0]


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """The instrumented model inside fxalign's TorchScript call wrapper (``_BakeNonTensors``)."""
    inner = getattr(model, "module", None)
    if type(model).__name__ == "_BakeNonTensors" and isinstance(inner, torch.nn.Module):
        return inner
    return model


def _module_frame(error: BaseException, model: torch.nn.Module) -> tuple[str | None, str | None]:
    """``(path, file:line)`` of the innermost frame in a ``forward`` of a module of ``model``."""
    paths = {id(m): p for p, m in model.named_modules(remove_duplicate=False)}
    found: tuple[str | None, str | None] = (None, None)
    for tb in _frames(error):
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module) and id(owner) in paths:
            code = tb.tb_frame.f_code.co_filename
            source = _source(code, tb.tb_lineno) if Path(code).is_file() else None
            found = (paths[id(owner)], source or found[1])
    return found


def _dynamo_node(error: BaseException) -> Culprit | None:
    """The FX node the dynamo exporter was translating (the innermost ``node`` local)."""
    node = None
    for tb in _frames(error):
        candidate = tb.tb_frame.f_locals.get("node")
        if isinstance(candidate, torch.fx.Node) and candidate.op == "call_function":
            node = candidate
    if node is None:
        return None
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    path = str(stack[-1][0]) if stack else ""
    trace = re.findall(r'File "([^"]+)", line (\d+)', str(node.meta.get("stack_trace") or ""))
    source = _source(trace[-1][0], int(trace[-1][1])) if trace else None
    return Culprit(str(node.target), path, None, source)


_TS_OP = re.compile(r"(?:operator '|namespace )([\w.]+::\w+)")


def _torchscript_node(error: BaseException, model: torch.nn.Module) -> Culprit | None:
    """The node of the traced TorchScript graph whose op has no symbolic."""
    match = _TS_OP.search(str(_chain(error)[-1]))
    if match is None:
        return None
    op = match.group(1)
    for tb in _frames(error):
        for value in tb.tb_frame.f_locals.values():
            if isinstance(value, torch._C.Graph):
                node = _find_node(value.nodes(), op)
                if node is not None:
                    return Culprit(op, _scope_path(node.scopeName()), None, _ts_source(node))
    return Culprit(op)


def _find_node(nodes: Any, kind: str) -> Any:
    for node in nodes:
        if node.kind() == kind:
            return node
        for block in node.blocks():
            found = _find_node(block.nodes(), kind)
            if found is not None:
                return found
    return None


def _scope_path(scope: str) -> str:
    """``_BakeNonTensors::/GraphModuleImpl::module/models.Down::down`` -> ``down``."""
    attrs = [segment.rpartition("::")[2] for segment in scope.split("/")]
    # the root (no attribute) is fxalign's call wrapper; its ``module`` is the instrumented model
    return ".".join(attrs[2:]) if len(attrs) > 1 and attrs[1] == "module" else ".".join(attrs[1:])


_LIBRARIES = tuple(str(Path(f).parent) + os.sep for f in (torch.__file__, __file__) if f)


def _ts_source(node: Any) -> str | None:
    """The first frame of the node's source range in the user's code (not torch, not fxalign)."""
    for line in str(node.sourceRange()).splitlines():
        generated = re.search(r" from (.+):(\d+) in \w+\(\d+\)", line)  # FX-generated code
        frame = generated or re.match(r"(.+)\((\d+)\): \S+$", line)
        if frame and not frame.group(1).startswith(_LIBRARIES):
            return _source(frame.group(1), int(frame.group(2)))
    return None


def _source(filename: str, line: int) -> str:
    """``file:line``, the file relative to the current folder when it lies below it."""
    path = Path(filename)
    with contextlib.suppress(ValueError):
        path = path.resolve().relative_to(Path.cwd())
    return f"{path}:{line}"


def _frames(error: BaseException) -> Iterator[TracebackType]:
    """Every traceback entry of the error and its causes, outermost error first."""
    for current in _chain(error):
        tb = current.__traceback__
        while tb is not None:
            yield tb
            tb = tb.tb_next


def _chain(error: BaseException) -> list[BaseException]:
    """The error and its causes, outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not c for c in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _summary(e: BaseException) -> str:
    """First line of the innermost cause (the exporters wrap the real error in generic ones)."""
    root = _chain(e)[-1]
    text = _ANSI.sub("", str(root)).strip() or type(root).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else text
    return f"{type(root).__name__}: {line[:300]}"


_DATA_DEPENDENT = ("GuardOnDataDependentSymNode", "data-dependent", "data dependent")


def _hint(summary: str, exporter: str, culprit: Culprit) -> str:
    """The fix that fits the failure."""
    where = f" in module {culprit.module!r}" if culprit.module else ""
    if exporter == "dynamo" and "No ONNX function found for" in summary:
        op = _dispatch_op(summary) or culprit.op or "the op"
        target = f"torch.ops.{op}" if op != "the op" else "the op"
        return (
            f"give the dynamo exporter an ONNX translation of {op}: "
            f"export_kwargs={{'custom_translation_table': {{{target}: onnx_function}}}} "
            "(an onnxscript function; fxalign merges it with its own table), or try "
            "exporter='torchscript' (--exporter torchscript)"
        )
    if exporter == "dynamo" and any(k in summary for k in _DATA_DEPENDENT):
        return (
            f"torch.export cannot trace data-dependent Python{where} (a branch or .item() on "
            "tensor values): try exporter='torchscript' (--exporter torchscript), which bakes in "
            "the branch these inputs take (check others with samples= / --sample), or rewrite "
            "the branch with torch.cond"
        )
    if exporter == "torchscript" and "UnsupportedOperatorError" in summary:
        op = culprit.op or "the op"
        return (
            f"register a TorchScript symbolic for {op}: torch.onnx.register_custom_op_symbolic("
            f"{op!r}, symbolic_fn, opset_version), or try exporter='dynamo' (--exporter dynamo)"
        )
    other = "torchscript" if exporter == "dynamo" else "dynamo"
    return (
        f"try exporter={other!r} (--exporter {other}); the exporter's full message is chained "
        "(--verbose on the CLI)"
    )


def _dispatch_op(summary: str) -> str | None:
    """``mylib.softclip.default`` from ``<OpOverload(op='mylib.softclip', overload='default')>``."""
    match = re.search(r"op='([\w.]+)', overload='(\w+)'", summary)
    return f"{match.group(1)}.{match.group(2)}" if match else None


class _DropTorchvisionNotices(logging.Filter):
    """The dynamo exporter logs a warning per torchvision op it skips when torchvision is absent."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torchvision is not installed" not in record.getMessage()


_REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Drop the exporter's "torchvision is not installed" warnings while the block runs."""
    target = logging.getLogger(_REGISTRATION_LOGGER)
    notice_filter = _DropTorchvisionNotices()
    target.addFilter(notice_filter)
    try:
        yield
    finally:
        target.removeFilter(notice_filter)


@contextlib.contextmanager
def captured_output() -> Iterator[list[str]]:
    """Capture everything printed to stdout and stderr, Python's and C++'s, while the block runs.

    Yields a list that holds the captured text once the block is left (also when it raised).
    The file descriptors 1 and 2 are redirected, so the TorchScript exporter's C++ graph dumps are
    caught too; where they cannot be (no such descriptors), only Python's streams are.
    """
    result: list[str] = []
    _flush()
    with tempfile.TemporaryFile() as tmp:
        saved = _redirect_descriptors(tmp.fileno())
        python_side = io.StringIO()
        try:
            with contextlib.redirect_stdout(python_side), contextlib.redirect_stderr(python_side):
                yield result
        finally:
            _flush()
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)
            tmp.seek(0)
            result.append(tmp.read().decode(errors="replace") + python_side.getvalue())


def _redirect_descriptors(target: int) -> list[tuple[int, int]]:
    saved = []
    for fd in (1, 2):
        try:
            copy = os.dup(fd)
        except OSError:
            continue
        os.dup2(target, fd)
        saved.append((fd, copy))
    return saved


def _flush() -> None:
    """Flush Python's and C's buffered output, so that it lands on the right side of a redirect."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).fflush(None)
