"""Stage 1: put a marker after every module call, without touching the user's model.

Two strategies, tried in this order:

**FX** (``method="fx"``, :mod:`fxalign.instrument.fx`): ``torch.fx`` traces the whole model.
Every ``call_module`` node (a leaf module in FX's sense: ``torch.nn`` built-ins such as Conv2d,
Linear, LSTM) gets a marker, and, with ``granularity="all"``, so does the one value that leaves
each user-defined block::

    prev -> node -> debug_apply(node, "layer1.0.conv1") -> users of node

With example inputs, the traced module must reproduce the model's outputs.

**Fallback** (``method="fallback"``, :mod:`fxalign.instrument.fallback`): when tracing fails
(Hugging Face transformers, detection models, data-dependent Python control flow) or the traced
module does not compute what the model does, every module is first replaced by an *eager
wrapper*: a shallow copy (same parameters, buffers and attributes) whose class is a subclass of
the original with a ``forward`` that calls the original one and marks the call. Then, given
example inputs, each block is traced with FX on its own, on the arguments a probe run recorded;
a block whose trace reproduces its recorded output is replaced by the traced module, the others
keep running their own ``forward`` and their children are tried. Every module that runs (leaves
and blocks) gets a marker, structured outputs included.

Either way the result shares parameters with the user's model, and the user's model objects are
never modified. What was done is an :class:`~fxalign.instrument.result.InstrumentResult`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from fxalign.errors import InputError, InstrumentationError
from fxalign.instrument.fallback import instrument_fallback
from fxalign.instrument.fx import check_equivalent, instrument_fx
from fxalign.instrument.result import Granularity, InstrumentResult, first_line, module_facts

__all__ = ["instrument", "instrument_model"]

logger = logging.getLogger(__name__)

Method = Literal["auto", "fx", "fallback"]


def instrument(
    model: torch.nn.Module,
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    *,
    granularity: Granularity = "all",
    method: Method = "auto",
    local: bool = True,
) -> torch.nn.Module:
    """Return a copy of ``model`` with a marker after every module call.

    Args:
        model: The model. It is not modified; the result shares its parameters.
        args: Example positional inputs. When given (with ``kwargs``), parameters of ``forward``
            that they leave out are fixed to their defaults and non-tensor arguments to the
            values given, so that FX does not trace optional inputs as tensors, and the traced
            module is checked to compute what the model does on these inputs.
        kwargs: Example keyword inputs.
        granularity: ``"all"`` (default) marks blocks too; ``"leaf"`` marks leaf modules only.
        method: ``"auto"`` tries FX and falls back to eager wrappers; ``"fx"`` or ``"fallback"``
            force one strategy.
        local: Also mark each marked module call's inputs (``path:in[0]``, ...), which the
            local-error replay needs.

    Returns:
        A module that computes what ``model`` computes: a ``torch.fx.GraphModule`` when FX
        traced the model, else (the fallback) a shallow copy of the model whose modules mark
        their outputs. Either shares the model's parameters.

    Raises:
        InstrumentationError: ``method="fx"`` and the model cannot be traced, or nothing works.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> gm = instrument(net)
        >>> "mark_output" in gm.code
        True
    """
    return instrument_model(
        model, args, kwargs, granularity=granularity, method=method, local=local
    ).module


def instrument_model(
    model: torch.nn.Module,
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    *,
    granularity: Granularity = "all",
    method: Method = "auto",
    local: bool = True,
) -> InstrumentResult:
    """Like :func:`instrument`, returning the module together with what was done.

    Args:
        model: The model; not modified.
        args: Example positional inputs (see :func:`instrument`).
        kwargs: Example keyword inputs.
        granularity: ``"all"`` or ``"leaf"``.
        method: ``"auto"``, ``"fx"`` or ``"fallback"``.
        local: Also mark module inputs (see :func:`instrument`).

    Returns:
        An :class:`~fxalign.instrument.result.InstrumentResult`.

    Raises:
        InstrumentationError: The model cannot be instrumented with the requested method.
    """
    if not isinstance(model, torch.nn.Module):
        raise InstrumentationError(
            f"expected a torch.nn.Module, got {type(model).__name__}",
            hint="wrap a function in an nn.Module whose forward calls it",
        )
    if granularity not in ("all", "leaf"):
        raise InstrumentationError(
            f"unknown granularity {granularity!r}", hint="use 'all' or 'leaf'"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise InstrumentationError(
            f"{type(model).__name__} is a torch.jit.script module: fxalign needs the Python "
            "module to put markers in it",
            hint="pass the nn.Module from before torch.jit.script (scripted submodules are "
            "fine: they are run as they are and marked as one call)",
        )
    facts = module_facts(model)
    fx_error = "eager wrappers requested (method='fallback')" if method == "fallback" else None
    if method in ("auto", "fx"):
        traced, fx_error = _try_fx(model, args, kwargs, granularity, method, local)
        if traced is not None:
            gm, unmarked = traced
            unmarked = {**facts.alias_notes, **unmarked}
            return InstrumentResult(
                gm, "fx", granularity, facts.module_types, facts.leaf_paths, None, unmarked, [""]
            )
    built = instrument_fallback(model, args, kwargs, granularity, local)
    return InstrumentResult(
        built.module,
        "fallback",
        granularity,
        facts.module_types,
        facts.leaf_paths,
        fx_error,
        {**facts.alias_notes, **built.unmarked},
        built.traced,
        {"": fx_error or "", **built.eager},
    )


def _try_fx(
    model: torch.nn.Module,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    granularity: Granularity,
    method: Method,
    local: bool,
) -> tuple[tuple[torch.nn.Module, dict[str, str]] | None, str]:
    """Trace the whole model: ``((module, unmarked), "")``, or ``(None, why not)``.

    Raises:
        InstrumentationError: ``method="fx"`` and tracing fails or gives another result.
        InputError: The inputs do not fit the model's ``forward``.
    """
    try:
        gm, unmarked = instrument_fx(model, args, kwargs, granularity, local=local)
    except InputError:
        raise
    except Exception as e:
        fx_error = first_line(e)
        if method == "fx":
            raise InstrumentationError(
                f"torch.fx could not trace {type(model).__name__}: {fx_error}",
                hint="use method='auto' to fall back to eager wrappers",
            ) from e
        logger.info("FX tracing failed (%s); using eager wrappers", fx_error)
        return None, fx_error
    mismatch = check_equivalent(model, gm, args, kwargs)
    if mismatch is None:
        return (gm, unmarked), ""
    if method == "fx":
        raise InstrumentationError(
            f"torch.fx traced {type(model).__name__} incorrectly: {mismatch}",
            hint="the model has data-dependent control flow; use method='auto'",
        )
    fx_error = f"traced module does not reproduce the model: {mismatch}"
    logger.info("%s; using eager wrappers", fx_error)
    return None, fx_error
