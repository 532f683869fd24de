"""Lossless Transpose removal: fold Transposes into the matrix products reading them, and
sink Transposes through elementwise ops until they meet another Transpose.

* ``fold-transpose-into-gemm``: ``Gemm(Transpose(a), ...)`` flips ``transA``/``transB``;
  ``MatMul(x, Transpose(W))`` with a constant ``W`` read by nothing else stores ``W``
  transposed; a 2-D ``MatMul`` with a transposed operand becomes a ``Gemm`` with
  ``transA``/``transB``.
* ``sink-transposes``: moves a Transpose below the elementwise ops reading it (unary ones,
  and broadcasting ones whose other operands are constants, permuted to match, broadcast
  scalars, or Transposes by the same perm) when that lets it cancel or merge with the
  Transposes further down. The whole region of elementwise ops below the Transpose moves
  at once (every reader of every tensor in it, so branches that rejoin, as in an exported
  GELU, move together); it moves only when that removes Transposes: every entry goes,
  every exit composes with the perm, and a region tensor read outside the region (or a
  graph output) needs a Transpose back. A Transpose whose output is a graph output or is
  read by something that cannot move stays.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import Model
from graphopt.pass_infra import Pass, PassContext, PassResult
from graphopt.rewrite import (bypass, consumers, constant_value, is_graph_output,
                              remove_node, tensor_names, unique_name, walk)

FLOATS = ("float16", "float32", "float64")


def _is_default_domain(node: gs.Node) -> bool:
    return node.domain in (None, "", "ai.onnx")


def _perm(node: gs.Node) -> list[int] | None:
    """The permutation of a Transpose (default: reversed axes, which needs the rank)."""
    if node.op != "Transpose" or not _is_default_domain(node) or not node.inputs:
        return None
    if "perm" in node.attrs:
        perm = [int(p) for p in node.attrs["perm"]]
        return perm if sorted(perm) == list(range(len(perm))) else None
    shape = node.inputs[0].shape
    return None if shape is None else list(reversed(range(len(shape))))


def _inverse(perm: list[int]) -> list[int]:
    return [int(i) for i in np.argsort(perm)]


def _permuted_shape(shape, perm: list[int]):
    return None if shape is None or len(shape) != len(perm) else [shape[p] for p in perm]


class _Graphs:
    """The graphs of a model, which graph owns each node, and the tensor names in use."""

    def __init__(self, model: Model):
        self.graphs = list(model.all_graphs())
        self.owner = {id(n): g for g in self.graphs for n in g.nodes}
        self.names = tensor_names(self.graphs)
        self.removed: set[int] = set()

    def is_output(self, tensor: gs.Tensor) -> bool:
        return is_graph_output(tensor, self.graphs)

    def remove(self, node: gs.Node) -> None:
        remove_node(node, self.owner[id(node)])
        self.removed.add(id(node))

    def remove_if_unused(self, node: gs.Node) -> bool:
        if any(t.outputs or self.is_output(t) for t in node.outputs):
            return False
        self.remove(node)
        return True

    def constant(self, hint: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(unique_name(self.names, hint), np.ascontiguousarray(value))

    def variable(self, hint: str, dtype, shape) -> gs.Variable:
        return gs.Variable(unique_name(self.names, hint), dtype=dtype, shape=shape)

    def same_graph(self, a: gs.Node, b: gs.Node) -> bool:
        return self.owner.get(id(a)) is self.owner.get(id(b)) and id(a) in self.owner


# ====================================================================== fold-transpose-into-gemm
def _transpose_2d(tensor: gs.Tensor) -> gs.Node | None:
    """The Transpose swapping the two axes of a 2-D tensor that writes ``tensor``."""
    if len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    perm = _perm(node)
    return node if perm == [1, 0] else None


def _rank(tensor: gs.Tensor) -> int | None:
    return None if tensor.shape is None else len(tensor.shape)


def _is_float(tensor: gs.Tensor) -> bool:
    try:
        return tensor.dtype is not None and np.dtype(tensor.dtype).name in FLOATS
    except TypeError:  # a type numpy does not know (bfloat16, ...)
        return False


def _only_reader(tensor: gs.Tensor, node: gs.Node) -> bool:
    readers = consumers(tensor)
    return len(readers) == 1 and readers[0] is node


class FoldTransposeIntoGemm(Pass):
    """Fold 2-D Transposes into Gemm's transA/transB and constant MatMul weights."""

    name = "fold-transpose-into-gemm"
    family = "fusion"
    lossless = True
    emits = (("", "Gemm"),)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        scope = _Graphs(model)
        stats = {"flipped": 0, "weights_transposed": 0, "matmul_to_gemm": 0}
        touched: list[gs.Node] = []
        for _, node in walk(scope.graphs):
            if not _is_default_domain(node) or id(node) in scope.removed:
                continue
            if node.op == "Gemm":
                touched += self._flip_gemm(node, stats)
            elif node.op == "MatMul" and len(node.inputs) == 2:
                touched += self._fold_weight(node, scope, stats)
                if model.opset >= 11 and ctx.supports("Gemm"):
                    touched += self._matmul_to_gemm(node, stats)
        for transpose in touched:
            if id(transpose) not in scope.removed:
                scope.remove_if_unused(transpose)
        return PassResult(changed=any(stats.values()), stats=stats)

    @staticmethod
    def _flip_gemm(gemm: gs.Node, stats: dict) -> list[gs.Node]:
        """Gemm(Transpose(a), b) -> Gemm(a, b, transA=!transA); same for B."""
        found = []
        for index, attr in ((0, "transA"), (1, "transB")):
            if len(gemm.inputs) <= index:
                continue
            transpose = _transpose_2d(gemm.inputs[index])
            if transpose is None:
                continue
            gemm.inputs[index] = transpose.inputs[0]
            gemm.attrs[attr] = 0 if gemm.attrs.get(attr, 0) else 1
            stats["flipped"] += 1
            found.append(transpose)
        return found

    @staticmethod
    def _fold_weight(matmul: gs.Node, scope: _Graphs, stats: dict) -> list[gs.Node]:
        """MatMul(x, Transpose(W)) with a constant W read only by that Transpose, and the
        Transpose read only by MatMuls: store W transposed (once, for all of them)."""
        for index in (0, 1):
            tensor = matmul.inputs[index]
            if len(tensor.inputs) != 1:
                continue
            transpose = tensor.inputs[0]
            perm = _perm(transpose)
            weight_t = transpose.inputs[0] if perm is not None else None
            weight = constant_value(weight_t) if weight_t is not None else None
            if weight is None or weight.ndim != len(perm) or scope.is_output(tensor) \
                    or scope.is_output(weight_t) or not _only_reader(weight_t, transpose) \
                    or not all(r.op == "MatMul" and _is_default_domain(r)
                               for r in consumers(tensor)):
                continue
            folded = scope.constant(f"{weight_t.name}_transposed", weight.transpose(perm))
            for reader in consumers(tensor):
                for i, t in enumerate(reader.inputs):
                    if t is tensor:
                        reader.inputs[i] = folded
            producer = weight_t.inputs[0] if weight_t.inputs else None
            scope.remove(transpose)
            if producer is not None and id(producer) in scope.owner:  # a Constant node
                scope.remove_if_unused(producer)
            stats["weights_transposed"] += 1
        return []

    @staticmethod
    def _matmul_to_gemm(matmul: gs.Node, stats: dict) -> list[gs.Node]:
        """A 2-D MatMul reading a 2-D Transpose -> Gemm with transA/transB."""
        a, b = matmul.inputs
        if _rank(a) != 2 or _rank(b) != 2 or not _is_float(a) or not _is_float(b):
            return []
        transposes = [_transpose_2d(a), _transpose_2d(b)]
        if all(t is None for t in transposes):
            return []
        attrs = {}
        for index, (attr, transpose) in enumerate(zip(("transA", "transB"), transposes)):
            if transpose is not None:
                matmul.inputs[index] = transpose.inputs[0]
                attrs[attr] = 1
        matmul.op = "Gemm"
        matmul.attrs = attrs
        stats["matmul_to_gemm"] += 1
        return [t for t in transposes if t is not None]


# ====================================================================== sink-transposes
# Elementwise ops of one data input (other inputs, if any, are scalar parameters).
UNARY = frozenset({
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Cast", "Ceil", "Celu",
    "Clip", "Cos", "Cosh", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish",
    "IsInf", "IsNaN", "LeakyRelu", "Log", "Mish", "Neg", "Not", "Reciprocal", "Relu",
    "Round", "Selu", "Sigmoid", "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt",
    "Swish", "Tan", "Tanh", "ThresholdedRelu",
})
# Elementwise ops whose inputs all broadcast against each other.
BROADCASTING = frozenset({
    "Add", "And", "Div", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Max",
    "Mean", "Min", "Mod", "Mul", "Or", "Pow", "PRelu", "Sub", "Sum", "Where", "Xor",
})
MS_UNARY = frozenset({"QuickGelu"})


def _unary(node: gs.Node) -> bool:
    if node.op in MS_UNARY and node.domain == "com.microsoft":
        return len(node.inputs) == 1
    return _is_default_domain(node) and node.op in UNARY and len(node.outputs) == 1


def _broadcasting(node: gs.Node) -> bool:
    return _is_default_domain(node) and node.op in BROADCASTING and len(node.outputs) == 1


def _broadcast_scalar(tensor: gs.Tensor, rank: int) -> bool:
    """Whether ``tensor`` is a known all-ones shape of rank <= ``rank`` (no permutation
    changes how it broadcasts)."""
    shape = tensor.shape
    return shape is not None and len(shape) <= rank and all(d == 1 for d in shape)


class _Region:
    """Tensors that hold values transposed by one perm, the elementwise nodes computing
    them, the Transposes by that perm they start from (entries) and the Transposes reading
    them (exits). Moving the perm to the other side of the region removes every entry,
    composes it into every exit, and needs a new Transpose only where a region tensor is
    read outside the region or is a graph output."""

    def __init__(self, start: gs.Node, perm: list[int]):
        self.perm = perm
        self.entries = [start]
        self.nodes: list[gs.Node] = []
        self.exits: list[gs.Node] = []
        self.tensors = {id(start.outputs[0]): start.outputs[0]}
        self.outside: dict[int, gs.Tensor] = {}  # region tensors read outside the region
        self.ids = {id(start)}

    def cost_change(self) -> int:
        """Transposes after the move minus Transposes before it."""
        identity = list(range(len(self.perm)))
        kept = sum(1 for e in self.exits if self.composed(e) != identity)
        return len(self.outside) + kept - len(self.entries) - len(self.exits)

    def composed(self, exit_node: gs.Node) -> list[int]:
        return [self.perm[i] for i in _perm(exit_node)]


class SinkTransposes(Pass):
    """Sink Transposes through elementwise ops so that they cancel or merge with others."""

    name = "sink-transposes"
    family = "layout"
    lossless = True
    emits = (("", "Transpose"),)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        self.scope = _Graphs(model)
        self.stats = {"moved": 0, "removed": 0, "cancelled": 0, "merged": 0}
        progress = True
        while progress:
            progress = False
            for _, node in walk(self.scope.graphs):
                if id(node) in self.scope.removed:
                    continue
                region = self._region(node)
                change = region.cost_change() if region is not None else 0
                if change < 0:
                    self._move(region)
                    self.stats["removed"] -= change
                    progress = True
        return PassResult(changed=self.stats["moved"] > 0, stats=self.stats)

    # ------------------------------------------------------------------ matching
    def _region(self, start: gs.Node) -> _Region | None:
        """Grow the region below Transpose ``start``; ``None`` when a region tensor is read
        in a way that cannot be moved (or ``start``'s own output is a graph output)."""
        perm = _perm(start)
        if perm is None or len(start.outputs) != 1 or self.scope.is_output(start.outputs[0]) \
                or id(start) not in self.scope.owner:
            return None
        region = _Region(start, perm)
        queue = [start.outputs[0]]
        waiting: list[tuple[gs.Tensor, gs.Node]] = []  # readers whose other operands may
        while True:                                      # join the region later
            while queue:
                tensor = queue.pop()
                if self.scope.is_output(tensor):
                    if self._is_entry_output(tensor, region):
                        return None
                    region.outside[id(tensor)] = tensor
                for reader in consumers(tensor):
                    if not self.scope.same_graph(reader, start):
                        return None
                    if id(reader) in region.ids:
                        continue
                    if _perm(reader) is not None and reader.inputs[0] is tensor:
                        region.exits.append(reader)
                        region.ids.add(id(reader))
                    elif not self._join(reader, region, queue):
                        waiting.append((tensor, reader))
            still = [(t, r) for t, r in waiting
                     if id(r) not in region.ids and not self._join(r, region, queue)]
            if len(still) == len(waiting) and not queue:
                break
            waiting = still
        for tensor, _ in waiting:
            if self._is_entry_output(tensor, region):
                return None  # an entry must go entirely, or there is no gain
            region.outside[id(tensor)] = tensor
        if any(id(e.inputs[0]) in region.tensors for e in region.entries):
            return None  # an entry reading the region (it is an exit too): leave it
        return region

    @staticmethod
    def _is_entry_output(tensor: gs.Tensor, region: _Region) -> bool:
        return len(tensor.inputs) == 1 and any(tensor.inputs[0] is e for e in region.entries)

    def _join(self, node: gs.Node, region: _Region, queue: list[gs.Tensor]) -> bool:
        """Add ``node`` (and the entries and elementwise nodes feeding it) to the region
        if it can join."""
        found = self._absorbable(node, region)
        if found is None:
            return False
        entries, above = found
        for entry in entries:
            region.entries.append(entry)
            region.ids.add(id(entry))
            region.tensors[id(entry.outputs[0])] = entry.outputs[0]
            queue.append(entry.outputs[0])
        for joined in (*above, node):
            region.nodes.append(joined)
            region.ids.add(id(joined))
            region.tensors[id(joined.outputs[0])] = joined.outputs[0]
            queue.append(joined.outputs[0])
        return True

    def _absorbable(self, node: gs.Node, region: _Region):
        """Whether elementwise ``node``, reading a region tensor, can join the region:
        (new entries, elementwise nodes above it joining too) if so, else ``None``.

        Each other operand must be a region tensor, a constant of rank <= the perm's, a
        broadcast scalar, or computed by elementwise ops from such operands and from
        Transposes by the region's perm (which become entries)."""
        if not (_unary(node) or _broadcasting(node)):
            return None
        if _unary(node) and (id(node.inputs[0]) not in region.tensors
                             or any(id(t) in region.tensors for t in node.inputs[1:])):
            return None
        entries: list[gs.Node] = []
        above: list[gs.Node] = []
        rank = len(region.perm)

        def joined(tensor: gs.Tensor) -> bool:
            return id(tensor) in region.tensors or any(
                tensor is n.outputs[0] for n in (*entries, *above))

        def resolve(tensor: gs.Tensor, depth: int) -> bool:
            if joined(tensor):
                return True
            producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
            if producer is None or depth > 16 or id(producer) in region.ids \
                    or len(producer.outputs) != 1 or not self.scope.same_graph(producer, node):
                return False
            if _perm(producer) == region.perm:
                entries.append(producer)
                return True
            if _unary(producer):
                data = producer.inputs[0]
                if not any(joined(t) for t in producer.inputs[1:]) and resolve(data, depth + 1):
                    above.append(producer)
                    return True
                return False
            if _broadcasting(producer) and operands_ok(producer, depth + 1):
                above.append(producer)
                return True
            return False

        def leaf(tensor: gs.Tensor) -> bool:
            value = constant_value(tensor)
            return (value is not None and value.ndim <= rank) or _broadcast_scalar(tensor, rank)

        def operands_ok(n: gs.Node, depth: int) -> bool:
            data = [t for t in n.inputs if not leaf(t)]
            return bool(data) and all(resolve(t, depth) for t in data)

        if _broadcasting(node) and not operands_ok(node, 0):
            return None
        return entries, above

    # ------------------------------------------------------------------ rewriting
    def _move(self, region: _Region) -> None:
        """Compute the region on untransposed values: entries go, exits compose with the
        perm, a region tensor read outside gets a Transpose of its own."""
        perm, inverse = region.perm, _inverse(region.perm)
        plain: dict[int, gs.Tensor] = {}  # region tensor -> its untransposed counterpart
        for entry in region.entries:
            plain[id(entry.outputs[0])] = entry.inputs[0]
        outputs = [node.outputs[0] for node in region.nodes]
        for out in outputs:
            plain[id(out)] = self.scope.variable(f"{out.name}_untransposed", out.dtype,
                                                 _permuted_shape(out.shape, inverse))
        for node, out in zip(region.nodes, outputs):
            for i, operand in enumerate(node.inputs):
                if id(operand) in plain:
                    node.inputs[i] = plain[id(operand)]
                elif _broadcasting(node):
                    value = constant_value(operand)
                    if value is not None and value.size > 1:
                        full = value.reshape((1,) * (len(perm) - value.ndim) + value.shape)
                        node.inputs[i] = self.scope.constant(f"{operand.name}_permuted",
                                                             full.transpose(inverse))
            node.outputs[0] = plain[id(out)]
        graph = self.scope.owner[id(region.entries[0])]
        for tensor in region.outside.values():  # now written by nothing: transpose back
            back = gs.Node("Transpose", name=f"{tensor.name}_transpose", attrs={"perm": perm},
                           inputs=[plain[id(tensor)]], outputs=[tensor])
            graph.nodes.append(back)
            self.scope.owner[id(back)] = graph
        for exit_node in region.exits:
            composed = region.composed(exit_node)
            exit_node.inputs[0] = plain[id(exit_node.inputs[0])]
            exit_node.attrs["perm"] = composed
            if composed == list(range(len(composed))):
                self.stats["cancelled"] += 1
                if bypass(exit_node, self.scope.owner[id(exit_node)]):
                    self.scope.removed.add(id(exit_node))
                else:  # a graph output that cannot take the input's name: keep a copy
                    exit_node.op, exit_node.attrs = "Identity", {}
            else:
                self.stats["merged"] += 1
        for entry in region.entries:
            self.scope.remove(entry)
        self.stats["moved"] += 1
