"""Attention blocks on the ONNX graph, for head pruning.

**Decomposed** (what exporters write): three linears (Q, K, V; MatMul + bias Add) each
reshaped to [.., H, D] (a constant target, or a Concat of constant pieces). From there
the head axis is followed through every op that reads it: Transpose moves it, the
elementwise ops (scale, mask Add, IsNaN/Where) and Softmax (over another axis) keep it,
MatMul keeps it as a batch axis; the Reshape that merges [.., H, D] into [.., H·D] ends
it. An operand from outside (the mask) must broadcast over heads, or be a constant with
one entry per head (narrowed with them). The merged context then reaches the output
projection through a channel region (``_blocks.channel_region``).

**Fused**: a com.microsoft ``Attention`` node (packed QKV weight [hidden, 3·H·D], bias,
``num_heads``), without past state, and its output projection.

Anything else that looks like attention (a Softmax no block explains, other attention
ops) is listed as refused, with the node named.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.passes.prune._blocks import (ELEMENTWISE, Linear, Region, channel_region,
                                           linear_producing)
from graphopt.rewrite import constant_value

ATTENTION_OPS = {"Attention", "MultiHeadAttention", "PackedAttention", "QAttention",
                 "GroupQueryAttention", "PackedMultiHeadAttention"}


@dataclass
class AttentionBlock:
    kind: str  # "decomposed" or "fused"
    anchor: str  # a node naming the block when it has no output projection
    heads: int = 0
    head_size: int = 0
    context: Region | None = None  # merged context -> output projection
    projections: list[Linear] = field(default_factory=list)
    splits: list[gs.Node] = field(default_factory=list)
    merge: gs.Node | None = None
    axes: list[tuple[gs.Tensor, int]] = field(default_factory=list)  # (tensor, head axis)
    head_params: list[tuple[gs.Node, int, int]] = field(default_factory=list)
    node: gs.Node | None = None  # the fused Attention node
    reason: str | None = None

    @property
    def out(self) -> Linear | None:
        return self.context.end if self.context is not None else None

    @property
    def name(self) -> str:
        out = self.out
        return out.node.name if out is not None and out.node.name else self.anchor

    @property
    def nodes(self) -> tuple[str, ...]:
        found = [lin.node for lin in self.projections] + self.splits + \
            ([self.node] if self.node else []) + ([self.merge] if self.merge else []) + \
            ([self.out.node] if self.out else [])
        return tuple(n.name for n in found)


# ============================================================================ shapes
def _piece(tensor: gs.Tensor) -> np.ndarray | None:
    value = constant_value(tensor)
    if value is None and len(tensor.inputs) == 1 and tensor.inputs[0].op == "Unsqueeze":
        value = constant_value(tensor.inputs[0].inputs[0])
    return None if value is None else value.reshape(-1)


def shape_tail(reshape: gs.Node, n: int) -> list[tuple[int, tuple]] | None:
    """The last ``n`` entries of a Reshape's target, each with where it is written
    (node, input, position): a constant target, or a Concat whose last pieces are
    constants (or Unsqueezed constants)."""
    target = reshape.inputs[1]
    value = constant_value(target)
    if value is not None:
        flat = value.reshape(-1)
        return [(int(flat[i]), (reshape, 1, i)) for i in range(len(flat) - n, len(flat))] \
            if len(flat) >= n else None
    if len(target.inputs) == 1 and target.inputs[0].op == "Concat":
        concat, out = target.inputs[0], []
        for j in reversed(range(len(concat.inputs))):
            piece = _piece(concat.inputs[j])
            if piece is None:
                return None
            out[:0] = [(int(piece[i]), (concat, j, i)) for i in range(len(piece))]
            if len(out) >= n:
                return out[-n:]
    return None


def set_entry(ed, where: tuple, value: int) -> None:
    node, index, pos = where
    current = _piece(node.inputs[index]) if node.op == "Concat" else \
        constant_value(node.inputs[index])
    new = np.array(current).reshape(-1).copy()
    new[pos] = value
    ed.set(node, index, new.astype(current.dtype))


# ============================================================================ matching
def find_attention_blocks(graph: gs.Graph) -> list[AttentionBlock]:
    """Every attention block of ``graph``; unrecognized ones with the reason."""
    graph.toposort()
    splits = {}
    for node in graph.nodes:
        if node.op == "Reshape":
            found = _split(node, graph)
            if found is not None:
                splits[id(node)] = (node, *found)
    # Splits whose head axes meet (scores MatMul, context MatMul) form one block.
    reach = {key: _follow([s[0]], graph)[4] for key, s in splits.items()}
    parent = {key: key for key in splits}

    def root(k):
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    owner: dict[int, int] = {}
    for key, nodes in reach.items():
        for n in nodes:
            if n in owner:
                parent[root(key)] = root(owner[n])
            else:
                owner[n] = key
    groups: dict[int, list] = {}
    for key in splits:
        groups.setdefault(root(key), []).append(splits[key])
    blocks, covered = [], set()
    for members in groups.values():
        block, nodes = _decomposed(members, graph)
        if block is not None:
            blocks.append(block)
            covered |= nodes
    for node in graph.nodes:
        if node.op in ATTENTION_OPS:
            blocks.append(_fused(node, graph))
        elif node.op == "Softmax" and id(node) not in covered:
            blocks.append(AttentionBlock("decomposed", node.name, reason=(
                f"attention at Softmax node {node.name!r} not recognized: its Q/K/V are "
                "not linear projections reshaped to [.., heads, head_size]")))
    return blocks


def _split(node: gs.Node, graph: gs.Graph):
    """(linear, heads, head size) when Reshape ``node`` splits a projection into heads."""
    lin = linear_producing(node.inputs[0], graph)
    tail = shape_tail(node, 2) if lin is not None else None
    if tail is None:
        return None
    width = int(lin.weight.shape[1])
    (h, _), (d, _) = tail
    if d <= 0 or width % d:
        return None
    h = width // d if h == -1 else h
    return (lin, h, d) if h >= 2 and h * d == width else None


def _follow(starts: list[gs.Node], graph: gs.Graph):
    """Follow the head axis (axis -2 of the split outputs) forward: (axes, node axes,
    merges, problems, node ids)."""
    axes = {id(s.outputs[0]): (s.outputs[0], -2) for s in starts}
    queue = [s.outputs[0] for s in starts]
    nodes: dict[int, tuple[gs.Node, int]] = {}
    merges, problems = [], []
    outputs = {id(t) for t in graph.outputs}
    while queue:
        t = queue.pop(0)
        a = axes[id(t)][1]
        if id(t) in outputs:
            problems.append(f"tensor {t.name!r} with heads is a graph output")
        for node in list({id(n): n for n in t.outputs}.values()):
            op = node.op
            if op == "Shape":
                continue
            if op == "Reshape" and node.inputs[0] is t:
                if all(m is not node for m in merges):
                    merges.append(node)
                continue
            if op == "Transpose":
                perm = list(node.attrs.get("perm", []))
                if not perm:
                    problems.append(f"Transpose node {node.name!r} without perm")
                    continue
                out = perm.index(a + len(perm)) - len(perm)
            elif op in ("Softmax", "LogSoftmax"):
                ax = int(node.attrs.get("axis", -1))
                if ax >= 0:
                    ax = ax - len(t.shape) if t.shape is not None else a
                if ax == a:
                    problems.append(f"{op} node {node.name!r} normalizes over heads")
                out = a
            elif op == "MatMul":
                if a > -3:
                    problems.append(f"MatMul node {node.name!r} contracts the head axis")
                out = a
            elif op in ELEMENTWISE:
                out = a
            else:
                problems.append(f"{t.name!r} (heads on axis {a}) is read by {op} node "
                                f"{node.name!r}")
                continue
            known = nodes.get(id(node))
            if known is not None:
                if known[1] != out:
                    problems.append(f"node {node.name!r} sees heads on two axes")
                continue
            nodes[id(node)] = (node, out)
            for o in node.outputs:
                if o.name and id(o) not in axes:
                    axes[id(o)] = (o, out)
                    queue.append(o)
    return axes, nodes, merges, problems, set(nodes)


def _decomposed(members: list, graph: gs.Graph):
    splits = [m[0] for m in members]
    axes, nodes, merges, problems, ids = _follow(splits, graph)
    softmax = [n for n, _ in nodes.values() if n.op in ("Softmax", "LogSoftmax")]
    if not softmax:
        return None, set()  # a reshape of a linear, but no attention
    anchor = softmax[0].name
    shapes = {(h, d) for _, _, h, d in members}
    block = AttentionBlock("decomposed", anchor, splits=splits,
                           projections=[m[1] for m in members], axes=list(axes.values()))
    where = f"attention at Softmax node {anchor!r}"
    split_names = ", ".join(repr(s.name) for s in splits)
    if len(shapes) != 1:
        problems.append(f"{where}: Reshape nodes {split_names} split the projections "
                        f"into different heads {sorted(shapes)}")
    h, d = sorted(shapes)[0]
    block.heads, block.head_size = h, d
    if len(members) != 3:
        problems.append(f"{where}: {len(members)} projections split into heads (Reshape "
                        f"nodes {split_names}; want Q, K, V)")
    if len(merges) != 1:
        named = ": " + ", ".join(repr(m.name) for m in merges) if merges else ""
        problems.append(f"{where}: {len(merges)} reshapes merge the heads (want 1)"
                        f"{named}")
    else:
        block.merge = merges[0]
        tail = shape_tail(block.merge, 1)
        if axes[id(block.merge.inputs[0])][1] != -2 or tail is None or \
                tail[0][0] not in (-1, h * d):
            problems.append(f"Reshape node {block.merge.name!r} does not merge "
                            f"[.., {h}, {d}] into [.., {h * d}]")
    for node, out in nodes.values():
        for i, u in enumerate(node.inputs):
            if id(u) in axes or not u.name:
                continue
            if node.op == "MatMul":
                problems.append(f"MatMul node {node.name!r} reads {u.name!r} without heads")
                continue
            value = constant_value(u)
            shape = value.shape if value is not None else u.shape
            if shape is None or len(shape) + out < 0:
                continue  # broadcast over heads (unknown shape: masks are)
            dim = shape[len(shape) + out]
            if not isinstance(dim, (int, np.integer)) or dim == 1:
                continue
            if dim == h and value is not None:
                block.head_params.append((node, i, out))
            else:
                problems.append(f"node {node.name!r} reads {u.name!r} with {dim} entries "
                                "on the head axis")
    if block.merge is not None:
        block.context = channel_region(block.merge.outputs[0], h * d, graph)
        problems += block.context.problems
    block.reason = problems[0] if problems else None
    return block, ids | {id(s) for s in softmax}


def _fused(node: gs.Node, graph: gs.Graph) -> AttentionBlock:
    block = AttentionBlock("fused", node.name, node=node)
    if node.op != "Attention" or node.domain != "com.microsoft":
        block.reason = f"{node.domain or 'ai.onnx'} {node.op} node {node.name!r} is not " \
            "supported (com.microsoft Attention is)"
        return block
    from graphopt.passes.prune._blocks import const_input

    w = const_input(node, 1)
    heads = int(node.attrs.get("num_heads", 0))
    sizes = list(node.attrs.get("qkv_hidden_sizes", []) or [])
    optional = [(i, node.inputs[i]) for i in range(4, len(node.inputs))
                if node.inputs[i].name]
    if w is None or w.ndim != 2:
        block.reason = f"Attention node {node.name!r}: weights are not a constant"
    elif len(node.inputs) > 2 and node.inputs[2].name and constant_value(
            node.inputs[2]) is None:
        block.reason = f"Attention node {node.name!r}: bias is not a constant"
    elif any(i != 5 or constant_value(t) is None for i, t in optional):
        block.reason = f"Attention node {node.name!r} has past state or a computed " \
            "attention bias"
    elif any(o.outputs or o in graph.outputs for o in node.outputs[1:]):
        block.reason = f"Attention node {node.name!r} returns its present state"
    elif heads < 2 or (sizes and (len(sizes) != 3 or any(s % heads for s in sizes))) or \
            (not sizes and w.shape[1] % (3 * heads)):
        block.reason = f"Attention node {node.name!r}: {heads} heads do not divide " \
            "its projections"
    if block.reason:
        return block
    sizes = sizes or [w.shape[1] // 3] * 3
    block.heads, block.head_size = heads, sizes[2] // heads
    block.context = channel_region(node.outputs[0], sizes[2], graph)
    block.reason = block.context.problems[0] if block.context.problems else None
    return block
