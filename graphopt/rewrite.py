"""Small graph-editing helpers passes share (on onnx-graphsurgeon graphs).

The rule that keeps graphs valid: a graph output keeps its name. When a rewrite would
make a graph output disappear, the surviving tensor takes the output's place in
``graph.outputs`` *and* its name, so consumers of the model see no difference.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.walk import tensor_map, with_subgraphs


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
        # The output name must survive: rename the source instead, if that is allowed
        # (only a value this graph computes: never an outer-scope value, which may be
        # an outer graph's output or read there under its own name).
        if src in graph.inputs or src in graph.outputs or not produced_in(src, graph):
            return False
        replace_uses(dst, src)
        take_output_place(graph, dst, src)
    else:
        replace_uses(dst, src)
    remove_node(node, graph)
    return True


def take_output_place(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Put ``new``, which holds the same value, where graph output ``old`` is, under
    ``old``'s name, and with ``old``'s type where its own is unknown (the ONNX checker
    wants a graph output's type and shape)."""
    index = next(i for i, t in enumerate(graph.outputs) if t is old)
    new.name = old.name
    if new.dtype is None:
        new.dtype = old.dtype
    if new.shape is None:
        new.shape = old.shape
    graph.outputs[index] = new


def produced_in(tensor: gs.Tensor, graph: gs.Graph) -> bool:
    """Whether a node of ``graph`` itself (not of an outer graph) computes ``tensor``."""
    return bool(tensor.inputs) and any(node is tensor.inputs[0] for node in graph.nodes)


def is_inference_dropout(node: gs.Node, opset: int) -> bool:
    """Whether Dropout ``node`` copies its input (inference mode), so it is deterministic."""
    if opset < 7:
        return bool(node.attrs.get("is_test", 0))
    if len(node.inputs) < 3 or node.inputs[2].is_empty():
        return True
    training = constant_value(node.inputs[2])
    return training is not None and not training.any()


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


def make_constant(graph: gs.Graph, name_hint: str, value: np.ndarray,
                  taken: set[str] | None = None) -> gs.Constant:
    """A new initializer with a name unique in ``graph``. A pass that makes many passes
    ``taken``, the graph's tensor names gathered once (``tensor_names``; the new name is
    added to it): gathering them costs a walk of the whole graph."""
    if taken is None:
        taken = set(tensor_map(graph))
    return gs.Constant(unique_name(taken, name_hint), np.asarray(value))


def tensor_names(graphs: Iterable[gs.Graph]) -> set[str]:
    """Every tensor name used in ``graphs`` (names must be unique across nested graphs)."""
    return {name for g in graphs for name in tensor_map(g)}


def unique_name(taken: set[str], hint: str) -> str:
    """``hint`` or ``hint_<n>``, whichever is not in ``taken``; the result is added to it."""
    name, i = hint, 0
    while name in taken:
        i += 1
        name = f"{hint}_{i}"
    taken.add(name)
    return name


def replace_with_constant(tensor: gs.Tensor, value: np.ndarray, graphs: Iterable[gs.Graph],
                          taken: set[str]) -> gs.Constant:
    """Make every reader of ``tensor`` read a new initializer holding ``value`` instead.

    The initializer takes ``tensor``'s name (so a graph output keeps its name: ONNX
    allows an initializer to be a graph output) and ``tensor`` is renamed; its producer
    stays, now with an unused output, for ``remove_dead`` to sweep.
    """
    name = tensor.name
    tensor.name = unique_name(taken, f"{name}_unfolded")
    const = gs.Constant(name, np.asarray(value, order="C"))
    replace_uses(tensor, const)
    for g in graphs:
        for i, out in enumerate(g.outputs):
            if out is tensor:
                g.outputs[i] = const
    return const


def remove_dead(nodes: Iterable[gs.Node], graph: gs.Graph) -> int:
    """Remove those of ``nodes`` (all in ``graph``) whose outputs nobody reads, repeatedly
    (a removed node may leave its producers dead). Returns how many were removed."""
    candidates = {id(n): n for n in nodes}
    # A subgraph may return an outer value without any node reading it.
    outputs = {id(t) for g in with_subgraphs(graph) for t in g.outputs}
    removed = 0
    changed = True
    while changed:
        changed = False
        for key, node in list(candidates.items()):
            if any(t.outputs or id(t) in outputs for t in node.outputs):
                continue
            remove_node(node, graph)
            del candidates[key]
            removed += 1
            changed = True
    return removed


def remove_node(node: gs.Node, graph: gs.Graph) -> None:
    """Disconnect ``node`` and drop it from ``graph`` (by identity: gs compares nodes and
    tensors by name and contents, so ``list.remove`` could drop a look-alike).

    Passes remove nodes as they walk the graph in order, so the search starts where the
    previous removal from this graph was and wraps around: a whole pass's removals cost
    about one walk of the node list, not one walk each (quadratic on 100k nodes)."""
    node.inputs.clear()
    node.outputs.clear()
    nodes = graph.nodes
    start = min(vars(graph).get(_REMOVED_AT, 0), len(nodes))  # gs's getattr would log
    index = _index_from(nodes, node, start)
    if index is None:
        index = _index_from(nodes, node, 0, start)
    if index is None:
        raise ValueError(f"node {node.name!r} is not in graph {graph.name!r}")
    del nodes[index]
    vars(graph)[_REMOVED_AT] = index


_REMOVED_AT = "_graphopt_removed_at"  # where ``remove_node`` last removed from a graph


def _index_from(nodes: list, node: gs.Node, start: int, stop: int | None = None) -> int | None:
    for i in range(start, len(nodes) if stop is None else stop):
        if nodes[i] is node:
            return i
    return None
