"""The ONNX nodes one op became: the part of the graph between its inputs and its output.

In the op-level debug model every op's value is a graph output. The nodes an op became are
found by walking back from its output's producer, through the nodes that compute the inputs of
each node reached, and stopping at the graph's inputs, its initializers and the values of
other ops::

    other op's value ─┐
                      ├─> Mul -> MatMul -> Softmax -> MatMul ─> this op's value
    graph input ──────┘

Both exporters' graphs are walked the same way, as the values tell it.

Example:
    >>> from onnx import helper
    >>> g = helper.make_graph(
    ...     [helper.make_node("Neg", ["x"], ["a"], name="n0"),
    ...      helper.make_node("Floor", ["a"], ["b"], name="n1")], "g",
    ...     [helper.make_tensor_value_info("x", 1, [2])],
    ...     [helper.make_tensor_value_info("b", 1, [2])])
    >>> [n.name for n in nodes_between(g, "b", stop={"a"})]
    ['n1']
"""

from __future__ import annotations

from collections.abc import Collection

import onnx

__all__ = ["nodes_between"]


def nodes_between(
    graph: onnx.GraphProto, output: str, stop: Collection[str]
) -> list[onnx.NodeProto]:
    """The nodes that compute ``output`` from ``stop`` values, inputs and initializers.

    Args:
        graph: The graph.
        output: The op's output value.
        stop: Values the walk does not go past (other ops' values).

    Returns:
        The nodes, in graph order; empty when ``output`` is itself a stop value or an input.
    """
    producer = {name: node for node in graph.node for name in node.output if name}
    fixed = set(stop) | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    fixed.discard(output)
    reached: set[int] = set()
    todo = [output]
    while todo:
        name = todo.pop()
        node = producer.get(name)
        if node is None or name in fixed or id(node) in reached:
            continue
        reached.add(id(node))
        todo.extend(i for i in node.input if i)
    return [node for node in graph.node if id(node) in reached]
