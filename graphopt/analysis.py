"""Model summaries: op histogram, parameters, size, FLOPs, activation memory, latency.

Used by ``graphopt inspect`` and by the before/after sections of the optimize report.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from graphopt.cost import AnalyticCostModel, CostModel, Device, NodeCost, tensor_bytes
from graphopt.errors import GraphoptError
from graphopt.ir import Model, toposort
from graphopt.walk import tensor_map


@dataclass
class Summary:
    nodes: int
    params: int
    weight_bytes: int
    flops: float
    latency_s: float
    peak_activation_bytes: int
    device: str
    ops: dict[str, int] = field(default_factory=dict)
    heaviest: list[NodeCost] = field(default_factory=list)
    shapes_known: bool = True
    # per op type: FLOPs and the cost model's estimated seconds, summed over its nodes
    op_costs: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self, top: int = 10) -> dict:
        return {
            "nodes": self.nodes, "params": self.params, "weight_bytes": self.weight_bytes,
            "flops": self.flops, "estimated_latency_s": self.latency_s,
            "peak_activation_bytes": self.peak_activation_bytes, "device": self.device,
            "shapes_known": self.shapes_known, "ops": self.ops, "op_costs": self.op_costs,
            "heaviest_nodes": [vars(n) for n in self.heaviest[:top]],
        }


def infer_all_shapes(model: Model) -> bool:
    """Infer ``model``'s shapes in place as far as any inference can: ONNX's, then, where
    that leaves some unknown (contrib ops such as Attention), ONNX Runtime's symbolic
    inference (slower: 2 s on MiniLM). ``False`` when both fail."""
    try:
        model.infer_shapes()
        if shapes_known(model):
            return True
    except GraphoptError:
        pass
    try:
        model.infer_shapes(symbolic=True)
        return True
    except GraphoptError:
        return False


def shapes_known(model: Model) -> bool:
    """Every node output of ``model`` has a shape."""
    return all(t.shape is not None for g in model.all_graphs() for n in g.nodes
               for t in n.outputs)


def summarize(model: Model, device: Device, cost_model: CostModel | None = None,
              copy: bool = True) -> Summary:
    """Summarize ``model`` (not modified: shape inference, if its shapes are not all
    known, runs on a copy; ``copy=False``: on ``model`` itself)."""
    known = shapes_known(model)
    shaped = model if known or not copy else model.clone()
    known = known or infer_all_shapes(shaped)
    cost = (cost_model or AnalyticCostModel()).estimate(shaped, device)
    ops = Counter(n.op for g in shaped.all_graphs() for n in g.nodes)
    return Summary(
        nodes=shaped.num_nodes(),
        params=cost.params,
        weight_bytes=sum(tensor_bytes(t) for t in shaped.initializers()),
        flops=cost.flops,
        latency_s=cost.latency_s,
        peak_activation_bytes=peak_activation_bytes(shaped.graph),
        device=device.name,
        ops=dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        heaviest=sorted(cost.nodes, key=lambda n: -n.latency_s),
        shapes_known=known,
        op_costs=op_costs(cost.nodes, ops),
    )


def op_costs(nodes: list[NodeCost], ops: dict[str, int]) -> dict[str, dict[str, float]]:
    """{op type: {"flops", "estimated_latency_s"}} summed over the costed nodes of that
    type, in the order of ``ops`` (the histogram). The whole model's estimate can exceed
    the sum: a calibrated cost model adds a per-run overhead no op type owns."""
    out = {op: {"flops": 0.0, "estimated_latency_s": 0.0} for op in ops}
    for n in nodes:
        entry = out.setdefault(n.op_type, {"flops": 0.0, "estimated_latency_s": 0.0})
        entry["flops"] += n.flops
        entry["estimated_latency_s"] += n.latency_s
    return out


def peak_activation_bytes(graph: gs.Graph) -> int:
    """Peak bytes of live activations over a topological execution order: a tensor lives
    from the node that produces it (graph inputs: from the start) to its last consumer
    (graph outputs: to the end). Weights are not counted."""
    toposort(graph)
    position = {id(node): i for i, node in enumerate(graph.nodes)}
    end = len(graph.nodes)
    outputs = {id(t) for t in graph.outputs}
    events: dict[int, int] = Counter()
    for tensor in tensor_map(graph).values():
        if isinstance(tensor, gs.Constant):
            continue
        start = position[id(tensor.inputs[0])] if tensor.inputs else 0
        if id(tensor) in outputs:
            last = end
        else:
            last = max((position.get(id(c), start) for c in tensor.outputs), default=start)
        size = tensor_bytes(tensor)
        events[start] += size
        events[last + 1] -= size
    live = peak = 0
    for step in sorted(events):
        live += events[step]
        peak = max(peak, live)
    return peak
