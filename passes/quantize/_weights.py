"""What the weight-rewriting passes (``quantize-int4-weight``, ``smooth-quant``) share: the
constant weight of a MatMul/Gemm seen as a [K, N] matrix, writing a new one back, and
the activations calibration data produces at chosen tensors.

A ``Linear`` is ``y = x @ W`` (+ bias) with ``W`` known ahead of time: MatMul whose second
input is a 2-D constant, or Gemm without ``transA`` (``transB`` is undone, ``alpha`` is not
folded). The weight may sit behind a 2-D ``Transpose`` (TorchScript exports without
constant folding write ``MatMul(x, Transpose(W))``); ``set_weight`` then stores the
result as a new initializer and the Transpose goes when nothing else reads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import verify
from graphopt.ir import Model
from graphopt.passes._patterns import Miss, is_default_domain
from graphopt.rewrite import constant_value, remove_dead, unique_name

FLOAT_TYPES = (np.dtype(np.float32), np.dtype(np.float16))


@dataclass
class Linear:
    """A MatMul/Gemm with a constant [K, N] weight (``x @ weight``)."""

    node: gs.Node
    graph: gs.Graph
    weight: np.ndarray  # [K, N], the node's dtype
    source: gs.Tensor   # the node input that carries the weight
    feeders: list[gs.Node]  # Transpose/Constant nodes computing ``source``

    @property
    def x(self) -> gs.Tensor:
        return self.node.inputs[0]

    @property
    def trans_b(self) -> bool:
        return self.node.op == "Gemm" and bool(self.node.attrs.get("transB", 0))

    @property
    def k(self) -> int:
        return int(self.weight.shape[0])

    @property
    def n(self) -> int:
        return int(self.weight.shape[1])


def resolve_constant(tensor: gs.Tensor | None) -> np.ndarray | None:
    """``constant_value`` through chains of Identity nodes (exports alias one shared
    parameter through Identity; the cleanup pipeline removes them, but need not have
    run)."""
    seen = 0
    while tensor is not None and seen < 16:
        value = constant_value(tensor)
        if value is not None:
            return value
        if len(tensor.inputs) != 1 or tensor.inputs[0].op != "Identity" or \
                not is_default_domain(tensor.inputs[0]):
            return None
        tensor, seen = tensor.inputs[0].inputs[0], seen + 1
    return None


def _weight_matrix(tensor: gs.Tensor, pinned: set[int]) -> tuple[np.ndarray, list[gs.Node]] | None:
    """The constant 2-D value of ``tensor`` (possibly a Transpose of one) and the nodes
    computing it."""
    if id(tensor) in pinned:
        return None
    value = resolve_constant(tensor)
    if value is not None:
        feeders = list(tensor.inputs) if tensor.inputs else []
        return (value, feeders) if value.ndim == 2 else None
    if len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    if node.op != "Transpose" or not is_default_domain(node) or id(node.inputs[0]) in pinned:
        return None
    inner = resolve_constant(node.inputs[0])
    perm = node.attrs.get("perm")
    if inner is None or inner.ndim != 2 or (perm is not None and list(perm) != [1, 0]):
        return None
    feeders = [node, *node.inputs[0].inputs]
    return inner.T, feeders


def linear_of(node: gs.Node, graph: gs.Graph, pinned: set[int]) -> Linear | Miss:
    """``node`` as a ``Linear``, or why it is not one. ``pinned``: ids of graph inputs
    (overridable initializers are not constants)."""
    if not is_default_domain(node) or node.op not in ("MatMul", "Gemm"):
        return Miss("not a MatMul/Gemm")
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return Miss("Gemm with transA")
    found = _weight_matrix(node.inputs[1], pinned)
    if found is None:
        return Miss("weight is not a constant matrix")
    value, feeders = found
    if value.dtype not in FLOAT_TYPES:
        return Miss(f"weight of type {value.dtype}")
    x = node.inputs[0]
    if x.shape is not None and len(x.shape) < 2:
        return Miss("1-D activation")
    weight = value.T if node.op == "Gemm" and node.attrs.get("transB", 0) else value
    return Linear(node, graph, np.ascontiguousarray(weight), node.inputs[1], feeders)


def linears(model: Model, misses: dict | None = None) -> list[Linear]:
    """Every ``Linear`` of the model (all graphs); ``misses`` counts why others are not."""
    pinned = {id(t) for g in model.all_graphs() for t in g.inputs}
    found = []
    for graph in model.all_graphs():
        for node in list(graph.nodes):
            if node.op not in ("MatMul", "Gemm"):
                continue
            lin = linear_of(node, graph, pinned)
            if lin:
                found.append(lin)
            elif misses is not None:
                misses[lin.reason] = misses.get(lin.reason, 0) + 1
    return found


def set_weight(lin: Linear, weight: np.ndarray, names: set[str], hint: str = "") -> None:
    """Make ``lin`` compute ``x @ weight`` ([K, N]) from a new initializer."""
    value = weight.T if lin.trans_b else weight
    name = unique_name(names, hint or f"{lin.source.name or lin.node.name}_scaled")
    const = gs.Constant(name, np.ascontiguousarray(value.astype(lin.weight.dtype)))
    lin.node.inputs[1] = const
    lin.source = const
    drop_feeders(lin)
    lin.weight = np.ascontiguousarray(weight.astype(lin.weight.dtype))


def drop_feeders(lin: Linear) -> None:
    """Remove the Transpose/Constant nodes that computed the old weight, if now unused."""
    if lin.feeders:
        remove_dead(lin.feeders, lin.graph)
        lin.feeders = []


# ---------------------------------------------------------------------- activations
def capture(model: Model, tensors: Iterable[gs.Tensor], feeds: Sequence[dict[str, np.ndarray]],
            consume: Callable[[str, np.ndarray], None]) -> None:
    """Run the model in ONNX Runtime on each of ``feeds`` and hand the value of each of
    ``tensors`` (main-graph tensors, by name) to ``consume(name, array)``."""
    types = {t.name: _elem_type(t) for t in tensors}
    names = list(types)
    proto = model.to_onnx()
    outputs = {o.name for o in proto.graph.output}
    inputs = {i.name for i in proto.graph.input}
    for name in names:
        if name not in outputs and name not in inputs:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name],
                                                                         None))
    sess = verify.session(proto, threads=min(4, os.cpu_count() or 1))
    accepted = {i.name for i in [*sess.get_inputs(), *sess.get_overridable_initializers()]}
    wanted = [n for n in names if n not in inputs]
    for feed in feeds:
        values = sess.run(wanted, {k: v for k, v in feed.items() if k in accepted})
        for name, value in zip(wanted, values):
            consume(name, value)
        for name in names:
            if name in inputs and name in feed:
                consume(name, np.asarray(feed[name]))


def _elem_type(tensor: gs.Tensor) -> int:
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype))
    except (TypeError, KeyError):
        return onnx.TensorProto.FLOAT
