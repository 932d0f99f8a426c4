"""Callables in shallow copies of modules, made to call the copies instead of the originals.

A shallow copy of a module shares its ``__dict__`` entries, so a ``forward`` set on the instance
(``blk.forward = types.MethodType(f, blk)``) still calls ``blk``, the user's module, and through
it the user's children: nothing fxalign put in the copied tree runs. :func:`rebind_to_copies`
replaces such callables in the copies by new ones bound to the copies; the user's objects are
not changed.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["rebind_to_copies"]


_NOT_REBOUND = frozenset({"_modules", "_parameters", "_buffers"})
_CALLABLES = (types.MethodType, functools.partial, types.FunctionType)


def rebind_to_copies(copies: Mapping[int, torch.nn.Module]) -> None:
    """Make the callables in the copies' ``__dict__`` call the copies, not the user's modules.

    Each attribute that is a method bound to a module of ``copies``, a ``functools.partial``
    given one (accelerate's ``partial(new_forward, module)``, and the ``_old_forward`` method it
    calls), or a closure holding one or such a callable (``old = m.forward;
    m.forward = lambda x: old(x)``) is replaced by a new one bound to that module's copy. Any
    other value is kept as it is, modules held outside ``_modules`` included.

    Args:
        copies: ``id(user's module) -> its shallow copy``, for every copy of the tree: the
            copies' entries are rebound, and the modules they may be bound to are these.
    """
    seen: dict[int, Any] = {}
    for copy in copies.values():
        for key, value in list(copy.__dict__.items()):
            if key not in _NOT_REBOUND and isinstance(value, _CALLABLES):
                rebound = _rebound(value, copies, seen)
                if rebound is not value:
                    copy.__dict__[key] = rebound


def _rebound(value: Any, copies: Mapping[int, torch.nn.Module], seen: dict[int, Any]) -> Any:
    """``value`` with the modules of ``copies`` it is bound to replaced by their copies.

    Returns ``value`` itself when it holds none of them. ``seen`` maps the callables already
    looked at to their result (a closure that refers to itself is looked at once).
    """
    if isinstance(value, torch.nn.Module):
        return copies.get(id(value), value)
    if not isinstance(value, _CALLABLES):
        return value
    if id(value) in seen:
        return seen[id(value)]
    seen[id(value)] = value  # while looking inside: a cycle back to it keeps it
    result = value
    if isinstance(value, types.MethodType):
        owner = _rebound(value.__self__, copies, seen)
        if owner is not value.__self__:
            result = types.MethodType(value.__func__, owner)
    elif isinstance(value, functools.partial):
        result = _rebound_partial(value, copies, seen)
    elif value.__closure__:
        result = _rebound_closure(value, copies, seen)
    seen[id(value)] = result
    return result


def _rebound_partial(
    value: functools.partial[Any], copies: Mapping[int, torch.nn.Module], seen: dict[int, Any]
) -> Any:
    """A new partial over the :func:`_rebound` function and arguments, if one of them changed.

    The attributes ``functools.update_wrapper`` set (``__wrapped__``, ``__name__``, ...) are
    carried over, ``__wrapped__`` rebound too.
    """
    func = _rebound(value.func, copies, seen)
    args = tuple(_rebound(a, copies, seen) for a in value.args)
    keywords = {k: _rebound(v, copies, seen) for k, v in value.keywords.items()}
    same_args = all(new is old for new, old in zip(args, value.args, strict=True))
    same_keywords = all(keywords[k] is v for k, v in value.keywords.items())
    if func is value.func and same_args and same_keywords:
        return value
    result = functools.partial(func, *args, **keywords)
    result.__dict__.update({k: _rebound(v, copies, seen) for k, v in value.__dict__.items()})
    return result


def _rebound_closure(
    value: types.FunctionType, copies: Mapping[int, torch.nn.Module], seen: dict[int, Any]
) -> Any:
    """A new function over the same code whose cells hold :func:`_rebound` contents.

    Cells whose contents are unchanged are shared with ``value`` (a ``nonlocal`` the function
    writes stays one variable); the function's attributes (``__wrapped__``, ...) are copied.
    """
    closure = value.__closure__ or ()
    cells = []
    for cell in closure:
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell
            cells.append(cell)
            continue
        rebound = _rebound(contents, copies, seen)
        cells.append(cell if rebound is contents else types.CellType(rebound))
    if all(new is old for new, old in zip(cells, closure, strict=True)):
        return value
    result = types.FunctionType(
        value.__code__, value.__globals__, value.__name__, value.__defaults__, tuple(cells)
    )
    result.__kwdefaults__ = value.__kwdefaults__
    result.__qualname__, result.__doc__ = value.__qualname__, value.__doc__
    result.__module__, result.__annotations__ = value.__module__, value.__annotations__
    result.__dict__.update({k: _rebound(v, copies, seen) for k, v in value.__dict__.items()})
    return result
