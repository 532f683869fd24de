"""SmoothQuant scale migration (``smooth-quant``), exact in real arithmetic.

For the MatMul/Gemm weights ``W`` ([K, N], constant) that read one activation ``X``,
``X @ W = (X diag(s)^-1) @ (diag(s) W)``. Choosing, per input channel ``j``,

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

(``max|X_j|`` over the calibration data, ``max|W_j|`` over row ``j`` of every weight
reading ``X``) moves the activation outliers into the weights, where per-channel int8
quantization absorbs them (Xiao et al. 2022). The pass only rescales: it matters when an
int8 quantization pass follows it.

``diag(s)^-1`` is folded into what produces ``X``:

* a normalization over the last axis (``LayerNormalization``, ``RMSNormalization``,
  ``com.microsoft`` ``SkipLayerNormalization``/``SkipSimplifiedLayerNormalization``/
  ``SimplifiedLayerNormalization``): its scale (gamma) and bias (beta) are divided by ``s``;
* a ``Mul`` by a constant broadcast along the last axis (e.g. the ``* 0.5`` closing an
  exported GELU): the constant is divided by ``s``.

When ``X`` is also read by other nodes (the residual branch of a post-LN transformer),
the producer is duplicated (``duplicate=true``, the default): the copy with the scaled
parameters feeds the weights, the original the rest. ``Shape``/``Size`` readers do not
count (the shape is unchanged). Other producers are left alone and counted in the
stats. Without calibration data (``ctx.calibration``) the pass does nothing and says so.

Run again, the pass finds ``s = 1`` (the activations it measures are already smoothed)
and changes nothing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import Model
from graphopt.pass_infra import Pass, PassContext, PassResult
from graphopt.passes._patterns import MICROSOFT
from graphopt.passes.quantize._weights import Linear, capture, linears, resolve_constant, set_weight
from graphopt.rewrite import consumers, remove_dead, tensor_names, unique_name

# (domain, op) -> (index of the scale input, index of the bias input or None)
NORMS = {
    ("", "LayerNormalization"): (1, 2),
    ("", "RMSNormalization"): (1, None),
    (MICROSOFT, "SkipLayerNormalization"): (2, 3),
    (MICROSOFT, "SkipSimplifiedLayerNormalization"): (2, None),
    (MICROSOFT, "SimplifiedLayerNormalization"): (1, None),
}
SHAPE_READERS = ("Shape", "Size")
UNCHANGED = 1e-2  # scales within this of 1 everywhere mean "already smooth"


@dataclass
class Group:
    """Weights reading one activation ``x`` whose producer can absorb ``1 / s``."""

    x: gs.Tensor
    linears: list[Linear]
    producer: gs.Node
    graph: gs.Graph
    exclusive: bool  # nothing but the weights (and Shape/Size) reads x
    params: list[int] = field(default_factory=list)  # producer inputs divided by s

    @property
    def k(self) -> int:
        return self.linears[0].k


def _domain(node: gs.Node) -> str:
    return "" if (node.domain or "") in ("", "ai.onnx") else node.domain


def _norm_params(node: gs.Node, x: gs.Tensor, k: int) -> list[int] | None:
    """Input indices of a last-axis normalization's constant scale and bias."""
    spec = NORMS.get((_domain(node), node.op))
    if spec is None or not node.outputs or node.outputs[0] is not x:
        return None
    axis = node.attrs.get("axis", -1)
    rank = len(x.shape) if x.shape is not None else None
    if axis != -1 and (rank is None or axis != rank - 1):
        return None
    params = []
    for index in spec:
        if index is None or index >= len(node.inputs) or node.inputs[index].is_empty():
            continue
        value = resolve_constant(node.inputs[index])
        if value is None or value.size != k or value.shape[-1] != k:
            return None
        params.append(index)
    return params if spec[0] in params else None


def _mul_param(node: gs.Node, x: gs.Tensor, k: int) -> list[int] | None:
    """Input index of the constant of ``Mul(a, c)`` when it broadcasts along the last axis
    only (a scalar, [K] or [1, ..., 1, K]) and does not set the result's rank."""
    if node.op != "Mul" or _domain(node) != "" or len(node.inputs) != 2:
        return None
    rank = len(x.shape) if x.shape is not None else None
    for index in (1, 0):
        value = resolve_constant(node.inputs[index])
        other = node.inputs[1 - index]
        if value is None or resolve_constant(other) is not None:
            continue
        if value.size not in (1, k) or (value.ndim and value.shape[-1] not in (1, k)) or \
                any(d != 1 for d in value.shape[:-1]) or rank is None or value.ndim > rank or \
                not np.issubdtype(value.dtype, np.floating):
            return None
        return [index]
    return None


def smoothable_groups(model: Model, duplicate: bool = True) -> tuple[list[Group], Counter]:
    """The groups of main-graph weights sharing an input that can absorb a per-channel
    scale, and why other weights do not form one."""
    misses: Counter = Counter()
    graph = model.graph
    by_input: dict[int, list[Linear]] = {}
    for lin in linears(model):
        if lin.graph is graph:
            by_input.setdefault(id(lin.x), []).append(lin)
    outputs = {id(t) for g in model.all_graphs() for t in g.outputs}
    groups = []
    for members in by_input.values():
        x = members[0].x
        if len({lin.k for lin in members}) != 1 or len(x.inputs) != 1:
            misses["input is not computed by one node"] += 1
            continue
        producer = x.inputs[0]
        if not any(producer is n for n in graph.nodes):
            misses["input computed in another graph"] += 1
            continue
        k = members[0].k
        params = _norm_params(producer, x, k)
        if params is None:
            params = _mul_param(producer, x, k)
        if params is None:
            misses[f"input comes from {producer.op}"] += 1
            continue
        ids = {id(lin.node) for lin in members}
        exclusive = id(x) not in outputs and all(
            id(r) in ids or r.op in SHAPE_READERS for r in consumers(x))
        if not exclusive and not duplicate:
            misses["input has other readers"] += 1
            continue
        groups.append(Group(x, members, producer, graph, exclusive, params))
    return groups, misses


def apply_scales(group: Group, scale: np.ndarray, names: set[str]) -> None:
    """Divide the group's input by ``scale`` (in its producer, or a scaled copy of it) and
    multiply the rows of its weights by ``scale``: the weights' outputs do not change."""
    producer, k = group.producer, group.k
    new_inputs = list(producer.inputs)
    for index in group.params:
        value = resolve_constant(producer.inputs[index])
        if value.size == 1 and value.ndim == 0:
            shape = (k,)
        else:
            shape = (1,) * (value.ndim - 1) + (k,)
        vector = np.broadcast_to(value.reshape(-1), (k,)).astype(np.float64) / scale
        hint = f"{producer.inputs[index].name or producer.name}_smoothed"
        new_inputs[index] = gs.Constant(unique_name(names, hint),
                                        np.ascontiguousarray(vector.reshape(shape)
                                                             .astype(value.dtype)))
    old_params = [producer.inputs[i] for i in group.params]
    if group.exclusive:
        for index in group.params:
            producer.inputs[index] = new_inputs[index]
    else:
        x = group.x
        smoothed = gs.Variable(unique_name(names, f"{x.name}_smoothed"), dtype=x.dtype,
                               shape=x.shape)
        copy = gs.Node(producer.op, name=unique_name(names, f"{producer.name or 'node'}_smoothed"),
                       domain=producer.domain, attrs=dict(producer.attrs), inputs=new_inputs,
                       outputs=[smoothed])
        group.graph.nodes.append(copy)
        for lin in group.linears:
            lin.node.inputs[0] = smoothed
        group.x, group.producer, group.exclusive = smoothed, copy, True
    for tensor in old_params:  # a Constant/Identity node that fed only the old parameter
        if tensor.inputs and not tensor.outputs and \
                any(tensor.inputs[0] is n for n in group.graph.nodes):
            remove_dead(list(tensor.inputs), group.graph)
    for lin in group.linears:
        set_weight(lin, lin.weight.astype(np.float64) * scale[:, None], names,
                   f"{lin.source.name or lin.node.name}_smoothed")


def activation_max(model: Model, tensors: list[gs.Tensor], feeds) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| over ``feeds`` for each of ``tensors``."""
    result: dict[str, np.ndarray] = {}

    def consume(name: str, value: np.ndarray) -> None:
        amax = np.abs(np.asarray(value, dtype=np.float64)).reshape(-1, value.shape[-1]).max(0)
        result[name] = np.maximum(result[name], amax) if name in result else amax

    capture(model, tensors, feeds, consume)
    return result


def smoothing_scale(amax: np.ndarray, wmax: np.ndarray, alpha: float,
                    bounds: tuple[float, float] = (1e-5, 1e5)) -> np.ndarray:
    """``s = amax^alpha / wmax^(1 - alpha)``, 1 where either is 0, clipped to ``bounds``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.power(amax, alpha) / np.power(wmax, 1.0 - alpha)
    scale = np.where((amax > 0) & (wmax > 0) & np.isfinite(scale), scale, 1.0)
    return np.clip(scale, *bounds)


def channel_ratio(amax: np.ndarray) -> float:
    """How much the worst channel stands out: max over median of per-channel max |x|."""
    median = float(np.median(amax))
    return float(amax.max() / median) if median > 0 else float("inf")


class SmoothQuant(Pass):
    """Migrate activation outliers into the weights (SmoothQuant) before int8 quantization."""

    name = "smooth-quant"
    family = "quantization"
    lossless = True  # an exact rescaling: outputs stay equal within float rounding

    @dataclass(frozen=True)
    class Options:
        alpha: float = 0.5        # migration strength: 0 leaves activations, 1 moves all
        duplicate: bool = True    # copy a producer whose output other nodes also read

        def __post_init__(self) -> None:
            if not 0.0 <= self.alpha <= 1.0:
                raise ValueError(f"alpha must be in [0, 1], not {self.alpha}")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if not ctx.calibration:
            return PassResult(changed=False, stats={
                "smoothed": 0, "reason": "no calibration data (ctx.calibration): nothing to "
                                         "measure activations on"})
        groups, misses = smoothable_groups(model, self.options.duplicate)
        stats: dict = {"smoothed": 0, "alpha": self.options.alpha}
        if misses:
            stats["not_smoothed"] = dict(misses)
        if not groups:
            return PassResult(changed=False, stats=stats)
        amax = activation_max(model, [g.x for g in groups], ctx.calibration)
        names = tensor_names(model.all_graphs())
        ratios_before, ratios_after, max_before, max_after = [], [], 0.0, 0.0
        duplicated = weights = 0
        for group in groups:
            a = amax.get(group.x.name)
            if a is None:
                continue
            wmax = np.max([np.abs(lin.weight.astype(np.float64)).max(axis=1)
                           for lin in group.linears], axis=0)
            scale = smoothing_scale(a, wmax, self.options.alpha)
            if np.all(np.abs(scale - 1.0) < UNCHANGED):
                continue
            duplicated += not group.exclusive
            apply_scales(group, scale, names)
            stats["smoothed"] += 1
            weights += len(group.linears)
            ratios_before.append(channel_ratio(a))
            ratios_after.append(channel_ratio(a / scale))
            max_before = max(max_before, float(a.max()))
            max_after = max(max_after, float((a / scale).max()))
        if not stats["smoothed"]:
            stats["reason"] = "activations are already smooth (all scales ~1)"
            return PassResult(changed=False, stats=stats)
        stats.update(weights=weights, duplicated=duplicated,
                     activation_max_before=max_before, activation_max_after=max_after,
                     channel_ratio_before=float(np.mean(ratios_before)),
                     channel_ratio_after=float(np.mean(ratios_after)))
        return PassResult(changed=True, stats=stats)
