"""Walks of an onnx-graphsurgeon graph at the cost of the graph itself.

onnx-graphsurgeon's own walks pay per node for generality a run never uses:
``Graph.subgraphs`` asks every node for its subgraphs through a generic attribute walk,
and ``Graph.tensors`` checks every tensor for a name shared with another (and logs it).
A small model's optimize run walks its graph about a hundred times."""

from __future__ import annotations

from typing import Iterator

import onnx_graphsurgeon as gs

# The operators of the ONNX standard whose attributes hold graphs; those of any other
# domain (contrib, custom) may hold them too.
CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})
STANDARD_DOMAINS = (None, "", "ai.onnx")  # (onnx-graphsurgeon's default is None)


def subgraphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """Every subgraph (If/Loop/Scan bodies) of ``graph``'s nodes, recursively, each
    before its own subgraphs."""
    # (exact types first, and a list attribute is all graphs or none, as ONNX's GRAPHS
    # and INTS/FLOATS/STRINGS types are)
    graph_type, sequences = gs.Graph, (list, tuple)
    for node in graph.nodes:
        if node.domain in STANDARD_DOMAINS and node.op not in CONTROL_FLOW:
            continue  # (the standard's other operators take no graph attribute)
        for value in node.attrs.values():
            kind = type(value)
            if kind is graph_type or (kind not in sequences and isinstance(value, gs.Graph)):
                yield value
                yield from subgraphs(value)
            elif kind in sequences and value and isinstance(value[0], gs.Graph):
                for item in value:
                    yield item
                    yield from subgraphs(item)


def with_subgraphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """``graph``, then every subgraph (``subgraphs``)."""
    yield graph
    yield from subgraphs(graph)


def tensor_map(graph: gs.Graph) -> dict[str, gs.Tensor]:
    """``graph.tensors()``: the tensors of ``graph`` by name (omitted optional ones
    left out), in the same order (its inputs, each node's inputs and outputs, its
    outputs), without the check for distinct tensors sharing a name."""
    out: dict[str, gs.Tensor] = {}
    for tensor in graph.inputs:
        if tensor.name:
            out[tensor.name] = tensor
    for node in graph.nodes:
        for tensor in node.inputs:
            if tensor.name:
                out[tensor.name] = tensor
        for tensor in node.outputs:
            if tensor.name:
                out[tensor.name] = tensor
    for tensor in graph.outputs:
        if tensor.name:
            out[tensor.name] = tensor
    return out


def constants(graph: gs.Graph) -> list[gs.Constant]:
    """The constants ``graph`` and its subgraphs read (each once), in the order of
    ``tensor_map``."""
    seen: dict[int, gs.Constant] = {}
    for g in with_subgraphs(graph):
        for tensor in tensor_map(g).values():
            if isinstance(tensor, gs.Constant):
                seen.setdefault(id(tensor), tensor)
    return list(seen.values())
