"""Transformer blocks on the ONNX graph, for structured pruning: feed-forward blocks
(intermediate neurons) and attention blocks (heads), with the edits both passes share.

* A **linear** is a MatMul whose second input is a constant 2-D weight (or a Transpose of
  one, as exporters leave large weights), with an optional bias Add of a constant vector.
* A **channel region** is what lies between a linear and the linear that consumes its
  output: elementwise ops only (bias Add, the GELU in any form: Div→Erf→Add→Mul→Mul,
  Gelu, FastGelu, BiasGelu with its bias, tanh forms, Relu...), whose other operands are
  scalars or per-channel constants. Every tensor in it loses the same channels.
* An **FFN block** is linear → channel region with a nonlinearity → linear.
* An **attention block** (``passes.prune.heads``) is three projections reshaped to
  [.., heads, head_size], a head axis followed through Transpose, scale, scores MatMul,
  mask Add, Softmax, context MatMul to the Reshape that merges heads, then a channel
  region to the output projection; or a com.microsoft Attention node and its output
  projection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.ir import Model
from graphopt.passes.prune import _obs
from graphopt.rewrite import constant_value, remove_dead, tensor_names, unique_name

NONLINEAR = {"Erf", "Gelu", "FastGelu", "BiasGelu", "QuickGelu", "Relu", "LeakyRelu",
             "Tanh", "Sigmoid", "Softplus", "Mish", "Elu", "Selu", "Celu", "HardSigmoid",
             "HardSwish", "Exp", "Pow", "Sqrt"}
ELEMENTWISE = NONLINEAR | {"Add", "Sub", "Mul", "Div", "Neg", "Abs", "Identity", "Dropout",
                           "Cast", "Clip", "Max", "Min", "Where", "IsNaN", "IsInf", "Not",
                           "And", "Or", "Equal", "Less", "Greater", "Reciprocal"}


# ============================================================================ linears
def const_input(node: gs.Node, index: int) -> np.ndarray | None:
    """The constant value of input ``index`` of ``node``, also through a Transpose of a
    constant read by this node alone (large weights exporters leave unfolded)."""
    if index >= len(node.inputs):
        return None
    tensor = node.inputs[index]
    value = constant_value(tensor)
    if value is not None:
        return value
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Transpose" and \
            len(tensor.outputs) == 1:
        transpose = tensor.inputs[0]
        source = constant_value(transpose.inputs[0])
        if source is not None:
            return np.transpose(source, transpose.attrs.get("perm"))
    return None


@dataclass
class Linear:
    """y = x @ W (+ b): ``node`` is the MatMul, ``bias_add`` the Add holding b."""

    node: gs.Node
    bias_add: gs.Node | None = None

    @property
    def weight(self) -> np.ndarray:
        return const_input(self.node, 1)

    @property
    def bias_index(self) -> int:
        return 0 if self.bias_add.inputs[1] is self.node.outputs[0] else 1

    @property
    def bias(self) -> np.ndarray | None:
        return None if self.bias_add is None else \
            constant_value(self.bias_add.inputs[self.bias_index])

    @property
    def output(self) -> gs.Tensor:
        return (self.bias_add or self.node).outputs[0]

    @property
    def outputs(self) -> list[gs.Tensor]:
        """The MatMul's output and, with a bias, the Add's: both carry the features."""
        return [self.node.outputs[0]] + ([self.bias_add.outputs[0]] if self.bias_add else [])


def linear_at(node: gs.Node, graph: gs.Graph) -> Linear | None:
    """``node`` as a linear layer, or None."""
    if node.op != "MatMul" or len(node.inputs) != 2 or constant_value(node.inputs[0]) \
            is not None:
        return None
    w = const_input(node, 1)
    if w is None or w.ndim != 2 or w.dtype.kind != "f":
        return None
    out = node.outputs[0]
    readers = out.outputs
    if len(readers) == 1 and readers[0].op == "Add" and out not in graph.outputs:
        add = readers[0]
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        b = constant_value(other)
        if b is not None and b.size == w.shape[1] and b.shape[-1] == w.shape[1]:
            return Linear(node, add)
    return Linear(node)


def linear_producing(tensor: gs.Tensor, graph: gs.Graph) -> Linear | None:
    """The linear whose output (with its bias) is ``tensor``."""
    if len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    if node.op == "MatMul":
        lin = linear_at(node, graph)
        return lin if lin is not None and lin.output is tensor else None
    if node.op == "Add":
        for t in node.inputs:
            if t.inputs and t.inputs[0].op == "MatMul":
                lin = linear_at(t.inputs[0], graph)
                if lin is not None and lin.bias_add is node:
                    return lin
    return None


# ============================================================================ regions
@dataclass
class Region:
    """Elementwise nodes between a producer of ``width`` channels (last axis) and the
    linears reading them; ``params``: (node, input) constants with a channel axis."""

    start: gs.Tensor
    width: int
    nodes: list[gs.Node] = field(default_factory=list)
    tensors: list[gs.Tensor] = field(default_factory=list)
    params: list[tuple[gs.Node, int]] = field(default_factory=list)
    ends: list[Linear] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def nonlinear(self) -> bool:
        return any(n.op in NONLINEAR for n in self.nodes)

    @property
    def end(self) -> Linear | None:
        return self.ends[0] if len(self.ends) == 1 and not self.problems else None


def channel_region(start: gs.Tensor, width: int, graph: gs.Graph) -> Region:
    """The channel region from ``start`` (see the module docstring); ``problems`` says
    why it cannot be narrowed, naming the node."""
    region = Region(start, width, tensors=[start])
    seen_t, seen_n = {id(start)}, set()
    outputs = {id(t) for t in graph.outputs}
    queue = [start]
    while queue:
        t = queue.pop(0)
        if id(t) in outputs:
            region.problems.append(f"tensor {t.name!r} is a graph output")
        for node in list(t.outputs):
            if id(node) in seen_n:
                continue
            seen_n.add(id(node))
            if node.op == "MatMul" and node.inputs[0] is t and node.inputs[1] is not t:
                lin = linear_at(node, graph)
                if lin is not None and lin.weight.shape[0] == width:
                    region.ends.append(lin)
                    continue
            if node.op not in ELEMENTWISE or len(node.outputs) != 1:
                region.problems.append(f"{t.name!r} is read by {node.op} node {node.name!r}")
                continue
            region.nodes.append(node)
            out = node.outputs[0]
            if id(out) not in seen_t:
                seen_t.add(id(out))
                region.tensors.append(out)
                queue.append(out)
    for node in region.nodes:
        for i, t in enumerate(node.inputs):
            if id(t) in seen_t or not t.name:
                continue
            value = constant_value(t)
            if value is None:
                region.problems.append(f"node {node.name!r} ({node.op}) also reads "
                                       f"{t.name!r} from outside the block")
            elif value.ndim and value.shape[-1] == width and width > 1:
                region.params.append((node, i))
            elif value.ndim and value.shape[-1] != 1:
                region.problems.append(f"node {node.name!r} reads constant {t.name!r} "
                                       f"of shape {list(value.shape)}")
    if not region.ends and not region.problems:
        region.problems.append(f"no linear layer reads the {width} channels of "
                               f"{start.name!r}")
    elif len(region.ends) > 1:
        region.problems.append(f"{len(region.ends)} layers read the channels of "
                               f"{start.name!r}")
    return region


# ============================================================================ FFN blocks
@dataclass
class FfnBlock:
    up: Linear
    region: Region
    reason: str | None = None

    @property
    def name(self) -> str:
        return self.up.node.name or self.up.node.outputs[0].name

    @property
    def width(self) -> int:
        return self.region.width

    @property
    def down(self) -> Linear:
        return self.region.end

    @property
    def activation(self) -> gs.Tensor:
        """What the down projection reads (the intermediate activation)."""
        return self.down.node.inputs[0]

    @property
    def tensors(self) -> list[gs.Tensor]:
        return self.region.tensors

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(n.name for n in [self.up.node, *self.region.nodes] +
                     ([self.down.node] if self.down else []))


def find_ffn_blocks(graph: gs.Graph) -> list[FfnBlock]:
    """Every linear → nonlinearity → linear block; those that cannot be narrowed with
    the reason (a linear whose region has no nonlinearity is no FFN: not listed)."""
    graph.toposort()
    out = []
    for node in graph.nodes:
        lin = linear_at(node, graph)
        if lin is None:
            continue
        width = int(lin.weight.shape[1])
        region = channel_region(node.outputs[0], width, graph)
        if not region.nonlinear:
            continue
        reason = region.problems[0] if region.problems else None
        if reason is None and width < 2:
            reason = "a single neuron"
        out.append(FfnBlock(lin, region, reason))
    return out


# ============================================================================ editing
class Editor:
    """Writes narrowed constants and shapes into a graph (unique names, shared
    constants copied, Transpose(constant) weights replaced by the constant)."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.taken = tensor_names([graph])
        self.dead: list[gs.Node] = []

    def set(self, node: gs.Node, index: int, value: np.ndarray) -> None:
        tensor = node.inputs[index]
        value = np.ascontiguousarray(value)
        if isinstance(tensor, gs.Constant) and len(tensor.outputs) == 1:
            tensor.values = value
            return
        if tensor.inputs:  # its producer (a weight's Transpose) may now be dead
            self.dead.append(tensor.inputs[0])
        node.inputs[index] = gs.Constant(unique_name(self.taken, f"{tensor.name}_pruned"),
                                         value)

    def take(self, node: gs.Node, index: int, kept: np.ndarray, axis: int) -> None:
        """Keep ``kept`` along ``axis`` of input ``index`` (a constant)."""
        self.set(node, index, np.take(const_input(node, index), kept, axis=axis))

    def finish(self) -> None:
        if self.dead:
            remove_dead(self.dead, self.graph)
            self.dead = []

    def add_bias(self, lin: Linear, delta: np.ndarray) -> None:
        """b += delta; a linear without a bias gets an Add that takes over the name of
        its output (so the layer's output keeps its name and meaning)."""
        if lin.bias_add is not None:
            b = lin.bias
            self.set(lin.bias_add, lin.bias_index,
                     (b + delta.reshape(b.shape)).astype(b.dtype))
            return
        out = lin.node.outputs[0]
        dtype = lin.weight.dtype
        inner = gs.Variable(unique_name(self.taken, f"{out.name}_matmul"), out.dtype,
                            out.shape)
        lin.node.outputs[0] = inner
        bias = gs.Constant(unique_name(self.taken, f"{lin.node.name or out.name}_bias"),
                           np.ascontiguousarray(delta.astype(dtype)))
        add = gs.Node("Add", unique_name(self.taken, f"{lin.node.name}_bias_add"),
                      inputs=[inner, bias], outputs=[out])
        self.graph.nodes.append(add)
        lin.bias_add = add


def narrow_dim(tensor: gs.Tensor, axis: int, size: int) -> None:
    """Record that ``tensor`` now has ``size`` on ``axis`` (when its shape is known)."""
    shape = tensor.shape
    if shape is None or not len(shape) or isinstance(tensor, gs.Constant):
        return
    shape = list(shape)
    if -len(shape) <= axis < len(shape):
        shape[axis] = size
        tensor.shape = shape


def expand(kept: np.ndarray, factor: int) -> np.ndarray:
    """Feature indices of the groups ``kept`` (each ``factor`` features wide)."""
    kept = np.asarray(kept, dtype=np.int64)
    return (kept[:, None] * factor + np.arange(factor)[None, :]).reshape(-1)


def narrow_region(ed: Editor, region: Region, cols: np.ndarray) -> dict:
    """Narrow a channel region's tensors and constants to ``cols`` and its end linear's
    weight rows; returns the kept map of its tensors."""
    for node, i in region.params:
        ed.take(node, i, cols, -1)
    for t in region.tensors:
        narrow_dim(t, -1, len(cols))
    end = region.end
    ed.take(end.node, 1, cols, 0)
    return {t.name: (-1, cols) for t in region.tensors}


def cut_and_refit(ed: Editor, lin: Linear, gram: np.ndarray, rows: np.ndarray,
                  cut: Callable[[], dict]) -> dict:
    """``cut()`` (narrows the graph, ``lin``'s input rows to ``rows`` among them; returns
    the kept map), then ``lin``'s kept rows and bias re-fitted by least squares from the
    Gram matrix of its input (``_obs.refit``, from its weights before the cut)."""
    weight, old = lin.weight, lin.bias
    w, bias = _obs.refit(gram, weight, old, rows)
    kept_map = cut()
    ed.set(lin.node, 1, w.astype(weight.dtype))
    ed.add_bias(lin, bias - (0.0 if old is None else old.reshape(-1)))
    return kept_map


def compensation(end: Linear, removed: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """FLAP bias compensation: what the removed inputs contributed on average,
    W[removed, :]ᵀ · mean(x[removed])."""
    w = end.weight.astype(np.float64)
    return w[removed].T @ np.asarray(mean, dtype=np.float64)[removed]


def keep_count(size: int, ratio: float, multiple: int) -> int:
    """Units kept when ``ratio`` of ``size`` go, rounded to ``multiple`` (1 for sizes
    under two multiples); at least one multiple, at most all."""
    m = multiple if multiple > 1 and size >= 2 * multiple else 1
    n = int(round(size * (1.0 - ratio) / m)) * m
    return int(min(size, max(m, n)))


def top(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` highest ``scores``, ascending (ties: lower index)."""
    return np.sort(np.argsort(-np.asarray(scores), kind="stable")[:count])


def tap_source(model: Model, reference: onnx.ModelProto | None,
               names: list[str]) -> onnx.ModelProto:
    """The model to capture ``names`` from: the original (``reference``) when it has
    them all, else the model itself."""
    if reference is not None:
        have = {o for n in reference.graph.node for o in n.output}
        if all(name in have for name in names):
            return reference
    return model.to_onnx()
