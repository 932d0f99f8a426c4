"""The fallback: eager wrappers where FX fails, FX-traced blocks wherever a block traces alone.

When tracing the whole model fails (Hugging Face transformers, detection models, data-dependent
Python control flow) or the traced module does not compute what the model does,
:func:`instrument_fallback` assembles the instrumented model block by block:

1. Every module is replaced by an eager wrapper (:mod:`fxalign.instrument.wrappers`): a shallow
   copy that runs its own Python ``forward`` and marks its calls. This is always valid.
2. Given example inputs, one probe run records each block's first call.
3. Top-down, each block is traced with FX on its recorded arguments; a trace that reproduces the
   recorded output replaces the block's wrapper (FX then marks its subtree), otherwise the block
   keeps running its own ``forward`` (``eager[path]`` says why) and its children are tried.
4. The assembled module must reproduce the model's output, else step 1 is used as is.

Either way every module that runs is marked, structured outputs included.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from fxalign.instrument.fx import instrument_fx, reproduces
from fxalign.instrument.result import Granularity, first_line, is_leaf_module
from fxalign.instrument.wrappers import (
    BlockCalls,
    WrapperState,
    detached,
    instrument_eager,
    marked_class,
    probing,
    set_state,
)

__all__ = ["Fallback", "instrument_fallback"]

logger = logging.getLogger(__name__)


@dataclass
class Fallback:
    """What :func:`instrument_fallback` assembled.

    Attributes:
        module: The instrumented module.
        traced: Paths of the blocks FX traced on their own.
        eager: ``path -> reason`` for blocks left running their own ``forward``.
        unmarked: Blocks known to stay unmarked inside traced blocks.
    """

    module: torch.nn.Module
    traced: list[str] = field(default_factory=list)
    eager: dict[str, str] = field(default_factory=dict)
    unmarked: dict[str, str] = field(default_factory=dict)


def instrument_fallback(
    model: torch.nn.Module,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    granularity: Granularity,
    local: bool = True,
) -> Fallback:
    """Eager wrappers where needed, FX-traced blocks where possible (steps 1-4 above).

    Args:
        model: The model; not modified.
        args: Example positional inputs; without inputs (``None`` with ``kwargs``) no block is
            traced.
        kwargs: Example keyword inputs.
        granularity: ``"all"`` or ``"leaf"``.
        local: Also mark each marked call's inputs.

    Returns:
        A :class:`Fallback`.
    """
    eager_tree = instrument_eager(model, granularity, local)
    if args is None and kwargs is None:
        return Fallback(eager_tree)
    args, kwargs = tuple(args or ()), dict(kwargs or {})
    try:
        with probing() as probe, torch.no_grad():
            expected = detached(eager_tree(*args, **kwargs))
    except Exception:  # the model fails on its inputs: run_torch reports it with context
        return Fallback(eager_tree)
    root = instrument_eager(model, granularity, local)
    assembler = _Assembler(probe, granularity, local, Fallback(root))
    assembler.visit(model, root, "")
    result = assembler.result
    if result.traced:
        mismatch = reproduces(result.module, args, kwargs, expected)
        if mismatch is not None:
            logger.info("traced subtrees do not compose (%s); eager wrappers only", mismatch)
            return Fallback(eager_tree)
    return result


@dataclass
class _Assembler:
    """Walks the model top-down, putting traced blocks in place of their wrappers."""

    probe: Mapping[str, BlockCalls]
    granularity: Granularity
    local: bool
    result: Fallback
    replaced: dict[int, torch.nn.Module] = field(default_factory=dict)
    visited: set[int] = field(default_factory=set)

    def visit(self, original: torch.nn.Module, copy_: torch.nn.Module, path: str) -> None:
        """Try every child block of ``original`` (whose wrapper is ``copy_``) at ``path``."""
        for name, child in original._modules.items():
            if child is None or is_leaf_module(child) or name not in copy_._modules:
                continue
            if id(child) in self.visited:  # the same block under a second name
                if id(child) in self.replaced:
                    copy_._modules[name] = self.replaced[id(child)]
                continue
            self.visited.add(id(child))
            child_path = f"{path}.{name}" if path else name
            calls = self.probe.get(child_path)
            reason = None
            if calls is None:
                pass  # never called itself (a ModuleList, say): look at its children
            elif not calls.consistent:
                reason = "called with different non-tensor arguments"
            else:
                block, reason = self._trace(child, child_path, calls)
                if block is not None:
                    copy_._modules[name] = self.replaced[id(child)] = block
                    continue
            if reason is not None:
                self.result.eager[child_path] = reason
            self.visit(child, copy_._modules[name], child_path)  # type: ignore[arg-type]

    def _trace(
        self, block: torch.nn.Module, path: str, calls: BlockCalls
    ) -> tuple[torch.nn.Module | None, str]:
        """The traced replacement of ``block``, or ``None`` and why it stays eager."""
        try:
            gm, inner_unmarked = instrument_fx(
                block, calls.args, calls.kwargs, self.granularity, path, self.local
            )
        except Exception as e:
            return None, first_line(e)
        mismatch = reproduces(gm, calls.args, calls.kwargs, calls.output)
        if mismatch is not None:
            return None, f"traced module does not reproduce it: {mismatch}"
        self.result.traced.append(path)
        self.result.unmarked.update(inner_unmarked)
        return _as_block(gm, block, path, self.granularity, self.local), ""


def _as_block(
    gm: fx.GraphModule,
    original: torch.nn.Module,
    path: str,
    granularity: Granularity,
    local: bool = True,
) -> torch.nn.Module:
    """Put a traced subtree in its block's place: marked output, the block's plain attributes."""
    for key, value in original.__dict__.items():
        if key.startswith("_") or key in gm.__dict__ or isinstance(value, torch.nn.Module):
            continue
        gm.__dict__[key] = value  # config, head counts, ... read by the parent's forward
    gm.__class__ = marked_class(type(gm))
    set_state(gm, WrapperState(path if granularity == "all" else None, local))
    return gm
