"""Channel spaces: which tensor axes carry the same channels, on a static ONNX graph.

Every (tensor, axis) that carries channels gets a *space*; ops map the spaces of their
inputs to their outputs with explicit rules, and spaces that must lose the same channels
are unified (union-find). A *group* is a connected set of spaces: pruning removes the
same channels from every tensor, weight and constant in it, so the graph stays valid.

* Conv (group 1) and Gemm / MatMul with a constant weight *produce* a new space on their
  output channel axis and *consume* the space of their input's channel axis.
* A depthwise Conv (group = channels) ties its output to its input's space.
* Elementwise and activation ops, BatchNormalization, pooling, Resize, Pad (no channel
  padding), Dropout, Identity, Cast pass spaces through; binary ops (a residual Add, a
  squeeze-excite Mul) unify the spaces of their inputs; a per-channel constant operand
  is narrowed with them.
* Flatten and Reshape to [N, C·H·W] map channel c to the block of H·W features it
  becomes (``factor``), so Conv -> Flatten -> Gemm is prunable; Reshape constants are
  rewritten. Transpose moves the axis.
* Anything else that sees a channel axis (Softmax or a norm over it, a reshape that
  splits it, Concat/Split/Slice on it, an unknown op, a graph input or output) *blocks*
  the group, with the reason naming the node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.rewrite import constant_value

UNARY = {"Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish",
         "Elu", "Selu", "Celu", "Gelu", "FastGelu", "QuickGelu", "Softplus", "Softsign",
         "Mish", "Neg", "Abs", "Erf", "Exp", "Log", "Sqrt", "Reciprocal", "Sign", "Floor",
         "Ceil", "Round", "Identity", "Dropout", "Cast", "Clip", "ThresholdedRelu",
         "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
         "Resize", "Upsample", "BatchNormalization", "InstanceNormalization", "Pad"}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "Where"}
# Ops whose extra inputs are per-channel parameters of the channel axis 1.
PER_CHANNEL_PARAMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2),
                      "PRelu": (1,)}


@dataclass
class Axis:
    """Channels of ``tensor`` on ``axis``; channel c spans features [c·factor, (c+1)·factor)
    there (factor > 1 after a Flatten of [N, C, H, W])."""

    tensor: gs.Tensor
    axis: int
    factor: int = 1


@dataclass
class Group:
    """A set of unified spaces: what loses the same channels."""

    id: int
    channels: int = 0
    axes: list[Axis] = field(default_factory=list)
    producers: list[tuple[gs.Node, str]] = field(default_factory=list)  # (node, "conv"|"gemm"...)
    consumers: list[tuple[gs.Node, Axis]] = field(default_factory=list)
    depthwise: list[gs.Node] = field(default_factory=list)
    params: list[tuple[gs.Node, int, int]] = field(default_factory=list)  # (node, input, axis)
    reshapes: list[tuple[gs.Node, int, int]] = field(default_factory=list)  # (node, dim, factor)
    blocked: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """Stable name: the output tensor of its first producer."""
        return self.producers[0][0].outputs[0].name if self.producers else f"space{self.id}"

    @property
    def reason(self) -> str | None:
        if self.blocked:
            return self.blocked[0]
        if not self.producers:
            return "no layer produces these channels"
        return None


class Spaces:
    """Channel spaces of a graph whose shapes are inferred (see the module docstring)."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.parent: list[int] = []
        self.sizes: list[int] = []
        self.of: dict[int, Axis] = {}  # id(tensor) -> its channel axis
        self.space: dict[int, int] = {}  # id(tensor) -> space id
        self.blocks: dict[int, list[str]] = {}
        self.producers: dict[int, list[tuple[gs.Node, str]]] = {}
        self.consumers: dict[int, list[tuple[gs.Node, Axis]]] = {}
        self.depthwise: dict[int, list[gs.Node]] = {}
        self.params: dict[int, list[tuple[gs.Node, int, int]]] = {}
        self.reshapes: dict[int, list[tuple[gs.Node, int, int]]] = {}
        graph.toposort()
        for node in graph.nodes:
            self._node(node)
        for t in graph.outputs:
            if id(t) in self.space:
                self._block(self.space[id(t)], f"reaches graph output {t.name!r}")

    # ------------------------------------------------------------------ union-find
    def _new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.sizes.append(size)
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def _union(self, a: int, b: int, node: gs.Node) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            if self.sizes[a] != self.sizes[b]:
                self._block(a, f"{node.op} {node.name!r} joins {self.sizes[a]} and "
                               f"{self.sizes[b]} channels")
            self.parent[b] = a
        return a

    def _block(self, s: int, reason: str) -> None:
        self.blocks.setdefault(self.find(s), []).append(reason)

    def _add(self, table: dict, s: int, item) -> None:
        table.setdefault(s, []).append(item)

    def _mark(self, tensor: gs.Tensor, axis: int, s: int, factor: int = 1) -> None:
        self.of[id(tensor)] = Axis(tensor, axis, factor)
        self.space[id(tensor)] = s

    # ------------------------------------------------------------------ rules
    def _node(self, node: gs.Node) -> None:
        ins = [(i, t) for i, t in enumerate(node.inputs) if id(t) in self.space]
        op = node.op
        if op == "Conv" and self._conv(node, ins):
            return
        if op in ("Gemm", "MatMul") and self._linear(node, ins):
            return
        if not ins:
            return
        if op in UNARY and ins[0][0] == 0 and len(ins) == 1:
            self._unary(node, ins[0][1])
        elif op in BINARY:
            self._binary(node, ins)
        elif op in ("Flatten", "Reshape") and ins[0][0] == 0 and len(ins) == 1:
            self._flatten(node, ins[0][1])
        elif op == "Transpose" and len(ins) == 1:
            src = self.of[id(ins[0][1])]
            perm = list(node.attrs.get("perm", range(len(src.tensor.shape or []))[::-1]))
            rank = len(src.tensor.shape or [])
            if src.factor == 1 and rank:
                self._mark(node.outputs[0], perm.index(src.axis % rank),
                           self.space[id(ins[0][1])])
            else:
                self._block(self.space[id(ins[0][1])], f"Transpose {node.name!r} of a "
                                                       "flattened channel axis")
        elif op in ("Concat", "Split", "Slice", "Squeeze", "Unsqueeze", "ReduceMean",
                    "ReduceSum", "ReduceMax", "Softmax", "LogSoftmax"):
            self._axis_op(node, ins)
        else:
            for _, t in ins:
                self._block(self.space[id(t)], f"{op} {node.name!r} does not map channels")

    def _conv(self, node: gs.Node, ins) -> bool:
        w = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None or w.ndim < 3:
            return False
        group = int(node.attrs.get("group", 1))
        cout = w.shape[0]
        x = node.inputs[0]
        if group == 1:
            if ins and ins[0][0] == 0:
                ax = self.of[id(x)]
                if ax.axis % max(len(x.shape or [1, 1]), 1) == 1 and ax.factor == 1:
                    self._add(self.consumers, self.find(self.space[id(x)]), (node, ax))
                else:
                    self._block(self.space[id(x)], f"Conv {node.name!r} reads the "
                                                   "channels on another axis")
            s = self._new(cout)
            self._add(self.producers, s, (node, "conv"))
            self._mark(node.outputs[0], 1, s)
            return True
        if ins and ins[0][0] == 0 and group == w.shape[0] and w.shape[1] == 1 \
                and group == (x.shape[1] if x.shape and isinstance(x.shape[1], int) else -1):
            s = self.space[id(x)]
            self._add(self.depthwise, self.find(s), node)
            self._mark(node.outputs[0], 1, s)
            return True
        s = self._new(cout)  # grouped: its output cannot lose channels independently
        self._block(s, f"grouped Conv {node.name!r} (group {group})")
        if ins:
            self._block(self.space[id(x)], f"grouped Conv {node.name!r} (group {group})")
        self._mark(node.outputs[0], 1, s)
        return True

    def _linear(self, node: gs.Node, ins) -> bool:
        w = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None or w.ndim != 2 or any(i != 0 for i, _ in ins):
            return False
        if node.op == "Gemm" and (node.attrs.get("transA", 0) or len(node.inputs) > 2 and
                                  node.inputs[2].name and constant_value(node.inputs[2]) is None):
            return False
        x = node.inputs[0]
        n = w.shape[0] if node.op == "Gemm" and node.attrs.get("transB", 0) else w.shape[1]
        if ins:
            ax = self.of[id(x)]
            rank = len(x.shape or [])
            if rank and ax.axis % rank == rank - 1:
                self._add(self.consumers, self.find(self.space[id(x)]), (node, ax))
            else:
                self._block(self.space[id(x)], f"{node.op} {node.name!r} reads the channels "
                                               "on another axis")
        s = self._new(n)
        self._add(self.producers, s, (node, node.op.lower()))
        out = node.outputs[0]
        self._mark(out, len(out.shape) - 1 if out.shape else 1, s)
        return True

    def _unary(self, node: gs.Node, x: gs.Tensor) -> None:
        ax, s = self.of[id(x)], self.space[id(x)]
        rank = len(x.shape or [])
        if node.op in PER_CHANNEL_PARAMS:
            if ax.axis % max(rank, 1) != 1 or ax.factor != 1:
                self._block(s, f"{node.op} {node.name!r} normalizes another axis")
                return
            for i in PER_CHANNEL_PARAMS[node.op]:
                if i < len(node.inputs) and node.inputs[i].name:
                    if constant_value(node.inputs[i]) is None:
                        self._block(s, f"{node.op} {node.name!r} has run-time parameters")
                        return
                    if np.size(constant_value(node.inputs[i])) > 1:
                        self._add(self.params, self.find(s), (node, i, 0))
        if node.op == "Pad" and not self._pad_keeps(node, ax, rank):
            self._block(s, f"Pad {node.name!r} pads the channel axis")
            return
        for extra in node.inputs[1:]:
            if extra.name and id(extra) in self.space:
                self._block(s, f"{node.op} {node.name!r} takes channels twice")
        self._mark(node.outputs[0], ax.axis, s, ax.factor)

    def _pad_keeps(self, node: gs.Node, ax: Axis, rank: int) -> bool:
        pads = constant_value(node.inputs[1]) if len(node.inputs) > 1 else \
            np.asarray(node.attrs.get("pads", []))
        if pads is None or not rank:
            return False
        pads = np.asarray(pads).reshape(2, -1) if len(pads) == 2 * rank else None
        return pads is not None and not pads[:, ax.axis % rank].any()

    def _binary(self, node: gs.Node, ins) -> None:
        out = node.outputs[0]
        rank = len(out.shape or [])
        spaces = []
        for i, t in ins:
            ax = self.of[id(t)]
            trank = len(t.shape or [])
            if not rank or not trank:
                self._block(self.space[id(t)], f"{node.op} {node.name!r}: shapes unknown")
                return
            spaces.append((self.space[id(t)], ax.axis % trank + rank - trank, ax.factor))
        axes = {(a, f) for _, a, f in spaces}
        if len(axes) != 1:
            for s, _, _ in spaces:
                self._block(s, f"{node.op} {node.name!r} mixes channel axes")
            return
        (axis, factor), = axes
        s = spaces[0][0]
        for other, _, _ in spaces[1:]:
            s = self._union(s, other, node)
        for i, t in enumerate(node.inputs):
            if id(t) in self.space or not t.name:
                continue
            value = constant_value(t)
            dims = list(t.shape or [])
            pos = axis - (rank - len(dims))
            if value is not None and value.ndim and 0 <= pos < value.ndim and \
                    value.shape[pos] > 1:
                self._add(self.params, self.find(s), (node, i, pos))
            elif value is None and 0 <= pos < len(dims) and dims[pos] != 1:
                what = f"graph input {t.name!r}" if t in self.graph.inputs else \
                    f"{t.name!r}, whose channels no layer here produces"
                self._block(s, f"{node.op} {node.name!r} combines the channels with {what}")
        self._mark(out, axis, s, factor)

    def _flatten(self, node: gs.Node, x: gs.Tensor) -> None:
        ax, s = self.of[id(x)], self.space[id(x)]
        shape, out = x.shape or [], node.outputs[0]
        oshape = out.shape or []
        rank = len(shape)
        if not rank or not all(isinstance(d, int) for d in shape[1:]) or len(oshape) != 2:
            self._block(s, f"{node.op} {node.name!r} reshapes the channels in a way not "
                           "followed")
            return
        if node.op == "Flatten" and node.attrs.get("axis", 1) != 1:
            self._block(s, f"Flatten {node.name!r} with axis != 1")
            return
        if ax.axis % rank != 1:
            self._block(s, f"{node.op} {node.name!r} folds the channel axis into the batch")
            return
        inner = int(np.prod(shape[2:])) if rank > 2 else 1
        if node.op == "Reshape":
            target = constant_value(node.inputs[1])
            if target is None or target.size != 2:
                self._block(s, f"Reshape {node.name!r} target is not a constant [N, C·H·W]")
                return
            if int(target[1]) not in (-1, int(np.prod(shape[1:]))):
                self._block(s, f"Reshape {node.name!r} splits the channels")
                return
            if int(target[1]) != -1:
                self._add(self.reshapes, self.find(s), (node, 1, inner * ax.factor))
        self._mark(out, 1, s, inner * ax.factor)

    def _axis_op(self, node: gs.Node, ins) -> None:
        """Ops with an axis: fine when the channel axis is not theirs, else blocking."""
        t = ins[0][1]
        ax, s = self.of[id(t)], self.space[id(t)]
        rank = len(t.shape or [])
        axes = node.attrs.get("axes")
        if axes is None and node.op in ("Concat", "Split", "Softmax", "LogSoftmax"):
            axes = [node.attrs.get("axis", 1 if node.op != "Softmax" else -1)]
        if axes is None and len(node.inputs) > 1:
            value = constant_value(node.inputs[1] if node.op != "Slice" else node.inputs[3]
                                   if len(node.inputs) > 3 else None)
            axes = None if value is None else list(np.atleast_1d(value))
        if axes is None or not rank:
            self._block(s, f"{node.op} {node.name!r} with axes not known")
            return
        axes = [int(a) % (rank + (1 if node.op == "Unsqueeze" else 0)) for a in axes]
        if node.op == "Concat":
            for _, other in ins[1:]:
                s = self._union(s, self.space[id(other)], node)
            if ax.axis % rank in axes or len(ins) != len(node.inputs):
                self._block(s, f"Concat {node.name!r} on the channel axis")
                return
            self._mark(node.outputs[0], ax.axis, s, ax.factor)
            return
        if ax.axis % rank in axes:
            self._block(s, f"{node.op} {node.name!r} works across the channels")
            return
        if node.op in ("Squeeze", "Unsqueeze") or (node.op.startswith("Reduce")
                                                  and not node.attrs.get("keepdims", 1)):
            shift = sum(1 for a in axes if a < ax.axis % rank)
            new_axis = ax.axis % rank + (shift if node.op == "Unsqueeze" else -shift)
        else:
            new_axis = ax.axis % rank
        for out in node.outputs:
            self._mark(out, new_axis, s, ax.factor)

    # ------------------------------------------------------------------ groups
    def groups(self) -> list[Group]:
        out: dict[int, Group] = {}
        for s in range(len(self.parent)):
            root = self.find(s)
            g = out.setdefault(root, Group(root, self.sizes[root]))
            g.producers += self.producers.get(s, [])
            g.consumers += self.consumers.get(s, [])
            g.depthwise += self.depthwise.get(s, [])
            g.params += self.params.get(s, [])
            g.reshapes += self.reshapes.get(s, [])
            g.blocked += self.blocks.get(s, [])
        for key, ax in self.of.items():
            out[self.find(self.space[key])].axes.append(ax)
        ordered = sorted(out.values(), key=lambda g: self._order(g))
        return [g for g in ordered if g.producers or g.blocked]

    def _order(self, g: Group) -> int:
        index = {id(n): i for i, n in enumerate(self.graph.nodes)}
        return min((index[id(n)] for n, _ in g.producers), default=len(index))
