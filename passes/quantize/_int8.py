"""Node-level helpers of the int8 passes (``quant_int8``): where a weight's channels are,
where a Conv's output quantization goes, FusedConv unfusing, bias folding, the dynamic
quantization chain, cost estimates and single-node models for local sensitivity."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.ir import Model
from graphopt.qdq import PASS_THROUGH, QdqWriter, quantize_weight, resolve_weight
from graphopt.rewrite import consumers, constant_value, remove_node

# com.microsoft Attention attributes QAttention takes too
QATTENTION_ATTRS = ("num_heads", "unidirectional", "mask_filter_value", "scale",
                    "do_rotary", "past_present_share_buffer")

# FusedConv activations -> (ONNX op, its attributes from activation_params)
UNFUSED = {"Relu": lambda p: {}, "Tanh": lambda p: {}, "Sigmoid": lambda p: {},
            "LeakyRelu": lambda p: {"alpha": p[0]} if p else {},
            "HardSigmoid": lambda p: dict(zip(("alpha", "beta"), p)),
            "Clip": lambda p: {}}


def as_conv(node: gs.Node) -> str:
    return "Conv" if node.op == "FusedConv" else node.op


def unfuse_conv(writer: QdqWriter, node: gs.Node) -> None:
    """com.microsoft::FusedConv -> Conv -> activation (same output tensor)."""
    activation = node.attrs.get("activation")
    params = list(node.attrs.get("activation_params", []))
    out = node.outputs[0]
    mid = writer.variable(f"{node.name}_conv", np.float32, out.shape)
    node.op, node.domain = "Conv", None
    node.attrs = {k: v for k, v in node.attrs.items()
                  if k not in ("activation", "activation_params")}
    node.outputs[0] = mid
    inputs = [mid]
    if activation == "Clip":
        inputs += [writer.constant(f"{node.name}_clip_min", np.float32(params[0])),
                   writer.constant(f"{node.name}_clip_max", np.float32(params[1]))]
    writer.node(activation, inputs, [out], **UNFUSED[activation](params))


def weight_axis(node: gs.Node, value: np.ndarray) -> int:
    """The output-channel axis of a weight: Conv [M, C/g, k...] 0; MatMul [K, N] 1; Gemm
    B [K, N] 1, or [N, K] 0 with transB."""
    if node.op == "Conv":
        return 0
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return 0
    return value.ndim - 1


def group_output(node: gs.Node, symmetric: bool) -> gs.Tensor:
    """Where a Conv's output Q goes: after a Relu/Clip that is its only reader (ORT drops
    it when the Q's zero point makes it redundant), else on the Conv output."""
    out = node.outputs[0]
    readers = consumers(out)
    if not symmetric and len(readers) == 1 and readers[0].op in ("Relu", "Clip") \
            and len(out.outputs) == 1:
        return readers[0].outputs[0]
    return out


def pass_through_params(x: gs.Tensor):
    """The scale/zero point of the DQ feeding the chain of pass-through ops (MaxPool,
    Flatten, ...) that produces ``x``: values pass unchanged, so does their range."""
    src = x
    while src.inputs and src.inputs[0].op in PASS_THROUGH:
        src = src.inputs[0].inputs[0]
    if src is x or not src.inputs or src.inputs[0].op != "DequantizeLinear":
        return None
    dq = src.inputs[0]
    scale, zero = constant_value(dq.inputs[1]), constant_value(dq.inputs[2])
    if scale is None or zero is None or scale.size != 1:
        return None
    return np.float32(scale.reshape(())), np.uint8(zero.reshape(()))


def bias_add(node: gs.Node, graph: gs.Graph, n: int):
    """A MatMul's sole reader Add(out, constant[N]) to fold in as bias: (bias, Add output)."""
    out = node.outputs[0]
    readers = consumers(out)
    if len(readers) != 1 or readers[0].op != "Add" or out in graph.outputs:
        return None
    add = readers[0]
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    value = constant_value(other)
    if value is None or value.shape != (n,) or value.dtype != np.float32:
        return None
    result = add.outputs[0]
    remove_node(add, graph)
    return value, result


def dynamic_quantized(writer: QdqWriter, a: gs.Tensor):
    """DynamicQuantizeLinear(a), one per tensor: (uint8 values, scale, zero point)."""
    key = f"dynamic:{a.name}"
    if key not in writer.quantized:
        outs = [writer.variable(f"{a.name}_quantized", np.uint8, a.shape),
                writer.variable(f"{a.name}_scale", np.float32, []),
                writer.variable(f"{a.name}_zero_point", np.uint8, [])]
        writer.node("DynamicQuantizeLinear", [a], outs)
        writer.quantized[key] = tuple(outs)
    return writer.quantized[key]


def single_node_model(model: Model, node: gs.Node, weight: np.ndarray,
                       rest: list[np.ndarray]) -> onnx.ModelProto:
    """``node`` alone, reading input ``x`` and constant weight (and bias)."""
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    x = gs.Variable("x", dtype=np.float32,
                    shape=[f"d{i}" for i in range(rank)] if rank is not None else None)
    y = gs.Variable("y", dtype=np.float32)
    inputs = [x, gs.Constant("w", weight)] + [gs.Constant(f"c{i}", v)
                                              for i, v in enumerate(rest)]
    clone = gs.Node(node.op, attrs=dict(node.attrs), inputs=inputs, outputs=[y])
    graph = gs.Graph(nodes=[clone], inputs=[x], outputs=[y], opset=model.opset)
    return gs.export_onnx(graph)


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64)
    den = float((a ** 2).sum())
    return float(((a - b) ** 2).sum()) / den if den else 0.0


def attention_unsupported(node: gs.Node) -> str | None:
    """Why com.microsoft Attention ``node`` cannot become QAttention (None: it can)."""
    if node.domain != "com.microsoft":
        return f"Attention of domain {node.domain or 'ai.onnx'!r}"
    extra = [k for k in node.attrs if k not in QATTENTION_ATTRS]
    if extra:
        return f"Attention attribute {extra[0]!r} (QAttention has none)"
    if any(t.name for t in node.inputs[4:]) or len([t for t in node.outputs if t.name]) > 1:
        return "Attention with past state or attention bias"
    if len(node.inputs) < 3 or constant_value(node.inputs[2]) is None:
        return "Attention without a constant bias"
    return None


def quantize_attention(writer: QdqWriter, node: gs.Node, per_channel: bool,
                       reduce_range: bool) -> None:
    """Attention(x, W, b, mask) -> QAttention(DynamicQuantizeLinear(x), int8 W, b, ...)."""
    graph = writer.graph
    value = resolve_weight(node.inputs[1])
    q, scale = quantize_weight(value, 1 if per_channel else None, reduce_range)
    x, bias = node.inputs[0], node.inputs[2]
    mask = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
    out, attrs, hint = node.outputs[0], dict(node.attrs), node.name
    remove_node(node, graph)
    xq, xs, xz = dynamic_quantized(writer, x)
    empty = gs.Variable.empty()
    inputs = [xq, writer.constant(f"{hint}_weight_quantized", q), bias, xs,
              writer.constant(f"{hint}_weight_scale", scale), mask or empty, xz,
              writer.constant(f"{hint}_weight_zero_point", np.zeros(scale.shape, np.int8))]
    writer.node("QAttention", inputs, [out], domain="com.microsoft", **attrs)
