"""The linear layers recovery can re-fit, found in a compressed model, and which of them
differ from the original model.

A layer is a Conv (group 1, or depthwise: one input channel per group), a Gemm (no transA,
alpha = beta = 1) or a MatMul whose second input is a constant 2-D weight, with an
optional constant bias (a Conv's or Gemm's third input; for a MatMul, a following Add of a
constant vector, whose output is then the layer's output). Its weights must be constants
of its own: a weight shared with another node cannot be re-fitted for one of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import external_data


@dataclass(eq=False)
class Layer:
    node: gs.Node
    kind: str  # "conv", "depthwise", "gemm", "matmul"
    x: gs.Tensor
    y: gs.Tensor  # the fitted output (a MatMul's bias Add output when it has one)
    weight: gs.Constant
    bias: gs.Constant | None
    bias_node: gs.Node | None = None  # the Add holding a MatMul's bias
    upstream: set[int] = field(default_factory=set, repr=False)  # ids of nodes x needs

    @property
    def name(self) -> str:
        return self.node.name or self.y.name

    @property
    def nodes(self) -> tuple[gs.Node, ...]:
        return (self.node, self.bias_node) if self.bias_node is not None else (self.node,)

    @property
    def out_axis(self) -> int:
        """The weight's axis of output channels."""
        if self.kind in ("conv", "depthwise") or (
                self.kind == "gemm" and self.node.attrs.get("transB", 0)):
            return 0
        return 1

    @property
    def outputs(self) -> int:
        """Output channels (features)."""
        return int(self.weight.shape[self.out_axis])

    @property
    def with_bias(self) -> bool:
        """Whether the fit has a bias column: only when the layer has a bias of its own
        (recovery moves numbers, it adds no initializer)."""
        return self.bias is not None

    @property
    def columns(self) -> int:
        """Unknowns per output channel (inputs, plus one for the bias)."""
        per = int(np.prod(self.weight.shape[1:])) if self.kind in ("conv", "depthwise") \
            else int(self.weight.shape[1 - self.out_axis])
        return per + int(self.with_bias)

    def target_names(self) -> tuple[str, ...]:
        """Names under which compression may have reported the output narrowed."""
        return tuple(dict.fromkeys([self.y.name, self.node.outputs[0].name]))

    def narrowing(self, kept: dict) -> tuple | None:
        """(axis, indices kept) when compression narrowed the output, else None."""
        return next((kept[n] for n in self.target_names() if n in kept), None)


def find_layers(graph: gs.Graph, ref_names: set[str]) -> tuple[list[Layer], dict[str, str]]:
    """Every re-fittable layer of ``graph`` whose output is also a tensor of the
    reference (``ref_names``), in topological order, and the layers that cannot be
    re-fitted with the reason."""
    graph.toposort()
    out, skipped = [], {}
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        name = node.name or node.outputs[0].name
        if not isinstance(w, gs.Constant):
            continue  # an activation product (attention scores) or a computed weight
        layer, why = linear_layer(graph, node, w, ref_names)
        if layer is None:
            skipped[name] = why
        else:
            out.append(layer)
    return out, skipped


def linear_layer(graph: gs.Graph, node: gs.Node, w: gs.Constant,
                 ref_names: set[str] | None) -> tuple[Layer | None, str]:
    """The layer ``node`` (weight ``w``) forms, or None and why not; ``ref_names``: its
    output must be a tensor of the original model (None: any output)."""
    if len(w.outputs) > 1:
        return None, "weight shared with another node"
    if w.values.dtype.kind != "f":
        return None, f"weight of type {w.values.dtype}"
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if bias is not None and (not isinstance(bias, gs.Constant) or len(bias.outputs) > 1):
        return None, "bias is not a constant of its own"
    y, bias_node = node.outputs[0], None
    if node.op == "Conv":
        group = int(node.attrs.get("group", 1))
        if len(w.shape) < 3:
            return None, f"Conv weight of rank {len(w.shape)}"
        if group == 1:
            kind = "conv"
        elif w.shape[1] == 1 and group == w.shape[0]:
            kind = "depthwise"
        else:
            return None, f"grouped Conv (group {group})"
    elif node.op == "Gemm":
        if node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0 or \
                node.attrs.get("beta", 1.0) != 1.0 or len(w.shape) != 2:
            return None, "Gemm with transA, alpha or beta"
        kind = "gemm"
    else:
        if len(w.shape) != 2:
            return None, f"MatMul weight of rank {len(w.shape)}"
        kind = "matmul"
        readers = y.outputs
        if len(readers) == 1 and readers[0].op == "Add" and y not in graph.outputs:
            add = readers[0]
            other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
            if isinstance(other, gs.Constant) and len(other.outputs) == 1 and \
                    other.values.ndim >= 1 and other.values.size == w.shape[1] and \
                    other.values.shape[-1] == w.shape[1] and \
                    (ref_names is None or add.outputs[0].name in ref_names):
                bias, y, bias_node = other, add.outputs[0], add
    layer = Layer(node, kind, node.inputs[0], y, w, bias, bias_node)
    if bias is not None and bias.values.size not in (1, layer.outputs):
        return None, f"bias of shape {tuple(bias.shape)} is not per output channel"
    if bias is not None and bias.values.size == 1 and layer.outputs != 1:
        layer.bias = None  # a scalar shared by every channel: kept as it is
    if ref_names is not None and y.name not in ref_names:
        return None, "output not in the original model"
    return layer, ""


# ============================================================================ changes
FOLD_DEPTH = 8  # nodes between a folded reference constant and the initializers it reads
# Ops whose outputs are not weights (random, shape-dependent, or costly to evaluate).
NOT_FOLDED = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                        "RandomUniformLike", "Multinomial", "Shape", "Size"})
class Reference:
    """What recovery needs to know of the original model: its tensor names and its
    constants (compared by digest, without reading external data into memory; digests
    are kept, so a Reference serves many compressed candidates)."""

    def __init__(self, proto: onnx.ModelProto):
        g = proto.graph
        self.proto = proto
        self.names = {n for node in g.node for n in node.output} | \
            {o.name for o in g.output} | {i.name for i in g.input} | \
            {t.name for t in g.initializer}
        self.tensors: dict[str, onnx.TensorProto] = {t.name: t for t in g.initializer}
        for node in g.node:  # weights some exporters leave as Constant nodes
            if node.op_type == "Constant" and node.attribute and \
                    node.attribute[0].name == "value":
                self.tensors.setdefault(node.output[0], node.attribute[0].t)
        self._digests: dict[str, bytes | None] = {}
        self._producer = {o: n for n in g.node for o in n.output if o}

    def digest(self, name: str) -> bytes | None:
        if name not in self._digests:
            try:
                self._digests[name] = external_data.tensor_digest(self.tensor(name))
            except (KeyError, OSError, ValueError, TypeError):
                self._digests[name] = None
        return self._digests[name]

    def tensor(self, name: str) -> onnx.TensorProto:
        """The reference's constant ``name``: an initializer, or the output of nodes that
        read only constants (a weight the exporter transposes in the graph, which
        graphopt's cleanup folds into an initializer of that name), computed once."""
        if name not in self.tensors:
            value = self._fold(name, depth=0)
            if value is None:
                raise KeyError(name)
            self.tensors[name] = onnx.numpy_helper.from_array(value, name)
        return self.tensors[name]

    def _fold(self, name: str, depth: int) -> np.ndarray | None:
        node = self._producer.get(name)
        if node is None or depth > FOLD_DEPTH or node.op_type in NOT_FOLDED or \
                node.domain not in ("", "ai.onnx") or \
                any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                    for a in node.attribute):
            return None
        inputs = {}
        for i in node.input:
            if not i:
                continue
            if i in self.tensors:
                if external_data.extent(self.tensors[i]) is not None:
                    return None  # (not read into memory to be compared)
                inputs[i] = onnx.numpy_helper.to_array(self.tensors[i])
            else:
                value = self._fold(i, depth + 1)
                if value is None:
                    return None
                inputs[i] = value
        try:
            from onnx.reference import ReferenceEvaluator

            graph = onnx.helper.make_graph(
                [node], "fold", [onnx.helper.make_tensor_value_info(
                    i, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                    for i, v in inputs.items()],
                [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o])
            model = onnx.helper.make_model(graph, opset_imports=self.proto.opset_import)
            values = ReferenceEvaluator(model).run(None, inputs)
        except Exception:
            return None
        out = dict(zip([o for o in node.output if o], values))
        for key, value in out.items():
            self.tensors.setdefault(key, onnx.numpy_helper.from_array(np.asarray(value), key))
        return np.asarray(out[name])

    def same_constant(self, const: gs.Constant) -> bool:
        """Whether the reference has a constant of this name with the same values."""
        try:
            ref = self.tensor(const.name)
        except KeyError:
            return False
        if tuple(ref.dims) != tuple(const.shape):
            return False
        want = self.digest(const.name)
        try:
            return want is not None and want == external_data.constant_digest(const)
        except (OSError, ValueError, TypeError):
            return False  # unreadable: treat as changed (re-fitting is then safe)

    def narrowed_constant(self, const: gs.Constant, axis: int, idx: np.ndarray) -> bool:
        """Whether ``const`` is the reference's constant of the same name with only the
        indices ``idx`` kept along ``axis``."""
        try:
            ref = self.tensor(const.name)
        except KeyError:
            return False
        if len(ref.dims) != len(const.shape) or \
                not -len(ref.dims) <= axis < len(ref.dims):
            return False
        dims = list(ref.dims)
        dims[axis] = len(idx)
        if dims != list(const.shape):
            return False
        try:
            values = np.take(onnx.numpy_helper.to_array(ref), np.asarray(idx), axis=axis)
        except (OSError, ValueError, IndexError):
            return False
        return bool(np.array_equal(values, np.asarray(const.values)))


def own_change(layer: Layer, kept: dict, ref: Reference) -> str | None:
    """How compression changed ``layer`` itself (None: it did not), apart from its
    output being narrowed along with its weight rows (which keeps its values exact)."""
    narrowed = layer.narrowing(kept)
    if layer.x.name in kept:
        axis, idx = kept[layer.x.name]
        rank = len(layer.weight.shape)  # a Conv's input and output have its rank
        if not (layer.kind == "depthwise" and narrowed is not None and axis % rank == 1
                and narrowed[0] % rank == 1 and np.array_equal(idx, narrowed[1])):
            return "input narrowed"  # (a depthwise Conv narrowed alike stays exact)
    if layer.x.name not in ref.names:
        return "new input"
    for const, axis in ((layer.weight, layer.out_axis), (layer.bias, -1)):
        if const is None:
            continue
        if ref.same_constant(const):
            continue
        if narrowed is not None and len(narrowed[1]) == const.shape[axis] and \
                ref.narrowed_constant(const, axis, narrowed[1]):
            continue
        return "weights changed"
    return None


def dirty_nodes(graph: gs.Graph, layers: list[Layer], kept: dict, ref: Reference
                ) -> tuple[set[int], dict[int, str]]:
    """ids of the nodes whose outputs may differ from the original model's (narrowing
    aside), in one topological sweep, and the layers changed themselves with how.

    A layer is dirty if it changed itself or its input is dirty. Another node is dirty if
    an input is dirty, if it is new (an output the reference lacks), if a constant input
    differs from the reference's, or if it reads a narrowed tensor without being an op
    that works channel by channel (a LayerNorm over fewer channels is not exact)."""
    by_node = {id(n): layer for layer in layers for n in layer.nodes}
    dirty: set[int] = set()
    changed: dict[int, str] = {}
    for node in graph.nodes:
        producers = {id(p) for t in node.inputs for p in t.inputs}
        layer = by_node.get(id(node))
        if layer is not None:
            if node is layer.node:
                why = own_change(layer, kept, ref)
                if why:
                    changed[id(layer.node)] = why
            if id(layer.node) in changed or producers & dirty or \
                    (node is layer.bias_node and id(layer.node) in dirty):
                dirty.add(id(node))
            continue
        if producers & dirty or any(o.name not in ref.names for o in node.outputs) or \
                any(isinstance(t, gs.Constant) and not ref.same_constant(t)
                    for t in node.inputs) or \
                (node.op not in CHANNELWISE and any(t.name in kept for t in node.inputs)):
            dirty.add(id(node))
    return dirty, changed


# Ops that work channel by channel: on a narrowed input they give the original's values
# narrowed alike.
CHANNELWISE = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf",
    "Gelu", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Mish", "Clip", "Identity",
    "Cast", "Neg", "Abs", "Sqrt", "Exp", "Log", "Reciprocal", "Floor", "Ceil", "Round",
    "Dropout", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
    "Flatten", "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean",
    "QuantizeLinear", "DequantizeLinear"})


def upstream_nodes(tensor: gs.Tensor) -> set[int]:
    """ids of every node ``tensor`` depends on."""
    seen: set[int] = set()
    stack = [tensor]
    visited_tensors: set[int] = set()
    while stack:
        t = stack.pop()
        if id(t) in visited_tensors:
            continue
        visited_tensors.add(id(t))
        for producer in t.inputs:
            if id(producer) not in seen:
                seen.add(id(producer))
                stack.extend(producer.inputs)
    return seen


def as_float64(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)
