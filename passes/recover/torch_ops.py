"""The torch forms of ONNX ops for ``torch_graph.TorchGraph``: ``OPS`` maps an op type to
``fn(graph, inputs, attributes) -> output(s)`` (``graph`` gives the opset), plus the
quantization forms training needs (``FakeQuant``: a quantized weight trained as a float
shadow; QuantizeLinear with the rounding's gradient passed straight through)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper


class Unsupported(ValueError):
    """The graph has an op (or an attribute value) the interpreter does not run."""


_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16, onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
}


# Code ranges of the integer types DequantizeLinear reads.
QRANGE = {
    onnx.TensorProto.INT2: (-2, 1), onnx.TensorProto.UINT2: (0, 3),
    onnx.TensorProto.INT4: (-8, 7), onnx.TensorProto.UINT4: (0, 15),
    onnx.TensorProto.INT8: (-128, 127), onnx.TensorProto.UINT8: (0, 255),
    onnx.TensorProto.INT16: (-32768, 32767), onnx.TensorProto.UINT16: (0, 65535),
}


def to_torch(array: np.ndarray) -> torch.Tensor:
    array = np.asarray(array)
    if array.dtype == np.uint16 or array.dtype == np.uint32 or array.dtype == np.uint64:
        array = array.astype(np.int64)
    elif array.dtype.kind == "V" and array.dtype.name in ("int2", "int4", "uint2", "uint4"):
        array = array.astype(np.int16)  # ml_dtypes' sub-byte integers
    return torch.from_numpy(np.array(array, order="C", copy=True))  # (keeps 0-d arrays 0-d)


# ============================================================================ quantization
class FakeQuant:
    """A quantized weight trained as a float shadow W: the forward pass uses
    (clamp(round(W / s) + z, lo, hi) - z) * s with the rounding's gradient passed
    straight through, so W and the scale s both learn (the scale's gradient is LSQ's,
    Esser et al. 2020); the codes written back are clamp(round(W / s) + z)."""

    def __init__(self, node, attrs: dict, qrange: tuple[int, int]):
        self.node, self.attrs, self.range = node, attrs, qrange
        self.key = ""

    def codes(self, w, scale, zero):
        s, z = _broadcast(w, scale, zero, self.attrs)
        q = w / _nonzero(s)  # (scales may be negative: a symmetric grid's sign)
        q = q + (torch.round(q) - q).detach()  # straight-through rounding
        return torch.clamp(q + z, *self.range)

    def __call__(self, w, scale, zero):
        s, z = _broadcast(w, scale, zero, self.attrs)
        return (self.codes(w, scale, zero) - z) * s


def _nonzero(s):
    return torch.where(s == 0, torch.full_like(s, torch.finfo(s.dtype).tiny), s)


def _broadcast(x, scale, zero, attrs):
    """Scale and zero point shaped to ``x``: per tensor, per axis, or blocked."""
    zero = torch.zeros((), dtype=scale.dtype) if zero is None else zero.to(scale.dtype)
    if scale.dim() == 0 or x.dim() == 0:
        return scale, zero
    axis = attrs.get("axis", 1) % x.dim()
    block = attrs.get("block_size", 0)
    if block:
        size = x.shape[axis]
        scale = scale.repeat_interleave(block, dim=axis).narrow(axis, 0, size)
        zero = zero.repeat_interleave(block, dim=axis).narrow(axis, 0, size) \
            if zero.dim() else zero
        return scale, zero
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape), zero.reshape(shape) if zero.dim() else zero


def dequantize(x, scale, zero, attrs):
    s, z = _broadcast(x, scale, zero, attrs)
    return (x.to(s.dtype) - z) * s


def _dequantize_op(g, args, attrs):
    return dequantize(args[0], args[1], args[2] if len(args) > 2 else None, attrs)


def _quantize_op(g, args, attrs):
    """The codes (as floats carrying integers: the next DequantizeLinear reads them) with
    the rounding's gradient passed straight through, as quantization-aware training
    treats activations."""
    x, scale = args[0], args[1]
    zero = args[2] if len(args) > 2 else None
    kind = attrs.get("output_dtype", 0)
    if not kind:
        kind = attrs.get("_zero_type") or (onnx.TensorProto.INT8 if zero is not None and
                                           zero.dtype == torch.int8 else onnx.TensorProto.UINT8)
    if kind not in QRANGE:
        raise Unsupported(f"QuantizeLinear to type {kind}")
    s, z = _broadcast(x, scale, zero, attrs)
    q = x / _nonzero(s)
    q = q + (torch.round(q) - q).detach()
    return torch.clamp(q + z, *QRANGE[kind])


# ============================================================================ helpers
def _ints(t) -> list[int]:
    return [int(v) for v in (t.reshape(-1).tolist() if isinstance(t, torch.Tensor) else t)]


def _axes(g: TorchGraph, args, attrs, index: int = 1):
    """Axes given as an attribute (older opsets) or as input ``index``."""
    if "axes" in attrs:
        return list(attrs["axes"])
    if len(args) > index and args[index] is not None:
        return _ints(args[index])
    return None


def _conv(g, args, attrs, activation: Callable | None = None):
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    nd = w.dim() - 2
    strides = attrs.get("strides", [1] * nd)
    dil = attrs.get("dilations", [1] * nd)
    group = attrs.get("group", 1)
    pads = _pads(attrs, x.shape[2:], list(w.shape[2:]), strides, dil)
    if pads[:nd] != pads[nd:]:
        x = F.pad(x, [p for i in reversed(range(nd)) for p in (pads[i], pads[i + nd])])
        pads = [0] * (2 * nd)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(nd)
    if fn is None:
        raise Unsupported(f"{nd}-d convolution")
    y = fn(x, w, b, stride=strides, padding=pads[:nd], dilation=dil, groups=group)
    return activation(y) if activation else y


def _pads(attrs, spatial, kernel, strides, dil) -> list[int]:
    nd = len(kernel)
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        return list(attrs.get("pads", [0] * (2 * nd)))
    if auto == "VALID":
        return [0] * (2 * nd)
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dil):
        out = math.ceil(int(size) / s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - int(size))
        small = total // 2
        begin.append(small if auto == "SAME_UPPER" else total - small)
        end.append(total - small if auto == "SAME_UPPER" else small)
    return begin + end


def _pool(g, args, attrs, kind: str):
    x = args[0]
    kernel = list(attrs["kernel_shape"])
    nd = len(kernel)
    strides = attrs.get("strides", [1] * nd)
    dil = attrs.get("dilations", [1] * nd)
    pads = _pads(attrs, x.shape[2:], kernel, strides, dil)
    ceil = bool(attrs.get("ceil_mode", 0))
    if kind == "max":
        if pads[:nd] != pads[nd:] or any(p > k // 2 for p, k in zip(pads, kernel * 2)):
            x = F.pad(x, [p for i in reversed(range(nd)) for p in (pads[i], pads[i + nd])],
                      value=float("-inf"))
            pads = [0] * (2 * nd)
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
        return fn(x, kernel, strides, pads[:nd], dil, ceil_mode=ceil)
    if any(d != 1 for d in dil):
        raise Unsupported("dilated AveragePool")
    include = bool(attrs.get("count_include_pad", 0))
    if pads[:nd] != pads[nd:] or any(p > k // 2 for p, k in zip(pads, kernel * 2)):
        if not include:
            raise Unsupported("asymmetric padding without count_include_pad")
        x = F.pad(x, [p for i in reversed(range(nd)) for p in (pads[i], pads[i + nd])])
        pads = [0] * (2 * nd)
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    return fn(x, kernel, strides, pads[:nd], ceil_mode=ceil, count_include_pad=include)


def _gemm(g, args, attrs):
    a, b = args[0], args[1]
    if attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if attrs.get("transB", 0):
        b = b.transpose(0, 1)
    y = attrs.get("alpha", 1.0) * (a @ b)
    if len(args) > 2 and args[2] is not None:
        y = y + attrs.get("beta", 1.0) * args[2]
    return y


def _reshape(g, args, attrs):
    x, shape = args[0], _ints(args[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _flatten(g, args, attrs):
    x = args[0]
    axis = attrs.get("axis", 1) % max(x.dim(), 1) if x.dim() else 0
    if attrs.get("axis", 1) == x.dim():
        axis = x.dim()
    lead = int(np.prod(x.shape[:axis])) if axis else 1
    return x.reshape(lead, -1)


def _squeeze(g, args, attrs):
    axes = _axes(g, args, attrs)
    x = args[0]
    if axes is None:
        return x.squeeze()
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


def _unsqueeze(g, args, attrs):
    x = args[0]
    axes = _axes(g, args, attrs)
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def _slice(g, args, attrs):
    x = args[0]
    if "starts" in attrs:  # opset < 10
        starts, ends = attrs["starts"], attrs["ends"]
        axes, steps = attrs.get("axes"), None
    else:
        starts, ends = _ints(args[1]), _ints(args[2])
        axes = _ints(args[3]) if len(args) > 3 and args[3] is not None else None
        steps = _ints(args[4]) if len(args) > 4 and args[4] is not None else None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index = [slice(None)] * x.dim()
    flips = []
    for s, e, a, st in zip(starts, ends, axes, steps):
        a %= x.dim()
        size = x.shape[a]
        if st > 0:
            s = max(0, min(size, s + size if s < 0 else s))
            e = max(0, min(size, e + size if e < 0 else e))
            index[a] = slice(s, max(s, e), st)
        else:  # negative step: flip, then slice forwards
            s = max(-1, min(size - 1, s + size if s < 0 else s))
            e = max(-1, min(size - 1, e + size if e < 0 else e))
            flips.append(a)
            index[a] = slice(size - 1 - s, max(size - 1 - s, size - 1 - e), -st)
    if flips:
        x = x.flip(flips)
    return x[tuple(index)]


def _split(g, args, attrs, n_out: int):
    x = args[0]
    axis = attrs.get("axis", 0)
    if "split" in attrs:
        sizes = list(attrs["split"])
    elif len(args) > 1 and args[1] is not None:
        sizes = _ints(args[1])
    else:
        parts = attrs.get("num_outputs", n_out)
        size = x.shape[axis]
        each = -(-size // parts)
        sizes = [min(each, size - i * each) for i in range(parts)]
    return tuple(torch.split(x, sizes, dim=axis))


def _gather(g, args, attrs):
    x, idx = args[0], args[1].long()
    axis = attrs.get("axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]))


def _gather_elements(g, args, attrs):
    x, idx = args[0], args[1].long()
    axis = attrs.get("axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    return torch.gather(x, axis, idx)


def _reduce(fn_name: str):
    def run(g, args, attrs):
        x = args[0]
        axes = _axes(g, args, attrs)
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        axes = [a % x.dim() for a in axes]
        if fn_name == "sum":
            return x.sum(dim=axes, keepdim=keep)
        if fn_name == "mean":
            return x.mean(dim=axes, keepdim=keep)
        if fn_name == "l2":
            return x.pow(2).sum(dim=axes, keepdim=keep).sqrt()
        if fn_name == "sumsquare":
            return x.pow(2).sum(dim=axes, keepdim=keep)
        if fn_name in ("max", "min"):
            y = x
            for a in sorted(axes, reverse=True):
                y = (y.amax if fn_name == "max" else y.amin)(dim=a, keepdim=True)
            return y if keep else y.squeeze(tuple(axes)) if axes else y
        if fn_name == "prod":
            y = x
            for a in sorted(axes, reverse=True):
                y = y.prod(dim=a, keepdim=True)
            return y if keep else y.reshape([s for i, s in enumerate(x.shape) if i not in axes])
        raise Unsupported(fn_name)
    return run


def _softmax(log: bool):
    def run(g, args, attrs):
        x = args[0]
        axis = attrs.get("axis", -1 if g.opset >= 13 else 1)
        fn = torch.log_softmax if log else torch.softmax
        if g.opset >= 13:
            return fn(x, dim=axis)
        axis %= x.dim()  # older opsets: softmax over the flattened trailing axes
        flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
        return fn(flat, dim=1).reshape(x.shape)
    return run


def _layer_norm(g, args, attrs):
    x, scale = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    axis = attrs.get("axis", -1) % x.dim()
    return F.layer_norm(x, x.shape[axis:], scale, bias, attrs.get("epsilon", 1e-5))


def _skip_layer_norm(g, args, attrs):
    x = args[0] + args[1]
    if len(args) > 4 and args[4] is not None:
        x = x + args[4]
    bias = args[3] if len(args) > 3 else None
    y = F.layer_norm(x, x.shape[-1:], args[2], bias, attrs.get("epsilon", 1e-12))
    return (y, None, None, x)


def _batch_norm(g, args, attrs):
    x, scale, bias, mean, var = args[:5]
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, attrs.get("epsilon", 1e-5))


def _clip(g, args, attrs):
    lo = attrs.get("min") if "min" in attrs else (args[1] if len(args) > 1 else None)
    hi = attrs.get("max") if "max" in attrs else (args[2] if len(args) > 2 else None)
    x = args[0]
    if lo is not None:
        x = torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype))
    if hi is not None:
        x = torch.minimum(x, torch.as_tensor(hi, dtype=x.dtype))
    return x


def _activation(name: str, params: Sequence[float]) -> Callable:
    if name == "Relu":
        return torch.relu
    if name == "Sigmoid":
        return torch.sigmoid
    if name == "Tanh":
        return torch.tanh
    if name == "LeakyRelu":
        return lambda y: F.leaky_relu(y, params[0] if params else 0.01)
    if name == "Clip":
        return lambda y: y.clamp(params[0], params[1])
    if name == "HardSigmoid":
        a, b = (params or [0.2, 0.5])[:2]
        return lambda y: (a * y + b).clamp(0, 1)
    raise Unsupported(f"fused activation {name}")


def _fused_conv(g, args, attrs):
    act = attrs.get("activation", b"")
    act = act.decode() if isinstance(act, bytes) else act
    fn = _activation(act, list(attrs.get("activation_params", []))) if act else None
    y = _conv(g, args[:3], attrs)
    if len(args) > 3 and args[3] is not None:  # the Z (sum) input
        y = y + args[3]
    return fn(y) if fn else y


def _fused_matmul(g, args, attrs):
    a, b = args[0], args[1]
    if attrs.get("transA", 0):
        a = a.transpose(-1, -2)
    if attrs.get("transB", 0):
        b = b.transpose(-1, -2)
    return attrs.get("alpha", 1.0) * torch.matmul(a, b)


def _int_div(a, b):
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _cast(g, args, attrs):
    dtype = _DTYPES.get(attrs["to"])
    if dtype is None:
        raise Unsupported(f"Cast to type {attrs['to']}")
    return args[0].to(dtype)


def _constant(g, args, attrs):
    if "value" in attrs:
        return to_torch(numpy_helper.to_array(attrs["value"]))
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64),
                       ("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return to_torch(np.asarray(attrs[key], dtype=dtype))
    raise Unsupported("Constant without a dense value")


def _constant_of_shape(g, args, attrs):
    value = numpy_helper.to_array(attrs["value"]) if "value" in attrs \
        else np.zeros(1, np.float32)
    return torch.full(_ints(args[0]), value.reshape(-1)[0].item(),
                      dtype=to_torch(value).dtype)


def _range(g, args, attrs):
    start, limit, delta = (a.item() for a in args[:3])
    return torch.arange(start, limit, delta, dtype=args[0].dtype)


def _expand(g, args, attrs):
    x, shape = args[0], _ints(args[1])
    rank = max(x.dim(), len(shape))
    xs = [1] * (rank - x.dim()) + list(x.shape)
    ss = [1] * (rank - len(shape)) + shape
    target = [a if b == 1 else b for a, b in zip(xs, ss)]
    return x.reshape(xs).expand(target)


def _pad(g, args, attrs):
    x = args[0]
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if "pads" in attrs:
        pads, value = list(attrs["pads"]), attrs.get("value", 0.0)
        axes = list(range(x.dim()))
    else:
        pads = _ints(args[1])
        value = args[2].item() if len(args) > 2 and args[2] is not None and \
            args[2].numel() else 0.0
        axes = _ints(args[3]) if len(args) > 3 and args[3] is not None \
            else list(range(x.dim()))
    n = len(axes)
    full = [0] * (2 * x.dim())
    for i, a in enumerate(axes):
        a %= x.dim()
        full[a], full[a + x.dim()] = pads[i], pads[i + n]
    spec = [p for a in reversed(range(x.dim())) for p in (full[a], full[a + x.dim()])]
    if mode == "constant":
        return F.pad(x, spec, value=value)
    while spec and spec[-2:] == [0, 0]:  # torch pads reflect/edge on trailing axes only
        spec = spec[:-2]
    return F.pad(x, spec, mode={"reflect": "reflect", "edge": "replicate"}.get(mode, mode))


def _shape(g, args, attrs):
    dims = list(args[0].shape)
    start, end = attrs.get("start", 0), attrs.get("end")
    return torch.tensor(dims[start:end], dtype=torch.int64)


def _variadic(fn):
    def run(g, args, attrs):
        out = args[0]
        for a in args[1:]:
            out = fn(out, a)
        return out
    return run


def _gelu(g, args, attrs):
    approx = attrs.get("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    return F.gelu(args[0], approximate="tanh" if approx == "tanh" else "none")


def _bias_gelu(g, args, attrs):
    return F.gelu(args[0] + args[1])


def _fast_gelu(g, args, attrs):
    x = args[0] if len(args) < 2 or args[1] is None else args[0] + args[1]
    return F.gelu(x, approximate="tanh")


def _transpose(g, args, attrs):
    x = args[0]
    perm = attrs.get("perm", list(reversed(range(x.dim()))))
    return x.permute(*perm)


def _where(g, args, attrs):
    return torch.where(args[0].bool(), args[1], args[2])


def _tile(g, args, attrs):
    return args[0].repeat(*_ints(args[1]))


def _unary(fn):
    return lambda g, args, attrs: fn(args[0])


OPS: dict[str, Callable] = {
    "Add": lambda g, a, t: a[0] + a[1], "Sub": lambda g, a, t: a[0] - a[1],
    "Mul": lambda g, a, t: a[0] * a[1], "Div": lambda g, a, t: _int_div(a[0], a[1]),
    "Pow": lambda g, a, t: torch.pow(a[0], a[1]),
    "MatMul": lambda g, a, t: torch.matmul(a[0], a[1]),
    "Equal": lambda g, a, t: a[0] == a[1], "Less": lambda g, a, t: a[0] < a[1],
    "LessOrEqual": lambda g, a, t: a[0] <= a[1], "Greater": lambda g, a, t: a[0] > a[1],
    "GreaterOrEqual": lambda g, a, t: a[0] >= a[1],
    "And": lambda g, a, t: a[0] & a[1], "Or": lambda g, a, t: a[0] | a[1],
    "Xor": lambda g, a, t: a[0] ^ a[1], "Not": _unary(torch.logical_not),
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Mean": lambda g, a, t: _variadic(torch.add)(g, a, t) / len(a),
    "Where": _where,
    "Relu": _unary(torch.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf), "Sqrt": _unary(torch.sqrt), "Exp": _unary(torch.exp),
    "Log": _unary(torch.log), "Neg": _unary(torch.neg), "Abs": _unary(torch.abs),
    "Reciprocal": _unary(torch.reciprocal), "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil), "Sin": _unary(torch.sin), "Cos": _unary(torch.cos),
    "Softplus": _unary(F.softplus), "IsNaN": _unary(torch.isnan),
    "Identity": _unary(lambda x: x), "Dropout": lambda g, a, t: (a[0], None),
    "HardSwish": _unary(F.hardswish),
    "HardSigmoid": lambda g, a, t: (t.get("alpha", 0.2) * a[0] + t.get("beta", 0.5)).clamp(0, 1),
    "LeakyRelu": lambda g, a, t: F.leaky_relu(a[0], t.get("alpha", 0.01)),
    "Elu": lambda g, a, t: F.elu(a[0], t.get("alpha", 1.0)),
    "PRelu": lambda g, a, t: torch.where(a[0] >= 0, a[0], a[0] * a[1]),
    "Clip": _clip, "Gelu": _gelu, "BiasGelu": _bias_gelu, "FastGelu": _fast_gelu,
    "Softmax": _softmax(False), "LogSoftmax": _softmax(True),
    "Conv": _conv, "FusedConv": _fused_conv,
    "MaxPool": lambda g, a, t: _pool(g, a, t, "max"),
    "AveragePool": lambda g, a, t: _pool(g, a, t, "avg"),
    "GlobalAveragePool": lambda g, a, t: a[0].mean(dim=tuple(range(2, a[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda g, a, t: a[0].amax(dim=tuple(range(2, a[0].dim())), keepdim=True),
    "BatchNormalization": _batch_norm,
    "LayerNormalization": _layer_norm, "SkipLayerNormalization": _skip_layer_norm,
    "Gemm": _gemm, "FusedMatMul": _fused_matmul,
    "Reshape": _reshape, "Flatten": _flatten, "Transpose": _transpose,
    "Squeeze": _squeeze, "Unsqueeze": _unsqueeze,
    "Concat": lambda g, a, t: torch.cat([x for x in a if x is not None], dim=t["axis"]),
    "Split": None,  # needs the output count: set below
    "Slice": _slice, "Gather": _gather, "GatherElements": _gather_elements,
    "Shape": _shape, "Size": lambda g, a, t: torch.tensor(a[0].numel(), dtype=torch.int64),
    "Cast": _cast, "Constant": _constant, "ConstantOfShape": _constant_of_shape,
    "Range": _range, "Expand": _expand, "Pad": _pad, "Tile": _tile,
    "ReduceSum": _reduce("sum"), "ReduceMean": _reduce("mean"), "ReduceMax": _reduce("max"),
    "ReduceMin": _reduce("min"), "ReduceL2": _reduce("l2"), "ReduceProd": _reduce("prod"),
    "ReduceSumSquare": _reduce("sumsquare"),
    "DequantizeLinear": _dequantize_op, "QuantizeLinear": _quantize_op,
}


def _split_op(g, args, attrs):
    return _split(g, args, attrs, attrs.get("num_outputs", 0) or attrs.get("_outputs", 2))


OPS["Split"] = _split_op
