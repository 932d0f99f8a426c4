"""Pair each eager module output with the one ONNX tensor that holds it, or say why none does.

A call's output in the file is a value computed inside its scope and used outside it (by a
node of another scope, or as a graph output). Such a value is paired with an output leaf only
when nothing argues against it:

- its type agrees: same rank, same static dimensions (dynamic ones match any size), same
  dtype, or both floating point (a float16-converted file; the file's dtype is recorded);
- its consumers agree: every call outside the scope that reads it received the leaf's value as
  an input in the eager run (a graph output must be the model output with that value);
- it is the only such value, or the only one a consumer confirms.

A value whose consumers received *another* value sits behind a module that left no node of its
own: ``conv -> bn -> relu`` where the exporter fused the batch norm into the convolution's
weights. The tensor leaving ``conv``'s scope is then ``bn``'s output; it is paired with ``bn``
when ``conv``'s own weights were rewritten (its parameters are missing from the file), and
``conv`` says ``"fused into bn"``; without rewritten weights, when the modules reading the
tensor received ``bn``'s output in the eager run. The same tensor is ``conv``'s output too if
``bn`` computes nothing in the file (an ``Identity`` translation the optimizer removed): that
is left to the values (:attr:`~fxalign.attach.LocatedValue.candidate`), as a weight transposed
and renamed by the exporter looks rewritten too. Modules without nodes say where their value
went: removed (an Identity or eval Dropout returns its input), fused into the module that
consumes it, constant-folded, or optimised away.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from fxalign.attach.hooks import CallCapture, ModuleCall, TensorLeaf
from fxalign.attach.index import Index, type_agreement
from fxalign.attach.mapping import UNSCOPED, CallMap, is_noop
from fxalign.attach.result import LocatedCall, LocatedInput, LocatedValue
from fxalign.attach.scopes import FileScopes
from fxalign.torch_run import to_numpy

__all__ = ["pair_calls"]

logger = logging.getLogger(__name__)


UNUSED = (
    "no node of its scope is in the file, and no module receives its output nor does the model "
    "return it: removed by the exporter as unused code, unless the model's own code reads it "
    "(hooks see only module calls): then an optimizer merged it into the nodes reading its "
    "input, or the file is another version's"
)
"""The reason of a :attr:`~fxalign.attach.LocatedValue.unused` value."""


def _joined_names(names: Sequence[str], shown: int = 3) -> str:
    return ", ".join(repr(n) for n in names[:shown]) + (", ..." if len(names) > shown else "")


def _describe(leaf: TensorLeaf) -> str:
    return f"shape {list(leaf.shape)} and dtype {str(leaf.dtype).removeprefix('torch.')}"


class _Pairer:
    """Pairs every call's outputs, then explains the calls without nodes, then the inputs."""

    def __init__(self, ix: Index, dead: frozenset[int] = frozenset()) -> None:
        self.ix = ix
        self.dead = dead
        self.calls = ix.capture.calls
        self.outputs: dict[tuple[int, str], LocatedValue] = {}
        self.candidates: dict[tuple[int, str], str] = {}  # see LocatedValue.candidate
        self.transfers: dict[tuple[int, str], tuple[str, str | None, str]] = {}
        self.blame: dict[int, str] = {}  # zero-node call -> reason set by a neighbour
        self.fused: dict[tuple[int, str], ModuleCall] = {}  # see LocatedValue.fused_into
        # zero-node call -> (value id of its input, the tensor holding that input if the
        # values say the call computes nothing in the file)
        self.input_candidates: dict[int, tuple[str, str]] = {}
        # zero-node call -> (the tensor its reader reads, its input values that tensor holds):
        # the call computes nothing in the file (_read_unchanged)
        self.unchanged: dict[int, tuple[str, set[str]]] = {}
        # (call, output leaf) returning one of the call's inputs unchanged: paired with the
        # tensor that input is located in, once inputs are located
        self.passed_through: list[tuple[ModuleCall, TensorLeaf]] = []
        # block outputs returned from a call that may be unused, decided after that call
        self.deferred: list[tuple[ModuleCall, TensorLeaf, Sequence[str], int]] = []

    def run(self) -> tuple[LocatedCall, ...]:
        self._root()
        for call in self.calls[1:]:
            self._call(call)
        for call in self.calls[1:]:
            if self.ix.zero_node(call.index) and call.index not in self.ix.cmap.ambiguous:
                self._zero_node(call)
        self._settle_deferred()
        self._by_identity()
        known = self._known_names()
        ambiguous = self.ix.cmap.ambiguous
        inputs = {c.index: self._inputs(c, known) for c in self.calls if c.index not in ambiguous}
        self._passed_through(inputs)
        entered: dict[str, set[str]] = {}  # value id -> tensors located as an input holding it
        for index, located in inputs.items():
            for leaf, value in zip(self.calls[index].inputs, located, strict=True):
                if value.tensor is not None:
                    entered.setdefault(leaf.value_id, set()).add(value.tensor)
        holders = {v: set(names) for v, names in entered.items()}  # value id -> tensors
        for name, ids in known.items():
            for v in ids:
                holders.setdefault(v, set()).add(name)
        for index in ambiguous:
            inputs[index] = tuple(_input_by_identity(x, holders) for x in self.calls[index].inputs)
            self._output_read_as_input(self.calls[index], entered)
        return tuple(self._located(call, inputs[call.index]) for call in self.calls)

    def _by_identity(self) -> None:
        """Outputs of calls the file cannot tell apart, paired through another call's output.

        Calls of one module made back to back (``f(f(x))``, a shared layer applied in a loop)
        leave one run of nodes: which nodes are which call's is not in the file. An output of
        such a call that is the very tensor another call returned (a block returns its last
        layer's output; the model returns the last call's), at the same version, is the value
        that call's output was paired with: it is paired with it too.
        """
        held: dict[str, LocatedValue] = {}
        for call in self.calls:
            if call.index in self.ix.cmap.ambiguous:
                continue
            for leaf in call.outputs:
                located = self.outputs.get((call.index, leaf.name))
                if located is not None and located.tensor is not None:
                    held.setdefault(leaf.value_id, located)
        for index in sorted(self.ix.cmap.ambiguous):
            call = self.calls[index]
            for leaf in call.outputs:
                found = held.get(leaf.value_id)
                if found is not None:
                    self.outputs[(index, leaf.name)] = dataclasses.replace(
                        found, leaf=leaf.name, eager=leaf.value
                    )

    def _output_read_as_input(self, call: ModuleCall, entered: Mapping[str, set[str]]) -> None:
        """Outputs of a call the file cannot tell apart that a located call's input holds.

        ``f(f(x))`` followed by ``g``: the outer call's output is the very tensor ``g``
        received, so the one tensor entering ``g``'s scope with it is that output.
        """
        for leaf in call.outputs:
            located = self.outputs.get((call.index, leaf.name))
            if located is None or located.tensor is None:
                self._pair_with_sole(call, leaf, entered.get(leaf.value_id, set()))

    def _pair_with_sole(self, call: ModuleCall, leaf: TensorLeaf, holding: set[str]) -> None:
        """``leaf`` paired with the one tensor of ``holding``, if one and of its type."""
        if len(holding) != 1:
            return
        (tensor,) = holding
        ok, converted = type_agreement(self.ix.scopes.types.get(tensor), leaf)
        if ok:
            self.outputs[(call.index, leaf.name)] = self.ix.value(leaf, tensor, converted)

    def _passed_through(self, inputs: Mapping[int, tuple[LocatedInput, ...]]) -> None:
        """Outputs that are one of the call's inputs, unchanged: paired with that input's tensor.

        ``return self.lin(x), x``: the second output is no tensor computed in the scope (the
        ``Gemm`` output leaving it has the same type by chance); it is the tensor the call's
        input was located in, or stays unpaired.
        """
        for call, leaf in self.passed_through:
            held = {
                located.tensor
                for x, located in zip(call.inputs, inputs.get(call.index, ()), strict=True)
                if x.value_id == leaf.value_id and located.tensor is not None
            }
            self._pair_with_sole(call, leaf, held)

    def _set(
        self, call: ModuleCall, leaf: TensorLeaf, reason: str, *, unused: bool = False
    ) -> None:
        fused = self.fused.pop((call.index, leaf.name), None)
        self.outputs[(call.index, leaf.name)] = LocatedValue(
            leaf.name,
            leaf.value,
            reason=reason,
            unused=unused,
            fused_into=None if fused is None else (fused.path, fused.call_index),
        )

    def _fused(self, call: ModuleCall, leaf: TensorLeaf, into: ModuleCall) -> str:
        """``"fused into <into>"``, noted for :attr:`LocatedValue.fused_into`."""
        self.fused[(call.index, leaf.name)] = into
        return f"fused into {into.name}"

    def _producer(self, call: ModuleCall, leaf: TensorLeaf) -> int | None:
        """The innermost call inside ``call`` that returned ``leaf``'s value, if any."""
        found = None
        ancestors = self.ix.cmap.ancestors
        for other in self.calls[call.index + 1 :]:
            if call.index not in ancestors[other.index]:
                break  # calls inside ``call`` follow it, together
            if any(x.value_id == leaf.value_id for x in other.outputs):
                found = other.index
        return found

    def _settle_deferred(self) -> None:
        """Block outputs whose value comes from a possibly unused call, now that it is decided."""
        for call, leaf, escaping, producer in self.deferred:
            inner = [
                self.outputs.get((producer, x.name))
                for x in self.calls[producer].outputs
                if x.value_id == leaf.value_id
            ]
            if inner and all(v is not None and v.unused for v in inner):
                self._set(call, leaf, UNUSED, unused=True)
            else:
                self._leaf(call, leaf, escaping, defer=False)

    def _root(self) -> None:
        root = self.calls[0]
        names = self.ix.scopes.graph_outputs
        if len(names) != len(root.outputs):
            for leaf in root.outputs:
                self._set(
                    root,
                    leaf,
                    f"the file has {len(names)} outputs for "
                    f"{len(root.outputs)} tensor outputs of the model",
                )
            return
        for leaf, name in zip(root.outputs, names, strict=True):
            # Paired by position even where the declared type disagrees: the model's outputs
            # are what the file must compute, and the comparison reports the values' shapes.
            _, converted = type_agreement(self.ix.scopes.types.get(name), leaf)
            self.outputs[(0, leaf.name)] = self.ix.value(leaf, name, converted)

    def _call(self, call: ModuleCall) -> None:
        ix = self.ix
        reason = ix.cmap.ambiguous.get(call.index)
        if reason is None and not ix.owned_of[call.index] and ix.nodes_of[call.index]:
            owners = self._owners_of_outputs(call)
            if len(owners) == 1 and len(call.outputs) == 1:
                reason = self._fused(call, call.outputs[0], owners[0])
            else:
                named = ", ".join(o.name for o in owners)
                reason = f"fused into {named}" if owners else "its nodes compute no value"
        if reason is not None:
            for leaf in call.outputs:
                self._set(call, leaf, reason)
            return
        if ix.zero_node(call.index):
            return  # explained once every call with nodes is paired
        escaping = ix.escaping(call.index)
        for leaf in call.outputs:
            self._leaf(call, leaf, escaping)

    def _owners_of_outputs(self, call: ModuleCall) -> list[ModuleCall]:
        ix = self.ix
        owners = {
            ix.cmap.value_owner[o]
            for j in ix.nodes_of[call.index]
            for o in ix.scopes.nodes[j].outputs
        }
        return [self.calls[o] for o in sorted(owners) if o not in (UNSCOPED, call.index)]

    def _leaf(
        self, call: ModuleCall, leaf: TensorLeaf, escaping: Sequence[str], defer: bool = True
    ) -> None:
        ix = self.ix
        if leaf.value_id in ix.input_ids[call.index]:
            # not computed here: whatever tensor leaves the scope is another value
            self._set(call, leaf, "returns its input unchanged: no tensor of its own in the file")
            self.passed_through.append((call, leaf))
            return
        producer = self._producer(call, leaf) if defer and self.dead else None
        if producer is not None and producer in self.dead:
            self._set(call, leaf, "not located")  # until the producer's call is decided
            self.deferred.append((call, leaf, escaping, producer))
            return
        agree = {}
        for v in escaping:
            ok, converted = type_agreement(ix.scopes.types.get(v), leaf)
            if ok:
                agree[v] = converted
        if not agree:
            self._set(call, leaf, self._no_match(call, leaf, escaping))
            return
        verdicts = {v: ix.verdict(v, leaf, call.index) for v in agree}
        good = [v for v in agree if verdicts[v] != "refuted"]
        exact = [v for v in good if agree[v] is None]
        pool = exact or good
        confirmed = [v for v in pool if verdicts[v] == "confirmed"]
        chosen = pool[0] if len(pool) == 1 else confirmed[0] if len(confirmed) == 1 else None
        if chosen is not None and verdicts[chosen] == "unknown":
            self._set(
                call,
                leaf,
                f"the tensor leaving its scope ({chosen!r}) is read by nodes without scope "
                "information (the exporter's optimizer or a later tool made or renamed them): "
                "whether it is this output cannot be told",
            )
            return
        if chosen is not None and verdicts[chosen] == "neutral":
            # nothing outside confirms it: a module fused into this one may have moved it
            reason = self._fused_reader(call, leaf, [chosen], {"confirmed", "neutral"})
            if reason is not None:
                self._set(call, leaf, reason)
                return
        if chosen is not None:
            self.outputs[(call.index, leaf.name)] = ix.value(leaf, chosen, agree[chosen])
        elif pool:
            shown = ", ".join(repr(v) for v in pool[:3])
            self._set(
                call,
                leaf,
                f"{len(pool)} tensors with its {_describe(leaf)} leave its scope ({shown}): "
                "which one is this output cannot be told",
            )
        else:
            self._set(call, leaf, self._refuted(call, leaf, list(agree)))

    def _no_match(self, call: ModuleCall, leaf: TensorLeaf, escaping: Sequence[str]) -> str:
        if not escaping:
            return "no tensor computed in its scope is used outside it"
        unknown = [v for v in escaping if self.ix.scopes.types.get(v) is None]
        if len(unknown) == len(escaping):
            return "the file has no type for the tensors leaving its scope"
        return f"no tensor leaving its scope has its {_describe(leaf)}"

    def _readers_without_nodes(self, call: ModuleCall, leaf: TensorLeaf) -> list[ModuleCall]:
        """Later calls that read ``leaf``, compute something, and have no node in the file."""
        ix = self.ix
        return [
            z
            for z in self.calls[call.index + 1 :]
            if ix.zero_node(z.index)
            and z.index not in ix.cmap.ambiguous
            and leaf.value_id in ix.input_ids[z.index]
            and not is_noop(z)
            and not any(z.index in a for a in ix.absorbed)  # fused into its reader instead
        ]

    def _fused_reader(
        self, call: ModuleCall, leaf: TensorLeaf, values: list[str], allowed: set[str]
    ) -> str | None:
        """Why ``call`` is not paired when a reader without nodes may be fused into it.

        ``conv -> bn`` fused into one Conv node in ``conv``'s scope: the tensor leaving the
        scope is ``bn``'s output. It is given to ``bn`` when ``conv``'s weights were rewritten
        (``bn`` folded into them); otherwise neither is paired. ``None``: no such reader.
        """
        ix = self.ix
        readers = self._readers_without_nodes(call, leaf)
        if not readers:
            return None
        if not self._may_hold_a_readers_output(readers, values):
            return None  # no reader, nor a reader of theirs, returns a tensor of such a type
        found = []
        for z in readers:
            for zleaf in z.outputs:
                for v in values:
                    ok, converted = type_agreement(ix.scopes.types.get(v), zleaf)
                    verdict = ix.verdict(v, zleaf, call.index) if ok else None
                    if verdict in allowed:
                        found.append((z, zleaf, v, converted, verdict))
        # The tensor is z's output in the file. It is this call's too if z computes nothing
        # there (an Identity translation the optimizer removed), not if z was fused into this
        # call's nodes: the comparison tells by the values (LocatedValue.candidate). Weights
        # missing from the file argue for a fusion (a batch norm folded into a convolution),
        # but a weight transposed and renamed by the exporter looks the same.
        if len(found) == 1 and ix.weights_rewritten(call):
            z, zleaf, v, converted, _ = found[0]
            self.transfers[(z.index, zleaf.name)] = (v, converted, call.name)
            self._candidate(call, leaf, z, v)
            return self._fused(call, leaf, z)
        if len(found) == 1 and len(readers) == 1:
            z, zleaf, v, converted, verdict = found[0]
            if verdict in ("confirmed", "neutral") and len(z.outputs) == 1:
                # the modules reading the tensor received z's output, or none reads it (the
                # caller's own code does, or the model returns it)
                self.transfers[(z.index, zleaf.name)] = (v, converted, call.name)
                self._candidate(call, leaf, z, v)
                return (
                    f"not paired: {z.name} reads its output and left no node of its own, so "
                    f"the tensor leaving its scope ({v!r}) is {z.name}'s output, and this "
                    f"module's only if {z.name} computes nothing in the file"
                )
        names = " and ".join(z.name for z in readers[:2])
        for z in readers:
            self.blame.setdefault(
                z.index, f"fused into {call.name} or into the module reading its output"
            )
        return (
            f"not paired: {names} read its output and left no node of its own, so the tensor "
            f"leaving its scope ({values[0]!r}) may hold {names}'s output"
        )

    def _may_hold_a_readers_output(self, readers: list[ModuleCall], values: list[str]) -> bool:
        """Whether some of ``values`` has the type of an output of ``readers`` (or of theirs).

        A reader fused into the call would leave its own output where the call's was: of the
        reader's type, or, through a chain of such readers, of the last one's.
        """
        types = self.ix.scopes.types
        seen: set[int] = set()
        todo = list(readers)
        while todo:
            z = todo.pop()
            if z.index in seen:
                continue
            seen.add(z.index)
            for zleaf in z.outputs:
                if any(type_agreement(types.get(v), zleaf)[0] for v in values):
                    return True
                todo.extend(self._readers_without_nodes(z, zleaf))
        return False

    def _candidate(
        self, call: ModuleCall, leaf: TensorLeaf, reader: ModuleCall, tensor: str
    ) -> None:
        """``tensor`` holds ``leaf`` (and ``reader``'s input) if the values agree."""
        self.candidates[(call.index, leaf.name)] = tensor
        if len(reader.outputs) == 1:
            self.input_candidates[reader.index] = (leaf.value_id, tensor)

    def _refuted(self, call: ModuleCall, leaf: TensorLeaf, values: list[str]) -> str:
        """The value leaving ``call`` is not its output: is it a fused successor's?"""
        reason = self._fused_reader(call, leaf, values, {"confirmed"})
        if reason:
            return reason
        output = self.ix.refuting_output(values[0], leaf)
        if output is not None:
            return (
                f"the tensor leaving its scope ({values[0]!r}) is the file's output {output}, "
                f"but this model's output {output} is another value: the file's outputs are "
                "not this model's (another order, or another version of the model)"
            )
        return (
            f"the tensor leaving its scope ({values[0]!r}) is not its output: the modules "
            "reading it received another value"
        )

    def _zero_node(self, call: ModuleCall) -> None:
        if not call.outputs:
            return
        inputs = self.ix.input_ids[call.index]
        for leaf in call.outputs:
            transfer = self.transfers.get((call.index, leaf.name))
            if transfer is not None:
                v, converted, _ = transfer
                self.outputs[(call.index, leaf.name)] = self.ix.value(leaf, v, converted)
            elif call.index in self.blame:
                self._set(call, leaf, self.blame[call.index])
            elif leaf.value_id in inputs:
                self._set(
                    call, leaf, f"removed by the exporter ({call.class_name}: returns its input)"
                )
            elif held := self._read_unchanged(call, leaf) or self._read_by_code(call, leaf):
                tensor, converted, position = held
                located = self.ix.value(leaf, tensor, converted)
                self.outputs[(call.index, leaf.name)] = dataclasses.replace(located, as_is=position)
            elif (reason := self._gone(call, leaf)) is not None:
                self._set(call, leaf, reason)
            else:
                self._set(call, leaf, UNUSED, unused=True)

    def _folded(
        self, names: list[str], leaf: TensorLeaf, *, by_value_only: bool = False
    ) -> str | None:
        """Which of the constants ``names`` (of the leaf's type) holds its value, by value.

        A constant whose data the file holds is compared with the eager value; one that
        equals it is named. When every one was compared and none equals it, the value was not
        folded (``None``). Constants without data in hand are told apart by type alone:
        named when one is left, listed when several are; not at all ``by_value_only``.
        """
        mine = to_numpy(leaf.value)
        unknown = []
        for name in names:
            value = self.ix.scopes.constant_value(name)
            if value is None:
                unknown.append(name)
            elif _holds(value, mine):
                converted = "" if value.dtype == mine.dtype else f", converted to {value.dtype}"
                return f"constant-folded by the exporter (the file has it as {name!r}{converted})"
        if not unknown or by_value_only:
            return None
        if len(unknown) == 1:
            return f"constant-folded by the exporter (the file has it as {unknown[0]!r})"
        listed = _joined_names(unknown)
        return f"constant-folded by the exporter (the file has it as one of {listed})"

    def _gone(self, call: ModuleCall, leaf: TensorLeaf) -> str | None:
        """Where the value of a call without nodes went: folded, fused, or optimised away.

        ``None``: removed as unused code (the call is one of :attr:`dead`, and neither a
        constant nor a reader's nodes hold its value).
        """
        ix = self.ix
        readers = self._node_readers(call, leaf)
        parent = call.parent if call.parent is not None else 0
        # A weight of another module (the reader's own, of the same shape by chance) is not
        # this call's value folded into a constant; one of this module's own can be.
        weights, own = ix.parameters[""], ix.parameters.get(call.path, frozenset())
        read = [
            (name, type_agreement(ix.scopes.types.get(name), leaf))
            for scope in [*(c.index for c in readers), parent]
            for j in ix.nodes_of[scope]
            for name in ix.scopes.nodes[j].inputs
            if name in ix.scopes.constants and (name not in weights or name in own)
        ]
        folded = [name for name, agreement in read if agreement == (True, None)]
        if folded:
            reason = self._folded(list(dict.fromkeys(folded)), leaf)
            if reason is not None:
                return reason
        # a float16-converted file holds folded values converted: told by their values only
        converted = [name for name, (ok, dtype) in read if ok and dtype is not None]
        if converted:
            reason = self._folded(list(dict.fromkeys(converted)), leaf, by_value_only=True)
            if reason is not None:
                return reason
        for reader, _ in self._readers_reading_its_input(call, readers):
            return self._fused(call, leaf, reader)  # its nodes read what this call read
        others = list(dict.fromkeys(name for name, (ok, _) in read if ok))
        if others:
            # constants of its type where its value would be read: folded from other numbers
            # (another checkpoint's weights) as likely as removed, whatever reads them
            return (
                "no node of its scope is in the file, and the constants of its type read where "
                f"its value would be ({_joined_names(others)}) hold other values: folded from "
                "other weights (the file was exported from another checkpoint), or removed"
            )
        if call.index in self.dead:
            return None
        if any(not n.scoped for n in ix.scopes.nodes):
            return (
                "no node of its scope is in the file: removed or optimised away, or its nodes "
                "lost their scope information (made or renamed by an optimizer)"
            )
        return (
            "no node of its scope is in the file: removed or optimised away by the exporter "
            "(or a tool that ran after it)"
        )

    def _node_readers(self, call: ModuleCall, leaf: TensorLeaf) -> list[ModuleCall]:
        """Later calls outside ``call`` that read ``leaf`` and have nodes in the file."""
        ix = self.ix
        return [
            c
            for c in self.calls[call.index + 1 :]
            if leaf.value_id in ix.input_ids[c.index]
            and c.index not in ix.cmap.ancestors[call.index]
            and ix.nodes_of[c.index]
        ]

    def _readers_reading_its_input(
        self, call: ModuleCall, readers: Sequence[ModuleCall]
    ) -> Iterator[tuple[ModuleCall, str]]:
        """The ``readers`` whose nodes read a tensor holding ``call``'s input, with that tensor."""
        ix = self.ix
        for reader in readers:
            for entering in ix.entering(reader.index):
                if any(ix.input_ids[call.index] & self._ids_of(s) for s in self._sources(entering)):
                    yield reader, entering
                    break

    def _read_unchanged(
        self, call: ModuleCall, leaf: TensorLeaf
    ) -> tuple[str, str | None, int] | None:
        """The tensor holding ``call``'s output if it computes nothing in the file, or ``None``.

        A call without nodes whose reader's nodes read the call's input: the call was fused
        into the reader (its scale folded into the reader's weights), or it computes nothing in
        the file (a custom op translated to an ``Identity``). A reader that owns weights and
        reads every one under its own name was not rewritten: nothing was fused into it, so
        the tensor it reads is this call's output in the file, and the comparison tells whether
        it is right, unless the reader's nodes took its computation up (an ONNX Runtime
        fusion that keeps the weights, a scale into ``FusedMatMul``): the values tell
        (:attr:`~fxalign.attach.LocatedValue.as_is`). ``(tensor, converted dtype, position of
        the input it holds)``; ``None`` when a reader may have been fused.
        """
        ix = self.ix
        if is_noop(call):
            return None
        readers = self._node_readers(call, leaf)
        found = list(self._readers_reading_its_input(call, readers))
        if len(found) != 1 or len(readers) != 1:
            return None
        reader, entering = found[0]
        if not ix.parameters.get(reader.path) or ix.weights_rewritten(reader):
            return None
        ok, converted = type_agreement(ix.scopes.types.get(entering), leaf)
        if not ok:
            return None
        held = {v for src in self._sources(entering) for v in self._ids_of(src)}
        held &= ix.input_ids[call.index]
        position = next((i for i, x in enumerate(call.inputs) if x.value_id in held), None)
        if position is None:
            return None
        self.unchanged[call.index] = (entering, held)
        return entering, converted, position

    def _read_by_code(
        self, call: ModuleCall, leaf: TensorLeaf
    ) -> tuple[str, str | None, int] | None:
        """The graph input holding ``call``'s input, if its caller's own nodes read it.

        A call without nodes on a graph input whose output no module receives (``act`` in
        ``head(tanh(act(x)))``): the caller's code may read its output, and the file's nodes
        of that code then read the graph input in its place if the call computes nothing in
        the file (a custom op translated to an ``Identity``). Paired
        :attr:`~fxalign.attach.LocatedValue.as_is` with that input: the comparison and a
        replay of those nodes tell whether the call's output is what they read (see
        :meth:`_read_unchanged`). ``(tensor, converted dtype, position of the input it
        holds)``; ``None`` otherwise.
        """
        ix = self.ix
        if call.index not in self.dead or call.parent is None or is_noop(call):
            return None
        parent = call.parent
        read = {
            name
            for j in ix.nodes_of[parent]
            if ix.cmap.node_call[j] == parent
            for name in ix.scopes.nodes[j].inputs
        }
        root = self.calls[0]
        for position, x in enumerate(call.inputs):
            names = [
                n
                for i, n in self._graph_inputs().items()
                if root.inputs[i].value_id == x.value_id and n in read
            ]
            if len(names) != 1:
                continue
            ok, converted = type_agreement(ix.scopes.types.get(names[0]), leaf)
            if ok:
                self.unchanged[call.index] = (names[0], {x.value_id})
                return names[0], converted, position
        return None

    def _ids_of(self, name: str) -> set[str]:
        """Eager values known to be in tensor ``name`` (graph inputs and paired outputs)."""
        root = self.calls[0]
        found = {root.inputs[i].value_id for i, n in self._graph_inputs().items() if n == name}
        for (index, leaf_name), located in self.outputs.items():
            if located.tensor == name:
                found |= {x.value_id for x in self.calls[index].outputs if x.name == leaf_name}
        return found

    def _known_names(self) -> dict[str, set[str]]:
        """``ONNX tensor name -> value ids`` of the eager values known to be in it."""
        known: dict[str, set[str]] = {}
        root = self.calls[0]
        for position, name in self._graph_inputs().items():
            known.setdefault(name, set()).add(root.inputs[position].value_id)
        for (index, leaf_name), located in self.outputs.items():
            if located.tensor is not None:
                out = next(x for x in self.calls[index].outputs if x.name == leaf_name)
                known.setdefault(located.tensor, set()).add(out.value_id)
        return known

    def _graph_inputs(self) -> dict[int, str]:
        """``root input leaf position -> graph input``, where the types agree one to one."""
        root = self.calls[0]
        names = self.ix.scopes.graph_inputs
        types = self.ix.scopes.types
        if len(names) == len(root.inputs):
            pairs = dict(enumerate(names))
        else:  # the exporter dropped unused inputs: only unambiguous types
            pairs = {}
            for i, leaf in enumerate(root.inputs):
                fits = [n for n in names if type_agreement(types.get(n), leaf)[0]]
                if len(fits) == 1:
                    pairs[i] = fits[0]
        return {i: n for i, n in pairs.items() if type_agreement(types.get(n), root.inputs[i])[0]}

    def _located(self, call: ModuleCall, inputs: tuple[LocatedInput, ...]) -> LocatedCall:
        outputs = tuple(
            self._with_candidate(
                call,
                self.outputs.get((call.index, leaf.name))
                or LocatedValue(leaf.name, leaf.value, reason="not located"),
            )
            for leaf in call.outputs
        )
        reason = None if call.outputs else f"returns no tensor ({call.output_type})"
        return LocatedCall(
            call.path,
            call.call_index,
            call.class_name,
            outputs,
            inputs,
            reason,
            call.args,
            call.kwargs,
        )

    def _with_candidate(self, call: ModuleCall, value: LocatedValue) -> LocatedValue:
        candidate = self.candidates.get((call.index, value.leaf))
        if candidate is None or value.tensor is not None:
            return value
        return dataclasses.replace(value, candidate=candidate)

    def _inputs(self, call: ModuleCall, known: Mapping[str, set[str]]) -> tuple[LocatedInput, ...]:
        if call.index == 0:
            graph = self._graph_inputs()
            return tuple(
                LocatedInput(leaf.name, leaf.value, graph.get(i))
                if i in graph
                else LocatedInput(leaf.name, leaf.value, None, "no graph input of its type")
                for i, leaf in enumerate(call.inputs)
            )
        if not self.ix.nodes_of[call.index]:
            held = self.input_candidates.get(call.index)
            if call.index in self.unchanged:  # it computes nothing: its input is its output
                tensor, ids = self.unchanged[call.index]
                return tuple(
                    LocatedInput(x.name, x.value, tensor)
                    if x.value_id in ids
                    else LocatedInput(x.name, x.value, None, "no node of its scope is in the file")
                    for x in call.inputs
                )
            return tuple(
                LocatedInput(
                    x.name,
                    x.value,
                    None,
                    "no node of its scope is in the file",
                    held[1] if held is not None and held[0] == x.value_id else None,
                )
                for x in call.inputs
            )
        entering = self.ix.entering(call.index)
        sources = {e: self._sources(e) for e in entering}
        out = []
        for leaf in call.inputs:
            fits = [
                e
                for e in entering
                if any(leaf.value_id in known.get(s, ()) for s in sources[e])
                and type_agreement(self.ix.scopes.types.get(e), leaf)[0]
            ]
            if not fits and len(call.inputs) == 1:
                fits = self._sole_entering(call, leaf, entering)
            if len(fits) == 1:
                out.append(LocatedInput(leaf.name, leaf.value, fits[0]))
            else:
                why = (
                    "no tensor entering its scope is known to hold it"
                    if not fits
                    else f"{len(fits)} tensors entering its scope hold it"
                )
                out.append(LocatedInput(leaf.name, leaf.value, None, why))
        return tuple(out)

    def _sole_entering(self, call: ModuleCall, leaf: TensorLeaf, entering: list[str]) -> list[str]:
        """The one tensor entering a one-input call's scope, unless a fusion may have moved it.

        A module fused into this one (``conv`` into ``bn``) makes its scope read the fused
        module's input instead: no call whose value is not in the file may have produced it.
        """
        if len(entering) != 1 or not type_agreement(self.ix.scopes.types.get(entering[0]), leaf)[0]:
            return []
        for other in self.calls[: call.index]:
            for out in other.outputs:
                if out.value_id != leaf.value_id:
                    continue
                located = self.outputs.get((other.index, out.name))
                gone = located is not None and located.tensor is None
                if gone and other.index not in self.ix.cmap.ambiguous:
                    return []  # fused, folded or removed: the scope may read another value
        return entering

    def _sources(self, name: str) -> list[str]:
        """``name`` and what it was cast from by nodes without scope (a float16 conversion)."""
        out = [name]
        ix = self.ix
        while (j := ix.producer.get(out[-1])) is not None and len(out) < 8:
            node = ix.scopes.nodes[j]
            if node.scoped or node.op_type not in ("Cast", "Identity") or not node.inputs:
                break
            out.append(node.inputs[0])
        return out


def _input_by_identity(leaf: TensorLeaf, holders: Mapping[str, set[str]]) -> LocatedInput:
    """An input of a call the file cannot tell apart: the one tensor known to hold it.

    Its nodes are not told from another call's, but the tensor it received may be one that a
    graph input or a paired output holds (``f(f(x))``: the outer call's input is the inner
    call's output), or one located as the input of a call it passed it to unchanged (a
    block's first layer). ``holders``: value id -> the tensors known to hold it.
    """
    holding = holders.get(leaf.value_id, set())
    if len(holding) == 1:
        return LocatedInput(leaf.name, leaf.value, next(iter(holding)))
    why = "its call is not matched in the file"
    if holding:
        why += f" and {len(holding)} tensors hold this input"
    return LocatedInput(leaf.name, leaf.value, None, why)


def pair_calls(
    scopes: FileScopes,
    capture: CallCapture,
    cmap: CallMap,
    parameters: Mapping[str, frozenset[str]],
    dead: frozenset[int] = frozenset(),
) -> tuple[LocatedCall, ...]:
    """Pair every call's output leaves and input leaves with ONNX tensors.

    Args:
        scopes: The file's scopes and types.
        capture: The hooked eager forward.
        cmap: Which call each node and value belongs to.
        parameters: ``module path -> names of its parameters and buffers`` (qualified, as
            the exporters name initializers).
        dead: Calls without nodes whose outputs the model does not use (no module receives
            them, the model does not return them): their rows say so.

    Returns:
        One :class:`LocatedCall` per call of ``capture``, in the same order.
    """
    return _Pairer(Index.build(scopes, capture, cmap, parameters), dead).run()


def _holds(value: np.ndarray, mine: np.ndarray) -> bool:
    """Whether a constant of the file holds the eager value.

    Same shape, values within the round-off an exporter's constant folding may add, or a
    float16 conversion (exact for integers and booleans).
    """
    if value.shape != mine.shape:
        return False
    if value.dtype.kind not in "fc" or mine.dtype.kind not in "fc":
        return bool(np.array_equal(value, mine))
    rtol = max(1e-3, float(np.finfo(value.dtype).eps))  # float16: one ulp
    return bool(np.allclose(value, mine, rtol=rtol, atol=1e-6, equal_nan=True))
