"""Weight-only block quantization (``quantize-int4-weight``).

The block math (round-to-nearest, GPTQ, packing) is checked against ONNX Runtime's own
MatMulNBits and DequantizeLinear kernels on small hand-built models: the quantized model
must compute ``x @ dequantized(W)`` to float rounding. Then bert_tiny (fast) and the real
MiniLM (slow) check sizes, accuracy on real sentences, that GPTQ/AWQ beat RTN, and that
the pass manager accepts the result."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto

from graphopt import verify
from graphopt.errors import UsageError
from graphopt.ir import load
from graphopt.manager import PassManager
from tests.helpers import min_cosine
from graphopt.pass_infra import PassContext, make_options
from graphopt.passes.quantize._weight_blocks import CLIP_RATIOS, gptq, output_error, pack_nbits, rtn
from graphopt.passes.quantize.weight import QuantizeWeightInt4
from graphopt.targets.ort import OrtTarget
from fusion_checks import PlainOnnxTarget, f32, vi
from helpers import (bert_token_feeds, build_model, count_ops, minilm_calibration)
from tests import zoo

rng = np.random.default_rng(0)


def ort_ctx(calibration=None) -> PassContext:
    return PassContext(target=OrtTarget(), calibration=calibration)


def quantize(proto, ctx=None, **options):
    """The pass on ``proto``; every weight at ``bits`` unless ``per_layer`` is given."""
    options.setdefault("per_layer", False)
    model = load(proto)
    model.infer_shapes()
    result = QuantizeWeightInt4(**options).run(model, ctx or ort_ctx())
    out = model.to_onnx()
    onnx.checker.check_model(out)
    return out, result


def applied(result) -> dict:
    """What the pass did (its stats under the compression contract)."""
    return result.stats["compression"].get("applied", {})


def weights(proto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


def matmul_model(k=64, n=48, *, gemm=False, trans_b=False, alpha=1.0, bias=None,
                 add_bias=False, opset=17, weight=None):
    """x [2, 3, K] @ W [K, N] (MatMul), or Gemm on x [5, K]."""
    w = weight if weight is not None else (rng.standard_normal((k, n)) * 0.1).astype(np.float32)
    inits = [f32("W", w.T if trans_b else w)]
    if gemm:
        inputs = ["x", "W"] + (["C"] if bias is not None else [])
        if bias is not None:
            inits.append(f32("C", bias))
        nodes = [oh.make_node("Gemm", inputs, ["y"], name="gemm", transB=int(trans_b),
                              alpha=alpha)]
        x = vi("x", [5, k])
        y = vi("y", [5, n])
    else:
        nodes = [oh.make_node("MatMul", ["x", "W"], ["mm" if add_bias else "y"], name="mm")]
        if add_bias:
            inits.append(f32("b", rng.standard_normal(n) * 0.1))
            nodes.append(oh.make_node("Add", ["mm", "b"], ["y"], name="add"))
        x, y = vi("x", [2, 3, k]), vi("y", [2, 3, n])
    return build_model(nodes, [x], [y], inits, opset=opset), w


def run(proto, x):
    return verify.run(proto, {"x": x})["y"]


# ---------------------------------------------------------------------- block math
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_is_at_most_half_a_step(bits, symmetric):
    w = rng.standard_normal((80, 24))  # 80 = 2.5 blocks of 32: a padded last block
    blocks = rtn(w, bits, 32, symmetric)
    assert blocks.codes.shape == (96, 24) and blocks.scales.shape == (3, 24)
    assert blocks.codes.max() < 2 ** bits
    step = np.repeat(np.abs(blocks.scales), 32, axis=0)[:80]
    err = np.abs(blocks.dequantize() - w)
    # symmetric: the extreme code on the far side is clipped by at most one step
    assert np.all(err <= step * (1.0 if symmetric else 0.5) + 1e-9)


def test_gptq_beats_rtn_on_correlated_activations():
    k, n = 128, 64
    w = rng.standard_normal((k, n)) * 0.05
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    x = rng.standard_normal((2048, k)) @ mix
    x[:, :4] *= 20  # outlier channels
    h = 2 * x.T @ x / len(x)
    plain = output_error(w, rtn(w, 4, 32, True).dequantize(), h)
    for act_order in (False, True):
        err = output_error(w, gptq(w, h, 4, 32, True, act_order=act_order).dequantize(), h)
        assert err < 0.6 * plain, (act_order, err, plain)


def test_nbits_packing_layout():
    codes = np.arange(64, dtype=np.uint8).reshape(32, 2) % 16
    blocks = rtn(np.zeros((32, 2)), 4, 16, False)
    blocks.codes = codes
    blocks.zero_points = np.array([[1, 2], [3, 4]], dtype=np.uint8)
    packed, zeros = pack_nbits(blocks)
    assert packed.shape == (2, 2, 8)
    # column 0, block 0: codes[0:16, 0] two per byte, low nibble first
    assert packed[0, 0, 0] == codes[0, 0] | (codes[1, 0] << 4)
    assert packed[1, 1, 7] == codes[30, 1] | (codes[31, 1] << 4)
    assert zeros.tolist() == [[1 | 3 << 4], [2 | 4 << 4]]


# ---------------------------------------------------------------------- against ORT's kernels
@pytest.mark.parametrize("fmt", ["nbits", "qdq"])
@pytest.mark.parametrize("bits,symmetric,k", [(4, True, 64), (4, False, 96), (8, True, 64),
                                              (8, False, 40), (4, True, 40)])
def test_matmul_computes_with_the_dequantized_weight(fmt, bits, symmetric, k):
    proto, w = matmul_model(k=k)
    out, result = quantize(proto, format=fmt, bits=bits, symmetric=symmetric,
                           block_size=32, min_size=0)
    assert result.changed and applied(result)["quantized"] == 1
    ops = count_ops(out)
    if fmt == "nbits":
        assert ops["MatMulNBits"] == 1 and ops["MatMul"] == 0
    else:
        assert ops["DequantizeLinear"] == 1 and ops["MatMul"] == 1
        assert {o.domain: o.version for o in out.opset_import}[""] >= 21
    expected_w = rtn(w.astype(np.float64), bits, 32, symmetric, ratios=CLIP_RATIOS)
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    np.testing.assert_allclose(run(out, x), x @ expected_w.dequantize().astype(np.float32),
                               rtol=1e-4, atol=1e-4)
    cos = min_cosine([{"y": x @ w}], [{"y": run(out, x)}])
    assert cos > (0.99 if bits == 4 else 0.9999)


def test_symmetric_nbits_omits_zero_points_and_sizes_add_up():
    proto, w = matmul_model(k=256, n=128)
    out, result = quantize(proto, min_size=0, symmetric=True)
    node = next(n for n in out.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"K": 256, "N": 128, "bits": 4, "block_size": 32}
    assert len(node.input) == 3 and node.domain == "com.microsoft"
    inits = weights(out)
    assert inits[node.input[1]].shape == (128, 8, 16) and inits[node.input[1]].dtype == np.uint8
    assert inits[node.input[2]].shape == (128, 8)
    after = sum(inits[i].nbytes for i in node.input[1:])
    assert after == applied(result)["weight_bytes_after"]
    assert after / w.nbytes == pytest.approx((4 + 32 / 32) / 32)  # 4 bits + fp32 scale/32


def test_matmul_add_bias_folds_into_matmulnbits():
    proto, _ = matmul_model(k=64, add_bias=True)
    out, _ = quantize(proto, min_size=0)
    assert count_ops(out)["Add"] == 0
    node = next(n for n in out.graph.node if n.op_type == "MatMulNBits")
    assert len(node.input) == 6 and node.input[3] and node.input[4] == ""  # no g_idx
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    unfolded, _ = quantize(proto, min_size=0, fold_bias=False)
    assert count_ops(unfolded)["Add"] == 1
    np.testing.assert_allclose(run(out, x), run(unfolded, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["nbits", "qdq"])
@pytest.mark.parametrize("bias", [None, "vector", "scalar"])
def test_gemm_trans_b_alpha_and_bias(fmt, bias):
    k, n = 64, 32
    c = {None: None, "vector": rng.standard_normal(n) * 0.1, "scalar": np.array(0.3)}[bias]
    proto, w = matmul_model(k, n, gemm=True, trans_b=True, alpha=0.5,
                            bias=None if c is None else c.astype(np.float32))
    out, result = quantize(proto, format=fmt, min_size=0)
    assert applied(result)["quantized"] == 1
    x = rng.standard_normal((5, k)).astype(np.float32)
    bias_value = 0 if c is None else c
    got = run(out, x)
    assert min_cosine([{"y": 0.5 * x @ w + bias_value}], [{"y": got}]) > 0.995
    dequantized = rtn(0.5 * w.astype(np.float64), 4, 32, False,
                      ratios=CLIP_RATIOS).dequantize()
    np.testing.assert_allclose(got, x @ dequantized + bias_value, rtol=1e-4, atol=1e-4)


def test_gemm_with_a_matrix_bias_stays_with_matmulnbits_only():
    proto, _ = matmul_model(64, 32, gemm=True, bias=np.zeros((5, 32), np.float32))
    _, result = quantize(proto, min_size=0)
    assert not result.changed
    assert result.stats["compression"]["refused"] == {"gemm": "Gemm bias is not a constant "
                                                                 "vector"}
    _, result = quantize(proto, min_size=0, format="qdq")
    assert result.changed


def test_target_without_com_microsoft_gets_dequantize_linear():
    proto, _ = matmul_model(k=64)
    out, result = quantize(proto, PassContext(target=PlainOnnxTarget()), min_size=0,
                           symmetric=True)
    assert applied(result)["format"] == "qdq" and count_ops(out)["DequantizeLinear"] == 1
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear")
    assert {a.name: oh.get_attribute_value(a) for a in dq.attribute} == \
        {"axis": 0, "block_size": 32}
    assert weights(out)[dq.input[0]].dtype.name == "int4"
    raw = next(t for t in out.graph.initializer if t.name == dq.input[0])
    assert raw.data_type == TensorProto.INT4 and len(raw.raw_data) == 64 * 48 // 2


def test_qdq_on_an_old_opset_that_cannot_be_upgraded_changes_nothing():
    proto, _ = matmul_model(k=64, opset=11)
    _, result = quantize(proto, PassContext(target=PlainOnnxTarget()), min_size=0)
    assert not result.changed and "opset 21" in result.stats["compression"]["refused"]["mm"]


def test_skips_small_excluded_and_non_constant_weights():
    proto, _ = matmul_model(k=64, n=48)  # 3072 elements
    assert not quantize(proto)[1].changed  # default min_size 4096
    _, result = quantize(proto, min_size=0, exclude=("m*",))
    assert result.stats["compression"]["refused"] == {"mm": "excluded"}
    dyn = build_model([oh.make_node("MatMul", ["x", "w"], ["y"])],
                      [vi("x", [2, 64]), vi("w", [64, 64])], [vi("y", [2, 64])])
    _, result = quantize(dyn, min_size=0)
    assert result.stats["compression"]["not_sites"] == {"weight is not a constant matrix": 1}


def test_weight_behind_a_transpose_is_quantized_and_the_transpose_goes():
    w = (rng.standard_normal((48, 64)) * 0.1).astype(np.float32)  # stored [N, K]
    proto = build_model([oh.make_node("Transpose", ["W"], ["wt"], perm=[1, 0]),
                         oh.make_node("MatMul", ["x", "wt"], ["y"])],
                        [vi("x", [2, 64])], [vi("y", [2, 48])], [f32("W", w)])
    out, result = quantize(proto, min_size=0)
    assert result.changed and count_ops(out)["Transpose"] == 0
    x = rng.standard_normal((2, 64)).astype(np.float32)
    assert min_cosine([{"y": x @ w.T}], [{"y": run(out, x)}]) > 0.99


@pytest.mark.parametrize("options", [{"bits": 3}, {"block_size": 24}, {"block_size": 8},
                                     {"method": "hqq"}, {"format": "int4"}])
def test_bad_options_are_usage_errors(options):
    with pytest.raises(UsageError):
        make_options(QuantizeWeightInt4, {k: str(v) for k, v in options.items()})


def test_gptq_without_calibration_falls_back_to_rtn():
    proto, _ = matmul_model(k=64, n=64)
    _, result = quantize(proto, method="gptq")
    assert applied(result)["method"] == {"rtn": 1} and "fell back" in applied(result)["note"]



# ---------------------------------------------------------------------- embeddings
def embedding_model(v=50, d=64, *, tied=False):
    """ids [2, 3] -> Gather of a [V, D] table (and, ``tied``, the table also as an output
    projection)."""
    table = (rng.standard_normal((v, d)) * 0.1).astype(np.float32)
    nodes = [oh.make_node("Gather", ["E", "ids"], ["y"], name="embed")]
    outputs = [vi("y", [2, 3, d])]
    if tied:
        nodes.append(oh.make_node("MatMul", ["y", "E"], ["logits"], name="tied"))
    ids = oh.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])
    if tied:  # y @ E^T is what a tied head computes; E read a second time is what counts
        nodes[-1] = oh.make_node("Gemm", ["y2", "E"], ["logits"], name="tied", transB=1)
        nodes.insert(1, oh.make_node("Reshape", ["y", "shape"], ["y2"]))
        outputs = [vi("logits", [6, v])]
    inits = [f32("E", table)] + ([oh.make_tensor("shape", TensorProto.INT64, [2], [6, d])]
                                 if tied else [])
    return build_model(nodes, [ids], outputs, inits, opset=17), table


@pytest.mark.parametrize("fmt", ["nbits", "qdq"])
@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, False), (8, True)])
def test_embedding_rows_are_the_dequantized_table(fmt, bits, symmetric):
    """GatherBlockQuantized (ONNX Runtime) or DequantizeLinear along the rows then Gather
    (standard): each gathered row is the table's row quantized in blocks along D."""
    proto, table = embedding_model()
    out, result = quantize(proto, format=fmt, bits=bits, symmetric=symmetric, min_size=0)
    assert applied(result)["embeddings"] == 1
    ops = count_ops(out)
    assert ops["GatherBlockQuantized" if fmt == "nbits" else "DequantizeLinear"] == 1
    ids = np.array([[0, 7, 49], [3, 3, 12]])
    expected = rtn(table.T.astype(np.float64), bits, 32, symmetric,
                   ratios=CLIP_RATIOS).dequantize().T[ids]
    got = verify.run(out, {"ids": ids})["y"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    stored = result.stats["compression"]["weight_bytes_after"]
    assert stored < table.nbytes * (bits + 2) / 32  # codes, and a scale (+ zero) per 32


def test_a_tied_embedding_table_stays_float():
    proto, _ = embedding_model(tied=True)
    _, result = quantize(proto, min_size=0)
    assert result.stats["compression"]["not_sites"]["table also read elsewhere"] == 1
    assert applied(result).get("embeddings", 0) == 0


# ---------------------------------------------------------------------- per weight
def two_layer_model():
    """x [8, 64] -> W1 -> W2 -> y. W1's values lie on a 16-level grid that spans every
    block (int4 holds it exactly); W2 is Gaussian (int4 rounding costs accuracy)."""
    local = np.random.default_rng(5)
    w1 = local.integers(-8, 8, (64, 64)).astype(np.float32)
    w1[::16, :] = -8
    w1[1::16, :] = 7
    w1 *= 0.02
    w2 = (local.standard_normal((64, 64)) * 0.1).astype(np.float32)
    nodes = [oh.make_node("MatMul", ["x", "W1"], ["h"], name="first"),
             oh.make_node("MatMul", ["h", "W2"], ["y"], name="second")]
    return build_model(nodes, [vi("x", [8, 64])], [vi("y", [8, 64])],
                       [f32("W1", w1), f32("W2", w2)])


def test_each_weight_takes_the_fewest_bits_the_budget_allows():
    """Under the contract each weight is a site (float, int8, int4): the weight whose int4
    damage breaks the budget falls back to int8, the other goes to int4, and the result
    (measured on the calibration data) meets the budget that every weight in int4
    misses."""
    proto = two_layer_model()
    local = np.random.default_rng(6)
    data = [{"x": local.standard_normal((8, 64)).astype(np.float32)} for _ in range(4)]

    def ctx():
        return PassContext(target=OrtTarget(), calibration=data, tolerance=0.999)

    out, result = quantize(proto, ctx(), min_size=0, per_layer=True)
    info = result.stats["compression"]
    assert {k: v["setting"] for k, v in info["sites"].items()} == {"first": 4, "second": 8}
    assert applied(result)["bits"] == {4: 1, 8: 1}
    assert info["score"] >= 0.999 and info["meets_budget"]
    assert info["sites"]["first"]["damage_alone"] < 1e-9  # (rounding of float sums)
    assert info["weight_bytes_after"] < 0.25 * info["weight_bytes_before"] * 1.5
    # every weight in int4: below the budget (what the search avoided)
    _, fixed = quantize(proto, ctx(), min_size=0)
    assert fixed.stats["compression"]["score"] < 0.999
    # and the score is what the written model gives
    ref = [verify.run(proto, f) for f in data]
    got = [verify.run(out, f) for f in data]
    assert min_cosine(ref, got) == pytest.approx(info["score"], abs=1e-5)

# ---------------------------------------------------------------------- bert_tiny
@pytest.fixture(scope="module")
def tiny():
    proto = zoo.bert_tiny("torchscript")
    calibration = bert_token_feeds(zoo.BERT_TINY_VOCAB, count=4, batch=4, seed=1)
    held_out = bert_token_feeds(zoo.BERT_TINY_VOCAB, count=2, batch=4, seed=2)
    reference = [verify.run(proto, f) for f in held_out]
    results = {}
    for method in ("rtn", "gptq", "awq"):  # (on the MatMul weights: embeddings are rtn)
        out, result = quantize(proto, ort_ctx(calibration), method=method, embeddings=False)
        got = [verify.run(out, f) for f in held_out]
        error = float(np.mean([np.abs(r["last_hidden_state"] - g["last_hidden_state"]).mean()
                               for r, g in zip(reference, got)]))
        results[method] = (out, result, min_cosine(reference, got), error)
    return proto, calibration, results


def test_bert_tiny_int4_shrinks_weights_and_stays_close(tiny):
    proto, _, results = tiny
    out, result, cos, _ = results["rtn"]
    stats = applied(result)
    assert stats["quantized"] == 12  # 2 layers x (Q, K, V, O, FC1, FC2)
    assert count_ops(out)["MatMulNBits"] == 12 and count_ops(out)["MatMul"] == 4  # attention
    assert stats["weight_bytes_after"] <= 0.2 * stats["weight_bytes_before"]
    assert cos > 0.999


def test_bert_tiny_gptq_and_awq_beat_rtn(tiny):
    _, _, results = tiny
    rtn_error = results["rtn"][3]
    gptq_out, gptq_result, _, gptq_error = results["gptq"]
    assert applied(gptq_result)["method"] == {"gptq": 12}
    proxy = applied(gptq_result)["proxy_output_error"]
    assert proxy["gptq"] < 0.7 * proxy["rtn"]
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)
    _, awq_result, _, _ = results["awq"]
    proxy = applied(awq_result)["proxy_output_error"]
    assert proxy["awq"] <= proxy["rtn"]


def test_bert_tiny_through_the_pass_manager(tiny):
    proto, calibration, _ = tiny
    model = load(proto)
    manager = PassManager([QuantizeWeightInt4(method="gptq")], ort_ctx(calibration))
    manager.run(model)
    assert manager.trace[0].status == "changed"
    assert all(e.status != "rolled-back" for e in manager.trace), manager.trace
    assert count_ops(model.to_onnx())["MatMulNBits"] == 12


def test_qdq_result_survives_the_cleanup_pipeline(tiny):
    """int4 initializers must survive passes that read every initializer's values."""
    import graphopt

    proto, _, _ = tiny
    out, _ = quantize(proto, PassContext(target=PlainOnnxTarget()))
    result = graphopt.optimize(out)
    assert not result.report["rolled_back"]
    final = result.model.to_onnx()
    assert count_ops(final)["DequantizeLinear"] == 14  # 12 weights, 2 embedding tables
    feeds = bert_token_feeds(zoo.BERT_TINY_VOCAB)[0]
    assert min_cosine([verify.run(proto, feeds)], [verify.run(final, feeds)]) > 0.995
    np.testing.assert_allclose(verify.run(final, feeds)["last_hidden_state"],
                               verify.run(out, feeds)["last_hidden_state"], atol=1e-4)


# ---------------------------------------------------------------------- MiniLM
@pytest.fixture(scope="module")
def minilm():
    proto = zoo.bert_minilm("torchscript")
    feeds = zoo.minilm_tokenize()
    reference = verify.run(proto, feeds)["sentence_embedding"]
    calibration = minilm_calibration()
    outs = {}
    for method in ("rtn", "gptq"):
        out, result = quantize(proto, ort_ctx(calibration), method=method)
        got = verify.run(out, feeds)["sentence_embedding"]
        cos = np.sum(reference * got, axis=1) / np.linalg.norm(reference, axis=1) / \
            np.linalg.norm(got, axis=1)
        outs[method] = (out, result, cos)
    return proto, feeds, reference, outs


@pytest.mark.slow
def test_minilm_int4_size_and_accuracy(minilm):
    proto, feeds, reference, outs = minilm
    out, result, cos = outs["gptq"]
    assert applied(result)["quantized"] == 38  # and the word and position embeddings
    stats = result.stats["compression"]
    assert stats["weight_bytes_after"] <= 0.2 * stats["weight_bytes_before"]
    assert cos.min() >= 0.98, cos
    # runs in ORT with its own graph optimizations on too
    optimized = verify.run(verify.session(out, optimize=True), feeds)["sentence_embedding"]
    np.testing.assert_allclose(optimized, verify.run(out, feeds)["sentence_embedding"],
                               atol=2e-3)


@pytest.mark.slow
def test_minilm_gptq_beats_rtn(minilm):
    _, _, _, outs = minilm
    rtn_cos, gptq_cos = outs["rtn"][2], outs["gptq"][2]
    proxy = applied(outs["gptq"][1])["proxy_output_error"]
    assert proxy["gptq"] < 0.5 * proxy["rtn"]
    assert (1 - gptq_cos).mean() < 0.7 * (1 - rtn_cos).mean(), (rtn_cos, gptq_cos)
