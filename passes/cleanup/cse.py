"""Common-subexpression elimination: a node that repeats an earlier node's computation
(same op, same attributes, same inputs) is dropped and its readers read the earlier one.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import Model, toposort
from graphopt.pass_infra import Pass, PassContext, PassResult
from graphopt.rewrite import is_inference_dropout, remove_node, replace_uses, take_output_place

# Only standard ops are known to be pure; a custom op may be random or stateful.
PURE_DOMAINS = (None, "", "ai.onnx", "ai.onnx.ml")
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                    "Multinomial", "Bernoulli"}
# Initializers up to this size count as the same input when their values are equal.
MAX_COMPARED_ELEMENTS = 4096


class EliminateCommonSubexpressions(Pass):
    """Merge nodes that compute the same op with the same attributes on the same inputs."""

    name = "eliminate-common-subexpressions"
    family = "cleanup"
    lossless = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        merged = 0
        for graph in list(model.all_graphs()):
            # In topological order a duplicate's inputs are already merged when it is
            # reached, so chains of duplicates collapse in one sweep.
            toposort(graph, recurse_subgraphs=False)
            seen: dict[tuple, gs.Node] = {}
            for node in list(graph.nodes):
                key = _key(node, model.opset)
                if key is None:
                    continue
                first = seen.setdefault(key, node)
                if first is not node and _merge(node, first, graph):
                    merged += 1
        return PassResult(changed=merged > 0, stats={"merged": merged})


def _key(node: gs.Node, opset: int) -> tuple | None:
    """What makes two nodes compute the same value, or ``None`` if ``node`` never merges."""
    if node.domain not in PURE_DOMAINS or node.op in NONDETERMINISTIC:
        return None
    if node.op == "Dropout" and not is_inference_dropout(node, opset):
        return None
    attrs = tuple((name, _canonical(value)) for name, value in sorted(node.attrs.items()))
    if any(value is None for _, value in attrs):
        return None
    domain = "" if node.domain == "ai.onnx" else node.domain or ""
    return (domain, node.op, attrs, tuple(_input_key(t) for t in node.inputs),
            tuple(t.is_empty() for t in node.outputs))


def _canonical(value):
    """A hashable, exact stand-in for an attribute value; ``None`` for a subgraph (or an
    unknown kind of value), whose node is never merged."""
    if isinstance(value, (bool, int, str, bytes)):
        return value
    if isinstance(value, (float, np.floating)):
        return float(value).hex()  # tells -0.0 from 0.0, unlike ==
    if isinstance(value, (list, tuple)):
        items = tuple(_canonical(v) for v in value)
        return None if any(v is None for v in items) else items
    if isinstance(value, gs.Constant):
        array = np.asarray(value.values)
        if array.dtype == object:
            return ("strings", array.shape, tuple(array.ravel().tolist()))
        return ("tensor", array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).digest())
    return None


def _input_key(tensor: gs.Tensor):
    if tensor.is_empty():
        return "omitted"
    if isinstance(tensor, gs.Constant) and np.prod(tensor.shape) <= MAX_COMPARED_ELEMENTS:
        array = np.asarray(tensor.values)
        if array.dtype != object:
            return ("constant", array.dtype.str, array.shape, array.tobytes())
    return id(tensor)


def _merge(dup: gs.Node, first: gs.Node, graph: gs.Graph) -> bool:
    """Make readers of ``dup``'s outputs read ``first``'s and drop ``dup``; False (and no
    change) when an output of ``dup`` is a graph output that ``first`` cannot replace."""
    pairs = [(old, new) for old, new in zip(dup.outputs, first.outputs) if not old.is_empty()]
    outputs = [id(t) for t in graph.outputs]
    for old, new in pairs:
        if id(old) in outputs and id(new) in outputs:
            return False  # one tensor cannot be the graph output under two names
    for old, new in pairs:
        replace_uses(old, new)
        if id(old) in outputs:
            take_output_place(graph, old, new)
    remove_node(dup, graph)
    return True
