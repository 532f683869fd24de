"""CNN fusions: BatchNormalization, Add, Mul and Pad folded into the layer before them,
MatMul + Add into Gemm, and (``fuse-affine-gemm``) per-feature arithmetic folded into
the matrix product after it. Each positive case checks the node is gone and the outputs
match ONNX Runtime on the original (batch 1 and 3 for a dynamic batch); each near miss
checks that nothing changed."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto, numpy_helper

import graphopt
from graphopt import verify
from graphopt.passes.fusion.affine import FuseAffineIntoGemm
from graphopt.passes.fusion.cnn import (FuseConvAdd, FuseConvBatchNorm, FuseConvMul,
                                        FuseMatMulAdd, FusePadConv)
from helpers import apply_passes, assert_pass_unchanged, build_model, count_ops, run_pass

FLOAT = TensorProto.FLOAT
ALL = "fuse-conv-bn,fuse-conv-add,fuse-conv-mul,fuse-pad-conv,fuse-matmul-add,eliminate-dead-code"
rng = np.random.default_rng(0)


# ---------------------------------------------------------------------- helpers
def f32(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def i64(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.int64), name)


def rand(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def bn_params(prefix, c):
    return [f32(f"{prefix}_gamma", rng.uniform(0.5, 2, c)), f32(f"{prefix}_beta", rand(c)),
            f32(f"{prefix}_mean", rand(c)), f32(f"{prefix}_var", rng.uniform(0.2, 3, c))]


def bn_node(x, y, prefix, **attrs):
    return oh.make_node("BatchNormalization", [x, f"{prefix}_gamma", f"{prefix}_beta",
                                               f"{prefix}_mean", f"{prefix}_var"], [y], **attrs)


def vi(name, shape):
    return oh.make_tensor_value_info(name, FLOAT, shape)


apply = apply_passes  # the manager's way, checked against ORT within 1e-4 / 1e-5
assert_unchanged = assert_pass_unchanged


# ---------------------------------------------------------------------- model builders
def conv_bn_model(c_in=3, c_out=4, bias=True, group=1, transpose=False, then_relu=False,
                  opset=17):
    op = "ConvTranspose" if transpose else "Conv"
    w_shape = [c_in, c_out // group, 3, 3] if transpose else [c_out, c_in // group, 3, 3]
    inits = [f32("w", rand(*w_shape)), *bn_params("bn", c_out)]
    inputs = ["x", "w"]
    if bias:
        inits.append(f32("b", rand(c_out)))
        inputs.append("b")
    nodes = [oh.make_node(op, inputs, ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                          group=group),
             bn_node("c", "bn_out" if then_relu else "y", "bn")]
    if then_relu:
        nodes.append(oh.make_node("Relu", ["bn_out"], ["y"]))
    return build_model(nodes, [vi("x", ["N", c_in, 6, 6])], [vi("y", None)], inits, opset)


def conv_then(op, const_name, const_value, const_first=False, opset=17):
    """Conv(x) followed by ``op`` with an initializer (or a graph input when None)."""
    inits = [f32("w", rand(4, 3, 3, 3)), f32("b", rand(4))]
    inputs = [vi("x", ["N", 3, 6, 6])]
    if const_value is None:
        inputs.append(vi(const_name, [4, 1, 1]))
    else:
        inits.append(f32(const_name, const_value))
    operands = [const_name, "c"] if const_first else ["c", const_name]
    nodes = [oh.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3]),
             oh.make_node(op, operands, ["y"])]
    return build_model(nodes, inputs, [vi("y", None)], inits, opset)


def pad_conv_model(pads, opset=17, mode="constant", value=None, axes=None, consumer="Conv",
                   conv_attrs=None):
    inits = [f32("w", rand(4, 3, 3, 3))]
    if opset < 11:
        attrs = {"mode": mode, "pads": pads, **({"value": value} if value is not None else {})}
        pad = oh.make_node("Pad", ["x"], ["p"], **attrs)
    else:
        inits.append(i64("pads", pads))
        names = ["x", "pads"]
        if value is not None or axes is not None:
            names.append("value" if value is not None else "")
            if value is not None:
                inits.append(f32("value", value))
        if axes is not None:
            names.append("axes")
            inits.append(i64("axes", axes))
        pad = oh.make_node("Pad", names, ["p"], mode=mode)
    if consumer == "Conv":
        attrs = {"kernel_shape": [3, 3], "pads": [1, 0, 1, 0], **(conv_attrs or {})}
        if attrs.get("auto_pad", "NOTSET") != "NOTSET":
            del attrs["pads"]
        layer = oh.make_node("Conv", ["p", "w"], ["y"], **attrs)
    else:
        layer = oh.make_node("AveragePool", ["p"], ["y"], kernel_shape=[3, 3],
                             **(conv_attrs or {}))
        inits = inits[1:]
    return build_model([pad, layer], [vi("x", ["N", 3, 7, 7])], [vi("y", None)], inits, opset)


def matmul_model(x_shape, follower, bias_shape=(5,), opset=17):
    inits = [f32("w", rand(x_shape[-1], 5))]
    nodes = [oh.make_node("MatMul", ["x", "w"], ["m"])]
    if follower == "Add":
        inits.append(f32("b", rand(*bias_shape)))
        nodes.append(oh.make_node("Add", ["m", "b"], ["y"]))
    else:
        inits += bn_params("bn", 5)
        nodes.append(bn_node("m", "y", "bn"))
    return build_model(nodes, [vi("x", list(x_shape))], [vi("y", None)], inits, opset)


# ---------------------------------------------------------------------- fuse-conv-bn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("then_relu", [True, False])
def test_conv_bn_folds_into_conv(bias, then_relu):
    after, [result] = apply(conv_bn_model(bias=bias, then_relu=then_relu), FuseConvBatchNorm())
    assert result.changed and result.stats == {"fused": 1}
    ops = count_ops(after)
    assert ops["BatchNormalization"] == 0 and ops["Conv"] == 1
    conv = next(n for n in after.graph.node if n.op_type == "Conv")
    assert len(conv.input) == 3  # a bias was created when there was none
    if not then_relu:
        assert conv.output[0] == "y"  # the graph output keeps its name


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_bn_is_group_aware(group):
    after, [result] = apply(conv_bn_model(c_in=4, c_out=6, group=group, transpose=True),
                            FuseConvBatchNorm())
    assert result.stats["fused"] == 1 and count_ops(after)["BatchNormalization"] == 0


def test_depthwise_conv_bn():
    after, _ = apply(conv_bn_model(c_in=4, c_out=4, group=4, bias=False), FuseConvBatchNorm())
    assert count_ops(after)["BatchNormalization"] == 0


def test_matmul_bn_becomes_gemm():
    after, _ = apply(matmul_model(["N", 6], "BN"), FuseConvBatchNorm())
    assert dict(count_ops(after)) == {"Gemm": 1}


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_bn_folds_into_weight_columns(trans_b):
    w = rand(5, 6) if trans_b else rand(6, 5)
    nodes = [oh.make_node("Gemm", ["x", "w", "c"], ["g"], alpha=0.5, beta=2.0, transB=trans_b),
             bn_node("g", "y", "bn")]
    proto = build_model(nodes, [vi("x", ["N", 6])], [vi("y", None)],
                        [f32("w", w), f32("c", rand(1, 5)), *bn_params("bn", 5)])
    after, _ = apply(proto, FuseConvBatchNorm())
    assert dict(count_ops(after)) == {"Gemm": 1}


def test_matmul_on_3d_input_and_bn_is_left_alone():
    # BN's channel axis is 1 (the sequence), not the MatMul's feature axis.
    inits = [f32("w", rand(6, 5)), *bn_params("bn", 4)]
    proto = build_model([oh.make_node("MatMul", ["x", "w"], ["m"]), bn_node("m", "y", "bn")],
                        [vi("x", ["N", 4, 6])], [vi("y", None)], inits)
    assert_unchanged(proto, FuseConvBatchNorm())


def test_bn_not_after_a_layer_is_left_alone():
    proto = build_model([oh.make_node("Relu", ["x"], ["r"]), bn_node("r", "y", "bn")],
                        [vi("x", ["N", 4, 5, 5])], [vi("y", None)], bn_params("bn", 4))
    assert_unchanged(proto, FuseConvBatchNorm())


def test_conv_output_with_two_readers_is_left_alone():
    proto = conv_bn_model()
    proto.graph.node.append(oh.make_node("Relu", ["c"], ["r"]))
    proto.graph.output.append(vi("r", ["N", 4, 6, 6]))
    assert_unchanged(proto, FuseConvBatchNorm())


def test_conv_output_that_is_a_graph_output_is_left_alone():
    proto = conv_bn_model()
    proto.graph.output.append(vi("c", ["N", 4, 6, 6]))
    assert_unchanged(proto, FuseConvBatchNorm())


def test_bn_in_training_mode_is_left_alone():
    proto = conv_bn_model()
    bn = proto.graph.node[1]
    bn.attribute.append(oh.make_attribute("training_mode", 1))
    bn.output.extend(["running_mean", "running_var"])
    proto.graph.output.extend([vi("running_mean", [4]), vi("running_var", [4])])
    assert_unchanged(proto, FuseConvBatchNorm())


def test_bn_with_parameters_from_graph_inputs_is_left_alone():
    proto = conv_bn_model()
    proto.graph.input.append(vi("bn_var", [4]))  # an initializer a caller may override
    assert_unchanged(proto, FuseConvBatchNorm())


def test_shared_weight_gets_separate_fused_copies():
    inits = [f32("w", rand(4, 3, 3, 3)), f32("b", rand(4)), *bn_params("bn1", 4),
             *bn_params("bn2", 4)]
    nodes = [oh.make_node("Conv", ["x", "w", "b"], ["c1"], kernel_shape=[3, 3]),
             oh.make_node("Conv", ["x", "w", "b"], ["c2"], kernel_shape=[3, 3]),
             bn_node("c1", "y1", "bn1"), bn_node("c2", "y2", "bn2")]
    proto = build_model(nodes, [vi("x", ["N", 3, 6, 6])], [vi("y1", None), vi("y2", None)],
                        inits)
    after, [result] = apply(proto, FuseConvBatchNorm())
    assert result.stats["fused"] == 2 and count_ops(after) == {"Conv": 2}
    weights = [n.input[1] for n in after.graph.node]
    assert len(set(weights)) == 2 and "w" not in weights


def test_constant_node_parameters_and_subgraphs():
    """BN params from Constant nodes, inside an If branch reading an outer weight."""
    gamma, beta, mean, var = (p for p in bn_params("bn", 4))
    consts = [oh.make_node("Constant", [], [t.name], value=t) for t in (gamma, beta, mean, var)]
    then = oh.make_graph(
        consts + [oh.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3]),
                  bn_node("c", "t_out", "bn")], "then", [], [vi("t_out", None)])
    other = oh.make_graph([oh.make_node("Conv", ["x", "w"], ["e_out"], kernel_shape=[3, 3])],
                          "else", [], [vi("e_out", None)])
    proto = build_model([oh.make_node("If", ["cond"], ["y"], then_branch=then,
                                      else_branch=other)],
                        [vi("x", ["N", 3, 6, 6]),
                         oh.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                        [vi("y", None)], [f32("w", rand(4, 3, 3, 3))])
    after, [result] = apply(proto, FuseConvBatchNorm())
    assert result.stats["fused"] == 1 and count_ops(after)["BatchNormalization"] == 0
    x = rand(2, 3, 6, 6)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        assert verify.compare(verify.run(proto, feeds), verify.run(after, feeds)).ok


# ---------------------------------------------------------------------- fuse-conv-add / mul
PER_CHANNEL = [rand(4, 1, 1), rand(1, 4, 1, 1), np.float32(1.5), rand(1), rand(1, 1, 1)]


@pytest.mark.parametrize("value", PER_CHANNEL, ids=lambda v: str(np.shape(v)))
@pytest.mark.parametrize("const_first", [False, True])
def test_conv_add_per_channel_folds_into_bias(value, const_first):
    after, [result] = apply(conv_then("Add", "k", value, const_first), FuseConvAdd())
    assert result.stats["fused"] == 1 and dict(count_ops(after)) == {"Conv": 1}


@pytest.mark.parametrize("value", PER_CHANNEL, ids=lambda v: str(np.shape(v)))
def test_conv_mul_per_channel_folds_into_weight_and_bias(value):
    after, [result] = apply(conv_then("Mul", "k", value), FuseConvMul())
    assert result.stats["fused"] == 1 and dict(count_ops(after)) == {"Conv": 1}


@pytest.mark.parametrize("op,cls", [("Add", FuseConvAdd), ("Mul", FuseConvMul)])
@pytest.mark.parametrize("value", [rand(1, 4, 4, 4), rand(4), rand(1, 1, 4, 4),
                                   rand(1, 1, 1, 1, 1)], ids=lambda v: str(np.shape(v)))
def test_conv_add_mul_not_per_channel_is_left_alone(op, cls, value):
    assert_unchanged(conv_then(op, "k", value), cls())


@pytest.mark.parametrize("op,cls", [("Add", FuseConvAdd), ("Mul", FuseConvMul)])
def test_conv_add_mul_by_graph_input_is_left_alone(op, cls):
    assert_unchanged(conv_then(op, "k", None), cls())
    overridable = conv_then(op, "k", rand(4, 1, 1))
    overridable.graph.input.append(vi("k", [4, 1, 1]))
    assert_unchanged(overridable, cls())


def test_conv_add_mul_chain_collapses_in_one_run():
    inits = [f32("w", rand(4, 3, 3, 3)), f32("s", rand(4, 1, 1)), f32("t", rand(1, 4, 1, 1))]
    nodes = [oh.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3]),
             oh.make_node("Mul", ["c", "s"], ["m"]), oh.make_node("Add", ["m", "t"], ["a"]),
             oh.make_node("Mul", ["a", "s"], ["y"])]
    proto = build_model(nodes, [vi("x", ["N", 3, 6, 6])], [vi("y", None)], inits)
    after, results = apply(proto, FuseConvMul(), FuseConvAdd(), FuseConvMul())
    assert dict(count_ops(after)) == {"Conv": 1}


# ---------------------------------------------------------------------- fuse-pad-conv
@pytest.mark.parametrize("opset", [10, 13, 17])
def test_pad_folds_into_conv_pads(opset):
    after, [result] = apply(pad_conv_model([0, 0, 1, 2, 0, 0, 3, 0], opset=opset),
                            FusePadConv())
    assert result.stats["fused"] == 1 and dict(count_ops(after)) == {"Conv": 1}
    conv = after.graph.node[0]
    pads = next(a for a in conv.attribute if a.name == "pads").ints
    assert list(pads) == [2, 2, 4, 0]


def test_pad_with_axes_and_explicit_zero_value():
    proto = pad_conv_model([1, 2, 0, 1], opset=18, value=0.0, axes=[-2, 3])
    after, _ = apply(proto, FusePadConv())
    assert dict(count_ops(after)) == {"Conv": 1}


def test_pad_folds_into_average_pool_counting_pads():
    proto = pad_conv_model([0, 0, 1, 1, 0, 0, 1, 1], consumer="AveragePool",
                           conv_attrs={"count_include_pad": 1})
    after, _ = apply(proto, FusePadConv())
    assert dict(count_ops(after)) == {"AveragePool": 1}


@pytest.mark.parametrize("kwargs", [
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], value=0.5),
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="reflect"),
    dict(pads=[0, 1, 1, 1, 0, 0, 1, 1]),  # pads the channel axis
    dict(pads=[0, 0, -1, 1, 0, 0, 1, 1]),  # crops
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], opset=10, value=2.0),
    dict(pads=[1, 1, 0, 1], opset=18, axes=[1, 2]),  # channel axis through axes
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], conv_attrs={"auto_pad": "SAME_UPPER"}),
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], consumer="AveragePool"),  # count_include_pad=0
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], consumer="AveragePool",
         conv_attrs={"count_include_pad": 1, "ceil_mode": 1}),
], ids=["value", "reflect", "channel", "negative", "value-attr", "axes-channel", "auto-pad",
        "pool-exclude-pad", "pool-ceil"])
def test_pad_near_misses_are_left_alone(kwargs):
    assert_unchanged(pad_conv_model(**kwargs), FusePadConv())


# ---------------------------------------------------------------------- fuse-matmul-add
@pytest.mark.parametrize("bias_shape", [(5,), (1, 5), (1,), ()])
def test_matmul_add_becomes_gemm(bias_shape):
    after, [result] = apply(matmul_model(["N", 6], "Add", bias_shape), FuseMatMulAdd())
    assert result.stats["fused"] == 1 and dict(count_ops(after)) == {"Gemm": 1}
    assert after.graph.node[0].output[0] == "y"


def test_matmul_add_on_3d_input_is_left_alone():
    assert_unchanged(matmul_model(["N", 4, 6], "Add"), FuseMatMulAdd())


def test_matmul_add_with_bias_that_widens_the_output_is_left_alone():
    assert_unchanged(matmul_model(["N", 6], "Add", (3, 5)), FuseMatMulAdd())
    assert_unchanged(matmul_model(["N", 6], "Add", (2, 1, 5)), FuseMatMulAdd())


# ---------------------------------------------------------------------- fuse-affine-gemm
def affine_then(chain, x_shape=("N", 6), product="Gemm", trans_b=0, bias=True, opset=17,
                const_shape=None):
    """``chain`` of per-feature ops on x (Mul, Add, Sub, RSub: c - x, Self: x + x, BN),
    then a Gemm (alpha 0.5, beta 2) or MatMul by a constant [K, 5] weight."""
    k = x_shape[-1]
    shape = const_shape or (k,)
    inits, nodes, prev = [], [], "x"
    for i, op in enumerate(chain):
        out = f"a{i}"
        if op == "BN":
            inits += bn_params(f"bn{i}", k)
            nodes.append(bn_node(prev, out, f"bn{i}"))
        elif op == "Self":
            nodes.append(oh.make_node("Add", [prev, prev], [out]))
        else:
            value = rng.uniform(0.5, 2, shape) if op == "Mul" else rand(*shape)
            inits.append(f32(f"c{i}", value))
            inputs = [f"c{i}", prev] if op == "RSub" else [prev, f"c{i}"]
            nodes.append(oh.make_node("Sub" if op == "RSub" else op, inputs, [out]))
        prev = out
    if product == "Gemm":
        inits.append(f32("w", rand(5, k) if trans_b else rand(k, 5)))
        inputs = [prev, "w"]
        if bias:
            inits.append(f32("b", rand(1, 5)))
            inputs.append("b")
        nodes.append(oh.make_node("Gemm", inputs, ["y"], alpha=0.5, beta=2.0, transB=trans_b))
    else:
        inits.append(f32("w", rand(k, 5)))
        nodes.append(oh.make_node("MatMul", [prev, "w"], ["y"]))
    return build_model(nodes, [vi("x", list(x_shape))], [vi("y", None)], inits, opset)


@pytest.mark.parametrize("chain", [["Mul"], ["Add"], ["Sub"], ["RSub"], ["Self"], ["BN"],
                                   ["Mul", "Add"], ["Add", "Mul"], ["BN", "Sub", "Self"]])
@pytest.mark.parametrize("trans_b,bias", [(0, True), (1, True), (1, False)])
def test_affine_before_gemm_folds_into_its_weights(chain, trans_b, bias):
    after, [result] = apply(affine_then(chain, trans_b=trans_b, bias=bias),
                            FuseAffineIntoGemm())
    assert result.stats == {"fused": len(chain)} and dict(count_ops(after)) == {"Gemm": 1}
    assert after.graph.node[0].input[0] == "x" and after.graph.node[0].output[0] == "y"


@pytest.mark.parametrize("opset", [7, 11, 17])
def test_affine_before_matmul_of_a_matrix_becomes_a_gemm(opset):
    after, _ = apply(affine_then(["Sub", "Mul"], product="MatMul", opset=opset),
                     FuseAffineIntoGemm())
    assert dict(count_ops(after)) == {"Gemm": 1}


def test_before_opset_7_a_shift_is_not_folded_but_a_scale_is():
    # Gemm before opset 7 broadcasts C only with its ``broadcast`` attribute (and ONNX
    # Runtime does not run Add-6: the structure is checked, not the outputs)
    model, result = run_pass(FuseAffineIntoGemm(),
                             affine_then(["Add", "Mul"], product="MatMul", opset=6))
    assert result.stats == {"fused": 1}
    assert dict(count_ops(model.to_onnx())) == {"Add": 1, "MatMul": 1}


def test_matmul_of_a_sequence_takes_a_scale_but_not_a_shift():
    after, _ = apply(affine_then(["Mul"], x_shape=("N", 4, 6), product="MatMul",
                                 const_shape=(1, 1, 6)), FuseAffineIntoGemm())
    assert dict(count_ops(after)) == {"MatMul": 1}
    assert_unchanged(affine_then(["Add"], x_shape=("N", 4, 6), product="MatMul"),
                     FuseAffineIntoGemm())


@pytest.mark.parametrize("case", ["not per feature", "widens", "two readers", "graph output",
                                  "transA", "graph input", "3-D BN", "shared weight",
                                  "gelu"])
def test_affine_gemm_near_misses_are_left_alone(case):
    proto = {"not per feature": lambda: affine_then(["Mul"], x_shape=(3, 6),
                                                    const_shape=(3, 1)),
             "widens": lambda: affine_then(["Mul"], x_shape=(6,), product="MatMul",
                                           const_shape=(1, 6))}.get(
                                               case, lambda: affine_then(["Mul"]))()
    if case == "two readers":
        proto.graph.node.append(oh.make_node("Relu", ["a0"], ["r"]))
        proto.graph.output.append(vi("r", ["N", 6]))
    elif case == "graph output":
        proto.graph.output.append(vi("a0", ["N", 6]))
    elif case == "gelu":  # x * (1 + erf(x / sqrt 2)) * 0.5: the 0.5 is the GELU's
        proto = build_model([oh.make_node("Div", ["x", "r2"], ["d"]),
                             oh.make_node("Erf", ["d"], ["e"]),
                             oh.make_node("Add", ["e", "one"], ["p"]),
                             oh.make_node("Mul", ["x", "p"], ["g"]),
                             oh.make_node("Mul", ["g", "half"], ["a0"]),
                             oh.make_node("Gemm", ["a0", "w"], ["y"])],
                            [vi("x", ["N", 6])], [vi("y", None)],
                            [f32("r2", 2 ** 0.5), f32("one", 1.0), f32("half", 0.5),
                             f32("w", rand(6, 5))])
    elif case == "shared weight":
        proto.graph.node.append(oh.make_node("MatMul", ["x", "w"], ["z"]))
        proto.graph.output.append(vi("z", ["N", 5]))
    elif case == "transA":
        proto = build_model([oh.make_node("Mul", ["x", "c"], ["a0"]),
                             oh.make_node("Gemm", ["a0", "w"], ["y"], transA=1)],
                            [vi("x", [6, "N"])], [vi("y", None)],
                            [f32("c", rand(6, 1)), f32("w", rand(6, 5))])
    elif case == "graph input":
        proto = build_model([oh.make_node("Mul", ["x", "c"], ["a0"]),
                             oh.make_node("Gemm", ["a0", "w"], ["y"])],
                            [vi("x", ["N", 6]), vi("c", [6])], [vi("y", None)],
                            [f32("w", rand(6, 5))])
    elif case == "3-D BN":
        inits = [f32("w", rand(6, 5)), *bn_params("bn", 4)]
        proto = build_model([bn_node("x", "a0", "bn"), oh.make_node("MatMul", ["a0", "w"], ["y"])],
                            [vi("x", ["N", 4, 6])], [vi("y", None)], inits)
    assert_unchanged(proto, FuseAffineIntoGemm())


def test_affine_gemm_in_the_ort_pipeline_on_the_example_cnn():
    """The example CNN's head (a scale, then x + x, before its Gemm) folds away."""
    from pathlib import Path

    proto = onnx.load(Path(__file__).resolve().parents[1] / "examples" / "small_cnn.onnx")
    result = graphopt.optimize(proto, target="ort")
    assert result.report["verification"]["ok"] is True
    ops = count_ops(result.model.to_onnx())
    assert ops["Mul"] == ops["Add"] == 0 and ops["Gemm"] == 1


# ---------------------------------------------------------------------- PyTorch models
def export(module, example, names=("x",)):
    """Export with the TorchScript exporter; constant folding off so BatchNormalization
    stays a node (with it on, the exporter folds BN into the Conv itself). Falls back to
    the dynamo exporter."""
    import torch

    module.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, (example,), buffer, dynamo=False, input_names=list(names),
                              output_names=["y"], dynamic_axes={"x": {0: "N"}},
                              do_constant_folding=False, opset_version=17)
        except Exception:  # the TorchScript exporter is gone: use the dynamo one
            buffer = io.BytesIO()
            torch.onnx.export(module, (example,), buffer, dynamo=True, input_names=list(names),
                              output_names=["y"],
                              dynamic_shapes=({0: torch.export.Dim("N")},))
    return onnx.load_from_string(buffer.getvalue())


def torch_cnns():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)

    def randomize(module):
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.data.uniform_(0.5, 2)
                m.bias.data.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.2, 3)
        return module

    return {
        "conv-bn-relu": randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
                                                nn.BatchNorm2d(8), nn.ReLU())),
        "convtranspose-bn": randomize(nn.Sequential(nn.ConvTranspose2d(3, 6, 3, stride=2),
                                                    nn.BatchNorm2d(6))),
        "grouped-convtranspose-bn": randomize(nn.Sequential(
            nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6))),
        "depthwise-bn": randomize(nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(),
                                                nn.Conv2d(6, 6, 3, groups=6), nn.BatchNorm2d(6))),
        "nobias-bn": randomize(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False),
                                             nn.BatchNorm2d(8), nn.ReLU())),
    }


@pytest.fixture(scope="module")
def exported():
    torch = pytest.importorskip("torch")
    models = {}
    for name, module in torch_cnns().items():
        c_in = 4 if name.startswith("grouped") else 3
        models[name] = export(module, torch.randn(2, c_in, 8, 8))
    return models


@pytest.mark.parametrize("name", ["conv-bn-relu", "convtranspose-bn", "grouped-convtranspose-bn",
                                  "depthwise-bn", "nobias-bn"])
def test_pytorch_cnn_bn_is_folded(exported, name):
    proto = exported[name]
    if count_ops(proto)["BatchNormalization"] == 0:
        pytest.skip("the exporter folded BatchNormalization itself; hand-built cases cover it")
    after, [result] = apply(proto, FuseConvBatchNorm())
    assert result.stats["fused"] == 1 and count_ops(after)["BatchNormalization"] == 0


@pytest.mark.parametrize("name", ["conv-bn-relu", "grouped-convtranspose-bn", "nobias-bn"])
def test_pytorch_cnn_through_the_manager(exported, name):
    result = graphopt.optimize(exported[name], passes=ALL)
    assert result.report["verification"]["ok"] is True
    assert result.report["rolled_back"] == []
    assert count_ops(result.model.to_onnx())["BatchNormalization"] == 0


# ---------------------------------------------------------------------- through the manager
def test_every_fusion_through_the_manager():
    """Pad -> Conv -> BN -> Mul -> Add -> Relu -> Flatten -> MatMul + Add, dynamic batch."""
    inits = [i64("pads", [0, 0, 1, 1, 0, 0, 1, 1]), f32("w", rand(4, 3, 3, 3)),
             *bn_params("bn", 4), f32("s", rand(4, 1, 1)), f32("t", rand(1, 4, 1, 1)),
             f32("fw", rand(4 * 6 * 6, 5)), f32("fb", rand(5))]
    nodes = [oh.make_node("Pad", ["x", "pads"], ["p"]),
             oh.make_node("Conv", ["p", "w"], ["c"], kernel_shape=[3, 3]),
             bn_node("c", "n", "bn"), oh.make_node("Mul", ["n", "s"], ["m"]),
             oh.make_node("Add", ["t", "m"], ["a"]), oh.make_node("Relu", ["a"], ["r"]),
             oh.make_node("Flatten", ["r"], ["f"]), oh.make_node("MatMul", ["f", "fw"], ["mm"]),
             oh.make_node("Add", ["mm", "fb"], ["y"])]
    proto = build_model(nodes, [vi("x", ["N", 3, 6, 6])], [vi("y", ["N", 5])], inits)
    for size in (1, 3):
        feeds = verify.probe_inputs(proto, count=2, seed=size, symbolic_size=size)
        result = graphopt.optimize(proto, passes=ALL, data=feeds)
        assert result.report["verification"]["ok"] is True
        assert result.report["rolled_back"] == []
        assert dict(count_ops(result.model.to_onnx())) == {"Conv": 1, "Relu": 1, "Flatten": 1,
                                                           "Gemm": 1}
