"""Activation fusions: SiLU -> QuickGelu, the two HardSwish forms -> HardSwish, and
Conv (+ residual Add) + activation -> com.microsoft FusedConv.

Each positive case checks the pattern became one node and the outputs match ONNX Runtime
on the original (rtol 1e-4, atol 1e-5) with the batch dimension at 1 and 3; each near
miss checks nothing changed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto, numpy_helper

import graphopt
from graphopt import verify
from graphopt.errors import UsageError
from graphopt.pass_infra import PassContext
from graphopt.passes.fusion.act import FuseConvActivation, FuseHardSwish, FuseSiLU
from graphopt.target import Capabilities, Target
from graphopt.targets.ort import LOSSLESS_PIPELINE, OrtTarget
from helpers import apply_passes, assert_pass_unchanged, build_model, count_ops

FLOAT = TensorProto.FLOAT
rng = np.random.default_rng(0)
ACT_PASSES = "fuse-silu,fuse-hard-swish,fuse-conv-act"
# The ORT pipeline without the activation fusions, and then with them.
BASE_PIPELINE = ",".join(p for p in LOSSLESS_PIPELINE if p not in ACT_PASSES.split(","))
PIPELINE = BASE_PIPELINE.replace(",eliminate-dead-code", "") + "," + ACT_PASSES + \
    ",eliminate-dead-code"
# FusedConv activations ONNX Runtime's CPU kernel takes.
FUSED_CONV_ACTIVATIONS = ("Relu", "Tanh", "Sigmoid", "LeakyRelu", "Clip", "HardSigmoid")


class PlainOnnx(Target):
    """A target that runs the default ONNX domain only (no com.microsoft)."""

    name = "plain-onnx"
    device = OrtTarget.device
    capabilities = Capabilities(domains=frozenset({""}))
    default_pipeline = ("fuse-silu", "fuse-hard-swish", "fuse-conv-act", "eliminate-dead-code")

    def lower(self, model, out: Path):
        raise NotImplementedError

    def run(self, artifact, feeds):
        raise NotImplementedError


PLAIN = PassContext(target=PlainOnnx())
ORT = PassContext(target=OrtTarget())


# ---------------------------------------------------------------------- helpers
def f32(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def rand(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def vi(name, shape, dtype=FLOAT):
    return oh.make_tensor_value_info(name, dtype, shape)


def node_of(proto, op):
    return next(n for n in proto.graph.node if n.op_type == op)


def attrs_of(node):
    return {a.name: oh.get_attribute_value(a) for a in node.attribute}


def domains(proto):
    return {o.domain: o.version for o in proto.opset_import}


def unary_model(nodes, inits=(), opset=17, shape=("N", 4, 5, 5), dtype=FLOAT):
    return build_model(nodes, [vi("x", list(shape), dtype)], [vi("y", None, dtype)], inits, opset)


# ---------------------------------------------------------------------- fuse-silu
@pytest.mark.parametrize("sigmoid_first", [False, True])
def test_silu_becomes_quick_gelu(sigmoid_first):
    operands = ["s", "x"] if sigmoid_first else ["x", "s"]
    proto = unary_model([oh.make_node("Sigmoid", ["x"], ["s"]),
                         oh.make_node("Mul", operands, ["y"])])
    after, [result] = apply_passes(proto, FuseSiLU(), ctx=ORT)
    assert result.stats["fused"] == 1 and dict(count_ops(after)) == {"QuickGelu": 1}
    node = node_of(after, "QuickGelu")
    assert node.domain == "com.microsoft" and attrs_of(node) == {"alpha": 1.0}
    assert node.output[0] == "y" and "com.microsoft" in domains(after)


def test_silu_input_read_elsewhere_still_fuses():
    proto = build_model([oh.make_node("Sigmoid", ["x"], ["s"]),
                         oh.make_node("Mul", ["x", "s"], ["m"]),
                         oh.make_node("Relu", ["x"], ["r"]),
                         oh.make_node("Add", ["m", "r"], ["y"])],
                        [vi("x", ["N", 8])], [vi("y", None)])
    after, _ = apply_passes(proto, FuseSiLU())
    assert dict(count_ops(after)) == {"QuickGelu": 1, "Relu": 1, "Add": 1}


def test_silu_in_a_subgraph():
    branch = oh.make_graph([oh.make_node("Sigmoid", ["x"], ["s"]),
                            oh.make_node("Mul", ["s", "x"], ["b_out"])], "then", [],
                           [vi("b_out", None)])
    other = oh.make_graph([oh.make_node("Relu", ["x"], ["e_out"])], "else", [],
                          [vi("e_out", None)])
    proto = build_model([oh.make_node("If", ["cond"], ["y"], then_branch=branch,
                                      else_branch=other)],
                        [vi("x", ["N", 8]), vi("cond", [], TensorProto.BOOL)], [vi("y", None)])
    after, [result] = apply_passes(proto, FuseSiLU())
    assert result.stats["fused"] == 1 and count_ops(after)["QuickGelu"] == 1
    assert count_ops(after)["Sigmoid"] == 0


def test_silu_near_misses_are_left_alone():
    # x * Sigmoid(y) with y != x (a gate, as in squeeze-excite)
    gate = build_model([oh.make_node("Sigmoid", ["g"], ["s"]),
                        oh.make_node("Mul", ["x", "s"], ["y"])],
                       [vi("x", ["N", 8]), vi("g", ["N", 8])], [vi("y", None)])
    assert_pass_unchanged(gate, FuseSiLU())
    # the Sigmoid's output is read twice
    shared = build_model([oh.make_node("Sigmoid", ["x"], ["s"]),
                          oh.make_node("Mul", ["x", "s"], ["m"]),
                          oh.make_node("Add", ["m", "s"], ["y"])],
                         [vi("x", ["N", 8])], [vi("y", None)])
    assert_pass_unchanged(shared, FuseSiLU())
    # the Sigmoid's output is a graph output
    exposed = unary_model([oh.make_node("Sigmoid", ["x"], ["s"]),
                           oh.make_node("Mul", ["x", "s"], ["y"])])
    exposed.graph.output.append(vi("s", ["N", 4, 5, 5]))
    assert_pass_unchanged(exposed, FuseSiLU())
    # a double has no QuickGelu kernel
    double = unary_model([oh.make_node("Sigmoid", ["x"], ["s"]),
                          oh.make_node("Mul", ["x", "s"], ["y"])], dtype=TensorProto.DOUBLE)
    assert_pass_unchanged(double, FuseSiLU())


def test_silu_needs_com_microsoft():
    proto = unary_model([oh.make_node("Sigmoid", ["x"], ["s"]),
                         oh.make_node("Mul", ["x", "s"], ["y"])])
    assert_pass_unchanged(proto, FuseSiLU(), ctx=PLAIN)


# ---------------------------------------------------------------------- fuse-hard-swish
@pytest.mark.parametrize("hs_first", [False, True])
def test_x_times_hard_sigmoid_becomes_hard_swish(hs_first):
    operands = ["h", "x"] if hs_first else ["x", "h"]
    proto = unary_model([oh.make_node("HardSigmoid", ["x"], ["h"], alpha=1 / 6, beta=0.5),
                         oh.make_node("Mul", operands, ["y"])])
    after, [result] = apply_passes(proto, FuseHardSwish())
    assert result.stats["fused"] == 1 and dict(count_ops(after)) == {"HardSwish": 1}
    assert node_of(after, "HardSwish").output[0] == "y"


def relu6_form(form, three_first=False, opset=17, three=3.0, six=6.0, high=6.0):
    """x * Clip(x + 3, 0, 6) / 6 written in one of the orders exporters use."""
    inits = [f32("three", three), f32("zero", 0.0), f32("high", high), f32("six", six),
             f32("sixth", 1 / 6)]
    nodes = [oh.make_node("Add", ["three", "x"] if three_first else ["x", "three"], ["a"]),
             oh.make_node("Clip", ["a", "zero", "high"], ["r"])]
    if form == "(x*r)/6":
        nodes += [oh.make_node("Mul", ["x", "r"], ["m"]), oh.make_node("Div", ["m", "six"], ["y"])]
    elif form == "(r*x)*(1/6)":
        nodes += [oh.make_node("Mul", ["r", "x"], ["m"]),
                  oh.make_node("Mul", ["sixth", "m"], ["y"])]
    elif form == "x*(r/6)":
        nodes += [oh.make_node("Div", ["r", "six"], ["d"]), oh.make_node("Mul", ["x", "d"], ["y"])]
    elif form == "(r*(1/6))*x":
        nodes += [oh.make_node("Mul", ["r", "sixth"], ["d"]),
                  oh.make_node("Mul", ["d", "x"], ["y"])]
    return unary_model(nodes, inits, opset)


RELU6_FORMS = ["(x*r)/6", "(r*x)*(1/6)", "x*(r/6)", "(r*(1/6))*x"]


@pytest.mark.parametrize("form", RELU6_FORMS)
@pytest.mark.parametrize("three_first", [False, True])
def test_x_times_relu6_over_6_becomes_hard_swish(form, three_first):
    after, [result] = apply_passes(relu6_form(form, three_first), FuseHardSwish())
    assert result.stats["fused"] == 1 and dict(count_ops(after)) == {"HardSwish": 1}
    assert node_of(after, "HardSwish").output[0] == "y"


@pytest.mark.parametrize("kwargs", [dict(three=2.0), dict(six=5.0), dict(high=5.0),
                                    dict(opset=13)],
                         ids=["add-2", "div-5", "clip-5", "opset-13"])
def test_relu6_form_near_misses_are_left_alone(kwargs):
    assert_pass_unchanged(relu6_form("(x*r)/6", **kwargs), FuseHardSwish())


def test_hard_swish_near_misses_are_left_alone():
    # HardSigmoid with ONNX's default alpha 0.2 is no HardSwish
    default_alpha = unary_model([oh.make_node("HardSigmoid", ["x"], ["h"]),
                                 oh.make_node("Mul", ["x", "h"], ["y"])])
    assert_pass_unchanged(default_alpha, FuseHardSwish())
    # alpha 1/6 but beta 0.4
    other_beta = unary_model([oh.make_node("HardSigmoid", ["x"], ["h"], alpha=1 / 6, beta=0.4),
                              oh.make_node("Mul", ["x", "h"], ["y"])])
    assert_pass_unchanged(other_beta, FuseHardSwish())
    # HardSigmoid of another tensor
    gate = build_model([oh.make_node("HardSigmoid", ["g"], ["h"], alpha=1 / 6, beta=0.5),
                        oh.make_node("Mul", ["x", "h"], ["y"])],
                       [vi("x", ["N", 8]), vi("g", ["N", 8])], [vi("y", None)])
    assert_pass_unchanged(gate, FuseHardSwish())
    # the Clip's output is read twice
    shared = relu6_form("(x*r)/6")
    shared.graph.output.append(vi("r", ["N", 4, 5, 5]))
    assert_pass_unchanged(shared, FuseHardSwish())


def test_hard_swish_needs_opset_14():
    proto = unary_model([oh.make_node("HardSigmoid", ["x"], ["h"], alpha=1 / 6, beta=0.5),
                         oh.make_node("Mul", ["x", "h"], ["y"])], opset=13)
    assert_pass_unchanged(proto, FuseHardSwish())


# ---------------------------------------------------------------------- fuse-conv-act
def conv_act(act, *act_inputs, bias=True, group=1, opset=17, c_in=4, c_out=4, **attrs):
    """Conv(x) -> ``act``; its extra inputs are (name, value): an initializer, or a scalar
    graph input when the value is None."""
    inits = [f32("w", rand(c_out, c_in // group, 3, 3))]
    conv_inputs = ["x", "w"]
    if bias:
        inits.append(f32("b", rand(c_out)))
        conv_inputs.append("b")
    names, inputs = [], [vi("x", ["N", c_in, 6, 6])]
    for name, value in act_inputs:
        if value is None:
            inputs.append(vi(name, []))
        else:
            inits.append(f32(name, value))
        names.append(name)
    nodes = [oh.make_node("Conv", conv_inputs, ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                          group=group),
             oh.make_node(act, ["c", *names], ["y"], **attrs)]
    return build_model(nodes, inputs, [vi("y", None)], inits, opset)


CONV_ACT_CASES = {
    "relu": (("Relu",), {}, "Relu", None),
    "tanh": (("Tanh",), {}, "Tanh", None),
    "sigmoid": (("Sigmoid",), {}, "Sigmoid", None),
    "leaky-relu": (("LeakyRelu",), dict(alpha=0.3), "LeakyRelu", [0.3]),
    "leaky-relu-default": (("LeakyRelu",), {}, "LeakyRelu", [0.01]),
    "hard-sigmoid": (("HardSigmoid",), dict(alpha=0.3, beta=0.4), "HardSigmoid", [0.3, 0.4]),
    "relu6": (("Clip", ("lo", 0.0), ("hi", 6.0)), {}, "Clip", [0.0, 6.0]),
    "clip-min-only": (("Clip", ("lo", -1.0)), {}, "Clip", [-1.0, float(np.finfo(np.float32).max)]),
}


@pytest.mark.parametrize("case", list(CONV_ACT_CASES))
def test_conv_activation_becomes_fused_conv(case):
    (act, *act_inputs), attrs, activation, params = CONV_ACT_CASES[case]
    proto = conv_act(act, *act_inputs, **attrs)
    after, [result] = apply_passes(proto, FuseConvActivation(), ctx=ORT)
    assert result.stats["fused"] == 1 and dict(count_ops(after)) == {"FusedConv": 1}
    node = node_of(after, "FusedConv")
    got = attrs_of(node)
    assert node.domain == "com.microsoft" and node.output[0] == "y"
    assert got["activation"].decode() == activation
    assert got["kernel_shape"] == [3, 3] and got["pads"] == [1, 1, 1, 1]
    if params is None:
        assert "activation_params" not in got
    else:
        np.testing.assert_allclose(got["activation_params"], params, rtol=1e-6)
    assert "com.microsoft" in domains(after)


def test_clip_attributes_before_opset_11():
    proto = conv_act("Clip", opset=9, min=0.0, max=6.0)
    after, _ = apply_passes(proto, FuseConvActivation())
    np.testing.assert_allclose(attrs_of(node_of(after, "FusedConv"))["activation_params"],
                               [0.0, 6.0])


@pytest.mark.parametrize("kwargs", [dict(bias=False), dict(group=4), dict(group=2, c_out=6)],
                         ids=["no-bias", "depthwise", "grouped"])
def test_conv_variants_fuse(kwargs):
    after, _ = apply_passes(conv_act("Relu", **kwargs), FuseConvActivation())
    assert dict(count_ops(after)) == {"FusedConv": 1}


@pytest.mark.parametrize("kernel,attrs", [
    ([3], dict(pads=[1, 1])),
    ([3, 3, 3], dict(pads=[1] * 6)),
    ([3, 3], dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    ([3, 3], dict(pads=[2, 1, 2, 1], dilations=[2, 1], strides=[1, 2])),
], ids=["conv1d", "conv3d", "same-upper-strided", "dilated"])
def test_conv_ranks_and_attributes_carry_over(kernel, attrs):
    w = f32("w", rand(4, 3, *kernel))
    nodes = [oh.make_node("Conv", ["x", "w"], ["c"], kernel_shape=kernel, **attrs),
             oh.make_node("LeakyRelu", ["c"], ["y"], alpha=0.2)]
    proto = build_model(nodes, [vi("x", ["N", 3, *([7] * len(kernel))])], [vi("y", None)], [w])
    after, _ = apply_passes(proto, FuseConvActivation())
    assert dict(count_ops(after)) == {"FusedConv": 1}
    got = attrs_of(node_of(after, "FusedConv"))
    for name, value in attrs.items():
        assert (got[name].decode() if isinstance(got[name], bytes) else got[name]) == value


def test_conv_act_near_misses_are_left_alone():
    # Conv output read twice
    twice = conv_act("Relu")
    twice.graph.node.append(oh.make_node("Sigmoid", ["c"], ["s"]))
    twice.graph.output.append(vi("s", ["N", 4, 6, 6]))
    assert_pass_unchanged(twice, FuseConvActivation())
    # Conv output is a graph output
    exposed = conv_act("Relu")
    exposed.graph.output.append(vi("c", ["N", 4, 6, 6]))
    assert_pass_unchanged(exposed, FuseConvActivation())
    # Clip with bounds from a graph input (not constant)
    dynamic = conv_act("Clip", ("lo", 0.0), ("hi", None))
    assert_pass_unchanged(dynamic, FuseConvActivation())
    # activations FusedConv's CPU kernel does not take (it accepts HardSwish and computes
    # something else)
    for act in ("HardSwish", "Elu", "Softplus"):
        assert_pass_unchanged(conv_act(act), FuseConvActivation())


def test_conv_act_needs_com_microsoft():
    assert_pass_unchanged(conv_act("Relu"), FuseConvActivation(), ctx=PLAIN)


def residual_model(z_shape=("N", 4, 6, 6), bias=True, z_from_conv=False):
    """Conv(x) + z -> Relu; z a graph input, or a second Conv's output."""
    inits = [f32("w", rand(4, 3, 3, 3)), f32("w2", rand(4, 3, 1, 1))]
    conv_inputs = ["x", "w"]
    if bias:
        inits.append(f32("b", rand(4)))
        conv_inputs.append("b")
    nodes = [oh.make_node("Conv", conv_inputs, ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             oh.make_node("Add", ["c", "z"], ["a"]), oh.make_node("Relu", ["a"], ["y"])]
    inputs = [vi("x", ["N", 3, 6, 6])]
    if z_from_conv:
        nodes.insert(0, oh.make_node("Conv", ["x", "w2"], ["z"], kernel_shape=[1, 1]))
    else:
        inputs.append(vi("z", list(z_shape)))
    return build_model(nodes, inputs, [vi("y", None)], inits)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("z_from_conv", [True, False])
def test_conv_add_relu_uses_the_z_input(bias, z_from_conv):
    proto = residual_model(bias=bias, z_from_conv=z_from_conv)
    after, [result] = apply_passes(proto, FuseConvActivation(residual=True))
    assert result.stats == {"fused": 1, "with_residual": 1}
    fused = node_of(after, "FusedConv")
    assert len(fused.input) == 4 and fused.input[3] == "z" and fused.output[0] == "y"
    assert count_ops(after)["Add"] == 0 and count_ops(after)["Relu"] == 0


def test_residual_is_off_by_default():
    assert_pass_unchanged(residual_model(), FuseConvActivation())


@pytest.mark.parametrize("z_shape", [(1, 4, 6, 6), ("N", 4, 1, 1), ("M", 4, 6, 6)],
                         ids=["batch-1", "per-channel", "other-symbol"])
def test_residual_that_broadcasts_is_left_alone(z_shape):
    proto = residual_model(z_shape)
    assert_pass_unchanged(proto, FuseConvActivation(residual=True))


# ---------------------------------------------------------------------- through the manager
def test_through_the_manager_with_dynamic_batch():
    """Conv -> BN -> Relu6, Conv -> SiLU, Conv -> HardSigmoid * x: everything fused."""
    c = 4
    inits = [f32("w1", rand(c, 3, 3, 3)), f32("w2", rand(c, c, 3, 3)), f32("w3", rand(c, c, 1, 1)),
             f32("g", rng.uniform(0.5, 2, c)), f32("be", rand(c)), f32("mu", rand(c)),
             f32("var", rng.uniform(0.5, 2, c)), f32("lo", 0.0), f32("hi", 6.0)]
    nodes = [oh.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             oh.make_node("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["n1"]),
             oh.make_node("Clip", ["n1", "lo", "hi"], ["r1"]),
             oh.make_node("Conv", ["r1", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             oh.make_node("Sigmoid", ["c2"], ["s2"]), oh.make_node("Mul", ["c2", "s2"], ["a2"]),
             oh.make_node("Conv", ["a2", "w3"], ["c3"], kernel_shape=[1, 1]),
             oh.make_node("HardSigmoid", ["c3"], ["h3"], alpha=1 / 6, beta=0.5),
             oh.make_node("Mul", ["h3", "c3"], ["y"])]
    proto = build_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", c, 8, 8])], inits)
    for size in (1, 3):
        feeds = verify.probe_inputs(proto, count=2, seed=size, symbolic_size=size)
        result = graphopt.optimize(proto, passes=PIPELINE, data=feeds)
        assert result.report["verification"]["ok"] is True
        assert result.report["rolled_back"] == []
        assert dict(count_ops(result.model.to_onnx())) == {"FusedConv": 1, "Conv": 2,
                                                           "QuickGelu": 1, "HardSwish": 1}


def test_a_target_without_com_microsoft_leaves_the_passes_out():
    proto = conv_act("Relu")
    result = graphopt.optimize(proto, target=PlainOnnx())
    assert set(result.report["left_out"]) == {"fuse-silu", "fuse-conv-act"}
    assert dict(count_ops(result.model.to_onnx())) == {"Conv": 1, "Relu": 1}
    with pytest.raises(UsageError):
        graphopt.optimize(proto, target=PlainOnnx(), passes="fuse-conv-act")


# ---------------------------------------------------------------------- zoo CNNs
def unfused_convs(proto: onnx.ModelProto) -> int:
    """Convs whose only reader is an activation FusedConv takes (with constant bounds for
    Clip), i.e. convs fuse-conv-act should have fused."""
    graph = proto.graph
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    consts = {t.name for t in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output}
    outputs = {o.name for o in graph.output}
    count = 0
    for node in graph.node:
        if node.op_type != "Conv" or node.output[0] in outputs:
            continue
        users = readers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type not in FUSED_CONV_ACTIVATIONS:
            continue
        if users[0].op_type == "Clip" and not all(i in consts for i in users[0].input[1:] if i):
            continue
        count += 1
    return count


# FusedConv count after the pipeline (resnet_cnn: 4 Conv + Relu; its 3 Conv + Add + Relu
# need residual=true).
ZOO = [("resnet_cnn", 4), ("mobilenet_cnn", 11),
       pytest.param("mobilenet_v2", 35, marks=pytest.mark.slow),
       pytest.param("efficientnet_b0", 16, marks=pytest.mark.slow)]


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name,fused", ZOO)
def test_zoo_cnns_leave_no_fusable_conv(name, fused, exporter, record_nodes):
    pytest.importorskip("torch")
    from tests import zoo

    proto = getattr(zoo, name)(exporter)
    before = graphopt.optimize(proto, passes=BASE_PIPELINE).model.to_onnx()
    result = graphopt.optimize(proto, passes=PIPELINE)
    after = result.model.to_onnx()
    record_nodes(len(before.graph.node), len(after.graph.node))
    assert result.report["verification"]["ok"] is True
    assert result.report["rolled_back"] == []
    assert unfused_convs(before) > 0
    assert unfused_convs(after) == 0
    ops = count_ops(after)
    if count_ops(before)["BatchNormalization"] == 0:
        # (the dynamo export of the big nets keeps some BN, whose Conv is no FusedConv)
        assert ops["FusedConv"] == fused
    if name == "efficientnet_b0":
        assert ops["QuickGelu"] == 49 and ops["Sigmoid"] == 0


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_resnet_residual_blocks_fuse_with_z(exporter):
    pytest.importorskip("torch")
    from tests import zoo

    passes = PIPELINE.replace("fuse-conv-act", "fuse-conv-act(residual=true)")
    result = graphopt.optimize(zoo.resnet_cnn(exporter), passes=passes)
    after = result.model.to_onnx()
    assert result.report["verification"]["ok"] is True
    assert result.report["rolled_back"] == []
    ops = count_ops(after)
    assert ops["FusedConv"] == 7 and ops["Add"] == 0 and ops["Relu"] == 0
    assert sum(len(n.input) == 4 for n in after.graph.node if n.op_type == "FusedConv") == 3
