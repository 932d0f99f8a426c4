"""The report: plain typed data that serialises to JSON and loads back equal.

Rendering lives in :mod:`fxalign.render`; this module computes nothing.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fxalign.compare import Metrics, Row, SampleStats
from fxalign.fidelity import Fidelity

__all__ = ["SCHEMA_VERSION", "Coverage", "Report"]

SCHEMA_VERSION = 1
"""Version of the JSON layout written by :meth:`Report.to_json`."""


@dataclass
class Coverage:
    """Which modules got a marker.

    Attributes:
        marked: Module paths with at least one executed marker, in first-execution order.
        unmarked: ``module path -> reason`` for every other module of the model.
        leaf_total: Leaf modules that ran.
        leaf_marked: Of those, how many have a marker.
        traced: Module paths whose subtree torch.fx traced (``""``: the whole model).
        eager: ``module path -> reason`` for blocks that FX could not trace and that run their
            own Python ``forward`` (their submodules are still marked); ``""`` is the model.
    """

    marked: list[str] = field(default_factory=list)
    unmarked: dict[str, str] = field(default_factory=dict)
    leaf_total: int = 0
    leaf_marked: int = 0
    traced: list[str] = field(default_factory=list)
    eager: dict[str, str] = field(default_factory=dict)

    @property
    def leaf_ratio(self) -> float:
        """Fraction of leaf modules that ran and got a marker (1.0 when none ran)."""
        return 1.0 if self.leaf_total == 0 else self.leaf_marked / self.leaf_total


@dataclass
class Report:
    """Result of one :func:`fxalign.align` run.

    A report is truthy when every compared value is within tolerance.

    Attributes:
        model: Class name of the model.
        exporter: ``"dynamo"`` or ``"torchscript"``.
        atol: Absolute tolerance given (or float32's default when tolerances go by dtype).
        rtol: Relative tolerance given (or float32's default).
        rows: One row per compared value, in PyTorch execution order, final outputs last.
        first_divergence: Name of the first row that breaks tolerance, or ``None``.
        instrumentation: ``"fx"`` or ``"fallback"``.
        instrumentation_note: Why the fallback was used, when it was.
        coverage: Which modules got markers.
        notes: Report-wide remarks (fidelity of the debug model, exporter warnings, ...).
        fidelity: Plain export vs debug model, when measured (``align(fidelity=True)``).
        exporter_warnings: Warnings the exporter raised.
        timings: Seconds per stage (``instrument``, ``export``, ``extract``, ``run_torch``,
            ``run_onnx``, ``compare``, ``total``).
        versions: Versions of torch, onnx, onnxruntime, onnxscript, fxalign.
        tolerances: Per-module overrides, ``glob -> {"atol": ..., "rtol": ...}``.
        dtype_tolerances: True when no global tolerance was given, so each value's tolerance
            follows its dtype (each row records the ``atol``/``rtol`` applied).
        sample_count: Input samples compared (the export input is sample 0).
        schema_version: JSON layout version.
    """

    model: str
    exporter: str
    atol: float
    rtol: float
    rows: list[Row]
    first_divergence: str | None = None
    instrumentation: str = "fx"
    instrumentation_note: str | None = None
    coverage: Coverage = field(default_factory=Coverage)
    notes: list[str] = field(default_factory=list)
    exporter_warnings: list[str] = field(default_factory=list)
    fidelity: Fidelity | None = None
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    tolerances: dict[str, dict[str, float]] = field(default_factory=dict)
    dtype_tolerances: bool = False
    sample_count: int = 1
    schema_version: int = SCHEMA_VERSION

    def __bool__(self) -> bool:
        return self.passed

    @property
    def passed(self) -> bool:
        """True when no row breaks tolerance."""
        return not any(r.failed for r in self.rows)

    def row(self, name: str) -> Row:
        """The row of marker ``name``.

        Raises:
            KeyError: No such row.
        """
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def divergence(self) -> Row | None:
        """The row named by :attr:`first_divergence`."""
        return None if self.first_divergence is None else self.row(self.first_divergence)

    # ---- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite floats as the strings ``"inf"``, ``"-inf"``, ``"nan"``)."""
        return _encode(asdict(self))

    def to_json(self, path: str | os.PathLike[str] | None = None, *, indent: int = 2) -> str:
        """Serialise; also write to ``path`` when given.

        Returns:
            The JSON text.
        """
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Inverse of :meth:`to_dict`.

        Fields this version does not know (added by a newer writer of the same schema version)
        are ignored; fields added after the data was written take their defaults.

        Raises:
            ValueError: The data was written by a newer, incompatible schema.
        """
        data = _decode(data)
        version = data.get("schema_version", SCHEMA_VERSION)
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"report schema version {version} is newer than this fxalign reads "
                f"({SCHEMA_VERSION}); upgrade fxalign"
            )
        rows = []
        for r in data.get("rows", []):
            metrics, local, samples = r.get("metrics"), r.get("local"), r.get("samples")
            rows.append(
                Row(
                    **{
                        **_known(Row, r),
                        "metrics": Metrics(**_known(Metrics, metrics)) if metrics else None,
                        "local": Metrics(**_known(Metrics, local)) if local else None,
                        "samples": SampleStats(**_known(SampleStats, samples)) if samples else None,
                    }
                )
            )
        nested = ("rows", "coverage", "fidelity")
        rest = {k: v for k, v in _known(cls, data).items() if k not in nested}
        coverage = Coverage(**_known(Coverage, data.get("coverage", {})))
        fidelity = data.get("fidelity")
        return cls(
            rows=rows,
            coverage=coverage,
            fidelity=Fidelity(**_known(Fidelity, fidelity)) if fidelity else None,
            **rest,
        )

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike[str]) -> Report:
        """Load a report from JSON text or a path to a JSON file."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))

    # ---- rendering shortcuts ------------------------------------------------------------
    def to_text(self, *, top: int | None = None, width: int = 160, tree: bool = False) -> str:
        """The terminal table (and, with ``tree``, the module tree) as plain text."""
        from fxalign.render import render_text

        return render_text(self, top=top, width=width, tree=tree)

    def __str__(self) -> str:
        return self.to_text()


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``data`` that are fields of dataclass ``cls``."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _encode(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


_SPECIAL = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_FLOAT_KEYS = {f.name for f in fields(Metrics)}


def _decode(value: Any, key: str | None = None) -> Any:
    if isinstance(value, str) and key in _FLOAT_KEYS and value in _SPECIAL:
        return _SPECIAL[value]
    if isinstance(value, dict):
        return {k: _decode(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value
