"""Shared int8 quantization utilities: quantization parameters, activation range
calibration (min-max, percentile, entropy/KL, MSE) and graph edits that insert
QuantizeLinear/DequantizeLinear pairs on onnx-graphsurgeon graphs.

Conventions (what ONNX Runtime's CPU kernels want on x86 and Arm):

* activations: uint8, per tensor, asymmetric by default (real zero exactly representable,
  so a Relu before a Q with zero point 0 is redundant and ORT drops it); ORT's x86 QDQ
  fusions refuse int8 activations (``QDQIsInt8Allowed()`` is false off Arm);
* weights: int8, symmetric (zero point 0), per output channel; 7-bit ([-63, 63]) where
  the CPU has no int8 dot-product instruction, so that x86 VPMADDUBSW's int16 pair sums
  cannot saturate (255 * 63 * 2 < 32767);
* biases: int32 with scale input_scale * weight_scale, zero point 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import verify
from graphopt.ir import Model
from graphopt.rewrite import consumers, constant_value, tensor_names, unique_name

METHODS = ("minmax", "percentile", "entropy", "mse")
HIST_BINS = 2048
# Ops that only move or select values: their output may reuse the input's quantization
# parameters, so ORT drops the DQ/Q pair around them (and runs MaxPool on uint8).
PASS_THROUGH = frozenset({"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze",
                          "Unsqueeze", "Identity"})


# ============================================================================ parameters
def activation_params(rmin: float, rmax: float, symmetric: bool = False
                      ) -> tuple[np.float32, np.uint8]:
    """uint8 scale and zero point covering [rmin, rmax] (widened to include 0)."""
    rmin, rmax = min(float(rmin), 0.0), max(float(rmax), 0.0)
    if symmetric:
        bound = max(abs(rmin), abs(rmax))
        scale = bound / 127.5 if bound > 0 else 1.0
        return np.float32(scale), np.uint8(128)
    if rmax - rmin <= 0:
        return np.float32(1.0), np.uint8(0)
    scale = (rmax - rmin) / 255.0
    zero = int(np.clip(round(-rmin / scale), 0, 255))
    return np.float32(scale), np.uint8(zero)


def weight_qmax(reduce_range: bool) -> int:
    return 63 if reduce_range else 127


def quantize_weight(w: np.ndarray, axis: int | None, reduce_range: bool = False
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization of ``w`` per slice along ``axis`` (``None``: per
    tensor). Returns (int8 values, float32 scales: shape [w.shape[axis]] or scalar)."""
    qmax = weight_qmax(reduce_range)
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        bound = float(np.abs(w).max()) if w.size else 0.0
        scale = np.float32(bound / qmax if bound > 0 else 1.0)
        q = np.clip(np.rint(w / scale), -qmax, qmax).astype(np.int8)
        return q, np.asarray(scale, dtype=np.float32)
    axis = axis % w.ndim
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    bound = np.abs(w).max(axis=reduce) if w.size else np.zeros(w.shape[axis])
    scale = np.where(bound > 0, bound / qmax, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale


def dequantize_weight(q: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None or np.ndim(scale) == 0:
        return q.astype(np.float32) * np.float32(scale)
    shape = [1] * q.ndim
    shape[axis % q.ndim] = -1
    return q.astype(np.float32) * scale.reshape(shape)


def fake_quant_weight(w: np.ndarray, axis: int | None, reduce_range: bool) -> np.ndarray:
    q, scale = quantize_weight(w, axis, reduce_range)
    return dequantize_weight(q, scale, axis)


def fake_quant_activation(x: np.ndarray, scale: float, zero: int) -> np.ndarray:
    q = np.clip(np.rint(x / scale) + int(zero), 0, 255)
    return ((q - int(zero)) * scale).astype(np.float32)


def fake_quant_dynamic(x: np.ndarray) -> np.ndarray:
    """What DynamicQuantizeLinear + dequantization does to ``x`` (uint8, per tensor)."""
    scale, zero = activation_params(float(x.min()), float(x.max()))
    return fake_quant_activation(x, float(scale), int(zero))


def quantize_bias(b: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias for ``scale`` (input scale x weight scale); a scale too small for the
    bias to fit in int32 is raised to fit. Returns (int32 values, float32 scales)."""
    b = np.asarray(b, dtype=np.float64)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), b.shape).copy()
    limit = float(2**31 - 1)
    scale = np.maximum(scale, np.abs(b) / limit)
    scale = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(b / scale), -limit, limit).astype(np.int32)
    return q, scale.astype(np.float32)


# ============================================================================ calibration
@dataclass
class TensorStats:
    """What calibration saw of one tensor: its range and (for histogram methods) a
    histogram over [min, max]."""

    min: float = np.inf
    max: float = -np.inf
    hist: np.ndarray | None = None
    samples: list[np.ndarray] = field(default_factory=list)  # kept for sensitivity

    def update_range(self, x: np.ndarray) -> None:
        if x.size:
            self.min = min(self.min, float(np.nanmin(x)))
            self.max = max(self.max, float(np.nanmax(x)))

    def update_hist(self, x: np.ndarray) -> None:
        lo, hi = self.min, self.max if self.max > self.min else self.min + 1e-6
        counts, _ = np.histogram(x[np.isfinite(x)], bins=HIST_BINS, range=(lo, hi))
        self.hist = counts.astype(np.float64) if self.hist is None else self.hist + counts

    def edges(self) -> np.ndarray:
        hi = self.max if self.max > self.min else self.min + 1e-6
        return np.linspace(self.min, hi, HIST_BINS + 1)


def collect_stats(proto: onnx.ModelProto, names: list[str], batches: list[dict],
                  histograms: bool, keep: set[str] = frozenset(), keep_samples: int = 8,
                  session_factory=None) -> dict[str, TensorStats]:
    """Run ``proto`` on ``batches`` with ``names`` exposed as outputs and gather each
    tensor's range (and histogram, in a second run over the data, when asked). The
    first ``keep_samples`` batches of the tensors in ``keep`` are kept as arrays."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(
                name, onnx.TensorProto.FLOAT, None))
    sess = (session_factory or (lambda p: verify.session(p, threads=0)))(probe)
    stats = {name: TensorStats() for name in names}
    for i, feeds in enumerate(batches):
        values = dict(zip(names, sess.run(names, _accepted(sess, feeds))))
        for name, value in values.items():
            value = np.asarray(value, dtype=np.float32)
            stats[name].update_range(value)
            if name in keep and i < keep_samples:
                stats[name].samples.append(value)
    if histograms:
        for feeds in batches:
            values = dict(zip(names, sess.run(names, _accepted(sess, feeds))))
            for name, value in values.items():
                stats[name].update_hist(np.asarray(value, dtype=np.float32).ravel())
    return stats


def _accepted(sess, feeds: dict) -> dict:
    names = {i.name for i in [*sess.get_inputs(), *sess.get_overridable_initializers()]}
    return {k: v for k, v in feeds.items() if k in names}


def choose_range(stats: TensorStats, method: str, percentile: float = 99.999,
                 symmetric: bool = False) -> tuple[float, float]:
    """The [min, max] to quantize a tensor to, by calibration ``method``."""
    lo, hi = stats.min, stats.max
    if not np.isfinite(lo) or not np.isfinite(hi):
        return 0.0, 0.0
    if method == "minmax" or stats.hist is None or stats.hist.sum() == 0:
        return lo, hi
    hist, edges = stats.hist, stats.edges()
    if method == "percentile":
        cdf = np.cumsum(hist) / hist.sum()
        tail = (100.0 - percentile) / 100.0
        low = edges[int(np.searchsorted(cdf, tail))] if lo < 0 else lo
        high = edges[min(int(np.searchsorted(cdf, 1.0 - tail)) + 1, HIST_BINS)]
        return min(low, 0.0) if lo < 0 else lo, max(high, 0.0)
    if method == "entropy":
        bound = _kl_threshold(hist, edges, one_sided=lo >= 0)
        return (max(lo, -bound), min(hi, bound)) if lo < 0 else (lo, min(hi, bound))
    if method == "mse":
        return _mse_range(hist, edges, lo, hi, symmetric)
    raise ValueError(f"unknown calibration method {method!r}")


def _abs_hist(hist: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, float]:
    """The histogram of |x| over [0, max|x|] in HIST_BINS bins (re-binned by centres)."""
    centres = np.abs((edges[:-1] + edges[1:]) / 2)
    bound = float(max(abs(edges[0]), abs(edges[-1])))
    idx = np.minimum((centres / bound * HIST_BINS).astype(int), HIST_BINS - 1) if bound else \
        np.zeros(len(centres), dtype=int)
    return np.bincount(idx, weights=hist, minlength=HIST_BINS), bound


def _kl_threshold(hist: np.ndarray, edges: np.ndarray, one_sided: bool) -> float:
    """TensorRT-style entropy calibration: the |x| threshold whose clipped, quantized
    distribution is closest (KL divergence) to the observed one."""
    absolute, bound = _abs_hist(hist, edges)
    levels = 255 if one_sided else 127
    if bound == 0:
        return 0.0
    # The exact zeros of a Relu output are represented exactly whatever the threshold;
    # left in, their spike dominates the divergence and the tail is clipped away.
    absolute[0] = 0.0 if one_sided else absolute[0]
    best, best_i = np.inf, HIST_BINS
    for i in range(max(levels, 128), HIST_BINS + 1, 16):
        p = absolute[:i].copy()
        p[-1] += absolute[i:].sum()
        if p.sum() == 0:
            continue
        # quantize the first i bins to `levels` levels: each level's mass spread evenly
        # over its non-empty bins
        part = absolute[:i]
        bounds = np.linspace(0, i, levels + 1).astype(int)[:-1]
        sums = np.add.reduceat(part, bounds)
        counts = np.add.reduceat((part > 0).astype(np.float64), bounds)
        level = np.searchsorted(bounds, np.arange(i), side="right") - 1
        q = np.where(part > 0, (sums / np.maximum(counts, 1))[level], 0.0)
        p, q = p / p.sum(), q / max(q.sum(), 1e-12)
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl <= best:  # ties: the wider range (less clipping)
            best, best_i = kl, i
    return bound * best_i / HIST_BINS


def _mse_range(hist, edges, lo, hi, symmetric) -> tuple[float, float]:
    """The shrink factor of [lo, hi] with the least expected squared quantization error."""
    centres = (edges[:-1] + edges[1:]) / 2
    best, best_f = np.inf, 1.0
    for f in np.linspace(0.3, 1.0, 71):
        a, b = min(lo * f, 0.0), max(hi * f, 0.0)
        scale, zero = activation_params(a, b, symmetric)
        deq = fake_quant_activation(centres, float(scale), int(zero))
        err = float(np.sum(hist * (centres - deq) ** 2))
        if err < best:
            best, best_f = err, f
    return lo * best_f if lo < 0 else lo, hi * best_f


# ============================================================================ graph edits
class QdqWriter:
    """Inserts quantization into a model's main graph, one Q/DQ pair per activation."""

    def __init__(self, model: Model):
        self.model = model
        self.graph = model.graph
        self.names = tensor_names(model.all_graphs())
        self.quantized: dict[str, tuple[gs.Tensor, np.float32, np.uint8]] = {}
        self.origin: dict[str, str] = {}  # tensor name -> the name calibration saw

    def source_name(self, tensor: gs.Tensor) -> str:
        return self.origin.get(tensor.name, tensor.name)

    def constant(self, hint: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(unique_name(self.names, hint), np.asarray(value))

    def variable(self, hint: str, dtype, shape) -> gs.Variable:
        return gs.Variable(unique_name(self.names, hint), dtype=dtype, shape=shape)

    def node(self, op: str, inputs, outputs, domain: str | None = None, **attrs) -> gs.Node:
        node = gs.Node(op, name=unique_name(self.names, f"{outputs[0].name}_{op}"),
                       attrs=attrs, inputs=list(inputs), outputs=list(outputs),
                       domain=domain)
        self.graph.nodes.append(node)
        return node

    def activation(self, tensor: gs.Tensor, scale: np.float32, zero: np.uint8) -> gs.Tensor:
        """Make every reader of ``tensor`` read DequantizeLinear(QuantizeLinear(tensor)).
        A graph output keeps its name: the DQ writes it, its producer a fresh tensor."""
        if tensor.name in self.quantized:
            return self.quantized[tensor.name][0]
        s = self.constant(f"{tensor.name}_scale", np.float32(scale))
        z = self.constant(f"{tensor.name}_zero_point", np.uint8(zero))
        q_out = self.variable(f"{tensor.name}_quantized", np.uint8, tensor.shape)
        if tensor in self.graph.outputs and tensor.inputs:
            producer = tensor.inputs[0]
            fresh = self.variable(f"{tensor.name}_float", tensor.dtype, tensor.shape)
            producer.outputs[producer.outputs.index(tensor)] = fresh
            self.node("QuantizeLinear", [fresh, s, z], [q_out])
            self.node("DequantizeLinear", [q_out, s, z], [tensor])
            result = tensor
        else:
            readers = consumers(tensor)
            dq_out = self.variable(f"{tensor.name}_dequantized", np.float32, tensor.shape)
            self.node("QuantizeLinear", [tensor, s, z], [q_out])
            self.node("DequantizeLinear", [q_out, s, z], [dq_out])
            for reader in readers:
                for i, t in enumerate(reader.inputs):
                    if t is tensor:
                        reader.inputs[i] = dq_out
            result = dq_out
        self.quantized[tensor.name] = (result, np.float32(scale), np.uint8(zero))
        return result

    def weight(self, hint: str, value: np.ndarray, axis: int | None,
               reduce_range: bool) -> tuple[gs.Variable, np.ndarray]:
        """DequantizeLinear of int8 ``value``; returns (its output, the scales)."""
        q, scale = quantize_weight(value, axis, reduce_range)
        zero = np.zeros(scale.shape, dtype=np.int8)
        out = self.variable(f"{hint}_dequantized", np.float32, list(value.shape))
        attrs = {"axis": axis % value.ndim} if axis is not None else {}
        self.node("DequantizeLinear", [self.constant(f"{hint}_quantized", q),
                                       self.constant(f"{hint}_scale", scale),
                                       self.constant(f"{hint}_zero_point", zero)], [out],
                  **attrs)
        return out, scale

    def bias(self, hint: str, value: np.ndarray, scale: np.ndarray) -> gs.Variable:
        q, scale = quantize_bias(value, scale)
        out = self.variable(f"{hint}_dequantized", np.float32, list(value.shape))
        attrs = {"axis": 0} if scale.ndim else {}
        # no zero point: it defaults to 0, and ORT's fusions read only the int32 values
        self.node("DequantizeLinear", [self.constant(f"{hint}_quantized", q),
                                       self.constant(f"{hint}_scale", scale)], [out], **attrs)
        return out

    def embedding(self, gather: gs.Node, table: np.ndarray, reduce_range: bool) -> None:
        """Gather(float table, ids) -> Gather(int8 table, ids) * Gather(row scales, ids):
        the table is stored as int8 with one scale per row; only gathered rows are
        dequantized at run time."""
        ids, out = gather.inputs[1], gather.outputs[0]
        q, scale = quantize_weight(table, 0, reduce_range)
        rows = self.variable(f"{out.name}_int8", np.int8, out.shape)
        gather.inputs[0] = self.constant(f"{gather.inputs[0].name}_int8", q)
        gather.outputs[0] = rows
        as_float = self.variable(f"{out.name}_unscaled", np.float32, out.shape)
        self.node("Cast", [rows], [as_float], to=onnx.TensorProto.FLOAT)
        scales = self.constant(f"{gather.inputs[0].name}_row_scale",
                               scale.reshape([-1] + [1] * (table.ndim - 1)))
        row_scale = self.variable(f"{out.name}_row_scale", np.float32, None)
        self.node("Gather", [scales, ids], [row_scale], axis=0)
        self.node("Mul", [as_float, row_scale], [out])


def resolve_weight(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a weight: a constant, or a Transpose of one (exporters leave
    ``x @ W.T`` of large weights unfolded)."""
    value = constant_value(tensor)
    if value is not None:
        return value
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Transpose":
        node = tensor.inputs[0]
        inner = constant_value(node.inputs[0])
        if inner is not None:
            perm = node.attrs.get("perm")
            return np.transpose(inner, perm) if perm is not None else inner.T
    return None


def is_float(tensor: gs.Tensor) -> bool:
    try:
        return tensor.dtype is not None and np.dtype(tensor.dtype) == np.float32
    except TypeError:
        return False


def from_dequantize(tensor: gs.Tensor) -> bool:
    return bool(tensor.inputs) and tensor.inputs[0].op in ("DequantizeLinear",)
