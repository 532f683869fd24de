"""``decompose-low-rank``: replace a linear layer's weight by low-rank factors.

Sites: every MatMul/Gemm (x·W, W a K×N constant) and every k×k Conv with a constant
weight in the main graph; a site's setting is the fraction of its full rank kept (1.0:
unchanged). MatMul/Gemm become two skinny MatMuls (``passes.lowrank.svd``: whitened SVD
from calibration data, else plain SVD); Convs become Tucker-2 (1×1 → k×k core → 1×1) or
k×1 → 1×k (``passes.lowrank.tucker``). The last factor takes the original node's name,
output tensor and bias, so nothing downstream changes and no tensor is narrowed.

A setting is offered only when it pays: it must save parameters (params after < η ·
params before; for a matrix r < η·K·N/(K+N)), and with ``require_speedup`` and a cost
model, the cost model must predict the factors faster than the original op at the
layer's shapes (unknown dimensions count as 1, as in the cost model). A site with no
such setting is refused with the figures.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.capture import ChannelStats, channel_stats, subset
from graphopt.compression import Applied, CompressionPass, Site, nearest_setting
from graphopt.errors import GraphoptError
from graphopt.ir import Model
from graphopt.pass_infra import PassContext
from graphopt.passes.lowrank import svd, tucker
from graphopt.rewrite import constant_value, remove_dead, tensor_names

METHODS = ("whitened", "svd")
CONV_MODES = ("tucker", "spatial")


@dataclass
class Layer:
    """A candidate node: its site name, kind ("linear", "tucker", "spatial"), weight and
    (when it can be decomposed) its dimensions; or the reason it cannot."""

    site: str
    node: gs.Node
    kind: str
    weight: np.ndarray  # as K×N for linear layers, as stored for convs
    stored: tuple[int, ...]  # the weight's shape in the graph
    refusal: str | None = None

    @property
    def axis(self) -> int:  # channel axis of the input
        return -1 if self.kind == "linear" else 1

    @property
    def full_rank(self) -> int:
        w = self.weight
        if self.kind == "linear":
            return min(w.shape)
        if self.kind == "spatial":
            return tucker.spatial_full_rank(w.shape)
        return int(w.shape[0])

    def ranks(self, ratio: float, multiple: int) -> tuple[int, ...]:
        w = self.weight
        if self.kind == "tucker":
            return (_round(ratio * w.shape[1], w.shape[1], multiple),
                    _round(ratio * w.shape[0], w.shape[0], multiple))
        return (_round(ratio * self.full_rank, self.full_rank, multiple),)

    def factor_shapes(self, ranks: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Shapes of the factors ``rewrite`` takes at ``ranks``."""
        w = self.weight
        if self.kind == "linear":
            (k, n), r = w.shape, ranks[0]
            return [(k, r), (r, n)]
        cout, cin, *kernel = w.shape
        if self.kind == "tucker":
            r1, r2 = ranks
            ones = [1] * len(kernel)
            return [(r1, cin, *ones), (r2, r1, *kernel), (cout, r2, *ones)]
        r, (kh, kw) = ranks[0], kernel
        return [(r, cin, kh, 1), (cout, r, 1, kw)]

    def params(self, ranks: tuple[int, ...] | None) -> int:
        w = self.weight
        if ranks is None:
            return int(w.size)
        if self.kind == "linear":
            return ranks[0] * (w.shape[0] + w.shape[1])
        if self.kind == "spatial":
            cout, cin, kh, kw = w.shape
            return ranks[0] * (cin * kh + cout * kw)
        taps = int(np.prod(w.shape[2:]))
        return tucker.tucker_params(w.shape[1], w.shape[0], taps, *ranks)


def _round(value: float, full: int, multiple: int) -> int:
    """``value`` rounded to a multiple of ``multiple`` (1 for dimensions under two
    multiples), within [1, full]."""
    m = multiple if multiple > 1 and full >= 2 * multiple else 1
    return int(min(max(int(round(value / m)) * m, m), full))


class DecomposeLowRank(CompressionPass):
    """Factor MatMul/Gemm weights (whitened SVD) and Convs (Tucker-2) into low rank."""

    name = "decompose-low-rank"
    family = "lowrank"
    technique = "low-rank"
    scheme = ("low-rank", "svd")
    scheme_order = 20  # after pruning (10), before quantization (90)

    @dataclass(frozen=True)
    class Options:
        rank_ratio: float | None = None  # one fraction of the full rank everywhere
        ratios: tuple[float, ...] = (1.0, 0.75, 0.5, 0.375, 0.25, 0.125)
        min_size: int = 4096  # weights with fewer elements are left alone
        require_speedup: bool = True  # the cost model must predict a gain
        efficiency: float = 1.0  # η: offer ranks with params after < η·params before
        method: str = "whitened"  # or "svd" (data-free)
        conv: str = "tucker"  # or "spatial" (k×1 then 1×k)
        multiple: int = 0  # ranks a multiple of this (0: the device's channel multiple)
        max_batches: int = 64  # calibration batches for the activation Grams

        def __post_init__(self):
            if self.method not in METHODS:
                raise ValueError(f"method must be one of {', '.join(METHODS)}, "
                                 f"got {self.method!r}")
            if self.conv not in CONV_MODES:
                raise ValueError(f"conv must be one of {', '.join(CONV_MODES)}, "
                                 f"got {self.conv!r}")
            if self.rank_ratio is not None and not 0.0 < self.rank_ratio <= 1.0:
                raise ValueError("rank-ratio must be in (0, 1]")
            if not self.ratios or any(not 0.0 < r <= 1.0 for r in self.ratios):
                raise ValueError("ratios must be fractions in (0, 1]")
            if not 0.0 < self.efficiency <= 1.0:
                raise ValueError("efficiency must be in (0, 1]")
            if self.min_size < 0 or self.multiple < 0 or self.max_batches < 1:
                raise ValueError("min-size and multiple must be >= 0, max-batches >= 1")

    def __init__(self, options: Any = None, **kwargs: Any):
        super().__init__(options, **kwargs)
        # Per pass run (the core calls ``sites`` once, then ``apply`` on many clones of
        # the same model): activation statistics by layer input tensor, their whitening
        # factors, and SVDs by weight. ``_run`` identifies the run's model.
        self._run: tuple | None = None
        self._stats: dict[str, ChannelStats] = {}
        self._whiten: dict[tuple[str, int, int], np.ndarray] = {}
        self._factors: dict[tuple, svd.Factorization] = {}

    def _start_run(self, model: Model, fresh: bool) -> None:
        """Forget the cached statistics when a new run starts (``fresh``: ``sites`` was
        called) or when ``model`` is not the run's model (other graph inputs)."""
        key = tuple(t.name for t in model.graph.inputs)
        if fresh or key != self._run:
            self._run = key
            self._stats.clear()
            self._whiten.clear()
            self._factors.clear()

    # ------------------------------------------------------------------ analysis
    def layers(self, model: Model) -> list[Layer]:
        """Every MatMul/Gemm/Conv of the main graph whose weight is a constant."""
        graph = model.graph
        names = Counter(n.name for n in graph.nodes)
        out = []
        for node in graph.nodes:
            if node.op not in ("MatMul", "Gemm", "Conv") or len(node.inputs) < 2:
                continue
            value = constant_value(node.inputs[1])
            if value is None:
                continue
            unique = node.name and names[node.name] == 1
            site = node.name if unique else node.outputs[0].name
            value = np.asarray(value)
            if node.op == "Conv":
                kind = self.options.conv
                refusal = tucker.conv_refusal(node, value.shape, kind)
                weight = value
            else:
                kind = "linear"
                weight, refusal = svd.linear_weight(node, value)
            readers = [n for n in node.inputs[1].outputs]
            if refusal is None and len(readers) > 1:
                refusal = f"weight shared by {len(readers)} nodes"
            if refusal is None and value.size < self.options.min_size:
                refusal = f"weight has {value.size} elements (< min-size " \
                          f"{self.options.min_size})"
            out.append(Layer(site, node, kind, weight, value.shape, refusal))
        return out

    def _multiple(self, ctx: PassContext) -> int:
        if self.options.multiple:
            return self.options.multiple
        return int(getattr(ctx.device, "channel_multiple", 1) or 1) if ctx.device else 1

    def _candidates(self) -> list[float]:
        ratios = set(self.options.ratios) | {1.0}
        if self.options.rank_ratio is not None:
            ratios.add(self.options.rank_ratio)
        return sorted(ratios, reverse=True)

    # ------------------------------------------------------------------ contract
    def sites(self, model: Model, ctx: PassContext) -> list[Site]:
        self._start_run(model, fresh=True)
        probe = _with_shapes(model)
        layers = self.layers(probe)
        multiple = self._multiple(ctx)
        check_speed = self.options.require_speedup and ctx.cost_model is not None \
            and ctx.device is not None
        out = []
        for layer in layers:
            nodes = (layer.node.name,)
            if layer.refusal is not None:
                size = layer.full_rank if layer.weight.size else None
                out.append(Site(layer.site, "rank", (1.0,), nodes, size, layer.refusal))
                continue
            before = layer.params(None)
            t0 = predicted_latency(ctx, layer, None) if check_speed else None
            settings, ranks, timing = [1.0], {1.0: layer.ranks(1.0, multiple)}, {}
            seen, fastest = {ranks[1.0]}, None
            for ratio in self._candidates()[1:]:
                r = layer.ranks(ratio, multiple)
                if r in seen or layer.params(r) >= self.options.efficiency * before:
                    continue
                seen.add(r)
                if check_speed:
                    t = predicted_latency(ctx, layer, r)
                    timing[ratio] = t
                    if fastest is None or t < fastest[1]:
                        fastest = (r, t)
                    if t >= t0:
                        continue
                settings.append(ratio)
                ranks[ratio] = r
            info = {"op": layer.node.op, "kind": layer.kind, "weight": list(layer.weight.shape),
                    "ranks": ranks, "params": before}
            if check_speed:
                info["predicted_s"] = {"original": t0, **timing}
            refusal = None
            if len(settings) == 1:
                refusal = self._no_gain(layer, multiple, t0, fastest)
            out.append(Site(layer.site, "rank", tuple(settings), nodes, layer.full_rank,
                            refusal, info))
        usable = [layer for layer, s in zip(layers, out) if s.refused is None]
        if self.options.method == "whitened" and ctx.calibration and usable:
            self._capture(probe, usable, ctx)
        return out

    def _no_gain(self, layer: Layer, multiple: int, t0, fastest) -> str:
        eta = self.options.efficiency
        if fastest is None:
            w = layer.weight
            if layer.kind == "linear":
                k, n = w.shape
                return (f"no rank saves parameters: break-even rank η·K·N/(K+N) = "
                        f"{eta * k * n / (k + n):.1f} for {k}x{n} (η = {eta}), smallest "
                        f"rank offered {layer.ranks(min(self.options.ratios), multiple)[0]}")
            return (f"no rank saves parameters (η = {eta}): {layer.params(None)} weights "
                    f"as one {layer.node.op}")
        return (f"no speedup predicted: {t0 * 1e6:.2f} µs as one {layer.node.op}, "
                f"{fastest[1] * 1e6:.2f} µs at best decomposed (rank "
                f"{'x'.join(map(str, fastest[0]))})")

    def fixed_choice(self, sites: list[Site]) -> dict[str, Any] | None:
        """With ``rank_ratio``: every site at its setting nearest to it (``rank_ratio``
        itself when it pays at that site: it is among the candidates)."""
        ratio = self.options.rank_ratio
        if ratio is None:
            return None
        return {s.name: nearest_setting(s, ratio) for s in sites if s.refused is None}

    def apply(self, model: Model, choice: Mapping[str, Any], ctx: PassContext) -> Applied:
        """Decompose each site of ``choice`` at its ratio (1.0: unchanged). Stats per site:
        rank, params_before/after, full_rank, method ("whitened" on the calibration data,
        else "svd") with ``data`` saying which, and the relative error the method
        minimizes (output error on the calibration data when whitened, the weight's
        Frobenius error when not)."""
        self._start_run(model, fresh=False)
        layers = {layer.site: layer for layer in self.layers(model)}
        multiple = self._multiple(ctx)
        chosen, stats = [], {}
        for name, ratio in choice.items():
            layer = layers.get(name)
            if layer is None:
                raise ValueError(f"{self.name}: no site {name!r} in the model")
            if not 0.0 < float(ratio) <= 1.0:
                raise ValueError(f"{self.name}: site {name!r}: ratio {ratio} not in (0, 1]")
            if float(ratio) < 1.0 and layer.refusal is not None:
                # refused now, not when the sites were listed: a pass before this one
                # in a joint search narrowed it (pruning), so it is left as it is
                stats[name] = {"ratio": 1.0, "skipped": layer.refusal}
            elif float(ratio) < 1.0:
                chosen.append((layer, float(ratio)))
        whitened = self.options.method == "whitened" and bool(ctx.calibration)
        if whitened:
            self._capture(model, [layer for layer, _ in chosen], ctx)
        method = "whitened" if whitened else "svd"
        data = "calibration" if whitened else \
            ("none: no calibration data" if self.options.method == "whitened" else
             "not used (method svd)")
        taken = tensor_names(model.all_graphs())
        node_names = {n.name for g in model.all_graphs() for n in g.nodes}
        for layer, ratio in chosen:
            s = self._whitening(layer) if whitened else None
            rows = self._stats[layer.node.inputs[0].name].count if whitened else 0
            entry = self._decompose(model, layer, layer.ranks(ratio, multiple), s, taken,
                                    node_names)
            entry.update({"ratio": ratio, "method": method, "data": data, "rows": rows})
            stats[layer.site] = entry
        return Applied(stats, {})

    # ------------------------------------------------------------------ editing
    def _decompose(self, model: Model, layer: Layer, ranks: tuple[int, ...], s,
                   taken: set[str], node_names: set[str]) -> dict:
        graph, node, w = model.graph, layer.node, layer.weight
        producer = node.inputs[1].inputs[0] if node.inputs[1].inputs else None
        if layer.kind == "linear":
            f = self._factorization(layer, s)
            factors = f.factors(ranks[0])
            ranks = (factors[0].shape[1],)
            error = f.error(ranks[0])
        elif layer.kind == "tucker":
            factors = tucker.tucker2(w, ranks[0], ranks[1], s)
            error = tucker.relative_error(w, tucker.tucker_product(*factors), s)
        else:
            factors = tucker.spatial(w, ranks[0], s)
            error = tucker.relative_error(w, tucker.spatial_product(*factors), s)
        rewrite(graph, layer.kind, node, factors, taken, node_names)
        if producer is not None:  # a Constant node the weight came from
            remove_dead([producer], graph)
        return {"rank": ranks[0] if len(ranks) == 1 else list(ranks),
                "params_before": layer.params(None), "params_after": layer.params(ranks),
                "full_rank": layer.full_rank, "weight": list(w.shape),
                "error": round(float(error), 6)}

    def _factorization(self, layer: Layer, s: np.ndarray | None) -> svd.Factorization:
        key = (layer.site, _digest(layer.weight), None if s is None else _digest(s))
        if key not in self._factors:
            self._factors[key] = svd.factorize(layer.weight, s)
        return self._factors[key]

    # ------------------------------------------------------------------ data
    def _capture(self, model: Model, layers: list[Layer], ctx: PassContext) -> None:
        """Channel Grams of the inputs of ``layers`` not captured yet (or captured at
        another width), over the calibration data."""
        want = {}
        for layer in layers:
            x = layer.node.inputs[0].name
            have = self._stats.get(x)
            if have is None or have.gram is None or len(have.gram) != _in_channels(layer):
                want[x] = layer.axis
        if want:
            data = subset(ctx.calibration, self.options.max_batches)
            self._stats.update(channel_stats(model.to_onnx(), want, data, gram=True))

    def _whitening(self, layer: Layer) -> np.ndarray:
        name = layer.node.inputs[0].name
        st = self._stats[name]
        key = (name, st.count, len(st.gram))
        if key not in self._whiten:
            self._whiten[key] = svd.whitening(st.gram, st.count)
        return self._whiten[key]


def _in_channels(layer: Layer) -> int:
    return int(layer.weight.shape[0] if layer.kind == "linear" else layer.weight.shape[1])


def _digest(a: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=12).hexdigest()


def _with_shapes(model: Model) -> Model:
    """``model`` itself when its layer inputs/outputs have shapes, else a shape-inferred
    copy (same names); the model as is when inference fails (shapes stay unknown)."""
    known = all(t.shape is not None for n in model.graph.nodes
                if n.op in ("MatMul", "Gemm", "Conv") for t in (n.inputs[0], n.outputs[0]))
    if known:
        return model
    probe = model.clone()
    try:
        probe.infer_shapes()
    except GraphoptError:
        return model
    return probe


def rewrite(graph: gs.Graph, kind: str, node: gs.Node, factors, taken: set[str],
            node_names: set[str]) -> list[gs.Node]:
    """Replace ``node`` by the factors of a ``kind`` ("linear", "tucker", "spatial")
    decomposition; the last factor is ``node`` itself (name, output, bias). Returns the
    new nodes."""
    if kind == "linear":
        return [svd.decompose_linear(graph, node, *factors, taken, node_names)]
    if kind == "tucker":
        return tucker.decompose_tucker(graph, node, *factors, taken, node_names)
    return tucker.decompose_spatial(graph, node, *factors, taken, node_names)


# ============================================================================ cost
def predicted_latency(ctx: PassContext, layer: Layer, ranks: tuple[int, ...] | None) -> float:
    """The cost model's latency of ``layer`` as one op (``ranks`` None) or decomposed at
    ``ranks`` (the graph ``apply`` writes, factors as zeros), at the shapes of its input
    and output (unknown dimensions count as 1, as everywhere in the cost model)."""
    node = layer.node
    x0, y0 = node.inputs[0], node.outputs[0]
    dtype = np.dtype(x0.dtype) if x0.dtype is not None else np.dtype(np.float32)
    x, y = gs.Variable("x", dtype, x0.shape), gs.Variable("y", dtype, y0.shape)
    extra = [gs.Variable(f"input{i}", dtype, t.shape) if t.name else t
             for i, t in enumerate(node.inputs[2:], start=2)]
    weight = gs.Constant("w", np.zeros(layer.stored, dtype=layer.weight.dtype))
    scratch = gs.Node(node.op, name="layer", inputs=[x, weight, *extra], outputs=[y],
                      attrs=dict(node.attrs))
    graph = gs.Graph(nodes=[scratch], inputs=[x], outputs=[y])
    if ranks is not None:
        factors = [np.zeros(shape, dtype=layer.weight.dtype)
                   for shape in layer.factor_shapes(ranks)]
        rewrite(graph, layer.kind, scratch, factors, {"x", "y", "w"}, {"layer"})
    cost = ctx.cost_model.estimate(Model(graph=graph), ctx.device, infer=False)
    return float(cost.latency_s)
