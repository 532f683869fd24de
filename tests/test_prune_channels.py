"""prune-channels: channel groups on the static graph, importance from data, valid
pruned graphs, and the pass through the budgeted-compression driver."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

import graphopt
from graphopt.ir import Model, infer_shapes
from graphopt.pass_infra import PassContext
from graphopt.passes.prune.channels import PruneChannels, analyse, keep_count
from graphopt.targets.ort import OrtTarget
from tests import zoo
from tests.digits import accuracy, digits_cnn, digits_data, digits_mlp, validation_split


def context(x=None, name: str = "input") -> PassContext:
    """The host's ort target, its channel multiple pinned to 8 (AVX-512 would make it 16):
    the figures below do not depend on the CPU's vector width."""
    target = OrtTarget()
    return PassContext(target=target, device=dataclasses.replace(target.device,
                                                                 channel_multiple=8),
                       calibration=None if x is None else [{name: x}])


def run(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def pruned(proto: onnx.ModelProto, ratio: float, x=None, **options):
    """(pruned proto, Applied) with every group at the setting nearest ``ratio``."""
    model = Model.from_proto(proto)
    p = PruneChannels(**options)
    ctx = context(x, proto.graph.input[0].name)
    sites = p.sites(model, ctx)
    choice = {s.name: min(s.settings, key=lambda v: abs(v - ratio))
              for s in sites if s.refused is None}
    applied = p.apply(model, choice, ctx)
    out = model.to_onnx()
    onnx.checker.check_model(out)
    infer_shapes(out, strict=True)  # raises if strict inference fails
    return out, applied


# ============================================================================ groups
def test_digits_cnn_groups_and_refusal():
    groups = analyse(Model.from_proto(digits_cnn()))
    sizes = {g.name: g.channels for g in groups if g.reason is None}
    assert sorted(sizes.values()) == [32, 64, 64, 128]
    refused = {g.name: g.reason for g in groups if g.reason}
    assert refused == {"logits": "reaches graph output 'logits'"}
    flatten = next(g for g in groups if g.channels == 64 and
                   any(ax.factor == 4 for _, ax in g.consumers))
    assert [n.op for n, _ in flatten.consumers] == ["Gemm"]  # Conv -> MaxPool -> Flatten -> Gemm


def test_settings_round_to_the_device_multiple():
    assert keep_count(64, 0.25, 8) == 48 and keep_count(64, 0.4, 8) == 40
    assert keep_count(29, 0.5, 8) == 16 and keep_count(12, 0.5, 8) == 6  # small: to 1
    assert keep_count(32, 0.99, 8) == 8  # never below one multiple
    sites = PruneChannels().sites(Model.from_proto(digits_cnn()), context())
    for site in sites:
        if site.refused is None:
            assert all((site.size * (1 - s)) % 8 == 0 for s in site.settings)
            assert site.settings[0] == 0.0 and len(set(site.settings)) == len(site.settings)


def test_ratio_zero_changes_nothing():
    proto = digits_cnn()
    out, applied = pruned(proto, 0.0)
    x = digits_data()[2][:16]
    assert not applied.kept
    np.testing.assert_array_equal(run(proto, {"input": x})[0], run(out, {"input": x})[0])


def test_pruned_cnn_is_valid_narrow_and_consistent():
    proto = digits_cnn()
    xtr = digits_data()[0]
    out, applied = pruned(proto, 0.5, xtr[:128])
    # every group halved: 32->16, 64->32, 64->32, 128->64; Flatten features 256 -> 128
    weights = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    shapes = sorted(w.shape for w in weights.values() if w.ndim == 4)
    assert shapes == [(16, 1, 3, 3), (32, 16, 3, 3), (32, 32, 3, 3)]
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    assert weights[gemm.input[1]].shape == (64, 128)
    # the narrowed weights are the original ones at the kept indices
    conv1 = next(n for n in out.graph.node if n.op_type == "Conv")
    axis, kept = applied.kept[conv1.output[0]]
    assert axis == 1 and len(kept) == 16
    np.testing.assert_array_equal(weights[conv1.input[1]], original[conv1.input[1]][kept])
    flat = next(n for n in out.graph.node if n.op_type == "Flatten").output[0]
    axis, features = applied.kept[flat]
    conv3_kept = applied.kept[next(n for n in out.graph.node if n.op_type == "Conv"
                                   and n.output[0].startswith("/7"))
                              .output[0]][1]
    assert axis == 1 and len(features) == 128
    np.testing.assert_array_equal(features.reshape(-1, 4)[:, 0] // 4, conv3_kept)
    np.testing.assert_array_equal(weights[gemm.input[1]],
                                  original[gemm.input[1]][:, features][kept_of(applied, gemm)])
    y = run(out, {"input": xtr[:5]})[0]
    assert y.shape == (5, 10)


def kept_of(applied, gemm) -> np.ndarray:
    return applied.kept[gemm.output[0]][1]


def test_wanda_importance_beats_random_and_l2():
    """Without recovery, 25% of every group: channels chosen by activation-aware
    importance lose less test accuracy than random ones and than weight norms."""
    xtr, _, xte, yte = digits_data()
    proto = digits_cnn()
    wanda = accuracy(pruned(proto, 0.25, xtr[:256])[0], xte, yte)
    l2 = accuracy(pruned(proto, 0.25, xtr[:256], importance="l2")[0], xte, yte)
    model = Model.from_proto(proto)
    p = PruneChannels()
    sites = [s for s in p.sites(model, context()) if s.refused is None]
    randoms = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        p._scores = {s.name: rng.random(s.size) for s in sites}
        m = Model.from_proto(proto)
        p.apply(m, {s.name: 0.25 for s in sites}, context())
        randoms.append(accuracy(m.to_onnx(), xte, yte))
    assert wanda > np.mean(randoms) + 0.02, (wanda, randoms)
    assert wanda >= l2, (wanda, l2)


# ============================================================================ topologies
@pytest.mark.parametrize("build", [zoo.resnet_cnn, zoo.mobilenet_cnn])
def test_residual_and_depthwise_cnns_prune_to_valid_graphs(build):
    proto = build()
    groups = analyse(Model.from_proto(proto))
    usable = [g for g in groups if g.reason is None]
    assert any(len(g.producers) >= 2 for g in usable)  # residual / squeeze-excite unions
    if build is zoo.mobilenet_cnn:
        assert any(g.depthwise for g in usable)
    assert all(g.reason for g in groups if g not in usable)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    out, applied = pruned(proto, 0.5, x)
    y = run(out, {"input": x})[0]
    assert y.shape == run(proto, {"input": x})[0].shape
    params = sum(numpy_helper.to_array(t).size for t in out.graph.initializer)
    original = sum(numpy_helper.to_array(t).size for t in proto.graph.initializer)
    assert params < 0.6 * original
    for node in out.graph.node:  # depthwise convs keep group == channels
        if node.op_type == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            w = next(t for t in out.graph.initializer if t.name == node.input[1])
            assert group == 1 or (group == w.dims[0] and w.dims[1] == 1)


def vit_block() -> onnx.ModelProto:
    """x[N, 16, 32] -> LayerNorm -> MatMul(32x64) + b -> Gelu -> MatMul(64x32) + b
    -> Add(x) -> y: the residual width is tied to the graph input, the FFN's is free."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in {
        "g": np.ones(32), "b": np.zeros(32), "w1": rng.standard_normal((32, 64)) / 6,
        "b1": rng.standard_normal(64) / 10, "w2": rng.standard_normal((64, 32)) / 8,
        "b2": rng.standard_normal(32) / 10}.items()]
    nodes = [oh.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1, name="ln"),
             oh.make_node("MatMul", ["n", "w1"], ["h"], name="fc1"),
             oh.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
             oh.make_node("Gelu", ["hb"], ["a"], name="gelu"),
             oh.make_node("MatMul", ["a", "w2"], ["o"], name="fc2"),
             oh.make_node("Add", ["o", "b2"], ["ob"], name="fc2_bias"),
             oh.make_node("Add", ["x", "ob"], ["y"], name="residual")]
    graph = oh.make_graph(nodes, "vit", [oh.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                   ["N", 16, 32])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 32])],
                          inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 20)])


def test_vit_block_prunes_the_ffn_and_names_what_it_refuses():
    proto = vit_block()
    groups = analyse(Model.from_proto(proto))
    ffn = [g for g in groups if g.reason is None]
    assert [g.channels for g in ffn] == [64] and len(ffn[0].params) == 1  # b1 narrowed
    refused = [g.reason for g in groups if g.reason]
    assert refused == ["Add 'residual' combines the channels with graph input 'x'"]
    x = np.random.default_rng(1).standard_normal((3, 16, 32)).astype(np.float32)
    out, applied = pruned(proto, 0.5, x)
    w1 = next(t for t in out.graph.initializer if t.name == "w1")
    assert tuple(w1.dims) == (32, 32) and applied.kept["a"][0] == 2
    assert run(out, {"x": x})[0].shape == (3, 16, 32)


def test_reshape_target_is_rewritten():
    """Conv -> Reshape([0, 256]) -> Gemm: the Reshape's constant follows the channels."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([0, 256], np.int64), "shape"),
             numpy_helper.from_array(rng.standard_normal((256, 10)).astype(np.float32), "fc")]
    nodes = [oh.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             oh.make_node("Relu", ["c"], ["r"], name="relu"),
             oh.make_node("Reshape", ["r", "shape"], ["f"], name="reshape"),
             oh.make_node("MatMul", ["f", "fc"], ["y"], name="fc")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                 ["N", 3, 4, 4])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    out, applied = pruned(proto, 0.5)
    shape = next(t for t in out.graph.initializer if t.name == "shape")
    assert numpy_helper.to_array(shape).tolist() == [0, 128]
    assert tuple(next(t for t in out.graph.initializer if t.name == "fc").dims) == (128, 10)


# ============================================================================ driver
def test_driver_searches_under_the_budget_and_reports():
    """Through graphopt.optimize: a searched pruning (no recovery) that holds the top-1
    budget on unseen validation images, with the compression report filled in."""
    xtr = digits_data()[0]
    xval, _ = validation_split()
    result = graphopt.optimize(digits_mlp(), schemes={"prune": "channels"},
                               calibration={"input": xtr[:256].reshape(-1, 64)},
                               validation={"input": xval.reshape(-1, 64)},
                               metric="top1", tolerance=0.98, goal="flops", recovery=None)
    section = result.report["compression"]
    info = section["passes"]["prune-channels"]
    assert section["metric"] == "top1" and info["status"] == "changed"
    assert info["score"] >= 0.98 and result.report["verification"]["score"] >= 0.98
    assert info["cost"]["flops_after"] < info["cost"]["flops_before"]
    assert info["refused"] == {"logits": "reaches graph output 'logits'"}
    changed = [s for s in info["sites"].values() if s["changed"]]
    assert changed and all(s["damage_alone"] <= 0.02 for s in changed)
    assert result.model.num_params() < Model.from_proto(digits_mlp()).num_params()
