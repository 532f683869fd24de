"""From an ONNX graph with static shapes to the ``mcu`` target's program: one kernel call
per node (``Op``), the constants each needs, and the schedule the memory plan works on.

Everything the C code will need is decided here, in Python, where it can be checked: each
node is matched to a kernel with its parameters (pads, strides, broadcast strides, weight
layouts) or reported as unsupported with the reason, so a model the kernels cannot run
is refused before anything is written. Shapes come from ONNX shape inference at the
shapes the model was lowered at; every activation must have a static shape and be
float32, or 8-bit where QuantizeLinear/DequantizeLinear say so (``mcu_quant`` turns the
QDQ Conv/Gemm/MatMul into int8 kernels).

Two rewrites make the C faster and its arena smaller without changing the numbers:
a Relu/Clip right after a Conv/Gemm/MatMul becomes the kernel's output clamp, and
Reshape/Flatten/Squeeze/Unsqueeze/Identity/Dropout become aliases (no code, no memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.errors import UsageError
from graphopt.targets import mcu_quant
from graphopt.targets.mcu_plan import Step

ALIASES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"})
BINARY = {"Add": 0, "Sub": 1, "Mul": 2, "Div": 3}  # the kernel's op codes
UNARY = {"Relu": 0, "Clip": 1, "Sigmoid": 2, "Tanh": 3, "HardSigmoid": 4, "HardSwish": 5,
         "LeakyRelu": 6}
QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})
KERNELS = frozenset({"Conv", "Gemm", "MatMul", "MaxPool", "AveragePool",
                     "GlobalAveragePool", "Concat", "Softmax", *BINARY, *UNARY, *ALIASES,
                     *QDQ})
MAX_RANK = 6  # of a broadcast elementwise op (the kernel's index arrays)
F32 = onnx.TensorProto.FLOAT


@dataclass
class Op:
    """One kernel call: ``kind`` names the C kernel, ``inputs``/``outputs`` the activation
    tensors, ``params`` its integer/float arguments, ``consts`` tensors placed in flash."""

    kind: str
    node: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    params: dict = field(default_factory=dict)
    consts: dict[str, np.ndarray] = field(default_factory=dict)

    def step(self) -> Step:
        kind = {"alias": "alias", "unary": "inplace", "binary": "inplace"}.get(self.kind,
                                                                              "compute")
        return Step(self.node, tuple(self.inputs), tuple(self.outputs), kind,
                    tuple(self.params.get("shareable", ())))


@dataclass
class Program:
    ops: list[Op]
    inputs: list[tuple[str, list[int]]]
    outputs: list[tuple[str, list[int]]]
    shapes: dict[str, list[int]]
    int8: set[str]  # tensors stored as int8 (the rest float32)
    # Every intermediate tensor of the ONNX graph kept alive at once, aliases (Reshape...)
    # free: what a generator allocating one buffer per tensor needs.
    naive_bytes: int = 0

    def nbytes(self, tensor: str) -> int:
        return (1 if tensor in self.int8 else 4) * math.prod(self.shapes[tensor])


def lower_graph(proto: onnx.ModelProto) -> Program:
    """The program of ``proto`` (its graph in topological order). A UsageError lists every
    node no kernel runs, with the reason; a dynamic or unknown shape is one too."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        raise UsageError(f"target mcu needs every tensor's shape; ONNX shape inference "
                         f"failed: {str(exc).splitlines()[0]}") from exc
    graph = inferred.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    shapes, types = {}, {}
    for v in [*graph.input, *graph.value_info, *graph.output]:
        tt = v.type.tensor_type
        types[v.name] = tt.elem_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            shapes[v.name] = [d.dim_value for d in tt.shape.dim]
    for node in graph.node:  # Constant nodes the pipeline left: constants like initializers
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            consts[node.output[0]] = numpy_helper.to_array(
                onnx.helper.get_attribute_value(node.attribute[0]))
    qconsts = mcu_quant.fold_constant_dequantize(graph, consts)
    inputs = [v.name for v in graph.input if v.name not in consts]
    for name in [*inputs, *(v.name for v in graph.output)]:
        if name not in shapes:
            raise UsageError(f"target mcu needs static shapes: {name!r} has none",
                             hint="give it with --input-shape NAME=1x3x32x32")
        if types.get(name) != F32:
            raise UsageError(f"target mcu takes and returns float32 tensors: {name!r} is "
                             f"{onnx.helper.tensor_dtype_to_np_dtype(types[name]).name}")
    ops, problems = [], []
    for node in graph.node:
        if (node.op_type == "Constant" and node.domain in ("", "ai.onnx")) or \
                node.output[0] in qconsts:
            continue
        try:
            ops.append(_lower_node(node, consts, shapes, types, opset))
        except _Unsupported as exc:
            problems.append(f"{node.op_type} {node.name or node.output[0]!r} ({exc})")
    if problems:
        raise UsageError(f"target mcu has no kernel for {len(problems)} node"
                         f"{'s' * (len(problems) > 1)}: " + "; ".join(problems[:8]) +
                         (f"; ... {len(problems) - 8} more" if len(problems) > 8 else ""),
                         hint=f"the kernels: {', '.join(sorted(KERNELS))}")
    outputs = [v.name for v in graph.output]
    naive = sum((1 if types.get(t) in mcu_quant.EIGHT_BIT else 4) * math.prod(shapes[t])
                for op in ops if op.kind != "alias" for t in op.outputs if t not in outputs)
    ops = _copies_for_outputs(_fuse_activations(ops, set(outputs)), set(outputs))
    ops = mcu_quant.to_int8(ops, qconsts, set(outputs))
    int8 = {t for op in ops if op.kind == "quantize" or op.params.get("out") == "int8"
            for t in op.outputs}
    for op in ops:  # an alias of an int8 tensor is int8
        if op.kind == "alias" and op.inputs[0] in int8:
            int8.update(op.outputs)
    return Program(ops, [(n, shapes[n]) for n in inputs], [(n, shapes[n]) for n in outputs],
                   shapes, int8, naive)


class _Unsupported(Exception):
    pass


def _lower_node(node, consts, shapes, types, opset) -> Op:
    if node.domain not in ("", "ai.onnx"):
        raise _Unsupported(f"domain {node.domain!r}")
    if node.op_type not in KERNELS:
        raise _Unsupported("no such kernel")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    name = node.name or node.output[0]
    if node.op_type in QDQ:
        return _qdq(node, name, attrs, consts, shapes, types)
    acts = [t for t in node.input if t and t not in consts]
    allowed = (F32, *mcu_quant.EIGHT_BIT) if node.op_type in ALIASES else (F32,)
    for t in [*acts[:1 if node.op_type in ALIASES else None], *(o for o in node.output if o)]:
        if types.get(t, F32) not in allowed:
            raise _Unsupported(f"tensor {t!r} is "
                               f"{onnx.helper.tensor_dtype_to_np_dtype(types[t]).name}, "
                               f"the kernels are float32")
        if t not in shapes:
            raise _Unsupported(f"tensor {t!r} has no static shape")
    op = node.op_type
    out = node.output[0]
    if op in ALIASES:
        if op == "Dropout" and len(node.output) > 1 and node.output[1]:
            raise _Unsupported("the mask output is used")
        return Op("alias", name, op, [node.input[0]], [out])
    if op == "Conv":
        return _conv(node, name, attrs, consts, shapes)
    if op in ("Gemm", "MatMul"):
        return _fc(node, name, attrs, consts, shapes)
    if op in BINARY:
        return _binary(node, name, consts, shapes)
    if op in UNARY:
        lo, hi = -math.inf, math.inf  # the output range of Relu and Clip
        if op == "Relu":
            lo = 0.0
        elif op == "Clip":
            lo, hi = _clip_range(node, attrs, consts, opset)
        a, b = {"HardSigmoid": (attrs.get("alpha", 0.2), attrs.get("beta", 0.5)),
                "LeakyRelu": (attrs.get("alpha", 0.01), 0.0)}.get(op, (lo, hi))
        return Op("unary", name, op, [node.input[0]], [out],
                  {"op": UNARY[op], "count": math.prod(shapes[out]), "lo": lo, "hi": hi,
                   "a": a, "b": b, "shareable": (0,)})
    if op in ("MaxPool", "AveragePool"):
        return _pool(node, name, attrs, shapes)
    if op == "GlobalAveragePool":
        shape = shapes[node.input[0]]
        return Op("gap", name, op, [node.input[0]], [out],
                  {"nc": shape[0] * shape[1], "hw": math.prod(shape[2:])})
    if op == "Concat":
        return _concat(node, name, attrs, consts, shapes)
    shape = shapes[out]  # Softmax
    axis = attrs.get("axis", -1 if opset >= 13 else 1) % len(shape)
    inner = math.prod(shape[axis + 1:]) if opset >= 13 else 1
    n = shape[axis] if opset >= 13 else math.prod(shape[axis:])
    return Op("softmax", name, op, [node.input[0]], [out],
              {"outer": math.prod(shape[:axis]), "n": n, "inner": inner})


def _qdq(node, name, attrs, consts, shapes, types) -> Op:
    """QuantizeLinear (float32 -> 8 bits) or DequantizeLinear (8 bits -> float32) of
    activations, per tensor (constant ones were folded)."""
    x, y = node.input[0], node.output[0]
    quantized = y if node.op_type == "QuantizeLinear" else x
    if types.get(quantized) not in mcu_quant.EIGHT_BIT:
        raise _Unsupported("only 8-bit quantization")
    if any(t and t not in consts for t in node.input[1:]):
        raise _Unsupported("its scale or zero point is not constant")
    if x not in shapes:
        raise _Unsupported(f"tensor {x!r} has no static shape")
    try:
        scale, zp = mcu_quant.activation_qparams(node, consts)
    except ValueError as exc:
        raise _Unsupported(str(exc)) from exc
    kind = "quantize" if node.op_type == "QuantizeLinear" else "dequantize"
    return Op(kind, name, node.op_type, [x], [y],
              {"scale": scale, "zp": zp, "count": math.prod(shapes[x])})


def _conv(node, name, attrs, consts, shapes) -> Op:
    x, w_name = node.input[0], node.input[1]
    if w_name not in consts:
        raise _Unsupported("the weights are not constant")
    w = consts[w_name].astype(np.float32)
    xs, ys = shapes[x], shapes[node.output[0]]
    if len(xs) not in (3, 4):
        raise _Unsupported(f"{len(xs) - 2}-D convolution (1-D and 2-D only)")
    one_d = len(xs) == 3
    if one_d:  # [N, C, L] runs as [N, C, 1, L]
        xs, ys, w = [*xs[:2], 1, xs[2]], [*ys[:2], 1, ys[2]], w[:, :, None, :]
    kh, kw = w.shape[2:]
    strides = ([1] if one_d else []) + list(attrs.get("strides", [1] * (len(xs) - 2 - one_d)))
    dil = ([1] if one_d else []) + list(attrs.get("dilations", [1] * (len(xs) - 2 - one_d)))
    pads = _pads(attrs, xs[2:], ys[2:], [kh, kw], strides, dil, one_d)
    bias = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if len(node.input) > 2 and node.input[2] and bias is None:
        raise _Unsupported("the bias is not constant")
    bias = np.zeros(w.shape[0], np.float32) if bias is None else bias.astype(np.float32)
    return Op("conv", name, "Conv", [x], [node.output[0]],
              {"n": xs[0], "c": xs[1], "h": xs[2], "w": xs[3], "m": ys[1], "oh": ys[2],
               "ow": ys[3], "kh": kh, "kw": kw, "sh": strides[0], "sw": strides[1],
               "dh": dil[0], "dw": dil[1], "pt": pads[0], "pl": pads[1],
               "group": attrs.get("group", 1), "lo": -math.inf, "hi": math.inf,
               "w_name": w_name},
              {"w": w, "b": bias})


def _pads(attrs, in_hw, out_hw, kernel, strides, dil, one_d) -> list[int]:
    """Top and left padding; SAME_* from the inferred output size."""
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for i, o, k, s, d in zip(in_hw, out_hw, kernel, strides, dil):
            total = max(0, (o - 1) * s + (k - 1) * d + 1 - i)
            pads.append(total // 2 if auto == "SAME_UPPER" else total - total // 2)
        return pads
    p = list(attrs.get("pads", [0] * 2 * (len(in_hw) - one_d)))
    return [0, p[0]] if one_d else [p[0], p[1]]


def _fc(node, name, attrs, consts, shapes) -> Op:
    a, b = node.input[0], node.input[1]
    if a in consts:
        raise _Unsupported("the first operand is constant")
    y = node.output[0]
    a_shape = shapes[a]
    if node.op_type == "Gemm":
        if attrs.get("transA", 0):
            raise _Unsupported("transA=1")
        if b not in consts:
            raise _Unsupported("the second operand is not constant")
        w = consts[b].astype(np.float32)
        w = (w if attrs.get("transB", 0) else w.T) * np.float32(attrs.get("alpha", 1.0))
        n = w.shape[0]
        bias = np.zeros(n, np.float32)
        if len(node.input) > 2 and node.input[2]:
            c = consts.get(node.input[2])
            if c is None or c.size not in (1, n) or (c.ndim == 2 and c.shape[0] != 1):
                raise _Unsupported("the bias is not a constant of [N] or [1, N]")
            bias = np.broadcast_to(c.astype(np.float32).reshape(-1), (n,)) * \
                np.float32(attrs.get("beta", 1.0))
        m, k = a_shape
        params = {**_fc_params(m, k, n, False), "w_name": b, "alpha": attrs.get("alpha", 1.0),
                  "w_transposed": not attrs.get("transB", 0)}
        return Op("fc", name, "Gemm", [a], [y], params,
                  {"w": np.ascontiguousarray(w), "b": np.ascontiguousarray(bias)})
    k = a_shape[-1]
    m = math.prod(a_shape[:-1])
    if b in consts and consts[b].ndim == 2:
        w = np.ascontiguousarray(consts[b].astype(np.float32).T)
        params = {**_fc_params(m, k, w.shape[0], False), "w_name": b, "w_transposed": True}
        return Op("fc", name, "MatMul", [a], [y], params, {"w": w})
    if b not in consts and len(a_shape) == 2 and len(shapes[b]) == 2:
        return Op("fc", name, "MatMul", [a, b], [y], _fc_params(m, k, shapes[b][1], True))
    raise _Unsupported("batched MatMul (2-D operands or a constant 2-D second operand)")


def _fc_params(m, k, n, kn) -> dict:
    return {"m": m, "k": k, "n": n, "kn": int(kn), "lo": -math.inf, "hi": math.inf}


def _binary(node, name, consts, shapes) -> Op:
    out = node.output[0]
    shape = shapes[out]
    if len(shape) > MAX_RANK:
        raise _Unsupported(f"rank {len(shape)} (at most {MAX_RANK})")
    op = Op("binary", name, node.op_type, [], [out],
            {"op": BINARY[node.op_type], "shape": shape})
    shareable = []
    for pos, t in enumerate(node.input[:2]):
        src = consts[t].shape if t in consts else shapes[t]
        key = "a" if pos == 0 else "b"
        op.params[key + "_strides"] = _broadcast_strides(list(src), shape)
        if t in consts:
            op.consts[key] = np.ascontiguousarray(consts[t].astype(np.float32))
        else:
            op.params[key + "_input"] = len(op.inputs)
            if list(src) == shape:
                shareable.append(len(op.inputs))
            op.inputs.append(t)
    if not op.inputs:
        raise _Unsupported("both operands are constant (fold-constants leaves this?)")
    op.params["shareable"] = tuple(shareable)
    return op


def _broadcast_strides(src: list[int], shape: list[int]) -> list[int]:
    """Element strides of a tensor of shape ``src`` read at each index of ``shape`` under
    numpy broadcasting (0 along broadcast dimensions)."""
    src = [1] * (len(shape) - len(src)) + src
    strides, step = [0] * len(shape), 1
    for i in range(len(shape) - 1, -1, -1):
        strides[i] = step if src[i] != 1 else 0
        step *= src[i]
    return strides


def _clip_range(node, attrs, consts, opset) -> tuple[float, float]:
    if opset < 11:
        return float(attrs.get("min", -math.inf)), float(attrs.get("max", math.inf))
    bounds = []
    for i, default in ((1, -math.inf), (2, math.inf)):
        t = node.input[i] if len(node.input) > i else ""
        if t and t not in consts:
            raise _Unsupported("its bounds are not constant")
        bounds.append(float(consts[t]) if t else default)
    return bounds[0], bounds[1]


def _pool(node, name, attrs, shapes) -> Op:
    x, y = node.input[0], node.output[0]
    xs, ys = shapes[x], shapes[y]
    if len(xs) != 4:
        raise _Unsupported(f"{len(xs) - 2}-D pooling (2-D only)")
    if len(node.output) > 1 and node.output[1]:
        raise _Unsupported("the Indices output is used")
    kernel = list(attrs["kernel_shape"])
    strides = list(attrs.get("strides", [1, 1]))
    dil = list(attrs.get("dilations", [1, 1]))
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    auto = attrs.get("auto_pad", b"NOTSET")
    if (auto.decode() if isinstance(auto, bytes) else auto) != "NOTSET":
        pads = _pads(attrs, xs[2:], ys[2:], kernel, strides, dil, False)
        pads += [pads[0], pads[1]]  # the bottom/right pads only matter to the divisor
    include = attrs.get("count_include_pad", 0)
    if node.op_type == "AveragePool" and include and attrs.get("ceil_mode", 0):
        raise _Unsupported("ceil_mode=1 with count_include_pad=1")
    return Op("pool", name, node.op_type, [x], [y],
              {"max": int(node.op_type == "MaxPool"), "n": xs[0], "c": xs[1], "h": xs[2],
               "w": xs[3], "oh": ys[2], "ow": ys[3], "kh": kernel[0], "kw": kernel[1],
               "sh": strides[0], "sw": strides[1], "dh": dil[0], "dw": dil[1],
               "pt": pads[0], "pl": pads[1], "pb": pads[2], "pr": pads[3],
               "include_pad": int(include)})


def _concat(node, name, attrs, consts, shapes) -> Op:
    out = node.output[0]
    shape = shapes[out]
    axis = attrs["axis"] % len(shape)
    parts, op = [], Op("concat", name, "Concat", [], [out])
    for i, t in enumerate(node.input):
        src = list(consts[t].shape) if t in consts else shapes[t]
        if t in consts:
            op.consts[f"part{i}"] = np.ascontiguousarray(consts[t].astype(np.float32))
            parts.append(("const", f"part{i}", math.prod(src[axis:])))
        else:
            parts.append(("input", len(op.inputs), math.prod(src[axis:])))
            op.inputs.append(t)
    op.params.update(outer=math.prod(shape[:axis]), inner=math.prod(shape[axis:]),
                     parts=parts)
    return op


def _fuse_activations(ops: list[Op], outputs: set[str]) -> list[Op]:
    """A Relu/Clip that is the only reader of a Conv/FC output becomes that kernel's
    output clamp (the clamp of float values is exact, so the numbers do not change)."""
    readers: dict[str, list[Op]] = {}
    for op in ops:
        for t in op.inputs:
            readers.setdefault(t, []).append(op)
    fused, kept = set(), []
    for op in ops:
        if id(op) in fused:
            continue
        out = op.outputs[0] if op.outputs else None
        users = readers.get(out, [])
        if op.kind in ("conv", "fc") and out not in outputs and len(users) == 1 and \
                users[0].kind == "unary" and users[0].op_type in ("Relu", "Clip"):
            act = users[0]
            op.params["lo"], op.params["hi"] = act.params["lo"], act.params["hi"]
            op.outputs = list(act.outputs)
            op.params["fused"] = act.op_type
            fused.add(id(act))
        kept.append(op)
    return kept


def _copies_for_outputs(ops: list[Op], outputs: set[str]) -> list[Op]:
    """An alias whose output is a graph output becomes a copy: graph outputs are the
    caller's memory, which an alias cannot make the producer write into."""
    for op in ops:
        if op.kind == "alias" and op.outputs[0] in outputs:
            op.kind = "copy"
    return ops
