"""ONNX graph → TFLite subgraph, with the NCHW→NHWC layout conversion.

Layout is tracked per value instead of being rewritten into the ONNX graph first: every
ONNX value has a *home* permutation ``P`` such that its TFLite tensor equals
``onnx_value.transpose(P)``. Convolutions and pools put their outputs at home in NHWC
(``P = (0, 2, 3, 1)``), elementwise ops, concatenations, pads and reductions keep the
layout of their inputs (axes are remapped, constants are transposed when written), an
ONNX ``Transpose`` becomes a change of ``P`` and no operator at all. A TRANSPOSE is
emitted only where an op needs a layout its input does not have (a Reshape of NHWC data,
for example) and is counted: at the model's inputs and outputs (``boundary``, so the
``.tflite`` keeps the ONNX model's layout) or ``inside``. Where a layout change moves
only dimensions of size 1 the memory order is the same and a RESHAPE does it for free
(global pooling followed by Flatten is the common case).

Op mappings live in ``graphopt.targets.tflite_ops``; the flatbuffer in
``graphopt.targets.tflite_writer``. Shapes are static: the model reaching here has every
dimension known (``litert`` binds symbolic dimensions first).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt import external_data
from graphopt.errors import UsageError
from graphopt.targets.tflite_writer import FlatbufferBuilder, enum, options

NHWC = (0, 2, 3, 1)
F32 = np.float32
NONE = 0  # ActivationFunctionType.NONE


def identity(rank: int) -> tuple[int, ...]:
    return tuple(range(rank))


def inverse(perm) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


@dataclass
class Value:
    """An ONNX value as the lowering sees it: its ONNX shape and dtype, a constant's
    array, or the TFLite tensors holding it per layout (``home`` first)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    const: np.ndarray | None = None
    home: tuple[int, ...] = ()
    tensors: dict[tuple[int, ...], int] = field(default_factory=dict)
    # A flattened NHWC value read only by matrix products: TFLite column j holds ONNX
    # column columns[j], and the products permute their weights to match.
    columns: np.ndarray | None = None
    # A constant that was float16 in the ONNX graph (held here as float32): written as
    # float16 weights that the runtime dequantizes (see FlatbufferBuilder.constant).
    half: bool = False
    # A value of a QDQ graph held as int8 codes, (scale, zero point): ``tensors`` are
    # int8; float readers get ``float_tensors`` (a DEQUANTIZE, made once per layout).
    # See ``graphopt.targets.tflite_quant``.
    quant: tuple[float, int] | None = None
    float_tensors: dict[tuple[int, ...], int] = field(default_factory=dict)


@dataclass
class Lowered:
    """The ``.tflite`` bytes and what the manifest says about them."""

    data: bytes | memoryview  # (a view of the builder's buffer: not copied)
    operators: dict[str, int]
    transposes: dict[str, int]
    inputs: list[dict]
    outputs: list[dict]
    weights: str  # "float32"; "float16" (--quantize fp16), "int8" (int8, int8-dynamic)
    compute: str = "float32"  # or "int8" (full-integer), "int8 + float32": ``_compute``
    resizable_batch: bool = False  # the batch is -1 in the shape signatures
    static_reason: str | None = None  # why a batch asked to be resizable is not
    resizable_sequence: bool = False  # the other symbolic dimensions are -1 too
    sequence_static_reason: str | None = None  # why they are not
    custom_ops: list[str] = field(default_factory=list)  # CUSTOM operators' codes


class Lowering:
    """One ONNX graph (shape-inferred, static shapes) being lowered into a builder."""

    def __init__(self, proto: onnx.ModelProto):
        self.opset = next((o.version for o in proto.opset_import
                           if o.domain in ("", "ai.onnx")), 1)
        self.fb = FlatbufferBuilder(description=f"graphopt: {proto.graph.name or 'model'}")
        self.values: dict[str, Value] = {}
        self.transposes: Counter = Counter()
        self.skipped: set[int] = set()  # ids of nodes folded into an earlier operator
        # While an int8 kernel is written: ``get`` gives int8 codes, and the outputs named
        # in ``int8_out`` are int8 tensors with those (scale, zero point).
        self.int8_mode = False
        self.int8_io = False  # quantized model inputs/outputs stay int8 (tflite_quant)
        self.int8_out: dict[str, tuple[float, int]] = {}
        self._input_tensors: set[int] = set()
        # (input, axis, symbol) of the symbolic dimensions other than the batch (a
        # sequence): sizes the lowering computes at run time where it can
        # (``prefix_gather``)
        self.sequence: list[tuple[str, int, str | None]] = []
        # per subgraph input tensor, the symbol of each axis (None: static, the batch)
        self.axis_symbols: dict[int, list[str | None]] = {}
        self._types = {v.name: v.type.tensor_type for v in
                       [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        self.producer = {o: node for node in proto.graph.node for o in node.output if o}
        for node in proto.graph.node:
            for name in node.input:
                if name:
                    self.readers.setdefault(name, []).append(node)
        self.graph_outputs = {o.name for o in proto.graph.output}
        for init in proto.graph.initializer:  # a reference: a view of its mapped file
            self.set_const(init.name, external_data.MappedValues(init).load()
                           if external_data.extent(init) is not None
                           else numpy_helper.to_array(init))

    # ------------------------------------------------------------------ values
    def value(self, name: str) -> Value:
        if name not in self.values:
            raise UsageError(f"value {name!r} is used before it is computed")
        return self.values[name]

    def const(self, name: str, what: str = "this input") -> np.ndarray:
        value = self.value(name).const
        if value is None:
            raise Unmappable(f"{what} ({name!r}) must be a constant")
        return value

    def is_const(self, name: str) -> bool:
        return bool(name) and self.value(name).const is not None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.value(name).shape

    def rank(self, name: str) -> int:
        return len(self.shape(name))

    def home(self, name: str) -> tuple[int, ...]:
        value = self.value(name)
        return value.home if value.const is None else identity(len(value.shape))

    def onnx_info(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """The inferred static shape and dtype of the ONNX value ``name``."""
        tensor = self._types.get(name)
        if tensor is None or not tensor.HasField("shape") or not tensor.elem_type:
            raise UsageError(f"the shape of {name!r} is unknown after shape inference",
                             hint="fix the input shapes with --input-shape")
        dims = []
        for d in tensor.shape.dim:
            if not d.HasField("dim_value"):
                raise UsageError(f"{name!r} has a dynamic dimension "
                                 f"({d.dim_param or '?'}); TFLite tensors are static here",
                                 hint="fix it with --input-shape NAME=1x...")
            dims.append(d.dim_value)
        return tuple(dims), _computed(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))

    # ------------------------------------------------------------------ tensors
    def get(self, name: str, perm=None, dtype=None) -> int:
        """The TFLite tensor of ``name`` in layout ``perm`` (default: its home). A
        constant is written transposed; a computed value is converted by RESHAPE where
        only size-1 dimensions move, else by a TRANSPOSE (counted)."""
        value = self.value(name)
        perm = value.home if perm is None and value.const is None else \
            tuple(perm) if perm is not None else identity(len(value.shape))
        if value.const is not None:
            array = value.const.transpose(perm) if perm else value.const
            if dtype is not None:
                array = array.astype(dtype)
            key = (perm, np.dtype(array.dtype).str)
            if key not in value.tensors:
                value.tensors[key] = self.fb.constant(name, array, half=value.half)
            return value.tensors[key]
        if value.quant is not None and not self.int8_mode:
            return self._dequantized(value, perm)
        if value.quant is None and self.int8_mode:
            raise Unmappable(f"{name!r} is not quantized where an int8 kernel reads it")
        if perm in value.tensors:
            return value.tensors[perm]
        source = value.tensors[value.home]
        step = tuple(inverse(value.home)[p] for p in perm)  # home tensor -> wanted
        home = self.fb.tensors[source]
        home_shape = home.shape
        target = self.fb.tensor(_layout_name(name, perm), tuple(home_shape[i] for i in step),
                                home.dtype, quant=home.quant)
        if self.ordered_alike(name, perm):
            self.reshape(source, target)
        else:
            self.fb.op("TRANSPOSE", [source, self.fb.constant(f"{name}/perm",
                                                              np.array(step, np.int32))],
                       [target])
            self.transposes["boundary" if source in self._input_tensors else "inside"] += 1
        value.tensors[perm] = target
        return target

    def ordered_alike(self, name: str, perm) -> bool:
        """Whether computed value ``name`` lies in memory in the same order at its home
        layout and at ``perm`` (only size-1 dimensions move): a RESHAPE converts it."""
        value = self.value(name)
        step = tuple(inverse(value.home)[p] for p in perm)
        home_shape = self.fb.tensors[value.tensors[value.home]].shape
        moved = [i for i in step if home_shape[i] != 1]
        return moved == sorted(moved)

    def _dequantized(self, value: Value, perm: tuple[int, ...]) -> int:
        """The float32 tensor of the int8 ``value`` in layout ``perm``: a DEQUANTIZE of
        its codes (moved into ``perm`` as int8, a quarter of the bytes)."""
        if perm not in value.float_tensors:
            with self.int8():
                codes = self.get(value.name, perm)
            index = self.fb.tensor(f"{self.fb.tensors[codes].name}/dequantized",
                                   self.fb.tensors[codes].shape, F32)
            self.fb.op("DEQUANTIZE", [codes], [index], version=2)  # int8 input: v2
            value.float_tensors[perm] = index
        return value.float_tensors[perm]

    @contextlib.contextmanager
    def int8(self):
        """Within: ``get`` reads int8 codes (an int8 kernel is being written)."""
        before, self.int8_mode = self.int8_mode, True
        try:
            yield
        finally:
            self.int8_mode = before

    def reshape(self, source: int, target: int) -> None:
        shape = np.array(self.fb.tensors[target].shape, np.int32)
        self.fb.op("RESHAPE", [source, self.fb.constant("shape", shape)], [target],
                   options("ReshapeOptions", newShape=shape.tolist()))

    def output(self, name: str, perm=None) -> int:
        """A new TFLite tensor for the ONNX value ``name``, at home in ``perm``."""
        shape, dtype = self.onnx_info(name)
        perm = tuple(perm) if perm is not None else identity(len(shape))
        quant = self.int8_out.get(name) if self.int8_mode else None
        index = self.fb.tensor(_layout_name(name, perm), tuple(shape[p] for p in perm),
                               np.int8 if quant else dtype, quant=quant)
        self.values[name] = Value(name, shape, np.dtype(F32) if quant else dtype, home=perm,
                                  tensors={perm: index}, quant=quant)
        return index

    def add_input(self, name: str, perm) -> int:
        """The graph input ``name`` as a subgraph input laid out in ``perm``."""
        index = self.output(name, perm)
        self.fb.rename(index, name)
        self.fb.inputs.append(index)
        self._input_tensors.add(index)
        return index

    def is_input(self, name: str) -> bool:
        """Whether ``name`` is a graph input as it stands (passed through untouched)."""
        value = self.value(name)
        return value.const is None and value.tensors[value.home] in self._input_tensors

    def temp(self, hint: str, shape, dtype=np.float32) -> int:
        return self.fb.tensor(hint, tuple(shape), dtype)

    def alias(self, name: str, source: str) -> None:
        """``name`` is the same value as ``source`` (Identity, a no-op Cast, ...)."""
        src = self.value(source)
        self.values[name] = Value(name, src.shape, src.dtype, src.const, src.home,
                                  src.tensors, src.columns, src.half, src.quant,
                                  src.float_tensors)

    def set_const(self, name: str, array: np.ndarray) -> None:
        """``name`` holds a constant; float16 is held as float32, marked ``half``."""
        array = np.asarray(array)
        half = array.dtype == np.float16
        array = array.astype(_computed(array.dtype), copy=False)  # (a mapped view stays one)
        self.values[name] = Value(name, array.shape, array.dtype, array, half=half)

    def is_half(self, name: str) -> bool:
        return bool(name) and self.value(name).half

    def broadcast_const(self, hint: str, array: np.ndarray, rank: int, perm,
                        half: bool = False) -> int:
        """A constant broadcastable against a rank-``rank`` value at home in ``perm``:
        padded to the rank (numpy's rule) and transposed like the value."""
        array = np.asarray(array).reshape((1,) * (rank - np.ndim(array)) + np.shape(array))
        return self.fb.constant(hint, np.ascontiguousarray(array.transpose(perm)), half=half)

    # ------------------------------------------------------------------ fusion helpers
    def sole_reader(self, name: str) -> onnx.NodeProto | None:
        readers = self.readers.get(name, [])
        if len(readers) != 1 or name in self.graph_outputs:
            return None
        return readers[0]

    def fused_activation(self, node: onnx.NodeProto, out: str | None = None) -> tuple[int, str]:
        """The activation a TFLite operator can apply itself (``fused_activation_function``)
        when the only reader of ``out`` (default: the node's output) is a Relu or a Clip
        to [0, 6] / [-1, 1]: ``(ActivationFunctionType, ONNX name the operator writes)``;
        the activation node is then skipped."""
        out = out or node.output[0]
        reader = self.sole_reader(out)
        kind = reader is not None and self._activation_kind(reader)
        if not kind:
            return enum("ActivationFunctionType", "NONE"), out
        self.skipped.add(id(reader))
        return enum("ActivationFunctionType", kind), reader.output[0]

    def _activation_kind(self, node: onnx.NodeProto) -> str | None:
        if node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Relu":
            return "RELU"
        if node.op_type == "Clip":
            bounds = self.clip_bounds(node)
            return {(0.0, 6.0): "RELU6", (-1.0, 1.0): "RELU_N1_TO_1"}.get(bounds)
        return None

    def clip_bounds(self, node: onnx.NodeProto) -> tuple[float, float] | None:
        """(min, max) of a Clip with constant bounds (attributes before opset 11)."""
        if self.opset < 11:
            attrs = {a.name: a.f for a in node.attribute}
            return attrs.get("min", -np.inf), attrs.get("max", np.inf)
        bounds = []
        for i, default in ((1, -np.inf), (2, np.inf)):
            name = node.input[i] if len(node.input) > i else ""
            if name and not self.is_const(name):
                return None
            bounds.append(float(self.value(name).const) if name else default)
        return tuple(bounds)


# ---------------------------------------------------------------------- node helpers
def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def input_name(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


def int_list(lw: Lowering, node: onnx.NodeProto, key: str, index: int, opset: int):
    """A list operand that moved from an attribute to an input at ``opset``."""
    if lw.opset < opset:
        return attrs(node).get(key)
    name = input_name(node, index)
    return None if not name else [int(v) for v in lw.const(name, key).reshape(-1)]


class Unmappable(Exception):
    """An op the mapping cannot express as it stands (reported with the node's name)."""


def _computed(dtype: np.dtype) -> np.dtype:
    """The dtype a value is computed in: float16 graphs (``--quantize fp16``) compute in
    float32 here, their float16 constants becoming float16 weights."""
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


def _layout_name(name: str, perm: tuple[int, ...]) -> str:
    return name if perm == identity(len(perm)) else f"{name}:{''.join(map(str, perm))}"


# ---------------------------------------------------------------------- driver
def lower_graph(proto: onnx.ModelProto, *, nhwc_io: bool = False,
                int8_io: bool = False, at_batch_2: onnx.ModelProto | None = None,
                at_sequence_2: onnx.ModelProto | None = None,
                symbols: dict[str, list[str | None]] | None = None,
                allow_custom: bool = False) -> Lowered:
    """``proto`` (static shapes, shape-inferred, default domain) as ``.tflite`` bytes. An
    op without a mapping is a UsageError naming its type and node before anything is
    built; the caller writes nothing in that case (``allow_custom``: it becomes a CUSTOM
    operator instead; ``tflite_unmapped``). ``int8_io``: quantized inputs and
    outputs of a QDQ graph stay int8 (see ``tflite_quant``). ``at_batch_2``: the same
    graph bound at batch 2 where ``proto`` is bound at batch 1; ``at_sequence_2``: bound
    with its other symbolic dimensions (a sequence) twice as large: what follows them is
    made resizable where the builds show it can be (``tflite_dynamic``). ``symbols``: per
    graph input, the symbol of each axis other than the batch's (None elsewhere), so that
    symbols bound at the same size are never taken for one another."""
    from graphopt.targets.tflite_dynamic import (Plan, apply, combine, follows,
                                                  snapshot)

    symbols = symbols or {}
    grown = _grown(proto, at_sequence_2, symbols) if at_sequence_2 is not None else []
    # (the other builds first, kept as snapshots: two builds' weights are not held)
    second = snapshot(_build(at_batch_2, nhwc_io, int8_io, grown,
                             allow_custom=allow_custom)[0].fb) \
        if at_batch_2 is not None else None
    third = snapshot(_build(at_sequence_2, nhwc_io, int8_io, grown,
                            allow_custom=allow_custom)[0].fb) \
        if at_sequence_2 is not None else None
    lw, io_inputs, io_outputs = _build(proto, nhwc_io, int8_io, grown, symbols,
                                       allow_custom)
    batch = follows(lw.fb, second, "batch") if second is not None else None
    sequence = follows(lw.fb, third, "sequence") if third is not None else None
    del second, third
    plans = [p for p in (batch, sequence) if isinstance(p, Plan)]
    if len(plans) == 2:
        both = combine(batch, sequence, lw.fb, "the batch and the sequence",
                       lw.axis_symbols)
        if isinstance(both, str):
            sequence, plans = both, [batch]  # the batch alone stays resizable
        else:
            plans = [both]
    for plan in plans:
        apply(lw.fb, plan)
    for spec, index in [*zip(io_inputs, lw.fb.inputs), *zip(io_outputs, lw.fb.outputs)]:
        signature = lw.fb.tensors[index].signature
        if signature is not None:
            spec["shape_signature"] = list(signature)
    kinds = {"float16" for t in lw.fb.tensors if t.half} | \
        {"int8" for t in lw.fb.tensors if t.quant is not None and t.data is not None}
    custom = sorted({o.custom for o in lw.fb.operators if o.custom is not None})
    data = lw.fb.finish([i["name"] for i in io_inputs], [o["name"] for o in io_outputs])
    ops = Counter(o.code for o in lw.fb.operators)
    return Lowered(data, dict(sorted(ops.items())),
                   {"inside": lw.transposes["inside"], "boundary": lw.transposes["boundary"]},
                   io_inputs, io_outputs, " + ".join(sorted(kinds)) or "float32",
                   _compute(lw.fb),
                   resizable_batch=isinstance(batch, Plan),
                   static_reason=batch if isinstance(batch, str) else None,
                   resizable_sequence=isinstance(sequence, Plan),
                   sequence_static_reason=sequence if isinstance(sequence, str) else None,
                   custom_ops=custom)


def _compute(fb) -> str:
    """What the operators compute in: "int8" (full-integer: float32 only in the inputs'
    QUANTIZE, the TRANSPOSE/RESHAPE moving an input before it, and the outputs'
    DEQUANTIZE), "int8 + float32" (other float32 operators beside int8 kernels) or
    "float32"."""
    int8 = floats = False
    for o in fb.operators:
        out = o.outputs[0]
        if fb.tensors[out].dtype == np.int8:
            int8 = int8 or o.code not in ("QUANTIZE", "RESHAPE", "TRANSPOSE")
        elif fb.tensors[out].dtype == np.float32 and not (
                o.code == "DEQUANTIZE" and out in fb.outputs or
                o.code in ("TRANSPOSE", "RESHAPE") and o.inputs[0] in fb.inputs):
            floats = True
    return ("int8 + float32" if floats else "int8") if int8 else "float32"


def _build(proto: onnx.ModelProto, nhwc_io: bool, int8_io: bool,
           sequence: list[tuple[str, int, str | None]] = (),
           symbols: dict[str, list[str | None]] | None = None, allow_custom: bool = False
           ) -> tuple["Lowering", list[dict], list[dict]]:
    """The lowering of ``proto`` before packing, and its input and output specs;
    ``sequence``: ``Lowering.sequence``; ``symbols``, ``allow_custom``: ``lower_graph``'s."""
    from graphopt.targets.tflite_ops import HANDLERS, fold_constant_node, prefix_gather
    from graphopt.targets.tflite_quant import lower_int8
    from graphopt.targets.tflite_unmapped import check_mapped, custom_op

    custom = check_mapped(proto, allow_custom)
    lw = Lowering(proto)
    lw.int8_io = int8_io
    lw.sequence = list(sequence)
    initializers = {i.name for i in proto.graph.initializer}
    io_inputs = []
    for inp in proto.graph.input:
        if inp.name in initializers:
            continue
        shape, dtype = lw.onnx_info(inp.name)
        perm = NHWC if nhwc_io and len(shape) == 4 else identity(len(shape))
        index = lw.add_input(inp.name, perm)
        named = (symbols or {}).get(inp.name)
        if named and len(named) == len(perm):
            lw.axis_symbols[index] = [named[p] for p in perm]
        io_inputs.append({"name": inp.name, "shape": [shape[p] for p in perm],
                          "dtype": dtype.name, "layout": _layout(perm)})
    for node in proto.graph.node:
        if id(node) in lw.skipped:
            continue
        try:
            if tuple(node.output) in custom:
                custom_op(lw, node)
            elif not prefix_gather(lw, node) and not fold_constant_node(lw, node) and \
                    not lower_int8(lw, node):
                HANDLERS[node.op_type](lw, node)
        except Unmappable as exc:
            raise UsageError(f"op {node.op_type} (node {node.name or node.output[0]!r}) has "
                             f"no TFLite mapping here: {exc}",
                             hint="the litert target lowers the ops listed in its "
                                  "capabilities") from None
    io_outputs = []
    before = Counter(lw.transposes)
    for out in proto.graph.output:
        value = lw.value(out.name)
        if value.const is not None or lw.is_input(out.name):
            raise UsageError(f"graph output {out.name!r} is a constant or an input; a "
                             f".tflite output must be computed")
        perm = NHWC if nhwc_io and len(value.shape) == 4 else identity(len(value.shape))
        with lw.int8() if int8_io and value.quant is not None else contextlib.nullcontext():
            index = lw.get(out.name, perm)
        lw.fb.rename(index, out.name)
        lw.fb.outputs.append(index)
        io_outputs.append({"name": out.name, "shape": list(lw.fb.tensors[index].shape),
                           "dtype": value.dtype.name, "layout": _layout(perm),
                           **_quantization(lw.fb.tensors[index])})
    for spec, index in zip(io_inputs, lw.fb.inputs):  # int8 inputs (int8_io)
        spec.update(_quantization(lw.fb.tensors[index]))
    # Conversions made for the outputs are boundary ones, wherever their source was.
    moved = lw.transposes["inside"] - before["inside"]
    lw.transposes["inside"] -= moved
    lw.transposes["boundary"] += moved
    return lw, io_inputs, io_outputs


def _grown(proto: onnx.ModelProto, larger: onnx.ModelProto,
           symbols: dict[str, list[str | None]]) -> list[tuple[str, int, str | None]]:
    """The (input, axis, its symbol) at which ``larger`` binds a larger size than
    ``proto``."""
    def dims(model):
        return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in model.graph.input}

    def symbol(name: str, axis: int) -> str | None:
        named = symbols.get(name) or []
        return named[axis] if axis < len(named) else None

    small = dims(proto)
    return [(name, axis, symbol(name, axis)) for name, shape in dims(larger).items()
            for axis, size in enumerate(shape) if size != small[name][axis]]


def _quantization(tensor) -> dict:
    """The manifest's description of an int8 model input or output (none for float)."""
    if tensor.quant is None:
        return {}
    return {"dtype": "int8", "quantization": {"scale": float(tensor.quant[0]),
                                              "zero_point": int(tensor.quant[1])}}


def _layout(perm: tuple[int, ...]) -> str:
    return "NHWC" if perm == NHWC else "as ONNX"
