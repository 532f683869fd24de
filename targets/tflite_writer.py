"""A ``.tflite`` flatbuffer built from numpy, with no TensorFlow: tensors, constant
buffers, builtin operators, one subgraph and a signature.

The schema's object API (``ModelT``, ``SubGraphT``, ``OperatorT``, ... packed with
``flatbuffers``) ships in the ``ai-edge-litert`` wheel as ``schema_py_generated``; this
module only decides what goes into those objects, so every target that writes a
``.tflite`` (LiteRT on phones, TFLite Micro on microcontrollers) shares it. What the
graph means is ``graphopt.targets.tflite_lower``'s business.
"""

from __future__ import annotations

import importlib
import mmap
from dataclasses import dataclass, field

import numpy as np

from graphopt.errors import UsageError
from graphopt.external_data import drop_pages

SCHEMA_VERSION = 3
FILE_IDENTIFIER = b"TFL3"
# FlatBuffers address with signed 32-bit offsets; leave room for the graph around the data.
FLATBUFFER_LIMIT = 2**31 - 2**26
INSTALL_HINT = "pip install 'graphopt[litert]'  (the ai-edge-litert wheel, no TensorFlow)"


def schema():
    """The TFLite schema's Python object API, from the ``ai-edge-litert`` wheel."""
    try:
        return importlib.import_module("ai_edge_litert.schema_py_generated")
    except ImportError as exc:
        raise UsageError(f"writing .tflite needs the ai-edge-litert package ({exc})",
                         hint=INSTALL_HINT) from None


# numpy dtype -> TensorType member name
TENSOR_TYPES = {
    np.dtype(np.float32): "FLOAT32", np.dtype(np.float16): "FLOAT16",
    np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64", np.dtype(np.int8): "INT8",
    np.dtype(np.uint8): "UINT8", np.dtype(np.bool_): "BOOL", np.dtype(np.int16): "INT16",
}


@dataclass
class Tensor:
    """One tensor of the subgraph as the builder holds it until ``finish``."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    data: np.ndarray | None = None  # constants only
    half: bool = False  # a float32 constant stored as float16 (see _dequantize_half)
    # int8 codes: (scales, zero point(s)[, quantized dimension: 0 unless given]); one
    # scale per tensor, or one per slice along that dimension (per-channel weights)
    quant: tuple | None = None
    # with -1 where the interpreter may resize (a batch: ``tflite_dynamic``); None: static
    signature: tuple[int, ...] | None = None


@dataclass
class Operator:
    code: str  # BuiltinOperator member name
    inputs: list[int]
    outputs: list[int]
    options: object | None = None  # a *OptionsT object of the schema
    version: int = 1
    custom: str | None = None  # a CUSTOM operator's custom code (``code`` is "CUSTOM")
    custom_options: bytes = b""  # its options, a FlexBuffer


@dataclass
class FlatbufferBuilder:
    """Collects one subgraph; ``finish`` packs it into ``.tflite`` bytes."""

    description: str = "graphopt"
    tensors: list[Tensor] = field(default_factory=list)
    operators: list[Operator] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    _names: set[str] = field(default_factory=set)

    def tensor(self, name: str, shape, dtype, data: np.ndarray | None = None,
               half: bool = False, quant=None) -> int:
        """Add a tensor (a constant when ``data`` is given); names are made unique."""
        dtype = np.dtype(dtype)
        if dtype not in TENSOR_TYPES:
            raise UsageError(f"tensor {name!r}: TFLite has no {dtype} tensors")
        name = self._unique(name)
        if data is not None:
            data = _contiguous(data, dtype)
            shape = data.shape
        self.tensors.append(Tensor(name, tuple(int(d) for d in shape), dtype, data,
                                   half and data is not None and dtype == np.float32, quant))
        return len(self.tensors) - 1

    def rename(self, index: int, name: str) -> None:
        """Give tensor ``index`` the name ``name`` (a model input or output keeps the ONNX
        name); a tensor already holding it gets a unique variant."""
        for other in self.tensors:
            if other.name == name and other is not self.tensors[index]:
                other.name = self._unique(f"{name}:inner")
        self._names.discard(self.tensors[index].name)
        self.tensors[index].name = name
        self._names.add(name)

    def _unique(self, name: str) -> str:
        base, n = name, 1
        while name in self._names:
            name, n = f"{base}_{n}", n + 1
        self._names.add(name)
        return name

    def constant(self, name: str, value, half: bool = False, quant=None) -> int:
        """A constant tensor; ``half``: stored as float16 and dequantized to float32 by
        the runtime (float16 weights: half the file, float32 compute); ``quant``: int8
        codes with ``(per-channel scales, zero point)``."""
        return self.tensor(name, np.shape(value), np.asarray(value).dtype, np.asarray(value),
                           half=half, quant=quant)

    def op(self, code: str, inputs: list[int], outputs: list[int], options=None,
           version: int = 1) -> None:
        self.operators.append(Operator(code, list(inputs), list(outputs), options, version))

    def custom_op(self, custom: str, inputs: list[int], outputs: list[int],
                  custom_options: bytes = b"") -> None:
        """A CUSTOM operator: ``custom`` names the kernel an application registers."""
        self.operators.append(Operator("CUSTOM", list(inputs), list(outputs), custom=custom,
                                       custom_options=custom_options))

    # ------------------------------------------------------------------ packing
    def finish(self, input_names: list[str], output_names: list[str]) -> memoryview:
        """The model as ``.tflite`` bytes, with a ``serving_default`` signature whose keys
        are ``input_names``/``output_names`` (the ONNX model's names). The constants'
        data moves into the bytes (each tensor's ``data`` is ``None`` after): a large
        model's weights are then in memory once and the flatbuffer once, not twice."""
        import flatbuffers

        s = schema()
        self._dequantize_half()
        weights = sum(t.data.nbytes for t in self.tensors if t.data is not None)
        if weights > FLATBUFFER_LIMIT:
            raise UsageError(f"the model's {weights / 2**30:.2f} GiB of weights do not fit "
                             f"in one .tflite flatbuffer (2 GiB at most)",
                             hint="shrink it first (--quantize fp16 halves the weights)")
        model = s.ModelT()
        model.version = SCHEMA_VERSION
        model.description = self.description
        model.buffers = [s.BufferT()]  # buffer 0: the empty buffer of non-constants
        codes: dict[tuple[str, int], int] = {}
        model.operatorCodes = []
        sub = s.SubGraphT()
        sub.name = "main"
        sub.tensors = []
        for t in self.tensors:
            tt = s.TensorT()
            tt.name = t.name
            tt.shape = list(t.shape)
            if t.signature is not None:
                tt.shapeSignature = list(t.signature)
            tt.type = getattr(s.TensorType, TENSOR_TYPES[t.dtype])
            tt.buffer = 0
            if t.quant is not None:
                scales, zero, *dim = t.quant
                qp = s.QuantizationParametersT()
                qp.scale = [float(v) for v in np.asarray(scales).reshape(-1)]
                qp.zeroPoint = [int(z) for z in np.broadcast_to(zero, len(qp.scale))]
                qp.quantizedDimension = dim[0] if dim else 0
                tt.quantization = qp
            if t.data is not None:
                # The constant itself, not a copy of its bytes, and the builder lets go of
                # it: each is freed once packed, so the weights are not held in three
                # forms (constants, bytes, flatbuffer) at the end, nor in two throughout.
                model.buffers.append(_PackedOnce(t.data))
                t.data = None
                tt.buffer = len(model.buffers) - 1
            sub.tensors.append(tt)
        sub.operators = []
        for o in self.operators:
            builtin = getattr(s.BuiltinOperator, o.code)
            key = (o.code, o.version, o.custom)
            if key not in codes:
                oc = s.OperatorCodeT()
                oc.builtinCode = builtin
                # Codes above 127 live only in the newer field; the old one says so.
                oc.deprecatedBuiltinCode = min(
                    builtin, s.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)
                oc.version = o.version
                oc.customCode = o.custom
                codes[key] = len(model.operatorCodes)
                model.operatorCodes.append(oc)
            op = s.OperatorT()
            op.opcodeIndex = codes[key]
            op.inputs, op.outputs = o.inputs, o.outputs
            if o.custom is not None:
                op.customOptions = list(o.custom_options)
                op.customOptionsFormat = s.CustomOptionsFormat.FLEXBUFFERS
            if o.options is not None:
                op.builtinOptionsType = getattr(s.BuiltinOptions,
                                                type(o.options).__name__[:-1])
                op.builtinOptions = o.options
            sub.operators.append(op)
        sub.inputs, sub.outputs = list(self.inputs), list(self.outputs)
        model.subgraphs = [sub]
        model.signatureDefs = [_signature(s, self.inputs, input_names, self.outputs,
                                          output_names)]
        # Sized for the weights up front: growing copies the buffer at each doubling. An
        # anonymous map, not the builder's bytearray: its pages take memory as the
        # constants are packed into them (and let go), where a bytearray is zeroed, so
        # resident, before the first one is.
        size = weights + (1 << 20)
        fb = flatbuffers.Builder(0)
        fb.Bytes, fb.head = mmap.mmap(-1, size), size
        fb.ForceDefaults(False)
        fb.Finish(model.Pack(fb), file_identifier=FILE_IDENTIFIER)
        return memoryview(fb.Bytes)[fb.Head():]  # the finished bytes, not a copy of them


    def _dequantize_half(self) -> None:
        """Each float32 constant marked ``half`` becomes a float16 constant and a
        DEQUANTIZE writing the float32 tensor the operators read: the form LiteRT's own
        converter gives float16 weights, which the runtime (XNNPACK) dequantizes once at
        load, not per run."""
        ops = []
        for index, t in enumerate(list(self.tensors)):
            if not t.half:
                continue
            source = self.tensor(f"{t.name}/fp16", t.shape, np.float16,
                                 t.data.astype(np.float16))
            t.data, t.half = None, False
            ops.append(Operator("DEQUANTIZE", [source], [index], None, version=3))
        self.operators[:0] = ops


def _signature(s, inputs, input_names, outputs, output_names):
    """``serving_default``: LiteRT's signature runner addresses tensors by these keys."""
    sig = s.SignatureDefT()
    sig.signatureKey = "serving_default"
    sig.subgraphIndex = 0
    sig.inputs = [_tensor_map(s, name, index) for index, name in zip(inputs, input_names)]
    sig.outputs = [_tensor_map(s, name, index) for index, name in zip(outputs, output_names)]
    return sig


def _tensor_map(s, name: str, index: int):
    entry = s.TensorMapT()
    entry.name, entry.tensorIndex = name, index
    return entry


def options(name: str, **fields):
    """A builtin options object of the schema (``options("Conv2DOptions", strideW=2)``):
    ``fields`` are the object API's camelCase attributes; an unknown one is an error
    rather than a silently ignored setting."""
    s = schema()
    obj = getattr(s, name + "T")()
    for key, value in fields.items():
        if not hasattr(obj, key):
            raise AttributeError(f"{name} has no field {key!r}")
        setattr(obj, key, value)
    return obj


def enum(kind: str, member: str) -> int:
    """A member of a schema enum (``enum("Padding", "SAME")``)."""
    return getattr(getattr(schema(), kind), member)


def with_metadata(tflite: bytes, entries: dict[str, bytes]) -> bytes:
    """``tflite`` with the model metadata ``entries`` (name -> bytes) added, replacing
    entries of the same name: how a runtime is told things the graph does not say, such
    as TFLite Micro's offline memory plan ("OfflineMemoryAllocation"). Each entry's bytes
    start 16-byte aligned in the file, because readers cast them to int32 arrays."""
    import flatbuffers

    s = schema()
    model = s.ModelT.InitFromPackedBuf(tflite, 0)
    model.buffers = model.buffers or [s.BufferT()]
    model.metadata = [m for m in (model.metadata or [])
                      if _text(m.name) not in entries]
    for name, data in entries.items():
        model.buffers.append(_AlignedBuffer(bytes(data)))
        entry = s.MetadataT()
        entry.name, entry.buffer = name, len(model.buffers) - 1
        model.metadata.append(entry)
    fb = flatbuffers.Builder(len(tflite) + 1024)
    fb.ForceDefaults(False)
    fb.Finish(model.Pack(fb), file_identifier=FILE_IDENTIFIER)
    return bytes(fb.Output())


def metadata(tflite: bytes) -> dict[str, bytes]:
    """The model metadata of ``tflite``: name -> the bytes of its buffer."""
    s = schema()
    model = s.ModelT.InitFromPackedBuf(tflite, 0)
    return {_text(m.name): bytes(np.asarray(model.buffers[m.buffer].data, np.uint8))
            for m in (model.metadata or [])}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# Constants from this size up that need a copy get an anonymous map of their own.
OWN_MAP_BYTES = 1 << 16
# ``finish`` copies a large constant into the flatbuffer this much at a time.
COPY_SLICE_BYTES = 4 << 20


def _contiguous(data, dtype: np.dtype) -> np.ndarray:
    """``np.ascontiguousarray(data, dtype)``; a copy of a large constant (a transposed
    weight) goes into an anonymous map of its own, which is unmapped when the constant
    is freed: in the allocator's heap, the memory of the constants ``finish`` lets go of
    one by one would stay in the process until the last was freed, beside the
    flatbuffer they are packed into."""
    data = np.asarray(data)
    if data.nbytes < OWN_MAP_BYTES or data.ndim == 0 or \
            (data.flags.c_contiguous and data.dtype == dtype):
        return np.ascontiguousarray(data, dtype=dtype)  # (a view when no copy is needed)
    if data.dtype == dtype and not data.flags.writeable:
        # A read-only view (a weight of the data file's map, transposed): nothing can
        # change it, so it stays a view and ``finish`` lays it out as it copies it.
        return data
    out = np.frombuffer(mmap.mmap(-1, data.size * dtype.itemsize), dtype).reshape(data.shape)
    np.copyto(out, data, casting="unsafe")
    return out


class _PackedOnce:
    """A ``BufferT`` of one constant's bytes that lets go of the constant as it is
    packed (the object API would keep every buffer until the whole model is packed)."""

    def __init__(self, data: np.ndarray):
        self.data = data

    def Pack(self, builder):  # noqa: N802 (the schema object API's name)
        """The bytes copied straight into the builder's buffer (a transposed weight
        transposed as it is copied): ``BufferT.Pack`` would make a contiguous copy and
        then ``bytes`` of it, two transient copies of the largest constant (MiniLM's
        47 MB embedding table) at the peak of the write."""
        data, self.data = np.asarray(self.data), None
        s = schema()
        builder.StartVector(1, data.nbytes, 1)
        builder.head = builder.head - data.nbytes
        if data.nbytes:
            into = np.frombuffer(builder.Bytes, np.uint8, data.nbytes,
                                 builder.head).view(data.dtype).reshape(data.shape)
            if data.ndim == 0:
                data, into = data.reshape(1), into.reshape(1)
            # A weight read from the data file's map leaves this process's memory as it
            # is copied: some rows at a time where it is laid out in order, else once it
            # is whole (a transposed view reads its pages throughout).
            rows = max(1, COPY_SLICE_BYTES // data[:1].nbytes) \
                if data.flags.c_contiguous else len(data)
            for start in range(0, len(data), rows):
                np.copyto(into[start:start + rows], data[start:start + rows])
                drop_pages(data[start:start + rows])
        vector = builder.EndVector()
        s.BufferStart(builder)
        s.BufferAddData(builder, vector)
        return s.BufferEnd(builder)


class _AlignedBuffer:
    """A ``BufferT`` whose bytes the builder places at a 16-byte boundary (the object
    API's own ``Pack`` aligns a byte vector to 1)."""

    ALIGN = 16

    def __init__(self, data: bytes):
        self.data = data

    def Pack(self, builder):  # noqa: N802 (the schema object API's name)
        s = schema()
        builder.StartVector(1, len(self.data), self.ALIGN)
        builder.head = builder.head - len(self.data)
        builder.Bytes[builder.head:builder.head + len(self.data)] = self.data
        vector = builder.EndVector()
        s.BufferStart(builder)
        s.BufferAddData(builder, vector)
        return s.BufferEnd(builder)
