"""The graph edits of the int8 passes (``graphopt.passes.quantize.int8``): which nodes can
be quantized, where a weight's channels are, where a Conv's output quantization goes,
FusedConv unfusing, bias folding, the static QDQ form of a node, the dynamic forms, and
QAttention."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.qdq import (PASS_THROUGH, QdqWriter, activation_params, from_dequantize,
                          is_float, quantize_weight, resolve_weight)
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


# Ops a full-integer runtime runs on int8 values, rescaling to its output's parameters.
# Not AveragePool: LiteRT's XNNPACK leaves an int8 AVERAGE_POOL_2D to TFLite's own kernel,
# which ran a 2x2 pool over 16 x 16 x 16 in 3.75 us against 0.85 in float (the int8 ADD
# 1.13 against 0.90, MEAN 0.50 against 0.64, each alone; HARD_SWISH 13.2 against 0.63).
RESCALED = frozenset({"Add", "Mul", "Concat", "GlobalAveragePool"})


def full_integer_output(node: gs.Node, symmetric: bool) -> gs.Tensor | None:
    """Where ``full-integer`` quantizes after ``node``: an Add/Mul/Concat/global average
    pool's or a Gemm/MatMul's output (after a MatMul's constant bias Add, and a Relu/Clip
    reading it alone: what the int8 kernel absorbs); None for other ops."""
    if node.op in ("Gemm", "MatMul"):
        readers = consumers(node.outputs[0])
        if node.op == "MatMul" and len(readers) == 1 and readers[0].op == "Add" and any(
                constant_value(t) is not None for t in readers[0].inputs):
            node = readers[0]
    elif node.op not in RESCALED:
        return None
    return group_output(node, symmetric)


def quantize_full_integer(writer: QdqWriter, node: gs.Node, ranges: dict,
                          symmetric: bool) -> None:
    """``node``'s ``full_integer_output`` quantized at its calibrated range, so that a
    full-integer runtime runs it on int8 (TFLite's ADD, MEAN, FULLY_CONNECTED writing
    int8) instead of between a DEQUANTIZE and a QUANTIZE: when every value an
    Add/Mul/Concat/global average pool reads is quantized (a DequantizeLinear's output,
    or one passed through MaxPool/Reshape/...), a layer being quantized already, and
    nothing quantizes the output yet."""
    out = full_integer_output(node, symmetric)
    if out is None or out.name in writer.quantized or \
            any(r.op == "QuantizeLinear" for r in consumers(out)):
        return
    if node.op in RESCALED:
        data = [t for t in node.inputs if t.name] if node.op in ("Add", "Mul", "Concat") \
            else node.inputs[:1]
        if not all(isinstance(t, gs.Variable) and (
                from_dequantize(t) or pass_through_params(t) is not None) for t in data):
            return
    name = writer.source_name(out)
    if name in ranges:
        writer.activation(out, *activation_params(*ranges[name], symmetric))


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


def unsupported(node: gs.Node, dynamic: bool, form: str) -> str | None:
    """Why ``node`` cannot be quantized by the static (``dynamic=False``) or dynamic pass
    writing ``form`` (None: it can)."""
    if node.op == "FusedConv":
        if dynamic:
            return "FusedConv is quantized by quantize-int8 only"
        if len(node.inputs) > 3 and node.inputs[3].name:
            return "FusedConv with a residual input (Z)"
        if node.attrs.get("activation") not in UNFUSED:
            return f"FusedConv activation {node.attrs.get('activation')!r}"
    elif node.op == "Attention":
        if not dynamic:
            return "Attention is quantized by quantize-int8-dynamic only (QAttention)"
        why = attention_unsupported(node)
        if why is None and form == "onnx":
            why = "QAttention needs the com.microsoft domain"
        if why is not None:
            return why
    elif node.op not in ("Conv", "MatMul", "Gemm"):
        return f"op {node.op} is not supported"
    x, w = node.inputs[0], node.inputs[1]
    if from_dequantize(x) or from_dequantize(w):
        return "already quantized"
    if constant_value(x) is not None or not is_float(x):
        return "input is not a float32 activation"
    value = resolve_weight(w)
    if value is None and constant_value(w) is None:
        return "both inputs are activations (only weights are quantized)"
    if value is None or value.dtype != np.float32:
        return "weight is not a float32 constant"
    if node.op in ("MatMul", "Gemm") and value.ndim != 2:
        return f"weight has rank {value.ndim}, not 2"
    if node.op == "Gemm":
        if node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0:
            return "Gemm with transA or alpha != 1"
        if len(node.inputs) > 2 and node.inputs[2].name:
            bias = constant_value(node.inputs[2])
            n = value.shape[0] if node.attrs.get("transB", 0) else value.shape[1]
            if bias is None or bias.size != n or node.attrs.get("beta", 1.0) != 1.0:
                return "Gemm bias is not a constant vector with beta 1"
    if as_conv(node) == "Conv" and len(node.inputs) > 2 and node.inputs[2].name \
            and constant_value(node.inputs[2]) is None:
        return "Conv bias is not constant"
    return None


def quantize_static(writer: QdqWriter, node: gs.Node, ranges: dict, symmetric: bool,
                    per_channel: bool, reduce_range: bool) -> None:
    """``node`` in QDQ form: its input quantized with the calibrated range (or the
    parameters of the quantized tensor it passes through), per-channel weights, an int32
    bias, and a Conv's output quantized too (QLinearConv needs it)."""
    x = node.inputs[0]
    if from_dequantize(x):  # shared with a node quantized before
        scale = np.float32(constant_value(x.inputs[0].inputs[1]).reshape(()))
    else:
        scale, zero = pass_through_params(x) or activation_params(
            *ranges[writer.source_name(x)], symmetric)
        writer.activation(x, scale, zero)
    value = resolve_weight(node.inputs[1])
    axis = weight_axis(node, value) if per_channel else None
    w_dq, w_scale = writer.weight(node.name + "_weight", value, axis, reduce_range)
    node.inputs[1] = w_dq
    if node.op in ("Conv", "Gemm") and len(node.inputs) > 2 and node.inputs[2].name:
        bias = constant_value(node.inputs[2]).reshape(-1)
        node.inputs[2] = writer.bias(node.name + "_bias", bias, scale * w_scale)
    out = group_output(node, symmetric)
    if node.op == "Conv" and writer.source_name(out) in ranges:
        # QLinearConv needs its output quantized
        writer.activation(out, *activation_params(*ranges[writer.source_name(out)],
                                                  symmetric))


def quantize_dynamic(writer: QdqWriter, node: gs.Node, per_channel: bool,
                     reduce_range: bool, form: str) -> None:
    """MatMul/Gemm with a constant weight -> int8 weights, activations quantized at run
    time: DynamicQuantizeMatMul (``com.microsoft``), DynamicQuantizeLinear +
    MatMulIntegerToFloat (``shared``) or + MatMulInteger and float rescaling (``onnx``)."""
    graph = writer.graph
    value = resolve_weight(node.inputs[1])
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        value = value.T
    q, scale = quantize_weight(value, 1 if per_channel else None,
                               reduce_range)
    a, out = node.inputs[0], node.outputs[0]
    bias = None
    if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
        bias = constant_value(node.inputs[2]).reshape(-1).astype(np.float32)
    else:
        add = bias_add(node, graph, value.shape[1])
        if add is not None:
            bias, out = add
    remove_node(node, graph)
    hint = node.name
    bq = writer.constant(f"{hint}_weight_quantized", q)
    bs = writer.constant(f"{hint}_weight_scale", scale)
    bz = writer.constant(f"{hint}_weight_zero_point", np.zeros(scale.shape, np.int8))
    b = writer.constant(f"{hint}_bias", bias) if bias is not None else None
    if form == "com.microsoft":
        writer.node("DynamicQuantizeMatMul", [a, bq, bs, bz] + ([b] if b is not None else []),
                    [out], domain="com.microsoft")
        return
    aq, a_scale, a_zero = dynamic_quantized(writer, a)
    if form == "shared":
        writer.node("MatMulIntegerToFloat", [aq, bq, a_scale, bs, a_zero, bz] +
                    ([b] if b is not None else []), [out], domain="com.microsoft")
        return
    acc = writer.variable(f"{hint}_int32", np.int32, out.shape)
    writer.node("MatMulInteger", [aq, bq, a_zero, bz], [acc])
    as_float = writer.variable(f"{hint}_acc_float", np.float32, out.shape)
    writer.node("Cast", [acc], [as_float], to=onnx.TensorProto.FLOAT)
    both = writer.variable(f"{hint}_scale", np.float32, list(scale.shape))
    writer.node("Mul", [a_scale, bs], [both])
    scaled = writer.variable(f"{hint}_scaled", np.float32, out.shape) if b is not None else out
    writer.node("Mul", [as_float, both], [scaled])
    if b is not None:
        writer.node("Add", [scaled, b], [out])
