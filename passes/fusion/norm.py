"""Lossless normalization fusions for transformers.

``fuse-layer-norm``
    ReduceMean → Sub → Pow 2 (or Mul by itself) → ReduceMean → Add ε → Sqrt → Div (or
    Reciprocal + Mul) [→ Mul γ] [→ Add β], over the last axis → ``LayerNormalization``.
``fuse-rms-norm``
    Pow 2 (or Mul by itself) → ReduceMean → Add ε → Sqrt → Div (or Reciprocal + Mul)
    [→ Mul γ], over the last axis → ``RMSNormalization``.
``fuse-skip-layer-norm``
    Add(x, skip) [+ bias] → LayerNormalization / RMSNormalization → com.microsoft
    ``SkipLayerNormalization`` / ``SkipSimplifiedLayerNormalization``.

Only float32 arithmetic is fused (a float16 chain rounds after every op; the fused op
would not). An fp16 export's Casts to float and back stay where they are: the fusion
covers the float32 arithmetic between them, and a γ/β applied after the Cast back stays
a separate Mul/Add.

Why the opset upgrade: ``LayerNormalization`` is a standard op from opset 17 and
``RMSNormalization`` from opset 23. ONNX Runtime also registers ``LayerNormalization`` and
``SimplifiedLayerNormalization`` in the ONNX domain for older opsets, but the ONNX checker
(which every result must pass) rejects them there, and ``com.microsoft`` has no plain
LayerNorm or RMSNorm. So a model older than the op is upgraded with
``onnx.version_converter`` (opset 13 and newer, checked, and only when a pattern was
found); ``upgrade-opset=false`` leaves such models alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import Model
from graphopt.pass_infra import Pass, PassContext, PassResult
from graphopt.passes._patterns import (MICROSOFT, Miss, Scope, dtype_of, is_default_domain,
                                       last_dim, other_input, rank_of, reduces_last_axis,
                                       same_dim, same_shape, scalar, upgrade_opset, vector)
from graphopt.rewrite import constant_value, consumers

FLOAT32 = np.dtype(np.float32)
LAYER_NORM_OPSET = 17
RMS_NORM_OPSET = 23


@dataclass
class NormMatch:
    """A decomposed normalization: ``nodes`` (the last writes ``output``) compute
    normalize(x) [* scale] [+ bias] over the last axis."""

    x: gs.Tensor
    epsilon: float
    nodes: list[gs.Node]
    scale: gs.Tensor | None = None
    bias: gs.Tensor | None = None

    @property
    def output(self) -> gs.Tensor:
        return self.nodes[-1].outputs[0]


# ---------------------------------------------------------------------- pattern pieces
def _square_of(node: gs.Node, base: gs.Tensor) -> bool:
    """``node`` is Pow(base, 2) or Mul(base, base)."""
    if node.op == "Pow" and len(node.inputs) == 2 and node.inputs[0] is base:
        return scalar(node.inputs[1], rank_of(base)) == 2.0
    return node.op == "Mul" and len(node.inputs) == 2 and \
        node.inputs[0] is base and node.inputs[1] is base


def _mean_of_square(square: gs.Node, scope: Scope, rank: int) -> gs.Node | Miss:
    """ReduceMean(square) over the last axis."""
    mean = scope.only_reader(square.outputs[0], "ReduceMean")
    if mean is None:
        return Miss("the square is not only averaged")
    return mean if reduces_last_axis(mean, rank) else Miss("variance not over the last axis")


def _inverse_std(variance: gs.Node, numerator: gs.Tensor, scope: Scope,
                 rank: int) -> tuple[float, list[gs.Node]] | Miss:
    """Add(variance, ε) → Sqrt → Div(numerator, ·) | Reciprocal → Mul(numerator, ·) |
    Div(1, ·) → Mul(numerator, ·). Returns ε and the nodes after ``variance``."""
    add = scope.only_reader(variance.outputs[0], "Add")
    if add is None:
        return Miss("variance is not only added to")
    epsilon = scalar(other_input(add, variance.outputs[0]), rank)
    if epsilon is None or epsilon < 0 or \
            dtype_of(other_input(add, variance.outputs[0])) != FLOAT32:
        return Miss("epsilon is not a scalar constant")
    sqrt = scope.only_reader(add.outputs[0], "Sqrt")
    if sqrt is None:
        return Miss("no Sqrt of variance + epsilon")
    std = sqrt.outputs[0]
    step = scope.only_reader(std, "Div", "Reciprocal")
    if step is not None and step.op == "Div" and step.inputs[0] is numerator \
            and step.inputs[1] is std:
        return epsilon, [add, sqrt, step]
    if step is not None and (step.op == "Reciprocal" or (
            step.inputs[1] is std and scalar(step.inputs[0], rank) == 1.0)):
        mul = scope.only_reader(step.outputs[0], "Mul")
        if mul is not None and other_input(mul, step.outputs[0]) is numerator:
            return epsilon, [add, sqrt, step, mul]
    return Miss("the input is not divided by sqrt(variance + epsilon)")


def _affine(match: NormMatch, scope: Scope, with_bias: bool) -> NormMatch:
    """Absorb a following Mul by γ and (``with_bias``) Add of β, each acting along the
    last axis only, into ``match``."""
    size, rank = last_dim(match.x), rank_of(match.x)
    mul = scope.only_reader(match.output, "Mul")
    if mul is not None:
        scale = vector(other_input(mul, match.output), size, rank, FLOAT32, scope, "gamma")
        if scale is not None:
            match.nodes.append(mul)
            match.scale = scale
    add = scope.only_reader(match.output, "Add") if with_bias else None
    if add is not None:
        bias = vector(other_input(add, match.output), size, rank, FLOAT32, scope, "beta")
        if bias is not None:
            match.nodes.append(add)
            match.bias = bias
    return match


def _checked_input(x: gs.Tensor) -> Miss | None:
    if dtype_of(x) != FLOAT32:
        return Miss("not float32")
    if last_dim(x) is None:
        return Miss("hidden size (last dimension) unknown")
    return None


# ---------------------------------------------------------------------- matches
def match_layer_norm(mean: gs.Node, scope: Scope) -> NormMatch | Miss | None:
    """ReduceMean(x) → Sub(x, mean) → Pow 2 | Mul self → ReduceMean → Add ε → Sqrt →
    Div | Reciprocal+Mul [→ Mul γ] [→ Add β], over the last axis of float32 x."""
    x = mean.inputs[0]
    rank = rank_of(x)
    subs = [n for n in scope.readers(mean.outputs[0], "Sub")
            if n.inputs[0] is x and n.inputs[1] is mean.outputs[0]]
    if len(subs) != 1:
        return None  # not the start of a LayerNorm
    sub = subs[0]
    if not reduces_last_axis(mean, rank):
        return Miss("mean not over the last axis")
    if (miss := _checked_input(x)) is not None:
        return miss
    centered = sub.outputs[0]
    squares = [n for n in consumers(centered) if scope.alive(n) and is_default_domain(n)
               and _square_of(n, centered)]
    if len(squares) != 1:
        return Miss("no square of x - mean")
    variance = _mean_of_square(squares[0], scope, rank)
    if not variance:
        return variance
    tail = _inverse_std(variance, centered, scope, rank)
    if not tail:
        return tail
    epsilon, rest = tail
    match = NormMatch(x, epsilon, [mean, sub, squares[0], variance, *rest])
    if not scope.private(match.nodes, keep=match.output):
        return Miss("an intermediate is used elsewhere")
    return _affine(match, scope, with_bias=True)


def _is_centered(x: gs.Tensor, scope: Scope) -> bool:
    """``x`` is Sub(y, ReduceMean(y)): the middle of a LayerNorm, not an RMSNorm."""
    sub = scope.producer(x, "Sub")
    mean = scope.producer(sub.inputs[1], "ReduceMean") if sub is not None else None
    return mean is not None and mean.inputs[0] is sub.inputs[0]


def match_rms_norm(square: gs.Node, scope: Scope) -> NormMatch | Miss | None:
    """Pow(x, 2) | Mul(x, x) → ReduceMean → Add ε → Sqrt → Div | Reciprocal+Mul
    [→ Mul γ], over the last axis of float32 x."""
    x = square.inputs[0] if square.inputs else None
    if x is None or not _square_of(square, x) or \
            scope.only_reader(square.outputs[0], "ReduceMean") is None:
        return None  # not the start of an RMSNorm
    rank = rank_of(x)
    if _is_centered(x, scope):
        return Miss("the input is centered: a LayerNorm")
    if (miss := _checked_input(x)) is not None:
        return miss
    variance = _mean_of_square(square, scope, rank)
    if not variance:
        return variance
    tail = _inverse_std(variance, x, scope, rank)
    if not tail:
        return tail
    epsilon, rest = tail
    match = NormMatch(x, epsilon, [square, variance, *rest])
    if not scope.private(match.nodes, keep=match.output):
        return Miss("an intermediate is used elsewhere")
    return _affine(match, scope, with_bias=False)


# ---------------------------------------------------------------------- passes
def _fuse_all(model: Model, anchors: tuple[str, ...], matcher, required: int,
              upgrade: bool, rewrite) -> PassResult:
    """Match at every ``anchors`` node; when there are matches and the model is older
    than opset ``required``, upgrade it first (if ``upgrade``) and match again; rewrite
    every match."""
    scope = Scope(model)
    found = _matches(scope, anchors, matcher)
    upgraded = {}
    if found and model.opset < required:
        why = upgrade_opset(model, required) if upgrade else "upgrade-opset is off"
        if why is not None:
            return PassResult(changed=False, stats=scope.stats(
                0, skipped=f"needs opset {required}: {why}"))
        upgraded = {"opset_upgraded_to": required}
        scope = Scope(model)
        found = _matches(scope, anchors, matcher)
    for match in found:
        rewrite(match, scope)
    return PassResult(changed=bool(found or upgraded), stats=scope.stats(len(found), **upgraded))


def _matches(scope: Scope, anchors: tuple[str, ...], matcher) -> list[NormMatch]:
    """Non-overlapping matches over every graph, in graph order."""
    found, taken = [], set()
    for graph in scope.graphs:
        for node in list(graph.nodes):
            if node.op not in anchors or not is_default_domain(node) or id(node) in taken:
                continue
            match = matcher(node, scope)
            if match is None:
                continue
            if not match:
                scope.miss(match)
            elif not taken.intersection(id(n) for n in match.nodes):
                taken.update(id(n) for n in match.nodes)
                found.append(match)
    return found


def _scale_or_ones(match: NormMatch, scope: Scope) -> gs.Tensor:
    if match.scale is not None:
        return match.scale
    return scope.constant("norm_scale_ones", np.ones(last_dim(match.x), dtype=np.float32))


class FuseLayerNorm(Pass):
    """Fuse decomposed LayerNorm arithmetic over the last axis into LayerNormalization."""

    name = "fuse-layer-norm"
    family = "fusion"
    lossless = True
    emits = (("", "LayerNormalization"),)

    @dataclass(frozen=True)
    class Options:
        upgrade_opset: bool = True  # raise opset 13-16 models to 17 to emit the op

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if not ctx.supports("LayerNormalization", ""):
            return PassResult(changed=False, stats={"fused": 0})

        def rewrite(match: NormMatch, scope: Scope) -> None:
            inputs = [match.x, _scale_or_ones(match, scope)]
            if match.bias is not None:
                inputs.append(match.bias)
            scope.replace(match.nodes, "LayerNormalization", inputs, [match.output],
                          {"axis": -1, "epsilon": float(match.epsilon)})

        return _fuse_all(model, ("ReduceMean",), match_layer_norm, LAYER_NORM_OPSET,
                         self.options.upgrade_opset, rewrite)


class FuseRmsNorm(Pass):
    """Fuse x / sqrt(mean(x^2) + eps) [* gamma] over the last axis into RMSNormalization."""

    name = "fuse-rms-norm"
    family = "fusion"
    lossless = True
    emits = (("", "RMSNormalization"),)

    @dataclass(frozen=True)
    class Options:
        upgrade_opset: bool = True  # raise opset 13-22 models to 23 to emit the op

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if not ctx.supports("RMSNormalization", ""):
            return PassResult(changed=False, stats={"fused": 0})

        def rewrite(match: NormMatch, scope: Scope) -> None:
            scope.replace(match.nodes, "RMSNormalization",
                          [match.x, _scale_or_ones(match, scope)], [match.output],
                          {"axis": -1, "epsilon": float(match.epsilon)})

        return _fuse_all(model, ("Pow", "Mul"), match_rms_norm, RMS_NORM_OPSET,
                         self.options.upgrade_opset, rewrite)


# ---------------------------------------------------------------------- skip layer norm
@dataclass
class SkipMatch:
    """Add(input, skip) [+ bias] → norm: what a Skip*LayerNormalization computes."""

    norm: gs.Node
    adds: list[gs.Node]  # the outer Add last
    input: gs.Tensor
    skip: gs.Tensor
    bias: gs.Tensor | None

    @property
    def sum(self) -> gs.Tensor:
        return self.adds[-1].outputs[0]


# ONNX Runtime's kernels take a 2-D or 3-D input; a 3-D input's skip may also be
# [1, S, H] or [S, H] (checked against ORT 1.32: other broadcasts are rejected or wrong).
def _skip_fits(inp: gs.Tensor, skip: gs.Tensor, total: gs.Tensor) -> bool:
    """Whether Add(inp, skip) provably has inp's shape and skip a shape the kernels take."""
    shape, other = inp.shape, skip.shape
    if shape is None or other is None or len(shape) not in (2, 3) \
            or not same_shape(shape, total.shape):
        return False
    if same_shape(other, shape):
        return True
    if len(shape) == 3 and len(other) == 3 and other[0] == 1:
        return same_shape(other[1:], shape[1:])
    return len(shape) == 3 and len(other) == 2 and same_shape(other, shape[1:])


def _bias(tensor: gs.Tensor, size: int) -> bool:
    """A constant float32 [size] vector."""
    value = constant_value(tensor)
    return value is not None and value.shape == (size,) and value.dtype == FLOAT32


def _readings(add: gs.Node, size: int, scope: Scope) -> list[tuple]:
    """The ways to read Add(a, b) as (adds, input, skip, bias): with a bias Add around
    the sum or on an operand folded in (its output read by the outer Add only), then
    plain; each both ways round."""
    a, b = add.inputs
    readings = []
    for inner, bias in ((a, b), (b, a)):  # (p + q) + bias
        inner_add = scope.producer(inner, "Add")
        if _bias(bias, size) and inner_add is not None and len(inner_add.inputs) == 2 \
                and scope.only_reader(inner, "Add") is add:
            p, q = inner_add.inputs
            readings += [([inner_add, add], p, q, bias), ([inner_add, add], q, p, bias)]
    for biased, skip in ((a, b), (b, a)):  # (x + bias) + skip
        inner_add = scope.producer(biased, "Add")
        if inner_add is None or len(inner_add.inputs) != 2 \
                or scope.only_reader(biased, "Add") is not add:
            continue
        for x, bias in (inner_add.inputs, inner_add.inputs[::-1]):
            if _bias(bias, size) and not _bias(x, size):
                readings += [([inner_add, add], x, skip, bias),
                             ([inner_add, add], skip, x, bias)]
    return readings + [([add], a, b, None), ([add], b, a, None)]


def match_skip_norm(norm: gs.Node, scope: Scope) -> SkipMatch | Miss:
    """Add(a, b) → LayerNormalization | RMSNormalization over the last axis, float32;
    a bias Add of a constant [H] vector on either operand (or around the sum) folds in."""
    if len(norm.inputs) < 2 or any(out.name and (out.outputs or scope.is_graph_output(out))
                                   for out in norm.outputs[1:]):
        return Miss("uses the mean or inverse std output")
    total, size = norm.inputs[0], last_dim(norm.inputs[0])
    rank = rank_of(total)
    if dtype_of(total) != FLOAT32 or size is None:
        return Miss("not float32 with a known hidden size")
    if norm.attrs.get("axis", -1) not in (-1, (rank or 0) - 1) or \
            norm.attrs.get("stash_type", 1) != 1:
        return Miss("not over the last axis in float32")
    params = [t for t in norm.inputs[1:] if t.name]
    if any(t.shape is None or len(t.shape) != 1 or not same_dim(t.shape[0], size)
           for t in params):
        return Miss("scale or bias is not a [hidden] vector")
    add = scope.producer(total, "Add")
    if add is None or len(add.inputs) != 2 or scope.owner[id(add)] is not scope.owner[id(norm)]:
        return Miss("no Add before the norm")
    for adds, inp, skip, bias in _readings(add, size, scope):
        if dtype_of(inp) == FLOAT32 and dtype_of(skip) == FLOAT32 and \
                _skip_fits(inp, skip, total):
            return SkipMatch(norm, adds, inp, skip, bias)
    return Miss("input and skip shapes not provably compatible")


class FuseSkipLayerNorm(Pass):
    """Fuse a residual Add (and bias) into the LayerNorm/RMSNorm after it (com.microsoft)."""

    name = "fuse-skip-layer-norm"
    family = "fusion"
    lossless = True
    alternative = True  # ORT 1.32's CPU kernel measured 5x slower than Add + LayerNorm
    runtime_rewrites = {"ort": ("SkipLayerNormFusion",)}  # ORT's session does the same
    emits = ((MICROSOFT, "SkipLayerNormalization"),
             (MICROSOFT, "SkipSimplifiedLayerNormalization"))

    FUSED = {"LayerNormalization": "SkipLayerNormalization",
             "RMSNormalization": "SkipSimplifiedLayerNormalization"}

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        scope = Scope(model)
        fused = 0
        for graph in scope.graphs:
            for node in list(graph.nodes):
                op = self.FUSED.get(node.op)
                if op is None or not is_default_domain(node) or not scope.alive(node) \
                        or not ctx.supports(op, MICROSOFT):
                    continue
                match = match_skip_norm(node, scope)
                if not match:
                    scope.miss(match)
                    continue
                _rewrite_skip(match, op, scope)
                model.require_opset(MICROSOFT, 1)
                fused += 1
        return PassResult(changed=fused > 0, stats=scope.stats(fused))


def _rewrite_skip(match: SkipMatch, op: str, scope: Scope) -> None:
    """One ``op`` node replaces the Adds and the norm; when the sum is read elsewhere (or
    is a graph output) it becomes the fused node's 4th output (input + skip + bias)."""
    norm, empty = match.norm, gs.Variable.empty
    beta = norm.inputs[2] if len(norm.inputs) > 2 and norm.inputs[2].name else None
    inputs = [match.input, match.skip, norm.inputs[1]]
    if op == "SkipLayerNormalization":
        inputs.append(beta if beta is not None else empty())
    if match.bias is not None:
        inputs.append(match.bias)
    while not inputs[-1].name:
        inputs.pop()
    total = match.sum
    outputs = [norm.outputs[0]]
    if scope.is_graph_output(total) or any(r is not norm for r in consumers(total)):
        outputs += [empty(), empty(), total]
    epsilon = float(norm.attrs.get("epsilon", 1e-5))
    scope.replace([*match.adds, norm], op, inputs, outputs, {"epsilon": epsilon},
                  domain=MICROSOFT)
