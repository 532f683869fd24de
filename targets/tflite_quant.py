"""Full-integer int8 ``.tflite`` from QDQ graphs (what ``--quantize int8`` writes).

A QDQ graph says where int8 runs: an activation goes through QuantizeLinear →
DequantizeLinear, a Conv/Gemm/MatMul reads such a value with DequantizeLinear'd int8
weights (symmetric, per output channel) and an int32 bias, and its output (after a bias
Add and a Relu/Clip) is quantized again. Here that becomes LiteRT's int8 kernels:

* **Values.** A QuantizeLinear's output is an int8 tensor with its scale and zero point
  (``Value.quant``); a DequantizeLinear of it is the same tensor (an alias, no op). A
  float op reading it gets a DEQUANTIZE (one per layout, made where first read), so
  quantized and float regions meet through QUANTIZE/DEQUANTIZE only where the QDQ graph
  changes precision. TFLite wants int8 activations: a uint8 zero point ``z`` becomes
  ``z - 128`` (the same real values).
* **Layers** (``weights``): a Conv/Gemm/MatMul whose input is int8, whose weights are
  int8 with zero point 0 per output channel, and whose output (after an optional bias Add
  and a fusable Relu/Clip) is read by a QuantizeLinear alone becomes an int8
  CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED writing that QuantizeLinear's tensor
  directly. Weight scales sit on the output-channel axis (``quantized_dimension`` 0 for
  OHWI and [N, K], 3 for depthwise 1HWC); the bias is int32 at ``input_scale ·
  weight_scale`` per channel, requantized from graphopt's bias scale (the same product,
  so normally exact). A Gemm/MatMul whose output the QDQ graph leaves float (a model's
  head) keeps its int8 weights on LiteRT's dynamic-range kernel; such a Conv runs in
  float on its dequantized input and weights.
* **Exact ops** (``exact``): MaxPool, Reshape, Transpose, Relu... only select or move
  values, so on int8 codes they give exactly the quantized result: they run int8
  whenever their input is int8, with the input's scale and zero point.
* **Rescaling ops** (``rescale``): Add, Mul, Concat, averages run int8 when their inputs
  are int8 and their output is quantized (TFLite's kernels rescale to the output's
  parameters; CONCATENATION and AVERAGE_POOL_2D want the same parameters in and out, so
  their inputs or output are requantized with a QUANTIZE).

Everything else runs in float between DEQUANTIZE and QUANTIZE. Model inputs and outputs
stay float32 (a QUANTIZE after an input, a DEQUANTIZE before an output) unless
``int8_io`` asks for int8 ones: an input read only by QuantizeLinears then holds their
codes itself, and a quantized output is written as its int8 tensor.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx

from graphopt.targets.tflite_layers import CONV_VERSIONS, _bias_after, _spatial, conv_kind
from graphopt.targets.tflite_layers import _fully_connected as _dynamic_range_fc
from graphopt.targets.tflite_lower import (
    F32,
    NHWC,
    Lowering,
    Unmappable,
    Value,
    attrs,
    identity,
    input_name,
)
from graphopt.targets.tflite_writer import options

EXACT = frozenset({"MaxPool", "GlobalMaxPool", "Reshape", "Flatten", "Squeeze",
                   "Unsqueeze", "Transpose", "Relu", "Identity", "Dropout"})
RESCALE = frozenset({"Add", "Mul", "Concat", "GlobalAveragePool", "AveragePool", "Clip"})
LAYERS = frozenset({"Conv", "Gemm", "MatMul"})
# Kernels whose int8 form needs the same scale and zero point on inputs and output.
SAME_PARAMS = frozenset({"Concat", "AveragePool"})
# The operator version that declares int8 (per-channel) tensors, where above 1.
INT8_VERSIONS = {"CONV_2D": 3, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 4, "ADD": 2,
                 "MUL": 2, "MEAN": 2, "MAX_POOL_2D": 2, "AVERAGE_POOL_2D": 2,
                 "CONCATENATION": 2, "RELU": 2, "RELU6": 2, "REDUCE_MAX": 2,
                 "PAD": 2, "PADV2": 2, "TRANSPOSE": 2, "QUANTIZE": 2, "DEQUANTIZE": 2}


# ---------------------------------------------------------------------- Q / DQ
def qparams(lw: Lowering, node: onnx.NodeProto) -> tuple[float, int]:
    """(scale, int8 zero point) of a per-tensor QuantizeLinear/DequantizeLinear."""
    scale = lw.const(node.input[1], "the scale")
    zp = lw.const(node.input[2], "the zero point") if input_name(node, 2) else \
        np.zeros((), np.uint8)
    if scale.size != 1 or zp.size != 1:
        raise Unmappable("per-channel quantization of a computed value (activations "
                         "are per tensor in TFLite)")
    zero = int(zp.reshape(-1)[0])
    if zp.dtype == np.uint8:
        zero -= 128
    elif zp.dtype != np.int8:
        raise Unmappable(f"{zp.dtype} quantization (8-bit only)")
    return float(np.float32(scale.reshape(-1)[0])), zero


def _same(a: tuple[float, int], b: tuple[float, int]) -> bool:
    return np.float32(a[0]) == np.float32(b[0]) and a[1] == b[1]


def quantize(lw: Lowering, node: onnx.NodeProto) -> None:
    """QuantizeLinear: nothing when an int8 kernel already wrote its input with these
    parameters; else a QUANTIZE (from float, or int8 → int8 to requantize)."""
    x, out = node.input[0], node.output[0]
    params = qparams(lw, node)
    if out in lw.graph_outputs:
        raise Unmappable("a quantized graph output (the .tflite's outputs are float32)")
    value = lw.value(x)
    if lw.int8_io and value.quant is None and lw.is_input(x) and all(
            r.op_type == "QuantizeLinear" and _same(qparams(lw, r), params)
            for r in lw.readers.get(x, [])):  # the model input itself takes the codes
        tensor = lw.fb.tensors[value.tensors[value.home]]
        tensor.dtype, tensor.quant, value.quant = np.dtype(np.int8), params, params
    if value.quant is not None and _same(value.quant, params):
        lw.alias(out, x)
        return
    if value.quant is not None:
        perm = value.home
        with lw.int8():
            source = lw.get(x)
    else:  # a model input is quantized in NHWC, where the convolutions read it
        perm = NHWC if lw.is_input(x) and lw.rank(x) == 4 else lw.home(x)
        source = lw.get(x, perm)
    _requantize(lw, source, out, perm, params)
    lw.value(out).columns = value.columns  # elementwise: a flattened NHWC value stays one


def _requantize(lw: Lowering, source: int, name: str, perm, params) -> None:
    """``name`` := QUANTIZE(``source``) as int8 codes with ``params``, at home in ``perm``."""
    shape = lw.fb.tensors[source].shape
    index = lw.fb.tensor(name, shape, np.int8, quant=params)
    lw.fb.op("QUANTIZE", [source], [index], version=2)
    onnx_shape = tuple(shape[i] for i in np.argsort(perm))
    lw.values[name] = Value(name, onnx_shape, np.dtype(F32), home=tuple(perm),
                            tensors={tuple(perm): index}, quant=params)


def dequantize(lw: Lowering, node: onnx.NodeProto) -> None:
    """DequantizeLinear of a computed value: the same int8 tensor (float readers get a
    DEQUANTIZE when they read it). Constant ones were folded before handlers run."""
    x = node.input[0]
    value = lw.value(x)
    if value.quant is None:
        raise Unmappable("it dequantizes a value that is not an int8 tensor here")
    if not _same(value.quant, qparams(lw, node)):
        raise Unmappable("its scale or zero point differ from the QuantizeLinear's")
    lw.alias(node.output[0], x)


# ---------------------------------------------------------------------- dispatch
def lower_int8(lw: Lowering, node: onnx.NodeProto) -> bool:
    """Write ``node`` on int8 kernels when the QDQ graph says it runs in int8 (see the
    module docstring); False: the float handler writes it."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or op not in EXACT | RESCALE | LAYERS:
        return False
    data = [n for n in node.input if n] if op in ("Add", "Mul", "Concat") else node.input[:1]
    if any(lw.is_const(n) or lw.value(n).quant is None for n in data):
        return False
    if op == "Clip" and lw.clip_bounds(node) not in ((0.0, 6.0), (-1.0, 1.0), (0.0, 1.0),
                                                      (0.0, np.inf)):
        return False
    if op in ("Add", "Mul") and len({lw.rank(n) for n in data}) != 1:
        return False
    layer = _layer_plan(lw, node) if op in LAYERS else None
    if op in LAYERS and layer is None:
        return False
    outputs = _quantized_outputs(lw, node, through_bias=op == "MatMul")
    if op in ("Gemm", "MatMul") and outputs is None:
        _float_head(lw, node, *layer.args[2:])  # (the int8 weights, their scales)
        return True
    if op in EXACT:
        names = outputs or _outputs(lw, node, through_bias=False)
        outputs = {n: lw.value(data[0]).quant for n in names}
    elif outputs is None:
        return False
    elif op in SAME_PARAMS:  # the kernel keeps its input's parameters; the Q requantizes
        params = next(iter(outputs.values())) if op == "Concat" else lw.value(data[0]).quant
        outputs = {n: params for n in outputs}
    first = len(lw.fb.operators)
    lw.int8_out.update(outputs)
    with lw.int8():
        if op in LAYERS:
            layer()
        elif op == "Concat":
            _concat(lw, node, next(iter(outputs.values())))
        else:
            from graphopt.targets.tflite_ops import HANDLERS

            HANDLERS[op](lw, node)
    for o in lw.fb.operators[first:]:
        if lw.fb.tensors[o.outputs[0]].dtype == np.int8:
            o.version = max(o.version, INT8_VERSIONS.get(o.code, 1))
    return True


def _outputs(lw: Lowering, node: onnx.NodeProto, through_bias: bool) -> list[str]:
    """The node's output, and those of a constant bias Add (MatMul) and a Relu/Clip
    reading it alone, which the kernel may absorb."""
    names = [node.output[0]]
    reader = lw.sole_reader(names[-1])
    if through_bias and reader is not None and reader.op_type == "Add" and \
            any(i != names[-1] and lw.is_const(i) for i in reader.input):
        names.append(reader.output[0])
        reader = lw.sole_reader(names[-1])
    if reader is not None and lw._activation_kind(reader):
        names.append(reader.output[0])
    return names


def _quantized_outputs(lw: Lowering, node: onnx.NodeProto,
                       through_bias: bool) -> dict[str, tuple[float, int]] | None:
    """``{name: the QuantizeLinear's parameters}`` for the node's output and what the
    kernel may absorb after it, when a QuantizeLinear alone reads the last; else None."""
    names = _outputs(lw, node, through_bias)
    reader = lw.sole_reader(names[-1])
    if reader is None or reader.op_type != "QuantizeLinear":
        return None
    try:
        params = qparams(lw, reader)
    except Unmappable:
        return None
    return {n: params for n in names}


def _concat(lw: Lowering, node: onnx.NodeProto, params) -> None:
    """CONCATENATION on int8 wants every input at the output's parameters: inputs
    quantized otherwise are requantized first."""
    from graphopt.targets.tflite_ops import concat

    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    for i, name in enumerate(copy.input):
        value = lw.value(name) if name else None
        if value is not None and not _same(value.quant, params):
            moved = f"{name}:requantized"
            if moved not in lw.values:
                _requantize(lw, lw.get(name), moved, value.home, params)
            copy.input[i] = moved
    concat(lw, copy)


# ---------------------------------------------------------------------- layers
def int8_weight(lw: Lowering, name: str):
    """(int8 codes, scales, axis) of a DequantizeLinear of constant symmetric int8
    weights producing ``name``; None for anything else."""
    dq = lw.producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or \
            not all(not i or lw.is_const(i) for i in dq.input):
        return None
    q = lw.value(dq.input[0]).const
    zp = lw.value(dq.input[2]).const if input_name(dq, 2) else np.zeros(1)
    if q.dtype != np.int8 or np.any(zp != 0):
        return None
    scale = lw.value(dq.input[1]).const.astype(np.float64).reshape(-1)
    return q, scale, attrs(dq).get("axis", 1) % max(q.ndim, 1)


def _bias_real(lw: Lowering, name: str) -> np.ndarray:
    """The real values of a bias input: a DequantizeLinear'd int32 constant (graphopt's
    int32 bias) or a float constant."""
    dq = lw.producer.get(name)
    if dq is not None and dq.op_type == "DequantizeLinear" and \
            lw.value(dq.input[0]).const is not None:
        q = lw.value(dq.input[0]).const.astype(np.float64)
        zp = lw.value(dq.input[2]).const.astype(np.float64) if input_name(dq, 2) else 0.0
        return ((q - zp) * lw.value(dq.input[1]).const.astype(np.float64)).reshape(-1)
    return lw.const(name, "the bias").astype(np.float64).reshape(-1)


def _int32_bias(lw: Lowering, hint: str, real: np.ndarray | None, acc_scale: np.ndarray) -> int:
    """The int32 bias TFLite's int8 kernels add to the accumulator (scale: input scale
    times each channel's weight scale), requantized from ``real``."""
    real = np.zeros_like(acc_scale) if real is None else np.broadcast_to(real, acc_scale.shape)
    codes = np.clip(np.round(real / acc_scale), -2**31, 2**31 - 1).astype(np.int32)
    return lw.fb.constant(hint, codes, quant=(acc_scale.astype(F32), 0, 0))


def _layer_plan(lw: Lowering, node: onnx.NodeProto):
    """A function writing ``node`` as an int8 layer, or None when its weights are not
    int8 per output channel (it then runs in float)."""
    weight = int8_weight(lw, node.input[1])
    if weight is None:
        return None
    q, scale, axis = weight
    a = attrs(node)
    if node.op_type == "Conv":
        if q.ndim != 4 or (scale.size > 1 and axis != 0):
            return None
        return functools.partial(_conv, lw, node, q, np.broadcast_to(scale, q.shape[:1]),
                                 conv_kind(lw, node, q))
    if q.ndim != 2 or lw.rank(node.input[0]) < 2:
        return None
    if node.op_type == "Gemm":
        if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
            return None
        trans = bool(a.get("transB", 0))
    else:
        trans = False
    if scale.size > 1 and axis != (0 if trans else 1):
        return None
    weights = q if trans else q.T  # [N, K]
    return functools.partial(_fully_connected, lw, node, weights,
                             np.broadcast_to(scale, weights.shape[:1]))


def _conv(lw: Lowering, node: onnx.NodeProto, q: np.ndarray, w_scale: np.ndarray,
          kind: str) -> None:
    out_c, _, kh, kw = q.shape
    x_scale = lw.value(node.input[0]).quant[0]
    acc_scale = x_scale * w_scale
    bias = _bias_real(lw, node.input[2]) if input_name(node, 2) else None
    xi, padding, strides, dilations = _spatial(lw, node, (kh, kw))
    act, out = lw.fused_activation(node)
    common = dict(padding=padding, strideH=strides[0], strideW=strides[1],
                  dilationHFactor=dilations[0], dilationWFactor=dilations[1],
                  fusedActivationFunction=act)
    if kind == "DEPTHWISE_CONV_2D":
        weights, dim = q.reshape(out_c, kh, kw).transpose(1, 2, 0)[None], 3  # 1HWC
        opts = options("DepthwiseConv2DOptions",
                       depthMultiplier=out_c // lw.shape(node.input[0])[1], **common)
    else:  # OHWI (grouped: I = input channels / group)
        weights, dim = q.transpose(0, 2, 3, 1), 0
        opts = options("Conv2DOptions", **common)
    inputs = [xi, lw.fb.constant(f"{node.input[1]}:int8", weights,
                                 quant=(w_scale.astype(F32), 0, dim)),
              _int32_bias(lw, f"{node.name or out}/bias", bias, acc_scale)]
    code = kind.replace("GROUPED_", "")
    lw.fb.op(code, inputs, [lw.output(out, NHWC)], opts,
             version=max(INT8_VERSIONS[code], CONV_VERSIONS[kind]))


def _float_head(lw: Lowering, node: onnx.NodeProto, weights: np.ndarray,
                w_scale: np.ndarray) -> None:
    """A Gemm/MatMul reading int8 whose output the QDQ graph leaves float (a model's
    head): TFLite has no int8 → float32 FULLY_CONNECTED, so it reads the dequantized
    input with LiteRT's dynamic-range kernel, keeping the int8 weights (a quarter of the
    bytes; the kernel quantizes its float input per run, within half a step of the
    codes it came from)."""
    bias = None
    if node.op_type == "Gemm" and input_name(node, 2):
        bias = _bias_real(lw, node.input[2]).astype(F32)
    _dynamic_range_fc(lw, node, node.input[0], weights, bias, node.output[0],
                      scales=w_scale.astype(F32))


def _fully_connected(lw: Lowering, node: onnx.NodeProto, weights: np.ndarray,
                     w_scale: np.ndarray) -> None:
    a, out = node.input[0], node.output[0]
    columns = lw.value(a).columns
    if columns is not None:  # a flattened NHWC input (see tflite_ops.reshape)
        weights = weights[:, columns]
    acc_scale = lw.value(a).quant[0] * w_scale
    if node.op_type == "Gemm" and input_name(node, 2):
        bias = _bias_real(lw, node.input[2])
    else:
        bias, out = _bias_after(lw, out, weights.shape[0])
    act, out = lw.fused_activation(node, out)
    inputs = [lw.get(a, identity(lw.rank(a))),
              lw.fb.constant(f"{node.input[1]}:int8", np.ascontiguousarray(weights),
                             quant=(w_scale.astype(F32), 0, 0)),
              _int32_bias(lw, f"{node.name or out}/bias", bias, acc_scale)]
    lw.fb.op("FULLY_CONNECTED", inputs, [lw.output(out)],
             options("FullyConnectedOptions", fusedActivationFunction=act,
                     keepNumDims=lw.rank(a) > 2), version=INT8_VERSIONS["FULLY_CONNECTED"])
