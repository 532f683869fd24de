"""What loading checks before a model becomes a ``Model``: its external-data references
(inside the model's folder, well-formed, long enough), its structure (the ONNX checker,
imported op domains) and what the checker takes on trust: every tensor's data type is
known and matches its bytes, every graph input and output has an element type.
Every problem is a ``ModelError`` naming it."""

from __future__ import annotations

import math
import os
from pathlib import Path

import onnx
from onnx.external_data_helper import uses_external_data

from graphopt import external_data
from graphopt.errors import ModelError
from graphopt.ir import _all_nodes, _all_tensors, _first_line, skeleton


def validate(proto: onnx.ModelProto, unchecked: frozenset[str] = frozenset()) -> None:
    """Raise ``ModelError`` unless ``proto`` is a structurally valid ONNX model.
    ``unchecked``: initializers without values whose values were checked apart (see
    ``ir.load``)."""
    if not proto.HasField("graph") or not proto.opset_import:
        raise ModelError("not an ONNX model: it has no graph or no opset import",
                         hint="is the file truncated, or not an .onnx file?")
    known = {("" if o.domain == "ai.onnx" else o.domain) for o in proto.opset_import}
    known |= {f.domain for f in proto.functions}
    for node in _all_nodes(proto):
        domain = "" if node.domain == "ai.onnx" else node.domain
        if domain not in known:
            raise ModelError(
                f"node {node.name or node.op_type!r} ({node.op_type}) uses op domain "
                f"{domain!r}, which the model does not import",
                hint="add the domain to the model's opset_import, or remove the node")
    _check_types(proto, unchecked)
    try:
        # The checker takes the structure with large weights as typed inputs: handing it
        # the weights would serialize them all (0.4 s of a ResNet-50; over 2 GB it cannot
        # take them at all). Their tensors are checked here as the checker would
        # (``_check_types``), small tensors by the checker itself.
        onnx.checker.check_model(skeleton(proto))
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"invalid ONNX model: {_first_line(exc)}") from exc
    except (UnicodeError, RuntimeError, ValueError, TypeError) as exc:  # checker internals
        raise ModelError(f"invalid ONNX model: {_first_line(exc)}") from exc


def _check_types(proto: onnx.ModelProto, unchecked: frozenset[str] = frozenset()) -> None:
    """Every tensor's ``data_type`` is a known type whose size matches the tensor's bytes,
    and every graph input and output has an element type (the ONNX checker takes both on
    trust)."""
    for tensor in _all_tensors(proto):
        if tensor.data_type not in _KNOWN_TYPES:
            raise ModelError(f"tensor {tensor.name!r} has no valid data type "
                             f"(data_type {tensor.data_type})", hint="the model file is corrupt")
        if uses_external_data(tensor) or (tensor.name in unchecked and
                                          not tensor.HasField("raw_data")):
            continue
        # (reading raw_data copies the bytes: once)
        raw = len(tensor.raw_data) if tensor.HasField("raw_data") else 0
        _check_value_fields(tensor, raw)
        if tensor.HasField("raw_data"):
            expected = _expected_bytes(tensor)
            if expected is not None and raw != expected:
                raise ModelError(
                    f"tensor {tensor.name!r} holds {raw} bytes, but "
                    f"{onnx.TensorProto.DataType.Name(tensor.data_type)} of shape "
                    f"{list(tensor.dims)} takes {expected}",
                    hint="its data_type or shape does not match its data (corrupt model?)")
        elif tensor.data_type != onnx.TensorProto.STRING:
            wanted = _expected_values(tensor)
            field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
            got = len(getattr(tensor, field))
            if wanted is not None and got != wanted:
                raise ModelError(f"tensor {tensor.name!r} holds {got} values in {field}, its "
                                 f"shape {list(tensor.dims)} needs {wanted}",
                                 hint="its data_type or shape does not match its data")
    for what, values in (("input", proto.graph.input), ("output", proto.graph.output)):
        for value in values:
            kind = value.type.WhichOneof("value")
            if (kind is None and what == "input") or (
                    kind == "tensor_type" and
                    value.type.tensor_type.elem_type not in _KNOWN_TYPES):
                raise ModelError(f"graph {what} {value.name!r} has no valid element type",
                                 hint="the model file is corrupt")


_VALUE_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "raw_data",
                 "double_data", "uint64_data")


def _check_value_fields(tensor: onnx.TensorProto, raw: int) -> None:
    """The ONNX checker's rules for where a tensor's values are: none in a tensor of no
    elements, else exactly one field, the one its type uses (or raw_data, not for
    strings). ``raw``: the length of its raw_data."""
    used = [f for f in _VALUE_FIELDS if (raw if f == "raw_data" else len(getattr(tensor, f)))]
    elements = math.prod(tensor.dims)
    if elements == 0:
        if used:
            raise ModelError(f"tensor {tensor.name!r} has no elements but holds data",
                             hint="the model file is corrupt")
        return
    if len(used) != 1:
        raise ModelError(f"tensor {tensor.name!r} holds its values in "
                         f"{' and '.join(used) if used else 'no field'}: it must use exactly "
                         f"one", hint="the model file is corrupt")
    if used[0] == "raw_data":
        if tensor.data_type == onnx.TensorProto.STRING:
            raise ModelError(f"tensor {tensor.name!r}: strings cannot be stored in raw_data",
                             hint="the model file is corrupt")
        return
    field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
    if used[0] != field:
        raise ModelError(f"tensor {tensor.name!r}: values of type "
                         f"{onnx.TensorProto.DataType.Name(tensor.data_type)} belong in "
                         f"{field}, not {used[0]}", hint="the model file is corrupt")


_KNOWN_TYPES = frozenset(onnx.helper.get_all_tensor_dtypes()) - {onnx.TensorProto.UNDEFINED}
# Element types stored several to a byte (raw_data) or to an int32_data entry.
_PER_BYTE = {getattr(onnx.TensorProto, n): k for n, k in
             (("INT4", 2), ("UINT4", 2), ("FLOAT4E2M1", 2), ("INT2", 4), ("UINT2", 4))
             if hasattr(onnx.TensorProto, n)}
_UNCHECKED = frozenset(getattr(onnx.TensorProto, n) for n in ("STRING", "FLOAT6E2M3",
                                                              "FLOAT6E3M2")
                       if hasattr(onnx.TensorProto, n))
_COMPLEX = frozenset({onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128})


def _expected_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of ``tensor``'s data stored raw (``None``: not checked, e.g. strings)."""
    if tensor.data_type not in _KNOWN_TYPES or tensor.data_type in _UNCHECKED:
        return None
    count = math.prod(tensor.dims)
    if tensor.data_type in _PER_BYTE:
        return -(-count // _PER_BYTE[tensor.data_type])
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _expected_values(tensor: onnx.TensorProto) -> int | None:
    """Entries of ``tensor``'s typed data field (float_data, int32_data, ...)."""
    if tensor.data_type not in _KNOWN_TYPES or tensor.data_type in _UNCHECKED:
        return None
    count = math.prod(tensor.dims)
    if tensor.data_type in _PER_BYTE:
        return -(-count // _PER_BYTE[tensor.data_type])
    return count * (2 if tensor.data_type in _COMPLEX else 1)


def load_external_data(proto: onnx.ModelProto, base_dir: Path | None) -> None:
    """Check every external-data reference stays inside the model's folder and fits its
    file; then large initializers stay there (memory-mapped on use, see
    ``graphopt.external_data``) and the rest is read in."""
    external = [t for t in _all_tensors(proto) if uses_external_data(t)]
    if not external:
        return
    if base_dir is None:
        raise ModelError("the model references external data but was not loaded from a file",
                         hint="load it from its path so the data file can be found")
    for tensor in external:
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not location or "\0" in location:
            raise ModelError(f"tensor {tensor.name!r}: external data location {location!r} "
                             f"is not a file name", hint="the model file is corrupt")
        target = (base_dir / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(base_dir):
            raise ModelError(f"tensor {tensor.name!r}: external data path {location!r} points "
                             f"outside the model's folder", hint="refusing to read it")
        if not target.is_file():
            raise ModelError(f"tensor {tensor.name!r}: external data file {location!r} is "
                             f"missing", hint=f"expected it at {target}")
        offset, length = (_external_int(tensor, info, key) for key in ("offset", "length"))
        expected = _expected_bytes(tensor)
        if length is not None and expected is not None and length != expected:
            raise ModelError(f"tensor {tensor.name!r}: external data length {length} does "
                             f"not match its type and shape ({expected} bytes)",
                             hint="the model file is corrupt")
        needed = (offset or 0) + (length if length is not None else (expected or 0))
        if needed > target.stat().st_size:
            raise ModelError(f"tensor {tensor.name!r}: external data file {location!r} is "
                             f"shorter than the tensor needs (truncated?)")
    try:
        external_data.adopt(proto, base_dir)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the external data: {_first_line(exc)}") from exc


def _external_int(tensor: onnx.TensorProto, info: dict[str, str], key: str) -> int | None:
    """An external-data entry's ``offset`` or ``length``: a non-negative integer."""
    if key not in info:
        return None
    text = info[key]
    if not text.isascii() or not text.isdigit():
        raise ModelError(f"tensor {tensor.name!r}: external data {key} {text!r} is not a "
                         f"non-negative integer", hint="the model file is corrupt")
    return int(text)
