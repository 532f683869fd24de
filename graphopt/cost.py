"""Cost models: what a model costs to run on a device.

``AnalyticCostModel`` is a roofline model: each node's latency is the larger of its
compute time (FLOPs / the device's peak for the dtype, scaled by a per-op efficiency) and
its memory time (bytes moved / bandwidth), plus a fixed per-node dispatch overhead. It is
deterministic and needs only shapes, so it can rank rewrites before anything runs.
"""

from __future__ import annotations

import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.errors import GraphoptError
from graphopt.runtime_rules import (QDQ_FUSED, REORDERS, activation_pass, blocked,
                                    from_dequantize, fused_dequantize, fused_into_conv,
                                    layout_reorders, qdq_dropped)

if typing.TYPE_CHECKING:
    from graphopt.ir import Model


@dataclass(frozen=True)
class Device:
    """The figures of a device the cost model needs."""

    name: str
    peak_flops: dict[str, float]  # dtype name -> FLOP/s (all cores)
    bandwidth: float  # bytes/s from main memory
    cores: int = 1
    node_overhead_s: float = 2e-6  # per-node dispatch cost
    # Whether the device has int8 dot-product instructions (x86 VNNI/AMX, Arm dotprod):
    # without them int8 kernels saturate int16 intermediates (x86 VPMADDUBSW) and gain
    # little over float32. ``None``: unknown.
    int8_fast: bool | None = None
    # Channel counts the device's kernels run best at multiples of (float32 vector
    # lanes: 8 with AVX2, 16 with AVX-512, 4 with NEON); pruning rounds to it.
    channel_multiple: int = 8
    # Whether the runtime runs convolutions in a channel-blocked layout of that block
    # and reorders tensors into and out of it where other ops read them (ONNX Runtime's
    # NCHWc on x86 with AVX2 or AVX-512): ``layout_reorders``.
    blocked_layout: bool = False

    def peak(self, dtype: str) -> float:
        return self.peak_flops.get(dtype, self.peak_flops.get("float32", 1e11))


@dataclass
class NodeCost:
    name: str
    op_type: str
    flops: float
    bytes: float
    latency_s: float


@dataclass
class Cost:
    latency_s: float
    flops: float
    bytes: float
    params: int
    nodes: list[NodeCost] = field(default_factory=list)


class CostModel(Protocol):
    def estimate(self, model: "Model", device: Device, *, infer: bool = True) -> Cost:
        """``infer=False``: the model's shapes were just inferred (by the caller); do not
        infer them again for tensors whose shapes stay unknown."""
        ...


# How close to peak each op family gets; everything else is memory-bound elementwise work.
_EFFICIENCY = {"Conv": 0.6, "ConvTranspose": 0.5, "MatMul": 0.7, "Gemm": 0.7,
               "Attention": 0.6, "MultiHeadAttention": 0.6, "FusedConv": 0.6}
# Ops that move no data at run time in any serious runtime (views, metadata).
_FREE = {"Shape", "Size", "Constant", "Identity", "Reshape", "Squeeze", "Unsqueeze",
         "Flatten"}
_INT8_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger",
             "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention"}


class AnalyticCostModel:
    """Roofline estimate from static shapes; unknown dimensions count as 1."""

    calibrated = False  # by measurement on the device (``CalibratedCostModel``)

    def measured(self, node: gs.Node, device: Device) -> bool:
        """Whether ``node``'s op class was measured on ``device``."""
        return False

    def estimate(self, model: "Model", device: Device, *, infer: bool = True) -> Cost:
        if infer and not _shapes_known(model):
            model = model.clone()
            try:
                model.infer_shapes()
            except GraphoptError:
                pass  # estimate with what is known; unknown sizes count as 1
        nodes = [self.node_cost(node, device) for graph in model.all_graphs()
                 for node in graph.nodes]
        nodes += [NodeCost(f"{kind} {tensor.name}", kind, 0.0, 2.0 * tensor_bytes(tensor),
                           self.reorder_latency(kind, tensor, device))
                  for graph in model.all_graphs()
                  for kind, tensor in layout_reorders(graph, device)]
        return Cost(
            latency_s=sum(n.latency_s for n in nodes),
            flops=sum(n.flops for n in nodes),
            bytes=sum(n.bytes for n in nodes),
            params=model.num_params(),
            nodes=nodes,
        )

    def int8_latency(self, node: gs.Node, device: Device, dynamic: bool) -> float:
        """Estimated seconds of float ``node`` (Conv, MatMul, Gemm) run in int8, with the
        quantization of its input it needs (static: a QuantizeLinear; ``dynamic``: min/max
        as well)."""
        op_s, quant_s = int8_roofline(node, device, dynamic)
        return op_s + quant_s + 2 * device.node_overhead_s

    def node_cost(self, node: gs.Node, device: Device) -> NodeCost:
        flops, moved, seconds = roofline(node, device)
        latency = 0.0 if fused_dequantize(node) or fused_into_conv(node, device) else \
            self.latency(node, seconds, device)
        activation = activation_pass(node)
        if activation:  # applied in a pass over the output: read and written once more
            seconds = 2.0 * tensor_bytes(node.outputs[0]) / device.bandwidth
            latency += self.pass_latency(activation_key(node, activation), seconds, device)
        return NodeCost(node.name, node.op, flops, moved, latency)

    def pass_latency(self, key: tuple[str, str, str], seconds: float,
                     device: Device) -> float:
        """Seconds of a pass over memory of class ``key`` that a kernel makes inside
        itself (no dispatch of its own), whose roofline time is ``seconds``."""
        return seconds

    def latency(self, node: gs.Node, roofline_s: float, device: Device) -> float:
        """Seconds of ``node`` (not a fused DequantizeLinear) whose roofline time is
        ``roofline_s``: that plus the device's per-node overhead."""
        return roofline_s + device.node_overhead_s

    def reorder_latency(self, kind: str, tensor: gs.Tensor, device: Device) -> float:
        """Seconds of the runtime's ``kind`` reorder (``layout_reorders``) of ``tensor``:
        reading and writing it, plus the per-node overhead."""
        return 2.0 * tensor_bytes(tensor) / device.bandwidth + device.node_overhead_s


def roofline(node: gs.Node, device: Device) -> tuple[float, float, float]:
    """``(flops, bytes moved, seconds)`` of ``node`` on ``device`` by the roofline: the
    larger of compute and memory time, without the per-node overhead. A DequantizeLinear
    a runtime fuses into its readers costs nothing."""
    if fused_dequantize(node):
        return 0.0, 0.0, 0.0
    flops = node_flops(node)
    int8 = quantized(node)
    inputs = [t.inputs[0].inputs[0] if int8 and from_dequantize(t) else t
              for t in node.inputs]
    # an int8 op's output that only a QuantizeLinear reads (through a Relu or not) is
    # written as int8 by the runtime: one byte per element
    moved = 0.0 if node.op in _FREE else float(
        sum(_read_bytes(node, k, t) for k, t in enumerate(inputs)) +
        sum(numel(t) if int8 and _quantized_next(t) else tensor_bytes(t)
            for t in node.outputs))
    dtype = "int8" if int8 else \
        _dtype_name(node.outputs[0]) if node.outputs else "float32"
    compute_s = flops / (device.peak(dtype) * _EFFICIENCY.get(node.op, 0.25))
    return flops, moved, max(compute_s, moved / device.bandwidth)


def _read_bytes(node: gs.Node, index: int, tensor: gs.Tensor) -> int:
    """Bytes ``node`` reads of its input ``tensor``: all of it, except a gather's table,
    of which it reads the rows it gathers (an embedding lookup of a few tokens touches a
    few rows of a 47 MB table): at most its output's size."""
    size = tensor_bytes(tensor)
    if index == 0 and node.op in ("Gather", "GatherElements", "GatherND") and node.outputs:
        out = numel(node.outputs[0]) * (size // max(numel(tensor), 1))
        return min(size, out) if out else size
    return size


def _quantized_next(tensor: gs.Tensor) -> bool:
    """Whether only QuantizeLinear nodes read ``tensor`` (directly or through a Relu)."""
    readers = list(tensor.outputs)
    if len(readers) == 1 and readers[0].op == "Relu":
        readers = list(readers[0].outputs[0].outputs)
    return bool(readers) and all(r.op == "QuantizeLinear" for r in readers)


def weights_read(node: gs.Node) -> int:
    """Bytes of constant inputs (weights) ``node`` reads in one run (of an embedding
    table, the rows it gathers)."""
    return sum(_read_bytes(node, k, t) for k, t in enumerate(node.inputs)
               if isinstance(t, gs.Constant))


def int8_roofline(node: gs.Node, device: Device, dynamic: bool) -> tuple[float, float]:
    """``(op seconds, input quantization seconds)`` of float ``node`` run in int8 by the
    roofline, counted as ``roofline`` counts the node in the QDQ form the int8 pass
    writes (what calibration factors are fitted to): int8 input and weights, int32
    bias, an int8 output for a static Conv (the runtime writes the next layer's
    quantized input directly), float otherwise."""
    x, y = node.inputs[0], node.outputs[0]
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    bias = node.inputs[2] if len(node.inputs) > 2 and node.op in ("Conv", "FusedConv",
                                                                  "Gemm") else None
    compute = node_flops(node) / (device.peak("int8") * _EFFICIENCY.get(node.op, 0.25))
    out_bytes = numel(y) * (1 if node.op in ("Conv", "FusedConv") and not dynamic else 4)
    moved = numel(x) + numel(weight) + 4 * numel(bias) + out_bytes
    # quantizing the input: read float, write uint8 (dynamic: one more pass for min/max)
    quant = numel(x) * (9 if dynamic else 5) / device.bandwidth
    return max(compute, moved / device.bandwidth), quant


def quantized(node: gs.Node) -> bool:
    return node.op in _INT8_OPS or (node.op in QDQ_FUSED and any(
        from_dequantize(t) for t in node.inputs[:2])) or qdq_dropped(node)


# Op families for calibration (``op_key``): ops whose cost behaves alike on a CPU.
_CONV = {"Conv", "FusedConv", "ConvInteger", "QLinearConv", "ConvTranspose", "NhwcConv"}
_MATMUL = {"MatMul", "Gemm", "FusedMatMul", "FusedGemm", "MatMulInteger", "QGemm",
           "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits"}
_ATTENTION = {"Attention", "MultiHeadAttention", "QAttention"}
_NORM = {"LayerNormalization", "SkipLayerNormalization", "RMSNormalization",
         "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
         "BatchNormalization", "InstanceNormalization", "GroupNormalization"}
_POOL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool"}


def op_width(node: gs.Node) -> float:
    """The reduction length of a convolution or matrix product (input channels per group
    x kernel size; K), what its kernels' efficiency depends on besides size; 1 for
    other ops."""
    if node.op in _CONV:
        weight = node.inputs[3] if node.op == "QLinearConv" else \
            node.inputs[1] if len(node.inputs) > 1 else None
        if weight is not None and weight.shape is not None and len(weight.shape) > 1:
            return float(np.prod([d if isinstance(d, int) and d > 0 else 1
                                  for d in weight.shape[1:]]))
    if node.op in _MATMUL and node.inputs and node.inputs[0].shape:
        k = node.inputs[0].shape[-1]
        if node.op == "Gemm" and node.attrs.get("transA", 0) and len(node.inputs[0].shape) > 1:
            k = node.inputs[0].shape[0]
        return float(k) if isinstance(k, int) and k > 0 else 1.0
    if node.op in _ATTENTION:
        return float(_head_size(node) or 1)
    return 1.0


# The output width from which a convolution's kernels run as on any wider map
SPAN = 8


def op_span(node: gs.Node) -> float:
    """A convolution's output width, up to ``SPAN``; ``SPAN`` for other ops. Maps narrower
    than that run their kernels at another efficiency: a ResNet-style CNN's 3x3 layers of
    16 channels on 16 x 16 maps ran at 0.56 of their roofline time where a probe of the
    same roofline time on 4 x 4 maps ran at 0.61 and one on 32 x 32 at 0.39; telling
    the maps apart from 16 wide up (not only below 8) took the MobileNet-style CNN's
    error from -4% to +14%."""
    if node.op in _CONV and node.outputs and node.outputs[0].shape and \
            len(node.outputs[0].shape) == 4 and isinstance(node.outputs[0].shape[-1], int):
        return float(min(max(node.outputs[0].shape[-1], 1), SPAN))
    return float(SPAN)


def _head_size(node: gs.Node) -> int | None:
    """An attention node's size of one head (its products' reduction length: a small
    transformer's heads of 16 run far further from peak than BERT's of 64)."""
    heads = node.attrs.get("num_heads")
    if not isinstance(heads, int) or heads < 1:
        return None
    weight = node.inputs[1] if node.op != "MultiHeadAttention" and len(node.inputs) > 1 \
        else None
    if weight is not None and weight.shape is not None and len(weight.shape) == 2 and \
            isinstance(weight.shape[1], int):  # com.microsoft: Q, K and V projected inside
        hidden = weight.shape[1] // 3
    elif node.inputs and node.inputs[0].shape and isinstance(node.inputs[0].shape[-1], int):
        hidden = node.inputs[0].shape[-1]
    else:
        return None
    return hidden // heads if hidden % heads == 0 else None


def op_key(node: gs.Node, device: Device | None = None) -> tuple[str, str, str]:
    """``(family, dtype, kind)``: the class of ops a calibration measures together.
    Convolutions are ``spatial``, ``pointwise`` (1x1), ``depthwise``, ``stem`` or
    ``narrow``; matrix products
    multiply by ``weights`` (a constant) or by another ``activation``; any other op is
    its own kind within its family (``elementwise`` for everything without one).
    Convolutions of at most 4 input channels (a network's first layer) are ``stem``;
    other k x k ones are ``narrow`` where their channels do not fit the device's channel
    block (``blocked``: ONNX Runtime pads them to it, or reads a narrow input unblocked;
    on AVX-512, 3x3 layers of 8 and 12 channels ran at 1.1-2.3 of their roofline, those
    of 16 at 0.43-0.50), or, with no device given, where they have at most 16 input
    channels."""
    op = node.op
    dtype = "int8" if quantized(node) else \
        _dtype_name(node.outputs[0]) if node.outputs else "float32"
    if op in _CONV:
        weight = node.inputs[3] if op == "QLinearConv" else \
            node.inputs[1] if len(node.inputs) > 1 else None
        shape = weight.shape if weight is not None and weight.shape is not None else None
        group = node.attrs.get("group", 1)
        if shape and group > 1 and shape[1] == 1:
            kind = "depthwise"
        elif shape and group == 1 and isinstance(shape[1], int) and shape[1] <= 4:
            kind = "stem"  # a network's first layer: too few input channels to vectorize
        elif shape and all(d == 1 for d in shape[2:]):
            kind = "pointwise"
        elif shape and group == 1 and isinstance(shape[1], int) and (
                shape[1] <= 16 if device is None else not blocked(shape, group, device)):
            kind = "narrow"  # channels that do not fit the block: far from peak
        else:
            kind = "spatial"
        return "conv", dtype, kind
    if op == "DynamicQuantizeMatMul":  # its input quantized at run time: its own class
        return "matmul", "int8", "dynamic"
    if op in _MATMUL:
        b = node.inputs[1] if len(node.inputs) > 1 else None
        constant = b is not None and (isinstance(b, gs.Constant) or from_dequantize(b)
                                      or (len(b.inputs) == 1 and b.inputs[0].op == "Constant"))
        return "matmul", dtype, "weights" if constant or op == "MatMulNBits" else "activation"
    if op in _ATTENTION:
        return "attention", dtype, op
    if op in _NORM:
        return "norm", dtype, op
    if op in _POOL:
        return "pool", dtype, op
    if op == "Softmax" or op == "LogSoftmax":
        return "softmax", dtype, op
    if op in _FREE:
        return "view", dtype, op
    if op in REORDERS:  # a runtime's own layout change (``layout_reorders``)
        return "layout", dtype, op
    if op in ("QuantizeLinear", "DequantizeLinear"):
        return QUANTIZE  # an activation's (weights' are fused: no time of their own)
    if op == "QuickGelu" and node.attrs.get("alpha", 1.702) == 1.0:
        # SiLU: ONNX Runtime runs it in less than half the time of GELU's alpha 1.702
        # (measured: 396 against 871 us on [1, 96, 112, 112], one thread)
        return "elementwise", dtype, "Silu"
    return "elementwise", dtype, op


def activation_key(node: gs.Node, activation: str) -> tuple[str, str, str]:
    """The class of the pass a fused convolution ``node`` makes to apply ``activation``
    (``runtime_rules.activation_pass``): the elementwise op's (Clip is probed)."""
    return "elementwise", _dtype_name(node.outputs[0]), activation


# Quantizing or dequantizing an activation: one class, probed as Quantize -> Dequantize
# pairs (the two move the same bytes).
QUANTIZE = ("quantize", "int8", "activation")


def _shapes_known(model: "Model") -> bool:
    return all(t.shape is not None for g in model.all_graphs() for n in g.nodes
               for t in n.outputs)


def numel(tensor: gs.Tensor | None) -> int:
    if tensor is None or tensor.shape is None:
        return 0
    return math.prod(d if isinstance(d, int) and d >= 0 else 1 for d in tensor.shape)


# Element types narrower than a byte (ml_dtypes names), packed two per byte in ONNX.
_SUB_BYTE_BITS = {"int4": 4, "uint4": 4, "float4_e2m1fn": 4, "int2": 2, "uint2": 2}


def tensor_bytes(tensor: gs.Tensor) -> int:
    if not tensor.name and not isinstance(tensor, gs.Constant):
        return 0  # an omitted optional input
    try:
        bits = _element_bits(tensor.dtype)
    except TypeError:  # (an unhashable type description)
        bits = _element_bits.__wrapped__(tensor.dtype)
    return -(-numel(tensor) * bits // 8)


@functools.lru_cache(maxsize=None)
def _element_bits(dtype) -> int:
    """Bits per element of ``dtype`` as onnx-graphsurgeon gives it (float32 when unknown;
    once per type: the cost model asks for every tensor of every estimate)."""
    try:
        dtype = np.dtype(dtype) if dtype is not None else np.dtype(np.float32)
    except TypeError:
        dtype = np.dtype(np.float32)
    return _SUB_BYTE_BITS.get(dtype.name, 8 * dtype.itemsize)


def node_flops(node: gs.Node) -> float:
    """Multiply-adds count as two FLOPs."""
    out = node.outputs[0] if node.outputs else None
    op = node.op
    if op in ("Conv", "FusedConv", "ConvInteger", "QLinearConv", "ConvTranspose"):
        weight = node.inputs[1] if op != "QLinearConv" else node.inputs[3]
        if weight.shape is None:
            return 0.0
        # weight: [M, C/group, k...]; each output (ConvTranspose: input) element needs
        # C/group * prod(k) MACs.
        per_out = int(np.prod([d if isinstance(d, int) else 1 for d in weight.shape[1:]]))
        if op == "ConvTranspose":
            return 2.0 * numel(node.inputs[0]) * int(np.prod(
                [d if isinstance(d, int) else 1 for d in weight.shape[1:]]))
        return 2.0 * numel(out) * per_out
    if op in ("MatMul", "MatMulInteger", "Gemm", "MatMulNBits", "FusedMatMul", "QGemm",
              "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"):
        a = node.inputs[0]
        if a.shape is None or not a.shape:
            return 0.0
        k = a.shape[-1]
        if op == "Gemm" and node.attrs.get("transA", 0):
            k = a.shape[0]
        k = k if isinstance(k, int) else 1
        return 2.0 * numel(out) * k
    if op in ("Attention", "MultiHeadAttention", "QAttention"):
        q = node.inputs[0]
        if q.shape is None or len(q.shape) < 2:
            return 0.0
        seq = q.shape[-2] if isinstance(q.shape[-2], int) else 1
        flops = 4.0 * numel(out) * seq
        weight = node.inputs[1] if op != "MultiHeadAttention" and len(node.inputs) > 1 else None
        if weight is not None and weight.shape is not None and len(weight.shape) == 2 \
                and isinstance(weight.shape[1], int):  # com.microsoft: QKV projection inside
            flops += 2.0 * numel(q) * weight.shape[1]
        return flops
    if op in ("Softmax", "LayerNormalization", "SkipLayerNormalization", "Gelu", "FastGelu",
              "BiasGelu", "Erf", "Tanh", "Sigmoid", "HardSwish", "Exp", "Log"):
        return 8.0 * numel(out)
    if op in ("BatchNormalization", "InstanceNormalization"):
        return 4.0 * numel(out)
    if op.startswith("Reduce") or op in ("GlobalAveragePool", "GlobalMaxPool"):
        return float(numel(node.inputs[0]))
    if op in ("MaxPool", "AveragePool"):
        kernel = node.attrs.get("kernel_shape", [1])
        return float(numel(out) * int(np.prod(kernel)))
    return float(numel(out))


def _dtype_name(tensor: gs.Tensor) -> str:
    try:
        return _type_name(tensor.dtype)
    except TypeError:  # (an unhashable type description)
        return _type_name.__wrapped__(tensor.dtype)


@functools.lru_cache(maxsize=None)
def _type_name(dtype) -> str:
    """numpy's name of ``dtype`` (float32 when unknown), once per type."""
    try:
        return np.dtype(dtype).name if dtype is not None else "float32"
    except TypeError:
        return "float32"
