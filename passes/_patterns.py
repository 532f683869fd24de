"""What the transformer fusion passes share: where nodes live and who reads a tensor,
scalar constants, the last-axis test of a reduction, and a checked opset upgrade.

A match function returns a match dataclass, or a ``Miss`` (falsy) saying why not; the
pass counts the reasons in its stats, so a pattern that did not fire can be explained.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
import onnx.version_converter
import onnx_graphsurgeon as gs

from graphopt.ir import Model, infer_shapes, skeleton
from graphopt.rewrite import (constant_value, consumers, remove_dead, remove_node,
                              tensor_names, unique_name)

MICROSOFT = "com.microsoft"
# The oldest default opset fusions upgrade from. Opset 13 moved the axes of Squeeze/
# Unsqueeze/ReduceSum/Split to inputs and changed many ops at once; from 13 on,
# onnx.version_converter's adapters are mechanical (an attribute becomes an input constant,
# types widen). The manager checks the numbers of the upgraded model like any pass result.
UPGRADE_FROM = 13


@dataclass(frozen=True)
class Miss:
    """A failed match and why it failed."""

    reason: str

    def __bool__(self) -> bool:
        return False


def is_default_domain(node: gs.Node) -> bool:
    return (node.domain or "") in ("", "ai.onnx")


class Scope:
    """The graphs of a model, the graph owning each node, names in use, removed nodes."""

    def __init__(self, model: Model):
        self.graphs = list(model.all_graphs())
        self.owner = {id(n): g for g in self.graphs for n in g.nodes}
        self.names = tensor_names(self.graphs)
        self.node_names = {n.name for g in self.graphs for n in g.nodes if n.name}
        self._outputs = {id(t) for g in self.graphs for t in g.outputs}
        self._inputs = {id(t) for g in self.graphs for t in g.inputs}
        self.misses: Counter = Counter()

    # ------------------------------------------------------------------ queries
    def alive(self, node: gs.Node) -> bool:
        return id(node) in self.owner

    def is_graph_output(self, tensor: gs.Tensor) -> bool:
        return id(tensor) in self._outputs

    def producer(self, tensor: gs.Tensor, *ops: str) -> gs.Node | None:
        """The default-domain node writing ``tensor`` when its op is one of ``ops``."""
        if len(tensor.inputs) != 1:
            return None
        node = tensor.inputs[0]
        return node if node.op in ops and is_default_domain(node) and self.alive(node) else None

    def sole_reader(self, tensor: gs.Tensor) -> gs.Node | None:
        """The single node (any domain) reading ``tensor`` when the tensor is no graph
        input or output and the reader lives in the producer's graph."""
        readers = consumers(tensor)
        if len(readers) != 1 or self.is_graph_output(tensor) or id(tensor) in self._inputs:
            return None
        node = readers[0]
        if not self.alive(node) or (tensor.inputs and self.owner.get(id(tensor.inputs[0]))
                                    is not self.owner[id(node)]):
            return None
        return node

    def only_reader(self, tensor: gs.Tensor, *ops: str) -> gs.Node | None:
        """The sole reader of ``tensor`` (see ``sole_reader``) when it is a default-domain
        node whose op is one of ``ops``."""
        node = self.sole_reader(tensor)
        return node if node is not None and node.op in ops and is_default_domain(node) \
            else None

    def readers(self, tensor: gs.Tensor, op: str) -> list[gs.Node]:
        return [n for n in consumers(tensor) if n.op == op and is_default_domain(n)
                and self.alive(n)]

    def private(self, nodes: Sequence[gs.Node], keep: gs.Tensor) -> bool:
        """Whether every tensor ``nodes`` write, except ``keep``, is read by ``nodes`` only,
        is no graph output, and all of ``nodes`` live in one graph."""
        ids = {id(n) for n in nodes}
        graph = self.owner.get(id(nodes[-1]))
        for node in nodes:
            if self.owner.get(id(node)) is not graph:
                return False
            for out in node.outputs:
                if out is keep:
                    continue
                if self.is_graph_output(out) or any(id(r) not in ids for r in consumers(out)):
                    return False
        return True

    # ------------------------------------------------------------------ edits
    def constant(self, hint: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(unique_name(self.names, hint), np.ascontiguousarray(value))

    def replace(self, nodes: Sequence[gs.Node], op: str, inputs: list[gs.Tensor],
                outputs: list[gs.Tensor], attrs: dict | None = None,
                domain: str | None = None) -> gs.Node:
        """Remove ``nodes`` (one graph) and put one ``op`` node where the last of them was,
        reading ``inputs`` and writing ``outputs`` (existing tensors keep their names and
        readers). Constant nodes that fed only the removed nodes go too."""
        graph = self.owner[id(nodes[-1])]
        feeders = [t.inputs[0] for n in nodes for t in n.inputs
                   if len(t.inputs) == 1 and t.inputs[0].op == "Constant"]
        index = next(i for i, n in enumerate(graph.nodes) if n is nodes[-1])
        hint = nodes[-1].name or op
        for node in nodes:
            remove_node(node, graph)
            del self.owner[id(node)]
        name = unique_name(self.node_names, f"{hint}_{op}" if nodes[-1].name else op)
        node = gs.Node(op=op, name=name, attrs=attrs or {}, inputs=inputs, outputs=outputs,
                       domain=domain)
        graph.nodes.insert(min(index, len(graph.nodes)), node)
        self.owner[id(node)] = graph
        for gone in [f for f in feeders if self.owner.get(id(f)) is graph]:
            if remove_dead([gone], graph):
                del self.owner[id(gone)]
        return node

    def miss(self, result: Miss) -> None:
        self.misses[result.reason] += 1

    def stats(self, fused: int, **extra) -> dict:
        stats = {"fused": fused, **extra}
        if self.misses:
            stats["not_fused"] = dict(sorted(self.misses.items()))
        return stats


# ---------------------------------------------------------------------- values
def scalar(tensor: gs.Tensor, rank: int | None = None) -> float | None:
    """The value of a constant holding one number whose broadcasting cannot grow a
    rank-``rank`` operand (ndim <= rank); else None."""
    value = constant_value(tensor)
    if value is None or value.size != 1 or (rank is not None and value.ndim > rank):
        return None
    if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
        return None
    number = float(value.reshape(()))
    return number if np.isfinite(number) else None


def other_input(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor | None:
    """The other operand of binary ``node`` one of whose operands is ``tensor``."""
    if len(node.inputs) != 2:
        return None
    if node.inputs[0] is tensor:
        return node.inputs[1]
    if node.inputs[1] is tensor:
        return node.inputs[0]
    return None


def dtype_of(tensor: gs.Tensor) -> np.dtype | None:
    if tensor.dtype is None:
        return None
    try:
        return np.dtype(tensor.dtype)
    except TypeError:
        return None


def rank_of(tensor: gs.Tensor) -> int | None:
    return None if tensor.shape is None else len(tensor.shape)


def last_dim(tensor: gs.Tensor) -> int | None:
    """The size of the last axis of ``tensor`` when it is a known integer."""
    if not tensor.shape:
        return None
    dim = tensor.shape[-1]
    return dim if isinstance(dim, int) and dim > 0 else None


def same_dim(a, b) -> bool:
    """Whether two dimensions are provably equal: the same integer or the same symbol."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b and a >= 0
    return isinstance(a, str) and isinstance(b, str) and bool(a) and a == b


def same_shape(a: Sequence | None, b: Sequence | None) -> bool:
    return a is not None and b is not None and len(a) == len(b) and \
        all(same_dim(x, y) for x, y in zip(a, b))


def reduces_last_axis(node: gs.Node, rank: int | None) -> bool:
    """Whether ReduceMean-like ``node`` reduces exactly the last axis of a rank-``rank``
    input and keeps it (axes as attribute before opset 18, as input from 18)."""
    if node.attrs.get("keepdims", 1) != 1:
        return False
    if len(node.inputs) > 1 and node.inputs[1].name:
        axes = constant_value(node.inputs[1])
    else:
        axes = node.attrs.get("axes")
    if axes is None:
        return False
    axes = [int(a) for a in np.asarray(axes).reshape(-1)]
    return len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1))


def vector(tensor: gs.Tensor, size: int, rank: int, dtype: np.dtype, scope: Scope,
           hint: str) -> gs.Tensor | None:
    """``tensor`` as a 1-D [size] operand of a normalization (its scale or bias), when
    multiplying or adding it to a rank-``rank`` [..., size] tensor only acts along the
    last axis: a constant of shape [1, ..., 1, size] or [1] (reshaped or broadcast into a
    new initializer), or any tensor of shape [size]."""
    value = constant_value(tensor)
    if value is not None:
        if value.dtype != dtype or value.ndim > rank or value.size not in (1, size) or \
                any(d != 1 for d in value.shape[:-1]):
            return None
        if value.shape == (size,) and isinstance(tensor, gs.Constant):
            return tensor
        return scope.constant(f"{tensor.name or hint}_vector",
                              np.broadcast_to(value.reshape(-1), (size,)).astype(dtype))
    if dtype_of(tensor) != dtype or tensor.shape is None or len(tensor.shape) != 1 \
            or not same_dim(tensor.shape[0], size):
        return None
    return tensor


# ---------------------------------------------------------------------- opset upgrade
def upgrade_opset(model: Model, version: int) -> str | None:
    """Raise the model's default opset to ``version`` with ``onnx.version_converter``
    (checked, shapes re-inferred). Returns None on success, else why it was not done."""
    current = model.opset
    if current >= version:
        return None
    if current < UPGRADE_FROM:
        return f"opset {current} is older than {UPGRADE_FROM}, the oldest one upgraded"
    try:
        # (weights in the run's data file stay references: the converter rewrites nodes)
        proto = onnx.version_converter.convert_version(model.to_onnx(references=True),
                                                       version)
        onnx.checker.check_model(skeleton(proto))
        proto = infer_shapes(proto)
    except Exception as exc:  # the converter raises bare RuntimeErrors on what it lacks
        text = str(exc).strip().splitlines()
        return f"cannot convert opset {current} to {version}: {text[0] if text else exc}"
    upgraded = Model.from_proto(proto)
    model.graph = upgraded.graph
    model.input_defaults = upgraded.input_defaults
    return None

