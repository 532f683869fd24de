"""Small graph-editing helpers passes share (on onnx-graphsurgeon graphs).

The rule that keeps graphs valid: a graph output keeps its name. When a rewrite would
make a graph output disappear, the surviving tensor takes the output's place in
``graph.outputs`` *and* its name, so consumers of the model see no difference.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import onnx_graphsurgeon as gs


def constant_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of ``tensor`` if it is known before run time, else ``None``.

    Initializers that are also graph inputs can be overridden at run time, so they do not
    count as constants.
    """
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        node = tensor.inputs[0]
        value = node.attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
        for key, dtype in (("value_float", np.float32), ("value_int", np.int64),
                           ("value_floats", np.float32), ("value_ints", np.int64)):
            if key in node.attrs:
                return np.asarray(node.attrs[key], dtype=dtype)
    return None


def is_graph_output(tensor: gs.Tensor, graphs: Iterable[gs.Graph]) -> bool:
    return any(tensor in g.outputs for g in graphs)


def graph_inputs(graphs: Iterable[gs.Graph]) -> set[int]:
    return {id(t) for g in graphs for t in g.inputs}


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    """Distinct nodes reading ``tensor`` (subgraph nodes included)."""
    seen: dict[int, gs.Node] = {}
    for node in tensor.outputs:
        seen.setdefault(id(node), node)
    return list(seen.values())


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every node that reads ``old`` read ``new`` instead."""
    for node in consumers(old):
        for i, tensor in enumerate(node.inputs):
            if tensor is old:
                node.inputs[i] = new


def bypass(node: gs.Node, graph: gs.Graph, keep: int = 0) -> bool:
    """Remove single-output ``node`` whose output equals its input ``keep``.

    Returns False (and changes nothing) when the node cannot go without renaming a graph
    input or producing a graph output twice.
    """
    src, dst = node.inputs[keep], node.outputs[0]
    if dst in graph.outputs:
        # The output name must survive: rename the source instead, if that is allowed.
        if src in graph.inputs or src in graph.outputs or isinstance(src, gs.Constant) \
                or not src.inputs:
            return False
        replace_uses(dst, src)
        src.name = dst.name
        graph.outputs[graph.outputs.index(dst)] = src
    else:
        replace_uses(dst, src)
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.remove(node)
    return True


def walk(graphs: Iterable[gs.Graph]) -> Iterator[tuple[gs.Graph, gs.Node]]:
    """(graph, node) over a snapshot of each graph's nodes, safe to edit while walking."""
    for graph in graphs:
        for node in list(graph.nodes):
            yield graph, node


def static_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """The shape of ``tensor`` if every dimension is a known integer."""
    shape = tensor.shape
    if shape is None or any(not isinstance(d, int) or d < 0 for d in shape):
        return None
    return tuple(shape)


def make_constant(graph: gs.Graph, name_hint: str, value: np.ndarray) -> gs.Constant:
    """A new initializer with a name unique in ``graph``."""
    names = graph.tensors().keys()
    name, i = name_hint, 0
    while name in names:
        i += 1
        name = f"{name_hint}_{i}"
    return gs.Constant(name, np.asarray(value))
