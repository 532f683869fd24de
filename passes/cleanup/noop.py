"""Removal of nodes that pass their input through unchanged.

``eliminate-identity`` drops Identity and inference-mode Dropout; ``eliminate-noops``
drops ops whose arguments make them copies (a Cast to the same type, a Transpose with the
identity permutation, a Mul by ones, ...). Each ``_op`` matcher below returns the index of
the input the node passes through, or a string saying why it is not a no-op.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.ir import Model
from graphopt.pass_infra import Pass, PassContext, PassResult
from graphopt.rewrite import bypass, constant_value, is_inference_dropout, static_shape, walk

ONNX_DOMAINS = (None, "", "ai.onnx")
INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min


class EliminateIdentity(Pass):
    """Remove Identity nodes and inference-mode Dropout nodes whose mask is unused."""

    name = "eliminate-identity"
    family = "cleanup"
    lossless = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        removed: Counter[str] = Counter()
        for graph, node in walk(model.all_graphs()):
            if _is_identity(node, graph, model.opset) and bypass(node, graph):
                removed[node.op] += 1
        return PassResult(changed=bool(removed), stats=dict(removed))


def _is_identity(node: gs.Node, graph: gs.Graph, opset: int) -> bool:
    if node.domain not in ONNX_DOMAINS:
        return False
    if node.op == "Identity":
        return True
    return node.op == "Dropout" and is_inference_dropout(node, opset) \
        and not _mask_used(node, graph)


def _mask_used(node: gs.Node, graph: gs.Graph) -> bool:
    if len(node.outputs) < 2 or node.outputs[1].is_empty():
        return False
    mask = node.outputs[1]
    return bool(mask.outputs) or any(out is mask for out in graph.outputs)


class EliminateNoOps(Pass):
    """Remove ops that provably copy their input (Cast to the same type, Mul by one, ...)."""

    name = "eliminate-noops"
    family = "cleanup"
    lossless = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        removed: Counter[str] = Counter()
        for graph, node in walk(model.all_graphs()):
            match = _MATCHERS.get(node.op) if node.domain in ONNX_DOMAINS else None
            if match is None or len(node.outputs) != 1:
                continue
            keep = match(node)
            if isinstance(keep, str):
                ctx.logger.debug("%s: keeping %s %r: %s", self.name, node.op, node.name, keep)
            elif bypass(node, graph, keep):
                removed[node.op] += 1
        return PassResult(changed=bool(removed), stats=dict(removed))


# ---------------------------------------------------------------------- matchers
def _cast(node: gs.Node) -> int | str:
    source = _onnx_dtype(node.inputs[0].dtype)
    if source is None:
        return "input type unknown"
    return 0 if source == _onnx_dtype(node.attrs["to"]) else "changes the type"


def _cast_like(node: gs.Node) -> int | str:
    source, target = (_onnx_dtype(t.dtype) for t in node.inputs[:2])
    if source is None or target is None:
        return "a type is unknown"
    return 0 if source == target else "changes the type"


def _reshape(node: gs.Node) -> int | str:
    x, out = node.inputs[0], node.outputs[0]
    if static_shape(x) is not None and static_shape(x) == static_shape(out):
        return 0
    target = constant_value(node.inputs[1])
    if target is None or x.shape is None:
        return "shape unknown before run time"
    if len(target) != len(x.shape):
        return "changes the rank"
    copy_zero = not node.attrs.get("allowzero", 0)
    changed = [i for i, (d, t) in enumerate(zip(x.shape, target))
               if not ((_known(d) and t == d) or (t == 0 and copy_zero))]
    if not changed:
        return 0
    # A single -1 takes the one dim left over, when every other dim is a known size.
    others_known = all(_known(d) and d > 0 for i, d in enumerate(x.shape) if i not in changed)
    if len(changed) == 1 and target[changed[0]] == -1 and others_known:
        return 0
    return "changes the shape"


def _transpose(node: gs.Node) -> int | str:
    perm = node.attrs.get("perm")
    if perm is None:
        return "reverses the axes"
    return 0 if list(perm) == list(range(len(perm))) else "permutes the axes"


def _pad(node: gs.Node) -> int | str:
    pads = _arg(node, "pads", 1)
    if pads is None:
        return "pads unknown before run time"
    # Zero padding adds nothing in every mode (constant, reflect, edge, wrap).
    return 0 if not pads.any() else "pads"


def _slice(node: gs.Node) -> int | str:
    starts, ends = _arg(node, "starts", 1), _arg(node, "ends", 2)
    if starts is None or ends is None:
        return "starts or ends unknown before run time"
    axes = _arg(node, "axes", 3, default=range(len(starts)))
    steps = _arg(node, "steps", 4, default=[1] * len(starts))
    if axes is None or steps is None:
        return "axes or steps unknown before run time"
    if (steps != 1).any():
        return "steps other than 1"
    dims = node.inputs[0].shape
    for axis, start, end in zip(axes, starts, ends):
        if axis < 0 and dims is None:
            return "input rank unknown"
        dim = dims[axis] if dims is not None else None
        if not (start == 0 or start == INT64_MIN or (_known(dim) and start <= -dim)):
            return f"starts after the beginning of axis {axis}"
        if not (end == INT64_MAX or (_known(dim) and end >= dim)):
            return f"ends before the end of axis {axis}"
    return 0


def _neutral_operand(node: gs.Node) -> int | str:
    neutral, positions = _NEUTRAL[node.op]
    reason = f"no constant operand of all {neutral}s"
    for pos in positions:
        value = constant_value(node.inputs[pos])
        if value is None or not np.all(value == neutral):
            continue
        other = node.inputs[1 - pos]
        reason = _broadcast_grows(other, value.shape) or _type_differs(other, value)
        if reason is None:
            return 1 - pos
    return reason


def _expand(node: gs.Node) -> int | str:
    x = node.inputs[0]
    if static_shape(x) is not None and static_shape(x) == static_shape(node.outputs[0]):
        return 0
    shape = constant_value(node.inputs[1])
    if shape is None:
        return "shape unknown before run time"
    return _broadcast_grows(x, tuple(shape)) or 0


def _squeeze(node: gs.Node) -> int | str:
    axes = _arg(node, "axes", 1, default=())
    if axes is None:
        return "axes unknown before run time"
    if axes.size:
        return "removes axes"
    shape = static_shape(node.inputs[0])
    if shape is None:
        return "without axes it squeezes every 1-dim, and the shape is not static"
    return "squeezes 1-dims" if 1 in shape else 0


def _unsqueeze(node: gs.Node) -> int | str:
    axes = _arg(node, "axes", 1, default=())
    if axes is None:
        return "axes unknown before run time"
    return "inserts axes" if axes.size else 0


def _concat(node: gs.Node) -> int | str:
    return 0 if len(node.inputs) == 1 else "joins several inputs"


def _split(node: gs.Node) -> int | str:
    return 0  # one output (checked by the caller): the whole input


# The neutral constant of each binary op, and which operands may be that constant.
_NEUTRAL = {"Add": (0, (1, 0)), "Sub": (0, (1,)), "Mul": (1, (1, 0)), "Div": (1, (1,))}

_MATCHERS = {
    "Cast": _cast, "CastLike": _cast_like, "Reshape": _reshape, "Transpose": _transpose, "Pad": _pad,
    "Slice": _slice, "Add": _neutral_operand, "Sub": _neutral_operand,
    "Mul": _neutral_operand, "Div": _neutral_operand, "Expand": _expand,
    "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Concat": _concat, "Split": _split,
}


# ---------------------------------------------------------------------- helpers
def _arg(node: gs.Node, attr: str, index: int, default=None) -> np.ndarray | None:
    """An int-list argument: an attribute in old opsets, an input in new ones. ``default``
    when absent; ``None`` when it is only known at run time."""
    if attr in node.attrs:
        value = node.attrs[attr]
    elif len(node.inputs) > index and not node.inputs[index].is_empty():
        value = constant_value(node.inputs[index])
    else:
        value = default
    return None if value is None else np.asarray(value, dtype=np.int64).ravel()


def _broadcast_grows(x: gs.Tensor, shape: tuple[int, ...]) -> str | None:
    """Why broadcasting ``x`` against ``shape`` may give more than ``x``'s own shape."""
    dims = x.shape
    if len(shape) == 0:
        return None  # a scalar broadcasts to any shape unchanged
    if dims is None:
        return "input rank unknown"
    if len(shape) > len(dims):
        return "broadcasts to a higher rank"
    for dim, other in zip(dims[len(dims) - len(shape):], shape):
        if other != 1 and not (_known(dim) and other == dim):
            return f"may broadcast dim {dim} to {other}"
    return None


def _type_differs(x: gs.Tensor, value: np.ndarray) -> str | None:
    dtype = _onnx_dtype(x.dtype)
    if dtype is not None and dtype != _onnx_dtype(value.dtype):
        return "the constant has another type"
    return None


def _onnx_dtype(dtype) -> int | None:
    """ONNX element type of a graphsurgeon dtype (numpy dtype or ONNX enum)."""
    if dtype is None or isinstance(dtype, int):
        return dtype
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _known(dim) -> bool:
    return isinstance(dim, (int, np.integer)) and dim >= 0
