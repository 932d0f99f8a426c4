"""Lookups over one file and one captured forward that pairing asks again and again.

Which nodes and values each call contains (a node counts for its call and every call around
it), who reads each value, which values leave or enter a call's scope, and whether the users of
a value received a given eager value: built once, read by :mod:`fxalign.attach.pairing`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import onnx
import torch

from fxalign.attach.hooks import CallCapture, ModuleCall, TensorLeaf
from fxalign.attach.mapping import UNSCOPED, CallMap
from fxalign.attach.result import LocatedValue
from fxalign.attach.scopes import FileScopes, ValueType

__all__ = ["Index", "type_agreement"]

_TORCH_OF_ONNX: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
    onnx.TensorProto.COMPLEX64: torch.complex64,
    onnx.TensorProto.COMPLEX128: torch.complex128,
}


def type_agreement(vt: ValueType | None, leaf: TensorLeaf) -> tuple[bool, str | None]:
    """Whether an ONNX value's type fits an eager tensor; the file's dtype name if converted.

    Example:
        >>> from fxalign.attach.hooks import TensorLeaf
        >>> leaf = TensorLeaf((), "", torch.zeros(2, 3), "")
        >>> type_agreement(ValueType(onnx.TensorProto.FLOAT16, (None, 3)), leaf)
        (True, 'FLOAT16')
    """
    if vt is None or vt.elem_type is None or vt.shape is None:
        return False, None
    if len(vt.shape) != leaf.value.dim():
        return False, None
    if any(d is not None and d != s for d, s in zip(vt.shape, leaf.shape, strict=True)):
        return False, None
    dtype = _TORCH_OF_ONNX.get(vt.elem_type)
    if dtype == leaf.dtype:
        return True, None
    if dtype is not None and dtype.is_floating_point and leaf.dtype.is_floating_point:
        return True, onnx.TensorProto.DataType.Name(vt.elem_type)
    return False, None


@dataclass
class Index:
    """Lookups over the file and the capture, built once (:meth:`build`).

    Attributes:
        producer: ``value -> index of the node computing it``.
        consumers: ``value -> indices of the nodes reading it``.
        output_at: ``value -> its positions among the graph outputs``.
        nodes_of: Per call: the nodes inside it (its own and those of calls inside it).
        owned_of: Per call: the values computed inside it.
        input_ids: Per call: value ids of its eager tensor inputs.
        absorbed: Per call: calls without nodes fused into it (it reads their weights).
    """

    scopes: FileScopes
    capture: CallCapture
    cmap: CallMap
    parameters: Mapping[str, frozenset[str]]
    producer: dict[str, int] = field(default_factory=dict)
    consumers: dict[str, list[int]] = field(default_factory=dict)
    output_at: dict[str, list[int]] = field(default_factory=dict)
    nodes_of: list[list[int]] = field(default_factory=list)
    owned_of: list[list[str]] = field(default_factory=list)
    input_ids: list[set[str]] = field(default_factory=list)
    absorbed: list[set[int]] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        scopes: FileScopes,
        capture: CallCapture,
        cmap: CallMap,
        parameters: Mapping[str, frozenset[str]],
    ) -> Index:
        """Index ``scopes`` as mapped onto ``capture`` by ``cmap``."""
        ix = cls(scopes, capture, cmap, parameters)
        n = len(capture.calls)
        ix.nodes_of = [[] for _ in range(n)]
        ix.owned_of = [[] for _ in range(n)]
        for node in scopes.nodes:
            for out in node.outputs:
                ix.producer[out] = node.index
            for name in dict.fromkeys(node.inputs):
                ix.consumers.setdefault(name, []).append(node.index)
            call = cmap.node_call[node.index]
            if call != UNSCOPED:
                for a in cmap.ancestors[call]:
                    ix.nodes_of[a].append(node.index)
        for value, owner in cmap.value_owner.items():
            if owner != UNSCOPED:
                for a in cmap.ancestors[owner]:
                    ix.owned_of[a].append(value)
        for i, name in enumerate(scopes.graph_outputs):
            ix.output_at.setdefault(name, []).append(i)
        ix.input_ids = [
            {leaf.value_id for leaf in c.inputs if leaf.value_id} for c in capture.calls
        ]
        ix._absorb()
        return ix

    def zero_node(self, call: int) -> bool:
        """Whether no node and no value of the file belongs to ``call`` or calls inside it."""
        return not self.nodes_of[call] and not self.owned_of[call]

    def outside(self, call: int, node: int) -> bool:
        """Whether ``node`` lies outside ``call``'s scope (nodes without scope always do)."""
        return not self.cmap.inside(call, self.cmap.node_call[node])

    def escaping(self, call: int) -> list[str]:
        """Values computed inside ``call`` and used outside it."""
        return [
            v
            for v in self.owned_of[call]
            if v in self.output_at or any(self.outside(call, j) for j in self.consumers.get(v, []))
        ]

    def entering(self, call: int) -> list[str]:
        """Non-constant values read inside ``call`` and computed outside it (or graph inputs)."""
        seen: dict[str, None] = {}
        for j in self.nodes_of[call]:
            for name in self.scopes.nodes[j].inputs:
                if name in self.scopes.constants or name in seen:
                    continue
                owner = self.cmap.value_owner.get(name)
                if owner is None or not self.cmap.inside(call, owner):
                    seen[name] = None
        return list(seen)

    def verdict(self, value: str, leaf: TensorLeaf, call: int) -> str:
        """Do the value's users agree that it is ``leaf``, computed in ``call``?

        ``"refuted"``: a module reading it received another value (or a graph output holds
        another); ``"confirmed"``: one did receive ``leaf`` and none refutes; ``"unknown"``:
        nodes without scope read it (renamed by a later tool: they may belong to ``call``);
        ``"neutral"``: only the code of calls around ``call`` reads it.
        """
        confirmed = unknown = False
        ancestors = self.cmap.ancestors
        for j in self._readers(value):
            user = self.cmap.node_call[j]
            if not self.outside(call, j) or user in ancestors[call]:
                continue
            if user == UNSCOPED:
                unknown = True
                continue
            common = ancestors[call] & ancestors[user]
            if all(
                self.receives(a, leaf.value_id) or self._receives_a_copy(a, leaf)
                for a in ancestors[user] - common
            ):
                confirmed = True
            else:
                return "refuted"
        outputs = self.capture.outputs
        if len(outputs) == len(self.scopes.graph_outputs):
            for g in self._graph_outputs(value):
                if outputs[g].value_id != leaf.value_id:
                    return "refuted"
                confirmed = True
        return "confirmed" if confirmed else "unknown" if unknown else "neutral"

    def refuting_output(self, value: str, leaf: TensorLeaf) -> str | None:
        """A graph output holding ``value`` that stands for another model output than ``leaf``.

        ``leaf`` is a model output at another position than the graph output holding
        ``value``: the file's outputs are in another order. Returns the name of the model
        output at that graph output's position (``"[1]"``), or ``None``: no graph output holds
        ``value``, it is ``leaf``'s own position, or ``leaf`` is no model output at all (then
        nothing says the outputs were reordered).
        """
        outputs = self.capture.outputs
        if len(outputs) != len(self.scopes.graph_outputs):
            return None
        if not any(o.value_id == leaf.value_id for o in outputs):
            return None
        for g in self._graph_outputs(value):
            if outputs[g].value_id != leaf.value_id:
                return outputs[g].name or f"[{g}]"
        return None

    def _through_casts(self, value: str) -> list[str]:
        """``value`` and what unscoped Cast and Identity nodes (float16 I/O casts) make of it."""
        out, todo = [value], [value]
        while todo and len(out) < 16:
            for j in self.consumers.get(todo.pop(), []):
                node = self.scopes.nodes[j]
                if not node.scoped and node.op_type in ("Cast", "Identity"):
                    out.extend(node.outputs)
                    todo.extend(node.outputs)
        return out

    def _readers(self, value: str) -> list[int]:
        """Nodes reading ``value``, looking through unscoped casts."""
        found = []
        for v in self._through_casts(value):
            for j in self.consumers.get(v, []):
                node = self.scopes.nodes[j]
                if node.scoped or node.op_type not in ("Cast", "Identity"):
                    found.append(j)
        return found

    def _graph_outputs(self, value: str) -> list[int]:
        return [g for v in self._through_casts(value) for g in self.output_at.get(v, [])]

    def _receives_a_copy(self, call: int, leaf: TensorLeaf) -> bool:
        """Whether ``call`` takes an exact copy of ``leaf`` (``torch.cat([x])``, ``x.clone()``).

        Code that copies a value unchanged between two modules leaves no node in an export
        (the dynamo exporter drops a one-tensor concat): the reader's scope then reads the
        value itself, as the reader, in the eager run, read its copy.
        """
        mine = leaf.value
        return any(
            x.value_id != leaf.value_id
            and x.value.shape == mine.shape
            and x.value.dtype == mine.dtype
            and bool(torch.equal(x.value, mine))
            for x in self.capture.calls[call].inputs
        )

    def receives(self, call: int, value_id: str) -> bool:
        """Whether ``call`` takes the value as input, itself or through a module it absorbed."""
        if value_id in self.input_ids[call]:
            return True
        return any(value_id in self.input_ids[z] for z in self.absorbed[call])

    def _absorb(self) -> None:
        """Find the modules without nodes fused into the module that reads their output.

        The dynamo exporter's optimizer folds ``bn(conv(x))`` into a Conv node in ``bn``'s scope
        that reads ``conv``'s weights: ``conv`` has no node, and ``bn``'s scope reads ``conv``'s
        input. Such a reader is recognised by the absorbed module's parameters among its inputs.
        """
        calls = self.capture.calls
        self.absorbed = [set() for _ in calls]
        for z in calls:
            if not self.zero_node(z.index) or not z.outputs:
                continue
            params = self.parameters.get(z.path, frozenset())
            if not params:
                continue
            produced = {leaf.value_id for leaf in z.outputs}
            for y in calls[z.index + 1 :]:
                if not produced & self.input_ids[y.index]:
                    continue
                read = {n for j in self.nodes_of[y.index] for n in self.scopes.nodes[j].inputs}
                if params & read:
                    self.absorbed[y.index].add(z.index)

    def weights_rewritten(self, call: ModuleCall) -> bool:
        """Whether some parameter of the module is not read by its nodes under its own name."""
        params = self.parameters.get(call.path, frozenset())
        used = {name for j in self.nodes_of[call.index] for name in self.scopes.nodes[j].inputs}
        return bool(params) and not params <= used

    def value(self, leaf: TensorLeaf, tensor: str, converted: str | None) -> LocatedValue:
        """``leaf`` paired with ``tensor``, with the node that computes it."""
        node = self.producer.get(tensor)
        info = None if node is None else self.scopes.nodes[node]
        return LocatedValue(
            leaf.name,
            leaf.value,
            tensor,
            None,
            "" if info is None else info.name,
            None if info is None else info.op_type,
            None if info is None else info.source,
            converted,
        )
