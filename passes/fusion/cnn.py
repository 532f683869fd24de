"""Lossless CNN fusions: fold per-channel arithmetic and zero padding into the layer before.

Each pass matches a producer (Conv, ConvTranspose, Gemm, MatMul or Pad) whose output has
exactly one reader and is no graph output, and absorbs that reader: the producer then
writes the reader's output tensor itself, so the tensor keeps its name and its readers.
New weights are computed in float64, cast back to the weight's dtype and stored as new
initializers: a weight shared with another layer is never changed in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import Model
from graphopt.pass_infra import Pass, PassContext, PassResult
from graphopt.rewrite import (consumers, constant_value, is_graph_output, make_constant,
                              remove_node, tensor_names, walk)

FLOATS = (np.float16, np.float32, np.float64)


# ---------------------------------------------------------------------- shared helpers
class FoldScope:
    """The graphs of a model, which graph owns each node, and the tensor names in use."""

    def __init__(self, model: Model):
        self.graphs = list(model.all_graphs())
        self.owner = {id(n): g for g in self.graphs for n in g.nodes}
        self.names = tensor_names(self.graphs)

    def sole_producer(self, tensor: gs.Tensor, reader: gs.Node) -> gs.Node | None:
        """The node writing ``tensor`` when ``reader`` is its only reader, the tensor is no
        graph output and both nodes live in the same graph."""
        if len(tensor.inputs) != 1:  # a constant or graph input: read by many, often
            return None
        readers = consumers(tensor)
        if len(readers) != 1 or readers[0] is not reader or is_graph_output(tensor, self.graphs):
            return None
        producer = tensor.inputs[0]
        same_graph = self.owner.get(id(producer)) is self.owner.get(id(reader))
        return producer if same_graph and len(producer.outputs) == 1 else None

    def constant(self, graph: gs.Graph, hint: str, value: np.ndarray) -> gs.Constant:
        """A new initializer whose name is unused in every graph of the model."""
        return make_constant(graph, hint, value, taken=self.names)

    def absorb(self, producer: gs.Node, reader: gs.Node) -> None:
        """Let ``producer`` write ``reader``'s output (name and readers kept); drop ``reader``."""
        graph = self.owner[id(reader)]
        out = reader.outputs[0]
        remove_node(reader, graph)
        producer.outputs[0] = out


def optional_input(inputs: list[gs.Tensor], index: int) -> gs.Tensor | None:
    """Optional input ``index``, or None when it is missing or omitted (empty name)."""
    return inputs[index] if len(inputs) > index and inputs[index].name else None


def is_float(value: np.ndarray | None) -> bool:
    return value is not None and value.dtype in FLOATS


@dataclass
class _Layer:
    """A layer with a constant weight and optional constant bias, ready to fold into."""

    node: gs.Node
    weight: np.ndarray
    bias: np.ndarray | None  # Gemm: its C input, any shape broadcasting to [M, N]
    channels: int  # output channels (features for Gemm/MatMul)


def _layer(node: gs.Node) -> _Layer | None:
    """``node`` as a foldable layer: Conv, ConvTranspose, Gemm or rank-2 MatMul."""
    if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.inputs) < 2:
        return None
    weight = constant_value(node.inputs[1])
    bias_tensor = optional_input(node.inputs, 2)
    bias = constant_value(bias_tensor)
    if not is_float(weight) or (bias_tensor is not None and bias is None):
        return None
    if node.op == "Conv":
        channels = weight.shape[0] if weight.ndim >= 3 else None
    elif node.op == "ConvTranspose":
        channels = weight.shape[1] * node.attrs.get("group", 1) if weight.ndim >= 3 else None
    elif node.op == "Gemm":
        channels = weight.shape[0 if node.attrs.get("transB", 0) else 1]
    else:  # MatMul: only x[N, K] @ W[K, C], which is a Gemm
        x = node.inputs[0]
        channels = weight.shape[1] if weight.ndim == 2 and x.shape is not None \
            and len(x.shape) == 2 else None
    return None if channels is None else _Layer(node, weight, bias, channels)


def _scaled_weight(layer: _Layer, scale: np.ndarray) -> np.ndarray:
    """The layer's weight with output channel ``c`` multiplied by ``scale[c]``: in float32
    for a float32 weight (one product per element, rounded once more than in float64:
    within an ulp, and no float64 copy of a large weight), else in float64."""
    w = layer.weight
    if w.dtype == np.float32:
        scale = scale.astype(np.float32)
    else:
        w = w.astype(np.float64)
    node = layer.node
    if node.op == "Conv":  # [C_out, C_in/group, k...]
        return w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    if node.op == "ConvTranspose":  # [C_in, C_out/group, k...]: group g owns rows g*C_in/group...
        group = node.attrs.get("group", 1)
        per_group = scale.reshape(group, 1, -1)
        rows = np.broadcast_to(per_group, (group, w.shape[0] // group, w.shape[1]))
        return w * rows.reshape(w.shape[:2] + (1,) * (w.ndim - 2))
    if node.op == "Gemm" and node.attrs.get("transB", 0):  # [N, K]
        return w * scale[:, None]
    return w * scale[None, :]  # Gemm / MatMul: [K, N]


def _fold_affine(scope: FoldScope, layer: _Layer, scale: np.ndarray, shift: np.ndarray) -> None:
    """Make ``layer`` compute ``layer(x) * scale + shift`` (per output channel, float64)."""
    node, graph = layer.node, scope.owner[id(layer.node)]
    dtype = layer.weight.dtype
    if node.op == "MatMul":
        node.op = "Gemm"
    bias = np.zeros(1) if layer.bias is None else layer.bias.astype(np.float64)
    if node.op == "Gemm":
        bias = bias * node.attrs.get("beta", 1.0)
        if "beta" in node.attrs:
            node.attrs["beta"] = 1.0
    weight = _scaled_weight(layer, scale).astype(dtype, copy=False)
    bias = (bias * scale + shift).astype(dtype)
    hint = node.inputs[1].name or node.name or node.op
    node.inputs[1] = scope.constant(graph, f"{hint}_fused", weight)
    new_bias = scope.constant(graph, f"{hint}_fused_bias", bias)
    if len(node.inputs) > 2:
        node.inputs[2] = new_bias
    else:
        node.inputs.append(new_bias)


def _per_channel(value: np.ndarray | None, rank: int, channels: int) -> np.ndarray | None:
    """``value`` as a float64 [channels] vector, when it broadcasts against a rank-``rank``
    [N, C, ...] tensor along the channel axis only (shapes [C,1,1], [1,C,1,1], scalar)."""
    if value is None or value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if shape[0] != 1 or any(d != 1 for d in shape[2:]) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.astype(np.float64).reshape(-1), (channels,))


def _conv_and_constant(node: gs.Node, scope: FoldScope) -> tuple[_Layer, np.ndarray] | None:
    """For a binary ``node`` reading a Conv/ConvTranspose output and a per-channel
    constant: the layer and the constant as a [C] vector."""
    if len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    for side in (0, 1):
        producer = scope.sole_producer(node.inputs[side], node)
        if producer is None or producer.op not in ("Conv", "ConvTranspose"):
            continue
        layer = _layer(producer)
        other = constant_value(node.inputs[1 - side])
        if layer is None or other is None or other.dtype != layer.weight.dtype:
            continue
        vector = _per_channel(other, layer.weight.ndim, layer.channels)
        if vector is not None and np.all(np.isfinite(vector)):
            return layer, vector
    return None


def _used(tensor: gs.Tensor, scope: FoldScope) -> bool:
    return bool(tensor.name) and (bool(tensor.outputs) or is_graph_output(tensor, scope.graphs))


# ---------------------------------------------------------------------- fuse-conv-bn
def _match_bn(bn: gs.Node, scope: FoldScope,
              opset: int) -> tuple[_Layer, np.ndarray, np.ndarray] | None:
    """An inference BatchNormalization after a foldable layer: (layer, scale, shift)."""
    if bn.op != "BatchNormalization":
        return None
    producer = scope.sole_producer(bn.inputs[0], bn)
    layer = _layer(producer) if producer is not None else None
    if layer is None or (layer.node.op in ("Gemm", "MatMul") and opset < 7):
        return None
    found = bn_affine(bn, scope, layer.channels)
    return None if found is None else (layer, *found)


def bn_affine(bn: gs.Node, scope: FoldScope, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, shift) of an inference BatchNormalization over ``k`` channels."""
    if len(bn.inputs) != 5 or bn.attrs.get("training_mode", 0) \
            or not bn.attrs.get("is_test", 1) or bn.attrs.get("spatial", 1) != 1 \
            or any(_used(t, scope) for t in bn.outputs[1:]):
        return None
    params = [constant_value(t) for t in bn.inputs[1:]]
    if not all(is_float(p) and p.shape == (k,) for p in params):
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    with np.errstate(all="ignore"):
        scale = gamma / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
        shift = beta - mean * scale
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
        return None
    return scale, shift


class _AffineFold(Pass):
    """Fold a per-channel affine op (scale, shift) after a layer into the layer's weights."""

    family = "fusion"
    lossless = True

    def match(self, node: gs.Node, scope: "FoldScope", opset: int):
        """(layer, scale, shift) when ``node`` folds into the layer before it, else None."""
        raise NotImplementedError

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        scope = FoldScope(model)
        fused = 0
        for _, node in walk(scope.graphs):
            match = self.match(node, scope, model.opset)
            if match is None:
                continue
            layer, scale, shift = match
            _fold_affine(scope, layer, scale, shift)
            scope.absorb(layer.node, node)
            fused += 1
        return PassResult(changed=fused > 0, stats={"fused": fused})


class FuseConvBatchNorm(_AffineFold):
    """Fold an inference BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul before it."""

    name = "fuse-conv-bn"
    emits = (("", "Gemm"),)

    def match(self, node, scope, opset):
        return _match_bn(node, scope, opset)


# ---------------------------------------------------------------------- fuse-conv-add/mul
class FuseConvAdd(_AffineFold):
    """Fold an Add of a per-channel constant after a Conv into the Conv's bias."""

    name = "fuse-conv-add"

    def match(self, node, scope, opset):
        match = _conv_and_constant(node, scope) if node.op == "Add" else None
        return None if match is None else (match[0], np.ones(match[0].channels), match[1])


class FuseConvMul(_AffineFold):
    """Fold a Mul by a per-channel constant after a Conv into the Conv's weight and bias."""

    name = "fuse-conv-mul"

    def match(self, node, scope, opset):
        match = _conv_and_constant(node, scope) if node.op == "Mul" else None
        return None if match is None else (match[0], match[1], np.zeros(match[0].channels))


# ---------------------------------------------------------------------- fuse-pad-conv
def _zero_pads(pad: gs.Node, rank: int, opset: int) -> list[int] | None:
    """The [begin..., end...] amounts over all ``rank`` axes of a constant-zero Pad that
    pads spatial axes only (never batch or channel) by non-negative amounts."""
    mode = pad.attrs.get("mode", "constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        return None
    if opset < 11:
        pads = pad.attrs.get("pads", pad.attrs.get("paddings"))
        value, axes = np.asarray(pad.attrs.get("value", 0.0)), None
    else:
        value_t, axes_t = optional_input(pad.inputs, 2), optional_input(pad.inputs, 3)
        pads = constant_value(optional_input(pad.inputs, 1))
        value = constant_value(value_t) if value_t is not None else np.zeros(())
        axes = constant_value(axes_t) if axes_t is not None else None
        if value is None or (axes_t is not None and axes is None):
            return None
    if pads is None or value.size > 1 or np.any(value != 0):
        return None
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    axes = list(range(rank)) if axes is None else [int(a) for a in axes.reshape(-1)]
    if len(pads) != 2 * len(axes) or not all(-rank <= a < rank for a in axes):
        return None
    axes = [a % rank for a in axes]
    if len(set(axes)) != len(axes):
        return None
    full = [0] * (2 * rank)
    for i, axis in enumerate(axes):
        full[axis], full[rank + axis] = pads[i], pads[len(axes) + i]
    if min(full) < 0 or any(full[a] or full[rank + a] for a in (0, 1)):
        return None
    return full


def _pads_into(node: gs.Node) -> int | None:
    """Spatial rank of a Conv or an AveragePool(count_include_pad=1) whose pads attribute
    can absorb a zero Pad (auto_pad NOTSET; no ceil_mode for pools)."""
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) != "NOTSET":
        return None
    if node.op == "Conv":
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        if weight is None or weight.shape is None or len(weight.shape) < 3:
            return None
        return len(weight.shape) - 2
    if node.op == "AveragePool" and node.attrs.get("count_include_pad", 0) == 1 \
            and not node.attrs.get("ceil_mode", 0) and "kernel_shape" in node.attrs:
        return len(node.attrs["kernel_shape"])
    return None


class FusePadConv(Pass):
    """Merge a constant-zero spatial Pad into the pads of the Conv/AveragePool reading it."""

    name = "fuse-pad-conv"
    family = "fusion"
    lossless = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        scope = FoldScope(model)
        fused = 0
        for _, node in walk(scope.graphs):
            spatial = _pads_into(node) if node.op in ("Conv", "AveragePool") else None
            pad = scope.sole_producer(node.inputs[0], node) if spatial is not None else None
            if pad is None or pad.op != "Pad" or node.inputs[0] in node.inputs[1:]:
                continue
            extra = _zero_pads(pad, spatial + 2, model.opset)
            if extra is None:
                continue
            old = list(node.attrs.get("pads", [0] * (2 * spatial)))
            node.attrs["pads"] = [old[i] + extra[2 + i] for i in range(spatial)] + \
                [old[spatial + i] + extra[spatial + 4 + i] for i in range(spatial)]
            node.inputs[0] = pad.inputs[0]
            remove_node(pad, scope.owner[id(pad)])
            fused += 1
        return PassResult(changed=fused > 0, stats={"fused": fused})


# ---------------------------------------------------------------------- fuse-matmul-add
def _match_matmul_add(add: gs.Node, scope: FoldScope,
                      opset: int) -> tuple[gs.Node, gs.Tensor] | None:
    """Add(MatMul(x[N, K], W[K, C]), b) with constant W and b broadcasting to [N, C]:
    (the MatMul, b's tensor)."""
    if add.op != "Add" or len(add.inputs) != 2 or opset < 7:
        return None
    for side in (0, 1):
        matmul = scope.sole_producer(add.inputs[side], add)
        if matmul is None or matmul.op != "MatMul":
            continue
        x, bias_t = matmul.inputs[0], add.inputs[1 - side]
        weight, bias = constant_value(matmul.inputs[1]), constant_value(bias_t)
        if x.shape is None or len(x.shape) != 2 or not is_float(weight) \
                or weight.ndim != 2 or bias is None or bias.dtype != weight.dtype:
            continue
        if _broadcasts_to(bias.shape, (x.shape[0], weight.shape[1])):
            return matmul, bias_t
    return None


def _broadcasts_to(shape: Iterable[int], target: tuple) -> bool:
    """Whether ``shape`` broadcasts to ``target`` (whose dims may be symbolic) unchanged."""
    shape = tuple(shape)
    if len(shape) > len(target):
        return False
    return all(s == 1 or (isinstance(t, int) and s == t)
               for s, t in zip(reversed(shape), reversed(target)))


class FuseMatMulAdd(Pass):
    """Turn MatMul(x, W) + b on a 2-D x with constant W and b into one Gemm."""

    name = "fuse-matmul-add"
    family = "fusion"
    lossless = True
    emits = (("", "Gemm"),)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        scope = FoldScope(model)
        fused = 0
        for _, node in walk(scope.graphs):
            match = _match_matmul_add(node, scope, model.opset)
            if match is None:
                continue
            matmul, bias = match
            matmul.op = "Gemm"
            matmul.inputs.append(bias)
            scope.absorb(matmul, node)
            fused += 1
        return PassResult(changed=fused > 0, stats={"fused": fused})
