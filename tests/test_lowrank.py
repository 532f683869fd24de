"""decompose-low-rank: whitened SVD of MatMul/Gemm weights, Tucker-2 of convolutions,
valid graphs, refusals with reasons, and the pass through the compression core."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

import graphopt
from graphopt.capture import activations
from graphopt.compression import Site
from graphopt.cost import AnalyticCostModel
from graphopt.errors import UsageError
from graphopt.ir import Model, infer_shapes
from graphopt.pass_infra import PassContext
from graphopt.passes.lowrank import DecomposeLowRank, decompose, svd, tucker
from graphopt.registry import pass_registry
from graphopt.targets.ort import LOSSLESS_PIPELINE, OrtTarget
from tests.digits import accuracy, digits_cnn, digits_data, digits_mlp, validation_split
from tests.helpers import build_model, count_ops

MLP_SITES = ("/0/Gemm", "/2/Gemm")  # 64x256 and 256x256; /4/Gemm (256x10) is small
CONV2 = "/3/Conv"  # digits_cnn's second conv: 32 -> 64 channels, 3x3


def context(calibration=None, cost: bool = False) -> PassContext:
    target = OrtTarget()
    return PassContext(target=target, device=target.device, calibration=calibration,
                       cost_model=AnalyticCostModel() if cost else None)


def run(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def checked(model: Model) -> onnx.ModelProto:
    out = model.to_onnx()
    onnx.checker.check_model(out)
    infer_shapes(out, strict=True)  # raises if strict inference fails
    return out


def decomposed(proto, choice: dict, calibration=None, **options):
    """(decomposed proto, Applied) with the sites of ``choice`` at their ratios; ranks a
    multiple of 8 whatever this CPU's vector width (AVX-512 would round to 16)."""
    model = Model.from_proto(proto)
    p = DecomposeLowRank(require_speedup=False, **{"multiple": 8, **options})
    ctx = context(calibration)
    sites = {s.name: s for s in p.sites(model, ctx)}
    assert all(sites[name].refused is None for name in choice)
    applied = p.apply(model, choice, ctx)
    return checked(model), applied


def relative_error(ref: onnx.ModelProto, got: onnx.ModelProto, tensor: str, feeds) -> float:
    """‖got − ref‖ / ‖ref‖ of ``tensor`` (present in both models) on ``feeds``."""
    a = next(activations(ref, [tensor], [feeds]))[tensor]
    b = next(activations(got, [tensor], [feeds]))[tensor]
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def output_of(proto: onnx.ModelProto, node_name: str) -> str:
    return next(n.output[0] for n in proto.graph.node if n.name == node_name)


@pytest.fixture(scope="module")
def mlp():
    xtr, _, xte, _ = digits_data()
    return digits_mlp(), [{"input": xtr[:1000].reshape(-1, 64)}], {"input": xte.reshape(-1, 64)}


# ============================================================================ MatMul/Gemm
def test_whitened_svd_beats_plain_svd_on_held_out_data(mlp):
    proto, calibration, held_out = mlp
    for site, ratio in [("/0/Gemm", 0.25), ("/2/Gemm", 0.125)]:
        errors = {}
        for method in ("whitened", "svd"):
            out, applied = decomposed(proto, {site: ratio}, calibration, method=method)
            stats = applied.stats[site]
            assert stats["method"] == method and stats["rank"] == int(ratio * stats["full_rank"])
            errors[method] = relative_error(proto, out, output_of(proto, site), held_out)
        # The whitened factors minimize the error of the layer's output, not of its weight.
        assert errors["whitened"] < 0.8 * errors["svd"], (site, errors)


def test_plain_svd_without_data_and_the_stats_say_so(mlp):
    proto, _, held_out = mlp
    out, applied = decomposed(proto, {"/2/Gemm": 0.25})
    stats = applied.stats["/2/Gemm"]
    assert stats["method"] == "svd" and stats["data"].startswith("none")
    assert stats["rank"] == 64 and stats["params_after"] == 64 * 512
    # Without data the error reported is the weight's relative Frobenius error.
    gemm = next(n for n in proto.graph.node if n.name == "/2/Gemm")
    w = numpy_helper.to_array(next(t for t in proto.graph.initializer
                                   if t.name == gemm.input[1]))
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    assert stats["error"] == pytest.approx(np.sqrt((s[64:] ** 2).sum() / (s ** 2).sum()),
                                           rel=1e-4)


def test_full_rank_factors_reproduce_the_layer(mlp):
    proto, calibration, held_out = mlp
    model = Model.from_proto(proto)
    node = next(n for n in model.graph.nodes if n.name == "/2/Gemm")
    w, _ = svd.linear_weight(node, node.inputs[1].values)
    x = next(activations(proto, [node.inputs[0].name], calibration))[node.inputs[0].name]
    s = svd.whitening(x.T @ x, len(x))
    a, b = svd.factorize(w, s).factors(min(w.shape))
    taken = {t for t in model.graph.tensors()}
    svd.decompose_linear(model.graph, node, a, b, taken, {n.name for n in model.graph.nodes})
    out = checked(model)
    assert count_ops(out)["MatMul"] == 1 and count_ops(out)["Gemm"] == 3
    ref, got = run(proto, held_out)[0], run(out, held_out)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_half_the_parameters_keep_test_accuracy_through_the_core():
    xtr, _, xte, yte = digits_data()
    xval, _ = validation_split()
    registry = pass_registry()
    cleanup = [n for n in LOSSLESS_PIPELINE if registry.get(n).family == "cleanup"]
    rest = [n for n in LOSSLESS_PIPELINE if n not in cleanup]
    result = graphopt.optimize(
        digits_mlp(), passes=[*cleanup, DecomposeLowRank(rank_ratio=0.25,
                                                         require_speedup=False), *rest],
        calibration={"input": xtr[:1000].reshape(-1, 64)},
        validation={"input": xval.reshape(-1, 64)}, metric="top1", tolerance=0.98,
        recovery=None)
    info = result.report["compression"]["passes"]["decompose-low-rank"]
    assert info["status"] == "changed" and info["mode"] == "fixed"
    applied = info["applied"]
    assert set(applied) == set(MLP_SITES)
    before = sum(applied[s]["params_before"] for s in MLP_SITES)
    after = sum(applied[s]["params_after"] for s in MLP_SITES)
    assert after <= 0.5 * before
    assert all(applied[s]["method"] == "whitened" for s in MLP_SITES)
    assert result.model.num_params() < Model.from_proto(digits_mlp()).num_params() - \
        (before - after) + 100  # the factors replace the weights (biases stay)
    original = accuracy(digits_mlp(), xte, yte)
    assert accuracy(result.model.to_onnx(), xte, yte) >= original - 0.01


def _low_rank_weight(rng, k: int, n: int, rank: int) -> np.ndarray:
    return (rng.standard_normal((k, rank)) @ rng.standard_normal((rank, n)) /
            np.sqrt(k)).astype(np.float32)


def test_batched_3d_matmul():
    rng = np.random.default_rng(0)
    k, n = 96, 128
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    proto = build_model(
        [oh.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
         oh.make_node("Add", ["h", "bias"], ["y"], name="add")],
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", k])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", n])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "bias")])
    mix = rng.standard_normal((k, k)) * np.exp(-np.arange(k) / 12.0)  # correlated inputs
    x = (rng.standard_normal((4, 32, k)) @ mix).astype(np.float32)
    out, applied = decomposed(proto, {"proj": 0.25}, [{"x": x}])
    stats = applied.stats["proj"]
    assert stats["rank"] == 24 and stats["rows"] == 4 * 32
    mids = [n for n in out.graph.node if n.op_type == "MatMul"]
    assert len(mids) == 2 and mids[1].output[0] == "h" and mids[1].name == "proj"
    inferred = infer_shapes(out, strict=True)
    mid = next(v for v in inferred.graph.value_info if v.name == mids[0].output[0])
    assert [d.dim_value or d.dim_param for d in mid.type.tensor_type.shape.dim] == \
        ["batch", "seq", 24]
    # The singular values tell the output error on the calibration data (up to damping).
    assert relative_error(proto, out, "h", {"x": x}) == pytest.approx(stats["error"],
                                                                       rel=1e-2)
    # An exactly rank-16 weight is reproduced at rank 24.
    exact = onnx.ModelProto()
    exact.CopyFrom(proto)
    exact.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        _low_rank_weight(rng, k, n, 16), "w"))
    out, _ = decomposed(exact, {"proj": 0.25}, [{"x": x}])
    np.testing.assert_allclose(run(out, {"x": x})[0], run(exact, {"x": x})[0],
                               rtol=1e-4, atol=1e-4)


def test_gemm_with_trans_b_alpha_and_bias():
    rng = np.random.default_rng(1)
    k, n = 128, 96
    w = _low_rank_weight(rng, k, n, 16)
    bias = rng.standard_normal(n).astype(np.float32)
    proto = build_model(
        [oh.make_node("Gemm", ["x", "wt", "c"], ["y"], name="fc", transB=1, alpha=0.5,
                      beta=2.0)],
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "wt"),
         numpy_helper.from_array(bias, "c")])
    x = rng.standard_normal((64, k)).astype(np.float32)
    out, applied = decomposed(proto, {"fc": 0.25}, [{"x": x}])
    assert applied.stats["fc"]["rank"] == 24 and applied.kept == {}
    first, second = out.graph.node
    assert first.op_type == "MatMul" and second.op_type == "Gemm"
    assert second.name == "fc" and second.output[0] == "y" and second.input[2] == "c"
    attrs = {a.name: oh.get_attribute_value(a) for a in second.attribute}
    assert attrs["transB"] == 1 and attrs["alpha"] == 1.0 and attrs["beta"] == 2.0
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert inits[first.input[1]].shape == (k, 24) and inits[second.input[1]].shape == (n, 24)
    assert "wt" not in inits  # the original weight is gone
    np.testing.assert_allclose(run(out, {"x": x})[0], run(proto, {"x": x})[0],
                               rtol=1e-4, atol=1e-4)


# ============================================================================ Conv
@pytest.fixture(scope="module")
def cnn():
    xtr, _, xte, _ = digits_data()
    return digits_cnn(), [{"input": xtr[:500]}], {"input": xte}


def test_tucker2_on_conv2(cnn):
    proto, calibration, held_out = cnn
    target = output_of(proto, CONV2)
    errors = []
    for ratio in (0.75, 0.5, 0.25):
        out, applied = decomposed(proto, {CONV2: ratio}, calibration)
        r1, r2 = applied.stats[CONV2]["rank"]
        assert (r1, r2) == (int(32 * ratio), int(64 * ratio))
        convs = {n.name: n for n in out.graph.node if n.op_type == "Conv"}
        assert len(convs) == 3 + 2
        last = convs[CONV2]
        core = next(n for n in out.graph.node if n.output[0] == last.input[0])
        first = next(n for n in out.graph.node if n.output[0] == core.input[0])
        shapes = {t.name: tuple(t.dims) for t in out.graph.initializer}
        assert shapes[first.input[1]] == (r1, 32, 1, 1)
        assert shapes[core.input[1]] == (r2, r1, 3, 3)
        assert shapes[last.input[1]] == (64, r2, 1, 1)
        assert last.output[0] == target and len(last.input) == 3  # bias kept
        assert {a.name: oh.get_attribute_value(a) for a in core.attribute}["pads"] == \
            [1, 1, 1, 1]
        errors.append(relative_error(proto, out, target, held_out))
    assert errors[0] < errors[1] < errors[2] < 1.0, errors


def test_tucker2_exact_at_full_rank_and_whitening_helps(cnn):
    proto, calibration, held_out = cnn
    w = numpy_helper.to_array(next(t for t in proto.graph.initializer if tuple(t.dims) ==
                                   (64, 32, 3, 3))).astype(np.float64)
    np.testing.assert_allclose(tucker.tucker_product(*tucker.tucker2(w, 32, 64)), w,
                               atol=1e-10)
    target = output_of(proto, CONV2)
    whitened, _ = decomposed(proto, {CONV2: 0.5}, calibration)
    plain, _ = decomposed(proto, {CONV2: 0.5}, calibration, method="svd")
    assert relative_error(proto, whitened, target, held_out) < \
        relative_error(proto, plain, target, held_out)


# ============================================================================ refusals
def test_refusals_carry_reasons(mlp):
    proto, calibration, _ = mlp
    sites = {s.name: s for s in DecomposeLowRank().sites(Model.from_proto(proto),
                                                          context(calibration, cost=True))}
    assert "2560 elements (< min-size 4096)" in sites["/4/Gemm"].refused
    assert sites["/2/Gemm"].refused is None and sites["/2/Gemm"].size == 256
    # 0.75 of 64x256 (rank 48) saves parameters (48 < 64·256/320 = 51.2) but the cost
    # model predicts two skinny GEMMs slower than one at batch 1.
    p = DecomposeLowRank(ratios=(1.0, 0.75))
    sites = {s.name: s for s in p.sites(Model.from_proto(proto), context(cost=True))}
    refused = sites["/0/Gemm"].refused
    assert refused.startswith("no speedup predicted") and "µs" in refused
    t = sites["/0/Gemm"].info["predicted_s"]
    assert t[0.75] >= t["original"]
    assert sites["/2/Gemm"].refused.startswith("no rank saves parameters")  # 192 > 128
    offered = {s.name: s for s in p.sites(Model.from_proto(proto), context())}
    assert offered["/0/Gemm"].settings == (1.0, 0.75)  # no cost model: not refused
    # a site refused when applied (in a joint search, a pass before narrowed it) is left
    # as it is, and the stats say why
    model = Model.from_proto(proto)
    applied = DecomposeLowRank().apply(model, {"/4/Gemm": 0.5}, context())
    assert "< min-size 4096" in applied.stats["/4/Gemm"]["skipped"]
    assert [n.op for n in model.graph.nodes] == [n.op_type for n in proto.graph.node]


def test_depthwise_and_pointwise_convs_are_refused():
    rng = np.random.default_rng(2)
    dw = rng.standard_normal((64, 1, 3, 3)).astype(np.float32)
    pw = rng.standard_normal((64, 64, 1, 1)).astype(np.float32)
    proto = build_model(
        [oh.make_node("Conv", ["x", "dw"], ["h"], name="depthwise", group=64, pads=[1] * 4),
         oh.make_node("Conv", ["h", "pw"], ["y"], name="pointwise")],
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 8, 8])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 8, 8])],
        [numpy_helper.from_array(dw, "dw"), numpy_helper.from_array(pw, "pw")])
    sites = {s.name: s for s in DecomposeLowRank(min_size=0).sites(Model.from_proto(proto),
                                                                   context())}
    assert sites["depthwise"].refused.startswith("depthwise Conv (group 64)")
    assert sites["pointwise"].refused.startswith("1x1 Conv")


# ============================================================================ options
def test_options_are_validated():
    options = DecomposeLowRank.Options
    with pytest.raises(ValueError, match="whitened, svd"):
        options(method="qr")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        options(rank_ratio=1.5)
    with pytest.raises(ValueError, match="ratios"):
        options(ratios=(1.0, 0.0))
    with pytest.raises(UsageError, match="whitened, svd"):  # keyword options: usage error
        DecomposeLowRank(method="qr")
    assert DecomposeLowRank.scheme == ("low-rank", "svd")
    assert DecomposeLowRank.scheme_order == 20 and DecomposeLowRank.family == "lowrank"


def test_fixed_choice_takes_the_nearest_setting():
    sites = [Site("a", "rank", (1.0, 0.5, 0.25)), Site("b", "rank", (1.0, 0.75))]
    assert DecomposeLowRank(rank_ratio=0.3).fixed_choice(sites) == {"a": 0.25, "b": 0.75}
    assert DecomposeLowRank().fixed_choice(sites) is None


def test_statistics_are_captured_once_per_run(mlp, monkeypatch):
    proto, calibration, _ = mlp
    calls = []
    real = decompose.channel_stats

    def counting(*args, **kwargs):
        calls.append(sorted(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(decompose, "channel_stats", counting)
    p = DecomposeLowRank(require_speedup=False)
    ctx = context(calibration)
    model = Model.from_proto(proto)
    p.sites(model, ctx)
    outputs = []
    for choice in ({"/0/Gemm": 0.5}, {"/2/Gemm": 0.25}, dict.fromkeys(MLP_SITES, 0.25)):
        clone = model.clone()
        p.apply(clone, choice, ctx)
        outputs.append(run(clone.to_onnx(), {"input": calibration[0]["input"][:8]})[0])
    assert len(calls) == 1 and len(calls[0]) == 2  # both layer inputs, in one pass
    p.sites(model, ctx)  # a new run starts afresh
    assert len(calls) == 2
