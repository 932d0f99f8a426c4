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
import inspect
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
from torch.nn.parameter import UninitializedParameter

from fxalign.errors import ExportError

__all__ = [
    "Culprit",
    "captured_output",
    "export_error",
    "find_culprit",
    "has_inference_weights",
    "module_in_traceback",
    "quiet_exporter",
]

logger = logging.getLogger("fxalign.export")


@dataclass(frozen=True)
class Culprit:
    """Where an export failed, as far as it can be told.

    Attributes:
        op: The operator the exporter could not convert (``aten::diff``,
            ``mylib.softclip.default``), if one was named.
        module: Path of the module whose ``forward`` called it (``""``: the model itself).
        module_type: That module's class name (alone when several modules of the class share
            the failing line and ``module`` cannot say which).
        source: ``file:line`` of the call in the model's code.
    """

    op: str | None = None
    module: str | None = None
    module_type: str | None = None
    source: str | None = None

    def describe(self) -> str:
        """`` on aten::diff in module 'down' (Down, models.py:27)``, or less when less is known."""
        text = f" on {self.op}" if self.op else ""
        if self.module == "":
            text += " in the model's own forward"
        elif self.module is not None:
            text += f" in module {self.module!r}"
        elif self.module_type:
            text += f" in {self.module_type}.forward"
        details = [d for d in (self.module_type if self.module else None, self.source) if d]
        if details:
            text += f" ({', '.join(details)})"
        return text


@dataclass(frozen=True)
class _Site:
    """What the traceback says: the op, the module path, the file and line of the call."""

    op: str | None = None
    module: str | None = None
    module_type: str | None = None
    file: str | None = None
    line: int | None = None


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
    if exporter == "dynamo" and _markers_inside_higher_order_op(error):
        failure = ExportError(
            f"fxalign cannot trace its markers inside torch.cond (or another higher-order op)"
            f"{culprit.describe()} with the dynamo exporter: this is a limit of fxalign, not of "
            f"your model ({summary})",
            hint="use exporter='torchscript' (--exporter torchscript), which bakes in the branch "
            "these inputs take (check others with samples= / --sample)",
        )
        failure.exporter_output = exporter_output
        return failure
    if exporter == "dynamo" and "inference tensor" in summary and has_inference_weights(model):
        failure = ExportError(
            "torch.export cannot trace a module whose weights are inference tensors (made "
            "under torch.inference_mode): torch.export.export(model) fails the same way, and "
            "torch.onnx.export's fallbacks, which export your model plainly, cannot carry "
            f"fxalign's markers ({summary})",
            hint="create or load the model outside torch.inference_mode (torch.no_grad() is "
            "enough for inference), or use attach=True (--attach), or exporter='torchscript'",
        )
        failure.exporter_output = exporter_output
        return failure
    failure = ExportError(
        f"the {exporter} exporter failed{culprit.describe()}: {summary}",
        hint=_hint(summary, exporter, culprit),
    )
    failure.exporter_output = exporter_output
    return failure


def has_inference_weights(model: torch.nn.Module) -> bool:
    """Whether some parameter or buffer of ``model`` is an inference tensor."""
    tensors = [*model.parameters(), *model.buffers()]
    return any(t.is_inference() for t in tensors if not isinstance(t, UninitializedParameter))


def find_culprit(error: BaseException, exporter: str, model: torch.nn.Module) -> Culprit:
    """The op, module and source line of a failed export (see :class:`Culprit`)."""
    model = _inner(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    if exporter == "dynamo":
        site = _dynamo_node(error) or _Site()
    else:
        site = _torchscript_node(error, model) or _Site()
    frame = _module_frame(error, model)
    file, line = (site.file, site.line) if site.file else (frame.file, frame.line)
    source = _source(file, line) if file and line else None
    if site.module in modules:
        module, module_type = site.module, site.module_type
    else:
        module, module_type = frame.module, None
    if module and not module_type:
        module_type = type(modules[module]).__name__
    return Culprit(site.op, module, module_type if module else None, source)


def module_in_traceback(error: BaseException, model: torch.nn.Module) -> str | None:
    """Path of the innermost module of ``model`` whose ``forward`` is in the error's traceback.

    Follows chained causes. Returns ``None`` when no module frame is found (errors raised after
    tracing, inside the exporter's own passes).
    """
    return _module_frame(error, _inner(model)).module


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """The instrumented model inside fxalign's TorchScript call wrapper (``_BakeNonTensors``)."""
    inner = getattr(model, "module", None)
    if type(model).__name__ == "_BakeNonTensors" and isinstance(inner, torch.nn.Module):
        return inner
    return model


def _module_frame(error: BaseException, model: torch.nn.Module) -> _Site:
    """The innermost frame of the traceback in a ``forward`` of a module of ``model``."""
    paths = {id(m): p for p, m in model.named_modules(remove_duplicate=False)}
    found = _Site()
    for tb in _frames(error):
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module) and id(owner) in paths:
            code = tb.tb_frame.f_code.co_filename
            if Path(code).is_file():
                found = _Site(None, paths[id(owner)], None, code, tb.tb_lineno)
            else:
                found = _Site(None, paths[id(owner)], None, found.file, found.line)
    return found


def _dynamo_node(error: BaseException) -> _Site | None:
    """The FX node the dynamo exporter was translating (the innermost ``node`` local)."""
    node = None
    for tb in _frames(error):
        candidate = tb.tb_frame.f_locals.get("node")
        if isinstance(candidate, torch.fx.Node) and candidate.op == "call_function":
            node = candidate
    if node is None:
        return None
    path, module_type = _module_of(node)
    frames = re.findall(r'File "([^"]+)", line (\d+)', str(node.meta.get("stack_trace") or ""))
    file, line = _user_frame([(f, int(n)) for f, n in frames][::-1])
    if file is not None and file.startswith("<"):
        file, line = None, None  # generated code: its line says nothing to the user
    return _Site(str(node.target), path, module_type, file, line)


def _module_of(node: torch.fx.Node, prefix: str = "") -> tuple[str, str | None]:
    """Path and class name of the innermost module in the node's ``nn_module_stack``."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if not stack:
        return prefix, None
    path, cls = stack[-1]
    path = re.sub(r"@\d+$", "", str(path))  # a module called again: "shared@1"
    name = cls.__name__ if isinstance(cls, type) else str(cls).rpartition(".")[2].strip("'>")
    return ".".join(p for p in (prefix, path) if p), name


def _user_frame(frames: list[tuple[str, int]]) -> tuple[str | None, int | None]:
    """The innermost ``(file, line)`` outside torch and fxalign, innermost first in ``frames``.

    Code ``torch.fx`` generated (``<eval_with_key>.1 from models.py:34 in forward``) counts as
    the user's: it is the traced model's own ``forward``.
    """
    for file, line in frames:
        if file.startswith("<eval_with_key>") or not file.startswith(("<", *_LIBRARIES)):
            return file, line
    return None, None


_TS_OP = re.compile(r"(?:operator '|namespace )([\w.]+::\w+)")


def _torchscript_node(error: BaseException, model: torch.nn.Module) -> _Site | None:
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
                    return _ts_site(op, node, model)
    return _Site(op)


def _ts_site(op: str, node: Any, model: torch.nn.Module) -> _Site:
    """Where a TorchScript node comes from: its scope, or the FX node of traced code.

    A module that ``torch.fx`` inlined into a traced graph has no scope of its own; the line of
    the graph's generated code that made the node leads to the FX node, which records it.
    """
    frames = []
    for text in str(node.sourceRange()).splitlines():
        frame = re.match(r"(.+)\((\d+)\): \S+$", text)
        if frame:
            frames.append((frame.group(1), int(frame.group(2))))
    file, line = _user_frame(frames)
    path = _scope_path(node.scopeName())
    if file is not None and file.startswith("<eval_with_key>"):
        traced = _fx_node(model, file, line or 0)
        if traced is None:
            return _Site(op, path)
        fx_node, prefix = traced
        path, module_type = _module_of(fx_node, prefix)
        return _Site(op, path, module_type, *_line_naming(fx_node, op))
    return _Site(op, path, None, file, line)


def _fx_node(model: torch.nn.Module, file: str, line: int) -> tuple[torch.fx.Node, str] | None:
    """The FX node made by ``file:line`` of a traced module's code, and that module's path."""
    for prefix, module in model.named_modules():
        code = getattr(type(module).forward, "__code__", None)
        if not isinstance(module, torch.fx.GraphModule) or code is None:
            continue
        if code.co_filename == file:
            index = (getattr(module, "_lineno_map", None) or {}).get(line - code.co_firstlineno)
            if index is not None:
                return list(module.graph.nodes)[index], prefix
    return None


def _line_naming(node: torch.fx.Node, op: str) -> tuple[str | None, int | None]:
    """The one line of the node's module's ``forward`` that names the op (``diff(``), if one."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    forward = getattr(stack[-1][1], "forward", None) if stack else None
    try:
        lines, first = inspect.getsourcelines(forward)  # type: ignore[arg-type]
        file = inspect.getsourcefile(forward)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return None, None
    name = re.escape(op.rpartition("::")[2])
    hits = [first + i for i, text in enumerate(lines) if re.search(rf"\b{name}\s*\(", text)]
    return (file, hits[0]) if file and len(hits) == 1 else (None, None)


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


def _markers_inside_higher_order_op(error: BaseException) -> bool:
    """Whether TorchDynamo failed on fxalign's own marker code inside ``torch.cond``'s branches.

    The branches are traced by TorchDynamo, which cannot follow the markers' context variables;
    the plain model has no such code.
    """
    names = {type(e).__name__ for e in _chain(error)}
    text = " ".join(str(e) for e in _chain(error))
    return "UncapturedHigherOrderOpError" in names and "ContextVar" in text


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
