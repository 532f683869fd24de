"""int8 for the ``mcu`` target: QDQ graphs (what ``quantize-int8`` writes) lowered to int8
kernels with TFLite Micro / CMSIS-NN semantics.

A QDQ graph says "this Conv runs on int8": its input comes through DequantizeLinear of
an 8-bit tensor, its weights are DequantizeLinear of int8 constants (symmetric, per
channel), its bias is int32 at the input scale times the weight scale, and its output
(after an optional Relu/Clip) goes through QuantizeLinear. Such a Conv or Gemm/MatMul
becomes one kernel reading the 8-bit tensor and writing the quantized output directly:

    acc[m]  = bias_q[m] + sum (x_q - x_zp) * w_q            (int32)
    y_q[m]  = clamp(y_zp + requantize(acc[m], M0[m], shift[m]), lo, hi)

with ``M0 * 2**(shift - 31) = x_scale * w_scale[m] / y_scale`` (``quantize_multiplier``,
TFLite's QuantizeMultiplier) and ``requantize`` TFLite's MultiplyByQuantizedMultiplier
(a saturating rounding doubling high multiply, then a rounding right shift). A fused
Relu/Clip is the clamp in the quantized domain (quantization is monotonic, so it is
exact). Without a QuantizeLinear after it (a float head) the kernel writes
``acc * x_scale * w_scale[m]`` as float. Everything else between DequantizeLinear and
QuantizeLinear runs in float, with ``quantize``/``dequantize`` kernels at the edges.

8-bit activations are stored as int8 whatever the model says: a uint8 tensor with zero
point z is the int8 tensor q - 128 with zero point z - 128 (the same real values).
Constant DequantizeLinear nodes are folded: their float values serve the float kernels,
their integers the int8 ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

if TYPE_CHECKING:
    from graphopt.targets.mcu_ops import Op

EIGHT_BIT = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)


@dataclass
class QConst:
    """A constant DequantizeLinear: the integers, scale and zero point (per channel along
    ``axis`` or per tensor)."""

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int


def fold_constant_dequantize(graph: onnx.GraphProto, consts: dict) -> dict[str, QConst]:
    """Record each DequantizeLinear of constants and add its float value to ``consts``."""
    found = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or \
                any(t and t not in consts for t in node.input):
            continue
        q = consts[node.input[0]]
        scale = consts[node.input[1]].astype(np.float32)
        zp = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else \
            np.zeros_like(scale, dtype=q.dtype)
        axis = next((onnx.helper.get_attribute_value(a) for a in node.attribute
                     if a.name == "axis"), 1) % max(q.ndim, 1)
        shape = [1] * q.ndim
        if scale.ndim == 1 and q.ndim:
            shape[axis] = -1
        value = (q.astype(np.float32) - zp.reshape(shape).astype(np.float32)) * \
            scale.reshape(shape) if q.ndim else (np.float32(q) - np.float32(zp)) * scale
        consts[node.output[0]] = value.astype(np.float32)
        found[node.output[0]] = QConst(q, scale, zp, axis)
    return found


def activation_qparams(node, consts) -> tuple[float, int]:
    """(scale, int8 zero point) of a QuantizeLinear/DequantizeLinear of activations."""
    scale = consts[node.input[1]]
    zp_name = node.input[2] if len(node.input) > 2 else ""
    zp = consts[zp_name] if zp_name else np.uint8(0)
    if scale.size != 1 or (zp_name and zp.size != 1):
        raise ValueError("per-channel quantization of activations")
    zp_int = int(np.asarray(zp).reshape(-1)[0])
    unsigned = np.asarray(zp).dtype == np.uint8
    return float(scale.reshape(-1)[0]), zp_int - 128 if unsigned else zp_int


def quantize_multiplier(real: float) -> tuple[int, int]:
    """``(M0, shift)`` with ``real = M0 * 2**(shift - 31)``, ``M0`` a Q31 fraction in
    [0.5, 1): TFLite's QuantizeMultiplier."""
    if real == 0.0:
        return 0, 0
    fraction, shift = math.frexp(real)
    fixed = int(round(fraction * (1 << 31)))
    if fixed == 1 << 31:
        fixed, shift = fixed // 2, shift + 1
    if shift < -31:
        return 0, 0
    return fixed, shift


def to_int8(ops: list[Op], qconsts: dict[str, QConst], outputs: set[str]) -> list[Op]:
    """Turn each Conv/FC fed by a ``dequantize`` op, with int8 symmetric weights, into
    its int8 kernel; absorb the ``quantize`` op after it; drop what is then dead."""
    producer = {t: op for op in ops for t in op.outputs}
    readers: dict[str, list[Op]] = {}
    for op in ops:
        for t in op.inputs:
            readers.setdefault(t, []).append(op)
    absorbed = set()
    for op in ops:
        if op.kind not in ("conv", "fc") or (op.kind == "fc" and op.params["kn"]):
            continue
        src = producer.get(op.inputs[0])
        weight = qconsts.get(op.params.get("w_name", ""))
        if src is None or src.kind != "dequantize" or weight is None or \
                weight.q.dtype != np.int8 or np.any(weight.zero_point != 0) or \
                op.params.get("alpha", 1.0) != 1.0:
            continue
        x_scale, x_zp = src.params["scale"], src.params["zp"]
        try:
            w_q, w_scale = _weight_layout(op, weight)
        except ValueError:  # quantized in a way these kernels do not take: stays float
            continue
        channels = w_q.shape[0]
        w_scale = np.broadcast_to(w_scale.astype(np.float64), (channels,))
        acc_scale = x_scale * w_scale
        bias = op.consts["b"].astype(np.float64) if "b" in op.consts else np.zeros(channels)
        op.consts = {"w": np.ascontiguousarray(w_q),
                     "b": np.round(bias / acc_scale).astype(np.int32)}
        op.inputs = [src.inputs[0]]
        op.params.update(x_zp=x_zp, x_scale=x_scale)
        users = readers.get(op.outputs[0], [])
        if len(users) == 1 and users[0].kind == "quantize" and op.outputs[0] not in outputs:
            q = users[0]
            y_scale, y_zp = q.params["scale"], q.params["zp"]
            mults = [quantize_multiplier(float(s / y_scale)) for s in acc_scale]
            op.consts["mult"] = np.array([m for m, _ in mults], np.int64)
            op.consts["shift"] = np.array([s for _, s in mults], np.int64)
            op.params.update(y_zp=y_zp, out="int8",
                             lo_q=_quantized_bound(op.params["lo"], y_scale, y_zp, -128),
                             hi_q=_quantized_bound(op.params["hi"], y_scale, y_zp, 127))
            op.outputs = list(q.outputs)
            absorbed.add(id(q))
        else:
            op.consts["scale"] = acc_scale.astype(np.float32)
            op.params["out"] = "float32"
        op.kind = "q" + op.kind
    ops = [op for op in ops if id(op) not in absorbed]
    return _without_dead(ops, outputs)


def _weight_layout(op: Op, weight: QConst) -> tuple[np.ndarray, np.ndarray]:
    """The integer weights in the layout the float kernel got (FC: [N, K]) and their
    per-output-channel scales."""
    q, scale = weight.q, weight.scale.reshape(-1)
    if op.kind == "conv":
        if scale.size > 1 and weight.axis != 0:
            raise ValueError("conv weights quantized along another axis than 0")
        w = q if q.ndim == 4 else q[:, :, None, :]
        return w, scale
    if op.params.get("w_transposed"):  # stored [K, N]: channels along axis 1
        if scale.size > 1 and weight.axis != 1:
            raise ValueError("FC weights quantized along the reduction axis")
        return q.T, scale
    if scale.size > 1 and weight.axis != 0:
        raise ValueError("FC weights quantized along the reduction axis")
    return q, scale


def _quantized_bound(bound: float, scale: float, zp: int, limit: int) -> int:
    if math.isinf(bound):
        return limit
    return int(np.clip(np.round(bound / scale) + zp, -128, 127))


def _without_dead(ops: list[Op], outputs: set[str]) -> list[Op]:
    """Ops none of whose outputs is read or a graph output, removed to a fixpoint."""
    while True:
        read = {t for op in ops for t in op.inputs} | outputs
        kept = [op for op in ops if any(t in read for t in op.outputs)]
        if len(kept) == len(ops):
            return kept
        ops = kept
