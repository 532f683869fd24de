"""Standard stand-ins for contrib ops in shape inference.

ONNX's shape inference does not know ONNX Runtime's contrib ops, and ONNX Runtime's
symbolic inference does not follow all of them (a DynamicQuantizeMatMul, a QAttention):
the shapes after them were lost, and every cost estimated there with them.
``graphopt.ir.infer_shapes`` runs inference on the model's skeleton with each such node
replaced by standard ops of the same output shape and type; the model keeps its ops.
"""

from __future__ import annotations

from typing import Sequence

import onnx


# contrib op -> (standard op, inputs kept, the node's own attributes to drop (empty: drop
# them all), None or (index of an input cast first, index of the input whose float type
# it is cast to: float32 when that type is not at hand). Ops whose output has their
# first input's shape (GELU forms) stand in as Identity; attention does not (pruned heads
# narrow its output): see ``_attention_stand_in``.
_STAND_INS = {
    ("com.microsoft", "FusedConv"): ("Conv", 3, {"activation", "activation_params"}, None),
    ("com.microsoft", "FusedGemm"): ("Gemm", 3, {"activation", "activation_alpha",
                                                  "activation_beta", "activation_gamma"},
                                     None),
    ("com.microsoft", "DynamicQuantizeMatMul"): ("MatMul", 2, set(), (1, 0)),
    ("com.microsoft", "GatherBlockQuantized"): ("Gather", 2, set(), (0, 2)),
    ("com.microsoft", "BiasGelu"): ("Identity", 1, set(), None),
    ("com.microsoft", "FastGelu"): ("Identity", 1, set(), None),
}

_ATTENTION = {("com.microsoft", "Attention"): False, ("com.microsoft", "QAttention"): True}


def _attention_stand_in(graph: onnx.GraphProto, node: onnx.NodeProto, quantized: bool,
                        index: int) -> list[onnx.NodeProto] | None:
    """(Q)Attention's output, [batch, sequence, v_hidden], as a MatMul of its (float)
    input by a typed stand-in weight [hidden, v_hidden] added as a graph input: v_hidden
    from ``qkv_hidden_sizes`` or a third of the weight's columns (pruned heads narrow
    it). ``None`` when the weight's shape is not at hand or it has more outputs."""
    if len([o for o in node.output if o]) != 1 or len(node.input) < 2:
        return None
    dims = next(([d.dim_value for d in v.type.tensor_type.shape.dim]
                 for v in graph.input if v.name == node.input[1]), None) or \
        next((list(t.dims) for t in graph.initializer if t.name == node.input[1]), None)
    if not dims or len(dims) != 2 or not all(dims):
        return None
    sizes = next((list(a.ints) for a in node.attribute if a.name == "qkv_hidden_sizes"),
                 None)
    v_hidden = sizes[2] if sizes and len(sizes) == 3 else dims[1] // 3
    # the output's float type is the bias's (float32, or float16 after convert-fp16)
    elem = (_elem_type(graph, node.input[2]) if len(node.input) > 2 else None) or \
        onnx.TensorProto.FLOAT
    stub = f"{node.name or node.output[0]}__stand_in_weight_{index}"
    graph.input.append(onnx.helper.make_tensor_value_info(stub, elem, [dims[0], v_hidden]))
    x, out = node.input[0], []
    if quantized:  # its input is uint8
        out.append(onnx.helper.make_node("Cast", [x], [f"{stub}_x"], to=elem))
        x = f"{stub}_x"
    out.append(onnx.helper.make_node("MatMul", [x, stub], [node.output[0]],
                                     name=node.name))
    return out


def _elem_type(graph: onnx.GraphProto, name: str) -> int | None:
    """The element type of a graph input, initializer or typed value named ``name``."""
    for t in graph.initializer:
        if t.name == name:
            return t.data_type
    for v in (*graph.input, *graph.value_info):
        if v.name == name and v.type.tensor_type.elem_type:
            return v.type.tensor_type.elem_type
    return None


def apply(graphs: Sequence[onnx.GraphProto]) -> None:
    """Swap the nodes of ``graphs`` (the main graph first, then its subgraphs) for their
    standard stand-ins, in place (on a skeleton: the model itself keeps its ops)."""
    for g in graphs:
        nodes, changed = [], False
        for node in g.node:
            replaced = _replace(g, node, len(nodes), main=g is graphs[0])
            changed |= replaced is not None
            nodes.extend(replaced or [node])
        if changed:
            copies = [onnx.NodeProto() for _ in nodes]
            for copy, node in zip(copies, nodes):
                copy.CopyFrom(node)
            del g.node[:]
            g.node.extend(copies)


def _replace(graph: onnx.GraphProto, node: onnx.NodeProto, index: int,
             main: bool) -> list[onnx.NodeProto] | None:
    """The stand-in nodes of ``node``, or ``None`` to keep it."""
    key = (node.domain, node.op_type)
    if key in _ATTENTION:  # (its stand-in weight is a main-graph input)
        return _attention_stand_in(graph, node, _ATTENTION[key], index) if main else None
    stand_in = _STAND_INS.get(key)
    if stand_in is None or (stand_in[0] == "Identity" and
                            len([o for o in node.output if o]) > 1):
        return None
    op, inputs, dropped, cast = stand_in
    out = []
    kept = [a for a in node.attribute if a.name not in dropped] if dropped else []
    if cast is not None:
        which, like = cast
        to = (_elem_type(graph, node.input[like]) if len(node.input) > like else None) \
            or onnx.TensorProto.FLOAT
        floated = f"{node.input[which]}__as_float_{index}"
        out.append(onnx.helper.make_node("Cast", [node.input[which]], [floated], to=to))
        node.input[which] = floated
    del node.input[inputs:]
    del node.output[1:]
    del node.attribute[:]
    node.attribute.extend(kept)
    node.op_type, node.domain = op, ""
    return [*out, node]
