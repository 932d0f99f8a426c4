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

Step 3's checks are made in one run where they can be: every block that traces is put in place
first, and one run of the assembled module checks the model's output and, by forward hooks,
each traced block's first output against the probe's. Only when that run finds a difference
(or fails) is each block checked on its own, one run per block, as step 3 says.

Either way every module that runs is marked, structured outputs included.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from fxalign.instrument.fx import instrument_fx, output_differs, reproduces
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
    # Every block that traces put in place unchecked, then one run checks them all; a block
    # the run finds at fault is left eager (its children tried) and the run made again.
    refused: dict[str, str] = {}
    mismatch: str | None = None
    for _ in range(_COMPOSED_TRIES):
        optimistic = _Assembler(
            probe,
            granularity,
            local,
            Fallback(instrument_eager(model, granularity, local)),
            check=False,
            refused=dict(refused),
        )
        optimistic.visit(model, optimistic.result.module, "")
        if not optimistic.result.traced:
            return optimistic.result
        at_fault, mismatch = _composed_mismatch(optimistic, args, kwargs, expected)
        if mismatch is None:
            return optimistic.result
        if at_fault is None:
            break
        refused[at_fault] = f"traced module does not reproduce it: {mismatch}"
    logger.info("traced blocks checked together: %s; checking each on its own", mismatch)
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


_COMPOSED_TRIES = 3
"""Runs of the assembled module before each block is checked on its own instead."""


class _Differs(Exception):
    """Raised by a block's hook to end the checking run at the first block that differs."""


def _composed_mismatch(
    assembled: _Assembler, args: tuple[Any, ...], kwargs: dict[str, Any], expected: Any
) -> tuple[str | None, str | None]:
    """One run of the assembled module against the probe's: ``(block at fault, how)``.

    The first traced block whose first output differs from the probe's ends the run and is
    named; a difference only in the model's output (or a failure outside traced blocks) names
    no block; ``(None, None)`` when nothing differs.
    """
    found: list[tuple[str, str]] = []  # kept apart too: a forward may catch what a hook raises

    def check(path: str) -> Callable[[torch.nn.Module, Any, Any], None]:
        seen = False

        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            nonlocal seen
            if not seen:
                seen = True
                mismatch = output_differs(assembled.probe[path].output, output)
                if mismatch is not None:
                    found.append((path, mismatch))
                    raise _Differs(f"{path}: {mismatch}")

        return hook

    handles = [
        assembled.blocks[path].register_forward_hook(check(path))
        for path in assembled.result.traced
    ]
    try:
        with torch.no_grad():
            output = assembled.result.module(*args, **kwargs)
    except Exception as e:
        if found:
            return found[0]
        return None, first_line(e)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else (None, output_differs(expected, output))


@dataclass
class _Assembler:
    """Walks the model top-down, putting traced blocks in place of their wrappers."""

    probe: Mapping[str, BlockCalls]
    granularity: Granularity
    local: bool
    result: Fallback
    check: bool = True
    """Check each traced block on its own (else the caller checks them together)."""
    refused: dict[str, str] = field(default_factory=dict)
    """``path -> why``: blocks left eager without a try (found at fault by an earlier check)."""
    replaced: dict[int, torch.nn.Module] = field(default_factory=dict)
    visited: set[int] = field(default_factory=set)
    blocks: dict[str, torch.nn.Module] = field(default_factory=dict)
    """``path -> the traced block put in place``."""

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
            elif child_path in self.refused:
                reason = self.refused[child_path]
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
        if self.check:
            mismatch = reproduces(gm, calls.args, calls.kwargs, calls.output)
        else:  # checked later in one run; what the graph alone shows is refused now
            mismatch = _returned_type_differs(gm, calls.output)
        if mismatch is not None:
            return None, f"traced module does not reproduce it: {mismatch}"
        self.result.traced.append(path)
        self.result.unmarked.update(inner_unmarked)
        self.blocks[path] = _as_block(gm, block, path, self.granularity, self.local)
        return self.blocks[path], ""


_STATIC_CONTAINERS: dict[type, type] = {
    fx.immutable_collections.immutable_dict: dict,
    fx.immutable_collections.immutable_list: list,
}


def _returned_type_differs(gm: fx.GraphModule, expected: Any) -> str | None:
    """The traced graph returns another kind of container than the block did, seen unrun.

    torch.fx records a ``ModelOutput`` or a namedtuple built in ``forward`` as the dict or tuple
    it is made of; the caller's ``outputs[0]`` then fails. ``None`` when the graph's output
    node (or the pytree output spec the tracer kept) shows no such difference.
    """
    spec = getattr(getattr(gm.graph, "_codegen", None), "pytree_info", None)
    if spec is not None and spec.out_spec is not None:
        returned: type = spec.out_spec.type
    else:
        node = next((n for n in gm.graph.nodes if n.op == "output"), None)
        if node is None or not node.args:
            return None
        returned = type(node.args[0])
        if not isinstance(node.args[0], (dict, list, tuple)):
            return None
    returned = _STATIC_CONTAINERS.get(returned, returned)
    if returned is type(expected) or not isinstance(expected, (dict, list, tuple)):
        return None
    return f"output structure {returned.__name__} != {type(expected).__name__}"


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
        if key == "forward":  # set on the instance: traced into gm, and would call original
            continue
        gm.__dict__[key] = value  # config, head counts, ... read by the parent's forward
    gm.__class__ = marked_class(type(gm))
    set_state(gm, WrapperState(path if granularity == "all" else None, local))
    return gm
