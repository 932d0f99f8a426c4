"""Built-in demo models, used by ``fxalign demo`` and the tests."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvBlocks", "demo_inputs"]


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
