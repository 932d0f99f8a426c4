"""What instrumentation produced, and the facts about the model's modules it is judged by."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

__all__ = [
    "Granularity",
    "InstrumentResult",
    "ModuleFacts",
    "canonical_paths",
    "first_line",
    "is_leaf_module",
    "module_facts",
]

Granularity = Literal["all", "leaf"]
"""``"all"`` marks leaf modules and blocks (containers); ``"leaf"`` marks leaf modules only."""


@dataclass
class InstrumentResult:
    """What :func:`fxalign.instrument_model` produced.

    Attributes:
        module: The instrumented module; call it like the model. A ``torch.fx.GraphModule``
            when FX traced the model, otherwise a copy of the model's module tree whose modules
            mark their outputs.
        method: ``"fx"`` when the whole model was traced, ``"fallback"`` when eager wrappers were
            used (with the blocks that FX could trace on their own traced).
        granularity: Which modules were marked.
        module_types: ``module path -> class name`` for every module of the model.
        leaf_paths: Paths of the leaf modules (no children, or ``torch.nn`` built-ins).
        fx_error: Why FX could not be used for the whole model (first line), when
            ``method == "fallback"``.
        unmarked: ``module path -> reason`` for modules known not to get a marker before running.
        traced: Module paths whose subtree FX traced (``""`` when the whole model was traced).
        eager: ``module path -> reason`` for blocks that run their own Python ``forward`` (the
            eager fallback) because FX could not trace them; their submodules are still marked.
    """

    module: torch.nn.Module
    method: Literal["fx", "fallback"]
    granularity: Granularity
    module_types: dict[str, str]
    leaf_paths: list[str]
    fx_error: str | None = None
    unmarked: dict[str, str] = field(default_factory=dict)
    traced: list[str] = field(default_factory=list)
    eager: dict[str, str] = field(default_factory=dict)


def is_leaf_module(module: torch.nn.Module) -> bool:
    """Whether fxalign treats ``module`` as a leaf: FX's rule, or a module without children.

    ``torch.nn`` built-ins (except the containers: ``Sequential``, ``ModuleList``,
    ``ModuleDict`` and a bare ``nn.Module()`` holding submodules as attributes) are leaves
    even when they own children, like ``MultiheadAttention`` and its ``out_proj``.

    Example:
        >>> is_leaf_module(torch.nn.Linear(2, 2)), is_leaf_module(torch.nn.Sequential())
        (True, True)
        >>> is_leaf_module(torch.nn.Sequential(torch.nn.ReLU()))
        False
        >>> holder = torch.nn.Module()  # a namespace: ``down = nn.Module(); down.block = ...``
        >>> holder.block = torch.nn.Linear(2, 2)
        >>> is_leaf_module(holder)
        False
    """
    if isinstance(module, torch.jit.ScriptModule):
        return True  # scripted: run as it is, never looked inside
    mod = type(module).__module__
    container = type(module) is torch.nn.Module or isinstance(
        module, (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)
    )
    if mod.startswith(("torch.nn", "torch.ao.nn")) and not container:
        return True
    return next(iter(module.children()), None) is None


def canonical_paths(model: torch.nn.Module) -> dict[str, str]:
    """Every path of every module -> the module's first path in ``named_modules()``."""
    first: dict[int, str] = {}
    canonical: dict[str, str] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        canonical[path] = first.setdefault(id(module), path)
    return canonical


@dataclass
class ModuleFacts:
    """What the model's module tree says before anything runs.

    Attributes:
        module_types: ``module path -> class name`` (one canonical path per module object).
        leaf_paths: Paths of the leaf modules that are not owned by another leaf.
        alias_notes: ``second path -> reason`` for modules registered under two names.
    """

    module_types: dict[str, str]
    leaf_paths: list[str]
    alias_notes: dict[str, str]


def module_facts(model: torch.nn.Module) -> ModuleFacts:
    """Collect the :class:`ModuleFacts` of ``model``."""
    modules = dict(model.named_modules())  # one path per module object: the canonical one
    leafy = {p: is_leaf_module(m) for p, m in modules.items()}
    leaf_paths = [p for p, leaf in leafy.items() if p and leaf and _is_own_leaf(p, leafy)]
    notes = {
        path: f"same module object as {canonical!r}, reported under that path"
        for path, canonical in canonical_paths(model).items()
        if path != canonical
    }
    return ModuleFacts({p: type(m).__name__ for p, m in modules.items()}, leaf_paths, notes)


def _is_own_leaf(path: str, leafy: Mapping[str, bool]) -> bool:
    """A leaf owned by a leaf (``attn.out_proj`` in MultiheadAttention) is not a leaf of its own.

    ``leafy`` is ``module path -> whether that module is a leaf`` (:func:`is_leaf_module`).
    """
    parts = path.split(".")
    return not any(leafy.get(".".join(parts[:i]), False) for i in range(1, len(parts)))


def first_line(e: BaseException, limit: int = 110) -> str:
    """``Type: first sentence of the message``, at most ``limit`` characters.

    Example:
        >>> first_line(ValueError("bad value. More detail that would not fit " * 5))
        'ValueError: bad value.'
    """
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    if len(text) > limit:
        cut = text.find(". ")
        text = text[: cut + 1] if 0 < cut < limit else text[: limit - 3].rstrip() + "..."
    return f"{type(e).__name__}: {text}"
