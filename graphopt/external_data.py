"""Weights that stay in their external-data file.

A model loaded from a file keeps each large external initializer where it is: its
TensorProto becomes a *reference* (``data_location`` EXTERNAL; ``location`` the data
file's resolved absolute path, checked at load to lie inside the model's folder;
``offset``; ``length``), and no bytes follow it through export, clone, checks and shape
inference. The bytes are read only

* by a pass that asks for a constant's values: ``MappedValues`` hands out a read-only
  view of one shared memory map of the file (no copy), and export turns such an
  unchanged view back into the reference;
* by ONNX Runtime, which maps the file itself (``runtime_model``: the references made
  relative to one folder that the session is told about);
* when hashed (``tensor_digest``/``constant_digest``: file reads, cached per byte range);
* when saved (``data_files.write``: copied by byte range into the output's data file;
  tensors a pass made are appended).

A reference is never written out as such: ``data_files`` and ``materialize`` replace it.
Only files that ``adopt`` checked are ever referenced (a crafted absolute location in a
proto given to the library is not followed).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data
from onnx_graphsurgeon.importers.onnx_importer import get_onnx_tensor_dtype, get_onnx_tensor_shape
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt.walk import CONTROL_FLOW, STANDARD_DOMAINS, tensor_map, with_subgraphs

# External initializers of fewer bytes are read into the model at load (shape tensors,
# biases: cheap, and they stay visible to checks and shape inference).
MIN_MAPPED_BYTES = 1 << 16
CHUNK = 16 << 20

_trusted: set[str] = set()  # data files adopt() checked (or graphopt wrote)


@dataclass(frozen=True)
class Extent:
    """Where a tensor's bytes lie: a byte range of a file (absolute, resolved path)."""

    path: str
    offset: int
    length: int


# ---------------------------------------------------------------------- references
def adopt(proto: onnx.ModelProto, base_dir: Path) -> None:
    """Turn the external initializers of ``proto`` (loaded from ``base_dir``, references
    already checked to stay inside it and to fit their files) into references; read
    the small ones, attribute tensors and types numpy cannot view into the model."""
    for graph in all_graphs(proto.graph):
        for tensor in graph.initializer:
            if not uses_external_data(tensor):
                continue
            info = {e.key: e.value for e in tensor.external_data}
            expected = view_bytes(tensor)
            length = int(info["length"]) if "length" in info else expected
            if expected is None or length != expected or length < MIN_MAPPED_BYTES:
                load_external_data_for_tensor(tensor, str(base_dir))
                continue
            path = str((base_dir / info["location"]).resolve())
            trust(path)
            set_extent(tensor, Extent(path, int(info.get("offset", 0)), length))
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and uses_external_data(attr.t):
                    load_external_data_for_tensor(attr.t, str(base_dir))


def extent(tensor: TensorProto) -> Extent | None:
    """The byte range ``tensor`` references, or ``None`` if it is not a reference."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    if location not in _trusted:
        return None
    return Extent(location, int(info.get("offset", 0)), int(info.get("length", 0)))


def trust(path: str) -> None:
    """Let references to the data file ``path`` (absolute, resolved) be followed."""
    _trusted.add(path)


def has_references(proto: onnx.ModelProto) -> bool:
    return any(extent(t) is not None for t in initializers(proto))


def referenced_bytes(proto: onnx.ModelProto) -> int:
    return sum(e.length for e in map(extent, initializers(proto)) if e is not None)


def materialize(proto: onnx.ModelProto, only: Path | None = None) -> onnx.ModelProto:
    """Read every reference of ``proto`` (``only``: to that file) into it, in place: a
    self-contained model."""
    only_path = None if only is None else str(Path(only).resolve())
    for tensor in initializers(proto):
        where = extent(tensor)
        if where is not None and only_path in (None, where.path):
            tensor.raw_data = read(where)
            tensor.ClearField("data_location")  # as if never external: same bytes
            del tensor.external_data[:]
    return proto


def read(where: Extent) -> bytes:
    with open(where.path, "rb") as fh:
        data = os.pread(fh.fileno(), where.length, where.offset)
    if len(data) != where.length:
        raise OSError(f"{where.path}: shorter than its tensors need (changed since loading?)")
    return data


def set_extent(tensor: TensorProto, where: Extent, location: str | None = None) -> None:
    for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                 "uint64_data", "string_data"):
        tensor.ClearField(name)
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location or where.path), ("offset", str(where.offset)),
                       ("length", str(where.length))):
        tensor.external_data.add(key=key, value=value)


def view_bytes(tensor: TensorProto) -> int | None:
    """Bytes of ``tensor`` if numpy can view them as its values (``None``: strings,
    types packed several to a byte)."""
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except (KeyError, TypeError, ValueError):
        return None
    if dtype == object or tensor.data_type in _PACKED:
        return None
    return int(np.prod(tensor.dims, dtype=np.int64)) * dtype.itemsize


_PACKED = frozenset(getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2",
                                                      "UINT2") if hasattr(TensorProto, n))


# ---------------------------------------------------------------------- memory maps
_maps: "weakref.WeakValueDictionary[tuple, mmap.mmap]" = weakref.WeakValueDictionary()
# id(array) -> (weak reference to a view handed out, the MappedValues it shows)
_views: dict[int, tuple[weakref.ref, "MappedValues"]] = {}


def _map(path: str) -> mmap.mmap:
    """One read-only map per file version, shared by every view (pages count once)."""
    st = os.stat(path)
    key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
    mapped = _maps.get(key)
    if mapped is None:
        with open(path, "rb") as fh:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        _maps[key] = mapped
    return mapped


class MappedValues(LazyValues):
    """A constant's values in an external-data file: read-only views of a memory map."""

    def __init__(self, tensor: TensorProto):
        super().__init__(tensor)
        self.extent = extent(tensor)

    def load(self) -> np.ndarray:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.tensor.data_type))
        count = int(np.prod(self.shape, dtype=np.int64))
        array = np.frombuffer(_map(self.extent.path), dtype=dtype, count=count,
                              offset=self.extent.offset).reshape(self.shape)
        key = id(array)
        _views[key] = (weakref.ref(array, lambda _, k=key: _views.pop(k, None)), self)
        return array

    def __str__(self) -> str:
        return f"MappedValues (shape={self.shape}, dtype={self.dtype}, {self.extent.path})"


class HeldValues(LazyValues):
    """A constant's values as bytes held in memory (read once out of a protobuf, or back
    from a temporary file): numpy views of them without a copy. ``Model.to_onnx``
    exports a ``placeholder`` and puts the bytes into the finished protobuf with one
    copy (a TensorProto carried through onnx-graphsurgeon's export into a model is
    copied three times: 43 ms of ResNet-18's 45 MB). ``tensor`` (what
    onnx-graphsurgeon exports elsewhere) is the whole TensorProto, made on first use."""

    def __init__(self, header: TensorProto, data: bytes):  # (LazyValues' would read tensor)
        self.header, self._full, self.data = header, None, data
        self.shape = get_onnx_tensor_shape(header)
        self.dtype = get_onnx_tensor_dtype(header)
        self.nbytes = len(data)

    @property
    def tensor(self) -> TensorProto:
        if self._full is None:
            self._full = TensorProto()
            self._full.CopyFrom(self.header)
            self._full.raw_data = self.data
        return self._full

    @tensor.setter
    def tensor(self, header: TensorProto) -> None:
        self.header, self._full = header, None

    def load(self) -> np.ndarray:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.header.data_type))
        return np.frombuffer(self.data, dtype=dtype).reshape(self.shape)

    def placeholder(self, name: str) -> TensorProto:
        """The tensor without its bytes, named ``name`` (exported in its place)."""
        out = TensorProto()
        out.CopyFrom(self.header)
        out.name = name
        return out

    def __str__(self) -> str:
        return f"HeldValues (shape={self.shape}, dtype={self.dtype})"


def held(tensor: TensorProto, data: bytes) -> "HeldValues | None":
    """``HeldValues`` of ``data`` as ``tensor``'s values (its name, type and shape), or
    ``None`` when numpy cannot view those bytes as its values."""
    if view_bytes(tensor) != len(data):
        return None
    header = TensorProto(name=tensor.name, data_type=tensor.data_type)
    header.dims.extend(tensor.dims)
    return HeldValues(header, data)


def mapped_source(values) -> "MappedValues | None":
    """The ``MappedValues`` that ``values`` (a constant's ``_values``) is, or is an
    unchanged view of; ``None`` otherwise."""
    if isinstance(values, MappedValues):
        return values
    if isinstance(values, np.ndarray):
        entry = _views.get(id(values))
        if entry is not None and entry[0]() is values and \
                tuple(values.shape) == tuple(entry[1].shape):
            return entry[1]
    return None


# numpy 2 moved byte_bounds into numpy.lib.array_utils (numpy 1 has it at the top)
_byte_bounds = getattr(getattr(np.lib, "array_utils", None), "byte_bounds", None) or \
    np.byte_bounds


def drop_pages(array: np.ndarray) -> None:
    """Let the pages of ``array``, a view of a memory-mapped data file, leave this
    process's resident memory (``MADV_DONTNEED``): a caller done reading a weight
    (the ``.tflite`` writer, once it has copied it) keeps the whole file from being
    counted twice beside what it wrote. The map stays valid; a later read faults the
    pages back in from the file. Anything else (a copy, a small map) is left alone."""
    owner = array
    while isinstance(owner, (np.ndarray, memoryview)):
        owner = owner.base if isinstance(owner, np.ndarray) else owner.obj
    if not isinstance(owner, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED") \
            or array.flags.writeable or array.nbytes < mmap.PAGESIZE:
        return  # (a writable map's pages may hold what is nowhere else)
    low, high = _byte_bounds(array)
    if high - low != array.nbytes:
        return  # a strided slice: its bytes are not one range of the map
    start = low - np.frombuffer(owner, np.uint8, 0).ctypes.data
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # pages wholly inside the array
    end = (start + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if 0 <= first < end <= len(owner):
        owner.madvise(mmap.MADV_DONTNEED, first, end - first)


def wrap(graph: gs.Graph) -> None:
    """After import: constants whose tensor is a reference get ``MappedValues``."""
    for g in with_subgraphs(graph):
        for tensor in tensor_map(g).values():
            if isinstance(tensor, gs.Constant) and type(tensor._values) is LazyValues and \
                    extent(tensor._values.tensor) is not None:  # noqa: SLF001
                tensor._values = MappedValues(tensor._values.tensor)  # noqa: SLF001
                # graphsurgeon would stamp EXTERNAL on the values a pass puts in its place
                tensor.data_location = None


def unwrap(graph: gs.Graph) -> None:
    """Before export: a constant holding an unchanged view of mapped values gets its
    ``MappedValues`` back, so it exports as the reference instead of its bytes. Each
    constant gets its own (graphsurgeon renames the exported TensorProto in place)."""
    taken: dict[int, str] = {}
    for g in with_subgraphs(graph):
        for tensor in tensor_map(g).values():
            if not isinstance(tensor, gs.Constant):
                continue
            source = mapped_source(tensor._values)  # noqa: SLF001
            if source is None:
                continue
            if taken.setdefault(id(source), tensor.name) != tensor.name:
                copy = TensorProto()
                copy.CopyFrom(source.tensor)
                source = MappedValues(copy)
            tensor._values = source  # noqa: SLF001


def tensor_proto(value: np.ndarray, name: str) -> TensorProto:
    """``value`` as a TensorProto named ``name``: the reference if it is mapped."""
    source = mapped_source(value)
    if source is None:
        return onnx.numpy_helper.from_array(np.asarray(value), name)
    tensor = TensorProto()
    tensor.CopyFrom(source.tensor)
    tensor.name = name
    return tensor


# ---------------------------------------------------------------------- digests
_digests: dict[tuple, bytes] = {}


def extent_digest(where: Extent, limit: int | None = None) -> bytes:
    """SHA-256 of a byte range (of its first ``limit`` bytes, if given), read from the
    file (no map: the pages are not this process's), cached per file version."""
    st = os.stat(where.path)
    length = where.length if limit is None else min(limit, where.length)
    key = (where.path, st.st_ino, st.st_size, st.st_mtime_ns, where.offset, length)
    if key not in _digests:
        digest = hashlib.sha256()
        buffer = bytearray(min(CHUNK, max(length, 1)))
        view = memoryview(buffer)
        with open(where.path, "rb") as fh:
            done = 0
            while done < length:
                got = os.preadv(fh.fileno(), [view[:min(len(buffer), length - done)]],
                                where.offset + done)
                if got <= 0:
                    raise OSError(f"{where.path}: shorter than its tensors need")
                digest.update(view[:got])
                done += got
        _digests[key] = digest.digest()
    return _digests[key]


def array_digest(array: np.ndarray, limit: int | None = None) -> bytes:
    """SHA-256 of an array's bytes (of its first ``limit`` bytes, if given)."""
    source = mapped_source(array)
    if source is not None:
        return extent_digest(source.extent, limit)
    array = np.ascontiguousarray(array)
    try:
        data = memoryview(array).cast("B")
    except (TypeError, ValueError):  # dtypes the buffer protocol lacks (bfloat16, ...)
        data = memoryview(array.tobytes())
    return hashlib.sha256(data if limit is None else data[:limit]).digest()


def tensor_digest(tensor: TensorProto) -> bytes:
    """SHA-256 of a tensor's values (the same for a reference and its inline form)."""
    where = extent(tensor)
    if where is not None:
        return extent_digest(where)
    return array_digest(onnx.numpy_helper.to_array(tensor))


def constant_digest(const: gs.Constant, limit: int | None = None) -> bytes:
    """SHA-256 of a constant's values (of their first ``limit`` bytes, if given), without
    mapping them when they are mapped."""
    source = mapped_source(const._values)  # noqa: SLF001
    if source is not None:
        return extent_digest(source.extent, limit)
    return array_digest(np.asarray(const.values), limit)


# ---------------------------------------------------------------------- ONNX Runtime
def runtime_model(proto: onnx.ModelProto) -> tuple[bytes, str | None]:
    """``proto`` serialized for an ONNX Runtime session, and the folder its references
    are relative to (``None``: it has none). ORT memory-maps those files itself; it
    refuses absolute locations, so they are made relative to the folder holding all
    the referenced files (session option
    ``session.model_external_initializers_file_folder_path``). ``proto`` itself is
    not touched (another thread may be reading it): the locations change in a copy,
    cheap where the large weights are references."""
    if not has_references(proto):
        return proto.SerializeToString(), None
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    tensors = [(t, e) for t in initializers(copy) if (e := extent(t)) is not None]
    folder = os.path.commonpath([os.path.dirname(e.path) for _, e in tensors])
    for tensor, where in tensors:
        set_extent(tensor, where, os.path.relpath(where.path, folder))
    return copy.SerializeToString(), folder


# ---------------------------------------------------------------------- files
def model_files(path: str | os.PathLike) -> list[Path]:
    """The model file at ``path`` and the external-data files it references, as far as
    they can be read (an unreadable model is just itself): what loading it reads."""
    path = Path(path)
    try:
        locations = _locations(path)
        return [path] + [path.parent / loc for loc in locations
                         if loc and "\0" not in loc and (path.parent / loc).is_file()]
    except Exception:  # noqa: BLE001 - unreadable, not ONNX, ...: loading will say why
        return [path] if os.path.lexists(path) else []


def saved_files(path: str | os.PathLike) -> list[Path]:
    """The model file at ``path`` and the external-data files it references."""
    path = Path(path)
    return [path] + [path.parent / loc for loc in _locations(path)]


def _locations(path: Path) -> list[str]:
    """The external-data files the model at ``path`` references, sorted. A model without
    any has no ``location`` key in its bytes: it is searched through a memory map, not
    read or parsed (0.14 s for ResNet-50's 100 MB); answers are kept per file version."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _located:
        with open(path, "rb") as fh:
            if st.st_size == 0:
                data = b""
            else:
                with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                    data = mapped[:] if mapped.find(b"location") >= 0 else None
        found: list[str] = []
        if data is not None:
            proto = onnx.ModelProto()
            proto.ParseFromString(data)
            found = sorted({e.value for t in all_tensors(proto) if uses_external_data(t)
                            for e in t.external_data if e.key == "location"})
        if len(_located) > 64:
            _located.clear()
        _located[key] = found
    return list(_located[key])


_located: dict[tuple, list[str]] = {}


# ---------------------------------------------------------------------- walking protos

def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and its subgraphs (If/Loop/Scan bodies), recursively."""
    yield graph
    for node in graph.node:
        if node.domain in STANDARD_DOMAINS and node.op_type not in CONTROL_FLOW:
            continue  # (the standard's other operators take no graph attribute)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from all_graphs(sub)


def all_nodes(proto: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    for graph in all_graphs(proto.graph):
        yield from graph.node
    for function in proto.functions:
        yield from function.node


def all_tensors(proto: onnx.ModelProto) -> Iterator[TensorProto]:
    """Initializers and tensor attributes of every graph."""
    for graph in all_graphs(proto.graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t


def initializers(proto: onnx.ModelProto) -> Iterator[TensorProto]:
    for graph in all_graphs(proto.graph):
        yield from graph.initializer
