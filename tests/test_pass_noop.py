"""eliminate-identity and eliminate-noops: removed where provably a copy, kept otherwise."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import pytest
from onnx import TensorProto, numpy_helper

import graphopt
from graphopt.passes.cleanup.noop import EliminateIdentity, EliminateNoOps
from helpers import apply_pass, build_model, count_ops, run_pass

F, I64 = TensorProto.FLOAT, TensorProto.INT64
INT64_MAX, INT64_MIN = np.iinfo(np.int64).max, np.iinfo(np.int64).min


def vi(name, shape, elem=F):
    return oh.make_tensor_value_info(name, elem, shape)


def const(name, values, dtype=np.float32):
    return numpy_helper.from_array(np.array(values, dtype=dtype), name)


def unary(op_nodes, x_shape, opset, inits=(), y_shape=None, elem=F, y_elem=None):
    """x -> op_nodes (reading "x", writing "t") -> Relu/Neg -> y, so the no-op is inside."""
    tail = oh.make_node("Neg" if elem != TensorProto.BOOL else "Not", ["t"], ["y"])
    return build_model([*op_nodes, tail], [vi("x", x_shape, elem)],
                       [vi("y", y_shape, y_elem or elem)], inits, opset=opset)


def cond_feeds(**inputs):
    """Two batches, one per If branch."""
    return [{**inputs, "c": np.array(flag)} for flag in (True, False)]


# ---------------------------------------------------------------------- eliminate-identity
def test_identity_chain_removed_and_output_name_kept():
    nodes = [oh.make_node("Identity", ["x"], ["a"]), oh.make_node("Relu", ["a"], ["b"]),
             oh.make_node("Identity", ["b"], ["y"])]
    proto = build_model(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 4])])
    after, result = apply_pass(EliminateIdentity(), proto)
    assert count_ops(after) == {"Relu": 1}
    assert result.changed and result.stats == {"Identity": 2}
    assert after.graph.node[0].output[0] == "y"


def test_identity_from_input_to_output_stays():
    proto = build_model([oh.make_node("Identity", ["x"], ["y"])], [vi("x", [3])], [vi("y", [3])])
    after, result = apply_pass(EliminateIdentity(), proto)
    assert not result.changed and count_ops(after) == {"Identity": 1}


@pytest.mark.parametrize("opset,dropout", [
    (9, oh.make_node("Dropout", ["x"], ["t"], ratio=0.5)),
    (11, oh.make_node("Dropout", ["x"], ["t", "unused_mask"])),
    (13, oh.make_node("Dropout", ["x", "ratio", "train"], ["t"])),
    (17, oh.make_node("Dropout", ["x"], ["t", "unused_mask"])),
])
def test_inference_dropout_removed(opset, dropout):
    inits = [const("ratio", 0.5), const("train", False, np.bool_)] if opset == 13 else []
    proto = unary([dropout], ["N", 4], opset, inits, ["N", 4])
    after, result = apply_pass(EliminateIdentity(), proto)
    assert count_ops(after) == {"Neg": 1} and result.stats == {"Dropout": 1}


def test_dropout_whose_mask_is_used_stays():
    nodes = [oh.make_node("Dropout", ["x"], ["t", "mask"]),
             oh.make_node("Cast", ["mask"], ["m"], to=F), oh.make_node("Add", ["t", "m"], ["y"])]
    proto = build_model(nodes, [vi("x", [2, 4])], [vi("y", [2, 4])], opset=13)
    after, result = apply_pass(EliminateIdentity(), proto)
    assert not result.changed and count_ops(after)["Dropout"] == 1


def test_dropout_in_training_mode_stays():
    train_const = [oh.make_node("Dropout", ["x", "ratio", "train"], ["t"])]
    proto = unary(train_const, [2, 4], 13, [const("ratio", 0.0), const("train", True, np.bool_)])
    _, result = run_pass(EliminateIdentity(), proto)
    assert not result.changed
    runtime_mode = build_model([oh.make_node("Dropout", ["x", "", "train"], ["y"])],
                               [vi("x", [2, 4]), vi("train", [], TensorProto.BOOL)],
                               [vi("y", [2, 4])], opset=13)
    _, result = run_pass(EliminateIdentity(), runtime_mode)
    assert not result.changed


def if_model(then_nodes, then_out, else_nodes, else_out, main_nodes=(), outputs=("y",)):
    then = oh.make_graph(then_nodes, "then", [], [vi(then_out, [3])])
    other = oh.make_graph(else_nodes, "else", [], [vi(else_out, [3])])
    nodes = [*main_nodes, oh.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    return build_model(nodes, [vi("x", [3]), vi("c", [], TensorProto.BOOL)],
                       [vi(name, [3]) for name in outputs])


def test_identity_in_if_branches():
    # then: Identity inside the branch, and an Identity producing the branch output;
    # else: an Identity of an outer-scope value that is also a main-graph output.
    proto = if_model([oh.make_node("Identity", ["x"], ["i"]), oh.make_node("Neg", ["i"], ["n"]),
                      oh.make_node("Identity", ["n"], ["t"])], "t",
                     [oh.make_node("Identity", ["a"], ["e"])], "e",
                     main_nodes=[oh.make_node("Abs", ["x"], ["a"])], outputs=("y", "a"))
    feeds = cond_feeds(x=np.array([-1.0, 2.0, -3.0], np.float32))
    after, result = apply_pass(EliminateIdentity(), proto, feeds)
    assert result.stats == {"Identity": 2}
    assert count_ops(after)["Identity"] == 1  # the outer value keeps its own name
    branches = {a.name: a.g for a in after.graph.node[-1].attribute}
    assert [o.name for o in branches["then_branch"].output] == ["t"]
    assert [o.name for o in branches["else_branch"].output] == ["e"]


def test_identity_read_only_inside_a_branch():
    proto = if_model([oh.make_node("Neg", ["i"], ["t"])], "t", [oh.make_node("Abs", ["i"], ["e"])],
                     "e", main_nodes=[oh.make_node("Identity", ["x"], ["i"])])
    feeds = cond_feeds(x=np.array([-1.0, 2.0, -3.0], np.float32))
    after, result = apply_pass(EliminateIdentity(), proto, feeds)
    assert result.stats == {"Identity": 1} and "Identity" not in count_ops(after)


def test_identity_in_loop_body():
    body = oh.make_graph(
        [oh.make_node("Identity", ["cond_in"], ["cond_out"]),
         oh.make_node("Identity", ["v_in"], ["v_id"]),
         oh.make_node("Add", ["v_id", "x"], ["v_out"])],
        "body", [vi("i", [], I64), vi("cond_in", [], TensorProto.BOOL), vi("v_in", [3])],
        [vi("cond_out", [], TensorProto.BOOL), vi("v_out", [3])])
    nodes = [oh.make_node("Loop", ["trips", "", "x"], ["y"], body=body)]
    proto = build_model(nodes, [vi("x", [3])], [vi("y", [3])], [const("trips", 3, np.int64)])
    after, result = apply_pass(EliminateIdentity(), proto)
    # The cond Identity copies a body input to a body output: it must stay.
    assert result.stats == {"Identity": 1} and count_ops(after)["Identity"] == 1


# ---------------------------------------------------------------------- eliminate-noops
def cast(to):
    return oh.make_node("Cast", ["x"], ["t"], to=to)


def node(op, inputs, **attrs):
    return oh.make_node(op, ["x", *inputs], ["t"], **attrs)


def slice_inputs(starts, ends, axes=None, steps=None):
    names, inits = ["st", "en"], [const("st", starts, np.int64), const("en", ends, np.int64)]
    for name, value in (("ax", axes), ("sp", steps)):
        if value is not None:
            names.append(name)
            inits.append(const(name, value, np.int64))
    return names, inits


# (id, opset, no-op nodes reading x and writing t, initializers, x shape, removed op);
# x is int64 in the "-int" cases, float otherwise.
REMOVED = [
    ("cast-same-9", 9, [cast(F)], [], ["N", 4], "Cast"),
    ("cast-same-int", 17, [cast(I64)], [], [2, 3], "Cast"),
    ("castlike-same", 15, [node("CastLike", ["k"])], [const("k", [0.0])], ["N", 4], "CastLike"),
    ("reshape-static", 9, [node("Reshape", ["s"])], [const("s", [2, 3, 4], np.int64)],
     [2, 3, 4], "Reshape"),
    ("reshape-minus-one", 17, [node("Reshape", ["s"])], [const("s", [-1, 3, 4], np.int64)],
     ["N", 3, 4], "Reshape"),
    ("reshape-copy-zeros", 14, [node("Reshape", ["s"])], [const("s", [0, 0, 4], np.int64)],
     ["N", "S", 4], "Reshape"),
    ("transpose-identity", 9, [node("Transpose", [], perm=[0, 1, 2])], [], ["N", 3, 4],
     "Transpose"),
    ("pad-attr-9", 9, [node("Pad", [], pads=[0, 0, 0, 0])], [], ["N", 4], "Pad"),
    ("pad-input-11", 11, [node("Pad", ["p"])], [const("p", [0, 0, 0, 0], np.int64)], [2, 4],
     "Pad"),
    ("pad-reflect-13", 13, [node("Pad", ["p"], mode="reflect")],
     [const("p", [0, 0, 0, 0], np.int64)], [2, 4], "Pad"),
    ("pad-axes-18", 18, [node("Pad", ["p", "", "a"])],
     [const("p", [0, 0], np.int64), const("a", [1], np.int64)], ["N", 4], "Pad"),
    ("slice-attr-9", 9, [node("Slice", [], starts=[0], ends=[INT64_MAX], axes=[1])], [],
     ["N", 4], "Slice"),
    ("slice-full-13", 13, [node("Slice", slice_inputs([0, 0], [2, 10])[0])],
     slice_inputs([0, 0], [2, 10])[1], [2, 4], "Slice"),
    ("slice-sentinels-13", 13, [node("Slice", slice_inputs([INT64_MIN], [INT64_MAX], [0], [1])[0])],
     slice_inputs([INT64_MIN], [INT64_MAX], [0], [1])[1], ["N", 4], "Slice"),
    ("slice-negative-17", 17, [node("Slice", slice_inputs([-4], [4], [-1])[0])],
     slice_inputs([-4], [4], [-1])[1], ["N", 4], "Slice"),
    ("mul-ones-broadcast", 17, [node("Mul", ["k"])], [const("k", [[1, 1, 1, 1]])],
     ["N", 3, 4], "Mul"),
    ("mul-ones-first", 9, [oh.make_node("Mul", ["k", "x"], ["t"])], [const("k", 1.0)],
     ["N", 4], "Mul"),
    ("div-ones", 13, [node("Div", ["k"])], [const("k", [1, 1, 1, 1])], [2, 4], "Div"),
    ("add-zeros-first", 17, [oh.make_node("Add", ["k", "x"], ["t"])], [const("k", [[0], [0]])],
     [2, 4], "Add"),
    ("sub-zeros", 11, [node("Sub", ["k"])], [const("k", 0.0)], ["N", 4], "Sub"),
    ("add-zero-int", 17, [node("Add", ["k"])], [const("k", [0], np.int64)], ["N", 3], "Add"),
    ("expand-same", 13, [node("Expand", ["s"])], [const("s", [2, 3], np.int64)], [2, 3],
     "Expand"),
    ("expand-ones", 17, [node("Expand", ["s"])], [const("s", [1, 1], np.int64)], ["N", 3],
     "Expand"),
    ("squeeze-all-none-13", 13, [node("Squeeze", [])], [], [2, 3], "Squeeze"),
    ("squeeze-all-none-11", 11, [node("Squeeze", [])], [], [2, 3], "Squeeze"),
    ("unsqueeze-empty-13", 13, [node("Unsqueeze", ["a"])], [const("a", [], np.int64)], [2, 3],
     "Unsqueeze"),
    ("concat-one", 9, [node("Concat", [], axis=0)], [], ["N", 3], "Concat"),
    ("split-one-11", 11, [node("Split", [], axis=1, split=[3])], [], ["N", 3], "Split"),
    ("split-one-18", 18, [node("Split", [], axis=1, num_outputs=1)], [], ["N", 3], "Split"),
]


@pytest.mark.parametrize("case,opset,nodes,inits,shape,op", REMOVED,
                         ids=[case[0] for case in REMOVED])
def test_noop_removed(case, opset, nodes, inits, shape, op):
    proto = unary(nodes, shape, opset, inits, elem=I64 if case.endswith("-int") else F)
    after, result = apply_pass(EliminateNoOps(), proto)
    assert op not in count_ops(after)
    assert result.changed and result.stats == {op: 1}


# (id, opset, nodes, initializers, x shape): look like no-ops but are not
KEPT = [
    ("cast-to-double", 17, [cast(TensorProto.DOUBLE)], [], [2, 3]),
    ("reshape-changes", 13, [node("Reshape", ["s"])], [const("s", [6, 4], np.int64)], [2, 3, 4]),
    ("reshape-symbolic-other", 17, [node("Reshape", ["s"])], [const("s", [-1, 0, 4], np.int64)],
     ["N", "S", 4]),
    ("reshape-allowzero", 14, [node("Reshape", ["s"], allowzero=1)],
     [const("s", [0, 3], np.int64)], ["N", 3]),
    ("transpose-swap", 13, [node("Transpose", [], perm=[1, 0])], [], [3, 3]),
    ("transpose-default", 13, [node("Transpose", [])], [], [3, 3]),
    ("pad-nonzero", 13, [node("Pad", ["p"])], [const("p", [0, 1, 0, 0], np.int64)], [2, 4]),
    ("slice-step-2", 13, [node("Slice", slice_inputs([0], [INT64_MAX], [1], [2])[0])],
     slice_inputs([0], [INT64_MAX], [1], [2])[1], [2, 4]),
    ("slice-start-1", 9, [node("Slice", [], starts=[1], ends=[INT64_MAX], axes=[1])], [], [2, 4]),
    ("slice-short-end", 13, [node("Slice", slice_inputs([0], [3], [1])[0])],
     slice_inputs([0], [3], [1])[1], [2, 4]),
    ("slice-end-dynamic-dim", 13, [node("Slice", slice_inputs([0], [8], [0])[0])],
     slice_inputs([0], [8], [0])[1], ["N", 4]),
    ("slice-reverse", 13, [node("Slice", slice_inputs([-1], [INT64_MIN], [1], [-1])[0])],
     slice_inputs([-1], [INT64_MIN], [1], [-1])[1], [2, 4]),
    ("mul-ones-grows-rank", 17, [node("Mul", ["k"])], [const("k", np.ones((2, 3, 4)))], [3, 4]),
    ("mul-ones-grows-dim", 17, [node("Mul", ["k"])], [const("k", np.ones((3, 4)))], [1, 4]),
    ("mul-ones-unknown-dim", 17, [node("Mul", ["k"])], [const("k", np.ones((1, 4)))],
     ["N", "C"]),
    ("mul-twos", 17, [node("Mul", ["k"])], [const("k", [1, 2, 1, 1])], [2, 4]),
    ("sub-zero-first", 17, [oh.make_node("Sub", ["k", "x"], ["t"])], [const("k", 0.0)], [2, 4]),
    ("div-one-first", 17, [oh.make_node("Div", ["k", "x"], ["t"])], [const("k", 1.0)], [2, 4]),
    ("expand-grows", 13, [node("Expand", ["s"])], [const("s", [2, 2, 3], np.int64)], [2, 3]),
    ("expand-dynamic-dim", 13, [node("Expand", ["s"])], [const("s", [3, 1], np.int64)], ["N", 1]),
    ("squeeze-ones-dim", 13, [node("Squeeze", [])], [], [2, 1, 3]),
    ("squeeze-axes", 11, [node("Squeeze", [], axes=[1])], [], [2, 1, 3]),
    ("unsqueeze-axes", 13, [node("Unsqueeze", ["a"])], [const("a", [0], np.int64)], [2, 3]),
]


@pytest.mark.parametrize("opset,nodes,inits,shape", [case[1:] for case in KEPT],
                         ids=[case[0] for case in KEPT])
def test_near_miss_kept(opset, nodes, inits, shape):
    proto = unary(nodes, shape, opset, inits,
                  y_elem=TensorProto.DOUBLE if nodes[0].op_type == "Cast" else None)
    model, result = run_pass(EliminateNoOps(), proto)
    assert not result.changed and count_ops(model.to_onnx()) == count_ops(proto)


def test_castlike_to_another_type_kept():
    proto = unary([node("CastLike", ["k"])], ["N", 4], 15, [const("k", [0], np.int64)],
                  y_elem=I64)
    model, result = run_pass(EliminateNoOps(), proto)
    assert not result.changed and count_ops(model.to_onnx())["CastLike"] == 1


def test_scalar_one_removed_even_when_the_rank_is_unknown():
    nodes = [oh.make_node("Reshape", ["x", "s"], ["r"]), oh.make_node("Mul", ["r", "one"], ["y"])]
    proto = build_model(nodes, [vi("x", [2, 3]), vi("s", ["K"], I64)], [vi("y", ["a", "b"])],
                        [const("one", 1.0)])
    feeds = [{"x": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.array([3, 2])}]
    after, result = apply_pass(EliminateNoOps(), proto, feeds)
    assert result.stats == {"Mul": 1}


def test_squeeze_of_dynamic_shape_kept():
    # Without axes Squeeze drops every 1-dim, and N may be 1 at run time.
    proto = unary([node("Squeeze", [])], ["N", 3], 13, y_shape=["a", "b"])
    _, result = run_pass(EliminateNoOps(), proto)
    assert not result.changed


def test_concat_of_several_inputs_kept():
    proto = build_model([oh.make_node("Concat", ["x", "x"], ["y"], axis=0)], [vi("x", [2])],
                        [vi("y", [4])])
    after, result = apply_pass(EliminateNoOps(), proto)
    assert not result.changed


def test_noop_between_input_and_output_stays():
    proto = build_model([oh.make_node("Cast", ["x"], ["y"], to=F)], [vi("x", [2])],
                        [vi("y", [2])])
    after, result = apply_pass(EliminateNoOps(), proto)
    assert not result.changed and count_ops(after) == {"Cast": 1}


def test_noop_producing_graph_output_renames_its_source():
    nodes = [oh.make_node("Relu", ["x"], ["r"]),
             oh.make_node("Transpose", ["r"], ["y"], perm=[0, 1])]
    proto = build_model(nodes, [vi("x", ["N", 2])], [vi("y", ["N", 2])])
    after, result = apply_pass(EliminateNoOps(), proto)
    assert count_ops(after) == {"Relu": 1} and after.graph.node[0].output[0] == "y"


def test_noops_in_if_branches():
    # then: a Mul by one inside the branch (removed); else: a Cast of an outer value to its
    # own type as the branch output (kept: the outer value cannot be renamed).
    proto = if_model([oh.make_node("Constant", [], ["one"], value_float=1.0),
                      oh.make_node("Mul", ["x", "one"], ["m"]),
                      oh.make_node("Neg", ["m"], ["t"])], "t",
                     [oh.make_node("Cast", ["a"], ["e"], to=F)], "e",
                     main_nodes=[oh.make_node("Abs", ["x"], ["a"])], outputs=("y", "a"))
    feeds = cond_feeds(x=np.array([-1.0, 2.0, -3.0], np.float32))
    after, result = apply_pass(EliminateNoOps(), proto, feeds)
    assert result.stats == {"Mul": 1} and count_ops(after)["Cast"] == 1


# ---------------------------------------------------------------------- through the manager
def test_through_the_manager():
    nodes = [oh.make_node("Identity", ["x"], ["a"]),
             oh.make_node("Dropout", ["a"], ["b"]),
             oh.make_node("Mul", ["b", "one"], ["c"]),
             oh.make_node("Reshape", ["c", "shape"], ["d"]),
             oh.make_node("Transpose", ["d"], ["e"], perm=[0, 1, 2]),
             oh.make_node("Relu", ["e"], ["y"])]
    proto = build_model(nodes, [vi("x", ["N", 3, 4])], [vi("y", ["N", 3, 4])],
                        [const("one", [1.0]), const("shape", [-1, 3, 4], np.int64)])
    result = graphopt.optimize(proto, passes="eliminate-identity,eliminate-noops")
    assert result.report["verification"]["ok"] is True
    assert not result.report["rolled_back"]
    assert count_ops(result.model.to_onnx()) == {"Relu": 1}
