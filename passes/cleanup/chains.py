"""Merge chains of data-movement ops (Transpose, Reshape, Flatten, Squeeze, Unsqueeze).

A pair ``P -> N`` is merged when ``P``'s output is read by ``N`` alone and is not a graph
output. ``N`` is rewritten in place to read ``P``'s input (so ``N``'s output, possibly a
graph output, keeps its name) and ``P`` is removed. Nodes are visited in topological
order, so a whole chain collapses in one run: by the time ``N`` is visited, everything
before it has already been merged into ``P``.

Rules, first match wins (for ``P``, ``N`` in Reshape/Flatten/Squeeze/Unsqueeze):

* Transpose -> Transpose: one Transpose with the composed perm; none if it is identity.
* Squeeze -> Unsqueeze, Unsqueeze -> Squeeze with the same axes, or a chain whose static
  input and output shapes are equal: both go.
* any -> Reshape: ``Reshape(x, shape)``, when ``shape`` has no 0 that copies a dim (or
  each such 0 can be resolved from the intermediate's static shape).
* Squeeze -> Squeeze, Unsqueeze -> Unsqueeze: one node with the combined axes.
* otherwise, when input and output shapes are both fully static: ``Reshape`` to the
  output shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import Model, toposort
from graphopt.pass_infra import Pass, PassContext, PassResult
from graphopt.rewrite import (bypass, constant_value, consumers, is_graph_output, remove_node,
                              static_shape, tensor_names, unique_name)
from graphopt.walk import STANDARD_DOMAINS

RESHAPES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
MOVES = RESHAPES | {"Transpose"}


class MergeShapeChains(Pass):
    """Merge consecutive Transpose/Reshape/Flatten/Squeeze/Unsqueeze nodes into one (or none)."""

    name = "merge-shape-chains"
    family = "cleanup"
    lossless = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        graphs = list(model.all_graphs())
        merger = _Merger(model.opset, graphs)
        for graph in graphs:
            merger.merge_graph(graph)
        stats = {"merged": merger.merged, "cancelled": merger.cancelled}
        return PassResult(changed=bool(merger.merged or merger.cancelled), stats=stats)


@dataclass
class _Merger:
    opset: int
    graphs: list[gs.Graph]
    merged: int = 0
    cancelled: int = 0

    def __post_init__(self) -> None:
        self.taken = tensor_names(self.graphs)

    def merge_graph(self, graph: gs.Graph) -> None:
        toposort(graph, recurse_subgraphs=False)
        self.graph = graph
        self.alive = {id(n) for n in graph.nodes}
        for node in list(graph.nodes):
            if id(node) not in self.alive:
                continue
            prev = self._producer(node)
            if prev is not None:
                self._merge(prev, node)

    def _producer(self, node: gs.Node) -> gs.Node | None:
        """The node ``node`` can merge with: a data-movement op whose only reader it is."""
        if node.op not in MOVES or node.domain not in STANDARD_DOMAINS or not node.inputs:
            return None
        mid = node.inputs[0]
        if len(mid.inputs) != 1:
            return None
        prev = mid.inputs[0]
        if prev.op not in MOVES or prev.domain not in STANDARD_DOMAINS \
                or id(prev) not in self.alive or len(prev.outputs) != 1:
            return None
        readers = consumers(mid)
        if len(readers) != 1 or readers[0] is not node or any(t is mid for t in node.inputs[1:]) \
                or any(t is mid for g in self.graphs for t in g.outputs):
            return None
        return prev

    def _merge(self, prev: gs.Node, node: gs.Node) -> None:
        if prev.op == "Transpose" or node.op == "Transpose":
            if prev.op == node.op:
                self._merge_transposes(prev, node)
            return
        if self._cancels(prev, node):
            self._cancel(prev, node)
            return
        if node.op == "Reshape":
            shape = self._reshape_target(node)
            if shape is not None:
                self._rewire(prev, node, "Reshape", shape, dict(node.attrs))
                return
        if node.op == prev.op and node.op in ("Squeeze", "Unsqueeze"):
            axes = self._combined_axes(prev, node)
            if axes is not None:
                self._rewire(prev, node, node.op, axes, {})
                return
        self._collapse_static(prev, node)

    # ------------------------------------------------------------------ rules
    def _merge_transposes(self, prev: gs.Node, node: gs.Node) -> None:
        p1, p2 = prev.attrs.get("perm"), node.attrs.get("perm")
        if p1 is None and p2 is None:  # reversing twice is the identity at any rank
            self._cancel(prev, node)
            return
        rank = _rank(prev.inputs[0]) or len(p1 if p1 is not None else p2)
        p1 = list(p1) if p1 is not None else list(range(rank))[::-1]
        p2 = list(p2) if p2 is not None else list(range(rank))[::-1]
        if len(p1) != len(p2):
            return
        perm = [int(p1[i]) for i in p2]
        if perm == list(range(len(perm))):
            self._cancel(prev, node)
        else:
            self._rewire(prev, node, "Transpose", None, {**node.attrs, "perm": perm})

    def _cancels(self, prev: gs.Node, node: gs.Node) -> bool:
        """Whether ``node(prev(x))`` is ``x``."""
        x, out = prev.inputs[0], node.outputs[0]
        if static_shape(x) is not None and static_shape(x) == static_shape(out):
            return True
        if {prev.op, node.op} != {"Squeeze", "Unsqueeze"}:
            return False
        a1, a2 = _axes(prev), _axes(node)
        if a1 is None or a2 is None or len(a1) != len(a2) or not a1:
            return False
        # Squeeze(a) then Unsqueeze(b), or the reverse, normalize a and b against the
        # same rank: that of x for Squeeze first, that of the middle for Unsqueeze first.
        rank = _rank(x) if prev.op == "Squeeze" else _rank(node.inputs[0])
        if rank is not None:
            a1, a2 = _normalize(a1, rank), _normalize(a2, rank)
        return a1 is not None and len(set(a1)) == len(a1) and set(a1) == set(a2)

    def _reshape_target(self, node: gs.Node) -> np.ndarray | None:
        """``node``'s shape with every dim-copying 0 resolved, or ``None``."""
        if len(node.inputs) < 2:
            return None
        shape = constant_value(node.inputs[1])
        if shape is None:
            return None
        shape = shape.astype(np.int64).copy()
        if node.attrs.get("allowzero", 0) or not (shape == 0).any():
            return shape
        mid = node.inputs[0].shape
        for i in np.flatnonzero(shape == 0):
            if mid is None or i >= len(mid) or not isinstance(mid[i], int) or mid[i] <= 0:
                return None
            shape[i] = mid[i]
        return shape

    def _combined_axes(self, prev: gs.Node, node: gs.Node) -> list[int] | None:
        a1, a2 = _axes(prev), _axes(node)
        if not a1 or not a2:  # unknown, or Squeeze of every 1 (needs static dims)
            return None
        rank = _rank(prev.inputs[0])
        if node.op == "Squeeze":
            return _compose_squeezes(a1, a2, rank)
        return _compose_unsqueezes(a1, a2, rank)

    def _collapse_static(self, prev: gs.Node, node: gs.Node) -> None:
        shape = static_shape(node.outputs[0])
        if static_shape(prev.inputs[0]) is None or shape is None or 0 in shape \
                or self.opset < 5:
            return
        self._rewire(prev, node, "Reshape", np.array(shape, dtype=np.int64), {})

    # ------------------------------------------------------------------ edits
    def _rewire(self, prev: gs.Node, node: gs.Node, op: str, arg, attrs: dict) -> None:
        """Make ``node`` an ``op`` of ``prev``'s input, with ``arg`` (a shape or axes, as
        an input or, for Squeeze/Unsqueeze before opset 13, an attribute)."""
        x = prev.inputs[0]
        inputs = [x]
        if op in ("Squeeze", "Unsqueeze") and self.opset < 13:
            attrs = {**attrs, "axes": [int(a) for a in arg]}
        elif arg is not None:
            attrs.pop("axes", None)
            same = len(node.inputs) > 1 and node.op == op and np.array_equal(
                constant_value(node.inputs[1]), arg)
            inputs.append(node.inputs[1] if same else gs.Constant(
                unique_name(self.taken, f"{node.outputs[0].name}_{op.lower()}_arg"),
                np.asarray(arg, dtype=np.int64)))
        node.op = op
        node.attrs = attrs
        node.inputs.clear()
        node.inputs.extend(inputs)
        self._drop(prev)
        self.merged += 1

    def _cancel(self, prev: gs.Node, node: gs.Node) -> None:
        """Remove both: ``node``'s readers read ``prev``'s input."""
        x, out = prev.inputs[0], node.outputs[0]
        node.op, node.attrs = "Identity", {}
        node.inputs.clear()
        node.inputs.append(x)
        self._drop(prev)
        self.cancelled += 1
        others = [g for g in self.graphs if g is not self.graph]
        if is_graph_output(out, others) or (is_graph_output(out, [self.graph]) and (
                is_graph_output(x, self.graphs) or not x.inputs
                or id(x.inputs[0]) not in self.alive)):
            return  # a name that must survive cannot move to x: keep the Identity
        if bypass(node, self.graph):
            self.alive.discard(id(node))

    def _drop(self, prev: gs.Node) -> None:
        remove_node(prev, self.graph)
        self.alive.discard(id(prev))


def _rank(tensor: gs.Tensor) -> int | None:
    return None if tensor.shape is None else len(tensor.shape)


def _axes(node: gs.Node) -> list[int] | None:
    """Constant axes of a Squeeze/Unsqueeze ([] when absent), or ``None`` if unknown."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1 and not node.inputs[1].is_empty():
        value = constant_value(node.inputs[1])
        return None if value is None else [int(a) for a in value.ravel()]
    return []


def _normalize(axes: list[int], rank: int | None) -> list[int] | None:
    if any(a < 0 for a in axes):
        if rank is None:
            return None
        axes = [a + rank if a < 0 else a for a in axes]
    return axes


def _nth_not_in(n: int, excluded: set[int]) -> int:
    """The ``n``-th (from 0) non-negative integer not in ``excluded``."""
    i = -1
    while n >= 0:
        i += 1
        if i not in excluded:
            n -= 1
    return i


def _compose_squeezes(a1, a2, rank) -> list[int] | None:
    """Axes of x that ``Squeeze(Squeeze(x, a1), a2)`` removes."""
    a1 = _normalize(a1, rank)
    if a1 is None or len(set(a1)) != len(a1):
        return None
    a2 = _normalize(a2, None if rank is None else rank - len(a1))
    if a2 is None or len(set(a2)) != len(a2):
        return None
    return sorted(set(a1) | {_nth_not_in(j, set(a1)) for j in a2})


def _compose_unsqueezes(a1, a2, rank) -> list[int] | None:
    """Output axes that ``Unsqueeze(Unsqueeze(x, a1), a2)`` inserts."""
    a1 = _normalize(a1, None if rank is None else rank + len(a1))
    if a1 is None or len(set(a1)) != len(a1):
        return None
    a2 = _normalize(a2, None if rank is None else rank + len(a1) + len(a2))
    if a2 is None or len(set(a2)) != len(a2):
        return None
    return sorted(set(a2) | {_nth_not_in(m, set(a2)) for m in a1})
