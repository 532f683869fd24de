"""Per-layer sensitivity in one ONNX Runtime session: a "switchboard" model.

Measuring how much quantizing each layer alone hurts the model output takes, done
naively, one model build and one ORT session per layer (seconds each for a transformer,
mostly loading weights). The switchboard model replaces every candidate node by
``If(flag_i)`` whose then-branch is the quantized node and whose else-branch the float
one; the flags are boolean graph inputs. One session then answers every "layer i alone"
question with one run of the data per layer.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.ir import Model
from graphopt.qdq import QdqWriter
from graphopt.rewrite import remove_node, unique_name

QuantizeSite = Callable[[QdqWriter, gs.Node], None]


def build(base: onnx.ModelProto, sites: Sequence[str],
          quantize: QuantizeSite) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The switchboard model of ``base`` and {site: name of its boolean flag input}.
    ``quantize(writer, node)`` rewrites ``node`` (alone in a scratch graph whose first
    input it reads through an Identity) into its quantized form."""
    model = Model.from_proto(base)
    graph = model.graph
    flags: dict[str, str] = {}
    nodes = {n.name: n for n in graph.nodes}
    names = QdqWriter(model).names
    for site in sites:
        node = nodes[site]
        outs = list(node.outputs)
        flag = gs.Variable(unique_name(names, f"quantize_{site}"), dtype=np.bool_, shape=[])
        graph.inputs.append(flag)
        flags[site] = flag.name
        then_graph = _branch(model, names, node, quantize)
        else_graph = _branch(model, names, node, None)
        remove_node(node, graph)
        graph.nodes.append(gs.Node("If", name=unique_name(names, f"{site}_switch"),
                                   inputs=[flag], outputs=outs,
                                   attrs={"then_branch": then_graph,
                                          "else_branch": else_graph}))
    return model.to_onnx(), flags


def _branch(model: Model, names: set[str], node: gs.Node,
            quantize: QuantizeSite | None) -> gs.Graph:
    """A subgraph computing ``node`` (quantized when ``quantize`` is given) from the
    outer-scope inputs of ``node``, with fresh output tensors."""
    outs = [gs.Variable(unique_name(names, f"{t.name}_{'q' if quantize else 'f'}"),
                        dtype=t.dtype, shape=t.shape) for t in node.outputs]
    inputs = list(node.inputs)
    scratch = gs.Graph(nodes=[], outputs=outs, opset=model.graph.opset,
                       import_domains=model.graph.import_domains)
    origin = {new.name: old.name for new, old in zip(outs, node.outputs)}
    if quantize is not None and not isinstance(inputs[0], gs.Constant):
        # the writer rewires every reader of an activation it quantizes: give the branch
        # its own copy to read
        local = gs.Variable(unique_name(names, f"{inputs[0].name}_local"),
                            dtype=inputs[0].dtype, shape=inputs[0].shape)
        scratch.nodes.append(gs.Node("Identity", name=unique_name(names, local.name),
                                     inputs=[inputs[0]], outputs=[local]))
        origin[local.name] = inputs[0].name
        inputs[0] = local
    copy = gs.Node(node.op, name=unique_name(names, f"{node.name}_copy"),
                   attrs=dict(node.attrs), inputs=inputs, outputs=outs, domain=node.domain)
    scratch.nodes.append(copy)
    if quantize is not None:
        writer = QdqWriter(model)
        writer.names, writer.graph, writer.origin = names, scratch, origin
        quantize(writer, copy)
    return scratch


def feeds_with(flags: dict[str, str], on: str | None, feeds: dict) -> dict:
    """``feeds`` plus every flag, only ``on``'s set."""
    return {**feeds, **{name: np.array(site == on) for site, name in flags.items()}}
