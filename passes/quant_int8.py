"""Int8 quantization under an accuracy budget: ``quantize-int8`` (static, QDQ) and
``quantize-int8-dynamic`` (activations quantized at run time).

Both passes work the same way:

1. **Sites.** Candidate nodes (Conv/MatMul/Gemm with a constant weight, embedding
   Gathers of large constant tables), minus the ``exclude`` list and those already
   quantized.
2. **Cost.** A compute site is kept only if the target's cost model says int8 pays off:
   roofline time at the device's int8 peak plus the activation quantization it needs,
   against its float32 time (``require-speedup``). Embedding tables are quantized for
   size (rows are dequantized after the gather, which costs next to nothing).
3. **Calibration** (static) on ``ctx.calibration``; without data, random probe inputs
   with a loud warning, and the accuracy is reported as unmeasured.
4. **Budget.** The quantized model is measured against the float model on
   ``ctx.validation`` (else the calibration data): minimum per-sample output cosine >=
   ``ctx.tolerance`` (and top-1 agreement >= ``min-top1`` when asked). When the budget
   fails, sites are ranked by sensitivity and the most sensitive stay float; the number
   kept float is searched by doubling then bisection, and the model returned was measured
   to meet the budget. Sensitivity (``sensitivity=output``, the default) is 1 - the
   minimum output cosine with that site alone quantized, for every site from one ORT
   session of a "switchboard" model (``graphopt.switchboard``: each site is an If on a
   boolean input), so ranking N sites costs one session and N runs of the data, not N
   model builds and sessions. ``sensitivity=local`` is cheaper still and cruder: each
   site's own output NMSE on captured calibration activations (on MiniLM it ranks the
   FFN inputs first and needs 3 float layers where ``output`` needs 1).
5. **Measure** (optional): times ORT with and without each quantized op type on the
   data and keeps the fastest variant that meets the budget.

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

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import switchboard, verify
from graphopt.capture import subset
from graphopt.accuracy import (Evaluator, batch_size, fallback_search, median_latency,
                               run_all, sample_cosines, session)
from graphopt.cost_calibration import static_model
from graphopt.errors import GraphoptError
from graphopt.ir import Model
from graphopt.metric import DEFAULT_BUDGET as DEFAULT_LOSSY_TOLERANCE
from graphopt.pass_infra import Pass, PassContext, PassResult
from graphopt.passes._int8 import (UNFUSED, as_conv, attention_unsupported, bias_add,
                                   dynamic_quantized, group_output, nmse,
                                   pass_through_params, quantize_attention, single_node_model,
                                   unfuse_conv, weight_axis)
from graphopt.qdq import (METHODS, QdqWriter, activation_params,
                          choose_range, collect_stats, fake_quant_activation,
                          fake_quant_dynamic, fake_quant_weight, from_dequantize, is_float,
                          quantize_weight, resolve_weight)
from graphopt.rewrite import constant_value, remove_dead, remove_node

EMBEDDING_MIN_ELEMENTS = 1 << 16


@dataclass
class Site:
    name: str
    op: str
    kind: str  # "compute" or "embedding"
    float_s: float | None = None
    int8_s: float | None = None
    sensitivity: float = 0.0


@dataclass
class _Plan:
    """What a pass run decided before building variants (shared by build and stats)."""

    sites: dict[str, Site]
    skipped: dict[str, str] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    samples: dict[str, list[np.ndarray]] = field(default_factory=dict)
    reduce_range: bool = False


class _Int8Pass(Pass):
    family = "quantization"
    lossless = False
    dynamic = False
    evaluate_modes: tuple[bool, ...] = (True, False)

    # ------------------------------------------------------------------ the driver
    def run(self, model: Model, ctx: PassContext) -> PassResult:
        opts = self.options
        if model.opset < 13:
            return PassResult(False, {"skipped": f"opset {model.opset} < 13: per-axis "
                                                 "DequantizeLinear needs opset 13"})
        reference = model.to_onnx()
        work = Model.from_proto(reference)  # ``model`` changes only if a variant is kept
        _name_nodes(work.graph)
        plan = _Plan(sites={}, reduce_range=_reduce_range(opts.reduce_range, ctx))
        self._find_sites(work, plan)
        self._filter_by_cost(work, ctx, plan)
        stats: dict = {"reduce_range": plan.reduce_range}
        if not plan.sites:
            return PassResult(False, {**stats, **_skip_stats(plan), "quantized": []})
        base = self._prepare(work.to_onnx(), plan)
        calibration, measured = self._data(ctx, base)
        self._calibrate(base, plan, calibration)
        budget = ctx.tolerance or DEFAULT_LOSSY_TOLERANCE
        modes = self.evaluate_modes if _runs_ort(ctx) else (False,)
        if measured and ctx.check_feeds and ctx.check_reference is not None:
            # Candidates are measured on what the manager checks and the result is
            # verified on, against the original's outputs there (run once for all).
            evaluation = ctx.check_feeds
            evaluator = Evaluator(ctx.check_reference, evaluation, budget, opts.min_top1,
                                  modes, ctx.metric)
        else:
            evaluation = ctx.validation or calibration
            evaluator = Evaluator(reference, evaluation, budget, opts.min_top1, modes,
                                  ctx.metric)

        def rank() -> list[str]:
            self._rank(base, plan, evaluator, ctx)
            return sorted(plan.sites, key=lambda n: -plan.sites[n].sensitivity)

        result = fallback_search(list(plan.sites), rank,
                                 lambda subset: self._build(base, plan, subset), evaluator)
        quantized = [n for n in plan.sites if n not in result.keep_float]
        if result.proto is not None and opts.measure:
            result.proto, quantized, stats["timing"] = self._measure(
                base, plan, quantized, result.proto, evaluation, evaluator)
            if result.proto is None:
                stats["reason"] = "int8 measured slower than float here"
        stats.update(_skip_stats(plan))
        stats.update({
            "quantized": quantized,
            "float": {n: {"reason": "accuracy budget", "sensitivity":
                          float(f"{plan.sites[n].sensitivity:.4g}")}
                      for n in result.keep_float},
            "sensitivity_method": ("local: output NMSE of each layer quantized alone, on "
                                   "captured calibration activations")
            if opts.sensitivity == "local" else "output: 1 - min output cosine with each "
                                                "layer quantized alone (one ORT session, a "
                                                "switch per layer)",
            "search": result.tried,
            "evaluations": evaluator.evaluations,
            "accuracy": {**(result.measurement.to_dict() if result.measurement else {}),
                         "metric": evaluator.metric.name + (" + top-1 agreement"
                                                            if opts.min_top1 is not None else ""),
                         "budget": budget,
                         "data": _describe_data(ctx, measured),
                         "samples": sum(_batch(f) for f in evaluation),
                         "measured": measured},
        })
        if result.proto is None or not quantized:
            stats.setdefault("reason", "the budget holds only with every layer in float")
            return PassResult(False, stats)
        model.graph = Model.from_proto(result.proto).graph
        return PassResult(True, stats, outputs=evaluator.outputs_of(result.proto)
                          if evaluation is ctx.check_feeds else None)

    # ------------------------------------------------------------------ data
    def _data(self, ctx: PassContext, proto: onnx.ModelProto) -> tuple[list, bool]:
        if ctx.calibration:
            return subset(ctx.calibration, self.options.max_batches), True
        ctx.logger.warning(
            "%s: NO CALIBRATION DATA: calibrating and checking accuracy on random probe "
            "inputs, so the accuracy of the quantized model is UNMEASURED; give real "
            "inputs (--calibration-data)", self.name)
        return verify.probe_inputs(proto, count=8, seed=ctx.seed), False

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
                        plan.sites[node.name] = Site(node.name, node.op, "embedding")
                continue
            if as_conv(node) not in opts.ops:
                continue
            why = self._unsupported(node)
            if why is None and _excluded(node, opts.exclude):
                why = "excluded"
            if why is None:
                plan.sites[node.name] = Site(node.name, node.op, "compute")
            elif why != "already quantized":
                plan.skipped[node.name] = why

    def _unsupported(self, node: gs.Node) -> str | None:
        """Why ``node`` cannot be quantized (None: it can)."""
        if node.op == "FusedConv":
            if self.dynamic:
                return "FusedConv is quantized by quantize-int8 only"
            if len(node.inputs) > 3 and node.inputs[3].name:
                return "FusedConv with a residual input (Z)"
            if node.attrs.get("activation") not in UNFUSED:
                return f"FusedConv activation {node.attrs.get('activation')!r}"
        elif node.op == "Attention":
            if not self.dynamic:
                return "Attention is quantized by quantize-int8-dynamic only (QAttention)"
            why = attention_unsupported(node)
            if why is None and getattr(self, "_form", "onnx") == "onnx":
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
        for name, site in list(plan.sites.items()):
            if site.kind != "compute":
                continue
            node = nodes[name]
            site.float_s = cost_model.node_cost(node, device).latency_s
            site.int8_s = cost_model.int8_latency(node, device, self.dynamic)
            if self.options.require_speedup and site.int8_s >= site.float_s:
                plan.skipped[name] = (f"int8 does not pay off on {device.name}{where}: est. "
                                      f"{site.int8_s * 1e6:.2f} us int8 (with activation "
                                      f"quantization) vs {site.float_s * 1e6:.2f} us float")
                del plan.sites[name]

    def _prepare(self, base: onnx.ModelProto, plan: _Plan) -> onnx.ModelProto:
        """The float model variants are built from: FusedConv sites split back into
        Conv + activation (the pattern ORT's QDQ fusion matches). ``model`` itself stays
        as it is until a quantized variant is accepted."""
        fused = [n for n, site in plan.sites.items() if site.op == "FusedConv"]
        if not fused:
            return base
        work = Model.from_proto(base)
        writer = QdqWriter(work)
        for node in work.graph.nodes:
            if node.name in fused:
                unfuse_conv(writer, node)
        return work.to_onnx()

    # ------------------------------------------------------------------ ranking
    def _rank(self, base: onnx.ModelProto, plan: _Plan, evaluator: Evaluator,
              ctx: PassContext) -> None:
        if self.options.sensitivity == "output":
            proto, flags = switchboard.build(
                base, list(plan.sites), lambda w, n: self._quantize_site(w, n, plan))
            sess = session(proto, optimize=True)
            for done, (name, site) in enumerate(plan.sites.items()):
                ctx.step(f"{self.name}: sensitivity of each layer", done, len(plan.sites))
                outputs = run_all(sess, [switchboard.feeds_with(flags, name, f)
                                         for f in evaluator.data])
                worst = min(min(sample_cosines(r, g, batch_size(f)), default=1.0)
                            for r, g, f in zip(evaluator.reference, outputs, evaluator.data))
                site.sensitivity = 1.0 - worst
            return
        model = Model.from_proto(base)
        nodes = {n.name: n for n in model.graph.nodes}
        for name, site in plan.sites.items():
            node = nodes[name]
            if site.kind == "embedding":
                table = constant_value(node.inputs[0])
                site.sensitivity = nmse(table, fake_quant_weight(table, 0, False))
            else:
                site.sensitivity = self._local_error(model, node, plan)

    def _local_error(self, model: Model, node: gs.Node, plan: _Plan) -> float:
        xs = plan.samples.get(node.inputs[0].name, [])
        if not xs:
            return 0.0
        w = resolve_weight(node.inputs[1])
        wq = fake_quant_weight(w, weight_axis(node, w) if self.options.per_channel else None,
                               plan.reduce_range)
        rest = [constant_value(t) for t in node.inputs[2:] if t.name]
        single = single_node_model(model, node, w, rest)
        single_q = single_node_model(model, node, wq, rest)
        ref_sess, q_sess = verify.session(single), verify.session(single_q)
        num = den = 0.0
        for x in xs:
            if self.dynamic:
                xq = fake_quant_dynamic(x)
            else:
                scale, zero = activation_params(*plan.ranges[node.inputs[0].name],
                                                self.options.symmetric_activations)
                xq = fake_quant_activation(x, float(scale), int(zero))
            y = ref_sess.run(None, {"x": x})[0].astype(np.float64)
            yq = q_sess.run(None, {"x": xq})[0].astype(np.float64)
            num += float(((y - yq) ** 2).sum())
            den += float((y ** 2).sum())
        return num / den if den else 0.0

    # ------------------------------------------------------------------ measuring
    def _measure(self, base, plan, quantized, proto, data, evaluator):
        feeds = data[0]
        ops = sorted({plan.sites[n].op for n in quantized})
        variants = [("float", base, []), ("all", proto, list(quantized))]
        if len(ops) > 1:
            for op in ops:
                keep = [n for n in quantized if plan.sites[n].op != op]
                variants.append((f"without {op}", self._build(base, plan, set(keep)), keep))
        times = median_latency([v[1] for v in variants], feeds)
        report = {label: round(t * 1e3, 4) for (label, _, _), t in zip(variants, times)}
        ranked = sorted(zip(times, range(len(variants))))
        for _, i in ranked:
            label, candidate, names = variants[i]
            if label == "float" or label == "all" or evaluator.ok(evaluator.measure(candidate)):
                if label == "float":
                    return None, [], {"ms": report, "kept": "float: int8 measured slower"}
                return candidate, names, {"ms": report, "kept": label}
        return proto, quantized, {"ms": report, "kept": "all"}

    # ------------------------------------------------------------------ building
    def _build(self, base: onnx.ModelProto, plan: _Plan, subset: set[str]) -> onnx.ModelProto:
        model = Model.from_proto(base)
        writer = QdqWriter(model)
        dead: list[gs.Node] = []
        for node in list(model.graph.nodes):
            if node.name not in subset:
                continue
            producer = node.inputs[1].inputs[0] if node.inputs[1].inputs else None
            self._quantize_site(writer, node, plan)
            if producer is not None:
                dead.append(producer)
        remove_dead(dead, model.graph)
        if self.dynamic and getattr(self, "_form", "onnx") != "onnx":
            model.require_opset("com.microsoft", 1)
        return model.to_onnx()

    def _quantize_site(self, writer: QdqWriter, node: gs.Node, plan: _Plan) -> None:
        if node.op == "Gather":
            writer.embedding(node, constant_value(node.inputs[0]), False)
        else:
            self._quantize_node(writer, node, plan)

    def _quantize_node(self, writer: QdqWriter, node: gs.Node, plan: _Plan) -> None:
        raise NotImplementedError


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
        sensitivity: str = "output"  # output (switchboard) or local
        require_speedup: bool = True
        measure: bool = False
        max_batches: int = 256

        def __post_init__(self):
            if self.method not in METHODS:
                raise ValueError(f"method must be one of {', '.join(METHODS)}")
            _check_common(self)

    def _calibrate(self, base: onnx.ModelProto, plan: _Plan, data: list) -> None:
        model = Model.from_proto(base)
        nodes = {n.name: n for n in model.graph.nodes}
        inputs, names = set(), []
        for name, site in plan.sites.items():
            if site.kind != "compute":
                continue
            node = nodes[name]
            inputs.add(node.inputs[0].name)
            names.append(node.inputs[0].name)
            if node.op == "Conv":
                names.append(group_output(node, self.options.symmetric_activations).name)
        names = list(dict.fromkeys(names))
        stats = collect_stats(base, names, data, histograms=self.options.method != "minmax",
                              keep=inputs if self.options.sensitivity == "local" else set())
        for name, s in stats.items():
            plan.ranges[name] = choose_range(s, self.options.method, self.options.percentile,
                                             self.options.symmetric_activations)
            if s.samples:
                plan.samples[name] = s.samples

    def _quantize_node(self, writer: QdqWriter, node: gs.Node, plan: _Plan) -> None:
        opts = self.options
        x = node.inputs[0]
        if from_dequantize(x):  # shared with a node quantized before
            scale = np.float32(constant_value(x.inputs[0].inputs[1]).reshape(()))
        else:
            scale, zero = pass_through_params(x) or activation_params(
                *plan.ranges[writer.source_name(x)], opts.symmetric_activations)
            writer.activation(x, scale, zero)
        value = resolve_weight(node.inputs[1])
        axis = weight_axis(node, value) if opts.per_channel else None
        w_dq, w_scale = writer.weight(node.name + "_weight", value, axis, plan.reduce_range)
        node.inputs[1] = w_dq
        if node.op in ("Conv", "Gemm") and len(node.inputs) > 2 and node.inputs[2].name:
            bias = constant_value(node.inputs[2]).reshape(-1)
            node.inputs[2] = writer.bias(node.name + "_bias", bias, scale * w_scale)
        out = group_output(node, opts.symmetric_activations)
        if node.op == "Conv" and writer.source_name(out) in plan.ranges:
            # QLinearConv needs its output quantized
            writer.activation(out, *activation_params(*plan.ranges[writer.source_name(out)],
                                                      opts.symmetric_activations))


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
        sensitivity: str = "output"
        require_speedup: bool = True
        measure: bool = False
        max_batches: int = 256

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
        result.stats["form"] = form
        return result

    def _calibrate(self, base: onnx.ModelProto, plan: _Plan, data: list) -> None:
        if self.options.sensitivity != "local":
            return
        model = Model.from_proto(base)
        nodes = {n.name: n for n in model.graph.nodes}
        names = list(dict.fromkeys(nodes[n].inputs[0].name for n, s in plan.sites.items()
                                   if s.kind == "compute"))
        stats = collect_stats(base, names, data[:8], histograms=False, keep=set(names))
        plan.samples = {n: s.samples for n, s in stats.items()}

    def _quantize_node(self, writer: QdqWriter, node: gs.Node, plan: _Plan) -> None:
        if node.op == "Attention":
            quantize_attention(writer, node, self.options.per_channel, plan.reduce_range)
            return
        graph = writer.graph
        value = resolve_weight(node.inputs[1])
        if node.op == "Gemm" and node.attrs.get("transB", 0):
            value = value.T
        q, scale = quantize_weight(value, 1 if self.options.per_channel else None,
                                   plan.reduce_range)
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
        form = getattr(self, "_form", "com.microsoft")
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


# ============================================================================ helpers
def _check_common(opts) -> None:
    if opts.reduce_range not in ("auto", "true", "false", True, False):
        raise ValueError("reduce-range must be auto, true or false")
    if opts.sensitivity not in ("local", "output"):
        raise ValueError("sensitivity must be local or output")


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


def _skip_stats(plan: _Plan) -> dict:
    return {"skipped": dict(plan.skipped)} if plan.skipped else {}


def _describe_data(ctx: PassContext, measured: bool) -> str:
    if not measured:
        return "unmeasured: random probe data"
    return "validation data" if ctx.validation else "calibration data"


def _batch(feeds: dict) -> int:
    first = next(iter(feeds.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1
