"""Group report rows into the model's module tree (a view of the data, computed once).

Module paths are split on ``.``: ``layer1.0.conv1`` sits under ``layer1.0`` under ``layer1``
under the model (the root, path ``""``, which also holds the final outputs)::

    (model)                       worst 7.15   <- contains the first divergence
    ├── first                     worst 0
    └── mid                       worst 7.15   <- contains the first divergence
        ├── lin                   worst 2.4e-07
        └── clamp                 worst 7.15   <- first divergence

Each node knows the worst cumulative ``max_abs`` in its subtree and its own local error, so
renderers (HTML, terminal) only lay it out. Nothing here formats text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from fxalign.report.model import Row

__all__ = ["TreeNode", "module_tree", "worse"]


def worse(a: float | None, b: float | None) -> float | None:
    """The larger error of two, ordering ``None < numbers < inf < nan``.

    ``None`` (not compared) never wins over a number; NaN, which means the comparison itself
    broke, wins over everything.

    Example:
        >>> worse(None, 0.0), worse(1e-3, math.inf), worse(math.nan, math.inf)
        (0.0, inf, nan)
    """
    if a is None:
        return b
    if b is None:
        return a
    if math.isnan(a):
        return a
    if math.isnan(b):
        return b
    return a if a >= b else b


@dataclass
class TreeNode:
    """One module in the tree, with what its subtree's rows say.

    Attributes:
        name: The last path segment (``conv1``); ``""`` for the model itself.
        path: The qualified module path (``layer1.0.conv1``); ``""`` for the model.
        rows: Indices into the report's rows whose ``module_path`` is this path (several
            calls, structured outputs, or the final outputs at the root).
        children: Child modules, in the order they first appear in execution order (modules
            known only from the coverage's unmarked list come after).
        worst: Worst cumulative ``max_abs`` over the rows of this node and its subtree
            (``None`` when none was compared).
        own_worst: Worst cumulative ``max_abs`` over this node's own rows.
        local: Worst local ``max_abs`` (``row.local``) over this node's own rows, if any.
        module_type: Class name, from the node's first row (``""`` when it has none).
        failed: Rows in the subtree that break tolerance.
        compared: Rows in the subtree with metrics.
        has_first_divergence: The first divergence is this node or below it.
        is_first_divergence: The first divergence is one of this node's own rows.
        unmarked: Why the module got no marker (from the report's coverage), if it has none.
    """

    name: str
    path: str
    rows: list[int] = field(default_factory=list)
    children: list[TreeNode] = field(default_factory=list)
    worst: float | None = None
    own_worst: float | None = None
    local: float | None = None
    module_type: str = ""
    failed: int = 0
    compared: int = 0
    has_first_divergence: bool = False
    is_first_divergence: bool = False
    unmarked: str | None = None

    def walk(self) -> Iterable[tuple[int, TreeNode]]:
        """Every node of the subtree with its depth (0 for this one), depth first, pre-order."""
        stack: list[tuple[int, TreeNode]] = [(0, self)]
        while stack:
            depth, node = stack.pop()
            yield depth, node
            stack.extend((depth + 1, c) for c in reversed(node.children))

    def find(self, path: str) -> TreeNode | None:
        """The node of module ``path`` in this subtree, or ``None``."""
        return next((n for _, n in self.walk() if n.path == path), None)


def module_tree(
    rows: Sequence[Row],
    *,
    first_divergence: str | None = None,
    unmarked: Mapping[str, str] | None = None,
) -> TreeNode:
    """Group rows by module path into a tree and aggregate errors bottom-up.

    Args:
        rows: The report's rows, in execution order.
        first_divergence: Name of the first divergent row (``Report.first_divergence``).
        unmarked: ``module path -> reason`` of modules without a marker
            (``Report.coverage.unmarked``); they appear as nodes without rows.

    Returns:
        The root node (the model, path ``""``).

    Example:
        >>> from fxalign.report.model import Metrics
        >>> m = Metrics(0.5, 0.1, 0.2, 0.3, 0.9, 20.0, 3, 8)
        >>> r = Row("a.b", "a.b", 0, "Linear", "leaf", "diverged", False, 1e-4, 1e-3, metrics=m)
        >>> root = module_tree([r], first_divergence="a.b")
        >>> [(n.path, n.worst, n.has_first_divergence) for _, n in root.walk()]
        [('', 0.5, True), ('a', 0.5, True), ('a.b', 0.5, True)]
    """
    root = TreeNode(name="", path="")
    index: dict[str, TreeNode] = {"": root}

    def node_for(path: str) -> TreeNode:
        if path in index:
            return index[path]
        parent_path, _, name = path.rpartition(".")
        parent = node_for(parent_path)
        node = TreeNode(name=name, path=path)
        parent.children.append(node)
        index[path] = node
        return node

    for i, row in enumerate(rows):
        node = node_for(row.module_path)
        node.rows.append(i)
        if not node.module_type:
            node.module_type = row.module_type
        node.own_worst = worse(node.own_worst, row.metrics.max_abs if row.metrics else None)
        node.local = worse(node.local, row.local.max_abs if row.local else None)
        if first_divergence is not None and row.name == first_divergence:
            node.is_first_divergence = True
    for path, reason in (unmarked or {}).items():
        if path:
            node_for(path).unmarked = reason

    def aggregate(node: TreeNode) -> None:
        own = [rows[i] for i in node.rows]
        node.worst = node.own_worst
        node.failed = sum(r.failed for r in own)
        node.compared = sum(r.metrics is not None for r in own)
        node.has_first_divergence = node.is_first_divergence
        for child in node.children:
            aggregate(child)
            node.worst = worse(node.worst, child.worst)
            node.failed += child.failed
            node.compared += child.compared
            node.has_first_divergence |= child.has_first_divergence

    aggregate(root)
    return root
