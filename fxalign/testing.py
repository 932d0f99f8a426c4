"""A pytest helper: fail a test when the exported model diverges, naming where.

Example::

    from fxalign.testing import assert_aligned

    def test_export_matches_pytorch():
        model = MyModel().eval()
        assert_aligned(model, (torch.randn(1, 3, 224, 224),), exporter="dynamo")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fxalign.pipeline import align
from fxalign.report.model import Report
from fxalign.report.summary import format_float, summary_line

__all__ = ["assert_aligned", "divergence_message"]


def divergence_message(report: Report) -> str:
    """The failure message: the first divergent module, its metrics and its local error."""
    lines = [f"ONNX export of {report.model} ({report.exporter}) diverges from PyTorch."]
    first = report.divergence
    if first is not None:
        where = first.display_name + (f" ({first.module_type})" if first.module_type else "")
        lines.append(f"First divergence: {where}")
        m = first.metrics
        if m is not None:
            lines.append(
                f"  max_abs={format_float(m.max_abs)} mean_abs={format_float(m.mean_abs)} "
                f"cosine={m.cosine:.6f}; {m.mismatched} of {m.numel} elements outside "
                f"atol={first.atol:g}, rtol={first.rtol:g}"
            )
        if first.local is not None:
            origin = (
                "the error starts in this module"
                if first.local.mismatched
                else "this module's own error is within tolerance: it inherits the error"
            )
            lines.append(f"  local error max_abs={format_float(first.local.max_abs)}: {origin}")
        elif first.local_note:
            lines.append(f"  local error: {first.local_note}")
        lines.extend(f"  note: {n}" for n in first.notes)
    lines.append(summary_line(report))
    return "\n".join(lines)


def assert_aligned(
    model: torch.nn.Module,
    args: Sequence[Any] | torch.Tensor = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    **align_kwargs: Any,
) -> Report:
    """Align ``model`` and raise ``AssertionError`` if any value breaks tolerance.

    Args:
        model: The model.
        args: Positional inputs.
        kwargs: Keyword inputs.
        atol: Absolute tolerance (default: by dtype).
        rtol: Relative tolerance (default: by dtype).
        **align_kwargs: Passed to :func:`fxalign.align` (``exporter``, ``export_kwargs``, ...).

    Returns:
        The report, when aligned.

    Raises:
        AssertionError: With :func:`divergence_message` as its message.
    """
    report = align(model, args, kwargs, atol=atol, rtol=rtol, **align_kwargs)
    if not report.passed:
        raise AssertionError(divergence_message(report))
    return report
