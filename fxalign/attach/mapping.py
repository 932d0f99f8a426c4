"""Map every node and value of a plain export onto the eager call it was computed in.

The file names modules, the eager run names calls: repeated calls of one module must be told
apart, and a call is only ever matched when the file says unambiguously which one it is.

- **dynamo**: a node's paths (``("", "block", "block.lin")``) name one call per prefix, up to
  which call of each. The nodes of one call of ``block.lin`` are contiguous in graph order (the
  exported program is in execution order), so for each path chain the maximal *runs* of nodes
  inside it are its calls: run i is the i-th eager call with that chain. Calls made back to back
  (``f(f(x))``) form one run; when the runs do not match the calls one to one, none of that
  chain's calls is matched.
- **TorchScript**: each eager call's scope string is computed the way ``naming.cpp`` builds it
  (unqualified names joined with ``/``, ``_<k>`` on the last level for the k-th repeat), so a
  node's scope string names its call directly. Only calls that kept a node get a suffix: when
  the suffixes in the file do not number the calls one to one, none of them is matched.

Nodes of an unmatched call are given to the innermost call that certainly contains them.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fxalign.attach.hooks import CallCapture, ModuleCall
from fxalign.attach.scopes import FileScopes, NodeInfo, ts_scope_of_value

__all__ = ["UNSCOPED", "CallMap", "is_noop", "map_calls", "unqualified"]

logger = logging.getLogger(__name__)

UNSCOPED = -1
"""Call index of nodes and values without scope information (inserted by a later tool)."""

_SUFFIX = re.compile(r"^(?P<base>.*)_(?P<k>\d+)$")


@dataclass
class CallMap:
    """Where each node and value of the file belongs among the eager calls.

    Attributes:
        node_call: Per node (graph order): index of the innermost call it was computed in,
            or :data:`UNSCOPED`.
        value_owner: ``value name -> call index`` of the call that computed it (TorchScript:
            the scope its name carries, which survives fusions that move it to another node).
        ambiguous: ``call index -> reason`` for calls whose nodes cannot be told apart from
            those of other calls of the same module.
        ancestors: Per call index: the call itself and every call it runs inside.
        foreign: ``module scope -> number of nodes`` in it, for scopes of the file the eager
            forward never entered (the outermost such level of each node's scope: dynamo, a
            module path; TorchScript, a scope string such as ``"/blocks/blocks.2"``).
        in_file: Indices of the calls whose module scope (any call of it) some node of the
            file is in, directly or in a nested module's scope.
    """

    node_call: list[int]
    value_owner: dict[str, int]
    ambiguous: dict[int, str] = field(default_factory=dict)
    ancestors: list[frozenset[int]] = field(default_factory=list)
    foreign: dict[str, int] = field(default_factory=dict)
    in_file: set[int] = field(default_factory=set)

    def inside(self, call: int, owner: int) -> bool:
        """Whether something computed in call ``owner`` is inside call ``call``."""
        return owner != UNSCOPED and call in self.ancestors[owner]


def unqualified(path: str) -> str:
    """The name TorchScript gives a module's scope: its path from the last non-numeric part.

    Mirrors ``_unqualified_variable_name`` in ``torch/onnx/utils.py``.

    Example:
        >>> unqualified("blocks.0.act"), unqualified("blocks.0"), unqualified("")
        ('act', 'blocks.0', '')
    """
    atoms = path.split(".")
    for i in range(len(atoms) - 1, -1, -1):
        if not atoms[i].isnumeric():
            return ".".join(atoms[i:])
    return path


def is_noop(call: ModuleCall) -> bool:
    """Whether every output leaf of ``call`` equals one of its inputs (Identity, eval Dropout)."""
    inputs = {leaf.value_id for leaf in call.inputs if leaf.value_id}
    return bool(call.outputs) and all(leaf.value_id in inputs for leaf in call.outputs)


def _ancestors(capture: CallCapture) -> list[frozenset[int]]:
    out: list[frozenset[int]] = []
    for call in capture.calls:
        parent = out[call.parent] if call.parent is not None else frozenset()
        out.append(parent | {call.index})
    return out


def _lca(calls: Sequence[ModuleCall], ancestors: list[frozenset[int]]) -> int:
    common = frozenset.intersection(*(ancestors[c.index] for c in calls)) if calls else {0}
    return max(common) if common else 0  # ancestors have smaller indices than descendants


@dataclass
class _Group:
    """The eager calls of one module chain or scope string, and its instances in the file."""

    key: object
    calls: list[ModuleCall]
    instances: list[list[int]]  # node indices of each instance, sorted
    label: str
    numbers: list[int] = field(default_factory=list)  # TorchScript: each instance's suffix


def _related(call: int, group: _Group, ancestors: list[frozenset[int]]) -> bool:
    """Whether ``call`` is a group call, or runs inside or around one."""
    return any(call in ancestors[c.index] or c.index in ancestors[call] for c in group.calls)


def _windows(
    group: _Group, anchors: Sequence[int | None], ancestors: list[frozenset[int]]
) -> list[list[ModuleCall]]:
    """Per instance: the group calls that executed between the calls around it in the file."""
    out = []
    for nodes in group.instances:
        before = [a for a in anchors[: nodes[0]] if a is not None]
        after = [a for a in anchors[nodes[-1] + 1 :] if a is not None]
        lo = max((a for a in before if not _related(a, group, ancestors)), default=-1)
        hi = min((a for a in after if not _related(a, group, ancestors)), default=1 << 62)
        out.append([c for c in group.calls if lo < c.index < hi])
    return out


def _by_count(group: _Group) -> list[ModuleCall] | None:
    """The calls the instances are, in order, when their numbers agree."""
    if len(group.instances) == len(group.calls):
        return group.calls
    kept = [c for c in group.calls if not is_noop(c)]
    # the calls that return their input unchanged (Identity, eval Dropout) left no node
    return kept if len(group.instances) == len(kept) else None


def _settle(
    group: _Group,
    order: list[ModuleCall] | None,
    windows: list[list[ModuleCall]],
    ambiguous: dict[int, str],
) -> dict[int, ModuleCall]:
    """``instance number -> call`` that the count and the windows agree on."""
    if order is not None and all(c in w for c, w in zip(order, windows, strict=True)):
        return dict(enumerate(order))
    if any(not w for w in windows):
        for call in group.calls:
            ambiguous[call.index] = (
                "its nodes in the file are not in the order of the eager calls: not matched"
            )
        return {}
    # An instance between calls of other modules that leaves one candidate is that call's
    # (a call may have several instances: its nodes interleaved with others'); an instance
    # with several candidates holds calls made back to back, none of which is matched.
    merged = {c.index for w in windows if len(w) > 1 for c in w}
    out = {i: w[0] for i, w in enumerate(windows) if len(w) == 1 and w[0].index not in merged}
    for index in merged:
        ambiguous[index] = (
            f"{len(group.calls)} calls of this module but {len(group.instances)} "
            f"{group.label} in the file: this call cannot be told apart from another one "
            "(called back to back, nothing in between)"
        )
    return out


def _assign(
    groups: list[_Group], n_nodes: int, cmap: CallMap
) -> dict[tuple[object, int], ModuleCall]:
    """Match the file's instances to eager calls: by count, checked by position, twice."""
    orders = {id(g): _by_count(g) for g in groups}
    matched: dict[tuple[object, int], ModuleCall] = {}
    for g in groups:
        order = orders[id(g)]
        if order is not None:
            matched.update(((g.key, i), c) for i, c in enumerate(order))
    for _ in range(2):
        anchors: list[int | None] = [None] * n_nodes
        for g in groups:
            for i, nodes in enumerate(g.instances):
                call = matched.get((g.key, i))
                if call is not None:
                    for j in nodes:
                        anchors[j] = max(anchors[j] or 0, call.index)
        ambiguous: dict[int, str] = {}
        settled: dict[tuple[object, int], ModuleCall] = {}
        for g in groups:
            if len(g.calls) == 1 and len(g.instances) == 1:
                settled[(g.key, 0)] = g.calls[0]
                continue
            windows = _windows(g, anchors, cmap.ancestors)
            for i, call in _settle(g, orders[id(g)], windows, ambiguous).items():
                settled[(g.key, i)] = call
        matched = settled
    cmap.ambiguous.update(ambiguous)
    return matched


def _group(
    calls: Sequence[ModuleCall], key_of: dict[int, object]
) -> dict[object, list[ModuleCall]]:
    groups: dict[object, list[ModuleCall]] = {}
    for call in calls:
        groups.setdefault(key_of[call.index], []).append(call)
    return groups


def _dynamo_chain(capture: CallCapture, call: ModuleCall) -> object:
    """The scope chain the dynamo exporter writes for ``call``'s nodes.

    A ``torch.compile``-d module (``OptimizedModule``) is no level of it: the exporter traces
    its ``_orig_mod`` and records that one's scope. Its own call gets a key no node has.
    """
    if call.class_name == "OptimizedModule":
        return ("<compiled>", call.index)
    return tuple(x.path for x in capture.chain(call) if x.class_name != "OptimizedModule")


def _unaliased(nodes: Sequence[NodeInfo], aliases: Mapping[str, str]) -> tuple[NodeInfo, ...]:
    """``nodes`` with every module path as ``named_modules()`` gives it.

    The dynamo exporter names a module by the attribute path its caller reached it through:
    ``ModuleList([lin, other, lin])`` iterated writes the third call's nodes in scope ``"2"``,
    which the eager forward records as a call of ``"0"``.
    """
    if not aliases:
        return tuple(nodes)
    return tuple(
        dataclasses.replace(n, paths=tuple(aliases.get(p, p) for p in n.paths))
        if n.paths and any(p in aliases for p in n.paths)
        else n
        for n in nodes
    )


def _map_dynamo(scopes: FileScopes, capture: CallCapture, cmap: CallMap) -> None:
    key_of: dict[int, object] = {c.index: _dynamo_chain(capture, c) for c in capture.calls}
    eager = _group(capture.calls, key_of)
    nodes = _unaliased(scopes.nodes, capture.aliases)
    runs_of = _runs(nodes)
    chains = {n.paths[:j] for n in nodes if n.paths for j in range(1, len(n.paths) + 1)}
    run_of: dict[tuple[object, int], int] = {}  # (chain, node index) -> run number
    groups = []
    for chain in chains:
        runs = runs_of[chain]
        run_of.update(((chain, i), run) for i, run in runs.items())
        if chain in eager:
            instances: list[list[int]] = [[] for _ in range(max(runs.values()) + 1)]
            for i, run in runs.items():
                instances[run].append(i)
            groups.append(_Group(chain, eager[chain], instances, "separate runs of its nodes"))
    cmap.in_file.update(c.index for chain in chains for c in eager.get(chain, ()))
    matched = _assign(groups, len(scopes.nodes), cmap)
    while True:  # until every node's calls nest the way the eager calls do
        node_call = [_dynamo_call(n, matched, run_of, eager, cmap) for n in nodes]
        bad = {c[0] for c in node_call if isinstance(c, tuple)}
        if not bad:
            break
        for key in list(matched):
            if key[0] in bad:
                cmap.ambiguous.setdefault(
                    matched.pop(key).index,
                    "its nodes in the file do not nest in its caller's: not matched",
                )
    cmap.node_call = [int(c) for c in node_call]  # type: ignore[arg-type]
    for node in nodes:
        for out in node.outputs:
            cmap.value_owner[out] = cmap.node_call[node.index]
        paths = node.paths or ()
        outside = next((j for j in range(1, len(paths) + 1) if paths[:j] not in eager), None)
        if outside is not None:
            cmap.foreign[paths[outside - 1]] = cmap.foreign.get(paths[outside - 1], 0) + 1


def _dynamo_call(
    node: NodeInfo,
    matched: dict[tuple[object, int], ModuleCall],
    run_of: dict[tuple[object, int], int],
    eager: dict[object, list[ModuleCall]],
    cmap: CallMap,
) -> int | tuple[object]:
    """The innermost call certainly containing a node; ``(chain,)`` for a chain that misnests."""
    if not node.paths:
        return UNSCOPED
    found = 0
    last = None
    for j in range(1, len(node.paths) + 1):
        chain = node.paths[:j]
        call = matched.get((chain, run_of[(chain, node.index)]))
        if call is None:
            continue
        if found not in cmap.ancestors[call.index]:
            return (chain,)
        found, last = call.index, chain
    if last != node.paths and eager.get(node.paths):
        lca = _lca(eager[node.paths], cmap.ancestors)
        if found in cmap.ancestors[lca]:
            found = lca
    return found


def _runs(nodes: Sequence[NodeInfo]) -> dict[tuple[str, ...], dict[int, int]]:
    """Per chain, ``node index -> run number`` for the nodes inside it; unscoped nodes skipped.

    A run is a stretch of consecutive scoped nodes inside the chain; one pass over the nodes.
    """
    runs: dict[tuple[str, ...], dict[int, int]] = {}
    count: dict[tuple[str, ...], int] = {}
    before: set[tuple[str, ...]] = set()
    for node in nodes:
        if node.paths is None:
            continue
        now = {node.paths[:j] for j in range(1, len(node.paths) + 1)}
        for chain in now:
            if chain not in before:
                count[chain] = count.get(chain, -1) + 1
            runs.setdefault(chain, {})[node.index] = count[chain]
        before = now
    return runs


def _ts_base(capture: CallCapture, call: ModuleCall) -> str:
    return "/".join(unqualified(c.path) for c in capture.chain(call))


def _parse_ts(scope: str, eager: Mapping[object, list[ModuleCall]]) -> tuple[str, int] | None:
    if scope in eager:
        return scope, 0
    match = _SUFFIX.match(scope)
    if match is not None and match.group("base") in eager:
        return match.group("base"), int(match.group("k"))
    return None


def _ts_groups(
    scopes: FileScopes, eager: dict[object, list[ModuleCall]], cmap: CallMap
) -> list[_Group]:
    """One group per scope string: its instances are its numbered scopes in the file."""
    found: dict[str, dict[int, list[int]]] = {}
    for node in scopes.nodes:
        named = [node.ts_scope] + [ts_scope_of_value(o) for o in node.outputs]
        for scope in dict.fromkeys(s for s in named if s is not None):
            parsed = _parse_ts(scope, eager)
            if parsed is not None:
                found.setdefault(parsed[0], {}).setdefault(parsed[1], []).append(node.index)
    made = {f"{b}_{k}": b for b, calls in eager.items() for k in range(1, len(calls))}
    groups = []
    for base, numbered in found.items():
        clash = made.get(str(base)) or next(
            (f"{base}_{k}" for k in range(1, len(eager[base])) if f"{base}_{k}" in eager), None
        )
        if clash is not None:
            for call in eager[base]:
                cmap.ambiguous[call.index] = (
                    f"its TorchScript scope names clash with those of {clash!r} (a repeated "
                    "call is named like another module): not matched"
                )
            continue
        ks = sorted(numbered)
        groups.append(_Group(base, eager[base], [numbered[k] for k in ks], "numbered scopes", ks))
    return groups


def _map_torchscript(scopes: FileScopes, capture: CallCapture, cmap: CallMap) -> None:
    key_of: dict[int, object] = {c.index: _ts_base(capture, c) for c in capture.calls}
    eager = _group(capture.calls, key_of)
    groups = _ts_groups(scopes, eager, cmap)
    cmap.in_file.update(c.index for scope in _ts_prefixes(scopes, eager) for c in eager[scope])
    numbers = {g.key: g.numbers for g in groups}
    matched = _assign(groups, len(scopes.nodes), cmap)
    instance = {(key, numbers[key][i]): call for (key, i), call in matched.items()}

    def call_of(scope: str) -> int:
        parsed = _parse_ts(scope, eager)
        if parsed is not None:
            if parsed in instance:
                return instance[parsed].index
            return _lca(eager[parsed[0]], cmap.ancestors)
        while "/" in scope:  # not an eager call's: the innermost call certainly containing it
            scope = scope.rsplit("/", 1)[0]
            if scope in eager:
                return _lca(eager[scope], cmap.ancestors)
        return 0

    for node in scopes.nodes:
        cmap.node_call.append(UNSCOPED if node.ts_scope is None else call_of(node.ts_scope))
        foreign = _ts_foreign(node.ts_scope, eager)
        if foreign is not None:
            cmap.foreign[foreign] = cmap.foreign.get(foreign, 0) + 1
    for node in scopes.nodes:
        for out in node.outputs:
            scope = ts_scope_of_value(out)
            cmap.value_owner[out] = cmap.node_call[node.index] if scope is None else call_of(scope)


def _ts_prefixes(scopes: FileScopes, eager: Mapping[object, list[ModuleCall]]) -> set[str]:
    """The eager scope strings the file's node scopes are in, at every level."""
    found: set[str] = set()
    for scope in {n.ts_scope for n in scopes.nodes if n.ts_scope}:
        levels = scope.split("/")
        for i in range(2, len(levels) + 1):
            parsed = _parse_ts("/".join(levels[:i]), eager)
            if parsed is None:
                break
            found.add(parsed[0])
    return found


def _ts_foreign(scope: str | None, eager: Mapping[object, list[ModuleCall]]) -> str | None:
    """The outermost level of a TorchScript scope string that names no eager call, if any.

    Example:
        >>> _ts_foreign("/blocks/blocks.2/act", {"": [], "/blocks": []})
        '/blocks/blocks.2'
        >>> _ts_foreign("/blocks_1", {"": [], "/blocks": []}) is None  # a repeated call
        True
    """
    if not scope:
        return None
    levels = scope.split("/")
    for i in range(2, len(levels) + 1):
        prefix = "/".join(levels[:i])
        if _parse_ts(prefix, eager) is None:
            return prefix
    return None


def map_calls(scopes: FileScopes, capture: CallCapture) -> CallMap:
    """Map the nodes and values of ``scopes`` onto the calls of ``capture``.

    Args:
        scopes: What :func:`fxalign.attach.scopes.read_scopes` read from the file.
        capture: The hooked eager forward.

    Returns:
        A :class:`CallMap`.
    """
    cmap = CallMap([], {}, {}, _ancestors(capture))
    if scopes.exporter == "dynamo":
        _map_dynamo(scopes, capture, cmap)
    else:
        _map_torchscript(scopes, capture, cmap)
    logger.debug("%d calls not matched in the file", len(cmap.ambiguous))
    return cmap
