"""fold-reshape-targets: computed Reshape targets become constants when shapes allow."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
from onnx import TensorProto, numpy_helper

import graphopt
from graphopt import verify
from graphopt.ir import load
from graphopt.pass_infra import PassContext
from graphopt.passes.cleanup.reshape import FoldReshapeTargets


def int64(name, values):
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def head_split_model(allowzero: int = 0, opset: int = 17) -> onnx.ModelProto:
    """[B, S, 64] -> [B, S, 4, 16] with the target computed from Shape (as BERT exports do)."""
    nodes = [
        oh.make_node("Shape", ["x"], ["s"]),
        oh.make_node("Gather", ["s", "i0"], ["b"], axis=0),
        oh.make_node("Gather", ["s", "i1"], ["q"], axis=0),
        oh.make_node("Unsqueeze", ["b", "ax0"], ["b1"]),
        oh.make_node("Unsqueeze", ["q", "ax0"], ["q1"]),
        oh.make_node("Concat", ["b1", "q1", "heads"], ["target"], axis=0),
        oh.make_node("Reshape", ["x", "target"], ["y"], **({"allowzero": 1} if allowzero else {})),
    ]
    graph = oh.make_graph(
        nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 64])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)],
        [int64("i0", 0), int64("i1", 1), int64("ax0", [0]), int64("heads", [4, 16])])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])


def flatten_pairs_model() -> onnx.ModelProto:
    """[B, S, 64] -> [B*S, 64]: the first output dimension is new, so it becomes -1."""
    nodes = [
        oh.make_node("Shape", ["x"], ["s"]),
        oh.make_node("Gather", ["s", "i0"], ["b"], axis=0),
        oh.make_node("Gather", ["s", "i1"], ["q"], axis=0),
        oh.make_node("Mul", ["b", "q"], ["bq"]),
        oh.make_node("Unsqueeze", ["bq", "ax0"], ["n"]),
        oh.make_node("Concat", ["n", "d"], ["target"], axis=0),
        oh.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    graph = oh.make_graph(
        nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 64])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 2)],
        [int64("i0", 0), int64("i1", 1), int64("ax0", [0]), int64("d", [64])])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def fold(proto):
    model = load(proto)
    result = FoldReshapeTargets().run(model, PassContext())
    reshape = next(n for n in model.graph.nodes if n.op == "Reshape")
    target = reshape.inputs[1]
    value = np.asarray(target.values).tolist() if hasattr(target, "values") else None
    return model, result, value


def check_outputs(proto, model, shapes):
    optimized = model.to_onnx()
    rng = np.random.default_rng(0)
    for shape in shapes:
        x = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_array_equal(verify.run(proto, {"x": x})["y"],
                                      verify.run(optimized, {"x": x})["y"])


def test_head_split_target_copies_symbolic_dims():
    proto = head_split_model()
    model, result, value = fold(proto)
    assert result.changed and value == [0, 0, 4, 16]
    check_outputs(proto, model, [(1, 5, 64), (3, 7, 64)])


def test_new_symbolic_dim_becomes_minus_one():
    proto = flatten_pairs_model()
    model, result, value = fold(proto)
    assert result.changed and value == [-1, 64]
    check_outputs(proto, model, [(1, 5, 64), (3, 7, 64)])


def test_allowzero_never_copies_dims():
    _, result, value = fold(head_split_model(allowzero=1, opset=18))
    assert not result.changed and value is None  # two symbolic dims, and 0 means zero
    proto = flatten_pairs_model()
    proto.graph.node[-1].attribute.append(oh.make_attribute("allowzero", 1))
    proto.opset_import[0].version = 18
    model, result, value = fold(proto)
    assert result.changed and value == [-1, 64]
    check_outputs(proto, model, [(1, 5, 64), (3, 7, 64)])


def test_two_unknown_dims_are_left_alone():
    # [B, S, 64] -> [S, B, 64] computed from Shape: both leading dims move, so neither is
    # a copy (0) and two would need -1.
    proto = head_split_model()
    concat = proto.graph.node[5]
    concat.input[:] = ["q1", "b1", "d64"]
    proto.graph.initializer.append(int64("d64", [64]))
    del proto.graph.output[0].type.tensor_type.shape.dim[3]
    _, result, value = fold(proto)
    assert not result.changed and value is None


def test_default_pipeline_removes_the_shape_arithmetic():
    result = graphopt.optimize(head_split_model())
    ops = [n.op for n in result.model.graph.nodes]
    assert ops == ["Reshape"]
    assert result.report["verification"]["ok"] is True
    out = result.model.to_onnx()
    assert [d.dim_param for d in out.graph.input[0].type.tensor_type.shape.dim[:2]] == ["B", "S"]
    check_outputs(head_split_model(), result.model, [(2, 3, 64), (1, 9, 64)])


def test_symbolic_inference_only_for_targets_known_shapes_leave_open(monkeypatch):
    """A target the model's own (ONNX-inferred) shapes settle is folded without ONNX
    Runtime's symbolic inference; one they leave open still gets it."""
    import graphopt.ir

    calls = []
    real = graphopt.ir.symbolic_shapes
    monkeypatch.setattr(graphopt.ir, "symbolic_shapes",
                        lambda proto: calls.append(1) or real(proto))
    static = flatten_pairs_model()
    static.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 3
    static.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 5
    model = load(static)
    model.infer_shapes()  # what the pass manager's checks leave on the graph
    result = FoldReshapeTargets().run(model, PassContext())
    target = next(n for n in model.graph.nodes if n.op == "Reshape").inputs[1]
    assert result.changed and np.asarray(target.values).tolist() == [15, 64]
    assert calls == []
    check_outputs(static, model, [(3, 5, 64)])
    model, result, value = fold(flatten_pairs_model())  # [B*S, 64]: needs symbolic dims
    assert result.changed and value == [-1, 64] and calls == [1]


def test_a_minus_one_for_a_named_dimension_needs_no_symbolic_inference(monkeypatch):
    """``x.view(x.size(0), -1)`` as a dynamo export writes it (allowzero=1, so the
    dynamic batch cannot be copied as 0): the target becomes [-1, 64] from the model's
    own shapes; symbolic inference could not make the batch a number, so it is not run."""
    import graphopt.ir

    calls = []
    real = graphopt.ir.symbolic_shapes
    monkeypatch.setattr(graphopt.ir, "symbolic_shapes",
                        lambda proto: calls.append(1) or real(proto))
    nodes = [
        oh.make_node("Shape", ["x"], ["s"]),
        oh.make_node("Gather", ["s", "i0"], ["b"], axis=0),
        oh.make_node("Unsqueeze", ["b", "ax0"], ["b1"]),
        oh.make_node("Concat", ["b1", "d"], ["target"], axis=0),
        oh.make_node("Reshape", ["x", "target"], ["y"], allowzero=1),
    ]
    graph = oh.make_graph(
        nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 4, 4])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 2)],
        [int64("i0", 0), int64("ax0", [0]), int64("d", [64])])
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model = load(proto)
    model.infer_shapes()
    assert next(n for n in model.graph.nodes if n.op == "Reshape").outputs[0].shape == \
        ["batch", 64]
    result = FoldReshapeTargets().run(model, PassContext())
    target = next(n for n in model.graph.nodes if n.op == "Reshape").inputs[1]
    assert result.changed and np.asarray(target.values).tolist() == [-1, 64]
    assert calls == []
    check_outputs(proto, model, [(3, 4, 4, 4), (1, 4, 4, 4)])
