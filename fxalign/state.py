"""Keep the user's model exactly as it was: buffers, parameters, submodules and attributes.

A forward may change its module: ``self.n += 1`` (an in-place write to a buffer),
``self.cache = self.cache + x`` (a new buffer object), ``BatchNorm`` in training mode
(running statistics, ``num_batches_tracked``), ``self.calls += 1`` (a plain attribute). fxalign
runs the model several times (probe, PyTorch run, export trace, more samples) and its
instrumented copies share the model's ``_buffers`` dicts, so without care each run would start
from another state, and the user's model would come back changed, or holding an FX ``Proxy``.

:class:`ModuleState` takes a snapshot of a set of modules and puts every one of them back:
before each run, so that every run starts from the user's state, and at the end.

Example:
    >>> counter = torch.nn.Module()
    >>> counter.register_buffer("n", torch.zeros(()))
    >>> state = ModuleState.snapshot([counter])
    >>> counter.n += 1; counter.extra = "x"
    >>> state.restore()
    >>> counter.n.item(), hasattr(counter, "extra")
    (0.0, False)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ModuleState"]

_CONTAINERS = (list, dict, set)


@dataclass(frozen=True)
class _Saved:
    """One module's snapshot."""

    module: torch.nn.Module
    attributes: dict[str, Any]
    containers: dict[str, Any]
    buffers: dict[str, torch.Tensor | None]
    buffer_values: dict[str, torch.Tensor]
    parameters: dict[str, torch.nn.Parameter | None]
    modules: dict[str, torch.nn.Module | None]


class ModuleState:
    """A snapshot of modules that can be put back any number of times.

    What is restored: every attribute binding in each module's ``__dict__`` (attributes added
    are removed, rebound ones get their old object back), the contents of attributes that are
    lists, dicts or sets (one level deep), the ``_buffers``, ``_parameters`` and ``_modules``
    dicts (same dict objects, same tensor and module objects) and the values of buffers
    (written back where they differ). Parameter values are not copied;
    a forward that writes a parameter in place is reported by :meth:`changed_parameters`.
    """

    def __init__(self, saved: list[_Saved], versions: dict[int, tuple[torch.Tensor, int]]) -> None:
        self._saved = saved
        self._parameter_versions = versions

    @classmethod
    def snapshot(cls, modules: Iterable[torch.nn.Module]) -> ModuleState:
        """Record the state of ``modules`` (each one once, submodules not implied)."""
        saved: list[_Saved] = []
        seen: set[int] = set()
        versions: dict[int, tuple[torch.Tensor, int]] = {}
        for module in modules:
            if id(module) in seen or isinstance(module, torch.jit.ScriptModule):
                continue  # a scripted module's state lives in C++: it is not rebound here
            seen.add(id(module))
            attributes = dict(module.__dict__)
            containers = {
                k: (type(v), list(v.items()) if isinstance(v, dict) else list(v))
                for k, v in attributes.items()
                if type(v) in _CONTAINERS and not k.startswith("_")
            }
            buffers = dict(module._buffers)
            buffer_values = {
                k: b.detach().clone()
                for k, b in buffers.items()
                if b is not None and not b.is_inference()
            }
            for p in module._parameters.values():
                if p is not None and not p.is_inference():
                    versions[id(p)] = (p, p._version)
            saved.append(
                _Saved(
                    module,
                    attributes,
                    containers,
                    buffers,
                    buffer_values,
                    dict(module._parameters),
                    dict(module._modules),
                )
            )
        return cls(saved, versions)

    def restore(self) -> None:
        """Put every recorded module back as it was when the snapshot was taken."""
        with torch.no_grad():
            for s in self._saved:
                _restore_one(s)

    def changed_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters written in place since the snapshot (by their version counters).

        A write through ``.data`` bypasses the version counter and is not seen.

        Example:
            >>> lin = torch.nn.Linear(1, 1)
            >>> state = ModuleState.snapshot([lin])
            >>> with torch.no_grad():
            ...     _ = lin.bias.add_(1)
            >>> [p is lin.bias for p in state.changed_parameters()]
            [True]
        """
        changed: dict[int, torch.nn.Parameter] = {}
        for s in self._saved:
            for p in s.parameters.values():
                if p is None:
                    continue
                known = self._parameter_versions.get(id(p))
                if known is not None and known[0] is p and p._version != known[1]:
                    changed[id(p)] = p
        return list(changed.values())


def _restore_dict(target: dict[str, Any], saved: dict[str, Any]) -> None:
    """Make ``target`` hold exactly ``saved``'s items, keeping the dict object itself."""
    if target.keys() != saved.keys() or any(target[k] is not v for k, v in saved.items()):
        target.clear()
        target.update(saved)


def _restore_one(s: _Saved) -> None:
    state = s.module.__dict__
    for name in [k for k in state if k not in s.attributes]:
        del state[name]
    for name, value in s.attributes.items():
        if state.get(name, _MISSING) is not value:
            state[name] = value
    for name, (kind, items) in s.containers.items():
        container = s.attributes[name]
        current = list(container.items()) if kind is dict else list(container)
        if len(current) != len(items) or any(
            a is not b for a, b in zip(_flat(current), _flat(items), strict=True)
        ):
            container.clear()
            if kind is dict:
                container.update(items)
            elif kind is list:
                container.extend(items)
            else:
                container.update(items)
    _restore_dict(s.module._buffers, s.buffers)
    _restore_dict(s.module._parameters, s.parameters)
    _restore_dict(s.module._modules, s.modules)
    for name, value in s.buffer_values.items():
        buffer = s.buffers[name]
        # Compared by value: kernels such as batch_norm update running statistics in place
        # without moving the version counter.
        if buffer is not None and not torch.equal(buffer, value):
            buffer.copy_(value)


def _flat(items: list[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        out.extend(item if isinstance(item, tuple) else (item,))
    return out


_MISSING = object()
