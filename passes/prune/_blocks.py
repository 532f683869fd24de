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


def gates_score(ctx, refit: bool) -> bool:
    """Whether a pass's gated session may score its sites alone: always without
    recovery; under recovery (the core would build and recover each site) only when the
    gates include the re-fit where the site is cut, which is most of what recovery does
    for a single site (the combined candidates still get the full recovery)."""
    return ctx is None or ctx.recovery is None or refit


def compensation(end: Linear, removed: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """FLAP bias compensation: what the removed inputs contributed on average,
    W[removed, :]ᵀ · mean(x[removed])."""
    w = end.weight.astype(np.float64)
    return w[removed].T @ np.asarray(mean, dtype=np.float64)[removed]


# ============================================================================ gates
MASK, OFFSET = ".gate_mask", ".gate_offset"  # suffixes of the gate inputs


def output_error(reference: list[dict], outputs: list[dict]) -> float:
    """‖y − y₀‖² / ‖y₀‖² over every output and batch."""
    num = den = 0.0
    for ref, got in zip(reference, outputs):
        for name, r in ref.items():
            a = np.asarray(r, dtype=np.float64)
            num += float(((np.asarray(got[name], dtype=np.float64) - a) ** 2).sum())
            den += float((a ** 2).sum())
    return num / den if den else num


class PointRunner:
    """ONNX Runtime runs of ``model`` over ``data`` with one point gated at a time.

    A point is a linear (node name -> point name in ``points``) whose input x becomes
    x·mask + offset, mask and offset inputs of the run: switching a unit off (mask 0,
    offset its mean) is then exactly pruning it with compensation. With ``matrix`` the
    mask is a square matrix and the gate x @ mask + offset: any linear re-fit of the
    layer from its kept inputs (``_obs.gate``) is then exact too.

    What lies upstream of a point is the same for all of its settings, so the tensors
    the rest of the model reads from there are computed once (one run of the model for
    all points) and each setting runs only the part downstream, with that point's gate
    alone (on MiniLM a matrix gate costs more than the block it gates: the whole model
    with every gate in place ran 3.4x slower). ``run({point: (mask, offset)})`` gives
    the outputs on every batch (``{}``: the model's own, ``reference``); ``error`` their
    ‖y − y₀‖² / ‖y₀‖²."""

    def __init__(self, model: Model, points: dict[str, str], data: list[dict],
                 matrix: bool = False):
        from graphopt import verify

        self.matrix, self.data = matrix, data
        nodes = {n.name: n for n in model.graph.nodes}
        self.suffix: dict[str, tuple[list[str], list[str]]] = {}  # point -> (inputs, outputs)
        outputs = [t.name for t in model.graph.outputs]
        # what depends on the data (a weight behind a Transpose does not: its producer
        # stays in the part run, not an input of it)
        data_made = {id(t) for n in _downstream(*model.graph.inputs) for t in n.outputs}
        data_made |= {id(t) for t in model.graph.inputs}
        for node_name, point in points.items():
            below = _downstream(nodes[node_name])
            made = {id(t) for n in below for t in n.outputs}
            reads = [t for n in below for t in n.inputs if isinstance(t, gs.Variable) and
                     id(t) not in made and id(t) in data_made and t.name]
            self.suffix[point] = (list(dict.fromkeys(t.name for t in reads)),
                                  [o for o in outputs if any(
                                      o == t.name for n in below for t in n.outputs)])
        # one run of the model for every point's inputs and the outputs (the reference)
        given = {t.name for t in model.graph.inputs}
        wanted = list(dict.fromkeys(
            outputs + [n for inputs, _ in self.suffix.values() for n in inputs
                       if n not in given]))
        runner = verify.session(_with_outputs(model, wanted), optimize=True, threads=0)
        accepted = {i.name for i in runner.get_inputs()}
        self.values = []
        for f in data:
            feeds = {k: v for k, v in f.items() if k in accepted}
            self.values.append({**feeds, **dict(zip(wanted, runner.run(wanted, feeds)))})
        self.reference = [{k: v[k] for k in outputs} for v in self.values]
        self.sessions, self.nodes = {}, {}  # point -> its session, its nodes
        for node_name, point in points.items():
            inputs, outs = self.suffix[point]
            proto = _suffix(model, node_name, point, inputs, outs, matrix,
                            {n: self.values[0][n] for n in inputs})
            self.nodes[point] = len(proto.graph.node)
            self.sessions[point] = verify.session(proto, optimize=True, threads=0)

    def run(self, settings: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[dict]:
        if not settings:
            return self.reference
        if len(settings) != 1:
            raise ValueError("PointRunner switches one point at a time")
        (point, (mask, offset)), = settings.items()
        sess = self.sessions[point]
        inputs, outs = self.suffix[point]
        dtype = np.float16 if "float16" in sess.get_inputs()[-1].type else np.float32
        gate = {f"{point}{MASK}": mask.astype(dtype), f"{point}{OFFSET}": offset.astype(dtype)}
        results = []
        for values, ref in zip(self.values, self.reference):
            got = sess.run(outs, {**{n: values[n] for n in inputs}, **gate})
            results.append({**ref, **dict(zip(outs, got))})
        return results

    def error(self, settings: dict[str, tuple[np.ndarray, np.ndarray]]) -> float:
        return output_error(self.reference, self.run(settings))


def _downstream(*starts: gs.Node | gs.Tensor) -> list[gs.Node]:
    """The nodes among ``starts`` and every node that reads what they compute (or the
    tensors among them), directly or not."""
    nodes = [s for s in starts if isinstance(s, gs.Node)]
    seen, order, stack = {id(n) for n in nodes}, list(nodes), list(nodes)
    for t in (s for s in starts if isinstance(s, gs.Tensor)):
        for reader in t.outputs:
            if id(reader) not in seen:
                seen.add(id(reader))
                order.append(reader)
                stack.append(reader)
    while stack:
        for t in stack.pop().outputs:
            for reader in t.outputs:
                if id(reader) not in seen:
                    seen.add(id(reader))
                    order.append(reader)
                    stack.append(reader)
    return order


def _with_outputs(model: Model, names: list[str]) -> onnx.ModelProto:
    """``model`` exported with ``names`` as its outputs (graph outputs first)."""
    copy = model.clone()
    tensors = copy.graph.tensors()
    known = {t.name for t in copy.graph.outputs}
    copy.graph.outputs = list(copy.graph.outputs) + [tensors[n] for n in names
                                                     if n not in known]
    return copy.to_onnx()


def _suffix(model: Model, node_name: str, point: str, inputs: list[str], outputs: list[str],
            matrix: bool, examples: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The part of ``model`` downstream of the linear ``node_name``, gated there (as
    ``PointRunner``), reading ``inputs`` (the tensors it takes from upstream, typed after
    ``examples``) and the gate's mask and offset, and computing ``outputs``."""
    copy = model.clone()
    graph = copy.graph
    tensors = graph.tensors()
    cut = []
    for name in inputs:
        t = tensors[name]
        t.inputs.clear()  # from upstream: an input of its own now
        t.dtype = examples[name].dtype
        if t.shape is not None and len(t.shape) != examples[name].ndim:
            t.shape = None
        cut.append(t)
    graph.inputs = cut
    graph.outputs = [tensors[n] for n in outputs]
    graph.cleanup()  # the upstream nodes, which nothing reads now
    node = next(n for n in graph.nodes if n.name == node_name)
    x = node.inputs[0]
    width = int(const_input(node, 1).shape[0])
    dtype = const_input(node, 1).dtype
    taken = tensor_names([graph])
    mask = gs.Variable(f"{point}{MASK}", dtype, [width, width] if matrix else [width])
    offset = gs.Variable(f"{point}{OFFSET}", dtype, [width])
    scaled = gs.Variable(unique_name(taken, f"{x.name}_gated"), dtype, x.shape)
    shifted = gs.Variable(unique_name(taken, f"{x.name}_shifted"), dtype, x.shape)
    graph.nodes.append(gs.Node("MatMul" if matrix else "Mul",
                               unique_name(taken, f"{point}_gate_mul"),
                               inputs=[x, mask], outputs=[scaled]))
    graph.nodes.append(gs.Node("Add", unique_name(taken, f"{point}_gate_add"),
                               inputs=[scaled, offset], outputs=[shifted]))
    node.inputs[0] = shifted
    graph.inputs.extend([mask, offset])
    return copy.to_onnx()


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
