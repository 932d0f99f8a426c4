"""A standalone repro bundle of the culprit, and one run of it in a fresh process.

The bundle folder holds::

    module.pt2    the module as a torch.export program (torch.export.save)
    inputs.pt     the exact inputs of the call: {"args": (...), "kwargs": {...}}
    expected.pt   PyTorch's outputs on them, as fxalign computed them (a list of tensors)
    module.onnx   the module exported alone, no markers, with the run's exporter and options
    repro.py      PyTorch vs ONNX Runtime on those inputs (fxalign.drill.repro_script)

``repro.py`` needs only torch, onnx and onnxruntime. :func:`run_bundle` runs it once with the
interpreter fxalign runs in, in the bundle folder, without ``PYTHONPATH`` (so neither the
user's code nor a source checkout is importable unless installed), and reads its verdict.
A module that calls ``torch.library`` custom ops cannot be loaded from ``module.pt2`` by a
process that has not registered them: the bundle says so, and ``repro.py`` then compares
ONNX Runtime against ``expected.pt``.
"""

from __future__ import annotations

import json
import logging
import os
import pprint
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from fxalign.backends.feeds import input_leaf_names
from fxalign.drill import repro_script
from fxalign.drill.ops import module_export_options
from fxalign.errors import UserError
from fxalign.export import export_plain
from fxalign.options import AlignOptions
from fxalign.report.model import ROUNDOFF_FACTOR, Repro
from fxalign.samples import Sample
from fxalign.state import ModuleState

__all__ = ["BundleSettings", "custom_ops", "run_bundle", "write_bundle"]

logger = logging.getLogger(__name__)

_SETTINGS_START = "# --- settings (written by fxalign) ---"
_SETTINGS_END = "# --- end of settings ---"
_EXTERNAL_LIMIT = 1_500_000_000


@dataclass(frozen=True)
class BundleSettings:
    """What ``repro.py`` judges by.

    Attributes:
        module_path: The module the bundle reproduces.
        atol: Absolute tolerance (the culprit row's).
        rtol: Relative tolerance.
    """

    module_path: str
    atol: float
    rtol: float


def custom_ops(program: ExportedProgram) -> list[str]:
    """The ``torch.library`` ops (outside ``aten``/``prims``) a program calls, each once.

    Example:
        >>> p = torch.export.export(torch.nn.ReLU(), (torch.ones(1),))
        >>> custom_ops(p)
        []
    """
    found = []
    for node in program.graph.nodes:
        namespace = getattr(node.target, "namespace", None)
        if node.op == "call_function" and namespace not in (None, "aten", "prims"):
            found.append(str(node.target).rsplit(".", 1)[0].replace(".", "::", 1))
    return list(dict.fromkeys(found))


def write_bundle(
    folder: Path,
    module: torch.nn.Module,
    program: ExportedProgram,
    inputs: Sample,
    settings: BundleSettings,
    options: AlignOptions,
) -> list[str]:
    """Write the bundle into ``folder`` (created if missing); return notes about it.

    Raises:
        UserError: A file cannot be written, the program cannot be saved, the inputs are not
            plain tensors and containers (``torch.load(weights_only=True)`` must read them), or
            the plain export fails.
    """
    folder.mkdir(parents=True, exist_ok=True)
    state = ModuleState.snapshot(module.modules())
    try:
        torch.export.save(program, str(folder / "module.pt2"))
        _save_inputs(folder, inputs)
        with torch.no_grad():
            out = program.module()(*inputs.fresh().args, **inputs.fresh().kwargs)
        torch.save(
            [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)],
            str(folder / "expected.pt"),
        )
        state.restore()
        feeds = _plain_export(folder, module, inputs, options)
    except OSError as e:
        raise UserError(f"cannot write the repro bundle in {folder}: {e.strerror or e}") from e
    finally:
        state.restore()
    _write_script(folder, settings, options, feeds)
    ops = custom_ops(program)
    if not ops:
        return []
    return [
        f"module.pt2 calls custom op(s) {', '.join(ops)}: a fresh process must register them "
        "(import the code that defines them) before torch.export.load; without them repro.py "
        "compares ONNX Runtime against the PyTorch outputs fxalign recorded (expected.pt)"
    ]


def _save_inputs(folder: Path, inputs: Sample) -> None:
    path = folder / "inputs.pt"
    fresh = inputs.fresh()
    torch.save({"args": fresh.args, "kwargs": fresh.kwargs}, str(path))
    try:
        torch.load(str(path), weights_only=True)
    except Exception as e:
        raise UserError(
            "the culprit's inputs are not plain tensors, numbers and containers, which "
            f"torch.load(weights_only=True) can read: {str(e).splitlines()[0][:160]}"
        ) from e


def _plain_export(
    folder: Path, module: torch.nn.Module, inputs: Sample, options: AlignOptions
) -> list[tuple[str, int]]:
    """Export the module alone to ``module.onnx``; return ``(graph input, tensor leaf)`` pairs."""
    fresh = inputs.fresh()
    weights = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    big = sum(t.numel() * t.element_size() for t in weights.values()) > _EXTERNAL_LIMIT
    result = export_plain(
        module,
        fresh.args,
        folder / "module.onnx",
        fresh.kwargs,
        options.exporter,
        {**module_export_options(options.export_kwargs), "external_data": big},
    )
    graph = onnx.load(result.path, load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    names = [i.name for i in graph.input if i.name not in initializers]
    leaf_names = result.input_names or input_leaf_names(module.forward, fresh.args, fresh.kwargs)
    if all(n in leaf_names for n in names):
        return [(n, leaf_names.index(n)) for n in names]
    count = sum(isinstance(v, torch.Tensor) for v in pytree.tree_leaves((fresh.args, fresh.kwargs)))
    if len(names) == count:
        return [(n, i) for i, n in enumerate(names)]
    raise UserError(
        f"cannot pair the inputs of module.onnx {names} with the module's {count} tensor inputs"
    )


def _write_script(
    folder: Path, settings: BundleSettings, options: AlignOptions, feeds: list[tuple[str, int]]
) -> None:
    values = {
        "module_path": settings.module_path,
        "exporter": options.exporter,
        "atol": settings.atol,
        "rtol": settings.rtol,
        "verdict": options.verdict,
        "roundoff_factor": ROUNDOFF_FACTOR,
        "feeds": [list(pair) for pair in feeds],
    }
    template = Path(repro_script.__file__).read_text(encoding="utf-8")
    head, rest = template.split(_SETTINGS_START + "\n", 1)
    _, tail = rest.split(_SETTINGS_END + "\n", 1)
    block = f"SETTINGS: dict[str, Any] = {pprint.pformat(values, sort_dicts=False)}\n"
    banner = (
        f"# Repro bundle of {settings.module_path or '(model)'}, written by fxalign: run\n"
        "# `python repro.py` here. Needs only torch, onnx and onnxruntime.\n"
    )
    text = banner + head + _SETTINGS_START + "\n" + block + _SETTINGS_END + "\n" + tail
    (folder / "repro.py").write_text(text, encoding="utf-8")


def run_bundle(folder: Path, module_path: str, *, timeout: float = 600.0) -> Repro:
    """Run ``folder/repro.py`` once in a fresh process and say whether it reproduces."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        done = subprocess.run(
            [sys.executable, "repro.py"],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Repro(str(folder), module_path, None, None, f"repro.py ran over {timeout:g} s")
    result = _result(done.stdout)
    if done.returncode not in (0, 1) or result is None:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        return Repro(str(folder), module_path, None, None, f"repro.py failed: {last[:200]}")
    max_abs = float(result["max_abs"])
    if done.returncode == 1:
        note = f"reproduces in isolation: max_abs={max_abs:.3g}"
        return Repro(str(folder), module_path, True, max_abs, note)
    note = (
        "does not reproduce in isolation: the divergence depends on context (the values the "
        f"rest of the model feeds it); max_abs={max_abs:.3g}"
    )
    return Repro(str(folder), module_path, False, max_abs, note)


def _result(stdout: str) -> dict[str, Any] | None:
    """The verdict ``repro.py`` printed last (``fxalign-repro: {json}``), if it did."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("fxalign-repro: "):
            data: dict[str, Any] = json.loads(line.removeprefix("fxalign-repro: "))
            return data
    return None
