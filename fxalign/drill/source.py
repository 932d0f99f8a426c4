"""Where an op was called: the user's ``file:line`` and that line, from the node's metadata.

``torch.export`` records, on every node, the Python frames that led to the op, in
``traceback`` format (``File "model.py", line 42, in forward`` then the line's text), keeping
the frames of ``forward`` methods. The innermost frame outside PyTorch itself is the user's
line: the call in the module's ``forward`` (a helper function it calls is shown at that call).
The line is read again with :mod:`linecache` (the recorded text may be cut), falling back to
the recorded text.

Example:
    >>> trace = ['File "net.py", line 7, in forward', '    y = x // 2']
    >>> frames(chr(10).join(trace))
    [Frame(file='net.py', line=7, function='forward', text='y = x // 2')]
"""

from __future__ import annotations

import linecache
import os
import re
from dataclasses import dataclass

import torch

__all__ = ["Frame", "frames", "user_frame"]

_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<function>\S+)\s*$')
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


@dataclass(frozen=True)
class Frame:
    """One frame of a recorded stack trace.

    Attributes:
        file: Source file.
        line: Line number (1-based).
        function: Function name.
        text: The recorded line, stripped (``""`` when none was recorded).
    """

    file: str
    line: int
    function: str
    text: str = ""


def frames(stack_trace: str | None) -> list[Frame]:
    """The frames of a ``traceback``-format stack trace, outermost first."""
    found: list[Frame] = []
    pending: dict[str, str] | None = None
    for raw in (stack_trace or "").splitlines():
        match = _FRAME.match(raw)
        if match:
            if pending is not None:
                found.append(_frame(pending, ""))
            pending = match.groupdict()
        elif pending is not None and raw.strip():
            found.append(_frame(pending, raw.strip()))
            pending = None
    if pending is not None:
        found.append(_frame(pending, ""))
    return found


def _frame(fields: dict[str, str], text: str) -> Frame:
    return Frame(fields["file"], int(fields["line"]), fields["function"], text)


def user_frame(stack_trace: str | None) -> Frame | None:
    """The innermost frame outside PyTorch's own files, its line read from the file.

    Example:
        >>> user_frame(None) is None
        True
    """
    chosen = None
    for frame in frames(stack_trace):
        if not os.path.abspath(frame.file).startswith(_TORCH_DIR):
            chosen = frame
    if chosen is None:
        return None
    text = linecache.getline(chosen.file, chosen.line).strip() or chosen.text
    return Frame(chosen.file, chosen.line, chosen.function, text)
