"""GELU fusions: the erf GELU and its tanh approximation written in elementwise ops →
Gelu (opset 20) or com.microsoft Gelu/FastGelu; a bias Add before a GELU → com.microsoft
BiasGelu / FastGelu with bias.

Positive cases cover the operand orders exporters write and check the outputs match ONNX
Runtime on the original (symbolic dims at sizes 1 and 3); near misses (a constant off by
more than 1e-4, an intermediate read elsewhere, ...) check nothing changed; the BERT
exports (TorchScript and dynamo; tiny and the real MiniLM) check every GELU is fused."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto

from graphopt.pass_infra import PassContext
from graphopt.passes.fusion.gelu import FuseBiasGelu, FuseGelu
from helpers import build_model, count_ops
from fusion_checks import (assert_same, bert_feeds, NoNormTarget, PlainOnnxTarget, apply, assert_embeddings_match,
                           assert_unchanged, const, f32, optimize_checked, ops_in,
                           plain_ctx, vi)
from tests import decomposed_bert, zoo

H = 8
SQRT2 = math.sqrt(2.0)
K_TANH = math.sqrt(2.0 / math.pi)
rng = np.random.default_rng(0)
X = vi("x", ["N", "S", H])
Y = vi("y", ["N", "S", H])


def mk(op, ins, out):
    return oh.make_node(op, ins, [out])


# ---------------------------------------------------------------------- erf orderings
def erf_torchscript(c):
    """Mul(Mul(x, Add(Erf(Div(x, √2)), 1)), 0.5) (TorchScript)."""
    return [const("sqrt2", c.get("sqrt2", SQRT2)), const("one", 1.0),
            const("half", c.get("half", 0.5)),
            mk("Div", ["x", "sqrt2"], "a"), mk("Erf", ["a"], "e"), mk("Add", ["e", "one"], "p"),
            mk("Mul", ["x", "p"], "xp"), mk("Mul", ["xp", "half"], "y")], []


def erf_dynamo(c):
    """Mul(x, Mul(0.5, Add(Erf(Div(x, √2)), 1))) (dynamo), constants as initializers."""
    return [mk("Div", ["x", "sqrt2"], "a"), mk("Erf", ["a"], "e"), mk("Add", ["e", "one"], "p"),
            mk("Mul", ["half", "p"], "hp"), mk("Mul", ["x", "hp"], "y")], \
        [f32("sqrt2", c.get("sqrt2", SQRT2)), f32("one", 1.0), f32("half", c.get("half", 0.5))]


def erf_half_first(c):
    """Mul(Mul(0.5, x), Add(1, Erf(Mul(x, 1/√2))))."""
    return [mk("Mul", ["half", "x"], "hx"), mk("Mul", ["x", "rsqrt2"], "a"), mk("Erf", ["a"], "e"),
            mk("Add", ["one", "e"], "p"), mk("Mul", ["hx", "p"], "y")], \
        [f32("rsqrt2", 1.0 / c.get("sqrt2", SQRT2)), f32("one", 1.0),
         f32("half", c.get("half", 0.5))]


def erf_div_two(c):
    """Div(Mul(x, Add(Erf(x·0.70710677), 1)), 2) (tf2onnx-like)."""
    return [mk("Mul", ["x", "rsqrt2"], "a"), mk("Erf", ["a"], "e"), mk("Add", ["e", "one"], "p"),
            mk("Mul", ["p", "x"], "xp"), mk("Div", ["xp", "two"], "y")], \
        [f32("rsqrt2", np.float32(0.70710677)), f32("one", 1.0),
         f32("two", 1.0 / c.get("half", 0.5))]


def erf_expanded(c):
    """0.5·x + 0.5·x·erf(x/√2), the bracket multiplied out."""
    return [mk("Mul", ["x", "half"], "hx"), mk("Div", ["x", "sqrt2"], "a"),
            mk("Erf", ["a"], "e"), mk("Mul", ["hx", "e"], "hxe"), mk("Add", ["hx", "hxe"], "y")], \
        [f32("sqrt2", c.get("sqrt2", SQRT2)), f32("half", c.get("half", 0.5))]


# ---------------------------------------------------------------------- tanh orderings
def tanh_hf(c):
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) with Pow (Hugging Face gelu_new)."""
    return [mk("Pow", ["x", "three"], "x3"), mk("Mul", ["x3", "k"], "kx3"),
            mk("Add", ["x", "kx3"], "inner"), mk("Mul", ["inner", "s"], "a"),
            mk("Tanh", ["a"], "t"), mk("Add", ["t", "one"], "p"), mk("Mul", ["x", "half"], "hx"),
            mk("Mul", ["hx", "p"], "y")], \
        [f32("three", 3.0), f32("k", c.get("k", 0.044715)), f32("s", c.get("s", K_TANH)),
         f32("one", 1.0), f32("half", c.get("half", 0.5))]


def tanh_factored(c):
    """x·0.5·(1 + tanh(x·√(2/π)·(1 + 0.044715·x·x))) (FastGELU as written in PyTorch
    model code), x² as Mul."""
    return [mk("Mul", ["x", "x"], "x2"), mk("Mul", ["k", "x2"], "kx2"),
            mk("Add", ["one", "kx2"], "q"), mk("Mul", ["x", "s"], "sx"),
            mk("Mul", ["sx", "q"], "a"), mk("Tanh", ["a"], "t"), mk("Add", ["one", "t"], "p"), mk("Mul", ["p", "half"], "hp"),
            mk("Mul", ["hp", "x"], "y")], \
        [f32("k", c.get("k", 0.044715)), f32("s", c.get("s", K_TANH)), f32("one", 1.0),
         f32("half", c.get("half", 0.5))]


ERF = {"torchscript": erf_torchscript, "dynamo": erf_dynamo, "half-first": erf_half_first,
       "div-two": erf_div_two, "expanded": erf_expanded}
TANH = {"hf-pow": tanh_hf, "factored": tanh_factored}


def gelu_model(builder, opset=17, shape=("N", "S", H), **constants):
    nodes, inits = builder(constants)
    return build_model(nodes, [vi("x", list(shape))], [vi("y", list(shape))], inits, opset=opset)


# ---------------------------------------------------------------------- fuse-gelu
@pytest.mark.parametrize("form", list(ERF))
def test_erf_gelu_to_com_microsoft(form):
    after, (result,) = apply(gelu_model(ERF[form]), FuseGelu())
    assert result.stats["fused"] == 1
    (node,) = after.graph.node
    assert (node.op_type, node.domain, list(node.input), list(node.output)) == \
        ("Gelu", "com.microsoft", ["x"], ["y"])


@pytest.mark.parametrize("form", list(TANH))
def test_tanh_gelu_to_fast_gelu(form):
    after, _ = apply(gelu_model(TANH[form]), FuseGelu())
    (node,) = after.graph.node
    assert (node.op_type, node.domain, list(node.input)) == ("FastGelu", "com.microsoft", ["x"])


@pytest.mark.parametrize("form,approximate", [("torchscript", "none"), ("hf-pow", "tanh")])
@pytest.mark.parametrize("ctx", [None, plain_ctx], ids=["ort", "plain-onnx"])
def test_opset20_gets_the_standard_gelu(form, approximate, ctx):
    proto = gelu_model({**ERF, **TANH}[form], opset=20)
    after, _ = apply(proto, FuseGelu(), ctx=ctx() if ctx else None)
    (node,) = after.graph.node
    assert (node.op_type, node.domain) == ("Gelu", "")
    attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
    assert attrs.get("approximate", b"none").decode() == approximate
    assert {o.domain for o in after.opset_import} == {""}


@pytest.mark.parametrize("form", ["torchscript", "hf-pow"])
def test_plain_onnx_target_below_opset20_leaves_gelu(form):
    """No com.microsoft, no Gelu before opset 20: nothing to emit, nothing changes."""
    assert_unchanged(gelu_model({**ERF, **TANH}[form]), FuseGelu(), plain_ctx())


def test_target_without_gelu_at_opset20():
    assert_unchanged(gelu_model(erf_dynamo, opset=20), FuseGelu(),
                     PassContext(target=NoNormTarget()))


def test_gelu_constants_within_tolerance():
    """Rounded constants (1.4142, 0.7978846) are the same GELU within 1e-4."""
    apply(gelu_model(erf_torchscript, sqrt2=1.4142), FuseGelu())
    after, _ = apply(gelu_model(tanh_hf, s=0.7978846, k=0.044715), FuseGelu())
    assert count_ops(after) == {"FastGelu": 1}


def test_gelu_fixed_shape_and_2d():
    apply(gelu_model(erf_dynamo, shape=(2, 3, H)), FuseGelu(), batches=(1,))
    after, _ = apply(gelu_model(erf_dynamo, shape=("N", H)), FuseGelu())
    assert count_ops(after) == {"Gelu": 1}


def test_gelu_in_a_subgraph_and_several():
    """A GELU in the main graph and one in an If branch (reading the outer x)."""
    nodes, inits = erf_dynamo({})
    branch = [oh.make_node(n.op_type, [f"b_{i}" if i != "x" and i not in
                                       ("sqrt2", "one", "half") else i for i in n.input],
                           [f"b_{o}" for o in n.output]) for n in nodes]
    then_graph = oh.make_graph(branch, "then", [], [vi("b_y", ["N", "S", H])])
    else_graph = oh.make_graph([oh.make_node("Identity", ["x"], ["e_y"])], "else", [],
                               [vi("e_y", ["N", "S", H])])
    nodes += [oh.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
              oh.make_node("Greater", ["total", "zero"], ["cond"]),
              oh.make_node("If", ["cond"], ["z"], then_branch=then_graph, else_branch=else_graph)]
    proto = build_model(nodes, [X], [Y, vi("z", ["N", "S", H])], inits + [f32("zero", 0.0)])
    after, (result,) = apply(proto, FuseGelu())
    assert result.stats["fused"] == 2
    assert count_ops(after)["Gelu"] == 2 and count_ops(after)["Erf"] == 0


def _erf_read_elsewhere():
    nodes, inits = erf_dynamo({})
    nodes.append(mk("Relu", ["e"], "other"))
    return build_model(nodes, [X], [Y, vi("other", ["N", "S", H])], inits)


def _bracket_is_output():
    nodes, inits = erf_dynamo({})
    return build_model(nodes, [X], [Y, vi("p", ["N", "S", H])], inits)


def _other_tensor_outside():
    """0.5·x·(1 + erf(w/√2)): the argument is another tensor."""
    nodes, inits = erf_dynamo({})
    nodes[0].input[0] = "w"
    return build_model(nodes, [X, vi("w", ["N", "S", H])], [Y], inits)


def _float64():
    nodes, inits = erf_dynamo({})
    inits = [onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.float64),
                                          t.name) for t in inits]
    return build_model(nodes, [vi("x", ["N", "S", H], TensorProto.DOUBLE)],
                       [vi("y", ["N", "S", H], TensorProto.DOUBLE)], inits)


GELU_NEAR_MISSES = {
    "half-is-0.6": lambda: gelu_model(erf_torchscript, half=0.6),
    "sqrt2-is-1.5": lambda: gelu_model(erf_dynamo, sqrt2=1.5),
    "sqrt2-off-by-2e-4": lambda: gelu_model(erf_half_first, sqrt2=SQRT2 * (1 + 2e-4)),
    "tanh-cubic-0.05": lambda: gelu_model(tanh_hf, k=0.05),
    "tanh-scale-0.8": lambda: gelu_model(tanh_factored, s=0.8),
    "erf-read-elsewhere": _erf_read_elsewhere,
    "bracket-is-graph-output": _bracket_is_output,
    "argument-of-another-tensor": _other_tensor_outside,
    "float64": _float64,
}


@pytest.mark.parametrize("case", list(GELU_NEAR_MISSES))
def test_gelu_near_miss(case):
    assert_unchanged(GELU_NEAR_MISSES[case](), FuseGelu())


def test_gelu_leading_half_outside_the_product_is_left_alone():
    """x·(1 + erf(x/√2)) alone is not a GELU (no 0.5): nothing fuses, even with a 0.5
    applied later through a node that is read twice."""
    nodes = [mk("Div", ["x", "sqrt2"], "a"), mk("Erf", ["a"], "e"), mk("Add", ["e", "one"], "p"),
             mk("Mul", ["x", "p"], "xp"), mk("Relu", ["xp"], "r"), mk("Mul", ["xp", "half"], "y")]
    proto = build_model(nodes, [X], [Y, vi("r", ["N", "S", H])],
                        [f32("sqrt2", SQRT2), f32("one", 1.0), f32("half", 0.5)])
    assert_unchanged(proto, FuseGelu())


# ---------------------------------------------------------------------- fuse-bias-gelu
def bias_model(gelu_nodes, opset=17, bias_shape=(H,), order=("x", "bias"), extra_out=()):
    inits = [f32("bias", rng.standard_normal(bias_shape) * 0.1)]
    nodes = [oh.make_node("Add", list(order), ["xb"]), *gelu_nodes]
    proto = oh.make_model(oh.make_graph(nodes, "g", [X], [Y, *extra_out], inits),
                          opset_imports=[oh.make_opsetid("", opset),
                                         oh.make_opsetid("com.microsoft", 1)])
    onnx.checker.check_model(proto)
    return proto


MS_GELU = oh.make_node("Gelu", ["xb"], ["y"], domain="com.microsoft")
MS_FAST = oh.make_node("FastGelu", ["xb"], ["y"], domain="com.microsoft")


@pytest.mark.parametrize("order", [("x", "bias"), ("bias", "x")])
def test_bias_gelu(order):
    after, (result,) = apply(bias_model([MS_GELU], order=order), FuseBiasGelu())
    (node,) = after.graph.node
    assert (node.op_type, node.domain, list(node.input), list(node.output)) == \
        ("BiasGelu", "com.microsoft", ["x", "bias"], ["y"])


def test_bias_fast_gelu():
    after, _ = apply(bias_model([MS_FAST]), FuseBiasGelu())
    (node,) = after.graph.node
    assert (node.op_type, list(node.input)) == ("FastGelu", ["x", "bias"])


@pytest.mark.parametrize("approximate,fused", [("none", "BiasGelu"), ("tanh", "FastGelu")])
def test_bias_standard_gelu(approximate, fused):
    gelu = oh.make_node("Gelu", ["xb"], ["y"], approximate=approximate)
    after, _ = apply(bias_model([gelu], opset=20), FuseBiasGelu())
    assert [(n.op_type, n.domain) for n in after.graph.node] == [(fused, "com.microsoft")]


def test_gelu_then_bias_gelu_from_elementwise():
    """Add(x, b) then the erf formula: fuse-gelu then fuse-bias-gelu give one BiasGelu."""
    nodes, inits = erf_dynamo({})
    for n in nodes:
        n.input[:] = ["xb" if i == "x" else i for i in n.input]
    proto = build_model([oh.make_node("Add", ["x", "bias"], ["xb"]), *nodes], [X], [Y],
                        inits + [f32("bias", rng.standard_normal(H) * 0.1)])
    after, results = apply(proto, FuseGelu(), FuseBiasGelu())
    assert [r.stats["fused"] for r in results] == [1, 1]
    assert [n.op_type for n in after.graph.node] == ["BiasGelu"]


BIAS_NEAR_MISSES = {
    "scalar-bias": lambda: bias_model([MS_GELU], bias_shape=()),
    "bias-[1,1,H]": lambda: bias_model([MS_GELU], bias_shape=(1, 1, H)),
    "sum-is-graph-output": lambda: bias_model([MS_GELU], extra_out=[vi("xb", ["N", "S", H])]),
    "no-constant": lambda: bias_model([MS_GELU], order=("x", "x")),
}


@pytest.mark.parametrize("case", list(BIAS_NEAR_MISSES))
def test_bias_gelu_near_miss(case):
    assert_unchanged(BIAS_NEAR_MISSES[case](), FuseBiasGelu())


def test_bias_gelu_needs_com_microsoft():
    gelu = oh.make_node("Gelu", ["xb"], ["y"])
    assert_unchanged(bias_model([gelu], opset=20), FuseBiasGelu(), plain_ctx())


# ---------------------------------------------------------------------- exported BERTs
GELU_PASSES = "eliminate-identity,fold-constants,fuse-gelu,fuse-bias-gelu"


def count_gelu_patterns(proto: onnx.ModelProto) -> int:
    """Erf/Tanh nodes whose result is added to 1 (the (1 + T) of a GELU)."""
    readers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return sum(1 for n in proto.graph.node if n.op_type in ("Erf", "Tanh")
               and [r.op_type for r in readers.get(n.output[0], [])] == ["Add"])


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_bert_tiny_gelus(exporter):
    proto = zoo.bert_tiny(exporter)
    assert count_gelu_patterns(proto) == 2
    result = optimize_checked(proto, GELU_PASSES)
    after = result.model.to_onnx()
    assert ops_in(after, "com.microsoft") == {"BiasGelu": 2}
    assert count_ops(after)["Erf"] == 0
    assert_same(proto, after, bert_feeds(zoo.BERT_TINY_VOCAB))


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_bert_tiny_tanh_gelus(exporter):
    """gelu_new (tanh) as each exporter writes it → FastGelu with the bias folded in."""
    proto = decomposed_bert.bert_tiny(exporter)
    assert count_gelu_patterns(proto) == 2
    result = optimize_checked(proto, GELU_PASSES)
    after = result.model.to_onnx()
    assert ops_in(after, "com.microsoft") == {"FastGelu": 2}
    assert all(len(n.input) == 2 for n in after.graph.node if n.op_type == "FastGelu")
    assert count_ops(after)["Tanh"] == 0
    assert_same(proto, after, bert_feeds(zoo.BERT_TINY_VOCAB))


def test_bert_tiny_gelus_plain_target_at_opset20():
    """A plain-ONNX target gets the standard Gelu once the model is at opset 20."""
    proto = onnx.version_converter.convert_version(zoo.bert_tiny("torchscript"), 20)
    from graphopt.ir import load

    model = load(proto)
    model.infer_shapes()
    result = FuseGelu().run(model, PassContext(target=PlainOnnxTarget()))
    assert result.stats["fused"] == 2
    after = model.to_onnx()
    assert count_ops(after)["Gelu"] == 2 and ops_in(after, "com.microsoft") == {}
    assert_same(proto, after, bert_feeds(zoo.BERT_TINY_VOCAB))


@pytest.mark.slow
@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_minilm_gelus(exporter):
    """The real all-MiniLM-L6-v2: its 6 GELUs fuse into BiasGelu; the embeddings agree on
    real sentences."""
    proto = zoo.bert_minilm(exporter)
    assert count_gelu_patterns(proto) == 6
    result = optimize_checked(proto, GELU_PASSES, data=[zoo.minilm_tokenize()])
    trace = {e["pass_name"]: e["stats"] for e in result.report["trace"] if e["iteration"] == 1}
    assert trace["fuse-gelu"]["fused"] == 6 and trace["fuse-bias-gelu"]["fused"] == 6
    after = result.model.to_onnx()
    assert ops_in(after, "com.microsoft") == {"BiasGelu": 6}
    assert count_ops(after)["Erf"] == 0
    assert_embeddings_match(proto, after, zoo.minilm_tokenize())
    assert_embeddings_match(proto, after, zoo.minilm_tokenize(zoo.MINILM_SENTENCES[:1]))
