"""Int8 quantization under an accuracy budget: ``quantize-int8`` (static, QDQ) and
``quantize-int8-dynamic`` (activations quantized at run time), clients of the
budgeted-compression contract (``graphopt.compression``).

What the passes say:

1. **Sites.** Candidate nodes (Conv/MatMul/Gemm with a constant weight, embedding
   Gathers of large constant tables), each with the settings ``float`` and ``int8``;
   nodes in the ``exclude`` list, or that cannot be quantized, are refused sites with the
   reason, and so is a compute site whose int8 form the target's cost model says does not
   pay off (``require-speedup``: roofline time at the device's int8 peak plus the
   activation quantization it needs, against its float32 time), or, on a target that
   times layers on its own kernels (``Target.int8_layer_costs``: litert), whose int8
   form measured there is slower than its float one by more than ``MEASURED_NOISE``.
   Embedding tables are quantized for size (rows are dequantized after the gather: next
   to no time).
2. **Savings** from that cost model per layer (and bytes of the weights), so no model
   is built to cost a site.
3. **Calibration** (static) on ``ctx.calibration``; without data, random probe inputs
   with a loud warning, and the accuracy is reported as unmeasured.
4. **Damages** of every site alone from one ONNX Runtime session of a "switchboard" model
   (``graphopt.switchboard``: each site is an If on a boolean input): one session and N
   runs of the data, not N model builds.

``full-integer`` (static): once the layers are chosen, the outputs of the Adds, Muls,
Concats and global average pools that read quantized values, and of the quantized
Gemm/MatMul layers, are quantized too, and kept if the budget still holds (a
full-integer runtime then runs them on int8).

The core does the rest (``graphopt.compression_driver``): every paying site quantized at
once is measured first (``optimistic``: usually it meets the budget and no site needs
measuring alone); otherwise sites are kept float by damage per unit saved until the
budget holds. Candidates are measured on the batches the pass manager checks (so it takes
the outputs measured) with ONNX Runtime's fused int8 kernels as well as the graph as
written where ORT runs the result (the worse counts), with the run's one metric and, when
asked, a top-1 agreement floor (``min-top1``). ``measure`` then times ORT with and without
each quantized op type and keeps the fastest variant that meets the budget.

Placement of ``quantize-int8`` follows ONNX Runtime's QDQ selectors, so ORT fuses it:
DQ(x), DQ(w), DQ(int32 bias) -> Conv -> [Relu/Clip] -> Q becomes QLinearConv (the Relu
is dropped when the Q's zero point is 0); DQ -> MatMul becomes MatMulIntegerToFloat (or
QLinearMatMul when its output is itself quantized); DQ -> Gemm becomes QGemm. A tensor
read by several quantized nodes gets one Q/DQ pair, all its readers read the DQ, and a
MaxPool/Reshape/Flatten/... between quantized nodes reuses its input's parameters, so
ORT drops the pair around it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import switchboard, verify
from graphopt.accuracy import median_latency, run_all, session
from graphopt.capture import subset
from graphopt.compression import Applied, CompressionPass, Saving, Site
from graphopt.compression_driver import Driver
from graphopt.cost_calibration import static_model
from graphopt.errors import GraphoptError
from graphopt.ir import Model
from graphopt.pass_infra import PassContext, PassResult
from graphopt.passes.quantize._int8 import (as_conv, full_integer_output, group_output,
                                            quantize_attention, quantize_dynamic,
                                            quantize_full_integer, quantize_static,
                                            unfuse_conv, unsupported, weight_axis)
from graphopt.passes.quantize.smoothquant import SmoothQuant
from graphopt.qdq import METHODS, QdqWriter, choose_range, collect_stats, resolve_weight
from graphopt.rewrite import constant_value, remove_dead

EMBEDDING_MIN_ELEMENTS = 1 << 16
# A layer's float and int8 times measured on the target (``Target.int8_layer_costs``)
# move by this much from run to run: int8 within it of float counts as no slower (its
# weights are a quarter the size), so a layer near the line does not flip between runs.
MEASURED_NOISE = 0.1
SETTINGS = ("float", "int8")


@dataclass
class _Layer:
    """A node that can be quantized, with what the cost model says of it."""

    name: str
    op: str
    kind: str  # "compute" or "embedding"
    size: int = 0  # elements of its weight
    bytes_saved: int = 0  # of the weights as stored, float32 -> int8 plus scales
    float_s: float | None = None
    int8_s: float | None = None
    measured: bool = False  # the times are the target's own, measured (not estimated)


@dataclass
class _Plan:
    """What a pass run found before building candidates (shared by every build)."""

    sites: dict[str, _Layer]
    skipped: dict[str, str] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    reduce_range: bool = False
    already: int = 0  # nodes already quantized (not sites)


class _Int8Pass(CompressionPass):
    family = "quantization"
    technique = "int8"
    joinable = False  # it quantizes the fused graph, after the structural passes
    recoverable = False  # a float re-fit cannot move int8 weights
    optimistic = True
    measures_check_feeds = True
    dynamic = False
    evaluate_modes: tuple[bool, ...] = (True, False)
    variants = {"smoothed": {"smooth": True}}

    # ------------------------------------------------------------------ the contract
    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if model.opset < 13:
            return PassResult(False, {"compression": {
                "technique": self.technique, "reason": f"opset {model.opset} < 13: per-axis "
                                                       "DequantizeLinear needs opset 13"}})
        work = model.clone()  # ``model`` changes only if a candidate is kept
        smoothed = SmoothQuant().run(work, ctx).stats if self.options.smooth else None
        _name_nodes(work.graph)  # sites are addressed (and reported) by node name
        self._ctx = ctx
        self._plan = _Plan(sites={}, reduce_range=_reduce_range(self.options.reduce_range, ctx))
        driver = Driver(self, ctx)
        result = driver.run(work)
        info = result.stats["compression"]
        info["reduce_range"] = self._plan.reduce_range
        if smoothed is not None:
            info["smooth_quant"] = smoothed
        if result.changed and self.options.measure:
            result = self._measure(work, driver, result)
        if result.changed and getattr(self.options, "full_integer", False):
            result = self._full_integer(work, driver, result)
        if result.changed:
            model.graph = work.graph
        return result

    def search_goal(self, ctx: PassContext) -> str:
        return "size" if ctx.goal == "size" else "latency"  # int8 saves no FLOPs

    def evaluation_modes(self, ctx: PassContext) -> tuple[bool, ...]:
        return self.evaluate_modes if _runs_ort(ctx) else (False,)

    def min_top1(self, ctx: PassContext) -> float | None:
        return self.options.min_top1

    def sites(self, model: Model, ctx: PassContext) -> list[Site]:
        plan = self._plan
        self._find_sites(model, plan)
        self._filter_by_cost(model, ctx, plan)
        out = [Site(name, "embedding" if layer.kind == "embedding" else layer.op, SETTINGS,
                    (name,), layer.size) for name, layer in plan.sites.items()]
        out += [Site(name, "layer", SETTINGS, (name,), refused=why)
                for name, why in plan.skipped.items()]
        if plan.sites:
            self._base = self._prepare(model.to_onnx(), plan)
            calibration = self._data(ctx, self._base)
            self._calibrate(self._base, plan, calibration)
        return out

    def not_sites(self) -> dict[str, int]:
        return {"already quantized": self._plan.already} if self._plan.already else {}

    def savings(self, model: Model, sites: list[Site], ctx: PassContext
                ) -> dict[tuple[str, Any], Saving]:
        out = {}
        for site in sites:
            layer = self._plan.sites[site.name]
            seconds = layer.float_s - layer.int8_s if layer.float_s is not None else 0.0
            if not self.options.require_speedup or layer.measured:
                # told to quantize for size regardless, or no slower within the noise
                seconds = max(seconds, 0.0)
            out[(site.name, "int8")] = Saving(seconds=seconds, bytes=layer.bytes_saved)
        return out

    def apply(self, model: Model, choice: Mapping[str, Any], ctx: PassContext) -> Applied:
        chosen = {name for name, setting in choice.items() if setting == "int8"}
        self._unfuse(model, self._plan)
        self._quantize(model, self._plan, chosen)
        stats: dict = {"quantized": len(chosen)}
        if self.dynamic:
            stats["form"] = self._form
        return Applied(stats)

    def damages(self, model: Model, sites: list[Site], data: list, score
                ) -> dict[tuple[str, Any], float]:
        """Each site alone, from one session of a switchboard model (an If per site)."""
        plan, names = self._plan, [s.name for s in sites]
        proto, flags = switchboard.build(self._base, names,
                                         lambda w, n: self._quantize_site(w, n, plan))
        sess = session(proto, optimize=True)
        out = {}
        for done, name in enumerate(names):
            self._ctx.step(f"{self.name}: sensitivity of each layer", done, len(names))
            out[(name, "int8")] = score(run_all(sess, [switchboard.feeds_with(flags, name, f)
                                                       for f in data]))
        return out

    # ------------------------------------------------------------------ data
    def _data(self, ctx: PassContext, proto: onnx.ModelProto) -> list:
        if ctx.calibration:
            return subset(ctx.calibration, self.options.max_batches)
        ctx.logger.warning(
            "%s: NO CALIBRATION DATA: calibrating and checking accuracy on random probe "
            "inputs, so the accuracy of the quantized model is UNMEASURED; give real "
            "inputs (--calibration-data)", self.name)
        return verify.probe_inputs(proto, count=8, seed=ctx.seed)

    # ------------------------------------------------------------------ sites and cost
    def _find_sites(self, model: Model, plan: _Plan) -> None:
        opts = self.options
        for node in model.graph.nodes:
            if node.op == "Gather" and opts.embeddings:
                table = constant_value(node.inputs[0])
                if table is not None and table.dtype == np.float32 and table.ndim == 2 \
                        and table.size >= EMBEDDING_MIN_ELEMENTS and node.attrs.get("axis", 0) == 0:
                    if _excluded(node, opts.exclude):
                        plan.skipped[node.name] = "excluded"
                    else:
                        plan.sites[node.name] = _Layer(node.name, node.op, "embedding",
                                                       table.size, _saved(table, 0))
                continue
            if as_conv(node) not in opts.ops:
                continue
            why = unsupported(node, self.dynamic, getattr(self, "_form", "onnx"))
            if why is None and _excluded(node, opts.exclude):
                why = "excluded"
            if why is None:
                plan.sites[node.name] = self._layer(node)
            elif why == "already quantized":
                plan.already += 1
            else:
                plan.skipped[node.name] = why

    def _layer(self, node: gs.Node) -> _Layer:
        if node.op == "Attention":  # packed QKV weights, per output channel
            value = constant_value(node.inputs[1])
            axis = 1
        else:
            value = resolve_weight(node.inputs[1])
            axis = weight_axis(node, value)
        return _Layer(node.name, node.op, "compute", int(value.size),
                      _saved(value, axis if self.options.per_channel else None))

    def _filter_by_cost(self, model: Model, ctx: PassContext, plan: _Plan) -> None:
        device, cost_model = ctx.device, ctx.cost_model
        if device is None or cost_model is None:
            return
        # Costed at the inputs' shapes where known (a batch of 256 is not a batch of 1)
        shaped, where = model, ""
        if ctx.input_shapes:
            try:
                shaped = static_model(model.to_onnx(references=True), ctx.input_shapes)
                where = f" at inputs {ctx.input_shapes}"
            except GraphoptError:
                pass  # shapes as the graph has them
        nodes = {n.name: n for n in shaped.graph.nodes}
        target = ctx.target
        for name, site in list(plan.sites.items()):
            if site.kind != "compute":
                continue
            node = nodes[name]
            # the target's own kernels timed, where it can (static int8 only)
            measured = None if self.dynamic or target is None else \
                target.int8_layer_costs(node)
            if measured is not None:
                site.float_s, site.int8_s = measured
                site.measured = True
                how = f"measured in {target.name} here, the layer alone: {{}} us int8 vs"
            else:
                site.float_s = cost_model.node_cost(node, device).latency_s
                site.int8_s = cost_model.int8_latency(node, device, self.dynamic)
                how = "est. {} us int8 (with activation quantization) vs"
            limit = site.float_s * (1 + MEASURED_NOISE) if site.measured else site.float_s
            if self.options.require_speedup and site.int8_s >= limit:
                plan.skipped[name] = (f"int8 does not pay off on {device.name}{where}: "
                                      f"{how.format(f'{site.int8_s * 1e6:.2f}')} "
                                      f"{site.float_s * 1e6:.2f} us float")
                del plan.sites[name]

    def _prepare(self, base: onnx.ModelProto, plan: _Plan) -> onnx.ModelProto:
        """The float model calibrated and switched on: see ``_unfuse``."""
        work = Model.from_proto(base)
        self._unfuse(work, plan)
        return work.to_onnx()

    def _unfuse(self, model: Model, plan: _Plan) -> None:
        """FusedConv sites split back into Conv + activation (the pattern ORT's QDQ
        fusion matches; ORT fuses the ones left float again)."""
        fused = {n for n, layer in plan.sites.items() if layer.op == "FusedConv"}
        if fused:
            writer = QdqWriter(model)
            for node in list(model.graph.nodes):
                if node.name in fused:
                    unfuse_conv(writer, node)

    # ------------------------------------------------------------------ measuring
    def _measure(self, work: Model, driver: Driver, result: PassResult) -> PassResult:
        """Time ORT with every chosen site, without each quantized op type, and float;
        keep the fastest that meets the budget."""
        info = result.stats["compression"]
        plan = self._plan
        chosen = [n for n, e in info["sites"].items() if e["changed"]]
        ops = sorted({plan.sites[n].op for n in chosen})
        variants = [("float", self._base, []), ("all", work.to_onnx(), chosen)]
        if len(ops) > 1:
            for op in ops:
                keep = [n for n in chosen if plan.sites[n].op != op]
                variants.append((f"without {op}", self._build(self._base, plan, set(keep)),
                                 keep))
        times = median_latency([v[1] for v in variants], driver.data[0])
        timing: dict = {"ms": {label: round(t * 1e3, 4)
                               for (label, _, _), t in zip(variants, times)}}
        info["timing"] = timing
        for _, i in sorted(zip(times, range(len(variants)))):
            label, proto, names = variants[i]
            if label in ("float", "all") or driver.meets_budget(proto):
                timing["kept"] = label
                break
        if timing["kept"] == "all":
            return result
        for name in set(chosen) - set(names):
            info["sites"][name].update(changed=False, setting="float")
        if label == "float":
            info["reason"] = "int8 measured slower than float here"
            return PassResult(False, result.stats)
        work.graph = Model.from_proto(proto).graph
        return PassResult(True, result.stats)

    def _full_integer(self, work: Model, driver: Driver, result: PassResult) -> PassResult:
        """The chosen layers with ``full-integer``'s outputs quantized too, kept when the
        budget still holds: their damage is not in the search's (it depends on which
        layers are int8 around them), and a transformer's products and residual sums,
        per tensor, often break it where a CNN's do not."""
        info = result.stats["compression"]
        chosen = {n for n, e in info["sites"].items() if e["changed"]}
        proto = self._build(self._base, self._plan, chosen, full=True)
        before = sum(n.op == "QuantizeLinear" for n in work.graph.nodes)
        outputs = sum(n.op_type == "QuantizeLinear" for n in proto.graph.node) - before
        if outputs <= 0:
            info["full_integer"] = {"outputs": 0, "kept": False}
            return result
        ok, score, top1 = driver.judge(proto)
        info["full_integer"] = {"outputs": outputs, "kept": ok, "score": round(score, 6)}
        if not ok:
            return result
        info["score"] = round(score, 6)
        if top1 is not None:
            info["top1_agreement"] = round(top1, 6)
        work.graph = Model.from_proto(proto).graph
        return PassResult(True, result.stats)

    # ------------------------------------------------------------------ building
    def _build(self, base: onnx.ModelProto, plan: _Plan, chosen: set[str],
               full: bool = False) -> onnx.ModelProto:
        """``base`` (prepared) with the ``chosen`` sites quantized (``full``: and
        ``full-integer``'s outputs)."""
        model = Model.from_proto(base)
        self._quantize(model, plan, chosen, full)
        return model.to_onnx()

    def _quantize(self, model: Model, plan: _Plan, chosen: set[str],
                  full: bool = False) -> None:
        """The ``chosen`` sites quantized in ``model`` (the search's candidates: those
        alone); ``full``: ``full-integer``'s outputs too (``_full_integer``)."""
        writer = QdqWriter(model)
        dead: list[gs.Node] = []
        for node in list(model.graph.nodes):  # in order: a node's inputs are done first
            if node.name not in chosen:
                if full:
                    self._quantize_output(writer, node, plan)
                continue
            producer = node.inputs[1].inputs[0] if node.inputs[1].inputs else None
            self._quantize_site(writer, node, plan)
            if full and node.op in ("Gemm", "MatMul"):
                self._quantize_output(writer, node, plan)
            if producer is not None:
                dead.append(producer)
        remove_dead(dead, model.graph)
        if self.dynamic and self._form != "onnx":
            model.require_opset("com.microsoft", 1)

    def _quantize_site(self, writer: QdqWriter, node: gs.Node, plan: _Plan) -> None:
        if node.op == "Gather":
            writer.embedding(node, constant_value(node.inputs[0]), False)
        else:
            self._quantize_node(writer, node, plan)

    def _quantize_node(self, writer: QdqWriter, node: gs.Node, plan: _Plan) -> None:
        raise NotImplementedError

    def _quantize_output(self, writer: QdqWriter, node: gs.Node, plan: _Plan) -> None:
        pass  # static only: ``full-integer``


# ============================================================================ static
class QuantizeInt8(_Int8Pass):
    """Static int8 quantization (QDQ): per-channel weights, calibrated per-tensor
    activations, under the accuracy budget."""

    name = "quantize-int8"
    scheme = ("quantize", "int8")
    scheme_order = 90  # after pruning and low-rank: quantize what is left
    emits = (("", "QuantizeLinear"), ("", "DequantizeLinear"))

    @dataclass(frozen=True)
    class Options:
        method: str = "minmax"  # minmax, percentile, entropy, mse
        percentile: float = 99.999
        symmetric_activations: bool = False
        per_channel: bool = True
        reduce_range: str = "auto"  # auto: 7 bits where ORT runs int8 with no dot product
        ops: tuple[str, ...] = ("Conv", "MatMul", "Gemm")
        exclude: tuple[str, ...] = ()  # node names or fnmatch patterns
        embeddings: bool = True
        min_top1: float | None = None
        require_speedup: bool = True
        measure: bool = False
        max_batches: int = 256
        # SmoothQuant first (``smooth-quant``: activation outliers moved into the weights,
        # exact in real arithmetic) on the calibration data
        smooth: bool = False
        # Also quantize, at their calibrated ranges, the outputs of Add/Mul/Concat/global
        # average pools reading quantized values and of the quantized Gemm/MatMul layers: a
        # full-integer runtime (LiteRT, TFLite Micro, an NPU) then runs them on int8 and
        # the model's head writes int8, not float between DEQUANTIZE and QUANTIZE.
        full_integer: bool = False

        def __post_init__(self):
            if self.method not in METHODS:
                raise ValueError(f"method must be one of {', '.join(METHODS)}")
            _check_common(self)

    def _calibrate(self, base: onnx.ModelProto, plan: _Plan, data: list) -> None:
        model = Model.from_proto(base)
        nodes = {n.name: n for n in model.graph.nodes}
        names = []
        for name, site in plan.sites.items():
            if site.kind != "compute":
                continue
            node = nodes[name]
            names.append(node.inputs[0].name)
            if node.op == "Conv":
                names.append(group_output(node, self.options.symmetric_activations).name)
        if self.options.full_integer:
            layers = {name for name, site in plan.sites.items() if site.kind == "compute"}
            for node in model.graph.nodes:
                out = full_integer_output(node, self.options.symmetric_activations)
                if out is not None and (node.op not in ("Gemm", "MatMul") or
                                        node.name in layers):
                    names.append(out.name)
        names = list(dict.fromkeys(names))
        stats = collect_stats(base, names, data, histograms=self.options.method != "minmax")
        for name, s in stats.items():
            plan.ranges[name] = choose_range(s, self.options.method, self.options.percentile,
                                             self.options.symmetric_activations)

    def _quantize_node(self, writer: QdqWriter, node: gs.Node, plan: _Plan) -> None:
        quantize_static(writer, node, plan.ranges, self.options.symmetric_activations,
                        self.options.per_channel, plan.reduce_range)

    def _quantize_output(self, writer: QdqWriter, node: gs.Node, plan: _Plan) -> None:
        quantize_full_integer(writer, node, plan.ranges, self.options.symmetric_activations)


# ============================================================================ dynamic
class QuantizeInt8Dynamic(_Int8Pass):
    """Dynamic int8 quantization of MatMul/Gemm (activations quantized at run time),
    under the accuracy budget."""

    name = "quantize-int8-dynamic"
    scheme = ("quantize", "int8-dynamic")
    scheme_order = 90  # after pruning and low-rank: quantize what is left
    dynamic = True
    evaluate_modes = (True,)  # the int8 kernels run alike with ORT's rewrites on or off

    @dataclass(frozen=True)
    class Options:
        form: str = "auto"  # auto, com.microsoft (DynamicQuantizeMatMul), shared, onnx
        per_channel: bool = True
        reduce_range: str = "auto"
        ops: tuple[str, ...] = ("MatMul", "Gemm", "Attention")  # Attention: com.microsoft
        exclude: tuple[str, ...] = ()
        embeddings: bool = True
        min_top1: float | None = None
        require_speedup: bool = True
        measure: bool = False
        max_batches: int = 256
        # SmoothQuant first (``smooth-quant``: activation outliers moved into the weights,
        # exact in real arithmetic) on the calibration data
        smooth: bool = False

        def __post_init__(self):
            if self.form not in ("auto", "com.microsoft", "shared", "onnx"):
                raise ValueError("form must be auto, com.microsoft, shared or onnx")
            _check_common(self)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        form = self.options.form
        if form == "auto":
            form = "com.microsoft" if ctx.supports("DynamicQuantizeMatMul", "com.microsoft") \
                else "onnx"
        self._form = form
        result = super().run(model, ctx)
        result.stats["compression"]["form"] = form
        return result

    def _calibrate(self, base: onnx.ModelProto, plan: _Plan, data: list) -> None:
        pass  # activations are quantized at run time

    def _quantize_node(self, writer: QdqWriter, node: gs.Node, plan: _Plan) -> None:
        if node.op == "Attention":
            quantize_attention(writer, node, self.options.per_channel, plan.reduce_range)
        else:
            quantize_dynamic(writer, node, self.options.per_channel, plan.reduce_range,
                             self._form)


# ============================================================================ helpers
def _check_common(opts) -> None:
    if opts.reduce_range not in ("auto", "true", "false", True, False):
        raise ValueError("reduce-range must be auto, true or false")


def _reduce_range(option, ctx: PassContext) -> bool:
    if option in (True, "true"):
        return True
    if option in (False, "false"):
        return False
    return _runs_ort(ctx) and ctx.device is not None and ctx.device.int8_fast is False


def _runs_ort(ctx: PassContext) -> bool:
    """Whether the result runs on ONNX Runtime's own int8 kernels (the ``ort`` and
    ``ort-mobile`` targets, or no target): on x86 without VNNI they add pairs of products
    in saturating 16-bit sums, so weights take 7 bits there and candidates are scored with
    ORT's fusions on as well as off. A compiled target runs its own kernels (TFLite, C
    with int32 accumulators, TVM, ORT-web's wasm): it gets 8-bit weights and is scored on
    the QDQ graph itself."""
    target = ctx.target
    return target is None or not target.compiled or \
        getattr(target, "onnxruntime_kernels", False)


def _name_nodes(graph: gs.Graph) -> None:
    """Give every node a unique name: sites are addressed (and reported) by name."""
    seen: set[str] = set()
    for i, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            base, k = node.name or f"{node.op}_{i}", 0
            while f"{base}_{k}" in seen:
                k += 1
            node.name = f"{base}_{k}"
        seen.add(node.name)


def _excluded(node: gs.Node, patterns) -> bool:
    return any(fnmatch.fnmatchcase(node.name, p) or p == node.op for p in patterns)


def _saved(weight: np.ndarray, axis: int | None) -> int:
    """Bytes int8 saves on a float32 weight: 3 a value, less a float32 scale and an int8
    zero point per channel (per tensor: one)."""
    channels = weight.shape[axis] if axis is not None else 1
    return 3 * int(weight.size) - 5 * int(channels)
