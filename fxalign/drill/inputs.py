"""The culprit call's own inputs: what one module received in one eager forward of the model.

The model runs once, eagerly, on a fresh copy of the sample. A forward pre-hook on the module
copies its positional and keyword inputs on the wanted call and stops the forward there (the
rest of the model need not run); the hook is removed and the model's state put back however
the run ends::

    model(*sample) -> ... -> module(*args, **kwargs)   <- call #call_index: copy, stop

Example:
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    >>> got = call_inputs(net, "1", 0, Sample((torch.ones(1, 2),)))
    >>> got.args[0].shape, got.kwargs
    (torch.Size([1, 2]), {})
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from fxalign.errors import UserError
from fxalign.samples import Sample
from fxalign.state import ModuleState

__all__ = ["call_inputs"]


class _Stop(Exception):
    """Raised by the hook once the inputs are copied: the rest of the forward need not run."""


def _copy(value: Any) -> Any:
    return pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), value)


def call_inputs(
    model: torch.nn.Module, module_path: str, call_index: int, sample: Sample
) -> Sample:
    """The inputs of call ``call_index`` (0-based) of module ``module_path`` on ``sample``.

    The model's state (buffers, attributes, hooks) is as it was afterwards; ``sample`` is not
    handed to the model (a fresh copy is).

    Args:
        model: The user's model, in the mode it is compared in.
        module_path: The module, as in ``named_modules()`` (``""``: the model itself).
        call_index: Which call of it within the forward.
        sample: The model's inputs.

    Returns:
        A :class:`Sample` of private copies of the call's tensors (other values shared).

    Raises:
        UserError: No such module, or the forward made fewer calls of it.
    """
    try:
        module = model.get_submodule(module_path)
    except AttributeError as e:
        raise UserError(f"no module {module_path!r} in {type(model).__name__}") from e
    seen = 0
    captured: list[Sample] = []

    def hook(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        nonlocal seen
        if seen == call_index:
            captured.append(Sample(tuple(_copy(args)), dict(_copy(kwargs))))
            raise _Stop
        seen += 1

    state = ModuleState.snapshot(model.modules())
    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    fresh = sample.fresh()
    try:
        with torch.no_grad():
            model(*fresh.args, **fresh.kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
        state.restore()
    if not captured:
        raise UserError(
            f"the forward made {seen} call(s) of {module_path or '(model)'}, not "
            f"{call_index + 1}: its inputs could not be captured"
        )
    return captured[0]
