"""Ops the ``.tflite`` lowering has no mapping for: refused, named with their node,
before anything is built (``check_mapped``), or, where the user allows it
(``--target-option allow_custom=true``), written as CUSTOM operators for kernels the
application registers (``custom_op``)."""

from __future__ import annotations

import onnx

from graphopt.errors import UsageError
from graphopt.targets.tflite_lower import Lowering, Unmappable, identity


def check_mapped(proto: onnx.ModelProto, allow_custom: bool = False
                 ) -> set[tuple[str, ...]]:
    """Refuse a graph holding an op no handler maps (type and node named), before work;
    ``allow_custom``: those nodes' outputs instead (``custom_op`` lowers them). Nodes
    computing constants only (shape arithmetic at static shapes, an exporter's
    position-id buffers) are evaluated ahead of time, whatever their op."""
    from graphopt.targets.tflite_ops import HANDLERS

    known = {i.name for i in proto.graph.initializer} | {""}
    custom = set()
    for node in proto.graph.node:
        if node.op_type == "Shape" or all(i in known for i in node.input):
            known.update(node.output)
            continue
        if node.domain not in ("", "ai.onnx") or node.op_type not in HANDLERS:
            if allow_custom:
                custom.add(tuple(node.output))
                continue
            domain = f"{node.domain}::" if node.domain not in ("", "ai.onnx") else ""
            raise UsageError(f"op {domain}{node.op_type} (node {node.name or node.output[0]!r}) "
                             f"has no TFLite mapping",
                             hint="remove or replace it before lowering for litert, or "
                                  "keep it as a custom op (--target-option "
                                  "allow_custom=true) for a kernel your app registers")
    return custom


def custom_code(node: onnx.NodeProto) -> str:
    """A CUSTOM operator's code for ``node``: its op type, after its domain if any."""
    return node.op_type if node.domain in ("", "ai.onnx") else \
        f"{node.domain}.{node.op_type}"


def custom_op(lw: Lowering, node: onnx.NodeProto) -> None:
    """``node`` as a CUSTOM operator (``custom_code``) for a kernel the application
    registers: its inputs and outputs in the ONNX model's layout and order (absent
    optional inputs as -1), its attributes as a FlexBuffer map (numbers, strings and
    lists of them; tensor and graph attributes are refused)."""
    from flatbuffers import flexbuffers

    attributes = {}
    for a in node.attribute:
        value = onnx.helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, list):
            value = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                     for v in value]
        if not isinstance(value, (int, float, str, list)) or (
                isinstance(value, list) and not all(
                    isinstance(v, (int, float, str)) for v in value)):
            raise Unmappable(f"attribute {a.name!r} (a tensor or graph) has no place in "
                             f"a custom operator's options")
        attributes[a.name] = value
    inputs = [lw.get(name, identity(lw.rank(name))) if name else -1 for name in node.input]
    outputs = [lw.output(name) for name in node.output if name]
    lw.fb.custom_op(custom_code(node), inputs, outputs,
                    bytes(flexbuffers.Dumps(attributes)) if attributes else b"")
