"""A resizable batch and sequence in a ``.tflite``: which dimensions follow them, found by
lowering the graph at other sizes and comparing the builds.

TFLite tensors carry a static ``shape`` and a ``shape_signature`` where ``-1`` marks a
dimension the interpreter may resize (``resize_tensor_input``). The lowering works at
static shapes (every layout decision, folded shape arithmetic and permutation depends on
them), so rather than tracking the batch through every handler the graph is lowered at
batch 1 and at batch 2: a dimension that is 1 in the first and 2 in the second (or k
and 2k: a batch folded into another axis) follows the batch and becomes ``-1``. The other
symbolic dimensions (a sequence) are found the same way, from a build with them twice as
large (``follows``). The builds must otherwise be the same graph: the same operators with
the same options and the same constants, except a RESHAPE's target shape, which may
differ in one entry (that entry becomes ``-1``, which TFLite's RESHAPE computes from the
input's size). A target with one entry following the batch and another the sequence is
computed at run time from the inputs' shapes (``combine``). Anything else that follows a
symbol (a constant of its size, a SLICE or BROADCAST_TO spelled out at it) keeps it
static, with the reason; a constant folded at its size that is one slice repeated and
that only broadcasting operators read is kept at size 1.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from graphopt.targets.tflite_writer import (FlatbufferBuilder, Operator, Tensor, enum,
                                           options)

SMALL_BYTES = 1 << 20  # constants of a snapshot kept whole; larger ones by digest


@dataclasses.dataclass
class Snapshot:
    """What ``follows`` compares of a build: its tensors (large constants by digest,
    so the build's weights need not stay in memory) and operators."""

    tensors: list[Tensor]
    operators: list[Operator]


def _digest(data: np.ndarray) -> bytes:
    return hashlib.sha256(memoryview(np.ascontiguousarray(data)).cast("B")).digest()


def snapshot(fb: FlatbufferBuilder) -> Snapshot:
    """``fb``'s tensors and operators, constants over ``SMALL_BYTES`` by their SHA-256
    digest (a RESHAPE target, a few integers, stays whole: ``follows`` reads it)."""
    return Snapshot([dataclasses.replace(t, data=_digest(t.data))
                     if t.data is not None and t.data.nbytes > SMALL_BYTES else t
                     for t in fb.tensors], list(fb.operators))


@dataclasses.dataclass
class Plan:
    """What follows one symbol in the build at the smaller size: the tensors' shape
    signatures (``-1`` where they follow), per RESHAPE target constant its one entry that
    becomes ``-1``, and the constants kept at size 1 along the dimensions that follow
    (the same slices repeated, read by broadcasting operators only)."""

    signatures: dict[int, tuple[int, ...]]
    reshapes: dict[int, int]
    shrink: dict[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    # RESHAPE targets computed at run time (``combine``): per entry an (input, axis)
    # whose size it is, or a fixed value
    computed: dict[int, list] = dataclasses.field(default_factory=dict)


def follows(a: FlatbufferBuilder, b: Snapshot, symbol: str = "batch") -> Plan | str:
    """What in ``a`` follows ``symbol``, as ``b`` (a snapshot of the build with it twice
    as large) shows it; else why it stays static. ``a`` is not changed."""
    if len(a.tensors) != len(b.tensors) or len(a.operators) != len(b.operators):
        return f"the graph lowers to different operators at another {symbol}"
    signatures: dict[int, tuple[int, ...]] = {}
    shrink: dict[int, tuple[int, ...]] = {}
    for index, (x, y) in enumerate(zip(a.tensors, b.tensors)):
        if x.dtype != y.dtype or len(x.shape) != len(y.shape) or x.half != y.half:
            return f"tensor {x.name!r} changes type or rank with the {symbol}"
        dims = [i for i, (p, q) in enumerate(zip(x.shape, y.shape)) if p != q]
        if any(y.shape[i] != 2 * x.shape[i] for i in dims):
            return f"tensor {x.name!r} changes shape with the {symbol} other than in " \
                   f"proportion ({list(x.shape)}, then {list(y.shape)})"
        if dims and x.data is None:
            signatures[index] = tuple(-1 if i in dims else d for i, d in enumerate(x.shape))
        elif dims and (isinstance(y.data, bytes)
                       or not _broadcast(index, x.data, y.data, dims, a.operators)):
            return f"constant {x.name!r} follows the {symbol}"
        elif dims:
            shrink[index] = tuple(dims)
    reshapes: dict[int, int] = {}  # shape constant -> the entry that becomes -1
    for op_a, op_b in zip(a.operators, b.operators):
        if (op_a.code, op_a.inputs, op_a.outputs, op_a.version) != \
                (op_b.code, op_b.inputs, op_b.outputs, op_b.version):
            return f"the graph lowers to different operators at another {symbol}"
        if op_a.code == "RESHAPE" and len(op_a.inputs) > 1:
            entry = _one_entry(a.tensors[op_a.inputs[1]].data, b.tensors[op_a.inputs[1]].data)
            if entry is False:
                return f"RESHAPE to {a.tensors[op_a.outputs[0]].name!r} has more than one " \
                       f"dimension following the {symbol}"
            if entry is not None:
                reshapes[op_a.inputs[1]] = entry
        elif not _same(op_a.options, op_b.options):
            return f"{op_a.code} writing {a.tensors[op_a.outputs[0]].name!r} is spelled " \
                   f"out at the {symbol}'s size"
    for index, (x, y) in enumerate(zip(a.tensors, b.tensors)):
        if x.data is not None and index not in reshapes and x.shape == y.shape and not (
                _digest(x.data) == y.data if isinstance(y.data, bytes)
                else np.array_equal(x.data, y.data)):
            return f"constant {x.name!r} follows the {symbol}"
    if not signatures:
        return f"no tensor follows the {symbol}"
    return Plan(signatures, reshapes, shrink)


def combine(first: Plan, second: Plan, a: FlatbufferBuilder, symbols: str,
            axis_symbols: dict[int, list] | None = None) -> Plan | str:
    """Both plans at once: a dimension following either is ``-1``. A RESHAPE target with
    an entry following each (``[batch, sequence, heads, size]``) is computed at run time
    from the inputs' shapes, since TFLite's RESHAPE computes one ``-1`` entry only: each
    such entry must be an input's dimension as it stands, but for one left ``-1``, and
    that dimension one symbol's (``axis_symbols``: per input tensor, the symbol of each
    axis): symbols lowered at the same size cannot be told apart by it. Else why not."""
    sources = [_sources(a, plan) for plan in (first, second)]
    computed: dict[int, list] = {}
    for shape in first.reshapes.keys() & second.reshapes.keys():
        entries = {first.reshapes[shape]: sources[0], second.reshapes[shape]: sources[1]}
        if len(entries) == 1:
            continue
        target: list = a.tensors[shape].data.tolist()
        for entry, found in entries.items():
            places = found.get(target[entry], [])
            named = {_symbol(axis_symbols, i, axis) for i, axis in places}
            if len(named) > 1:
                return f"a RESHAPE target ({a.tensors[shape].name!r}) has an entry " \
                       f"that inputs' dimensions {', '.join(sorted(map(str, named)))} " \
                       f"all have at this size: they cannot be told apart"
            target[entry] = places[0] if places else -1
        if target.count(-1) > 1:
            return f"a RESHAPE target ({a.tensors[shape].name!r}) has dimensions " \
                   f"following {symbols} that are not the inputs' own"
        computed[shape] = target
    signatures = dict(first.signatures)
    for index, signature in second.signatures.items():
        signatures[index] = tuple(-1 if -1 in (p, q) else p for p, q in
                                  zip(signatures.get(index, signature), signature))
    shrink = {i: tuple(sorted({*first.shrink.get(i, ()), *second.shrink.get(i, ())}))
              for i in {*first.shrink, *second.shrink}}
    reshapes = {k: v for k, v in {**first.reshapes, **second.reshapes}.items()
                if k not in computed}
    return Plan(signatures, reshapes, shrink, computed)


def _sources(a: FlatbufferBuilder, plan: Plan) -> dict[int, list[tuple[int, int]]]:
    """Where ``plan``'s symbols can be read at run time: a size at this build -> the
    (input tensor, axis) pairs that have it."""
    found: dict[int, list[tuple[int, int]]] = {}
    for index in a.inputs:
        for axis, dim in enumerate(plan.signatures.get(index, ())):
            if dim == -1:
                found.setdefault(a.tensors[index].shape[axis], []).append((index, axis))
    return found


def _symbol(axis_symbols: dict[int, list] | None, index: int, axis: int):
    """The symbol of input tensor ``index``'s ``axis`` (``None``: unknown, or the batch)."""
    names = (axis_symbols or {}).get(index) or []
    return names[axis] if axis < len(names) else None


def apply(a: FlatbufferBuilder, plan: Plan) -> None:
    """Write ``plan`` into ``a``: the shape signatures, ``-1`` in RESHAPE targets, the
    targets computed at run time (operators ahead of the graph's), and repeated
    constants cut to one slice."""
    for index, signature in plan.signatures.items():
        a.tensors[index].signature = signature
    for index, dims in plan.shrink.items():
        tensor = a.tensors[index]
        tensor.data = np.ascontiguousarray(tensor.data[tuple(
            slice(0, 1) if d in dims else slice(None) for d in range(tensor.data.ndim))])
        tensor.shape = tensor.data.shape
    targets = _computed_targets(a, plan.computed)
    for op in a.operators:
        if op.code != "RESHAPE" or len(op.inputs) < 2:
            continue
        if op.inputs[1] in targets:
            op.inputs[1] = targets[op.inputs[1]]
            if op.options is not None:  # the shape tensor rules; no static one beside it
                op.options.newShape = None
        elif op.inputs[1] in plan.reshapes:
            shape = a.tensors[op.inputs[1]].data.copy()
            shape[plan.reshapes[op.inputs[1]]] = -1
            a.tensors[op.inputs[1]].data = shape
            if op.options is not None and getattr(op.options, "newShape", None) is not None:
                op.options.newShape = shape.tolist()


def _computed_targets(a: FlatbufferBuilder, computed: dict[int, list]) -> dict[int, int]:
    """RESHAPE targets read from the inputs' shapes: the inputs' SHAPEs and the fixed
    entries concatenated into one vector, each target a GATHER of it; the operators go
    ahead of the graph's. Shape constant -> the tensor computed in its place."""
    if not computed:
        return {}
    inputs = sorted({e[0] for target in computed.values() for e in target
                     if isinstance(e, tuple)})
    fixed = sorted({e for target in computed.values() for e in target
                    if not isinstance(e, tuple)})
    start, parts, ops = {}, [], []
    offset = 0
    for index in inputs:
        rank = len(a.tensors[index].shape)
        shape = a.tensor(f"{a.tensors[index].name}:shape", (rank,), np.int32)
        ops.append(Operator("SHAPE", [index], [shape],
                            options("ShapeOptions", outType=enum("TensorType", "INT32"))))
        parts.append(shape)
        start[index], offset = offset, offset + rank
    parts.append(a.constant("reshape_entries", np.array(fixed, np.int32)))
    pool = a.tensor("reshape_entries_and_sizes", (offset + len(fixed),), np.int32)
    ops.append(Operator("CONCATENATION", parts, [pool],
                        options("ConcatenationOptions", axis=0)))
    made: dict[tuple, int] = {}
    result = {}
    for shape, target in computed.items():
        picks = tuple(start[e[0]] + e[1] if isinstance(e, tuple)
                      else offset + fixed.index(e) for e in target)
        if picks not in made:
            made[picks] = a.tensor(f"{a.tensors[shape].name}:computed", (len(picks),),
                                   np.int32)
            ops.append(Operator("GATHER", [pool, a.constant(
                "picks", np.array(picks, np.int32))], [made[picks]],
                options("GatherOptions", axis=0, batchDims=0)))
        result[shape] = made[picks]
    a.operators[:0] = ops
    return result


# Operators that broadcast their inputs: a constant folded at a symbol's size (the same
# slices repeated, e.g. a token-type embedding of zeros, a mask of all True) reads as well
# at size 1.
BROADCASTING = frozenset({"ADD", "SUB", "MUL", "DIV", "MAXIMUM", "MINIMUM", "POW",
                          "SQUARED_DIFFERENCE", "LESS", "LESS_EQUAL", "GREATER",
                          "GREATER_EQUAL", "EQUAL", "NOT_EQUAL", "LOGICAL_AND",
                          "LOGICAL_OR", "SELECT_V2"})


def _broadcast(index: int, x: np.ndarray, y: np.ndarray, dims: list[int],
               operators) -> bool:
    """Whether constant ``index`` (``x`` at the smaller size, ``y`` at twice it) is one
    slice repeated along ``dims`` at either size, and only broadcasting operators read
    it."""
    one = x[tuple(slice(0, 1) if d in dims else slice(None) for d in range(x.ndim))]
    readers = [o for o in operators if index in o.inputs]
    return bool(readers) and all(o.code in BROADCASTING for o in readers) and \
        np.array_equal(np.broadcast_to(one, x.shape), x) and \
        np.array_equal(np.broadcast_to(one, y.shape), y)


def _one_entry(x: np.ndarray | None, y: np.ndarray | None) -> int | None | bool:
    """The one entry in which two RESHAPE target shapes differ (``None``: none; ``False``:
    more than one, or a ``-1`` already there to be computed)."""
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray) or x.shape != y.shape:
        return False
    entries = np.flatnonzero(x != y)
    if len(entries) == 0:
        return None
    if len(entries) > 1 or (x == -1).any():
        return False
    return int(entries[0])


def _same(x, y) -> bool:
    """Whether two builtin-options objects (or values in them) are equal."""
    if x is None or y is None:
        return x is y
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        return np.array_equal(np.asarray(x), np.asarray(y))
    if isinstance(x, (list, tuple)):
        return isinstance(y, (list, tuple)) and len(x) == len(y) and \
            all(_same(p, q) for p, q in zip(x, y))
    if hasattr(x, "__dict__"):
        return type(x) is type(y) and vars(x).keys() == vars(y).keys() and \
            all(_same(v, vars(y)[k]) for k, v in vars(x).items())
    return x == y
