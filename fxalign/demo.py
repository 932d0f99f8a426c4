"""Built-in demo models, used by ``fxalign demo`` and the tests.

* :class:`ConvBlocks`: four blocks of convolutions; every module exports faithfully.
* :class:`SoftClipNet`: a layer between two linear ones calls a custom op,
  ``fxalign_demo::softclip`` (``3 * tanh(x / 3)``), whose ONNX translation is wrong: written for
  both exporters as a hard ``Clip(x, -3, 3)``, close to the op only near zero. This is the kind
  of divergence a user meets (a hand-written translation that is subtly off); fxalign finds it at
  ``act`` and shows, with the local error, that the error starts there.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = [
    "ConvBlocks",
    "SoftClip",
    "SoftClipNet",
    "PARTS",
    "demo_inputs",
    "explain",
    "export_kwargs",
    "softclip",
    "softclip_export_kwargs",
    "softclip_inputs",
    "unexpected",
]

SOFTCLIP_LIMIT = 3.0
"""``softclip(x) = LIMIT * tanh(x / LIMIT)``: the identity near zero, saturating at +-LIMIT."""


class ConvBlocks(nn.Module):
    """Four blocks of 3x3 convolutions (``convs1`` ... ``convs4``), as in the classic tutorial."""

    def __init__(self) -> None:
        super().__init__()

        def convs(n: int) -> nn.Sequential:
            return nn.Sequential(*(nn.Conv2d(3, 3, 3, 1, 1) for _ in range(n)))

        self.convs1 = convs(3)
        self.convs2 = convs(2)
        self.convs3 = convs(2)
        self.convs4 = convs(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the four blocks in order."""
        x = self.convs1(x)
        x = self.convs2(x)
        x = self.convs3(x)
        return self.convs4(x)


def demo_inputs(seed: int = 0) -> tuple[torch.Tensor]:
    """A seeded ``1x3x10x10`` input for :class:`ConvBlocks`."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 3, 10, 10, generator=generator),)


@torch.library.custom_op("fxalign_demo::softclip", mutates_args=())
def softclip(x: torch.Tensor) -> torch.Tensor:
    """``3 * tanh(x / 3)``: a smooth clip to (-3, 3)."""
    return SOFTCLIP_LIMIT * torch.tanh(x / SOFTCLIP_LIMIT)


@softclip.register_fake
def _softclip_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _softclip_onnx(x: Any) -> Any:
    """The dynamo exporter's translation, with the planted bug: a hard clip."""
    from onnxscript import opset18 as op

    low = op.Constant(value_float=-SOFTCLIP_LIMIT)
    high = op.Constant(value_float=SOFTCLIP_LIMIT)
    return op.Clip(x, low, high)


def _softclip_symbolic(g: Any, x: Any) -> Any:
    """The TorchScript exporter's translation, with the same bug."""
    low = g.op("Constant", value_t=torch.tensor(-SOFTCLIP_LIMIT))
    high = g.op("Constant", value_t=torch.tensor(SOFTCLIP_LIMIT))
    return g.op("Clip", x, low, high)


torch.onnx.register_custom_op_symbolic("fxalign_demo::softclip", _softclip_symbolic, 11)


def softclip_export_kwargs(exporter: str) -> dict[str, Any]:
    """The export options that translate ``softclip`` (the TorchScript one is registered)."""
    if exporter == "dynamo":
        table = {torch.ops.fxalign_demo.softclip.default: _softclip_onnx}
        return {"custom_translation_table": table}
    return {}


class SoftClip(nn.Module):
    """Calls the custom op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``softclip(x)``."""
        return softclip(x)


class SoftClipNet(nn.Module):
    """``embed`` (Linear) -> ``act`` (SoftClip, the custom op) -> ``head`` (a small MLP)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.act = SoftClip()
        self.head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the three parts in order."""
        return self.head(self.act(self.embed(x)))


def softclip_inputs(seed: int = 0) -> tuple[torch.Tensor]:
    """A seeded ``4x8`` input for :class:`SoftClipNet`, large enough to leave the linear range."""
    generator = torch.Generator().manual_seed(seed)
    return (4 * torch.randn(4, 8, generator=generator),)


def explain(report: Any, exit_code: int) -> list[str]:
    """What a SoftClipNet report shows, in a few sentences (printed after its table)."""
    first = report.divergence
    if first is None:
        return [f"No module diverged: `fxalign align` would exit {exit_code} (aligned)."]
    text = [f"{first.display_name} ({first.module_type}) is where the error is introduced: the "]
    text.append("first module whose own error breaks tolerance.")
    if first.local is not None and first.local.mismatched:
        text.append(
            f" Its local error (the PyTorch module rerun on the ONNX values of its inputs) is "
            f"{first.local.max_abs:.3g}: the error starts there, in its ONNX translation (here "
            "softclip, 3*tanh(x/3), was translated as Clip(x, -3, 3))."
        )
    paragraphs = ["".join(text)]
    after = report.rows[report.rows.index(first) + 1 :]
    inherited = [r for r in after if r.failed and r.local is not None and not r.local.mismatched]
    if inherited:
        names = ", ".join(r.display_name for r in inherited[:3])
        more = ", ..." if len(inherited) > 3 else ""
        paragraphs.append(
            f"Later modules ({names}{more}) diverge too, but their local error stays within "
            "tolerance: they only inherit it."
        )
    paragraphs.append(f"`fxalign align` would exit {exit_code} (diverged) for this model.")
    return [textwrap.fill(p, width=100) for p in paragraphs]


PARTS: dict[str, tuple[str, Callable[[], nn.Module], Callable[[int], tuple[torch.Tensor]]]] = {
    "convblocks": (
        "ConvBlocks: four blocks of convolutions; every module exports faithfully",
        ConvBlocks,
        demo_inputs,
    ),
    "softclip": (
        "SoftClipNet: a custom op whose ONNX translation is wrong (a planted divergence)",
        SoftClipNet,
        softclip_inputs,
    ),
}
"""The demo's two parts: ``name -> (title, model class, inputs(seed))``, in the order shown."""


def export_kwargs(part: str, exporter: str) -> dict[str, Any] | None:
    """The export options of a demo part (SoftClipNet's translation of its custom op)."""
    return softclip_export_kwargs(exporter) if part == "softclip" else None


def unexpected(aligned: Any, diverged: Any) -> list[str]:
    """What did not go as the demo expects: ConvBlocks aligned, SoftClipNet diverging at ``act``."""
    problems = []
    if not aligned.passed:
        problems.append(f"ConvBlocks ({aligned.exporter}) diverged at {aligned.first_divergence}")
    first = diverged.divergence
    if first is None or first.name != "act":
        where = "nowhere" if first is None else first.display_name
        problems.append(f"SoftClipNet ({diverged.exporter}) diverged {where}, expected at act")
    elif first.local is None or not first.local.mismatched:
        problems.append(f"SoftClipNet ({diverged.exporter}): no local error at act")
    return problems
