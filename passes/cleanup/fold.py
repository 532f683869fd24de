"""Constant folding (``fold-constants``) and shape folding (``fold-shapes``).

``fold-constants`` does its own bookkeeping and uses ONNX Runtime only to evaluate.
``gs.Graph.fold_constants`` (onnx-graphsurgeon 0.6) is not used because it folds
nondeterministic ops (``RandomNormal`` has no inputs, so "all inputs constant" holds),
logs and drops evaluation errors by default, corrupts a multi-output node when only
some of its outputs are folded (it removes the folded output from the node's output
list, shifting the others), and, with shape folding on, rewrites int->float->int
``Cast`` patterns, which is not exact.

Size rules of ``fold-constants``, so that folding never blows a model up:

* no tensor larger than ``size_limit`` bytes is computed, neither a result nor an
  intermediate value of its computation;
* a result larger than ``SMALL_BYTES`` is stored only if it is at most ``max_growth``
  times the bytes of the constants it frees (those that nothing but its computation
  reads). ``Tile``/``Expand``/``ConstantOfShape``/``Range`` of a small constant, or a
  copy of a weight that is still used elsewhere, therefore stay as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import verify
from graphopt.errors import ModelError
from graphopt.external_data import mapped_source
from graphopt.ir import Model, toposort
from graphopt.pass_infra import Pass, PassContext, PassResult
from graphopt.rewrite import (constant_value, produced_in, remove_dead, remove_node,
                              replace_with_constant, static_shape, tensor_names)
from graphopt.walk import STANDARD_DOMAINS

# Results up to this size are always folded: shape tensors, scalars, per-channel vectors
# (a conv bias of 4096 channels), which later fusions need as constants.
SMALL_BYTES = 16 * 1024
NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                              "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"})
# Quantize/dequantize pairs carry meaning for quantized back ends.
NEVER_FOLD = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
# Ops whose results are sequences or optionals, which cannot become initializers.
NON_TENSOR = frozenset({"SequenceConstruct", "SequenceEmpty", "SequenceInsert",
                        "SequenceErase", "SequenceAt", "SequenceLength", "SplitToSequence",
                        "ConcatFromSequence", "SequenceMap", "Optional",
                        "OptionalGetElement", "OptionalHasElement"})


class FoldConstants(Pass):
    """Evaluate nodes whose inputs are all constant and store their results as initializers."""

    name = "fold-constants"
    family = "cleanup"
    lossless = True

    @dataclass(frozen=True)
    class Options:
        size_limit: int = 1 << 20  # bytes; larger tensors are never computed or stored
        # Result bytes / bytes of the constants the fold frees, for results above
        # SMALL_BYTES; ``inf`` turns the rule off (fold anything under size_limit).
        max_growth: float = 1.25

        def __post_init__(self) -> None:
            if self.size_limit < 0:
                raise ValueError(f"size_limit must be >= 0, got {self.size_limit}")
            if not self.max_growth >= 0:
                raise ValueError(f"max_growth must be >= 0, got {self.max_growth}")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        graphs = list(model.all_graphs())
        taken = tensor_names(graphs)
        stats = dict.fromkeys(("nodes_folded", "constant_nodes_lowered", "tensors_folded",
                               "bytes_added", "skipped_size", "skipped_growth",
                               "eval_failed"), 0)
        for graph in graphs:
            stats["constant_nodes_lowered"] += _lower_constant_nodes(graph)
            _Folder(self.options, model, graph, graphs, taken, stats, ctx).run()
        changed = bool(stats["constant_nodes_lowered"] or stats["tensors_folded"])
        return PassResult(changed=changed, stats=stats)


def _lower_constant_nodes(graph: gs.Graph) -> int:
    """Turn ``Constant`` nodes into initializers of the same name (a graph output may be
    an initializer). String and sparse constants stay nodes."""
    lowered = 0
    for node in list(graph.nodes):
        if node.op != "Constant" or node.domain not in STANDARD_DOMAINS:
            continue
        out = node.outputs[0]
        attr = node.attrs.get("value")
        value = constant_value(out)
        if value is None or value.dtype == object:
            continue
        remove_node(node, graph)
        if isinstance(attr, gs.Constant):
            out.to_constant(attr._values)
        else:
            out.to_constant(value)
        lowered += 1
    return lowered


class _Folder:
    """Folding of one graph."""

    def __init__(self, options, model, graph, graphs, taken, stats, ctx):
        self.options, self.model, self.graph, self.graphs = options, model, graph, graphs
        self.taken, self.stats, self.ctx = taken, stats, ctx
        self.graph_inputs = {id(t) for t in graph.inputs}
        self.graph_outputs = {id(t) for g in graphs for t in g.outputs}

    def run(self) -> None:
        toposort(self.graph, recurse_subgraphs=False)
        blocked: set[int] = set()
        while True:
            foldable = self._foldable(blocked)
            frontier = [t for n in foldable.values() for t in n.outputs
                        if self._is_frontier(t, foldable)]
            too_big = [t for t in frontier if self._grows(t, _estimate_bytes(t), foldable)]
            if not too_big:
                break
            blocked |= {id(t.inputs[0]) for t in too_big}
            self.stats["skipped_growth"] += len(too_big)
        if not frontier:
            return
        values = self._evaluate(frontier, foldable)
        cone_nodes: dict[int, gs.Node] = {}
        for tensor in frontier:
            value = values.get(id(tensor))
            if value is None or not self._acceptable(tensor, value, foldable):
                continue
            replace_with_constant(tensor, value, self.graphs, self.taken)
            self.stats["tensors_folded"] += 1
            self.stats["bytes_added"] += int(value.nbytes)
            cone_nodes.update(self._cone(tensor, foldable)[0])
        order = [n for n in reversed(self.graph.nodes) if id(n) in cone_nodes]
        self.stats["nodes_folded"] += remove_dead(order, self.graph)

    # ------------------------------------------------------------------ selection
    def _foldable(self, blocked: set[int]) -> dict[int, gs.Node]:
        """Nodes computable before run time, in topological order, by id."""
        foldable: dict[int, gs.Node] = {}
        known: set[int] = set()
        for node in self.graph.nodes:
            if id(node) in blocked or not _eligible(node):
                continue
            if not all(self._is_known(t, known) for t in node.inputs):
                continue
            sizes = [_estimate_bytes(t) for t in node.outputs]
            if any(s is not None and s > self.options.size_limit for s in sizes):
                blocked.add(id(node))
                self.stats["skipped_size"] += 1
                continue
            foldable[id(node)] = node
            known.update(id(t) for t in node.outputs)
        return foldable

    def _is_known(self, tensor: gs.Tensor, known: set[int]) -> bool:
        if tensor.is_empty() or id(tensor) in known:
            return True
        return isinstance(tensor, gs.Constant) and id(tensor) not in self.graph_inputs

    def _is_frontier(self, tensor: gs.Tensor, foldable: dict[int, gs.Node]) -> bool:
        """Whether ``tensor`` is read outside the foldable region (or is a graph output)."""
        if tensor.is_empty():
            return False
        return id(tensor) in self.graph_outputs or \
            any(id(n) not in foldable for n in tensor.outputs)

    def _cone(self, tensor: gs.Tensor, foldable: dict[int, gs.Node]):
        """The foldable nodes computing ``tensor`` and the constants they read."""
        nodes: dict[int, gs.Node] = {}
        leaves: dict[int, gs.Constant] = {}
        stack = [tensor]
        while stack:
            t = stack.pop()
            if isinstance(t, gs.Constant):
                leaves[id(t)] = t
            elif t.inputs and id(t.inputs[0]) in foldable and id(t.inputs[0]) not in nodes:
                node = t.inputs[0]
                nodes[id(node)] = node
                stack.extend(node.inputs)
        return nodes, leaves

    def _grows(self, tensor: gs.Tensor, size: int | None, foldable) -> bool:
        """Whether storing ``size`` bytes for ``tensor`` grows the model too much."""
        if size is None or size <= SMALL_BYTES or math.isinf(self.options.max_growth):
            return False
        nodes, leaves = self._cone(tensor, foldable)
        freed = sum(_nbytes(c) for c in leaves.values()
                    if id(c) not in self.graph_outputs
                    and all(id(n) in nodes for n in c.outputs))
        return size > self.options.max_growth * freed

    def _acceptable(self, tensor: gs.Tensor, value, foldable) -> bool:
        if not isinstance(value, np.ndarray) or value.dtype == object:
            return False
        if isinstance(tensor.dtype, np.dtype) and value.dtype != tensor.dtype:
            return False
        if value.nbytes > self.options.size_limit:
            self.stats["skipped_size"] += 1
            return False
        if _estimate_bytes(tensor) is None and self._grows(tensor, value.nbytes, foldable):
            self.stats["skipped_growth"] += 1
            return False
        return True

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, frontier: list[gs.Tensor], foldable) -> dict[int, np.ndarray]:
        """Values of ``frontier`` by id: one ONNX Runtime session for all, and one per
        tensor if that fails (a failure is counted and logged, and that tensor stays)."""
        try:
            return self._run(frontier, foldable)
        except Exception:  # retried tensor by tensor below, where the error is reported
            pass
        values = {}
        for tensor in frontier:
            try:
                values.update(self._run([tensor], foldable))
            except Exception as exc:
                self.stats["eval_failed"] += 1
                self.ctx.logger.warning("fold-constants: cannot evaluate %r (%s): %s",
                                        tensor.name, tensor.inputs[0].op,
                                        str(exc).strip().splitlines()[0] if str(exc) else
                                        type(exc).__name__)
        return values

    def _run(self, outputs: list[gs.Tensor], foldable) -> dict[int, np.ndarray]:
        nodes: dict[int, gs.Node] = {}
        for tensor in outputs:
            nodes.update(self._cone(tensor, foldable)[0])
        mapping: dict[int, gs.Tensor] = {}

        def copy(t: gs.Tensor) -> gs.Tensor:
            if t.is_empty():
                return gs.Variable.empty()
            if id(t) not in mapping:
                # A weight still in its file runs as that (ORT maps it), not a copy.
                mapping[id(t)] = gs.Constant(t.name, mapped_source(t._values) or t._values) \
                    if isinstance(t, gs.Constant) else gs.Variable(t.name, dtype=t.dtype)
            return mapping[id(t)]

        copies = [gs.Node(n.op, n.name, dict(n.attrs), [copy(t) for t in n.inputs],
                          [copy(t) for t in n.outputs], n.domain)
                  for n in self.graph.nodes if id(n) in nodes]
        graph = gs.Graph(copies, [], [mapping[id(t)] for t in outputs], opset=self.model.opset,
                         import_domains=self.model.graph.import_domains)
        results = verify.run(gs.export_onnx(graph, do_type_check=False), {})
        return {id(t): np.asarray(results[t.name]) for t in outputs}


def _eligible(node: gs.Node) -> bool:
    return (node.domain in STANDARD_DOMAINS and node.op != "Constant"
            and node.op not in NONDETERMINISTIC and node.op not in NEVER_FOLD
            and node.op not in NON_TENSOR
            and not any(isinstance(v, gs.Graph) for v in node.attrs.values())
            and not any(isinstance(v, gs.Node.AttributeRef) for v in node.attrs.values()))


def _itemsize(dtype) -> int | None:
    if dtype is None:
        return None
    try:
        return np.dtype(dtype).itemsize
    except TypeError:
        return 2  # ONNX types numpy lacks (bfloat16, float8) are at most 2 bytes


def _nbytes(const: gs.Constant) -> int:
    """Size of a constant without loading lazily-held values."""
    return int(np.prod(const.shape, dtype=np.int64)) * (_itemsize(const.dtype) or 1)


def _estimate_bytes(tensor: gs.Tensor) -> int | None:
    """Bytes of ``tensor`` from its inferred shape, or from the inputs of the ops that
    make large tensors out of small ones; ``None`` when unknown."""
    itemsize = _itemsize(tensor.dtype)
    shape = static_shape(tensor)
    if shape is not None and itemsize is not None:
        return math.prod(shape) * itemsize
    elems = _estimate_elements(tensor.inputs[0]) if tensor.inputs else None
    return None if elems is None else elems * (itemsize or 1)


def _estimate_elements(node: gs.Node) -> int | None:
    values = [constant_value(t) for t in node.inputs]
    try:
        if node.op == "ConstantOfShape" and values[0] is not None:
            return math.prod(int(d) for d in values[0].ravel())
        if node.op == "Range" and all(v is not None for v in values):
            start, limit, delta = (float(v) for v in values)
            return max(math.ceil((limit - start) / delta), 0)
        if node.op in ("Expand", "Tile") and values[1] is not None \
                and node.inputs[0].shape is not None \
                and all(isinstance(d, int) for d in node.inputs[0].shape):
            dims, arg = tuple(node.inputs[0].shape), tuple(int(d) for d in values[1].ravel())
            if node.op == "Tile":
                return math.prod(d * r for d, r in zip(dims, arg))
            return math.prod(np.broadcast_shapes(dims, arg))
    except (ValueError, ZeroDivisionError, IndexError, TypeError):
        return None
    return None


class FoldShapes(Pass):
    """Replace Shape, Size and Gather/Slice of a Shape by constants where the dims are static."""

    name = "fold-shapes"
    family = "cleanup"
    lossless = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if _shapes_missing(model):
            try:
                model.infer_shapes()
            except ModelError as exc:
                ctx.logger.warning("fold-shapes: not folding: %s", exc)
                return PassResult(False, {"shapes_folded": 0, "shape_inference_failed": 1})
        graphs = list(model.all_graphs())
        taken = tensor_names(graphs)
        folded = removed = 0
        for graph in graphs:
            touched = []
            for node in list(graph.nodes):
                value = _shape_value(node, model.opset)
                if value is None:
                    continue
                touched.append(node)
                if node.op in ("Gather", "Slice") and produced_in(node.inputs[0], graph):
                    touched.append(node.inputs[0].inputs[0])
                replace_with_constant(node.outputs[0], value, graphs, taken)
                folded += 1
            removed += remove_dead(touched, graph)
        return PassResult(changed=folded > 0,
                          stats={"shapes_folded": folded, "nodes_removed": removed})


def _shapes_missing(model: Model) -> bool:
    """Whether some Shape or Size node reads a tensor of unknown rank."""
    return any(node.op in ("Shape", "Size") and node.inputs[0].shape is None
               for graph in model.all_graphs() for node in graph.nodes)


def _is_static(dim) -> bool:
    return isinstance(dim, (int, np.integer)) and dim >= 0


def _shape_dims(node: gs.Node) -> list | None:
    """The dims a ``Shape`` node returns (``start``/``end`` applied), static or not."""
    shape = node.inputs[0].shape
    if shape is None:
        return None
    rank = len(shape)
    start, end = node.attrs.get("start", 0), node.attrs.get("end", rank)
    start, end = (min(max(v + rank if v < 0 else v, 0), rank) for v in (start, end))
    return list(shape[start:end])


def _static_array(dims) -> np.ndarray | None:
    dims = np.asarray(dims, dtype=object)
    if not all(_is_static(d) for d in dims.ravel()):
        return None
    return dims.astype(np.int64)


def _shape_value(node: gs.Node, opset: int) -> np.ndarray | None:
    """The value of ``node``'s output if it only depends on static dims, else ``None``."""
    if node.domain not in STANDARD_DOMAINS:
        return None
    if node.op == "Shape":
        dims = _shape_dims(node)
        return None if dims is None else _static_array(dims)
    if node.op == "Size":
        shape = node.inputs[0].shape
        if shape is None or not all(_is_static(d) for d in shape):
            return None
        return np.array(math.prod(shape), dtype=np.int64)
    if node.op not in ("Gather", "Slice"):
        return None
    data = node.inputs[0]
    if len(data.inputs) != 1 or data.inputs[0].op != "Shape":
        return None
    dims = _shape_dims(data.inputs[0])
    if dims is None:
        return None
    if node.op == "Gather":
        indices = constant_value(node.inputs[1])
        if node.attrs.get("axis", 0) not in (0, -1) or indices is None \
                or not np.issubdtype(indices.dtype, np.integer) \
                or np.any(indices < -len(dims)) or np.any(indices >= len(dims)):
            return None
        return _static_array(np.asarray(dims, dtype=object)[indices])
    window = _slice_window(node, opset)
    if window is None:
        return None
    return _static_array([dims[i] for i in _slice_indices(len(dims), *window)])


def _slice_indices(n: int, start: int, end: int, step: int) -> range:
    """The indices ONNX ``Slice`` takes along an axis of size ``n``."""
    start, end = (v + n if v < 0 else v for v in (start, end))
    if step > 0:
        return range(min(max(start, 0), n), min(max(end, 0), n), step)
    return range(min(max(start, 0), n - 1), min(max(end, -1), n - 1), step)


def _slice_window(node: gs.Node, opset: int) -> tuple[int, int, int] | None:
    """(start, end, step) of a ``Slice`` of a 1-D tensor, if they are constant."""
    if opset < 10:
        starts, ends, axes = (node.attrs.get(k) for k in ("starts", "ends", "axes"))
        steps = [1]
    else:
        args = [constant_value(t) if not t.is_empty() else None for t in node.inputs[1:]]
        args += [None] * (4 - len(args))
        if args[0] is None or args[1] is None:
            return None
        if (len(node.inputs) > 3 and not node.inputs[3].is_empty() and args[2] is None) or \
                (len(node.inputs) > 4 and not node.inputs[4].is_empty() and args[3] is None):
            return None
        starts, ends, axes = args[0], args[1], args[2]
        steps = [1] if args[3] is None else args[3]
    if starts is None or ends is None:
        return None
    starts, ends, steps = (np.asarray(v).ravel() for v in (starts, ends, steps))
    if axes is not None and [int(a) for a in np.asarray(axes).ravel()] not in ([0], [-1]):
        return None
    if len(starts) != 1 or len(ends) != 1 or len(steps) != 1 or int(steps[0]) == 0:
        return None
    return int(starts[0]), int(ends[0]), int(steps[0])
