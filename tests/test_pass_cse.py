"""eliminate-common-subexpressions: repeated computations merge, look-alikes do not."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import pytest
from onnx import TensorProto, numpy_helper

import graphopt
from graphopt.passes.cleanup.cse import EliminateCommonSubexpressions
from helpers import apply_pass, build_model, count_ops, run_pass

F = TensorProto.FLOAT


def vi(name, shape, elem=F):
    return oh.make_tensor_value_info(name, elem, shape)


def const(name, values, dtype=np.float32):
    return numpy_helper.from_array(np.array(values, dtype=dtype), name)


def pair_model(first, second, inits=(), opset=17, x_shape=("N", 4)):
    """x -> first -> a, x -> second -> b, y = a + b."""
    nodes = [first, second, oh.make_node("Add", ["a", "b"], ["y"])]
    return build_model(nodes, [vi("x", list(x_shape))], [vi("y", None)], inits, opset=opset)


def cse(proto, feeds=None):
    return apply_pass(EliminateCommonSubexpressions(), proto, feeds)


def test_duplicate_node_merged():
    proto = pair_model(oh.make_node("Relu", ["x"], ["a"]), oh.make_node("Relu", ["x"], ["b"]))
    after, result = cse(proto)
    assert count_ops(after) == {"Relu": 1, "Add": 1}
    assert result.changed and result.stats == {"merged": 1}


def test_chain_of_duplicates_collapses_in_one_run():
    nodes = [oh.make_node("Relu", ["x"], ["r1"]), oh.make_node("Sigmoid", ["r1"], ["s1"]),
             oh.make_node("Mul", ["s1", "x"], ["a"]),
             oh.make_node("Relu", ["x"], ["r2"]), oh.make_node("Sigmoid", ["r2"], ["s2"]),
             oh.make_node("Mul", ["s2", "x"], ["b"]),
             oh.make_node("Add", ["a", "b"], ["y"])]
    proto = build_model(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 4])], opset=11)
    after, result = cse(proto)
    assert count_ops(after) == {"Relu": 1, "Sigmoid": 1, "Mul": 1, "Add": 1}
    assert result.stats == {"merged": 3}
    _, again = run_pass(EliminateCommonSubexpressions(), after)
    assert not again.changed


@pytest.mark.parametrize("first,second", [
    (oh.make_node("LeakyRelu", ["x"], ["a"], alpha=0.1),
     oh.make_node("LeakyRelu", ["x"], ["b"], alpha=0.2)),
    (oh.make_node("Softmax", ["x"], ["a"], axis=0), oh.make_node("Softmax", ["x"], ["b"], axis=1)),
    (oh.make_node("Relu", ["x"], ["a"]), oh.make_node("Sigmoid", ["x"], ["b"])),
    (oh.make_node("Relu", ["x"], ["a"]), oh.make_node("Relu", ["x2"], ["b"])),
])
def test_different_attributes_or_inputs_kept(first, second):
    nodes = [oh.make_node("Neg", ["x"], ["x2"]), first, second,
             oh.make_node("Add", ["a", "b"], ["y"])]
    proto = build_model(nodes, [vi("x", [2, 4])], [vi("y", [2, 4])])
    after, result = cse(proto)
    assert not result.changed and count_ops(after) == count_ops(proto)


def test_equal_small_constants_count_as_the_same_input():
    proto = pair_model(oh.make_node("Add", ["x", "c1"], ["a"]),
                       oh.make_node("Add", ["x", "c2"], ["b"]),
                       [const("c1", [1, 2, 3, 4]), const("c2", [1, 2, 3, 4])])
    after, result = cse(proto)
    assert count_ops(after) == {"Add": 2} and result.stats == {"merged": 1}


def test_constants_differing_only_in_the_sign_of_zero_kept():
    proto = pair_model(oh.make_node("Add", ["x", "c1"], ["a"]),
                       oh.make_node("Add", ["x", "c2"], ["b"]),
                       [const("c1", [0.0]), const("c2", [-0.0])])
    _, result = cse(proto)
    assert not result.changed


def test_constant_nodes_merge_then_their_readers():
    nodes = [oh.make_node("Constant", [], ["k1"], value=const("v1", [2.0, 3.0, 4.0, 5.0])),
             oh.make_node("Constant", [], ["k2"], value=const("v2", [2.0, 3.0, 4.0, 5.0])),
             oh.make_node("Constant", [], ["z1"], value_float=0.0),
             oh.make_node("Constant", [], ["z2"], value_float=-0.0),
             oh.make_node("Mul", ["x", "k1"], ["m1"]), oh.make_node("Mul", ["x", "k2"], ["m2"]),
             oh.make_node("Add", ["m1", "z1"], ["a"]), oh.make_node("Add", ["m2", "z2"], ["b"]),
             oh.make_node("Add", ["a", "b"], ["y"])]
    proto = build_model(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 4])], opset=13)
    after, result = cse(proto)
    # The two float constants differ in the sign of zero, so their Adds stay apart.
    assert count_ops(after) == {"Constant": 3, "Mul": 1, "Add": 3}
    assert result.stats == {"merged": 2}


def test_omitted_optional_inputs_compare_equal():
    proto = pair_model(oh.make_node("Clip", ["x", "", "hi"], ["a"]),
                       oh.make_node("Clip", ["x", "", "hi"], ["b"]), [const("hi", 0.5)], opset=13)
    after, result = cse(proto)
    assert count_ops(after) == {"Clip": 1, "Add": 1}


def test_multi_output_nodes_merged():
    nodes = [oh.make_node("Split", ["x"], ["p1", "q1"], axis=1, num_outputs=2),
             oh.make_node("Split", ["x"], ["p2", "q2"], axis=1, num_outputs=2),
             oh.make_node("Sub", ["p1", "q2"], ["a"]), oh.make_node("Sub", ["q1", "p2"], ["b"]),
             oh.make_node("Concat", ["a", "b"], ["y"], axis=1)]
    proto = build_model(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 4])], opset=18)
    after, result = cse(proto)
    assert count_ops(after)["Split"] == 1 and result.stats == {"merged": 1}


@pytest.mark.parametrize("op,attrs", [
    ("RandomNormalLike", {}), ("RandomUniformLike", {"seed": 1.0}), ("Bernoulli", {"seed": 2.0}),
])
def test_nondeterministic_ops_never_merged(op, attrs):
    proto = pair_model(oh.make_node(op, ["x"], ["a"], **attrs),
                       oh.make_node(op, ["x"], ["b"], **attrs), x_shape=(2, 4))
    model, result = run_pass(EliminateCommonSubexpressions(), proto)
    assert not result.changed and count_ops(model.to_onnx())[op] == 2


def test_random_generators_without_inputs_never_merged():
    nodes = [oh.make_node("RandomUniform", [], ["a"], shape=[4], seed=3.0),
             oh.make_node("RandomUniform", [], ["b"], shape=[4], seed=3.0),
             oh.make_node("Add", ["a", "b"], ["y"])]
    proto = build_model(nodes, [], [vi("y", [4])])
    _, result = run_pass(EliminateCommonSubexpressions(), proto)
    assert not result.changed


def test_training_dropout_never_merged_inference_dropout_merged():
    train = [const("ratio", 0.5), const("on", True, np.bool_)]
    proto = pair_model(oh.make_node("Dropout", ["x", "ratio", "on"], ["a"]),
                       oh.make_node("Dropout", ["x", "ratio", "on"], ["b"]), train, opset=13)
    _, result = run_pass(EliminateCommonSubexpressions(), proto)
    assert not result.changed
    proto = pair_model(oh.make_node("Dropout", ["x"], ["a"]), oh.make_node("Dropout", ["x"], ["b"]),
                       opset=13)
    after, result = cse(proto)
    assert count_ops(after)["Dropout"] == 1


def test_custom_domain_ops_never_merged():
    nodes = [oh.make_node("Gelu", ["x"], ["a"], domain="com.microsoft"),
             oh.make_node("Gelu", ["x"], ["b"], domain="com.microsoft"),
             oh.make_node("Add", ["a", "b"], ["y"])]
    graph = oh.make_graph(nodes, "g", [vi("x", [4])], [vi("y", [4])])
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17),
                                                oh.make_opsetid("com.microsoft", 1)])
    _, result = run_pass(EliminateCommonSubexpressions(), proto)
    assert not result.changed


def test_duplicate_producing_a_graph_output_hands_over_the_name():
    nodes = [oh.make_node("Relu", ["x"], ["r"]), oh.make_node("Neg", ["r"], ["n"]),
             oh.make_node("Relu", ["x"], ["out"])]
    proto = build_model(nodes, [vi("x", ["N", 4])], [vi("n", ["N", 4]), vi("out", ["N", 4])])
    after, result = cse(proto)
    assert count_ops(after) == {"Relu": 1, "Neg": 1}
    assert [n.output[0] for n in after.graph.node if n.op_type == "Relu"] == ["out"]


def test_graph_output_handed_to_a_tensor_of_unknown_rank_keeps_its_type():
    nodes = [oh.make_node("Reshape", ["x", "s"], ["r"]), oh.make_node("Neg", ["r"], ["n"]),
             oh.make_node("Reshape", ["x", "s"], ["out"])]
    proto = build_model(nodes, [vi("x", [6]), vi("s", ["K"], TensorProto.INT64)],
                        [vi("n", ["a", "b"]), vi("out", ["a", "b"])])
    feeds = [{"x": np.arange(6, dtype=np.float32), "s": np.array([2, 3])}]
    after, result = cse(proto, feeds)
    assert count_ops(after)["Reshape"] == 1
    assert after.graph.output[1].type.tensor_type.elem_type == F


def test_duplicates_that_are_both_graph_outputs_kept():
    nodes = [oh.make_node("Relu", ["x"], ["o1"]), oh.make_node("Relu", ["x"], ["o2"])]
    proto = build_model(nodes, [vi("x", [4])], [vi("o1", [4]), vi("o2", [4])])
    after, result = cse(proto)
    assert not result.changed and count_ops(after) == {"Relu": 2}


def test_inside_if_branches():
    def branch(name):
        nodes = [oh.make_node("Exp", ["x"], [f"{name}1"]), oh.make_node("Exp", ["x"], [f"{name}2"]),
                 oh.make_node("Sub", [f"{name}1", f"{name}2"], [f"{name}3"]),
                 oh.make_node("Exp", ["x"], [f"{name}_out"])]  # hands its output name over
        return oh.make_graph(nodes, name, [], [vi(f"{name}_out", [3]), vi(f"{name}3", [3])])

    def other(i):
        nodes = [oh.make_node("Neg", ["x"], [f"e{i}"]), oh.make_node("Abs", ["x"], [f"f{i}"])]
        return oh.make_graph(nodes, f"e{i}", [], [vi(f"e{i}", [3]), vi(f"f{i}", [3])])

    ifs = [oh.make_node("If", ["c"], [f"y{i}", f"z{i}"], then_branch=branch(f"t{i}"),
                        else_branch=other(i)) for i in (1, 2)]
    nodes = [*ifs, oh.make_node("Add", ["y1", "y2"], ["y"]),
             oh.make_node("Add", ["z1", "z2"], ["z"])]
    proto = build_model(nodes, [vi("x", [3]), vi("c", [], TensorProto.BOOL)],
                        [vi("y", [3]), vi("z", [3])])
    feeds = [{"x": np.array([0.5, -1.0, 2.0], np.float32), "c": np.array(flag)}
             for flag in (True, False)]
    after, result = cse(proto, feeds)
    assert count_ops(after) == {"If": 2, "Exp": 2, "Sub": 2, "Neg": 2, "Abs": 2, "Add": 2}
    assert result.stats == {"merged": 4}


def test_duplicate_read_inside_a_branch():
    then = oh.make_graph([oh.make_node("Neg", ["b"], ["t"])], "then", [], [vi("t", [3])])
    other = oh.make_graph([oh.make_node("Abs", ["a"], ["e"])], "else", [], [vi("e", [3])])
    nodes = [oh.make_node("Exp", ["x"], ["a"]), oh.make_node("Exp", ["x"], ["b"]),
             oh.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    proto = build_model(nodes, [vi("x", [3]), vi("c", [], TensorProto.BOOL)], [vi("y", [3])])
    feeds = [{"x": np.array([0.5, -1.0, 2.0], np.float32), "c": np.array(flag)}
             for flag in (True, False)]
    after, result = cse(proto, feeds)
    assert count_ops(after)["Exp"] == 1


def test_through_the_manager():
    nodes = [oh.make_node("Transpose", ["x"], ["a"], perm=[1, 0]),
             oh.make_node("Transpose", ["x"], ["b"], perm=[1, 0]),
             oh.make_node("MatMul", ["a", "w1"], ["c"]), oh.make_node("MatMul", ["b", "w2"], ["d"]),
             oh.make_node("Add", ["c", "d"], ["y"])]
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    proto = build_model(nodes, [vi("x", [4, "N"])], [vi("y", ["N", 3])],
                        [numpy_helper.from_array(w, "w1"), numpy_helper.from_array(w, "w2")])
    result = graphopt.optimize(proto, passes="merge-duplicate-initializers,"
                                             "eliminate-common-subexpressions")
    assert result.report["verification"]["ok"] is True
    assert not result.report["rolled_back"]
    assert count_ops(result.model.to_onnx()) == {"Transpose": 1, "MatMul": 1, "Add": 1}
