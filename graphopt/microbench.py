"""Micro-benchmarks that calibrate the cost model: small ONNX models, each a chain of
``n`` copies of one op at one shape, built with ``onnx.helper``.

A probe is timed at two chain lengths; the difference divided by the extra copies is the
time of one op inside a graph, free of the session's fixed cost and of the layout changes
a runtime makes at a graph's edges (ONNX Runtime's NCHWc reorders happen once per chain).
The shapes span what real models run, from a digits classifier at batch 256 to ResNet-50
and BERT layers, so the calibration interpolates rather than extrapolates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
MICROSOFT = "com.microsoft"
NCHWC = "com.microsoft.nchwc"


@dataclass(frozen=True)
class Probe:
    """``build(n)`` returns a model with ``n`` copies of the op and its feeds. ``chain``:
    the copies follow one another (timed at two lengths); otherwise ``n`` is 1 and the
    session's fixed cost is subtracted instead."""

    name: str
    build: Callable[[int], tuple[onnx.ModelProto, dict[str, np.ndarray]]]
    chain: bool = True
    length: int = 4  # the long chain's copies
    # The op family the probe measures (``cost.op_key``), when it is not the one with
    # most roofline time (a first layer's Conv of one input channel moves fewer bytes
    # than the Relu after it); ``None``: that one.
    measures: str | None = None


def _model(nodes, inputs, outputs, inits, ms: bool = False) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(MICROSOFT, 1)] if ms else [])
    graph = helper.make_graph(nodes, "probe", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def _float(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _rand(rng, *shape, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _chain(shape, step, ms: bool = False, out_shape=None):
    """A builder: ``step(i, x, rng) -> (nodes, inits, y)`` applied ``n`` times to a float
    input of ``shape``."""
    def build(n: int):
        rng = np.random.default_rng(0)
        nodes, inits, x = [], [], "x"
        for i in range(n):
            new_nodes, new_inits, x = step(i, x, rng)
            nodes += new_nodes
            inits += new_inits
        _rename_output(nodes, x)
        shape_out = out_shape(n) if out_shape else shape
        return (_model(nodes, [_float("x", shape)], [_float("y", shape_out)], inits, ms),
                {"x": _rand(rng, *shape)})
    return build


def _rename_output(nodes: list[onnx.NodeProto], last: str) -> None:
    """The chain's last tensor becomes the graph output ``y`` (no Identity: a runtime
    removes it, and the cost model would count it)."""
    for node in nodes:
        for i, name in enumerate(node.output):
            if name == last:
                node.output[i] = "y"


def _unary(op: str, domain: str = "", **attrs):
    def step(i, x, rng):
        return [helper.make_node(op, [x], [f"t{i}"], domain=domain, **attrs)], [], f"t{i}"
    return step


def _clip(i, x, rng):
    """Clip to [0, 6] (ReLU6; what a fused convolution's Clip activation does)."""
    lo, hi = (numpy_helper.from_array(np.array(v, np.float32), f"{n}{i}")
              for n, v in (("lo", 0.0), ("hi", 6.0)))
    return [helper.make_node("Clip", [x, lo.name, hi.name], [f"t{i}"])], [lo, hi], f"t{i}"


def _binary(op: str, shape):
    def step(i, x, rng):
        c = numpy_helper.from_array(_rand(rng, *shape[1:]) * 0.01 + 1.0, f"c{i}")
        return [helper.make_node(op, [x, c.name], [f"t{i}"])], [c], f"t{i}"
    return step


def _bias_gelu(hidden: int):
    """com.microsoft.BiasGelu of the chain and a bias (what an FFN's bias and GELU fuse
    to: its erf runs slower than Gelu's alone)."""
    def step(i, x, rng):
        b = numpy_helper.from_array(_rand(rng, hidden, scale=0.1), f"b{i}")
        return ([helper.make_node("BiasGelu", [x, b.name], [f"t{i}"], domain=MICROSOFT)],
                [b], f"t{i}")
    return step


def _conv(channels: int, kernel: int, depthwise: bool, activation: str | None,
          expanded: int | None = None):
    """``expanded``: the convolutions alternate ``channels`` -> ``expanded`` ->
    ``channels`` (a mobile network's inverted-residual 1x1 expansion and projection, which
    run at another efficiency than square layers of the same work: measured 309 us per
    24 -> 144 -> 24 pair at 56 x 56, where the square layers' corrections predicted 233)."""
    def step(i, x, rng):
        c_in, c_out = (channels, channels) if expanded is None else \
            (channels, expanded) if i % 2 == 0 else (expanded, channels)
        fan_in = kernel * kernel * (1 if depthwise else c_in)
        w = numpy_helper.from_array(_rand(rng, c_out, 1 if depthwise else c_in,
                                          kernel, kernel, scale=fan_in ** -0.5), f"w{i}")
        b = numpy_helper.from_array(_rand(rng, c_out, scale=0.1), f"b{i}")
        attrs = dict(kernel_shape=[kernel, kernel], pads=[kernel // 2] * 4,
                     group=channels if depthwise else 1)
        if activation:
            node = helper.make_node("FusedConv", [x, w.name, b.name], [f"t{i}"],
                                    domain=MICROSOFT, activation=activation, **attrs)
        else:
            node = helper.make_node("Conv", [x, w.name, b.name], [f"t{i}"], **attrs)
        return [node], [w, b], f"t{i}"
    return step


def _matmul(k: int, n_out: int):
    """Alternates [K, N] and [N, K] weights so the chain's shapes repeat."""
    def step(i, x, rng):
        rows, cols = (k, n_out) if i % 2 == 0 else (n_out, k)
        w = numpy_helper.from_array(_rand(rng, rows, cols, scale=rows ** -0.5), f"w{i}")
        b = numpy_helper.from_array(_rand(rng, cols, scale=0.1), f"b{i}")
        return [helper.make_node("Gemm", [x, w.name, b.name], [f"t{i}"])], [w, b], f"t{i}"
    return step


def _batched_matmul(heads: int, d: int):
    """Multiplies by a second graph input (an activation, not a weight)."""
    def build(n: int):
        rng = np.random.default_rng(0)
        nodes, x = [], "x"
        for i in range(n):
            nodes.append(helper.make_node("MatMul", [x, "m"], [f"t{i}"]))
            x = f"t{i}"
        _rename_output(nodes, x)
        shape = [1, heads, 128, d]
        model = _model(nodes, [_float("x", shape), _float("m", [1, heads, d, d])],
                       [_float("y", shape)], [])
        return model, {"x": _rand(rng, *shape), "m": _rand(rng, 1, heads, d, d,
                                                           scale=d ** -0.5)}
    return build


def _attention(hidden: int, heads: int):
    def step(i, x, rng):
        w = numpy_helper.from_array(_rand(rng, hidden, 3 * hidden, scale=hidden ** -0.5),
                                    f"w{i}")
        b = numpy_helper.from_array(_rand(rng, 3 * hidden, scale=0.1), f"b{i}")
        node = helper.make_node("Attention", [x, w.name, b.name, "mask"], [f"t{i}"],
                                domain=MICROSOFT, num_heads=heads, mask_filter_value=-np.inf)
        return [node], [w, b], f"t{i}"
    return step


def _with_mask(build, seq: int):
    """``build`` with a graph input ``mask`` (int32 [1, seq], all ones: a sentence
    without padding), as graphopt's attention fusion feeds Attention: ONNX Runtime's
    kernel takes about 15% longer with a mask than without."""
    def wrapped(n: int):
        model, feeds = build(n)
        model.graph.input.append(helper.make_tensor_value_info(
            "mask", onnx.TensorProto.INT32, [1, seq]))
        feeds["mask"] = np.ones((1, seq), np.int32)
        return model, feeds
    return wrapped


def _layer_norm(hidden: int):
    def step(i, x, rng):
        g = numpy_helper.from_array(np.ones(hidden, np.float32), f"g{i}")
        b = numpy_helper.from_array(np.zeros(hidden, np.float32), f"b{i}")
        return ([helper.make_node("LayerNormalization", [x, g.name, b.name], [f"t{i}"],
                                  axis=-1, epsilon=1e-5)], [g, b], f"t{i}")
    return step


def _skip_layer_norm(hidden: int):
    """com.microsoft.SkipLayerNormalization of the chain and a second input (the skip)."""
    def step(i, x, rng):
        g = numpy_helper.from_array(np.ones(hidden, np.float32), f"g{i}")
        b = numpy_helper.from_array(np.zeros(hidden, np.float32), f"b{i}")
        return ([helper.make_node("SkipLayerNormalization", [x, "skip", g.name, b.name],
                                  [f"t{i}"], domain=MICROSOFT, epsilon=1e-5)], [g, b], f"t{i}")
    return step


def _with_skip(build, shape):
    """``build`` with a second graph input ``skip`` of ``shape``."""
    def wrapped(n: int):
        model, feeds = build(n)
        model.graph.input.append(_float("skip", shape))
        feeds["skip"] = _rand(np.random.default_rng(1), *shape)
        return model, feeds
    return wrapped


def _qdq(tensor: str, i: int, scale: float, zero_point: int = 128):
    """uint8 Quantize -> Dequantize of an activation, as graphopt's int8 pass writes it
    (zero point 0 after a Relu: the runtime then drops the Relu into the int8 op)."""
    s = numpy_helper.from_array(np.array(scale, np.float32), f"s{i}")
    z = numpy_helper.from_array(np.array(zero_point, np.uint8), f"z{i}")
    nodes = [helper.make_node("QuantizeLinear", [tensor, s.name, z.name], [f"q{i}"]),
             helper.make_node("DequantizeLinear", [f"q{i}", s.name, z.name], [f"dq{i}"])]
    return nodes, [s, z], f"dq{i}"


def _quantize_step(i, x, rng):
    """Quantize -> Dequantize -> Add of a scalar: the Add keeps the runtime from removing
    the pairs of a chain (it folds Q -> DQ -> Q -> DQ; no QDQ fusion takes an Add whose
    other input is a float constant); the Add's share is predicted as calibrated."""
    nodes, inits, y = _qdq(x, i, 0.05)
    c = numpy_helper.from_array(np.array(0.01, np.float32), f"c{i}")
    return nodes + [helper.make_node("Add", [y, c.name], [f"t{i}"])], inits + [c], f"t{i}"


def _int8_weight(name: str, w: np.ndarray):
    """Per-output-channel symmetric int8 weight behind a DequantizeLinear (axis 0)."""
    scale = np.abs(w).reshape(len(w), -1).max(1) / 127 + 1e-12
    q = np.clip(np.round(w / scale.reshape(-1, *[1] * (w.ndim - 1))), -127, 127)
    inits = [numpy_helper.from_array(q.astype(np.int8), f"{name}_q"),
             numpy_helper.from_array(scale.astype(np.float32), f"{name}_s"),
             numpy_helper.from_array(np.zeros(len(w), np.int8), f"{name}_z")]
    node = helper.make_node("DequantizeLinear", [i.name for i in inits], [name], axis=0)
    return [node], inits


def _int32_bias(name: str, bias: np.ndarray, scale: np.ndarray):
    """int32 bias behind a DequantizeLinear of scale activation x weight scale: the form
    a runtime's QDQ fusion (ORT: QLinearConv, QGemm) needs."""
    inits = [numpy_helper.from_array(np.round(bias / scale).astype(np.int32), f"{name}_q"),
             numpy_helper.from_array(scale.astype(np.float32), f"{name}_s")]
    return [helper.make_node("DequantizeLinear", [i.name for i in inits], [name], axis=0)], inits


def _int8_conv(channels: int, kernel: int):
    def step(i, x, rng):
        nodes, inits, x = _qdq(x, i, 0.05, 128 if i == 0 else 0)
        w = _rand(rng, channels, channels, kernel, kernel, scale=(kernel * kernel * channels) ** -0.5)
        wn, wi = _int8_weight(f"w{i}", w)
        bn, bi = _int32_bias(f"b{i}", _rand(rng, channels, scale=0.1),
                             onnx.numpy_helper.to_array(wi[1]) * 0.05)
        conv = helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"],
                                kernel_shape=[kernel, kernel], pads=[kernel // 2] * 4)
        relu = helper.make_node("Relu", [f"c{i}"], [f"t{i}"])
        return nodes + wn + bn + [conv, relu], inits + wi + bi, f"t{i}"
    return step


def _int8_matmul(k: int, n_out: int):
    def step(i, x, rng):
        nodes, inits, x = _qdq(x, i, 0.05)
        rows, cols = (k, n_out) if i % 2 == 0 else (n_out, k)
        wn, wi = _int8_weight(f"w{i}", _rand(rng, cols, rows, scale=rows ** -0.5))
        bn, bi = _int32_bias(f"b{i}", _rand(rng, cols, scale=0.1),
                             onnx.numpy_helper.to_array(wi[1]) * 0.05)
        gemm = helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"t{i}"], transB=1)
        return nodes + wn + bn + [gemm], inits + wi + bi, f"t{i}"
    return step


def _dynamic_matmul(k: int, n_out: int):
    """com.microsoft DynamicQuantizeMatMul (what quantize-int8-dynamic writes): the
    float input quantized at run time, int8 per-column weights, a float bias."""
    def step(i, x, rng):
        rows, cols = (k, n_out) if i % 2 == 0 else (n_out, k)
        w = _rand(rng, rows, cols, scale=rows ** -0.5)
        scale = np.abs(w).max(0) / 127 + 1e-12
        inits = [numpy_helper.from_array(np.round(w / scale).astype(np.int8), f"w{i}"),
                 numpy_helper.from_array(scale.astype(np.float32), f"s{i}"),
                 numpy_helper.from_array(np.zeros(cols, np.int8), f"z{i}"),
                 numpy_helper.from_array(_rand(rng, cols, scale=0.1), f"b{i}")]
        node = helper.make_node("DynamicQuantizeMatMul", [x, f"w{i}", f"s{i}", f"z{i}",
                                                          f"b{i}"], [f"t{i}"],
                                domain=MICROSOFT)
        return [node], inits, f"t{i}"
    return step


def _alternating(rows: int, k: int, n_out: int):
    return lambda n: [rows, k if n % 2 == 0 else n_out]


def _single_conv(c_in: int, c_out: int, hw: int, batch: int, int8: bool):
    """One 3x3 convolution and Relu (a network's first layer, a pruned layer), float or
    int8 in the QDQ form graphopt writes (Relu then a zero-point-0 Quantize after it);
    not a chain: its input and output channel counts may differ."""
    def build(n: int):
        rng = np.random.default_rng(0)
        w = _rand(rng, c_out, c_in, 3, 3, scale=(9 * c_in) ** -0.5)
        bias = _rand(rng, c_out, scale=0.1)
        attrs = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        if not int8:  # as graphopt's fusion writes it (ORT fuses Conv + Relu alike)
            inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")]
            nodes = [helper.make_node("FusedConv", ["x", "w", "b"], ["y"], domain=MICROSOFT,
                                      activation="Relu", **attrs)]
        else:
            nodes, inits, x = _qdq("x", 0, 0.05)
            wn, wi = _int8_weight("w", w)
            bn, bi = _int32_bias("b", bias, onnx.numpy_helper.to_array(wi[1]) * 0.05)
            out, out_inits, last = _qdq("r", 1, 0.05, 0)
            nodes += wn + bn + [helper.make_node("Conv", [x, "w", "b"], ["c"], **attrs),
                                helper.make_node("Relu", ["c"], ["r"])] + out
            inits += wi + bi + out_inits
            _rename_output(nodes, last)
        shape = [batch, c_in, hw, hw]
        model = _model(nodes, [_float("x", shape)], [_float("y", [batch, c_out, hw, hw])],
                       inits, ms=not int8)
        return model, {"x": _rand(rng, *shape)}
    return build


def _reorder(kind: str, shape):
    """ONNX Runtime's reorder of a tensor of ``shape`` into its channel-blocked layout
    (NCHWc; ``ReorderInput``) or back (``ReorderOutput``), alone: what a session adds
    where a tensor changes layout (``runtime_rules.layout_reorders``; measured here: 198 us for
    [256, 32, 8, 8] out of the layout, about as long as the 1-channel first-layer
    convolution that writes it)."""
    def build(n: int):
        attrs = {"channels": shape[1]} if kind == "ReorderOutput" else {}
        node = helper.make_node(kind, ["x"], ["y"], domain=NCHWC, **attrs)
        graph = helper.make_graph([node], "reorder", [_float("x", shape)],
                                  [_float("y", shape)])
        model = helper.make_model(graph, opset_imports=[
            helper.make_opsetid("", OPSET), helper.make_opsetid(NCHWC, 1)], ir_version=8)
        return model, {"x": _rand(np.random.default_rng(0), *shape)}
    return build


def _global_pool(channels: int, hw: int, batch: int):
    def build(n: int):
        rng = np.random.default_rng(0)
        shape = [batch, channels, hw, hw]
        model = _model([helper.make_node("GlobalAveragePool", ["x"], ["y"])],
                       [_float("x", shape)], [_float("y", [batch, channels, 1, 1])], [])
        return model, {"x": _rand(rng, *shape)}
    return build


def cache_probes(rows: int = 128, k: int = 384,
                 lengths: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128)) -> list[Probe]:
    """Chains of one matrix product (``rows`` x ``k`` x ``k``, 590 KB of weights each by
    default) at each of ``lengths``: where their weights outgrow the cache, each product
    runs slower (``cost_calibration.Calibration.cache_bytes``)."""
    return [Probe(f"Weights-{length * k * k * 4 / 2 ** 20:.1f}MiB", _chain(
        [rows, k], _matmul(k, k)), length=length, measures="cache") for length in lengths]


def suite(quick: bool = False, blocked_layout: bool = False) -> list[Probe]:
    """The probes, cheapest first (each probe's fit may use the ones before it). ``quick``:
    one or two shapes per op family, for tests and a first look. ``blocked_layout``: the
    runtime reorders tensors into and out of a channel-blocked layout
    (``Device.blocked_layout``): its reorders are measured, before the probes whose time
    includes one (a lone first-layer convolution's output is reordered out)."""
    probes = [Probe("overhead", _chain([1], _unary("Neg")), length=33)]
    if not quick:
        # Elementwise ops on a few hundred values (a small transformer's or MLP's): a
        # fixed cost per op well above the one-value overhead probe's, which the large
        # sizes below cannot show (long chains: each copy takes about a microsecond)
        for size in (64, 1024):
            shape = [1, size // 64, 64]
            probes.append(Probe(f"Relu-{size}", _chain(shape, _unary("Relu")), length=17))
            for op in ("Add", "Mul"):
                probes.append(Probe(f"{op}-{size}", _chain(shape, _binary(op, shape)),
                                    length=17))
    # Weights beyond the cache (``measures="cache"``): one product's chains at 1.2 to 75 MB
    # of weights; before every probe with weights, whose time the fit then corrects where
    # its own weights leave the cache
    if not quick:
        probes += cache_probes()
    sizes = (4096, 262144) if quick else (4096, 65536, 1048576)
    unary = ("Relu",) if quick else ("Relu", "Sigmoid", "Tanh", "Erf", "HardSwish")
    for size in sizes:
        shape = [1, size // 64, 64]
        for op in unary:
            probes.append(Probe(f"{op}-{size}", _chain(shape, _unary(op))))
        probes.append(Probe(f"Add-{size}", _chain(shape, _binary("Add", shape))))
        if not quick:
            probes.append(Probe(f"Clip-{size}", _chain(shape, _clip)))
            probes.append(Probe(f"Mul-{size}", _chain(shape, _binary("Mul", shape))))
            probes.append(Probe(f"Gelu-{size}", _chain(shape, _unary("Gelu", MICROSOFT),
                                                       ms=True)))
            probes.append(Probe(f"BiasGelu-{size}", _chain(shape, _bias_gelu(shape[-1]),
                                                           ms=True)))
            probes.append(Probe(f"QuickGelu-{size}", _chain(
                shape, _unary("QuickGelu", MICROSOFT, alpha=1.702), ms=True)))
            probes.append(Probe(f"Silu-{size}", _chain(  # what fuse-silu writes
                shape, _unary("QuickGelu", MICROSOFT, alpha=1.0), ms=True)))
            probes.append(Probe(f"Softmax-{size}", _chain(shape, _unary("Softmax", axis=-1))))
    for rows, hidden in ((64, 128), (128, 384)) if quick else ((64, 128), (128, 384),
                                                               (512, 768)):
        shape = [1, rows, hidden]
        probes.append(Probe(f"LayerNorm-{rows}x{hidden}", _chain(shape, _layer_norm(hidden))))
        probes.append(Probe(f"SkipLayerNorm-{rows}x{hidden}", _with_skip(
            _chain(shape, _skip_layer_norm(hidden), ms=True), shape)))
    if blocked_layout:
        for shape in ([256, 32, 8, 8],) if quick else ([1, 256, 14, 14], [1, 64, 56, 56],
                                                       [16, 16, 32, 32], [256, 32, 8, 8],
                                                       [1, 96, 112, 112]):
            for kind in ("ReorderInput", "ReorderOutput"):
                probes.append(Probe(f"{kind}-{'x'.join(map(str, shape))}",
                                    _reorder(kind, shape), chain=False))
    for shape in ([256, 16, 8, 8],) if quick else ([1, 32, 28, 28], [1, 64, 56, 56],
                                                   [256, 16, 8, 8], [1, 128, 384]):
        probes.append(Probe(f"QuantizeDequantize-{'x'.join(map(str, shape))}", _chain(
            shape, _quantize_step)))
    for channels, hw, batch in ((32, 56, 1),) if quick else ((32, 56, 1), (256, 7, 16),
                                                            (64, 8, 256)):
        shape = [batch, channels, hw, hw]
        probes.append(Probe(f"MaxPool-{channels}x{hw}x{batch}", _chain(
            shape, _unary("MaxPool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]))))
        probes.append(Probe(f"GlobalAveragePool-{channels}x{hw}x{batch}",
                            _global_pool(channels, hw, batch), chain=False))
    convs = ((16, 32, 1), (64, 28, 1), (32, 8, 256)) if quick else (
        (8, 32, 1), (16, 56, 1), (32, 28, 1), (64, 56, 1), (128, 28, 1), (256, 14, 1),
        (512, 7, 1), (32, 8, 1), (64, 4, 1), (32, 8, 256), (64, 4, 256), (16, 32, 16),
        (8, 8, 256), (12, 8, 256), (16, 4, 256), (24, 8, 256))
    for channels, hw, batch in convs:
        shape = [batch, channels, hw, hw]
        tag = f"{channels}x{hw}x{batch}"
        probes.append(Probe(f"Conv3x3-{tag}", _chain(shape, _conv(channels, 3, False, None))))
        probes.append(Probe(f"FusedConv3x3-{tag}", _chain(shape, _conv(channels, 3, False,
                                                                        "Relu"), ms=True)))
        probes.append(Probe(f"Conv1x1-{tag}", _chain(shape, _conv(channels, 1, False, None))))
    # (length 5: the extra copies are two expansions and two projections)
    for channels, hw in ((24, 56),) if quick else ((16, 112), (24, 56), (40, 28), (80, 14),
                                                  (192, 7)):
        expanded = 6 * channels
        probes.append(Probe(f"Conv1x1-{channels}to{expanded}x{hw}", _chain(
            [1, channels, hw, hw], _conv(channels, 1, False, None, expanded),
            out_shape=lambda n, c=channels, e=expanded, hw=hw: [1, c if n % 2 == 0 else e,
                                                               hw, hw]), length=5))
    stems = ((1, 32, 8, 256),) if quick else ((1, 32, 8, 1), (1, 32, 8, 256), (3, 16, 32, 16),
                                             (3, 32, 112, 1))
    for c_in, c_out, hw, batch in stems:
        for int8 in (False, True):
            probes.append(Probe(f"{'Int8' if int8 else ''}StemConv3x3-{c_in}to{c_out}x{hw}x"
                                f"{batch}", _single_conv(c_in, c_out, hw, batch, int8),
                                chain=False, measures="conv"))
    # (a mobile network's first blocks run at 112 x 112: its largest, memory-bound ones)
    depthwise = ((96, 28, 1),) if quick else ((32, 112, 1), (16, 56, 1), (96, 56, 1),
                                              (144, 28, 1), (384, 14, 1), (960, 7, 1),
                                              (64, 8, 16))
    for channels, hw, batch in depthwise:
        probes.append(Probe(f"Depthwise3x3-{channels}x{hw}x{batch}", _chain(
            [batch, channels, hw, hw], _conv(channels, 3, True, None))))
    # (1 x 1024 x 1024: a classifier's matrix-vector product streams 4 MB of weights from
    # beyond the cache, at twice the correction of a compute-bound product)
    gemms = ((16, 256, 256), (128, 384, 384)) if quick else (
        (1, 64, 64), (1, 512, 512), (1, 1024, 1024), (16, 256, 256), (64, 64, 32),
        (128, 384, 384), (128, 384, 1536), (256, 64, 128), (256, 256, 128),
        (256, 1024, 1024))
    for rows, k, n_out in gemms:
        tag = f"{rows}x{k}x{n_out}"
        probes.append(Probe(f"Gemm-{tag}", _chain([rows, k], _matmul(k, n_out),
                                                  out_shape=_alternating(rows, k, n_out))))
    for heads, d in ((4, 32),) if quick else ((4, 32), (12, 32), (12, 64)):
        probes.append(Probe(f"BatchedMatMul-{heads}x128x{d}", _batched_matmul(heads, d)))
    # (heads of 64, 32 and 16: a small transformer's heads of 16 run far from peak)
    for seq, hidden, heads in ((64, 128, 2),) if quick else ((64, 128, 2), (128, 384, 12),
                                                            (128, 768, 12), (128, 64, 4),
                                                            (32, 64, 4)):
        probes.append(Probe(f"Attention-{seq}x{hidden}", _with_mask(_chain(
            [1, seq, hidden], _attention(hidden, heads), ms=True), seq)))
    int8_convs = ((64, 28, 1),) if quick else (
        (32, 28, 1), (64, 56, 1), (128, 28, 1), (32, 8, 256), (64, 4, 256), (256, 14, 1),
        (24, 8, 256))
    for channels, hw, batch in int8_convs:
        probes.append(Probe(f"Int8Conv3x3-{channels}x{hw}x{batch}", _chain(
            [batch, channels, hw, hw], _int8_conv(channels, 3))))
    # Narrow int8 convolutions (pruned layers) one at a time, with their Quantize and
    # Dequantize: chains of them time erratically (a longer chain measured faster than a
    # shorter one), single layers do not.
    narrow = ((16, 16, 8, 256),) if quick else (
        (8, 8, 8, 256), (12, 12, 8, 256), (16, 16, 4, 256), (16, 24, 8, 256),
        (16, 16, 32, 16), (8, 8, 32, 1), (16, 32, 8, 256))
    for c_in, c_out, hw, batch in narrow:
        probes.append(Probe(f"Int8Conv3x3-{c_in}to{c_out}x{hw}x{batch}",
                            _single_conv(c_in, c_out, hw, batch, True), chain=False,
                            measures="conv"))
    int8_gemms = ((128, 384, 384),) if quick else ((16, 256, 256), (128, 384, 384),
                                                   (256, 256, 128), (256, 1024, 1024))
    for rows, k, n_out in int8_gemms:
        probes.append(Probe(f"Int8Gemm-{rows}x{k}x{n_out}", _chain(
            [rows, k], _int8_matmul(k, n_out), out_shape=_alternating(rows, k, n_out))))
        probes.append(Probe(f"DynamicInt8MatMul-{rows}x{k}x{n_out}", _chain(
            [rows, k], _dynamic_matmul(k, n_out), ms=True,
            out_shape=_alternating(rows, k, n_out))))
    return probes
