"""Lossless fusion: fold per-feature arithmetic before a matrix product into its weights.

The CNN fusions (``graphopt.passes.fusion.cnn``) fold a per-channel affine op *after* a
layer into it; this one folds one *before* a Gemm/MatMul, along the product's reduction
axis: ``(x * s + t) @ W + b = x @ (s · W) + (t @ W + b)``. New weights are computed in
float64 and stored as new initializers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import Model
from graphopt.pass_infra import Pass, PassContext, PassResult
from graphopt.passes.fusion.cnn import FoldScope, bn_affine, is_float, optional_input
from graphopt.rewrite import consumers, constant_value, remove_node, walk


@dataclass
class _InputAffine:
    """A per-feature affine op writing a matrix product's input: ``x * scale + shift``
    along the product's reduction axis (the input's last)."""

    node: gs.Node
    data: gs.Tensor  # what the affine op reads
    scale: np.ndarray  # [K], float64
    shift: np.ndarray  # [K], float64


def _per_feature(value: np.ndarray | None, data: gs.Tensor, k: int) -> np.ndarray | None:
    """``value`` as a float64 [K] vector when it broadcasts against ``data`` along the
    last axis only and leaves its shape as it is (shapes [K], [1, K], scalar...)."""
    if not is_float(value) or not np.all(np.isfinite(value)):
        return None
    if value.ndim > 1 and (data.shape is None or len(data.shape) < value.ndim):
        return None  # it could widen the data's rank
    if any(d != 1 for d in value.shape[:-1]) or (value.ndim and value.shape[-1] not in (1, k)):
        return None
    return np.broadcast_to(value.astype(np.float64).reshape(-1), (k,))


def _input_affine(node: gs.Node, scope: FoldScope, k: int,
                  dtype: np.dtype) -> _InputAffine | None:
    """The Mul, Add or Sub by a per-feature constant (or an Add of a value to itself), or
    the inference BatchNormalization of a 2-D input, that writes ``node``'s first input
    and nothing else."""
    affine = scope.sole_producer(node.inputs[0], node)
    if affine is None:
        return None
    if affine.op == "BatchNormalization":
        data = affine.inputs[0]
        found = bn_affine(affine, scope, k) if data.shape is not None \
            and len(data.shape) == 2 else None  # channel axis 1 is the last
        return None if found is None else _InputAffine(affine, data, *found)
    if affine.op not in ("Mul", "Add", "Sub") or len(affine.inputs) != 2:
        return None
    if affine.op == "Add" and affine.inputs[0] is affine.inputs[1] \
            and constant_value(affine.inputs[0]) is None:  # x + x = 2x, exactly
        return _InputAffine(affine, affine.inputs[0], np.full(k, 2.0), np.zeros(k))
    for side in (0, 1):
        data, const = affine.inputs[side], affine.inputs[1 - side]
        value = constant_value(const)
        if value is None or value.dtype != dtype or constant_value(data) is not None:
            continue
        vector = _per_feature(value, data, k)
        if vector is None or _gated(data):
            continue
        ones, zeros = np.ones(k), np.zeros(k)
        if affine.op == "Mul":
            return _InputAffine(affine, data, vector, zeros)
        if affine.op == "Add":
            return _InputAffine(affine, data, ones, vector)
        return _InputAffine(affine, data, ones, -vector) if side == 0 else \
            _InputAffine(affine, data, -ones, vector)  # x - c, c - x
    return None


def _gated(tensor: gs.Tensor) -> bool:
    """Whether ``tensor`` is a product of two computed values: the end of a gated
    activation (GELU's x·Φ(x), SiLU's x·σ(x), HardSwish's x·relu6(x + 3)), whose constant
    scale after it is part of the pattern an activation fusion, or a target's lowering,
    matches (LiteRT writes the erf GELU as its builtin only if it finds the 0.5)."""
    producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    return producer is not None and producer.op in ("Mul", "Div") and \
        all(constant_value(t) is None for t in producer.inputs)


class FuseAffineIntoGemm(Pass):
    """Fold a per-feature affine op before a matrix product into its weights: a Mul, Add
    or Sub by a constant along the input's last axis, or a BatchNormalization of a 2-D
    input (a classifier head's BatchNorm1d before its Linear, an MLP's input
    normalization). ``(x * s + t) @ W + b = x @ (s · W) + (t @ W + b)``: the scale goes
    into W's rows, the shift into the bias. A MatMul of a 2-D input becomes a Gemm to take
    a shift; one of a higher-rank input takes a scale only. A Gemm reading its input
    transposed (``transA``) or a weight another node reads too (the model would store it
    twice) is left alone, and so is a convolution (its zero padding would see the
    shift) and the scale ending a gated activation (``_gated``)."""

    name = "fuse-affine-gemm"
    family = "fusion"
    lossless = True
    emits = (("", "Gemm"),)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        scope = FoldScope(model)
        fused, again = 0, True
        while again:  # a chain (Mul, then Add) folds one op at a time, nearest first
            again = False
            for _, node in walk(scope.graphs):
                if self._fold(node, scope, model.opset):
                    fused, again = fused + 1, True
        return PassResult(changed=fused > 0, stats={"fused": fused})

    def _fold(self, node: gs.Node, scope: FoldScope, opset: int) -> bool:
        if node.op not in ("Gemm", "MatMul") or len(node.inputs) < 2 \
                or (node.op == "Gemm" and node.attrs.get("transA", 0)):
            return False
        weight = constant_value(node.inputs[1])
        if not is_float(weight) or weight.ndim != 2 or consumers(node.inputs[1]) != [node]:
            return False  # (a weight another node reads would be stored twice)
        trans_b = node.op == "Gemm" and node.attrs.get("transB", 0)
        rows = weight.T if trans_b else weight  # [K, N]
        affine = _input_affine(node, scope, rows.shape[0], weight.dtype)
        if affine is None:
            return False
        shifted = bool(np.any(affine.shift != 0))
        x = node.inputs[0]
        two_d = x.shape is not None and len(x.shape) == 2
        bias_tensor = optional_input(node.inputs, 2)
        bias = constant_value(bias_tensor)
        if shifted and (node.op == "MatMul" and not two_d or opset < 7  # (Gemm's C
                        or bias_tensor is not None and not is_float(bias)):  # broadcasts)
            return False
        graph = scope.owner[id(node)]
        hint = node.inputs[1].name or node.name or node.op
        scaled = rows.astype(np.float64) * affine.scale[:, None]
        node.inputs[1] = scope.constant(graph, f"{hint}_fused",
                                        (scaled.T if trans_b else scaled).astype(weight.dtype))
        if shifted:
            node.op = "Gemm"
            alpha, beta = node.attrs.get("alpha", 1.0), node.attrs.get("beta", 1.0)
            extra = alpha * (affine.shift @ rows.astype(np.float64))  # [N]
            total = extra if bias_tensor is None or beta == 0 else \
                bias.astype(np.float64) * beta + extra
            if "beta" in node.attrs:
                node.attrs["beta"] = 1.0
            new_bias = scope.constant(graph, f"{hint}_fused_bias", total.astype(weight.dtype))
            if len(node.inputs) > 2:  # (a bias, or an omitted one: an empty name)
                node.inputs[2] = new_bias
            else:
                node.inputs.append(new_bias)
        remove_node(affine.node, scope.owner[id(affine.node)])
        node.inputs[0] = affine.data
        return True
