"""merge-shape-chains: Transpose/Reshape/Flatten/Squeeze/Unsqueeze chains collapse."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import pytest
from helpers import apply_pass, build_model, count_ops, run_pass
from onnx import TensorProto, numpy_helper

import graphopt
from graphopt.pass_infra import PassContext
from graphopt.passes.cleanup.chains import MergeShapeChains

F = TensorProto.FLOAT


def i64(name, values):
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def vi(name, shape):
    return oh.make_tensor_value_info(name, F, shape)


def batches(shape, sizes=(1, 2, 5)):
    """Feeds for input ``x`` with the symbolic leading dim set to each of ``sizes``."""
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((n, *shape[1:])).astype(np.float32)} for n in sizes]


def axes_node(op, src, dst, axes, opset, inits):
    """A Squeeze/Unsqueeze in the attribute form (opset < 13) or the input form."""
    if opset < 13:
        return oh.make_node(op, [src], [dst], axes=axes)
    name = f"{dst}_axes"
    inits.append(i64(name, axes))
    return oh.make_node(op, [src, name], [dst])


def merged(proto, feeds=None, **expect_ops):
    after, result = apply_pass(MergeShapeChains(), proto, feeds)
    ops = count_ops(after)
    assert ops == {k: v for k, v in expect_ops.items() if v}, ops
    return after, result


# ---------------------------------------------------------------------- Transpose
def test_transposes_that_compose_to_identity_vanish():
    proto = build_model([oh.make_node("Transpose", ["x"], ["t1"], perm=[0, 2, 3, 1]),
                         oh.make_node("Transpose", ["t1"], ["t2"], perm=[0, 3, 1, 2]),
                         oh.make_node("Relu", ["t2"], ["y"])],
                        [vi("x", ["N", 2, 3, 4])], [vi("y", None)])
    _, result = merged(proto, batches(["N", 2, 3, 4]), Relu=1)
    assert result.stats == {"merged": 0, "cancelled": 1}


def test_transposes_compose():
    proto = build_model([oh.make_node("Transpose", ["x"], ["t1"], perm=[1, 0, 2]),
                         oh.make_node("Transpose", ["t1"], ["t2"], perm=[0, 2, 1]),
                         oh.make_node("Transpose", ["t2"], ["y"], perm=[0, 2, 1])],
                        [vi("x", ["N", 3, 4])], [vi("y", None)])
    after, result = merged(proto, batches(["N", 3, 4]), Transpose=1)
    assert result.stats["merged"] == 2  # the whole chain in one run
    assert list(after.graph.node[0].attribute[0].ints) == [1, 0, 2]
    assert not MergeShapeChains().run(graphopt.load(after), PassContext()).changed


def test_default_perms_reverse():
    proto = build_model([oh.make_node("Transpose", ["x"], ["t1"]),
                         oh.make_node("Transpose", ["t1"], ["t2"]),
                         oh.make_node("Neg", ["t2"], ["y"])],
                        [vi("x", [2, 3, 4])], [vi("y", None)])
    merged(proto, Neg=1)


def test_cancelled_pair_before_a_graph_output_keeps_the_name():
    proto = build_model([oh.make_node("Relu", ["x"], ["r"]),
                         oh.make_node("Transpose", ["r"], ["t1"], perm=[1, 0]),
                         oh.make_node("Transpose", ["t1"], ["y"], perm=[1, 0])],
                        [vi("x", [2, 3])], [vi("y", None)])
    after, _ = merged(proto, Relu=1)
    assert after.graph.node[0].output[0] == "y"


def test_cancelled_pair_on_a_graph_input_leaves_an_identity():
    proto = build_model([oh.make_node("Transpose", ["x"], ["t1"], perm=[1, 0]),
                         oh.make_node("Transpose", ["t1"], ["y"], perm=[1, 0])],
                        [vi("x", [2, 3])], [vi("y", None)])
    merged(proto, Identity=1)


def test_transpose_intermediate_read_elsewhere_is_left_alone():
    proto = build_model([oh.make_node("Transpose", ["x"], ["t1"], perm=[1, 0]),
                         oh.make_node("Transpose", ["t1"], ["t2"], perm=[1, 0]),
                         oh.make_node("Neg", ["t1"], ["n"]),
                         oh.make_node("Relu", ["t2"], ["y"])],
                        [vi("x", [2, 3])], [vi("y", None), vi("n", None)])
    model, result = run_pass(MergeShapeChains(), proto)
    assert not result.changed and count_ops(model.to_onnx())["Transpose"] == 2


def test_transpose_intermediate_that_is_a_graph_output_is_left_alone():
    proto = build_model([oh.make_node("Transpose", ["x"], ["t1"], perm=[1, 0]),
                         oh.make_node("Transpose", ["t1"], ["y"], perm=[1, 0])],
                        [vi("x", [2, 3])], [vi("y", None), vi("t1", None)])
    model, result = run_pass(MergeShapeChains(), proto)
    assert not result.changed and count_ops(model.to_onnx())["Transpose"] == 2


# ---------------------------------------------------------------------- Reshape
def test_reshape_chain_with_dynamic_batch():
    proto = build_model([oh.make_node("Reshape", ["x", "s1"], ["r1"]),
                         oh.make_node("Reshape", ["r1", "s2"], ["r2"]),
                         oh.make_node("Reshape", ["r2", "s3"], ["y"])],
                        [vi("x", ["N", 3, 4])], [vi("y", None)],
                        [i64("s1", [-1, 12]), i64("s2", [-1, 2, 6]), i64("s3", [-1, 4, 3])])
    after, result = merged(proto, batches(["N", 3, 4]), Reshape=1)
    assert result.stats["merged"] == 2
    assert numpy_helper.to_array(after.graph.initializer[0]).tolist() == [-1, 4, 3]


def test_reshape_zero_resolved_from_static_intermediate_dim():
    # x [N, 3, 4] -> [3N, 2, 2] -> shape [2, 0, -1]: the 0 copies the static 2.
    proto = build_model([oh.make_node("Reshape", ["x", "s1"], ["r1"]),
                         oh.make_node("Reshape", ["r1", "s2"], ["y"])],
                        [vi("x", ["N", 3, 4])], [vi("y", [2, 2, "M"])],
                        [i64("s1", [-1, 2, 2]), i64("s2", [2, 0, -1])])
    after, _ = merged(proto, batches(["N", 3, 4], (2, 4)), Reshape=1)
    target = {t.name: numpy_helper.to_array(t).tolist() for t in after.graph.initializer}
    assert [2, 2, -1] in target.values()


def test_reshape_zero_over_a_symbolic_dim_is_left_alone():
    proto = build_model([oh.make_node("Reshape", ["x", "s1"], ["r1"]),
                         oh.make_node("Reshape", ["r1", "s2"], ["y"])],
                        [vi("x", ["N", 3, 4])], [vi("y", None)],
                        [i64("s1", [-1, 4]), i64("s2", [0, 2, 2])])
    model, result = run_pass(MergeShapeChains(), proto)
    assert not result.changed and count_ops(model.to_onnx())["Reshape"] == 2


def test_reshape_with_computed_target_is_left_alone():
    proto = build_model([oh.make_node("Reshape", ["x", "s1"], ["r1"]),
                         oh.make_node("Shape", ["x"], ["s2"]),
                         oh.make_node("Reshape", ["r1", "s2"], ["y"])],
                        [vi("x", ["N", 3, 4])], [vi("y", None)], [i64("s1", [-1, 12])])
    model, result = run_pass(MergeShapeChains(), proto)
    assert not result.changed


@pytest.mark.parametrize("opset", [11, 17])
def test_flatten_squeeze_unsqueeze_then_reshape(opset):
    inits = [i64("s", [-1, 6])]
    proto = build_model([oh.make_node("Flatten", ["x"], ["f"], axis=2),       # [N*3, 4]
                         oh.make_node("Reshape", ["f", "s"], ["a"]),
                         axes_node("Unsqueeze", "x", "u", [1], opset, inits),  # [N, 1, 3, 4]
                         oh.make_node("Reshape", ["u", "s"], ["b"]),
                         axes_node("Squeeze", "x1", "q", [-1], opset, inits),  # [N, 3, 4]
                         oh.make_node("Reshape", ["q", "s"], ["c"])],
                        [vi("x", ["N", 3, 4]), vi("x1", ["N", 3, 4, 1])],
                        [vi("a", None), vi("b", None), vi("c", None)], inits, opset=opset)
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((n, 3, 4)).astype(np.float32),
              "x1": rng.standard_normal((n, 3, 4, 1)).astype(np.float32)} for n in (2, 4)]
    merged(proto, feeds, Reshape=3)


# ---------------------------------------------------------------------- Squeeze/Unsqueeze
@pytest.mark.parametrize("opset", [11, 13, 17])
def test_squeezes_combine(opset):
    inits = []
    proto = build_model([axes_node("Squeeze", "x", "q1", [1], opset, inits),  # [N, 3, 1]
                         axes_node("Squeeze", "q1", "y", [-1], opset, inits)],  # [N, 3]
                        [vi("x", ["N", 1, 3, 1])], [vi("y", None)], inits, opset=opset)
    after, _ = merged(proto, batches(["N", 1, 3, 1]), Squeeze=1)
    node = after.graph.node[0]
    axes = (list(node.attribute[0].ints) if opset < 13 else
            numpy_helper.to_array(next(t for t in after.graph.initializer
                                       if t.name == node.input[1])).tolist())
    assert axes == [1, 3]


@pytest.mark.parametrize("opset", [11, 17])
def test_unsqueezes_combine(opset):
    inits = []
    proto = build_model([axes_node("Unsqueeze", "x", "u1", [0], opset, inits),   # [1, N, 3]
                         axes_node("Unsqueeze", "u1", "u2", [-1], opset, inits),  # [1, N, 3, 1]
                         axes_node("Unsqueeze", "u2", "y", [2], opset, inits)],   # [1,N,1,3,1]
                        [vi("x", ["N", 3])], [vi("y", None)], inits, opset=opset)
    after, result = merged(proto, batches(["N", 3]), Unsqueeze=1)
    assert result.stats["merged"] == 2


@pytest.mark.parametrize("first,second,shape", [("Unsqueeze", "Squeeze", ["N", 3]),
                                                ("Squeeze", "Unsqueeze", ["N", 1, 3])])
@pytest.mark.parametrize("opset", [11, 17])
def test_squeeze_unsqueeze_with_same_axes_cancel(first, second, shape, opset):
    inits = []
    proto = build_model([axes_node(first, "x", "m", [1], opset, inits),
                         axes_node(second, "m", "z", [-2], opset, inits),  # = axis 1
                         oh.make_node("Relu", ["z"], ["y"])],
                        [vi("x", shape)], [vi("y", None)], inits, opset=opset)
    _, result = merged(proto, batches(shape), Relu=1)
    assert result.stats["cancelled"] == 1


def test_squeeze_unsqueeze_with_different_axes_and_dynamic_shape_stay():
    proto = build_model([oh.make_node("Squeeze", ["x", "a1"], ["m"]),
                         oh.make_node("Unsqueeze", ["m", "a0"], ["y"])],
                        [vi("x", ["N", 1, 3])], [vi("y", None)], [i64("a1", [1]), i64("a0", [0])])
    model, result = run_pass(MergeShapeChains(), proto)
    assert not result.changed


def test_squeeze_without_axes_needs_static_shapes():
    proto = build_model([oh.make_node("Squeeze", ["x"], ["m"]),
                         oh.make_node("Squeeze", ["m", "a"], ["y"])],
                        [vi("x", ["N", 1, 3, 1])], [vi("y", ["M", 3])], [i64("a", [-1])])
    model, result = run_pass(MergeShapeChains(), proto)
    assert not result.changed


# ---------------------------------------------------------------------- static chains
def test_static_chain_collapses_to_one_reshape():
    inits = []
    proto = build_model([oh.make_node("Flatten", ["x"], ["f"], axis=1),           # [2, 12]
                         axes_node("Unsqueeze", "f", "u", [1, 3], 17, inits),     # [2,1,12,1]
                         axes_node("Squeeze", "u", "q", [3], 17, inits),          # [2,1,12]
                         oh.make_node("Transpose", ["q"], ["y"], perm=[1, 0, 2])],
                        [vi("x", [2, 3, 4])], [vi("y", None)], inits)
    after, result = merged(proto, Reshape=1, Transpose=1)
    target = [numpy_helper.to_array(t).tolist() for t in after.graph.initializer]
    assert [2, 1, 12] in target


def test_static_chain_back_to_the_input_shape_vanishes():
    proto = build_model([oh.make_node("Flatten", ["x"], ["f"], axis=1),
                         oh.make_node("Reshape", ["f", "s"], ["r"]),
                         oh.make_node("Sigmoid", ["r"], ["y"])],
                        [vi("x", [2, 3, 4])], [vi("y", None)], [i64("s", [2, 3, 4])])
    merged(proto, Sigmoid=1)


def test_dynamic_chain_without_a_rule_stays():
    proto = build_model([oh.make_node("Flatten", ["x"], ["f"], axis=1),
                         oh.make_node("Unsqueeze", ["f", "a"], ["y"])],
                        [vi("x", ["N", 3, 4])], [vi("y", None)], [i64("a", [1])])
    model, result = run_pass(MergeShapeChains(), proto)
    assert not result.changed


# ---------------------------------------------------------------------- subgraphs, manager
def test_chain_inside_an_if_branch():
    then = oh.make_graph([oh.make_node("Transpose", ["x"], ["t1"], perm=[1, 0]),
                          oh.make_node("Transpose", ["t1"], ["t2"], perm=[1, 0]),
                          oh.make_node("Relu", ["t2"], ["t_out"])],
                         "then", [], [vi("t_out", [2, 3])])
    other = oh.make_graph([oh.make_node("Neg", ["x"], ["e_out"])], "else", [],
                          [vi("e_out", [2, 3])])
    proto = build_model([oh.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                        [oh.make_tensor_value_info("c", TensorProto.BOOL, []), vi("x", [2, 3])],
                        [vi("y", [2, 3])])
    feeds = [{"c": np.array(flag), "x": np.random.default_rng(0).standard_normal(
        (2, 3)).astype(np.float32)} for flag in (True, False)]
    merged(proto, feeds, If=1, Relu=1, Neg=1)


def test_manager_pipeline():
    proto = build_model([oh.make_node("Shape", ["x"], ["s"]),
                         oh.make_node("Gather", ["s", "i1"], ["d"], axis=0),
                         oh.make_node("Unsqueeze", ["d", "a0"], ["d1"]),
                         oh.make_node("Concat", ["m1", "d1"], ["target"], axis=0),
                         oh.make_node("Transpose", ["x"], ["t1"], perm=[0, 2, 1]),
                         oh.make_node("Transpose", ["t1"], ["t2"], perm=[0, 2, 1]),
                         oh.make_node("Reshape", ["t2", "flat"], ["r1"]),
                         oh.make_node("Reshape", ["r1", "target"], ["y"])],
                        [vi("x", ["N", 3, 4])], [vi("y", ["M", 4])],
                        [i64("i1", 2), i64("a0", [0]), i64("m1", [-1]), i64("flat", [-1])])
    result = graphopt.optimize(
        proto, passes="fold-shapes,fold-constants,merge-shape-chains,eliminate-dead-code")
    assert result.report["verification"]["ok"] is True
    assert result.report["rolled_back"] == []
    assert count_ops(result.model.to_onnx()) == {"Reshape": 1}
