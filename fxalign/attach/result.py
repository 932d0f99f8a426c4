"""Plain data that :func:`fxalign.attach.locate` returns: eager values and where the file has them.

Nothing here computes; the pipeline reads these objects and the renderers may too. Tensors are
excluded from equality (``compare=False``), so two locations compare by names and reasons.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["LocatedCall", "LocatedInput", "LocatedValue", "Location", "NodeOrigin"]


@dataclass(frozen=True)
class NodeOrigin:
    """Where one ONNX node of the file came from, for naming it in error messages.

    Attributes:
        call: Name (``path`` or ``path#k``) of the innermost module call certainly containing
            the node (``""``: the model's own code, or only the model is certain).
        source: ``file:line`` of the PyTorch code (dynamo exporter only).
    """

    call: str
    source: str | None = None


@dataclass(frozen=True)
class LocatedValue:
    """One output leaf of one module call and the ONNX tensor holding it, or why there is none.

    Attributes:
        leaf: Position inside the call's output (``""``, ``"[0]"``, ``'["logits"]'``).
        eager: The eager value, as the hooks recorded it (:func:`capture_calls`).
        tensor: Name of the ONNX tensor with the same value; ``None`` when there is none.
        reason: Why ``tensor`` is ``None`` (``"fused into blocks.0.bn"``); ``None`` otherwise.
        node: Name of the ONNX node that computes ``tensor`` (``""`` for a graph input).
        op_type: That node's operator.
        source: ``file:line`` of the PyTorch code the node came from (dynamo exporter only).
        onnx_dtype: The tensor's ONNX element type name when it differs from the eager dtype
            (a float16-converted file: ``"FLOAT16"``); ``None`` when they agree.
        candidate: With ``tensor`` ``None``: the tensor that holds this value unless the
            module reading it, which left no node of its own, was fused into this one's
            nodes. The comparison tells: the tensor is this value if their numbers agree.
        unused: With ``tensor`` ``None``: no node computes it because the model does not use
            it (no module receives it, the model does not return it, nothing says it was
            fused or folded): code the exporter removed as dead.
        as_is: With ``tensor``: the position among the call's input leaves of the input that
            ``tensor`` holds. The call left no node, and the module reading its output reads
            that input with its own weights untouched: the call computes nothing in the file,
            unless the reader's nodes took its computation up (the comparison tells).
        fused_into: With ``reason`` ``"fused into bn"``: ``(module path, call index)`` of
            the one call whose nodes compute this value with their own (``bn``'s).
    """

    leaf: str
    eager: torch.Tensor = field(compare=False, repr=False)
    tensor: str | None = None
    reason: str | None = None
    node: str | None = None
    op_type: str | None = None
    source: str | None = None
    onnx_dtype: str | None = None
    candidate: str | None = None
    unused: bool = False
    as_is: int | None = None
    fused_into: tuple[str, int] | None = None


@dataclass(frozen=True)
class LocatedInput:
    """One tensor input of one module call and the ONNX tensor entering its scope with it.

    Attributes:
        leaf: Position in the call's ``(args, kwargs)``: ``"[0]"`` for the first positional
            argument, ``'["mask"]'`` for a keyword one.
        eager: The eager value, as the hooks recorded it (:func:`capture_calls`).
        tensor: Name of the ONNX tensor the call's nodes read for it; ``None`` when unknown.
        reason: Why ``tensor`` is ``None``.
        candidate: With ``tensor`` ``None``: the :attr:`LocatedValue.candidate` of the output
            this input is, which holds it when the comparison says so.
    """

    leaf: str
    eager: torch.Tensor = field(compare=False, repr=False)
    tensor: str | None = None
    reason: str | None = None
    candidate: str | None = None


@dataclass(frozen=True)
class LocatedCall:
    """One module call of the eager forward and where its values are in the file.

    Attributes:
        path: Qualified module path (``""`` for the model itself).
        call_index: 0 for the first call of the module in the forward, 1 for the second, ...
        class_name: The module's class name.
        outputs: One entry per tensor leaf of the call's output, in pytree order.
        inputs: One entry per tensor leaf of the call's ``(args, kwargs)``.
        reason: Why the call has no output entries (it returned no tensor); ``None`` otherwise.
        args: The call's positional arguments as the module received them (tensors cloned),
            for replaying the module on ONNX values.
        kwargs: The call's keyword arguments, likewise.
    """

    path: str
    call_index: int
    class_name: str
    outputs: tuple[LocatedValue, ...]
    inputs: tuple[LocatedInput, ...] = ()
    reason: str | None = None
    args: tuple[Any, ...] = field(default=(), compare=False, repr=False)
    kwargs: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def name(self) -> str:
        """``path`` for a first call, ``path#k`` for the k-th repeated call."""
        return self.path if self.call_index == 0 else f"{self.path}#{self.call_index}"

    @property
    def located(self) -> bool:
        """Whether at least one output leaf has an ONNX tensor."""
        return any(v.tensor is not None for v in self.outputs)

    @property
    def replayable(self) -> bool:
        """Whether every tensor input has an ONNX tensor (the call can be replayed locally)."""
        return all(i.tensor is not None for i in self.inputs)


@dataclass(frozen=True)
class Location:
    """Every module call of one eager forward, located in one ONNX file.

    Attributes:
        onnx_path: The file (never modified).
        exporter: ``"dynamo"`` or ``"torchscript"``, judged from the scope information.
        producer: ``producer_name producer_version`` from the file.
        calls: Every module call in the order calls started; ``calls[0]`` is the model's own,
            whose outputs are the graph outputs.
        never_called: Paths of the modules the forward did not call.
        nodes: ``ONNX node name -> NodeOrigin`` for every named node with scope information.
        foreign_scopes: ``module scope -> number of nodes`` of the file in module scopes the
            forward never entered (dynamo: a module path; TorchScript: a scope string): the
            file was exported from another model, or the export took another branch.
        nodeless: Paths of the modules the forward called of which no node of the file is in
            the scope (nor in a nested module's), outermost only: removed or folded away by the
            exporter, or absent from the model the file was exported from. Empty when some
            node of the file has no scope information.
        unused: Those of ``nodeless`` whose every call's outputs the model drops: received by
            no module (but modules as unused) and not returned by the model, however far up
            the callers return them (a wrapper keeping one field of a ``ModelOutput``,
            ``_ = self.aux(h)``): code an exporter removes as dead, unless the model's own
            code between modules reads them.
        file_outputs: The file's graph outputs, in order (paired by position with the
            model's tensor outputs when there are as many).
    """

    onnx_path: str
    exporter: str
    producer: str
    calls: tuple[LocatedCall, ...]
    never_called: tuple[str, ...] = ()
    nodes: Mapping[str, NodeOrigin] = field(default_factory=dict, repr=False)
    foreign_scopes: Mapping[str, int] = field(default_factory=dict)
    nodeless: tuple[str, ...] = ()
    unused: tuple[str, ...] = ()
    file_outputs: tuple[str, ...] = ()

    @property
    def outputs_unpaired(self) -> str | None:
        """Why the model's outputs cannot be paired with the file's, or ``None``."""
        model_outputs = len(self.calls[0].outputs) if self.calls else 0
        if len(self.file_outputs) == model_outputs:
            return None
        names = ", ".join(repr(n) for n in self.file_outputs[:4])
        more = ", ..." if len(self.file_outputs) > 4 else ""
        return (
            f"the file has {len(self.file_outputs)} outputs ({names}{more}) for the "
            f"model's {model_outputs} tensor outputs: which of them is which is unknown"
        )

    @property
    def located_modules(self) -> int:
        """How many modules (paths, the model itself excluded) have a located output."""
        return len({c.path for c in self.calls if c.path and c.located})

    @property
    def called_modules(self) -> int:
        """How many modules (the model itself excluded) the forward called."""
        return len({c.path for c in self.calls if c.path})

    def tensor_names(self) -> list[str]:
        """Every located ONNX tensor, outputs and inputs, once each, in call order.

        Candidates (:attr:`LocatedValue.candidate`) included: the comparison needs their values.
        """
        seen: dict[str, None] = {}
        for call in self.calls:
            for v in call.outputs:
                for name in (v.tensor, v.candidate):
                    if name is not None:
                        seen.setdefault(name)
            for i in call.inputs:
                for name in (i.tensor, i.candidate):
                    if name is not None:
                        seen.setdefault(name)
        return list(seen)

    def find(self, name: str) -> LocatedCall | None:
        """The call named ``path`` or ``path#k``, if the forward made it."""
        return next((c for c in self.calls if c.name == name), None)
