"""Writing weights to files: a model with its initializers in one data file (``write``),
a self-contained model streamed from its references (``write_inline``), and the spill's
moves of in-memory constants into a data file and back (``move_out_constants``,
``read_back``). What a reference is, and the memory maps that read them, live in
``external_data``.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto
from onnx.external_data_helper import uses_external_data
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt.external_data import (CHUNK, MIN_MAPPED_BYTES, Extent, HeldValues,
                                    MappedValues, all_graphs, extent, has_references, held,
                                    initializers, mapped_source, materialize, read,
                                    set_extent, trust, view_bytes)
from graphopt.walk import tensor_map, with_subgraphs

# Large tensors in a written data file start at a page boundary (mappable in place).
PAGE = 4096
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP,
                            errno.EBADF, errno.EPERM})


def write(proto: onnx.ModelProto, path: Path, data_path: Path,
          size_threshold: int = 1024) -> None:
    """Write ``proto`` to ``path`` and its initializers of ``size_threshold`` bytes or
    more to ``data_path`` (one file, named relative to ``path``'s folder): references
    are copied by byte range (the same range once), inline tensors appended; tensors of
    64 KiB or more start at a page boundary. ``proto`` is left as it was."""
    location = os.path.relpath(data_path, path.parent)
    out = _DataFile(data_path)
    changed: list[tuple[TensorProto, TensorProto]] = []
    copied: dict[Extent, int] = {}
    try:
        for tensor in initializers(proto):
            where = extent(tensor)
            if where is None:
                if uses_external_data(tensor):
                    raise ValueError(f"tensor {tensor.name!r} references external data "
                                     f"graphopt did not load")
                if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED) or \
                        _inline_bytes(tensor) < size_threshold:
                    continue
            backup = TensorProto()
            backup.CopyFrom(tensor)
            changed.append((tensor, backup))
            if where is None:
                data = tensor.raw_data if tensor.HasField("raw_data") else \
                    onnx.numpy_helper.to_array(tensor).tobytes()
                offset = out.append(data)
                length = len(data)
            else:
                if where not in copied:
                    copied[where] = out.copy(where)
                offset, length = copied[where], where.length
            set_extent(tensor, Extent(str(data_path), offset, length), location)
        out.close()
        path.write_bytes(proto.SerializeToString())
    finally:
        out.close()
        for tensor, backup in changed:
            tensor.CopyFrom(backup)


def move_out_constants(graph: gs.Graph, data_path: Path,
                       min_bytes: int = MIN_MAPPED_BYTES) -> int:
    """Constants of ``graph`` and its subgraphs whose values of ``min_bytes`` or more are
    held in memory (an imported tensor's raw bytes, or an array a pass wrote) get their
    bytes written to a new file ``data_path`` and become ``MappedValues`` of it, in
    place, as if the model had been loaded with external data (no export of the model,
    which would copy every weight once more). Returns the bytes moved."""
    path = Path(data_path).resolve()
    out = _DataFile(path)
    trust(str(path))
    moved = 0
    written: dict[int, tuple[int, int]] = {}  # id(values) -> (offset, length)
    try:
        for g in with_subgraphs(graph):
            for const in tensor_map(g).values():
                if not isinstance(const, gs.Constant):
                    continue
                values = const._values  # noqa: SLF001 - reading .values would load it
                found = _inline_raw(const, values, min_bytes)
                if found is None:
                    continue
                data_type, data = found
                if id(values) not in written:
                    written[id(values)] = (out.append(data), len(data))
                    moved += len(data)
                offset, length = written[id(values)]
                ref = TensorProto(name=const.name, data_type=data_type)
                ref.dims.extend(const.shape)
                set_extent(ref, Extent(str(path), offset, length))
                const._values = MappedValues(ref)  # noqa: SLF001
                const.data_location = None
    finally:
        out.close()
    return moved


def _inline_raw(const: gs.Constant, values, min_bytes: int) -> tuple[int, object] | None:
    """``(ONNX data type, raw bytes)`` of a constant's in-memory values when they export
    as those bytes unchanged and are ``min_bytes`` or more; ``None`` otherwise."""
    if mapped_source(values) is not None:
        return None
    if type(values) is HeldValues:
        return (values.header.data_type, values.data) if values.nbytes >= min_bytes else None
    if isinstance(values, LazyValues):
        if type(values) is not LazyValues:  # sparse, or a reference already
            return None
        tensor = values.tensor
        if extent(tensor) is not None or not tensor.HasField("raw_data") or \
                tensor.data_location == TensorProto.EXTERNAL:
            return None
        length = view_bytes(tensor)  # (reading raw_data copies the bytes: once only)
        if length is None or length < min_bytes:
            return None
        data = tensor.raw_data
        return (tensor.data_type, data) if len(data) == length else None
    if not isinstance(values, np.ndarray) or values.nbytes < min_bytes or \
            not values.dtype.isnative:
        return None
    try:
        data_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
        exported = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(const.export_dtype))
    except (KeyError, TypeError, ValueError):
        return None
    probe = TensorProto(data_type=data_type)
    probe.dims.extend(values.shape)
    if exported != data_type or view_bytes(probe) != values.nbytes:
        return None
    try:
        return data_type, memoryview(np.ascontiguousarray(values)).cast("B")
    except (TypeError, ValueError):  # dtypes the buffer protocol lacks (bfloat16, ...)
        return data_type, values.tobytes()


def read_back(graph: gs.Graph, folder: Path) -> None:
    """Constants of ``graph`` and its subgraphs whose values are (unchanged views of)
    references into files under ``folder`` get their bytes read into memory, in place:
    the files may go."""
    folder = str(Path(folder).resolve())
    for g in with_subgraphs(graph):
        for const in tensor_map(g).values():
            if not isinstance(const, gs.Constant):
                continue
            source = mapped_source(const._values)  # noqa: SLF001
            if source is None or os.path.dirname(source.extent.path) != folder:
                continue
            data = read(source.extent)
            back = held(source.tensor, data)
            if back is None:  # (types numpy cannot view: bytes in a TensorProto)
                tensor = TensorProto()
                tensor.CopyFrom(source.tensor)
                tensor.name = const.name
                tensor.raw_data = data
                tensor.ClearField("data_location")  # as if never external: same bytes
                del tensor.external_data[:]
                back = LazyValues(tensor)
            const._values = back  # noqa: SLF001


def write_inline(proto: onnx.ModelProto, path: Path) -> None:
    """``proto`` written to ``path`` as one self-contained protobuf: the bytes
    ``materialize`` then ``SerializeToString`` give (``proto`` is left as it was), but
    the main graph's referenced weights are copied from their files into place (in the
    kernel where it can) instead of passing through memory: upb serializes 100 MB in
    0.23 s. Protobuf writes fields in number order, so the model is its fields before
    the graph, the graph (its fields before the initializers, each initializer, the
    rest), then the rest; a referenced tensor is its fields before ``raw_data``, the
    bytes, then the rest."""
    graph = proto.graph
    if not has_references(proto):
        Path(path).write_bytes(proto.SerializeToString())
        return
    if any(extent(t) is not None for g in list(all_graphs(graph))[1:] for t in g.initializer):
        copy = onnx.ModelProto()  # (a subgraph's references: read in, the simple way)
        copy.CopyFrom(proto)
        Path(path).write_bytes(materialize(copy).SerializeToString())
        return
    parts: list[bytes | Extent] = []  # the file, in order
    model_head, model_tail = _split(proto, 7, skip=("graph",))
    graph_head, graph_tail = _split(graph, 5, skip=("initializer",))
    inits: list[list[bytes | Extent]] = []
    for tensor in graph.initializer:
        where = extent(tensor)
        if where is None:
            inits.append([tensor.SerializeToString()])
            continue
        head, tail = _split(tensor, 9, skip=_DATA_FIELDS)
        inits.append([head, _key(9, where.length), where, tail])
    sized = [[_key(5, _size(init)), *init] for init in inits]
    graph_size = len(graph_head) + sum(_size(p) for p in sized) + len(graph_tail)
    parts = [model_head, _key(7, graph_size), graph_head,
             *[part for init in sized for part in init], graph_tail, model_tail]
    out = _DataFile(Path(path), aligned=False)
    try:
        for part in parts:
            if isinstance(part, Extent):
                out.copy(part)
            elif part:
                out.append(part)
    finally:
        out.close()


_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data",
                "double_data", "uint64_data", "external_data", "data_location")


def _split(message, number: int, skip: tuple[str, ...]) -> tuple[bytes, bytes]:
    """``message`` serialized in two parts: its set fields numbered below ``number``,
    and those above (``skip``: left out)."""
    head, tail = type(message)(), type(message)()
    for descriptor, value in message.ListFields():
        if descriptor.name in skip or descriptor.number == number:
            continue
        copy_field(head if descriptor.number < number else tail, descriptor, value)
    return head.SerializeToString(), tail.SerializeToString()


def copy_field(dst, descriptor, value) -> None:
    """Set field ``descriptor`` of message ``dst`` to ``value`` (from ``ListFields``)."""
    if descriptor.is_repeated:
        getattr(dst, descriptor.name).extend(value)
    elif descriptor.type == descriptor.TYPE_MESSAGE:
        getattr(dst, descriptor.name).CopyFrom(value)
    else:
        setattr(dst, descriptor.name, value)


def _key(number: int, length: int) -> bytes:
    """The key and length of a length-delimited field."""
    return _varint(number << 3 | 2) + _varint(length)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _size(parts) -> int:
    return sum(p.length if isinstance(p, Extent) else len(p) for p in parts)


class _DataFile:
    def __init__(self, path: Path, aligned: bool = True):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self.size = 0
        self.aligned = aligned

    def _start(self, length: int) -> int:
        if not self.aligned:
            return self.size
        align = PAGE if length >= MIN_MAPPED_BYTES else 16
        return -(-self.size // align) * align

    def append(self, data) -> int:
        offset = self._start(len(data))
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)
        self.size = offset + len(view)
        return offset

    def copy(self, where: Extent) -> int:
        """Copy a byte range of another file in (in the kernel where it can)."""
        offset = self._start(where.length)
        with open(where.path, "rb") as src:
            done = 0
            try:
                while done < where.length:
                    got = os.copy_file_range(src.fileno(), self.fd, where.length - done,
                                             where.offset + done, offset + done)
                    if got <= 0:
                        break
                    done += got
            except OSError as exc:
                if exc.errno not in _NO_COPY_RANGE:
                    raise
            while done < where.length:  # no copy_file_range between these files
                chunk = os.pread(src.fileno(), min(CHUNK, where.length - done),
                                 where.offset + done)
                if not chunk:
                    raise OSError(f"{where.path}: shorter than its tensors need "
                                  f"(changed since loading?)")
                done += os.pwrite(self.fd, chunk, offset + done)
        self.size = offset + where.length
        return offset

    def close(self) -> None:
        if self.fd >= 0:
            if os.fstat(self.fd).st_size < self.size:
                os.ftruncate(self.fd, self.size)
            os.close(self.fd)
            self.fd = -1


def _inline_bytes(tensor: TensorProto) -> int:
    size = view_bytes(tensor)  # from the shape: reading raw_data would copy it
    return size if size is not None else len(tensor.raw_data)
