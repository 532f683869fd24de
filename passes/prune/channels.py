"""``prune-channels``: structured channel pruning of CNNs and MLPs on the ONNX graph.

Sites are the channel groups of ``passes.prune.spaces`` (every tensor, weight and
constant that must lose the same channels); refused groups carry the reason. A setting is
the fraction of a group's channels removed, rounded so the channels kept are a multiple
of what the device's kernels like (``Device.channel_multiple``: ONNX Runtime's blocked
NCHWc convolutions run 29 channels slower than 32).

Importance, from calibration data (computed once per run):

* ``wanda`` (default): for each consumer layer, ‖X_c‖₂ · ‖W[:, c]‖₂, the size of what
  channel c contributes to its output (Wanda's |W|·‖X‖ per input channel), normalized per
  consumer and summed over the group's consumers;
* ``fluctuation`` (FLAP): Var(X_c) · ‖W[:, c]‖₂², the part of the contribution a bias
  cannot absorb;
* ``l2``: the producers' filter norms (weights only; used without data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.capture import channel_stats, subset
from graphopt.compression import Applied, CompressionPass, Site, nearest_setting
from graphopt.ir import Model
from graphopt.pass_infra import PassContext
from graphopt.rewrite import constant_value, make_constant
from graphopt.passes.prune.spaces import Group, Spaces

IMPORTANCE = ("wanda", "fluctuation", "l2")


class PruneChannels(CompressionPass):
    """Remove the least important channels of each channel group (CNNs, MLPs)."""

    name = "prune-channels"
    family = "pruning"
    technique = "prune"
    scheme = ("prune", "channels")
    scheme_order = 10

    @dataclass(frozen=True)
    class Options:
        ratio: float | None = None  # one fraction for every group (None: searched)
        ratios: tuple[float, ...] = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
        multiple: int = 0  # channels kept are a multiple of this (0: the device's)
        importance: str = "wanda"
        max_batches: int = 16

        def __post_init__(self):
            if self.importance not in IMPORTANCE:
                raise ValueError(f"importance must be one of {', '.join(IMPORTANCE)}")
            if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
                raise ValueError("ratio must be in [0, 1)")
            if not self.ratios or any(not 0.0 <= r < 1.0 for r in self.ratios):
                raise ValueError("ratios must be fractions in [0, 1)")
            if self.multiple < 0 or self.max_batches < 1:
                raise ValueError("multiple must be >= 0 and max-batches >= 1")

    def __init__(self, options: Any = None, **kwargs: Any):
        super().__init__(options, **kwargs)
        self._scores: dict[str, np.ndarray] = {}
        self._method = self.options.importance

    # ------------------------------------------------------------------ contract
    def sites(self, model: Model, ctx: PassContext) -> list[Site]:
        model = model.clone()  # analysed with its weights materialized (see analyse)
        groups = analyse(model)
        usable = [g for g in groups if g.reason is None]
        self._scores, self._method = self._importance(model, usable, ctx)
        multiple = self.options.multiple or getattr(ctx.device, "channel_multiple", 8) or 8
        self._multiple = multiple
        out = []
        for g in groups:
            nodes = tuple(dict.fromkeys(n.name for n, _ in [*g.producers, *g.consumers]))
            if g.reason is not None:
                out.append(Site(g.name, "channels", (0.0,), nodes, g.channels, g.reason))
                continue
            settings = [0.0]
            seen = {g.channels}
            for r in sorted(self.options.ratios):
                n = keep_count(g.channels, r, multiple)
                if n not in seen:
                    seen.add(n)
                    settings.append(round(1.0 - n / g.channels, 6))
            out.append(Site(g.name, "channels", tuple(settings), nodes, g.channels))
        return out

    def fixed_choice(self, sites: list[Site]) -> dict[str, Any] | None:
        if self.options.ratio is None:
            return None
        return {s.name: nearest_setting(s, self.options.ratio) for s in sites}

    def apply(self, model: Model, choice: Mapping[str, Any], ctx: PassContext) -> Applied:
        groups = {g.name: g for g in analyse(model)}
        stats: dict = {"importance": self._method}
        kept_map: dict = {}
        for name, ratio in choice.items():
            g = groups[name]
            if g.reason is not None:
                raise ValueError(f"group {name} cannot be pruned: {g.reason}")
            n = keep_count(g.channels, float(ratio), getattr(self, "_multiple", 1))
            if n >= g.channels:
                continue
            scores = self._scores.get(name)
            if scores is None or len(scores) != g.channels:
                scores = _producer_norms(g)
            kept = np.sort(np.argsort(-scores, kind="stable")[:n])
            kept_map.update(narrow(model.graph, g, kept))
            stats[name] = {"channels": g.channels, "kept": n}
        return Applied(stats, kept_map)

    # ------------------------------------------------------------------ importance
    def _importance(self, model: Model, groups: list[Group], ctx: PassContext):
        method = self.options.importance
        data = subset(ctx.calibration, self.options.max_batches)
        if method == "l2" or not data or not groups:
            return {g.name: _producer_norms(g) for g in groups}, "l2" if groups else method
        axes = {}
        for g in groups:
            for node, ax in g.consumers:
                axes[node.inputs[0].name] = ax.axis
        stats = channel_stats(model.to_onnx(), axes, data)
        scores = {}
        for g in groups:
            total = np.zeros(g.channels)
            for node, ax in g.consumers:
                st = stats[node.inputs[0].name]
                f = ax.factor
                w2 = _consumer_column_sq(node, g.channels, f)
                if method == "wanda":
                    x = st.sumsq.reshape(g.channels, f).sum(1)
                    part = np.sqrt(x) * np.sqrt(w2)
                else:  # fluctuation: variance of the channel times its squared weights
                    var = st.var.reshape(g.channels, f).sum(1)
                    part = var * w2
                total += part / max(part.sum(), 1e-30)
            if not g.consumers:
                total = _producer_norms(g)
            scores[g.name] = total
        return scores, method


def analyse(model: Model) -> list[Group]:
    """The channel groups of ``model`` (shapes are inferred first when missing). Weights
    that exporters leave as Transpose(constant) (ONNX exports of ``x @ W.T`` too large for
    constant folding) become constants first, so their layers can be pruned."""
    materialize_weights(model)
    if any(t.shape is None for n in model.graph.nodes for t in n.outputs):
        model.infer_shapes()
    return Spaces(model.graph).groups()


def materialize_weights(model: Model) -> int:
    """Replace Transpose(constant) weights of Conv/Gemm/MatMul read by that layer alone
    with the transposed constant (lossless; the model does not grow). Returns how many."""
    count = 0
    for node in model.graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        if len(w.inputs) != 1 or w.inputs[0].op != "Transpose" or len(w.outputs) != 1 \
                or w in model.graph.outputs:
            continue
        transpose = w.inputs[0]
        source = transpose.inputs[0]
        if not isinstance(source, gs.Constant) or len(source.outputs) != 1:
            continue
        perm = transpose.attrs.get("perm")
        value = np.transpose(source.values, perm) if perm is not None else source.values.T
        node.inputs[1] = gs.Constant(source.name, np.ascontiguousarray(value))
        transpose.inputs.clear()
        transpose.outputs.clear()
        count += 1
    if count:
        model.graph.cleanup()
    return count


def keep_count(channels: int, ratio: float, multiple: int) -> int:
    """Channels kept when ``ratio`` of ``channels`` go, rounded to ``multiple`` (a group
    smaller than two multiples rounds to 1); at least one multiple, at most all."""
    m = multiple if channels >= 2 * multiple else 1
    n = int(round(channels * (1.0 - ratio) / m)) * m
    return int(min(channels, max(m, n)))


def _producer_norms(g: Group) -> np.ndarray:
    total = np.zeros(g.channels)
    for node, kind in g.producers:
        w = constant_value(node.inputs[1]).astype(np.float64)
        if kind == "conv":
            rows = w.reshape(w.shape[0], -1)
        elif kind == "gemm" and node.attrs.get("transB", 0):
            rows = w
        else:
            rows = w.T
        norms = np.linalg.norm(rows, axis=1)
        total += norms / max(norms.sum(), 1e-30)
    return total


def _consumer_column_sq(node: gs.Node, channels: int, factor: int) -> np.ndarray:
    """Σ W² over everything channel c of the input feeds, per channel."""
    w = constant_value(node.inputs[1]).astype(np.float64)
    if node.op == "Conv":
        per_input = (w ** 2).sum(axis=tuple(i for i in range(w.ndim) if i != 1))
    elif node.op == "Gemm" and node.attrs.get("transB", 0):
        per_input = (w ** 2).sum(0)
    else:
        per_input = (w ** 2).sum(1)
    return per_input.reshape(channels, factor).sum(1)


# ============================================================================ editing
def expand(kept: np.ndarray, factor: int) -> np.ndarray:
    """Feature indices of channels ``kept`` when each channel spans ``factor`` features."""
    if factor == 1:
        return kept
    return (kept[:, None] * factor + np.arange(factor)[None, :]).reshape(-1)


def narrow(graph: gs.Graph, g: Group, kept: np.ndarray) -> dict:
    """Remove every channel of group ``g`` not in ``kept`` from its weights, constants,
    Reshape targets and tensor shapes; returns {tensor name: (axis, kept indices)}."""
    n = len(kept)
    for node, kind in g.producers:
        w = constant_value(node.inputs[1])
        axis = 0 if kind == "conv" or (kind == "gemm" and node.attrs.get("transB", 0)) else 1
        _set(graph, node, 1, np.take(w, kept, axis=axis))
        if len(node.inputs) > 2 and node.inputs[2].name:
            b = constant_value(node.inputs[2])
            if b.size == g.channels:
                _set(graph, node, 2, np.take(b.reshape(-1), kept).reshape(
                    [n if d == g.channels else d for d in b.shape]))
    for node, ax in g.consumers:
        w = constant_value(node.inputs[1])
        idx = expand(kept, ax.factor)
        axis = 1 if node.op == "Conv" or (node.op == "Gemm" and node.attrs.get("transB", 0)) \
            else 0
        _set(graph, node, 1, np.take(w, idx, axis=axis))
    for node in g.depthwise:
        _set(graph, node, 1, np.take(constant_value(node.inputs[1]), kept, axis=0))
        if len(node.inputs) > 2 and node.inputs[2].name:
            _set(graph, node, 2, np.take(constant_value(node.inputs[2]), kept, axis=0))
        node.attrs["group"] = n
    for node, i, pos in g.params:
        value = constant_value(node.inputs[i])
        factor = value.shape[pos] // g.channels
        _set(graph, node, i, np.take(value, expand(kept, factor), axis=pos))
    for node, dim, factor in g.reshapes:
        target = constant_value(node.inputs[1]).copy()
        target[dim] = n * factor
        _set(graph, node, 1, target)
    out = {}
    for ax in g.axes:
        shape = ax.tensor.shape
        if shape is not None and len(shape):
            shape = list(shape)
            shape[ax.axis] = n * ax.factor
            ax.tensor.shape = shape
        rank = len(ax.tensor.shape or [])
        out[ax.tensor.name] = (ax.axis % rank if rank else ax.axis, expand(kept, ax.factor))
    return out


def _set(graph: gs.Graph, node: gs.Node, index: int, value: np.ndarray) -> None:
    """Give input ``index`` of ``node`` the constant ``value``: in place when the node is
    its only reader, else as a new initializer (a shared weight keeps its other uses)."""
    tensor = node.inputs[index]
    value = np.ascontiguousarray(value)
    if isinstance(tensor, gs.Constant) and len(tensor.outputs) == 1:
        tensor.values = value
        return
    node.inputs[index] = make_constant(graph, f"{tensor.name}_pruned", value)
