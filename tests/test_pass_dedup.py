"""merge-duplicate-initializers: one initializer per distinct (type, shape, bytes)."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
from onnx import TensorProto, numpy_helper

import graphopt
from graphopt import verify
from graphopt.passes.cleanup.dedup import MergeDuplicateInitializers
from helpers import apply_pass, assert_same_outputs, build_model, run_pass

F = TensorProto.FLOAT


def vi(name, shape, elem=F):
    return oh.make_tensor_value_info(name, elem, shape)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def two_users(w1, w2, x_shape=("N", 4)):
    """y = (x + w1) * w2."""
    nodes = [oh.make_node("Add", ["x", "w1"], ["a"]), oh.make_node("Mul", ["a", "w2"], ["y"])]
    return build_model(nodes, [vi("x", list(x_shape))], [vi("y", None)],
                       [init("w1", w1), init("w2", w2)])


def initializer_names(proto):
    return sorted(t.name for t in proto.graph.initializer)


def test_identical_initializers_merged():
    w = np.linspace(-1, 1, 4, dtype=np.float32)
    after, result = apply_pass(MergeDuplicateInitializers(), two_users(w, w.copy()))
    assert initializer_names(after) == ["w1"]
    assert result.changed and result.stats == {"merged": 1, "bytes_saved": 16}


def test_three_copies_leave_one():
    w = np.full((2, 4), 0.5, np.float32)
    nodes = [oh.make_node("Add", ["x", "w1"], ["a"]), oh.make_node("Mul", ["a", "w2"], ["b"]),
             oh.make_node("Sub", ["b", "w3"], ["y"])]
    proto = build_model(nodes, [vi("x", [2, 4])], [vi("y", [2, 4])],
                        [init("w1", w), init("w2", w), init("w3", w)], opset=11)
    after, result = apply_pass(MergeDuplicateInitializers(), proto)
    assert initializer_names(after) == ["w1"] and result.stats["merged"] == 2


def test_same_bytes_different_type_or_shape_kept():
    zeros32 = np.zeros(4, np.float32)
    others = (np.zeros(4, np.int32), np.zeros((1, 4), np.float32), np.full(4, -0.0, np.float32))
    for other in others:
        nodes = [oh.make_node("Cast", ["w2"], ["w2f"], to=F),
                 oh.make_node("Add", ["x", "w1"], ["a"]), oh.make_node("Mul", ["a", "w2f"], ["y"])]
        proto = build_model(nodes, [vi("x", [1, 4])], [vi("y", None)],
                            [init("w1", zeros32), init("w2", other)])
        after, result = apply_pass(MergeDuplicateInitializers(), proto)
        assert not result.changed and len(after.graph.initializer) == 2


def test_initializer_that_is_a_graph_input_never_merged():
    w = np.ones(4, np.float32)
    nodes = [oh.make_node("Add", ["x", "w1"], ["a"]), oh.make_node("Mul", ["a", "w2"], ["y"])]
    proto = build_model(nodes, [vi("x", [4]), vi("w2", [4])], [vi("y", [4])],
                        [init("w1", w), init("w2", w)], ir_version=8)
    model, result = run_pass(MergeDuplicateInitializers(), proto)
    assert not result.changed
    after = model.to_onnx()
    assert "w2" in [i.name for i in after.graph.input]
    # The override still works on the result.
    feeds = {"x": np.arange(4, dtype=np.float32), "w2": np.full(4, 3.0, np.float32)}
    assert_same_outputs(proto, after, [feeds])
    np.testing.assert_array_equal(verify.run(after, feeds)["y"], (feeds["x"] + 1) * 3)


def test_constant_that_is_a_graph_output_kept():
    w = np.ones(3, np.float32)
    proto = build_model([oh.make_node("Add", ["x", "w1"], ["y"])], [vi("x", [3])],
                        [vi("y", [3]), vi("w2", [3])], [init("w1", w), init("w2", w)])
    after, result = apply_pass(MergeDuplicateInitializers(), proto)
    assert not result.changed and initializer_names(after) == ["w1", "w2"]


def test_initializers_in_subgraphs_merged():
    w = np.array([1.0, 2.0, 3.0], np.float32)
    then = oh.make_graph([oh.make_node("Add", ["x", "wt"], ["t"])], "then", [], [vi("t", [3])],
                         [init("wt", w)])
    other = oh.make_graph([oh.make_node("Mul", ["x", "we"], ["e"])], "else", [], [vi("e", [3])],
                          [init("we", w)])
    nodes = [oh.make_node("Sub", ["x", "w"], ["d"]),
             oh.make_node("If", ["c"], ["i"], then_branch=then, else_branch=other),
             oh.make_node("Add", ["d", "i"], ["y"])]
    proto = build_model(nodes, [vi("x", [3]), vi("c", [], TensorProto.BOOL)], [vi("y", [3])],
                        [init("w", w)])
    feeds = [{"x": np.array([1.0, -2.0, 0.5], np.float32), "c": np.array(flag)}
             for flag in (True, False)]
    after, result = apply_pass(MergeDuplicateInitializers(), proto, feeds)
    assert result.stats == {"merged": 2, "bytes_saved": 24}
    used = {name for n in after.graph.node for a in n.attribute if a.type == a.GRAPH
            for sub in [a.g] for node in sub.node for name in node.input}
    assert used == {"x", "w"}


def test_through_the_manager():
    w = np.random.default_rng(0).standard_normal((3, 1, 4)).astype(np.float32)
    result = graphopt.optimize(two_users(w, w.copy()), passes="merge-duplicate-initializers")
    assert result.report["verification"]["ok"] is True
    assert not result.report["rolled_back"]
    assert initializer_names(result.model.to_onnx()) == ["w1"]


def test_same_first_bytes_are_hashed_whole():
    """Constants hashed by their first 4 KiB first: two that share those bytes but differ
    later stay apart; two equal throughout merge."""
    from graphopt.passes.cleanup import dedup

    w = np.ones((2, 2048), np.float32)  # 16 KiB, the first 4 KiB all ones
    late = w.copy()
    late[1, -1] = 2.0
    assert dedup.PREFIX_BYTES < w.nbytes
    after, result = apply_pass(MergeDuplicateInitializers(), two_users(w, late, ("N", 2048)))
    assert initializer_names(after) == ["w1", "w2"] and not result.changed
    after, result = apply_pass(MergeDuplicateInitializers(), two_users(w, w.copy(),
                                                                       ("N", 2048)))
    assert initializer_names(after) == ["w1"] and result.stats["merged"] == 1
