"""Every option of one :func:`fxalign.align` run, checked once and carried as one typed object.

:func:`fxalign.align` builds an :class:`AlignOptions` from its keyword arguments, the CLI from its
flags; the stages read the fields they need and nothing threads a dozen positional parameters.

Example:
    >>> opts = AlignOptions.build(exporter="torchscript", atol=1e-5)
    >>> opts.exporter, opts.atol, opts.verdict, opts.local
    ('torchscript', 1e-05, 'roundoff', True)
    >>> AlignOptions.build(atol=float("nan"))
    Traceback (most recent call last):
      ...
    fxalign.errors.UserError: atol must be a finite number >= 0, got nan
    Hint: ...
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args

import torch

from fxalign.backends.base import check_runner
from fxalign.compare.metrics import check_verdict
from fxalign.errors import InputError, UserError
from fxalign.report.model import Verdict

__all__ = [
    "REPRO_FILES",
    "AlignOptions",
    "Exporter",
    "Granularity",
    "default_exporter",
    "repro_folder",
]

Exporter = Literal["dynamo", "torchscript"]
"""The two ``torch.onnx.export`` exporters: ``dynamo=True`` and ``dynamo=False``."""
Granularity = Literal["all", "leaf"]
"""Which modules get a marker: blocks and leaves, or leaf modules only."""

_TOLERANCE_KEYS = ("atol", "rtol")

REPRO_FILES = ("module.pt2", "inputs.pt", "expected.pt", "module.onnx", "repro.py")
"""The files of a repro bundle (``align(repro=DIR)``), refused over old ones without
``overwrite``."""


def default_exporter() -> Exporter:
    """The exporter ``torch.onnx.export`` uses by default in the installed torch.

    Example:
        >>> default_exporter() in ("dynamo", "torchscript")
        True
    """
    default = inspect.signature(torch.onnx.export).parameters.get("dynamo")
    if default is not None and default.default is False:
        return "torchscript"
    return "dynamo"


def _tolerance(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(
            f"{name} must be a number >= 0, got {value!r}",
            hint='e.g. atol=1e-4, tolerances={"*.attention.*": {"atol": 1e-3}}',
        )
    if not math.isfinite(value) or value < 0:
        raise UserError(
            f"{name} must be a finite number >= 0, got {value!r}",
            hint="atol/rtol bound |onnx - torch| <= atol + rtol * |torch|; NaN or inf "
            "would make every value pass or fail",
        )
    return float(value)


def _overrides(tolerances: Any) -> Mapping[str, Mapping[str, float]]:
    if tolerances is None:
        return MappingProxyType({})
    if not isinstance(tolerances, Mapping):
        raise UserError(
            f"tolerances must map a glob to {{'atol': ..., 'rtol': ...}}, got "
            f"{type(tolerances).__name__}",
            hint='e.g. tolerances={"*.attention.*": {"atol": 1e-3}}',
        )
    checked: dict[str, Mapping[str, float]] = {}
    for pattern, values in tolerances.items():
        if not isinstance(pattern, str) or not isinstance(values, Mapping):
            raise UserError(
                f"tolerances[{pattern!r}] must be a dict with 'atol' and/or 'rtol', got {values!r}",
                hint=f'e.g. tolerances={{"{pattern}": {{"atol": 1e-3}}}}',
            )
        unknown = sorted(str(k) for k in values if k not in _TOLERANCE_KEYS)
        if unknown:
            raise UserError(
                f"tolerances[{pattern!r}] has unknown keys {unknown}",
                hint="only 'atol' and 'rtol' are understood",
            )
        entry = {k: _tolerance(f"tolerances[{pattern!r}][{k!r}]", v) for k, v in values.items()}
        checked[pattern] = MappingProxyType({k: v for k, v in entry.items() if v is not None})
    return MappingProxyType(checked)


@dataclass(frozen=True)
class AlignOptions:
    """The options of one alignment run (see :func:`fxalign.align` for each one's meaning).

    Build it with :meth:`build`, which checks every value and says what is wrong with a bad one.

    Attributes:
        exporter: ``"dynamo"`` or ``"torchscript"``.
        atol: Absolute tolerance for every value, or ``None`` for the dtype defaults.
        rtol: Relative tolerance for every value, or ``None`` for the dtype defaults.
        tolerances: ``glob -> {"atol": ..., "rtol": ...}`` per-module overrides (read-only).
        verdict: The rule a value passes by: ``"roundoff"`` (default), within ``atol + rtol *
            |torch|`` plus the round-off its dtype and magnitude allow (``ROUNDOFF_FACTOR *
            eps * max|torch|``, :mod:`fxalign.compare.metrics`); ``"allclose"``, plain
            elementwise ``numpy.allclose``.
        providers: ONNX Runtime execution providers, ``None`` for the default.
        workdir: Where to keep the exported and debug models; ``None``: a temporary directory.
        export_kwargs: Extra ``torch.onnx.export`` options (read-only).
        granularity: ``"all"`` or ``"leaf"``.
        runner: A custom ONNX backend, or ``None`` for ONNX Runtime.
        train: Compare in training mode.
        overwrite: Allow replacing model files in ``workdir``.
        fidelity: Also measure the debug model against the plain export.
        local: Mark module inputs and compute introduced errors (leaves' local errors, blocks'
            self errors).
        local_rows: Which rows get one (:data:`fxalign.local.LocalRows`): ``failing`` (the
            default: rows whose value breaks tolerance) or ``all``.
        max_outputs_per_run: Compare at most this many ONNX values at a time (``None``: all).
        onnx: The user's own ONNX file to attach to (compared unchanged, no markers), or
            ``None``.
        attach: ``True``: export the model plainly (with ``export_kwargs``) and attach to that
            export instead of exporting a debug model with markers (implied by ``onnx``);
            ``False``: markers; ``None`` (the default): the plain export first, markers only
            when it breaks tolerance or cannot be attached to (:attr:`plain_first`).
        drill_down: When there is a culprit module, find the op and source line of its own
            code that breaks tolerance first (the module exported alone).
        repro: Folder to write the culprit's standalone repro bundle into, or ``None``.
        exporter_given: Whether the caller named ``exporter`` (else it is torch's default).
    """

    exporter: Exporter
    atol: float | None = None
    rtol: float | None = None
    tolerances: Mapping[str, Mapping[str, float]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    verdict: Verdict = "roundoff"
    providers: tuple[str, ...] | None = None
    workdir: Path | None = None
    export_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    granularity: Granularity = "all"
    runner: Any = None
    train: bool = False
    overwrite: bool = False
    fidelity: bool = False
    local: bool = True
    local_rows: Literal["failing", "all"] = "failing"
    max_outputs_per_run: int | None = None
    onnx: Path | None = None
    attach: bool | None = None
    drill_down: bool = True
    repro: Path | None = None
    exporter_given: bool = False

    @property
    def attaches(self) -> bool:
        """Whether values come from a plain file only (``onnx`` or ``attach=True``)."""
        return self.attach is True or self.onnx is not None

    @property
    def plain_first(self) -> bool:
        """Whether the plain export is checked first, markers only when it does not align.

        The default: an aligned model then costs what checking its plain export costs, and a
        verdict is always that of the graph the user deploys.
        """
        return self.attach is None and self.onnx is None

    def with_markers(self) -> AlignOptions:
        """These options for the marker mode (``attach=False``)."""
        return dataclasses.replace(self, attach=False)

    @classmethod
    def build(
        cls,
        *,
        exporter: Exporter | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        tolerances: Mapping[str, Mapping[str, float]] | None = None,
        verdict: Verdict = "roundoff",
        providers: Sequence[str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        export_kwargs: Mapping[str, Any] | None = None,
        granularity: Granularity = "all",
        runner: Any = None,
        train: bool = False,
        overwrite: bool = False,
        fidelity: bool = False,
        local: bool | Literal["failing", "all"] = True,
        max_outputs_per_run: int | None = None,
        onnx: str | os.PathLike[str] | None = None,
        attach: bool | None = None,
        drill_down: bool = True,
        repro: str | os.PathLike[str] | None = None,
    ) -> AlignOptions:
        """Check every option and build the options object.

        Raises:
            UserError: An option has a value fxalign cannot use; the message names it and
                says what is valid.
        """
        exporter_given = exporter is not None
        exporter = exporter or default_exporter()
        _check_choice("exporter", exporter, get_args(Exporter))
        _check_choice("granularity", granularity, get_args(Granularity))
        if max_outputs_per_run is not None and (
            isinstance(max_outputs_per_run, bool)
            or not isinstance(max_outputs_per_run, int)
            or max_outputs_per_run < 1
        ):
            raise InputError(
                f"max_outputs_per_run must be a whole number >= 1, got {max_outputs_per_run!r}",
                hint="pass None to compute every value in one run",
            )
        if export_kwargs is not None and not isinstance(export_kwargs, Mapping):
            raise UserError(
                f"export_kwargs must be a dict of torch.onnx.export options, got "
                f"{type(export_kwargs).__name__}"
            )
        if isinstance(providers, str):
            providers = [providers]
        if runner is not None:
            check_runner(runner)
        onnx_path = _onnx_file(onnx)
        if attach not in (None, True, False):
            raise UserError(
                f"attach must be True, False or None, got {attach!r}",
                hint="None (the default) checks the plain export first; True attaches only; "
                "False uses markers only",
            )
        if attach is False and onnx_path is not None:
            raise UserError(
                "onnx= compares the file you give, attached by its scopes; attach=False asks "
                "for the marker mode, which exports the model again with markers",
                hint="drop attach=False to compare the file (or onnx= for the marker mode)",
            )
        if attach is None and max_outputs_per_run is not None:
            attach = False  # bounds the marker mode's runs: no plain-export check first
        if (attach or onnx_path is not None) and max_outputs_per_run is not None:
            raise UserError(
                "max_outputs_per_run cannot bound an attach run: the eager side records every "
                "module's value in one forward",
                hint="drop max_outputs_per_run, or use the marker mode (no onnx=, attach=False)",
            )
        return cls(
            exporter=exporter,
            atol=_tolerance("atol", atol),
            rtol=_tolerance("rtol", rtol),
            tolerances=_overrides(tolerances),
            verdict=check_verdict(verdict),
            providers=None if providers is None else tuple(providers),
            workdir=None if workdir is None else Path(workdir),
            export_kwargs=MappingProxyType(dict(export_kwargs or {})),
            granularity=granularity,
            runner=runner,
            train=bool(train),
            overwrite=bool(overwrite),
            fidelity=bool(fidelity),
            local=local is not False,
            local_rows=_local_rows(local),
            max_outputs_per_run=max_outputs_per_run,
            onnx=onnx_path,
            attach=attach,
            drill_down=bool(drill_down),
            repro=repro_folder(repro, overwrite=bool(overwrite)),
            exporter_given=exporter_given,
        )


def _local_rows(local: Any) -> Literal["failing", "all"]:
    """``local=`` as the rows to replay: ``True``/``False`` read ``"failing"``."""
    if isinstance(local, bool) or local == "failing":
        return "failing"
    if local == "all":
        return "all"
    raise UserError(
        f"local must be True, False, 'failing' or 'all', got {local!r}",
        hint="'failing' (True) replays the modules whose value breaks tolerance; 'all' every one",
    )


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"unknown {name} {value!r}", hint=f"use one of {', '.join(allowed)}")


def repro_folder(repro: Any, *, overwrite: bool) -> Path | None:
    """The repro bundle's folder, checked before any work: not a file, no old bundle in it.

    Raises:
        UserError: ``repro`` is no path, is a file, or holds a bundle already (without
            ``overwrite``).
    """
    if repro is None:
        return None
    if not isinstance(repro, (str, os.PathLike)):
        raise UserError(
            f"repro must be a folder path, got {type(repro).__name__}",
            hint='e.g. repro="bundle" (created if missing)',
        )
    path = Path(repro)
    if path.exists() and not path.is_dir():
        raise UserError(f"repro {str(path)!r} is a file, not a folder", hint="pass a folder")
    existing = [str(path / f) for f in REPRO_FILES if (path / f).exists()]
    if existing and not overwrite:
        raise UserError(
            f"{', '.join(existing)} already exist"
            if len(existing) > 1
            else f"{existing[0]} already exists",
            hint="pass overwrite=True (--overwrite) or another folder",
        )
    return path


def _onnx_file(onnx: Any) -> Path | None:
    """The ``onnx=`` file, checked to be an existing file (it is read, never written)."""
    if onnx is None:
        return None
    if not isinstance(onnx, (str, os.PathLike)):
        raise UserError(
            f"onnx must be the path of an .onnx file, got {type(onnx).__name__}",
            hint='e.g. onnx="model.onnx" (the file you deploy, as torch.onnx.export wrote it)',
        )
    path = Path(onnx)
    if not path.is_file():
        raise UserError(
            f"onnx file {str(path)!r} does not exist"
            + (" (it is a folder)" if path.is_dir() else ""),
            hint="pass the .onnx file torch.onnx.export wrote",
        )
    return path
