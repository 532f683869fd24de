"""float16 conversion (``convert-fp16``).

Every result passes the ONNX checker and strict shape inference, keeps float32 graph
inputs and outputs, halves the float weights and stays within cosine 0.999 of the
float32 model in ONNX Runtime: hand-built cases for each rule (fp32 islands, shared
initializers, Constant nodes, shape arithmetic, If bodies, Cast cleanup), the zoo CNNs,
bert_tiny, and the real MiniLM (slow)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto

from graphopt import verify
from graphopt.ir import infer_shapes, load
from graphopt.manager import PassManager
from tests.helpers import min_cosine
from graphopt.pass_infra import PassContext, make_options
from graphopt.passes.quantize.fp16 import DEFAULT_FP32_OPS, ConvertFloat16
from fusion_checks import f32, i64, vi
from helpers import bert_token_feeds, build_model, count_ops
from tests import zoo

rng = np.random.default_rng(0)
F16 = TensorProto.FLOAT16
F32 = TensorProto.FLOAT


def convert(proto, **options):
    """Run the pass as the manager would and check the result's structure."""
    model = load(proto)
    model.infer_shapes()
    result = ConvertFloat16(**options).run(model, PassContext())
    out = model.to_onnx()
    onnx.checker.check_model(out)
    onnx.shape_inference.infer_shapes(out, strict_mode=True)
    assert [o.name for o in out.graph.output] == [o.name for o in proto.graph.output]
    return out, result


def io_types(proto):
    def elem(v):
        return v.type.tensor_type.elem_type

    return [elem(v) for v in proto.graph.input], [elem(v) for v in proto.graph.output]


def weight_bytes(proto) -> int:
    return sum(onnx.numpy_helper.to_array(t).nbytes for t in proto.graph.initializer
               if t.data_type in (F32, F16))


def value_types(proto) -> dict[str, int]:
    """Element type of every typed value in the main graph."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in
             (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types.update({t.name: t.data_type for t in proto.graph.initializer})
    return types


def assert_close(before, after, feeds, floor=0.999):
    ref = [verify.run(before, f) for f in feeds]
    got = [verify.run(after, f) for f in feeds]
    for r, g in zip(ref, got):
        for name, value in g.items():
            assert value.dtype == r[name].dtype, name
    cos = min_cosine(ref, got)
    assert cos >= floor, cos
    return cos


def assert_idempotent(out, **options):
    model = load(out)
    model.infer_shapes()
    again = ConvertFloat16(**options).run(model, PassContext())
    assert not again.changed, again.stats


def mlp_with(op_after: str, n=32):
    """x -> MatMul W -> Add b -> ``op_after`` -> MatMul W2 -> y."""
    inits = [f32("W", rng.standard_normal((16, n)) * 0.3), f32("b", rng.standard_normal(n)),
             f32("W2", rng.standard_normal((n, 8)) * 0.3)]
    nodes = [oh.make_node("MatMul", ["x", "W"], ["h"]), oh.make_node("Add", ["h", "b"], ["a"]),
             oh.make_node(op_after, ["a"], ["s"]), oh.make_node("MatMul", ["s", "W2"], ["y"])]
    return build_model(nodes, [vi("x", ["N", 16])], [vi("y", ["N", 8])], inits)


# ---------------------------------------------------------------------- rules
def test_compute_goes_float16_with_float32_interface():
    proto = mlp_with("Relu")
    out, result = convert(proto)
    assert io_types(out) == ([F32], [F32])
    assert all(t.data_type == F16 for t in out.graph.initializer)
    assert value_types(out)["h"] == F16
    assert count_ops(out)["Cast"] == 2  # in and out
    assert weight_bytes(out) * 2 == weight_bytes(proto)
    assert result.stats["weight_bytes_after"] * 2 == result.stats["weight_bytes_before"]
    assert_close(proto, out, verify.probe_inputs(proto, count=2))
    assert_idempotent(out)


def test_sensitive_op_stays_float32_island():
    proto = mlp_with("Softmax")
    out, result = convert(proto)
    softmax = next(n for n in out.graph.node if n.op_type == "Softmax")
    types = value_types(out)
    assert types[softmax.input[0]] == F32 and types[softmax.output[0]] == F32
    assert result.stats["kept_float32"] == {"Softmax is in fp32_ops": 1}
    assert count_ops(out)["Cast"] == 4  # in, to the island, out of it, out
    assert_close(proto, out, verify.probe_inputs(proto, count=2))
    # the list is an option: without Softmax in it, only the interface casts remain
    out, _ = convert(proto, fp32_ops=tuple(o for o in DEFAULT_FP32_OPS if o != "Softmax"))
    assert count_ops(out)["Cast"] == 2


def test_fp32_ops_option_parses_from_text():
    options = make_options(ConvertFloat16, {"fp32-ops": "Softmax;Erf", "keep-io": "false"})
    assert options.fp32_ops == ("Softmax", "Erf") and options.keep_io is False


def test_initializer_shared_by_float16_and_float32_readers_is_kept_in_both():
    inits = [f32("W", rng.standard_normal((16, 16)) * 0.3)]
    nodes = [oh.make_node("MatMul", ["x", "W"], ["h"]),
             oh.make_node("ReduceSum", ["W", "axes"], ["wsum"], keepdims=1),
             oh.make_node("Add", ["h", "wsum"], ["y"])]
    proto = build_model(nodes, [vi("x", ["N", 16])], [vi("y", ["N", 16])],
                        inits + [i64("axes", [0])], opset=17)
    out, _ = convert(proto)
    types = {t.name: t.data_type for t in out.graph.initializer}
    assert types["W"] == F32 and sorted(types.values()).count(F16) == 1
    assert_close(proto, out, verify.probe_inputs(proto, count=2))


def test_constant_nodes_are_converted_and_clipped():
    mask_value = np.finfo(np.float32).min  # what HF BERT adds at padded positions
    nodes = [oh.make_node("Constant", [], ["big"], value=onnx.numpy_helper.from_array(
                np.array(mask_value, dtype=np.float32))),
             oh.make_node("Constant", [], ["half"], value=onnx.numpy_helper.from_array(
                 np.array(0.5, dtype=np.float32))),
             oh.make_node("Mul", ["m", "big"], ["bias"]),
             oh.make_node("Mul", ["x", "half"], ["xh"]),
             oh.make_node("Add", ["xh", "bias"], ["y"])]
    proto = build_model(nodes, [vi("x", ["N", 4]), vi("m", ["N", 4])], [vi("y", ["N", 4])])
    out, result = convert(proto)
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    assert count_ops(out)["Constant"] == 0 and result.stats["constants_converted"] == 2
    assert all(v.dtype == np.float16 and np.isfinite(v).all() for v in consts.values())
    x = rng.standard_normal((3, 4)).astype(np.float32)
    m = (rng.random((3, 4)) < 0.5).astype(np.float32)
    got = verify.run(out, {"x": x, "m": m})["y"]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[m == 0], 0.5 * x[m == 0], rtol=2e-3, atol=1e-3)
    assert np.all(got[m == 1] < -6e4)


def test_shape_arithmetic_stays_float32():
    """size(1) / 2 computed in float (a TorchScript idiom) must stay exact."""
    nodes = [oh.make_node("Shape", ["x"], ["shape"]),
             oh.make_node("Gather", ["shape", "one"], ["dim"], axis=0),
             oh.make_node("Cast", ["dim"], ["dimf"], to=F32),
             oh.make_node("Div", ["dimf", "two"], ["halff"]),
             oh.make_node("Cast", ["halff"], ["half"], to=TensorProto.INT64),
             oh.make_node("Unsqueeze", ["half", "zero"], ["half1"]),
             oh.make_node("Concat", ["minus1", "half1"], ["target"], axis=0),
             oh.make_node("Mul", ["x", "scale"], ["xs"]),
             oh.make_node("Reshape", ["xs", "target"], ["y"])]
    inits = [i64("one", 1), i64("zero", [0]), i64("minus1", [-1]), f32("two", 2.0),
             f32("scale", 1.5)]
    proto = build_model(nodes, [vi("x", ["N", 4100])], [vi("y", None)], inits)
    out, result = convert(proto)
    types = value_types(out)
    assert types["dimf"] == F32 and types["halff"] == F32
    assert result.stats["kept_float32"]["computes shapes"] == 2  # the Cast and the Div
    x = rng.standard_normal((2, 4100)).astype(np.float32)
    assert verify.run(out, {"x": x})["y"].shape == (4, 2050)


def test_if_bodies_are_converted_and_keep_their_interface():
    proto = zoo.if_model()
    out, result = convert(proto)
    assert io_types(out) == ([F32], [F32])
    if_node = next(n for n in out.graph.node if n.op_type == "If")
    for attr in if_node.attribute:
        body = attr.g
        assert body.output[0].type.tensor_type.elem_type == F32
        matmul = next(n for n in body.node if n.op_type == "MatMul")
        body_types = {v.name: v.type.tensor_type.elem_type for v in body.value_info}
        assert body_types.get(matmul.output[0]) == F16
    assert weight_bytes(out) < 0.55 * weight_bytes(proto)
    assert_close(proto, out, zoo.if_model_feeds())
    assert_idempotent(out)


def test_redundant_cast_pairs_are_removed():
    nodes = [oh.make_node("Cast", ["x"], ["x16"], to=F16),
             oh.make_node("Cast", ["x16"], ["x32"], to=F32),
             oh.make_node("Relu", ["x32"], ["r"]),
             oh.make_node("Cast", ["r"], ["r32"], to=F32),
             oh.make_node("Mul", ["r32", "w"], ["y"])]
    proto = build_model(nodes, [vi("x", ["N", 8])], [vi("y", ["N", 8])],
                        [f32("w", rng.standard_normal(8))])
    out, result = convert(proto)
    assert count_ops(out)["Cast"] == 2 and result.stats["casts_removed"] >= 2
    assert_close(proto, out, verify.probe_inputs(proto, count=2))


def test_keep_io_false_makes_the_interface_float16():
    proto = mlp_with("Relu")
    out, _ = convert(proto, keep_io=False)
    assert io_types(out) == ([F16], [F16]) and count_ops(out)["Cast"] == 0
    x = rng.standard_normal((3, 16)).astype(np.float32)
    got = verify.run(out, {"x": x.astype(np.float16)})["y"]
    assert min_cosine([verify.run(proto, {"x": x})], [{"y": got}]) > 0.999


def test_excluded_nodes_stay_float32():
    proto = mlp_with("Relu")
    proto.graph.node[0].name = "first_matmul"
    out, result = convert(proto, exclude=("first_*",))
    assert result.stats["kept_float32"] == {"excluded": 1}
    assert value_types(out)["h"] == F32


def test_through_the_pass_manager():
    proto = zoo.resnet_cnn("torchscript")
    model = load(proto)
    manager = PassManager([ConvertFloat16()], PassContext())
    manager.run(model)
    assert manager.trace[0].status == "changed"
    assert all(e.status != "rolled-back" for e in manager.trace)


# ---------------------------------------------------------------------- zoo models
@pytest.mark.parametrize("name", ["resnet_cnn", "mobilenet_cnn"])
def test_zoo_cnn(name):
    proto = getattr(zoo, name)("torchscript")
    out, result = convert(proto)
    assert io_types(out) == ([F32], [F32]) and count_ops(out)["Cast"] == 2
    assert weight_bytes(out) * 2 == weight_bytes(proto)
    cos = assert_close(proto, out, verify.probe_inputs(proto, count=2))
    assert cos > 0.9999
    assert_idempotent(out)


def test_bert_tiny():
    proto = zoo.bert_tiny("torchscript")
    out, result = convert(proto)
    assert io_types(out) == ([TensorProto.INT64] * 2, [F32, F32])
    assert weight_bytes(out) < 0.51 * weight_bytes(proto)
    stats = result.stats
    assert stats["kept_float32"]["LayerNormalization is in fp32_ops"] == 5
    assert stats["kept_float32"]["computes shapes"] > 0
    assert_close(proto, out, bert_token_feeds(zoo.BERT_TINY_VOCAB, count=2, batch=3))
    assert_idempotent(out)


@pytest.mark.slow
def test_minilm_sentences():
    proto = zoo.bert_minilm("torchscript")
    out, result = convert(proto)
    assert io_types(out) == ([TensorProto.INT64] * 2, [F32])
    assert weight_bytes(out) < 0.51 * weight_bytes(proto)
    feeds = zoo.minilm_tokenize()
    ref = verify.run(proto, feeds)["sentence_embedding"]
    got = verify.run(out, feeds)["sentence_embedding"]
    cos = np.sum(ref * got, axis=1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= 0.999, cos
    # and ORT's own optimizer accepts the float16 graph
    optimized = verify.run(verify.session(out, optimize=True), feeds)["sentence_embedding"]
    np.testing.assert_allclose(optimized, got, atol=2e-3)


@pytest.mark.parametrize("order", ["int4-then-fp16", "fp16-then-int4"])
def test_combines_with_int4_weights(order):
    """MatMulNBits and GatherBlockQuantized take float16 activations and scales
    (com.microsoft schemas)."""
    from graphopt.passes.quantize.weight import QuantizeWeightInt4
    from graphopt.targets.ort import OrtTarget

    proto = zoo.bert_tiny("torchscript")
    passes = [QuantizeWeightInt4(), ConvertFloat16()]
    if order == "fp16-then-int4":
        passes.reverse()
    model = load(proto)
    for p in passes:
        model.infer_shapes()
        assert p.run(model, PassContext(target=OrtTarget())).changed
        model = load(model.to_onnx())
    out = model.to_onnx()
    onnx.checker.check_model(out)
    node = next(n for n in out.graph.node if n.op_type == "MatMulNBits")
    scales = next(t for t in out.graph.initializer if t.name == node.input[2])
    assert scales.data_type == F16 and count_ops(out)["MatMulNBits"] == 12
    gather = next(n for n in out.graph.node if n.op_type == "GatherBlockQuantized")
    scales = next(t for t in out.graph.initializer if t.name == gather.input[2])
    assert scales.data_type == F16 and count_ops(out)["GatherBlockQuantized"] == 2
    assert io_types(out)[1] == [F32, F32]
    # (0.999 with the embedding tables in float)
    assert_close(proto, out, bert_token_feeds(zoo.BERT_TINY_VOCAB, count=2), floor=0.995)
    infer_shapes(out, strict=True)  # the stand-ins follow the float16 types (as the
    # pass manager checks: it rolled fp16 back after int4 when they did not)


def test_after_dynamic_int8_and_fused_attention_strict_shapes_hold():
    """convert-fp16 after quantize-int8-dynamic on a fused transformer (QAttention,
    DynamicQuantizeMatMul): strict shape inference holds, so the pass manager keeps it."""
    import graphopt

    proto = zoo.bert_tiny("torchscript")
    feeds = bert_token_feeds(zoo.BERT_TINY_VOCAB, count=4, batch=4, seed=1)
    result = graphopt.optimize(proto, quantize=["int8-dynamic", "fp16"], calibration=feeds,
                               tolerance=0.9)
    trace = {e["pass_name"]: e["status"] for e in result.report["trace"]}
    assert trace["quantize-int8-dynamic"] == "changed", result.report["trace"]
    assert trace["convert-fp16"] == "changed", result.report["trace"]
    out = result.model.to_onnx()
    assert count_ops(out)["QAttention"] > 0
    infer_shapes(out, strict=True)


def test_after_static_int8_the_qdq_groups_stay_float32():
    """convert-fp16 after quantize-int8 (QDQ) on bert_tiny: the DequantizeLinear -> op ->
    QuantizeLinear groups keep float32 (a Cast inside would stop ONNX Runtime fusing them
    into int8 kernels, and float16 into QuantizeLinear does not run at opset 13), the
    float ops around them (normalization, softmax, residual adds) take float16."""
    import graphopt

    proto = zoo.bert_tiny("torchscript")
    feeds = bert_token_feeds(zoo.BERT_TINY_VOCAB, count=4, batch=4, seed=1)
    int8 = graphopt.optimize(proto, quantize="int8", calibration=feeds, tolerance=0.9,
                             passes=["fold-constants"])
    both = graphopt.optimize(proto, quantize=["int8", "fp16"], calibration=feeds,
                             tolerance=0.9, passes=["fold-constants"])
    trace = {e["pass_name"]: e for e in both.report["trace"]}
    assert trace["quantize-int8"]["status"] == "changed"
    assert trace["convert-fp16"]["status"] == "changed", trace["convert-fp16"]
    assert trace["convert-fp16"]["stats"]["kept_float32"]["in an int8 QDQ group"] > 0
    a, b = int8.model.to_onnx(), both.model.to_onnx()
    for op in ("QuantizeLinear", "DequantizeLinear"):
        assert count_ops(b)[op] == count_ops(a)[op] > 0
    for node in b.graph.node:  # no Cast between a DequantizeLinear and its reader
        if node.op_type == "Cast":
            assert not any(n.op_type == "DequantizeLinear" and node.input[0] in n.output
                           for n in b.graph.node)
    assert_close(a, b, bert_token_feeds(zoo.BERT_TINY_VOCAB, count=2, seed=3), floor=0.999)
