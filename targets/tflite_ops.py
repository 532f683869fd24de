"""ONNX op → TFLite builtin operators, one handler per ONNX op type (``HANDLERS``).

A handler reads its inputs through the ``Lowering`` (``lw.get(name, perm)`` gives a
tensor in the layout it needs) and registers its outputs with their home layout
(``lw.output(name, perm)``); see ``graphopt.targets.tflite_lower`` for the layout rules.
Only builtin operators are emitted, never Flex (TensorFlow) ops: stock LiteRT runs the
result. What TFLite cannot express as the ONNX op stands (a ceil-mode average pool
that changes the output size, ...) raises ``Unmappable``, which the
driver turns into a UsageError naming the node.
"""

from __future__ import annotations

import numpy as np
import onnx

from graphopt.targets.tflite_layers import (batch_norm, conv, dynamic_quantize, gemm,
                                            global_pool, layer_norm, matmul, pool, resize,
                                            softmax)
from graphopt.targets.tflite_lower import (F32, NONE, Lowering, Unmappable, Value, attrs,
                                           identity, input_name, int_list, inverse)
from graphopt.targets.tflite_quant import dequantize, quantize
from graphopt.targets.tflite_writer import enum, options


# ---------------------------------------------------------------------- constant folding
def fold_constant_node(lw: Lowering, node: onnx.NodeProto) -> bool:
    """Evaluate a node whose inputs are all constants (or a Shape of a static value) with
    ONNX Runtime, so it becomes a constant instead of operators."""
    if node.op_type == "Shape":
        shape = np.array(lw.shape(node.input[0]), np.int64)
        a = attrs(node)
        lw.set_const(node.output[0], shape[a.get("start", 0):a.get("end", len(shape))])
        return True
    if not all(not n or lw.is_const(n) for n in node.input):
        return False
    import onnxruntime as ort

    feeds = {n: lw.value(n).const for n in node.input if n}
    graph = onnx.helper.make_graph(
        [node], "fold", [onnx.helper.make_tensor_value_info(
            n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for n, v in feeds.items()],
        [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o])
    model = onnx.helper.make_model(graph, opset_imports=[
        onnx.helper.make_opsetid("", lw.opset)], ir_version=8)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        results = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"]).run(None, feeds)
    except Exception as exc:  # ORT's own message says what is wrong with the node
        raise Unmappable(f"evaluating it ahead of time failed: "
                          f"{str(exc).strip().splitlines()[0]}") from None
    for name, value in zip([o for o in node.output if o], results):
        lw.set_const(name, np.asarray(value))
    return True


# ---------------------------------------------------------------------- elementwise
BINARY = {"Add": "ADD", "Sub": "SUB", "Mul": "MUL", "Div": "DIV", "Pow": "POW",
          "Max": "MAXIMUM", "Min": "MINIMUM", "Equal": "EQUAL", "Less": "LESS",
          "Greater": "GREATER", "LessOrEqual": "LESS_EQUAL",
          "GreaterOrEqual": "GREATER_EQUAL", "And": "LOGICAL_AND", "Or": "LOGICAL_OR",
          "Where": "SELECT_V2"}
FUSES_ACTIVATION = {"ADD": "AddOptions", "SUB": "SubOptions", "MUL": "MulOptions",
                    "DIV": "DivOptions"}


def _aligned(lw: Lowering, names: list[str], rank: int) -> tuple[list[int], tuple]:
    """Tensors of ``names`` broadcastable in one layout: that of the first computed
    operand of full rank (NHWC inside a CNN), constants written to match."""
    perm = next((lw.home(n) for n in names if not lw.is_const(n) and lw.rank(n) == rank),
                identity(rank))
    tensors = []
    for name in names:
        value = lw.value(name)
        if value.const is not None:
            tensors.append(lw.broadcast_const(name, value.const, rank, perm, value.half))
        elif len(value.shape) == rank:
            tensors.append(lw.get(name, perm))
        elif perm == identity(rank):  # TFLite broadcasts lower ranks like numpy
            tensors.append(lw.get(name, identity(len(value.shape))))
        else:  # reshape to the full rank, then into the layout
            padded = f"{name}:rank{rank}"
            if padded not in lw.values:
                shape = (1,) * (rank - len(value.shape)) + value.shape
                lw.values[padded] = Value(padded, shape, value.dtype, home=identity(rank))
                index = lw.temp(padded, shape, value.dtype)
                lw.reshape(lw.get(name, identity(len(value.shape))), index)
                lw.values[padded].tensors[identity(rank)] = index
            tensors.append(lw.get(padded, perm))
    return tensors, perm


def binary(lw: Lowering, node: onnx.NodeProto) -> None:
    code = BINARY[node.op_type]
    if code == "POW" and _power_as_unary(lw, node):
        return
    out_shape, _ = lw.onnx_info(node.output[0])
    tensors, perm = _aligned(lw, list(node.input), len(out_shape))
    opts, out = None, node.output[0]
    if code in FUSES_ACTIVATION and lw.value(node.input[0]).dtype == F32:
        act, out = lw.fused_activation(node)
        opts = options(FUSES_ACTIVATION[code], fusedActivationFunction=act)
    lw.fb.op(code, tensors, [lw.output(out, perm)], opts)


def _power_as_unary(lw: Lowering, node: onnx.NodeProto) -> bool:
    """x² and √x (decomposed norms) as SQUARE / SQRT: XNNPACK runs those, not POW."""
    x, exponent = node.input
    if not lw.is_const(exponent) or lw.value(exponent).const.size != 1:
        return False
    code = {2.0: "SQUARE", 0.5: "SQRT"}.get(float(lw.value(exponent).const.reshape(())))
    if code is None or lw.onnx_info(node.output[0])[0] != lw.shape(x):
        return False
    lw.fb.op(code, [lw.get(x)], [lw.output(node.output[0], lw.home(x))])
    return True


def _unary(code: str, opts=None):
    def handler(lw: Lowering, node: onnx.NodeProto) -> None:
        x = node.input[0]
        made = opts(lw, node) if callable(opts) else None
        lw.fb.op(code, [lw.get(x)], [lw.output(node.output[0], lw.home(x))], made)
    return handler


def clip(lw: Lowering, node: onnx.NodeProto) -> None:
    bounds = lw.clip_bounds(node)
    if bounds is None:
        raise Unmappable("bounds that are not constants")
    x, out = node.input[0], node.output[0]
    code = {(0.0, 6.0): "RELU6", (-1.0, 1.0): "RELU_N1_TO_1", (0.0, 1.0): "RELU_0_TO_1",
            (0.0, np.inf): "RELU"}.get(bounds)
    if code:
        lw.fb.op(code, [lw.get(x)], [lw.output(out, lw.home(x))])
        return
    current, shape = lw.get(x), lw.fb.tensors[lw.get(x)].shape
    steps = [(c, b) for c, b in (("MAXIMUM", bounds[0]), ("MINIMUM", bounds[1]))
             if np.isfinite(b)]
    for i, (code, bound) in enumerate(steps):
        last = i == len(steps) - 1
        target = lw.output(out, lw.home(x)) if last else lw.temp(f"{out}/{code}", shape)
        lw.fb.op(code, [current, lw.fb.constant("bound", np.array(bound, F32))], [target])
        current = target
    if not steps:
        lw.alias(out, x)


def hard_sigmoid(lw: Lowering, node: onnx.NodeProto) -> None:
    """max(0, min(1, alpha·x + beta)): MUL, ADD, RELU_0_TO_1."""
    a = attrs(node)
    x = node.input[0]
    xi = lw.get(x)
    shape = lw.fb.tensors[xi].shape
    scaled, shifted = lw.temp(f"{x}/hs_mul", shape), lw.temp(f"{x}/hs_add", shape)
    lw.fb.op("MUL", [xi, lw.fb.constant("alpha", np.array(a.get("alpha", 0.2), F32))],
             [scaled], options("MulOptions", fusedActivationFunction=NONE))
    lw.fb.op("ADD", [scaled, lw.fb.constant("beta", np.array(a.get("beta", 0.5), F32))],
             [shifted], options("AddOptions", fusedActivationFunction=NONE))
    lw.fb.op("RELU_0_TO_1", [shifted], [lw.output(node.output[0], lw.home(x))])


def cast(lw: Lowering, node: onnx.NodeProto) -> None:
    x, out = node.input[0], node.output[0]
    _, dtype = lw.onnx_info(out)
    if dtype == lw.value(x).dtype:
        lw.alias(out, x)
        return
    lw.fb.op("CAST", [lw.get(x)], [lw.output(out, lw.home(x))])


def identity_op(lw: Lowering, node: onnx.NodeProto) -> None:
    lw.alias(node.output[0], node.input[0])


def quantized_product(lw: Lowering, node: onnx.NodeProto) -> None:
    """Reached only for a MatMulInteger ``dynamic_quantize`` did not take in."""
    raise Unmappable("only the DynamicQuantizeLinear → MatMulInteger → Cast → Mul form of "
                     "dynamic int8 quantization is mapped")


def constants_only(lw: Lowering, node: onnx.NodeProto) -> None:
    """Reached only when ``fold_constant_node`` could not evaluate the node."""
    raise Unmappable("its inputs must be constants (computed shapes are not mapped)")


# ---------------------------------------------------------------------- shape ops
def reshape(lw: Lowering, node: onnx.NodeProto) -> None:
    """Reshape, Flatten, Squeeze, Unsqueeze: to the inferred static output shape, from
    the ONNX layout (a RESHAPE where only size-1 dims move, else counted TRANSPOSE).
    A CNN's flatten into matrix products is the exception: no operator at all. The
    products (FULLY_CONNECTED, which flattens its input to [N, K] itself) read the NHWC
    tensor as it lies, their weight columns permuted to its order (no TRANSPOSE)."""
    x, out = node.input[0], node.output[0]
    columns = _flatten_columns(lw, x, out)
    if columns is not None:
        # FULLY_CONNECTED flattens its input to [N, K] itself: the products read x's
        # tensor as it lies, with no RESHAPE before them
        value = lw.value(x)
        shape, _ = lw.onnx_info(out)
        lw.values[out] = Value(out, tuple(shape), value.dtype, home=identity(2),
                               tensors={identity(2): lw.get(x, lw.home(x))},
                               columns=columns, quant=value.quant if lw.int8_mode else None)
        return
    perm = identity(lw.rank(x))
    if columns is None and lw.value(x).const is None and lw.value(x).quant is None \
            and lw.ordered_alike(x, perm):
        perm = lw.home(x)  # the same bytes in either layout: one RESHAPE, not two
    source = lw.get(x, perm)
    lw.reshape(source, lw.output(out))


def _flatten_columns(lw: Lowering, x: str, out: str) -> np.ndarray | None:
    """For ``out`` = ``x`` flattened to [N, rest] from a layout keeping N first, read
    only by Gemm/MatMul with constant 2-D weights: the ONNX column of each TFLite one."""
    perm, shape = lw.home(x), lw.shape(x)
    out_shape, _ = lw.onnx_info(out)
    if perm == identity(len(shape)) or perm[0] != 0 or len(out_shape) != 2 or \
            out_shape[0] != shape[0]:
        return None
    products = _products_through_qdq(lw, out)
    if not products:
        return None
    for r, a in products:
        if r.op_type not in ("Gemm", "MatMul") or r.input[0] != a or r.input[1] == a \
                or not lw.is_const(r.input[1]) or lw.rank(r.input[1]) != 2 or \
                attrs(r).get("transA", 0):
            return None
    flat = np.arange(int(np.prod(shape[1:]))).reshape(shape[1:])
    return flat.transpose([p - 1 for p in perm[1:]]).reshape(-1)


def _products_through_qdq(lw: Lowering, name: str) -> list[tuple[onnx.NodeProto, str]]:
    """The nodes reading ``name``, looking through QuantizeLinear/DequantizeLinear (an
    int8 graph's flatten reaches its Gemm as Flatten → Q → DQ → Gemm), each with the
    name it reads; empty when a graph output or nothing reads it on the way."""
    found, todo = [], [name]
    while todo:
        value = todo.pop()
        readers = lw.readers.get(value, [])
        if value in lw.graph_outputs or not readers:
            return []
        for r in readers:
            if r.op_type in ("QuantizeLinear", "DequantizeLinear") and r.input[0] == value:
                todo.append(r.output[0])
            else:
                found.append((r, value))
    return found


def transpose(lw: Lowering, node: onnx.NodeProto) -> None:
    """No operator: the output is the input's tensor at another home layout."""
    x = node.input[0]
    rank = lw.rank(x)
    perm = tuple(attrs(node).get("perm", list(reversed(range(rank)))))
    value = lw.value(x)
    if value.const is not None:
        lw.set_const(node.output[0], value.const.transpose(perm))
        lw.value(node.output[0]).half = value.half
        return
    inv = inverse(perm)
    home = tuple(inv[h] for h in lw.home(x))
    shape, _ = lw.onnx_info(node.output[0])
    lw.values[node.output[0]] = Value(node.output[0], shape, value.dtype, home=home,
                                      tensors={home: lw.get(x)},
                                      quant=value.quant if lw.int8_mode else None)


def concat(lw: Lowering, node: onnx.NodeProto) -> None:
    rank = len(lw.onnx_info(node.output[0])[0])
    axis = attrs(node)["axis"] % rank
    names = [n for n in node.input if n and np.prod(lw.shape(n)) != 0]
    tensors, perm = _aligned(lw, names, rank)
    act, out = lw.fused_activation(node)
    lw.fb.op("CONCATENATION", tensors, [lw.output(out, perm)],
             options("ConcatenationOptions", axis=perm.index(axis),
                     fusedActivationFunction=act))


def pad(lw: Lowering, node: onnx.NodeProto) -> None:
    x = node.input[0]
    rank, perm = lw.rank(x), lw.home(x)
    a = attrs(node)
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = int_list(lw, node, "pads", 1, 11)
    axes = int_list(lw, node, "axes", 3, 18) or list(range(rank))
    full = [[0, 0] for _ in range(rank)]
    for i, axis in enumerate(axes):
        full[axis % rank] = [pads[i], pads[i + len(axes)]]
    if any(p < 0 for pair in full for p in pair):
        raise Unmappable("negative pads (cropping)")
    paddings = lw.fb.constant("paddings", np.array([full[p] for p in perm], np.int32))
    out = lw.output(node.output[0], perm)
    value = a.get("value", 0.0) if lw.opset < 11 else \
        (float(lw.const(node.input[2]).reshape(())) if input_name(node, 2) else 0.0)
    if mode == "constant":
        extra = [] if value == 0 else [lw.fb.constant("pad_value",
                                                      np.array(value, lw.value(x).dtype))]
        lw.fb.op("PADV2" if extra else "PAD", [lw.get(x), paddings, *extra], [out])
    elif mode == "reflect":
        lw.fb.op("MIRROR_PAD", [lw.get(x), paddings], [out],
                 options("MirrorPadOptions", mode=enum("MirrorPadMode", "REFLECT")))
    else:
        raise Unmappable(f"pad mode {mode!r}")


def gather(lw: Lowering, node: onnx.NodeProto) -> None:
    """GATHER; a RESHAPE where the constant indices are every index of the axis in
    order: exported attention masks index their flattened mask by such arithmetic,
    folded at the bound batch, and a RESHAPE's target can follow a resizable batch
    where a constant of indices cannot (``tflite_dynamic``)."""
    data, indices = node.input[:2]
    rank = lw.rank(data)
    axis = attrs(node).get("axis", 0) % rank
    if lw.is_const(indices):
        positions = _positions(lw, indices, lw.shape(data)[axis])
        if positions.size == lw.shape(data)[axis] and \
                np.array_equal(positions.ravel(), np.arange(positions.size)):
            lw.reshape(lw.get(data, identity(rank)), lw.output(node.output[0]))
            return
        index = lw.fb.constant(indices, positions.astype(np.int32))
    else:
        index = lw.get(indices)
    lw.fb.op("GATHER", [lw.get(data, identity(rank)), index], [lw.output(node.output[0])],
             options("GatherOptions", axis=axis, batchDims=0))


def prefix_gather(lw: Lowering, node: onnx.NodeProto) -> bool:
    """A Gather of a constant table by constant indices 0..n-1 in order, n the size of a
    sequence dimension of an input (``Lowering.sequence``; an exporter's position ids
    sliced to the sequence's length): the positions are computed at run time (SHAPE,
    STRIDED_SLICE, RANGE) instead of folded into a constant, so the rows read follow a
    resized sequence. Whether they do is for ``tflite_dynamic`` to check."""
    if node.op_type != "Gather" or len(node.input) < 2 or not lw.is_const(node.input[0]) \
            or not lw.is_const(node.input[1]):
        return False
    data, indices = node.input[:2]
    axis = attrs(node).get("axis", 0) % lw.rank(data)
    positions = _positions(lw, indices, lw.shape(data)[axis])
    sources = [(name, dim) for name, dim, _ in lw.sequence
               if lw.shape(name)[dim] == positions.size]
    if len({symbol for name, dim, symbol in lw.sequence if (name, dim) in sources}) > 1:
        return False  # symbols at the same size: whose length this is, is not known
    if not sources or not 1 < positions.size < lw.shape(data)[axis] or \
            sum(d != 1 for d in positions.shape) > 1 or \
            not np.array_equal(positions.ravel(), np.arange(positions.size)):
        return False
    name, dim = sources[0]
    shape = lw.fb.tensor("sequence_shape", (lw.rank(name),), np.int32)
    lw.fb.op("SHAPE", [lw.get(name, identity(lw.rank(name)))], [shape],
             options("ShapeOptions", outType=enum("TensorType", "INT32")))
    size = lw.fb.tensor("sequence_size", (), np.int32)
    lw.fb.op("STRIDED_SLICE", [shape, *(lw.fb.constant(n, np.array([v], np.int32))
                                        for n, v in (("begin", dim), ("end", dim + 1),
                                                     ("strides", 1)))],
             [size], options("StridedSliceOptions", shrinkAxisMask=1))
    count = lw.fb.tensor("positions", (positions.size,), np.int32)
    lw.fb.op("RANGE", [_scalar(lw, "zero", 0), size, _scalar(lw, "one", 1)], [count])
    if positions.ndim != 1:  # the indices' shape, its one long dimension computed
        target = np.array([-1 if d != 1 else 1 for d in positions.shape], np.int32)
        shaped = lw.fb.tensor("positions", positions.shape, np.int32)
        lw.fb.op("RESHAPE", [count, lw.fb.constant("shape", target)], [shaped],
                 options("ReshapeOptions", newShape=target.tolist()))
        count = shaped
    lw.fb.op("GATHER", [lw.get(data, identity(lw.rank(data))), count],
             [lw.output(node.output[0])], options("GatherOptions", axis=axis, batchDims=0))
    return True


def _scalar(lw: Lowering, name: str, value: int) -> int:
    """An int32 constant of rank 0, as RANGE wants its start and delta (the writer
    stores other constants at rank 1 at least)."""
    index = lw.fb.constant(name, np.array([value], np.int32))
    tensor = lw.fb.tensors[index]
    tensor.data, tensor.shape = np.array(value, np.int32), ()
    return index


def gather_nd(lw: Lowering, node: onnx.NodeProto) -> None:
    """GATHER_ND (TensorFlow's gather_nd is ONNX's GatherND at batch_dims 0); constant
    indices are written non-negative, as TFLite wants them."""
    if attrs(node).get("batch_dims", 0):
        raise Unmappable("GatherND with batch_dims")
    data, indices = node.input[:2]
    if lw.is_const(indices):
        depth = lw.const(indices).shape[-1]
        positions = _positions(lw, indices, np.array(lw.shape(data)[:depth], np.int64))
        index = lw.fb.constant(indices, positions.astype(np.int32))
    else:
        index = lw.get(indices)
    lw.fb.op("GATHER_ND", [lw.get(data, identity(lw.rank(data))), index],
             [lw.output(node.output[0])])


def _positions(lw: Lowering, indices: str, bounds) -> np.ndarray:
    """Constant ``indices`` as the non-negative positions TFLite wants: a negative one
    counts back from its axis' size (``bounds``, broadcast along the last axis)."""
    positions = lw.const(indices).astype(np.int64)
    return np.where(positions < 0, positions + bounds, positions)


def slice_op(lw: Lowering, node: onnx.NodeProto) -> None:
    x = node.input[0]
    shape, rank, perm = lw.shape(x), lw.rank(x), lw.home(x)
    starts = int_list(lw, node, "starts", 1, 10)
    ends = int_list(lw, node, "ends", 2, 10)
    axes = int_list(lw, node, "axes", 3, 10) or list(range(len(starts)))
    steps = int_list(lw, node, "steps", 4, 10) or [1] * len(starts)
    begin, end, stride = [0] * rank, list(shape), [1] * rank
    for s, e, axis, step in zip(starts, ends, axes, steps):
        if step <= 0:
            raise Unmappable("non-positive slice steps")
        axis %= rank
        size = shape[axis]
        s = min(max(s + size if s < 0 else s, 0), size)
        e = min(max(e + size if e < 0 else e, 0), size)
        begin[axis], end[axis], stride[axis] = s, max(e, s), step
    consts = [lw.fb.constant(n, np.array([v[p] for p in perm], np.int32))
              for n, v in (("begin", begin), ("end", end), ("strides", stride))]
    lw.fb.op("STRIDED_SLICE", [lw.get(x), *consts], [lw.output(node.output[0], perm)],
             options("StridedSliceOptions"))


def expand(lw: Lowering, node: onnx.NodeProto) -> None:
    """BROADCAST_TO; nothing where it adds nothing: the input has the output's shape
    already (an exported mask expanded to the batch it has), or only broadcasting ops
    read the output and broadcast the input to the same results (a pooled mask sum
    expanded before a division). A BROADCAST_TO would spell the batch out."""
    out = node.output[0]
    shape, _ = lw.onnx_info(out)
    if _expand_is_implicit(lw, node):
        lw.alias(out, node.input[0])
        return
    tensors, perm = _aligned(lw, [node.input[0]], len(shape))
    lw.fb.op("BROADCAST_TO", [tensors[0], lw.fb.constant(
        "shape", np.array([shape[p] for p in perm], np.int32))], [lw.output(out, perm)],
        version=2)  # LiteRT registers BROADCAST_TO from version 2


def _expand_is_implicit(lw: Lowering, node: onnx.NodeProto) -> bool:
    x, out = node.input[0], node.output[0]
    shape, x_shape = lw.onnx_info(out)[0], lw.onnx_info(x)[0]
    if tuple(x_shape) == tuple(shape):
        return True
    readers = lw.readers.get(out, [])
    if not readers or out in lw.graph_outputs:
        return False
    for reader in readers:
        if reader.op_type not in BINARY or reader.op_type == "Pow":
            return False
        shapes = [x_shape if name == out else lw.onnx_info(name)[0]
                  for name in reader.input]
        try:
            if np.broadcast_shapes(*shapes) != tuple(lw.onnx_info(reader.output[0])[0]):
                return False
        except ValueError:
            return False
    return True


# ---------------------------------------------------------------------- reductions
REDUCE = {"ReduceMean": "MEAN", "ReduceMax": "REDUCE_MAX", "ReduceMin": "REDUCE_MIN",
          "ReduceSum": "SUM", "ReduceProd": "REDUCE_PROD", "ReduceSumSquare": "SUM",
          "ReduceL2": "SUM"}


def reduce(lw: Lowering, node: onnx.NodeProto) -> None:
    x = node.input[0]
    rank, perm = lw.rank(x), lw.home(x)
    a = attrs(node)
    axes = int_list(lw, node, "axes", 1, 13 if node.op_type == "ReduceSum" else 18)
    xi = lw.get(x)
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            lw.alias(node.output[0], x)
            return
        axes = list(range(rank))
    axes = sorted(a_ % rank for a_ in axes)
    keep = bool(a.get("keepdims", 1))
    if keep:
        out_perm = perm
    else:
        kept = [d for d in range(rank) if d not in axes]
        out_perm = tuple(kept.index(p) for p in perm if p not in axes)
    if node.op_type in ("ReduceSumSquare", "ReduceL2"):  # sum of squares (then its root)
        square = lw.temp(f"{x}/square", lw.fb.tensors[xi].shape)
        lw.fb.op("MUL", [xi, xi], [square], options("MulOptions", fusedActivationFunction=NONE))
        xi = square
    out = lw.output(node.output[0], out_perm)
    reduced = out if node.op_type != "ReduceL2" else \
        lw.temp(f"{x}/sum_squares", lw.fb.tensors[out].shape)
    lw.fb.op(REDUCE[node.op_type], [xi, lw.fb.constant(
        "axes", np.array([perm.index(d) for d in axes], np.int32))],
        [reduced], options("ReducerOptions", keepDims=keep))
    if node.op_type == "ReduceL2":
        lw.fb.op("SQRT", [reduced], [out])


# Abramowitz & Stegun 7.1.26: erf(x) = 1 - (a1·t + ... + a5·t⁵)·exp(-x²), t = 1/(1 + p·x)
ERF_P = 0.3275911
ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def erf(lw: Lowering, node: onnx.NodeProto) -> None:
    """LiteRT has no Erf builtin (a converter's FlexErf needs TensorFlow's kernels, which
    stock LiteRT lacks), so an Erf that is not part of a GELU (those become the builtin
    GELU first) is written as Abramowitz & Stegun's approximation 7.1.26 in builtin ops:
    |error| <= 1.5e-7, about float32's resolution near 1."""
    x = node.input[0]
    xi = lw.get(x)
    shape = lw.fb.tensors[xi].shape
    none = dict(fusedActivationFunction=NONE)

    def step(code: str, inputs: list[int], out: int | None = None) -> int:
        out = lw.temp(f"{x}/erf_{code.lower()}", shape) if out is None else out
        opts = options(FUSES_ACTIVATION[code], **none) if code in FUSES_ACTIVATION else None
        lw.fb.op(code, inputs, [out], opts)
        return out

    def const(value: float) -> int:
        return lw.fb.constant("erf_coefficient", np.array(value, F32))

    t = step("DIV", [const(1.0), step("ADD", [step("MUL", [step("ABS", [xi]), const(ERF_P)]),
                                              const(1.0)])])
    poly = const(ERF_A[-1])
    for a in reversed(ERF_A[:-1]):
        poly = step("ADD", [step("MUL", [poly, t]), const(a)])
    poly = step("MUL", [poly, t])
    gauss = step("EXP", [step("NEG", [step("MUL", [xi, xi])])])
    magnitude = step("SUB", [const(1.0), step("MUL", [poly, gauss])])
    step("MUL", [step("SIGN", [xi]), magnitude], lw.output(node.output[0], lw.home(x)))


def isnan(lw: Lowering, node: onnx.NodeProto) -> None:
    """NaN is the one value unequal to itself."""
    xi = lw.get(node.input[0])
    lw.fb.op("NOT_EQUAL", [xi, xi], [lw.output(node.output[0], lw.home(node.input[0]))])


def gelu(lw: Lowering, node: onnx.NodeProto) -> None:
    approximate = attrs(node).get("approximate", b"none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    x = node.input[0]
    lw.fb.op("GELU", [lw.get(x)], [lw.output(node.output[0], lw.home(x))],
             options("GeluOptions", approximate=approximate == "tanh"))


HANDLERS = {
    "Conv": conv, "MaxPool": pool, "AveragePool": pool,
    "GlobalAveragePool": global_pool, "GlobalMaxPool": global_pool,
    "BatchNormalization": batch_norm, "Gemm": gemm, "MatMul": matmul,
    **{op: binary for op in BINARY},
    "Relu": _unary("RELU"), "Sigmoid": _unary("LOGISTIC"), "Tanh": _unary("TANH"),
    "HardSwish": _unary("HARD_SWISH"), "Sqrt": _unary("SQRT"), "Exp": _unary("EXP"),
    "Log": _unary("LOG"), "Abs": _unary("ABS"), "Neg": _unary("NEG"),
    "Not": _unary("LOGICAL_NOT"), "Floor": _unary("FLOOR"), "Ceil": _unary("CEIL"),
    "LeakyRelu": _unary("LEAKY_RELU", lambda lw, n: options(
        "LeakyReluOptions", alpha=attrs(n).get("alpha", 0.01))),
    "Elu": _unary("ELU"), "Clip": clip, "HardSigmoid": hard_sigmoid, "Gelu": gelu,
    "Cast": cast, "Identity": identity_op, "Dropout": identity_op,
    "Reshape": reshape, "Flatten": reshape, "Squeeze": reshape, "Unsqueeze": reshape,
    "Transpose": transpose, "Concat": concat, "Pad": pad, "Gather": gather,
    "GatherND": gather_nd,
    "Slice": slice_op, "Expand": expand, "Softmax": softmax, "LogSoftmax": softmax,
    **{op: reduce for op in REDUCE},
    "LayerNormalization": layer_norm, "Resize": resize, "IsNaN": isnan, "Erf": erf,
    "DynamicQuantizeLinear": dynamic_quantize, "MatMulInteger": quantized_product,
    "QuantizeLinear": quantize, "DequantizeLinear": dequantize,  # QDQ: tflite_quant
    # evaluated ahead of time by fold_constant_node when their inputs are constants
    **{op: constants_only for op in ("Constant", "Shape", "ConstantOfShape", "Range")},
}

# The ONNX ops the litert target runs (its capabilities): passes emitting others are
# left out of its pipeline.
MAPPED_OPS = frozenset(HANDLERS)
