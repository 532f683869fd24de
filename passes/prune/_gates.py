"""Measuring pruning settings by gates: a linear's input x becomes x·mask + offset in
ONNX Runtime runs, so every setting of a site is one run with other mask and offset
inputs, not a model built for it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.capture import tapped
from graphopt.ir import Model
from graphopt.passes.prune._blocks import const_input
from graphopt.rewrite import tensor_names, unique_name

MASK, OFFSET = ".gate_mask", ".gate_offset"  # suffixes of the gate inputs


def gates_score(ctx, refit: bool) -> bool:
    """Whether a pass's gated session may score its sites alone: always without
    recovery; under recovery (the core would build and recover each site) only when the
    gates include the re-fit where the site is cut, which is most of what recovery does
    for a single site (the combined candidates still get the full recovery)."""
    return ctx is None or ctx.recovery is None or refit


def output_error(reference: list[dict], outputs: list[dict]) -> float:
    """‖y − y₀‖² / ‖y₀‖² over every output and batch."""
    num = den = 0.0
    for ref, got in zip(reference, outputs):
        for name, r in ref.items():
            a = np.asarray(r, dtype=np.float64)
            num += float(((np.asarray(got[name], dtype=np.float64) - a) ** 2).sum())
            den += float((a ** 2).sum())
    return num / den if den else num


class PointRunner:
    """ONNX Runtime runs of ``model`` over ``data`` with one point gated at a time.

    A point is a linear (node name -> point name in ``points``) whose input x becomes
    x·mask + offset, mask and offset inputs of the run: switching a unit off (mask 0,
    offset its mean) is then exactly pruning it with compensation. With ``matrix`` the
    mask is a square matrix and the gate x @ mask + offset: any linear re-fit of the
    layer from its kept inputs (``_obs.gate``) is then exact too.

    What lies upstream of a point is the same for all of its settings, so the tensors
    the rest of the model reads from there are computed once (one run of the model for
    all points) and each setting runs only the part downstream, with that point's gate
    alone (on MiniLM a matrix gate costs more than the block it gates: the whole model
    with every gate in place ran 3.4x slower). ``run({point: (mask, offset)})`` gives
    the outputs on every batch (``{}``: the model's own, ``reference``); ``error`` their
    ‖y − y₀‖² / ‖y₀‖²."""

    def __init__(self, model: Model, points: dict[str, str], data: list[dict],
                 matrix: bool = False):
        from graphopt import verify

        nodes = {n.name: n for n in model.graph.nodes}
        outputs = [t.name for t in model.graph.outputs]
        # what depends on the data (a weight behind a Transpose does not: its producer
        # stays in the part run, not an input of it)
        data_made = {id(t) for t in model.graph.inputs} | \
            {id(t) for n in _downstream(model.graph.inputs) for t in n.outputs}
        self.suffix: dict[str, tuple[list[str], list[str]]] = {}  # point -> (inputs, outputs)
        for point_node, point in points.items():
            node = nodes[point_node]
            below = [node, *_downstream(node.outputs)]
            made = {t.name for n in below for t in n.outputs}
            reads = [t.name for n in below for t in n.inputs if isinstance(t, gs.Variable)
                     and t.name not in made and id(t) in data_made]
            self.suffix[point] = (list(dict.fromkeys(reads)),
                                  [o for o in outputs if o in made])
        # one run of the model for every point's inputs and the outputs (the reference)
        wanted = list(dict.fromkeys(
            outputs + [n for inputs, _ in self.suffix.values() for n in inputs]))
        runner = verify.session(tapped(model.to_onnx(), wanted), optimize=True, threads=0)
        accepted = {i.name for i in runner.get_inputs()}
        self.values = [dict(zip(wanted, runner.run(wanted, {k: v for k, v in f.items()
                                                            if k in accepted})))
                       for f in data]
        self.reference = [{k: v[k] for k in outputs} for v in self.values]
        self.sessions, self.nodes = {}, {}  # point -> its session, its nodes
        for point_node, point in points.items():
            inputs, outs = self.suffix[point]
            proto = _suffix(model, point_node, point, inputs, outs, matrix,
                            {n: self.values[0][n] for n in inputs})
            self.nodes[point] = len(proto.graph.node)
            self.sessions[point] = verify.session(proto, optimize=True, threads=0)

    def run(self, settings: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[dict]:
        if not settings:
            return self.reference
        if len(settings) != 1:
            raise ValueError("PointRunner switches one point at a time")
        (point, (mask, offset)), = settings.items()
        sess = self.sessions[point]
        inputs, outs = self.suffix[point]
        dtype = np.float16 if "float16" in sess.get_inputs()[-1].type else np.float32
        gate = {f"{point}{MASK}": mask.astype(dtype), f"{point}{OFFSET}": offset.astype(dtype)}
        results = []
        for values, ref in zip(self.values, self.reference):
            got = sess.run(outs, {**{n: values[n] for n in inputs}, **gate})
            results.append({**ref, **dict(zip(outs, got))})
        return results

    def error(self, settings: dict[str, tuple[np.ndarray, np.ndarray]]) -> float:
        return output_error(self.reference, self.run(settings))


def _downstream(tensors) -> list[gs.Node]:
    """Every node that reads ``tensors``, directly or through other nodes."""
    seen, order, stack = set(), [], list(tensors)
    while stack:
        for reader in stack.pop().outputs:
            if id(reader) not in seen:
                seen.add(id(reader))
                order.append(reader)
                stack.extend(reader.outputs)
    return order


def _suffix(model: Model, node_name: str, point: str, inputs: list[str], outputs: list[str],
            matrix: bool, examples: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The part of ``model`` downstream of the linear ``node_name``, gated there (as
    ``PointRunner``), reading ``inputs`` (the tensors it takes from upstream, typed after
    ``examples``) and the gate's mask and offset, and computing ``outputs``."""
    copy = model.clone()
    graph = copy.graph
    tensors = graph.tensors()
    cut = []
    for name in inputs:
        t = tensors[name]
        t.inputs.clear()  # from upstream: an input of its own now
        t.dtype = examples[name].dtype
        if t.shape is not None and len(t.shape) != examples[name].ndim:
            t.shape = None
        cut.append(t)
    graph.inputs = cut
    graph.outputs = [tensors[n] for n in outputs]
    graph.cleanup()  # the upstream nodes, which nothing reads now
    node = next(n for n in graph.nodes if n.name == node_name)
    x = node.inputs[0]
    width = int(const_input(node, 1).shape[0])
    dtype = const_input(node, 1).dtype
    taken = tensor_names([graph])
    mask = gs.Variable(f"{point}{MASK}", dtype, [width, width] if matrix else [width])
    offset = gs.Variable(f"{point}{OFFSET}", dtype, [width])
    scaled = gs.Variable(unique_name(taken, f"{x.name}_gated"), dtype, x.shape)
    shifted = gs.Variable(unique_name(taken, f"{x.name}_shifted"), dtype, x.shape)
    graph.nodes.append(gs.Node("MatMul" if matrix else "Mul",
                               unique_name(taken, f"{point}_gate_mul"),
                               inputs=[x, mask], outputs=[scaled]))
    graph.nodes.append(gs.Node("Add", unique_name(taken, f"{point}_gate_add"),
                               inputs=[scaled, offset], outputs=[shifted]))
    node.inputs[0] = shifted
    graph.inputs.extend([mask, offset])
    return copy.to_onnx()
