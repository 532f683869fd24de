"""The IR: an ONNX model held as an onnx-graphsurgeon graph plus the model-level fields
graphsurgeon does not carry (metadata, doc string, domain, model version).

Loading validates the input and turns every way it can be broken into a ``ModelError``
naming the problem; saving is atomic and switches to external data when the model would
not fit in a single protobuf (2 GB) or when asked.

Large weights of a model loaded with external data stay in their file
(``graphopt.external_data``): constants are memory-mapped on demand, exported protos
hold references to the file's byte ranges, and saving copies those ranges.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx_graphsurgeon.importers.onnx_importer import (get_onnx_tensor_dtype,
                                                        get_onnx_tensor_shape,
                                                        get_onnx_tensor_type)
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues
from onnx_graphsurgeon.util.exception import OnnxGraphSurgeonException

from graphopt import data_files, external_data, stand_ins
from graphopt.data_files import copy_field
from graphopt.errors import ModelError
from graphopt.symbolic import shapes as symbolic_shapes
from graphopt.external_data import all_graphs as _all_graphs
from graphopt.external_data import all_nodes as _all_nodes  # noqa: F401 - model_check
from graphopt.external_data import all_tensors as _all_tensors
from graphopt.external_data import HeldValues, held
from graphopt.external_data import model_files, saved_files  # noqa: F401 - part of the API
from graphopt.walk import constants, tensor_map, with_subgraphs
from graphopt.walk import subgraphs as _subgraphs

PROTOBUF_LIMIT = 2**31 - 1
# Models whose tensors add up to more than this are saved with external data (and their
# exports keep references to it, see ``Model.to_onnx``). The environment variable
# GRAPHOPT_EXTERNAL_DATA_THRESHOLD (bytes) overrides it, e.g. to try the large-model
# path on a small model.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26

ModelSource = Union[str, os.PathLike, bytes, onnx.ModelProto, "Model"]


@dataclass
class Model:
    """An ONNX model under optimization.

    ``graph`` is the onnx-graphsurgeon graph passes edit; ``meta`` holds the model-level
    fields of the original proto (its graph is left empty).
    """

    graph: gs.Graph
    meta: onnx.ModelProto = field(default_factory=onnx.ModelProto)
    # Initializers that are also graph inputs (IR version >= 4): defaults a caller may
    # override, so they are graph inputs (gs.Variable) here and become initializers again
    # on export. Passes therefore never fold or merge them.
    input_defaults: dict[str, np.ndarray] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_proto(cls, proto: onnx.ModelProto) -> "Model":
        meta = onnx.ModelProto()
        for descriptor, value in proto.ListFields():
            if descriptor.name not in ("graph", "functions"):
                copy_field(meta, descriptor, value)
        try:
            graph = gs.import_onnx(proto)
        except Exception as exc:  # graphsurgeon raises bare exceptions on malformed graphs
            raise ModelError(f"cannot import the model graph: {exc}") from exc
        if any(g.sparse_initializer for g in _all_graphs(proto.graph)):
            _fix_sparse_values(graph)
        external_data.wrap(graph)
        defaults = {}
        if proto.ir_version >= 4:
            initializers = {t.name for t in proto.graph.initializer}
            listed = [v.name for v in proto.graph.input if v.name in initializers]
            defaults = _initializers_to_inputs(graph, proto, listed)
        return cls(graph=graph, meta=meta, input_defaults=defaults)

    def to_onnx(self, references: bool | None = None) -> onnx.ModelProto:
        """Export to a ``ModelProto`` (nodes in topological order).

        Weights still in their external-data file (a model loaded with external data)
        are exported as references to it when ``references`` is true, or when ``None``
        and the model is too large for one protobuf (as ``save`` decides): ONNX Runtime
        sessions of ``graphopt.verify``, checks, shape inference and ``save`` take them,
        ``onnx.numpy_helper`` does not. Otherwise their bytes are read into the proto."""
        toposort(self.graph)
        _pack_subbyte_constants(self.graph)
        external_data.unwrap(self.graph)
        # values held as bytes: exported without them, put in place at the end
        bytes_held = {}
        for g in self.all_graphs():
            for const in tensor_map(g).values():
                values = getattr(const, "_values", None)
                if type(values) is HeldValues and const.name not in bytes_held:
                    bytes_held[const.name] = (const, values)
                    const._values = LazyValues(values.placeholder(const.name))  # noqa: SLF001
        try:
            proto = gs.export_onnx(self.graph, do_type_check=False)
        finally:
            for const, values in bytes_held.values():
                const._values = values  # noqa: SLF001
        for name in ("domain", "model_version", "doc_string", "producer_name", "producer_version"):
            if getattr(self.meta, name) and not getattr(proto, name):
                setattr(proto, name, getattr(self.meta, name))
        if self.graph.ir_version is None and self.meta.ir_version:
            proto.ir_version = self.meta.ir_version
        proto.metadata_props.extend(self.meta.metadata_props)
        self._restore_initializer_inputs(proto)
        _drop_outer_initializers(proto.graph, set())
        _hoist_shared_initializers(proto.graph)
        if bytes_held:
            for tensor in external_data.initializers(proto):
                if tensor.name in bytes_held and not tensor.HasField("raw_data"):
                    tensor.raw_data = bytes_held[tensor.name][1].data
        if not references and external_data.has_references(proto) and \
                (references is not None or weight_bytes(proto) <= external_threshold()):
            external_data.materialize(proto)
        return proto

    def _restore_initializer_inputs(self, proto: onnx.ModelProto) -> None:
        inputs = {v.name for v in proto.graph.input}
        for name, value in self.input_defaults.items():
            if name in inputs:
                proto.graph.initializer.append(external_data.tensor_proto(value, name))
        if proto.ir_version < 4:  # every initializer must also be listed as an input
            for tensor in proto.graph.initializer:
                if tensor.name not in inputs:
                    proto.graph.input.append(onnx.helper.make_tensor_value_info(
                        tensor.name, tensor.data_type, list(tensor.dims)))

    def clone(self) -> "Model":
        return Model.from_proto(self.to_onnx(references=True))

    # ------------------------------------------------------------------ properties
    @property
    def opset(self) -> int:
        """Version of the default (ai.onnx) domain."""
        return self.opset_imports.get("", self.graph.opset)

    @property
    def opset_imports(self) -> dict[str, int]:
        domains = self.graph.import_domains or [onnx.helper.make_opsetid("", self.graph.opset)]
        return {("" if d.domain == "ai.onnx" else d.domain): d.version for d in domains}

    def require_opset(self, domain: str, version: int = 1) -> None:
        """Make sure ``domain`` is imported (a pass that emits its ops calls this)."""
        if domain in self.opset_imports:
            return
        if self.graph.import_domains is None:
            self.graph.import_domains = [onnx.helper.make_opsetid("", self.graph.opset)]
        self.graph.import_domains.append(onnx.helper.make_opsetid(domain, version))

    def all_graphs(self) -> Iterator[gs.Graph]:
        """The main graph, then every subgraph (If/Loop/Scan bodies), recursively, each
        before its own subgraphs. (A walk of the node attributes: onnx-graphsurgeon's
        ``subgraphs`` costs some microseconds a node, and passes ask often.)"""
        yield self.graph
        yield from _subgraphs(self.graph)

    def num_nodes(self) -> int:
        return sum(len(g.nodes) for g in self.all_graphs())

    def num_params(self) -> int:
        return sum(math.prod(t.shape) for t in self.initializers())

    def initializers(self) -> list[gs.Constant]:
        return constants(self.graph)

    def content_hash(self) -> str:
        """SHA-256 of the model's deterministic serialization (works above 2 GB)."""
        return proto_hash(self.to_onnx(references=True))

    # ------------------------------------------------------------------ analysis
    def infer_shapes(self, symbolic: bool = False) -> None:
        """Run ONNX shape inference (with data propagation) and adopt its results.

        ``symbolic=True`` adds ONNX Runtime's symbolic shape inference, which follows
        shape arithmetic (Shape→Gather→Concat→Reshape) that ONNX's own inference loses.
        Raises ``ModelError`` when inference fails: a failure is never swallowed.
        """
        self.adopt_types(infer_shapes(self.to_onnx(references=True), symbolic=symbolic))

    def adopt_types(self, proto: onnx.ModelProto) -> None:
        """Take the types and shapes of ``proto`` (this model's own export, after shape
        inference) onto the graph's variables, in place: what importing it again would
        give them, at a fraction of the cost (the import builds every node anew)."""
        infos: dict[str, onnx.ValueInfoProto] = {}
        for g in _all_graphs(proto.graph):
            for vi in (*g.input, *g.value_info, *g.output):
                if vi.type.ByteSize() > 0:  # (as the importer: an empty type says nothing)
                    infos.setdefault(vi.name, vi)
        for g in self.all_graphs():
            for tensor in tensor_map(g).values():
                info = infos.get(tensor.name)
                if info is None or isinstance(tensor, gs.Constant):
                    continue
                tensor.dtype = get_onnx_tensor_dtype(info)
                tensor.shape = get_onnx_tensor_shape(info)
                tensor.type = get_onnx_tensor_type(info)


class _SparseValues(SparseValues):
    """A sparse initializer's values, densified in its own dtype. onnx-graphsurgeon 0.6's
    ``SparseValues.load`` densifies into float64 and ignores ``raw_data`` (a pass reading
    the constant then made float32 ops see doubles). Exported, the tensor stays sparse."""

    def load(self) -> np.ndarray:
        sparse = self.tensor
        values = onnx.numpy_helper.to_array(sparse.values)
        indices = onnx.numpy_helper.to_array(sparse.indices).astype(np.int64)
        dims = tuple(int(d) for d in sparse.dims)
        dense = np.zeros(int(np.prod(dims)), dtype=values.dtype)
        if indices.ndim == 2:  # [NNZ, rank] coordinates
            indices = np.ravel_multi_index(tuple(indices.T), dims)
        dense[indices.reshape(-1)] = values.reshape(-1)
        return dense.reshape(dims)


def _fix_sparse_values(graph: gs.Graph) -> None:
    for g in with_subgraphs(graph):
        for tensor in tensor_map(g).values():
            if isinstance(tensor, gs.Constant) and \
                    type(tensor._values) is SparseValues:  # noqa: SLF001 - no public access
                tensor._values = _SparseValues(tensor._values.tensor)  # noqa: SLF001


# 4-bit element types: numpy (ml_dtypes) holds one value a byte, ONNX packs two.
_SUBBYTE_TYPES = frozenset({"int4", "uint4", "float4_e2m1fn"})


def _pack_subbyte_constants(graph: gs.Graph) -> None:
    """Hand onnx-graphsurgeon the packed TensorProto of every 4-bit constant whose values
    were loaded (by any pass reading ``.values``): gs 0.6 would export the loaded array's
    unpacked bytes, which ONNX rejects ("Raw data size does not match")."""
    for g in with_subgraphs(graph):
        for tensor in tensor_map(g).values():
            if not isinstance(tensor, gs.Constant) or \
                    isinstance(tensor._values, LazyValues):  # noqa: SLF001 - no public test
                continue
            if np.dtype(tensor.dtype).name in _SUBBYTE_TYPES:
                tensor.values = LazyValues(onnx.numpy_helper.from_array(
                    np.asarray(tensor.values), tensor.name))


def infer_shapes(proto: onnx.ModelProto, strict: bool = False,
                 symbolic: bool = False) -> onnx.ModelProto:
    """Shape-infer ``proto`` and return it with the inferred ``value_info`` (in place).

    Inference runs on the model's skeleton (large weights turned into typed inputs), so
    its cost does not grow with the weights and models over 2 GB need no temporary file.
    ``symbolic=True`` adds ONNX Runtime's symbolic shape inference.
    """
    light = skeleton(proto)
    stand_ins.apply(list(_all_graphs(light.graph)))
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=strict,
                                                     data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise ModelError(f"shape inference failed: {_first_line(exc)}") from exc
    if symbolic:
        inferred = symbolic_shapes(inferred)
    for full, skel in zip(_all_graphs(proto.graph), _all_graphs(inferred.graph)):
        del full.value_info[:]
        full.value_info.extend(skel.value_info)
        for out, inferred_out in zip(full.output, skel.output):
            out.type.CopyFrom(inferred_out.type)
    return proto


def skeleton(proto: onnx.ModelProto, max_elements: int = 1024) -> onnx.ModelProto:
    """A copy of ``proto`` whose main-graph initializers of more than ``max_elements``
    values (and references to external data, a subgraph's too) are typed graph inputs
    instead: same structure and shapes, almost no bytes. Checking and shape inference
    need nothing more (small tensors such as shapes keep their values), and the heavy
    bytes are never copied or serialized."""
    light = onnx.ModelProto()
    _copy_fields(proto, light, skip="graph")
    _copy_fields(proto.graph, light.graph, skip="initializer")
    listed = {v.name for v in proto.graph.input}
    for tensor in proto.graph.initializer:
        if math.prod(tensor.dims) <= max_elements and external_data.extent(tensor) is None:
            light.graph.initializer.append(tensor)
        elif tensor.name not in listed:
            light.graph.input.append(onnx.helper.make_tensor_value_info(
                tensor.name, tensor.data_type, list(tensor.dims)))
    for sub in list(_all_graphs(light.graph))[1:]:  # a subgraph's references: outer inputs
        keep = [t for t in sub.initializer if external_data.extent(t) is None]
        if len(keep) < len(sub.initializer):
            light.graph.input.extend(onnx.helper.make_tensor_value_info(
                t.name, t.data_type, list(t.dims)) for t in sub.initializer
                if external_data.extent(t) is not None)
            del sub.initializer[:]
            sub.initializer.extend(keep)
    return light


def _copy_fields(src, dst, skip: str) -> None:
    for descriptor, value in src.ListFields():
        if descriptor.name != skip:
            copy_field(dst, descriptor, value)


def proto_hash(proto: onnx.ModelProto) -> str:
    """SHA-256 over the model: each tensor's values hashed apart (so size does not
    matter; a weight still in its external-data file hashes as if inline, read once)."""
    digest = hashlib.sha256()
    stripped = onnx.ModelProto()
    stripped.CopyFrom(proto)
    for tensor in _all_tensors(stripped):
        digest.update(tensor.name.encode())
        digest.update(external_data.tensor_digest(tensor))
        for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                     "uint64_data", "string_data", "external_data", "data_location"):
            tensor.ClearField(name)
    digest.update(stripped.SerializeToString(deterministic=True))
    return digest.hexdigest()


def _drop_outer_initializers(graph: onnx.GraphProto, outer: set[str]) -> None:
    """graphsurgeon exports a constant read inside a subgraph into that subgraph's
    initializers too; keep only the outermost copy (the subgraph sees it by scope)."""
    keep = [t for t in graph.initializer if t.name not in outer]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
    visible = outer | {t.name for t in graph.initializer}
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs):
                _drop_outer_initializers(sub, visible)


def _hoist_shared_initializers(main: onnx.GraphProto) -> None:
    """A constant read by several sibling subgraphs is exported into each of them; store
    it once, in the main graph, when every copy is the same tensor."""
    copies: dict[str, list[tuple[onnx.GraphProto, onnx.TensorProto]]] = {}
    for graph in _all_graphs(main):
        if graph is not main:
            for tensor in graph.initializer:
                copies.setdefault(tensor.name, []).append((graph, tensor))
    taken = {n for node in main.node for n in node.output} | {v.name for v in main.input}
    for name, places in copies.items():
        first = places[0][1].SerializeToString()
        if len(places) < 2 or name in taken or \
                any(t.SerializeToString() != first for _, t in places[1:]):
            continue
        main.initializer.append(places[0][1])
        for graph, _ in places:
            keep = [t for t in graph.initializer if t.name != name]
            del graph.initializer[:]
            graph.initializer.extend(keep)


def _initializers_to_inputs(graph: gs.Graph, proto: onnx.ModelProto,
                            names: list[str]) -> dict[str, np.ndarray]:
    """Turn initializers that are also graph inputs into real graph inputs, in the
    original input order, and return their default values."""
    if not names:
        return {}
    tensors = graph.tensors()
    defaults, variables = {}, {t.name: t for t in graph.inputs}
    for name in names:
        value = np.asarray(tensors[name].values) if name in tensors else \
            onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == name))
        defaults[name] = value
        variables[name] = gs.Variable(name, dtype=value.dtype, shape=list(value.shape))
        if name in tensors:
            for node in list(tensors[name].outputs):
                for i, tensor in enumerate(node.inputs):
                    if tensor is tensors[name]:
                        node.inputs[i] = variables[name]
    graph.inputs = [variables[v.name] for v in proto.graph.input if v.name in variables]
    return defaults


# ---------------------------------------------------------------------- loading
def load(source: ModelSource) -> Model:
    """Load and validate a model from a path, bytes, a ``ModelProto`` or a ``Model``."""
    if isinstance(source, Model):
        return source.clone()
    if isinstance(source, onnx.ModelProto):
        proto = source  # (not modified: read by _borrowed below)
        base_dir = None
    elif isinstance(source, (bytes, bytearray)):
        proto = _parse(bytes(source), "<bytes>")
        base_dir = None
    else:
        if "\0" in os.fspath(source):
            raise ModelError(f"{os.fspath(source)!r}: not a valid path (NUL byte)")
        path = Path(source)
        if not path.exists():
            raise ModelError(f"{path}: no such file")
        if not path.is_file():
            raise ModelError(f"{path}: not a file" + (" (a folder)" if path.is_dir() else ""),
                             hint="give the path of an .onnx file")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelError(f"{path}: cannot read it ({exc.strerror or exc})",
                             hint="check the file's permissions") from exc
        proto = _parse(data, str(path))
        base_dir = path.resolve().parent
    from graphopt.model_check import load_external_data, validate  # it imports this module

    try:
        proto, borrowed = _borrowed(proto)
        load_external_data(proto, base_dir)
        validate(proto, unchecked=frozenset(borrowed))
        model = Model.from_proto(proto)
        for const in model.initializers():
            if const.name in borrowed and isinstance(const._values, LazyValues):  # noqa: SLF001
                const._values = borrowed[const.name]  # noqa: SLF001
        return model
    except UnicodeError as exc:  # protobuf's proto2 strings are bytes until read
        raise ModelError(f"invalid ONNX model: a name or text in it is not UTF-8 ({exc})",
                         hint="the file may be damaged") from exc


# Initializers of this many bytes or more are read out of the loaded protobuf once
# (``_borrowed``), as large as those the spill moves into its file.
BORROW_BYTES = external_data.MIN_MAPPED_BYTES
# (the types numpy and onnx-graphsurgeon both read as themselves: gs loads bfloat16 and
# the float8s as float32, and a load must not change what a pass reads)
_BORROWABLE = {getattr(onnx.TensorProto, name): np.dtype(kind) for name, kind in (
    ("FLOAT", np.float32), ("DOUBLE", np.float64), ("FLOAT16", np.float16),
    ("INT8", np.int8), ("UINT8", np.uint8), ("INT16", np.int16), ("UINT16", np.uint16),
    ("INT32", np.int32), ("UINT32", np.uint32), ("INT64", np.int64), ("UINT64", np.uint64))}


def _borrowed(source: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, HeldValues]]:
    """A copy of ``source`` (left as it was) whose main-graph initializers of
    ``BORROW_BYTES`` or more in ``raw_data`` keep only their name, type and shape, and
    those initializers' values, held as their bytes, read once. Copying
    the whole protobuf copies every weight, and the checks and the spill would each read
    them again (each read of ``raw_data`` copies it): 20 ms of a ResNet-18 load. A
    tensor whose bytes do not fit its type and shape is refused here, as ``validate``
    would."""
    proto = onnx.ModelProto()
    _copy_fields(source, proto, skip="graph")
    _copy_fields(source.graph, proto.graph, skip="initializer")
    listed = {v.name for v in source.graph.input}  # (defaults: stay initializers)
    borrowed: dict[str, HeldValues] = {}
    for tensor in source.graph.initializer:
        dtype = _BORROWABLE.get(tensor.data_type)
        size = None if dtype is None else math.prod(tensor.dims) * dtype.itemsize
        if size is None or size < BORROW_BYTES or tensor.name in listed or \
                tensor.name in borrowed or not tensor.HasField("raw_data") or \
                tensor.external_data or tensor.data_location == onnx.TensorProto.EXTERNAL:
            proto.graph.initializer.append(tensor)
            continue
        data = tensor.raw_data
        if len(data) != size:
            raise ModelError(
                f"tensor {tensor.name!r} holds {len(data)} bytes, but "
                f"{onnx.TensorProto.DataType.Name(tensor.data_type)} of shape "
                f"{list(tensor.dims)} takes {size}",
                hint="its data_type or shape does not match its data (corrupt model?)")
        header = proto.graph.initializer.add(name=tensor.name, data_type=tensor.data_type)
        header.dims.extend(tensor.dims)
        borrowed[tensor.name] = held(tensor, data)
    return proto, borrowed


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError as exc:
        raise ModelError(f"{where}: not a readable ONNX file ({exc})",
                         hint="the file may be truncated or not an ONNX model") from exc
    if not proto.HasField("graph"):
        raise ModelError(f"{where}: not an ONNX model (no graph found)",
                         hint="the file may be truncated or not an ONNX model")
    return proto


# ---------------------------------------------------------------------- saving
def save(model: Model | onnx.ModelProto, path: str | os.PathLike,
         external_data: bool | None = None) -> Path:
    """Write atomically. ``external_data=None`` decides by size (2 GB protobuf limit,
    ``external_threshold``).

    External data goes to ``<name>.data`` beside the model: tensors of 1 kB or more, the
    ones still in the input's data file copied from it by byte range. Files appear only
    when fully written: they are written to a temporary folder next to the target and
    moved in. A ``ModelProto`` given is left as it was.
    """
    proto = model.to_onnx(references=True) if isinstance(model, Model) else model
    path = Path(path)
    if external_data is None:
        external_data = weight_bytes(proto) > external_threshold()
    path.parent.mkdir(parents=True, exist_ok=True)
    # A short temporary name: the final name may already be as long as names can be.
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".go-") as tmp:
        tmp_path = Path(tmp) / path.name
        if external_data:
            data_name = path.name + ".data"
            data_files.write(proto, tmp_path, Path(tmp) / data_name)
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        else:  # (references read in from their files as it is written)
            data_files.write_inline(proto, tmp_path)
        os.replace(tmp_path, path)
    return path


def external_threshold() -> int:
    """Bytes of tensors above which models are saved with external data."""
    value = os.environ.get("GRAPHOPT_EXTERNAL_DATA_THRESHOLD", "").strip()
    return int(value) if value.isdigit() else EXTERNAL_DATA_THRESHOLD


# ---------------------------------------------------------------------- helpers
def fits_in_protobuf(proto: onnx.ModelProto) -> bool:
    """Whether ``proto`` serializes under the 2 GB limit (estimated from tensor sizes,
    which is far cheaper than ``ByteSize`` on a large model; references to external
    data take no room)."""
    inline = weight_bytes(proto) - external_data.referenced_bytes(proto)
    return inline < PROTOBUF_LIMIT - 2**26


def weight_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of all tensors of ``proto`` (initializers, attribute tensors), by their
    shapes: references count as much as inline data."""
    total = 0
    for tensor in _all_tensors(proto):
        count = math.prod(tensor.dims)
        total += count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return total


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def toposort(graph: gs.Graph, recurse_subgraphs: bool = True) -> gs.Graph:
    """``graph.toposort()`` in the order onnx-graphsurgeon gives (nodes stably sorted by
    their depth, in the post-order of a walk of their producers), in time linear in the
    graph where it has no subgraphs or functions: onnx-graphsurgeon's own walks every
    node's subgraphs for every node it visits (0.6 s of a MiniLM optimize run)."""
    if graph.functions or next(_subgraphs(graph), None) is not None:
        return graph.toposort(recurse_subgraphs=recurse_subgraphs)
    nodes = graph.nodes
    present = {id(n) for n in nodes}

    def producers(node: gs.Node) -> list[gs.Node]:
        found: dict[int, gs.Node] = {}
        for tensor in node.inputs:
            for producer in tensor.inputs:
                if id(producer) in present:
                    found.setdefault(id(producer), producer)
        return list(found.values())

    level: dict[int, int] = {}
    order: list[gs.Node] = []
    for root in nodes:
        if id(root) in level:
            continue
        inputs = producers(root)
        stack, walking = [(root, inputs, iter(inputs))], {id(root)}
        while stack:
            node, inputs, pending = stack[-1]
            for producer in pending:
                if id(producer) in level:
                    continue
                if id(producer) in walking:
                    raise OnnxGraphSurgeonException(
                        "Cycle detected in graph! Are there tensors with duplicate names "
                        "in the graph?")
                walking.add(id(producer))
                below = producers(producer)
                stack.append((producer, below, iter(below)))
                break
            else:
                stack.pop()
                walking.discard(id(node))
                level[id(node)] = 1 + max((level[id(p)] for p in inputs), default=-1)
                order.append(node)
    graph.nodes = sorted(order, key=lambda n: level[id(n)])
    return graph
