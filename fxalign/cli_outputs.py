"""What the CLI writes, and the check that every file can be written before any work starts.

With several reports in one run (``--exporter both``, the demo's two models) each output file
gets a suffix before its extension: ``--json r.json`` writes ``r-dynamo.json`` and
``r-torchscript.json``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fxalign.errors import UserError

__all__ = ["WORKDIR_FILES", "Output", "check_outputs", "outputs", "suffixed", "write_outputs"]

WORKDIR_FILES = ("export.onnx", "debug.onnx", "plain.onnx", "attach.onnx")
"""The model files ``align(workdir=...)`` writes and refuses to replace without ``overwrite``."""

_KINDS = ("json", "html", "node_data")
_FLAGS = {"json": "--json", "html": "--html", "node_data": "--node-data"}


@dataclass(frozen=True)
class Output:
    """One file to write: ``kind`` is ``"json"``, ``"html"`` or ``"node_data"``."""

    kind: str
    path: Path


def suffixed(path: Path, suffix: str) -> Path:
    """``r.json`` with suffix ``dynamo``: ``r-dynamo.json`` (the path itself without suffix)."""
    return path.with_name(f"{path.stem}-{suffix}{path.suffix}") if suffix else path


def outputs(args: argparse.Namespace, suffix: str = "") -> list[Output]:
    """The files ``--json``, ``--html`` and ``--node-data`` ask for, with ``suffix`` applied."""
    found = []
    for kind in _KINDS:
        target = getattr(args, kind, None)
        if target:
            found.append(Output(kind, suffixed(Path(target), suffix)))
    return found


def check_outputs(
    args: argparse.Namespace, suffixes: Sequence[str] = ("",), workdirs: Sequence[Path] = ()
) -> None:
    """Fail now, before any work, if an output file could not be written at the end.

    Args:
        args: The parsed command line (``--json``/``--html``/``--node-data``, ``--overwrite``).
        suffixes: One per report the command will write (``""`` for a single one).
        workdirs: Folders ``align`` will write its model files into.

    Raises:
        UserError: A file exists (without ``--overwrite``), two outputs share a path, or a
            file's folder does not exist.
    """
    planned = [(o, suffix) for suffix in suffixes for o in outputs(args, suffix)]
    seen: dict[Path, str] = {}
    for output, _ in planned:
        flag = _FLAGS[output.kind]
        key = output.path.resolve()
        if key in seen:
            raise UserError(
                f"{seen[key]} and {flag} both write {output.path}", hint="give each its own path"
            )
        seen[key] = flag
        if output.path.is_dir():
            raise UserError(f"{flag} {output.path} is a folder", hint="pass a file name")
        if not output.path.parent.is_dir():
            raise UserError(
                f"cannot write {output.path}: folder {str(output.path.parent)!r} does not exist",
                hint="create it first or pass another path",
            )
    existing = [str(o.path) for o, _ in planned if o.path.exists()]
    existing += [str(d / f) for d in workdirs for f in WORKDIR_FILES if (d / f).exists()]
    if existing and not args.overwrite:
        one = len(existing) == 1
        raise UserError(
            f"{', '.join(existing)} already {'exists' if one else 'exist'}",
            hint=f"pass --overwrite to replace {'it' if one else 'them'}, or other paths",
        )


def write_outputs(report: Any, args: argparse.Namespace, suffix: str = "") -> None:
    """Print the report, then write the files the command line asks for."""
    from fxalign.report.html import write_html
    from fxalign.report.model_explorer import write_node_data
    from fxalign.report.text import print_report

    writers: dict[str, Callable[[Path], object]] = {
        "json": report.to_json,
        "html": lambda path: write_html(report, path),
        "node_data": lambda path: write_node_data(report, path),
    }
    print_report(report, top=args.top, tree=getattr(args, "tree", False))
    for output in outputs(args, suffix):
        try:
            writers[output.kind](output.path)
        except OSError as e:
            raise UserError(f"cannot write {output.path}: {e.strerror or e}") from e
        print(f"wrote {output.path}")
