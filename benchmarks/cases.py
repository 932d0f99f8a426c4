"""The models the benchmark measures: real architectures from random configs, and synthetic ones.

Real architectures come from ``transformers`` configs with random weights (``from_config``
style construction, never a download). Synthetic models are chains of small blocks, sized by
their number of modules, for the scaling measurement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["REAL_MODELS", "BenchCase", "build_case", "count_modules", "synthetic_case"]


@dataclass
class BenchCase:
    """One model with its example inputs.

    Attributes:
        name: The benchmark's name for the model (``"resnet50"``, ``"synthetic-1000"``).
        description: What it is, for the report.
        model: The model, in eval mode.
        args: Positional inputs.
        kwargs: Keyword inputs.
    """

    name: str
    description: str
    model: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def modules(self) -> int:
        """Number of modules (``len(list(model.modules()))``)."""
        return count_modules(self.model)

    @property
    def parameters(self) -> int:
        """Number of parameters."""
        return sum(p.numel() for p in self.model.parameters())


def count_modules(model: nn.Module) -> int:
    """Modules of ``model``, the model itself included."""
    return sum(1 for _ in model.modules())


class KeywordCall(nn.Module):
    """Calls a Hugging Face model with keyword inputs and returns its output unchanged.

    ``transformers`` 5 models expect keyword inputs (their config-default decorators misread
    positional ones), and the exporters want positional tensors; this adapter takes the tensors
    positionally and passes them on by name.
    """

    def __init__(self, model: nn.Module, input_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = list(input_names)

    def forward(self, *inputs: torch.Tensor) -> Any:
        """Call the wrapped model with ``input_names[i]=inputs[i]``."""
        return self.model(**dict(zip(self.input_names, inputs, strict=True)))


def _hf(model: nn.Module, names: list[str], inputs: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
    return KeywordCall(model.eval(), names).eval(), inputs


def _resnet50() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import ResNetConfig, ResNetModel

    return _hf(ResNetModel(ResNetConfig()), ["pixel_values"], (torch.randn(1, 3, 224, 224),))


def _resnet50_batch8() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import ResNetConfig, ResNetModel

    return _hf(ResNetModel(ResNetConfig()), ["pixel_values"], (torch.randn(8, 3, 224, 224),))


def _vit_base() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import ViTConfig, ViTModel

    return _hf(ViTModel(ViTConfig()), ["pixel_values"], (torch.randn(1, 3, 224, 224),))


def _token_inputs(seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 1000, (1, seq))
    return ids, torch.ones(1, seq, dtype=torch.int64)


def _bert_base() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import BertConfig, BertModel

    config = BertConfig(use_cache=False)
    return _hf(BertModel(config), ["input_ids", "attention_mask"], _token_inputs(128))


def _gpt2() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(use_cache=False)
    return _hf(GPT2Model(config), ["input_ids", "attention_mask"], _token_inputs(128))


def _bert_tiny() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=1000,
        use_cache=False,
    )
    return _hf(BertModel(config), ["input_ids", "attention_mask"], _token_inputs(16))


def _convblocks() -> tuple[nn.Module, tuple[Any, ...]]:
    from fxalign.demo import ConvBlocks, demo_inputs

    return ConvBlocks().eval(), demo_inputs()


REAL_MODELS: dict[str, tuple[str, Callable[[], tuple[nn.Module, tuple[Any, ...]]]]] = {
    "resnet50": ("transformers ResNetModel, default config (ResNet-50), 1x3x224x224", _resnet50),
    "resnet50-batch8": (
        "transformers ResNetModel, default config (ResNet-50), 8x3x224x224",
        _resnet50_batch8,
    ),
    "vit-base": ("transformers ViTModel, default config (ViT-B/16), 1x3x224x224", _vit_base),
    "bert-base": ("transformers BertModel, default config (BERT-base), 1x128 tokens", _bert_base),
    "gpt2": ("transformers GPT2Model, default config (GPT-2 small), 1x128 tokens", _gpt2),
    "bert-tiny": ("transformers BertModel, 2 layers of width 32, 1x16 tokens", _bert_tiny),
    "convblocks": ("fxalign's demo model: four blocks of 3x3 convolutions, 1x3x10x10", _convblocks),
}
"""``name -> (description, builder)``; builders seed nothing, :func:`build_case` does."""


class _SynthBlock(nn.Module):
    """``relu(linear(x))``, plus a spare linear layer the forward never calls."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.spare = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One block."""
        return self.act(self.linear(x))


class Synthetic(nn.Module):
    """A chain of :class:`_SynthBlock` (4 modules each) in one ``nn.Sequential``."""

    def __init__(self, blocks: int, width: int = 8) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(_SynthBlock(width) for _ in range(blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the chain."""
        return self.blocks(x)


def synthetic_case(modules: int, seed: int = 0) -> BenchCase:
    """A :class:`Synthetic` model with about ``modules`` modules (``2 + 4 * blocks``).

    Every block has one module its forward never calls, so a quarter of the modules are
    reported as unmarked: that exercises the coverage computation at scale too.
    """
    torch.manual_seed(seed)
    blocks = max(1, (modules - 2) // 4)
    model = Synthetic(blocks).eval()
    return BenchCase(
        f"synthetic-{modules}",
        f"{blocks} blocks of Linear(8, 8) + ReLU (+ an unused Linear), torch.fx-traceable",
        model,
        (torch.randn(2, 8),),
    )


def build_case(name: str, seed: int = 0) -> BenchCase:
    """Build a named model: one of :data:`REAL_MODELS` or ``synthetic-<modules>``.

    Raises:
        ValueError: Unknown name.
    """
    if name.startswith("synthetic-"):
        return synthetic_case(int(name.split("-", 1)[1]), seed)
    if name not in REAL_MODELS:
        known = ", ".join([*REAL_MODELS, "synthetic-<modules>"])
        raise ValueError(f"unknown benchmark model {name!r}; known: {known}")
    description, builder = REAL_MODELS[name]
    torch.manual_seed(seed)
    model, args = builder()
    return BenchCase(name, description, model.eval(), tuple(args))
