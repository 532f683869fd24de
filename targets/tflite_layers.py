"""TFLite mappings of the neural-network layers: convolutions, pools, matrix products,
normalizations, softmax, resizing (``HANDLERS`` in ``graphopt.targets.tflite_ops`` lists
them with the elementwise and shape ops).

Convolutions and pools read NHWC and write NHWC (their outputs' home layout), weights
are rearranged once here (OIHW → OHWI, depthwise → 1HWC), and a following Relu/Clip or
bias Add is folded into the operator where TFLite has the field for it.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from graphopt.targets.tflite_lower import (F32, NHWC, NONE, Lowering, Unmappable, attrs,
                                           identity, input_name)
from graphopt.targets.tflite_writer import enum, options


# ---------------------------------------------------------------------- padding
def _padding(in_hw, k_eff, strides, pads) -> str | None:
    """TFLite's VALID or SAME where the ONNX pads are exactly that, else None."""
    begins, ends = pads[:2], pads[2:]
    if not any(pads):
        return "VALID"
    for size, k, s, b, e in zip(in_hw, k_eff, strides, begins, ends):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        if (b, e) != (total // 2, total - total // 2):
            return None
    return "SAME"


def _spatial(lw: Lowering, node: onnx.NodeProto, kernel) -> tuple:
    """(input tensor NHWC, padding, strides, dilations) of a Conv/pool, with an explicit
    PAD (or PADV2 at -inf for max pooling) where the pads are not SAME or VALID."""
    a = attrs(node)
    x = node.input[0]
    if lw.rank(x) != 4:
        raise Unmappable("only 2-D convolutions and pools (4-D tensors) are mapped")
    strides = list(a.get("strides", [1, 1]))
    dilations = list(a.get("dilations", [1, 1]))
    in_hw = lw.shape(x)[2:]
    k_eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto == "VALID":
        pads = [0, 0, 0, 0]
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, k, s in zip(in_hw, k_eff, strides):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if auto == "SAME_UPPER" else (big, small))
        pads = [pads[0][0], pads[1][0], pads[0][1], pads[1][1]]
    else:
        pads = list(a.get("pads", [0, 0, 0, 0]))
    expected = [(size + b + e - k) // s + 1 for size, k, s, b, e in
                zip(in_hw, k_eff, strides, pads[:2], pads[2:])]
    actual = list(lw.onnx_info(node.output[0])[0][2:])
    if actual != expected:
        if node.op_type != "MaxPool" or not a.get("ceil_mode", 0):
            raise Unmappable("ceil_mode changes the output size; TFLite pools round down "
                             "(mapped for MaxPool, whose extra windows pad with -inf)")
        # ceil_mode: the last windows hang over the end; padding the end by the overhang
        # (with the lowest value) makes TFLite's rounding down give the same windows.
        pads = pads[:2] + [e + max((o - 1) * s + k - (size + b + e), 0) for o, size, k, s, b, e
                           in zip(actual, in_hw, k_eff, strides, pads[:2], pads[2:])]
    xi = lw.get(x, NHWC)
    padding = _padding(in_hw, k_eff, strides, pads)
    if padding == "SAME" and node.op_type == "AveragePool" and a.get("count_include_pad", 0):
        padding = None  # TFLite's SAME averages over the window inside the input only
    if padding is None:
        if node.op_type == "AveragePool" and not a.get("count_include_pad", 0):
            raise Unmappable("average pooling over asymmetric pads that exclude the pad")
        n, c, h, w = lw.shape(x)
        paddings = np.array([[0, 0], [pads[0], pads[2]], [pads[1], pads[3]], [0, 0]], np.int32)
        like = lw.fb.tensors[xi]  # int8 codes (a QDQ layer) pad with their zero point
        padded = lw.fb.tensor(f"{x}/padded", (n, h + pads[0] + pads[2], w + pads[1] + pads[3],
                                              c), like.dtype, quant=like.quant)
        if node.op_type == "MaxPool":
            lowest = np.array(-np.inf, F32) if like.quant is None else \
                np.array(-128, np.int8)
            lw.fb.op("PADV2", [xi, lw.fb.constant("paddings", paddings),
                               lw.fb.constant("pad_value", lowest, quant=like.quant)],
                     [padded])
        else:
            lw.fb.op("PAD", [xi, lw.fb.constant("paddings", paddings)], [padded])
        xi, padding = padded, "VALID"
    return xi, enum("Padding", padding), strides, dilations


# ---------------------------------------------------------------------- CNN ops
def conv(lw: Lowering, node: onnx.NodeProto) -> None:
    w = lw.const(node.input[1], "the weight")
    if w.ndim != 4:
        raise Unmappable("only 2-D convolutions are mapped")
    group = attrs(node).get("group", 1)
    out_c, in_per_group, kh, kw = w.shape
    bias = lw.const(node.input[2], "the bias") if input_name(node, 2) else np.zeros(out_c, F32)
    xi, padding, strides, dilations = _spatial(lw, node, (kh, kw))
    act, out = lw.fused_activation(node)
    common = dict(padding=padding, strideH=strides[0], strideW=strides[1],
                  dilationHFactor=dilations[0], dilationWFactor=dilations[1],
                  fusedActivationFunction=act)
    code = conv_kind(lw, node, w)
    if code == "DEPTHWISE_CONV_2D":
        weights = w.reshape(out_c, kh, kw).transpose(1, 2, 0)[None]  # -> 1HWC
        opts = options("DepthwiseConv2DOptions", depthMultiplier=out_c // group, **common)
    else:  # OIHW -> OHWI; grouped: I is the input channels / group
        weights = w.transpose(0, 2, 3, 1)
        opts = options("Conv2DOptions", **common)
    inputs = [xi, lw.fb.constant(f"{node.input[1]}:tflite", weights.astype(F32, copy=False),
                                 half=lw.is_half(node.input[1])),
              lw.fb.constant(f"{node.name or out}/bias", bias.astype(F32),
                             half=lw.is_half(input_name(node, 2)))]
    lw.fb.op(code.replace("GROUPED_", ""), inputs, [lw.output(out, NHWC)], opts,
             version=CONV_VERSIONS[code])


# Operator versions: depthwise from 2 (dilation); a grouped CONV_2D (filters that see a
# fraction of the input channels) is version 6, which LiteRT's kernels and XNNPACK run.
CONV_VERSIONS = {"CONV_2D": 1, "DEPTHWISE_CONV_2D": 2, "GROUPED_CONV_2D": 6}


def conv_kind(lw: Lowering, node: onnx.NodeProto, w: np.ndarray) -> str:
    """CONV_2D; DEPTHWISE_CONV_2D (one input channel per group, each input channel its
    own group); or GROUPED_CONV_2D, a CONV_2D whose filters see input channels / group
    channels each (TFLite's native grouped convolution: no split into a convolution per
    group and a concatenation)."""
    group = attrs(node).get("group", 1)
    out_c, in_per_group = w.shape[:2]
    in_c = lw.shape(node.input[0])[1]
    if group == 1:
        return "CONV_2D"
    if out_c % group or in_per_group * group != in_c:
        raise Unmappable(f"group={group} does not divide {in_c} input and {out_c} output "
                         f"channels")
    return "DEPTHWISE_CONV_2D" if in_per_group == 1 else "GROUPED_CONV_2D"


def pool(lw: Lowering, node: onnx.NodeProto) -> None:
    a = attrs(node)
    kernel = a["kernel_shape"]
    if any(d != 1 for d in a.get("dilations", [1, 1])):
        raise Unmappable("dilated pooling")
    if len(node.output) > 1 and node.output[1]:
        raise Unmappable("MaxPool indices output")
    xi, padding, strides, _ = _spatial(lw, node, kernel)
    act, out = lw.fused_activation(node)
    code = "MAX_POOL_2D" if node.op_type == "MaxPool" else "AVERAGE_POOL_2D"
    lw.fb.op(code, [xi], [lw.output(out, NHWC)],
             options("Pool2DOptions", padding=padding, strideH=strides[0], strideW=strides[1],
                     filterHeight=kernel[0], filterWidth=kernel[1],
                     fusedActivationFunction=act))


def global_pool(lw: Lowering, node: onnx.NodeProto) -> None:
    x = node.input[0]
    rank = lw.rank(x)
    perm = NHWC if rank == 4 else lw.home(x)
    axes = [perm.index(a) for a in range(2, rank)]
    code = "MEAN" if node.op_type == "GlobalAveragePool" else "REDUCE_MAX"
    lw.fb.op(code, [lw.get(x, perm), lw.fb.constant("axes", np.array(axes, np.int32))],
             [lw.output(node.output[0], perm)], options("ReducerOptions", keepDims=True))


def batch_norm(lw: Lowering, node: onnx.NodeProto) -> None:
    """Inference BatchNormalization not folded into a convolution: x·s + t per channel."""
    gamma, beta, mean, var = (lw.const(n) for n in node.input[1:5])
    scale = gamma / np.sqrt(var + attrs(node).get("epsilon", 1e-5))
    shift = beta - mean * scale
    x = node.input[0]
    rank, perm = lw.rank(x), lw.home(x)
    shape = (-1,) + (1,) * (rank - 2)
    xi = lw.get(x)
    scaled = lw.temp(f"{x}/scaled", lw.fb.tensors[xi].shape)
    lw.fb.op("MUL", [xi, lw.broadcast_const("bn_scale", scale.reshape(shape).astype(F32),
                                            rank, perm)], [scaled],
             options("MulOptions", fusedActivationFunction=NONE))
    act, out = lw.fused_activation(node)
    lw.fb.op("ADD", [scaled, lw.broadcast_const("bn_shift", shift.reshape(shape).astype(F32),
                                                rank, perm)], [lw.output(out, perm)],
             options("AddOptions", fusedActivationFunction=act))


# ---------------------------------------------------------------------- matrix products
def _bias_after(lw: Lowering, out: str, n: int) -> tuple[np.ndarray | None, str]:
    """A constant [n]-shaped bias Add reading ``out`` alone: (bias, the Add's output)."""
    reader = lw.sole_reader(out)
    if reader is None or reader.op_type != "Add":
        return None, out
    other = [i for i in reader.input if i != out]
    if len(other) != 1 or not lw.is_const(other[0]):
        return None, out
    bias = lw.value(other[0]).const
    if bias.size != n or (bias.ndim and bias.shape[-1] != n) or \
            lw.onnx_info(reader.output[0])[0] != lw.onnx_info(out)[0]:
        return None, out
    lw.skipped.add(id(reader))
    return bias.reshape(n).astype(F32), reader.output[0]


def _fully_connected(lw: Lowering, node: onnx.NodeProto, a: str, weights: np.ndarray,
                     bias: np.ndarray | None, out: str, scales: np.ndarray | None = None) -> None:
    """FULLY_CONNECTED: ``weights`` [N, K] (``node.input[1]`` names them); inputs of rank
    > 2 keep their leading dims. With ``scales``, ``weights`` are int8 codes with those
    per-output-channel scales: LiteRT's dynamic-range (hybrid) kernel, which quantizes
    the float input per run, as ONNX's DynamicQuantizeLinear does."""
    columns = lw.value(a).columns
    if columns is not None:  # a flattened NHWC input (see reshape)
        weights = weights[:, columns]
    if bias is None:
        bias, out = _bias_after(lw, out, weights.shape[0])
    act, out = lw.fused_activation(node, out)
    ai = lw.get(a, identity(lw.rank(a)))
    half = lw.is_half(node.input[1])
    if scales is None:
        w = lw.fb.constant(f"{node.input[1]}:tflite", weights.astype(F32, copy=False),
                           half=half)
    else:
        w = lw.fb.constant(f"{node.input[1]}:tflite", weights.astype(np.int8),
                           quant=(np.broadcast_to(scales, weights.shape[:1]), 0))
    inputs = [ai, w, -1 if bias is None else
              lw.fb.constant(f"{node.name or out}/bias", bias, half=half)]
    lw.fb.op("FULLY_CONNECTED", inputs, [lw.output(out)],
             options("FullyConnectedOptions", fusedActivationFunction=act,
                     keepNumDims=lw.rank(a) > 2, asymmetricQuantizeInputs=scales is not None))


def dynamic_quantize(lw: Lowering, node: onnx.NodeProto) -> None:
    """DynamicQuantizeLinear(x) → MatMulInteger(·, int8 W) → Cast → Mul(x_scale · W_scale)
    (``--quantize int8-dynamic`` for targets without ONNX Runtime's contrib ops) is one
    dynamic-range FULLY_CONNECTED per product: int8 weights, float input and output."""
    x, codes, x_scale, x_zero = node.input[0], *node.output
    products = lw.readers.get(codes, [])
    if not products or codes in lw.graph_outputs:
        raise Unmappable("its quantized output must feed matrix products only")
    scale_nodes = []
    for mmi in products:
        if mmi.op_type != "MatMulInteger" or mmi.input[0] != codes or \
                input_name(mmi, 2) not in ("", x_zero) or lw.rank(mmi.input[1]) != 2:
            raise Unmappable(f"{mmi.op_type} {mmi.name!r} reads the int8 codes")
        q = lw.const(mmi.input[1], "the int8 weight")
        zero = lw.const(input_name(mmi, 3)) if input_name(mmi, 3) else np.zeros(1)
        cast = lw.sole_reader(mmi.output[0])
        mul = cast is not None and cast.op_type == "Cast" and lw.sole_reader(cast.output[0])
        both = mul and mul.op_type == "Mul" and \
            lw.producer.get(next(i for i in mul.input if i != cast.output[0]))
        w_scale = both and both.op_type == "Mul" and x_scale in both.input and \
            [i for i in both.input if i != x_scale]
        if q.dtype != np.int8 or np.any(zero) or not w_scale or not lw.is_const(w_scale[0]):
            raise Unmappable(f"{mmi.name!r}: not int8 symmetric weights rescaled by "
                             f"x_scale · w_scale")
        lw.skipped.update({id(mmi), id(cast), id(mul), id(both)})
        scale_nodes.append(both)
        _fully_connected(lw, mmi, x, q.T, None, mul.output[0],
                         scales=lw.value(w_scale[0]).const.reshape(-1).astype(F32))
    if any(r not in scale_nodes for r in lw.readers.get(x_scale, [])) or \
            any(r not in products for r in lw.readers.get(x_zero, [])):
        raise Unmappable("its scale or zero point is read by other ops")


def gemm(lw: Lowering, node: onnx.NodeProto) -> None:
    a = attrs(node)
    if a.get("transA", 0):
        raise Unmappable("transA=1")
    b = lw.const(node.input[1], "B") * a.get("alpha", 1.0)
    weights = b if a.get("transB", 0) else b.T
    n = weights.shape[0]
    bias = None
    if input_name(node, 2):
        c = lw.const(node.input[2], "C") * a.get("beta", 1.0)
        if c.size not in (1, n) or (c.ndim == 2 and c.shape[0] != 1):
            raise Unmappable("C other than a scalar or a row vector")
        bias = np.broadcast_to(c.reshape(-1), (n,)).astype(F32)
    _fully_connected(lw, node, node.input[0], weights, bias, node.output[0])


def matmul(lw: Lowering, node: onnx.NodeProto) -> None:
    a, b = node.input[:2]
    if lw.rank(a) < 2 or lw.rank(b) < 2:
        raise Unmappable("1-D operands")
    if lw.is_const(b) and lw.rank(b) == 2 and not lw.is_const(a):
        _fully_connected(lw, node, a, lw.const(b).T, None, node.output[0])
        return
    operands, adjoint = [], []
    for name in (a, b):  # a layout that only swaps the last two dims is an adjoint
        rank, home = lw.rank(name), lw.home(name)
        swapped = identity(rank)[:-2] + (rank - 1, rank - 2)
        adj = not lw.is_const(name) and home == swapped
        operands.append(lw.get(name, swapped if adj else identity(rank)))
        adjoint.append(adj)
    lw.fb.op("BATCH_MATMUL", operands, [lw.output(node.output[0])],
             options("BatchMatMulOptions", adjX=adjoint[0], adjY=adjoint[1]))


def softmax(lw: Lowering, node: onnx.NodeProto) -> None:
    """SOFTMAX works on the last dimension: the input is used in a layout that puts the
    ONNX axis last (its own, when it already does)."""
    x = node.input[0]
    rank = lw.rank(x)
    axis = attrs(node).get("axis", -1 if lw.opset >= 13 else 1) % rank
    if lw.opset < 13 and axis != rank - 1:
        raise Unmappable("softmax over flattened trailing axes (opset < 13, axis not last)")
    perm = lw.home(x)
    if perm[-1] != axis:
        perm = tuple(d for d in range(rank) if d != axis) + (axis,)
    code = "SOFTMAX" if node.op_type == "Softmax" else "LOG_SOFTMAX"
    opts = options("SoftmaxOptions", beta=1.0) if code == "SOFTMAX" else None
    lw.fb.op(code, [lw.get(x, perm)], [lw.output(node.output[0], perm)], opts)


def layer_norm(lw: Lowering, node: onnx.NodeProto) -> None:
    """LiteRT has no LayerNorm builtin: MEAN, SUB, MUL (square), MEAN, ADD ε, RSQRT, MUL,
    then the scale and bias, all over the normalized axes in the value's layout."""
    a = attrs(node)
    x = node.input[0]
    rank, perm = lw.rank(x), lw.home(x)
    if len(node.output) > 1 and any(node.output[1:]):
        raise Unmappable("the mean / inverse std outputs")
    first = a.get("axis", -1) % rank
    axes = lw.fb.constant("axes", np.array(sorted(perm.index(d) for d in range(first, rank)),
                                           np.int32))
    xi = lw.get(x)
    shape = lw.fb.tensors[xi].shape
    reduced = tuple(1 if perm[j] >= first else shape[j] for j in range(rank))
    t = {k: lw.temp(f"{x}/ln_{k}", s) for k, s in (
        ("mean", reduced), ("centered", shape), ("square", shape), ("var", reduced),
        ("var_eps", reduced), ("rstd", reduced), ("normed", shape), ("scaled", shape))}
    none = dict(fusedActivationFunction=NONE)
    eps = lw.fb.constant("epsilon", np.array(a.get("epsilon", 1e-5), F32))
    lw.fb.op("MEAN", [xi, axes], [t["mean"]], options("ReducerOptions", keepDims=True))
    lw.fb.op("SUB", [xi, t["mean"]], [t["centered"]], options("SubOptions", **none))
    lw.fb.op("MUL", [t["centered"], t["centered"]], [t["square"]], options("MulOptions", **none))
    lw.fb.op("MEAN", [t["square"], axes], [t["var"]], options("ReducerOptions", keepDims=True))
    lw.fb.op("ADD", [t["var"], eps], [t["var_eps"]], options("AddOptions", **none))
    lw.fb.op("RSQRT", [t["var_eps"]], [t["rstd"]])
    lw.fb.op("MUL", [t["centered"], t["rstd"]], [t["normed"]], options("MulOptions", **none))
    scale = lw.broadcast_const("ln_scale", lw.const(node.input[1], "the scale").astype(F32),
                               rank, perm)
    if not input_name(node, 2):
        lw.fb.op("MUL", [t["normed"], scale], [lw.output(node.output[0], perm)],
                 options("MulOptions", **none))
        return
    lw.fb.op("MUL", [t["normed"], scale], [t["scaled"]], options("MulOptions", **none))
    bias = lw.broadcast_const("ln_bias", lw.const(node.input[2], "the bias").astype(F32),
                              rank, perm)
    lw.fb.op("ADD", [t["scaled"], bias], [lw.output(node.output[0], perm)],
             options("AddOptions", **none))


def resize(lw: Lowering, node: onnx.NodeProto) -> None:
    a = attrs(node)
    x = node.input[0]
    if lw.rank(x) != 4:
        raise Unmappable("only 4-D (NCHW) resizing")
    mode = a.get("mode", b"nearest").decode()
    transform = a.get("coordinate_transformation_mode", b"half_pixel").decode()
    out_shape, _ = lw.onnx_info(node.output[0])
    if out_shape[:2] != lw.shape(x)[:2]:
        raise Unmappable("resizing the batch or channel dimension")
    if mode == "linear" and transform in ("half_pixel", "pytorch_half_pixel"):
        code, opts = "RESIZE_BILINEAR", dict(alignCorners=False, halfPixelCenters=True)
    elif mode == "linear" and transform == "align_corners":
        code, opts = "RESIZE_BILINEAR", dict(alignCorners=True, halfPixelCenters=False)
    elif mode == "linear" and transform == "asymmetric":
        code, opts = "RESIZE_BILINEAR", dict(alignCorners=False, halfPixelCenters=False)
    elif mode == "nearest" and transform == "asymmetric" and \
            a.get("nearest_mode", b"round_prefer_floor").decode() == "floor":
        code, opts = "RESIZE_NEAREST_NEIGHBOR", dict(alignCorners=False, halfPixelCenters=False)
    else:
        raise Unmappable(f"mode {mode!r} with coordinate transformation {transform!r}")
    size = lw.fb.constant("size", np.array(out_shape[2:], np.int32))
    name = "ResizeBilinearOptions" if code == "RESIZE_BILINEAR" else \
        "ResizeNearestNeighborOptions"
    lw.fb.op(code, [lw.get(x, NHWC), size], [lw.output(node.output[0], NHWC)],
             options(name, **opts), version=3 if code == "RESIZE_BILINEAR" else 1)
