"""Lossless activation fusions: activation subgraphs into one op, activations into the Conv
before them.

* ``fuse-silu``: ``x * Sigmoid(x)`` -> ``com.microsoft::QuickGelu`` with ``alpha=1``.
* ``fuse-hard-swish``: ``x * HardSigmoid(x)`` (alpha 1/6, beta 0.5) and
  ``x * Clip(x + 3, 0, 6) / 6`` -> ``HardSwish`` (opset 14).
* ``fuse-conv-act``: ``Conv -> activation`` -> ``com.microsoft::FusedConv`` (the
  activations ONNX Runtime's CPU kernel takes: Relu, Tanh, Sigmoid, LeakyRelu, Clip,
  HardSigmoid), and with ``residual=true`` also ``Conv -> Add(residual) -> activation``
  (the residual goes to FusedConv's ``Z`` input).

Each match needs every intermediate tensor to have exactly one reader, to be no graph
output and to live in the same graph as the nodes around it; the fused node writes the
last tensor of the pattern, so names and readers after it are kept. Emitted ops are those
the target runs (``PassContext.supports``), never chosen by target name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import Model
from graphopt.pass_infra import Pass, PassContext, PassResult
from graphopt.rewrite import (consumers, constant_value, is_graph_output, remove_node,
                              tensor_names, unique_name, walk)

MS = "com.microsoft"
FLOAT_MAX = float(np.finfo(np.float32).max)


# ---------------------------------------------------------------------- shared helpers
class _Scope:
    """The graphs of a model and which graph owns each node."""

    def __init__(self, model: Model):
        self.graphs = list(model.all_graphs())
        self.owner = {id(n): g for g in self.graphs for n in g.nodes}
        self.removed: set[int] = set()

    def alive(self, node: gs.Node) -> bool:
        """Whether ``node`` is still in its graph (not dropped by an earlier match)."""
        return id(node) not in self.removed

    def producer(self, tensor: gs.Tensor, reader: gs.Node, op: str | tuple[str, ...],
                 ) -> gs.Node | None:
        """The ``op`` node writing ``tensor`` when ``reader`` is the tensor's only reader
        (reading it once), the tensor is no graph output, the producer has that single
        output and both nodes live in the same graph."""
        ops = (op,) if isinstance(op, str) else op
        if len(tensor.inputs) != 1 or tensor.inputs[0].op not in ops:
            return None
        node = tensor.inputs[0]
        readers = consumers(tensor)
        if len(readers) != 1 or readers[0] is not reader \
                or sum(t is tensor for t in reader.inputs) != 1 \
                or is_graph_output(tensor, self.graphs) or len(node.outputs) != 1 \
                or node.domain not in (None, "", "ai.onnx") \
                or self.owner.get(id(node)) is not self.owner.get(id(reader)):
            return None
        return node

    def replace(self, first: gs.Node, last: gs.Node, dropped: list[gs.Node], op: str,
                inputs: list[gs.Tensor], attrs: dict, domain: str = "") -> gs.Node:
        """Put one ``op`` node where the pattern ``first`` .. ``last`` was: it writes
        ``last``'s output; the pattern's nodes (``dropped``) are removed."""
        graph = self.owner[id(last)]
        out = last.outputs[0]
        for node in dropped:
            remove_node(node, graph)
            self.removed.add(id(node))
        node = gs.Node(op, name=first.name or last.name, attrs=attrs, inputs=inputs,
                       outputs=[out], domain=domain or None)
        graph.nodes.append(node)
        self.owner[id(node)] = graph
        return node


def _scalar(tensor: gs.Tensor | None) -> float | None:
    """The value of a constant holding a single float, else ``None``."""
    value = constant_value(tensor)
    if value is None or value.size != 1 or value.dtype.kind != "f":
        return None
    return float(value.reshape(()))


def _other(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor | None:
    """The other input of a two-input ``node`` that reads ``tensor`` once."""
    if len(node.inputs) != 2 or sum(t is tensor for t in node.inputs) != 1:
        return None
    return node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]


def _is_float32(tensor: gs.Tensor) -> bool:
    return tensor.dtype is not None and np.dtype(tensor.dtype) == np.float32


def _same_float32(a: float, b: float) -> bool:
    """Whether two attribute values are the same float32 (attributes are stored as such)."""
    return bool(np.float32(a) == np.float32(b))


# ---------------------------------------------------------------------- fuse-silu
def _match_silu(mul: gs.Node, scope: _Scope) -> tuple[gs.Tensor, gs.Node] | None:
    """Mul(x, Sigmoid(x)), either operand order: (x, the Sigmoid)."""
    if mul.op != "Mul" or len(mul.inputs) != 2 or len(mul.outputs) != 1:
        return None
    for side in (0, 1):
        sigmoid = scope.producer(mul.inputs[side], mul, "Sigmoid")
        if sigmoid is not None and sigmoid.inputs[0] is mul.inputs[1 - side]:
            return sigmoid.inputs[0], sigmoid
    return None


class FuseSiLU(Pass):
    """Fuse x * Sigmoid(x) into com.microsoft QuickGelu(alpha=1), which computes SiLU.

    ONNX's own Swish (opset 24) is not emitted: ONNX Runtime 1.32 runs it slower than
    Sigmoid + Mul (1.22-1.25x on a [1, 32, 112, 112] tensor, one thread), while QuickGelu
    runs 3-6% faster than Sigmoid + Mul with ORT's graph optimizations off and the same
    with them on (ORT fuses the pair into QuickGelu itself from ENABLE_EXTENDED).
    """

    name = "fuse-silu"
    family = "fusion"
    lossless = True
    emits = ((MS, "QuickGelu"),)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if not ctx.supports("QuickGelu", MS):
            return PassResult(changed=False, stats={"fused": 0})
        scope = _Scope(model)
        fused = 0
        for _, node in walk(scope.graphs):
            match = _match_silu(node, scope) if scope.alive(node) else None
            if match is None:
                continue
            x, sigmoid = match
            if x.dtype is None or np.dtype(x.dtype) not in (np.float16, np.float32):
                continue  # the types ORT's CPU kernel takes
            scope.replace(sigmoid, node, [sigmoid, node], "QuickGelu", [x], {"alpha": 1.0}, MS)
            fused += 1
        if fused:
            model.require_opset(MS)
        return PassResult(changed=fused > 0, stats={"fused": fused})


# ---------------------------------------------------------------------- fuse-hard-swish
def _match_hard_sigmoid_form(mul: gs.Node, scope: _Scope) -> tuple[gs.Tensor, list] | None:
    """Mul(x, HardSigmoid(x, alpha=1/6, beta=0.5)), either operand order."""
    for side in (0, 1):
        hs = scope.producer(mul.inputs[side], mul, "HardSigmoid")
        if hs is None or hs.inputs[0] is not mul.inputs[1 - side]:
            continue
        if _same_float32(hs.attrs.get("alpha", 0.2), 1 / 6) \
                and _same_float32(hs.attrs.get("beta", 0.5), 0.5):
            return hs.inputs[0], [hs, mul]
    return None


def _clip_bounds(clip: gs.Node, opset: int) -> tuple[float, float] | None:
    """Constant (min, max) of a Clip (attributes before opset 11, inputs after)."""
    if opset < 11:
        return float(clip.attrs.get("min", -FLOAT_MAX)), float(clip.attrs.get("max", FLOAT_MAX))
    bounds = []
    for index, default in ((1, -FLOAT_MAX), (2, FLOAT_MAX)):
        tensor = clip.inputs[index] if len(clip.inputs) > index else None
        if tensor is None or tensor.is_empty():
            bounds.append(default)
            continue
        value = _scalar(tensor)
        if value is None:
            return None
        bounds.append(value)
    return bounds[0], bounds[1]


def _relu6_of_x_plus_3(tensor: gs.Tensor, reader: gs.Node, scope: _Scope,
                       opset: int) -> tuple[gs.Tensor, list] | None:
    """``tensor`` = Clip(Add(x, 3), 0, 6), read only by ``reader``: (x, [Add, Clip])."""
    clip = scope.producer(tensor, reader, "Clip")
    if clip is None or _clip_bounds(clip, opset) != (0.0, 6.0):
        return None
    add = scope.producer(clip.inputs[0], clip, "Add")
    if add is None or len(add.inputs) != 2:
        return None
    for side in (0, 1):
        if _scalar(add.inputs[1 - side]) == 3.0 and constant_value(add.inputs[side]) is None:
            return add.inputs[side], [add, clip]
    return None


def _divided_by_6(node: gs.Node, tensor: gs.Tensor) -> bool:
    """Whether ``node`` computes ``tensor / 6`` (Div by 6, or Mul by 1/6)."""
    if node.op == "Div" and len(node.inputs) == 2 and node.inputs[0] is tensor:
        return _scalar(node.inputs[1]) == 6.0
    if node.op == "Mul":
        other = _other(node, tensor)
        value = _scalar(other) if other is not None else None
        return value is not None and _same_float32(value, 1 / 6)
    return False


def _match_relu6_form(last: gs.Node, scope: _Scope, opset: int) -> tuple[gs.Tensor, list] | None:
    """x * Clip(x + 3, 0, 6) / 6 in the orders exporters write: (x * r) / 6, x * (r / 6),
    (x * r) * (1/6), x * (r * (1/6)) (r being the Clip)."""
    if last.op not in ("Div", "Mul") or len(last.inputs) != 2 or len(last.outputs) != 1:
        return None
    # (x * r) / 6: the last node scales the product.
    for side in ((0,) if last.op == "Div" else (0, 1)):
        mul = scope.producer(last.inputs[side], last, "Mul")
        if mul is None or len(mul.inputs) != 2 or not _divided_by_6(last, mul.outputs[0]):
            continue
        for r_side in (0, 1):
            found = _relu6_of_x_plus_3(mul.inputs[r_side], mul, scope, opset)
            if found is not None and found[0] is mul.inputs[1 - r_side]:
                return found[0], [*found[1], mul, last]
    # x * (r / 6): the last node is the product.
    if last.op == "Mul":
        for side in (0, 1):
            scale = scope.producer(last.inputs[side], last, ("Div", "Mul"))
            if scale is None or len(scale.inputs) != 2:
                continue
            for r_side in ((0,) if scale.op == "Div" else (0, 1)):
                if not _divided_by_6(scale, scale.inputs[r_side]):
                    continue
                found = _relu6_of_x_plus_3(scale.inputs[r_side], scale, scope, opset)
                if found is not None and found[0] is last.inputs[1 - side]:
                    return found[0], [*found[1], scale, last]
    return None


class FuseHardSwish(Pass):
    """Fuse x * HardSigmoid(x) (alpha 1/6, beta 0.5) and x * Relu6(x + 3) / 6 into HardSwish.

    ONNX Runtime does not fuse the Relu6 form itself: HardSwish runs it 2x faster, with
    or without ORT's graph optimizations ([1, 32, 112, 112], one thread).
    """

    name = "fuse-hard-swish"
    family = "fusion"
    lossless = True
    emits = (("", "HardSwish"),)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if model.opset < 14 or not ctx.supports("HardSwish"):
            return PassResult(changed=False, stats={"fused": 0})
        scope = _Scope(model)
        fused = 0
        for _, node in walk(scope.graphs):
            if node.op not in ("Mul", "Div") or not scope.alive(node):
                continue
            match = None
            if node.op == "Mul" and len(node.inputs) == 2:
                match = _match_hard_sigmoid_form(node, scope)
            if match is None:
                match = _match_relu6_form(node, scope, model.opset)
            if match is None:
                continue
            x, nodes = match
            if not x.dtype or np.dtype(x.dtype).kind != "f":
                continue
            scope.replace(nodes[0], node, nodes, "HardSwish", [x], {})
            fused += 1
        return PassResult(changed=fused > 0, stats={"fused": fused})


# ---------------------------------------------------------------------- fuse-conv-act
CONV_ATTRS = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")


def _activation(node: gs.Node, opset: int) -> tuple[str, list[float]] | None:
    """FusedConv's (activation, activation_params) for an activation node it can absorb."""
    if node.op in ("Relu", "Tanh", "Sigmoid"):
        return node.op, []
    if node.op == "LeakyRelu":
        return "LeakyRelu", [float(node.attrs.get("alpha", 0.01))]
    if node.op == "HardSigmoid":
        return "HardSigmoid", [float(node.attrs.get("alpha", 0.2)),
                               float(node.attrs.get("beta", 0.5))]
    if node.op == "Clip":
        bounds = _clip_bounds(node, opset)
        return None if bounds is None else ("Clip", [bounds[0], bounds[1]])
    return None


def _same_shape(a: gs.Tensor, b: gs.Tensor) -> bool:
    """Whether two tensors surely have the same shape (equal known or named dims)."""
    if a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return False
    return all((isinstance(x, int) and x >= 0 or isinstance(x, str) and x) and x == y
               for x, y in zip(a.shape, b.shape))


def _fusable_conv(node: gs.Node | None) -> bool:
    """A float32 Conv (FusedConv's CPU kernel is float32 only)."""
    if node is None or node.op != "Conv" or not 2 <= len(node.inputs) <= 3:
        return False
    known = [t for t in (node.outputs[0], *node.inputs[:2]) if t.dtype is not None]
    return bool(known) and _is_float32(known[0])


def _match_conv_act(act_node: gs.Node, scope: _Scope, opset: int, residual: bool):
    """Conv -> act, or Conv -> Add(residual of the same shape) -> act:
    (conv, residual or None, [nodes to drop], activation, params)."""
    if len(act_node.outputs) != 1 or not act_node.inputs:
        return None
    activation = _activation(act_node, opset)
    if activation is None:
        return None
    source = act_node.inputs[0]
    if act_node.op == "Clip" and any(t is source for t in act_node.inputs[1:]):
        return None
    conv = scope.producer(source, act_node, "Conv")
    if _fusable_conv(conv):
        return conv, None, [act_node], *activation
    add = scope.producer(source, act_node, "Add") if residual else None
    if add is None or len(add.inputs) != 2:
        return None
    for side in (0, 1):
        conv = scope.producer(add.inputs[side], add, "Conv")
        other = add.inputs[1 - side]
        if _fusable_conv(conv) and other is not add.inputs[side] \
                and _is_float32(other) and _same_shape(other, conv.outputs[0]) \
                and _same_shape(add.outputs[0], conv.outputs[0]):
            return conv, other, [add, act_node], *activation
    return None


class FuseConvActivation(Pass):
    """Fuse Conv + activation (optionally + a residual Add) into com.microsoft FusedConv.

    With ONNX Runtime's optimizations on (ENABLE_ALL) the result runs exactly as fast as
    the unfused graph: ORT makes the same fusion itself and still converts FusedConv to
    its NCHWc layout. The residual form is off by default: ORT's NCHWc conversion only
    takes a FusedConv with a ``Z`` input when ``Z`` itself comes from an NCHWc op, so a
    residual computed by, say, an elementwise op leaves that Conv in the slow layout
    (measured 1.35x slower on a 32-channel 56x56 3x3 Conv, one thread), while ORT fuses
    Conv + Add + Relu into the NCHWc Conv by itself when it can.
    """

    name = "fuse-conv-act"
    family = "fusion"
    lossless = True
    emits = ((MS, "FusedConv"),)

    @dataclass(frozen=True)
    class Options:
        residual: bool = False  # also fuse Conv -> Add(same-shape tensor) -> activation

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if not ctx.supports("FusedConv", MS):
            return PassResult(changed=False, stats={"fused": 0})
        scope = _Scope(model)
        names = tensor_names(scope.graphs)
        fused = residual_fused = 0
        for _, node in walk(scope.graphs):
            match = _match_conv_act(node, scope, model.opset, self.options.residual) \
                if scope.alive(node) else None
            if match is None:
                continue
            conv, residual, dropped, activation, params = match
            inputs = list(conv.inputs)
            if residual is not None:
                if len(inputs) < 3:  # Z is the 4th input: give the Conv a zero bias
                    bias = _zero_bias(conv, names)
                    if bias is None:
                        continue
                    inputs.append(bias)
                inputs.append(residual)
                residual_fused += 1
            attrs = {k: v for k, v in conv.attrs.items() if k in CONV_ATTRS}
            attrs["activation"] = activation
            if params:
                attrs["activation_params"] = [float(p) for p in params]
            scope.replace(conv, dropped[-1], [conv, *dropped], "FusedConv", inputs, attrs, MS)
            fused += 1
        if fused:
            model.require_opset(MS)
        return PassResult(changed=fused > 0,
                          stats={"fused": fused, "with_residual": residual_fused})


def _zero_bias(conv: gs.Node, names: set[str]) -> gs.Constant | None:
    """A float32 zero bias for ``conv`` (output channels from its weight or output)."""
    weight = constant_value(conv.inputs[1])
    shape = conv.outputs[0].shape
    if weight is not None:
        channels = weight.shape[0]
    elif shape is not None and len(shape) > 1 and isinstance(shape[1], int):
        channels = shape[1]
    else:
        return None
    hint = f"{conv.name or conv.outputs[0].name}_zero_bias"
    return gs.Constant(unique_name(names, hint), np.zeros(channels, dtype=np.float32))
