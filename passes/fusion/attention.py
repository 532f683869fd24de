"""Self-attention fusion (``fuse-attention``): scaled-dot-product attention as exporters
emit it, replaced by one attention op the target runs.

The block (``x`` [B, S, E], H heads of size D)::

    q = Transpose(0,2,1,3)(Reshape(x @ Wq + bq, [B,S,H,D]))        [B,H,S,D]
    k = Kᵀ(Reshape(x @ Wk + bk, [B,S,H,D]))                        [B,H,D,S]
    v = Transpose(0,2,1,3)(Reshape(x @ Wv + bv, [B,S,H,D]))        [B,H,S,D]
    p = Softmax(((q·a) @ (k·b))·c [+ mask], axis=-1)   [then Where(IsNaN(p), 0, p)]
    y = Reshape(Transpose(0,2,1,3)([Reshape to itself](p @ v)), [B,S,H*D])

It is matched backwards from ``y``'s Reshape, one small matcher per piece (projection,
head split, Kᵀ, scale, mask, probabilities, head merge), into an ``_Attention``.

* ``Kᵀ`` is Transpose(0,2,3,1) of the split K, Transpose(0,1,3,2) of Transpose(0,2,1,3), or
  the dynamo form Reshape[B*H,S,D]→Transpose(0,2,1)→Reshape[B,H,D,S];
* the scale ``a·b·c`` is any product of constant scalar Mul/Div on Q, on Kᵀ and on the
  scores (``1/√d`` on the scores, or ``√(1/√d)`` on Q and on K as the SDPA exports do);
  a scale that is no constant breaks the match;
* the mask is optional; when present it must be a padding mask of a 2-D graph input
  ``m`` [B, S] (0 = padding), added to the scores as ``(1 - m)·NEG`` or
  ``Where(m, 0, NEG)`` with ``m`` broadcast to [B,1,1,S] or [B,1,S,S]. A mask built by
  Unsqueeze/Cast/Expand is recognized by its structure; one built by index arithmetic
  (transformers' ``masking_utils``: Range, Gather/GatherND, And, Expand) is recognized by
  its value: its subgraph depends on no graph input but ``m`` (other inputs only through
  Shape) and, evaluated on several padding patterns and sizes, equals ``m[:, None, None, :]``;
* Q, K and V come from the same ``x`` (self-attention), every intermediate is read only
  inside the block (or by shape computations that only feed the block) and is no graph
  output, and the Softmax is over the last axis.

What replaces it is chosen by what the target runs (``PassContext.supports``):

* ``com.microsoft.Attention`` (ONNX Runtime's contrib op, the fastest of the attention ops
  on ORT's CPU): inputs ``x``, packed weights [hidden, 3·hidden] (Q|K|V), packed bias
  [3·hidden] and ``mask_index`` = the int32 2-D mask (a Cast is inserted for other
  types, shared by all layers; ORT keeps the keys where it is > 0, so masks are 0/1);
  attributes ``num_heads``, ``mask_filter_value`` (the mask's NEG, so a fully padded
  sequence gets what the original gives it) and ``scale`` unless it is 1/√d. The projections and the mask subgraph die (``eliminate-dead-code`` sweeps them);
* the standard ONNX ``Attention`` (opset 23) when the target has no ``com.microsoft`` and
  the model's opset is at least 23: the projections stay, Q/K/V go in as 3-D tensors with
  ``q_num_heads = kv_num_heads = H`` and ``scale``; the additive mask is its
  ``attn_mask`` (expanded to [B,1,S,S], which ONNX Runtime requires);
* neither: the block stays as it is.

Where the original guards the probabilities against NaN (``Where(IsNaN(p), 0, p)``, as
the SDPA exports do) and masks with ``-inf``, a fully padded sequence attends to nothing
and its rows are zero; the fused op then gets the same guard on its output.

Only float32 blocks are fused (ONNX Runtime's CPU attention kernels are float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import verify
from graphopt.errors import ModelError
from graphopt.ir import Model
from graphopt.pass_infra import Pass, PassContext, PassResult
from graphopt.rewrite import (consumers, constant_value, is_graph_output, make_constant,
                              remove_dead, tensor_names, unique_name)

CONTRIB = "com.microsoft"
ONNX_ATTENTION_OPSET = 23
# (batch, sequence) sizes a mask computed by index arithmetic is evaluated at (a static
# dimension keeps its size), each with several padding patterns, before it counts as a
# padding mask.
MASK_PROBE_SIZES = ((2, 5), (3, 7), (1, 1))
MAX_MASK_NODES = 1000  # larger mask subgraphs are not evaluated
MAX_SIDE_NODES = 64  # shape computations reading a block's intermediates


def _onnx_has_attention() -> bool:
    try:
        return onnx.defs.get_schema("Attention", ONNX_ATTENTION_OPSET, "").since_version \
            >= ONNX_ATTENTION_OPSET
    except onnx.defs.SchemaError:
        return False


# ---------------------------------------------------------------------- the match
@dataclass
class _Projection:
    """``x @ weight + bias``: one of the Q/K/V projections."""

    input: gs.Tensor  # x [B, S, hidden_in]
    weight: np.ndarray  # [hidden_in, hidden]
    bias: np.ndarray  # [hidden]
    output: gs.Tensor  # [B, S, hidden]


@dataclass
class _Heads:
    """A projection split into heads: Reshape [B,S,H,D] (+ Transpose to [B,H,S,D])."""

    projection: _Projection
    num_heads: int
    head_size: int


@dataclass
class _Mask:
    """A padding mask added to the scores: 0 where ``source`` is nonzero, else ``fill``."""

    source: gs.Tensor  # the 2-D graph input [B, S]
    bias: gs.Tensor  # what the block adds to its scores, [B, 1, 1|S, S]
    fill: float


@dataclass
class _Attention:
    query: _Heads
    key: _Heads
    value: _Heads
    scale: float
    mask: _Mask | None
    nan_guard: bool  # the probabilities pass through Where(IsNaN(p), 0, p)
    merge: gs.Node  # the head merge Reshape, which writes the block's output [B, S, H*D]
    nodes: list[gs.Node]  # the block's nodes
    side: list[gs.Node] = field(default_factory=list)  # shape computations only it reads

    @property
    def output(self) -> gs.Tensor:
        return self.merge.outputs[0]

    @property
    def input(self) -> gs.Tensor:
        return self.query.projection.input

    @property
    def num_heads(self) -> int:
        return self.query.num_heads

    @property
    def head_size(self) -> int:
        return self.query.head_size

    @property
    def masked_rows_are_zero(self) -> bool:
        """A fully masked row is zero in the original (NaN turned into 0)."""
        return self.nan_guard and self.mask is not None and self.mask.fill == -math.inf


# ---------------------------------------------------------------------- small helpers
def _scalar(tensor: gs.Tensor, depth: int = 0) -> float | None:
    """The value of a constant scalar expression (a constant of one element and rank at
    most 1, or Identity/Cast/CastLike/Sqrt/Reciprocal/Neg of one, or Mul/Div/Add/Sub of
    two), else None."""
    value = constant_value(tensor)
    if value is not None:
        if value.size != 1 or value.ndim > 1 or value.dtype.kind not in "fiu":
            return None
        return float(value.reshape(-1)[0])
    if depth > 8 or len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    if node.op in ("Identity", "Cast", "CastLike", "Sqrt", "Reciprocal", "Neg") and node.inputs:
        inner = _scalar(node.inputs[0], depth + 1)
        if inner is None:
            return None
        if node.op == "Sqrt":
            return math.sqrt(inner) if inner >= 0 else None
        if node.op == "Reciprocal":
            return 1.0 / inner if inner else None
        return -inner if node.op == "Neg" else inner
    if node.op in ("Mul", "Div", "Add", "Sub") and len(node.inputs) == 2:
        a, b = (_scalar(t, depth + 1) for t in node.inputs)
        if a is None or b is None:
            return None
        if node.op == "Div":
            return a / b if b else None
        return a * b if node.op == "Mul" else a + b if node.op == "Add" else a - b
    return None


def _const(tensor: gs.Tensor) -> np.ndarray | None:
    """A constant, seen through Identity (TorchScript shares equal weights that way)."""
    while constant_value(tensor) is None and len(tensor.inputs) == 1 \
            and tensor.inputs[0].op == "Identity":
        tensor = tensor.inputs[0].inputs[0]
    return constant_value(tensor)


def _weight(tensor: gs.Tensor) -> np.ndarray | None:
    """A constant [K, N] MatMul weight, also when stored transposed behind Transpose(1,0)."""
    value = _const(tensor)
    if value is None and len(tensor.inputs) == 1 and tensor.inputs[0].op == "Transpose":
        node = tensor.inputs[0]
        inner = _const(node.inputs[0])
        if inner is not None and inner.ndim == 2 and _perm(node) in (None, [1, 0]):
            value = inner.T
    return value if value is not None and value.ndim == 2 else None


def _same_dim(a, b) -> bool | None:
    """Whether two dimensions are equal: True (equal ints, or the same symbolic name),
    False (different ints), None (not known)."""
    if a is not None and a == b and (isinstance(a, str) or a >= 0):
        return True
    if isinstance(a, int) and isinstance(b, int) and a >= 0 and b >= 0:
        return False
    return None


def _shape(tensor: gs.Tensor) -> list | None:
    return list(tensor.shape) if tensor.shape is not None else None


def _perm(node: gs.Node) -> list[int] | None:
    perm = node.attrs.get("perm")
    return [int(p) for p in perm] if perm is not None else None


def _unsqueeze_axes(node: gs.Node) -> list[int] | None:
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    axes = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    return [int(a) for a in axes.reshape(-1)] if axes is not None else None


# ---------------------------------------------------------------------- matching
class _Block:
    """Matches one attention block, collecting its nodes as it goes. Each method matches
    one piece and returns None when it is not there (the block then does not match)."""

    def __init__(self, matcher: "_Matcher"):
        self.m = matcher
        self.nodes: list[gs.Node] = []

    def _same(self, *pairs: tuple) -> bool:
        """Whether the dimension pairs are all known to be equal (a pair not known
        either way is noted: inferring shapes symbolically may tell)."""
        verdicts = [_same_dim(a, b) for a, b in pairs]
        if False in verdicts:
            return False
        if None in verdicts:
            self.m.unknown_shape()
            return False
        return True

    # -- reading the graph
    def _producer(self, tensor: gs.Tensor, *ops: str) -> gs.Node | None:
        """The node of type ``ops`` writing ``tensor`` (through Identity nodes, which join
        the block), or None."""
        skipped = []
        while len(tensor.inputs) == 1 and tensor.inputs[0].op == "Identity":
            skipped.append(tensor.inputs[0])
            tensor = tensor.inputs[0].inputs[0]
        node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
        if node is None or node.op not in ops or self.m.owner.get(id(node)) is not self.m.graph:
            return None
        self.nodes += skipped + [node]
        return node

    def _scaled(self, tensor: gs.Tensor) -> tuple[gs.Tensor, float]:
        """Peel constant scalar Mul/Div off ``tensor``: (the tensor before, the factor)."""
        factor = 1.0
        while True:
            before = len(self.nodes)
            node = self._producer(tensor, "Mul", "Div")
            if node is None or len(node.inputs) != 2:
                del self.nodes[before:]
                return tensor, factor
            sides = ((0, 1), (1, 0)) if node.op == "Mul" else ((0, 1),)
            for data, const in sides:
                c = _scalar(node.inputs[const])
                if c is not None and constant_value(node.inputs[data]) is None:
                    break
            else:
                del self.nodes[before:]
                return tensor, factor
            if not math.isfinite(c) or c == 0:
                del self.nodes[before:]
                return tensor, factor
            factor *= c if node.op == "Mul" else 1.0 / c
            tensor = node.inputs[data]

    # -- the pieces, from the input side
    def projection(self, tensor: gs.Tensor) -> _Projection | None:
        """``tensor = x @ W + b`` (Add in either order, or no Add) with constant W, b."""
        add = self._producer(tensor, "Add", "MatMul")
        if add is None:
            return None
        if add.op == "MatMul":
            matmul, bias = add, None
        else:
            matmul = None
            for side in (0, 1):
                before = len(self.nodes)
                matmul = self._producer(add.inputs[side], "MatMul")
                bias = _const(add.inputs[1 - side])
                if matmul is not None and bias is not None:
                    break
                del self.nodes[before:]
                matmul = None
            if matmul is None:
                return None
        weight = _weight(matmul.inputs[1])
        if weight is None or weight.dtype != np.float32:
            return None
        hidden = weight.shape[1]
        if bias is None:
            bias = np.zeros(hidden, dtype=weight.dtype)
        if bias.dtype != weight.dtype or bias.size != hidden or bias.shape[-1:] != (hidden,):
            return None
        x = matmul.inputs[0]
        while len(x.inputs) == 1 and x.inputs[0].op == "Identity":
            x = x.inputs[0].inputs[0]
        shape = _shape(x)
        if shape is None or len(shape) != 3 or shape[2] != weight.shape[0] \
                or x.dtype != np.float32:
            return self.m.unknown_shape() if shape is None else None
        return _Projection(x, weight, bias.reshape(hidden), tensor)

    def split_heads(self, tensor: gs.Tensor) -> tuple[_Heads, float] | None:
        """``tensor`` = Reshape(projection, [B,S,H,D]), with any scales on the way:
        (the heads, the product of the scales)."""
        tensor, outer = self._scaled(tensor)
        reshape = self._producer(tensor, "Reshape")
        if reshape is None:
            return None
        flat, inner = self._scaled(reshape.inputs[0])
        proj = self.projection(flat)
        if proj is None:
            return None
        src, out = _shape(flat), _shape(reshape.outputs[0])
        if src is None or out is None:
            return self.m.unknown_shape()
        if len(out) != 4:
            return None
        if not self._same((out[0], src[0]), (out[1], src[1])):
            return None
        hidden = proj.weight.shape[1]
        heads, size = out[2], out[3]
        if isinstance(heads, int) and heads > 0 and not isinstance(size, int):
            size = hidden // heads if hidden % heads == 0 else None
        elif isinstance(size, int) and size > 0 and not isinstance(heads, int):
            heads = hidden // size if hidden % size == 0 else None
        if not isinstance(heads, int) or not isinstance(size, int) or heads * size != hidden:
            return None
        return _Heads(proj, heads, size), outer * inner

    def heads(self, tensor: gs.Tensor) -> tuple[_Heads, float] | None:
        """``tensor`` = Transpose(0,2,1,3) of the split heads: [B,H,S,D] (with scales)."""
        tensor, outer = self._scaled(tensor)
        transpose = self._producer(tensor, "Transpose")
        if transpose is None or _perm(transpose) != [0, 2, 1, 3]:
            return None
        split = self.split_heads(transpose.inputs[0])
        return None if split is None else (split[0], outer * split[1])

    def key_transposed(self, tensor: gs.Tensor) -> tuple[_Heads, float] | None:
        """``tensor`` = Kᵀ [B,H,D,S]: Transpose(0,2,3,1) of the split K, Transpose(0,1,3,2)
        of K [B,H,S,D], or Reshape[B*H,S,D] → Transpose(0,2,1) → Reshape[B,H,D,S] of K
        (the dynamo exporter's transpose of the last two axes); with scales."""
        tensor, outer = self._scaled(tensor)
        node = self._producer(tensor, "Transpose", "Reshape")
        found = None
        if node is not None and node.op == "Transpose" and _perm(node) == [0, 2, 3, 1]:
            found = self.split_heads(node.inputs[0])
        elif node is not None and node.op == "Transpose" and _perm(node) == [0, 1, 3, 2]:
            found = self.heads(node.inputs[0])
        elif node is not None and node.op == "Reshape":
            found = self._key_via_3d(node)
        return None if found is None else (found[0], outer * found[1])

    def _key_via_3d(self, back: gs.Node) -> tuple[_Heads, float] | None:
        swapped, a = self._scaled(back.inputs[0])
        swap = self._producer(swapped, "Transpose")
        if swap is None or _perm(swap) != [0, 2, 1]:
            return None
        flat_t, b = self._scaled(swap.inputs[0])
        flat = self._producer(flat_t, "Reshape")
        if flat is None:
            return None
        key = flat.inputs[0]
        ks, fs, outs = _shape(key), _shape(flat.outputs[0]), _shape(back.outputs[0])
        if ks is None or fs is None or outs is None:
            return self.m.unknown_shape()
        if len(ks) != 4 or len(fs) != 3 or len(outs) != 4 \
                or not self._same((fs[1], ks[2]), (fs[2], ks[3]),
                                  *((o, ks[i]) for o, i in zip(outs, (0, 1, 3, 2)))):
            return None
        found = self.heads(key)
        return None if found is None else (found[0], a * b * found[1])

    def mask(self, tensor: gs.Tensor) -> _Mask | None:
        """An additive padding mask: ``(1 - m)·NEG`` (Mul in either order, the ``1 - m``
        maybe masked_fill'ed as ``Where(Cast(1 - m, bool), NEG, 1 - m)``) or
        ``Where(m, 0, NEG)``, with ``m`` the graph input's padding mask."""
        node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
        if node is None or self.m.owner.get(id(node)) is not self.m.graph:
            return None
        keep, fill = None, None
        if node.op == "Where" and len(node.inputs) == 3:
            zero, neg = constant_value(node.inputs[1]), _scalar(node.inputs[2])
            if zero is not None and zero.size == 1 and float(zero.reshape(-1)[0]) == 0.0:
                keep, fill = node.inputs[0], neg  # Where(m, 0, NEG)
            else:
                inverted, fill = self._inverted(node.inputs[2]), _scalar(node.inputs[1])
                cast = node.inputs[0].inputs[0] if len(node.inputs[0].inputs) == 1 else None
                if inverted is not None and cast is not None and cast.op == "Cast" \
                        and cast.inputs[0] is node.inputs[2]:
                    keep = inverted  # masked_fill(1 - m, 1 - m != 0, NEG)
        elif node.op == "Mul" and len(node.inputs) == 2:
            for side in (0, 1):
                inverted, neg = self._inverted(node.inputs[side]), _scalar(node.inputs[1 - side])
                if inverted is not None and neg is not None:
                    keep, fill = inverted, neg
                    break
        if keep is None or fill is None or not fill < 0:
            return None
        source = self.m.masks.source(keep)
        return None if source is None else _Mask(source, tensor, fill)

    @staticmethod
    def _inverted(tensor: gs.Tensor) -> gs.Tensor | None:
        """``m`` of ``tensor = 1 - m``."""
        node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
        if node is None or node.op != "Sub" or len(node.inputs) != 2 \
                or _scalar(node.inputs[0]) != 1.0:
            return None
        return node.inputs[1]

    def probabilities(self, tensor: gs.Tensor) -> tuple[gs.Node, bool] | None:
        """Softmax over the last axis, maybe guarded: (the Softmax, whether guarded)."""
        guard = self._producer(tensor, "Where")
        if guard is not None:
            isnan = self._producer(guard.inputs[0], "IsNaN")
            zero = constant_value(guard.inputs[1])
            if isnan is None or zero is None or zero.size != 1 or zero.reshape(-1)[0] != 0 \
                    or isnan.inputs[0] is not guard.inputs[2]:
                return None
            tensor = guard.inputs[2]
        softmax = self._producer(tensor, "Softmax")
        if softmax is None:
            return None
        shape = _shape(softmax.inputs[0])
        if shape is None:
            return self.m.unknown_shape()
        axis = softmax.attrs.get("axis", -1 if self.m.opset >= 13 else 1)
        if len(shape) != 4 or axis not in (-1, 3):
            return None
        return softmax, guard is not None

    def merged_context(self, merge: gs.Node) -> gs.Node | None:
        """``merge`` = Reshape(Transpose(0,2,1,3)([Reshape(same shape)](probs @ V)),
        [B,S,H*D]): the probs @ V MatMul."""
        if merge.op != "Reshape" or len(merge.inputs) != 2 or len(merge.outputs) != 1:
            return None
        self.nodes.append(merge)
        transpose = self._producer(merge.inputs[0], "Transpose")
        if transpose is None or _perm(transpose) != [0, 2, 1, 3]:
            return None
        context = transpose.inputs[0]
        view = self._producer(context, "Reshape")
        if view is not None:  # the SDPA exports' view of [B,H,S,D] as itself
            a, b = _shape(view.inputs[0]), _shape(view.outputs[0])
            if a is None or b is None:
                return self.m.unknown_shape()
            if len(a) != 4 or len(b) != 4 or not self._same(*zip(a, b)):
                return None
            context = view.inputs[0]
        return self._producer(context, "MatMul")

    def masked_scores(self, tensor: gs.Tensor) -> tuple[gs.Tensor, _Mask | None] | None:
        """``tensor`` = scores + padding mask (either order), or the scores alone:
        (the scores, the mask). None when something else is added."""
        add = self._producer(tensor, "Add")
        if add is None:
            return tensor, None
        for side in (0, 1):
            before = len(self.nodes)
            scores, _ = self._scaled(add.inputs[side])
            qk = self._producer(scores, "MatMul")
            del self.nodes[before:]
            if qk is not None:
                mask = self.mask(add.inputs[1 - side])
                return None if mask is None else (add.inputs[side], mask)
        return None

    def match(self, merge: gs.Node) -> _Attention | None:
        """The block whose output ``merge`` (the head merge Reshape) writes."""
        pv = self.merged_context(merge)
        if pv is None:
            return None
        value = self.heads(pv.inputs[1])
        probs = self.probabilities(pv.inputs[0])
        if value is None or probs is None or value[1] != 1.0:
            return None
        softmax, nan_guard = probs
        masked = self.masked_scores(softmax.inputs[0])
        if masked is None:
            return None
        scores, mask = masked
        scores, scale = self._scaled(scores)
        qk = self._producer(scores, "MatMul")
        if qk is None:
            return None
        query = self.heads(qk.inputs[0])
        key = self.key_transposed(qk.inputs[1])
        if query is None or key is None:
            return None
        (q, q_scale), (k, k_scale), (v, _) = query, key, value
        scale *= q_scale * k_scale
        x = q.projection.input
        if k.projection.input is not x or v.projection.input is not x:
            return None  # cross-attention
        if not (q.num_heads == k.num_heads == v.num_heads
                and q.head_size == k.head_size == v.head_size) or not scale > 0:
            return None
        if not self._output_is_merged(merge.outputs[0], x, q.num_heads * q.head_size):
            return None
        if mask is not None:
            src, xs = _shape(mask.source), _shape(x)
            if not self._same((src[0], xs[0]), (src[1], xs[1])):
                return None
        side = self.m.only_read_inside(self.nodes, merge)
        if side is None:
            return None
        return _Attention(q, k, v, scale, mask, nan_guard, merge, self.nodes, side)

    def _output_is_merged(self, out: gs.Tensor, x: gs.Tensor, hidden: int) -> bool:
        """``out`` is [B, S, hidden] with x's B and S."""
        shape, xs = _shape(out), _shape(x)
        if shape is None:
            return bool(self.m.unknown_shape())
        if len(shape) != 3 or (isinstance(shape[2], int) and shape[2] != hidden):
            return False
        return self._same((shape[2], hidden), (shape[0], xs[0]), (shape[1], xs[1]))


class _PaddingMasks:
    """Recognizes (and remembers) the 2-D graph input a broadcast padding mask comes from."""

    def __init__(self, model: Model):
        self.model = model
        self.inputs = {id(t): t for t in model.graph.inputs
                       if t.name not in model.input_defaults}
        self.known: dict[int, gs.Tensor | None] = {}
        self.missing_shapes = False  # a mask was not recognized for lack of shapes

    def source(self, keep: gs.Tensor) -> gs.Tensor | None:
        """The 2-D input ``m`` when ``keep`` equals ``m[:, None, None, :]`` broadcast to
        [B, 1, 1|S, S] (as a boolean, or as the 0/1 number ``m`` holds)."""
        if id(keep) not in self.known:
            self.known[id(keep)] = self._broadcast(keep) or self._evaluated(keep)
        return self.known[id(keep)]

    def _is_mask_input(self, tensor: gs.Tensor) -> bool:
        shape = _shape(tensor)
        return id(tensor) in self.inputs and shape is not None and len(shape) == 2 \
            and tensor.dtype is not None and np.dtype(tensor.dtype).kind in "biuf"

    def _broadcast(self, keep: gs.Tensor) -> gs.Tensor | None:
        """``keep`` = Cast/Unsqueeze/Expand chain of the input: [B,S] → [B,1,1,S] → ..."""
        steps: list[gs.Node] = []
        tensor = keep
        while not self._is_mask_input(tensor):
            node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
            if node is None or node.op not in ("Cast", "Identity", "Unsqueeze", "Expand") \
                    or len(steps) > 8:
                return None
            steps.append(node)
            tensor = node.inputs[0]
        dims = ["B", "S"]
        for node in reversed(steps):
            if node.op == "Unsqueeze":
                axes = _unsqueeze_axes(node)
                if axes is None:
                    return None
                rank = len(dims) + len(axes)
                for axis in sorted(a % rank for a in axes):
                    dims.insert(axis, "1")
            elif node.op == "Expand":
                shape = _shape(node.outputs[0])
                if dims != ["B", "1", "1", "S"] or shape is None or len(shape) != 4:
                    return None
        return tensor if dims == ["B", "1", "1", "S"] else None

    def _evaluated(self, keep: gs.Tensor) -> gs.Tensor | None:
        """``keep`` computed from one 2-D input by anything else: the input, when the
        computation reads no other input's values (shapes are fine) and gives the padding
        mask on every probe."""
        data_inputs = self._data_inputs(keep)
        if data_inputs is None or len(data_inputs) != 1:
            return None
        source = data_inputs[0]
        if not self._is_mask_input(source):
            return None
        cone, fed, unresolved = self._evaluation_cone(keep, source)
        try:
            if cone is not None and self._is_padding(keep, source, cone, fed):
                return source
        except Exception:  # ONNX Runtime cannot run the computation: not recognized
            pass
        self.missing_shapes |= unresolved  # known shapes might have cut the computation
        return None

    def _data_inputs(self, keep: gs.Tensor) -> list[gs.Tensor] | None:
        """The graph inputs whose values reach ``keep`` (Shape and Size read none), or
        None if a value on the way comes from elsewhere (an outer scope, a custom or
        random op) or the computation is too big."""
        graph_nodes = {id(n) for n in self.model.graph.nodes}
        found: dict[int, gs.Tensor] = {}
        stack, seen = [keep], set()
        while stack:
            tensor = stack.pop()
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            if id(tensor) in self.inputs:
                found[id(tensor)] = tensor
                continue
            if isinstance(tensor, gs.Constant):
                continue
            node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
            if node is None or id(node) not in graph_nodes or not _evaluable(node) \
                    or len(seen) > MAX_MASK_NODES:
                return None
            if node.op not in ("Shape", "Size"):
                stack.extend(t for t in node.inputs if not t.is_empty())
        return list(found.values())

    def _evaluation_cone(self, keep: gs.Tensor, source: gs.Tensor
                         ) -> tuple[dict[int, gs.Node] | None, list[gs.Tensor], bool]:
        """The nodes that compute ``keep`` (None if one cannot be evaluated) and the
        tensors to feed them: graph inputs, and the tensors Shape/Size read whose shapes
        are known in ``source``'s dimensions (the computation behind those is not needed;
        where a shape is not known, it is: the last item says whether that happened)."""
        dims = set(source.shape)
        graph_nodes = {id(n) for n in self.model.graph.nodes}
        cone: dict[int, gs.Node] = {}
        fed: dict[int, gs.Tensor] = {}
        shape_only: dict[int, gs.Tensor] = {}
        stack, seen, unresolved = [keep], set(), False
        while stack:
            tensor = stack.pop()
            if id(tensor) in seen or isinstance(tensor, gs.Constant):
                continue
            seen.add(id(tensor))
            if id(tensor) in self.inputs:
                fed[id(tensor)] = tensor
                continue
            node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
            if node is None or id(node) not in graph_nodes or not _evaluable(node) \
                    or len(cone) >= MAX_MASK_NODES:
                return None, [], unresolved
            cone[id(node)] = node
            for t in node.inputs:
                shape = _shape(t)
                if node.op in ("Shape", "Size") and shape is not None and t.dtype is not None \
                        and all(isinstance(d, int) and d >= 0 or d in dims for d in shape):
                    shape_only[id(t)] = t
                elif not t.is_empty():
                    unresolved |= node.op in ("Shape", "Size")
                    stack.append(t)
        # Read only for their shapes (not computed anyway): fed as zeros of that shape.
        fed.update({k: t for k, t in shape_only.items() if k not in seen})
        return cone, list(fed.values()), unresolved

    def _is_padding(self, keep: gs.Tensor, source: gs.Tensor, cone: dict,
                    fed: list[gs.Tensor]) -> bool:
        session = verify.session(self._extract(keep, cone, fed))
        batch_dim, seq_dim = source.shape
        for batch, seq in MASK_PROBE_SIZES:
            batch = batch_dim if isinstance(batch_dim, int) else batch
            seq = seq_dim if isinstance(seq_dim, int) else seq
            sizes = {batch_dim: batch, seq_dim: seq}
            for mask in _padding_patterns(batch, seq):
                feeds = {}
                for t in fed:  # all but the source are read only for their shapes
                    dims = [d if isinstance(d, int) else sizes.get(d) for d in t.shape or [None]]
                    if any(d is None for d in dims):
                        return False
                    feeds[t.name] = mask.astype(t.dtype) if t is source else \
                        np.zeros(dims, dtype=t.dtype)
                value = np.asarray(verify.run(session, feeds)[keep.name])
                if value.ndim != 4 or value.shape[0] != batch or value.shape[1] != 1 \
                        or value.shape[2] not in (1, seq) or value.shape[3] != seq:
                    return False
                expected = np.broadcast_to((mask != 0)[:, None, None, :], value.shape)
                if not np.array_equal(value.astype(np.float64), expected.astype(np.float64)):
                    return False
        return True

    def _extract(self, keep: gs.Tensor, cone: dict, fed: list[gs.Tensor]) -> onnx.ModelProto:
        """The nodes of ``cone`` as a model from the ``fed`` tensors to ``keep``."""
        mapping: dict[int, gs.Tensor] = {}

        def copy(t: gs.Tensor) -> gs.Tensor:
            if t.is_empty():
                return gs.Variable.empty()
            if id(t) not in mapping:
                mapping[id(t)] = gs.Constant(t.name, t._values) if isinstance(t, gs.Constant) \
                    else gs.Variable(t.name, dtype=t.dtype)
            return mapping[id(t)]

        graph = self.model.graph
        inputs = [gs.Variable(t.name, dtype=t.dtype, shape=t.shape) for t in fed]
        mapping.update({id(t): v for t, v in zip(fed, inputs)})
        nodes = [gs.Node(n.op, n.name, dict(n.attrs), [copy(t) for t in n.inputs],
                         [copy(t) for t in n.outputs], n.domain)
                 for n in graph.nodes if id(n) in cone]
        sub = gs.Graph(nodes, inputs, [copy(keep)], opset=self.model.opset,
                       import_domains=graph.import_domains)
        return gs.export_onnx(sub, do_type_check=False)


def _evaluable(node: gs.Node) -> bool:
    """A standard, deterministic op without subgraphs."""
    return node.domain in ("", "ai.onnx", None) and not node.op.startswith("Random") \
        and node.op not in ("Multinomial", "Bernoulli", "Dropout") \
        and not any(isinstance(v, gs.Graph) for v in node.attrs.values())


def _padding_patterns(batch: int, seq: int) -> list[np.ndarray]:
    """Masks [batch, seq]: right padding of different lengths, no padding, all padding,
    and a scattered pattern (so a mask that only looks at lengths is caught too)."""
    rng = np.random.default_rng(batch * 100 + seq)
    right = np.array([[1 if j < seq - i else 0 for j in range(seq)] for i in range(batch)])
    return [right, np.ones((batch, seq), np.int64), np.zeros((batch, seq), np.int64),
            rng.integers(0, 2, size=(batch, seq))]


class _Matcher:
    """What matching a block needs: the graph, which graph owns each node, the opset,
    the recognized masks; and a note when a match failed for lack of shapes."""

    def __init__(self, model: Model, graph: gs.Graph, masks: _PaddingMasks):
        self.graph = graph
        self.graphs = list(model.all_graphs())
        self.owner = {id(n): g for g in self.graphs for n in g.nodes}
        self.opset = model.opset
        self.masks = masks
        self.missing_shapes = False

    def unknown_shape(self) -> None:
        self.missing_shapes = True
        return None

    def match(self, node: gs.Node) -> _Attention | None:
        return _Block(self).match(node)

    def only_read_inside(self, nodes: list[gs.Node], last: gs.Node) -> list[gs.Node] | None:
        """The block's intermediates (outputs of its nodes but ``last``) are no graph
        outputs and are read only by the block or by nodes (shape computations) whose
        results only the block reads: those nodes, or None if something else reads one."""
        inside = {id(n) for n in nodes}
        side: dict[int, gs.Node] = {}

        def only_inside(tensor: gs.Tensor, depth: int) -> bool:
            if is_graph_output(tensor, self.graphs):
                return False
            for reader in consumers(tensor):
                if id(reader) in inside or id(reader) in side:
                    continue
                if depth > 8 or len(side) >= MAX_SIDE_NODES \
                        or self.owner.get(id(reader)) is not self.graph:
                    return False
                side[id(reader)] = reader
                if not all(only_inside(t, depth + 1) for t in reader.outputs):
                    return False
            return True

        for node in nodes:
            if node is not last and not all(only_inside(t, 0) for t in node.outputs):
                return None
        return list(side.values())


# ---------------------------------------------------------------------- emitting
class _Emitter:
    """Writes the fused op in place of a matched block."""

    def __init__(self, model: Model, graph: gs.Graph):
        self.model = model
        self.graph = graph
        self.names = tensor_names(model.all_graphs())
        self.shared: dict[tuple, gs.Tensor] = {}  # per-mask tensors all layers share

    def _tensor(self, hint: str, dtype=None) -> gs.Variable:
        return gs.Variable(unique_name(self.names, hint), dtype=dtype)

    def _constant(self, hint: str, value: np.ndarray) -> gs.Constant:
        return make_constant(self.graph, hint, value, taken=self.names)

    def _node(self, op: str, inputs: list, hint: str, dtype=None, domain: str | None = None,
              **attrs) -> gs.Variable:
        out = self._tensor(hint, dtype)
        self.graph.nodes.append(gs.Node(op, unique_name(self.names, f"{hint}_node"),
                                        attrs, inputs, [out], domain))
        return out

    def _guarded(self, att: _Attention, fused: gs.Tensor) -> gs.Tensor:
        """``fused`` with NaN rows (fully masked with -inf) set to zero, as the original."""
        if not att.masked_rows_are_zero:
            return fused
        isnan = self._node("IsNaN", [fused], f"{fused.name}_isnan", np.bool_)
        zero = self._constant(f"{fused.name}_zero", np.zeros(1, dtype=np.float32))
        return self._node("Where", [isnan, zero, fused], f"{fused.name}_guarded", np.float32)

    def replace(self, att: _Attention, fused: gs.Tensor) -> None:
        """Let the fused result take the block's output place (name and readers kept),
        then drop the block (and the shape computations only it read)."""
        result = self._guarded(att, fused)
        writer = result.inputs[0]
        out = att.output
        att.merge.outputs.clear()  # the head merge Reshape no longer writes it
        writer.outputs[0] = out
        remove_dead(att.nodes + att.side, self.graph)

    def contrib(self, att: _Attention) -> None:
        """``com.microsoft.Attention(x, W_qkv, b_qkv, mask_index)``."""
        q, k, v = (h.projection for h in (att.query, att.key, att.value))
        hint = att.output.name
        weight = self._constant(f"{hint}_qkv_weight",
                                np.concatenate([q.weight, k.weight, v.weight], axis=1))
        bias = self._constant(f"{hint}_qkv_bias", np.concatenate([q.bias, k.bias, v.bias]))
        inputs = [att.input, weight, bias]
        attrs = {"num_heads": att.num_heads}
        if att.mask is not None:
            inputs.append(self._mask_index(att.mask.source))
            attrs["mask_filter_value"] = float(att.mask.fill)
        if not math.isclose(att.scale, 1.0 / math.sqrt(att.head_size), rel_tol=1e-6):
            attrs["scale"] = float(att.scale)
        fused = self._node("Attention", inputs, f"{hint}_attention", np.float32, CONTRIB,
                           **attrs)
        self.model.require_opset(CONTRIB, 1)
        self.replace(att, fused)

    def _mask_index(self, source: gs.Tensor) -> gs.Tensor:
        """The int32 [B, S] mask (one Cast shared by all layers, unless already int32)."""
        if source.dtype == np.int32:
            return source
        key = ("mask_index", id(source))
        if key not in self.shared:
            self.shared[key] = self._node("Cast", [source], f"{source.name}_int32", np.int32,
                                          to=onnx.TensorProto.INT32)
        return self.shared[key]

    def standard(self, att: _Attention) -> None:
        """ONNX ``Attention`` (opset 23) on the 3-D projections."""
        inputs = [h.projection.output for h in (att.query, att.key, att.value)]
        if att.mask is not None:
            inputs.append(self._full_mask(att.mask, att.input))
        fused = self._node("Attention", inputs, f"{att.output.name}_attention", np.float32,
                           q_num_heads=att.num_heads, kv_num_heads=att.num_heads,
                           scale=float(att.scale))
        self.replace(att, fused)

    def _full_mask(self, mask: _Mask, x: gs.Tensor) -> gs.Tensor:
        """The additive mask as [B, 1, S, S] (ONNX Runtime wants the query axis full)."""
        shape = _shape(mask.bias)
        if shape is not None and len(shape) == 4 and _same_dim(shape[2], _shape(x)[1]):
            return mask.bias
        key = ("full_mask", id(mask.bias))
        if key not in self.shared:
            hint = mask.bias.name
            lead = self._node("Shape", [mask.bias], f"{hint}_lead", np.int64, start=0, end=2)
            seq = self._node("Shape", [x], f"{hint}_seq", np.int64, start=1, end=2)
            last = self._node("Shape", [mask.bias], f"{hint}_last", np.int64, start=3)
            target = self._node("Concat", [lead, seq, last], f"{hint}_full_shape", np.int64,
                                axis=0)
            self.shared[key] = self._node("Expand", [mask.bias, target], f"{hint}_full",
                                          mask.bias.dtype)
        return self.shared[key]


# ---------------------------------------------------------------------- the pass
class FuseAttention(Pass):
    """Fuse scaled-dot-product self-attention into the target's attention op."""

    name = "fuse-attention"
    family = "fusion"
    lossless = True
    # Either one, whichever the target runs (com.microsoft first).
    emits = ((CONTRIB, "Attention"), ("", "Attention"))

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        emit = self._emitter_kind(model, ctx)
        if emit is None:
            return PassResult(changed=False, stats={"skipped": "the target runs no attention "
                                                    "op this pass emits"})
        if not any(n.op == "Softmax" for g in model.all_graphs() for n in g.nodes):
            return PassResult(changed=False)
        fused, missing = _fuse_all(model, emit)
        if missing:  # some blocks lacked shapes: infer them (symbolically) and retry once
            try:
                model.infer_shapes(symbolic=True)
            except ModelError:
                try:
                    model.infer_shapes()
                except ModelError:
                    missing = False
            if missing:
                fused += _fuse_all(model, emit)[0]
        return PassResult(changed=fused > 0, stats={"fused": fused, "op": f"{emit}.Attention"})

    @staticmethod
    def _emitter_kind(model: Model, ctx: PassContext) -> str | None:
        """The domain of the attention op to emit: what the target runs, contrib first."""
        if ctx.supports("Attention", CONTRIB):
            return CONTRIB
        if model.opset >= ONNX_ATTENTION_OPSET and ctx.supports("Attention", "") \
                and _onnx_has_attention():
            return "ai.onnx"
        return None


def _head_merge_after(softmax: gs.Node) -> gs.Node | None:
    """Follow the probabilities forward to the Reshape that merges the heads (the block's
    last node); ``_Block.match`` then checks the block backwards from there."""

    def only_reader(tensor: gs.Tensor, *ops: str) -> gs.Node | None:
        """The one reader of ``tensor`` (besides Shape/Size; through Identity), if it is
        one of ``ops``."""
        while True:
            readers = [n for n in consumers(tensor) if n.op not in ("Shape", "Size")]
            if len(readers) != 1 or readers[0].op != "Identity":
                break
            tensor = readers[0].outputs[0]
        return readers[0] if len(readers) == 1 and readers[0].op in ops else None

    probs = softmax.outputs[0]
    readers = consumers(probs)
    guard = [n for n in readers if n.op == "Where"]
    if len(readers) == 2 and len(guard) == 1:  # Where(IsNaN(p), 0, p)
        probs = guard[0].outputs[0]
    node = only_reader(probs, "MatMul")
    if node is None:
        return None
    node = only_reader(node.outputs[0], "Reshape", "Transpose")
    if node is not None and node.op == "Reshape":
        node = only_reader(node.outputs[0], "Transpose")
    return None if node is None else only_reader(node.outputs[0], "Reshape")


def _fuse_all(model: Model, emit: str) -> tuple[int, bool]:
    """Fuse every block: (how many, whether some block lacked the shapes to decide)."""
    masks = _PaddingMasks(model)
    fused, missing = 0, False
    for graph in list(model.all_graphs()):
        matcher = _Matcher(model, graph, masks)
        emitter = _Emitter(model, graph)
        write = emitter.contrib if emit == CONTRIB else emitter.standard
        for softmax in [n for n in graph.nodes if n.op == "Softmax"]:
            merge = _head_merge_after(softmax)
            att = matcher.match(merge) if merge is not None else None
            if att is None or (att.mask is not None and graph is not model.graph):
                continue
            write(att)
            fused += 1
        missing |= matcher.missing_shapes
    return fused, missing or masks.missing_shapes
