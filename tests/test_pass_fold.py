"""fold-constants and fold-shapes: what folds, what must not, and outputs unchanged."""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from helpers import apply_pass, assert_same_outputs, build_model, count_ops, run_pass
from onnx import TensorProto, numpy_helper

import graphopt
from graphopt import verify
from graphopt.errors import ModelError, UsageError
from graphopt.ir import load
from graphopt.pass_infra import PassContext
from graphopt.passes.cleanup.fold import FoldConstants, FoldShapes

F = TensorProto.FLOAT


def const(name, values, dtype=np.float32):
    return numpy_helper.from_array(np.array(values, dtype=dtype), name)


def i64(name, values):
    return const(name, values, np.int64)


def vi(name, shape, elem=F):
    return oh.make_tensor_value_info(name, elem, shape)


def initializer_names(proto, graph=None):
    return {t.name for t in (graph or proto.graph).initializer}


# ---------------------------------------------------------------------- fold-constants
def test_folds_constant_subexpression_and_constant_nodes():
    proto = build_model(
        [oh.make_node("Constant", [], ["two"], value=numpy_helper.from_array(
            np.array(2.0, np.float32))),
         oh.make_node("Mul", ["w", "two"], ["w2"]),
         oh.make_node("Sqrt", ["w2"], ["w3"]),
         oh.make_node("Add", ["x", "w3"], ["y"])],
        [vi("x", [2, 3])], [vi("y", None)], [const("w", np.arange(6).reshape(2, 3))])
    after, result = apply_pass(FoldConstants(), proto)
    assert count_ops(after) == {"Add": 1}
    assert result.changed
    assert result.stats["nodes_folded"] == 2
    assert result.stats["constant_nodes_lowered"] == 1
    assert result.stats["bytes_added"] == 6 * 4


def test_graph_output_that_becomes_constant_keeps_its_name():
    proto = build_model(
        [oh.make_node("Mul", ["k1", "k2"], ["z"]), oh.make_node("Add", ["x", "z"], ["y"])],
        [vi("x", [2])], [vi("y", None), vi("z", None)], [const("k1", [3, 3]), const("k2", [2, 2])])
    after, result = apply_pass(FoldConstants(), proto)
    assert count_ops(after) == {"Add": 1}
    assert "z" in initializer_names(after)
    onnx.checker.check_model(after, full_check=True)
    assert verify.run(after, {"x": np.zeros(2, np.float32)})["z"].tolist() == [6, 6]
    report = graphopt.optimize(proto, passes="fold-constants").report  # strict checks
    assert report["rolled_back"] == [] and report["verification"]["ok"] is True


def test_multi_output_node_folds_every_output():
    proto = build_model(
        [oh.make_node("Split", ["k", "sp"], ["a", "b"], axis=0),
         oh.make_node("Add", ["x", "a"], ["y"]), oh.make_node("Mul", ["x", "b"], ["z"])],
        [vi("x", [3])], [vi("y", None), vi("z", None)],
        [const("k", np.arange(6)), i64("sp", [3, 3])])
    after, result = apply_pass(FoldConstants(), proto)
    assert count_ops(after) == {"Add": 1, "Mul": 1}
    assert result.stats["tensors_folded"] == 2


def test_partly_folded_multi_output_node_keeps_its_other_outputs():
    # Without inferred shapes sizes are only known after evaluation: "a" (40 bytes)
    # folds, "b" (3960 bytes) is over the limit, so Split stays, still with both outputs.
    proto = build_model(
        [oh.make_node("Split", ["k", "sp"], ["a", "b"], axis=0),
         oh.make_node("ReduceSum", ["a"], ["ra"], keepdims=0),
         oh.make_node("Add", ["x", "ra"], ["y"]), oh.make_node("Add", ["x", "b"], ["z"])],
        [vi("x", [])], [vi("y", []), vi("z", [990])],
        [const("k", np.arange(1000)), i64("sp", [10, 990])])
    model = load(proto)
    result = FoldConstants(size_limit=100).run(model, PassContext())
    assert result.stats["tensors_folded"] == 1 and result.stats["skipped_size"] == 1
    after = model.to_onnx()
    onnx.checker.check_model(after)
    split = next(n for n in after.graph.node if n.op_type == "Split")
    assert len(split.output) == 2
    assert count_ops(after) == {"Split": 1, "Add": 2}
    assert_same_outputs(proto, after)


@pytest.mark.parametrize("infer", [True, False])
def test_size_limit_keeps_a_huge_constant_of_shape(infer):
    # 10M floats (40 MB): neither the ConstantOfShape nor the ReduceSum reading it folds,
    # and (even without inferred shapes) the 40 MB tensor is never computed.
    proto = build_model(
        [oh.make_node("ConstantOfShape", ["shape"], ["big"],
                      value=numpy_helper.from_array(np.array([1.0], np.float32))),
         oh.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
         oh.make_node("Add", ["x", "s"], ["y"])],
        [vi("x", [1])], [vi("y", None)], [i64("shape", [1000, 10000])])
    if infer:
        model, result = run_pass(FoldConstants(), proto)
    else:
        model = load(proto)
        result = FoldConstants().run(model, PassContext())
    assert not result.changed
    assert result.stats["skipped_size"] >= 1
    assert count_ops(model.to_onnx())["ConstantOfShape"] == 1


def test_size_limit_option_applies_to_results():
    proto = build_model([oh.make_node("Mul", ["k", "k"], ["k2"]),
                         oh.make_node("Add", ["x", "k2"], ["y"])],
                        [vi("x", [8])], [vi("y", None)], [const("k", np.arange(8))])
    model, result = run_pass(FoldConstants(size_limit=16), proto)
    assert not result.changed and count_ops(model.to_onnx())["Mul"] == 1
    after, result = apply_pass(FoldConstants(size_limit=32), proto)
    assert result.changed and "Mul" not in count_ops(after)


@pytest.mark.parametrize("op", ["Tile", "Expand"])
def test_no_fold_that_grows_the_model(op):
    # A 4-float constant made 64 KB: under the size limit, but 4000x the bytes it reads.
    arg = i64("arg", [4000] if op == "Tile" else [4000, 4])
    proto = build_model([oh.make_node(op, ["k", "arg"], ["big"]),
                         oh.make_node("Add", ["x", "big"], ["y"])],
                        [vi("x", [1])], [vi("y", None)], [const("k", [1, 2, 3, 4]), arg])
    model, result = run_pass(FoldConstants(), proto)
    assert not result.changed
    assert result.stats["skipped_growth"] == 1
    assert count_ops(model.to_onnx())[op] == 1


def test_growth_rule_counts_only_freed_constants():
    w = const("w", np.random.default_rng(0).standard_normal((80, 80)))  # 25 KB
    nodes = [oh.make_node("Transpose", ["w"], ["wt"]), oh.make_node("MatMul", ["x", "wt"], ["y"])]
    proto = build_model(nodes, [vi("x", [2, 80])], [vi("y", None)], [w])
    after, result = apply_pass(FoldConstants(), proto)  # w is freed: same bytes, folds
    assert "Transpose" not in count_ops(after)
    shared = build_model(nodes + [oh.make_node("MatMul", ["x", "w"], ["z"])],
                         [vi("x", [2, 80])], [vi("y", None), vi("z", None)], [w])
    for growth in (1.25, 100.0):  # w stays: folding would copy it, freeing nothing
        model, result = run_pass(FoldConstants(max_growth=growth), shared)
        assert not result.changed and count_ops(model.to_onnx())["Transpose"] == 1
    after, result = apply_pass(FoldConstants(max_growth=float("inf")), shared)  # rule off
    assert "Transpose" not in count_ops(after)
    assert FoldConstants(max_growth="inf").options.max_growth == float("inf")


def test_nondeterministic_ops_are_not_folded():
    proto = build_model(
        [oh.make_node("RandomNormal", [], ["r"], shape=[3], seed=1.0),
         oh.make_node("RandomUniformLike", ["k"], ["u"], seed=2.0),
         oh.make_node("Add", ["r", "u"], ["ru"]),
         oh.make_node("Neg", ["k"], ["nk"]),
         oh.make_node("Add", ["ru", "nk"], ["s"]),
         oh.make_node("Add", ["x", "s"], ["y"])],
        [vi("x", [3])], [vi("y", None)], [const("k", [1, 2, 3])])
    model, result = run_pass(FoldConstants(), proto)
    ops = count_ops(model.to_onnx())
    assert ops["RandomNormal"] == 1 and ops["RandomUniformLike"] == 1 and ops["Add"] == 3
    assert "Neg" not in ops and result.stats["nodes_folded"] == 1


def test_quantize_dequantize_stay():
    proto = build_model(
        [oh.make_node("DequantizeLinear", ["wq", "scale", "zp"], ["w"]),
         oh.make_node("MatMul", ["x", "w"], ["y"])],
        [vi("x", [2, 4])], [vi("y", None)],
        [const("wq", np.ones((4, 4)), np.int8), const("scale", 0.5), const("zp", 0, np.int8)])
    model, result = run_pass(FoldConstants(), proto)
    assert not result.changed and count_ops(model.to_onnx())["DequantizeLinear"] == 1


def test_folds_inside_if_branches_and_branch_outputs():
    # then: x + sqrt(k) (inner fold); else: k1 * k2 (the whole branch output is constant).
    then = oh.make_graph([oh.make_node("Sqrt", ["k"], ["sk"]),
                          oh.make_node("Add", ["x", "sk"], ["t_out"])],
                         "then", [], [vi("t_out", [2])])
    other = oh.make_graph([oh.make_node("Mul", ["k1", "k2"], ["e_out"])],
                          "else", [], [vi("e_out", [2])],
                          [const("k1", [3, 3]), const("k2", [2, 2])])
    proto = build_model(
        [oh.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
        [vi("c", [], TensorProto.BOOL), vi("x", [2])], [vi("y", [2])], [const("k", [4, 9])])
    feeds = [{"c": np.array(flag), "x": np.array([1, 2], np.float32)} for flag in (True, False)]
    after, result = apply_pass(FoldConstants(), proto, feeds)
    assert count_ops(after) == {"If": 1, "Add": 1}
    assert result.stats["tensors_folded"] == 2
    else_branch = next(a.g for a in after.graph.node[0].attribute if a.name == "else_branch")
    assert [o.name for o in else_branch.output] == ["e_out"]
    assert "e_out" in initializer_names(after, else_branch)


def test_old_opset_attribute_forms():
    proto = build_model(
        [oh.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
            np.array([1.0, 2.0], np.float32))),
         oh.make_node("Unsqueeze", ["c"], ["c1"], axes=[0]),
         oh.make_node("Add", ["x", "c1"], ["y"])],
        [vi("x", [3, 2])], [vi("y", None)], opset=9)
    after, result = apply_pass(FoldConstants(), proto)
    assert count_ops(after) == {"Add": 1}


def test_shape_arithmetic_on_constants():
    proto = build_model(
        [oh.make_node("Shape", ["k"], ["s"]),
         oh.make_node("Gather", ["s", "i1"], ["d"], axis=0),
         oh.make_node("Unsqueeze", ["d", "ax"], ["d1"]),
         oh.make_node("Concat", ["m1", "d1"], ["target"], axis=0),
         oh.make_node("Reshape", ["x", "target"], ["y"])],
        [vi("x", ["N", 3])], [vi("y", None)],
        [const("k", np.zeros((2, 3))), i64("i1", 1), i64("ax", [0]), i64("m1", [-1])])
    after, result = apply_pass(FoldConstants(), proto)
    assert count_ops(after) == {"Reshape": 1}
    assert_same_outputs(proto, after, [{"x": np.ones((5, 3), np.float32)}])


def test_evaluation_failure_is_reported_and_the_rest_still_folds(caplog):
    # Gather with an out-of-range constant index: ONNX Runtime refuses it.
    proto = build_model(
        [oh.make_node("Gather", ["k", "bad"], ["g"], axis=0),
         oh.make_node("Neg", ["k"], ["nk"]),
         oh.make_node("Add", ["x", "g"], ["y"]), oh.make_node("Add", ["x", "nk"], ["z"])],
        [vi("x", [3])], [vi("y", None), vi("z", None)],
        [const("k", [1, 2, 3]), i64("bad", [7, 0, 1])])
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        model, result = run_pass(FoldConstants(), proto)
    assert result.stats["eval_failed"] == 1
    assert "cannot evaluate 'g'" in caplog.text
    ops = count_ops(model.to_onnx())
    assert ops["Gather"] == 1 and "Neg" not in ops


def test_second_run_changes_nothing():
    proto = build_model([oh.make_node("Neg", ["k"], ["nk"]), oh.make_node("Add", ["x", "nk"], ["y"])],
                        [vi("x", [3])], [vi("y", None)], [const("k", [1, 2, 3])])
    model, result = run_pass(FoldConstants(), proto)
    assert result.changed
    assert not FoldConstants().run(model, PassContext()).changed


def test_options_are_validated():
    with pytest.raises(UsageError):
        FoldConstants(size_limit=-1)
    with pytest.raises(UsageError):
        FoldConstants(size_limit="lots")
    assert FoldConstants(size_limit="2048").options.size_limit == 2048
    assert FoldConstants().options.size_limit == 1 << 20


# ---------------------------------------------------------------------- fold-shapes
def test_static_shape_folds():
    proto = build_model(
        [oh.make_node("Shape", ["x"], ["s"]), oh.make_node("Size", ["x"], ["n"]),
         oh.make_node("Reshape", ["x", "s"], ["y"]),
         oh.make_node("Cast", ["n"], ["nf"], to=F), oh.make_node("Add", ["y", "nf"], ["z"])],
        [vi("x", [2, 3, 4])], [vi("z", None)])
    after, result = apply_pass(FoldShapes(), proto)
    assert count_ops(after) == {"Reshape": 1, "Cast": 1, "Add": 1}
    assert result.stats == {"shapes_folded": 2, "nodes_removed": 2}


def dynamic_shape_model(opset=17):
    """x: [N, 3, 4]. Reads dim 0 (dynamic) and dims 1, 2 (static) in several ways."""
    nodes = [oh.make_node("Shape", ["x"], ["s"]),
             oh.make_node("Gather", ["s", "i0"], ["n"], axis=0),       # N: stays
             oh.make_node("Gather", ["s", "i12"], ["cw"], axis=0),     # [3, 4]: folds
             oh.make_node("ReduceProd", ["cw"], ["feat"], keepdims=1),
             oh.make_node("Unsqueeze", ["n", "ax"], ["n1"]) if opset >= 13 else
             oh.make_node("Unsqueeze", ["n"], ["n1"], axes=[0]),
             oh.make_node("Concat", ["n1", "feat"], ["target"], axis=0),
             oh.make_node("Reshape", ["x", "target"], ["y"]),
             oh.make_node("Size", ["x"], ["numel"]),                   # dynamic: stays
             oh.make_node("Cast", ["numel"], ["numel_f"], to=F),
             oh.make_node("Mul", ["y", "numel_f"], ["z"])]
    inits = [i64("i0", 0), i64("i12", [1, -1]), i64("ax", [0])]
    if opset >= 10:
        nodes.append(oh.make_node("Slice", ["s", "st", "en"], ["tail"]))
        inits += [i64("st", [-2]), i64("en", [np.iinfo(np.int64).max])]
    else:
        nodes.append(oh.make_node("Slice", ["s"], ["tail"], starts=[-2], ends=[1 << 30]))
    nodes.append(oh.make_node("Cast", ["tail"], ["tail_f"], to=F))
    return build_model(nodes, [vi("x", ["N", 3, 4])], [vi("z", ["N", 12]), vi("tail_f", [2])],
                       inits, opset=opset)


@pytest.mark.parametrize("opset", [9, 13, 17])
def test_dynamic_batch_folds_only_static_dims(opset):
    proto = dynamic_shape_model(opset)
    feeds = [{"x": np.random.default_rng(n).standard_normal((n, 3, 4)).astype(np.float32)}
             for n in (1, 2, 5)]
    after, result = apply_pass(FoldShapes(), proto, feeds)
    ops = count_ops(after)
    assert result.stats["shapes_folded"] == 2  # Gather [1, -1] and the Slice
    assert ops["Shape"] == 1 and ops["Gather"] == 1 and ops["Size"] == 1
    assert "Slice" not in ops
    after_folding, _ = apply_pass(FoldConstants(), after, feeds)
    assert "ReduceProd" not in count_ops(after_folding)


@pytest.mark.parametrize("start,end,folds", [(1, None, True), (-2, None, True), (0, 1, False),
                                             (None, None, False), (1, 2, True)])
def test_shape_start_end(start, end, folds):
    attrs = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    proto = build_model([oh.make_node("Shape", ["x"], ["s"], **attrs),
                         oh.make_node("Cast", ["s"], ["y"], to=F)],
                        [vi("x", ["N", 3, 4])], [vi("y", None)], opset=17)
    feeds = [{"x": np.zeros((n, 3, 4), np.float32)} for n in (1, 6)]
    after, result = apply_pass(FoldShapes(), proto, feeds)
    assert result.changed == folds
    assert ("Shape" in count_ops(after)) != folds


def test_gather_shape_with_out_of_range_index_is_left_alone():
    proto = build_model([oh.make_node("Shape", ["x"], ["s"]),
                         oh.make_node("Gather", ["s", "i"], ["d"], axis=0),
                         oh.make_node("Cast", ["s"], ["y"], to=F)],
                        [vi("x", [2, 3])], [vi("y", None), vi("d", None, TensorProto.INT64)],
                        [i64("i", 5)])
    model = load(proto)
    model.infer_shapes()
    result = FoldShapes().run(model, PassContext())
    assert result.stats["shapes_folded"] == 1  # the Shape itself; the Gather stays
    assert count_ops(model.to_onnx())["Gather"] == 1


def test_missing_shapes_are_inferred_first():
    proto = build_model([oh.make_node("Relu", ["x"], ["r"]), oh.make_node("Shape", ["r"], ["s"]),
                         oh.make_node("Cast", ["s"], ["y"], to=F)],
                        [vi("x", [2, 3])], [vi("y", None)])
    model = load(proto)  # no shape inference: r has no shape yet
    assert model.graph.tensors()["r"].shape is None
    result = FoldShapes().run(model, PassContext())
    assert result.stats["shapes_folded"] == 1
    assert_same_outputs(proto, model.to_onnx())


def test_shape_inference_failure_means_no_folding(monkeypatch, caplog):
    proto = build_model([oh.make_node("Relu", ["x"], ["r"]), oh.make_node("Shape", ["r"], ["s"]),
                         oh.make_node("Cast", ["s"], ["y"], to=F)],
                        [vi("x", [2, 3])], [vi("y", None)])
    model = load(proto)

    def fail():
        raise ModelError("shape inference failed: boom")
    monkeypatch.setattr(model, "infer_shapes", fail)
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        result = FoldShapes().run(model, PassContext())
    assert not result.changed
    assert result.stats == {"shapes_folded": 0, "shape_inference_failed": 1}
    assert "boom" in caplog.text
    assert count_ops(model.to_onnx())["Shape"] == 1


def test_shape_folds_inside_subgraph():
    # then: Shape(w) of a static outer tensor, and Gather of the outer Shape(x) at a
    # static dim; else: Gather of it at the dynamic dim, which stays.
    then = oh.make_graph([oh.make_node("Shape", ["w"], ["ws"]),
                          oh.make_node("Gather", ["s", "i1"], ["d"], axis=0),
                          oh.make_node("Mul", ["ws", "d"], ["m"]),
                          oh.make_node("Cast", ["m"], ["t_out"], to=F)],
                         "then", [], [vi("t_out", [1])])
    other = oh.make_graph([oh.make_node("Gather", ["s", "i0"], ["n"], axis=0),
                           oh.make_node("Cast", ["n"], ["e_out"], to=F)],
                          "else", [], [vi("e_out", [1])])
    proto = build_model([oh.make_node("Shape", ["x"], ["s"]),
                         oh.make_node("Relu", ["v"], ["w"]),
                         oh.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                        [vi("c", [], TensorProto.BOOL), vi("x", ["N", 7]), vi("v", [5])],
                        [vi("y", [1])], [i64("i0", [0]), i64("i1", [1])])
    feeds = [{"c": np.array(flag), "x": np.zeros((n, 7), np.float32),
              "v": np.ones(5, np.float32)} for flag in (True, False) for n in (1, 3)]
    after, result = apply_pass(FoldShapes(), proto, feeds)
    assert result.stats["shapes_folded"] == 2
    assert count_ops(after) == {"Shape": 1, "Relu": 1, "If": 1, "Mul": 1, "Cast": 2,
                                "Gather": 1}


# ---------------------------------------------------------------------- torch + manager
def torch_view_model() -> onnx.ModelProto:
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(12, 5)

        def forward(self, x):
            y = x.reshape(x.size(0), x.size(1) * x.size(2))
            return self.lin(y.view(y.size(0), -1))

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Net().eval(), (torch.randn(2, 3, 4),), buf, dynamo=False,
                          input_names=["x"], output_names=["y"], opset_version=17,
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return onnx.load_from_string(buf.getvalue())


def test_torch_export_through_the_manager():
    proto = torch_view_model()
    result = graphopt.optimize(
        proto, passes="fold-shapes,fold-constants,merge-shape-chains,eliminate-dead-code")
    report = result.report
    assert report["verification"]["ok"] is True
    assert report["rolled_back"] == []
    before, after = count_ops(proto), count_ops(result.model.to_onnx())
    # x.size(1) * x.size(2) is static: those Shape/Gather/Mul nodes are gone; the batch
    # dim stays dynamic.
    assert after["Gather"] < before["Gather"] and "Mul" not in after
    assert "Constant" not in after
    assert after["Shape"] >= 1
    feeds = [{"x": np.random.default_rng(0).standard_normal((n, 3, 4)).astype(np.float32)}
             for n in (1, 7)]
    assert_same_outputs(proto, result.model.to_onnx(), feeds)


def test_manager_pipeline_on_a_handmade_model():
    proto = dynamic_shape_model(17)
    result = graphopt.optimize(
        proto, passes="fold-shapes,fold-constants,merge-shape-chains,eliminate-dead-code")
    assert result.report["verification"]["ok"] is True
    assert result.report["rolled_back"] == []
    ops = count_ops(result.model.to_onnx())
    assert "ReduceProd" not in ops and "Slice" not in ops
