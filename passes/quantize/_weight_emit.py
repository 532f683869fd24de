"""Rewriting of weight-only quantization (``quantize-int4-weight``): a weight's blocks
into a MatMulNBits node or a blocked DequantizeLinear feeding the MatMul/Gemm, and an
embedding table's into GatherBlockQuantized or DequantizeLinear feeding the Gather."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import Model
from graphopt.passes._patterns import MICROSOFT, is_default_domain
from graphopt.passes.quantize._weight_blocks import Blocks, pack_nbits, qdq_constants, subbyte_constant
from graphopt.passes.quantize._weights import Linear, drop_feeders
from graphopt.rewrite import constant_value, consumers, remove_node, unique_name


@dataclass
class Embedding:
    """A Gather of rows of a constant [V, D] table (axis 0)."""

    node: gs.Node
    graph: gs.Graph
    table: np.ndarray  # [V, D], float
    source: gs.Constant

    @property
    def k(self) -> int:
        return int(self.table.shape[1])

    @property
    def n(self) -> int:
        return int(self.table.shape[0])


def embeddings(model: Model, misses: Counter) -> list[Embedding]:
    """Every Gather of a constant 2-D float table along its rows, that alone reads it
    (a table tied to an output projection would be stored twice); ``misses`` counts why
    other Gathers of constants are not."""
    found = []
    for graph in model.all_graphs():
        for node in graph.nodes:
            if node.op != "Gather" or not is_default_domain(node) or \
                    not isinstance(node.inputs[0], gs.Constant):
                continue
            table = node.inputs[0]
            value = np.asarray(table.values)
            if value.ndim != 2 or value.dtype not in (np.float32, np.float16):
                misses["table is not a 2-D float matrix"] += 1
            elif int(node.attrs.get("axis", 0)) != 0:
                misses["Gather along the table's columns"] += 1
            elif len(consumers(table)) > 1 or table in graph.outputs:
                misses["table also read elsewhere"] += 1
            else:
                found.append(Embedding(node, graph, value, table))
    return found


def gemm_bias(lin: Linear) -> np.ndarray | None | bool:
    """A Gemm's ``beta * C`` as an [N] vector; None without C; False when C is not a
    constant that broadcasts as a vector."""
    node = lin.node
    if len(node.inputs) < 3 or node.inputs[2].is_empty():
        return None
    value = constant_value(node.inputs[2])
    if value is None or value.size not in (1, lin.n) or value.ndim > 2 or \
            (value.ndim == 2 and value.shape[0] != 1):
        return False
    beta = float(node.attrs.get("beta", 1.0))
    return (np.broadcast_to(value.reshape(-1), (lin.n,)) * beta).astype(lin.weight.dtype)


def _add_bias(lin: Linear, graphs: list[gs.Graph]) -> tuple[gs.Node, np.ndarray] | None:
    """The Add that alone reads a MatMul's result and adds a constant [N] vector."""
    out = lin.node.outputs[0]
    readers = consumers(out)
    if len(readers) != 1 or any(out in g.outputs for g in graphs):
        return None
    add = readers[0]
    if add.op != "Add" or not is_default_domain(add) or len(add.inputs) != 2 or \
            not any(add is n for n in lin.graph.nodes):
        return None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    value = constant_value(other)
    rank = len(out.shape) if out.shape is not None else None
    if value is None or value.dtype != lin.weight.dtype or value.size != lin.n or \
            value.shape[-1:] != (lin.n,) or rank is None or value.ndim > rank:
        return None
    return add, value.reshape(-1)


def emit_nbits(model: Model, lin: Linear, blocks: Blocks, names: set[str],
                     node_names: set[str], accuracy_level: int, fold_bias: bool) -> int:
    packed, zeros = pack_nbits(blocks)
    hint = lin.source.name or lin.node.name or "weight"
    dtype = lin.weight.dtype
    scales = blocks.scales.T.astype(dtype)
    inputs = [lin.x, gs.Constant(unique_name(names, f"{hint}_Q{blocks.bits}"), packed),
              gs.Constant(unique_name(names, f"{hint}_scales"), np.ascontiguousarray(scales))]
    size = packed.nbytes + scales.nbytes
    if zeros is not None:
        inputs.append(gs.Constant(unique_name(names, f"{hint}_zero_points"), zeros))
        size += zeros.nbytes
    graphs = list(model.all_graphs())
    bias, output, removed = None, lin.node.outputs[0], [lin.node]
    if lin.node.op == "Gemm":
        bias = gemm_bias(lin)
    elif fold_bias:
        found = _add_bias(lin, graphs)
        if found is not None:
            add, bias = found
            output = add.outputs[0]
            removed.append(add)
    if bias is not None:
        while len(inputs) < 5:
            inputs.append(gs.Variable.empty())
        inputs.append(gs.Constant(unique_name(names, f"{hint}_bias"),
                                  np.ascontiguousarray(bias.astype(dtype))))
    attrs = {"K": lin.k, "N": lin.n, "bits": blocks.bits, "block_size": blocks.block_size}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    base = lin.node.name or "MatMul"
    node = gs.Node("MatMulNBits", name=unique_name(node_names, f"{base}_Q{blocks.bits}"),
                   domain=MICROSOFT, attrs=attrs, inputs=[], outputs=[])
    index = next(i for i, n in enumerate(lin.graph.nodes) if n is lin.node)
    for old in removed:
        old.outputs.clear()
    node.inputs.extend(inputs)
    node.outputs.append(output)
    for old in removed:
        remove_node(old, lin.graph)
    lin.graph.nodes.insert(min(index, len(lin.graph.nodes)), node)
    drop_feeders(lin)
    model.require_opset(MICROSOFT, 1)
    return size


def emit_qdq(lin: Linear, blocks: Blocks, names: set[str], node_names: set[str]) -> int:
    codes, zeros = qdq_constants(blocks)
    hint = lin.source.name or lin.node.name or "weight"
    dtype = lin.weight.dtype
    quant = subbyte_constant if blocks.bits == 4 else gs.Constant
    inputs = [quant(unique_name(names, f"{hint}_Q{blocks.bits}"), codes),
              gs.Constant(unique_name(names, f"{hint}_scale"),
                          np.ascontiguousarray(blocks.scales.astype(dtype)))]
    size = lin.k * lin.n * blocks.bits // 8 + inputs[1].values.nbytes
    if zeros is not None:
        inputs.append(quant(unique_name(names, f"{hint}_zero_point"), zeros))
        size += zeros.size * blocks.bits // 8
    weight = gs.Variable(unique_name(names, f"{hint}_dequantized"), dtype=dtype,
                         shape=[lin.k, lin.n])
    dq = gs.Node("DequantizeLinear",
                 name=unique_name(node_names, f"{lin.node.name or 'weight'}_DQ"),
                 attrs={"axis": 0, "block_size": blocks.block_size}, inputs=inputs,
                 outputs=[weight])
    lin.graph.nodes.append(dq)
    lin.node.inputs[1] = weight
    if lin.node.op == "Gemm":  # the dequantized weight is [K, N] and carries alpha
        lin.node.attrs["transB"] = 0
        lin.node.attrs["alpha"] = 1.0
    drop_feeders(lin)
    return size




def emit_gather(model: Model, emb: Embedding, blocks: Blocks, names: set[str],
                 node_names: set[str], fmt: str) -> int:
    """Replace an embedding table [V, D] by its codes, quantized in blocks along D
    (``blocks`` quantized ``table.T``): ``com.microsoft.GatherBlockQuantized`` (``nbits``:
    only the gathered rows are dequantized) or ``DequantizeLinear`` (axis 1) feeding the
    Gather. Returns the bytes stored."""
    import ml_dtypes

    hint = emb.source.name or emb.node.name or "table"
    dtype = emb.table.dtype
    scales = gs.Constant(unique_name(names, f"{hint}_scales"),
                         np.ascontiguousarray(blocks.scales.T.astype(dtype)))  # [V, D/B]
    if fmt == "nbits":
        codes = blocks.codes[:blocks.k].T  # [V, D], unsigned
        zeros = None if blocks.symmetric else blocks.zero_points.T
        if blocks.bits == 4:  # int4 without zero points (0), uint4 with them
            kind = ml_dtypes.uint4
            if blocks.symmetric:
                codes, kind = codes.astype(np.int16) - 8, ml_dtypes.int4
            quant = subbyte_constant
        else:  # uint8; without zero points ORT takes 128, the symmetric offset
            kind, quant = np.uint8, gs.Constant
        inputs = [quant(unique_name(names, f"{hint}_Q{blocks.bits}"),
                        np.ascontiguousarray(codes.astype(kind))),
                  emb.node.inputs[1], scales]
        if zeros is not None:
            inputs.append(quant(unique_name(names, f"{hint}_zero_points"),
                                np.ascontiguousarray(zeros.astype(kind))))
        node = gs.Node("GatherBlockQuantized", domain=MICROSOFT,
                       name=unique_name(node_names, f"{emb.node.name or 'Gather'}_Q"),
                       attrs={"bits": blocks.bits, "block_size": blocks.block_size,
                              "gather_axis": 0, "quantize_axis": 1},
                       inputs=[], outputs=[])
        index = next(i for i, n in enumerate(emb.graph.nodes) if n is emb.node)
        output = emb.node.outputs[0]
        emb.node.outputs.clear()
        node.inputs.extend(inputs)
        node.outputs.append(output)
        remove_node(emb.node, emb.graph)
        emb.graph.nodes.insert(min(index, len(emb.graph.nodes)), node)
        model.require_opset(MICROSOFT, 1)
    else:
        codes, zeros = qdq_constants(blocks)  # [D, V], [D/B, V]
        quant = subbyte_constant if blocks.bits == 4 else gs.Constant
        inputs = [quant(unique_name(names, f"{hint}_Q{blocks.bits}"),
                        np.ascontiguousarray(codes.T)), scales]
        if zeros is not None:
            inputs.append(quant(unique_name(names, f"{hint}_zero_point"),
                                np.ascontiguousarray(zeros.T)))
        table = gs.Variable(unique_name(names, f"{hint}_dequantized"), dtype=dtype,
                            shape=list(emb.table.shape))
        emb.graph.nodes.append(gs.Node(
            "DequantizeLinear", name=unique_name(node_names, f"{emb.node.name or 'Gather'}_DQ"),
            attrs={"axis": 1, "block_size": blocks.block_size}, inputs=inputs,
            outputs=[table]))
        emb.node.inputs[0] = table
    v, d = emb.table.shape
    zero_bytes = 0 if blocks.symmetric else blocks.zero_points.size * blocks.bits // 8
    return v * d * blocks.bits // 8 + int(blocks.scales.size * dtype.itemsize) + zero_bytes
