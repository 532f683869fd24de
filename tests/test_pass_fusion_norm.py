"""Normalization fusions: decomposed LayerNorm → LayerNormalization, RMSNorm →
RMSNormalization, Add + LayerNorm/RMSNorm → com.microsoft SkipLayerNormalization /
SkipSimplifiedLayerNormalization.

Positive cases check the fused op replaced the pattern and the outputs match ONNX Runtime
on the original (symbolic dims at sizes 1 and 3); near misses check nothing changed; the
BERT exports (TorchScript and dynamo; tiny and the real MiniLM) check every LayerNorm is
fused, through the pass manager too."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto

from graphopt import verify
from graphopt.ir import load
from graphopt.pass_infra import PassContext
from graphopt.passes.fusion.norm import FuseLayerNorm, FuseRmsNorm, FuseSkipLayerNorm
from graphopt.targets.ort import OrtTarget
from helpers import build_model, count_ops, store_calibration
from fusion_checks import (assert_same, bert_feeds, FLOAT, NoNormTarget, PlainOnnxTarget, apply,
                           assert_embeddings_match, assert_unchanged, const, f32, i64,
                           optimize_checked, ops_in, plain_ctx, vi)
from tests import decomposed_bert, zoo

H = 16
rng = np.random.default_rng(0)


def rand(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ---------------------------------------------------------------------- model builders
def _axes(node_inputs, name, axes, opset, inits, attrs):
    """ReduceMean axes: an attribute before opset 18, an input from 18."""
    if opset >= 18:
        inits.append(i64(name, axes))
        node_inputs.append(name)
    else:
        attrs["axes"] = axes


def _scalar(name, value, form, nodes, inits):
    if form == "constant":
        nodes.append(const(name, value))
    else:
        inits.append(f32(name, value))


def layer_norm(x="x", y="y", *, p="ln", opset=17, square="pow", exponent=2.0,
               pow_form="init", divide="div", gamma=True, beta=True, gamma_first=False,
               axes=(-1,), var_axes=None, eps=1e-5, eps_form="init", gamma_value=None):
    """ReduceMean → Sub → Pow|Mul → ReduceMean → Add ε → Sqrt → Div|Reciprocal+Mul
    [→ Mul γ] [→ Add β]: (nodes, initializers)."""
    nodes, inits = [], []
    attrs = {}
    mean_in = [x]
    _axes(mean_in, f"{p}_axes", list(axes), opset, inits, attrs)
    nodes.append(oh.make_node("ReduceMean", mean_in, [f"{p}_mean"], **attrs))
    nodes.append(oh.make_node("Sub", [x, f"{p}_mean"], [f"{p}_d"]))
    if square == "pow":
        _scalar(f"{p}_two", exponent, pow_form, nodes, inits)
        nodes.append(oh.make_node("Pow", [f"{p}_d", f"{p}_two"], [f"{p}_sq"]))
    else:
        nodes.append(oh.make_node("Mul", [f"{p}_d", f"{p}_d"], [f"{p}_sq"]))
    attrs, var_in = {}, [f"{p}_sq"]
    _axes(var_in, f"{p}_vaxes", list(var_axes or axes), opset, inits, attrs)
    nodes.append(oh.make_node("ReduceMean", var_in, [f"{p}_var"], **attrs))
    if eps_form == "input":
        eps_name = "eps"
    else:
        eps_name = f"{p}_eps"
        _scalar(eps_name, eps, eps_form, nodes, inits)
    nodes.append(oh.make_node("Add", [f"{p}_var", eps_name], [f"{p}_ve"]))
    nodes.append(oh.make_node("Sqrt", [f"{p}_ve"], [f"{p}_std"]))
    out = f"{p}_norm" if gamma or beta else y
    if divide == "div":
        nodes.append(oh.make_node("Div", [f"{p}_d", f"{p}_std"], [out]))
    else:
        nodes.append(oh.make_node("Reciprocal", [f"{p}_std"], [f"{p}_inv"]))
        nodes.append(oh.make_node("Mul", [f"{p}_inv", f"{p}_d"], [out]))
    if gamma:
        inits.append(f32(f"{p}_gamma", rand(H) + 1 if gamma_value is None else gamma_value))
        scaled = f"{p}_scaled" if beta else y
        operands = [f"{p}_gamma", out] if gamma_first else [out, f"{p}_gamma"]
        nodes.append(oh.make_node("Mul", operands, [scaled]))
        out = scaled
    if beta:
        inits.append(f32(f"{p}_beta", rand(H, scale=0.1)))
        operands = [f"{p}_beta", out] if gamma_first else [out, f"{p}_beta"]
        nodes.append(oh.make_node("Add", operands, [y]))
    return nodes, inits


def ln_model(opset=17, shape=("N", "S", H), extra_inputs=(), extra_outputs=(), **kwargs):
    nodes, inits = layer_norm(opset=opset, **kwargs)
    return build_model(nodes, [vi("x", list(shape)), *extra_inputs],
                       [vi("y", list(shape)), *extra_outputs], inits, opset=opset)


def rms_norm(x="x", y="y", *, p="rms", opset=23, square="pow", divide="div",
             gamma=True, gamma_first=False, axes=(-1,), eps=1e-6, exponent=2.0):
    """Pow|Mul → ReduceMean → Add ε → Sqrt → Div | Reciprocal+Mul | Div(1,·)+Mul [→ Mul γ]."""
    nodes, inits = [], []
    if square == "pow":
        inits.append(f32(f"{p}_two", exponent))
        nodes.append(oh.make_node("Pow", [x, f"{p}_two"], [f"{p}_sq"]))
    else:
        nodes.append(oh.make_node("Mul", [x, x], [f"{p}_sq"]))
    attrs, var_in = {}, [f"{p}_sq"]
    _axes(var_in, f"{p}_axes", list(axes), opset, inits, attrs)
    nodes.append(oh.make_node("ReduceMean", var_in, [f"{p}_ms"], **attrs))
    inits.append(f32(f"{p}_eps", eps))
    nodes.append(oh.make_node("Add", [f"{p}_ms", f"{p}_eps"], [f"{p}_ve"]))
    nodes.append(oh.make_node("Sqrt", [f"{p}_ve"], [f"{p}_r"]))
    out = f"{p}_norm" if gamma else y
    if divide == "div":
        nodes.append(oh.make_node("Div", [x, f"{p}_r"], [out]))
    elif divide == "reciprocal":
        nodes.append(oh.make_node("Reciprocal", [f"{p}_r"], [f"{p}_inv"]))
        nodes.append(oh.make_node("Mul", [x, f"{p}_inv"], [out]))
    else:  # 1 / r
        inits.append(f32(f"{p}_one", 1.0))
        nodes.append(oh.make_node("Div", [f"{p}_one", f"{p}_r"], [f"{p}_inv"]))
        nodes.append(oh.make_node("Mul", [f"{p}_inv", x], [out]))
    if gamma:
        inits.append(f32(f"{p}_gamma", rand(H) + 1))
        operands = [f"{p}_gamma", out] if gamma_first else [out, f"{p}_gamma"]
        nodes.append(oh.make_node("Mul", operands, [y]))
    return nodes, inits


def rms_model(opset=23, **kwargs):
    nodes, inits = rms_norm(opset=opset, **kwargs)
    return build_model(nodes, [vi("x", ["N", "S", H])], [vi("y", ["N", "S", H])], inits,
                       opset=opset)


def count_layer_norm_patterns(proto: onnx.ModelProto) -> int:
    """Decomposed LayerNorms, counted independently of the pass: a ReduceMean whose output
    a Sub subtracts from the ReduceMean's own input."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    count = 0
    for node in proto.graph.node:
        if node.op_type == "Sub" and node.input[1] in producers:
            mean = producers[node.input[1]]
            count += mean.op_type == "ReduceMean" and mean.input[0] == node.input[0]
    return count


# ---------------------------------------------------------------------- fuse-layer-norm
LN_VARIANTS = {
    "pow-div": dict(),
    "opset18-axes-input": dict(opset=18),
    "mul-self-reciprocal": dict(square="mul", divide="reciprocal"),
    "pow-constant-node": dict(pow_form="constant", eps_form="constant"),
    "gamma-beta-first": dict(gamma_first=True),
    "axis-rank-minus-1": dict(axes=(2,), var_axes=(-1,)),
    "no-affine": dict(gamma=False, beta=False),
    "gamma-only": dict(beta=False),
    "beta-only": dict(gamma=False),
    "eps-zero-free": dict(eps=1e-12),
}


@pytest.mark.parametrize("variant", list(LN_VARIANTS))
def test_layer_norm_fuses(variant):
    kwargs = LN_VARIANTS[variant]
    proto = ln_model(**kwargs)
    after, (result,) = apply(proto, FuseLayerNorm())
    assert result.changed and result.stats["fused"] == 1
    ops = count_ops(after)
    assert ops["LayerNormalization"] == 1 and ops.total() == 1, ops
    node = after.graph.node[0]
    attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
    assert attrs["axis"] == -1
    assert attrs["epsilon"] == pytest.approx(kwargs.get("eps", 1e-5), rel=1e-6)
    assert len(node.input) == (3 if kwargs.get("beta", True) else 2)


def test_layer_norm_fixed_shape_and_graph_output_name():
    proto = ln_model(shape=(2, 5, H))
    after, _ = apply(proto, FuseLayerNorm(), batches=(1,))
    assert after.graph.node[0].output[0] == "y"


def test_layer_norm_several_and_in_a_subgraph():
    """Two LayerNorms in a row in the main graph, one in an If branch (reading the
    outer x): all fused, the branch output keeps its name."""
    first, inits1 = layer_norm("x", "h", p="a")
    second, inits2 = layer_norm("h", "y", p="b", square="mul")
    branch_nodes, branch_inits = layer_norm("x", "then_y", p="t", divide="reciprocal")
    then_graph = oh.make_graph(branch_nodes, "then", [], [vi("then_y", ["N", "S", H])],
                               branch_inits)
    else_graph = oh.make_graph([oh.make_node("Identity", ["x"], ["else_y"])], "else", [],
                               [vi("else_y", ["N", "S", H])])
    nodes = first + second + [
        oh.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        oh.make_node("Greater", ["total", "zero"], ["cond"]),
        oh.make_node("If", ["cond"], ["z"], then_branch=then_graph, else_branch=else_graph)]
    proto = build_model(nodes, [vi("x", ["N", "S", H])],
                        [vi("y", ["N", "S", H]), vi("z", ["N", "S", H])],
                        inits1 + inits2 + [f32("zero", 0.0)])
    after, (result,) = apply(proto, FuseLayerNorm())
    assert result.stats["fused"] == 3
    assert count_ops(after)["LayerNormalization"] == 3
    branch = next(a.g for n in after.graph.node if n.op_type == "If" for a in n.attribute
                  if a.name == "then_branch")
    assert [n.op_type for n in branch.node] == ["LayerNormalization"]
    assert branch.output[0].name == "then_y"


def test_layer_norm_cast_around_float16():
    """An fp16 export: Cast to float, LayerNorm core in float32, Cast back, γ and β in
    fp16. The float32 core fuses; the Casts and the fp16 Mul/Add stay."""
    half = TensorProto.FLOAT16
    core, inits = layer_norm("x32", "n32", p="c", gamma=False, beta=False)
    nodes = [oh.make_node("Cast", ["x"], ["x32"], to=FLOAT), *core,
             oh.make_node("Cast", ["n32"], ["n16"], to=half),
             oh.make_node("Mul", ["n16", "g16"], ["s16"]),
             oh.make_node("Add", ["s16", "b16"], ["y"])]
    inits += [onnx.numpy_helper.from_array((rand(H) + 1).astype(np.float16), "g16"),
              onnx.numpy_helper.from_array(rand(H, scale=0.1).astype(np.float16), "b16")]
    proto = build_model(nodes, [vi("x", ["N", "S", H], half)], [vi("y", ["N", "S", H], half)],
                        inits)
    after, (result,) = apply(proto, FuseLayerNorm(), tol=verify.Tolerance(rtol=1e-3, atol=1e-3))
    assert result.stats["fused"] == 1
    assert [n.op_type for n in after.graph.node] == ["Cast", "LayerNormalization", "Cast",
                                                     "Mul", "Add"]


def test_layer_norm_upgrades_opset14():
    proto = ln_model(opset=14)
    after, (result,) = apply(proto, FuseLayerNorm())
    assert result.stats == {"fused": 1, "opset_upgraded_to": 17}
    assert {o.domain: o.version for o in after.opset_import}[""] == 17
    assert count_ops(after)["LayerNormalization"] == 1


def test_layer_norm_without_upgrade_leaves_opset14_alone():
    stats = assert_unchanged(ln_model(opset=14), FuseLayerNorm(upgrade_opset=False))
    assert "needs opset 17" in stats["skipped"]


def test_layer_norm_plain_onnx_target_gets_the_standard_op():
    after, _ = apply(ln_model(), FuseLayerNorm(), ctx=plain_ctx())
    assert [n.op_type for n in after.graph.node] == ["LayerNormalization"]


def test_layer_norm_target_without_the_op():
    assert_unchanged(ln_model(), FuseLayerNorm(), PassContext(target=NoNormTarget()))


def _mean_as_output():
    nodes, inits = layer_norm()
    return build_model(nodes, [vi("x", ["N", "S", H])],
                       [vi("y", ["N", "S", H]), vi("ln_mean", ["N", "S", 1])], inits)


def _variance_read_elsewhere():
    nodes, inits = layer_norm()
    nodes.append(oh.make_node("Sqrt", ["ln_var"], ["other"]))
    return build_model(nodes, [vi("x", ["N", "S", H])],
                       [vi("y", ["N", "S", H]), vi("other", ["N", "S", 1])], inits)


def _centered_read_elsewhere():
    nodes, inits = layer_norm()
    nodes.append(oh.make_node("Relu", ["ln_d"], ["other"]))
    return build_model(nodes, [vi("x", ["N", "S", H])],
                       [vi("y", ["N", "S", H]), vi("other", ["N", "S", H])], inits)


def _mean_of_other_tensor():
    nodes, inits = layer_norm()
    nodes[0].input[0] = "x2"
    return build_model(nodes, [vi("x", ["N", "S", H]), vi("x2", ["N", "S", H])],
                       [vi("y", ["N", "S", H])], inits)


LN_NEAR_MISSES = {
    "wrong-axis": lambda: ln_model(axes=(1,), var_axes=(1,)),
    "variance-over-other-axis": lambda: ln_model(var_axes=(1,)),
    "pow-exponent-3": lambda: ln_model(exponent=3.0),
    "pow-exponent-2.5-constant": lambda: ln_model(exponent=2.5, pow_form="constant"),
    "eps-graph-input": lambda: ln_model(eps_form="input", extra_inputs=[vi("eps", [])]),
    "eps-vector": lambda: ln_model(eps=np.full(H, 1e-5, dtype=np.float32)),
    "mean-is-graph-output": _mean_as_output,
    "variance-read-elsewhere": _variance_read_elsewhere,
    "centered-read-elsewhere": _centered_read_elsewhere,
    "mean-of-another-tensor": _mean_of_other_tensor,
    "rank-3-hidden-unknown": lambda: ln_model(shape=("N", "S", "H"), gamma=False, beta=False),
}


@pytest.mark.parametrize("case", list(LN_NEAR_MISSES))
def test_layer_norm_near_miss(case):
    assert_unchanged(LN_NEAR_MISSES[case](), FuseLayerNorm())


def test_layer_norm_normalized_read_elsewhere_keeps_the_affine():
    """The normalized value is read by another node too: the core fuses, γ and β stay."""
    nodes, inits = layer_norm()
    nodes.append(oh.make_node("Relu", ["ln_norm"], ["other"]))
    proto = build_model(nodes, [vi("x", ["N", "S", H])],
                        [vi("y", ["N", "S", H]), vi("other", ["N", "S", H])], inits)
    after, _ = apply(proto, FuseLayerNorm())
    assert count_ops(after) == {"LayerNormalization": 1, "Mul": 1, "Add": 1, "Relu": 1}


def test_layer_norm_float16_core_not_fused():
    """All-fp16 arithmetic rounds after every op; LayerNormalization would not."""
    nodes, inits = layer_norm(gamma=False, beta=False)
    inits = [onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.float16),
                                          t.name) if t.data_type == FLOAT else t
             for t in inits]
    proto = build_model(nodes, [vi("x", ["N", "S", H], TensorProto.FLOAT16)],
                        [vi("y", ["N", "S", H], TensorProto.FLOAT16)], inits)
    assert_unchanged(proto, FuseLayerNorm())


# ---------------------------------------------------------------------- fuse-rms-norm
RMS_VARIANTS = {
    "pow-div": dict(),
    "mul-self-reciprocal": dict(square="mul", divide="reciprocal"),
    "one-over-gamma-first": dict(divide="one-over", gamma_first=True),
    "no-gamma": dict(gamma=False),
}


@pytest.mark.parametrize("variant", list(RMS_VARIANTS))
def test_rms_norm_fuses_at_opset23(variant):
    after, (result,) = apply(rms_model(**RMS_VARIANTS[variant]), FuseRmsNorm())
    assert result.stats["fused"] == 1
    assert [n.op_type for n in after.graph.node] == ["RMSNormalization"]


def test_rms_norm_upgrades_opset17():
    after, (result,) = apply(rms_model(opset=17), FuseRmsNorm())
    assert result.stats == {"fused": 1, "opset_upgraded_to": 23}
    assert [n.op_type for n in after.graph.node] == ["RMSNormalization"]


def test_rms_norm_without_upgrade_leaves_opset17_alone():
    assert_unchanged(rms_model(opset=17), FuseRmsNorm(upgrade_opset=False))


@pytest.mark.parametrize("case", ["exponent-3", "wrong-axis", "layer-norm"])
def test_rms_norm_near_miss(case):
    proto = {"exponent-3": lambda: rms_model(exponent=3.0),
             "wrong-axis": lambda: rms_model(axes=(1,)),
             "layer-norm": lambda: ln_model(opset=23)}[case]()
    assert_unchanged(proto, FuseRmsNorm())


# ---------------------------------------------------------------------- fuse-skip-layer-norm
def skip_model(add_nodes, inputs, *, opset=17, norm="LayerNormalization", outputs=None,
               beta=True):
    """``add_nodes`` write ``sum``; a LayerNormalization (or RMSNormalization) of it
    writes ``y``."""
    inits = [f32("gamma", rand(H) + 1), f32("beta", rand(H, scale=0.1)),
             f32("bias", rand(H, scale=0.1))]
    norm_inputs = ["sum", "gamma"] + (["beta"] if beta and norm == "LayerNormalization" else [])
    nodes = [*add_nodes, oh.make_node(norm, norm_inputs, ["y"], axis=-1, epsilon=1e-6)]
    return build_model(nodes, inputs, outputs or [vi("y", ["N", "S", H])], inits, opset=opset)


X3 = vi("x", ["N", "S", H])
SKIP3 = vi("skip", ["N", "S", H])
SKIP_CASES = {
    # name: (Add nodes, inputs, whether a bias folds in)
    "plain": ([oh.make_node("Add", ["x", "skip"], ["sum"])], [X3, SKIP3], False),
    "bias-on-input": ([oh.make_node("Add", ["x", "bias"], ["xb"]),
                       oh.make_node("Add", ["xb", "skip"], ["sum"])], [X3, SKIP3], True),
    "bias-first-skip-first": ([oh.make_node("Add", ["bias", "x"], ["xb"]),
                               oh.make_node("Add", ["skip", "xb"], ["sum"])], [X3, SKIP3], True),
    "bias-around-sum": ([oh.make_node("Add", ["x", "skip"], ["xs"]),
                         oh.make_node("Add", ["xs", "bias"], ["sum"])], [X3, SKIP3], True),
    "skip-1SH": ([oh.make_node("Add", ["x", "skip"], ["sum"])],
                 [X3, vi("skip", [1, "S", H])], False),
    "input-1SH-swapped": ([oh.make_node("Add", ["x", "skip"], ["sum"])],
                          [vi("x", [1, "S", H]), vi("skip", ["N", "S", H])], False),
    "skip-SH": ([oh.make_node("Add", ["x", "skip"], ["sum"])],
                [X3, vi("skip", ["S", H])], False),
    "2d": ([oh.make_node("Add", ["x", "skip"], ["sum"])],
           [vi("x", ["T", H]), vi("skip", ["T", H])], False),
}


@pytest.mark.parametrize("case", list(SKIP_CASES))
def test_skip_layer_norm_fuses(case):
    adds, inputs, folds_bias = SKIP_CASES[case]
    out_shape = ["T", H] if case == "2d" else ["N", "S", H]
    proto = skip_model(adds, inputs, outputs=[vi("y", out_shape)])
    after, (result,) = apply(proto, FuseSkipLayerNorm())
    assert result.stats["fused"] == 1
    (node,) = after.graph.node
    assert (node.op_type, node.domain) == ("SkipLayerNormalization", "com.microsoft")
    assert len(node.input) == (5 if folds_bias else 4)
    assert list(node.output) == ["y"]


def test_skip_layer_norm_without_beta_with_bias():
    adds = [oh.make_node("Add", ["x", "bias"], ["xb"]), oh.make_node("Add", ["xb", "skip"],
                                                                       ["sum"])]
    after, _ = apply(skip_model(adds, [X3, SKIP3], beta=False), FuseSkipLayerNorm())
    (node,) = after.graph.node
    assert list(node.input) == ["x", "skip", "gamma", "", "bias"]


def test_skip_layer_norm_keeps_a_used_sum():
    """The sum is read elsewhere and is a graph output: it becomes the 4th output."""
    adds = [oh.make_node("Add", ["x", "skip"], ["sum"]), oh.make_node("Relu", ["sum"], ["r"])]
    proto = skip_model(adds, [X3, SKIP3], outputs=[vi("y", ["N", "S", H]),
                                                   vi("sum", ["N", "S", H]),
                                                   vi("r", ["N", "S", H])])
    after, _ = apply(proto, FuseSkipLayerNorm())
    fused = next(n for n in after.graph.node if n.op_type == "SkipLayerNormalization")
    assert list(fused.output) == ["y", "", "", "sum"]
    assert [o.name for o in after.graph.output] == ["y", "sum", "r"]


def test_skip_rms_norm():
    adds = [oh.make_node("Add", ["x", "bias"], ["xb"]), oh.make_node("Add", ["xb", "skip"],
                                                                       ["sum"])]
    proto = skip_model(adds, [X3, SKIP3], opset=23, norm="RMSNormalization")
    after, _ = apply(proto, FuseSkipLayerNorm())
    (node,) = after.graph.node
    assert node.op_type == "SkipSimplifiedLayerNormalization"
    assert list(node.input) == ["x", "skip", "gamma", "bias"]


def test_rms_then_skip_from_decomposed():
    """An opset-17 residual block with a decomposed RMSNorm: fuse-rms-norm upgrades and
    fuses, fuse-skip-layer-norm takes the residual Add."""
    nodes, inits = rms_norm("sum", "y", opset=17)
    proto = build_model([oh.make_node("Add", ["x", "skip"], ["sum"]), *nodes], [X3, SKIP3],
                        [vi("y", ["N", "S", H])], inits, opset=17)
    after, results = apply(proto, FuseRmsNorm(), FuseSkipLayerNorm())
    assert [r.stats["fused"] for r in results] == [1, 1]
    assert [n.op_type for n in after.graph.node] == ["SkipSimplifiedLayerNormalization"]


SKIP_NEAR_MISSES = {
    "skip-N1H": ([oh.make_node("Add", ["x", "skip"], ["sum"])], [X3, vi("skip", ["N", 1, H])]),
    "skip-unrelated-dims": ([oh.make_node("Add", ["x", "skip"], ["sum"])],
                            [X3, vi("skip", ["M", "S", H])]),
    "rank-4": ([oh.make_node("Add", ["x", "skip"], ["sum"])],
               [vi("x", ["N", 2, "S", H]), vi("skip", ["N", 2, "S", H])]),
    "no-add": ([oh.make_node("Mul", ["x", "skip"], ["sum"])], [X3, SKIP3]),
}


@pytest.mark.parametrize("case", list(SKIP_NEAR_MISSES))
def test_skip_layer_norm_near_miss(case):
    adds, inputs = SKIP_NEAR_MISSES[case]
    out = [vi("y", ["N", 2, "S", H] if case == "rank-4" else ["N", "S", H])]
    assert_unchanged(skip_model(adds, inputs, outputs=out), FuseSkipLayerNorm())


def test_skip_layer_norm_mean_output_used():
    inits = [f32("gamma", rand(H) + 1)]
    nodes = [oh.make_node("Add", ["x", "skip"], ["sum"]),
             oh.make_node("LayerNormalization", ["sum", "gamma"], ["y", "mean"], axis=-1)]
    proto = build_model(nodes, [X3, SKIP3], [vi("y", ["N", "S", H]), vi("mean", ["N", "S", 1])],
                        inits)
    assert_unchanged(proto, FuseSkipLayerNorm())


def test_skip_layer_norm_needs_com_microsoft():
    proto = skip_model(*SKIP_CASES["plain"][:2])
    assert_unchanged(proto, FuseSkipLayerNorm(), plain_ctx())


# ---------------------------------------------------------------------- exported BERTs
NORM_PASSES = "eliminate-identity,fold-constants,fuse-layer-norm,fuse-skip-layer-norm"


@pytest.fixture
def skip_measured_faster(tmp_path, monkeypatch):
    """fuse-skip-layer-norm is a choice of form (Pass.alternative): these tests run on a
    device whose calibration measured SkipLayerNormalization faster."""
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path))
    store_calibration(OrtTarget(), skip_layer_norm=0.5)


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_bert_tiny_skip_layer_norm(exporter, skip_measured_faster):
    """The export already has LayerNormalization (opset 17/18): the 4 after a residual Add
    become SkipLayerNormalization (bias folded); the embeddings' one, whose position
    embeddings' shape is not provably [1, S, H], stays."""
    proto = zoo.bert_tiny(exporter)
    assert count_ops(proto)["LayerNormalization"] == 5
    result = optimize_checked(proto, NORM_PASSES)
    after = result.model.to_onnx()
    assert ops_in(after, "com.microsoft") == {"SkipLayerNormalization": 4}
    assert count_ops(after)["LayerNormalization"] == 1
    assert all(len(n.input) == 5 for n in after.graph.node
               if n.op_type == "SkipLayerNormalization")
    assert_same(proto, after, bert_feeds(zoo.BERT_TINY_VOCAB))


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_bert_tiny_decomposed_layer_norms(exporter):
    """Every decomposed LayerNorm (TorchScript at opset 14: upgraded to 17; dynamo at 18
    with axes as inputs) becomes LayerNormalization, on a plain-ONNX target too."""
    proto = decomposed_bert.bert_tiny(exporter)
    assert count_layer_norm_patterns(proto) == 5
    result = optimize_checked(proto, "eliminate-identity,fold-constants,fuse-layer-norm",
                              target=PlainOnnxTarget())
    after = result.model.to_onnx()
    assert count_ops(after)["LayerNormalization"] == 5
    assert count_layer_norm_patterns(after) == 0 and count_ops(after)["ReduceMean"] == 0
    assert {o.domain: o.version for o in after.opset_import}[""] == (17 if exporter ==
                                                                     "torchscript" else 18)
    assert_same(proto, after, bert_feeds(zoo.BERT_TINY_VOCAB))


@pytest.mark.slow
@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_minilm_layer_norms(exporter, skip_measured_faster):
    """The real all-MiniLM-L6-v2 with its 13 LayerNorms decomposed: all 13 fuse, 12 of
    them take their residual Add (SkipLayerNormalization); the embeddings agree on real
    sentences."""
    proto = decomposed_bert.bert_minilm(exporter)
    assert count_layer_norm_patterns(proto) == 13
    result = optimize_checked(proto, NORM_PASSES, data=[zoo.minilm_tokenize()])
    after = result.model.to_onnx()
    trace = {e["pass_name"]: e["stats"] for e in result.report["trace"]
             if e["iteration"] == 1}
    assert trace["fuse-layer-norm"]["fused"] == 13
    assert count_layer_norm_patterns(after) == 0
    assert ops_in(after, "com.microsoft") == {"SkipLayerNormalization": 12}
    assert count_ops(after)["LayerNormalization"] == 1
    assert_embeddings_match(proto, after, zoo.minilm_tokenize())
    assert_embeddings_match(proto, after, zoo.minilm_tokenize(zoo.MINILM_SENTENCES[:1]))


def test_manager_runs_all_norm_passes_on_helper_models(skip_measured_faster):
    """Through graphopt.optimize: verified, nothing rolled back."""
    nodes, inits = layer_norm("x", "h", opset=14)
    add = oh.make_node("Add", ["h", "skip"], ["sum"])
    nodes2, inits2 = layer_norm("sum", "y", p="second", opset=14, divide="reciprocal")
    proto = build_model(nodes + [add] + nodes2, [X3, SKIP3], [vi("y", ["N", "S", H])],
                        inits + inits2, opset=14)
    result = optimize_checked(proto, "fuse-layer-norm,fuse-rms-norm,fuse-skip-layer-norm")
    after = result.model.to_onnx()
    assert count_ops(after) == {"LayerNormalization": 1, "SkipLayerNormalization": 1}
    loaded = load(after)
    assert loaded.opset == 17


def test_the_opset_upgrade_leaves_spilled_weights_in_their_file():
    """A run's weights moved to its data file stay references through the opset upgrade
    (the converter rewrites nodes; exporting the weights into its proto copied them all,
    and the run wrote them out again): same outputs, weights still mapped."""
    from graphopt import external_data
    from graphopt.ir import Model
    from graphopt.passes._patterns import upgrade_opset
    from graphopt.spill import Spill

    weight = rand(H, 1 << 14)  # 1 MB
    proto = build_model([oh.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", ["N", H])],
                        [vi("y", ["N", 1 << 14])],
                        [onnx.numpy_helper.from_array(weight, "w")], opset=14)
    model = Model.from_proto(proto)
    spill = Spill(model, min_bytes=0)
    assert spill.moved and upgrade_opset(model, 17) is None and model.opset == 17
    const = next(t for t in model.initializers() if t.name == "w")
    assert external_data.mapped_source(const._values) is not None  # noqa: SLF001
    feeds = {"x": rand(3, H)}
    got = verify.run(verify.session(model.to_onnx()), feeds)["y"]
    np.testing.assert_allclose(got, feeds["x"] @ weight, rtol=1e-5, atol=1e-5)
