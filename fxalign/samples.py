"""Input samples: what :func:`fxalign.align` accepts as inputs, checked and privately copied.

A forward may write its inputs in place (``x.mul_(2)``, or an attribute of an object it is
given), so every run fxalign makes (probe, PyTorch run, export trace, each further sample and
batch) gets its own copy of the inputs (:meth:`Sample.fresh`), and the user's own tensors and
objects are never handed to the model.

Example:
    >>> x = torch.ones(2)
    >>> sample = Sample.of((x,), {})
    >>> copy = sample.fresh()
    >>> copy.args[0] is x, torch.equal(copy.args[0], x)
    (False, True)
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from fxalign.errors import InputError

__all__ = ["Sample", "aliased_copies", "as_sample"]

logger = logging.getLogger(__name__)


def _copy(t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return t.detach().clone()


def aliased_copies(leaves: list[Any]) -> dict[int, torch.Tensor]:
    """``id(tensor) -> its copy`` for the tensor leaves; copies share memory as the originals do.

    A tensor given twice gets one copy. Plain strided tensors on one storage get one copy of
    the storage, each rebuilt on it with its own offset, size and stride; any other tensor
    (a subclass, sparse, nested, quantized) is cloned on its own.

    Example:
        >>> x = torch.zeros(4)
        >>> copies = aliased_copies([x, x[:2]])
        >>> a, b = copies.values()
        >>> _ = b.add_(1)
        >>> a.tolist(), x.tolist()
        ([1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0])
    """
    unique = {id(t): t for t in leaves if isinstance(t, torch.Tensor)}
    by_storage: dict[tuple[str, int], list[torch.Tensor]] = {}
    copies: dict[int, torch.Tensor] = {}
    for key, t in unique.items():
        plain = type(t) is torch.Tensor and t.layout == torch.strided and not t.is_quantized
        address = t.untyped_storage().data_ptr() if plain and t.device.type != "meta" else 0
        if address:
            by_storage.setdefault((str(t.device), address), []).append(t)
        else:
            copies[key] = _copy(t)
    for group in by_storage.values():
        if len(group) == 1:
            copies[id(group[0])] = _copy(group[0])
            continue
        storage = group[0].untyped_storage().clone()
        for t in group:
            view = torch.empty(0, dtype=t.dtype, device=t.device)
            copies[id(t)] = view.set_(storage, t.storage_offset(), t.size(), t.stride())
    return copies


@dataclass(frozen=True)
class Sample:
    """One input sample: positional and keyword inputs.

    Attributes:
        args: Positional inputs.
        kwargs: Keyword inputs.
    """

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, args: Any, kwargs: Mapping[str, Any] | None = None) -> Sample:
        """A private copy of ``args`` (a tensor, tuple or list) and ``kwargs``."""
        return cls(_as_args(args), dict(kwargs or {})).fresh()

    def fresh(self) -> Sample:
        """A copy with every tensor cloned (detached) and every other object deep-copied.

        Tensors in containers ``torch.utils._pytree`` knows (tuples, lists, dicts, registered
        classes) are cloned, inputs that share memory (one tensor passed twice, a tensor and a
        view of it) sharing it in the copy too, so that a write through one reaches the other
        as in the user's call. Any other object (one a forward may change: a cache, a
        counter, a tensor held in an attribute) is deep-copied, objects shared between inputs
        staying shared; immutable values (numbers, strings, ``None``) are themselves. An
        object ``copy.deepcopy`` refuses is shared as it is.

        Example:
            >>> class Box:
            ...     def __init__(self):
            ...         self.t = torch.zeros(1)
            >>> box = Box()
            >>> copied = Sample((box, box), {}).fresh()
            >>> copied.args[0] is box, copied.args[0] is copied.args[1]
            (False, True)
        """
        memo: dict[int, Any] = {}
        tensors = aliased_copies(pytree.tree_leaves((self.args, self.kwargs)))

        def fresh_leaf(leaf: Any) -> Any:
            if isinstance(leaf, torch.Tensor):
                return tensors[id(leaf)]
            try:
                return copy.deepcopy(leaf, memo)
            except Exception as e:  # any object's own refusal to be copied
                logger.warning(
                    "an input %s cannot be copied (%s: %s): every run gets your object itself, "
                    "so a forward that changes it changes yours",
                    type(leaf).__name__,
                    type(e).__name__,
                    e,
                )
                return leaf

        args, kwargs = pytree.tree_map(fresh_leaf, (self.args, self.kwargs))
        return Sample(tuple(args), dict(kwargs))

    def check(self, model: torch.nn.Module, index: int = 0) -> None:
        """Raise :class:`InputError` unless the inputs bind to ``model.forward``'s signature."""
        try:
            sig = inspect.signature(model.forward)
        except (TypeError, ValueError):  # builtins without a signature: let the call decide
            return
        try:
            sig.bind(*self.args, **self.kwargs)
        except TypeError as e:
            which = f"sample {index}: " if index else ""
            raise InputError(
                f"{which}inputs do not fit {type(model).__name__}.forward{sig}: {e}",
                hint="pass positional inputs as args and keyword inputs as kwargs",
            ) from e


def _as_args(args: Any) -> tuple[Any, ...]:
    if isinstance(args, tuple):
        return args
    if isinstance(args, list):
        return tuple(args)
    return (args,)


def as_sample(value: Any) -> Sample:
    """A private copy of one sample given as a :class:`Sample`, a tensor, a tuple/list or a dict.

    Example:
        >>> as_sample({"mask": torch.ones(1)}).kwargs.keys()
        dict_keys(['mask'])
    """
    if isinstance(value, Sample):
        return value.fresh()
    if isinstance(value, dict):
        return Sample((), dict(value)).fresh()
    return Sample.of(value)
