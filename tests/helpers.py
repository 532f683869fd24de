"""Shared test helpers (append only: several test modules use this file)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx.helper as oh

from graphopt import verify
from graphopt.ir import Model, load
from graphopt.pass_infra import Pass, PassContext, PassResult


def build_model(nodes, inputs, outputs, initializers=(), opset: int = 17,
                ir_version: int | None = None) -> onnx.ModelProto:
    """A checked model from onnx.helper parts; ``inputs``/``outputs`` are value infos (an
    output made with shape ``None`` gets its inferred shape)."""
    graph = oh.make_graph(nodes, "g", inputs, outputs, list(initializers))
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    if ir_version is not None:
        proto.ir_version = ir_version
    if any(not o.type.tensor_type.HasField("shape") for o in proto.graph.output):
        inferred = onnx.shape_inference.infer_shapes(proto).graph.output
        del proto.graph.output[:]
        proto.graph.output.extend(inferred)
    onnx.checker.check_model(proto)
    return proto


def count_ops(proto: onnx.ModelProto) -> Counter:
    """Op types over the main graph and every subgraph."""
    counts: Counter = Counter()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                for sub in attr.graphs:
                    visit(sub)

    visit(proto.graph)
    return counts


def run_pass(p: Pass, proto: onnx.ModelProto) -> tuple[Model, PassResult]:
    """Run ``p`` the way the manager does: on the loaded, shape-inferred model."""
    model = load(proto)
    model.infer_shapes()
    result = p.run(model, PassContext())
    assert isinstance(result, PassResult)
    return model, result


def apply_pass(p: Pass, proto: onnx.ModelProto,
               feeds: list[verify.Feeds] | None = None) -> tuple[onnx.ModelProto, PassResult]:
    """Run ``p``, then check the result: it passes the ONNX checker, keeps its output
    names and gives exactly the original's outputs in ONNX Runtime (random inputs unless
    ``feeds`` are given)."""
    model, result = run_pass(p, proto)
    after = model.to_onnx()
    onnx.checker.check_model(after)
    assert [o.name for o in after.graph.output] == [o.name for o in proto.graph.output]
    assert_same_outputs(proto, after, feeds)
    return after, result


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto,
                        feeds: list[verify.Feeds] | None = None) -> None:
    for batch in feeds or verify.probe_inputs(before, count=2):
        expected, got = verify.run(before, batch), verify.run(after, batch)
        assert verify.compare(expected, got).ok, verify.compare(expected, got).summary()
        for name, value in expected.items():  # lossless cleanups keep values exactly
            np.testing.assert_array_equal(got[name], value, err_msg=name)


def apply_passes(proto: onnx.ModelProto, *passes: Pass, ctx: PassContext | None = None,
                 batches=(1, 3), rtol: float = 1e-4, atol: float = 1e-5):
    """Run ``passes`` in order the way the manager does (loaded, shape-inferred model),
    then check the result: ONNX checker, strict shape inference, output names kept, and
    outputs within rtol/atol of the original in ONNX Runtime, with every symbolic
    dimension set to each size in ``batches``. Returns (result proto, [PassResult])."""
    model = load(proto)
    model.infer_shapes()
    results = [p.run(model, ctx or PassContext()) for p in passes]
    after = model.to_onnx()
    onnx.checker.check_model(after)
    onnx.shape_inference.infer_shapes(after, strict_mode=True)
    assert [o.name for o in after.graph.output] == [o.name for o in proto.graph.output]
    for size in batches:
        for feeds in verify.probe_inputs(proto, count=2, seed=size, symbolic_size=size):
            diff = verify.compare(verify.run(proto, feeds), verify.run(after, feeds),
                                  verify.Tolerance(rtol=rtol, atol=atol))
            assert diff.ok, diff.summary()
    return after, results


def assert_pass_unchanged(proto: onnx.ModelProto, p: Pass,
                          ctx: PassContext | None = None) -> None:
    """``p`` reports no change and leaves the op histogram as it was."""
    model = load(proto)
    model.infer_shapes()
    before = count_ops(model.to_onnx())
    result = p.run(model, ctx or PassContext())
    assert not result.changed, result.stats
    assert count_ops(model.to_onnx()) == before
