"""SmoothQuant scale migration (``smooth-quant``): an exact rescaling that must keep the
outputs (within float rounding) and flatten the per-channel activation maxima the int8
quantizer will see."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import pytest

from graphopt import verify
from graphopt.ir import load
from graphopt.manager import PassManager
from graphopt.pass_infra import PassContext
from graphopt.passes.quantize.smoothquant import SmoothQuant, activation_max, channel_ratio
from fusion_checks import f32, vi
from helpers import apply_passes, bert_token_feeds, build_model, count_ops
from tests import zoo

rng = np.random.default_rng(0)
K = 32


def outlier_feeds(count=3, batch=4, name="x", width=K):
    """Activations with two outlier channels (x50), like transformer hidden states."""
    feeds = []
    for _ in range(count):
        x = rng.standard_normal((batch, 5, width)).astype(np.float32)
        x[..., 3] *= 50
        x[..., 17] *= 30
        feeds.append({name: x})
    return feeds


def layer_norm_model(residual: bool, gemm: bool = False):
    """LayerNormalization -> two MatMuls (and a residual Add when ``residual``)."""
    inits = [f32("gamma", rng.random(K) + 0.5), f32("beta", rng.standard_normal(K) * 0.1),
             f32("Wq", rng.standard_normal((K, 16)) * 0.2),
             f32("Wk", rng.standard_normal((K, 16)) * 0.2)]
    nodes = [oh.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1),
             oh.make_node("MatMul", ["ln", "Wq"], ["q"]),
             oh.make_node("MatMul", ["ln", "Wk"], ["k"]),
             oh.make_node("Add", ["q", "k"], ["y"])]
    outputs = [vi("y", ["N", 5, 16])]
    if residual:
        nodes.append(oh.make_node("Add", ["ln", "x"], ["res"]))
        outputs.append(vi("res", ["N", 5, K]))
    return build_model(nodes, [vi("x", ["N", 5, K])], outputs, inits)


def ctx(feeds):
    return PassContext(calibration=feeds)


def smoothed_max(proto, feeds, tensor_names):
    model = load(proto)
    model.infer_shapes()
    tensors = [model.graph.tensors()[n] for n in tensor_names]
    return activation_max(model, tensors, feeds)


def matmul_inputs(proto) -> list[str]:
    return sorted({n.input[0] for n in proto.graph.node if n.op_type in ("MatMul", "Gemm")})


# ---------------------------------------------------------------------- hand-built
def test_layer_norm_read_only_by_the_weights_is_folded_in_place():
    proto = layer_norm_model(residual=False)
    feeds = outlier_feeds()
    out, (result,) = apply_passes(proto, SmoothQuant(), ctx=ctx(feeds))
    assert result.changed and result.stats["smoothed"] == 1 and result.stats["duplicated"] == 0
    assert count_ops(out)["LayerNormalization"] == 1
    before = smoothed_max(proto, feeds, ["ln"])["ln"]
    after = smoothed_max(out, feeds, matmul_inputs(out))[matmul_inputs(out)[0]]
    assert after.max() < 0.5 * before.max()
    assert channel_ratio(after) < 0.5 * channel_ratio(before)
    assert result.stats["activation_max_after"] == pytest.approx(after.max(), rel=1e-4)


def test_layer_norm_with_a_residual_reader_is_duplicated():
    proto = layer_norm_model(residual=True)
    out, (result,) = apply_passes(proto, SmoothQuant(), ctx=ctx(outlier_feeds()))
    assert result.stats["duplicated"] == 1 and count_ops(out)["LayerNormalization"] == 2
    _, (result,) = apply_passes(proto, SmoothQuant(duplicate=False), ctx=ctx(outlier_feeds()))
    assert not result.changed
    assert result.stats["not_smoothed"] == {"input has other readers": 1}


def test_mul_by_a_constant_absorbs_the_scale():
    inits = [f32("half", 0.5), f32("W", rng.standard_normal((K, 8)) * 0.2)]
    nodes = [oh.make_node("Relu", ["x"], ["r"]), oh.make_node("Mul", ["r", "half"], ["m"]),
             oh.make_node("MatMul", ["m", "W"], ["y"])]
    proto = build_model(nodes, [vi("x", ["N", 5, K])], [vi("y", ["N", 5, 8])], inits)
    feeds = outlier_feeds()
    out, (result,) = apply_passes(proto, SmoothQuant(alpha=0.8), ctx=ctx(feeds))
    assert result.stats["smoothed"] == 1 and count_ops(out)["Mul"] == 1
    mul = next(n for n in out.graph.node if n.op_type == "Mul")
    scale = next(t for t in out.graph.initializer if t.name == mul.input[1])
    assert list(scale.dims) == [K]
    after = smoothed_max(out, feeds, ["m"])["m"]
    assert channel_ratio(after) < channel_ratio(smoothed_max(proto, feeds, ["m"])["m"])


def test_gemm_with_transposed_weight():
    inits = [f32("gamma", np.ones(K)), f32("W", rng.standard_normal((8, K)) * 0.2),
             f32("c", rng.standard_normal(8))]
    nodes = [oh.make_node("LayerNormalization", ["x", "gamma"], ["ln"]),
             oh.make_node("Gemm", ["ln", "W", "c"], ["y"], transB=1)]
    proto = build_model(nodes, [vi("x", ["N", K])], [vi("y", ["N", 8])], inits)
    feeds = [{"x": f["x"][:, 0, :]} for f in outlier_feeds()]
    _, (result,) = apply_passes(proto, SmoothQuant(), ctx=ctx(feeds))
    assert result.stats["smoothed"] == 1


def test_other_producers_are_left_alone():
    inits = [f32("W", rng.standard_normal((K, 8)))]
    nodes = [oh.make_node("Relu", ["x"], ["r"]), oh.make_node("MatMul", ["r", "W"], ["y"])]
    proto = build_model(nodes, [vi("x", ["N", 5, K])], [vi("y", ["N", 5, 8])], inits)
    _, (result,) = apply_passes(proto, SmoothQuant(), ctx=ctx(outlier_feeds()))
    assert not result.changed and result.stats["not_smoothed"] == {"input comes from Relu": 1}


def test_without_calibration_nothing_happens_and_the_stats_say_why():
    proto = layer_norm_model(residual=False)
    model = load(proto)
    result = SmoothQuant().run(model, PassContext())
    assert not result.changed and "no calibration data" in result.stats["reason"]


def test_second_run_finds_nothing_to_do():
    proto = layer_norm_model(residual=True)
    feeds = outlier_feeds()
    out, _ = apply_passes(proto, SmoothQuant(), ctx=ctx(feeds))
    _, (again,) = apply_passes(out, SmoothQuant(), ctx=ctx(feeds))
    assert not again.changed and "already smooth" in again.stats["reason"]


# ---------------------------------------------------------------------- bert_tiny
@pytest.fixture(scope="module")
def tiny():
    proto = zoo.bert_tiny("torchscript")
    feeds = bert_token_feeds(zoo.BERT_TINY_VOCAB, count=3, batch=4, seed=3)
    return proto, feeds


def test_bert_tiny_keeps_outputs_and_flattens_activations(tiny):
    proto, feeds = tiny
    out, (result,) = apply_passes(proto, SmoothQuant(), ctx=ctx(feeds))
    # Q/K/V and FC1 after each LayerNorm (duplicated: the residual reads it too), FC2
    # after the GELU's "* 0.5"; the attention output projection reads a Reshape
    assert result.stats["smoothed"] == 6 and result.stats["weights"] == 10
    assert result.stats["not_smoothed"] == {"input comes from Reshape": 2}
    for f in feeds:  # the calibration data itself, beyond apply_passes' probe inputs
        diff = verify.compare(verify.run(proto, f), verify.run(out, f),
                              verify.Tolerance(rtol=1e-4, atol=1e-4))
        assert diff.ok, diff.summary()
    names_before = [n for n in matmul_inputs(proto) if "LayerNorm" in n or "act_fn" in n]
    before = smoothed_max(proto, feeds, names_before)
    smoothed = [n for n in matmul_inputs(out) if n.endswith("_smoothed") or "act_fn" in n]
    after = smoothed_max(out, feeds, smoothed)
    assert len(before) == len(after) == 6
    assert max(a.max() for a in after.values()) < max(b.max() for b in before.values())
    ratio_before = np.mean([channel_ratio(b) for b in before.values()])
    ratio_after = np.mean([channel_ratio(a) for a in after.values()])
    assert ratio_after < ratio_before
    assert result.stats["channel_ratio_after"] < result.stats["channel_ratio_before"]


def test_bert_tiny_through_the_pass_manager(tiny):
    proto, feeds = tiny
    model = load(proto)
    manager = PassManager([SmoothQuant()], PassContext(calibration=feeds))
    manager.run(model)
    assert [e.status for e in manager.trace][:2] == ["changed", "unchanged"]


def test_int8_smoothed_option_quantizes_with_less_error():
    """``quantize-int8-dynamic(smooth=true)`` (the planner's "smoothed" variant) runs
    SmoothQuant on the calibration data first: the same layers quantized, with less error
    on held-out activations that have outlier channels, and the report says what moved."""
    import graphopt

    proto = layer_norm_model(residual=True)
    cal, held = outlier_feeds(4), outlier_feeds(3)
    errors, stats = {}, {}
    for smooth in ("false", "true"):
        result = graphopt.optimize(
            proto, passes=[f"quantize-int8-dynamic(smooth={smooth}, require-speedup=false)"],
            calibration=cal, metric="mean-cosine", tolerance=0.5)
        out = result.model.to_onnx()
        errors[smooth] = max(np.abs(verify.run(out, f)["y"] - verify.run(proto, f)["y"]).max()
                             for f in held)
        stats[smooth] = result.report["compression"]["passes"]["quantize-int8-dynamic"]
    assert stats["true"]["applied"]["quantized"] == stats["false"]["applied"]["quantized"] == 2
    assert "smooth_quant" not in stats["false"]
    moved = stats["true"]["smooth_quant"]
    assert moved["smoothed"] == 1 and moved["duplicated"] == 1  # (the residual reads ln)
    assert moved["channel_ratio_after"] < moved["channel_ratio_before"] / 2
    assert errors["true"] < 0.6 * errors["false"], errors
