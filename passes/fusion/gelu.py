"""Lossless GELU fusions.

``fuse-gelu``
    0.5·x·(1 + erf(x/√2))                      → ``Gelu`` (opset 20) or com.microsoft ``Gelu``
    0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))  → ``Gelu(approximate="tanh")`` (opset 20)
                                                   or com.microsoft ``FastGelu``
``fuse-bias-gelu``
    Gelu(x + b), b a constant [H] vector          → com.microsoft ``BiasGelu(x, b)``
    FastGelu(x + b) (or tanh Gelu)                → com.microsoft ``FastGelu(x, b)``

Exporters write the formula in many operand orders (0.5 first or last, Div by √2 or Mul by
1/√2, x³ as Pow or as Muls, the 0.5 folded into the bracket, ...). Rather than listing
them, the matcher reads the arithmetic around an Erf/Tanh node as a polynomial in x and in
T, the Erf/Tanh value, and compares its coefficients with the formula's within 1e-4
(relative):

    erf:   argument of T  = 0.70711·x                 whole = 0.5·x + 0.5·x·T
    tanh:  argument of T  = 0.79788·x + 0.035677·x³   whole = 0.5·x + 0.5·x·T

The standard op is emitted when the model's opset has it (20) and the target runs it,
else the target's com.microsoft op; a target with neither is left as it is. Only float32
is fused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import Model
from graphopt.pass_infra import Pass, PassContext, PassResult
from graphopt.passes._patterns import (MICROSOFT, Miss, Scope, dtype_of, is_default_domain,
                                       last_dim, rank_of, scalar)
from graphopt.rewrite import constant_value

FLOAT32 = np.dtype(np.float32)
GELU_OPSET = 20
RTOL = 1e-4

Poly = dict[tuple[int, int], float]  # (power of x, power of T) -> coefficient

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
FORMS: dict[str, tuple[str, Poly]] = {  # approximate -> (the T op, T's argument)
    "none": ("Erf", {(1, 0): 1.0 / math.sqrt(2.0)}),
    "tanh": ("Tanh", {(1, 0): SQRT_2_OVER_PI, (3, 0): SQRT_2_OVER_PI * 0.044715}),
}
WHOLE: Poly = {(1, 0): 0.5, (1, 1): 0.5}  # 0.5·x·(1 + T)
MAX_DEGREE, MAX_NODES, MAX_CANDIDATES, MAX_STEPS = 4, 16, 8, 4


# ---------------------------------------------------------------------- polynomials
def _add(a: Poly, b: Poly, sign: float = 1.0) -> Poly:
    out = dict(a)
    for key, value in b.items():
        out[key] = out.get(key, 0.0) + sign * value
    return {k: v for k, v in out.items() if v != 0.0}


def _mul(a: Poly, b: Poly) -> Poly | None:
    out: Poly = {}
    for (i, j), u in a.items():
        for (k, l), v in b.items():
            if i + k > MAX_DEGREE or j + l > 1:
                return None
            out[(i + k, j + l)] = out.get((i + k, j + l), 0.0) + u * v
    return {k: v for k, v in out.items() if v != 0.0}


def _close(got: Poly | None, want: Poly) -> bool:
    return got is not None and set(got) == set(want) and \
        all(abs(got[k] - v) <= RTOL * abs(v) for k, v in want.items())


class _Arithmetic:
    """Reads the elementwise arithmetic writing a tensor as a polynomial in ``x`` and the
    ``atom`` tensor T. Every other operand must be a scalar constant; the nodes read are
    collected in ``nodes``."""

    OPS = ("Add", "Sub", "Mul", "Div", "Neg", "Pow")

    def __init__(self, scope: Scope, graph: gs.Graph, x: gs.Tensor,
                 atom: gs.Tensor | None = None):
        self.scope, self.graph, self.x, self.atom = scope, graph, x, atom
        self.rank = rank_of(x)
        self.nodes: dict[int, gs.Node] = {}
        self._memo: dict[int, Poly | None] = {}

    def __call__(self, tensor: gs.Tensor) -> Poly | None:
        if id(tensor) not in self._memo:
            self._memo[id(tensor)] = self._read(tensor)
        return self._memo[id(tensor)]

    def _read(self, tensor: gs.Tensor) -> Poly | None:
        if tensor is self.x:
            return {(1, 0): 1.0}
        if tensor is self.atom:
            return {(0, 1): 1.0}
        value = scalar(tensor, self.rank)
        if value is not None:
            return {(0, 0): value} if value else {}
        node = self.scope.producer(tensor, *self.OPS)
        if node is None or self.scope.owner.get(id(node)) is not self.graph \
                or len(self.nodes) >= MAX_NODES:
            return None
        self.nodes[id(node)] = node
        args = node.inputs
        if node.op == "Neg":
            a = self(args[0])
            return None if a is None else {k: -v for k, v in a.items()}
        if len(args) != 2:
            return None
        if node.op == "Pow":
            exponent = scalar(args[1], self.rank)
            base = self(args[0])
            if base is None or exponent is None or exponent != int(exponent) \
                    or not 0 <= exponent <= MAX_DEGREE:
                return None
            out: Poly | None = {(0, 0): 1.0}
            for _ in range(int(exponent)):
                out = _mul(out, base) if out is not None else None
            return out
        if node.op == "Div":
            divisor = scalar(args[1], self.rank)
            a = self(args[0])
            if a is None or not divisor:
                return None
            return {k: v / divisor for k, v in a.items()}
        a, b = self(args[0]), self(args[1])
        if a is None or b is None:
            return None
        if node.op == "Mul":
            return _mul(a, b)
        return _add(a, b, 1.0 if node.op == "Add" else -1.0)


# ---------------------------------------------------------------------- match
@dataclass
class GeluMatch:
    x: gs.Tensor
    approximate: str  # "none" (erf) or "tanh"
    nodes: list[gs.Node]  # the last one writes the result

    @property
    def output(self) -> gs.Tensor:
        return self.nodes[-1].outputs[0]


def _candidates(arg: gs.Tensor, scope: Scope) -> list[gs.Tensor]:
    """Tensors the argument of T is computed from through elementwise arithmetic,
    nearest first: the candidates for x."""
    found: list[gs.Tensor] = []
    frontier = [arg]
    while frontier and len(found) < MAX_CANDIDATES:
        nxt = []
        for tensor in frontier:
            node = scope.producer(tensor, *_Arithmetic.OPS)
            for t in node.inputs if node is not None else ():
                if constant_value(t) is None and all(t is not f for f in found):
                    found.append(t)
                    nxt.append(t)
        frontier = nxt
    return found[:MAX_CANDIDATES]


def match_gelu(t_node: gs.Node, scope: Scope) -> GeluMatch | Miss | None:
    """0.5·x·(1 + T), T = erf(x/√2) or tanh(√(2/π)·(x + 0.044715·x³)), float32 x."""
    approximate = {"Erf": "none", "Tanh": "tanh"}[t_node.op]
    graph = scope.owner[id(t_node)]
    arg, atom = t_node.inputs[0], t_node.outputs[0]
    for x in _candidates(arg, scope):
        inner = _Arithmetic(scope, graph, x)
        if not _close(inner(arg), FORMS[approximate][1]):
            continue
        if dtype_of(x) != FLOAT32 or rank_of(x) is None:
            return Miss("x is not float32 with a known rank")
        whole = _whole(atom, x, scope, graph)
        if whole is None:
            return Miss("not 0.5·x·(1 + T), or a part of it is used elsewhere")
        root, outer = whole
        nodes = {id(n): n for n in [*inner.nodes.values(), t_node, *outer]}
        nodes.pop(id(root))
        ordered = [*nodes.values(), root]
        if not scope.private(ordered, keep=root.outputs[0]):
            return Miss("an intermediate is used elsewhere")
        return GeluMatch(x, approximate, ordered)
    return Miss("the Erf/Tanh argument is not the GELU's")


def _whole(atom: gs.Tensor, x: gs.Tensor, scope: Scope,
           graph: gs.Graph) -> tuple[gs.Node, list[gs.Node]] | None:
    """Follow T's readers (one at a time) to the node computing 0.5·x·(1 + T):
    (that node, every node of the expression)."""
    tensor = atom
    for _ in range(MAX_STEPS):
        node = scope.only_reader(tensor, *_Arithmetic.OPS)
        if node is None:
            return None
        tensor = node.outputs[0]
        reader = _Arithmetic(scope, graph, x, atom)
        if _close(reader(tensor), WHOLE):
            return node, list(reader.nodes.values())
    return None


# ---------------------------------------------------------------------- passes
def _gelu_form(approximate: str, model: Model, ctx: PassContext) -> tuple[str, str] | None:
    """(domain, op) the target runs for this GELU: the standard op first."""
    if model.opset >= GELU_OPSET and ctx.supports("Gelu", ""):
        return "", "Gelu"
    op = "Gelu" if approximate == "none" else "FastGelu"
    return (MICROSOFT, op) if ctx.supports(op, MICROSOFT) else None


class FuseGelu(Pass):
    """Fuse the erf GELU and its tanh approximation written in elementwise ops into one op."""

    name = "fuse-gelu"
    family = "fusion"
    lossless = True
    emits = (("", "Gelu"), (MICROSOFT, "Gelu"), (MICROSOFT, "FastGelu"))

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        scope = Scope(model)
        fused = 0
        for graph in scope.graphs:
            for node in list(graph.nodes):
                if node.op not in ("Erf", "Tanh") or not is_default_domain(node) \
                        or not scope.alive(node):
                    continue
                form = _gelu_form("none" if node.op == "Erf" else "tanh", model, ctx)
                if form is None:
                    continue
                match = match_gelu(node, scope)
                if not match:
                    scope.miss(match)
                    continue
                domain, op = form
                attrs = {"approximate": "tanh"} if op == "Gelu" and not domain and \
                    match.approximate == "tanh" else {}
                scope.replace(match.nodes, op, [match.x], [match.output], attrs,
                              domain=domain or None)
                if domain:
                    model.require_opset(domain, 1)
                fused += 1
        return PassResult(changed=fused > 0, stats=scope.stats(fused))


# ---------------------------------------------------------------------- bias gelu
@dataclass
class BiasGeluMatch:
    gelu: gs.Node
    add: gs.Node
    x: gs.Tensor
    bias: gs.Tensor
    approximate: str


def _approximation(node: gs.Node) -> str | None:
    """"none" or "tanh" for a single-input GELU node of either domain, else None."""
    if len(node.inputs) != 1 and not (node.op == "FastGelu" and len(node.inputs) == 2
                                      and not node.inputs[1].name):
        return None
    domain = node.domain or ""
    if domain == MICROSOFT:
        return {"Gelu": "none", "FastGelu": "tanh"}.get(node.op)
    if domain in ("", "ai.onnx") and node.op == "Gelu":
        mode = node.attrs.get("approximate", "none")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        return mode if mode in ("none", "tanh") else None
    return None


def match_bias_gelu(gelu: gs.Node, scope: Scope) -> BiasGeluMatch | Miss | None:
    """Add(x, b) → GELU, with b a constant float32 vector the size of x's last axis."""
    approximate = _approximation(gelu)
    if approximate is None:
        return None
    add = scope.producer(gelu.inputs[0], "Add")
    if add is None or len(add.inputs) != 2:
        return None
    if scope.sole_reader(gelu.inputs[0]) is not gelu \
            or scope.owner[id(add)] is not scope.owner[id(gelu)]:
        return Miss("the sum is used elsewhere")
    for x, bias in (add.inputs, add.inputs[::-1]):
        value = constant_value(bias)
        size = last_dim(x)
        if value is None or constant_value(x) is not None:
            continue
        if dtype_of(x) != FLOAT32 or value.dtype != FLOAT32 or size is None \
                or value.shape != (size,):
            return Miss("bias is not a float32 [hidden] vector")
        return BiasGeluMatch(gelu, add, x, bias, approximate)
    return Miss("no constant bias")


class FuseBiasGelu(Pass):
    """Fold the bias Add before a GELU into com.microsoft BiasGelu (FastGelu for tanh)."""

    name = "fuse-bias-gelu"
    family = "fusion"
    lossless = True
    emits = ((MICROSOFT, "BiasGelu"), (MICROSOFT, "FastGelu"))

    FUSED = {"none": "BiasGelu", "tanh": "FastGelu"}

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        scope = Scope(model)
        fused = 0
        for graph in scope.graphs:
            for node in list(graph.nodes):
                if node.op not in ("Gelu", "FastGelu") or not scope.alive(node):
                    continue
                match = match_bias_gelu(node, scope)
                if match is None:
                    continue
                if not match:
                    scope.miss(match)
                    continue
                op = self.FUSED[match.approximate]
                if not ctx.supports(op, MICROSOFT):
                    continue
                scope.replace([match.add, match.gelu], op, [match.x, match.bias],
                              [match.gelu.outputs[0]], domain=MICROSOFT)
                model.require_opset(MICROSOFT, 1)
                fused += 1
        return PassResult(changed=fused > 0, stats=scope.stats(fused))
